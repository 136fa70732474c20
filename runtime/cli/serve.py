"""``voxloop serve`` (the agent service) and ``voxloop secrets rotate-key``."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
from pathlib import Path
from typing import Any

from runtime.cli.common import (
    EXIT_OK,
    CommandError,
    Parser,
    UsageError,
)

SERVE_SETTINGS = """\
settings (environment variables; flags override the first three):
  VOXLOOP_API_KEYS        comma-separated keys that may call the API (required)
  VOXLOOP_DATA_DIR        directory for the SQLite database and the key file
                          (default: ./voxloop-data; --data-dir)
  VOXLOOP_DATABASE_URL    postgresql://user:pw@host/db or sqlite:///path
                          (default: SQLite in the data directory; --database-url)
  VOXLOOP_SECRET_KEY      key ring for stored secrets (default: DATA_DIR/secret.key)
  VOXLOOP_LLM_BASE_URL    the OpenAI-compatible endpoint of sessions that name no llm
  VOXLOOP_LLM_MODEL       its model (both are needed for such sessions; without them a
                          session must bring its own llm, or it is refused: invalid_config)
  VOXLOOP_LLM_API_KEY     its key (optional)
  VOXLOOP_ALLOW_PRIVATE_ENDPOINTS
                          1 (any private address) or comma-separated hosts/CIDRs that
                          endpoints may use (a loopback VOXLOOP_LLM_BASE_URL needs it)
  VOXLOOP_STATIC_HOSTS    JSON {"host": ["address", …]} answered instead of DNS
  (realtime limits and engines: VOXLOOP_MAX_SESSIONS, VOXLOOP_STT, VOXLOOP_TTS,
  VOXLOOP_STT_BASE_URL, … in the deployment docs)

realtime: the Voice Agent WebSocket is ws://HOST:PORT/v1/ws (voxloop connect
ws://HOST:PORT); the speech engines load when the server starts ("speech engines
ready" log line), and GET /readyz answers 503 until they are ready.

logs: JSON lines on stderr: start, one "request" line per request (method, path,
status, duration_ms, request_id), errors with a structured "exception", and a
"shutdown" line. SIGTERM or Ctrl-C stops the server cleanly (exit 0).

