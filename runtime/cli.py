"""The ``voxloop`` command line.

Commands:
    voxloop bench ttft       compare chat-completions endpoints by time to first token
    voxloop endpoint serve   run the reference OpenAI-compatible streaming endpoint
    voxloop transcribe       print the transcript of a WAV file
    voxloop say              speak text into a WAV file (or the speaker)
    voxloop talk             a spoken conversation: microphone and speaker, or WAV files
    voxloop serve            the agent service (REST API for agents, tokens and voices)
    voxloop secrets rotate-key   re-encrypt stored secrets under a new key
    voxloop agents ...       create, list, get, update and delete stored agents

Exit status: 0 when the command completed (a benchmark that recorded endpoint
failures still completed), 1 when it could not run, 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import ssl
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from runtime import __version__

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def _usage_error(message: str) -> int:
    print(f"voxloop: error: {message}", file=sys.stderr)
    return EXIT_USAGE


def _env_value(name: str) -> str:
    """The non-empty value of environment variable ``name`` (keys are never passed as flags).

    Raises:
        ValueError: unset or empty.
    """
    value = os.environ.get(name)
    if not value:
        raise ValueError(f"environment variable {name} is not set")
    return value


# -- bench ttft ---------------------------------------------------------------


def _add_bench(sub: Any) -> None:
    bench = sub.add_parser("bench", help="benchmarks")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True, parser_class=_Parser)
    p = bench_sub.add_parser(
        "ttft",
        help="compare chat-completions endpoints by time to first token",
        description="Measure headers/first event/TTFT/first answer/first sentence/ITL/TPOT/e2e "
        "per endpoint: one cold request, warm-up, then the measured warm requests.",
    )
    p.add_argument("--base-url", action="append", default=[], help="endpoint base URL (repeatable)")
    p.add_argument(
        "--model", action="append", default=[], help="model per --base-url (or one for all)"
    )
    p.add_argument("--name", action="append", default=[], help="display name per --base-url")
    p.add_argument(
        "--api-key-env", action="append", default=[], help="env var holding the key, per --base-url"
    )
    p.add_argument("--config", type=Path, help="TOML file with [[endpoints]] tables")
    p.add_argument(
        "--reference", action="store_true", help="also benchmark the built-in reference endpoint"
    )
    p.add_argument("--reference-ttft-ms", type=float, default=200.0)
    p.add_argument("--reference-itl-ms", type=float, default=20.0)
    p.add_argument("--requests", type=int, default=20, help="measured warm requests per endpoint")
    p.add_argument("--warmup", type=int, default=2, help="discarded requests after the cold one")
    p.add_argument("--concurrency", type=int, default=1, help="requests in flight at once")
    p.add_argument("--timeout", type=float, default=30.0, help="deadline per request, seconds")
    p.add_argument("--max-tokens", type=int, default=128, help="0 sends no max_tokens")
    p.add_argument("--http2", action="store_true", help="offer HTTP/2 (needs voxloop[http2])")
    p.add_argument(
        "--prompts",
        type=Path,
        help='JSON Lines of {"prompt": …} or {"messages": […]} (default: a voice conversation)',
    )
    p.add_argument("--json", type=Path, dest="json_path", help="write the summary as JSON")
    p.add_argument("--csv", type=Path, dest="csv_path", help="write one row per request")
    p.add_argument(
        "--plot", type=Path, dest="plot_path", help="write distributions (.png/.svg/.html)"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(handler=_cmd_bench_ttft)


def _targets_from_flags(args: argparse.Namespace) -> list[Any]:
    from runtime.bench.ttft import BenchTarget, load_targets

    targets: list[BenchTarget] = []
    if args.config is not None:
        targets.extend(load_targets(args.config))
    urls: list[str] = args.base_url
    n = len(urls)
    if not n:
        if args.model or args.name or args.api_key_env:
            raise ValueError("--model/--name/--api-key-env need a --base-url")
        return targets

    def per_url(values: list[str], flag: str, default: str | None) -> list[str | None]:
        if not values:
            if default is None and flag == "--model":
                raise ValueError("--model is required with --base-url")
            return [default] * n
        if len(values) == 1:
            return [values[0]] * n if flag != "--name" or n == 1 else _numbered(values[0], n)
        if len(values) != n:
            raise ValueError(f"give {flag} once, or once per --base-url ({n})")
        return list(values)

    models = per_url(args.model, "--model", None)
    names = per_url(args.name, "--name", None)
    keys = per_url(args.api_key_env, "--api-key-env", None)
    for url, model, name, key in zip(urls, models, names, keys, strict=True):
        assert model is not None
        targets.append(BenchTarget(name=name or url, base_url=url, model=model, api_key_env=key))
    return targets


def _numbered(name: str, n: int) -> list[str | None]:
    return [f"{name}-{i + 1}" for i in range(n)]


def _cmd_bench_ttft(args: argparse.Namespace) -> int:
    from runtime.bench.ttft import BenchSettings, BenchTarget, load_prompts

    try:
        settings = BenchSettings(
            requests=args.requests,
            warmup=args.warmup,
            concurrency=args.concurrency,
            timeout_s=args.timeout,
            max_tokens=args.max_tokens or None,
            http2=args.http2,
        )
        targets = _targets_from_flags(args)
        prompts = load_prompts(args.prompts) if args.prompts is not None else None
    except ValueError as exc:
        return _usage_error(str(exc))
    if not targets and not args.reference:
        return _usage_error("give at least one --base-url, a --config file, or --reference")
    if args.plot_path is not None and args.plot_path.suffix.lower() not in (
        ".png",
        ".svg",
        ".html",
    ):
        return _usage_error("--plot must end in .png, .svg or .html")
    for target in targets:
        if target.api_key_env and target.api_key_env not in os.environ:
            return _usage_error(f"environment variable {target.api_key_env} is not set")
    if args.reference_ttft_ms < 0 or args.reference_itl_ms < 0:
        return _usage_error("reference delays must not be negative")

    with contextlib.ExitStack() as stack:
        reference = None
        if args.reference:
            from runtime.bench.reference_thread import ReferenceThread
            from runtime.llm.reference import ReplyPlan

            reference = stack.enter_context(
                ReferenceThread(
                    ReplyPlan(ttft_ms=args.reference_ttft_ms, itl_ms=args.reference_itl_ms)
                )
            )
            targets.append(
                BenchTarget(
                    name="reference", base_url=reference.base_url, model="voxloop-reference"
                )
            )
        reports = _run_bench(targets, settings, prompts, quiet=args.quiet)
        extra: dict[str, Any] = {}
        if reference is not None:
            records = [r for r in reference.records() if r.path.endswith("/chat/completions")]
            server_ttft = [
                r.ttft_ms for r in records[-settings.requests :] if r.ttft_ms is not None
            ]
            if server_ttft:
                extra["reference_server"] = {
                    "ttft_ms_p50": statistics.median(server_ttft),
                    "configured_ttft_ms": args.reference_ttft_ms,
                }
    from runtime.bench.ttft import write_csv, write_json, write_plot

    # Files first: the tables below may go to a pipe that closes early.
    try:
        if args.json_path is not None:
            write_json(reports, args.json_path, extra)
        if args.csv_path is not None:
            write_csv(reports, args.csv_path)
        if args.plot_path is not None:
            write_plot(reports, args.plot_path)
    except (OSError, ValueError) as exc:
        _print_reports(reports, extra)
        print(f"voxloop: error: cannot write results: {exc}", file=sys.stderr)
        return EXIT_FAILED
    _print_reports(reports, extra)
    return EXIT_OK


def _run_bench(
    targets: list[Any], settings: Any, prompts: list[Any] | None, *, quiet: bool
) -> list[Any]:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from runtime.bench.ttft import TTFTBenchmark

    per_target = 1 + settings.warmup + settings.requests
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        disable=quiet or not sys.stderr.isatty(),
        transient=True,
        console=_console(stderr=True),
    ) as progress:
        tasks = {t.name: progress.add_task(t.name, total=per_target, status="") for t in targets}

        def on_result(name: str, result: Any) -> None:
            status = f"ttft {result.ttft_ms:.0f} ms" if result.ttft_ms else (result.error or "")
            progress.update(tasks[name], advance=1, status=status)

        bench = TTFTBenchmark(targets, settings, prompts=prompts, on_result=on_result)
        reports: list[Any] = asyncio.run(bench.run())
    return reports


def _console(*, stderr: bool = False) -> Any:
    from rich.console import Console

    return Console(stderr=stderr, highlight=False)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


_STATS = ("p50", "p90", "p95", "p99", "max", "mean")


def _print_reports(reports: list[Any], extra: dict[str, Any]) -> None:
    from rich.table import Table

    console = _console()
    docs = [report.to_json() for report in reports]
    summary = Table(title="Endpoints (warm requests; ms unless noted)")
    summary.add_column("")
    for doc in docs:
        summary.add_column(doc["name"], justify="right")

    def stat(metric: str, which: str) -> list[str]:
        out = []
        for doc in docs:
            s = doc["metrics"].get(metric)
            out.append(_fmt(s[which]) if s else "-")
        return out

    def cold_ttft(doc: dict[str, Any]) -> str:
        cold = doc["cold"]
        if not cold:
            return "-"
        return _fmt(cold["ttft_ms"]) if cold["ok"] else str(cold["error"])

    summary.add_row("ok", *(f"{d['ok']}/{d['requests']}" for d in docs))
    summary.add_row(
        "errors",
        *(", ".join(f"{k}={v}" for k, v in sorted(d["errors"].items())) or "-" for d in docs),
    )
    rows = (
        ("ttft p50", "ttft_ms", "p50"),
        ("ttft p90", "ttft_ms", "p90"),
        ("ttft p99", "ttft_ms", "p99"),
        ("first answer p50", "first_answer_ms", "p50"),
        ("first sentence p50", "first_sentence_ms", "p50"),
        ("headers p50", "headers_ms", "p50"),
        ("itl p50", "itl_ms", "p50"),
        ("tpot p50", "tpot_ms", "p50"),
        ("tokens/s p50", "tokens_per_s", "p50"),
        ("e2e p50", "e2e_ms", "p50"),
    )
    for label, metric, which in rows:
        summary.add_row(label, *stat(metric, which))
    summary.add_row("cold ttft", *(cold_ttft(d) for d in docs))
    console.print(summary)
    for doc in docs:
        detail = Table(title=f"{doc['name']} — {doc['model']} @ {doc['base_url']}")
        detail.add_column("metric")
        for name in _STATS:
            detail.add_column(name, justify="right")
        for metric, stats in doc["metrics"].items():
            if stats:
                detail.add_row(
                    metric, *(_fmt(stats[s]) for s in ("p50", "p90", "p95", "p99", "max", "mean"))
                )
        console.print(detail)
    ref = extra.get("reference_server")
    if ref:
        console.print(
            f"reference endpoint: server-side ttft p50 {ref['ttft_ms_p50']:.2f} ms "
            f"(configured {ref['configured_ttft_ms']:.0f} ms)"
        )


# -- endpoint serve -----------------------------------------------------------


def _add_endpoint(sub: Any) -> None:
    ep = sub.add_parser("endpoint", help="the reference OpenAI-compatible endpoint")
    ep_sub = ep.add_subparsers(dest="endpoint_command", required=True, parser_class=_Parser)
    p = ep_sub.add_parser(
        "serve",
        help="serve a streaming chat-completions endpoint with chosen latency and faults",
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8089)
    p.add_argument("--ttft-ms", type=float, default=200.0, help="delay before the first token")
    p.add_argument("--itl-ms", type=float, default=20.0, help="delay between tokens")
    p.add_argument("--reply", action="append", default=[], help="reply text (repeat to rotate)")
    p.add_argument("--no-role-chunk", action="store_true", help="skip the role-only first chunk")
    p.add_argument(
        "--usage", choices=("none", "empty_choices", "with_choices"), default="empty_choices"
    )
    p.add_argument("--no-finish-chunk", action="store_true")
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
    )
    p.add_argument("--status", type=int, default=500, help="HTTP status for --fault status")
    p.add_argument("--retry-after", help="Retry-After header for --fault status")
    p.add_argument("--fault-after", type=int, default=3, help="tokens before drop/malformed/hang")
    p.add_argument("--reasoning", default="", help="reasoning streamed before the answer")
    p.add_argument("--think-tags", action="store_true", help="send reasoning inside <think> tags")
    p.add_argument("--tool-name", help="answer requests that carry tools with a call to this tool")
    p.add_argument("--tool-arguments", default='{"city": "Paris"}')
    p.add_argument("--reject-stream-options", action="store_true")
    p.add_argument("--api-key-env", help="require this env var's value as the Bearer key")
    p.add_argument("--tls-cert", type=Path)
    p.add_argument("--tls-key", type=Path)
    p.add_argument("--model", default="voxloop-reference")
    p.set_defaults(handler=_cmd_endpoint_serve)


def _cmd_endpoint_serve(args: argparse.Namespace) -> int:
    from runtime.llm.reference import ReferenceEndpoint, ReplyPlan

    if not 0 <= args.port <= 65535:
        return _usage_error("--port must be between 0 and 65535")
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
        return _usage_error(str(exc))
    api_key = None
    if args.api_key_env:
        try:
            api_key = _env_value(args.api_key_env)
        except ValueError as exc:
            return _usage_error(str(exc))
    ctx: ssl.SSLContext | None = None
    if args.tls_cert or args.tls_key:
        if not (args.tls_cert and args.tls_key):
            return _usage_error("--tls-cert and --tls-key go together")
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        try:
            ctx.load_cert_chain(args.tls_cert, args.tls_key)
        except (OSError, ssl.SSLError) as exc:
            return _usage_error(f"cannot load the TLS certificate: {exc}")

    async def serve() -> int:
        server = ReferenceEndpoint(
            plan, host=args.host, port=args.port, api_key=api_key, ssl_context=ctx, model=args.model
        )
        try:
            await server.start()
        except OSError as exc:
            print(f"voxloop: error: cannot listen on {args.host}:{args.port}: {exc.strerror}",
                  file=sys.stderr)  # fmt: skip
            return EXIT_FAILED
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


# -- transcribe / say -----------------------------------------------------------


def _add_speech(sub: Any) -> None:
    p = sub.add_parser("transcribe", help="print the transcript of a WAV file")
    p.add_argument("file", type=Path, help="PCM16 WAV, mono or stereo, 8-48 kHz")
    p.add_argument("--engine", default="whisper", help="whisper (default), openai or assemblyai")
    _add_remote_flags(p)
    p.set_defaults(handler=_cmd_transcribe)

    p = sub.add_parser("say", help="speak text into a WAV file, or play it")
    p.add_argument("text")
    p.add_argument("-o", "--output", type=Path, help="WAV file to write")
    p.add_argument("--voice", help="voice id (see --list-voices)")
    p.add_argument("--engine", default="piper", help="piper (default), espeak or openai")
    _add_remote_flags(p)
    p.add_argument("--rate", type=int, default=22050, help="output sample rate")
    p.add_argument("--play", action="store_true", help="play through the default speaker")
    p.add_argument("--list-voices", action="store_true", help="list the engine's voices")
    p.set_defaults(handler=_cmd_say)


def _add_remote_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base-url", help="remote engine URL (openai: .../v1; assemblyai: host)")
    p.add_argument("--model", help="remote engine model")
    p.add_argument("--api-key-env", help="environment variable holding the remote engine's key")


def _remote_options(args: argparse.Namespace) -> Any:
    from runtime.endpoints import URLPolicy
    from runtime.secret import Secret
    from runtime.speech.engines.registry import RemoteOptions

    key = None
    if args.api_key_env:
        key = Secret(_env_value(args.api_key_env))
    # The machine's owner runs the CLI: local speech servers are allowed.
    return RemoteOptions(args.base_url, args.model, key, URLPolicy.operator())


def _cmd_transcribe(args: argparse.Namespace) -> int:
    from audio.wav import read_wav
    from runtime.errors import VoiceAgentError
    from runtime.speech.engines._common import ModelVerificationError
    from runtime.speech.engines.registry import STT_ENGINES, load_stt

    if args.engine not in STT_ENGINES:
        return _usage_error(f"unknown engine {args.engine!r} (available: {', '.join(STT_ENGINES)})")
    try:
        audio = read_wav(args.file)
        remote = _remote_options(args)
    except ValueError as exc:
        return _usage_error(str(exc))

    async def run() -> str:
        stt = await load_stt(args.engine, remote)
        try:
            result = await stt.transcribe(audio.mono(), audio.sample_rate)
        finally:
            await stt.aclose()
        return result.text

    try:
        text = asyncio.run(run())
    except (ModelVerificationError, VoiceAgentError) as exc:
        print(f"voxloop: error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except ValueError as exc:
        return _usage_error(str(exc))
    print(text)
    return EXIT_OK


def _cmd_say(args: argparse.Namespace) -> int:
    from audio.frame import check_rate
    from audio.wav import write_wav
    from runtime.errors import VoiceAgentError
    from runtime.speech.engines._common import ModelVerificationError
    from runtime.speech.engines.registry import TTS_ENGINES, load_tts
    from runtime.speech.text import SpeechSegmenter
    from runtime.speech.tts import UnknownVoice

    if args.engine not in TTS_ENGINES:
        return _usage_error(f"unknown engine {args.engine!r} (available: {', '.join(TTS_ENGINES)})")
    try:
        check_rate(args.rate)
        remote = _remote_options(args)
    except ValueError as exc:
        return _usage_error(str(exc))
    if not (args.output or args.play or args.list_voices):
        return _usage_error("give -o OUT.wav, --play, or --list-voices")

    async def run() -> bytes | None:
        tts = await load_tts(args.engine, remote)
        try:
            if args.list_voices:
                for v in tts.voices():
                    aliases = f" (also: {', '.join(v.aliases)})" if v.aliases else ""
                    print(f"{v.id}\t{v.name}\t{v.language}{aliases}")
                return None
            # Markup, code and emoji are not read aloud; sentences go one at a time.
            segmenter = SpeechSegmenter()
            segments = segmenter.push(args.text) + segmenter.flush()
            pcm = bytearray()
            for segment in segments:
                async for chunk in tts.synthesize(segment, voice=args.voice, sample_rate=args.rate):
                    pcm += chunk.pcm
            return bytes(pcm)
        finally:
            await tts.aclose()

    try:
        pcm = asyncio.run(run())
    except UnknownVoice as exc:
        return _usage_error(str(exc))
    except (ModelVerificationError, VoiceAgentError) as exc:
        print(f"voxloop: error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except ValueError as exc:
        return _usage_error(str(exc))
    if pcm is None:
        return EXIT_OK
    if args.output is not None:
        try:
            write_wav(args.output, pcm, args.rate)
        except OSError as exc:
            print(f"voxloop: error: cannot write {args.output}: {exc.strerror}", file=sys.stderr)
            return EXIT_FAILED
    if args.play:
        return _play(pcm, args.rate)
    return EXIT_OK


def _play(pcm: bytes, rate: int) -> int:
    from audio.devices import DeviceUnavailable, Speaker

    async def play() -> None:
        async with Speaker(sample_rate=rate) as speaker:
            for i in range(0, len(pcm), rate // 5 * 2):
                await speaker.write(pcm[i : i + rate // 5 * 2])
            await speaker.wait_for_playout()

    try:
        asyncio.run(play())
    except DeviceUnavailable as exc:
        print(f"voxloop: error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


# -- talk ---------------------------------------------------------------------------

DEMO_REPLIES = (
    "It's sunny and mild in Paris today, around eighteen degrees.",
    "Done. I've booked a table for two at seven thirty tonight.",
)


def _add_talk(sub: Any) -> None:
    p = sub.add_parser(
        "talk",
        help="a spoken conversation with your endpoint (microphone, or --input WAV)",
        description="Talk to an OpenAI-compatible endpoint through the microphone and speaker, "
        "or run a whole conversation from a WAV file (--input / --demo). Without --base-url "
        "the built-in reference endpoint answers.",
    )
    p.add_argument("--input", type=Path, help="WAV file streamed in real time as the microphone")
    p.add_argument("--demo", action="store_true", help="use the bundled two-turn demo recording")
    p.add_argument("--output", type=Path, help="stereo WAV: left the user, right the agent")
    p.add_argument("--metrics-json", type=Path, help="per-turn latency metrics as JSON")
    p.add_argument("--base-url", help="OpenAI-compatible endpoint (default: built-in reference)")
    p.add_argument("--model", default="default")
    p.add_argument("--api-key-env", help="environment variable holding the endpoint key")
    p.add_argument("--reference-ttft-ms", type=float, default=200.0)
    p.add_argument("--system-prompt", default="You are a helpful voice assistant.")
    p.add_argument("--greeting", help="spoken verbatim when the conversation starts")
    p.add_argument("--voice", help="TTS voice id")
    p.add_argument("--stt", default="whisper", help="STT engine (default: whisper)")
    p.add_argument("--tts", default="piper", help="TTS engine: piper (default) or espeak")
    p.add_argument("--min-silence-ms", type=int, default=300)
    p.add_argument("--max-silence-ms", type=int, default=1200)
    p.add_argument("--vad-threshold", type=float, default=0.5)
    p.add_argument("--no-interrupt", action="store_true", help="the agent always finishes")
    p.add_argument("--no-speculative", action="store_true", help="start replies at end of turn")
    p.add_argument("--input-device", help="microphone (index or name) for live mode")
    p.add_argument("--output-device", help="speaker (index or name) for live mode")
    p.set_defaults(handler=_cmd_talk)


def _talk_printer(*, live: bool = False) -> Any:
    from runtime.conversation import events as ev

    console = _console()
    interactive = live and console.is_terminal

    def on_event(event: Any) -> None:
        match event:
            case ev.SpeechStarted() if interactive:
                console.print("[dim]you   …[/]", end="\r")
            case ev.UserTranscriptDelta(text=text) if interactive:
                # The partial transcript, rewritten in place while the user talks.
                console.print(f"[cyan]you[/]   {text} …", end="\r", soft_wrap=True)
            case ev.UserTranscript(text=text):
                console.print(f"[bold cyan]you[/]   {text}")
            case ev.AgentTranscript(text=text, interrupted=interrupted):
                suffix = " [yellow](interrupted)[/]" if interrupted else ""
                console.print(f"[bold green]agent[/] {text}{suffix}")
            case ev.ReplyError(code=code, message=message):
                console.print(f"[red]endpoint error ({code}):[/] {message}")
            case ev.TurnMetrics() as m:

                def f(v: float | None) -> str:
                    return "-" if v is None else f"{v:.0f}"

                console.print(
                    f"[dim]latency v2v {f(m.v2v_ms)} ms = endpointing {f(m.endpointing_ms)}"
                    f" | stt {f(m.stt_final_ms)} | ttft {f(m.ttft_ms)}"
                    f" | first sentence {f(m.first_sentence_ms)} | tts {f(m.tts_first_audio_ms)}"
                    f" | overhead {f(m.overhead_ms)}"
                    f"{' (speculative)' if m.speculative else ''}[/]"
                )
            case _:
                pass

    return on_event


def _cmd_talk(args: argparse.Namespace) -> int:
    from runtime.conversation.config import SessionConfig, TurnDetection
    from runtime.endpoints import URLPolicy
    from runtime.errors import VoiceAgentError
    from runtime.llm.client import ChatClient, Endpoint
    from runtime.secret import Secret
    from runtime.speech.engines._common import ModelVerificationError
    from runtime.speech.engines.registry import load_stt, load_tts

    if args.demo and args.input:
        return _usage_error("give --demo or --input, not both")
    source: Path | None = args.input
    if args.demo:
        source = Path(__file__).parent / "assets" / "demo_conversation.wav"
    if (args.output or args.metrics_json) and source is None:
        return _usage_error("--output and --metrics-json need --input or --demo")
    if source is not None and not source.is_file():
        return _usage_error(f"{source}: no such file")
    try:
        turn_detection = TurnDetection(
            vad_threshold=args.vad_threshold,
            min_silence_ms=args.min_silence_ms,
            max_silence_ms=max(args.max_silence_ms, args.min_silence_ms),
            interrupt_response=not args.no_interrupt,
        )
    except ValueError as exc:
        return _usage_error(str(exc))
    key = None
    if args.api_key_env:
        try:
            key = Secret(_env_value(args.api_key_env))
        except ValueError as exc:
            return _usage_error(str(exc))
    config = SessionConfig(
        system_prompt=args.system_prompt,
        greeting=args.greeting,
        voice=args.voice,
        turn_detection=turn_detection,
        speculative=not args.no_speculative,
    )

    async def run(base_url: str) -> int:
        from runtime.talk import talk_file, talk_live

        stt = await load_stt(args.stt)
        tts = await load_tts(args.tts)
        printer = _talk_printer(live=source is None)
        # The machine's owner runs this: local endpoints are allowed.
        llm = ChatClient(Endpoint(base_url, args.model, key), policy=URLPolicy.operator())
        try:
            if source is not None:
                result = await talk_file(
                    source, llm=llm, stt=stt, tts=tts, config=config,
                    output_wav=args.output, metrics_json=args.metrics_json, on_event=printer,
                )  # fmt: skip
                _print_talk_summary(result.metrics)
            else:
                await talk_live(
                    llm=llm, stt=stt, tts=tts, config=config, on_event=printer,
                    input_device=args.input_device, output_device=args.output_device,
                    on_ready=lambda: _console().print("[dim]listening... (Ctrl-C to stop)[/]"),
                )  # fmt: skip
        finally:
            await llm.aclose()
            await stt.aclose()
            await tts.aclose()
        return EXIT_OK

    try:
        if args.base_url:
            return asyncio.run(run(args.base_url))
        from runtime.bench.reference_thread import ReferenceThread
        from runtime.llm.reference import ReplyPlan

        plan = ReplyPlan(ttft_ms=args.reference_ttft_ms, itl_ms=20.0, replies=DEMO_REPLIES)
        with ReferenceThread(plan) as reference:
            _console(stderr=True).print(
                "[dim]no --base-url: using the built-in reference endpoint at "
                f"{reference.base_url} (TTFT {args.reference_ttft_ms:g} ms)[/]"
            )
            return asyncio.run(run(reference.base_url))
    except (ModelVerificationError, VoiceAgentError) as exc:
        print(f"voxloop: error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except ValueError as exc:
        return _usage_error(str(exc))
    except RuntimeError as exc:  # DeviceUnavailable and friends
        print(f"voxloop: error: {exc}", file=sys.stderr)
        return EXIT_FAILED


def _print_talk_summary(metrics: list[Any]) -> None:
    from rich.table import Table

    table = Table(title="Turns (ms)")
    for col in ("turn", "v2v", "endpointing", "stt final", "ttft", "first sentence",
                "tts first audio", "overhead"):  # fmt: skip
        table.add_column(col, justify="right")
    for i, m in enumerate(metrics, 1):
        table.add_row(
            str(i), _fmt(m.v2v_ms), _fmt(m.endpointing_ms), _fmt(m.stt_final_ms), _fmt(m.ttft_ms),
            _fmt(m.first_sentence_ms), _fmt(m.tts_first_audio_ms), _fmt(m.overhead_ms),
        )  # fmt: skip
    _console().print(table)


# -- serve / secrets ------------------------------------------------------------------


def _add_serve(sub: Any) -> None:
    p = sub.add_parser("serve", help="run the agent service (REST API)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--data-dir", type=Path, help="SQLite file and key file (VOXLOOP_DATA_DIR)")
    p.add_argument("--database-url", help="e.g. postgresql+asyncpg://… (VOXLOOP_DATABASE_URL)")
    p.set_defaults(handler=_cmd_serve)

    s = sub.add_parser("secrets", help="manage the encryption of stored secrets")
    s_sub = s.add_subparsers(dest="secrets_command", required=True, parser_class=_Parser)
    r = s_sub.add_parser("rotate-key", help="add a new primary key and re-encrypt every secret")
    r.add_argument("--data-dir", type=Path)
    r.add_argument("--database-url")
    r.set_defaults(handler=_cmd_rotate_key)


def _server_settings(args: argparse.Namespace) -> Any:
    from runtime.server.app import settings_from_env

    return settings_from_env(os.environ, data_dir=args.data_dir, database_url=args.database_url)


def _cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from runtime.server.app import create_app
    from runtime.server.secrets import SecretError

    if not 0 <= args.port <= 65535:
        return _usage_error("--port must be between 0 and 65535")
    try:
        settings = _server_settings(args)
    except (ValueError, SecretError) as exc:
        return _usage_error(str(exc))
    settings.data_dir.mkdir(parents=True, exist_ok=True)
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
        print(f"voxloop: error: cannot listen on {args.host}:{args.port}: {exc.strerror}",
              file=sys.stderr)  # fmt: skip
        return EXIT_FAILED
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
    from runtime.server.secrets import SecretBox, SecretError
    from runtime.server.store import Store, reseal_all

    try:
        settings = _server_settings(args)
    except (ValueError, SecretError) as exc:
        return _usage_error(str(exc))
    ring = settings.ring.rotated()
    from_env = bool(os.environ.get("VOXLOOP_SECRET_KEY"))
    if not from_env:
        # The new ring (old keys included) is saved first, so no value is ever unreadable.
        ring.save(settings.data_dir / "secret.key")

    async def run() -> int:
        store = Store(settings.database_url)
        try:
            await store.start()
            return await reseal_all(store, SecretBox(ring))
        finally:
            await store.aclose()

    changed = asyncio.run(run())
    print(f"re-encrypted {changed} secrets under key {ring.primary}")
    if from_env:
        print("set VOXLOOP_SECRET_KEY to the new key ring (old keys kept for reading):")
        print(ring.to_env())
    return EXIT_OK


# -- agents (REST client) --------------------------------------------------------------


def _add_agents(sub: Any) -> None:
    a = sub.add_parser("agents", help="manage stored agents through the REST API")
    a.add_argument("--url", default=os.environ.get("VOXLOOP_URL", "http://127.0.0.1:8080"))
    a.add_argument("--api-key-env", default="VOXLOOP_API_KEY", help="env var with the API key")
    a_sub = a.add_subparsers(dest="agents_command", required=True, parser_class=_Parser)
    c = a_sub.add_parser("create", help="create an agent from flags or a JSON file")
    c.add_argument("--file", type=Path, help="the agent as JSON (the REST body)")
    c.add_argument("--name")
    c.add_argument("--system-prompt")
    c.add_argument("--voice", default="ivy")
    c.add_argument("--greeting")
    c.add_argument("--llm-base-url")
    c.add_argument("--llm-model")
    c.add_argument("--llm-api-key-env", help="env var holding the endpoint's key")
    a_sub.add_parser("list", help="list agents, newest first")
    for name, text in (("get", "show an agent"), ("delete", "delete an agent")):
        p = a_sub.add_parser(name, help=text)
        p.add_argument("agent_id")
    u = a_sub.add_parser("update", help="update fields from a JSON file (present fields replace)")
    u.add_argument("agent_id")
    u.add_argument("--file", type=Path, required=True)
    a.set_defaults(handler=_cmd_agents)


def _agent_body(args: argparse.Namespace) -> dict[str, Any]:
    if args.file is not None:
        try:
            doc = json.loads(args.file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ValueError(f"cannot read {args.file}: {exc}") from None
        if not isinstance(doc, dict):
            raise ValueError(f"{args.file} must hold a JSON object")
        return doc
    if args.agents_command != "create":
        raise ValueError("--file is required")
    if not (args.name and args.system_prompt):
        raise ValueError("give --file, or at least --name and --system-prompt")
    body: dict[str, Any] = {"name": args.name, "system_prompt": args.system_prompt,
                            "voice": {"voice_id": args.voice}}  # fmt: skip
    if args.greeting:
        body["greeting"] = args.greeting
    if args.llm_base_url:
        if not (args.llm_model and args.llm_api_key_env):
            raise ValueError("--llm-base-url needs --llm-model and --llm-api-key-env")
        key = _env_value(args.llm_api_key_env)
        body["llm"] = [{"base_url": args.llm_base_url, "model": args.llm_model, "api_key": key}]
    return body


def _cmd_agents(args: argparse.Namespace) -> int:
    import httpx

    try:
        key = _env_value(args.api_key_env)
        body = _agent_body(args) if args.agents_command in ("create", "update") else None
    except ValueError as exc:
        return _usage_error(str(exc))
    method, path = {
        "create": ("POST", "/v1/agents"),
        "list": ("GET", "/v1/agents"),
        "get": ("GET", "/v1/agents/{id}"),
        "update": ("PUT", "/v1/agents/{id}"),
        "delete": ("DELETE", "/v1/agents/{id}"),
    }[args.agents_command]
    path = path.replace("{id}", getattr(args, "agent_id", ""))
    try:
        with httpx.Client(base_url=args.url, headers={"Authorization": key}, timeout=30) as client:
            response = client.request(method, path, json=body)
    except httpx.HTTPError as exc:
        print(f"voxloop: error: cannot reach {args.url}: {type(exc).__name__}", file=sys.stderr)
        return EXIT_FAILED
    if response.status_code >= 400:
        try:
            detail = response.json().get("detail", response.text)
            param = response.json().get("param")
        except ValueError:
            detail, param = response.text, None
        where = f" ({param})" if param else ""
        print(f"voxloop: error: HTTP {response.status_code}{where}: {detail}", file=sys.stderr)
        return EXIT_FAILED
    if response.status_code != 204:
        print(json.dumps(response.json(), indent=2))
    return EXIT_OK


# -- entry point --------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="voxloop", description="voxloop: a realtime voice-agent runtime")
    parser.add_argument("--version", action="version", version=f"voxloop {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log more")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _add_bench(sub)
    _add_endpoint(sub)
    _add_speech(sub)
    _add_talk(sub)
    _add_serve(sub)
    _add_agents(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        code: int = args.handler(args)
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
