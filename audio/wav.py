"""WAV files (PCM16, mono or stereo), a streaming WAV reader and a paced frame source.

Reading validates everything a file can get wrong (not RIFF/WAVE, truncated
header or data, unsupported rate or channel count) and says so in a
:class:`ValueError` that names the file. The chunk layout is walked here (so a
streaming placeholder size is told apart from a truncated file); the samples
are decoded by libsndfile. :class:`WavStreamReader` takes a WAV body as it
arrives over the network and hands out only its audio.
"""

from __future__ import annotations

import asyncio
import io
import time
import wave
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Protocol

import numpy as np
import soundfile

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

    def mono_at(self, rate: int) -> bytes:
        """Mono PCM16 at ``rate`` Hz (resampled with soxr from any rate the file has)."""
        mono = self.mono()
        if rate == self.sample_rate or not mono:
            return mono
        import soxr

        out = soxr.resample(np.frombuffer(mono, dtype="<i2"), self.sample_rate, rate, quality="HQ")
        return np.asarray(out, dtype="<i2").tobytes()

    def channel(self, index: int) -> bytes:
        arr = np.frombuffer(self.pcm, dtype="<i2").reshape(-1, self.channels)
        return np.ascontiguousarray(arr[:, index]).tobytes()


_PLACEHOLDER_SIZES: Final = (0, 0xFFFFFFFF)


@dataclass(frozen=True, slots=True)
class RiffLayout:
    """Where a WAV file's audio is.

    Attributes:
        data_offset: byte offset of the ``data`` chunk's payload.
        data_size: its size in bytes, as present in the file.
        streamed: the header carried a placeholder size (0 or 0xFFFFFFFF, as a
            tool streaming to a pipe writes it): the audio runs to the end of the file.
    """

    data_offset: int
    data_size: int
    streamed: bool


def riff_layout(raw: bytes, name: str = "<bytes>") -> RiffLayout:
    """Find the ``data`` chunk of a RIFF/RF64 WAVE file, chunk by chunk.

    Chunks may come in any order and number (``LIST``, ``fact``, ``JUNK``, …),
    with odd sizes padded to even as RIFF requires.

    Raises:
        ValueError: not RIFF/WAVE, no ``fmt `` or ``data`` chunk, or a data
            chunk that declares more bytes than the file holds.
    """
    if len(raw) < 12 or raw[:4] not in (b"RIFF", b"RF64") or raw[8:12] != b"WAVE":
        raise ValueError(f"{name}: not a valid PCM WAV file (no RIFF/WAVE header)")
    at = 12
    seen_fmt = False
    while at + 8 <= len(raw):
        chunk_id = raw[at : at + 4]
        size = int.from_bytes(raw[at + 4 : at + 8], "little")
        body = at + 8
        if chunk_id == b"fmt ":
            seen_fmt = True
        elif chunk_id == b"data":
            if not seen_fmt:
                raise ValueError(f"{name}: not a valid PCM WAV file (data before fmt)")
            present = len(raw) - body
            if size in _PLACEHOLDER_SIZES or raw[:4] == b"RF64":
                return RiffLayout(data_offset=body, data_size=present, streamed=True)
            if size > present:
                raise ValueError(f"{name}: truncated data ({present} bytes, header says {size})")
            return RiffLayout(data_offset=body, data_size=size, streamed=False)
        at = body + size + (size & 1)
    raise ValueError(f"{name}: not a valid PCM WAV file (no data chunk)")


