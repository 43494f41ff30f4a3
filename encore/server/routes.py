"""HTTP routes. Each ``/v1`` route: API key → engine ready → body → validation → engine.

Bodies are parsed by the handlers (so every mistake is an OpenAI error object, not FastAPI's
422); ``/openapi.json`` still describes them: :func:`openapi_schema` adds the request models
of ``schemas.py`` to FastAPI's document, and each route lists its responses.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel

from encore.server.chat import create_chat_completion
from encore.server.completions import create_completion
from encore.server.errors import APIError
from encore.server.metrics import CONTENT_TYPE
from encore.server.responses import create_response, delete_response, get_response
from encore.server.responses_schemas import (
    ResponseDeleted,
    ResponseObject,
    ResponsesRequest,
    ResponseStreamEvent,
)
from encore.server.schemas import (
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Completion,
    CompletionChunk,
    CompletionRequest,
    ErrorResponse,
    HealthStatus,
    ModelList,
)
from encore.server.serving import (
    ServingContext,
    check_api_key,
    check_json_content_type,
    check_ready,
    read_json,
)

Handler = Callable[[ServingContext, Request, Any, float], Awaitable[Response]]

_ERRORS = {
    400: "invalid request: malformed JSON or a bad field value (`param` names it), a prompt "
         "beyond the context, an unsupported option",
    401: "missing or invalid API key (when the server has keys)",
    404: "unknown model, or (responses) an unknown, deleted, expired or other tenant's "
         "response id",
    408: "the request body did not arrive within body_timeout_s",
    413: "body larger than max_body_bytes",
    415: "the body is not application/json",
    429: "the waiting queue has no room for this request's sequences; see Retry-After",
    500: "the engine failed the request",
    503: "the engine is not ready (loading or restarting); see Retry-After",
}


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def _event_stream(chunk: type[BaseModel]) -> dict[str, Any]:
    """``text/event-stream`` whose events (OpenAPI 3.1: ``schema`` describes one event) carry
    a JSON chunk (or an error object, if the engine fails mid-stream), then ``[DONE]``."""
    json_data = {"type": "string", "contentMediaType": "application/json",
                 "contentSchema": {"anyOf": [_ref(chunk), _ref(ErrorResponse)]}}
    return {"text/event-stream": {"schema": {
        "type": "object", "required": ["data"],
        "description": "with stream: true: `data: {chunk}` events, then `data: [DONE]`",
        "properties": {"data": {"anyOf": [{"const": "[DONE]"}, json_data]}}}}}


def _responses(ok: type[BaseModel], errors: tuple[int, ...], *,
               chunk: type[BaseModel] | None = None) -> dict[int | str, dict[str, Any]]:
    """A route's documented responses: ``ok`` (JSON, or with ``chunk`` also a stream) and
    error objects for ``errors``."""
    out: dict[int | str, dict[str, Any]] = {
        code: {"model": ErrorResponse, "description": _ERRORS[code]} for code in errors}
    out[200] = {"model": ok, "description": "OK"}
    if chunk is not None:
        out[200]["content"] = _event_stream(chunk)
    return out


_GENERATE_ERRORS = (400, 401, 404, 408, 413, 415, 429, 500, 503)
# the request model of each POST route, and the stream chunks, which FastAPI does not add to
# /openapi.json by itself (openapi_schema does)
REQUEST_MODELS: dict[str, type[BaseModel]] = {
    "/v1/chat/completions": ChatCompletionRequest,
    "/v1/completions": CompletionRequest,
    "/v1/responses": ResponsesRequest,
}
CHUNK_MODELS = (ChatCompletionChunk, CompletionChunk, ResponseStreamEvent)


def _ctx(request: Request) -> ServingContext:
    return request.app.state.ctx


async def _serve(request: Request, handler: Handler) -> Response:
    arrival = time.monotonic()
    ctx = _ctx(request)
    try:
        request.state.tenant = check_api_key(ctx, request)
        check_ready(ctx)
        check_json_content_type(request)
        body = await read_json(ctx, request)
        return await handler(ctx, request, body, arrival)
    except APIError as e:
        ctx.metrics.request_errors.labels(status=str(e.status)).inc()
        raise


async def _serve_id(request: Request, response_id: str,
                    handler: Callable[[ServingContext, Request, str], Awaitable[Response]]
                    ) -> Response:
    ctx = _ctx(request)
    try:
        request.state.tenant = check_api_key(ctx, request)
        check_ready(ctx)
        return await handler(ctx, request, response_id)
    except APIError as e:
        ctx.metrics.request_errors.labels(status=str(e.status)).inc()
        raise


def build_router() -> APIRouter:
    router = APIRouter()

    @router.post("/v1/chat/completions",
                 responses=_responses(ChatCompletion, _GENERATE_ERRORS,
                                      chunk=ChatCompletionChunk))
    async def chat_completions(request: Request) -> Response:
        """OpenAI chat completions (body: ChatCompletionRequest)."""
        return await _serve(request, create_chat_completion)

    @router.post("/v1/completions",
                 responses=_responses(Completion, _GENERATE_ERRORS, chunk=CompletionChunk))
    async def completions(request: Request) -> Response:
        """OpenAI (legacy) text completions (body: CompletionRequest)."""
        return await _serve(request, create_completion)

    @router.post("/v1/responses",
                 responses=_responses(ResponseObject, _GENERATE_ERRORS,
                                      chunk=ResponseStreamEvent))
    async def responses_create(request: Request) -> Response:
        """OpenAI Responses API: create (body: ResponsesRequest); stream: typed events."""
        return await _serve(request, create_response)

    @router.get("/v1/responses/{response_id}",
                responses=_responses(ResponseObject, (401, 404, 503)))
    async def responses_get(request: Request, response_id: str) -> Response:
        """A stored response of this API key's tenant."""
        return await _serve_id(request, response_id, get_response)

    @router.delete("/v1/responses/{response_id}",
                   responses=_responses(ResponseDeleted, (401, 404, 503)))
    async def responses_delete(request: Request, response_id: str) -> Response:
        """Delete a stored response of this API key's tenant."""
        return await _serve_id(request, response_id, delete_response)

    @router.get("/v1/models", responses=_responses(ModelList, (401, 503)))
    async def models(request: Request) -> Response:
        ctx = _ctx(request)
        check_api_key(ctx, request)
        check_ready(ctx)
        assert ctx.info is not None
        card = {"id": ctx.model_name, "object": "model", "created": ctx.created,
                "owned_by": "encore", "max_model_len": ctx.info.max_model_len}
        return JSONResponse({"object": "list", "data": [card]})

    @router.get("/health", responses={200: {"model": HealthStatus, "description": "ready"},
                                      503: {"model": HealthStatus,
                                            "description": "starting or unavailable"}})
    async def health(request: Request) -> Response:
        ctx = _ctx(request)
        if ctx.info is not None and ctx.engine.ready:
            return JSONResponse({"status": "ok"})
        return JSONResponse({"status": "starting" if ctx.info is None else "unavailable"},
                            status_code=503, headers={"Retry-After": "5"})

    @router.get("/metrics", response_class=Response, responses={200: {
        "description": "Prometheus text format",
        "content": {CONTENT_TYPE.split(";")[0]: {"schema": {"type": "string"}}}}})
    async def metrics(request: Request) -> Response:
        return Response(_ctx(request).metrics.exposition(), media_type=CONTENT_TYPE)

    return router


def openapi_schema(app: FastAPI) -> dict[str, Any]:
    """FastAPI's document plus each POST route's request body (the pydantic models the
    handlers validate with), built once and cached on the app like FastAPI's own."""
    if app.openapi_schema is None:
        spec = get_openapi(title=app.title, version=app.version, routes=app.routes,
                           description="OpenAI-compatible API of Encore; see docs/api.md")
        schemas = spec.setdefault("components", {}).setdefault("schemas", {})
        for model in (*REQUEST_MODELS.values(), *CHUNK_MODELS):
            schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
            schemas.update(schema.pop("$defs", {}))
            schemas[model.__name__] = schema
        for path, model in REQUEST_MODELS.items():
            spec["paths"][path]["post"]["requestBody"] = {
                "required": True, "content": {"application/json": {"schema": _ref(model)}}}
        app.openapi_schema = spec
    return app.openapi_schema
