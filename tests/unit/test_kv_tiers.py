"""Host/disk KV tiers in the engine (no model): tier index, load policy, scheduler + fake worker.

The fake worker holds real (fake) KV per block; host slots and disk files copy it. A wrong
slot, a load of a block whose store never completed, or a stale block changes the sampled
tokens, so every test compares against ``reference_tokens`` and ends with a leak check.
"""

from __future__ import annotations

import msgspec
import pytest

from encore.configs.types import CacheConfig, SchedulerConfig
from encore.kvmanager.cost import AlwaysLoad, CostLoad, CostNumbers
from encore.kvmanager.tiered import TierSetup
from encore.kvmanager.tiers import TierIndex
from encore.scheduler.request import SeqStatus
from encore.scheduler.scheduler import Scheduler
from tests.unit.fake_worker import FakeWorker, Run, make_request, reference_tokens, run_all, step

BS = 4


# ----------------------------------------------------------------------------- TierIndex
def test_tier_index_two_phase_store_lru_and_pins() -> None:
    t = TierIndex("host", 2)
    plan = t.prepare_store([b"a", b"b"])
    assert plan is not None and plan.stored == [(b"a", 0), (b"b", 1)] and plan.evicted == []
    assert t.lookup([b"a"]) == 0, "a block is loadable only after its store completed"
    assert t.prepare_store([b"c"]) is None, "storing entries are never evicted"
    t.complete_store(b"a", ok=True)
    t.complete_store(b"b", ok=False)  # a failed store disappears
    assert t.lookup([b"a", b"b"]) == 1 and b"b" not in t
    assert t.prepare_load([b"a"]) == [0]
    plan = t.prepare_store([b"c", b"d"])
    assert plan is None, "a pinned entry is not evicted; all or nothing"
    t.complete_load(b"a")
    plan = t.prepare_store([b"c", b"d"])
    assert plan is not None and plan.evicted == [(b"a", 0)]
    assert sorted(s for _, s in plan.stored) == [0, 1]
    t.check_integrity()
    for k in (b"c", b"d"):
        t.complete_store(k, ok=True)
    t.touch([b"c"])
    assert t.lru_order() == [b"d", b"c"]
    assert t.prepare_store([b"c"]) is not None  # already present: nothing to do
    t.check_integrity()
    assert t.num_busy() == 0


def test_failed_load_drops_the_entry() -> None:
    t = TierIndex("disk", 4)
    t.insert_ready(b"k")
    t.prepare_load([b"k"])
    t.complete_load(b"k", ok=False)
    assert b"k" not in t
    t.check_integrity()


# ----------------------------------------------------------------------------- load policy
def test_cost_policy_loads_only_when_faster_than_recompute() -> None:
    numbers = CostNumbers(bandwidth={"host": 1e9, "disk": 1e8},
                          latency_s={"host": 0.0, "disk": 0.001},
                          prefill_tokens_per_s=1000.0, step_s=0.01)
    policy = CostLoad(block_size=16, block_bytes=1_000_000, numbers=numbers)
    # one 16-token block: recompute 16 ms; load 1 ms copy (in the step that computes) -> load
    assert policy.blocks_to_load([("host", 1)]) == 1
    # from disk: 10 ms step + 1 ms + 10 ms read = 21 ms > 16 ms -> recompute
    assert policy.blocks_to_load([("disk", 1)]) == 0
    # a long disk run pays off: 10 blocks = 160 ms of prefill vs 111 ms of reading
    assert policy.blocks_to_load([("disk", 10)]) == 10
    # host run worth it, disk tail not: load only the host part
    slow = CostNumbers(bandwidth={"host": 1e9, "disk": 1e7}, latency_s={"host": 0.0, "disk": 0},
                       prefill_tokens_per_s=1000.0, step_s=0.01)
    policy = CostLoad(16, 1_000_000, slow)
    assert policy.blocks_to_load([("host", 4), ("disk", 4)]) == 4
    # a block read in 100 ms never beats its 16 ms recompute: disk copies would not pay off
    assert policy.pays_off("host") and not policy.pays_off("disk")
    assert CostLoad(16, 1_000_000, numbers).pays_off("disk")  # 10 ms a block
    # a pin's miss reloads from host in 1 ms of every 16 ms of prefill; disk is capped at 1
    assert policy.reload_fraction("host", 4) == pytest.approx(1 / 16)
    assert policy.reload_fraction("disk", 4) == 1.0
    numbers.step_s = 1.0  # a step is slow: waiting for it never beats a short recompute
    assert CostLoad(16, 1_000_000, numbers).blocks_to_load([("disk", 4)]) == 0
    # host loads wait for no step: only a link slower than prefill makes them lose
    assert CostLoad(16, 1_000_000, numbers).blocks_to_load([("host", 4)]) == 4
    numbers.bandwidth["host"] = 1e7  # 100 ms a block vs 16 ms of prefill
    assert CostLoad(16, 1_000_000, numbers).blocks_to_load([("host", 4)]) == 0
    assert AlwaysLoad(16, 1).blocks_to_load([("host", 2), ("disk", 3)]) == 5