def read_wav(
    source: str | Path | bytes, *, any_rate: bool = False, name: str | None = None
) -> WavAudio:
    """Read a WAV file (a path, or the file's bytes) as PCM16.

    Real-world variants are read the same on every supported Python version:
    ``WAVE_FORMAT_EXTENSIBLE`` headers, extra chunks in any order, streaming
    placeholder sizes (the audio then runs to the end of the file), and 8-,
    24- and 32-bit integer, float and A-/µ-law samples (converted to 16-bit).
    Decoding is libsndfile's, through ``soundfile``.

    Args:
        any_rate: accept any sample rate (the caller resamples), not only
            :data:`~audio.frame.SUPPORTED_RATES`.
        name: what the errors call the file (default: the path, or ``<bytes>``).

    Raises:
        ValueError: the file is missing, malformed, truncated, or not mono/stereo
            at a supported rate.
    """
    if name is None:
        name = "<bytes>" if isinstance(source, bytes) else str(source)
    if isinstance(source, bytes):
        raw = source
    else:
        try:
            raw = Path(source).read_bytes()
        except OSError as exc:
            raise ValueError(f"{name}: cannot open: {exc.strerror}") from None
    layout = riff_layout(raw, name)
    if layout.streamed:
        raw = _with_sizes(raw, layout)
    try:
        info = soundfile.info(io.BytesIO(raw))
        if info.channels not in (1, 2):
            raise ValueError(f"{name}: expected mono or stereo, got {info.channels} channels")
        try:
            if not any_rate or info.samplerate <= 0:
                check_rate(info.samplerate)
        except ValueError as exc:
            raise ValueError(f"{name}: {exc}") from None
        # Read as float and scale here: libsndfile's own float-to-int
        # conversion does not scale float files (1.0 would become 1).
        samples, rate = soundfile.read(io.BytesIO(raw), dtype="float64", always_2d=True)
    except soundfile.LibsndfileError as exc:
        raise ValueError(f"{name}: not a valid PCM WAV file ({exc.error_string})") from None
    scaled = np.clip(np.round(samples * 32768.0), -32768, 32767)
    pcm: bytes = np.ascontiguousarray(scaled).astype("<i2").tobytes()
    return WavAudio(pcm=pcm, sample_rate=int(rate), channels=int(samples.shape[1]))


SPEECH_RATES: Final = (4000, 384000)
"""Sample rates (Hz) :func:`read_speech_file` accepts: below, no speech band is left; above,
no recorder writes."""

# Leading bytes of the audio files most often renamed ``.wav`` by mistake.
_MAGIC: Final = (
    (0, b"ID3", "an MP3 file"),
    (0, b"\xff\xfb", "an MP3 file"),
    (0, b"\xff\xf3", "an MP3 file"),
    (0, b"OggS", "an Ogg file"),
    (0, b"fLaC", "a FLAC file"),
    (4, b"ftyp", "an MP4/M4A (AAC) file"),
    (0, b"\x1aE\xdf\xa3", "a WebM/Matroska file"),
)


class NoAudioError(ValueError):
    """A readable file that holds no samples (a header with an empty ``data`` chunk)."""


def sniff_format(raw: bytes) -> str | None:
    """What a non-WAV audio file is (``"an MP3 file"`` …), from its first bytes; None: unknown."""
    for offset, magic, what in _MAGIC:
        if raw[offset : offset + len(magic)] == magic:
            return what
    return None


def read_speech_file(path: str | Path) -> WavAudio:
    """Read a recording of speech for any command: the one reader and its rules.

    * a WAV file (every variant :func:`read_wav` takes), at any rate from 4 kHz
      to 384 kHz (the caller resamples: :data:`SPEECH_RATES`);
    * another format libsndfile decodes (MP3, Ogg Vorbis/Opus, FLAC …), even when
      named ``.wav``;
    * mono or stereo.

    Raises:
        NoAudioError: the file is readable and holds no samples.
        ValueError: one line naming the file and what is wrong: missing, a
            directory, unreadable, a format that cannot be decoded (named when
            recognised, e.g. "an MP4/M4A (AAC) file"), a rate outside
            :data:`SPEECH_RATES`, or more than two channels.
    """
    name = str(path)
    source = Path(path)
    if source.is_dir():
        raise ValueError(f"{name}: is a directory; give an audio file")
    if not source.exists():
        raise ValueError(f"{name}: no such file")
    try:
        raw = source.read_bytes()
    except OSError as exc:
        raise ValueError(f"{name}: cannot open: {exc.strerror}") from None
    if not raw:
        raise NoAudioError(f"{name}: is empty (0 bytes)")
    if raw[:4] in (b"RIFF", b"RF64"):
        audio = read_wav(raw, any_rate=True, name=name)
    else:
        audio = _decode_other(raw, name)
    low, high = SPEECH_RATES
    if not low <= audio.sample_rate <= high:
        raise ValueError(
            f"{name}: unsupported sample rate {audio.sample_rate} Hz: speech audio is "
            f"{low}-{high} Hz"
        )
    if not audio.pcm:
        raise NoAudioError(f"{name}: holds no audio (the file declares no samples)")
    return audio


