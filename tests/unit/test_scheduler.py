"""Scheduler driven by the fake worker: exact blocks, queue order, chunking, preemption, leaks."""

from __future__ import annotations

import random

import pytest

from encore.configs.types import CacheConfig, SchedulerConfig
from encore.protocol.messages import ModelRunnerOutput
from encore.scheduler.scheduler import Scheduler
from tests.unit.fake_worker import (
    VOCAB,
    FakeWorker,
    Pipeline,
    Run,
    default_next_token,
    make_request,
    reference_tokens,
    run_all,
    step,
)

BS = 4


def make(
    num_blocks: int = 64,
    *,
    max_num_seqs: int = 8,
    budget: int = 64,
    policy: str = "fcfs",
    max_model_len: int = 256,
    caching: bool = True,
    next_token=None,
) -> tuple[Scheduler, FakeWorker]:
    sched = Scheduler.build(
        CacheConfig(block_size=BS, enable_prefix_caching=caching),
        SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=budget, policy=policy),
        num_device_blocks=num_blocks,
        max_model_len=max_model_len,
    )
    worker = (
        FakeWorker(num_blocks, BS) if next_token is None else FakeWorker(num_blocks, BS, next_token)
    )
    return sched, worker


def assert_no_leaks(sched: Scheduler) -> None:
    sched.check_integrity()
    assert not sched.has_unfinished() and not sched.requests
    if sched.kv.pins is not None:  # TTL pins are legitimate holders: release them, then check
        sched.kv.pins.clear()
        sched.check_integrity()
    assert sched.kv.num_free_blocks == sched.kv.num_usable_blocks  # free or cached-unreferenced
    assert sched.kv.usage == 0.0


def plan(run: Run, i: int) -> list[tuple[str, int, int]]:
    """(seq id, start_pos, num tokens) of step i."""
    return [(s.seq_id, s.start_pos, len(s.token_ids)) for s in run.steps[i].seqs]


def first_scheduled_order(run: Run) -> list[str]:
    seen: list[str] = []
    for out in run.steps:
        seen += [s.seq_id for s in out.seqs if s.seq_id not in seen]
    return seen


def test_single_request_exact_blocks_and_tokens() -> None:
    sched, worker = make()
    prompt = list(range(1, 11))
    assert sched.add_request(make_request("r", prompt, max_tokens=5)) == []
    run = run_all(sched, worker)
    assert run.tokens[("r", 0)] == reference_tokens(prompt, 5)
    assert [len(o.seqs[0].token_ids) for o in run.steps] == [10, 1, 1, 1, 1]
    assert [o.seqs[0].block_table for o in run.steps] == [[1, 2, 3]] * 3 + [[1, 2, 3, 4]] * 2
    first, later = run.steps[0].seqs[0], run.steps[1].seqs[0]
    assert first.sampling is not None and first.prompt_token_ids == prompt
    assert later.sampling is None and later.prompt_token_ids is None and later.start_pos == 10
    final = run.finals[("r", 0)]
    assert (final.finish_reason, final.num_prompt_tokens, final.num_cached_tokens) == (
        "length",
        10,
        0,
    )
    assert worker.state == {}  # "r#0" was delivered in `finished`
    assert_no_leaks(sched)


def test_prefix_hit_is_reported_as_cached_tokens() -> None:
    sched, worker = make()
    sched.add_request(make_request("a", list(range(10)), max_tokens=5))
    run_all(sched, worker)
    prompt_b = list(range(8)) + [77, 78, 79]
    sched.add_request(make_request("b", prompt_b, max_tokens=3))
    run = run_all(sched, worker)
    first = run.steps[0].seqs[0]
    assert (first.start_pos, first.token_ids, first.block_table) == (8, [77, 78, 79], [1, 2, 4])
    assert run.finals[("b", 0)].num_cached_tokens == 8
    assert run.tokens[("b", 0)] == reference_tokens(prompt_b, 3)  # read through shared KV
    stats = sched.stats()
    assert (stats["prefix_queries"], stats["prefix_hits"]) == (10 + 11, 8)
    assert_no_leaks(sched)


