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
    engine = PiperTTS()
    yield engine
    engine._executor.shutdown(wait=True)


@pytest.fixture(scope="session")
def espeak() -> Iterator[EspeakTTS]:
    engine = EspeakTTS()
    yield engine
    engine._executor.shutdown(wait=True)