# ----------------------------------------------------------------------------- scheduler
def make(num_blocks: int, host: int = 0, disk: int = 0, *, policy: str = "write_back",
         disk_keys: tuple[bytes, ...] = (), budget: int = 64, max_num_seqs: int = 8,
         clock=None, **setup_kw) -> tuple[Scheduler, FakeWorker]:
    setup = TierSetup(block_bytes=1024, num_host_blocks=host, num_disk_blocks=disk,
                      disk_keys=disk_keys, write_policy=policy, load_policy="always",
                      **setup_kw)
    sched = Scheduler.build(
        CacheConfig(block_size=BS),
        SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=budget),
        num_device_blocks=num_blocks, max_model_len=256, tiers=setup,
        **({"clock": clock} if clock is not None else {}))
    return sched, FakeWorker(num_blocks, BS)


def prompts(n: int, length: int = 24) -> list[list[int]]:
    return [[(100 * i + j) % 997 + 1 for j in range(length)] for i in range(n)]


def serve_one(sched: Scheduler, worker: FakeWorker, rid: str, prompt: list[int]):
    assert sched.add_request(make_request(rid, prompt, max_tokens=3)) == []
    run = run_all(sched, worker)
    assert_clean(sched)
    return run.tokens[(rid, 0)], run.finals[(rid, 0)]


def assert_clean(sched: Scheduler) -> None:
    """No block leaked in any tier; nothing pinned or in flight once idle."""
    sched.check_integrity()
    assert not sched.has_unfinished() and not sched.loading
    assert sched.kv.usage == 0.0
    tiers = sched.kv.tiers
    assert tiers is not None and tiers.num_inflight == 0
    for t in tiers.tiers.values():
        t.check_integrity()
        assert t.num_busy() == 0


def fill(sched: Scheduler, worker: FakeWorker, ps: list[list[int]]) -> None:
    for i, p in enumerate(ps):
        tokens, _ = serve_one(sched, worker, f"fill{i}", p)
        assert tokens == reference_tokens(p, 3)


def test_evicted_blocks_come_back_from_host() -> None:
    """Fill a 12-block device pool past capacity; the first prompt's blocks return from host."""
    sched, worker = make(num_blocks=13, host=32)
    ps = prompts(6)
    fill(sched, worker, ps)
    stats = sched.stats()
    assert stats["kv_tier_transfer_bytes"].get("device>host", 0) > 0
    tokens, final = serve_one(sched, worker, "again", ps[0])
    assert tokens == reference_tokens(ps[0], 3)
    assert final.num_cached_tokens == 20  # 5 full blocks of the 24-token prompt (1 token left)
    stats = sched.stats()
    assert stats["kv_tier_hit_tokens"]["host"] == 20
    assert stats["kv_tier_transfer_bytes"]["host>device"] == 5 * 1024
    assert len(stats["kv_tier_load_seconds"]) == 1
    assert len(stats["kv_tier_transfer_seconds"]) == 1


def test_host_hit_is_computed_in_the_step_that_loads_it() -> None:
    """No WAITING_FOR_KV for a host hit: the step that copies its blocks (before the forward
    pass) already computes the rest of the prompt and samples the first token."""
    sched, worker = make(num_blocks=13, host=32)
    ps = prompts(6)
    fill(sched, worker, ps)
    sched.add_request(make_request("again", ps[0], max_tokens=3))
    run = Run()
    step(sched, worker, run)
    first = run.steps[0]
    assert len(first.kv_loads) == 5 and not sched.loading
    (seq,) = first.seqs
    assert (seq.start_pos, len(seq.token_ids)) == (20, 4)
    assert len(run.tokens[("again", 0)]) == 1, "the first token came from that step"
    run_all(sched, worker, run)
    assert run.tokens[("again", 0)] == reference_tokens(ps[0], 3)
    assert_clean(sched)


