"""The engine (P1): scheduler + executor glue, and the loop that drives it.

    inbox (EngineRequest / AbortRequest / ToolCalled / Shutdown)
        ──► EngineLoop ──► emit(EngineOutputs)
                 │
    EngineCore.step(): schedule → execute → update
    asynchronous (``scheduler.async_scheduling``, the default):
        schedule N+1 → submit N+1 → collect N → update N     (N+1 runs while N+1's
        successor is planned; the worker answers N once N+1 is launched)

The loop only pops Python objects from a queue and hands results to ``emit``; sockets and
(de)serialization live in I/O threads (``scheduler.engine_main``) or in the asyncio side of an
in-process client. No CUDA, no torch.
"""

from __future__ import annotations

import logging
import queue
import time
from collections.abc import Callable

from encore.configs import EncoreConfig
from encore.configs.secrets import block_key_secret
from encore.kvmanager.cost import load_cost_numbers, save_cost_numbers
from encore.kvmanager.tiered import TierSetup
from encore.protocol.executor import Executor, WorkerDiedError
from encore.protocol.messages import (
    AbortRequest,
    EngineOutputs,
    EngineReady,
    EngineRequest,
    GrammarVocab,
    RequestOutput,
    SchedulerOutput,
    Shutdown,
    ToolCalled,
    WorkerReady,
)
from encore.scheduler.grammars import Grammars
from encore.scheduler.scheduler import Scheduler

logger = logging.getLogger(__name__)

LOOP_METRICS = ("worker_up",)  # reported by the loop itself; every other one by the scheduler
IDLE_WAIT_S = 0.5  # how long an idle loop blocks on its inbox before emitting stats again


class GrammarCompiled:
    """Put in the loop's inbox by a grammar pool thread: a compile ended, wake up."""


