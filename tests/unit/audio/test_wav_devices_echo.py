from __future__ import annotations

import asyncio
import io
import os
import subprocess
import sys
import threading
import wave
from pathlib import Path

import numpy as np
import pytest

from audio.devices import DeviceUnavailable, Microphone, Speaker
from audio.echo import HalfDuplexGate, NoEchoCancellation
from audio.frame import AudioFrame
from audio.wav import VirtualPacer, interleave, paced_frames, read_wav, write_wav

from ...helpers import SPEECH, missing


@pytest.mark.parametrize("rate", [8000, 16000, 22050, 24000, 44100, 48000])
@pytest.mark.parametrize("channels", [1, 2])
def test_wav_round_trip(tmp_path: Path, rate: int, channels: int):
    pcm = np.arange(-500, 500, dtype="<i2").tobytes() * channels
    write_wav(tmp_path / "a.wav", pcm, rate, channels)
    audio = read_wav(tmp_path / "a.wav")
    assert (audio.pcm, audio.sample_rate, audio.channels) == (pcm, rate, channels)
    assert audio.duration_s == pytest.approx(1000 / rate)


def test_stereo_helpers():
    stereo = interleave(b"\x01\x00\x02\x00", b"\x03\x00")
    assert np.frombuffer(stereo, "<i2").tolist() == [1, 3, 2, 0]
    audio = read_wav(_wav_bytes(stereo, 16000, 2))
    assert audio.channel(0) == b"\x01\x00\x02\x00" and audio.channel(1) == b"\x03\x00\x00\x00"
    assert np.frombuffer(audio.mono(), "<i2").tolist() == [2, 1]


def _wav_bytes(pcm: bytes, rate: int, channels: int = 1, width: int = 2) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(width)
        w.setframerate(rate)
        w.writeframes(pcm)
    return buf.getvalue()


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "not a valid PCM WAV"),
        (b"RIFF\x10\x00\x00\x00WAVEfmt ", "not a valid PCM WAV"),
        (b"not a wav file at all, just text", "not a valid PCM WAV"),
        (_wav_bytes(bytes(400), 16000)[:60], "truncated data"),
        (b"RIFF\x10\x00\x00\x00WAVEdata\x04\x00\x00\x00\x00\x00\x00\x00", "data before fmt"),
        (_wav_bytes(bytes(600), 16000, channels=3), "expected mono or stereo"),
        (_wav_bytes(bytes(400), 11025), "unsupported sample rate 11025"),
    ],
)
def test_bad_wav_files_are_clear_errors(data: bytes, message: str):
    with pytest.raises(ValueError, match=message):
        read_wav(data)


def test_missing_file_and_bad_writes(tmp_path: Path):
    with pytest.raises(ValueError, match="cannot open"):
        read_wav(tmp_path / "missing.wav")
    with pytest.raises(ValueError, match="even number"):
        write_wav(tmp_path / "b.wav", b"\x00", 16000)
    with pytest.raises(ValueError, match="whole number of frames"):
        write_wav(tmp_path / "b.wav", b"\x00\x00", 16000, channels=2)


