from __future__ import annotations

import warnings

import numpy as np
import pytest

from audio import g711
from audio.frame import AudioFrame, pcm_from_float

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    # The ITU-T G.711 reference: CPython's audioop up to 3.12, audioop-lts from 3.13
    # (a dev dependency there), under the same module name.
    import audioop

ALL_PCM = np.arange(-32768, 32768, dtype="<i2").tobytes()
ALL_CODES = bytes(range(256))


def test_ulaw_encode_is_bit_exact_for_all_65536_values():
    assert g711.ulaw_encode(ALL_PCM) == audioop.lin2ulaw(ALL_PCM, 2)


def test_ulaw_decode_is_bit_exact_for_all_256_codes():
    assert g711.ulaw_decode(ALL_CODES) == audioop.ulaw2lin(ALL_CODES, 2)


def test_alaw_encode_is_bit_exact_for_all_65536_values():
    assert g711.alaw_encode(ALL_PCM) == audioop.lin2alaw(ALL_PCM, 2)


def test_alaw_decode_is_bit_exact_for_all_256_codes():
    assert g711.alaw_decode(ALL_CODES) == audioop.alaw2lin(ALL_CODES, 2)


@pytest.mark.parametrize(
    ("enc", "dec"), [(g711.ulaw_encode, g711.ulaw_decode), (g711.alaw_encode, g711.alaw_decode)]
)
def test_codes_round_trip(enc, dec):
    # Decoding then encoding any code gives the code back (except μ-law's negative zero).
    again = enc(dec(ALL_CODES))
    differ = [c for c, d in zip(ALL_CODES, again, strict=True) if c != d]
    assert differ in ([], [0x7F])


@pytest.mark.parametrize("fn", [g711.ulaw_encode, g711.alaw_encode])
def test_odd_byte_count_is_a_clear_error(fn):
    with pytest.raises(ValueError, match="even number of bytes, got 3"):
        fn(b"\x00\x01\x02")


@pytest.mark.parametrize(
    "fn", [g711.ulaw_encode, g711.ulaw_decode, g711.alaw_encode, g711.alaw_decode]
)
def test_non_bytes_is_a_clear_error(fn):
    with pytest.raises(ValueError, match="must be bytes"):
        fn("text")


def test_empty_input():
    assert g711.ulaw_encode(b"") == b"" and g711.ulaw_decode(b"") == b""


def test_frame_validates_and_converts():
    frame = AudioFrame(pcm=b"\x01\x00\xff\xff", sample_rate=16000, pts=320)
    assert frame.samples == 2 and frame.end_pts == 322
    assert frame.to_numpy().tolist() == [1, -1]
    assert frame.duration_ms == pytest.approx(0.125)
    back = AudioFrame.from_numpy(np.array([0.5, -1.0, 2.0]), 8000)
    assert back.to_numpy().tolist() == [16384, -32767, 32767]
    with pytest.raises(AttributeError):
        frame.pts = 1  # type: ignore[misc]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"pcm": b"\x00", "sample_rate": 16000}, "even number of bytes"),
        ({"pcm": "ab", "sample_rate": 16000}, "must be bytes"),
        ({"pcm": b"", "sample_rate": 11025}, "unsupported sample rate 11025"),
        ({"pcm": b"", "sample_rate": 16000.0}, "must be an integer"),
        ({"pcm": b"", "sample_rate": 16000, "pts": -1}, "pts must be"),
    ],
)
def test_bad_frames(kwargs, message):
    with pytest.raises(ValueError, match=message):
        AudioFrame(**kwargs)


def test_float_input_with_nan_or_wrong_shape_is_rejected():
    with pytest.raises(ValueError, match="NaN"):
        pcm_from_float([0.1, float("nan")])
    with pytest.raises(ValueError, match="mono"):
        AudioFrame.from_numpy(np.zeros((2, 10)), 16000)
    with pytest.raises(ValueError, match="int16 or float"):
        AudioFrame.from_numpy(np.zeros(4, dtype=np.int32), 16000)
