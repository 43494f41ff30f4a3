"""TTL pins for agent programs (Continuum): the TTL policy, and pins in the scheduler driven by
the fake worker with a fake clock. Every scheduler test compares tokens with the cache-free
reference and ends with a leak check (pins released, then every block free)."""

from __future__ import annotations

import msgspec
import pytest

from encore.configs.types import CacheConfig, SchedulerConfig
from encore.kvmanager.pins import TTLPolicy
from encore.kvmanager.tiered import TierSetup
from encore.protocol.messages import program_id
from encore.scheduler.scheduler import Scheduler
from encore.server.serving import parse_duration
from tests.unit.fake_worker import FakeWorker, Run, make_request, reference_tokens, run_all, step

BS = 4


def pid(key: str, salt: str | None = None) -> str:
    """The engine's name of program ``key`` of tenant ``salt``."""
    return program_id(salt, key)
A_PROMPT = list(range(1, 13))  # 3 full blocks
B_PROMPT = list(range(101, 113))


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def make(num_blocks: int = 17, host: int = 0, block_bytes: int = 0,
         **cache_kw) -> tuple[Scheduler, FakeWorker, Clock]:
    clock = Clock()
    setup = None
    if host or block_bytes:
        setup = TierSetup(block_bytes=block_bytes or 1024, num_host_blocks=host,
                          load_policy="always")
    sched = Scheduler.build(CacheConfig(block_size=BS, **cache_kw),
                      SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64),
                      num_device_blocks=num_blocks, max_model_len=256, tiers=setup, clock=clock)
    return sched, FakeWorker(num_blocks, BS), clock


def turn(sched: Scheduler, worker: FakeWorker, rid: str, prompt: list[int], max_tokens: int = 1,
         pin_breakpoints: list[tuple[int, float]] | None = None, **kw) -> Run:
    req = make_request(rid, prompt, max_tokens=max_tokens, **kw)
    req = msgspec.structs.replace(req, pin_breakpoints=pin_breakpoints or [])
    assert sched.add_request(req) == []
    run = run_all(sched, worker)
    assert run.tokens[(rid, 0)] == reference_tokens(prompt, max_tokens)
    return run


def assert_no_leaks(sched: Scheduler) -> None:
    sched.check_integrity()
    assert not sched.has_unfinished() and not sched.requests
    assert sched.kv.pins is not None
    sched.kv.pins.clear()
    sched.check_integrity()
    assert sched.kv.num_free_blocks == sched.kv.num_usable_blocks


# ----------------------------------------------------------------------------- TTL policy
def test_ttl_policy_gives_slower_programs_longer_ttls() -> None:
    policy = TTLPolicy(max_ttl_s=600, block_size=BS)
    for g in (2.0, 3.0, 2.5, 3.5, 2.0, 3.0, 2.8, 3.1):
        policy.observe_gap("fast", g)
    for g in (40.0, 55.0, 48.0, 60.0, 45.0, 52.0, 58.0, 50.0):
        policy.observe_gap("slow", g)
    fast, slow = policy.choose("fast", 4, 0.5), policy.choose("slow", 4, 0.5)
    assert 3.5 <= fast < 20 and 60 <= slow < 120 and fast * 3 < slow, (fast, slow)
    assert policy.choose("slow", 4, 1.0) <= slow, "more pressure never lengthens a TTL"
    cold = TTLPolicy(max_ttl_s=600, block_size=BS)
    assert 0 < cold.choose("new", 4, 0.5) <= 600, "the exponential prior pins cold programs"


def test_a_miss_that_reloads_from_host_is_worth_a_shorter_pin() -> None:
    policy = TTLPolicy(max_ttl_s=600, block_size=BS)
    for g in (40.0, 55.0, 48.0, 60.0, 45.0, 52.0, 58.0, 50.0):
        policy.observe_gap("slow", g)
    full = policy.choose("slow", 4, 0.5)
    assert 0 < policy.choose("slow", 4, 0.5, miss_cost=0.3) <= full
    assert policy.choose("slow", 4, 1.0, miss_cost=0.05) == 0, "not worth device memory"