def test_chunked_prefill_respects_the_token_budget() -> None:
    sched, worker = make(budget=8)
    long_prompt, short_prompt = list(range(100, 120)), [5, 6, 7]
    sched.add_request(make_request("long", long_prompt, max_tokens=3))
    sched.add_request(make_request("short", short_prompt, max_tokens=3))
    run = run_all(sched, worker)
    assert plan(run, 0) == [("long#0", 0, 8)]
    assert plan(run, 1) == [("long#0", 8, 8)]
    assert plan(run, 2) == [("long#0", 16, 4), ("short#0", 0, 3)]
    assert plan(run, 3) == [("long#0", 20, 1), ("short#0", 3, 1)]
    assert [s.sample for s in run.steps[0].seqs + run.steps[1].seqs] == [False, False]
    assert all(sum(len(s.token_ids) for s in o.seqs) <= 8 for o in run.steps)
    assert run.tokens[("long", 0)] == reference_tokens(long_prompt, 3)
    assert run.tokens[("short", 0)] == reference_tokens(short_prompt, 3)
    assert_no_leaks(sched)


def test_max_num_seqs_caps_the_running_set() -> None:
    sched, worker = make(max_num_seqs=2)
    for rid in "abc":
        sched.add_request(make_request(rid, [1, 2, 3], max_tokens=3))
    run = run_all(sched, worker)
    assert [[s.seq_id for s in o.seqs] for o in run.steps] == [
        ["a#0", "b#0"],
        ["a#0", "b#0"],
        ["a#0", "b#0"],
        ["c#0"],
        ["c#0"],
        ["c#0"],
    ]
    assert run.steps[3].finished == ["a#0", "b#0"]
    assert_no_leaks(sched)


@pytest.mark.parametrize("pipelined", [False, True], ids=["sync", "async"])
def test_preemption_recomputes_and_tokens_match_an_unpressured_run(pipelined: bool) -> None:
    sched, worker = make(num_blocks=7)  # 6 usable blocks; each request grows to 5
    prompts = {"a": list(range(10, 18)), "b": list(range(20, 28))}
    for rid, prompt in prompts.items():
        sched.add_request(make_request(rid, prompt, max_tokens=10))
    run = run_all(sched, worker, pipeline=Pipeline(sched, worker) if pipelined else None)
    for rid, prompt in prompts.items():
        assert run.tokens[(rid, 0)] == reference_tokens(prompt, 10)
        assert run.finals[(rid, 0)].finish_reason == "length"
    stats = sched.stats()
    assert stats["preemptions"] >= 1
    assert [sid for sid, _ in worker.resumes] == ["b#0"] * stats["preemptions"]  # latest arrival
    resumed_at = next(s for o in run.steps for s in o.seqs if s.output_token_ids is not None)
    assert resumed_at.start_pos > 0  # its own freed full blocks were still cached
    assert run.finals[("b", 0)].num_cached_tokens == 0  # the first schedule's hit
    assert_no_leaks(sched)


@pytest.mark.parametrize(
    ("policy", "order"),
    [
        ("fcfs", ["low#0", "high#0", "mid#0"]),
        ("priority", ["high#0", "mid#0", "low#0"]),
    ],
)
def test_queue_policy_order(policy: str, order: list[str]) -> None:
    sched, worker = make(max_num_seqs=1, policy=policy)
    for rid, prio in (("low", 5), ("high", 0), ("mid", 1)):
        sched.add_request(make_request(rid, [1, 2], max_tokens=2, priority=prio))
    assert first_scheduled_order(run_all(sched, worker)) == order
    assert_no_leaks(sched)


def test_priority_policy_preempts_the_lowest_priority_first() -> None:
    sched, worker = make(num_blocks=7, policy="priority")
    sched.add_request(make_request("low", list(range(10, 18)), max_tokens=10, priority=9))
    step(sched, worker)
    sched.add_request(make_request("high", list(range(20, 28)), max_tokens=10, priority=0))
    run = run_all(sched, worker)
    assert {sid for sid, _ in worker.resumes} == {"low#0"}
    assert run.tokens[("high", 0)] == reference_tokens(list(range(20, 28)), 10)
    assert_no_leaks(sched)


def test_abort_frees_blocks_at_once_and_tells_the_worker() -> None:
    sched, worker = make(max_num_seqs=1)
    sched.add_request(make_request("a", list(range(9)), max_tokens=50))
    sched.add_request(make_request("w", [1, 2], max_tokens=5))  # still waiting
    step(sched, worker)
    step(sched, worker)
    assert sched.kv.usage > 0
    outs = sched.abort(["a", "w", "unknown"])
    assert [(o.request_id, o.finish_reason) for o in outs] == [("a", "abort"), ("w", "abort")]
    assert not sched.has_unfinished() and sched.has_work()
    assert sched.kv.num_free_blocks == sched.kv.num_usable_blocks
    out = sched.schedule()
    assert out.seqs == [] and out.finished == ["a#0"]  # "w" never reached the worker
    worker.execute(out)
    assert worker.state == {}
    assert_no_leaks(sched)


