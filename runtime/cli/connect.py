"""``voxloop connect``: talk to a Voice Agent server over its realtime WebSocket.

Exit codes (beyond :mod:`runtime.cli.common`'s 0, 1, 2 and 130):
    3  the server could not be reached (refused, no such host, timeout, not a WebSocket)
    4  authentication refused (HTTP 401/403 on the upgrade, ``unauthorized``/``forbidden``,
       or a 1008 close before ``session.ready``)
    5  the agent does not exist (``agent_not_found``)
    6  the connection was lost and the session could not be resumed within 30 s
    7  the server ended the session with an error (``session_expired``, ``at_capacity``,
       ``internal_error``, no ``session.ready`` in time …)
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path
from typing import Any

from runtime.cli.checks import (
    ECHO_LINES,
    add_echo_option,
    check_devices,
    echo_mode,
    read_input,
)
from runtime.cli.common import (
    EXIT_INTERRUPTED,
    EXIT_OK,
    CommandError,
    CtrlC,
    Unavailable,
    UsageError,
    check_outputs,
    env_value,
    fmt,
    rich_console,
    wrote,
)
from runtime.protocol.events import AudioFormat, Encoding, is_tool_name

EXIT_UNREACHABLE = 3
EXIT_AUTH = 4
EXIT_AGENT_NOT_FOUND = 5
EXIT_LOST = 6
EXIT_SESSION_ERROR = 7

DEFAULT_API_KEY_ENV = "VOXLOOP_API_KEY"
ENCODINGS: dict[str, Encoding] = {"pcm": "audio/pcm", "pcmu": "audio/pcmu", "pcma": "audio/pcma"}


class ConnectError(CommandError):
    """A session failure, with the exit code its cause maps to."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def register(sub: Any) -> None:
    p = sub.add_parser(
        "connect",
        help="talk to a voxloop (or Voice Agent API) server over its realtime WebSocket",
        description="Open a Voice Agent session on URL (ws://, wss://, http:// or https://; "
        "/v1/ws is added when the URL has no path) and talk through the microphone and "
        "speaker, or stream a WAV file in real time (--input) and record the conversation.",
        epilog="exit codes: 0 ended cleanly, 1 could not run, 2 bad arguments, 3 server "
        "unreachable, 4 authentication refused, 5 agent not found, 6 connection lost and not "
        "resumed, 7 the server ended the session with an error, 130 Ctrl-C",
    )
    p.add_argument("url", help="the server, e.g. ws://127.0.0.1:8080/v1/ws")
    p.add_argument("--agent-id", help="bind a stored agent (no inline settings with it)")
    auth = p.add_argument_group("authentication (one of)")
    auth.add_argument(
        "--api-key-env", default=DEFAULT_API_KEY_ENV,
        help="environment variable holding the API key (sent as Authorization: Bearer)",
    )  # fmt: skip
    auth.add_argument("--token", help="a single-use token from GET /v1/token (sent as ?token=)")
    inline = p.add_argument_group("inline session (without --agent-id)")
    inline.add_argument("--system-prompt", help="the agent's instructions")
    inline.add_argument("--greeting", help="spoken verbatim when the session starts")
    inline.add_argument("--voice", help="voice id (see GET /v1/voices)")
    inline.add_argument("--input-encoding", choices=sorted(ENCODINGS), help="default pcm")
    inline.add_argument("--output-encoding", choices=sorted(ENCODINGS), help="default pcm")
    inline.add_argument("--vad-threshold", type=float, help="0-1, lower is more sensitive")
    inline.add_argument("--min-silence-ms", type=int, help="silence that ends a turn")
    inline.add_argument("--max-silence-ms", type=int, help="silence that always ends a turn")
    inline.add_argument("--no-interrupt", action="store_true", help="the agent always finishes")
    inline.add_argument("--keyterm", action="append", help="a term to recognise (repeatable)")
    files = p.add_argument_group("headless (instead of the microphone and speaker)")
    files.add_argument("--input", type=Path, help="WAV streamed in real time as the microphone")
    files.add_argument("--output", type=Path, help="stereo WAV: left the user, right the agent")
    files.add_argument("--metrics-json", type=Path, help="per-turn latency at the client, JSON")
    p.add_argument(
        "--tool-result", action="append", metavar="NAME=TEXT",
        help="answer client tool NAME with TEXT (repeatable); other tool calls get an error",
    )  # fmt: skip
    p.add_argument("--input-device", help="microphone (index or name)")
    p.add_argument("--output-device", help="speaker (index or name)")
    add_echo_option(p)
    p.set_defaults(handler=_cmd_connect)


