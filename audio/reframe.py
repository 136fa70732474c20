"""Cut a PCM16 stream into fixed-size frames, carrying the remainder over."""

from __future__ import annotations

from typing import Final

from audio.frame import AudioFrame, check_pcm, check_rate

FRAME_MS: Final = (10, 20, 30, 32)


class Reframer:
    """Turns arbitrary chunks into frames of exactly ``frame_ms``.

    Args:
        sample_rate: rate of the incoming PCM.
        frame_ms: 10, 20, 30 or 32 (32 ms is Silero's 512 samples at 16 kHz).
        start_pts: timestamp (samples) of the first sample.

    Raises:
        ValueError: unsupported rate or frame size.
    """

    __slots__ = ("_buf", "_frame_bytes", "_pts", "_rate")

    def __init__(self, sample_rate: int, frame_ms: int = 20, start_pts: int = 0) -> None:
        self._rate = check_rate(sample_rate)
        if frame_ms not in FRAME_MS:
            raise ValueError(f"frame_ms must be one of {FRAME_MS}, got {frame_ms!r}")
        samples = sample_rate * frame_ms // 1000
        if samples * 1000 != sample_rate * frame_ms:
            raise ValueError(f"{frame_ms} ms is not a whole number of samples at {sample_rate} Hz")
        self._frame_bytes = samples * 2
        self._buf = bytearray()
        self._pts = start_pts

    @property
    def frame_samples(self) -> int:
        return self._frame_bytes // 2

    @property
    def pending_samples(self) -> int:
        return len(self._buf) // 2

    def process(self, pcm: bytes) -> list[AudioFrame]:
        """Add PCM; return the whole frames now available (possibly none).

        Raises:
            ValueError: odd byte count.
        """
        self._buf += check_pcm(pcm)
        n = self._frame_bytes
        count = len(self._buf) // n
        if not count:
            return []
        frames = []
        for i in range(count):
            frames.append(
                AudioFrame(
                    pcm=bytes(self._buf[i * n : (i + 1) * n]), sample_rate=self._rate, pts=self._pts
                )
            )
            self._pts += n // 2
        del self._buf[: count * n]
        return frames

    def flush(self, *, pad: bool = True) -> list[AudioFrame]:
        """Return the remainder: one frame padded with silence (``pad``), or as is."""
        if not self._buf:
            return []
        data = bytes(self._buf)
        if pad:
            data += b"\x00" * (self._frame_bytes - len(data))
        self._buf.clear()
        frame = AudioFrame(pcm=data, sample_rate=self._rate, pts=self._pts)
        self._pts += frame.samples
        return [frame]
