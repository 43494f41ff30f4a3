"""The config objects, one per concern. Every field: a default and a one-line doc."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from encore.configs.fields import check_range, opt

LoadFormat = Literal["auto", "gguf", "safetensors", "dummy"]
DType = Literal["auto", "float32", "bfloat16", "float16"]
Device = Literal["auto", "cpu", "cuda"]
AttentionBackendName = Literal["auto", "torch", "triton"]
QueuePolicyName = Literal["fcfs", "priority", "program_fcfs"]
HashAlgorithm = Literal["blake2b", "sha256"]
KVCacheDType = Literal["auto", "fp8_e4m3", "fp8_e5m2"]
CacheWritePolicy = Literal["write_back", "write_through"]
KVLoadPolicyName = Literal["cost", "always"]
ChunkReuseMode = Literal["off", "marked", "parts"]
ChunkRecomputePolicy = Literal["fixed", "adaptive"]
TierKVCodec = Literal["none", "int8", "int4"]


@dataclass(frozen=True)
class ModelConfig:
    """Which model to load and how."""

    model: str = opt("", "GGUF file, local Hugging Face directory, a dummy shape preset name, "
                         "or python:MODULE:FUNCTION (a model plugin); empty = the embedded "
                         "SmolLM2-135M-Instruct GGUF")
    load_format: LoadFormat = opt("auto", "weight format; auto picks from the path")
    dtype: DType = opt("auto", "compute dtype; auto = bfloat16 on CPUs that support it and on "
                               "CUDA, else float32")
    tokenizer: str | None = opt(None, "tokenizer source (GGUF or HF dir); default: the model")
    max_model_len: int | None = opt(None, "context length limit; default: the model's")
    served_model_name: str | None = opt(None, "name reported by /v1/models; default: from the path")
    seed: int = opt(0, "seed for dummy weights and for unseeded sampling")

    def __post_init__(self) -> None:
        check_range("model", "max_model_len", self.max_model_len, lo=1)


@dataclass(frozen=True)
class CacheConfig:
    """The paged KV cache and prefix caching."""

    block_size: int = opt(16, "tokens per KV block")
    enable_prefix_caching: bool = opt(True, "reuse KV blocks of identical prefixes")
    num_device_blocks: int | None = opt(None, "KV blocks in the device pool; overrides the "
                                              "automatic size (tests use it to force pressure)")
    kv_cache_gib: float = opt(1.0, "CPU only: GiB of memory for the KV pool when "
                                   "num_device_blocks is not set")
    gpu_memory_utilization: float = opt(0.9, "CUDA only: fraction of GPU memory Encore may use "
                                             "(weights + activations + KV)")
    kv_cache_dtype: KVCacheDType = opt("auto", "dtype of the device KV pool: auto (the "
                                       "model's dtype), fp8_e4m3 or fp8_e5m2 (half the bytes "
                                       "of bf16: ~2x the blocks; per-tensor scales of each "
                                       "layer, 1.0 unless the checkpoint has k_scale/v_scale)")
    hash_algorithm: HashAlgorithm = opt("blake2b", "digest for block keys (keyed)")
    host_cache_gib: float = opt(0.0, "GiB of CPU memory for the host KV tier (pinned on CUDA); "
                                     "0 = off")
    disk_cache_dir: str | None = opt(None, "directory of the disk KV tier (survives restarts; "
                                           "holds the deployment secret); None = off")
    disk_cache_gib: float = opt(10.0, "size cap of the disk KV tier in GiB")
    remote_cache_url: str | None = opt(None, "remote KV tier shared by replicas, on a "
                                             "Valkey/Redis store: redis://[:password@]host:"
                                             "port/db or rediss:// (TLS); None = off")
    remote_cache_ttl_s: float = opt(86400.0, "seconds a block stays in the remote store")
    remote_cache_max_value_mb: float = opt(64.0, "largest value written to the remote store "
                                                 "(MB); bigger blocks are not stored there")
    remote_cache_timeout_s: float = opt(2.0, "seconds one remote store operation may take; "
                                             "slower is a miss")
    tier_kv_codec: TierKVCodec = opt("none", "how the host, disk and remote tiers store KV "
                                     "blocks: none (as on the device), int8 or int4 (keys "
                                     "per channel, values per token, min/max scales in each "
                                     "block; bf16 blocks of 16 tokens shrink ~1.75x / ~3.1x)")
    deployment_secret_file: str | None = opt(None, "file holding the deployment secret that "
                                                   "every replica of a fleet shares (block "
                                                   "keys, tenant salts, MACs); the env var "
                                                   "ENCORE_DEPLOYMENT_SECRET overrides it")
    cache_write_policy: CacheWritePolicy = opt("write_back", "write_back: save a block one tier "
                                               "down when it is evicted; write_through: save "
                                               "every computed block to every lower tier")
    kv_load_policy: KVLoadPolicyName = opt("cost", "cost: load a tier hit only when the cost "
                                           "model says it beats recomputing; always: load every "
                                           "hit (tests, benchmarks)")
    checkpoint_interval_s: float = opt(60.0, "with a disk tier: cached device blocks without a "
                                             "disk copy are written at least this often while "
                                             "busy (all of them whenever the engine is idle); "
                                             "bounds what kill -9 loses")
    shutdown_flush_timeout_s: float = opt(30.0, "with a disk tier: on graceful shutdown, write "
                                                "every cached block not yet on disk for at most "
                                                "this long (seconds)")
    enable_ttl_pins: bool = opt(True, "pin an agent program's KV between turns (programs are "
                                      "named by prompt_cache_key / job_id) for a chosen TTL")
    max_pin_ttl_s: float = opt(600.0, "longest TTL a pin may get, chosen or requested (seconds)")
    max_pinned_fraction: float = opt(0.5, "most device blocks that TTL pins may hold (0-1)")
    max_pinned_gib_per_tenant: float = opt(0.0, "most KV (GiB, device) that one tenant's TTL "
                                               "pins may hold; 0 = no per-tenant quota")
    chunk_reuse: ChunkReuseMode = opt("marked", "position-independent chunk reuse: marked = "
                                      "content parts with prompt_cache_breakpoint mode chunk; "
                                      "parts = also every text part of at least "
                                      "chunk_min_tokens; off = refuse chunk marks")
    chunk_min_tokens: int = opt(256, "with chunk_reuse=parts: shortest text part that is a chunk")
    chunk_recompute_policy: ChunkRecomputePolicy = opt("fixed", "how many tokens of a reused "
                                                       "chunk to recompute: fixed = "
                                                       "chunk_recompute_fraction; adaptive = "
                                                       "from the chunk's measured context "
                                                       "impact (Cache-Craft)")
    chunk_recompute_fraction: float = opt(0.15, "fixed policy: fraction of a reused chunk's "
                                                "tokens recomputed (CacheBlend)")
    chunk_check_layer: int = opt(1, "layer at which blended tokens are scored by KV deviation; "
                                    "layers up to it are recomputed for every token; -1 = "
                                    "naive reuse (no chunk token recomputed; comparisons)")

    def __post_init__(self) -> None:
        if self.block_size not in (1, 2, 4, 8, 16, 32, 64, 128):
            from encore.configs.fields import ConfigError

            raise ConfigError(f"cache.block_size={self.block_size!r} is not allowed; choose one "
                              "of [1, 2, 4, 8, 16, 32, 64, 128]")
        check_range("cache", "num_device_blocks", self.num_device_blocks, lo=2)
        check_range("cache", "kv_cache_gib", self.kv_cache_gib, lo=0.001)
        check_range("cache", "gpu_memory_utilization", self.gpu_memory_utilization, lo=0.05, hi=1.0)
        check_range("cache", "host_cache_gib", self.host_cache_gib, lo=0.0)
        check_range("cache", "disk_cache_gib", self.disk_cache_gib, lo=0.0)
        check_range("cache", "checkpoint_interval_s", self.checkpoint_interval_s, lo=0.1)
        check_range("cache", "remote_cache_ttl_s", self.remote_cache_ttl_s, lo=1.0)
        check_range("cache", "remote_cache_max_value_mb", self.remote_cache_max_value_mb,
                    lo=0.001)
        check_range("cache", "remote_cache_timeout_s", self.remote_cache_timeout_s, lo=0.01)
        if self.remote_cache_url is not None and not self.remote_cache_url.startswith(
                ("redis://", "rediss://", "unix://")):
            from encore.configs.fields import ConfigError

            raise ConfigError("cache.remote_cache_url must start with redis://, rediss:// or "
                              f"unix://, got {self.remote_cache_url.split(':')[0]!r}")
        if self.kv_cache_dtype != "auto" and self.tier_kv_codec != "none":
            from encore.configs.fields import ConfigError

            raise ConfigError(f"cache.tier_kv_codec={self.tier_kv_codec} with cache.kv_cache_dtype="
                              f"{self.kv_cache_dtype} is not supported (fp8 blocks are stored "
                              "in the tiers as they are)")
        check_range("cache", "shutdown_flush_timeout_s", self.shutdown_flush_timeout_s, lo=0.0)
        check_range("cache", "max_pin_ttl_s", self.max_pin_ttl_s, lo=1.0)
        check_range("cache", "max_pinned_fraction", self.max_pinned_fraction, lo=0.0, hi=1.0)
        check_range("cache", "max_pinned_gib_per_tenant", self.max_pinned_gib_per_tenant, lo=0.0)
        check_range("cache", "chunk_min_tokens", self.chunk_min_tokens, lo=1)
        check_range("cache", "chunk_recompute_fraction", self.chunk_recompute_fraction, lo=0.0,
                    hi=1.0)
        check_range("cache", "chunk_check_layer", self.chunk_check_layer, lo=-1)
        if (self.host_cache_gib > 0 or self.disk_cache_dir or self.remote_cache_url) \
                and not self.enable_prefix_caching:
            from encore.configs.fields import ConfigError

            raise ConfigError("cache.host_cache_gib / disk_cache_dir / remote_cache_url need "
                              "enable_prefix_caching (the tiers hold prefix-cached blocks)")


@dataclass(frozen=True)
class SchedulerConfig:
    """Continuous batching limits and queue policy."""

    max_num_seqs: int = opt(64, "most sequences in one step")
    max_num_batched_tokens: int = opt(2048, "token budget of one step (prefill chunks + decodes)")
    policy: QueuePolicyName = opt("fcfs", "waiting-queue order: fcfs, priority (lower first), or "
                                          "program_fcfs (a program's later turns keep the "
                                          "place of its first request; programs are named by "
                                          "prompt_cache_key)")
    async_scheduling: bool = opt(True, "plan step N+1 while the worker runs step N (its "
                                       "sampled tokens stay on the device and fill the next "
                                       "step's inputs); outputs are the same as with false")

    def __post_init__(self) -> None:
        check_range("scheduler", "max_num_seqs", self.max_num_seqs, lo=1)
        check_range("scheduler", "max_num_batched_tokens", self.max_num_batched_tokens, lo=1)


@dataclass(frozen=True)
class WorkerConfig:
    """The model-running process."""

    device: Device = opt("auto", "where the model runs; auto = cuda if available, else cpu")
    attention_backend: AttentionBackendName = opt("auto", "auto = triton on CUDA, torch on CPU")
    num_threads: int | None = opt(None, "CPU threads for torch; default: torch's choice")
    start_timeout_s: float = opt(600.0, "seconds to wait for the worker to load the model")
    enforce_eager: bool = opt(False, "CUDA only: run decode steps eagerly instead of replaying "
                                     "CUDA graphs")
    tensor_parallel_size: int = opt(1, "worker processes (ranks) the model is split over, one "
                                       "per GPU (NCCL) or CPU process (gloo); Megatron-style "
                                       "tensor parallelism")
    quantization: Literal["none", "int8", "int4"] = opt(
        "none", "CPU only: weight-only quantized matrices (int8 per channel; int4 in groups "
                "of 32, LM head int8), run by torch's packed CPU matmuls")

    def __post_init__(self) -> None:
        check_range("worker", "num_threads", self.num_threads, lo=1)
        check_range("worker", "tensor_parallel_size", self.tensor_parallel_size, lo=1, hi=64)


@dataclass(frozen=True)
class ServerConfig:
    """The HTTP front end."""

    host: str = opt("127.0.0.1", "address to listen on")
    port: int = opt(8000, "port to listen on")
    api_keys: list[str] = opt([], "accepted API keys (Bearer), one tenant each; none = no "
                                  "authentication", repeat=True)
    api_keys_file: str | None = opt(None, "file of more API keys, one per line (# comments)")
    max_body_bytes: int = opt(8 * 1024 * 1024, "largest request body accepted (413 above)")
    max_waiting_requests: int = opt(1024, "requests queued beyond this get 429")
    drain_timeout_s: float = opt(30.0, "on SIGTERM, seconds to let running requests finish")
    log_level: Literal["debug", "info", "warning", "error"] = opt("info", "log level")
    allow_client_cache_salt: bool = opt(False, "honour a request's cache_salt (tenant "
                                               "isolation chosen by clients); else reject it")
    tool_call_parser: Literal["hermes", "llama3_json"] = opt(
        "hermes", "how chat output is parsed for tool calls: hermes (<tool_call>{json}"
                  "</tool_call>) or llama3_json (the whole output is one JSON call)")
    max_connections: int = opt(8192, "most open client connections; requests on any beyond "
                                     "get 503 (keep it above max_waiting_requests, and "
                                     "ulimit -n above it)")
    header_timeout_s: float = opt(10.0, "seconds a connection has to send a whole request "
                                        "head after connecting or after its last response; "
                                        "then it is closed (slowloris)")
    body_timeout_s: float = opt(60.0, "seconds a request body may take to arrive once its "
                                      "headers have (408 after)")
    keep_alive_timeout_s: float = opt(5.0, "seconds an idle keep-alive connection is kept "
                                           "open between requests")
    max_header_bytes: int = opt(16384, "largest request head (request line and headers) "
                                       "accepted; a larger one gets 400")
    responses_db: str | None = opt(None, "SQLite file of stored /v1/responses (store: true); "
                                         "default: responses.sqlite3 beside "
                                         "cache.disk_cache_dir, else "
                                         "$XDG_DATA_HOME/encore/responses.sqlite3 "
                                         "(~/.local/share/encore/ without XDG_DATA_HOME)")
    responses_retention_s: float = opt(30 * 86400.0, "seconds a stored response is kept "
                                                     "(OpenAI keeps them 30 days)")
    responses_max_stored: int = opt(100_000, "most stored responses; the oldest go first")

    def __post_init__(self) -> None:
        check_range("server", "port", self.port, lo=0, hi=65535)
        check_range("server", "max_body_bytes", self.max_body_bytes, lo=1024)
        check_range("server", "max_waiting_requests", self.max_waiting_requests, lo=0)
        check_range("server", "max_connections", self.max_connections, lo=1)
        for name in ("header_timeout_s", "body_timeout_s", "keep_alive_timeout_s"):
            check_range("server", name, getattr(self, name), lo=0.001)
        check_range("server", "max_header_bytes", self.max_header_bytes, lo=1024)
        check_range("server", "responses_retention_s", self.responses_retention_s, lo=1.0)
        check_range("server", "responses_max_stored", self.responses_max_stored, lo=1)


@dataclass(frozen=True)
class EncoreConfig:
    """Everything, grouped by concern."""

    model: ModelConfig = field(default_factory=ModelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    worker: WorkerConfig = field(default_factory=WorkerConfig)
    server: ServerConfig = field(default_factory=ServerConfig)


SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "cache": CacheConfig,
    "scheduler": SchedulerConfig,
    "worker": WorkerConfig,
    "server": ServerConfig,
}