def test_host_blocks_get_disk_copies_in_the_background() -> None:
    """With a disk tier, cold host blocks are written to disk from the host pool (pinned
    meanwhile) and stay in host; an idle engine writes the rest. A full host then makes room
    by dropping a clean block, and nothing is lost. (The prompts arrive together: an idle
    engine would checkpoint their device blocks to disk before they reach host.)"""
    sched, worker = make(num_blocks=13, host=8, disk=64, max_num_seqs=1)
    ps = prompts(6)
    for i, p in enumerate(ps):
        assert sched.add_request(make_request(f"fill{i}", p, max_tokens=3)) == []
    run = run_all(sched, worker)
    assert all(run.tokens[(f"fill{i}", 0)] == reference_tokens(p, 3) for i, p in enumerate(ps))
    host = sched.kv.tiers.tiers["host"]
    assert len(host) == 8 and set(host.lru_order()) <= set(worker.disk)
    assert sched.stats()["kv_tier_transfer_bytes"].get("host>disk", 0) > 0
    for i, p in enumerate(ps):  # every prompt's blocks are still somewhere below the device
        tokens, final = serve_one(sched, worker, f"again{i}", p)
        assert tokens == reference_tokens(p, 3)


def test_disk_slower_than_recompute_is_written_only_while_idle() -> None:
    """While the load policy finds a disk read slower than recomputing the block, a busy
    engine writes nothing to disk (a full host drops its coldest block: its disk copy would
    never be loaded); an idle engine still gives host blocks disk copies (for restarts)."""
    sched, worker = make(num_blocks=13, host=8, disk=64)
    tiers = sched.kv.tiers
    slow_disk = CostNumbers(bandwidth={"host": 1e9, "disk": 1e3}, prefill_tokens_per_s=1e3)
    tiers.policy = CostLoad(BS, 1024, slow_disk)
    assert tiers.policy.pays_off("host") and not tiers.policy.pays_off("disk")
    busy = Run()
    for i, p in enumerate(prompts(6)):
        sched.add_request(make_request(f"r{i}", p, max_tokens=3))
        while sched.has_unfinished():
            step(sched, worker, busy)
    assert any(op.dst == "host" for s in busy.steps for op in s.kv_stores)
    assert not any(op.dst == "disk" for s in busy.steps for op in s.kv_stores)
    assert not worker.disk and tiers.needs_flush()
    run_all(sched, worker)  # idle: host is flushed
    assert set(tiers.tiers["host"].lru_order()) <= set(worker.disk)
    assert_clean(sched)


def test_slot_runs() -> None:
    from encore.worker.tiers.host_pool import slot_runs

    assert slot_runs([3, 4, 5, 9, 10, 2]) == [(0, 3, 3), (3, 9, 2), (5, 2, 1)]
    assert slot_runs([]) == []


def test_disk_tier_behind_a_small_host_and_slow_disk() -> None:
    """Host holds 4 blocks; evicted host blocks go to disk; disk loads take 3 steps, during
    which the request waits in WAITING_FOR_KV while another request keeps decoding."""
    sched, worker = make(num_blocks=13, host=4, disk=64)
    worker.disk_delay = 3
    ps = prompts(6)
    fill(sched, worker, ps)
    assert worker.disk, "host evictions were written back to disk"
    sched.add_request(make_request("busy", prompts(9)[8][:8], max_tokens=12))
    step(sched, worker)
    sched.add_request(make_request("again", ps[0], max_tokens=3))
    seen_waiting = False
    outputs = []
    tiers = sched.kv.tiers
    while sched.has_unfinished() or tiers.num_inflight or tiers.needs_flush():
        statuses = {s.seq_id: s.status for s in sched._seqs.values()}
        if statuses.get("again#0") is SeqStatus.WAITING_FOR_KV:
            seen_waiting = True
            assert statuses.get("busy#0") is SeqStatus.RUNNING
        outputs += step(sched, worker)
    worker.execute(sched.schedule())
    assert seen_waiting
    got = [t for o in outputs if o.request_id == "again" for t in o.new_token_ids]
    assert got == reference_tokens(ps[0], 3)
    final = [o for o in outputs if o.request_id == "again" and o.finish_reason][0]
    assert final.num_cached_tokens == 20
    assert sched.stats()["kv_tier_hit_tokens"].get("disk", 0) > 0
    assert_clean(sched)


