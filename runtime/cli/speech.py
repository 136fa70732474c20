"""``voxloop transcribe`` and ``voxloop say``: one-shot speech-to-text and text-to-speech."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import Any

from runtime.cli.checks import (
    add_ca_bundle_flag,
    check_devices,
    check_endpoint,
    check_engine,
    check_voice,
    read_input,
    to_supported_rate,
    use_ca_bundle,
    with_scheme,
)
from runtime.cli.common import (
    EXIT_OK,
    CommandError,
    Unavailable,
    UsageError,
    check_output,
    env_value,
    progress_bar,
    status,
    wrote,
)


def register(sub: Any) -> None:
    p = sub.add_parser(
        "transcribe",
        help="print the transcript of a WAV file",
        description="Print the transcript of a PCM16 WAV file (mono or stereo, any sample rate; "
        "rates the engines do not take are resampled to 16 kHz).",
    )
    p.add_argument("file", type=Path, help="PCM16 WAV file, mono or stereo, any sample rate")
    p.add_argument("--engine", default="whisper", choices=STT_NAMES, help="speech-to-text engine")
    _add_remote_flags(
        p,
        "remote engine URL (openai: an OpenAI-compatible https://host/v1, or host:port; "
        "assemblyai: the streaming host, default https://streaming.assemblyai.com)",
        "remote engine model (default: whisper-1 for openai, "
        "universal-streaming-english for assemblyai)",
    )
    p.set_defaults(handler=_cmd_transcribe)

    p = sub.add_parser(
        "say",
        help="speak text into a WAV file, or play it",
        description="Speak TEXT (or standard input, with -) into a mono PCM16 WAV file, "
        "or play it.",
    )
    p.add_argument(
        "text", nargs="?", help="what to say; - reads standard input (not with --list-voices)"
    )
    p.add_argument("-o", "--output", type=Path, help="WAV file to write")
    p.add_argument("--voice", help="voice id or alias (default: the engine's first; --list-voices)")
    p.add_argument("--engine", default="piper", choices=TTS_NAMES, help="text-to-speech engine")
    _add_remote_flags(
        p,
        "the openai engine's URL: an OpenAI-compatible https://host/v1, or host:port",
        "the openai engine's model (default: tts-1)",
    )
    p.add_argument("--rate", type=int, default=22050, help="output sample rate, Hz")
    p.add_argument("--play", action="store_true", help="play through the default speaker")
    p.add_argument(
        "--deterministic",
        action="store_true",
        help="the same text gives the same samples (piper: no sampling noise; espeak always is; "
        "not for openai)",
    )
    p.add_argument("--list-voices", action="store_true", help="list the engine's voices and exit")
    p.set_defaults(handler=_cmd_say)


# Listed here (not imported from the registry) so that --help needs no engine import.
STT_NAMES = ("whisper", "openai", "assemblyai")
TTS_NAMES = ("piper", "espeak", "openai")


def _add_remote_flags(p: argparse.ArgumentParser, base_url: str, model: str) -> None:
    p.add_argument("--base-url", help=base_url)
    p.add_argument("--model", help=model)
    p.add_argument("--api-key-env", help="environment variable holding the remote engine's key")
    add_ca_bundle_flag(p)


def remote_options(base_url: str | None, model: str | None, api_key_env: str | None) -> Any:
    """The :class:`RemoteOptions` for a remote engine from its flags.

    Raises:
        UsageError: the key's environment variable is not set.
    """
    from runtime.endpoints import URLPolicy
    from runtime.secret import Secret
    from runtime.speech.engines.registry import RemoteOptions

    key = None
    if api_key_env:
        try:
            key = Secret(env_value(api_key_env))
        except ValueError as exc:
            raise UsageError(str(exc)) from None
    if base_url:
        base_url = with_scheme(base_url)
    # The machine's owner runs the CLI: local speech servers are allowed.
    return RemoteOptions(base_url, model, key, URLPolicy.operator())


async def check_remote(engine: str, remote: Any, flag: str) -> None:
    """Check a remote engine's settings and that its server answers, before any work.

    Raises:
        UsageError: a setting is missing.
        Unavailable: the server cannot be reached.
    """
    if engine == "openai":
        if not remote.base_url:
            raise UsageError(f"the openai engine needs {flag} (an OpenAI-compatible .../v1 URL)")
        await check_endpoint(remote.base_url, flag)
    elif engine == "assemblyai":
        from runtime.speech.engines.assemblyai import DEFAULT_HOST

        if remote.api_key is None:
            key_flag = flag.replace("base-url", "api-key-env")
            raise UsageError(f"the assemblyai engine needs its API key: {key_flag} NAME")
        await check_endpoint(remote.base_url or DEFAULT_HOST, flag)


def _cmd_transcribe(args: argparse.Namespace) -> int:
    from runtime.speech.engines.registry import STT_ENGINES, load_stt

    check_engine("STT", args.engine, STT_ENGINES)
    audio = read_input(args.file)
    remote = remote_options(args.base_url, args.model, args.api_key_env)
    use_ca_bundle(args.ca_bundle)
    pcm, rate = to_supported_rate(audio.mono(), audio.sample_rate)

    async def run() -> str:
        await check_remote(args.engine, remote, "--base-url")
        with status(f"transcribing {audio.duration_s:.0f} s of audio"):
            stt = await load_stt(args.engine, remote)
            try:
                result = await stt.transcribe(pcm, rate)
            finally:
                await stt.aclose()
        return result.text

    text = asyncio.run(run())
    if not text.strip():
        raise CommandError(f"no speech was heard in {args.file}")
    print(text)
    return EXIT_OK


def _read_text(text: str) -> str:
    if text != "-":
        return text
    try:
        return sys.stdin.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read the text from standard input: {exc}") from None


def _cmd_say(args: argparse.Namespace) -> int:
    from audio.frame import check_rate
    from audio.wav import write_wav
    from runtime.speech.engines.registry import TTS_ENGINES, load_tts
    from runtime.speech.text import SpeechSegmenter

    check_engine("TTS", args.engine, TTS_ENGINES)
    try:
        check_rate(args.rate)
    except ValueError as exc:
        raise UsageError(f"--rate: {exc}") from None
    if not (args.output or args.play or args.list_voices):
        raise UsageError("give -o OUT.wav, --play, or --list-voices")
    if args.text is None and not args.list_voices:
        raise UsageError("give the TEXT to say (or - to read it from standard input)")
    if args.text is not None and args.list_voices:
        raise UsageError("--list-voices lists the voices and says nothing: give it no TEXT")
    if args.output is not None:
        check_output(args.output, "-o")
    if args.deterministic and args.engine == "openai":
        raise UsageError(
            "--deterministic: the openai engine's audio is its server's; use piper or espeak"
        )
    remote = remote_options(args.base_url, args.model, args.api_key_env)
    use_ca_bundle(args.ca_bundle)
    if args.play and not args.list_voices:
        check_devices(None, None, mic=False)
    text = "" if args.list_voices else _read_text(args.text)

    async def run() -> bytes | None:
        await check_remote(args.engine, remote, "--base-url")
        tts = await load_tts(args.engine, remote, deterministic=args.deterministic)
        try:
            if args.list_voices:
                for v in tts.voices():
                    aliases = f" (also: {', '.join(v.aliases)})" if v.aliases else ""
                    print(f"{v.id}\t{v.name}\t{v.language}{aliases}")
                return None
            check_voice(tts, args.voice, args.engine)
            # Markup, code and emoji are not read aloud; sentences go one at a time.
            segmenter = SpeechSegmenter()
            segments = segmenter.push(text) + segmenter.flush()
            pcm = bytearray()
            with progress_bar("speaking", total=len(segments), unit="sentences") as advance:
                for segment in segments:
                    async for chunk in tts.synthesize(
                        segment, voice=args.voice, sample_rate=args.rate
                    ):
                        pcm += chunk.pcm
                    advance()
            return bytes(pcm)
        finally:
            await tts.aclose()

    pcm = asyncio.run(run())
    if pcm is None:
        return EXIT_OK
    if args.output is not None:
        try:
            write_wav(args.output, pcm, args.rate)
        except OSError as exc:
            raise CommandError(f"cannot write {args.output}: {exc.strerror}") from None
        wrote(args.output)
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
        raise Unavailable(str(exc)) from None
    return EXIT_OK
