from __future__ import annotations

from collections.abc import Iterator

import pytest

from runtime.speech.engines.espeak import EspeakTTS
from runtime.speech.engines.piper import PiperTTS
from runtime.speech.engines.whisper import WhisperSTT


@pytest.fixture(scope="session")
def whisper() -> Iterator[WhisperSTT]:
    engine = WhisperSTT()
    yield engine
    engine._executor.shutdown(wait=True)


@pytest.fixture(scope="session")
def piper() -> Iterator[PiperTTS]:
    # No sampling noise: the same text always gives the same audio, so the
    # accuracy tests measure the same thing on every run.
    engine = PiperTTS(noise_scale=0.0, noise_w=0.0)
    yield engine
    engine._executor.shutdown(wait=True)


@pytest.fixture(scope="session")
def espeak() -> Iterator[EspeakTTS]:
    engine = EspeakTTS()
    yield engine
    engine._executor.shutdown(wait=True)
