"""``voxloop serve`` (the agent service) and ``voxloop secrets rotate-key``."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import socket
import sys
from pathlib import Path
from typing import Any

from runtime.cli.common import (
    EXIT_OK,
    CommandError,
    Parser,
    UsageError,
)


def register(sub: Any) -> None:
    p = sub.add_parser("serve", help="run the agent service (REST API)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--data-dir", type=Path, help="SQLite file and key file (VOXLOOP_DATA_DIR)")
    p.add_argument(
        "--database-url",
        help="postgresql://user:pw@host/db or sqlite:///path (VOXLOOP_DATABASE_URL)",
    )
    p.set_defaults(handler=_cmd_serve)

    s = sub.add_parser("secrets", help="manage the encryption of stored secrets")
    s_sub = s.add_subparsers(dest="secrets_command", required=True, parser_class=Parser)
    r = s_sub.add_parser(
        "rotate-key",
        help="add a new primary key, re-encrypt every secret, retire unused keys "
        "(exit 1: some secrets did not open)",
    )
    r.add_argument("--data-dir", type=Path, help="must exist (VOXLOOP_DATA_DIR)")
    r.add_argument("--database-url", help="as for serve (VOXLOOP_DATABASE_URL)")
    r.set_defaults(handler=_cmd_rotate_key)


def _server_settings(args: argparse.Namespace) -> Any:
    from runtime.server.app import settings_from_env

    return settings_from_env(os.environ, data_dir=args.data_dir, database_url=args.database_url)


def _cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from runtime.server.app import check_database, create_app
    from runtime.server.secrets import SecretError
    from runtime.server.store import StoreError

    if not 0 <= args.port <= 65535:
        raise UsageError("--port must be between 0 and 65535")
    try:
        settings = _server_settings(args)
    except (ValueError, SecretError) as exc:
        raise UsageError(str(exc)) from None
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    try:  # the database is reachable and migrated before "listening" is printed
        asyncio.run(check_database(settings))
    except StoreError as exc:
        raise UsageError(str(exc)) from None
    from runtime.server.logs import configure

    configure(logging.INFO if args.verbose else logging.WARNING)
    config = uvicorn.Config(
        create_app(settings), host=args.host, port=args.port, log_level="warning",
        access_log=False, lifespan="on", log_config=None,
    )  # fmt: skip
    server = uvicorn.Server(config)

    # Bind before serving: clients may connect as soon as the address is printed.
    family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((args.host, args.port))
    except OSError as exc:
        sock.close()
        raise CommandError(f"cannot listen on {args.host}:{args.port}: {exc.strerror}") from None
    # Accepted connections inherit this on Linux; without it a keep-alive client waits
    # for a delayed ACK (~40 ms) on every response.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.listen(128)
    host = f"[{args.host}]" if family == socket.AF_INET6 else args.host
    print(f"voxloop serve listening on http://{host}:{sock.getsockname()[1]}", flush=True)
    with sock:
        asyncio.run(server.serve(sockets=[sock]))
    return EXIT_OK


def _cmd_rotate_key(args: argparse.Namespace) -> int:
    from runtime.server.rotation import RotationError, rotate_command

    try:
        return asyncio.run(
            rotate_command(
                os.environ, sys.stdout, data_dir=args.data_dir, database=args.database_url
            )
        )
    except RotationError as exc:
        raise UsageError(str(exc)) from None
