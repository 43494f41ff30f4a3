"""The phase-free continuous-batching scheduler (P1 core, torch-free).

Each sequence has ``num_computed_tokens`` chasing ``num_tokens``. A step hands out tokens:

    1. running sequences, best-first by the queue policy's key: a decode takes 1 token, a
       sequence still prefilling takes min(remaining, budget). When blocks run out, the
       *last* running sequence (lowest priority / latest arrival, not yet scheduled this
       step) is preempted by recompute: blocks freed, num_computed_tokens = 0, back to the
       waiting queue's front. Repeat until it fits, or the sequence preempts itself.
    2. if nothing was preempted, waiting sequences in queue order: prefix-cache lookup, then
       a (chunked) prefill under the token budget, while fewer than ``max_num_seqs`` run.
       With host/disk tiers, a sequence whose lower-tier hit is worth loading (the load
       policy decides) gets device blocks for it. Host-only loads run in the same step,
       before (on CUDA: layer by layer alongside) the forward pass, so the sequence computes
       the rest of its prompt at once. With disk blocks it waits in WAITING_FOR_KV
       (``self.loading``, no tokens this step) while the worker stages its KV; once every
       load is done it joins the running batch with those tokens computed (step 0 of the
       next ``schedule``). Loads and stores travel in ``SchedulerOutput.kv_*``.

Agent programs (``scheduler/programs.py``): a finished turn of a program keeps its KV pinned
for a TTL (released when allocation would otherwise fail, claimed by the next turn, expired at
the start of a later ``schedule``); all times come from the injectable ``clock``.

``schedule()`` advances ``num_computed_tokens`` at once; ``update_from_output()`` appends the
sampled tokens. Synchronously the two alternate. Under asynchronous scheduling the engine plans
step N+1 before step N's tokens are back (at most one step in flight): a sequence sampled by
step N counts that token in ``num_pending`` and decodes on in N+1 with a ``PLACEHOLDER`` the
worker fills in, unless the token may end it by length (``_runs_ahead``) or its grammar needs
the token for the next mask (``needs_outputs``: the engine collects step N first). A token that
turns out to end its sequence (EOS, stop id) wastes that sequence's row of step N+1; abort,
preemption and finishing free blocks step N may still write, which is safe because the
worker runs steps, and their KV writes, in order on one stream before any later step reads
or reallocates them.

Worker contract (``ScheduledSeq``):
- ``token_ids`` are positions ``[start_pos, start_pos + len)``; ``block_table`` is the whole
  table (block ids >= 1; block 0 is the null/padding block, never allocated).
- ``sampling``, ``prompt_token_ids`` and ``eos_token_ids`` come once, the first time the
  worker sees a seq id; the worker keeps the seq's sampling state (RNG, penalty counts)
  until the id appears in ``SchedulerOutput.finished``. Preemption does *not* finish a seq
  on the worker.
- After a preemption the first chunk of the resumed seq also carries ``output_token_ids``
  (all tokens sampled so far); the worker should take it as the seq's output history.
- ``seed_index`` is the child index (n > 1 children sample differently under one seed).
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from encore.configs.types import CacheConfig, SchedulerConfig
from encore.grammar import CompiledGrammar, GrammarError
from encore.kvmanager.hashing import DEV_SECRET
from encore.kvmanager.tiered import StepOps, TierSetup, Transfer
from encore.kvmanager.wiring import KVParts, build_kv
from encore.protocol.messages import (
    PLACEHOLDER,
    BlendPlan,
    EngineRequest,
    EngineStats,
    GrammarBitmask,
    KVProbe,
    KVTransfer,
    ModelRunnerOutput,
    RequestOutput,
    ScheduledSeq,
    SchedulerOutput,
    TokenLogprobs,
    program_id,
)
from encore.protocol.metrics import Increments
from encore.scheduler.blending import Blender
from encore.scheduler.grammars import Grammars
from encore.scheduler.programs import Programs
from encore.scheduler.queue import make_queue
from encore.scheduler.request import Seq, SeqStatus


@dataclass
class _StepPlan:
    """The step being planned: its token budget left, the sequences with their token counts,
    and the store-only chunk computations that go first."""

    tokens: int
    planned: list[tuple[Seq, int]] = field(default_factory=list)
    extra: list[ScheduledSeq] = field(default_factory=list)

    def add(self, seq: Seq, n: int, cost: int | None = None) -> None:
        self.planned.append((seq, n))
        self.tokens -= n if cost is None else cost


class Admit(enum.Enum):
    """What an admission path did with the sequence at the head of the waiting queue."""

    SKIP = "skip"  # the path does not apply: the next one decides
    NO_ROOM = "no room"  # it applies, but no room or budget now: keep queue order, retry
    RUNNING = "running"  # admitted: running, its tokens planned (this step, or next if no slots)
    STAGING = "staging"  # admitted to WAITING_FOR_KV: its KV loads from a lower tier


class Scheduler:
    """Owns every unfinished sequence and the KV bookkeeping; see the module docstring."""

    def __init__(self, config: SchedulerConfig, parts: KVParts, max_model_len: int,
                 clock: Callable[[], float] = time.monotonic) -> None:
        """``parts``: the connected KV bookkeeping (``encore.kvmanager.wiring.build_kv``)."""
        self.config = config
        self.clock = clock
        self.kv = parts.kv
        self.block_size = self.kv.block_size
        self.programs = Programs(self.kv, clock)  # agent programs (Continuum)
        self.blender = Blender(self.kv, parts.chunks)  # chunk reuse (CacheBlend)
        self.max_model_len = max_model_len
        # No sequence can outgrow the pool: past this it finishes with "length".
        self.max_seq_len = min(max_model_len, self.kv.num_usable_blocks * self.block_size)
        self.waiting = make_queue(config.policy)
        self.running: list[Seq] = []
        self.loading: dict[str, Seq] = {}  # WAITING_FOR_KV, in admission order
        self.requests: dict[str, list[Seq]] = {}  # request id -> its children (until all end)
        self._seqs: dict[str, Seq] = {}  # unfinished sequences by seq id
        self._finished_ids: list[str] = []  # for the next SchedulerOutput.finished
        self._deferred: list[tuple[str, Any]] = []  # constrained rows of a deferred step
        self._prompt_logprobs: dict[str, list[TokenLogprobs | None]] = {}
        self._next_order = 0
        self._step_id = 0
        self._step_preempted = False
        self._blends: dict[str, tuple[BlendPlan, int]] = {}  # this step's plans, by seq id
        self._counts = dict.fromkeys(("preemptions", "prompt_tokens", "generation_tokens"), 0)
        self._increments = Increments()
        # the model's vocabulary (set by the engine once the worker is up): ids past it are
        # refused here, not left to fail the worker's step for every request in it
        self.vocab_size: int | None = None
        # constrained decoding (set by the engine once it knows the vocabulary size)
        self.grammars: Grammars | None = None
        self.compiling: dict[str, tuple[list[Seq], Future[CompiledGrammar]]] = {}

    @classmethod
    def build(cls, cache: CacheConfig, config: SchedulerConfig, num_device_blocks: int,
              max_model_len: int, secret: bytes = DEV_SECRET, tiers: TierSetup | None = None,
              clock: Callable[[], float] = time.monotonic) -> Scheduler:
        """A scheduler over freshly built KV bookkeeping (``build_kv``)."""
        parts = build_kv(cache, num_device_blocks, secret=secret, tiers=tiers, clock=clock)
        return cls(config, parts, max_model_len, clock)

    # ------------------------------------------------------------------ requests in / out
    def add_request(self, req: EngineRequest) -> list[RequestOutput]:
        """Queue ``req`` as ``n`` sequences. Returns error outputs if it cannot be served."""
        error = self._validate(req)
        if error is not None:
            n = max(req.sampling.n, 1)
            return [
                RequestOutput(
                    req.request_id,
                    index=i,
                    finish_reason="error",
                    error=error,
                    num_prompt_tokens=len(req.prompt_token_ids),
                )
                for i in range(n)
            ]
        seqs = [Seq(req, i, self._next_order + i) for i in range(req.sampling.n)]
        if seqs[0].program is not None:
            self.programs.started(seqs[0].program)
        self._next_order += len(seqs)
        self.requests[req.request_id] = seqs
        for seq in seqs:
            self._seqs[seq.seq_id] = seq
        if req.grammar is None or self.grammars is None:
            for seq in seqs:
                self.waiting.add(seq)
            return []
        for seq in seqs:  # queued once the grammar is compiled (poll_grammars)
            seq.status = SeqStatus.WAITING_FOR_GRAMMAR
        self.compiling[req.request_id] = (seqs, self.grammars.compile(req.grammar))
        return []

    def poll_grammars(self) -> list[RequestOutput]:
        """Queue the sequences whose grammar has compiled; fail those whose grammar cannot
        compile (one error output per sequence). Never waits for a compile."""
        outputs = []
        for rid, (seqs, fut) in list(self.compiling.items()):
            if not fut.done():
                continue
            try:
                compiled, error = fut.result(), None
            except GrammarError as e:
                compiled, error = None, f"the grammar cannot be used: {e}"
            for seq in list(seqs):
                if compiled is None:
                    self._finish(seq, SeqStatus.FINISHED_ERROR, error=error)
                    outputs.append(self._final_output(seq))
                else:
                    seq.matcher = compiled.matcher()
                    seq.status = SeqStatus.WAITING
                    self.waiting.add(seq)
            self.compiling.pop(rid, None)
        return outputs

    def _validate(self, req: EngineRequest) -> str | None:
        num_prompt = len(req.prompt_token_ids)
        if req.request_id in self.requests:
            return f"request id {req.request_id!r} is already in use"
        if req.sampling.n < 1:
            return f"n must be >= 1, got {req.sampling.n}"
        if req.sampling.max_tokens < 1:
            return f"max_tokens must be >= 1, got {req.sampling.max_tokens}"
        if num_prompt == 0:
            return "the prompt is empty"
        if req.grammar is not None and self.grammars is None:
            return "structured outputs are not available: this engine has no grammar compiler"
        limit = self.vocab_size or 2**32
        if min(req.prompt_token_ids) < 0 or max(req.prompt_token_ids) >= limit:
            return f"prompt token ids must be in [0, {limit})"
        if num_prompt >= self.max_seq_len:
            return (
                f"the prompt has {num_prompt} tokens, but this engine holds at most "
                f"{self.max_seq_len - 1} prompt tokens (max_model_len={self.max_model_len}, "
                f"KV pool {self.kv.num_usable_blocks} blocks of {self.block_size}) so that "
                "at least one token can be generated"
            )
        return None

    def tool_called(self, program: str, tools: list[str], cache_salt: str | None = None) -> None:
        """The server parsed calls of ``tools`` from the turn of ``program`` (of tenant
        ``cache_salt``) that just ended (the TTL policy learns per tool how long such a pause
        lasts)."""
        self.programs.tool_called(program_id(cache_salt, program), tools)

    def abort(self, request_ids: list[str]) -> list[RequestOutput]:
        """Finish every unfinished child of these requests ("abort"); blocks are freed now.

        The worker learns it through the next ``SchedulerOutput.finished``. Unknown ids are
        ignored.
        """
        outputs = []
        for rid in request_ids:
            for seq in list(self.requests.get(rid, [])):
                if not seq.is_finished:
                    self._finish(seq, SeqStatus.FINISHED_ABORTED)
                    outputs.append(self._final_output(seq))
        return outputs

    def fail_all(self, reason: str) -> list[RequestOutput]:
        """Finish every unfinished sequence with "error" (the worker died); free everything.

        The device KV died with the worker, so the prefix cache is forgotten too, and the
        pending ``finished`` list is dropped (the new worker never knew those ids).
        """
        outputs = []
        for seq in list(self._seqs.values()):
            self._finish(seq, SeqStatus.FINISHED_ERROR, error=reason)
            outputs.append(self._final_output(seq))
        self._finished_ids.clear()
        self._prompt_logprobs.clear()
        self.kv.reset_cache()
        self.blender.reset()
        return outputs

    def has_unfinished(self) -> bool:
        return bool(self._seqs)

    def has_runnable(self) -> bool:
        """Unfinished sequences other than those waiting for their grammar to compile."""
        return len(self._seqs) > sum(len(seqs) for seqs, _ in self.compiling.values())

    def has_work(self) -> bool:
        """Unfinished sequences, finished ids the worker has not been told about yet, tier
        transfers still in flight, or host blocks to write to disk."""
        tiers = self.kv.tiers
        return (bool(self._seqs) or bool(self._finished_ids)
                or bool(tiers and (tiers.num_inflight or tiers.needs_flush())))

    # ------------------------------------------------------------------ one step
    def schedule(self, defer_grammar: bool = False) -> SchedulerOutput:
        """Plan one step: which tokens of which sequences to compute (see module docstring).
        ``defer_grammar``: leave the token masks out (``grammar_follows``); ``take_bitmask``
        builds them once the step is on its way."""
        self._step_id += 1
        self._step_preempted = False
        if self.kv.tiers is not None:
            self.kv.tiers.begin_step(idle=not self._seqs)
        self.blender.begin_step()  # the last step's blends have run: release their chunks
        self.programs.expire()  # before anything allocates: demotions go out this step
        self._promote_loaded()
        plan = _StepPlan(self.config.max_num_batched_tokens)
        self._blends.clear()
        self._schedule_running(plan)
        if not self._step_preempted:  # under pressure, admitting more would thrash
            self._schedule_waiting(plan)
        wired = [self._to_wire(seq, n) for seq, n in plan.planned]
        seqs = [*plan.extra, *wired]
        finished, self._finished_ids = self._finished_ids, []
        rows = self._grammar_rows(plan, wired)
        self._deferred = rows if defer_grammar else []
        out = SchedulerOutput(step_id=self._step_id, seqs=seqs, finished=finished,
                              grammar=None if defer_grammar else self._bitmask(rows),
                              grammar_follows=defer_grammar and bool(rows))
        if self.kv.tiers is not None:
            _attach_ops(out, self.kv.tiers.take_ops())
        return out

    def _grammar_rows(self, plan: _StepPlan, wired: list[ScheduledSeq]
                      ) -> list[tuple[str, Any]]:
        """The constrained sequences that sample this step, with their matchers."""
        if self.grammars is None:
            return []
        return [(seq.seq_id, seq.matcher) for (seq, _), ss in zip(plan.planned, wired,
                                                                 strict=True)
                if seq.matcher is not None and ss.sample]

    def _bitmask(self, rows: list[tuple[str, Any]]) -> GrammarBitmask | None:
        return self.grammars.bitmask(rows) if self.grammars is not None and rows else None

    def take_bitmask(self) -> GrammarBitmask | None:
        """The token masks of the last step scheduled with ``defer_grammar`` (built now, while
        the worker runs that step's forward pass; the matchers only move in
        ``update_from_output``)."""
        rows, self._deferred = self._deferred, []
        return self._bitmask(rows)

    def _promote_loaded(self) -> None:
        """Sequences whose KV finished loading join the running batch with it computed;
        those whose remote probe answered are admitted again, first."""
        if self.kv.tiers is not None:
            for seq_id in self.kv.tiers.probes_done():
                probed = self.loading.pop(seq_id, None)
                if probed is not None:
                    probed.status = SeqStatus.WAITING
                    self.waiting.prepend(probed)
        for seq_id, computed in self.kv.collect_loaded():
            blended = self.blender.loaded_seq(seq_id)
            if blended is not None:  # its chunks are on the device: admit it again, first
                seq = self.loading.pop(blended, None)
                if seq is not None:
                    seq.status = SeqStatus.WAITING
                    self.waiting.prepend(seq)
                continue
            self._join_running(self.loading.pop(seq_id), computed)

    def _join_running(self, seq: Seq, computed: int) -> None:
        """``seq``'s first ``computed`` tokens are in its blocks (prefix hit plus loads)."""
        seq.status = SeqStatus.RUNNING
        seq.num_computed_tokens = seq.num_cached_tokens = computed
        self.running.append(seq)

    def _schedule_running(self, plan: _StepPlan) -> None:
        self.running.sort(key=self.waiting.key)
        i = 0
        while i < len(self.running) and plan.tokens > 0:
            seq = self.running[i]
            if seq.num_pending and not self._runs_ahead(seq):
                i += 1  # its token in flight may end it: wait for it
                continue
            n = min(seq.num_tokens + seq.num_pending - seq.num_computed_tokens, plan.tokens)
            if not self._preempt_until_fits(seq, n):
                break  # seq preempted itself: it was the last running one
            plan.add(seq, n)
            i += 1

    def _runs_ahead(self, seq: Seq) -> bool:
        """Whether ``seq``, with tokens in flight, decodes on before they are seen: not when
        they end it by length, nor when it is constrained (its next mask needs them)."""
        return (seq.matcher is None
                and seq.num_output_tokens + seq.num_pending < seq.sampling.max_tokens
                and seq.num_tokens + seq.num_pending < self.max_seq_len)

    def needs_outputs(self) -> bool:
        """Whether the step in flight must come back before the next is planned: a
        constrained sequence waits on its sampled token for its next token mask."""
        return any(s.num_pending and s.matcher is not None for s in self.running)

    def _preempt_until_fits(self, seq: Seq, num_new_tokens: int) -> bool:
        """Allocate for ``seq``, preempting from the running tail; False if seq itself went."""
        while self.kv.allocate_slots(seq, num_new_tokens) is None:
            victim = self.running[-1]  # not yet scheduled this step (we schedule from the front)
            self._preempt(victim)
            if victim is seq:
                return False
        return True

    def _preempt(self, seq: Seq) -> None:
        self.running.remove(seq)
        self.kv.free(seq.seq_id)
        seq.num_computed_tokens = 0
        seq.status = SeqStatus.PREEMPTED
        seq.resumed = True
        self.waiting.prepend(seq)
        self._counts["preemptions"] += 1
        self._step_preempted = True

    def _schedule_waiting(self, plan: _StepPlan) -> None:
        while (self.waiting and plan.tokens > 0
               and len(self.running) + len(self.loading) < self.config.max_num_seqs):
            if self._admit(self.waiting.peek(), plan) is Admit.NO_ROOM:
                break  # keep queue order: the head is retried next step

    def _admit(self, seq: Seq, plan: _StepPlan) -> Admit:
        """Admit the head of the queue by the first path that applies: blended (its chunks
        reused), loaded (tier hits worth loading), else a plain prefix-cache admission."""
        for path in (self._admit_blended, self._admit_loaded, self._admit_prefix):
            outcome = path(seq, plan)
            if outcome is not Admit.SKIP:
                return outcome
        raise AssertionError("a prefix admission always applies")

    def _admit_blended(self, seq: Seq, plan: _StepPlan) -> Admit:
        """``seq`` with its chunks blended (``scheduler/blending.py``), its whole remaining
        prompt in this step; or staged while its chunks load from a lower tier."""
        if not self.blender.applies(seq):
            return Admit.SKIP
        hits, hit_tokens = self.kv.get_computed_blocks(seq)
        adm = self.blender.prepare(seq, hit_tokens)
        if adm is None:
            return Admit.SKIP
        prefetch = self.blender.start_prefetch(seq, adm)
        if prefetch is not None:
            if not prefetch:
                return Admit.NO_ROOM
            self.waiting.pop()
            self._stage(seq)  # admitted again once its chunks are on the device
            return Admit.STAGING
        n = seq.num_tokens - hit_tokens
        only_decodes = plan.tokens >= self.config.max_num_batched_tokens - len(plan.planned)
        if adm.cost(n) > plan.tokens and not only_decodes:
            return Admit.NO_ROOM
        own = -(-seq.num_tokens // self.block_size) - len(hits)
        admission = self.programs.admission(seq, others_running=bool(self.running))
        if not self.kv.has_room(own + adm.new_chunk_blocks(), [*hits, *adm.hit_blocks()],
                                admission):
            return Admit.NO_ROOM
        self.waiting.pop()
        self.blender.hold_hits(seq, adm)
        self.kv.limit_caching(seq.seq_id, adm.first_start // self.block_size)
        allocated = self.kv.allocate_slots(seq, n, hits)
        assert allocated is not None, "room was checked"
        blend, stores = self.blender.store(seq, adm)
        plan.extra.extend(stores)
        self.programs.claim(seq, hits)
        self._start_running(seq, hit_tokens, hit_tokens + adm.reused)
        plan.add(seq, n, cost=adm.cost(n))
        self._blends[seq.seq_id] = (blend, adm.reused)
        return Admit.RUNNING

    def _admit_loaded(self, seq: Seq, plan: _StepPlan) -> Admit:
        """``seq``'s tier hits loaded into device blocks, if the load policy wants any. Host
        loads run in this step (the forward pass waits for them) and the rest of the prompt
        computes now; with disk loads ``seq`` waits in WAITING_FOR_KV."""
        if self.kv.tiers is None or seq.sampling.prompt_logprobs is not None:
            return Admit.SKIP
        hits, _ = self.kv.get_computed_blocks(seq)
        if self._start_probe(seq, len(hits)):
            return Admit.STAGING
        tiers = self.kv.plan_tier_loads(seq, len(hits), busy=bool(self.running))
        if not tiers:
            return Admit.SKIP
        admission = self.programs.admission(seq, others_running=bool(self.running))
        loaded = self.kv.start_loads(seq, hits, tiers, admission)
        if loaded is None:
            return Admit.NO_ROOM
        self.programs.claim(seq, hits)
        self.waiting.pop()
        if self.kv.tiers.is_loading(seq.seq_id):
            self._stage(seq)
            return Admit.STAGING
        self._join_running(seq, loaded)
        n = min(seq.num_tokens - loaded, plan.tokens)
        if self.kv.allocate_slots(seq, n) is not None:  # else it runs next step
            plan.add(seq, n)
        return Admit.RUNNING

    def _start_probe(self, seq: Seq, num_device_hits: int) -> bool:
        """Ask the remote store for ``seq``'s blocks that no local tier holds, once, when
        loading them all would beat recomputing; ``seq`` waits (no blocks) for the answer and
        is then admitted again, first in the queue."""
        tiers = self.kv.tiers
        if seq.remote_probed or tiers is None or "remote" not in tiers.tiers:
            return False
        keys = self.kv.probe_keys(seq, num_device_hits)
        busy = bool(self.running)
        if not tiers.wants_probe(keys) or not tiers.policy.blocks_to_load(
                [("remote", len(keys))], busy):
            return False
        seq.remote_probed = True
        self.waiting.pop()
        tiers.start_probe(seq.seq_id, keys)
        self._stage(seq)
        return True

    def _admit_prefix(self, seq: Seq, plan: _StepPlan) -> Admit:
        """Prefix lookup plus the first chunk's blocks."""
        hits: list[int] = []
        hit_tokens = 0
        if seq.sampling.prompt_logprobs is None:  # prompt logprobs need every prompt position
            hits, hit_tokens = self.kv.get_computed_blocks(seq)
        n = min(seq.num_tokens - hit_tokens, plan.tokens)
        admission = self.programs.admission(seq, others_running=bool(self.running))
        if self.kv.allocate_slots(seq, n, hits, admission) is None:
            return Admit.NO_ROOM
        self.programs.claim(seq, hits)
        self.waiting.pop()
        self._start_running(seq, hit_tokens, hit_tokens)
        plan.add(seq, n)
        return Admit.RUNNING

    def _start_running(self, seq: Seq, computed: int, cached: int) -> None:
        """``seq`` (popped from the queue) runs from ``computed`` tokens; ``cached`` is what
        its first admission reports as reused (``num_cached_tokens``)."""
        seq.num_computed_tokens = computed
        if seq.num_cached_tokens is None:
            seq.num_cached_tokens = cached
        seq.status = SeqStatus.RUNNING
        self.running.append(seq)

    def _stage(self, seq: Seq) -> None:
        """``seq`` (popped from the queue) waits in WAITING_FOR_KV while its KV loads."""
        seq.status = SeqStatus.WAITING_FOR_KV
        self.loading[seq.seq_id] = seq

    def _to_wire(self, seq: Seq, n: int) -> ScheduledSeq:
        """The worker's view of ``seq``'s chunk; advances ``num_computed_tokens`` by ``n``."""
        start, end = seq.num_computed_tokens, seq.num_computed_tokens + n
        first = not seq.sent_to_worker
        resume_outputs = seq.output_token_ids if seq.resumed and seq.num_output_tokens else None
        token_ids = seq.all_token_ids[start:end]
        if len(token_ids) < n:  # sampled by the step in flight: the worker fills it in
            assert len(token_ids) == n - 1, f"{seq}: one step in flight at most"
            token_ids.append(PLACEHOLDER)
        sample = end == seq.num_tokens + seq.num_pending
        out = ScheduledSeq(
            seq_id=seq.seq_id,
            token_ids=token_ids,
            start_pos=start,
            block_table=list(self.kv.block_table(seq.seq_id)),
            sample=sample,
            sampling=seq.sampling if first else None,
            prompt_token_ids=seq.prompt_token_ids if first else None,
            output_token_ids=resume_outputs,
            seed_index=seq.index,
            eos_token_ids=sorted(seq.eos_token_ids) if first and seq.eos_token_ids else None,
        )
        blend = self._blends.pop(seq.seq_id, None)
        if blend is not None:
            out.blend = blend[0]
            self._counts["prompt_tokens"] -= blend[1]  # reused chunk tokens were not computed
        seq.sent_to_worker, seq.resumed = True, False
        self._counts["prompt_tokens"] += max(0, min(end, seq.num_prompt_tokens) - start)
        seq.num_computed_tokens = end
        seq.num_pending += sample
        return out

    # ------------------------------------------------------------------ results
    def update_from_output(
        self, sched_out: SchedulerOutput, runner_out: ModelRunnerOutput
    ) -> list[RequestOutput]:
        """Append sampled tokens, finish sequences that stop; one output per sampled token."""
        if runner_out.error is not None:
            return self.fail_all(f"the model worker failed: {runner_out.error}")
        if runner_out.step_id != sched_out.step_id:
            return self.fail_all(
                f"the worker answered step {runner_out.step_id} for step {sched_out.step_id}"
            )
        tiers = self.kv.tiers
        if tiers is not None:
            for done in runner_out.kv_done:
                tiers.apply_done(done.op_id, done.ok, done.error, done.seconds, done.error_kind)
            for probed in runner_out.kv_probed:
                tiers.apply_probed(probed.op_id, probed.found, probed.error_kind)
            tiers.corrupt_files += runner_out.kv_disk_corrupt_files
            tiers.set_remote_up(runner_out.remote_up)
        row = {seq_id: i for i, seq_id in enumerate(runner_out.seq_ids)}
        self.blender.observe(runner_out.chunk_deviation)
        self._collect_prompt_logprobs(runner_out)
        outputs = []
        for ss in sched_out.seqs:
            seq = self._seqs.get(ss.seq_id)
            if not ss.sample or seq is None:
                continue  # mid-prefill chunk, or finished since it was scheduled
            seq.num_pending -= 1
            if seq.status not in (SeqStatus.RUNNING, SeqStatus.PREEMPTED):
                continue
            i = row.get(ss.seq_id)
            if i is None:
                self._finish(seq, SeqStatus.FINISHED_ERROR, error="the worker sampled no token")
                outputs.append(self._final_output(seq))
                continue
            lp = runner_out.logprobs[i] if runner_out.logprobs is not None else None
            outputs.append(self._append(seq, runner_out.sampled_token_ids[i], lp))
        return outputs

    def _append(self, seq: Seq, token_id: int, logprob: TokenLogprobs | None) -> RequestOutput:
        """``seq``'s next token (preempted while it was in flight: still its token)."""
        seq.append_token(token_id)
        if seq.status is SeqStatus.RUNNING:
            self.kv.register_known(seq)  # blocks computed ahead of their tokens, now known
        self._counts["generation_tokens"] += 1
        status = seq.check_stop(token_id, self.max_seq_len)
        if seq.matcher is not None:
            status = _grammar_status(seq, token_id, status)
        out = RequestOutput(
            seq.request_id,
            index=seq.index,
            new_token_ids=[token_id],
            logprobs=[logprob] if logprob is not None else None,
            prompt_logprobs=self._prompt_logprobs.pop(seq.seq_id, None),
            num_prompt_tokens=seq.num_prompt_tokens,
            num_cached_tokens=seq.num_cached_tokens or 0,
        )
        if status is not None:
            self._finish(seq, status, error=seq.error)
            out.finish_reason = status.finish_reason
            out.stop_token_id = seq.stop_token_id
            out.error = seq.error
        return out

    def _collect_prompt_logprobs(self, runner_out: ModelRunnerOutput) -> None:
        """Gather prompt logprobs across prefill chunks until the first token is emitted."""
        for seq_id, part in (runner_out.prompt_logprobs or {}).items():
            seq = self._seqs.get(seq_id)
            if seq is not None and seq.num_output_tokens == 0:
                self._prompt_logprobs.setdefault(seq_id, []).extend(part)

    def _finish(self, seq: Seq, status: SeqStatus, error: str | None = None) -> None:
        """Mark finished, free its blocks, tell the worker next step, forget it."""
        if seq.status is SeqStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SeqStatus.WAITING_FOR_KV:
            del self.loading[seq.seq_id]
        elif seq.status is SeqStatus.WAITING_FOR_GRAMMAR:
            self.compiling[seq.request_id][0].remove(seq)
        else:
            self.waiting.remove(seq)
        seq.status, seq.error = status, error
        self.programs.turn_ended(seq, status)
        self.blender.forget(seq.seq_id)
        self.kv.free(seq.seq_id)
        if seq.sent_to_worker:
            self._finished_ids.append(seq.seq_id)
        del self._seqs[seq.seq_id]
        self._prompt_logprobs.pop(seq.seq_id, None)
        if all(s.is_finished for s in self.requests[seq.request_id]):
            del self.requests[seq.request_id]

    @staticmethod
    def _final_output(seq: Seq) -> RequestOutput:
        return RequestOutput(
            seq.request_id,
            index=seq.index,
            finish_reason=seq.status.finish_reason,
            num_prompt_tokens=seq.num_prompt_tokens,
            num_cached_tokens=seq.num_cached_tokens or 0,
            error=seq.error,
        )

    # ------------------------------------------------------------------ observability
    def stats(self) -> EngineStats:
        """Gauges now, counter increments and histogram observations since the last call."""
        return self._increments.message(self.snapshot())

    def snapshot(self) -> dict[str, Any]:
        """Every engine metric P1 counts (``protocol.metrics.ENGINE_METRICS``): gauges now,
        counters cumulative since start, histogram observations since the last call."""
        b = self.blender
        return {
            "num_running": len(self.running),
            "num_waiting": len(self.waiting) + len(self.loading)
            + sum(len(seqs) for seqs, _ in self.compiling.values()),
            "kv_cache_usage": self.kv.usage,
            "prefix_queries": self.kv.prefix_queries, "prefix_hits": self.kv.prefix_hits,
            "chunk_queries": b.queries, "chunk_hit_tokens": b.hit_tokens,
            "chunk_recomputed_tokens": b.recomputed_tokens,
            **self._counts, **self._tier_snapshot(), **self.programs.snapshot(),
        }

    def _tier_snapshot(self) -> dict[str, Any]:
        """The tier metrics (empty without tiers); the device's share comes from the pool."""
        tiers = self.kv.tiers
        if tiers is None:
            return {}
        snap = tiers.snapshot()
        snap["kv_tier_hit_tokens"]["device"] = self.kv.device_hits
        snap["kv_tier_usage_bytes"]["device"] = self.kv.pool.num_cached * tiers.block_bytes
        return snap

    def observe_step(self, sched_out: SchedulerOutput, seconds: float) -> None:
        """Feed the load-vs-recompute policy with how long a step took."""
        if self.kv.tiers is not None and sched_out.seqs:
            prefill = sum(len(s.token_ids) for s in sched_out.seqs if len(s.token_ids) > 1)
            self.kv.tiers.policy.observe_step(prefill, seconds)

    def check_integrity(self) -> None:
        """KV invariants plus: every unfinished seq is in exactly one queue, in a sane state."""
        self.kv.check_integrity()
        compiling = [s for seqs, _ in self.compiling.values() for s in seqs]
        queued = list(self.waiting) + self.running + list(self.loading.values()) + compiling
        ids = [s.seq_id for s in queued]
        _require(len(set(ids)) == len(ids), f"a sequence is queued twice: {ids}")
        _require(set(ids) == set(self._seqs), "queues and the sequence table disagree")
        _require(len(self.running) <= self.config.max_num_seqs, "more than max_num_seqs running")
        for s in self.running:
            blocks = len(self.kv.block_table(s.seq_id))
            _require(s.status is SeqStatus.RUNNING, f"{s} in running")
            # 0 only for a sequence promoted from WAITING_FOR_KV whose loads all failed
            _require(0 <= s.num_computed_tokens <= s.num_tokens + s.num_pending,
                     f"{s} progress out of range")
            _require(blocks * self.block_size >= s.num_computed_tokens, f"{s} lacks blocks")
        for s in self.waiting:
            _require(s.status in (SeqStatus.WAITING, SeqStatus.PREEMPTED), f"{s} in waiting")
            _require(s.num_computed_tokens == 0, f"{s} waiting with computed tokens")
            _require(not self.kv.block_table(s.seq_id), f"{s} waiting with blocks")
        for s in compiling:
            _require(s.status is SeqStatus.WAITING_FOR_GRAMMAR and s.num_computed_tokens == 0
                     and not self.kv.block_table(s.seq_id), f"{s} compiling")
        for s in self.loading.values():
            _require(s.status is SeqStatus.WAITING_FOR_KV, f"{s} in loading")
            probing = self.kv.tiers is not None and self.kv.tiers.is_probing(s.seq_id)
            _require(bool(self.kv.block_table(s.seq_id)) or probing
                     or self.kv.is_prefetching(self.blender.loader_id(s.seq_id)),
                     f"{s} loading without blocks")


def _grammar_status(seq: Seq, token_id: int, status: SeqStatus | None) -> SeqStatus | None:
    """Advance ``seq``'s grammar by its sampled token: a complete grammar ends the sequence
    ("stop", whatever ``ignore_eos`` says: nothing else may follow); a token the grammar
    refuses (the worker ignored the mask) is an error."""
    assert seq.matcher is not None
    if seq.matcher.accept(token_id):
        if seq.matcher.stopped and status is not SeqStatus.FINISHED_STOPPED:
            seq.stop_token_id = token_id if token_id in seq.eos_token_ids else None
            return SeqStatus.FINISHED_STOPPED
        return status
    if status is SeqStatus.FINISHED_STOPPED and seq.matcher.stopped:
        return status  # the grammar had ended; the EOS after it is fine
    seq.error = f"sampled token {token_id} is not allowed by the request's grammar"
    return SeqStatus.FINISHED_ERROR


def _attach_ops(out: SchedulerOutput, ops: StepOps) -> None:
    out.kv_stores = [_wire(t) for t in ops.stores]
    out.kv_loads = [_wire(t) for t in ops.loads]
    out.kv_deletes = ops.deletes
    out.kv_probes = [KVProbe(op_id, keys) for op_id, keys in ops.probes]


def _wire(t: Transfer) -> KVTransfer:
    return KVTransfer(t.op_id, t.key, t.src, t.src_slot, t.dst, t.dst_slot)  # type: ignore[arg-type]


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise AssertionError(message)