class EngineCore:
    """One scheduler and one executor; restarts the worker if it dies."""

    def __init__(self, config: EncoreConfig, executor: Executor, model_name: str = "") -> None:
        self.config = config
        self.executor = executor
        self.model_name = model_name
        self._scheduler: Scheduler | None = None
        self.worker: WorkerReady | None = None
        self.worker_dead = False
        self.async_scheduling = config.scheduler.async_scheduling
        # the submitted step whose output has not been collected, and when it was submitted
        self._inflight: tuple[SchedulerOutput, float] | None = None
        self._last_done = 0.0

    def start(self) -> EngineReady:
        self.worker = self.executor.start()
        self._scheduler = Scheduler.build(
            self.config.cache, self.config.scheduler,
            num_device_blocks=self.worker.num_device_blocks,
            max_model_len=self.worker.max_model_len,
            secret=block_key_secret(self.config.cache),
            tiers=self._tier_setup(self.worker))
        self._scheduler.vocab_size = self.worker.vocab_size
        self._scheduler.grammars = Grammars(self.worker.vocab_size)
        if self.worker.kv_disk_corrupt_files and self._scheduler.kv.tiers is not None:
            self._scheduler.kv.tiers.corrupt_files += self.worker.kv_disk_corrupt_files
        w = self.worker
        return EngineReady(model_name=self.model_name, max_model_len=w.max_model_len,
                           vocab_size=w.vocab_size, num_device_blocks=w.num_device_blocks,
                           block_size=self.config.cache.block_size, device=w.device,
                           dtype=w.dtype)

    def _tier_setup(self, w: WorkerReady) -> TierSetup:
        cache = self.config.cache
        cost = load_cost_numbers(cache.disk_cache_dir, cache.block_size, w.kv_tier_block_bytes)
        return TierSetup(block_bytes=w.kv_block_bytes, tier_block_bytes=w.kv_tier_block_bytes,
                         num_host_blocks=w.num_host_blocks,
                         num_disk_blocks=w.num_disk_blocks, disk_keys=w.disk_keys,
                         disk_writable=w.disk_writable, remote=w.remote,
                         write_policy=cache.cache_write_policy,
                         load_policy=cache.kv_load_policy,
                         checkpoint_interval_s=cache.checkpoint_interval_s, cost=cost)

    @property
    def scheduler(self) -> Scheduler:
        if self._scheduler is None:
            raise RuntimeError("the engine has not been started")
        return self._scheduler

    def add_request(self, request: EngineRequest) -> list[RequestOutput]:
        """Queue a request; returns error outputs if it is refused (e.g. too long)."""
        return self.scheduler.add_request(request)

    def abort(self, request_ids: list[str]) -> list[RequestOutput]:
        return self.scheduler.abort(request_ids)

    def tool_called(self, program: str, tools: list[str], cache_salt: str | None = None) -> None:
        self.scheduler.tool_called(program, tools, cache_salt)

    def set_grammar_vocab(self, msg: GrammarVocab) -> None:
        """The tokenizer that constrained requests' grammars compile against."""
        assert self.scheduler.grammars is not None
        self.scheduler.grammars.set_vocab(msg)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def has_runnable(self) -> bool:
        """Unfinished requests that do not just wait for a grammar compile, or a step in
        flight to collect."""
        return self._inflight is not None or self.scheduler.has_runnable()

    def has_work(self) -> bool:
        """Unfinished requests, finished ids the worker has not been told about yet, or a
        step whose output is still to collect."""
        return self._inflight is not None or self.scheduler.has_work()

    def step(self) -> list[RequestOutput]:
        """Schedule one batch and submit it; return the outputs that came back (the step's
        own, or under asynchronous scheduling the previous step's)."""
        outputs = self.scheduler.poll_grammars()
        try:
            if self._inflight is not None and self.scheduler.needs_outputs():
                outputs += self._collect_inflight()  # a grammar needs the token in flight
            sched_out = self.scheduler.schedule(defer_grammar=True)
            tiers = self.scheduler.kv.tiers
            if not (sched_out.seqs or sched_out.finished or sched_out.has_kv_ops
                    or (tiers is not None and tiers.num_inflight)):
                if self._inflight is not None:
                    outputs += self._collect_inflight()
                return outputs
            masks = self.scheduler.take_bitmask if sched_out.grammar_follows else None
            sched_out.defer_output = self.async_scheduling
            self.executor.submit(sched_out, masks)
            previous, self._inflight = self._inflight, (sched_out, time.perf_counter())
            if previous is not None:  # answered now that its successor is launched
                outputs += self._complete(previous, drain=False)
            if not self.async_scheduling:
                outputs += self._collect_inflight()
        except WorkerDiedError as e:
            self._inflight = None
            return outputs + self._recover(str(e))
        return outputs

    def _collect_inflight(self) -> list[RequestOutput]:
        """Wait for the step in flight (asking for it when it was deferred) and apply it."""
        assert self._inflight is not None
        entry, self._inflight = self._inflight, None
        return self._complete(entry, drain=entry[0].defer_output)

    def _complete(self, entry: tuple[SchedulerOutput, float], drain: bool
                  ) -> list[RequestOutput]:
        sched_out, submitted = entry
        result = self.executor.collect(drain)
        now = time.perf_counter()
        # the step's own time: from its submission or the previous step's end, if later
        self.scheduler.observe_step(sched_out, now - max(submitted, self._last_done))
        self._last_done = now
        return self.scheduler.update_from_output(sched_out, result)

    def _recover(self, reason: str) -> list[RequestOutput]:
        """Fail every in-flight request; ``restart_worker`` brings a fresh worker up after."""
        logger.error("worker failed (%s); failing in-flight requests", reason)
        self.worker_dead = True
        self.executor.shutdown()
        return self.scheduler.fail_all(f"the model worker failed: {reason}")

    def check_worker(self) -> list[RequestOutput]:
        """An idle engine's look at its worker: one that died meanwhile (a rank killed, an
        OOM) is restarted now, not when the next request finds it gone."""
        if self.worker_dead or self.executor.alive():
            return []
        return self._recover("the worker exited while idle")

    def restart_worker(self) -> None:
        """Start a new worker (raises WorkerDiedError if it cannot start)."""
        logger.info("restarting the model worker")
        self.worker = self.executor.start()
        self.worker_dead = False
        tiers = self.scheduler.kv.tiers
        if tiers is not None:  # the disk tier survived; the host tier died with the worker
            tiers.load_disk_index(self.worker.disk_keys)

    def shutdown(self) -> None:
        """Stop the worker. First, with a disk tier, write every cached block without a disk
        copy (device and host, most recently used first) so that the cache survives the
        restart, for at most ``shutdown_flush_timeout_s``; requests still unfinished (the
        server drained what it could) are aborted. The load policy's learned numbers are
        kept beside the disk tier (``cost.json``)."""
        if self._scheduler is not None and not self.worker_dead:
            self._final_flush(self.config.cache.shutdown_flush_timeout_s)
        if self._scheduler is not None and self._scheduler.grammars is not None:
            self._scheduler.grammars.shutdown()
        self.executor.shutdown()

    def _final_flush(self, timeout_s: float) -> None:
        scheduler = self.scheduler
        tiers = scheduler.kv.tiers
        if tiers is None:
            return
        scheduler.abort(list(scheduler.requests))
        tiers.begin_final_flush()
        deadline = time.monotonic() + timeout_s
        while (tiers.num_inflight or tiers.needs_flush() or self.has_work()) \
                and time.monotonic() < deadline and not self.worker_dead:
            self.step()
        if tiers.needs_flush() or tiers.num_inflight:
            logger.warning("shutdown: the KV flush to disk did not finish within %.0f s",
                           timeout_s)
        save_cost_numbers(self.config.cache.disk_cache_dir, tiers.policy)


