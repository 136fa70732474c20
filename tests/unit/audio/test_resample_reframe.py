from __future__ import annotations

import numpy as np
import pytest

from audio.frame import SUPPORTED_RATES
from audio.reframe import Reframer
from audio.resample import Resampler, resample_all

from ...helpers import tone


def chunked(r: Resampler, pcm: bytes, chunk_bytes: int) -> bytes:
    out = b"".join(r.process(pcm[i : i + chunk_bytes]) for i in range(0, len(pcm), chunk_bytes))
    return out + r.flush()


def snr_db(reference: np.ndarray, test: np.ndarray) -> float:
    err = test - reference
    return float(10 * np.log10(np.sum(reference**2) / np.sum(err**2)))


def test_tone_through_24k_8k_24k_keeps_snr_above_40_db():
    x = tone(1000, 1.0, 24000)
    down, up = Resampler(24000, 8000), Resampler(8000, 24000)
    mid = chunked(down, x, 960)  # 20 ms chunks
    y = chunked(up, mid, 320)
    a = np.frombuffer(x, "<i2").astype(float)
    b = np.frombuffer(y, "<i2").astype(float)
    assert len(b) == len(a)
    core = slice(2400, len(a) - 2400)  # away from the start/end transients
    assert snr_db(a[core], b[core]) >= 40


@pytest.mark.parametrize(
    "rates",
    [(8000, 16000), (16000, 24000), (48000, 16000), (22050, 16000), (44100, 48000), (24000, 8000)],
)
def test_chunked_equals_one_shot(rates):
    in_rate, out_rate = rates
    x = tone(440, 0.5, in_rate) + tone(1200, 0.5, in_rate, 0.3)
    one = np.frombuffer(resample_all(x, in_rate, out_rate), "<i2").astype(int)
    step = in_rate // 50 * 2  # 20 ms
    many = np.frombuffer(chunked(Resampler(in_rate, out_rate), x, step), "<i2").astype(int)
    assert len(one) == len(many) == round(len(x) / 2 * out_rate / in_rate)
    assert np.abs(one - many).max() <= 2  # libsoxr's rounding tolerance, in LSB


def test_no_clicks_at_chunk_edges():
    x = tone(1000, 0.5, 8000)
    y = np.frombuffer(chunked(Resampler(8000, 16000), x, 320), "<i2").astype(float)
    # A clean sine has bounded sample-to-sample steps; a click at a 20 ms edge would not.
    max_step = 2 * np.pi * 1000 / 16000 * 0.5 * 32767 * 1.1
    assert np.abs(np.diff(y[200:-200])).max() <= max_step


def test_identity_and_errors():
    r = Resampler(16000, 16000)
    assert r.process(b"\x01\x02") == b"\x01\x02" and r.flush() == b""
    with pytest.raises(ValueError, match="unsupported sample rate 11025"):
        Resampler(11025, 16000)
    r = Resampler(8000, 16000)
    with pytest.raises(ValueError, match="even number"):
        r.process(b"\x00")
    r.flush()
    with pytest.raises(ValueError, match="after flush"):
        r.process(b"\x00\x00")


@pytest.mark.parametrize("rate", SUPPORTED_RATES)
def test_all_rates_are_accepted(rate):
    out = resample_all(tone(300, 0.1, rate), rate, 16000)
    assert abs(len(out) // 2 - 1600) <= 1


@pytest.mark.parametrize(("ms", "samples"), [(10, 160), (20, 320), (30, 480), (32, 512)])
def test_reframer_sizes_and_timestamps(ms, samples):
    r = Reframer(16000, ms)
    pcm = np.arange(1000, dtype="<i2").tobytes()
    frames = r.process(pcm[:8]) + r.process(pcm[8:1002]) + r.process(pcm[1002:])
    assert all(f.samples == samples for f in frames)
    assert [f.pts for f in frames] == [i * samples for i in range(len(frames))]
    assert r.pending_samples == 1000 - len(frames) * samples
    tail = r.flush()
    assert len(tail) == 1 and tail[0].samples == samples and tail[0].pts == len(frames) * samples
    joined = b"".join(f.pcm for f in [*frames, *tail])
    assert joined[: len(pcm)] == pcm and set(joined[len(pcm) :]) <= {0}
    assert r.flush() == []


def test_reframer_edge_cases():
    r = Reframer(8000, 20)
    assert r.process(b"") == []
    with pytest.raises(ValueError, match="even number"):
        r.process(b"\x00\x00\x00")
    assert r.flush(pad=False) == []
    r.process(b"\x01\x00" * 10)
    [rest] = r.flush(pad=False)
    assert rest.samples == 10
    with pytest.raises(ValueError, match="frame_ms"):
        Reframer(16000, 25)
    with pytest.raises(ValueError, match="whole number of samples"):
        Reframer(22050, 10)
