"""Echo cancellation: WebRTC AEC3, the far-end reference, the residual gate, the simulated room."""

from __future__ import annotations

import sys
import threading
from types import SimpleNamespace

import numpy as np
import pytest

from audio import aec
from audio.aec import EchoCancellerUnavailable, WebRtcEchoCanceller, echo_path
from audio.devices import Microphone, Speaker
from audio.echo import EchoPath, NoEchoCancellation, ResidualEchoGate
from audio.frame import AudioFrame
from audio.room import EchoRoom, RoomConfig, synthetic_rir
from audio.vad import default_vad, frame_level_db
from audio.wav import read_wav

from ...helpers import SPEECH


def speech16k(count: int = 4) -> bytes:
    return b"".join(read_wav(SPEECH / f"shared-{i:02d}-piper.wav").mono() for i in range(count))


def energy(pcm: bytes) -> float:
    x = np.frombuffer(pcm, "<i2").astype(np.float64)
    return float(np.sum(x**2))


def noise(dbfs: float, samples: int = 320, seed: int = 0) -> bytes:
    x = np.random.default_rng(seed).standard_normal(samples) * 10 ** (dbfs / 20) * 32768
    return np.clip(x, -32768, 32767).astype("<i2").tobytes()


class Recorder:
    """An EchoCanceller that returns the near end and keeps the far ends it was given."""

    def __init__(self) -> None:
        self.far: list[bytes | None] = []

    def process(self, near: AudioFrame, far: AudioFrame | None) -> AudioFrame:
        self.far.append(None if far is None else far.pcm)
        return near

    def reset(self) -> None:
        self.far.clear()


# -- WebRTC AEC3 ---------------------------------------------------------------------