async def test_paced_source_yields_frames_on_their_capture_time():
    audio = read_wav(SPEECH / "shared-00-piper.wav")
    pacer = VirtualPacer()
    seen: list[tuple[int, float]] = []
    async for frame in paced_frames(
        audio.pcm, 16000, frame_ms=20, pacer=pacer, trailing_silence_s=0.5
    ):
        seen.append((frame.pts, pacer.now))
    n = len(seen)
    assert n == -(-(len(audio.pcm) // 2 + 8000) // 320)
    # Each frame is released when its last sample would have been captured.
    assert all(now == pytest.approx((pts + 320) / 16000) for pts, now in seen)


# -- devices, through the PortAudio callback interface ---------------------------


class FakeStream:
    """Stands in for sounddevice.Raw*Stream: the test plays PortAudio's thread."""

    def __init__(self, **kwargs):
        self.kwargs = kwargs
        self.callback = kwargs["callback"]
        self.started = self.closed = False

    def start(self):
        self.started = True

    def stop(self):
        self.started = False

    def close(self):
        self.closed = True


class Status:
    def __init__(self, overflow: bool) -> None:
        self.input_overflow = overflow

    def __bool__(self) -> bool:
        return self.input_overflow


async def test_microphone_bridges_the_callback_thread_and_drops_oldest():
    streams: list[FakeStream] = []

    def factory(**kwargs):
        streams.append(FakeStream(**kwargs))
        return streams[-1]

    async with Microphone(
        sample_rate=16000, frame_ms=20, max_queued=3, stream_factory=factory
    ) as mic:
        stream = streams[0]
        assert (
            stream.started
            and stream.kwargs["blocksize"] == 320
            and stream.kwargs["dtype"] == "int16"
        )
        blocks = [np.full(320, i, dtype="<i2").tobytes() for i in range(5)]

        def portaudio_thread():
            for i, block in enumerate(blocks):
                stream.callback(memoryview(block), 320, None, Status(i == 4))

        t = threading.Thread(target=portaudio_thread)
        t.start()
        t.join()
        frames: list[AudioFrame] = []
        while len(frames) < 3:
            frames.append(await mic.__anext__())
        # The two oldest frames were dropped; timestamps still count every block.
        assert [f.to_numpy()[0] for f in frames] == [2, 3, 4]
        assert [f.pts for f in frames] == [640, 960, 1280]
        stats = mic.statistics()
        assert (stats.frames, stats.dropped, stats.queued, stats.overflows) == (5, 2, 0, 1)
    assert stream.closed
    assert [f async for f in mic] == []


async def test_devices_wake_a_stalled_loop_once_not_per_block(monkeypatch: pytest.MonkeyPatch):
    # A device calling back far faster than the loop runs (the ALSA null device does
    # ~100 000 blocks a second) must not fill the loop's wake-up socket: a signal
    # written to a full one is lost.
    loop = asyncio.get_running_loop()
    wakeups: list[str] = []
    original = loop.call_soon_threadsafe

    def counting(callback, *args, **kwargs):
        wakeups.append(getattr(callback, "__qualname__", repr(callback)))
        return original(callback, *args, **kwargs)

    monkeypatch.setattr(loop, "call_soon_threadsafe", counting)
    streams: list[FakeStream] = []

    def factory(**kwargs):
        streams.append(FakeStream(**kwargs))
        return streams[-1]

    async with (
        Microphone(sample_rate=16000, frame_ms=20, max_queued=3, stream_factory=factory) as mic,
        Speaker(sample_rate=8000, block_ms=20, stream_factory=factory) as spk,
    ):
        mic_stream, spk_stream = streams
        await spk.write(bytes(320))

        def portaudio_threads():  # the loop is blocked meanwhile (joined below)
            for i in range(1000):
                mic_stream.callback(np.full(320, i, dtype="<i2").tobytes(), 320, None, None)
                spk_stream.callback(bytearray(320), 160, None, None)

        t = threading.Thread(target=portaudio_threads)
        t.start()
        t.join()
        assert sorted(wakeups) == ["Microphone._take", "Speaker._mark_drained"]
        frames = [await mic.__anext__() for _ in range(3)]
        # The newest blocks are delivered; the clock still counts every block.
        assert [f.to_numpy()[0] for f in frames] == [997, 998, 999]
        assert [f.pts for f in frames] == [997 * 320, 998 * 320, 999 * 320]
        stats = mic.statistics()
        assert (stats.frames, stats.dropped, stats.queued) == (1000, 997, 0)
        await asyncio.wait_for(spk.wait_for_playout(), 5)
        # After the loop has run, the next block wakes it again.
        mic_stream.callback(np.full(320, 7, dtype="<i2").tobytes(), 320, None, None)
        assert (await mic.__anext__()).pts == 1000 * 320
        assert sorted(wakeups) == ["Microphone._take", "Microphone._take", "Speaker._mark_drained"]


async def test_speaker_plays_paces_reports_position_and_clears():
    streams: list[FakeStream] = []

    def factory(**kwargs):
        streams.append(FakeStream(**kwargs))
        return streams[-1]

    async with Speaker(
        sample_rate=8000, block_ms=20, high_water_ms=100, stream_factory=factory
    ) as spk:
        stream = streams[0]
        audio = np.arange(1, 401, dtype="<i2").tobytes()  # 50 ms
        await spk.write(audio)
        out = bytearray(320)
        stream.callback(out, 160, None, None)
        assert bytes(out) == audio[:320] and spk.played_samples == 160
        stream.callback(out, 160, None, None)
        stream.callback(out, 160, None, None)  # only 80 samples left: the rest is silence
        assert bytes(out[:160]) == audio[640:] and set(out[160:]) == {0}
        assert spk.played_samples == 400
        await asyncio.wait_for(spk.wait_for_playout(), 1)
        stats = spk.statistics()
        assert (stats.buffered_samples, stats.underruns) == (0, 1)
        # Barge-in: queued audio is dropped at once and never played.
        await spk.write(audio)
        assert spk.clear_buffer() == 400
        stream.callback(out, 160, None, None)
        assert set(out) == {0} and spk.played_samples == 400


async def test_speaker_write_applies_backpressure():
    holder: list[FakeStream] = []

    def factory(**kwargs):
        holder.append(FakeStream(**kwargs))
        return holder[-1]

    spk = Speaker(sample_rate=8000, block_ms=20, high_water_ms=40, stream_factory=factory)
    spk.start()
    await spk.write(bytes(640))  # at the high-water mark now
    blocked = asyncio.create_task(spk.write(bytes(320)))
    await asyncio.sleep(0)
    assert not blocked.done()
    holder[0].callback(bytearray(640), 320, None, None)  # the device consumes 40 ms
    await asyncio.wait_for(blocked, 1)
    assert spk.statistics().buffered_samples == 160
    spk.close()


def test_devices_without_portaudio_or_on_a_virtual_null_device(tmp_path: Path):
    # A real sounddevice session in a child process whose ALSA configuration
    # defines a null device (no sound card needed). Without PortAudio the
    # same program must get DeviceUnavailable with an install hint.
    (tmp_path / ".asoundrc").write_text(
        "pcm.!default { type null }\npcm.voxloop_null { type null }\n"
    )
    program = r"""
import asyncio, sys
from audio.devices import DeviceUnavailable, Microphone, Speaker, list_devices
async def main():
    try:
        names = [d.name for d in list_devices()]
    except DeviceUnavailable as exc:
        assert "libportaudio2" in str(exc), exc
        print("NO-PORTAUDIO")
        return
    assert any("voxloop_null" in n for n in names), names
    async with Microphone("voxloop_null", sample_rate=16000) as mic:
        frames = [await mic.__anext__() for _ in range(5)]
    assert all(f.samples == 320 for f in frames)
    async with Speaker("voxloop_null", sample_rate=16000) as spk:
        await spk.write(bytes(3200))
        await asyncio.wait_for(spk.wait_for_playout(), 5)
        assert spk.played_samples == 1600
    try:
        Microphone("no-such-device").start()
    except DeviceUnavailable as exc:
        assert "no input device matches" in str(exc)
    else:
        raise AssertionError("expected DeviceUnavailable")
    print("NULL-DEVICE-OK")
asyncio.run(main())
"""
    env = {**os.environ, "HOME": str(tmp_path)}
    proc = subprocess.run(
        [sys.executable, "-c", program],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    if proc.stdout.strip() == "NO-PORTAUDIO":
        missing("PortAudio is not installed (apt-get install libportaudio2; .ci/run does)")
    assert proc.stdout.strip() == "NULL-DEVICE-OK"


def test_half_duplex_gate_silences_the_agent_and_its_tail():
    gate = HalfDuplexGate(tail_ms=40)
    speech = np.full(320, 1000, dtype="<i2").tobytes()
    frames = [AudioFrame(pcm=speech, sample_rate=16000, pts=i * 320) for i in range(10)]
    gate.playing(until_pts=3 * 320)  # agent audible for the first 60 ms
    out = [gate.process(f) for f in frames]
    # 60 ms of playback + 40 ms tail = frames 0..4 silenced.
    assert [f.pcm == speech for f in out] == [False] * 5 + [True] * 5
    assert all(o.pts == f.pts for o, f in zip(out, frames, strict=True))
    assert gate.gated_frames == 5
    gate.playing(until_pts=100 * 320)
    gate.stop(at_pts=8 * 320)  # barge-in cut the playback
    assert not gate.is_open(frames[9]) and gate.is_open(
        AudioFrame(pcm=speech, sample_rate=16000, pts=10 * 320)
    )
    assert NoEchoCancellation().process(frames[0], None) is frames[0]
    with pytest.raises(ValueError, match="tail_ms"):
        HalfDuplexGate(tail_ms=-1)


class _NoPortAudio:
    """A meta-path finder that fails the way sounddevice does without libportaudio."""

    def find_spec(self, name, path=None, target=None):
        if name == "sounddevice":
            raise OSError("PortAudio library not found")
        return None


async def test_missing_portaudio_is_a_clear_error(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delitem(sys.modules, "sounddevice", raising=False)
    monkeypatch.setattr(sys, "meta_path", [_NoPortAudio(), *sys.meta_path])
    with pytest.raises(DeviceUnavailable, match="apt-get install libportaudio2"):
        Microphone().start()
    with pytest.raises(DeviceUnavailable, match="PortAudio is not installed"):
        Speaker().start()


async def test_speaker_pause_holds_the_rest_and_resume_plays_it_from_there():
    streams: list[FakeStream] = []

    def factory(**kwargs):
        streams.append(FakeStream(**kwargs))
        return streams[-1]

    async with Speaker(
        sample_rate=8000, block_ms=20, high_water_ms=100, stream_factory=factory
    ) as spk:
        stream = streams[0]
        audio = np.arange(1, 401, dtype="<i2").tobytes()  # 50 ms
        await spk.write(audio)
        out = bytearray(320)
        stream.callback(out, 160, None, None)
        spk.pause()
        assert spk.paused
        for _ in range(3):  # paused: silence, nothing consumed, the position holds
            stream.callback(out, 160, None, None)
            assert set(out) == {0} and spk.played_samples == 160
        assert spk.statistics().underruns == 0
        waiting = asyncio.create_task(spk.wait_for_playout())
        await asyncio.sleep(0)
        assert not waiting.done()
        spk.resume()
        assert not spk.paused
        stream.callback(out, 160, None, None)
        assert bytes(out) == audio[320:640] and spk.played_samples == 320
        stream.callback(out, 160, None, None)
        assert bytes(out[:160]) == audio[640:] and spk.played_samples == 400
        await asyncio.wait_for(waiting, 1)
        # An interruption while paused drops what was held and ends the pause.
        await spk.write(audio)
        stream.callback(out, 160, None, None)
        spk.pause()
        assert spk.clear_buffer() == 240
        assert not spk.paused and spk.played_samples == 560
        stream.callback(out, 160, None, None)
        assert set(out) == {0} and spk.played_samples == 560
