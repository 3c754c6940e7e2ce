"""The `loramux` console script: `loramux serve [flags]` (more subcommands plug in as one line each).

Flow of `serve`: flags/env -> `ServerSettings` -> engine factory (`server.engine.builder.build_async_engine`,
or the hidden `--engine-factory module:callable` test hook, env LORAMUX_ENGINE_FACTORY) -> `create_app`
-> `server.api.serve.run` (uvicorn with draining SIGTERM; the port opens first, then the engine is
built in the background: /health answers at once, /ready is 503 until the engine is up). Any start-up failure (bad flag value,
model load error, engine start error) is one line on stderr and exit status 2, never a traceback.
A drained shutdown exits 0.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Callable

from server.settings import ServerSettings, add_serve_arguments

EXIT_USAGE = 2


class _OneLineParser(argparse.ArgumentParser):
    """argparse, but an error is a single stderr line (no usage dump) and exit 2."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def _load_factory(spec: str) -> Callable[[ServerSettings], object]:
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"--engine-factory: expected 'module:callable', got {spec!r}")
    return getattr(importlib.import_module(module_name), attr)


def _serve(ns: argparse.Namespace) -> int:
    settings = ServerSettings.from_namespace(ns)
    logging.basicConfig(level=settings.log_level.upper(), format="%(message)s", stream=sys.stderr)
    if settings.replicas > 1 or settings.ray_address:
        from server.cluster.app import run_cluster  # imports Ray; the single server never does

        return run_cluster(settings)
    if settings.engine_factory:
        factory = _load_factory(settings.engine_factory)
    else:
        from server.engine.builder import build_async_engine  # heavy (torch): imported only to serve

        factory = build_async_engine
    from server.api.app import create_app
    from server.api.serve import run

    # The factory runs after the port is open: /health answers at once, /ready is 503 until it is built.
    app = create_app(factory, settings, manage_lifecycle=False)
    error = run(app, settings.host, settings.port, settings.log_level)
    if error:
        print(f"loramux serve: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    return 0


def _add_train_arguments(parser: argparse.ArgumentParser) -> None:
    from server.train.trainer import add_train_arguments, run_train  # torch is imported only for `train`

    add_train_arguments(parser)
    parser.set_defaults(handler=run_train)


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(prog="loramux", description="Multi-LoRA LLM inference server.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_OneLineParser)
    serve = sub.add_parser("serve", help="run the OpenAI-compatible HTTP server")
    add_serve_arguments(serve)
    serve.set_defaults(handler=_serve)
    train = sub.add_parser("train", help="train a LoRA adapter (PEFT format) on the base model")
    _add_train_arguments(train)
    return parser


def main(argv: list[str] | None = None, default_command: str | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if default_command and (not argv or argv[0].startswith("-")) and argv[:1] not in (["-h"], ["--help"]):
        argv.insert(0, default_command)
    parser = build_parser()
    ns = parser.parse_args(argv)
    if getattr(ns, "handler", None) is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        return ns.handler(ns)
    except KeyboardInterrupt:
        return 0
    except Exception as exc:  # start-up failures: one line, no traceback
        message = getattr(exc, "message", None) or str(exc) or type(exc).__name__
        print(f"loramux: error: {' '.join(str(message).split())}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
