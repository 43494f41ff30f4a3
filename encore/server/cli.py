"""The ``encore`` command: ``encore serve`` (the HTTP daemon) and ``encore generate`` (offline).

Every config field is a flag (``--kebab-case``; booleans as ``--x/--no-x``; list fields
repeatable), an ``ENCORE_*`` variable, or a preset key. Precedence, lowest first: defaults <
preset (``--config FILE`` or a name from ``configs/presets/``) < environment < flags.
A bad value prints one line naming the field and exits with code 2.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn

from encore.configs.fields import ConfigError, field_types
from encore.configs.loading import build_config, env_var_name, field_registry
from encore.configs.model_source import ModelLoadError, resolve_model
from encore.configs.types import EncoreConfig

PRESET_DIR = Path(__file__).resolve().parent.parent / "configs" / "presets"


def fail(message: str) -> NoReturn:
    print(f"encore: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def load_preset(spec: str | None) -> dict[str, Any]:
    """A preset mapping from a YAML file path or a preset name; fail(…) if unusable."""
    if not spec:
        return {}
    import yaml

    path = Path(spec)
    if not path.is_file():
        path = PRESET_DIR / f"{spec}.yaml"
    if not path.is_file():
        fail(f"--config {spec!r} is neither a file nor a preset; presets: {preset_names()}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        fail(f"cannot parse {path}: {str(e).splitlines()[0]}")
    if not isinstance(data, dict):
        fail(f"{path} must hold a mapping of config fields")
    return data


def _choices(tp: Any) -> str:
    inner = [a for a in typing.get_args(tp) if a is not type(None)] or [tp]
    if typing.get_origin(inner[0]) is typing.Literal:
        return f" (one of: {', '.join(map(str, typing.get_args(inner[0])))})"
    return ""


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per config field, grouped by section; defaults suppressed (only given flags
    become overrides)."""
    groups: dict[str, argparse._ArgumentGroup] = {}
    for name, (section, cls, f) in field_registry().items():
        if section not in groups:
            groups[section] = parser.add_argument_group(f"{section} options")
        tp = field_types(cls)[name]
        help_text = (f"{f.metadata.get('help', '')}{_choices(tp)} "
                     f"[env {env_var_name(name)}; default {_default_text(f)}]")
        flag = "--" + name.replace("_", "-")
        kw: dict[str, Any] = {"dest": name, "default": argparse.SUPPRESS, "help": help_text}
        if tp is bool:
            groups[section].add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        elif f.metadata.get("repeat"):
            names = [flag] + (["--api-key"] if name == "api_keys" else [])
            groups[section].add_argument(*names, action="append", metavar="VALUE", **kw)
        else:
            groups[section].add_argument(flag, metavar="VALUE", **kw)


def _default_text(f: Any) -> str:
    import dataclasses

    if f.default is not dataclasses.MISSING:
        return repr(f.default)
    return repr(f.default_factory())


def resolve_config(args: argparse.Namespace, env: Mapping[str, str] | None = None) -> EncoreConfig:
    """defaults < preset < env < flags; fail(…) with one line on a bad value."""
    registry = field_registry()
    overrides = {k: v for k, v in vars(args).items() if k in registry}
    try:
        config = build_config(load_preset(getattr(args, "config", None)),
                              os.environ if env is None else env, overrides)
        resolve_model(config.model)  # a missing or unsupported model is a one-line error now
        _check_keys_file(config)
    except (ConfigError, ModelLoadError, ValueError) as e:
        fail(str(e))
    return config


def _check_keys_file(config: EncoreConfig) -> None:
    """An unreadable ``api_keys_file`` is a one-line error at start-up (ValueError)."""
    from encore.server.serving import api_keys

    api_keys(config.server)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="encore", description="Encore: an OpenAI-compatible "
                                     "LLM server that remembers KV cache.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = sub.add_parser("serve", help="run the OpenAI-compatible HTTP server")
    serve.add_argument("--config", metavar="FILE|PRESET",
                       help=f"YAML preset file or preset name ({', '.join(preset_names())})")
    add_config_flags(serve)
    gen = sub.add_parser("generate", help="complete one prompt offline and print it")
    gen.add_argument("--prompt", required=True, help="the prompt text")
    gen.add_argument("--max-tokens", type=int, default=64, help="tokens to generate")
    gen.add_argument("--temperature", type=float, default=0.0, help="sampling temperature")
    gen.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling")
    gen.add_argument("--chat", action=argparse.BooleanOptionalAction, default=True,
                     help="wrap the prompt in the model's chat template")
    gen.add_argument("--config", metavar="FILE|PRESET", help="YAML preset file or preset name")
    add_config_flags(gen)
    return parser


