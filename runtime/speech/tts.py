"""The text-to-speech port.

:meth:`TextToSpeech.synthesize` returns a :class:`TTSRun`: an async iterator
of :class:`AudioChunk` at the requested sample rate, one or more chunks per
sentence, each yielded as soon as it is ready. :meth:`TTSRun.cancel` stops it
at once: no chunk is yielded after it, and the engine stops working as soon as
the current inference step returns. :meth:`TTSRun.aclose` also releases what the
run holds (a remote engine's HTTP response) before it returns; a consumer that
stops early (a barge-in) awaits it.

An engine's first synthesis is slower than the next ones (model sessions,
phonemizer data, resampler set-up): engines that can, offer an async
``warmup()`` and :func:`warm_up` runs it when a session starts.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol

log = logging.getLogger("voxloop.tts")


@dataclass(frozen=True, slots=True, kw_only=True)
class Voice:
    id: str
    name: str
    language: str
    engine: str
    sample_rate: int
    aliases: tuple[str, ...] = ()
    gender: str | None = None  # "female", "male" or None (unknown)


@dataclass(frozen=True, slots=True, kw_only=True)
class AudioChunk:
    """Synthesized mono PCM16 for (part of) ``text``."""

    pcm: bytes
    sample_rate: int
    text: str = ""

    @property
    def duration_ms(self) -> float:
        return 1000.0 * len(self.pcm) / 2 / self.sample_rate


class UnknownVoice(ValueError):
    """The requested voice is not installed; the message lists the voices."""

    def __init__(self, voice: str, available: list[Voice]) -> None:
        ids = ", ".join(v.id for v in available) or "none"
        super().__init__(f"unknown voice {voice!r}; installed voices: {ids}")
        self.voice = voice


class TTSRun(Protocol):
    def __aiter__(self) -> AsyncIterator[AudioChunk]: ...

    def cancel(self) -> None: ...

    async def aclose(self) -> None:
        """Cancel and release what the run holds (safe to call more than once)."""


class TextToSpeech(Protocol):
    """A text-to-speech engine."""

    @property
    def name(self) -> str: ...

    def voices(self) -> list[Voice]: ...

    def synthesize(
        self, text: str, *, voice: str | None = None, sample_rate: int = 24000
    ) -> TTSRun:
        """Speak ``text`` (one or more sentences).

        Raises:
            UnknownVoice: ``voice`` is not installed.
        """

    async def aclose(self) -> None: ...


async def warm_up(tts: TextToSpeech) -> None:
    """Run the engine's ``warmup()`` if it has one; a failure is logged, never raised.

    Called when a session starts, so the first reply does not pay the first
    synthesis' set-up cost.
    """
    warmup = getattr(tts, "warmup", None)
    if warmup is None:
        return
    try:
        await warmup()
    except Exception as exc:  # the first reply will just be slower
        log.info("TTS warm-up failed", extra={"engine": tts.name, "error": type(exc).__name__})