def test_ttl_follows_the_tool_a_turn_called() -> None:
    """Per tool (Continuum): once the server reports a turn's tool calls, its pin's TTL comes
    from the gaps that followed that tool in any program; a requested TTL stays."""
    sched, worker, _ = make()
    pins = sched.kv.pins
    assert pins is not None
    policy = pins.policy
    for i in range(8):  # other programs' history: "run_tests" pauses ~40 s, "ls" ~0.5 s
        for tool, gap in (("run_tests", 40.0 + i), ("ls", 0.5)):
            program = f"{tool}-{i}"
            policy.turn_ended(program, 0.0)
            assert policy.tool_called(program, [tool])
            policy.turn_started(program, gap)
    turn(sched, worker, "a1", A_PROMPT, prompt_cache_key="A")
    pin = pins.pin_of(pid("A"))
    assert pin is not None
    sched.tool_called("A", ["run_tests"])
    assert 47 <= pin.ttl <= 120, pin.ttl  # covers the slowest run seen (47 s)
    sched.tool_called("A", ["ls"])  # (a correction: the latest report wins)
    assert 0 < pin.ttl <= 2, pin.ttl
    turn(sched, worker, "b1", B_PROMPT, prompt_cache_key="B", pin_ttl_s=7.0)
    sched.tool_called("B", ["run_tests"])
    assert pins.pin_of(pid("B")).ttl == 7.0  # type: ignore[union-attr]
    sched.tool_called("nobody", ["ls"])  # unknown programs are ignored
    assert_no_leaks(sched)


def test_gaps_are_measured_with_the_engine_clock() -> None:
    sched, worker, clock = make()
    turn(sched, worker, "a1", A_PROMPT, prompt_cache_key="A")
    clock.t = 7.0
    turn(sched, worker, "a2", A_PROMPT + [5, 6, 7, 8], prompt_cache_key="A")
    assert sched.kv.pins is not None
    assert list(sched.kv.pins.policy._gaps[pid("A")]) == [7.0]
    assert_no_leaks(sched)


# ----------------------------------------------------------------------------- scheduler
def test_pin_survives_pressure_and_the_next_turn_hits_it() -> None:
    sched, worker, clock = make()
    turn(sched, worker, "a1", A_PROMPT, prompt_cache_key="A", pin_ttl_s=60.0)
    turn(sched, worker, "b1", B_PROMPT)  # unpinned: only LRU-cached
    pins = sched.kv.pins
    assert pins is not None and pins.num_pinned_blocks == 3
    assert sched.stats()["pin_ttl_seconds"] == [60.0]
    turn(sched, worker, "c", list(range(200, 251)), max_tokens=2)  # 13 blocks: evicts b1's
    clock.t = 30.0
    probe = make_request("probe", B_PROMPT, max_tokens=1)
    assert sched.kv.get_computed_blocks(_Probe(probe))[1] == 0, "unpinned blocks were evicted"
    run = turn(sched, worker, "a2", A_PROMPT + [1, 2, 3, 4, 9], prompt_cache_key="A")
    assert run.finals[("a2", 0)].num_cached_tokens == 12, "the returning turn hit its pin"
    assert pins.hits == 1 and sched.stats()["pin_hits"] == 1
    assert_no_leaks(sched)


class _Probe:
    """A KVSeq view of a request that is never scheduled (prefix lookups only)."""

    def __init__(self, req) -> None:
        self.seq_id = "probe#0"
        self.all_token_ids = req.prompt_token_ids
        self.num_computed_tokens = 0
        self.cache_salt = None


def test_pin_expires_on_time() -> None:
    sched, worker, clock = make()
    turn(sched, worker, "a1", A_PROMPT, prompt_cache_key="A", pin_ttl_s=10.0)
    pins = sched.kv.pins
    assert pins is not None
    clock.t = 9.9
    step(sched, worker)
    assert pins.num_pinned_blocks == 3
    clock.t = 10.0
    step(sched, worker)
    assert pins.num_pinned_blocks == 0 and pins.expired == 1
    stats = sched.stats()
    assert (stats["pinned_blocks"], stats["pin_expired"]) == (0, 1)
    # the blocks stay LRU-cached: a later turn still hits them while nothing evicts them
    run = turn(sched, worker, "a2", A_PROMPT + [7], prompt_cache_key="A")
    assert run.finals[("a2", 0)].num_cached_tokens == 12 and pins.hits == 0
    assert_no_leaks(sched)


