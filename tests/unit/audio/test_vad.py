from __future__ import annotations

import threading

import numpy as np
import pytest

from audio.frame import AudioFrame
from audio.resample import resample_all
from audio.vad import (
    NoiseGatedVAD,
    SegmenterConfig,
    SileroVAD,
    SpeechSegmenter,
    SpeechStarted,
    SpeechStopped,
    ThreadedVAD,
    WebRtcVAD,
    default_vad,
    segment_pcm,
)
from audio.wav import read_wav

from ...helpers import REAL, SPEECH, conversation, manifest, noise, tone

TOLERANCE_S = 0.100


def vads() -> list[tuple[str, object, SegmenterConfig]]:
    return [
        ("webrtc+gate", default_vad(), SegmenterConfig()),
        # Silero hears the real pauses inside "Wait, stop, that's…": bridge them.
        ("silero", SileroVAD(), SegmenterConfig(min_silence_ms=500)),
    ]


@pytest.mark.parametrize("conv", ["conv-two_turns", "conv-barge_in"])
def test_default_vad_finds_each_utterance_within_100_ms(conv: str):
    audio = read_wav(SPEECH / f"{conv}.wav")
    truth = conversation(conv)
    found = segment_pcm(audio.mono(), audio.sample_rate, default_vad())
    assert len(found) == len(truth)
    for (start, end), utt in zip(found, truth, strict=True):
        assert abs(start - float(utt["start_s"])) <= TOLERANCE_S
        assert abs(end - float(utt["end_s"])) <= TOLERANCE_S


@pytest.mark.parametrize("conv", ["conv-two_turns", "conv-barge_in"])
def test_silero_starts_within_100_ms_and_never_ends_late(conv: str):
    # The reference end times include the clips' trailing digital near-silence
    # (-90…-100 dBFS); Silero ends where the voice ends, up to ~180 ms earlier.
    audio = read_wav(SPEECH / f"{conv}.wav")
    found = segment_pcm(audio.mono(), 16000, SileroVAD(), SegmenterConfig(min_silence_ms=500))
    truth = conversation(conv)
    assert len(found) == len(truth)
    for (start, end), utt in zip(found, truth, strict=True):
        assert abs(start - float(utt["start_s"])) <= TOLERANCE_S
        assert float(utt["end_s"]) - 0.2 <= end <= float(utt["end_s"])


@pytest.mark.parametrize("colour", ["white", "pink", "brown"])
@pytest.mark.parametrize("make", [default_vad, SileroVAD], ids=["webrtc+gate", "silero"])
def test_no_false_start_on_ten_seconds_of_noise(colour: str, make):
    pcm = noise(10.0, 16000, dbfs=-30, colour=colour)
    assert segment_pcm(pcm, 16000, make()) == []


def test_raw_webrtcvad_would_trigger_on_that_noise():
    # Why the gate exists: the bare WebRTC VAD calls steady -30 dBFS noise speech.
    assert segment_pcm(noise(10.0, 16000, dbfs=-30), 16000, WebRtcVAD()) != []


def test_speech_over_noise_is_still_found():
    audio = read_wav(SPEECH / "conv-two_turns.wav")
    x = np.frombuffer(audio.mono(), "<i2").astype(np.int32)
    n = np.frombuffer(noise(len(x) / 16000, 16000, dbfs=-40, seed=3), "<i2").astype(np.int32)
    mixed = np.clip(x + n[: len(x)], -32768, 32767).astype("<i2").tobytes()
    found = segment_pcm(mixed, 16000, default_vad())
    assert len(found) == 2
    assert abs(found[0][0] - 0.5) <= TOLERANCE_S and abs(found[1][0] - 8.532) <= TOLERANCE_S


@pytest.mark.parametrize("name", ["hello-world", "tt-weasels", "all-circuits-busy-now"])
def test_real_telephone_prompts_are_one_segment_each(name: str):
    audio = read_wav(REAL / f"{name}.wav")
    assert audio.sample_rate == 8000
    pcm = resample_all(audio.mono(), 8000, 16000)
    padded = bytes(16000) + pcm + bytes(32000)  # the line is quiet before and after
    found = segment_pcm(padded, 16000, default_vad(), SegmenterConfig(min_silence_ms=600))
    assert len(found) == 1
    start, end = found[0]
    assert 0.45 <= start <= 0.5 + audio.duration_s / 2
    assert end - start >= audio.duration_s * 0.6


def test_real_harvard_sentences_are_separate_segments():
    audio = read_wav(REAL / "speech_orig_16k.wav")
    found = segment_pcm(
        audio.mono(), audio.sample_rate, default_vad(), SegmenterConfig(min_silence_ms=300)
    )
    # The recording reads several sentences with pauses between them.
    assert 3 <= len(found) <= 12
    assert sum(e - s for s, e in found) >= 0.5 * audio.duration_s


def test_each_synthetic_utterance_is_one_segment():
    for item in manifest():
        audio = read_wav(SPEECH / str(item["file"]))
        found = segment_pcm(
            audio.mono() + bytes(16000), 16000, default_vad(), SegmenterConfig(min_silence_ms=500)
        )
        assert len(found) == 1, item["file"]


# -- the state machine, with scripted probabilities --------------------------------


def frames(n: int, start: int = 0) -> list[AudioFrame]:
    return [AudioFrame(pcm=bytes(640), sample_rate=16000, pts=(start + i) * 320) for i in range(n)]


