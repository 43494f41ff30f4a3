"""Host, disk and remote tiers behind the device pool: what to store, what to load, and when
it is done.

    device pool ──evict (write-back) or compute (write-through)──► host ──flush──► disk
        │   ▲                                                       │               │
        │   ├── host loads: in the step that computes the rest ─────┘               │
        │   ├── disk loads: the request waits in WAITING_FOR_KV ────────────────────┘
        │   └── remote loads: likewise, after a probe found the blocks ─────┐
        └──checkpoint (idle, every interval, shutdown) / write-through──► remote (shared store)

One key space: the block key that names a device block also names a host slot and a disk
file. This module is the bookkeeping half (P1, torch-free): it turns events into
``KVTransfer`` ops for the step being planned and applies the worker's ``KVDone`` answers.
It never touches bytes. Per tier it keeps a ``TierIndex``; a key is loadable only after its
store completed; an entry being loaded is pinned.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import islice
from typing import Any

from encore.kvmanager.cost import CostNumbers, LoadPolicy, make_load_policy
from encore.kvmanager.tiers import TierIndex

logger = logging.getLogger(__name__)

LOWER_TIERS = ("host", "disk", "remote")
DURABLE_TIERS = ("disk", "remote")  # checkpoints give device blocks a copy in these
REMOTE_INDEX_KEYS = 1 << 18  # remote keys this engine remembers it has seen (LRU)
REMOTE_RETRY_S = 1.0  # while the store is down, a probe is tried again at most this often
# With a disk tier, the coldest quarter of the host tier is kept "clean" (also on disk) by
# background writes, so that making room in host never waits for (or loses) a block.
HOST_CLEAN_FRACTION = 0.25
MAX_DISK_WRITES_IN_FLIGHT = 64  # per tier (disk, remote): beyond this a block is not written
# (the I/O would lag the steps and its threads compete with the engine); a dropped block is
# recomputed if needed


@dataclass(frozen=True)
class TierSetup:
    """What the engine learns from the worker (sizes, the disk index) and the config."""

    block_bytes: int  # one device block
    tier_block_bytes: int = 0  # one block as the lower tiers hold it (encoded); 0: block_bytes
    num_host_blocks: int = 0
    num_disk_blocks: int = 0
    disk_keys: Sequence[bytes] = ()
    disk_writable: bool = True  # False: a read-only disk tier (loads only)
    remote: bool = False  # a remote tier (a store shared by replicas) is configured
    write_policy: str = "write_back"
    load_policy: str = "cost"
    checkpoint_interval_s: float = 60.0  # a busy engine's device blocks reach disk this often
    cost: CostNumbers | None = None  # the load policy's numbers kept from the last run


@dataclass
class Transfer:
    """One op for the worker (mirrors ``scheduler.protocol.KVTransfer``)."""

    op_id: int
    key: bytes
    src: str
    src_slot: int
    dst: str
    dst_slot: int
    seq_id: str | None = None  # the sequence a load serves


@dataclass
class _SeqLoad:
    """Loads in flight for one sequence: its load ops in block order."""

    op_ids: list[int]
    tiers: list[str]
    started: float
    failed_at: int | None = None  # first block index whose load failed
    pending: set[int] = field(default_factory=set)
    inline: bool = False  # host copies the step's forward pass waits for (already promoted)
    seconds: float = 0.0  # the workers' measured transfer time of its blocks so far


@dataclass
class StepOps:
    stores: list[Transfer] = field(default_factory=list)
    loads: list[Transfer] = field(default_factory=list)
    deletes: list[bytes] = field(default_factory=list)
    probes: list[tuple[int, list[bytes]]] = field(default_factory=list)  # (op id, keys)


class TieredCache:
    """The host and disk tier indexes, the ops of the current step, and transfer tracking."""

    def __init__(self, setup: TierSetup, block_size: int,
                 clock: Callable[[], float] = time.monotonic,
                 policy: LoadPolicy | None = None) -> None:
        self.block_bytes = setup.block_bytes
        # what a lower tier holds and moves per block: their usage, transfers and prices
        self.tier_block_bytes = setup.tier_block_bytes or setup.block_bytes
        self.write_through = setup.write_policy == "write_through"
        self.clock = clock
        self.policy = policy or make_load_policy(setup.load_policy, block_size,
                                                 self.tier_block_bytes, setup.cost)
        self.tiers: dict[str, TierIndex] = {}
        if setup.num_host_blocks > 0:
            self.tiers["host"] = TierIndex("host", setup.num_host_blocks)
        if setup.num_disk_blocks > 0:
            self.tiers["disk"] = TierIndex("disk", setup.num_disk_blocks)
            self.load_disk_index(setup.disk_keys)
        if setup.remote:  # what this engine knows the shared store holds (it may forget)
            self.tiers["remote"] = TierIndex("remote", REMOTE_INDEX_KEYS)
        self.remote_up = True
        self._remote_retry_at = 0.0  # while down: when a probe may try the store again
        self.remote_errors: dict[str, int] = {}
        self._probes: dict[int, tuple[str, list[bytes]]] = {}  # op id -> (seq id, keys)
        self._probed: list[str] = []  # sequences whose probe answered, for probes_done
        self.ops = StepOps()
        self._inflight: dict[int, Transfer] = {}
        self._seq_loads: dict[str, _SeqLoad] = {}
        self._written: list[tuple[bytes, int]] = []  # write-through: computed last step
        self._persist: list[tuple[bytes, int]] = []  # to save at once (retention, long pins)
        self._next_op = 1
        self._writes = dict.fromkeys(DURABLE_TIERS, 0)  # writes in flight per tier
        self._dirty: dict[bytes, None] = {}  # host keys without a disk copy (with a disk tier)
        self.disk_writable = setup.disk_writable
        # durability: device blocks computed here and not on disk yet (key -> block, most
        # recently used last), written by checkpoints; see ``_checkpoint``
        self._unsaved: OrderedDict[bytes, int] = OrderedDict()
        self.checkpoint_interval_s = setup.checkpoint_interval_s
        self._last_checkpoint = clock()
        self._checkpoint_keys: list[bytes] | None = None  # the pass under way, MRU first
        self._checkpoint_pos = 0  # how far that pass has come
        self._final = False  # shutting down: write everything
        self.hit_tokens = dict.fromkeys(LOWER_TIERS, 0)
        self.transfer_bytes: dict[str, int] = {}
        self.load_seconds: list[float] = []  # drained by snapshot()
        self.transfer_seconds: list[float] = []  # likewise
        self.corrupt_files = 0

    # ------------------------------------------------------------------ set-up
    def load_disk_index(self, keys: Sequence[bytes]) -> None:
        """Rebuild the disk index from the worker's start-up scan (oldest first)."""
        disk = self.tiers.get("disk")
        if disk is None:
            return
        disk.reset()
        for key in keys:
            disk.insert_ready(key)

    def reset(self) -> None:
        """The worker died: every transfer is void and the host tier's bytes are gone."""
        self._inflight.clear()
        self._seq_loads.clear()
        self._written.clear()
        self._persist.clear()
        self._writes = dict.fromkeys(DURABLE_TIERS, 0)
        self._probes.clear()
        self._probed.clear()
        self._dirty.clear()
        self._unsaved.clear()
        self._checkpoint_keys = None
        self.ops = StepOps()
        for tier in self.tiers.values():
            tier.reset()

    # ------------------------------------------------------------------ queries
    @property
    def num_inflight(self) -> int:
        return len(self._inflight) + len(self._probes)

    def is_loading(self, seq_id: str) -> bool:
        """Staged loads into the sequence's blocks are in flight (inline ones don't count:
        they are ordered before any later use of the blocks)."""
        sl = self._seq_loads.get(seq_id)
        return sl is not None and not sl.inline

    def usage_bytes(self) -> dict[str, int]:
        return {name: len(t) * self.tier_block_bytes for name, t in self.tiers.items()}

    def snapshot(self) -> dict[str, Any]:
        """The tier metrics: usage now, counters since start, load times since the last call
        (keys of ``protocol.metrics.ENGINE_METRICS``)."""
        seconds, self.load_seconds = self.load_seconds, []
        moved, self.transfer_seconds = self.transfer_seconds, []
        remote_up = "remote" in self.tiers and self.remote_up
        return dict(kv_tier_usage_bytes=self.usage_bytes(),
                    kv_tier_hit_tokens=dict(self.hit_tokens),
                    kv_tier_transfer_bytes=dict(self.transfer_bytes),
                    kv_tier_load_seconds=seconds, kv_tier_transfer_seconds=moved,
                    kv_disk_corrupt_files=self.corrupt_files,
                    kv_remote_errors=dict(self.remote_errors),
                    kv_remote_up=1.0 if remote_up else 0.0,
                    kv_tier_bandwidth={name: bandwidth for name, bandwidth
                                       in self.policy.numbers.bandwidth.items()
                                       if name in self.tiers},
                    kv_prefill_rate=self.policy.numbers.prefill_tokens_per_s)

    # ------------------------------------------------------------------ stores
    def begin_step(self, idle: bool = False) -> None:
        """Start a new step's op lists; write-through blocks computed last step go first
        (their device blocks are intact until this step's forward pass); then host flushes
        (all of them while the engine is ``idle``)."""
        self.ops = StepOps()
        written, self._written = self._written, []
        for key, block in written:
            for name in LOWER_TIERS:
                self._store(key, "device", block, name)
        persist, self._persist = self._persist, []
        for key, block in persist:
            if not self._save(key, block, self._durable(), via_host=False):
                self._persist.append((key, block))  # no room in flight now: next step
        self._flush_host(idle or self._final)
        self._checkpoint(idle)

    def needs_flush(self) -> bool:
        """Cached blocks (host or device) still lack their durable copies: an idle engine
        keeps stepping to write them."""
        return (bool(self._dirty) and self._writable("disk")) or (
            bool(self._unsaved) and bool(self._durable()))

    def begin_final_flush(self) -> None:
        """Shutting down: from the next step on, every cached block goes to disk (most
        recently used first); the engine steps while ``needs_flush``."""
        self._final = True

    def _writable(self, name: str) -> bool:
        """Whether tier ``name`` takes stores now (present, on; disk: not read-only; remote:
        its store answers)."""
        tier = self.tiers.get(name)
        if tier is None or not tier.enabled:
            return False
        return {"disk": self.disk_writable, "remote": self.remote_up}.get(name, True)

    def _durable(self) -> list[str]:
        """The durable tiers that take writes now."""
        return [name for name in DURABLE_TIERS if self._writable(name)]

    def _checkpoint(self, idle: bool) -> None:
        """Give device blocks their durable copies (disk, remote), most recently used first:
        while the engine is idle or shutting down all of them; while busy, every
        ``checkpoint_interval_s``, the ones unsaved when the interval ran out (so ``kill
        -9`` loses at most about that window). A pass covers the blocks unsaved when it
        began, over as many steps as the writes take, ``MAX_DISK_WRITES_IN_FLIGHT`` at a
        time, and gives each tier at most its capacity (older blocks would only push out
        newer ones); blocks in host reach disk with host's flush. While the load policy
        finds a remote read slower than recomputing, a busy engine writes nothing there (no
        replica would load it; idle and shutdown passes still do, and keep the link
        measured)."""
        durable = self._durable()
        if not (idle or self._final):  # busy: a remote copy only where it could be loaded
            durable = [n for n in durable if n != "remote" or self.policy.pays_off(n)]
        if not durable:
            return
        now = self.clock()
        if self._checkpoint_keys is None and not self._start_checkpoint(idle, now, durable):
            return
        keys = self._checkpoint_keys
        assert keys is not None
        while self._checkpoint_pos < len(keys):
            i = self._checkpoint_pos  # the key's rank from the most recently used end
            block = self._unsaved.get(keys[i])
            names = [n for n in durable if i < self.tiers[n].num_slots]
            if block is not None and names and not self._save(keys[i], block, names):
                return  # the tiers take no more now: the pass goes on next step
            self._checkpoint_pos += 1
        self._checkpoint_keys = None
        self._last_checkpoint = now

    def _start_checkpoint(self, idle: bool, now: float, durable: list[str]) -> bool:
        """Begin a pass over the unsaved blocks, most recently used first (False: none is
        due). Blocks older than the largest tier holds are dropped: writing them would only
        push out the more recent ones written before them."""
        if not self._unsaved:
            return False
        if not (idle or self._final) and now - self._last_checkpoint < self.checkpoint_interval_s:
            return False
        keys = list(reversed(self._unsaved))
        capacity = max(self.tiers[name].num_slots for name in durable)
        for key in keys[capacity:]:
            self._unsaved.pop(key, None)
        self._checkpoint_keys, self._checkpoint_pos = keys[:capacity], 0
        return True

    def _save(self, key: bytes, block: int, names: list[str], via_host: bool = True) -> bool:
        """Give device ``block`` (``key``) a copy in each tier of ``names``; False if one takes
        no more now (the copies made stay: retrying them is free). ``via_host``: a block in
        host reaches disk with host's flush."""
        host = self.tiers.get("host")
        for name in names:
            if via_host and name == "disk" and host is not None and key in host:
                continue  # host's flush writes it (or did)
            if not self._store(key, "device", block, name):
                return False
        self._unsaved.pop(key, None)
        return True

    def _flush_host(self, everything: bool) -> None:
        """Write-back from host without stalling a step: the coldest ``HOST_CLEAN_FRACTION``
        of host (``everything`` when idle) gets a disk copy in the background. The worker's
        I/O thread reads the block from the host pool, pinned meanwhile; the block stays in
        host, now clean: evicting it later costs nothing and loses nothing."""
        host = self.tiers.get("host")
        budget = MAX_DISK_WRITES_IN_FLIGHT - self._writes["disk"]
        if host is None or not self._dirty or not self._writable("disk") or budget <= 0:
            return
        if not everything and not self.policy.pays_off("disk"):
            return  # a disk copy would never be loaded: write only while idle (restarts)
        if everything:
            cold = [k for k in self._dirty if host.lookup([k])][:budget]
        else:
            cold = [k for k in _coldest(host) if k in self._dirty][:budget]
        for key in cold:
            slot = host.slot_of(key)
            assert slot is not None
            if not self._store(key, "host", slot, "disk"):
                return  # disk has no room now (everything there in flight) or is off
            del self._dirty[key]
            host.prepare_load([key])

    def take_ops(self) -> StepOps:
        ops, self.ops = self.ops, StepOps()
        return ops

    def miss_cost(self, blocks: int) -> float:
        """What ``blocks`` evicted from the device cost to get back, as a fraction of computing
        them again: a load from the first lower tier that keeps them (``on_device_evict``)
        and pays off; 1.0 when none would."""
        for name in LOWER_TIERS:
            if self._writable(name) and self.policy.pays_off(name):
                return self.policy.reload_fraction(name, blocks)
        return 1.0

    def on_device_evict(self, key: bytes, block: int) -> None:
        """Write-back: a cached device block is about to be reused; save it one tier down.
        A full host first drops its coldest clean block (one with a disk copy); with none,
        the block goes straight to disk (host's flush lags behind). While the load policy
        finds disk slower than recomputing, nothing is written to disk here: host drops its
        coldest block instead (an idle engine still flushes host to disk)."""
        unsaved = self._unsaved.pop(key, None) is not None
        if self.write_through:
            return  # already stored when it was computed
        if unsaved and self._writable("remote") and self.policy.pays_off("remote"):
            self._store(key, "device", block, "remote")  # the fleet's copy, besides a local one
        host = self.tiers.get("host")
        order = ("host", "disk")
        to_disk = self._writable("disk") and self.policy.pays_off("disk")
        if host is not None and key not in host and not host.num_free() and to_disk:
            clean = next((k for k in _coldest(host) if k not in self._dirty), None)
            if clean is None:
                order = ("disk", "host")
            else:
                host.evict(clean)
        for name in order:
            if (name == "host" or to_disk) and self._store(key, "device", block, name):
                return

    def on_computed(self, key: bytes, block: int, persist: bool = False) -> None:
        """``block`` (key ``key``) is computed in the step being planned: with write-through
        it is stored down next step; with write-back a checkpoint saves it later, unless
        ``persist`` asks for its durable copies next step."""
        if self.write_through and self.tiers:
            self._written.append((key, block))
        elif self._durable():
            self._unsaved[key] = block
            if persist:
                self._persist.append((key, block))

    def persist(self, key: bytes, block: int) -> None:
        """Give device ``block`` (``key``, computed already) its durable copies next step."""
        if self._durable():
            self._persist.append((key, block))

    def _store(self, key: bytes, src: str, src_slot: int, dst: str) -> bool:
        """Store ``key`` into tier ``dst`` (no-op if there); False when the tier is absent,
        off, or has no room (everything pinned or in flight)."""
        tier = self.tiers.get(dst)
        if tier is None or not tier.enabled:
            return False
        if key in tier:  # most evicted device blocks were loaded from host or stored before
            return True
        if not self._writable(dst):
            return False
        if dst in self._writes and self._writes[dst] >= MAX_DISK_WRITES_IN_FLIGHT:
            return False
        plan = tier.prepare_store([key])
        if plan is None:
            return False
        for old_key, old_slot in plan.evicted:
            self._on_tier_evict(dst, old_key, old_slot)
        for new_key, slot in plan.stored:
            self._add_op(self.ops.stores, new_key, src, src_slot, dst, slot)
        return True

    def _on_tier_evict(self, tier: str, key: bytes, slot: int) -> None:
        """A store evicted ``key`` from ``tier``. From host it is not written down now (that
        would copy it on the step's path, its slot being reused this step): the background
        flush (``_flush_host``) gave cold host blocks their disk copies already."""
        if tier == "disk":
            self.ops.deletes.append(key)
        elif tier == "host":
            self._dirty.pop(key, None)
        # remote: only forgotten here (the shared store evicts by its own TTL and memory)

    def _add_op(self, out: list[Transfer], key: bytes, src: str, src_slot: int, dst: str,
                dst_slot: int, seq_id: str | None = None) -> Transfer:
        op = Transfer(self._next_op, key, src, src_slot, dst, dst_slot, seq_id)
        self._next_op += 1
        if dst in self._writes:
            self._writes[dst] += 1
        self._inflight[op.op_id] = op
        out.append(op)
        return op

    # ------------------------------------------------------------------ loads
    def touch(self, keys: Sequence[bytes]) -> None:
        """Mark ``keys`` recently used in every tier that holds them."""
        for tier in self.tiers.values():
            tier.touch(keys)
        for key in keys:
            if key in self._unsaved:
                self._unsaved.move_to_end(key)

    def plan_loads(self, keys: Sequence[bytes], busy: bool = True) -> list[str]:
        """The tier to load each of the leading ``keys`` from (host if there, else disk; what
        follows a miss is unusable), cut where the load policy says recomputing is faster.
        ``keys`` follow the device hit; ``busy``: other sequences run."""
        runs: list[tuple[str, int]] = []
        for key in keys:  # each block from the nearest tier that has it, up to a miss
            name = next((n for n in LOWER_TIERS if n in self.tiers
                         and self.tiers[n].lookup([key])), None)
            if name is None:
                break
            if runs and runs[-1][0] == name:
                runs[-1] = (name, runs[-1][1] + 1)
            else:
                runs.append((name, 1))
        total = self.policy.blocks_to_load(runs, busy) if runs else 0
        out: list[str] = []
        for name, n in runs:
            out.extend([name] * min(n, total - len(out)))
        return out

    def pin_loads(self, keys: Sequence[bytes], tiers: Sequence[str]) -> list[int]:
        """Pin the entries to load (before allocating device blocks, whose evictions could
        otherwise push them out); returns their slots."""
        return [self.tiers[name].prepare_load([key])[0]
                for key, name in zip(keys, tiers, strict=True)]

    @staticmethod
    def loads_inline(tiers: Sequence[str]) -> bool:
        """Whether loads from ``tiers`` can feed the step that issues them: host copies go
        before the step's forward pass on the worker (on CUDA each layer waits for its
        copies) and cannot fail; a disk read completes in a later step."""
        return all(name == "host" for name in tiers)

    def start_loads(self, seq_id: str, keys: Sequence[bytes], tiers: Sequence[str],
                    slots: Sequence[int], dst_blocks: Sequence[int],
                    inline: bool = False) -> None:
        """Emit one load op per pinned block, in block order. Inline loads (host only, the
        caller treats them as done) are tracked only to time them; ``loads_done`` reports
        the others."""
        ops = [self._add_op(self.ops.loads, key, name, slot, "device", block, seq_id)
               for key, name, slot, block in zip(keys, tiers, slots, dst_blocks, strict=True)]
        ids = [op.op_id for op in ops]
        assert not inline or self.loads_inline(tiers)
        self._seq_loads[seq_id] = _SeqLoad(ids, list(tiers), self.clock(), pending=set(ids),
                                           inline=inline)

    def loads_done(self) -> list[tuple[str, int, list[str]]]:
        """Sequences whose (staged) loads all completed: (seq id, blocks loaded before the
        first failure, tier of each block). Forgets them, and finished inline loads."""
        out = []
        for seq_id, sl in list(self._seq_loads.items()):
            if sl.pending:
                continue
            del self._seq_loads[seq_id]
            self.load_seconds.append(self.clock() - sl.started)
            self.transfer_seconds.append(sl.seconds)
            if sl.inline:
                continue
            good = len(sl.op_ids) if sl.failed_at is None else sl.failed_at
            out.append((seq_id, good, sl.tiers[:good]))
        return out

    # ------------------------------------------------------------------ remote probes
    def wants_probe(self, keys: Sequence[bytes]) -> bool:
        """Whether asking the remote store about ``keys`` (a prompt's blocks after its local
        hits) could find more: the first key is not known there, and the store is up (while
        it is down, a probe tries it again every ``REMOTE_RETRY_S``)."""
        remote = self.tiers.get("remote")
        if not keys or remote is None or keys[0] in remote:
            return False
        return self.remote_up or self.clock() >= self._remote_retry_at

    def start_probe(self, seq_id: str, keys: Sequence[bytes]) -> None:
        """Ask the worker how many leading ``keys`` the remote store holds (``probes_done``
        reports ``seq_id`` once it answered)."""
        op_id = self._next_op
        self._next_op += 1
        if not self.remote_up:  # a retry: the next one after the interval
            self._remote_retry_at = self.clock() + REMOTE_RETRY_S
        self._probes[op_id] = (seq_id, list(keys))
        self.ops.probes.append((op_id, list(keys)))

    def is_probing(self, seq_id: str) -> bool:
        """A probe for ``seq_id`` is in flight, or answered and not yet collected."""
        return seq_id in self._probed or any(sid == seq_id for sid, _ in self._probes.values())

    def apply_probed(self, op_id: int, found: int, error_kind: str | None = None) -> None:
        """The store holds the leading ``found`` keys of the probe: remember them as ready."""
        probe = self._probes.pop(op_id, None)
        if probe is None:
            return  # from before a reset
        seq_id, keys = probe
        if error_kind is not None:
            self.remote_errors[error_kind] = self.remote_errors.get(error_kind, 0) + 1
        remote = self.tiers["remote"]
        for key in keys[:found]:
            if key not in remote and not remote.insert_ready(key):
                cold = next(remote.cold_keys(), None)
                if cold is None or not remote.evict(cold) or not remote.insert_ready(key):
                    break
        self._probed.append(seq_id)

    def probes_done(self) -> list[str]:
        done, self._probed = self._probed, []
        return done

    def set_remote_up(self, up: bool | None) -> None:
        """The worker's view of the store (None: it sent none this step). It says down on
        every step until an op succeeds: the retry interval starts when the store goes down
        and with each probe (``start_probe``), not again with each step's report, or a busy
        engine would never probe it again."""
        if up is None:
            return
        if not up and self.remote_up:
            # what was unsaved stays unsaved: the next checkpoint after it is back writes it
            self._remote_retry_at = self.clock() + REMOTE_RETRY_S
            self._checkpoint_keys = None
        self.remote_up = up

    def count_hits(self, tiers: Sequence[str], block_size: int) -> None:
        for name in tiers:
            self.hit_tokens[name] += block_size

    # ------------------------------------------------------------------ completions
    def apply_done(self, op_id: int, ok: bool, error: str | None,
                   seconds: float = 0.0, error_kind: str | None = None) -> None:
        """Apply one ``KVDone``: complete the store or load in its tier index; the measured
        time of every transfer feeds the load policy's bandwidth estimate of its tier."""
        op = self._inflight.pop(op_id, None)
        if op is None:
            return  # from before a reset
        if error_kind is not None:
            self.remote_errors[error_kind] = self.remote_errors.get(error_kind, 0) + 1
        if op.dst == "device":
            self._load_done(op, ok, seconds)
            if ok:
                self.policy.observe_transfer(op.src, self.tier_block_bytes, seconds)
        else:
            self.tiers[op.dst].complete_store(op.key, ok)
            if op.dst in self._writes:
                self._writes[op.dst] -= 1
            if not ok and op.dst == "disk":
                self._read_only(error)
            elif ok:  # a link is about as fast both ways (a disk: writes as reads)
                self.policy.observe_transfer(op.dst, self.tier_block_bytes, seconds)
            if op.dst == "host" and ok and self._writable("disk") \
                    and op.key not in self.tiers["disk"]:
                self._dirty[op.key] = None
            if op.src == "host":  # a flush: the host entry stays, clean unless it failed
                self.tiers["host"].complete_load(op.key, True)
                if not ok and self._writable("disk"):
                    self._dirty[op.key] = None
        if ok:
            route = f"{op.src}>{op.dst}"
            self.transfer_bytes[route] = self.transfer_bytes.get(route, 0) \
                + self.tier_block_bytes

    def _load_done(self, op: Transfer, ok: bool, seconds: float) -> None:
        self.tiers[op.src].complete_load(op.key, ok)
        sl = self._seq_loads.get(op.seq_id or "")
        if sl is None:
            return
        sl.pending.discard(op.op_id)
        sl.seconds += seconds
        if not ok:
            if sl.inline:  # its tokens were already computed from this block
                logger.error("a host KV copy failed after its step ran: %s", op.key.hex())
            idx = sl.op_ids.index(op.op_id)
            sl.failed_at = idx if sl.failed_at is None else min(sl.failed_at, idx)

    def _read_only(self, error: str | None) -> None:
        """A disk write failed (disk full, read-only, I/O error): store nothing more there;
        the blocks on it still load."""
        if self.disk_writable:
            self.disk_writable = False
            self._unsaved.clear()
            self._dirty.clear()
            logger.warning("the disk KV tier is read-only from now on: %s",
                           error or "write failed")

    # ------------------------------------------------------------------ invariants
    def check_integrity(self) -> None:
        """Each tier index is sound; pins and storing entries match the transfers in flight."""
        pins: dict[tuple[str, bytes], int] = {}
        storing: set[tuple[str, bytes]] = set()
        for op in self._inflight.values():
            if op.dst == "device" or op.src == "host":  # loads, and host -> disk flushes
                pins[(op.src, op.key)] = pins.get((op.src, op.key), 0) + 1
            if op.dst != "device":
                storing.add((op.dst, op.key))
        for name in DURABLE_TIERS:
            writes = sum(1 for op in self._inflight.values() if op.dst == name)
            if writes != self._writes[name]:
                raise AssertionError(f"{self._writes[name]} {name} writes counted, {writes} "
                                     "in flight")
        if self._dirty and not set(self._dirty) <= set(self.tiers["host"].lru_order()):
            raise AssertionError("a dirty key is not in host")
        for name, tier in self.tiers.items():
            tier.check_integrity()
            busy = {k for (t, k) in pins if t == name} | {k for (t, k) in storing if t == name}
            if tier.num_busy() != len(busy):
                raise AssertionError(f"tier {name}: {tier.num_busy()} busy entries but "
                                     f"{len(busy)} keys with transfers in flight")


def _coldest(host: TierIndex) -> Iterator[bytes]:
    """The coldest ``HOST_CLEAN_FRACTION`` of host's evictable keys (the part kept clean)."""
    return islice(host.cold_keys(), int(host.num_slots * HOST_CLEAN_FRACTION))