def test_a_pin_does_not_expire_while_its_programs_next_turn_waits() -> None:
    """The TTL covers the tool's run; once the next turn has arrived, the pin holds until the
    turn is admitted, however long it queues. An aborted turn lets the pin expire again."""
    sched, worker, clock = make()
    turn(sched, worker, "a1", A_PROMPT, prompt_cache_key="A", pin_ttl_s=10.0)
    pins = sched.kv.pins
    assert pins is not None
    clock.t = 5.0
    a2 = A_PROMPT + [7]
    assert sched.add_request(make_request("a2", a2, max_tokens=1, prompt_cache_key="A")) == []
    clock.t = 11.0  # past the TTL before the turn is first scheduled
    run = run_all(sched, worker)
    assert pins.expired == 0 and pins.hits == 1
    assert run.finals[("a2", 0)].num_cached_tokens == 12
    # the next turn arrives, then is aborted before it is admitted
    turn(sched, worker, "a3", a2 + [8, 9, 10], prompt_cache_key="A", pin_ttl_s=10.0)
    assert pins.pin_of(pid("A")) is not None
    clock.t = 15.0
    assert sched.add_request(make_request("a4", a2 + [1], max_tokens=1,
                                          prompt_cache_key="A")) == []
    sched.abort(["a4"])
    clock.t = 21.0
    run_all(sched, worker)
    step(sched, worker)
    assert pins.pin_of(pid("A")) is None and pins.expired == 1
    assert_no_leaks(sched)


def test_expired_pin_is_demoted_to_the_host_tier() -> None:
    sched, worker, clock = make(host=8)
    turn(sched, worker, "a1", A_PROMPT, prompt_cache_key="A", pin_ttl_s=10.0)
    keys = list(sched.kv.pins.pin_of(pid("A")).keys)  # type: ignore[union-attr]
    clock.t = 11.0
    out = sched.schedule()
    assert sorted(t.key for t in out.kv_stores) == sorted(keys)
    assert {t.dst for t in out.kv_stores} == {"host"}
    sched.update_from_output(out, worker.execute(out))
    host = sched.kv.tiers.tiers["host"]  # type: ignore[union-attr]
    assert host.lookup(keys) == 3, "the demoted blocks are loadable from the host tier"
    turn(sched, worker, "c", list(range(200, 261)), max_tokens=2)  # 16 blocks: evicts a1's
    run = turn(sched, worker, "a2", A_PROMPT + [7], prompt_cache_key="A")
    assert run.finals[("a2", 0)].num_cached_tokens == 12, "reloaded from host"
    assert_no_leaks(sched)


def test_pressure_releases_the_lowest_value_pin_instead_of_failing() -> None:
    sched, worker, _ = make()
    turn(sched, worker, "a1", A_PROMPT, prompt_cache_key="A", pin_ttl_s=5.0)
    turn(sched, worker, "b1", B_PROMPT, prompt_cache_key="B", pin_ttl_s=300.0)
    pins = sched.kv.pins
    assert pins is not None and pins.num_pinned_blocks == 6
    turn(sched, worker, "c", list(range(200, 245)), max_tokens=2)  # needs 12 of 16 blocks
    assert pins.pin_of(pid("A")) is None and pins.pin_of(pid("B")) is not None
    assert pins.released == 1
    assert_no_leaks(sched)


def test_an_admitted_turn_keeps_its_own_pin_under_pressure() -> None:
    sched, worker, _ = make()
    turn(sched, worker, "a1", A_PROMPT, prompt_cache_key="A", pin_ttl_s=5.0)  # lowest value
    turn(sched, worker, "b1", B_PROMPT, prompt_cache_key="B", pin_ttl_s=300.0)
    pins = sched.kv.pins
    assert pins is not None
    # a2 hits A's 3 pinned blocks and needs 11 more: only 10 are free, so B's pin must go
    run = turn(sched, worker, "a2", A_PROMPT + list(range(500, 541)), prompt_cache_key="A")
    assert run.finals[("a2", 0)].num_cached_tokens == 12 and pins.hits == 1
    assert pins.pin_of(pid("B")) is None and pins.released == 1
    assert_no_leaks(sched)