class EngineLoop:
    """Pops inputs, steps the core, emits outputs with fresh stats. ``run`` returns on Shutdown."""

    def __init__(self, core: EngineCore, inbox: queue.Queue,
                 emit: Callable[[EngineOutputs], None]) -> None:
        self.core = core
        self.inbox = inbox
        self.emit = emit
        grammars = core.scheduler.grammars if core._scheduler is not None else None
        if grammars is not None:
            grammars.wake = lambda: inbox.put(GrammarCompiled())

    def _handle(self, msg: object, outputs: list[RequestOutput]) -> bool:
        if isinstance(msg, EngineRequest):
            outputs.extend(self.core.add_request(msg))
        elif isinstance(msg, AbortRequest):
            outputs.extend(self.core.abort(msg.request_ids))
        elif isinstance(msg, ToolCalled):
            self.core.tool_called(msg.program, msg.tools, msg.cache_salt)
        elif isinstance(msg, GrammarVocab):
            self.core.set_grammar_vocab(msg)
        elif isinstance(msg, GrammarCompiled):
            pass  # the next step queues its requests
        elif isinstance(msg, Shutdown):
            return False
        else:
            logger.warning("engine ignored unexpected %s", type(msg).__name__)
        return True

    def _drain(self, outputs: list[RequestOutput]) -> bool:
        """Handle every queued input; block briefly only when there is nothing to run
        (requests waiting for a grammar compile wake the loop when it ends)."""
        block = not self.core.has_runnable()
        while True:
            try:
                msg = self.inbox.get(block=block, timeout=IDLE_WAIT_S if block else None)
            except queue.Empty:
                return True
            if not self._handle(msg, outputs):
                return False
            block = False

    def run(self) -> None:
        while True:
            outputs: list[RequestOutput] = []
            if not self._drain(outputs):
                return
            if self.core.has_work():
                outputs.extend(self.core.step())
            else:
                outputs.extend(self.core.check_worker())
            stats = self.core.scheduler.stats()
            stats.values[LOOP_METRICS[0]] = 0.0 if self.core.worker_dead else 1.0
            self.emit(EngineOutputs(outputs=outputs, stats=stats))
            if self.core.worker_dead:
                self.core.restart_worker()
