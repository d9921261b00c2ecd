"""The ``callrouter`` command: ``serve``, ``engine-info``, ``check-config``, and the
management subcommands (``numbers``, ``trunks``, ``assistants``, ``keys``) from
``cli_client``."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from callrouter import __version__, cli_client, config
from callrouter.errors import CallrouterError, ConfigError, EngineError
from callrouter.sip.info import EngineInfo, read_engine_info


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="callrouter", description=__doc__)
    parser.add_argument("--version", action="version", version=f"callrouter {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the router (SIP + HTTP API)")
    serve.add_argument("--config", type=Path, help="TOML file (see config/callrouter.toml)")
    check = sub.add_parser("check-config", help="validate the configuration and print it")
    check.add_argument("--config", type=Path)
    sub.add_parser("engine-info", help="print the SIP engine's version and compiled limits")
    cli_client.register(sub)
    return parser


def _load(path: Path | None) -> tuple[config.Config, EngineInfo]:
    info = read_engine_info()
    cfg = config.load(os.environ, path, engine_max_calls=info.max_calls)
    return cfg, info


def _serve(args: argparse.Namespace) -> int:
    cfg, info = _load(args.config)
    try:
        importlib.import_module("pjsua2")  # only serve loads the engine
    except ImportError as exc:  # e.g. its shared library is missing
        raise EngineError(f"cannot load the SIP engine {info.module_path}: {exc}") from exc
    from callrouter import app, logs

    logs.configure(cfg.log.format, cfg.log.level)
    return app.serve(cfg, info)


def _check_config(args: argparse.Namespace) -> int:
    cfg, _ = _load(args.config)
    print(cfg)
    return 0


def _engine_info(args: argparse.Namespace) -> int:
    print("\n".join(read_engine_info().lines()))
    return 0


COMMANDS = {"serve": _serve, "check-config": _check_config, "engine-info": _engine_info}


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    handler = COMMANDS.get(args.command) or args.func
    try:
        return int(handler(args))
    except ConfigError as exc:
        print(f"callrouter: {exc}", file=sys.stderr)
        return 2
    except CallrouterError as exc:
        print(f"callrouter: {exc.message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
