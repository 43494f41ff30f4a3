"""The app factory: ``create_app(config, engine)`` → a FastAPI app serving the OpenAI API.

The engine (and the tokenizer) start in the background, so ``/health`` answers 503 while the
model loads. If either fails to start, the app records why and asks the server to stop.
``/openapi.json`` describes the API (no interactive docs are served).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import FastAPI

from encore.configs.model_source import ModelLoadError, resolve_model
from encore.configs.types import EncoreConfig
from encore.protocol.client import EngineClient
from encore.protocol.heap import freeze_startup_heap
from encore.protocol.messages import GrammarVocab
from encore.server.errors import install_handlers
from encore.server.metrics import ServerMetrics
from encore.server.routes import build_router, openapi_schema
from encore.server.serving import ServingContext, max_token_bytes

logger = logging.getLogger("encore.server")

TokenizerLoader = Callable[[EncoreConfig], Any]


def served_model_name(config: EncoreConfig) -> str:
    """The name /v1/models reports: configured, else the one the model source gives."""
    return config.model.served_model_name or resolve_model(config.model).name


def tokenizer_source(config: EncoreConfig) -> str:
    """The tokenizer's file or directory: explicit, else the model's own (GGUF or HF dir)."""
    if config.model.tokenizer:
        return config.model.tokenizer
    resolved = resolve_model(config.model)
    if resolved.load_format in ("dummy", "python"):
        kind = "dummy model" if resolved.load_format == "dummy" else "model plugin"
        raise ModelLoadError(f"a {kind} has no tokenizer: pass --tokenizer PATH")
    return resolved.path


def default_tokenizer_loader(config: EncoreConfig) -> Any:
    from encore.server.tokenizer import load_tokenizer  # lazy: heavy, and tests inject fakes

    return load_tokenizer(tokenizer_source(config))


def create_app(config: EncoreConfig, engine: EngineClient, *, tokenizer: Any = None,
               tokenizer_loader: TokenizerLoader = default_tokenizer_loader,
               stop_on_start_failure: bool = False) -> FastAPI:
    """Build the app. ``app.state.ctx`` is the ServingContext; ``app.state.start_error``
    is set (a one-line reason) if the engine or tokenizer failed to start."""
    ctx = ServingContext(config=config, engine=engine, tokenizer=tokenizer,
                         metrics=ServerMetrics(engine.stats))

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        task = asyncio.create_task(_start(app, ctx, tokenizer_loader, stop_on_start_failure))
        try:
            yield
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            logger.info("shutting down the engine")
            await engine.shutdown()

    app = FastAPI(title="Encore", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url="/openapi.json")
    app.openapi = lambda: openapi_schema(app)  # type: ignore[method-assign]
    app.state.ctx = ctx
    app.state.start_error = None
    install_handlers(app)
    app.include_router(build_router())
    return app


async def _start(app: FastAPI, ctx: ServingContext, tokenizer_loader: TokenizerLoader,
                 stop_on_failure: bool) -> None:
    try:
        if ctx.tokenizer is None:
            logger.info("loading the tokenizer")
            ctx.tokenizer = await asyncio.to_thread(tokenizer_loader, ctx.config)
        logger.info("starting the engine (loading the model)")
        # the prompt-size bound decodes the whole vocabulary: while the model loads
        ctx.max_token_bytes, info = await asyncio.gather(
            asyncio.to_thread(max_token_bytes, ctx.tokenizer), ctx.engine.start())
    except asyncio.CancelledError:
        raise
    except Exception as e:
        app.state.start_error = str(e).splitlines()[0] if str(e) else type(e).__name__
        logger.error("start-up failed: %s", app.state.start_error)
        if stop_on_failure:
            os.kill(os.getpid(), signal.SIGTERM)
        return
    ctx.model_name = (ctx.config.model.served_model_name or info.model_name
                      or served_model_name(ctx.config))
    ctx.info = info
    _send_grammar_vocab(ctx)
    freeze_startup_heap()  # the tokenizer, vocabulary tables, app
    logger.info("ready: model %s, context %d tokens, %d KV blocks of %d on %s (%s)",
                ctx.model_name, info.max_model_len, info.num_device_blocks, info.block_size,
                info.device, info.dtype)


def _send_grammar_vocab(ctx: ServingContext) -> None:
    """Hand the engine the tokenizer that structured outputs' grammars compile against (a
    tokenizer that cannot serialize itself, such as a test fake, leaves them unavailable)."""
    to_json = getattr(ctx.tokenizer, "to_json", None)
    if to_json is None:
        return
    ctx.engine.set_grammar_vocab(GrammarVocab(to_json(), list(ctx.tokenizer.eos_token_ids)))
    ctx.grammar_ready = True
