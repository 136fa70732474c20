"""``voxloop endpoint serve``: the reference OpenAI-compatible streaming endpoint."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import ssl
import sys
from pathlib import Path
from typing import Any

from runtime.cli.common import (
    EXIT_OK,
    CommandError,
    Parser,
    UsageError,
    env_value,
)


def register(sub: Any) -> None:
    ep = sub.add_parser("endpoint", help="the reference OpenAI-compatible endpoint")
    ep_sub = ep.add_subparsers(dest="endpoint_command", required=True, parser_class=Parser)
    p = ep_sub.add_parser(
        "serve",
        help="serve a streaming chat-completions endpoint with chosen latency and faults",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=8089, help="port to listen on (0: any free port)")
    p.add_argument("--ttft-ms", type=float, default=200.0, help="delay before the first token")
    p.add_argument("--itl-ms", type=float, default=20.0, help="delay between tokens")
    p.add_argument(
        "--capacity",
        type=int,
        default=None,
        help="streams decoded at once; more wait in a first-come-first-served queue "
        "(default: unlimited)",
    )
    p.add_argument("--reply", action="append", default=[], help="reply text (repeat to rotate)")
    p.add_argument("--no-role-chunk", action="store_true", help="skip the role-only first chunk")
    p.add_argument(
        "--usage",
        choices=("none", "empty_choices", "with_choices"),
        default="empty_choices",
        help="how token usage is reported when the client asks for it",
    )
    p.add_argument(
        "--no-finish-chunk", action="store_true", help="skip the chunk with finish_reason"
    )
    p.add_argument("--no-done", action="store_true", help="end the stream without [DONE]")
    p.add_argument(
        "--fault",
        choices=(
            "none",
            "status",
            "redirect",
            "hang_headers",
            "hang",
            "drop",
            "malformed",
            "empty",
        ),
        default="none",
        help="misbehave: an HTTP error status, a redirect, hang before headers or mid-stream, "
        "drop the connection, send malformed or empty events",
    )
    p.add_argument("--status", type=int, default=500, help="HTTP status for --fault status")
    p.add_argument("--retry-after", help="Retry-After header for --fault status")
    p.add_argument("--fault-after", type=int, default=3, help="tokens before drop/malformed/hang")
    p.add_argument("--reasoning", default="", help="reasoning streamed before the answer")
    p.add_argument("--think-tags", action="store_true", help="send reasoning inside <think> tags")
    p.add_argument("--tool-name", help="answer requests that carry tools with a call to this tool")
    p.add_argument(
        "--tool-arguments", default='{"city": "Paris"}', help="JSON arguments of that tool call"
    )
    p.add_argument(
        "--reject-stream-options",
        action="store_true",
        help="answer 400 to requests with stream_options (as some servers do)",
    )
    p.add_argument("--api-key-env", help="require this env var's value as the Bearer key")
    p.add_argument("--tls-cert", type=Path, help="PEM certificate chain: serve https")
    p.add_argument("--tls-key", type=Path, help="PEM private key for --tls-cert")
    p.add_argument("--model", default="voxloop-reference", help="model id in /v1/models")
    p.set_defaults(handler=_cmd_endpoint_serve)


def _cmd_endpoint_serve(args: argparse.Namespace) -> int:
    from runtime.llm.reference import ReferenceEndpoint, ReplyPlan

    if not 0 <= args.port <= 65535:
        raise UsageError("--port must be between 0 and 65535")
    if args.capacity is not None and args.capacity < 1:
        raise UsageError("--capacity must be at least 1")
    if not 400 <= args.status <= 599:
        raise UsageError(f"--status must be an HTTP error status (400 to 599), not {args.status}")
    try:
        plan = ReplyPlan(
            replies=tuple(args.reply) or ReplyPlan().replies,
            ttft_ms=args.ttft_ms,
            itl_ms=args.itl_ms,
            role_chunk=not args.no_role_chunk,
            usage=args.usage,
            finish_chunk=not args.no_finish_chunk,
            done=not args.no_done,
            fault=args.fault,
            status=args.status,
            retry_after=args.retry_after,
            fault_after=args.fault_after,
            reasoning=args.reasoning,
            think_tags=args.think_tags,
            tool_name=args.tool_name,
            tool_arguments=args.tool_arguments,
            reject_stream_options=args.reject_stream_options,
        )
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    api_key = None
    if args.api_key_env:
        try:
            api_key = env_value(args.api_key_env)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
    ctx: ssl.SSLContext | None = None
    if args.tls_cert or args.tls_key:
        if not (args.tls_cert and args.tls_key):
            raise UsageError("--tls-cert and --tls-key go together")
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        try:
            ctx.load_cert_chain(args.tls_cert, args.tls_key)
        except (OSError, ssl.SSLError) as exc:
            raise UsageError(f"cannot load the TLS certificate: {exc}") from None

    async def serve() -> int:
        server = ReferenceEndpoint(
            plan,
            host=args.host,
            port=args.port,
            api_key=api_key,
            ssl_context=ctx,
            model=args.model,
            capacity=args.capacity,
            access_log=lambda line: print(line, file=sys.stderr, flush=True),
        )
        try:
            await server.start()
        except OSError as exc:
            raise CommandError(
                f"cannot listen on {args.host}:{args.port}: {exc.strerror}"
            ) from None
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, stop.set)
        print(f"reference endpoint listening: {server.base_url}", flush=True)
        try:
            await stop.wait()
        finally:
            await server.aclose()
        return EXIT_OK

    return asyncio.run(serve())
