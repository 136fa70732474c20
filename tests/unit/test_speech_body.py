"""How a speech server's answer is read: raw PCM, WAV, decoded containers."""

from __future__ import annotations

import io

import numpy as np
import pytest
import soundfile

from runtime.errors import MalformedStream
from runtime.speech.engines.openai_audio import SpeechBody

from .audio.test_wav_variants import PLAIN, VARIANTS


def read_all(body: SpeechBody, data: bytes, step: int) -> tuple[bytes, int | None]:
    out = b"".join(body.feed(data[i : i + step]) for i in range(0, len(data), step))
    rest, rate = body.finish()
    return out + rest, rate


@pytest.mark.parametrize("step", [1, 5, 1000])
def test_raw_pcm_with_odd_pieces(step: int):
    assert read_all(SpeechBody("audio/pcm", 24000), PLAIN, step) == (PLAIN, 24000)


def test_l16_names_its_rate():
    assert read_all(SpeechBody("audio/L16; rate=16000; channels=1", 24000), PLAIN, 3) == (
        PLAIN,
        16000,
    )


@pytest.mark.parametrize("label", ["audio/pcm", "application/octet-stream", "", "audio/wav"])
@pytest.mark.parametrize("step", [1, 7, 4096])
def test_wav_is_recognised_whatever_its_label(label: str, step: int):
    assert read_all(SpeechBody(label, 24000), VARIANTS["chunk-after-data"], step) == (
        PLAIN,
        16000,
    )


def test_flac_is_decoded_whole():
    buf = io.BytesIO()
    soundfile.write(buf, np.frombuffer(PLAIN, "<i2"), 8000, format="FLAC")
    body = SpeechBody("application/octet-stream", 24000)
    assert body.feed(buf.getvalue()) == b""
    assert body.finish() == (PLAIN, 8000)


def test_short_bodies():
    assert SpeechBody("audio/pcm", 24000).finish() == (b"", 24000)
    body = SpeechBody("audio/pcm", 24000)
    assert body.feed(b"\x01\x00\x02") == b""
    assert body.finish() == (b"\x01\x00", 24000)


@pytest.mark.parametrize(
    ("label", "data", "message"),
    [
        ("audio/wav", VARIANTS["plain"][:30], "ended before its audio began"),
        ("audio/wav", b"<html>nope</html>", "not a WAV body"),
        ("audio/mpeg", b"\xff\xfb" + bytes(40), "does not decode"),
        ("text/html", b"<html>nope</html>", "answered 'text/html', which voxloop cannot play"),
    ],
)
def test_what_cannot_be_played_is_named(label: str, data: bytes, message: str):
    body = SpeechBody(label, 24000)
    with pytest.raises(MalformedStream, match=message):
        body.feed(data)
        body.finish()