public routes (no key): / , /healthz (liveness), /readyz (readiness), /health,
/docs , /openapi.json
"""


def register(sub: Any) -> None:
    p = sub.add_parser(
        "serve",
        help="run the agent service (REST API and realtime WebSocket)",
        description="Run the agent service: a REST API for agents, temporary tokens and voices, "
        "and the Voice Agent WebSocket at /v1/ws.",
        epilog=SERVE_SETTINGS,
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=8080, help="port to listen on (0: any free port)")
    p.add_argument(
        "--data-dir", type=Path, help="SQLite file and key file (default: $VOXLOOP_DATA_DIR)"
    )
    p.add_argument(
        "--database-url",
        help="postgresql://user:pw@host/db or sqlite:///path (default: $VOXLOOP_DATABASE_URL)",
    )
    p.add_argument("--no-access-log", action="store_true", help="no log line per request")
    p.add_argument(
        "--workers", type=int, default=1,
        help="worker processes on the one port (default: 1); more than one needs "
        "VOXLOOP_REDIS_URL so a session resumes and a token is redeemed on any of them",
    )  # fmt: skip
    p.add_argument(
        "--drain-timeout", type=float, default=30.0, metavar="S",
        help="on SIGTERM, how long live sessions may finish their reply before they are "
        "handed off to resume elsewhere (default: 30)",
    )  # fmt: skip
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

    from runtime.agents.secrets import SecretError
    from runtime.agents.store import StoreError
    from runtime.server.app import check_database, create_app

    if not 0 <= args.port <= 65535:
        raise UsageError("--port must be between 0 and 65535")
    if not 1 <= args.workers <= 64:
        raise UsageError("--workers must be from 1 to 64")
    if not 0 <= args.drain_timeout <= 3600:
        raise UsageError("--drain-timeout must be from 0 to 3600 seconds")
    if args.workers > 1 and not os.environ.get("VOXLOOP_REDIS_URL", "").strip():
        raise UsageError(
            f"--workers {args.workers} needs VOXLOOP_REDIS_URL (redis://host:6379/0): without "
            "shared state a session dropped on one worker cannot resume on another"
        )
    directory = args.data_dir or Path(os.environ.get("VOXLOOP_DATA_DIR") or "voxloop-data")
    try:
        directory.mkdir(parents=True, exist_ok=True)
        settings = _server_settings(args)
    except OSError as exc:
        raise UsageError(
            f"data directory {directory}: {exc.strerror} (set --data-dir or VOXLOOP_DATA_DIR)"
        ) from None
    except (ValueError, SecretError) as exc:
        raise UsageError(str(exc)) from None
    try:  # the database is reachable and migrated before "listening" is printed
        asyncio.run(check_database(settings))
    except StoreError as exc:
        raise UsageError(str(exc)) from None
    # Bound before the app is built (its log lines would come before a refusal) and before
    # serving: clients may connect as soon as the address is printed.
    family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    try:
        socks = listening_sockets(family, args.host, args.port, args.workers)
    except OSError as exc:
        raise CommandError(f"cannot listen on {args.host}:{args.port}: {exc.strerror}") from None
    sock = socks[0]
    from runtime.server.logs import configure

    configure(logging.INFO)
    logging.getLogger("voxloop").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    # Migration chatter only with -v.
    logging.getLogger("alembic").setLevel(logging.INFO if args.verbose else logging.WARNING)
    if args.no_access_log:
        logging.getLogger("voxloop.access").setLevel(logging.WARNING)
    from runtime.server.http import GuardedH11Protocol, TransportWebSocketProtocol
    from runtime.server.worker import WorkerServer

    os.environ["VOXLOOP_DRAIN_TIMEOUT"] = str(args.drain_timeout)
    settings = dataclasses.replace(settings, drain_timeout_s=args.drain_timeout)
    if args.workers > 1:
        # Each spawned worker builds its app from the environment, as this process did.
        os.environ["VOXLOOP_DATA_DIR"] = str(settings.data_dir)
        os.environ["VOXLOOP_DATABASE_URL"] = settings.database_url
        if args.no_access_log:
            os.environ["VOXLOOP_NO_ACCESS_LOG"] = "1"
        config = uvicorn.Config(
            "runtime.server.worker:app_from_env", factory=True, workers=args.workers,
            host=args.host, port=args.port, log_level="warning", access_log=False,
            lifespan="on", log_config=None, http=GuardedH11Protocol,
            ws=TransportWebSocketProtocol,
        )  # fmt: skip
    else:
        config = uvicorn.Config(
            create_app(settings), host=args.host, port=args.port, log_level="warning",
            access_log=False, lifespan="on", log_config=None, http=GuardedH11Protocol,
            ws=TransportWebSocketProtocol,
        )  # fmt: skip
    server = WorkerServer(config)

    host = f"[{args.host}]" if family == socket.AF_INET6 else args.host
    url = f"http://{host}:{sock.getsockname()[1]}"
    print(f"voxloop serve listening on {url}", flush=True)
    log = logging.getLogger("voxloop.server")
    from runtime.speech.engines.registry import missing_engines

    engines = (
        "unavailable" if missing_engines(settings.stt_engine, settings.tts_engine) else ("loading")
    )
    log.info("started", extra={
        "url": url, "workers": args.workers, "realtime": url.replace("http", "ws", 1) + "/v1/ws",
        "speech_engines": engines, "readiness": "/readyz",
    })  # fmt: skip
    if args.workers > 1:
        from runtime.server.worker import Supervisor
        from runtime.sessions.metrics import MULTIPROC_ENV

        # The workers of this run write their metrics to files in a directory of its own,
        # so that a scrape answered by any of them reports the sum over all of them.
        metrics_dir = tempfile.mkdtemp(prefix="voxloop-metrics-")
        os.environ[MULTIPROC_ENV] = metrics_dir
        try:
            with contextlib.ExitStack() as held:
                for each in socks:
                    held.enter_context(each)
                # uvicorn's supervisor: spawns the workers on their sockets, restarts one
                # that dies, and on SIGTERM stops them (each drains) and waits for them.
                Supervisor(config, socks, metrics_dir).run()
        finally:
            shutil.rmtree(metrics_dir, ignore_errors=True)
        log.info("shutdown", extra={"signal": "SIGTERM"})
        return EXIT_OK
    with sock:
        asyncio.run(server.serve(sockets=[sock]))
    if not server.started:
        raise CommandError("the agent service did not start (see the log lines above)")
    name = signal.Signals(server.stop_signal).name if server.stop_signal else "none"
    log.info("shutdown", extra={"signal": name})
    return EXIT_OK


def listening_sockets(family: int, host: str, port: int, workers: int) -> list[socket.socket]:
    """The listening sockets of a run: one, or on Linux one per worker of ``--workers N``.

    Several workers each get a socket of their own on the one port (``SO_REUSEPORT``), so
    the kernel spreads new connections evenly over them. On one shared socket the worker
    that went idle last takes the next connection, so under load one worker took every
    session while the other sat idle. Elsewhere than Linux the workers share one socket.

    Raises:
        OSError: the address cannot be bound (in use, not local, no permission).
    """
    per_worker = workers > 1 and sys.platform == "linux" and hasattr(socket, "SO_REUSEPORT")
    if per_worker:
        # The port must be free, as for one socket: a group of another run of the same
        # user on it would otherwise be joined, and the two runs would share its calls.
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
            port = probe.getsockname()[1]  # (0: a free one)
    socks: list[socket.socket] = []
    try:
        for _ in range(workers if per_worker else 1):
            sock = socket.socket(family, socket.SOCK_STREAM)
            socks.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if per_worker:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((host, port))
            # Accepted connections inherit this on Linux; without it a keep-alive client
            # waits for a delayed ACK (~40 ms) on every response.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.listen(128)
    except OSError:
        for sock in socks:
            sock.close()
        raise
    return socks


def _cmd_rotate_key(args: argparse.Namespace) -> int:
    from runtime.agents.rotation import RotationError, rotate_command

    try:
        return asyncio.run(
            rotate_command(
                os.environ, sys.stdout, data_dir=args.data_dir, database=args.database_url
            )
        )
    except RotationError as exc:
        raise UsageError(str(exc)) from None
