"""Voice activity detection: two detectors behind one protocol, and the speech segmenter.

Theory of operation
-------------------
A :class:`VAD` turns one fixed-size frame into a speech probability. Two
implementations:

* :class:`WebRtcVAD` (``webrtcvad``): 10/20/30 ms frames at 8/16/32/48 kHz,
  a few microseconds per frame, binary answers (0.0 or 1.0). The Voice Agent
  ``vad_threshold`` maps onto its aggressiveness mode.
* :class:`SileroVAD`: Silero v6 through onnxruntime, using the ONNX file that
  ships inside the ``faster-whisper`` wheel (no download, no torch). 32 ms
  frames (512 samples) at 16 kHz with 64 samples of context, LSTM state
  carried between calls. :class:`ThreadedVAD` runs any VAD in a worker thread
  for async callers, so inference never blocks the event loop.

:class:`SpeechSegmenter` is the state machine on top::

    SILENCE --(speech for min_speech_ms)--> SPEECH --(silence for min_silence_ms)--> SILENCE
              emits SpeechStarted                    emits SpeechStopped

A frame is speech when its probability is at least ``threshold``; once in
speech, it stays speech until the probability falls below
``threshold - hysteresis``. ``SpeechStarted`` carries the pre-roll (the
``pre_roll_ms`` of audio before the first speech frame, plus the frames that
confirmed the start) so the first syllable is never lost. Timestamps are in
samples: ``start_pts`` is the first speech frame, ``end_pts`` the end of the
last speech frame (not the end of the silence that confirmed the stop).
"""

from __future__ import annotations

import asyncio
import bisect
import concurrent.futures
import importlib.util
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, Protocol

import numpy as np
import numpy.typing as npt

from audio.frame import AudioFrame

_WEBRTC_RATES: Final = (8000, 16000, 32000, 48000)


class VAD(Protocol):
    """Speech probability for one frame of ``frame_samples`` at ``sample_rate``."""

    @property
    def sample_rate(self) -> int: ...

    @property
    def frame_samples(self) -> int: ...

    def speech_probability(self, pcm: bytes) -> float: ...

    def reset(self) -> None: ...


def _check_frame(pcm: bytes, expected: int, name: str) -> None:
    if not isinstance(pcm, bytes | bytearray | memoryview):
        raise ValueError(f"{name} expects PCM16 bytes, not {type(pcm).__name__}")
    if len(pcm) != expected * 2:
        raise ValueError(f"{name} expects frames of {expected} samples, got {len(pcm) / 2:g}")


class WebRtcVAD:
    """The WebRTC VAD (GMM based; cheap, binary).

    Args:
        sample_rate: 8000, 16000, 32000 or 48000.
        frame_ms: 10, 20 or 30.
        mode: aggressiveness 0-3 (3 filters the most non-speech).

    Raises:
        ValueError: unsupported rate, frame size or mode.
    """

    def __init__(self, sample_rate: int = 16000, frame_ms: int = 20, mode: int = 2) -> None:
        import webrtcvad

        if sample_rate not in _WEBRTC_RATES:
            raise ValueError(f"webrtcvad supports {_WEBRTC_RATES} Hz, not {sample_rate}")
        if frame_ms not in (10, 20, 30):
            raise ValueError(f"webrtcvad supports 10, 20 or 30 ms frames, not {frame_ms}")
        if mode not in (0, 1, 2, 3):
            raise ValueError(f"webrtcvad mode must be 0-3, not {mode}")
        self._vad = webrtcvad.Vad(mode)
        self._rate = sample_rate
        self._samples = sample_rate * frame_ms // 1000

    @classmethod
    def for_threshold(
        cls, threshold: float, sample_rate: int = 16000, frame_ms: int = 20
    ) -> WebRtcVAD:
        """Map a 0-1 ``vad_threshold`` onto webrtcvad's modes (higher = stricter)."""
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must be within 0..1, got {threshold}")
        return cls(sample_rate, frame_ms, mode=min(3, int(threshold * 4)))

    @property
    def sample_rate(self) -> int:
        return self._rate

    @property
    def frame_samples(self) -> int:
        return self._samples

    def speech_probability(self, pcm: bytes) -> float:
        _check_frame(pcm, self._samples, "webrtcvad")
        return 1.0 if self._vad.is_speech(bytes(pcm), self._rate) else 0.0

    def reset(self) -> None:
        """webrtcvad keeps no state between frames that matters here."""