def run(probabilities: list[float], config: SegmenterConfig) -> list[object]:
    seg = SpeechSegmenter(config)
    events: list[object] = []
    for frame, p in zip(frames(len(probabilities)), probabilities, strict=True):
        events += seg.process(frame, p)
    return events


def test_start_needs_min_speech_and_keeps_pre_roll():
    cfg = SegmenterConfig(min_speech_ms=60, min_silence_ms=100, pre_roll_ms=100)
    events = run([0.0] * 10 + [0.9] * 5 + [0.0] * 6, cfg)
    start, stop = events
    assert isinstance(start, SpeechStarted) and start.start_pts == 10 * 320
    # pre-roll: 100 ms (5 frames) before the first speech frame, plus the 3 confirming frames
    assert [f.pts // 320 for f in start.pre_roll] == [5, 6, 7, 8, 9, 10, 11, 12]
    assert isinstance(stop, SpeechStopped) and (stop.start_pts, stop.end_pts) == (3200, 15 * 320)


def test_short_blips_do_not_start_speech():
    cfg = SegmenterConfig(min_speech_ms=60)
    assert run([0.9, 0.9, 0.0, 0.9, 0.0, 0.9, 0.9, 0.0] * 3, cfg) == []


def test_threshold_and_hysteresis():
    cfg = SegmenterConfig(threshold=0.6, hysteresis=0.2, min_speech_ms=20, min_silence_ms=40)
    # 0.5 cannot start speech (< 0.6) but keeps it going (>= 0.4); 0.3 is silence.
    assert run([0.5] * 10, cfg) == []
    events = run([0.7, 0.5, 0.5, 0.5, 0.3, 0.3], cfg)
    assert [type(e).__name__ for e in events] == ["SpeechStarted", "SpeechStopped"]
    assert events[1].end_pts == 4 * 320  # type: ignore[attr-defined]


def test_pause_shorter_than_min_silence_does_not_stop():
    cfg = SegmenterConfig(min_speech_ms=20, min_silence_ms=100)
    events = run([0.9] * 3 + [0.0] * 4 + [0.9] * 3 + [0.0] * 5, cfg)
    assert [type(e).__name__ for e in events] == ["SpeechStarted", "SpeechStopped"]


@pytest.mark.parametrize("p", [float("nan"), -0.1, 1.5])
def test_bad_probabilities_are_rejected(p: float):
    with pytest.raises(ValueError, match=r"within 0\.\.1"):
        SpeechSegmenter().process(frames(1)[0], p)


def test_config_and_vad_arguments_are_validated():
    with pytest.raises(ValueError, match="threshold"):
        SegmenterConfig(threshold=1.5)
    with pytest.raises(ValueError, match="min_silence_ms"):
        SegmenterConfig(min_silence_ms=-1)
    with pytest.raises(ValueError, match="webrtcvad supports"):
        WebRtcVAD(22050)
    with pytest.raises(ValueError, match="10, 20 or 30"):
        WebRtcVAD(16000, 32)
    with pytest.raises(ValueError, match="frames of 320 samples, got 160"):
        WebRtcVAD().speech_probability(bytes(320))
    with pytest.raises(ValueError, match="frames of 512 samples"):
        SileroVAD().speech_probability(bytes(640))
    with pytest.raises(ValueError, match="16000 Hz, audio is 8000"):
        segment_pcm(b"", 8000, WebRtcVAD())


def test_threshold_maps_to_webrtc_modes():
    assert [WebRtcVAD.for_threshold(t)._vad is not None for t in (0.0, 0.5, 1.0)] == [True] * 3
    with pytest.raises(ValueError, match="threshold must be within"):
        WebRtcVAD.for_threshold(2.0)


def test_silero_probability_is_high_on_speech_low_on_tone_and_state_resets():
    vad = SileroVAD()
    audio = read_wav(SPEECH / "shared-00-piper.wav").mono()
    probs = [vad.speech_probability(audio[i : i + 1024]) for i in range(0, len(audio) - 1024, 1024)]
    assert max(probs) > 0.9
    vad.reset()
    beep = tone(1000, 1.0, 16000)
    assert max(vad.speech_probability(beep[i : i + 1024]) for i in range(0, 30000, 1024)) < 0.5


def test_noise_gate_reports_its_floor():
    gate = NoiseGatedVAD(WebRtcVAD())
    assert gate.noise_floor_db is None
    pcm = noise(1.0, 16000, dbfs=-30)
    for i in range(0, len(pcm), 640):
        gate.speech_probability(pcm[i : i + 640])
    assert gate.noise_floor_db == pytest.approx(-30, abs=1.5)


class RecordingVAD:
    """A real Silero VAD that also records which thread ran each inference."""

    def __init__(self) -> None:
        self.inner = SileroVAD()
        self.threads: set[str] = set()
        self.sample_rate = 16000
        self.frame_samples = 512

    def speech_probability(self, pcm: bytes) -> float:
        self.threads.add(threading.current_thread().name)
        return self.inner.speech_probability(pcm)

    def reset(self) -> None:
        self.inner.reset()


async def test_threaded_vad_runs_inference_off_the_loop():
    audio = read_wav(SPEECH / "shared-00-piper.wav").mono()
    chunks = [audio[i : i + 1024] for i in range(0, len(audio) - 1024, 1024)]
    recording = RecordingVAD()
    with ThreadedVAD(recording) as vad:
        probs = [await vad.speech_probability(chunk) for chunk in chunks]
    assert threading.current_thread().name not in recording.threads
    assert all(name.startswith("voxloop-vad") for name in recording.threads)
    direct = SileroVAD()
    assert probs == [direct.speech_probability(chunk) for chunk in chunks]
