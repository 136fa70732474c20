"""The ``voxloop`` command line.

Commands, and the module each lives in:
    voxloop bench ttft           compare chat-completions endpoints by time to first token (bench)
    voxloop endpoint serve       run the reference OpenAI-compatible streaming endpoint (endpoint)
    voxloop transcribe           print the transcript of a WAV file (speech)
    voxloop say                  speak text into a WAV file, or the speaker (speech)
    voxloop talk                 a spoken conversation: microphone and speaker, or WAV files (talk)
    voxloop connect              a Voice Agent session over a server's realtime WebSocket (connect)
    voxloop serve                the agent service: REST API for agents, tokens and voices (serve)
    voxloop secrets rotate-key   re-encrypt stored secrets under a new key (serve)
    voxloop agents ...           create, list, get, update and delete stored agents (agents)
    voxloop call                 place a phone call through Twilio to a stored agent (call)

Adding a command group: write ``runtime/cli/<group>.py`` with a
``register(sub)`` function that adds its sub-parser(s) to ``sub`` (the
top-level subparsers; pass ``parser_class=Parser`` to nested subparsers) and
sets ``handler=`` to a function ``(argparse.Namespace) -> int``; then add the
module to :data:`GROUPS` below (one line). Handlers report failures by raising
:class:`~runtime.cli.common.CommandError` or
:class:`~runtime.cli.common.UsageError` with one line naming the cause and the
fix; :func:`main` prints it. Exit codes are listed in :mod:`runtime.cli.common`.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence

from runtime import __version__
from runtime.cli import agents, bench, call, connect, endpoint, serve, speech, talk
from runtime.cli.common import (
    EXIT_CLOSED_PIPE,
    EXIT_INTERRUPTED,
    CommandError,
    Parser,
    describe,
    report,
)

# Each module's ``register(sub)`` adds its commands, in this order, to ``voxloop --help``.
GROUPS = (
    bench,
    endpoint,
    speech,
    talk,
    connect,
    serve,
    agents,
    call,
)


def build_parser() -> Parser:
    """The ``voxloop`` argument parser with every command group registered."""
    parser = Parser(
        prog="voxloop",
        description="voxloop: a realtime voice-agent runtime",
        epilog="exit codes: 0 done, 1 failed while working, 2 bad arguments or settings,\n"
        "3 something needed is missing or unreachable, 130 interrupted, 141 standard output\n"
        "closed by its reader (| head); connect adds 4-7",
    )
    parser.add_argument("--version", action="version", version=f"voxloop {__version__}")
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="log more (serve: debug lines); an unexpected error also logs its traceback",
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for group in GROUPS:
        group.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``voxloop`` with ``argv`` (default: ``sys.argv[1:]``); return the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except BrokenPipeError:  # --help or --version into a closed pipe
        return _quiet_exit()
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        code: int = args.handler(args)
        sys.stdout.flush()
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except CommandError as exc:
        return report(exc)
    except Exception as exc:
        if _closed_pipe(exc):
            return _quiet_exit()
        # Anything no command anticipated: still one line; the traceback only with -v.
        if args.verbose:
            logging.getLogger("voxloop").error("unexpected error", exc_info=exc)
        return report(describe(exc))
    return code


def _closed_pipe(exc: BaseException) -> bool:
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return isinstance(exc, BrokenPipeError)


def _quiet_exit() -> int:
    """Standard output's reader has gone (``| head -1``): exit quietly, without the
    interpreter's own flush failing again at exit."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return EXIT_CLOSED_PIPE