def silero_model_path() -> Path:
    """The Silero v6 ONNX file shipped inside the installed ``faster-whisper``.

    Raises:
        RuntimeError: faster-whisper is not installed (``pip install 'voxloop[embedded]'``).
    """
    spec = importlib.util.find_spec("faster_whisper")
    if spec is None or spec.origin is None:
        raise RuntimeError("Silero VAD needs faster-whisper: pip install 'voxloop[embedded]'")
    path = Path(spec.origin).parent / "assets" / "silero_vad_v6.onnx"
    if not path.is_file():
        raise RuntimeError(f"the installed faster-whisper has no Silero model at {path}")
    return path


class SileroVAD:
    """Silero v6 VAD on onnxruntime (16 kHz, 512-sample frames).

    Not thread-safe: one instance per audio stream (it carries LSTM state).
    """

    SAMPLE_RATE: Final = 16000
    FRAME_SAMPLES: Final = 512
    CONTEXT: Final = 64

    def __init__(self, model_path: Path | None = None) -> None:
        import onnxruntime

        opts = onnxruntime.SessionOptions()
        opts.inter_op_num_threads = 1
        opts.intra_op_num_threads = 1
        opts.log_severity_level = 4
        self._session = onnxruntime.InferenceSession(
            str(model_path or silero_model_path()),
            providers=["CPUExecutionProvider"],
            sess_options=opts,
        )
        self.reset()

    @property
    def sample_rate(self) -> int:
        return self.SAMPLE_RATE

    @property
    def frame_samples(self) -> int:
        return self.FRAME_SAMPLES

    def reset(self) -> None:
        self._h = np.zeros((1, 1, 128), dtype=np.float32)
        self._c = np.zeros((1, 1, 128), dtype=np.float32)
        self._context = np.zeros(self.CONTEXT, dtype=np.float32)

    def speech_probability(self, pcm: bytes) -> float:
        _check_frame(pcm, self.FRAME_SAMPLES, "Silero VAD")
        x = np.frombuffer(pcm, dtype="<i2").astype(np.float32) / 32768.0
        batch = np.concatenate([self._context, x])[None, :]
        out, self._h, self._c = self._session.run(
            None, {"input": batch, "h": self._h, "c": self._c}
        )
        self._context = x[-self.CONTEXT :]
        return float(np.asarray(out).reshape(-1)[0])


class ThreadedVAD:
    """Runs a VAD's inference in one worker thread for async callers.

    One thread keeps frames in order and the model's state consistent. Close
    with :meth:`close` (or use as a context manager).
    """

    def __init__(self, vad: VAD) -> None:
        self._vad = vad
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="voxloop-vad")

    @property
    def vad(self) -> VAD:
        return self._vad

    async def speech_probability(self, pcm: bytes) -> float:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, self._vad.speech_probability, pcm)

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    def __enter__(self) -> ThreadedVAD:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class NoiseGatedVAD:
    """Wraps a VAD so that steady background noise cannot look like speech.

    A frame counts only if its level is at least ``margin_db`` above the noise
    floor — the ``floor_percentile`` of frame levels over the last
    ``window_s`` seconds — or, while speech continues, ``hold_db`` above it (so
    quiet word endings are kept). webrtcvad on its own calls steady noise at
    -30 dBFS speech; behind this gate it does not, and speech over that noise
    still passes.
    """

    def __init__(
        self,
        inner: VAD,
        *,
        margin_db: float = 9.0,
        hold_db: float = 3.0,
        window_s: float = 3.0,
        floor_percentile: float = 10.0,
    ) -> None:
        if not 0.0 <= floor_percentile < 100.0:
            raise ValueError("floor_percentile must be within [0, 100)")
        self._inner = inner
        self._margin = margin_db
        self._hold = hold_db
        self._window = max(1, round(window_s * inner.sample_rate / inner.frame_samples))
        self._fraction = floor_percentile / 100.0
        self._order: deque[float] = deque()
        self._sorted: list[float] = []
        self._speaking = False

    @property
    def sample_rate(self) -> int:
        return self._inner.sample_rate

    @property
    def frame_samples(self) -> int:
        return self._inner.frame_samples

    @property
    def noise_floor_db(self) -> float | None:
        if not self._sorted:
            return None
        return self._sorted[int(self._fraction * (len(self._sorted) - 1))]

    def reset(self) -> None:
        self._order.clear()
        self._sorted.clear()
        self._speaking = False
        self._inner.reset()

    def speech_probability(self, pcm: bytes) -> float:
        _check_frame(pcm, self._inner.frame_samples, "VAD")
        level = frame_level_db(pcm)
        self._order.append(level)
        bisect.insort(self._sorted, level)
        if len(self._order) > self._window:
            old = self._order.popleft()
            del self._sorted[bisect.bisect_left(self._sorted, old)]
        floor = self._sorted[int(self._fraction * (len(self._sorted) - 1))]
        probability = self._inner.speech_probability(pcm)
        if level < floor + (self._hold if self._speaking else self._margin):
            self._speaking = False
            return 0.0
        self._speaking = probability >= 0.5
        return probability


