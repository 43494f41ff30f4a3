"""Detokenizer (UTF-8 safety), stop strings across token boundaries, SSE framing."""

from __future__ import annotations

import pytest

from encore.protocol.messages import RequestOutput
from encore.server.detokenizer import IncrementalDetokenizer
from encore.server.generation import SequenceTracker
from encore.server.sse import DONE, parse_sse, sse_event
from encore.server.stop import StopMatcher
from tests.unit.fake_engine_client import EOS, FakeTokenizer

TEXT = "naïve 🌍 日本語 ok"


def _stream(text: str, stops: list[str] | None = None) -> list[str]:
    tok = FakeTokenizer()
    detok = IncrementalDetokenizer(tok, tok.encode("prompt"))
    pieces = [detok.push(t) for t in tok.encode(text)]
    return pieces + [detok.flush()]


def test_detokenizer_never_splits_a_character() -> None:
    pieces = _stream(TEXT)
    assert "".join(pieces) == TEXT
    assert all("\ufffd" not in p for p in pieces)
    # the 4-byte emoji arrives in one piece, after three empty ones
    assert "🌍" in pieces and pieces.count("") >= 3 + 2 * 3


def test_detokenizer_flush_releases_an_unfinished_character() -> None:
    tok = FakeTokenizer()
    detok = IncrementalDetokenizer(tok)
    assert detok.push("🌍".encode()[0]) == ""
    assert detok.flush() == "\ufffd"


def test_detokenizer_skips_special_tokens() -> None:
    tok = FakeTokenizer()
    detok = IncrementalDetokenizer(tok)
    assert [detok.push(t) for t in [104, 105, EOS]] == ["h", "i", ""]


@pytest.mark.parametrize("pieces,stops,expected", [
    (["Hello E", "N", "D tail"], ["END"], ("Hello ", True)),
    (["a", "b", "c"], ["bc"], ("a", True)),
    (["no match", " here"], ["xyz"], ("no match here", False)),
    (["ab", "x"], ["abc"], ("abx", False)),
    (["one\n", "\ntwo"], ["\n\n", "two"], ("one", True)),
    (["x", "STOP"], ["ST", "STOP"], ("x", True)),
])
def test_stop_strings_across_boundaries(pieces, stops, expected) -> None:
    m = StopMatcher(stops)
    out, matched = "", False
    for p in pieces:
        text, matched = m.feed(p)
        out += text
        if matched:
            break
    if not matched:
        out += m.flush()
    assert (out, matched) == expected


def test_sequence_tracker_stop_string_split_over_multibyte_tokens() -> None:
    tok = FakeTokenizer()
    tracker = SequenceTracker(0, tok, [], ["🌍"])
    ids = tok.encode("hi 🌍 more")
    out = ""
    for t in ids:
        d = tracker.apply(RequestOutput("r", 0, [t]))
        out += d.text
        if tracker.finished:
            break
    assert out == "hi " and tracker.finish_reason == "stop"
    assert tracker.num_tokens == len(tok.encode("hi 🌍"))


def test_sequence_tracker_drops_stop_token_text_and_maps_finish() -> None:
    tok = FakeTokenizer()
    tracker = SequenceTracker(0, tok, [], [])
    d1 = tracker.apply(RequestOutput("r", 0, [104]))
    d2 = tracker.apply(RequestOutput("r", 0, [33], finish_reason="stop", stop_token_id=33))
    assert (d1.text, d2.text, d2.finish_reason) == ("h", "", "stop")


def test_sse_framing() -> None:
    body = sse_event({"a": "é\n"}) + DONE
    assert body.startswith(b"data: {") and body.count(b"\n\n") == 2
    assert parse_sse(body) == [{"a": "é\n"}, "[DONE]"]
