"""WAV files (PCM16, mono or stereo) and a paced frame source.

Reading validates everything a file can get wrong (not RIFF/WAVE, truncated
header or data, not 16-bit PCM, unsupported rate or channel count) and says so
in a :class:`ValueError` that names the file.
"""

from __future__ import annotations

import asyncio
import io
import time
import wave
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from audio.frame import AudioFrame, check_pcm, check_rate
from audio.reframe import Reframer


@dataclass(frozen=True, slots=True)
class WavAudio:
    """Interleaved PCM16 with its format."""

    pcm: bytes
    sample_rate: int
    channels: int

    @property
    def duration_s(self) -> float:
        return len(self.pcm) / (2 * self.channels * self.sample_rate)

    def mono(self) -> bytes:
        """Mono PCM16 (channels averaged)."""
        if self.channels == 1:
            return self.pcm
        arr = np.frombuffer(self.pcm, dtype="<i2").reshape(-1, self.channels).astype(np.int32)
        mixed: bytes = arr.mean(axis=1).round().astype("<i2").tobytes()
        return mixed

    def channel(self, index: int) -> bytes:
        arr = np.frombuffer(self.pcm, dtype="<i2").reshape(-1, self.channels)
        return np.ascontiguousarray(arr[:, index]).tobytes()


def read_wav(source: str | Path | bytes, *, any_rate: bool = False) -> WavAudio:
    """Read a PCM16 WAV file (a path, or the file's bytes).

    Args:
        any_rate: accept any sample rate (the caller resamples), not only
            :data:`~audio.frame.SUPPORTED_RATES`.

    Raises:
        ValueError: the file is missing, malformed, truncated, or not PCM16 mono/stereo
            at a supported rate.
    """
    name = "<bytes>" if isinstance(source, bytes) else str(source)
    try:
        fh = io.BytesIO(source) if isinstance(source, bytes) else open(source, "rb")  # noqa: SIM115
    except OSError as exc:
        raise ValueError(f"{name}: cannot open: {exc.strerror}") from None
    with fh:
        try:
            with wave.open(fh, "rb") as w:
                channels, width, rate, nframes = (
                    w.getnchannels(), w.getsampwidth(), w.getframerate(), w.getnframes()
                )  # fmt: skip
                if width != 2:
                    raise ValueError(f"{name}: expected 16-bit PCM, got {8 * width}-bit samples")
                if channels not in (1, 2):
                    raise ValueError(f"{name}: expected mono or stereo, got {channels} channels")
                try:
                    if not any_rate or rate <= 0:
                        check_rate(rate)
                except ValueError as exc:
                    raise ValueError(f"{name}: {exc}") from None
                pcm = w.readframes(nframes)
        except (wave.Error, EOFError) as exc:
            raise ValueError(
                f"{name}: not a valid PCM WAV file ({exc or 'truncated header'})"
            ) from None
    if len(pcm) != nframes * 2 * channels:
        raise ValueError(
            f"{name}: truncated data ({len(pcm)} bytes, header says {nframes * 2 * channels})"
        )
    return WavAudio(pcm=pcm, sample_rate=rate, channels=channels)


def write_wav(path: str | Path, pcm: bytes, sample_rate: int, channels: int = 1) -> None:
    """Write interleaved PCM16.

    Raises:
        ValueError: odd byte count, partial frame, unsupported rate or channel count.
    """
    pcm = check_pcm(pcm)
    check_rate(sample_rate)
    if channels not in (1, 2):
        raise ValueError(f"channels must be 1 or 2, got {channels}")
    if len(pcm) % (2 * channels):
        raise ValueError("PCM length is not a whole number of frames")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(2)
        w.setframerate(sample_rate)
        w.writeframes(pcm)


def interleave(left: bytes, right: bytes) -> bytes:
    """Two mono PCM16 tracks → one stereo track (the shorter one padded with silence)."""
    a = np.frombuffer(check_pcm(left), dtype="<i2")
    b = np.frombuffer(check_pcm(right), dtype="<i2")
    n = max(len(a), len(b))
    out = np.zeros((n, 2), dtype="<i2")
    out[: len(a), 0] = a
    out[: len(b), 1] = b
    return out.tobytes()


class Pacer(Protocol):
    """Waits until a moment on its own clock (seconds since the source started)."""

    async def wait_until(self, t: float) -> None: ...


class RealTimePacer:
    """Paces in real time with the monotonic clock; drift does not accumulate."""

    def __init__(self) -> None:
        self._t0: float | None = None

    async def wait_until(self, t: float) -> None:
        now = time.monotonic()
        if self._t0 is None:
            self._t0 = now
        delay = self._t0 + t - now
        if delay > 0:
            await asyncio.sleep(delay)


class VirtualPacer:
    """No waiting: time jumps to each frame (tests, and faster-than-real-time runs)."""

    def __init__(self) -> None:
        self.now = 0.0

    async def wait_until(self, t: float) -> None:
        self.now = max(self.now, t)
        await asyncio.sleep(0)


async def paced_frames(
    pcm: bytes,
    sample_rate: int,
    *,
    frame_ms: int = 20,
    pacer: Pacer | None = None,
    trailing_silence_s: float = 0.0,
) -> AsyncIterator[AudioFrame]:
    """Yield mono PCM16 as frames, each released when it would have been captured.

    A frame of ``frame_ms`` is released once its last sample is due, as a
    microphone would deliver it. ``trailing_silence_s`` of silence follows the
    audio (a user who stopped talking but is still on the line).
    """
    pacer = pacer or RealTimePacer()
    reframer = Reframer(sample_rate, frame_ms)
    silence = b"\x00\x00" * round(trailing_silence_s * sample_rate)
    for frame in [*reframer.process(pcm + silence), *reframer.flush()]:
        await pacer.wait_until(frame.end_pts / sample_rate)
        yield frame
