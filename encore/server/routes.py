"""HTTP routes. Each ``/v1`` route: API key → engine ready → body → validation → engine."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from encore.server.chat import create_chat_completion
from encore.server.completions import create_completion
from encore.server.errors import APIError
from encore.server.metrics import CONTENT_TYPE
from encore.server.serving import ServingContext, check_api_key, check_ready, read_json

Handler = Callable[[ServingContext, Request, Any, float], Awaitable[Response]]


def _ctx(request: Request) -> ServingContext:
    return request.app.state.ctx


async def _serve(request: Request, handler: Handler) -> Response:
    arrival = time.monotonic()
    ctx = _ctx(request)
    try:
        request.state.tenant = check_api_key(ctx, request)
        check_ready(ctx)
        body = await read_json(ctx, request)
        return await handler(ctx, request, body, arrival)
    except APIError as e:
        ctx.metrics.request_errors.labels(status=str(e.status)).inc()
        raise


def build_router() -> APIRouter:
    router = APIRouter()

    @router.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await _serve(request, create_chat_completion)

    @router.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await _serve(request, create_completion)

    @router.get("/v1/models")
    async def models(request: Request) -> Response:
        ctx = _ctx(request)
        check_api_key(ctx, request)
        check_ready(ctx)
        assert ctx.info is not None
        card = {"id": ctx.model_name, "object": "model", "created": ctx.created,
                "owned_by": "encore", "max_model_len": ctx.info.max_model_len}
        return JSONResponse({"object": "list", "data": [card]})

    @router.get("/health")
    async def health(request: Request) -> Response:
        ctx = _ctx(request)
        if ctx.info is not None and ctx.engine.ready:
            return JSONResponse({"status": "ok"})
        return JSONResponse({"status": "starting" if ctx.info is None else "unavailable"},
                            status_code=503, headers={"Retry-After": "5"})

    @router.get("/metrics")
    async def metrics(request: Request) -> Response:
        return Response(_ctx(request).metrics.exposition(), media_type=CONTENT_TYPE)

    return router