def test_abort_between_schedule_and_update_drops_the_token() -> None:
    sched, worker = make()
    sched.add_request(make_request("a", [1, 2, 3], max_tokens=5))
    out = sched.schedule()
    result = worker.execute(out)
    sched.abort(["a"])
    assert sched.update_from_output(out, result) == []
    worker.execute(sched.schedule())
    assert_no_leaks(sched)


def test_n3_children_share_the_prompt_blocks() -> None:
    sched, worker = make()
    prompt = list(range(10))
    sched.add_request(make_request("r", prompt, max_tokens=4, n=3))
    outs = step(sched, worker)
    assert [s.seq_id for s in sched.running] == ["r#0", "r#1", "r#2"]
    assert [sched.kv.block_table(f"r#{i}") for i in range(3)] == [[1, 2, 3], [1, 2, 4], [1, 2, 5]]
    assert (sched.kv.pool.ref_count(1), sched.kv.pool.ref_count(2)) == (3, 3)
    assert [(o.index, o.num_cached_tokens) for o in outs] == [(0, 0), (1, 8), (2, 8)]
    run = run_all(sched, worker)
    for i in range(3):
        expected = reference_tokens(prompt, 4, seed_index=i)
        assert [outs[i].new_token_ids[0]] + run.tokens[("r", i)] == expected
    assert_no_leaks(sched)


def count_up(context: list[int], seed_index: int) -> int:
    return (context[-1] + 1) % VOCAB


@pytest.mark.parametrize(
    ("kw", "tokens", "reason", "stop_id"),
    [
        ({"eos_token_ids": [13]}, [11, 12, 13], "stop", 13),
        ({"eos_token_ids": [13], "min_tokens": 4}, [11, 12, 13, 14, 15, 16], "length", None),
        ({"eos_token_ids": [13], "ignore_eos": True}, [11, 12, 13, 14, 15, 16], "length", None),
        ({"stop_token_ids": [12]}, [11, 12], "stop", 12),
        ({"stop_token_ids": [11], "min_tokens": 1}, [11], "stop", 11),
    ],
)
@pytest.mark.parametrize("pipelined", [False, True], ids=["sync", "async"])
def test_stop_conditions(kw: dict, tokens: list[int], reason: str, stop_id: int | None,
                         pipelined: bool) -> None:
    sched, worker = make(next_token=count_up)
    sched.add_request(make_request("r", [10], max_tokens=6, **kw))
    run = run_all(sched, worker, pipeline=Pipeline(sched, worker) if pipelined else None)
    final = run.finals[("r", 0)]
    assert (run.tokens[("r", 0)], final.finish_reason, final.stop_token_id) == (
        tokens,
        reason,
        stop_id,
    )
    assert_no_leaks(sched)


def test_max_model_len_finishes_with_length() -> None:
    sched, worker = make(max_model_len=8)
    sched.add_request(make_request("r", [1, 2, 3, 4, 5], max_tokens=10))
    run = run_all(sched, worker)
    assert len(run.tokens[("r", 0)]) == 3 and run.finals[("r", 0)].finish_reason == "length"
    assert_no_leaks(sched)


@pytest.mark.parametrize(
    ("num_blocks", "max_model_len", "prompt_len", "match"),
    [
        (64, 8, 8, "max_model_len=8"),
        (3, 256, 8, "KV pool 2 blocks"),  # 2 usable blocks hold 8 tokens: no room to generate
        (64, 256, 0, "empty"),
    ],
)
def test_unservable_request_is_an_error_not_a_crash(
    num_blocks: int, max_model_len: int, prompt_len: int, match: str
) -> None:
    sched, _ = make(num_blocks=num_blocks, max_model_len=max_model_len)
    outs = sched.add_request(make_request("r", list(range(prompt_len)), n=2))
    assert [(o.index, o.finish_reason) for o in outs] == [(0, "error"), (1, "error")]
    assert match in (outs[0].error or "")
    assert_no_leaks(sched)


