"""WAV files and bodies as real tools and servers write them."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from audio.wav import WavFormat, WavStreamReader, read_wav, riff_layout

from ...helpers import DATA

CASE = DATA / "audio" / "streamed-header-sizes.wav"
PCM = np.array([0, 1000, -1000, 32767, -32768, 12345, -2, 7], dtype="<i2")
GUID_PCM = bytes.fromhex("0100000000001000800000aa00389b71")
GUID_FLOAT = bytes.fromhex("0300000000001000800000aa00389b71")


def fmt_chunk(
    rate: int = 16000, channels: int = 1, bits: int = 16, tag: int = 1, extensible: bool = False
) -> bytes:
    align = channels * bits // 8
    head = struct.pack(
        "<HHIIHH", 0xFFFE if extensible else tag, channels, rate, rate * align, align, bits
    )
    if extensible:
        guid = GUID_FLOAT if tag == 3 else GUID_PCM
        head += struct.pack("<HHI", 22, bits, 0) + guid
    return chunk(b"fmt ", head)


def chunk(name: bytes, body: bytes, size: int | None = None) -> bytes:
    size = len(body) if size is None else size
    return name + struct.pack("<I", size) + body + (b"\0" if len(body) % 2 else b"")


def riff(*chunks: bytes, size: int | None = None, magic: bytes = b"RIFF") -> bytes:
    body = b"WAVE" + b"".join(chunks)
    return magic + struct.pack("<I", len(body) if size is None else size) + body


def data(pcm: bytes, size: int | None = None) -> bytes:
    return chunk(b"data", pcm, size)


PLAIN = PCM.tobytes()

VARIANTS = {
    "plain": riff(fmt_chunk(), data(PLAIN)),
    "extensible": riff(
        fmt_chunk(extensible=True), chunk(b"fact", struct.pack("<I", 8)), data(PLAIN)
    ),
    "list-before-fmt": riff(
        chunk(b"LIST", b"INFOISFT\x06\x00\x00\x00Lavf\x00\x00"), fmt_chunk(), data(PLAIN)
    ),
    "odd-chunk-padded": riff(fmt_chunk(), chunk(b"junk", b"abc"), data(PLAIN)),
    "chunk-after-data": riff(
        fmt_chunk(), data(PLAIN), chunk(b"LIST", b"INFOICMT\x04\x00\x00\x00hey!")
    ),
    "streamed-ffff": riff(fmt_chunk(), data(PLAIN, size=0xFFFFFFFF), size=0xFFFFFFFF),
    "streamed-zero": riff(fmt_chunk(), data(PLAIN, size=0), size=0),
}


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_file_variants_read_the_same_samples(name: str):
    audio = read_wav(VARIANTS[name])
    assert (audio.pcm, audio.sample_rate, audio.channels) == (PLAIN, 16000, 1)


def test_streamed_header_sizes_case_reads_to_the_end():
    raw = CASE.read_bytes()
    layout = riff_layout(raw)
    assert (layout.data_offset, layout.data_size, layout.streamed) == (44, 22468, True)
    audio = read_wav(CASE)
    assert (audio.sample_rate, audio.channels, len(audio.pcm)) == (8000, 1, 22468)
    assert audio.pcm == raw[44:]


def test_stereo_extensible_and_other_sample_widths():
    stereo = np.stack([PCM, -PCM.astype(np.int32).clip(-32767, 32767).astype("<i2")], axis=1)
    audio = read_wav(riff(fmt_chunk(channels=2, extensible=True), data(stereo.tobytes())))
    assert audio.channels == 2 and audio.pcm == stereo.tobytes()
    as24 = b"".join(int(v * 256).to_bytes(3, "little", signed=True) for v in PCM.tolist())
    assert read_wav(riff(fmt_chunk(bits=24), data(as24))).pcm == PLAIN
    as_float = (PCM.astype("<f4") / 32768).tobytes()
    assert read_wav(riff(fmt_chunk(bits=32, tag=3), data(as_float))).pcm == PLAIN
    as8 = bytes([128, 129, 127, 255, 0])
    assert np.frombuffer(read_wav(riff(fmt_chunk(bits=8), data(as8))).pcm, "<i2").tolist() == [
        0, 256, -256, 32512, -32768,
    ]  # fmt: skip


def test_truncated_is_told_apart_from_streamed():
    cut = VARIANTS["plain"][:-4]
    with pytest.raises(ValueError, match=r"truncated data \(12 bytes, header says 16\)"):
        read_wav(cut)
    # The same cut of a streamed file is just a shorter file (whole frames).
    assert read_wav(VARIANTS["streamed-ffff"][:-4]).pcm == PLAIN[:12]


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_stream_reader_gives_the_audio_at_every_split(name: str):
    body = VARIANTS[name]
    expected = read_wav(body).pcm
    for at in range(len(body) + 1):
        reader = WavStreamReader()
        out = reader.feed(body[:at]) + reader.feed(body[at:]) + reader.finish()
        assert out == expected, at
        assert reader.format == WavFormat(sample_rate=16000, channels=1, bits=16, floating=False)


def test_stream_reader_one_byte_at_a_time_with_conversion():
    stereo = np.stack([PCM, PCM], axis=1).astype("<f4") / 32768
    body = riff(fmt_chunk(channels=2, bits=32, tag=3, extensible=True), data(stereo.tobytes()))
    reader = WavStreamReader()
    out = b"".join(reader.feed(body[i : i + 1]) for i in range(len(body)))
    assert out == PLAIN
    assert reader.format == WavFormat(sample_rate=16000, channels=2, bits=32, floating=True)


def test_stream_reader_case_file():
    raw = CASE.read_bytes()
    reader = WavStreamReader()
    out = b"".join(reader.feed(raw[i : i + 1000]) for i in range(0, len(raw), 1000))
    assert out == raw[44:] and reader.format is not None and reader.format.sample_rate == 8000


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"ID3\x04\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00", "not a WAV body"),
        (
            riff(fmt_chunk(tag=2), data(PLAIN)),
            "sample format 2 with 16-bit samples cannot be played",
        ),
        (riff(fmt_chunk(rate=11025), data(PLAIN)), "unsupported sample rate 11025"),
        (riff(data(PLAIN)), "data before fmt"),
    ],
)
def test_stream_reader_refuses_what_it_cannot_play(body: bytes, message: str):
    with pytest.raises(ValueError, match=message):
        WavStreamReader().feed(body)


def test_stream_reader_body_that_ends_in_the_header():
    reader = WavStreamReader()
    assert reader.feed(VARIANTS["plain"][:30]) == b""
    with pytest.raises(ValueError, match="ended before its audio began"):
        reader.finish()