def _decode_other(raw: bytes, name: str) -> WavAudio:
    """A non-WAV file through libsndfile, or a ValueError naming what it is."""
    what = sniff_format(raw)
    try:
        samples, rate = soundfile.read(io.BytesIO(raw), dtype="float64", always_2d=True)
    except (soundfile.LibsndfileError, RuntimeError, TypeError):
        kind = f"{what}, which cannot be decoded here" if what else "not a WAV file"
        raise ValueError(
            f"{name}: {kind} (no RIFF/WAVE header); convert it, e.g. "
            f"ffmpeg -i {name} -ac 1 -ar 16000 speech.wav"
        ) from None
    if samples.shape[1] not in (1, 2):
        raise ValueError(f"{name}: expected mono or stereo, got {samples.shape[1]} channels")
    scaled = np.clip(np.round(samples * 32768.0), -32768, 32767)
    pcm: bytes = np.ascontiguousarray(scaled).astype("<i2").tobytes()
    return WavAudio(pcm=pcm, sample_rate=int(rate), channels=int(samples.shape[1]))


def _with_sizes(raw: bytes, layout: RiffLayout) -> bytes:
    """A copy of a streamed file whose RIFF and data sizes say what is there."""
    if raw[:4] == b"RF64":
        return raw  # RF64 keeps its sizes in ds64, which libsndfile reads
    fixed = bytearray(raw)
    fixed[4:8] = (len(raw) - 8).to_bytes(4, "little")
    fixed[layout.data_offset - 4 : layout.data_offset] = layout.data_size.to_bytes(4, "little")
    return bytes(fixed)


_PCM: Final = 1
_FLOAT: Final = 3
_EXTENSIBLE: Final = 0xFFFE
# The sub-format GUID of WAVE_FORMAT_EXTENSIBLE ends with this for every
# format tag (KSDATAFORMAT_SUBTYPE_PCM = 00000001-0000-0010-8000-00aa00389b71).
_GUID_TAIL: Final = bytes.fromhex("000000001000800000aa00389b71")
_MAX_HEADER: Final = 1 << 20


@dataclass(frozen=True, slots=True)
class WavFormat:
    """A WAV stream's sample format (from its ``fmt `` chunk)."""

    sample_rate: int
    channels: int
    bits: int
    floating: bool


