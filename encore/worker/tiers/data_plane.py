"""One step's tier ops, in order, and their completions.

Order within a step (each op may read a slot that a later op of the same step overwrites):

    1. delete disk files of keys the disk index evicted
    2. host -> disk flushes: the I/O pool reads the (pinned, in the index) host slot itself
    3. device -> disk stores: gathered, copied to the CPU, written by the I/O pool
    4. disk -> device loads: read in the I/O pool, copied to the device once read (later);
       the same for device -> remote stores, remote -> device loads, and remote probes
    5. per layer group: gather the group's layers of the blocks to store in host, then copy
       the group's host -> device loads (``LayerCopies``)
    6. the stores' copies into the host pool
    7. the forward pass: on CUDA each layer group waits for its group's event; group g+1 is
       issued when the forward pass reaches group g (the CPU work of issuing copies runs
       while the GPU computes), so the first layers compute while later groups are still
       crossing PCIe. Group 0 is one layer: nothing computes before it is in.

On the CPU steps 5-6 are done before the forward pass. Finished ops come back as ``KVDone``
(``ModelRunnerOutput.kv_done``), possibly steps later.

The lower tiers hold blocks encoded by ``cache.tier_kv_codec`` (``codec``): the host pool's
slots, disk files and remote values are sized to the encoded block, and host and disk
budgets in GiB hold that many more blocks. On CUDA the codec runs on the side stream (encode
before a copy to the CPU, decode after a copy to the device); on the CPU the host tier's
blocks are encoded and decoded in the step, disk and remote blocks by the I/O threads.

Under tensor parallelism every rank runs its own data plane over its shard of each block:
the same ops, its share (1/N) of the host and disk budgets, its own disk subdirectory
(``tp{N}-rank{r}``) and remote namespace (the fingerprint names the rank). The executor
reports an op done once every rank has (``protocol/executor.RankMerge``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable
from concurrent.futures import wait
from typing import Any

import torch

from encore.configs import EncoreConfig
from encore.configs.secrets import disk_mac_key, remote_namespace_id
from encore.protocol.messages import KVDone, KVProbed, SchedulerOutput
from encore.worker.tiers.blocks import DeviceBlocks
from encore.worker.tiers.codec import TIER_CODECS, KVCodec
from encore.worker.tiers.disk_io import DiskIO
from encore.worker.tiers.frames import Frames
from encore.worker.tiers.host_copies import HostCopies, LayerCopies
from encore.worker.tiers.host_pool import HostPool
from encore.worker.tiers.remote_io import RemoteIO, RemoteStore

logger = logging.getLogger(__name__)

GIB = 1024**3
REMOTE_PASSWORD_ENV = "ENCORE_REMOTE_CACHE_PASSWORD"  # the store's password, if not in the URL
LOAD_GROUPS = 8  # layer groups of a host load (CUDA): layer group g computes once g is in
IDLE_WAIT_S = 0.005  # an idle step waits this long for disk or remote I/O before answering


class TierDataPlane:
    """Runs tier transfers against ``kv_caches`` (per layer ``[2, blocks, bs, heads, dim]``)."""

    def __init__(self, config: EncoreConfig, kv_caches: list[torch.Tensor],
                 fingerprint: bytes, rank: int = 0, ranks: int = 1,
                 retired: frozenset[bytes] = frozenset()) -> None:
        """``fingerprint``: this layout's (``kv_fingerprint``); ``retired``: the same model's
        other layouts (another KV dtype or tier codec: their disk files are plain misses)."""
        cache = config.cache
        self.blocks = DeviceBlocks(kv_caches, cache.tier_kv_codec)
        self.host = self._host_pool(cache.host_cache_gib / ranks)
        self.host_copies = HostCopies(self.blocks, self.host) if self.host is not None else None
        mac_key = disk_mac_key(cache)
        self._probed: list[KVProbed] = []
        disk_dir = cache.disk_cache_dir
        if disk_dir is not None and ranks > 1:
            disk_dir = os.path.join(disk_dir, f"tp{ranks}-rank{rank}")
        self.disk = DiskIO(self.blocks, self.host, disk_dir, cache.disk_cache_gib / ranks,
                           fingerprint, mac_key, retired)
        self.remote = RemoteIO(self.blocks, _remote_store(config, fingerprint, mac_key,
                                                          self.blocks.tier_block_bytes))
        groups = self.host.bounds if self.host is not None else []
        every = self.blocks.all_layers
        self.blocks.warm_up([*groups, every] if every not in groups else groups)

    def _host_pool(self, gib: float) -> HostPool | None:
        blocks = self.blocks
        num = int(gib * GIB // blocks.tier_block_bytes)
        if num <= 0:
            return None
        pin = blocks.stream is not None
        logger.info("host KV tier: %d blocks (%.2f GiB, %s)%s", num,
                    num * blocks.tier_block_bytes / GIB, blocks.codec.name,
                    ", pinned" if pin else "")
        return HostPool(num, blocks.num_layers, blocks.codec.layer_bytes, pin, LOAD_GROUPS)

    @property
    def num_host_blocks(self) -> int:
        return 0 if self.host is None else len(self.host)

    def before_step(self, step: SchedulerOutput) -> tuple[list[KVDone], LayerCopies | None]:
        """Issue the step's ops (in the documented order); return those already finished and,
        on CUDA with host copies (loads, stores to host), the ``LayerCopies`` the forward pass
        waits on (None: none)."""
        done: list[KVDone] = []
        for key in step.kv_deletes:
            self.disk.delete(key)
        ready = self._copies(step, done) if step.has_kv_ops else None
        done.extend(self.poll())
        return done, ready

    def after_step(self, idle: bool) -> tuple[list[KVDone], list[KVProbed]]:
        """Transfers and probes that finished meanwhile; an idle step waits briefly for
        I/O."""
        running = [*self.disk.running(), *self.remote.running()] if idle else []
        if running:
            wait(running, timeout=IDLE_WAIT_S, return_when="FIRST_COMPLETED")
        return self.poll(), self.probed()

    def _copies(self, step: SchedulerOutput, done: list[KVDone]) -> LayerCopies | None:
        """Stores, then loads; on CUDA on the side stream, which waits for the forward passes
        before it. Layer group by layer group, the gathers of blocks to store in host (before
        a load or this step's forward pass overwrites them) and the host loads, issued one
        group ahead of the forward pass, whose layers wait for their group (``LayerCopies``);
        the stores' copies to host after the last group. On the CPU everything is done
        before returning."""
        stream = self.blocks.stream
        if stream is None:
            groups, after = self._stages(step, done)
            for stage in (*groups, *after):
                stage()
            return None
        main = torch.cuda.current_stream(self.blocks.device)
        stream.wait_stream(main)
        with torch.cuda.stream(stream):
            groups, after = self._stages(step, done)
            main.wait_event(self.blocks.record())  # the gathers of stores straight to disk
        if not groups:
            return None
        copies = LayerCopies(stream, self.host.bounds if self.host else [], groups, after)
        copies.issue(1)  # group 0 before the forward pass starts
        return copies

    def _stages(self, step: SchedulerOutput, done: list[KVDone]) -> tuple[list[Any], list[Any]]:
        """Issue now: flushes from host, stores straight to disk, disk reads (steps 2-4).
        Return the host copies' stages (steps 5-6, ``HostCopies.stages``)."""
        for op in step.kv_stores:
            if op.src == "host":
                self.disk.write(op, None, None, done)
        from_device = [op for op in step.kv_stores if op.src != "host"]
        to_host = sorted((op for op in from_device if op.dst == "host"),
                         key=lambda op: op.dst_slot)
        to_io = [op for op in from_device if op.dst != "host"]
        if to_io:
            ids = self.blocks.ids([op.src_slot for op in to_io])
            staged, event = self.blocks.stage_out(ids)
            for op, data in zip(to_io, staged, strict=True):
                (self.remote if op.dst == "remote" else self.disk).write(op, data, event, done)
        for op in step.kv_loads:
            if op.src != "host":
                (self.remote if op.src == "remote" else self.disk).read(op, done)
        for probe in step.kv_probes:
            self.remote.probe(probe)
        loads = [op for op in step.kv_loads if op.src == "host"]
        if self.host_copies is None:
            return [], []
        return self.host_copies.stages(to_host, loads, done)

    def poll(self) -> list[KVDone]:
        """Finished transfers: host copy batches, then disk and remote I/O (remote probes
        are kept for ``probed``)."""
        done = self.host_copies.poll() if self.host_copies is not None else []
        done.extend(self.disk.poll())
        remote_done, probed = self.remote.poll()
        done.extend(remote_done)
        self._probed.extend(probed)
        return done

    def probed(self) -> list[KVProbed]:
        probed, self._probed = self._probed, []
        return probed

    def close(self) -> None:
        self.disk.close()
        self.remote.close()


def kv_fingerprint(config: EncoreConfig, arch: Any, dtype: torch.dtype,
                   block_shape: tuple[int, ...], rank: int = 0, ranks: int = 1,
                   codec: str | None = None) -> bytes:
    """32 bytes naming the model, the KV layout (and, under tensor parallelism, which rank's
    shard) and the tier codec (``codec``, default the config's) with its parameters: files of
    another model, shard or codec never load."""
    desc: dict[str, Any] = {"model": config.model.model or "embedded-smollm2", "load_format":
                            config.model.load_format, "arch": repr(arch), "dtype": str(dtype),
                            "block_shape": list(block_shape), "format": 1}
    if ranks > 1:
        desc["tensor_parallel"] = [rank, ranks]
    tier_codec = KVCodec(codec or config.cache.tier_kv_codec, tuple(block_shape[1:]), dtype)
    if tier_codec.bits:  # codec none keeps the fingerprint of the files written before codecs
        desc["tier_codec"] = tier_codec.describe()
    return hashlib.blake2b(json.dumps(desc, sort_keys=True).encode(), digest_size=32).digest()


def layout_fingerprints(config: EncoreConfig, arch: Any, dtypes: Iterable[torch.dtype],
                        block_shape: tuple[int, ...], rank: int = 0,
                        ranks: int = 1) -> frozenset[bytes]:
    """The fingerprints of this model and shard in each of its layouts: every KV dtype of
    ``dtypes`` under every tier codec (a server's own is one of them; the others' files are
    misses to it, not bad files)."""
    return frozenset(kv_fingerprint(config, arch, dtype, block_shape, rank, ranks, codec)
                     for dtype in dtypes for codec in TIER_CODECS)


def _remote_store(config: EncoreConfig, fingerprint: bytes, mac_key: bytes,
                  block_bytes: int) -> RemoteStore | None:
    """The remote tier's store, if configured: keys under a namespace naming the model and
    KV layout (``fingerprint``) and the deployment secret. The store may be down now: that is
    a miss until it answers (nothing is contacted here)."""
    cache = config.cache
    if not cache.remote_cache_url:
        return None
    namespace = f"encore:kv:{fingerprint[:8].hex()}:{remote_namespace_id(cache)}"
    password = os.environ.get(REMOTE_PASSWORD_ENV)
    logger.info("remote KV tier: %s (namespace %s)", _redact(cache.remote_cache_url), namespace)
    return RemoteStore(cache.remote_cache_url, namespace, Frames(fingerprint, block_bytes,
                                                                 mac_key),
                       cache.remote_cache_ttl_s, int(cache.remote_cache_max_value_mb * 2**20),
                       cache.remote_cache_timeout_s, password)


def _redact(url: str) -> str:
    """``url`` without its password."""
    head, sep, tail = url.partition("@")
    if not sep:
        return url
    scheme, _, _ = head.partition("://")
    return f"{scheme}://***@{tail}"