def test_new_admission_waits_for_room_instead_of_releasing_pins_while_others_run() -> None:
    """Continuum: a paused program's KV is kept over admitting a newcomer while the engine has
    other work; once nothing else runs, pressure releases the pin so the newcomer can start."""
    sched, worker, clock = make(max_pinned_fraction=0.9)
    turn(sched, worker, "a1", A_PROMPT, prompt_cache_key="A", pin_ttl_s=60.0)
    pins = sched.kv.pins
    assert pins is not None and pins.num_pinned_blocks == 3
    run = Run()
    assert sched.add_request(make_request("busy", list(range(300, 308)), max_tokens=6)) == []
    step(sched, worker, run)  # busy runs: 2 blocks, growing to 4
    # 14 prompt blocks: fit only if the pin's 3 blocks are released
    assert sched.add_request(make_request("new", list(range(400, 456)), max_tokens=1)) == []
    while ("busy", 0) not in run.finals:
        step(sched, worker, run)
        if ("busy", 0) not in run.finals:
            assert pins.num_pinned_blocks == 3, "a newcomer took a pinned program's KV"
            assert [s.request_id for s in sched.running] == ["busy"]
    run_all(sched, worker, run)  # now idle otherwise: the pin yields, the newcomer runs
    assert run.finals[("new", 0)].finish_reason == "length"
    assert pins.num_pinned_blocks == 0 and pins.released == 1
    assert_no_leaks(sched)


def _busy_then(sched: Scheduler, worker: FakeWorker, req, run: Run) -> None:
    """Start a request that runs for a few steps, then queue ``req`` behind it."""
    assert sched.add_request(make_request("busy", list(range(300, 308)), max_tokens=6)) == []
    step(sched, worker, run)  # busy runs: 2 blocks, growing to 4
    assert sched.add_request(req) == []


def test_a_pin_that_reloads_cheaply_from_host_yields_to_a_newcomer() -> None:
    """With a host tier, a released pin's KV comes back at a fraction of its prefill: a
    newcomer does not wait for it; the pin is demoted to host and the next turn reloads it."""
    sched, worker, _ = make(host=16, max_pinned_fraction=0.9)
    assert sched.kv.tiers is not None and sched.kv.tiers.miss_cost(3) < 0.5
    turn(sched, worker, "a1", A_PROMPT, prompt_cache_key="A", pin_ttl_s=60.0)
    pins = sched.kv.pins
    assert pins is not None and pins.num_pinned_blocks == 3
    run = Run()
    new = list(range(400, 452))  # 13 blocks; busy holds 3 of 16: fit only if the pin goes
    _busy_then(sched, worker, make_request("new", new, max_tokens=1), run)
    out = sched.schedule()
    assert "new#0" in [s.seq_id for s in out.seqs], "the newcomer waited for the pin"
    assert pins.num_pinned_blocks == 0 and pins.released == 1
    assert {t.dst for t in out.kv_stores} == {"host"} and len(out.kv_stores) == 3
    run.collect(sched.update_from_output(out, worker.execute(out)))
    run_all(sched, worker, run)
    again = turn(sched, worker, "a2", A_PROMPT + [7], prompt_cache_key="A")
    assert again.finals[("a2", 0)].num_cached_tokens == 12, "reloaded from host"
    assert_no_leaks(sched)


def test_no_pin_after_the_last_step_and_cap_respected() -> None:
    sched, worker, _ = make(max_pinned_fraction=0.25)  # 4 of 16 blocks
    turn(sched, worker, "a1", A_PROMPT, prompt_cache_key="A", pin_ttl_s=60.0)
    pins = sched.kv.pins
    assert pins is not None and pins.num_pinned_blocks == 3
    turn(sched, worker, "a2", A_PROMPT + [3], prompt_cache_key="A", is_last_step=True)
    assert pins.num_pinned_blocks == 0, "the program is done: nothing to keep"
    turn(sched, worker, "b1", B_PROMPT, prompt_cache_key="B", pin_ttl_s=60.0)
    turn(sched, worker, "d1", list(range(300, 312)), prompt_cache_key="D", pin_ttl_s=60.0)
    assert pins.num_pinned_blocks <= 4
    assert_no_leaks(sched)


def test_job_completion_time_from_first_request_to_last_step() -> None:
    sched, worker, clock = make()
    clock.t = 100.0
    turn(sched, worker, "j1", A_PROMPT, prompt_cache_key="J")
    clock.t = 112.5
    turn(sched, worker, "j2", A_PROMPT + [4], prompt_cache_key="J", is_last_step=True)
    stats = sched.stats()
    assert stats["job_completion_seconds"] == [12.5] and stats["pinned_blocks"] == 0
    assert sched.stats()["job_completion_seconds"] == []
    assert_no_leaks(sched)