def test_corrupt_disk_block_is_a_miss_and_recomputed() -> None:
    sched, worker = make(num_blocks=13, disk=64)
    ps = prompts(6)
    fill(sched, worker, ps)
    keys = sched.kv.hasher.prefix_keys(ps[0], BS, None)
    assert all(k in worker.disk for k in keys[:5])
    worker.corrupt.add(keys[2])
    tokens, final = serve_one(sched, worker, "again", ps[0])
    assert tokens == reference_tokens(ps[0], 3)
    assert final.num_cached_tokens == 8  # blocks 0 and 1 loaded; 2 failed; the rest recomputed
    stats = sched.stats()
    assert stats["kv_disk_corrupt_files"] == 1
    disk = sched.kv.tiers.tiers["disk"]
    assert keys[2] not in worker.corrupt, "the bad file is gone"
    assert keys[2] in disk and keys[2] in worker.disk, "the recomputed block was saved again"
    assert set(disk.lru_order()) == set(worker.disk), "the index and the files agree"


def test_abort_while_loading_frees_blocks_after_the_load() -> None:
    sched, worker = make(num_blocks=13, disk=64)
    worker.disk_delay = 2
    ps = prompts(6)
    fill(sched, worker, ps)
    sched.add_request(make_request("gone", ps[0], max_tokens=3))
    step(sched, worker)
    assert sched.loading
    sched.abort(["gone"])
    assert sched.kv.usage > 0, "blocks stay held while the disk read is in flight"
    run_all(sched, worker)
    assert_clean(sched)


def test_a_full_disk_becomes_read_only_without_errors() -> None:
    """A failed write (disk full) stops further writes; what the disk holds still loads."""
    sched, worker = make(num_blocks=13, disk=64)
    ps = prompts(6)
    fill(sched, worker, ps)
    worker.full = True
    fill(sched, worker, prompts(12)[6:])
    assert not sched.kv.tiers.disk_writable and not sched.kv.tiers.needs_flush()
    tokens, final = serve_one(sched, worker, "again", ps[0])
    assert tokens == reference_tokens(ps[0], 3) and final.finish_reason == "length"
    assert final.num_cached_tokens > 0, "blocks written before the disk filled up still load"


def test_write_through_stores_every_computed_block() -> None:
    sched, worker = make(num_blocks=64, host=32, disk=64, policy="write_through")
    p = prompts(1)[0]
    serve_one(sched, worker, "a", p)
    keys = sched.kv.hasher.prefix_keys(p, BS, None)
    host = sched.kv.tiers.tiers["host"]
    assert all(k in host for k in keys) and all(k in worker.disk for k in keys)


def test_tenant_salts_never_share_tier_blocks() -> None:
    sched, worker = make(num_blocks=13, host=64)
    p = prompts(1)[0]
    assert sched.add_request(make_request("a", p, max_tokens=3, cache_salt="A")) == []
    run_all(sched, worker)
    fill(sched, worker, prompts(7)[1:])  # push tenant A's blocks out to host
    assert sched.add_request(make_request("b", p, max_tokens=3, cache_salt="B")) == []
    run = run_all(sched, worker)
    assert run.finals[("b", 0)].num_cached_tokens == 0
    assert_clean(sched)


def test_disk_index_rebuilt_from_worker_keys() -> None:
    sched, worker = make(num_blocks=13, disk=64)
    ps = prompts(6)
    fill(sched, worker, ps)
    keys = list(worker.disk)
    restarted, worker2 = make(num_blocks=13, disk=64, disk_keys=tuple(keys))
    worker2.disk = dict(worker.disk)
    tokens, final = serve_one(restarted, worker2, "again", ps[0])
    assert tokens == reference_tokens(ps[0], 3) and final.num_cached_tokens == 20


