"""A fake model runner for scheduler tests: no model, but a real (fake) paged KV cache.

It writes every scheduled token into its block slot, then reads each sampling sequence's
whole context *back from the slots* and picks the next token as a checksum of it. A wrong
block table, a prefix hit on a block with other contents, or an evicted-then-reused block all
change the tokens, so tests compare against ``reference_tokens`` (computed without any KV).
It also checks the protocol: sampling params once per seq, never block 0, context == the
tokens it has been told about.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from encore.protocol.messages import (
    PLACEHOLDER,
    EngineRequest,
    KVDone,
    KVProbe,
    KVProbed,
    KVTransfer,
    ModelRunnerOutput,
    RequestOutput,
    SamplingParams,
    ScheduledSeq,
    SchedulerOutput,
)

VOCAB = 1000


def default_next_token(context: list[int], seed_index: int) -> int:
    """Deterministic 'model': a position-weighted checksum of the whole context."""
    return (sum((i + 1) * t for i, t in enumerate(context)) * 7 + 13 + 101 * seed_index) % VOCAB


def reference_tokens(
    prompt: list[int],
    max_tokens: int,
    seed_index: int = 0,
    next_token: Callable[[list[int], int], int] = default_next_token,
) -> list[int]:
    """What an unpressured, cache-free run would generate (no stop tokens)."""
    ctx = list(prompt)
    for _ in range(max_tokens):
        ctx.append(next_token(ctx, seed_index))
    return ctx[len(prompt) :]


@dataclass
class _SeqState:
    sampling: SamplingParams
    tokens: list[int]  # prompt + outputs sampled so far
    num_prompt: int


class FakeWorker:
    """Answers ``SchedulerOutput`` with a deterministic ``ModelRunnerOutput``."""

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        next_token: Callable[[list[int], int], int] = default_next_token,
    ) -> None:
        self.block_size = block_size
        self.next_token = next_token
        self.slots: list[list[tuple[int, int] | None]] = [
            [None] * block_size for _ in range(num_blocks)
        ]
        self.state: dict[str, _SeqState] = {}
        self.resumes: list[tuple[str, list[int]]] = []  # (seq id, output_token_ids) received
        # The tier data plane: host slots, disk files by key, disk ops finishing later.
        self.host: dict[int, list[tuple[int, int] | None]] = {}
        self.disk: dict[bytes, list[tuple[int, int] | None]] = {}
        self.disk_delay = 0  # steps a disk op takes before its KVDone
        self.corrupt: set[bytes] = set()  # disk keys whose next read fails as corrupt
        self.full = False  # disk writes fail (disk full)
        self._later: list[tuple[int, KVDone]] = []  # (steps left, done)
        self.corrupt_found = 0
        # A remote store shared by fake workers (pass the same dict): values by key.
        self.remote: dict[bytes, list[tuple[int, int] | None]] | None = None
        self.remote_down = False
        # what the worker reports each step, as the real one does: down from a failed op
        # until an op succeeds again (it tries the store only when an op comes)
        self.remote_seen_up = True
        self.remote_corrupt: set[bytes] = set()  # remote keys whose value fails its check
        self.placeholders = 0  # placeholder tokens filled in

    def execute(self, out: SchedulerOutput) -> ModelRunnerOutput:
        for seq_id in out.finished:
            assert seq_id in self.state, f"finished {seq_id} was never sent"
            del self.state[seq_id]
        done = self._run_kv_ops(out)
        for ss in out.seqs:  # all K/V of the step is written before anyone attends
            self._register(ss)
            self._write(ss)
        seq_ids, tokens = [], []
        for ss in out.seqs:
            if ss.sample:
                token = self.next_token(self._read(ss), ss.seed_index)
                self.state[ss.seq_id].tokens.append(token)
                seq_ids.append(ss.seq_id)
                tokens.append(token)
        corrupt, self.corrupt_found = self.corrupt_found, 0
        probed = [self._probe(p) for p in out.kv_probes]
        up = None if self.remote is None else self.remote_seen_up
        return ModelRunnerOutput(step_id=out.step_id, seq_ids=seq_ids, sampled_token_ids=tokens,
                                 kv_done=done, kv_probed=probed, kv_disk_corrupt_files=corrupt,
                                 remote_up=up)

    # ------------------------------------------------------------------ tier data plane
    def _run_kv_ops(self, out: SchedulerOutput) -> list[KVDone]:
        """Deletes, host-source stores, device-source stores, loads; disk ops finish after
        ``disk_delay`` steps (a disk load lands in its device block when it finishes)."""
        for key in out.kv_deletes:
            self.disk.pop(key, None)
        done: list[KVDone] = []
        for t in sorted(out.kv_stores, key=lambda t: t.src != "host"):
            data = list(self._src(t))
            if t.dst == "remote":
                done.append(self._remote_store(t, data))
            elif t.dst == "host":
                self.host[t.dst_slot] = data
                done.append(KVDone(t.op_id, True))
            elif self.full:
                self._later.append((self.disk_delay, KVDone(t.op_id, False, "disk full")))
            else:
                self.disk[t.key] = data
                self._later.append((self.disk_delay, KVDone(t.op_id, True)))
        for t in out.kv_loads:
            if t.src == "host":
                self.slots[t.dst_slot] = list(self.host[t.src_slot])
                done.append(KVDone(t.op_id, True))
            elif t.src == "remote":
                done.append(self._remote_load(t))
            else:
                self._later.append((self.disk_delay, self._disk_load(t)))
        ready = [d for n, d in self._later if n <= 0]
        self._later = [(n - 1, d) for n, d in self._later if n > 0]
        return done + ready

    def _src(self, t: KVTransfer) -> list[tuple[int, int] | None]:
        return self.host[t.src_slot] if t.src == "host" else self.slots[t.src_slot]

    def _disk_load(self, t: KVTransfer) -> KVDone:
        if t.key in self.corrupt:
            self.corrupt.discard(t.key)
            self.disk.pop(t.key, None)
            self.corrupt_found += 1
            return KVDone(t.op_id, False, "checksum mismatch")
        self.slots[t.dst_slot] = list(self.disk[t.key])
        return KVDone(t.op_id, True)

    def _remote_store(self, t: KVTransfer, data: list[tuple[int, int] | None]) -> KVDone:
        assert self.remote is not None, "a remote store op without a remote store"
        if not self._remote_answers():
            return KVDone(t.op_id, False, "down", error_kind="down")
        self.remote[t.key] = data
        return KVDone(t.op_id, True)

    def _remote_load(self, t: KVTransfer) -> KVDone:
        assert self.remote is not None
        if not self._remote_answers():
            return KVDone(t.op_id, False, "down", error_kind="down")
        if t.key in self.remote_corrupt:
            self.remote_corrupt.discard(t.key)
            self.remote.pop(t.key, None)
            return KVDone(t.op_id, False, "authentication failed", error_kind="corrupt")
        if t.key not in self.remote:
            return KVDone(t.op_id, False, "gone", error_kind="miss")
        self.slots[t.dst_slot] = list(self.remote[t.key])
        return KVDone(t.op_id, True)

    def _remote_answers(self) -> bool:
        self.remote_seen_up = not self.remote_down
        return self.remote_seen_up

    def _probe(self, probe: KVProbe) -> KVProbed:
        if self.remote is None or not self._remote_answers():
            return KVProbed(probe.op_id, 0, "down")
        found = 0
        while found < len(probe.keys) and probe.keys[found] in self.remote:
            found += 1
        return KVProbed(probe.op_id, found)

    def _register(self, ss: ScheduledSeq) -> None:
        if ss.sampling is not None:
            assert ss.seq_id not in self.state, f"sampling params re-sent for {ss.seq_id}"
            assert ss.prompt_token_ids is not None
            self.state[ss.seq_id] = _SeqState(
                ss.sampling, list(ss.prompt_token_ids), len(ss.prompt_token_ids)
            )
        assert ss.seq_id in self.state, f"{ss.seq_id} sent without sampling params"
        if ss.output_token_ids is not None:
            st = self.state[ss.seq_id]
            assert st.tokens[st.num_prompt :] == ss.output_token_ids
            self.resumes.append((ss.seq_id, list(ss.output_token_ids)))

    def _slot(self, ss: ScheduledSeq, pos: int) -> tuple[int, int]:
        block = ss.block_table[pos // self.block_size]
        assert block != 0, f"{ss.seq_id}: block 0 is the null block"
        return block, pos % self.block_size

    def _write(self, ss: ScheduledSeq) -> None:
        st = self.state[ss.seq_id]
        for j, token in enumerate(ss.token_ids):
            pos = ss.start_pos + j
            if token == PLACEHOLDER:  # sampled by the step before (asynchronous scheduling)
                assert pos == len(st.tokens) - 1, f"{ss.seq_id}: placeholder at {pos}"
                self.placeholders += 1
                token = st.tokens[pos]
            assert st.tokens[pos] == token, f"{ss.seq_id}: token at {pos} is not the known one"
            b, off = self._slot(ss, pos)
            self.slots[b][off] = (token, pos)

    def _read(self, ss: ScheduledSeq) -> list[int]:
        end = ss.start_pos + len(ss.token_ids)
        assert end == len(self.state[ss.seq_id].tokens), "sampling before the last known token"
        ctx = []
        for pos in range(end):
            b, off = self._slot(ss, pos)
            entry = self.slots[b][off]
            assert entry is not None and entry[1] == pos, f"{ss.seq_id}: bad KV at {pos}"
            ctx.append(entry[0])
        return ctx


@dataclass
class Run:
    """What a driven run produced, per (request id, index)."""

    tokens: dict[tuple[str, int], list[int]] = field(default_factory=dict)
    finals: dict[tuple[str, int], RequestOutput] = field(default_factory=dict)
    steps: list[SchedulerOutput] = field(default_factory=list)

    def collect(self, outputs: list[RequestOutput]) -> None:
        for o in outputs:
            key = (o.request_id, o.index)
            self.tokens.setdefault(key, []).extend(o.new_token_ids)
            if o.finish_reason is not None:
                assert key not in self.finals, f"{key} finished twice"
                self.finals[key] = o


def step(sched, worker: FakeWorker, run: Run | None = None) -> list[RequestOutput]:
    """One engine step: schedule, execute, update (with an integrity check)."""
    out = sched.schedule()
    outputs = sched.update_from_output(out, worker.execute(out))
    sched.check_integrity()
    if run is not None:
        run.steps.append(out)
        run.collect(outputs)
    return outputs


class Pipeline:
    """Asynchronous scheduling as ``EngineCore`` drives it: step N+1 is planned before step
    N's output is applied. The fake worker runs each step when it is submitted, which is the
    order a real worker's stream runs them in; only the scheduler's knowledge lags."""

    def __init__(self, sched, worker: FakeWorker, run: Run | None = None) -> None:
        self.sched, self.worker = sched, worker
        self.run = Run() if run is None else run
        self.inflight: tuple[SchedulerOutput, ModelRunnerOutput] | None = None

    def _apply(self) -> list[RequestOutput]:
        assert self.inflight is not None
        (out, result), self.inflight = self.inflight, None
        outputs = self.sched.update_from_output(out, result)
        self.sched.check_integrity()
        self.run.collect(outputs)
        return outputs

    def step(self) -> list[RequestOutput]:
        outputs = []
        if self.inflight is not None and self.sched.needs_outputs():
            outputs += self._apply()
        out = self.sched.schedule()
        self.sched.check_integrity()
        self.run.steps.append(out)
        result = self.worker.execute(out)
        if self.inflight is not None:
            outputs += self._apply()
        self.inflight = (out, result)
        return outputs

    def busy(self) -> bool:
        tiers = self.sched.kv.tiers
        return (bool(self.inflight and self.inflight[0].seqs) or self.sched.has_unfinished()
                or bool(tiers and (tiers.num_inflight or tiers.needs_flush())))


def run_all(sched, worker: FakeWorker, run: Run | None = None, max_steps: int = 10_000,
            pipeline: Pipeline | None = None) -> Run:
    """Step until no sequence is unfinished; then flush ``finished`` to the worker.
    ``pipeline``: step it (asynchronous scheduling) instead."""
    run = Run() if run is None else run
    tiers = sched.kv.tiers
    if pipeline is not None:
        while pipeline.busy():
            assert len(pipeline.run.steps) < max_steps, "no progress"
            pipeline.step()
        if pipeline.inflight is not None:
            pipeline.step()  # apply the last (empty) step
        worker.execute(sched.schedule())
        return pipeline.run
    while sched.has_unfinished() or (tiers and (tiers.num_inflight or tiers.needs_flush())):
        assert len(run.steps) < max_steps, "no progress"
        step(sched, worker, run)
    worker.execute(sched.schedule())  # deliver the last finished ids
    return run


def make_request(rid: str, prompt: list[int], max_tokens: int = 4, **kw) -> EngineRequest:
    """An EngineRequest with greedy sampling; extra SamplingParams / request fields by name."""
    req_fields = {k: kw.pop(k) for k in ("priority", "cache_salt", "eos_token_ids",
                                         "prompt_cache_key", "pin_ttl_s", "is_last_step")
                  if k in kw}
    sampling = SamplingParams(temperature=0.0, max_tokens=max_tokens, **kw)
    return EngineRequest(rid, prompt, sampling, arrival_time=0.0, **req_fields)