def test_aec3_removes_a_room_echo_of_real_speech():
    far = speech16k()
    room = EchoRoom(
        RoomConfig(delay_ms=60, rt60_s=0.25, echo_db=-6, drive=1.0, noise_dbfs=None, seed=3),
        speaker_rate=16000,
    )
    canceller = WebRtcEchoCanceller(16000)
    mic = bytearray()
    out = bytearray()
    for i in range(0, len(far) - 639, 640):
        room.play(far[i : i + 640])
        near = room.capture(bytes(640))
        frame = canceller.process(
            AudioFrame(pcm=near, sample_rate=16000, pts=i // 2),
            AudioFrame(pcm=far[i : i + 640], sample_rate=16000, pts=i // 2),
        )
        assert frame.pts == i // 2 and frame.samples == 320
        mic += near
        out += frame.pcm
    # After the first second the echo is more than 30 dB down.
    erle = 10 * np.log10(energy(bytes(mic[32000:])) / energy(bytes(out[32000:])))
    assert erle > 30
    stats = canceller.statistics()
    assert stats.frames == 2 * len(out) // 640
    assert 0 < stats.far_frames < stats.frames  # the gaps between utterances are silent
    # Without a far end nothing is cancelled: near-end speech passes.
    canceller.reset()
    user = far[16000:48000]  # a second of speech
    kept = b"".join(
        canceller.process(AudioFrame(pcm=user[i : i + 640], sample_rate=16000), None).pcm
        for i in range(0, len(user), 640)
    )
    assert abs(10 * np.log10(energy(kept[3200:]) / energy(user[3200:]))) < 1.0


def test_aec3_rejects_frames_it_cannot_take():
    with pytest.raises(ValueError, match="sample_rate"):
        WebRtcEchoCanceller(22050)
    canceller = WebRtcEchoCanceller(16000)
    with pytest.raises(ValueError, match="rate"):
        canceller.process(AudioFrame(pcm=bytes(320), sample_rate=8000), None)
    with pytest.raises(ValueError, match="10 ms"):
        canceller.process(AudioFrame(pcm=bytes(480), sample_rate=16000), None)
    with pytest.raises(ValueError, match="far-end"):
        canceller.process(
            AudioFrame(pcm=bytes(640), sample_rate=16000),
            AudioFrame(pcm=bytes(320), sample_rate=16000),
        )


def test_without_the_binding_the_error_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch):
    assert aec.available()
    monkeypatch.setitem(sys.modules, "livekit", None)
    assert not aec.available()
    with pytest.raises(EchoCancellerUnavailable, match=r"pip install 'voxloop\[aec\]'"):
        WebRtcEchoCanceller(16000)
    with pytest.raises(EchoCancellerUnavailable):
        echo_path(16000)


# -- the far-end reference -----------------------------------------------------------


def block(value: int, samples: int = 320) -> bytes:
    return np.full(samples, value, dtype="<i2").tobytes()


def test_the_far_end_is_looked_up_by_device_time():
    recorder = Recorder()
    path = EchoPath(recorder, 16000, gate_residual=False)
    # Nothing played yet: no far end.
    assert path.captured(block(7), at=0.0) == block(7)
    # Block k reaches the DAC at 0.1 + 0.02 k (a 100 ms output latency).
    for k in range(10):
        path.played(block(k + 1), 16000, at=0.1 + 0.02 * k)
    path.captured(block(0), at=0.14)  # exactly block 2
    path.captured(block(0), at=0.15)  # half of block 2, half of block 3
    path.captured(block(0), at=0.09)  # 10 ms before the first block: silence, then block 0
    path.captured(block(0), at=0.29)  # the last 10 ms played, then nothing yet
    path.captured(block(0), at=5.0)  # long after: nothing
    far = recorder.far
    assert far[0] is None
    assert far[1] == block(3)
    assert far[2] == block(3, 160) + block(4, 160)
    assert far[3] == block(0, 160) + block(1, 160)
    assert far[4] == block(10, 160) + block(0, 160)
    assert far[5] is None
    stats = path.statistics()
    assert (stats.far_blocks, stats.near_blocks, stats.cancelled_blocks) == (10, 6, 4)
    assert stats.reanchors == 0


def test_time_stamp_jitter_is_smoothed_and_a_jump_moves_the_mapping():
    recorder = Recorder()
    path = EchoPath(recorder, 16000, gate_residual=False)
    jitter = np.random.default_rng(1).uniform(-0.0007, 0.0007, 50)
    for k in range(50):
        path.played(block(k + 1), 16000, at=0.02 * k + float(jitter[k]))
    assert path.statistics().reanchors == 0
    path.captured(block(0), at=0.02 * 45)
    got = np.frombuffer(recorder.far[-1] or b"", "<i2")
    # Within a few samples of block 45 despite ±0.7 ms of jitter.
    assert np.count_nonzero(got == 46) >= 300
    # The speaker restarted 1 s later (an underrun): the mapping follows at once.
    path.played(block(99), 16000, at=2.0)
    path.captured(block(0), at=2.0)
    assert recorder.far[-1] == block(99)
    assert path.statistics().reanchors == 1


def test_far_end_at_the_speaker_rate_is_resampled_to_the_microphone_rate():
    recorder = Recorder()
    path = EchoPath(recorder, 16000, gate_residual=False)
    tone = (0.3 * 32767 * np.sin(2 * np.pi * 440 * np.arange(24000) / 24000)).astype("<i2")
    for k in range(50):
        path.played(tone[k * 480 : (k + 1) * 480].tobytes(), 24000, at=0.02 * k)
    path.captured(block(0), at=0.5)
    far = np.frombuffer(recorder.far[-1] or b"", "<i2").astype(np.float64)
    assert len(far) == 320
    # The same tone at 16 kHz: 440 Hz dominates.
    spectrum = np.abs(np.fft.rfft(far))
    assert abs(np.argmax(spectrum) * 16000 / 320 - 440) <= 50
    path.reset()
    path.captured(block(0), at=0.5)
    assert recorder.far[-1] is None


def test_echo_path_validates_its_settings():
    with pytest.raises(ValueError, match="history_ms"):
        EchoPath(NoEchoCancellation(), 16000, history_ms=0)
    with pytest.raises(ValueError, match="rate"):
        EchoPath(NoEchoCancellation(), 11000)


# -- the residual-echo gate ----------------------------------------------------------


def scaled(pcm: bytes, gain: float) -> bytes:
    x = np.frombuffer(pcm, "<i2").astype(np.float64) * gain
    return bytes(x.astype("<i2").tobytes())


def mixed(a: bytes, b: bytes) -> bytes:
    x = np.frombuffer(a, "<i2").astype(np.int32) + np.frombuffer(b, "<i2")
    return bytes(np.clip(x, -32768, 32767).astype("<i2").tobytes())


def test_the_residual_gate_passes_what_the_far_end_cannot_explain():
    gate = ResidualEchoGate(hold_ms=40, confirm_ms=40, min_learn_ms=200, converge_ms=400)
    quiet = noise(-70)
    # No far end: everything passes as is (and the noise floor is learned).
    for _ in range(20):
        assert gate.process(quiet, quiet, None, 0.02) == quiet
    block = iter(range(100, 10_000))

    def echo(cancelled_db: float) -> tuple[bytes, bytes, bytes]:
        """(microphone, canceller's output, far end): the far end's echo at -6 dB."""
        far = noise(-20, seed=next(block))
        mic = mixed(scaled(far, 0.5), noise(-70, seed=next(block)))
        left = mixed(scaled(far, 0.5 * 10 ** (-cancelled_db / 20)), noise(-70, seed=next(block)))
        return mic, left, far

    # Before anything is learned all of it is held back: scaled to the noise floor.
    mic, left, far = echo(0.0)
    out = gate.process(mic, left, far, 0.02)
    assert frame_level_db(out) == pytest.approx(frame_level_db(quiet), abs=1.5)
    # The room's gain is learned (200 ms), then what the canceller leaves (400 ms).
    for _ in range(30):
        gate.process(*echo(30.0), 0.02)
    assert gate.echo_blocks == 31
    # A well-cancelled block is echo, and so is a burst the canceller left
    # (as loud as what it left before: the far end explains it).
    for cancelled in (40.0, 30.0):
        mic, left, far = echo(cancelled)
        assert frame_level_db(gate.process(mic, left, far, 0.02)) < -65
    # The user over the agent, about as loud as the echo: energy the far end cannot
    # explain, in what the canceller left and in the microphone, for 40 ms: it passes,
    mic, left, far = echo(30.0)
    user = noise(-24, seed=7)
    assert gate.process(mixed(mic, user), mixed(left, user), far, 0.02) != mixed(left, user)
    mic, left, far = echo(30.0)
    assert gate.process(mixed(mic, user), mixed(left, user), far, 0.02) == mixed(left, user)
    assert gate.double_talk_blocks == 1
    # and so do the next hold_ms (word endings); then echo is held back again.
    for passes in (True, True, False):
        mic, left, far = echo(30.0)
        assert (gate.process(mic, left, far, 0.02) == left) is passes
    # A second after the far end stopped (the room's tail), everything passes again.
    for _ in range(51):
        gate.process(quiet, quiet, None, 0.02)
    mic, left, _ = echo(0.0)
    assert gate.process(mic, left, None, 0.02) == left
    with pytest.raises(ValueError, match="negative"):
        ResidualEchoGate(hold_ms=-1)
    with pytest.raises(ValueError, match="share"):
        ResidualEchoGate(share=0.0)


def test_the_residual_gate_hears_the_user_before_the_canceller_has_converged():
    """The room's gain is learned in the first half second; from then on a user clearly
    louder than the echo is heard, while what the canceller leaves is not yet trusted."""
    gate = ResidualEchoGate(confirm_ms=40, min_learn_ms=200, converge_ms=60_000)
    quiet = noise(-70)
    for _ in range(20):
        gate.process(quiet, quiet, None, 0.02)
    for i in range(15):
        far = noise(-20, seed=200 + i)
        mic = scaled(far, 0.5)
        gate.process(mic, mic, far, 0.02)  # nothing cancelled yet
    user = noise(-14, seed=8)  # the echo is at -26 dBFS
    kept = []
    for i in range(3):
        far = noise(-20, seed=300 + i)
        mic = mixed(scaled(far, 0.5), user)
        kept.append(gate.process(mic, mic, far, 0.02) == mic)
    assert kept == [False, True, True]


def test_when_the_agent_speaks_first_none_of_its_echo_reaches_the_vad():
    # A greeting: the far end plays from the first block, before any quiet moment the
    # noise floor could be learned from; a loud, distorting speaker, real speech.
    far = speech16k(6)
    room = EchoRoom(
        RoomConfig(delay_ms=120, rt60_s=0.4, echo_db=0, drive=1.5, noise_dbfs=-60, seed=5),
        speaker_rate=16000,
    )
    path = echo_path(16000)
    vad = default_vad(16000, 20)
    speech = []
    for k in range(len(far) // 640):
        block = far[k * 640 : (k + 1) * 640]
        room.play(block)
        path.played(block, 16000, k * 0.02)
        out = path.captured(room.capture(bytes(640)), k * 0.02)
        speech.append(vad.speech_probability(out) >= 0.5 and frame_level_db(out) >= -55)
    assert sum(speech) == 0
    stats = path.statistics()
    assert stats.double_talk_blocks == 0 and stats.echo_blocks > 0


# -- the simulated room --------------------------------------------------------------


def test_the_room_delays_reverberates_and_is_deterministic():
    h = synthetic_rir(16000, 0.3, seed=2)
    assert len(h) == 4800 and np.sum(h**2) == pytest.approx(1.0)
    config = RoomConfig(delay_ms=50, rt60_s=0.1, echo_db=0, drive=0, noise_dbfs=None, seed=2)
    click = np.zeros(320, dtype="<i2")
    click[0] = 16000

    def run() -> np.ndarray:
        room = EchoRoom(config, speaker_rate=16000)
        out = []
        for k in range(10):
            room.play(click.tobytes() if k == 0 else bytes(640))
            out.append(room.capture(bytes(640)))
        return np.frombuffer(b"".join(out), "<i2")

    first, second = run(), run()
    assert np.array_equal(first, second)
    # Nothing before the delay (and the resampler's few samples); the echo after it.
    onset = int(np.argmax(np.abs(first) > 100))
    assert 800 <= onset <= 820
    with pytest.raises(ValueError, match="drift"):
        RoomConfig(drift=0.05)
    with pytest.raises(ValueError, match="negative"):
        RoomConfig(delay_ms=-1)


def test_the_user_and_the_noise_reach_the_microphone():
    room = EchoRoom(RoomConfig(noise_dbfs=-40, seed=1), speaker_rate=24000)
    mic = room.capture(bytes(640))
    assert frame_level_db(mic) == pytest.approx(-40, abs=1.5)
    user = noise(-20, seed=9)
    mixed = EchoRoom(RoomConfig(noise_dbfs=None), speaker_rate=24000).capture(user)
    assert mixed == user


# -- the device hooks ----------------------------------------------------------------


class FakeStream:
    def __init__(self, **kwargs):
        self.callback = kwargs["callback"]

    def start(self):
        pass

    def stop(self):
        pass

    def close(self):
        pass


async def test_speaker_hands_every_block_and_its_dac_time_to_the_reference():
    streams: list[FakeStream] = []
    played: list[tuple[bytes, int, float]] = []

    def factory(**kwargs):
        streams.append(FakeStream(**kwargs))
        return streams[-1]

    spk = Speaker(
        sample_rate=16000,
        stream_factory=factory,
        on_played=lambda pcm, rate, at: played.append((pcm, rate, at)),
    )
    async with spk:
        await spk.write(block(5, 200))
        out = bytearray(640)
        streams[0].callback(out, 320, SimpleNamespace(outputBufferDacTime=12.5), None)
    # Exactly what the device got: the audio, then silence padding.
    assert played == [(block(5, 200) + bytes(240), 16000, 12.5)]
    assert bytes(out) == played[0][0]


async def test_microphone_cleans_each_block_on_the_device_thread():
    streams: list[FakeStream] = []
    seen: list[tuple[int, float]] = []

    def factory(**kwargs):
        streams.append(FakeStream(**kwargs))
        return streams[-1]

    def process(pcm: bytes, at: float) -> bytes:
        seen.append((threading.get_ident(), at))
        if at > 2:
            raise RuntimeError("broken canceller")
        return bytes(len(pcm))

    async with Microphone(sample_rate=16000, stream_factory=factory, process=process) as mic:

        def portaudio_thread():
            streams[0].callback(block(3), 320, SimpleNamespace(inputBufferAdcTime=1.25), None)
            streams[0].callback(block(4), 320, SimpleNamespace(inputBufferAdcTime=2.5), None)

        t = threading.Thread(target=portaudio_thread)
        t.start()
        t.join()
        first, second = await mic.__anext__(), await mic.__anext__()
    assert first.pcm == bytes(640)  # cleaned
    assert second.pcm == block(4)  # the canceller failed: the raw block, counted
    assert [at for _, at in seen] == [1.25, 2.5]
    assert all(ident == t.ident for ident, _ in seen)
    assert mic.statistics().process_errors == 1