@pytest.mark.parametrize("host,disk", [(8, 0), (0, 16), (4, 16)])
def test_random_workload_keeps_every_invariant(host: int, disk: int) -> None:
    import random

    rng = random.Random(host * 100 + disk)
    sched, worker = make(num_blocks=11, host=host, disk=disk, budget=16, max_num_seqs=4)
    worker.disk_delay = 1
    base = prompts(5, 16)
    expected = {}
    run = Run()
    for i in range(30):
        p = rng.choice(base)[: rng.randrange(6, 16)] + [rng.randrange(1, 900)]
        rid = f"r{i}"
        sched.add_request(make_request(rid, p, max_tokens=3))
        expected[rid] = reference_tokens(p, 3)
        for _ in range(rng.randrange(0, 3)):
            step(sched, worker, run)
        if rng.random() < 0.1:
            run.collect(sched.abort([rid]))
            expected.pop(rid)
    run_all(sched, worker, run)
    for rid, want in expected.items():
        assert run.tokens[(rid, 0)] == want
    assert sched.stats()["prefix_hits"] > 0
    assert_clean(sched)


def test_worker_death_forgets_transfers_and_host_then_disk_index_is_rebuilt() -> None:
    sched, worker = make(num_blocks=13, host=4, disk=64)
    worker.disk_delay = 2
    ps = prompts(6)
    fill(sched, worker, ps)
    sched.add_request(make_request("inflight", ps[0], max_tokens=3))
    step(sched, worker)
    assert sched.loading
    outs = sched.fail_all("worker died")
    assert [o.finish_reason for o in outs] == ["error"]
    sched.check_integrity()
    tiers = sched.kv.tiers
    assert tiers.num_inflight == 0 and all(len(t) == 0 for t in tiers.tiers.values())
    fresh = FakeWorker(13, BS)
    fresh.disk = dict(worker.disk)
    tiers.load_disk_index(list(fresh.disk))
    tokens, final = serve_one(sched, fresh, "after", ps[0])
    assert tokens == reference_tokens(ps[0], 3) and final.num_cached_tokens > 0


def test_tiers_without_prefix_caching_are_refused() -> None:
    from encore.configs.fields import ConfigError

    with pytest.raises(ConfigError, match="enable_prefix_caching"):
        CacheConfig(enable_prefix_caching=False, host_cache_gib=1.0)


