"""Chunk reuse through the real server and the official openai client: documents marked as
chunks are stored by one request and blended into another that has them in another order
after other text."""

from __future__ import annotations

from tests.e2e.e2e_server import metric

DOCS = [
    "The lighthouse on Cape Arven was built in 1871 from granite quarried on the island. "
    "Its lamp burned whale oil until 1903, then kerosene, and was electrified in 1952. " * 3,
    "Arven Island has about four hundred residents. Most of them fish for cod and herring, "
    "and a ferry connects the island to the mainland twice a day in summer. " * 3,
]


def chunk(text: str) -> dict:
    return {"type": "text", "text": text, "prompt_cache_breakpoint": {"mode": "chunk"}}


def test_chunks_stored_then_blended_in_another_order(server, client, model) -> None:
    hits_before = metric(server, "encore:chunk_hit_tokens_total")
    first = client.chat.completions.create(
        model=model, max_tokens=4, temperature=0,
        messages=[{"role": "system", "content": "Answer from the documents."},
                  {"role": "user", "content": [chunk(DOCS[0]), chunk(DOCS[1]),
                                               {"type": "text", "text": "When was it built?"}]}])
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    second = client.chat.completions.create(
        model=model, max_tokens=4, temperature=0,
        messages=[{"role": "user", "content": [
            {"type": "text", "text": "Read these notes first."}, chunk(DOCS[1]),
            chunk(DOCS[0]), {"type": "text", "text": "How many people live there?"}]}])
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert 100 < cached < second.usage.prompt_tokens  # both documents, less 15%
    assert second.choices[0].message.content
    assert metric(server, "encore:chunk_hit_tokens_total") - hits_before > cached
    assert metric(server, "encore:chunk_queries_total") >= 4