def setup_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    config = resolve_config(args)
    setup_logging(config.server.log_level)
    if args.command == "serve":
        return serve(config)
    return asyncio.run(generate(config, args))


def serve(config: EncoreConfig) -> int:
    """Run the daemon until SIGTERM/SIGINT; drain running requests; 0 on a clean stop."""
    import uvicorn

    from encore.protocol.mp_client import MPEngineClient
    from encore.server.app import create_app, served_model_name

    engine = MPEngineClient(config, model_name=served_model_name(config))

    class _Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            engine.begin_shutdown()  # from now on nothing is restarted
            super().handle_exit(sig, frame)
            # uvicorn re-raises captured signals after draining; a drained stop is a clean exit
            self._captured_signals.clear()

    app = create_app(config, engine, stop_on_start_failure=True)
    server = _Server(uvicorn_config(config, app))
    server.run()
    if app.state.start_error:
        print(f"encore: could not start: {app.state.start_error}", file=sys.stderr)
        return 1
    return 0


def uvicorn_config(config: EncoreConfig, app: Any) -> Any:
    """uvicorn's settings for ``app``: address, drain budget, and the connection limit and
    timeouts that keep slow or idle clients from holding sockets (docs/operations.md,
    "Connections and timeouts")."""
    import uvicorn

    s = config.server
    return uvicorn.Config(
        app, host=s.host, port=s.port, log_level=s.log_level, access_log=False,
        timeout_graceful_shutdown=max(1, int(s.drain_timeout_s)),
        http=_h11_with_header_timeout(s.header_timeout_s),
        limit_concurrency=s.max_connections + 1,  # uvicorn counts the new connection too
        timeout_keep_alive=s.keep_alive_timeout_s,  # type: ignore[arg-type]  # float is fine
        h11_max_incomplete_event_size=s.max_header_bytes)


def _h11_with_header_timeout(timeout_s: float) -> type:
    """uvicorn's h11 protocol with a deadline for each request head. uvicorn only times out
    idle keep-alive connections; a client that connects and then sends its headers a byte at
    a time (slowloris), or nothing at all, would hold its socket forever."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeaderTimeoutH11(H11Protocol):
        """Closes a connection that has not sent a whole request line and headers within
        ``timeout_s`` of connecting or of its previous response."""

        _head_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._arm()

        def on_response_complete(self) -> None:
            self._arm()  # first: a pipelined next request is handled (and disarms) in super()
            super().on_response_complete()

        def handle_events(self) -> None:
            super().handle_events()
            if self.conn.their_state is not h11.IDLE:  # a whole request head has arrived
                self._disarm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            self._disarm()
            self._head_timer = self.loop.call_later(timeout_s, self._head_timed_out)

        def _disarm(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_timed_out(self) -> None:
            self._head_timer = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self.transport.close()

    return HeaderTimeoutH11


async def generate(config: EncoreConfig, args: argparse.Namespace) -> int:
    """Offline completion through the same engine client the server uses."""
    from encore.protocol.client import EngineError
    from encore.protocol.messages import EngineRequest, SamplingParams
    from encore.protocol.mp_client import MPEngineClient
    from encore.server.app import default_tokenizer_loader, served_model_name
    from encore.server.generation import SequenceTracker

    log = logging.getLogger("encore.generate")
    log.info("loading the tokenizer")
    tok = default_tokenizer_loader(config)
    engine = MPEngineClient(config, model_name=served_model_name(config))
    log.info("starting the engine (loading the model)")
    try:
        info = await engine.start()
        text = args.prompt
        if args.chat:
            text = tok.apply_chat_template([{"role": "user", "content": text}])
        ids = tok.encode(text, add_special_tokens=not args.chat)
        budget = max(1, min(args.max_tokens, info.max_model_len - len(ids)))
        sampling = SamplingParams(temperature=args.temperature, top_p=args.top_p,
                                  max_tokens=budget)
        req = EngineRequest("generate-0", ids, sampling, 0.0, list(tok.eos_token_ids))
        tracker = SequenceTracker(0, tok, ids, [])
        async for out in engine.generate(req):
            sys.stdout.write(tracker.apply(out).text)
            sys.stdout.flush()
        sys.stdout.write("\n")
        return 0
    except EngineError as e:
        print(f"encore: error: {e}", file=sys.stderr)
        return 1
    finally:
        await engine.shutdown()


if __name__ == "__main__":
    sys.exit(main())