def _session(args: argparse.Namespace) -> Any:
    from runtime.protocol.events import (
        InputPatch,
        OutputPatch,
        SessionPatch,
        TurnDetectionPatch,
    )

    td_values = (args.vad_threshold, args.min_silence_ms, args.max_silence_ms)
    inline = [args.system_prompt, args.greeting, args.voice, args.input_encoding,
              args.output_encoding, args.keyterm, *td_values]  # fmt: skip
    if args.agent_id is not None:
        if any(v is not None for v in inline) or args.no_interrupt:
            raise UsageError("--agent-id binds a stored agent: give no inline session settings")
        return SessionPatch(keys=frozenset({"agent_id"}), agent_id=args.agent_id)
    if args.vad_threshold is not None and not 0 <= args.vad_threshold <= 1:
        raise UsageError("--vad-threshold must be between 0 and 1")
    for flag, value in (("--min-silence-ms", args.min_silence_ms),
                        ("--max-silence-ms", args.max_silence_ms)):  # fmt: skip
        if value is not None and not 50 <= value <= 10000:
            raise UsageError(f"{flag} must be between 50 and 10000")
    keys: set[str] = set()
    td = None
    if any(v is not None for v in td_values) or args.no_interrupt:
        td = TurnDetectionPatch(
            vad_threshold=args.vad_threshold, min_silence=args.min_silence_ms,
            max_silence=args.max_silence_ms,
            interrupt_response=False if args.no_interrupt else None,
        )  # fmt: skip
    inp = None
    if td is not None or args.input_encoding or args.keyterm:
        fmt_in = _format(args.input_encoding)
        keyterms = tuple(args.keyterm) if args.keyterm else None
        inp = InputPatch(format=fmt_in, keyterms=keyterms, turn_detection=td)
        keys.add("input")
    out = None
    if args.voice or args.output_encoding:
        fmt_out = _format(args.output_encoding)
        out = OutputPatch(voice=args.voice, format=fmt_out)
        keys.add("output")
    if args.system_prompt is not None:
        keys.add("system_prompt")
    if args.greeting is not None:
        keys.add("greeting")
    return SessionPatch(
        keys=frozenset(keys), system_prompt=args.system_prompt, greeting=args.greeting,
        input=inp, output=out,
    )  # fmt: skip


def _format(name: str | None) -> AudioFormat | None:
    return AudioFormat(encoding=ENCODINGS[name]) if name else None


def _auth(args: argparse.Namespace) -> Any:
    from runtime.client.connection import Auth
    from runtime.secret import Secret

    if args.token:
        return Auth(token=Secret(args.token))
    try:
        return Auth(api_key=Secret(env_value(args.api_key_env)))
    except ValueError as exc:
        raise UsageError(f"{exc} (or give --token)") from None


def _tool_handler(specs: list[str] | None) -> Any:
    answers: dict[str, str] = {}
    for spec in specs or []:
        name, sep, text = spec.partition("=")
        if not sep or not name:
            raise UsageError(f"--tool-result wants NAME=TEXT, got {spec!r}")
        if not is_tool_name(name):
            raise UsageError(
                f"--tool-result: {name!r} cannot name a tool (letters, digits, _ and - only)"
            )
        if name in answers:
            raise UsageError(f"--tool-result answers {name!r} twice")
        answers[name] = text

    async def handle(call: Any) -> tuple[str, bool]:
        if call.name in answers:
            return answers[call.name], False
        return f"voxloop connect has no answer for tool {call.name!r}", True

    return handle


def _printer() -> Any:
    from rich.markup import escape

    from runtime.client import connection as conn
    from runtime.protocol import events as ev

    console = rich_console()
    err = rich_console(stderr=True)
    printed: list[str] = []  # the item of the last user line

    def on_event(event: Any) -> None:
        match event:
            case ev.TranscriptUser(text=text, item_id=item_id):
                # A turn taken back comes again whole, as the same item: it replaces the line.
                went_on = bool(item_id) and printed == [item_id]
                note = " [dim](went on: replaces the line above)[/]" if went_on else ""
                printed[:] = [item_id]
                console.print(f"[bold cyan]you[/]   {escape(text)}{note}")
            case ev.TranscriptAgent(text=""):
                pass  # cut (or withdrawn) before a word of it was heard
            case ev.TranscriptAgent(text=text, interrupted=interrupted):
                suffix = " [yellow](interrupted)[/]" if interrupted else ""
                console.print(f"[bold green]agent[/] {escape(text)}{suffix}")
            case ev.ToolCall(name=name, call_id=call_id):
                console.print(f"[dim]tool call {escape(name)} ({escape(call_id)})[/]")
            case ev.ReplyError(code=code, message=message):
                err.print(f"[red]reply error ({escape(code)}):[/] {escape(message)}")
            case ev.SessionError(code=code, message=message) if code not in ev.FATAL_CODES:
                # (A fatal one ends the session: the command's error line says it.)
                err.print(f"[red]session error ({escape(code)}):[/] {escape(message)}")
            case conn.ConnectionDropped():
                err.print("[yellow]connection lost; resuming the session...[/]")
            case conn.SessionResumed():
                err.print("[green]session resumed[/]")
            case _:
                pass

    return on_event