def test_pins_off() -> None:
    sched, worker, _ = make(enable_ttl_pins=False)
    turn(sched, worker, "a1", A_PROMPT, prompt_cache_key="A", pin_ttl_s=60.0)
    assert sched.kv.pins is None and sched.stats()["pinned_blocks"] == 0
    assert sched.kv.num_free_blocks == sched.kv.num_usable_blocks


# ----------------------------------------------------------------------------- breakpoints
def cached_prefix(sched: Scheduler, prompt: list[int], salt: str | None = None) -> int:
    """Tokens of ``prompt`` a new request would find on the device now."""
    probe = _Probe(make_request("probe", prompt, max_tokens=1))
    probe.cache_salt = salt
    return sched.kv.get_computed_blocks(probe)[1]


def test_breakpoint_pins_its_prefix_for_its_ttl_even_on_the_last_step() -> None:
    sched, worker, clock = make()
    turn(sched, worker, "a1", A_PROMPT, prompt_cache_key="A", is_last_step=True,
         pin_breakpoints=[(11, 100.0)])  # 11 tokens: the 2 whole blocks inside them
    pins = sched.kv.pins
    assert pins is not None and pins.pin_of(pid("A")) is None, "no turn pin after the last step"
    (pin,) = pins.all_pins()
    assert pin.explicit and len(pin.blocks) == 2 and pin.ttl == 100.0
    assert sched.stats()["pin_ttl_seconds"] == [100.0]
    turn(sched, worker, "c", list(range(200, 255)), max_tokens=2)  # 14 blocks: all unpinned
    assert cached_prefix(sched, A_PROMPT) == 8, "the pinned prefix survived, its tail did not"
    clock.t = 99.9
    step(sched, worker)
    assert pins.num_pinned_blocks == 2
    clock.t = 100.0
    step(sched, worker)
    assert pins.num_pinned_blocks == 0 and pins.expired == 1
    assert_no_leaks(sched)


def test_a_hit_refreshes_a_soft_pin_but_not_an_explicit_one() -> None:
    """Anthropic's cache_control: each request that hits the pinned prefix restarts its TTL
    (even one without the marker, of another program); an OpenAI explicit breakpoint keeps
    the TTL it was given."""
    sched, worker, clock = make()
    req = make_request("s1", A_PROMPT, max_tokens=1, prompt_cache_key="S", is_last_step=True)
    sched.add_request(msgspec.structs.replace(req, soft_pin_breakpoints=[(12, 100.0)]))
    run_all(sched, worker)
    turn(sched, worker, "e1", B_PROMPT, prompt_cache_key="E", is_last_step=True,
         pin_breakpoints=[(12, 100.0)])
    pins = sched.kv.pins
    assert pins is not None
    soft, explicit = sorted(pins.all_pins(), key=lambda p: not p.soft)
    assert soft.soft and not explicit.soft and soft.expires == explicit.expires == 100.0
    clock.t = 80.0
    turn(sched, worker, "s2", A_PROMPT + [7, 8])  # no marker, no program: a plain hit
    turn(sched, worker, "e2", B_PROMPT + [7, 8])
    assert soft.expires == 180.0 and explicit.expires == 100.0
    clock.t = 150.0
    step(sched, worker)
    assert pins.all_pins() == [soft], "the explicit pin expired, the refreshed one did not"
    clock.t = 180.0
    step(sched, worker)
    assert pins.all_pins() == []
    assert_no_leaks(sched)


def test_breakpoint_ttl_is_bounded_by_max_pin_ttl() -> None:
    sched, worker, _ = make(max_pin_ttl_s=60.0)
    turn(sched, worker, "a1", A_PROMPT, prompt_cache_key="A", is_last_step=True,
         pin_breakpoints=[(12, 43200.0), (3, 30.0)])  # 3 tokens: no whole block, no pin
    pins = sched.kv.pins
    assert pins is not None
    assert [(len(p.blocks), p.ttl) for p in pins.all_pins()] == [(3, 60.0)]
    assert_no_leaks(sched)


def test_breakpoint_pin_outranks_turn_pins_under_pressure() -> None:
    sched, worker, _ = make()
    turn(sched, worker, "a1", A_PROMPT, prompt_cache_key="A", is_last_step=True,
         pin_breakpoints=[(12, 5.0)])
    turn(sched, worker, "b1", B_PROMPT, prompt_cache_key="B", pin_ttl_s=300.0)
    pins = sched.kv.pins
    assert pins is not None and pins.num_pinned_blocks == 6
    turn(sched, worker, "c", list(range(200, 245)), max_tokens=2)  # needs 12 of 16 blocks
    assert pins.pin_of(pid("B")) is None and pins.released == 1, "the turn pin yields first"
    assert cached_prefix(sched, A_PROMPT + [1]) == 12
    assert_no_leaks(sched)