class WavStreamReader:
    """A WAV body read as it arrives: only the audio comes out, as mono PCM16.

    Pure and incremental (bytes in, PCM out). The header may be split anywhere;
    chunks before ``data`` (``LIST``, ``fact``, odd sizes) are skipped, chunks
    after a ``data`` chunk of known size are ignored, and a placeholder data
    size (0 or 0xFFFFFFFF, as a server streaming the file writes it) means
    "to the end of the body". 8/16/24/32-bit integer and 32-bit float samples,
    plain or ``WAVE_FORMAT_EXTENSIBLE``, are converted to 16-bit; channels are
    averaged to mono.

    Raises (from :meth:`feed` and :meth:`finish`):
        ValueError: not a WAV body, a format it cannot play, or a body that
            ended before its audio began.
    """

    __slots__ = ("_buf", "_carry", "_format", "_remaining")

    def __init__(self) -> None:
        self._buf = bytearray()
        self._format: WavFormat | None = None
        self._remaining: int | None = None
        self._carry = b""

    @property
    def format(self) -> WavFormat | None:
        """The format, once the header up to the ``data`` chunk has arrived."""
        return self._format if self.started else None

    @property
    def started(self) -> bool:
        """Whether the audio has begun (the header is complete)."""
        return self._remaining is not None

    def feed(self, data: bytes) -> bytes:
        """Take the next bytes of the body; return the mono PCM16 they complete."""
        if not self.started:
            self._buf += data
            data = self._parse_header()
            if not self.started:
                return b""
        return self._audio(data)

    def finish(self) -> bytes:
        """The body ended; return nothing more, or raise if no audio ever began."""
        if not self.started:
            raise ValueError("the WAV body ended before its audio began")
        return b""

    def _parse_header(self) -> bytes:
        buf = self._buf
        if len(buf) >= 12 and (bytes(buf[:4]) not in (b"RIFF", b"RF64") or buf[8:12] != b"WAVE"):
            raise ValueError("not a WAV body (no RIFF/WAVE header)")
        at = 12
        while at + 8 <= len(buf):
            chunk_id = bytes(buf[at : at + 4])
            size = int.from_bytes(buf[at + 4 : at + 8], "little")
            body = at + 8
            if chunk_id == b"data":
                if self._format is None:
                    raise ValueError("not a WAV body (data before fmt)")
                streamed = size in _PLACEHOLDER_SIZES or bytes(buf[:4]) == b"RF64"
                self._remaining = -1 if streamed else size  # -1: to the end of the body
                rest = bytes(buf[body:])
                self._buf = bytearray()
                return rest
            if body + size > len(buf):
                break
            if chunk_id == b"fmt ":
                self._format = _parse_fmt(bytes(buf[body : body + size]))
            at = body + size + (size & 1)
        if len(buf) > _MAX_HEADER:
            raise ValueError("WAV header larger than 1 MiB before the audio")
        return b""

    def _audio(self, data: bytes) -> bytes:
        fmt = self._format
        assert fmt is not None
        assert self._remaining is not None
        if self._remaining >= 0:
            data = data[: self._remaining]
            self._remaining -= len(data)
        data = self._carry + data
        frame = fmt.channels * fmt.bits // 8
        cut = len(data) - len(data) % frame
        self._carry = data[cut:]
        return _to_mono16(data[:cut], fmt) if cut else b""


def _parse_fmt(chunk: bytes) -> WavFormat:
    if len(chunk) < 16:
        raise ValueError("WAV fmt chunk is too short")
    tag = int.from_bytes(chunk[0:2], "little")
    channels = int.from_bytes(chunk[2:4], "little")
    rate = int.from_bytes(chunk[4:8], "little")
    bits = int.from_bytes(chunk[14:16], "little")
    if tag == _EXTENSIBLE:
        if len(chunk) < 40 or chunk[26:40] != _GUID_TAIL:
            raise ValueError("WAV extensible format with an unknown sub-format")
        tag = int.from_bytes(chunk[24:26], "little")
    floating = tag == _FLOAT
    if not (tag == _PCM and bits in (8, 16, 24, 32)) and not (floating and bits == 32):
        raise ValueError(f"WAV sample format {tag} with {bits}-bit samples cannot be played")
    if not 1 <= channels <= 8:
        raise ValueError(f"WAV with {channels} channels cannot be played")
    check_rate(rate)
    return WavFormat(sample_rate=rate, channels=channels, bits=bits, floating=floating)


def _to_mono16(data: bytes, fmt: WavFormat) -> bytes:
    if fmt.floating:
        x = np.frombuffer(data, dtype="<f4").astype(np.float64) * 32768.0
    elif fmt.bits == 8:
        x = (np.frombuffer(data, dtype=np.uint8).astype(np.float64) - 128.0) * 256.0
    elif fmt.bits == 16:
        if fmt.channels == 1:
            return data
        x = np.frombuffer(data, dtype="<i2").astype(np.float64)
    elif fmt.bits == 24:
        b = np.frombuffer(data, dtype=np.uint8).reshape(-1, 3).astype(np.int32)
        v = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)
        x = (np.where(v & 0x800000, v - 0x1000000, v) / 256.0).astype(np.float64)
    else:
        x = np.frombuffer(data, dtype="<i4").astype(np.float64) / 65536.0
    if fmt.channels > 1:
        x = x.reshape(-1, fmt.channels).mean(axis=1)
    out: bytes = np.clip(np.round(x), -32768, 32767).astype("<i2").tobytes()
    return out


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