def test_token_ids_past_the_vocabulary_are_an_error_not_a_worker_crash() -> None:
    sched, worker = make()
    sched.vocab_size = 100  # as the engine sets it from the worker
    outs = sched.add_request(make_request("r", [5, 100, 7]))
    assert [o.finish_reason for o in outs] == ["error"]
    assert "[0, 100)" in (outs[0].error or "")
    assert not sched.add_request(make_request("ok", [5, 99, 7]))
    run_all(sched, worker)
    assert_no_leaks(sched)


def test_duplicate_request_id_is_refused() -> None:
    sched, worker = make()
    sched.add_request(make_request("r", [1, 2], max_tokens=3))
    [dup] = sched.add_request(make_request("r", [3, 4], max_tokens=3))
    assert dup.finish_reason == "error" and "already in use" in (dup.error or "")
    run = run_all(sched, worker)
    assert run.tokens[("r", 0)] == reference_tokens([1, 2], 3)
    assert_no_leaks(sched)


def test_fail_all_errors_everything_and_forgets_the_cache() -> None:
    sched, worker = make(max_num_seqs=1)
    sched.add_request(make_request("a", list(range(9)), max_tokens=20))
    sched.add_request(make_request("b", [1, 2], max_tokens=20))
    step(sched, worker)
    step(sched, worker)
    outs = sched.fail_all("worker died")
    assert [(o.request_id, o.finish_reason, o.error) for o in outs] == [
        ("a", "error", "worker died"),
        ("b", "error", "worker died"),
    ]
    assert sched.kv.pool.num_cached == 0  # the device KV is gone with the worker
    assert sched.schedule().finished == []
    assert_no_leaks(sched)
    worker = FakeWorker(64, BS)  # the restarted worker knows nothing
    sched.add_request(make_request("c", list(range(9)), max_tokens=2))
    run = run_all(sched, worker)
    assert run.finals[("c", 0)].num_cached_tokens == 0
    assert run.tokens[("c", 0)] == reference_tokens(list(range(9)), 2)
    assert_no_leaks(sched)


def test_worker_error_fails_in_flight_requests() -> None:
    sched, _ = make()
    sched.add_request(make_request("a", [1, 2], max_tokens=3))
    out = sched.schedule()
    outs = sched.update_from_output(out, ModelRunnerOutput(step_id=out.step_id, error="OOM"))
    assert outs[0].finish_reason == "error" and "OOM" in (outs[0].error or "")
    assert_no_leaks(sched)


def test_stats_are_increments_plus_gauges() -> None:
    sched, worker = make()
    sched.add_request(make_request("a", list(range(10)), max_tokens=5))
    step(sched, worker)
    s1 = sched.stats()
    assert (s1["num_running"], s1["num_waiting"]) == (1, 0)
    assert (s1["prompt_tokens"], s1["generation_tokens"]) == (10, 1)
    assert s1["kv_cache_usage"] == pytest.approx(3 / 63)
    run_all(sched, worker)
    s2 = sched.stats()
    assert (s2["prompt_tokens"], s2["generation_tokens"], s2["num_running"]) == (0, 4, 0)
    s3 = sched.stats()
    assert (s3["generation_tokens"], s3["prefix_queries"], s3["kv_cache_usage"]) == (0, 0, 0.0)
    assert_no_leaks(sched)


def test_prompt_logprobs_requests_skip_the_prefix_cache() -> None:
    sched, worker = make()
    sched.add_request(make_request("a", list(range(10)), max_tokens=2))
    run_all(sched, worker)
    sched.add_request(make_request("b", list(range(10)), max_tokens=2, prompt_logprobs=0))
    run = run_all(sched, worker)
    assert run.steps[0].seqs[0].start_pos == 0 and run.finals[("b", 0)].num_cached_tokens == 0
    assert_no_leaks(sched)


