"""The worker's front door: one ``Worker`` per device, one explicit pipeline per step.

    SchedulerOutput ──► 1. tier ops in   (deletes, stores, loads: ``TierDataPlane.before_step``)
                        2. model step    (``ModelRunner.launch``; its layers wait for the
                                          host copies they read, layer group by layer group)
                        3. tier ops out  (copies the forward pass did not reach, finished
                                          transfers: ``TierDataPlane.after_step``)
                    ◄── ModelRunnerOutput (sampled ids + ``kv_done``)

A step with ``defer_output`` (asynchronous scheduling) is answered later: while the next step
runs, between its forward pass being launched and its sampling (which needs the sampler state
the answer updates), or on ``Drain``. Its sampled ids wait on the device meanwhile; the
answer waits only for that step's own copy of them to the host, never for the whole device.
On the CPU, where launching is computing, the answer goes out before the next step computes
(the engine still plans that step meanwhile).

Both executors drive this class: ``python -m encore.worker.main`` (the worker process) and
``encore.worker.executor.InprocExecutor`` (tests, offline).
"""

from __future__ import annotations

from collections.abc import Callable

import msgspec
import torch

from encore.configs import EncoreConfig
from encore.kernels.reference import as_raw
from encore.protocol.messages import (
    GrammarBitmask,
    ModelRunnerOutput,
    SchedulerOutput,
    WorkerReady,
)
from encore.worker.model_runner import KV_DTYPES, Launched, ModelRunner
from encore.worker.parallel import SINGLE, TPGroup
from encore.worker.tiers.data_plane import TierDataPlane, kv_fingerprint, layout_fingerprints

# the dtypes a device KV pool may hold (model dtypes, fp8): the files of this model in another
# of them are misses to this server, not bad files
KV_LAYOUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, *KV_DTYPES.values())


class Worker:
    """The model runner of one device and its tier data plane (under tensor parallelism:
    one rank's shard of both)."""

    def __init__(self, config: EncoreConfig, tp: TPGroup = SINGLE) -> None:
        self.runner = ModelRunner(config, tp)
        kv = self.runner.kv_caches
        shape = (len(kv), 2, *kv[0].shape[2:])
        arch = self.runner.arch
        fingerprint = kv_fingerprint(config, arch, kv[0].dtype, shape, tp.rank, tp.size)
        layouts = layout_fingerprints(config, arch, KV_LAYOUT_DTYPES, shape, tp.rank, tp.size)
        # fp8 pools move as bytes (torch's index ops take no fp8 on the CPU)
        self.tiers = TierDataPlane(config, [as_raw(c) for c in kv], fingerprint, tp.rank, tp.size,
                                   layouts - {fingerprint})
        self.pending: Launched | None = None  # a deferred step, not yet answered

    @property
    def kv_caches(self) -> list[torch.Tensor]:
        """The device KV pool, per layer ``[2, blocks, bs, heads, dim]``."""
        return self.runner.kv_caches

    def ready_message(self) -> WorkerReady:
        """The start-up answer to the engine: pool sizes, and the disk blocks found."""
        tiers = self.tiers
        return msgspec.structs.replace(
            self.runner.ready_message(), kv_block_bytes=tiers.blocks.block_bytes,
            kv_tier_block_bytes=tiers.blocks.tier_block_bytes,
            num_host_blocks=tiers.num_host_blocks, num_disk_blocks=tiers.disk.num_blocks,
            disk_keys=tiers.disk.keys, disk_writable=tiers.disk.writable,
            remote=tiers.remote.store is not None,
            kv_disk_corrupt_files=tiers.disk.take_corrupt())

    def submit(self, step: SchedulerOutput, masks: Callable[[], GrammarBitmask | None] | None,
               emit: Callable[[ModelRunnerOutput], None]) -> None:
        """Run ``step``; hand answers to ``emit`` in step order: the deferred previous step's
        as soon as this one's forward pass is launched, then this one's unless it is
        deferred too. ``masks``: the step's token masks, fetched when the sampler needs them
        (after the forward pass is launched), for a step with ``grammar_follows``."""
        def settle() -> None:  # the previous step's answer, before this step samples
            self.drain(emit)

        if self.runner.device.type != "cuda":
            settle()  # no kernels run behind the host's back here: answer before computing
        try:
            done, copies = self.tiers.before_step(step)
            try:
                launched = self.runner.launch(step, copies, masks, settle)
            finally:
                if copies is not None:
                    copies.finish()  # what the forward pass did not reach
            settle()
            finished, probed = self.tiers.after_step(idle=not step.seqs)
        except BaseException:
            self.pending = None  # the engine fails the steps in flight
            raise
        out = launched.out
        out.kv_done = [*done, *finished]
        out.kv_probed = probed
        out.kv_disk_corrupt_files = self.tiers.disk.take_corrupt()
        out.remote_up = self.tiers.remote.up
        if step.defer_output:
            self.pending = launched
        else:
            emit(launched.output())

    def drain(self, emit: Callable[[ModelRunnerOutput], None]) -> None:
        """Answer the deferred step, if any."""
        if self.pending is not None:
            pending, self.pending = self.pending, None
            emit(pending.output())

    def close(self) -> None:
        """Let the disk writes in flight finish."""
        self.tiers.close()
