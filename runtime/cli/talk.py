"""``voxloop talk``: a spoken conversation through the microphone and speaker, or WAV files."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import Any

from runtime.cli.checks import (
    ECHO_LINES,
    add_ca_bundle_flag,
    add_echo_option,
    check_chat_endpoint,
    check_devices,
    check_endpoint,
    check_engine,
    check_voice,
    echo_mode,
    read_input,
    use_ca_bundle,
    with_scheme,
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
    progress_bar,
    rich_console,
    status,
    wrote,
)
from runtime.cli.speech import STT_NAMES, TTS_NAMES, check_remote, remote_options
from runtime.conversation.config import TurnDetection
from runtime.llm.think import THINK_BLOCK_CHOICES, leading_from_setting

TURN_DEFAULTS = TurnDetection()

# Two replies of the same shape (a seven-word first clause): the demo's two turns then do the
# same work, so its table compares the first turn with the next like for like.
DEMO_REPLIES = (
    "It's sunny and mild in Paris today, around eighteen degrees.",
    "I've booked a table for two tonight, at seven thirty.",
)


def register(sub: Any) -> None:
    p = sub.add_parser(
        "talk",
        help="a spoken conversation with your endpoint (microphone, or --input WAV)",
        description="Talk to an OpenAI-compatible endpoint through the microphone and speaker, "
        "or run a whole conversation from a WAV file (--input / --demo). Without --base-url "
        "the built-in reference endpoint answers. Ctrl-C ends the conversation; in file mode "
        "--output and --metrics-json still get what was said so far.",
    )
    p.add_argument("--input", type=Path, help="WAV file streamed in real time as the microphone")
    p.add_argument("--demo", action="store_true", help="use the bundled two-turn demo recording")
    p.add_argument("--output", type=Path, help="stereo WAV: left the user, right the agent")
    p.add_argument("--metrics-json", type=Path, help="per-turn latency metrics as JSON")
    p.add_argument(
        "--base-url",
        action="append",
        default=[],
        help="OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1 or host:port/v1 "
        "(default: the built-in reference endpoint); repeated: fallback endpoints, in order",
    )
    p.add_argument(
        "--model",
        action="append",
        default=[],
        help="model name sent to --base-url (default: 'default'); once, or once per --base-url",
    )
    p.add_argument(
        "--think-block",
        choices=THINK_BLOCK_CHOICES,
        default="auto",
        help="whether the endpoint's chat template opens a think block before every reply "
        "(template: the text up to the first </think> is reasoning, never spoken; none: "
        "never; auto: from reasoning fields and tags, the model name and earlier replies)",
    )
    p.add_argument(
        "--no-warm-up",
        action="store_true",
        help="send no warm-up request (system prompt + 'Say hello.', 32 tokens) at the start",
    )
    add_ca_bundle_flag(p)
    p.add_argument(
        "--api-key-env",
        action="append",
        default=[],
        help="environment variable holding the endpoint key; once, or once per --base-url",
    )
    p.add_argument(
        "--reference-ttft-ms",
        type=float,
        default=200.0,
        help="time to first token of the built-in reference endpoint, ms",
    )
    p.add_argument(
        "--system-prompt", default="You are a helpful voice assistant.", help="system prompt"
    )
    p.add_argument("--greeting", help="spoken verbatim when the conversation starts")
    p.add_argument("--voice", help="TTS voice id or alias (default: the engine's first)")
    p.add_argument("--stt", default="whisper", choices=STT_NAMES, help="speech-to-text engine")
    p.add_argument("--tts", default="piper", choices=TTS_NAMES, help="text-to-speech engine")
    for kind in ("stt", "tts"):
        p.add_argument(
            f"--{kind}-base-url",
            help=f"remote {kind.upper()} engine URL (openai: .../v1; assemblyai: its host)",
        )
        p.add_argument(f"--{kind}-model", help=f"remote {kind.upper()} engine model")
        p.add_argument(
            f"--{kind}-api-key-env",
            help=f"environment variable holding the remote {kind.upper()} engine's key",
        )
    pause = TURN_DEFAULTS.pause_ms
    p.add_argument(
        "--min-silence-ms",
        type=int,
        default=TURN_DEFAULTS.min_silence_ms,
        help=f"silence that ends a turn whose words read complete, ms (at least {pause})",
    )
    p.add_argument(
        "--max-silence-ms",
        type=int,
        default=TURN_DEFAULTS.max_silence_ms,
        help="silence that ends any turn, ms (at least --min-silence-ms)",
    )
    p.add_argument(
        "--vad-threshold",
        type=float,
        default=TURN_DEFAULTS.vad_threshold,
        help="speech probability threshold, 0..1",
    )
    p.add_argument("--no-interrupt", action="store_true", help="the agent always finishes")
    p.add_argument("--no-speculative", action="store_true", help="start replies at end of turn")
    p.add_argument("--input-device", help="microphone (index or name) for live mode")
    p.add_argument("--output-device", help="speaker (index or name) for live mode")
    add_echo_option(p)
    p.set_defaults(handler=_cmd_talk)


def _turn_detection(args: argparse.Namespace) -> Any:
    from runtime.conversation.config import TurnDetection

    pause = TURN_DEFAULTS.pause_ms
    if args.min_silence_ms < pause:
        raise UsageError(
            f"--min-silence-ms must be at least {pause} (replies start speculatively after "
            f"{pause} ms of silence), got {args.min_silence_ms}"
        )
    if args.max_silence_ms < args.min_silence_ms:
        raise UsageError(
            f"--max-silence-ms ({args.max_silence_ms}) must not be below "
            f"--min-silence-ms ({args.min_silence_ms})"
        )
    if not 0.0 <= args.vad_threshold <= 1.0:
        raise UsageError(f"--vad-threshold must be within 0..1, got {args.vad_threshold:g}")
    try:
        return TurnDetection(
            vad_threshold=args.vad_threshold,
            min_silence_ms=args.min_silence_ms,
            max_silence_ms=args.max_silence_ms,
            interrupt_response=not args.no_interrupt,
        )
    except ValueError as exc:
        raise UsageError(str(exc)) from None


class TalkPrinter:
    """Prints a conversation's events (transcript, errors, latency) and counts the turns.

    Args:
        console: where the lines go (a progress bar on the same console stays below them).
        live: the partial transcript is rewritten in place (a terminal, live mode).
    """

    def __init__(self, console: Any, *, live: bool = False) -> None:
        self.console = console
        self.interactive = live and console.is_terminal
        self.went_on = False  # the user went on with a turn already transcribed (taken back)
        self.user_turns = 0
        self.answered = 0
        self.failed = 0
        self.last_error = ""

    def __call__(self, event: Any) -> None:
        from rich.markup import escape

        from runtime.conversation import events as ev

        console = self.console
        match event:
            case ev.SpeechStarted(continued=continued):
                self.went_on = continued
                if self.interactive:
                    console.print("[dim]you   …[/]", end="\r")
            case ev.UserTranscriptDelta(text=text) if self.interactive:
                # The partial transcript, rewritten in place while the user talks.
                console.print(f"[cyan]you[/]   {escape(text)} …", end="\r", soft_wrap=True)
            case ev.UserTranscript(text=text):
                # A turn taken back is printed again whole: it replaces the line before.
                note = " [dim](went on: replaces the line above)[/]" if self.went_on else ""
                if not self.went_on:
                    self.user_turns += 1
                self.went_on = False
                console.print(f"[bold cyan]you[/]   {escape(text)}{note}")
            case ev.AgentTranscript(text=""):
                pass  # cut (or withdrawn) before a word of it was heard
            case ev.AgentTranscript(text=text, interrupted=interrupted):
                suffix = " [yellow](interrupted)[/]" if interrupted else ""
                console.print(f"[bold green]agent[/] {escape(text)}{suffix}")
            case ev.ReplyError(code=code, message=message):
                self.failed += 1
                self.last_error = f"{message} ({code})"
                console.print(f"[red]endpoint error ({escape(code)}):[/] {escape(message)}")
            case ev.TurnMetrics() as m:
                if m.ttft_ms is not None:
                    self.answered += 1
                console.print(f"[dim]{escape(latency_line(m))}[/]", soft_wrap=True)
            case _:
                pass


def latency_line(m: Any) -> str:
    """One turn's latency: the voice-to-voice total, then the stages, which overlap
    (speculative replies start before the turn ends), so they are not a sum."""

    def f(v: float | None) -> str:
        return "-" if v is None else f"{v:.0f}"

    return (
        f"latency {f(m.v2v_ms)} ms from the end of speech to the agent's first audio"
        f"{' (speculative)' if m.speculative else ''}; stages, which overlap (ms): "
        f"end of turn decided after {f(m.endpointing_ms)}, final transcript "
        f"{f(m.stt_final_ms)} after that, first token {f(m.ttft_ms)} and first sentence "
        f"{f(m.first_sentence_ms)} after the request, first tts audio "
        f"{f(m.tts_first_audio_ms)}, runtime overhead {f(m.overhead_ms)}"
        + (
            f"; answered by llm[{m.llm_entry}] {m.llm_host}"
            f" (skipped {', '.join(f'[{i}] {why}' for i, why in m.llm_skipped)})"
            if m.llm_skipped
            else ""
        )
    )


def _cmd_talk(args: argparse.Namespace) -> int:
    from runtime.conversation.config import SessionConfig
    from runtime.endpoints import URLPolicy
    from runtime.llm.client import ChatClient, Endpoint, RetryPolicy
    from runtime.llm.fallback import FallbackChatClient
    from runtime.secret import Secret
    from runtime.speech.engines.registry import STT_ENGINES, TTS_ENGINES, load_stt, load_tts

    # Everything that can be checked is checked before the conversation starts.
    if args.demo and args.input:
        raise UsageError("give --demo or --input, not both")
    source: Path | None = args.input
    if args.demo:
        source = Path(__file__).parents[1] / "assets" / "demo_conversation.wav"
    if (args.output or args.metrics_json) and source is None:
        raise UsageError("--output and --metrics-json need --input or --demo")
    pcm16k = b""
    if source is not None:
        from runtime.conversation.session import RATE

        pcm16k = read_input(source).mono_at(RATE)
    check_outputs(
        [("--output", args.output), ("--metrics-json", args.metrics_json)],
        reads=[("--input", args.input)],
    )
    turn_detection = _turn_detection(args)
    from runtime.llm.reference import ReplyPlan

    try:
        reference_plan = ReplyPlan(
            ttft_ms=args.reference_ttft_ms, itl_ms=20.0, replies=DEMO_REPLIES
        )
    except ValueError as exc:
        raise UsageError(f"--reference-ttft-ms: {exc}") from None
    check_engine("STT", args.stt, STT_ENGINES)
    check_engine("TTS", args.tts, TTS_ENGINES)
    stt_remote = remote_options(args.stt_base_url, args.stt_model, args.stt_api_key_env)
    tts_remote = remote_options(args.tts_base_url, args.tts_model, args.tts_api_key_env)
    urls: list[str] = [with_scheme(u) for u in args.base_url]
    count = max(1, len(urls))

    def per_url(values: list[str], flag: str) -> list[str | None]:
        if len(values) > 1 and len(values) != count:
            raise UsageError(f"give {flag} once, or once per --base-url ({count})")
        if not values:
            return [None] * count
        return list(values) if len(values) == count else [values[0]] * count

    models = [m or "default" for m in per_url(args.model, "--model")]
    keys: list[Secret | None] = []
    api_key_envs = per_url(args.api_key_env, "--api-key-env")
    for env_name in api_key_envs:
        try:
            keys.append(Secret(env_value(env_name)) if env_name else None)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
    base_url = urls[0] if urls else None
    use_ca_bundle(args.ca_bundle)
    if source is None:
        check_devices(args.input_device, args.output_device, mic=True)
        echo = echo_mode(args.echo)
    config = SessionConfig(
        system_prompt=args.system_prompt,
        greeting=args.greeting,
        voice=args.voice,
        turn_detection=turn_detection,
        speculative=not args.no_speculative,
        warm_prompt=not args.no_warm_up,
    )

    def chat_client(i: int, url: str, *, last: bool = True) -> Any:
        # The machine's owner runs this: local endpoints are allowed.
        return ChatClient(
            Endpoint(url, models[i], keys[i]), policy=URLPolicy.operator(),
            leading_reasoning=leading_from_setting(args.think_block),
            retry=None if last else RetryPolicy(max_attempts=1),
        )  # fmt: skip

    async def preflight() -> None:
        failures: list[Unavailable] = []
        for i, url in enumerate(urls):
            await check_endpoint(url, "--base-url")
            try:
                await check_chat_endpoint(chat_client(i, url), url, api_key_envs[i])
            except Unavailable as exc:
                failures.append(exc)
        # Fallbacks: the conversation can go on while one entry answers.
        if urls and len(failures) == len(urls):
            raise failures[0]
        await check_remote(args.stt, stt_remote, "--stt-base-url")
        await check_remote(args.tts, tts_remote, "--tts-base-url")

    asyncio.run(preflight())
    console = rich_console()
    printer = TalkPrinter(console, live=source is None)

    ctrl_c = CtrlC()

    async def run(base_url: str) -> int:
        """The conversation; a SIGINT (Ctrl-C) ends it with :data:`EXIT_INTERRUPTED`.

        See :class:`CtrlC`: the first Ctrl-C cancels this task, a second one exits at once.
        """
        task = asyncio.current_task()
        assert task is not None
        ctrl_c.attach(task)
        try:
            return await converse(base_url)
        except asyncio.CancelledError:
            if not ctrl_c.interrupted:
                raise
            while task.uncancel():
                pass
            return EXIT_INTERRUPTED

    async def converse(base_url: str) -> int:
        from runtime.talk import talk_live, talk_pcm

        with status("loading the speech engines"):
            stt = await load_stt(args.stt, stt_remote)
            tts = await load_tts(args.tts, tts_remote)
        # Repeated --base-url: fallbacks, an entry with a next one not retrying itself.
        entries = urls if urls else [base_url]
        clients = [chat_client(i, url, last=i == len(entries) - 1) for i, url in enumerate(entries)]
        llm: ChatClient | FallbackChatClient = (
            clients[0] if len(clients) == 1 else FallbackChatClient(clients)
        )
        try:
            check_voice(tts, args.voice, args.tts)
            if source is not None:
                seconds = int(len(pcm16k) / 2 / 16000 + 0.999)
                with progress_bar("input", total=seconds, unit="s", console=console) as advance:
                    result = await talk_pcm(
                        pcm16k, llm=llm, stt=stt, tts=tts, config=config,
                        output_wav=args.output, metrics_json=args.metrics_json,
                        on_event=printer, on_input_second=lambda _s: advance(),
                    )  # fmt: skip
                _print_talk_summary(result.metrics, console)
                wrote(args.output, args.metrics_json)
            else:
                await talk_live(
                    llm=llm, stt=stt, tts=tts, config=config, on_event=printer,
                    input_device=args.input_device, output_device=args.output_device, echo=echo,
                    on_ready=lambda: console.print(
                        f"[dim]listening, echo: {ECHO_LINES[echo]} (Ctrl-C to stop)[/]",
                        soft_wrap=True,
                    ),
                )  # fmt: skip
        finally:
            await llm.aclose()
            await stt.aclose()
            await tts.aclose()
        return _outcome(printer, source)

    try:
        with ctrl_c:
            if base_url:
                code = asyncio.run(run(base_url))
            else:
                from runtime.bench.reference_thread import ReferenceThread

                with ReferenceThread(reference_plan) as reference:
                    rich_console(stderr=True).print(
                        "[dim]no --base-url: using the built-in reference endpoint at "
                        f"{reference.base_url} (TTFT {args.reference_ttft_ms:g} ms)[/]"
                    )
                    code = asyncio.run(run(reference.base_url))
    except KeyboardInterrupt:  # Ctrl-C before or after the conversation
        code = EXIT_INTERRUPTED
    if code == EXIT_INTERRUPTED:
        kept = [str(p) for p in (args.output, args.metrics_json) if p is not None and p.exists()]
        if kept:
            print(f"voxloop: interrupted; the conversation so far is in {', '.join(kept)}",
                  file=sys.stderr)  # fmt: skip
    return code


def _outcome(printer: TalkPrinter, source: Path | None) -> int:
    """The exit code of a conversation that ran to its end.

    Raises:
        CommandError: no speech was heard in the input file, or turns were heard and
            none was answered (every reply failed at the endpoint) — exit 1.
    """
    if source is not None and printer.user_turns == 0:
        raise CommandError(f"no speech was heard in {source}")
    if printer.user_turns and not printer.answered and printer.failed:
        raise CommandError(
            f"no turn was answered: every reply failed at the endpoint (last: {printer.last_error})"
        )
    return EXIT_OK


def _print_talk_summary(metrics: list[Any], console: Any) -> None:
    from rich.table import Table

    if not metrics:
        return  # nothing answered: the outcome says why
    table = Table(title="Turns (ms; stages overlap, see the latency lines)")
    for col in ("turn", "v2v", "endpointing", "stt final", "ttft", "first sentence",
                "tts first audio", "overhead"):  # fmt: skip
        table.add_column(col, justify="right")
    for i, m in enumerate(metrics, 1):
        table.add_row(
            str(i), fmt(m.v2v_ms), fmt(m.endpointing_ms), fmt(m.stt_final_ms), fmt(m.ttft_ms),
            fmt(m.first_sentence_ms), fmt(m.tts_first_audio_ms), fmt(m.overhead_ms),
        )  # fmt: skip
    console.print(table)
