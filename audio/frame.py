"""The audio frame: an immutable block of 16-bit signed little-endian mono PCM."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

import numpy as np
import numpy.typing as npt

SUPPORTED_RATES: Final = (8000, 16000, 22050, 24000, 44100, 48000)
SAMPLE_WIDTH: Final = 2

Int16Array = npt.NDArray[np.int16]


def check_rate(sample_rate: object) -> int:
    """Return ``sample_rate`` if voxloop supports it.

    Raises:
        ValueError: not one of :data:`SUPPORTED_RATES`.
    """
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, int):
        raise ValueError(f"sample rate must be an integer, not {type(sample_rate).__name__}")
    if sample_rate not in SUPPORTED_RATES:
        rates = ", ".join(str(r) for r in SUPPORTED_RATES)
        raise ValueError(f"unsupported sample rate {sample_rate} Hz (supported: {rates})")
    return sample_rate


def check_pcm(pcm: object) -> bytes:
    """Return ``pcm`` as ``bytes`` if it is whole 16-bit samples.

    Raises:
        ValueError: not bytes-like, or an odd number of bytes.
    """
    if isinstance(pcm, bytearray | memoryview):
        pcm = bytes(pcm)
    if not isinstance(pcm, bytes):
        raise ValueError(f"PCM must be bytes, not {type(pcm).__name__}")
    if len(pcm) % SAMPLE_WIDTH:
        raise ValueError(f"PCM16 needs an even number of bytes, got {len(pcm)}")
    return pcm


def pcm_from_float(samples: npt.ArrayLike) -> bytes:
    """Convert float samples in [-1, 1] to PCM16 bytes (clipping).

    Raises:
        ValueError: NaN or infinite samples, or not one-dimensional.
    """
    arr = np.asarray(samples, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"expected mono samples (1-D), got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError("samples contain NaN or infinity")
    return bytes(np.clip(np.round(arr * 32767.0), -32768, 32767).astype("<i2").tobytes())


@dataclass(frozen=True, slots=True, kw_only=True)
class AudioFrame:
    """A block of mono PCM16 audio.

    Attributes:
        pcm: little-endian signed 16-bit samples.
        sample_rate: one of :data:`SUPPORTED_RATES`.
        pts: timestamp of the first sample, in samples at ``sample_rate``.
    """

    pcm: bytes
    sample_rate: int
    pts: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "pcm", check_pcm(self.pcm))
        check_rate(self.sample_rate)
        if isinstance(self.pts, bool) or not isinstance(self.pts, int) or self.pts < 0:
            raise ValueError(f"pts must be a non-negative integer, got {self.pts!r}")

    def __repr__(self) -> str:
        return f"AudioFrame(samples={self.samples}, sample_rate={self.sample_rate}, pts={self.pts})"

    @property
    def samples(self) -> int:
        return len(self.pcm) // SAMPLE_WIDTH

    @property
    def duration_ms(self) -> float:
        return 1000.0 * self.samples / self.sample_rate

    @property
    def end_pts(self) -> int:
        return self.pts + self.samples

    def to_numpy(self) -> Int16Array:
        """A read-only int16 view of the samples."""
        return np.frombuffer(self.pcm, dtype="<i2")

    @classmethod
    def from_numpy(cls, samples: npt.ArrayLike, sample_rate: int, pts: int = 0) -> AudioFrame:
        """Build a frame from int16 samples, or float samples in [-1, 1].

        Raises:
            ValueError: not 1-D, NaN/inf, or an integer type other than int16.
        """
        arr = np.asarray(samples)
        if arr.ndim != 1:
            raise ValueError(f"expected mono samples (1-D), got shape {arr.shape}")
        if arr.dtype == np.int16:
            pcm = arr.astype("<i2", copy=False).tobytes()
        elif np.issubdtype(arr.dtype, np.floating):
            pcm = pcm_from_float(arr)
        else:
            raise ValueError(f"expected int16 or float samples, got {arr.dtype}")
        return cls(pcm=pcm, sample_rate=sample_rate, pts=pts)