@pytest.mark.parametrize("pipelined", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize("seed", range(6))
def test_random_load_with_pressure_and_aborts(seed: int, pipelined: bool) -> None:
    """Shared prefixes, n=2, a tiny pool (preemption + eviction), aborts; KV read back.
    Pipelined: step N+1 planned before step N's tokens are applied (asynchronous
    scheduling), with placeholders the worker fills in."""
    rng = random.Random(seed)
    policy = rng.choice(["fcfs", "priority"])
    sched, worker = make(num_blocks=12, max_num_seqs=4, budget=16, policy=policy, caching=seed != 5)
    stems = [[rng.randrange(VOCAB) for _ in range(rng.randrange(4, 13))] for _ in range(3)]
    expected, aborted, run = {}, set(), Run()
    pipeline = Pipeline(sched, worker, run) if pipelined else None
    for i in range(25):
        prompt = rng.choice(stems) + [rng.randrange(VOCAB) for _ in range(rng.randrange(1, 9))]
        n, max_tokens, rid = rng.choice([1, 1, 2]), rng.randrange(1, 20), f"r{i}"
        sched.add_request(make_request(rid, prompt, max_tokens, n=n, priority=rng.randrange(3)))
        expected.update({(rid, j): reference_tokens(prompt, max_tokens, j) for j in range(n)})
        for _ in range(rng.randrange(0, 4)):
            if pipeline is not None:
                pipeline.step()
            elif sched.has_unfinished():
                step(sched, worker, run)
        if rng.random() < 0.15:
            aborted.add(rid)
            run.collect(sched.abort([rid]))
    run_all(sched, worker, run, pipeline=pipeline)
    if pipelined:
        assert worker.placeholders > 0
    for key, tokens in expected.items():
        if key[0] not in aborted:
            assert tokens == run.tokens[key], key
            assert run.finals[key].finish_reason == "length"
    assert sched.stats()["preemptions"] > 0
    assert_no_leaks(sched)



@pytest.mark.parametrize("policy,expected", [
    ("program_fcfs", ["x1", "x2", "y1", "z1"]),  # the agent's next turn keeps X's place
    ("fcfs", ["x1", "y1", "z1", "x2"]),
])
def test_program_fcfs_serves_a_returning_turn_before_newer_programs(policy, expected) -> None:
    sched, worker = make(max_num_seqs=1, policy=policy)
    for rid, program in (("x1", "job-x"), ("y1", "job-y"), ("z1", "job-z")):
        sched.add_request(make_request(rid, [3, 1, 4, 1, 5], max_tokens=3,
                                       prompt_cache_key=program))
    finished: list[str] = []
    returned = False
    while sched.has_unfinished():
        finished += [o.request_id for o in step(sched, worker) if o.finish_reason]
        if finished == ["x1"] and not returned:
            # x1 ended in a tool call; the tool returned: X's next turn arrives now, after
            # y1 and z1 (y1 has not been scheduled yet: x1 finished in this very step).
            sched.add_request(make_request("x2", [3, 1, 4, 1, 5, 9], max_tokens=3,
                                           prompt_cache_key="job-x"))
            returned = True
    assert finished == expected
    assert_no_leaks(sched)


def eos_at_third(context: list[int], seed_index: int) -> int:
    """A 'model' whose third output is the EOS 999 (prompts here are 5 tokens long)."""
    return 999 if len(context) == 7 else default_next_token(context, seed_index)


def test_async_eos_wastes_one_row_and_frees_everything() -> None:
    """A token in flight that turns out to be EOS: the speculative next row is computed and
    dropped; the outputs equal the synchronous run's, nothing leaks."""
    runs = []
    for pipelined in (False, True):
        sched, worker = make(next_token=eos_at_third)
        for i in range(3):
            sched.add_request(make_request(f"r{i}", [i + 1] * 5, max_tokens=8,
                                           eos_token_ids=[999]))
        pipeline = Pipeline(sched, worker) if pipelined else None
        run = run_all(sched, worker, pipeline=pipeline)
        assert all(f.finish_reason == "stop" for f in run.finals.values())
        assert_no_leaks(sched)
        runs.append((run, worker))
    (sync, _), (pipe, worker) = runs
    assert pipe.tokens == sync.tokens
    assert all(tokens[-1] == 999 and len(tokens) == 3 for tokens in pipe.tokens.values())
    # each sequence's EOS was in flight while its next position was computed
    wasted = [s for out in pipe.steps for s in out.seqs if s.start_pos == 7]
    assert len(wasted) == 3 and worker.placeholders > 0


def test_async_does_not_run_past_max_tokens() -> None:
    """The last token by max_tokens is known to end the sequence: nothing is computed for
    the position after it."""
    sched, worker = make()
    sched.add_request(make_request("r", [1, 2, 3], max_tokens=4))
    run = run_all(sched, worker, pipeline=Pipeline(sched, worker))
    assert run.tokens[("r", 0)] == reference_tokens([1, 2, 3], 4)
    assert max(s.start_pos + len(s.token_ids) for out in run.steps for s in out.seqs) == 3 + 3
    assert_no_leaks(sched)
