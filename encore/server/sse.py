"""Server-sent events framing and a streaming response that always cleans up.

Each event is ``data: <json>\\n\\n``; a stream ends with ``data: [DONE]\\n\\n``. When the client
goes away, Starlette cancels the body task; :class:`SSEResponse` also closes the body
iterator explicitly so the engine request is aborted at once.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import anyio
from starlette.responses import StreamingResponse
from starlette.types import Send

DONE = b"data: [DONE]\n\n"


def sse_event(payload: dict[str, Any]) -> bytes:
    """One frame. NaN/Infinity are not JSON: refused here (ValueError) as in JSONResponse,
    never sent to a client (server.logprobs keeps logprobs finite)."""
    text = json.dumps(payload, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return b"data: " + text.encode() + b"\n\n"


def parse_sse(raw: bytes | str) -> list[Any]:
    """Decode an SSE body into payloads (``"[DONE]"`` kept as a string); for tests and tools."""
    text = raw.decode() if isinstance(raw, bytes) else raw
    out: list[Any] = []
    for block in text.split("\n\n"):
        if not block.strip():
            continue
        assert block.startswith("data: "), f"bad SSE frame {block[:40]!r}"
        data = block[len("data: "):]
        out.append(data if data == "[DONE]" else json.loads(data))
    return out


class SSEResponse(StreamingResponse):
    """``text/event-stream`` response whose iterator is closed however the stream ends."""

    media_type = "text/event-stream"

    def __init__(self, content: AsyncIterator[bytes]) -> None:
        super().__init__(content, headers={"Cache-Control": "no-cache",
                                           "X-Accel-Buffering": "no"})

    async def stream_response(self, send: Send) -> None:
        try:
            await super().stream_response(send)
        finally:
            closer = getattr(self.body_iterator, "aclose", None)
            if closer is not None:
                with anyio.CancelScope(shield=True):
                    await closer()
