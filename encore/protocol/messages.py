"""Messages between the processes (torch-free, msgspec structs, msgpack on the wire).

    P0 api ──EngineRequest/AbortRequest/ToolCalled──► P1 engine ──SchedulerOutput──► P2 worker
    P0 api ◄──EngineOutputs (RequestOutput…, EngineStats)── P1 ◄──ModelRunnerOutput── P2

No pickle anywhere: every message is a tagged msgspec Struct, encoded with ``encode`` and
decoded with ``decode`` (a union decoder over all message types).
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

FinishReason = Literal["stop", "length", "abort", "error"]
Tier = Literal["device", "host", "disk", "remote"]

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


GrammarKind = Literal["json_schema", "json_object", "lark"]


class GrammarSpec(msgspec.Struct, frozen=True, array_like=True):
    """What a constrained request's output must match (``encore.grammar``): ``json_schema``
    (``spec`` is the schema as canonical JSON), ``json_object`` (any JSON object; ``spec``
    empty) or ``lark`` (a grammar in llguidance's Lark dialect, e.g. a tool-call format).
    Hashable: the engine caches compiled grammars by it."""

    kind: GrammarKind
    spec: str = ""


class EngineRequest(msgspec.Struct, tag=True, omit_defaults=True):
    """A tokenized request, P0 → P1. ``n > 1`` becomes n sequences sharing the prompt's KV."""

    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    arrival_time: float
    eos_token_ids: list[int] = []
    priority: int = 0
    cache_salt: str | None = None  # tenant salt, resolved by the server
    prompt_cache_key: str | None = None  # program identity (TTL pins, program_fcfs)
    pin_ttl_s: float | None = None  # explicit pin TTL of this turn's KV (None: the policy picks)
    is_last_step: bool | None = None  # Continuum: true on a program's last turn (no pin after)
    # Position-independent chunks of the prompt (CacheBlend): sorted, disjoint token spans
    # [start, end) whose tokens were tokenized on their own (the same in every request).
    chunks: list[tuple[int, int]] = []
    chunk_recompute: float | None = None  # recompute fraction for this request (None: config)
    # Explicit pins at content-part breakpoints: (prefix length in tokens, ttl seconds).
    pin_breakpoints: list[tuple[int, float]] = []
    # Anthropic cache_control markers: pinned like pin_breakpoints, and a later request that
    # hits the pinned prefix refreshes the TTL (a soft pin: capped, never an error).
    soft_pin_breakpoints: list[tuple[int, float]] = []
    # prompt_cache_retention "24h": the prompt's blocks go to the durable tiers (disk, remote)
    # as soon as they are computed, not with the next checkpoint
    persist_kv: bool = False
    # constrained decoding: every sequence's output matches this grammar (None: free text)
    grammar: GrammarSpec | None = None


class GrammarVocab(msgspec.Struct, tag=True):
    """P0 → P1 once the engine is up (and again after a restart): the tokenizer grammars are
    compiled against (a Hugging Face ``tokenizer.json`` string) and its end-of-sequence ids."""

    tokenizer_json: str
    eos_token_ids: list[int]


class AbortRequest(msgspec.Struct, tag=True):
    """Stop a request (client gone, or stop string matched in P0); frees its blocks at once."""

    request_ids: list[str]


class ToolCalled(msgspec.Struct, tag=True):
    """P0 parsed calls of ``tools`` (function names) from the turn of agent program
    ``program`` (its ``prompt_cache_key``) of tenant ``cache_salt`` that just ended: TTL pins
    learn per tool."""

    program: str
    tools: list[str]
    cache_salt: str | None = None


def program_id(cache_salt: str | None, prompt_cache_key: str) -> str:
    """An agent program's identity in the engine: its key within its tenant (cache salt), so
    that one tenant can never claim, replace, release or queue behind another's program."""
    return f"{cache_salt or ''}\x1f{prompt_cache_key}"


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
    """P1's metrics since its last stats message, keyed as in ``protocol.metrics``
    (``ENGINE_METRICS``): gauges as they are now, counters as increments, labelled ones per
    label value, and new histogram observations."""

    values: dict[str, float] = {}
    labeled: dict[str, dict[str, float]] = {}
    observed: dict[str, list[float]] = {}

    def __getitem__(self, key: str) -> Any:
        """The entry for ``key`` wherever it is (KeyError if this message has none)."""
        for part in (self.values, self.labeled, self.observed):
            if key in part:
                return part[key]
        raise KeyError(key)


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


class BlendChunk(msgspec.Struct, array_like=True):
    """A cached chunk placed into a sequence: its standalone KV (positions ``[0, length)``)
    lives in ``src_blocks``; it goes to positions ``[start, start + length)``, keys re-rotated
    by ``start``; ``recompute`` of its tokens (those whose KV deviates most at the check
    layer) are recomputed in every later layer."""

    start: int
    length: int
    src_blocks: list[int]
    recompute: int


class BlendPlan(msgspec.Struct, array_like=True):
    """How to assemble a sequence's prompt from cached chunks (CacheBlend). Tokens outside
    the chunks, and the last token, are always computed; layers ``<= check_layer`` are
    computed for every token."""

    chunks: list[BlendChunk]
    check_layer: int


class ScheduledSeq(msgspec.Struct, array_like=True, omit_defaults=True):
    """One sequence's work in a step.

    ``token_ids`` are the tokens at positions ``[start_pos, start_pos + len(token_ids))``;
    their K/V go into ``block_table`` slots; attention covers positions ``[0, start_pos +
    len)``. ``sample`` is true when the last of them is the sequence's last token.
    Under asynchronous scheduling the last token may be ``PLACEHOLDER``: the one this
    sequence sampled in the previous step, which the engine has not seen yet (the worker has
    it).
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
    # The whole rest of the prompt is assembled from cached chunks (one step; see BlendPlan).
    blend: BlendPlan | None = None
    # A chunk computed standalone for the chunk store: KV only, no sampling state, no output.
    store_only: bool = False


# A token id the worker fills in: this sequence's token sampled by the step just before.
PLACEHOLDER = -1


class KVTransfer(msgspec.Struct, array_like=True):
    """Copy one block's KV from ``src`` to ``dst`` (the tier data plane, run by the worker).

    Slots: device = block id, host = host-pool slot, disk and remote = unused (files and
    values are named by ``key``). The worker answers every transfer with one ``KVDone``
    carrying ``op_id``.
    """

    op_id: int
    key: bytes
    src: Tier
    src_slot: int
    dst: Tier
    dst_slot: int


class KVDone(msgspec.Struct, array_like=True, omit_defaults=True):
    """A transfer finished (``ok``) or failed (``error``: why; the data is unusable).
    ``error_kind`` classifies a remote tier failure (``REMOTE_ERRORS``)."""

    op_id: int
    ok: bool
    error: str | None = None
    seconds: float = 0.0  # time the copy or the file I/O itself took (feeds the cost model)
    error_kind: str | None = None


# Why a remote tier op failed: the store is unreachable, too slow, out of memory, the value
# was missing or failed its check, or it was too big to store.
REMOTE_ERRORS = ("down", "timeout", "full", "miss", "corrupt", "too_big", "other")


class KVProbe(msgspec.Struct, array_like=True):
    """Ask the remote tier how many of ``keys`` (a prompt's blocks in order) it holds."""

    op_id: int
    keys: list[bytes]


class KVProbed(msgspec.Struct, array_like=True, omit_defaults=True):
    """The answer to a ``KVProbe``: the leading ``found`` keys are in the remote store."""

    op_id: int
    found: int
    error_kind: str | None = None


class GrammarBitmask(msgspec.Struct, array_like=True):
    """Allowed next tokens of this step's constrained sequences: row i (``words`` little-endian
    int32 words, bit ``t % 32`` of word ``t // 32`` set = token t allowed) belongs to
    ``seq_ids[i]``. Sequences not listed are unconstrained."""

    seq_ids: list[str]
    words: int
    data: bytes


class SchedulerOutput(msgspec.Struct, tag=True, omit_defaults=True):
    """One step for the worker. ``finished`` lists seq ids whose worker state can go.

    Before the forward pass the worker runs, in this order: ``kv_deletes`` (disk files to
    remove), ``kv_stores`` whose source is the host tier, the other ``kv_stores``, then
    ``kv_loads``. A transfer may complete in a later step; its ``KVDone`` says when.
    """

    step_id: int
    seqs: list[ScheduledSeq] = []
    finished: list[str] = []
    kv_stores: list[KVTransfer] = []
    kv_loads: list[KVTransfer] = []
    kv_deletes: list[bytes] = []
    kv_probes: list[KVProbe] = []
    grammar: GrammarBitmask | None = None  # token masks of the constrained sampled seqs
    # The masks come in a ``GrammarMasks`` message right after this one (to rank 0): the
    # engine builds them while the worker runs the forward pass, which does not need them.
    grammar_follows: bool = False
    # Asynchronous scheduling: the worker answers this step once it has launched the next
    # one (or on ``Drain``), so that the next step's host work overlaps this one's kernels.
    defer_output: bool = False

    @property
    def has_kv_ops(self) -> bool:
        return bool(self.kv_stores or self.kv_loads or self.kv_deletes or self.kv_probes)


class ModelRunnerOutput(msgspec.Struct, tag=True, omit_defaults=True):
    """Results of one step: one sampled token per sequence with ``sample`` set (same order)."""

    step_id: int
    seq_ids: list[str] = []
    sampled_token_ids: list[int] = []
    logprobs: list[TokenLogprobs] | None = None
    prompt_logprobs: dict[str, list[TokenLogprobs | None]] | None = None
    error: str | None = None
    kv_done: list[KVDone] = []
    kv_probed: list[KVProbed] = []
    kv_disk_corrupt_files: int = 0  # bad disk files found (and deleted) during this step
    remote_up: bool | None = None  # the remote tier's store answers (None: no remote tier)
    # Blended sequences: per chunk (plan order), the mean relative K/V deviation at the check
    # layer between the cached (standalone, re-rotated) and the fresh (in-context) values.
    chunk_deviation: dict[str, list[float]] = {}


class WorkerReady(msgspec.Struct, tag=True):
    """P2 → P1 handshake: the model is loaded and the KV pool allocated."""

    num_device_blocks: int
    max_model_len: int
    vocab_size: int
    device: str
    dtype: str
    kv_block_bytes: int = 0  # bytes of one block across layers (K and V)
    kv_tier_block_bytes: int = 0  # the same block as the lower tiers hold it (tier_kv_codec)
    num_host_blocks: int = 0  # host tier slots (0 = off)
    num_disk_blocks: int = 0  # disk tier capacity in blocks (0 = off)
    disk_keys: list[bytes] = []  # valid blocks found on disk at start-up, oldest first
    disk_writable: bool = True  # False: the disk tier's directory is read-only (loads only)
    remote: bool = False  # a remote tier is configured (its store may be down for now)
    kv_disk_corrupt_files: int = 0  # bad files found (and deleted) by the start-up scan


class GrammarMasks(msgspec.Struct, tag=True):
    """P1 → P2 (rank 0), right after a step with ``grammar_follows``: its token masks."""

    step_id: int
    grammar: GrammarBitmask | None = None


class Drain(msgspec.Struct, tag=True):
    """P1 → P2: answer the step held back by ``defer_output`` now (no next step follows)."""


class Shutdown(msgspec.Struct, tag=True):
    """Ask a process to exit cleanly."""


Message = (
    EngineRequest | AbortRequest | ToolCalled | GrammarVocab | EngineOutputs | EngineReady
    | EngineDead | SchedulerOutput | ModelRunnerOutput | WorkerReady | GrammarMasks | Drain
    | Shutdown
)

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Message)


def encode(msg: Message) -> bytes:
    return _encoder.encode(msg)


def decode(data: bytes | memoryview) -> Message:
    return _decoder.decode(data)