# ----------------------------------------------------------------------------- durability
def full_keys(sched: Scheduler, prompt: list[int]) -> list[bytes]:
    """Keys of the prompt's full blocks that a later request can hit (all but the last
    token's block)."""
    return sched.kv.hasher.prefix_keys(prompt, BS, None)[: (len(prompt) - 1) // BS]


def test_an_idle_engine_writes_its_device_blocks_to_disk() -> None:
    """Default write-back with only a disk tier: nothing is evicted, yet once the engine is
    idle every cached device block has a disk copy (the idle checkpoint)."""
    sched, worker = make(num_blocks=64, disk=64)
    p = prompts(1)[0]
    serve_one(sched, worker, "a", p)
    assert all(k in worker.disk for k in full_keys(sched, p))
    assert not sched.kv.tiers.needs_flush() and not sched.has_work()


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_busy_engine_checkpoints_every_interval() -> None:
    """While requests run, device blocks reach disk only once the checkpoint interval has
    passed (kill -9 loses at most that window), most recently used first."""
    clock = Clock()
    sched, worker = make(num_blocks=64, disk=64, clock=clock, checkpoint_interval_s=10.0)
    a, b = prompts(2)
    assert sched.add_request(make_request("a", a, max_tokens=3)) == []
    assert sched.add_request(make_request("long", b, max_tokens=40)) == []
    for _ in range(6):
        step(sched, worker)
    assert not worker.disk, "busy, interval not over: nothing written yet"
    clock.now = 10.0
    step(sched, worker)
    step(sched, worker)
    assert all(k in worker.disk for k in full_keys(sched, a))
    run_all(sched, worker)
    assert_clean(sched)


def test_shutdown_flush_writes_the_most_recent_blocks_first() -> None:
    """A disk smaller than the cache: the final flush keeps the most recently used blocks."""
    sched, worker = make(num_blocks=64, disk=6, checkpoint_interval_s=1e9)
    ps = prompts(3)
    for i, p in enumerate(ps):
        assert sched.add_request(make_request(f"r{i}", p, max_tokens=3)) == []
        run_all_busy = [step(sched, worker) for _ in range(3)]  # stay busy: no idle pass
        assert run_all_busy
    sched.abort([f"r{i}" for i in range(3)])
    sched.kv.tiers.begin_final_flush()
    run_all(sched, worker)
    on_disk = set(worker.disk)
    assert set(full_keys(sched, ps[2])) <= on_disk, "the newest prompt's blocks are kept"
    assert not set(full_keys(sched, ps[0])) & on_disk
    assert_clean(sched)


def test_a_read_only_disk_serves_loads_and_stores_nothing() -> None:
    sched, worker = make(num_blocks=13, disk=64)
    ps = prompts(6)
    fill(sched, worker, ps)
    saved = dict(worker.disk)
    ro, worker2 = make(num_blocks=13, disk=64, disk_keys=tuple(saved), disk_writable=False)
    worker2.disk = dict(saved)
    tokens, final = serve_one(ro, worker2, "again", ps[0])
    assert tokens == reference_tokens(ps[0], 3) and final.num_cached_tokens > 0
    fill(ro, worker2, prompts(9)[6:])
    assert worker2.disk == saved, "nothing written, nothing deleted"


# ----------------------------------------------------------------------------- remote tier
def replica(store: dict, num_blocks: int = 64, clock=None) -> tuple[Scheduler, FakeWorker]:
    """A scheduler with a remote tier on the fake store ``store`` (shared by replicas)."""
    sched, worker = make(num_blocks, remote=True, clock=clock)
    worker.remote = store
    return sched, worker


def test_a_second_replica_loads_what_the_first_computed_from_the_remote_store() -> None:
    store: dict = {}
    a, wa = replica(store)
    p = prompts(1, length=40)[0]
    tokens, final = serve_one(a, wa, "a", p)
    assert final.num_cached_tokens == 0
    assert set(full_keys(a, p)) <= set(store), "the idle replica checkpointed to the store"
    b, wb = replica(store)
    again, final = serve_one(b, wb, "b", p)
    assert again == tokens and final.num_cached_tokens == len(full_keys(b, p)) * BS
    stats = b.stats()
    assert stats["kv_tier_hit_tokens"]["remote"] == final.num_cached_tokens
    assert stats["kv_tier_transfer_bytes"]["remote>device"] > 0


def replicas_one_down() -> tuple[Scheduler, FakeWorker, Scheduler, FakeWorker, Clock,
                                  list[list[int]]]:
    """Replica a has checkpointed prompt 0 of ``ps`` (3 prompts) to the shared store; replica
    b (on ``clock``) finds the store down."""
    store: dict = {}
    a, wa = replica(store)
    ps = prompts(3, length=40)
    serve_one(a, wa, "a0", ps[0])
    clock = Clock()
    b, wb = replica(store, clock=clock)
    wb.remote_down = True
    return a, wa, b, wb, clock, ps


def test_a_down_store_is_a_miss_and_hits_resume_when_it_is_back() -> None:
    a, wa, b, wb, clock, ps = replicas_one_down()
    tokens, final = serve_one(b, wb, "b0", ps[0])  # probe fails: recomputed, no error
    assert tokens == reference_tokens(ps[0], 3) and final.num_cached_tokens == 0
    assert final.finish_reason == "length"
    stats = b.stats()
    assert stats["kv_remote_up"] == 0.0 and stats["kv_remote_errors"]["down"] >= 1
    _, final = serve_one(b, wb, "b0-again", ps[2])
    assert final.num_cached_tokens == 0, "down: no probe for a while (no step's wait)"
    wb.remote_down = False
    serve_one(a, wa, "a1", ps[1])
    clock.now += 2.0  # the retry interval passed: the next probe tries the store again
    tokens, final = serve_one(b, wb, "b1", ps[1])  # the store answers again
    assert final.num_cached_tokens > 0 and b.stats()["kv_remote_up"] == 1.0


def test_a_busy_engine_probes_a_down_store_again_and_finds_it_back() -> None:
    """The worker reports the store down on every step until an op succeeds, and only a
    probe makes an op while the store is down. A replica that never idles for the retry
    interval must still probe once a second, not push the retry back on every step."""
    _, _, b, wb, clock, ps = replicas_one_down()
    assert b.add_request(make_request("long", ps[2], max_tokens=200)) == []
    for _ in range(3):
        clock.now += 0.1
        step(b, wb)
    assert b.stats()["kv_remote_up"] == 0.0
    wb.remote_down = False  # the store is back; b keeps stepping every 0.1 s
    for _ in range(15):
        clock.now += 0.1
        step(b, wb)
    assert b.add_request(make_request("hit", ps[0], max_tokens=3)) == []
    run = Run()
    for _ in range(10):
        clock.now += 0.1
        step(b, wb, run)
    assert b.has_unfinished(), "busy all along"
    assert run.finals[("hit", 0)].num_cached_tokens > 0, "the probe found the store back"
    assert b.stats()["kv_remote_up"] == 1.0
    run_all(b, wb)


def test_a_corrupt_remote_value_is_detected_counted_and_recomputed() -> None:
    store: dict = {}
    a, wa = replica(store)
    p = prompts(1, length=40)[0]
    tokens, _ = serve_one(a, wa, "a", p)
    b, wb = replica(store)
    keys = full_keys(b, p)
    wb.remote_corrupt.add(keys[1])
    again, final = serve_one(b, wb, "b", p)
    assert again == tokens and final.num_cached_tokens == BS, "block 0 loaded, 1 failed"
    assert b.stats()["kv_remote_errors"]["corrupt"] == 1
    assert keys[1] in store, "recomputed and written back"


def test_retention_24h_writes_through_while_the_engine_is_busy() -> None:
    """``persist_kv`` (prompt_cache_retention "24h"): the prompt's blocks reach disk in the
    step after they are computed, without waiting for an idle moment or a checkpoint."""
    clock = Clock()
    sched, worker = make(num_blocks=64, disk=64, clock=clock, checkpoint_interval_s=1e9)
    keep, other = prompts(2)
    assert sched.add_request(make_request("long", other, max_tokens=40)) == []
    req = msgspec.structs.replace(make_request("keep", keep, max_tokens=3), persist_kv=True)
    assert sched.add_request(req) == []
    for _ in range(4):
        step(sched, worker)
    assert sched.has_unfinished(), "still busy"
    assert all(k in worker.disk for k in full_keys(sched, keep))
    assert not set(full_keys(sched, other)) & set(worker.disk), "the others wait"
    run_all(sched, worker)
    assert_clean(sched)


def test_an_explicit_pin_longer_than_the_checkpoint_interval_is_written_at_once() -> None:
    clock = Clock()
    sched, worker = make(num_blocks=64, disk=64, clock=clock, checkpoint_interval_s=60.0)
    keep, other = prompts(2)
    assert sched.add_request(make_request("long", other, max_tokens=40)) == []
    req = msgspec.structs.replace(make_request("keep", keep, max_tokens=1),
                                  prompt_cache_key="p", pin_breakpoints=[(16, 3600.0)])
    assert sched.add_request(req) == []
    for _ in range(4):
        step(sched, worker)
    assert sched.has_unfinished(), "still busy"
    assert all(k in worker.disk for k in full_keys(sched, keep)[:4]), "the pinned prefix"
    assert not set(full_keys(sched, other)) & set(worker.disk)
    run_all(sched, worker)
    sched.kv.pins.clear()
    assert_clean(sched)


def test_a_busy_engine_writes_nothing_remote_while_remote_loads_cannot_pay_off() -> None:
    """A link slower than recomputing (an 8B model on an H100 against a loopback store): no
    replica would load the copies, so a busy engine does not write them; an idle one does."""
    store: dict = {}
    clock = Clock()
    sched, worker = make(64, remote=True, clock=clock, checkpoint_interval_s=1.0)
    worker.remote = store
    sched.kv.tiers.policy = CostLoad(BS, 1 << 20, CostNumbers(prefill_tokens_per_s=1e9))
    a, b = prompts(2)
    assert sched.add_request(make_request("a", a, max_tokens=3)) == []
    assert sched.add_request(make_request("b", b, max_tokens=40)) == []
    for _ in range(4):
        clock.now += 2.0  # checkpoint intervals pass while busy
        step(sched, worker)
    assert sched.has_unfinished() and not store
    run_all(sched, worker)
    assert set(full_keys(sched, a)) <= set(store), "written once idle"
