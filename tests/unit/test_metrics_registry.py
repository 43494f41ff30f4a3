"""One definition per engine metric (``encore.protocol.metrics.ENGINE_METRICS``): what P1
counts, what crosses to P0 and what /metrics exports all follow from it."""

from __future__ import annotations

from encore.configs.types import CacheConfig, SchedulerConfig
from encore.kvmanager.tiered import TierSetup
from encore.protocol.client import _Router
from encore.protocol.messages import EngineOutputs
from encore.protocol.metrics import BY_KEY, ENGINE_METRICS
from encore.scheduler.scheduler import Scheduler
from encore.server.metrics import ServerMetrics
from tests.unit.fake_worker import FakeWorker, make_request, run_all


def _scheduler() -> tuple[Scheduler, FakeWorker]:
    tiers = TierSetup(block_bytes=1024, num_host_blocks=8, load_policy="always")
    sched = Scheduler.build(CacheConfig(block_size=4), SchedulerConfig(), num_device_blocks=16,
                            max_model_len=64, tiers=tiers)
    return sched, FakeWorker(16, 4)


def test_the_engine_reports_exactly_the_registered_metrics() -> None:
    from encore.scheduler.engine import LOOP_METRICS

    sched, _ = _scheduler()
    assert set(sched.snapshot()) | set(LOOP_METRICS) == set(BY_KEY)


def test_every_registered_metric_is_exported_with_its_kind() -> None:
    sched, worker = _scheduler()
    router = _Router()
    assert sched.add_request(make_request("r", list(range(1, 12)), max_tokens=3)) == []
    run_all(sched, worker)
    router.dispatch(EngineOutputs(stats=sched.stats()))
    text = ServerMetrics(lambda: router.totals).exposition().decode()
    for m in ENGINE_METRICS:
        name = f"{m.name}_total" if m.kind == "counter" else m.name
        assert f"# TYPE {name} {m.kind}" in text, m.name
    assert "encore:prompt_tokens_computed_total 11.0" in text
    assert "encore:generation_tokens_sampled_total 3.0" in text


def test_counters_cross_as_increments_so_totals_survive_an_engine_restart() -> None:
    router = _Router()
    for _ in range(2):  # a restarted engine counts from zero again
        sched, worker = _scheduler()
        assert sched.add_request(make_request("r", list(range(1, 12)), max_tokens=2)) == []
        run_all(sched, worker)
        router.dispatch(EngineOutputs(stats=sched.stats()))
        router.dispatch(EngineOutputs(stats=sched.stats()))  # nothing new: adds 0
    assert router.totals["generation_tokens"] == 4
    assert router.totals["prefix_queries"] == 2 * 11
