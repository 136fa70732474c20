"""``voxloop transcribe`` and ``voxloop say``: one-shot speech-to-text and text-to-speech."""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path
from typing import Any

from runtime.cli.common import (
    EXIT_OK,
    CommandError,
    UsageError,
    env_value,
)


def register(sub: Any) -> None:
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
        key = Secret(env_value(args.api_key_env))
    # The machine's owner runs the CLI: local speech servers are allowed.
    return RemoteOptions(args.base_url, args.model, key, URLPolicy.operator())


def _cmd_transcribe(args: argparse.Namespace) -> int:
    from audio.wav import read_wav
    from runtime.errors import VoiceAgentError
    from runtime.speech.engines._common import ModelVerificationError
    from runtime.speech.engines.registry import STT_ENGINES, load_stt

    if args.engine not in STT_ENGINES:
        raise UsageError(f"unknown engine {args.engine!r} (available: {', '.join(STT_ENGINES)})")
    try:
        audio = read_wav(args.file)
        remote = _remote_options(args)
    except ValueError as exc:
        raise UsageError(str(exc)) from None

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
        raise CommandError(str(exc)) from None
    except ValueError as exc:
        raise UsageError(str(exc)) from None
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
        raise UsageError(f"unknown engine {args.engine!r} (available: {', '.join(TTS_ENGINES)})")
    try:
        check_rate(args.rate)
        remote = _remote_options(args)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if not (args.output or args.play or args.list_voices):
        raise UsageError("give -o OUT.wav, --play, or --list-voices")

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
        raise UsageError(str(exc)) from None
    except (ModelVerificationError, VoiceAgentError) as exc:
        raise CommandError(str(exc)) from None
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if pcm is None:
        return EXIT_OK
    if args.output is not None:
        try:
            write_wav(args.output, pcm, args.rate)
        except OSError as exc:
            raise CommandError(f"cannot write {args.output}: {exc.strerror}") from None
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
        raise CommandError(str(exc)) from None
    return EXIT_OK