def frame_level_db(pcm: bytes) -> float:
    """RMS level of a PCM16 frame in dBFS, floored at -120 dB."""
    x = np.frombuffer(pcm, dtype="<i2").astype(np.float64)
    if not x.size:
        return -120.0
    rms = float(np.sqrt(np.mean(x * x))) / 32768.0
    return max(-120.0, 20.0 * float(np.log10(rms)) if rms > 0 else -120.0)


def trim_leading_silence(
    pcm: bytes, sample_rate: int, *, threshold_db: float = -60.0, keep_ms: int = 5
) -> bytes:
    """Drop near-silent samples at the start (TTS voices often begin with ~50 ms of it).

    Looks at 5 ms blocks; keeps ``keep_ms`` before the first block above ``threshold_db``.
    All-silent input is returned unchanged.
    """
    block = max(1, sample_rate // 200)
    x = np.frombuffer(pcm, dtype="<i2")
    n = len(x) // block
    if n == 0:
        return pcm
    blocks = x[: n * block].astype(np.float64).reshape(n, block)
    rms = np.sqrt(np.mean(blocks * blocks, axis=1)) / 32768.0
    loud = np.nonzero(rms > 10 ** (threshold_db / 20))[0]
    if not loud.size:
        return pcm
    start = max(0, int(loud[0]) * block - keep_ms * sample_rate // 1000)
    return pcm[start * 2 :]


def default_vad(sample_rate: int = 16000, frame_ms: int = 20, threshold: float = 0.5) -> VAD:
    """The embedded default: webrtcvad behind the noise gate."""
    return NoiseGatedVAD(WebRtcVAD.for_threshold(threshold, sample_rate, frame_ms))


# -- the segmenter ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SegmenterConfig:
    """Speech segmentation settings.

    Attributes:
        threshold: probability at or above which a frame is speech (Voice Agent
            ``vad_threshold``).
        hysteresis: in speech, a frame is silence only below ``threshold - hysteresis``.
        min_speech_ms: speech needed before a start is declared.
        min_silence_ms: silence needed before a stop is declared.
        pre_roll_ms: audio kept from before the first speech frame.
    """

    threshold: float = 0.5
    hysteresis: float = 0.15
    min_speech_ms: int = 60
    min_silence_ms: int = 300
    pre_roll_ms: int = 200

    def __post_init__(self) -> None:
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold must be within 0..1, got {self.threshold}")
        for name in ("min_speech_ms", "min_silence_ms", "pre_roll_ms"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative")


@dataclass(frozen=True, slots=True, kw_only=True)
class SpeechStarted:
    start_pts: int
    pre_roll: tuple[AudioFrame, ...] = field(default=(), repr=False)


@dataclass(frozen=True, slots=True, kw_only=True)
class SpeechStopped:
    start_pts: int
    end_pts: int


SegmentEvent = SpeechStarted | SpeechStopped


class SpeechSegmenter:
    """Turns per-frame speech probabilities into speech start/stop events.

    Pure and synchronous: feed ``(frame, probability)`` in order.
    """

    def __init__(self, config: SegmenterConfig | None = None) -> None:
        self.config = config or SegmenterConfig()
        self._in_speech = False
        self._run_start: int | None = None  # first frame of the current speech run
        self._run_ms = 0.0
        self._silence_ms = 0.0
        self._last_speech_end = 0
        self._segment_start = 0
        self._history: deque[AudioFrame] = deque()
        self._history_ms = 0.0

    @property
    def in_speech(self) -> bool:
        return self._in_speech

    def process(self, frame: AudioFrame, probability: float) -> list[SegmentEvent]:
        """Add one frame and its speech probability.

        Raises:
            ValueError: the probability is not a number within 0..1.
        """
        if not 0.0 <= probability <= 1.0:  # also rejects NaN
            raise ValueError(f"speech probability must be within 0..1, got {probability}")
        cfg = self.config
        ms = frame.duration_ms
        if self._in_speech:
            if probability >= cfg.threshold - cfg.hysteresis:
                self._silence_ms = 0.0
                self._last_speech_end = frame.end_pts
                return []
            self._silence_ms += ms
            if self._silence_ms >= cfg.min_silence_ms:
                self._in_speech = False
                self._run_start = None
                self._run_ms = 0.0
                self._history.clear()
                self._history_ms = 0.0
                return [SpeechStopped(start_pts=self._segment_start, end_pts=self._last_speech_end)]
            return []

        self._remember(frame)
        if probability >= cfg.threshold:
            if self._run_start is None:
                self._run_start = frame.pts
                self._run_ms = 0.0
            self._run_ms += ms
            if self._run_ms >= cfg.min_speech_ms:
                self._in_speech = True
                self._silence_ms = 0.0
                self._segment_start = self._run_start
                self._last_speech_end = frame.end_pts
                pre_roll_from = self._run_start - cfg.pre_roll_ms * frame.sample_rate // 1000
                pre = tuple(f for f in self._history if f.end_pts > pre_roll_from)
                self._history.clear()
                self._history_ms = 0.0
                return [SpeechStarted(start_pts=self._run_start, pre_roll=pre)]
        else:
            self._run_start = None
            self._run_ms = 0.0
        return []

    def _remember(self, frame: AudioFrame) -> None:
        self._history.append(frame)
        self._history_ms += frame.duration_ms
        limit = self.config.pre_roll_ms + self.config.min_speech_ms + frame.duration_ms
        while self._history and self._history_ms - self._history[0].duration_ms >= limit:
            self._history_ms -= self._history.popleft().duration_ms


def segment_pcm(
    pcm: bytes, sample_rate: int, vad: VAD, config: SegmenterConfig | None = None
) -> list[tuple[float, float]]:
    """Speech segments ``(start_s, end_s)`` of a whole mono PCM16 buffer (offline helper).

    Raises:
        ValueError: ``sample_rate`` differs from the VAD's.
    """
    from audio.reframe import Reframer

    if sample_rate != vad.sample_rate:
        raise ValueError(f"VAD runs at {vad.sample_rate} Hz, audio is {sample_rate} Hz")
    frame_ms = vad.frame_samples * 1000 // sample_rate
    reframer = Reframer(sample_rate, frame_ms)
    segmenter = SpeechSegmenter(config)
    out: list[tuple[float, float]] = []
    start: float | None = None
    frames = reframer.process(pcm) + reframer.flush()
    for frame in frames:
        for event in segmenter.process(frame, vad.speech_probability(frame.pcm)):
            if isinstance(event, SpeechStarted):
                start = event.start_pts / sample_rate
            else:
                out.append((event.start_pts / sample_rate, event.end_pts / sample_rate))
                start = None
    if start is not None and frames:
        out.append((start, frames[-1].end_pts / sample_rate))
    return out


def to_float(pcm: bytes) -> npt.NDArray[np.float32]:
    return np.frombuffer(pcm, dtype="<i2").astype(np.float32) / 32768.0
