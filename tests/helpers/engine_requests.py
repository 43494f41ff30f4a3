"""Running one request through an in-process engine client in the integration tests."""

from __future__ import annotations

from encore.protocol.messages import EngineRequest


async def run_request(client, request: EngineRequest) -> tuple[list[int], int]:
    """The request's generated tokens and the cached tokens the engine reported for it."""
    tokens: list[int] = []
    cached = 0
    async for out in client.generate(request):
        tokens.extend(out.new_token_ids)
        cached = out.num_cached_tokens
    return tokens, cached
