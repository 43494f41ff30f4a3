"""Constrained decoding without a model: the grammar cache, the engine's matchers and bitmasks
(scheduler + a fake worker that obeys the mask), the sampler's mask, and P0's grammars."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from encore.configs.types import CacheConfig, SchedulerConfig
from encore.grammar import GrammarError, Vocab, check_grammar, compile_grammar
from encore.protocol.messages import GrammarSpec, GrammarVocab, ModelRunnerOutput
from encore.scheduler.grammars import Grammars
from encore.scheduler.scheduler import Scheduler
from encore.server.schemas import ChatCompletionRequest
from encore.server.structured import chat_grammar
from encore.worker.sampler import Sampler, apply_token_bitmask, make_state, unpack_bitmask
from tests.helpers.tiny_models import EOS_ID, build_tokenizer
from tests.unit.fake_worker import VOCAB, FakeWorker, Pipeline, make_request, run_all, step
from tests.unit.test_scheduler import assert_no_leaks

BS = 4
OK_SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
             "additionalProperties": False}


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def vocab_msg(tokenizer) -> GrammarVocab:
    return GrammarVocab(tokenizer.to_str(), [EOS_ID])


def rows_of(grammar) -> dict[str, np.ndarray]:
    """seq id -> allowed token ids of a GrammarBitmask."""
    words = np.frombuffer(grammar.data, dtype="<i4").reshape(-1, grammar.words)
    bits = np.unpackbits(words.view(np.uint8), axis=1, bitorder="little")
    return {sid: np.nonzero(bits[i])[0] for i, sid in enumerate(grammar.seq_ids)}


class MaskedWorker(FakeWorker):
    """The fake model, with the step's grammar masks applied: a constrained sequence takes
    the allowed token closest to what the fake model picked."""

    def __init__(self, *args, **kw) -> None:
        super().__init__(*args, **kw)
        self.masked = 0

    def execute(self, out):
        res = super().execute(out)
        allowed = rows_of(out.grammar) if out.grammar is not None else {}
        for i, sid in enumerate(res.seq_ids):
            if sid in allowed:
                tok = int(min(allowed[sid], key=lambda t: abs(int(t) - res.sampled_token_ids[i])))
                res.sampled_token_ids[i] = tok
                self.state[sid].tokens[-1] = tok
                self.masked += 1
        return res


def make_sched(tokenizer, num_blocks: int = 64) -> tuple[Scheduler, MaskedWorker]:
    sched = Scheduler.build(CacheConfig(block_size=BS),
                            SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64),
                            num_device_blocks=num_blocks, max_model_len=256)
    sched.grammars = Grammars(VOCAB)
    sched.grammars.set_vocab(vocab_msg(tokenizer))
    return sched, MaskedWorker(num_blocks, BS)


def wait_compiled(sched: Scheduler) -> list:
    for _, fut in list(sched.compiling.values()):
        fut.exception(timeout=30)
    return sched.poll_grammars()


def test_grammar_cache_compiles_a_schema_once_and_wakes_the_loop(tokenizer) -> None:
    grammars = Grammars(VOCAB)
    woken = []
    grammars.wake = lambda: woken.append(1)
    grammars.set_vocab(vocab_msg(tokenizer))
    spec = GrammarSpec("json_schema", json.dumps(OK_SCHEMA))
    first = grammars.compile(spec)
    assert grammars.compile(GrammarSpec("json_schema", json.dumps(OK_SCHEMA))) is first
    first.result(timeout=30)
    other = grammars.compile(GrammarSpec("json_object"))
    other.result(timeout=30)
    assert grammars.compiles == 2 and len(woken) == 2
    bad = grammars.compile(GrammarSpec("lark", "start: ("))
    with pytest.raises(GrammarError):
        bad.result(timeout=30)
    assert grammars.compile(GrammarSpec("lark", "start: (")) is not bad  # failures are retried
    grammars.shutdown()


@pytest.mark.parametrize("pipelined", [False, True], ids=["sync", "async"])
def test_constrained_requests_match_their_grammar_and_stop_when_it_completes(
        tokenizer, pipelined: bool) -> None:
    """Asynchronously scheduled too: the unconstrained sequences run ahead of their tokens,
    the constrained ones wait for theirs (their next mask needs them)."""
    sched, worker = make_sched(tokenizer)
    spec = GrammarSpec("json_schema", json.dumps(OK_SCHEMA))
    constrained = make_request("a", [5, 6, 7, 8, 9], max_tokens=40, n=2, eos_token_ids=[EOS_ID])
    assert sched.add_request(_with(constrained, spec)) == []
    assert sched.add_request(make_request("b", [5, 6, 7, 8, 9], max_tokens=40, n=2)) == []
    assert sched.stats()["num_waiting"] == 4
    out = sched.schedule()  # "a" still compiles (or just did): only "b" runs
    assert {s.seq_id for s in out.seqs} == {"b#0", "b#1"} and out.grammar is None
    sched.update_from_output(out, worker.execute(out))
    assert wait_compiled(sched) == []
    run = run_all(sched, worker, pipeline=Pipeline(sched, worker) if pipelined else None)
    for i in range(2):
        text = tokenizer.decode(run.tokens[("a", i)])
        assert json.loads(text) in ({"ok": True}, {"ok": False})
        assert run.finals[("a", i)].finish_reason == "stop"
        assert run.finals[("b", i)].finish_reason == "length"  # unconstrained: no eos here
    assert worker.masked == sum(len(run.tokens[("a", i)]) for i in range(2))
    assert_no_leaks(sched)
    if pipelined:
        assert worker.placeholders > 0
        assert not any(s.seq_id.startswith("a") and -1 in s.token_ids
                       for out in run.steps for s in out.seqs)


def _with(req, spec):
    req.grammar = spec
    return req


def test_a_grammar_that_cannot_finish_in_max_tokens_ends_with_length(tokenizer) -> None:
    sched, worker = make_sched(tokenizer)
    long = {"type": "object", "properties": {"s": {"type": "string", "minLength": 50}},
            "required": ["s"]}
    sched.add_request(_with(make_request("a", [1, 2, 3], max_tokens=5),
                            GrammarSpec("json_schema", json.dumps(long))))
    wait_compiled(sched)
    run = run_all(sched, worker)
    assert run.finals[("a", 0)].finish_reason == "length" and len(run.tokens[("a", 0)]) == 5
    assert_no_leaks(sched)


def test_abort_while_compiling_and_a_failed_compile_leak_nothing(tokenizer) -> None:
    sched, worker = make_sched(tokenizer)
    sched.add_request(_with(make_request("a", [1, 2, 3]), GrammarSpec("json_object")))
    sched.add_request(_with(make_request("bad", [1, 2, 3], n=2), GrammarSpec("lark", "start: (")))
    aborted = sched.abort(["a"])
    assert [o.finish_reason for o in aborted] == ["abort"]
    failed = wait_compiled(sched)
    assert [(o.request_id, o.finish_reason) for o in failed] == [("bad", "error")] * 2
    assert "grammar" in (failed[0].error or "")
    step(sched, worker)
    assert_no_leaks(sched)


def test_a_token_outside_the_grammar_is_an_error_not_a_crash(tokenizer) -> None:
    sched, worker = make_sched(tokenizer)
    sched.add_request(_with(make_request("a", [1, 2, 3], max_tokens=8), GrammarSpec("json_object")))
    wait_compiled(sched)
    out = sched.schedule()
    res = FakeWorker.execute(worker, out)  # ignores the mask
    res = ModelRunnerOutput(step_id=res.step_id, seq_ids=res.seq_ids,
                            sampled_token_ids=[tokenizer.token_to_id("a")])
    outputs = sched.update_from_output(out, res)
    assert outputs[0].finish_reason == "error" and "not allowed" in outputs[0].error
    run_all(sched, worker)
    assert_no_leaks(sched)


def test_apply_token_bitmask_masks_exactly_the_cleared_bits() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 70)
    mask = torch.zeros(2, 2, dtype=torch.int32)  # 64 bits: tokens 64..69 are always masked
    mask[0, 0] = 1 << 3
    mask[1, 1] = -(2**31)  # bit 31 of word 1: token 63
    before = logits.clone()
    apply_token_bitmask(logits, mask)
    assert torch.isfinite(logits).nonzero().tolist() == [[0, 3], [1, 63]]
    assert logits[0, 3] == before[0, 3] and logits[1, 63] == before[1, 63]


def test_host_and_device_unpacking_agree() -> None:
    words = torch.from_numpy(np.random.default_rng(0).integers(
        -(2**31), 2**31, size=(3, 5), dtype=np.int64).astype(np.int32))
    host = unpack_bitmask(words, on_host=True)
    assert torch.equal(host, unpack_bitmask(words, on_host=False))
    assert host[1, 37].item() == bool((int(words[1, 1]) >> 5) & 1)


def test_sampler_applies_the_step_bitmask_by_sequence_id(tokenizer) -> None:
    grammars = Grammars(320)
    grammars.set_vocab(GrammarVocab(tokenizer.to_str(), [EOS_ID]))
    compiled = grammars.compile(GrammarSpec("json_object")).result(timeout=30)
    bitmask = grammars.bitmask([("s2", compiled.matcher())])
    sampler = Sampler(0, torch.device("cpu"))
    states = [make_state(p, [1], None, [EOS_ID], 0, torch.device("cpu"))
              for p in (make_request("x", [1]).sampling,) * 3]
    logits = torch.zeros(3, 320)
    logits[:, 7] = 10.0  # what an unconstrained row picks
    ids, _ = sampler(logits, states, grammar=bitmask, seq_ids=["s0", "s1", "s2"])
    assert ids[:2] == [7, 7] and tokenizer.decode([ids[2]]).startswith("{")


def test_check_grammar_names_unsupported_and_invalid_schemas() -> None:
    check_grammar(GrammarSpec("json_schema", json.dumps(OK_SCHEMA)))
    with pytest.raises(GrammarError) as e:
        check_grammar(GrammarSpec("json_schema", json.dumps({"not": {"type": "string"}})))
    assert e.value.unsupported and "not" in str(e.value)
    with pytest.raises(GrammarError) as e:
        check_grammar(GrammarSpec("json_schema", json.dumps({"type": "foo"})))
    assert not e.value.unsupported and "foo" in str(e.value)


TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "unit": {"$ref": "#/$defs/U"}},
    "required": ["city", "unit"], "$defs": {"U": {"enum": ["c", "f"]}}}}},
    {"type": "function", "function": {"name": "noop"}}]


@pytest.mark.parametrize(("parser", "choice", "good", "bad"), [
    ("hermes", "required",
     '<tool_call>\n{"name":"get_weather","arguments":{"city":"Oslo","unit":"c"}}\n</tool_call>',
     "hello"),
    ("hermes", {"type": "function", "function": {"name": "noop"}},
     '<tool_call>\n{"name":"noop","arguments":{}}\n</tool_call>',
     '<tool_call>\n{"name":"get_weather"'),
    ("hermes", "auto", 'Sure. <tool_call>\n{"name":"noop","arguments":{}}\n</tool_call>',
     '<tool_call>\n{"name":"get_weather","arguments":{"city":"Oslo","unit":"k"}}'),
    ("llama3_json", "required", '{"name":"noop","parameters":{}}', "text"),
])
def test_tool_grammars_accept_what_the_parser_reads(tokenizer, parser, choice, good, bad) -> None:
    tools = [dict(t, function={**t["function"], "strict": choice == "auto"}) for t in TOOLS]
    req = ChatCompletionRequest.model_validate({
        "messages": [{"role": "user", "content": "hi"}], "tools": tools, "tool_choice": choice})
    spec = chat_grammar(req, parser)
    assert spec is not None and spec.kind == "lark"
    compiled = compile_grammar(Vocab(tokenizer.to_str(), 320, [EOS_ID]), spec)
    ok, no = compiled.matcher(), compiled.matcher()
    assert all(ok.accept(t) for t in tokenizer.encode(good).ids)
    assert ok.accept(EOS_ID)
    assert not all(no.accept(t) for t in tokenizer.encode(bad).ids + [EOS_ID])


def test_chat_grammar_of_response_formats() -> None:
    def grammar(**body):
        return chat_grammar(ChatCompletionRequest.model_validate(
            {"messages": [{"role": "user", "content": "hi"}], **body}), "hermes")

    assert grammar() is None and grammar(response_format={"type": "text"}) is None
    assert grammar(response_format={"type": "json_object"}) == GrammarSpec("json_object")
    spec = grammar(response_format={"type": "json_schema",
                                    "json_schema": {"name": "x", "schema": OK_SCHEMA}})
    assert spec.kind == "json_schema" and json.loads(spec.spec) == OK_SCHEMA
    assert grammar(tools=TOOLS) is None  # auto, not strict: free text, parsed afterwards