def test_nested_and_repeated_breakpoints_count_once_and_keep_the_later_expiry() -> None:
    sched, worker, clock = make()
    turn(sched, worker, "a1", A_PROMPT, prompt_cache_key="A", pin_ttl_s=10.0,
         pin_breakpoints=[(4, 200.0), (12, 50.0)])
    pins = sched.kv.pins
    assert pins is not None and len(pins.all_pins()) == 3
    assert pins.num_pinned_blocks == 3, "a block held by three pins counts once"
    clock.t = 5.0  # the next turn claims the turn pin, not the explicit ones
    run = turn(sched, worker, "a2", A_PROMPT + [9], prompt_cache_key="A", is_last_step=True,
               pin_breakpoints=[(12, 20.0)])  # expires at 25 < 50: the pin keeps 50
    assert run.finals[("a2", 0)].num_cached_tokens == 12 and pins.hits == 1
    assert sorted((len(p.blocks), p.expires) for p in pins.all_pins()) == [(1, 200.0),
                                                                           (3, 50.0)]
    clock.t = 50.0
    step(sched, worker)
    assert pins.num_pinned_blocks == 1, "the outer prefix expired, the inner one stays"
    clock.t = 200.0
    step(sched, worker)
    assert pins.num_pinned_blocks == 0 and pins.expired == 2
    assert_no_leaks(sched)


# ----------------------------------------------------------------------------- tenant quota
QUOTA_GIB = 4 * 1024 / 2**30  # 4 blocks of 1 KiB


def test_tenant_quota_releases_the_tenants_own_pins_never_anothers() -> None:
    sched, worker, _ = make(block_bytes=1024, max_pinned_gib_per_tenant=QUOTA_GIB)
    turn(sched, worker, "b1", B_PROMPT, prompt_cache_key="B", cache_salt="t2", pin_ttl_s=5.0)
    turn(sched, worker, "a1", A_PROMPT, prompt_cache_key="A1", cache_salt="t1", pin_ttl_s=5.0)
    pins = sched.kv.pins
    assert pins is not None and pins.num_pinned_blocks == 6
    turn(sched, worker, "a2", list(range(300, 312)), prompt_cache_key="A2", cache_salt="t1",
         pin_ttl_s=300.0)  # 3 more blocks of t1: over its 4, so A1's (lower value) pin goes
    assert pins.pin_of(pid("A1", "t1")) is None and pins.pin_of(pid("A2", "t1")) is not None
    assert pins.pin_of(pid("B", "t2")) is not None, "another tenant's pin never pays for t1's quota"
    assert (pins.tenant_blocks("t1"), pins.tenant_blocks("t2"), pins.released) == (3, 3, 1)
    assert_no_leaks(sched)


def test_tenant_quota_cuts_a_pin_that_does_not_fit() -> None:
    sched, worker, _ = make(block_bytes=1024, max_pinned_gib_per_tenant=QUOTA_GIB)
    long = list(range(1, 21))  # 5 full blocks: alone over the quota
    turn(sched, worker, "a1", long, prompt_cache_key="A", cache_salt="t1", is_last_step=True,
         pin_breakpoints=[(20, 100.0)])
    pins = sched.kv.pins
    assert pins is not None
    (pin,) = pins.all_pins()
    assert len(pin.blocks) == 4, "the prefix's head is kept"
    # a turn pin ranks below the tenant's explicit pin: nothing of it fits
    turn(sched, worker, "d1", list(range(300, 312)), prompt_cache_key="D", cache_salt="t1",
         pin_ttl_s=300.0)
    assert pins.pin_of(pid("D", "t1")) is None
    assert pins.tenant_blocks("t1") == 4 and pins.released == 0
    turn(sched, worker, "e1", list(range(400, 412)), prompt_cache_key="E", cache_salt="t2",
         pin_ttl_s=300.0)
    assert pins.pin_of(pid("E", "t2")) is not None and pins.tenant_blocks("t2") == 3
    assert cached_prefix(sched, long, salt="t1") == 16
    assert_no_leaks(sched)


