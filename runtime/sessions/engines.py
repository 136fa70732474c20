"""The worker's speech engines, loaded once and shared by its sessions."""

from __future__ import annotations

import asyncio

from runtime.speech.stt import SpeechToText
from runtime.speech.tts import TextToSpeech


class Engines:
    """The worker's speech engines, loaded once on first use and shared by its sessions."""

    def __init__(self, stt: str = "whisper", tts: str = "piper") -> None:
        self._names = (stt, tts)
        self._lock = asyncio.Lock()
        self._loaded: tuple[SpeechToText, TextToSpeech] | None = None

    @classmethod
    def preloaded(cls, stt: SpeechToText, tts: TextToSpeech) -> Engines:
        """Engines already made (remote engines with their own settings, benchmarks)."""
        engines = cls(stt.name, tts.name)
        engines._loaded = (stt, tts)
        return engines

    async def get(self) -> tuple[SpeechToText, TextToSpeech]:
        """The (STT, TTS) pair.

        Raises:
            ModelVerificationError, ValueError: an engine cannot be loaded.
        """
        async with self._lock:
            if self._loaded is None:
                from runtime.speech.engines.registry import load_stt, load_tts

                stt = await load_stt(self._names[0])
                tts = await load_tts(self._names[1])
                self._loaded = (stt, tts)
            return self._loaded

    async def aclose(self) -> None:
        if self._loaded is not None:
            stt, tts = self._loaded
            self._loaded = None
            await stt.aclose()
            await tts.aclose()
