"""Messages between the processes (torch-free, msgspec structs, msgpack on the wire).

    P0 api ──EngineRequest/AbortRequest──► P1 engine ──SchedulerOutput──► P2 worker
    P0 api ◄──EngineOutputs (RequestOutput…, EngineStats)── P1 ◄──ModelRunnerOutput── P2

No pickle anywhere: every message is a tagged msgspec Struct, encoded with ``encode`` and
decoded with ``decode`` (a union decoder over all message types).
"""

from __future__ import annotations

from typing import Literal

import msgspec

FinishReason = Literal["stop", "length", "abort", "error"]


class SamplingParams(msgspec.Struct, frozen=True, omit_defaults=True):
    """How to pick tokens for one request (OpenAI fields plus the usual server extras)."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    max_tokens: int = 16
    min_tokens: int = 0
    stop_token_ids: list[int] = []
    ignore_eos: bool = False
    logprobs: int | None = None  # None: no logprobs; k >= 0: sampled token + k alternatives
    prompt_logprobs: int | None = None  # for completions echo+logprobs

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1


class EngineRequest(msgspec.Struct, tag=True, omit_defaults=True):
    """A tokenized request, P0 → P1. ``n > 1`` becomes n sequences sharing the prompt's KV."""

    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    arrival_time: float
    eos_token_ids: list[int] = []
    priority: int = 0
    cache_salt: str | None = None  # tenant salt, resolved by the server
    prompt_cache_key: str | None = None


class AbortRequest(msgspec.Struct, tag=True):
    """Stop a request (client gone, or stop string matched in P0); frees its blocks at once."""

    request_ids: list[str]


class Logprob(msgspec.Struct, array_like=True):
    token_id: int
    logprob: float


class TokenLogprobs(msgspec.Struct, array_like=True):
    """Logprob of the chosen token and the top-k alternatives (descending)."""

    token_id: int
    logprob: float
    top: list[Logprob]


class RequestOutput(msgspec.Struct, tag=True, omit_defaults=True):
    """New tokens of one sequence of a request (``index`` < n), P1 → P0."""

    request_id: str
    index: int = 0
    new_token_ids: list[int] = []
    logprobs: list[TokenLogprobs] | None = None
    prompt_logprobs: list[TokenLogprobs | None] | None = None
    finish_reason: FinishReason | None = None
    stop_token_id: int | None = None  # the stop/eos token that finished it, if any
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    error: str | None = None


class EngineStats(msgspec.Struct, tag=True, omit_defaults=True):
    """Gauges and counter increments from P1 since the last stats message."""

    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0  # 0..1 of device blocks in use by requests
    prefix_queries: int = 0  # tokens looked up (increment)
    prefix_hits: int = 0  # tokens hit (increment)
    preemptions: int = 0  # increment
    prompt_tokens: int = 0  # increment: prompt tokens computed
    generation_tokens: int = 0  # increment


class EngineOutputs(msgspec.Struct, tag=True, omit_defaults=True):
    """One batch of outputs from P1 (per step), with stats."""

    outputs: list[RequestOutput] = []
    stats: EngineStats | None = None


class EngineReady(msgspec.Struct, tag=True):
    """P1 → P0 (and P2 → P1) handshake once the model is loaded."""

    model_name: str
    max_model_len: int
    vocab_size: int
    num_device_blocks: int
    block_size: int
    device: str
    dtype: str


class EngineDead(msgspec.Struct, tag=True):
    """P1 → P0: the engine cannot continue (e.g. the worker failed to start)."""

    reason: str


# ----------------------------------------------------------------------------- P1 <-> P2


class ScheduledSeq(msgspec.Struct, array_like=True, omit_defaults=True):
    """One sequence's work in a step.

    ``token_ids`` are the tokens at positions ``[start_pos, start_pos + len(token_ids))``;
    their K/V go into ``block_table`` slots; attention covers positions ``[0, start_pos +
    len)``. ``sample`` is true when the last of them is the sequence's last known token.
    ``prompt_token_ids`` and ``sampling`` are sent the first time the worker sees ``seq_id``.
    """

    seq_id: str
    token_ids: list[int]
    start_pos: int
    block_table: list[int]
    sample: bool
    sampling: SamplingParams | None = None
    prompt_token_ids: list[int] | None = None
    output_token_ids: list[int] | None = None  # on resume after preemption, for penalties
    seed_index: int = 0  # child index for n > 1 (seeded sampling differs per child)
    eos_token_ids: list[int] | None = None  # with sampling: masked until min_tokens


class SchedulerOutput(msgspec.Struct, tag=True, omit_defaults=True):
    """One step for the worker. ``finished`` lists seq ids whose worker state can go."""

    step_id: int
    seqs: list[ScheduledSeq] = []
    finished: list[str] = []


class ModelRunnerOutput(msgspec.Struct, tag=True, omit_defaults=True):
    """Results of one step: one sampled token per sequence with ``sample`` set (same order)."""

    step_id: int
    seq_ids: list[str] = []
    sampled_token_ids: list[int] = []
    logprobs: list[TokenLogprobs] | None = None
    prompt_logprobs: dict[str, list[TokenLogprobs | None]] | None = None
    error: str | None = None


class WorkerReady(msgspec.Struct, tag=True):
    """P2 → P1 handshake: the model is loaded and the KV pool allocated."""

    num_device_blocks: int
    max_model_len: int
    vocab_size: int
    device: str
    dtype: str


class Shutdown(msgspec.Struct, tag=True):
    """Ask a process to exit cleanly."""


Message = (
    EngineRequest | AbortRequest | EngineOutputs | EngineReady | EngineDead | SchedulerOutput
    | ModelRunnerOutput | WorkerReady | Shutdown
)

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Message)


def encode(msg: Message) -> bytes:
    return _encoder.encode(msg)


def decode(data: bytes | memoryview) -> Message:
    return _decoder.decode(data)
