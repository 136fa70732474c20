"""Engines by name, for the CLI and configuration."""

from __future__ import annotations

from typing import Final

from runtime.speech.stt import SpeechToText
from runtime.speech.tts import TextToSpeech

STT_ENGINES: Final = ("whisper",)
TTS_ENGINES: Final = ("piper", "espeak")


async def load_stt(name: str = "whisper") -> SpeechToText:
    """Load an embedded STT engine by name.

    Raises:
        ValueError: unknown engine name.
        ModelVerificationError: the engine's pinned model is missing or altered.
    """
    if name == "whisper":
        from runtime.speech.engines.whisper import WhisperSTT

        return await WhisperSTT.load()
    raise ValueError(f"unknown STT engine {name!r} (available: {', '.join(STT_ENGINES)})")


async def load_tts(name: str = "piper") -> TextToSpeech:
    """Load an embedded TTS engine by name.

    Raises:
        ValueError: unknown engine name.
        ModelVerificationError: the engine's pinned voice is missing or altered.
    """
    import asyncio

    if name == "piper":
        from runtime.speech.engines.piper import PiperTTS

        return await asyncio.to_thread(PiperTTS)
    if name == "espeak":
        from runtime.speech.engines.espeak import EspeakTTS

        return await asyncio.to_thread(EspeakTTS)
    raise ValueError(f"unknown TTS engine {name!r} (available: {', '.join(TTS_ENGINES)})")