def test_tenant_quota_needs_the_block_size_in_bytes() -> None:
    with pytest.raises(ValueError, match="max_pinned_gib_per_tenant"):
        make(max_pinned_gib_per_tenant=1.0)


def test_parse_duration() -> None:
    assert parse_duration("90s") == 90 and parse_duration("30m") == 1800
    assert parse_duration("12h") == 43200
    for bad in ("", "m", "10", "-5s", "xs", "nans"):
        assert parse_duration(bad) is None, bad


# ----------------------------------------------------------------------------- API fields
def test_api_maps_pin_fields_onto_the_engine_request() -> None:
    from tests.unit.server_helpers import chat_body, serve

    with serve() as (client, engine, _):
        r = client.post("/v1/chat/completions", json=chat_body(
            max_tokens=2, job_id="job-1", is_last_step=True,
            prompt_cache_options={"mode": "explicit", "ttl": "90s"}))
        assert r.status_code == 200, r.text
        r = client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2,
                                                 "prompt_cache_key": "k", "job_id": "job-2"})
        assert r.status_code == 200, r.text
        for ttl in ("12h", "soon", 30):
            r = client.post("/v1/chat/completions", json=chat_body(
                max_tokens=2, prompt_cache_key="k", prompt_cache_options={"ttl": ttl}))
            assert r.status_code == 400, ttl
            assert r.json()["error"]["param"] == "prompt_cache_options.ttl"
        r = client.post("/v1/chat/completions", json=chat_body(
            max_tokens=2, prompt_cache_options={"ttl": "5m"}))
        assert r.status_code == 400 and "prompt_cache_key" in r.json()["error"]["message"]
    first, second = engine.requests[:2]
    assert (first.prompt_cache_key, first.pin_ttl_s, first.is_last_step) == ("job-1", 90.0, True)
    assert (second.prompt_cache_key, second.pin_ttl_s, second.is_last_step) == ("k", None, None)
    with serve(enable_ttl_pins=False) as (client, _, _):
        r = client.post("/v1/chat/completions", json=chat_body(
            max_tokens=2, prompt_cache_key="k", prompt_cache_options={"ttl": "30m"}))
        assert r.status_code == 400 and "not supported" in r.json()["error"]["message"]


def test_pin_metrics_are_exported() -> None:
    from encore.protocol.client import _Router
    from encore.protocol.messages import EngineOutputs, EngineStats
    from encore.server.metrics import ServerMetrics

    router = _Router()
    router.dispatch(EngineOutputs(stats=EngineStats(
        values={"pinned_blocks": 3, "pin_hits": 2, "pin_expired": 1},
        observed={"pin_ttl_seconds": [4.0, 90.0], "job_completion_seconds": [42.0]})))
    router.dispatch(EngineOutputs(stats=EngineStats(values={"pinned_blocks": 1, "pin_hits": 1})))
    text = ServerMetrics(lambda: router.totals).exposition().decode()
    assert "encore:pinned_blocks 1.0" in text
    assert "encore:pin_hits_total 3.0" in text and "encore:pin_expired_total 1.0" in text
    assert 'encore:pin_ttl_seconds_bucket{le="5.0"} 1.0' in text
    assert 'encore:pin_ttl_seconds_bucket{le="+Inf"} 2.0' in text
    assert "encore:pin_ttl_seconds_sum 94.0" in text
    assert 'encore:job_completion_seconds_bucket{le="60.0"} 1.0' in text


def test_another_tenant_reusing_a_programs_key_touches_nothing_of_it() -> None:
    """Tenant t2 sends a turn under t1's prompt_cache_key: it neither claims nor replaces
    t1's pin, and t1's next turn still hits it (programs are keyed by tenant and key)."""
    sched, worker, _ = make()
    turn(sched, worker, "a1", A_PROMPT, prompt_cache_key="shared", cache_salt="t1")
    pins = sched.kv.pins
    assert pins is not None
    mine = pins.pin_of(pid("shared", "t1"))
    assert mine is not None
    turn(sched, worker, "b1", B_PROMPT, prompt_cache_key="shared", cache_salt="t2",
         is_last_step=True)  # t2's last step would drop the program's pin
    assert pins.pin_of(pid("shared", "t1")) is mine and pins.hits == 0
    turn(sched, worker, "a2", A_PROMPT + [5, 6, 7, 8], prompt_cache_key="shared",
         cache_salt="t1")
    assert pins.hits == 1
    assert_no_leaks(sched)
