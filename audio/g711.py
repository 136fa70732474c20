"""ITU-T G.711 μ-law and A-law codecs on PCM16, through lookup tables.

The tables are computed once, vectorised, from the reference algorithms of
the ITU-T G.711 software (the Sun ``g711.c`` that CPython's ``audioop`` also
follows): 16-bit input is reduced to 14 bits (μ-law) or 13 bits (A-law) by an
arithmetic shift, encoded by segment search, and decoded back to 16 bits.
Encoding is one table lookup per sample, decoding one per byte.
"""

from __future__ import annotations

from typing import Final

import numpy as np
import numpy.typing as npt

_SEG_UEND: Final = np.array([0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF, 0x1FFF], dtype=np.int32)
_SEG_AEND: Final = np.array([0x1F, 0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF], dtype=np.int32)


def _ulaw_encode_table() -> npt.NDArray[np.uint8]:
    pcm = np.arange(-32768, 32768, dtype=np.int32) >> 2  # 14-bit
    mask = np.where(pcm < 0, 0x7F, 0xFF)
    val = np.minimum(np.abs(pcm), 8159) + (0x84 >> 2)
    seg = np.searchsorted(_SEG_UEND, val, side="left")
    uval = (seg << 4) | ((val >> (seg + 1)) & 0xF)
    out = np.where(seg >= 8, 0x7F, uval) ^ mask
    # Index by the unsigned 16-bit view of the sample.
    return np.roll(out.astype(np.uint8), -32768)


def _ulaw_decode_table() -> npt.NDArray[np.int16]:
    u = ~np.arange(256, dtype=np.int32) & 0xFF
    t = (((u & 0x0F) << 3) + 0x84) << ((u & 0x70) >> 4)
    return np.where(u & 0x80, 0x84 - t, t - 0x84).astype(np.int16)


def _alaw_encode_table() -> npt.NDArray[np.uint8]:
    pcm = np.arange(-32768, 32768, dtype=np.int32) >> 3  # 13-bit
    mask = np.where(pcm >= 0, 0xD5, 0x55)
    val = np.where(pcm >= 0, pcm, -pcm - 1)
    seg = np.searchsorted(_SEG_AEND, val, side="left")
    low = np.where(seg < 2, (val >> 1) & 0xF, (val >> np.maximum(seg, 1)) & 0xF)
    aval = (seg << 4) | low
    out = np.where(seg >= 8, 0x7F, aval) ^ mask
    return np.roll(out.astype(np.uint8), -32768)


def _alaw_decode_table() -> npt.NDArray[np.int16]:
    a = np.arange(256, dtype=np.int32) ^ 0x55
    t = a & 0x0F
    seg = (a & 0x70) >> 4
    mag = np.where(seg > 0, (t * 2 + 1 + 32) << (seg + 2), (t * 2 + 1) << 3)
    return np.where(a & 0x80, mag, -mag).astype(np.int16)


_ULAW_ENC: Final = _ulaw_encode_table()
_ULAW_DEC: Final = _ulaw_decode_table()
_ALAW_ENC: Final = _alaw_encode_table()
_ALAW_DEC: Final = _alaw_decode_table()


def _samples(pcm: bytes) -> npt.NDArray[np.uint16]:
    if not isinstance(pcm, bytes | bytearray | memoryview):
        raise ValueError(f"PCM must be bytes, not {type(pcm).__name__}")
    if len(pcm) % 2:
        raise ValueError(f"PCM16 needs an even number of bytes, got {len(pcm)}")
    return np.frombuffer(pcm, dtype="<u2")


def _codes(data: bytes) -> npt.NDArray[np.uint8]:
    if not isinstance(data, bytes | bytearray | memoryview):
        raise ValueError(f"G.711 data must be bytes, not {type(data).__name__}")
    return np.frombuffer(data, dtype=np.uint8)


def ulaw_encode(pcm: bytes) -> bytes:
    """PCM16 (little-endian) → μ-law, one byte per sample."""
    return _ULAW_ENC[_samples(pcm)].tobytes()


def ulaw_decode(data: bytes) -> bytes:
    """μ-law → PCM16 (little-endian)."""
    return _ULAW_DEC[_codes(data)].astype("<i2", copy=False).tobytes()


def alaw_encode(pcm: bytes) -> bytes:
    """PCM16 (little-endian) → A-law, one byte per sample."""
    return _ALAW_ENC[_samples(pcm)].tobytes()


def alaw_decode(data: bytes) -> bytes:
    """A-law → PCM16 (little-endian)."""
    return _ALAW_DEC[_codes(data)].astype("<i2", copy=False).tobytes()
