"""The speech-to-text port.

An engine transcribes whole buffers (:meth:`SpeechToText.transcribe`) and,
for live use, opens one :class:`STTTurn` per user turn: frames are pushed as
they arrive, :meth:`STTTurn.pause` says the user paused (a tentative end of
turn, so the engine may start decoding early), and :meth:`STTTurn.finalize`
returns the turn's final transcript as fast as possible. Engines run CPU or
network work off the event loop and report their own timings.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from audio.frame import AudioFrame


@dataclass(frozen=True, slots=True, kw_only=True)
class Transcript:
    """A transcript and how it was produced.

    Attributes:
        text: the words ("" when nothing was said).
        final: whether this is the turn's final transcript.
        audio_ms: duration of the audio it covers.
        decode_ms: time spent producing it (engine-side work, not waiting).
        speculative: the final text came from work started at a pause.
        end_confidence: how sure the recognizer is that the text ends a sentence
            (0-1: the lower of its probabilities for the last word and the final
            mark); ``None`` when the engine does not say.
        confidence: how well the recognizer made the words out (0-1: the mean
            probability of its tokens); ``None`` when the engine does not say.
    """

    text: str
    final: bool = True
    audio_ms: float = 0.0
    decode_ms: float = 0.0
    speculative: bool = False
    end_confidence: float | None = None
    confidence: float | None = None


class STTTurn(Protocol):
    """One user turn of streaming transcription."""

    def push(self, frame: AudioFrame) -> None:
        """Add audio (never blocks)."""

    def pause(self) -> None:
        """The user paused: work on what has been heard so far may start now."""

    def resume(self) -> None:
        """The user went on speaking after a pause."""

    @property
    def partial(self) -> Transcript | None:
        """The latest partial transcript, if any."""

    async def finalize(self) -> Transcript:
        """The turn is over: return the final transcript."""

    async def aclose(self) -> None:
        """Abandon the turn (cancellation); idempotent."""


class SpeechToText(Protocol):
    """A speech-to-text engine."""

    @property
    def name(self) -> str: ...

    async def transcribe(self, pcm: bytes, sample_rate: int) -> Transcript:
        """Transcribe a whole mono PCM16 buffer."""

    def start_turn(self, sample_rate: int = 16000) -> STTTurn:
        """Begin streaming transcription of one turn."""

    async def aclose(self) -> None: ...