def _exit_code(code: str) -> int:
    if code == "unreachable" or code.startswith("http_"):  # no Voice Agent WebSocket there
        return EXIT_UNREACHABLE
    if code in ("unauthorized", "forbidden"):
        return EXIT_AUTH
    if code == "agent_not_found":
        return EXIT_AGENT_NOT_FOUND
    if code in ("resume_failed", "session_not_found", "session_forbidden", "connection_closed"):
        return EXIT_LOST
    return EXIT_SESSION_ERROR


def _cmd_connect(args: argparse.Namespace) -> int:
    from audio.devices import DeviceUnavailable
    from runtime.client.connection import websocket_url
    from runtime.client.protocol import SessionFailure
    from runtime.client.runner import RATE

    # Everything that can be checked is checked before connecting.
    if (args.output or args.metrics_json) and args.input is None:
        raise UsageError("--output and --metrics-json need --input")
    pcm = read_input(args.input).mono_at(RATE) if args.input is not None else b""
    check_outputs(
        [("--output", args.output), ("--metrics-json", args.metrics_json)],
        reads=[("--input", args.input)],
    )
    try:
        ws_url = websocket_url(args.url)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    session = _session(args)
    auth = _auth(args)
    tools = _tool_handler(args.tool_result)
    if args.input is None:
        check_devices(args.input_device, args.output_device, mic=True)
    echo = echo_mode(args.echo) if args.input is None else args.echo
    printer = _printer()
    ctrl_c = CtrlC()
    heard = 0

    def on_event(event: Any) -> None:
        nonlocal heard
        from runtime.protocol import events as ev

        if isinstance(event, ev.TranscriptUser):
            heard += 1
        printer(event)

    async def run() -> int:
        from runtime.client.runner import connect_live, connect_pcm

        stop = asyncio.Event()
        task = asyncio.current_task()
        assert task is not None
        # Ctrl-C ends the session cleanly (session.end); a second one exits at once.
        ctrl_c.attach(task, stop.set)
        if args.input is not None:
            result = await connect_pcm(
                pcm, url=args.url, auth=auth, session=session,
                output_wav=args.output, metrics_json=args.metrics_json, on_event=on_event,
                tool_handler=tools, stop=stop,
            )  # fmt: skip
            _print_summary(result.metrics)
            wrote(args.output, args.metrics_json)
        else:
            await connect_live(
                url=args.url, auth=auth, session=session, stop=stop, on_event=on_event,
                input_device=args.input_device, output_device=args.output_device,
                tool_handler=tools, echo=echo,
                on_ready=lambda: rich_console().print(
                    f"[dim]connected; listening, echo: {ECHO_LINES[echo]} "
                    "(Ctrl-C to end the session)[/]",
                    soft_wrap=True,
                ),
            )  # fmt: skip
        if ctrl_c.interrupted:
            return EXIT_INTERRUPTED
        if args.input is not None and not heard:
            raise CommandError(f"no speech was heard in {args.input}")
        return EXIT_OK

    try:
        with ctrl_c:
            return asyncio.run(run())
    except SessionFailure as exc:
        if exc.code == "unreachable" and _plain_http(ws_url):
            from runtime.endpoints import plain_http_message

            raise ConnectError(plain_http_message(args.url), EXIT_UNREACHABLE) from None
        raise ConnectError(f"{exc.message} ({exc.code})", _exit_code(exc.code)) from None
    except DeviceUnavailable as exc:
        raise Unavailable(str(exc)) from None
    except RuntimeError as exc:
        raise CommandError(str(exc)) from None


def _plain_http(ws_url: str) -> bool:
    """Whether a wss:// URL failed because its server speaks plain http."""
    from urllib.parse import urlsplit

    from runtime.endpoints import speaks_plain_http

    parts = urlsplit(ws_url)
    if parts.scheme != "wss" or parts.hostname is None:
        return False
    return asyncio.run(speaks_plain_http(parts.hostname, parts.port or 443))


def _print_summary(metrics: list[Any]) -> None:
    from rich.table import Table

    if not metrics:
        return  # nothing answered: the outcome says why
    table = Table(title="Turns, timed at the client (ms)")
    for col in ("turn", "v2v", "endpointing", "transcript", "reply started", "interrupted"):
        table.add_column(col, justify="right")
    for i, m in enumerate(metrics, 1):
        table.add_row(
            str(i), fmt(m.v2v_ms), fmt(m.endpointing_ms), fmt(m.stt_final_ms),
            fmt(m.reply_started_ms), "yes" if m.interrupted else "",
        )  # fmt: skip
    rich_console().print(table)
