"""Per-sequence state in the engine. A request with ``n > 1`` is n sequences sharing a prompt.

positions  0 ........ num_prompt_tokens ........ num_tokens ... + num_pending
           | prompt              | output (sampled) | sampled, not yet seen |
           <--- num_computed_tokens --->|  still to compute (>= 1 while running)

``num_pending`` counts tokens sampled by steps still in flight (asynchronous scheduling: the
next step is planned before the last one's tokens come back); their positions can be computed
already, the worker fills their ids in.
"""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING

from encore.protocol.messages import EngineRequest, FinishReason, SamplingParams, program_id

if TYPE_CHECKING:
    from encore.grammar import Matcher


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"  # waiting again after its blocks were taken (recompute)
    WAITING_FOR_KV = "waiting_for_kv"  # its prefix KV is being loaded from the host/disk tier
    WAITING_FOR_GRAMMAR = "waiting_for_grammar"  # its output grammar is still compiling
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"
    FINISHED_ERROR = "error"

    @property
    def is_finished(self) -> bool:
        return self.value in ("stop", "length", "abort", "error")

    @property
    def finish_reason(self) -> FinishReason | None:
        return self.value if self.is_finished else None  # type: ignore[return-value]


def seq_id_of(request_id: str, index: int) -> str:
    """The worker-facing id of child ``index`` of a request (always suffixed, also for n=1)."""
    return f"{request_id}#{index}"


class Seq:
    """One sequence: its tokens, progress, status and what the worker has been told.

    ``order`` is the engine's arrival counter (the FCFS key and the priority tie-break);
    ``program_order`` is the order of the first request of the same ``program``
    (``prompt_cache_key``), set by the ``program_fcfs`` queue.
    ``num_cached_tokens`` is the prefix hit at the first schedule (None before that).
    ``sent_to_worker``: the worker holds this sequence's sampling state (sampling params and
    prompt are sent once, and dropped by the worker when the id appears in ``finished``).
    ``resumed``: re-admitted after preemption; its next chunk carries ``output_token_ids``.
    ``matcher``: where its output stands in its grammar (constrained decoding), once compiled.
    """

    def __init__(self, req: EngineRequest, index: int, order: int) -> None:
        self.request_id = req.request_id
        self.index = index
        self.seq_id = seq_id_of(req.request_id, index)
        self.order = order
        # agent program / conversation identity, if any: the key within its tenant
        self.program = (None if req.prompt_cache_key is None
                        else program_id(req.cache_salt, req.prompt_cache_key))
        self.pin_ttl_s = req.pin_ttl_s  # explicit TTL for pinning this turn's KV
        self.is_last_step = bool(req.is_last_step)  # no pin after the program's last turn
        self.pin_breakpoints = list(req.pin_breakpoints)
        self.soft_pin_breakpoints = list(req.soft_pin_breakpoints)  # (prefix tokens, ttl s) to pin
        self.chunks = list(req.chunks)  # position-independent chunk spans of the prompt
        self.chunk_recompute = req.chunk_recompute
        self.program_order = order  # program_fcfs: the order of the program's first request
        self.remote_probed = False  # the remote store was asked for this prompt's blocks
        self.persist_kv = req.persist_kv  # its blocks go to disk/remote once computed
        self.grammar = req.grammar
        self.matcher: Matcher | None = None
        self.arrival_time = req.arrival_time
        self.priority = req.priority
        self.sampling: SamplingParams = req.sampling
        self.eos_token_ids = frozenset(req.eos_token_ids)
        self.stop_token_ids = frozenset(req.sampling.stop_token_ids)
        self.cache_salt = req.cache_salt
        self.num_prompt_tokens = len(req.prompt_token_ids)
        self._tokens: list[int] = list(req.prompt_token_ids)
        self.num_computed_tokens = 0
        self.num_pending = 0
        self.status = SeqStatus.WAITING
        self.num_cached_tokens: int | None = None
        self.sent_to_worker = False
        self.resumed = False
        self.stop_token_id: int | None = None
        self.error: str | None = None

    @property
    def all_token_ids(self) -> list[int]:
        """Prompt then output tokens (the live list; do not mutate)."""
        return self._tokens

    @property
    def prompt_token_ids(self) -> list[int]:
        return self._tokens[: self.num_prompt_tokens]

    @property
    def output_token_ids(self) -> list[int]:
        return self._tokens[self.num_prompt_tokens :]

    @property
    def num_tokens(self) -> int:
        return len(self._tokens)

    @property
    def num_output_tokens(self) -> int:
        return len(self._tokens) - self.num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    def append_token(self, token_id: int) -> None:
        self._tokens.append(token_id)

    def check_stop(self, token_id: int, max_len: int) -> SeqStatus | None:
        """The finished status that ``token_id`` (just appended) causes, or None.

        eos (unless ``ignore_eos``) and ``stop_token_ids`` count only once ``min_tokens``
        outputs exist; ``max_tokens`` and ``max_len`` (context limit) always apply.
        """
        if self.num_output_tokens >= self.sampling.min_tokens:
            eos = not self.sampling.ignore_eos and token_id in self.eos_token_ids
            if eos or token_id in self.stop_token_ids:
                self.stop_token_id = token_id
                return SeqStatus.FINISHED_STOPPED
        if self.num_output_tokens >= self.sampling.max_tokens or self.num_tokens >= max_len:
            return SeqStatus.FINISHED_LENGTH
        return None

    def __repr__(self) -> str:
        return (
            f"Seq({self.seq_id!r}, {self.status.name}, computed={self.num_computed_tokens}/"
            f"{self.num_tokens})"
        )
