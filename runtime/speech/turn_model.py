"""Audio end-of-turn model: Smart Turn v3.2 on onnxruntime.

Theory of operation
-------------------
Silence alone cannot tell "I'd like to book ... [pause] ... a table" from a
finished request. Smart Turn v3 (BSD-2-Clause, by Daily) is a small Whisper-encoder
classifier that hears the *prosody* of the turn so far and returns the
probability that the speaker has finished. It reads the last 8 s of 16 kHz audio
only; it never sees a transcript.

**Where the model comes from.** The ONNX file (``smart-turn-v3.2-cpu.onnx``,
8.7 MB) ships inside the PyPI wheel ``pipecat-ai==1.14.0``. It is found through
that distribution's installed-file metadata (pipecat itself is never imported)
and verified against a pinned sha256 before it is loaded; nothing is downloaded
at run time. The wheel is installed without its dependencies (it is only the
carrier of the file): ``pip install 'voxloop[smart-turn]' && pip install
--no-deps pipecat-ai==1.14.0``.

**Preprocessing, as the model was trained.** The turn's audio is scaled to
[-1, 1), cut to its last 8 s or left-padded with zeros to 8 s, normalised to zero
mean and unit variance over that whole window (padding included), and turned into
Whisper's log-mel features: 80 Slaney mel bins, a 400-sample periodic Hann window,
160-sample hop, centred (reflect-padded) frames, the last frame dropped, giving
80 x 800 values; log10, floored at 8 below the maximum, then ``(x + 4) / 4``.
faster-whisper's :class:`~faster_whisper.feature_extractor.FeatureExtractor`
computes exactly that for an 8 s chunk with no end padding.

**Cost.** One intra-op and one inter-op thread: a call takes tens of
milliseconds of one core (docs/speech.md gives the measured number), and runs in
this object's single worker thread when awaited, so concurrent sessions queue
instead of competing for the cores.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import importlib.metadata
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt
import soxr

from audio.frame import check_pcm, check_rate
from runtime.speech.engines._common import ModelVerificationError, verify_sha256

__all__ = [
    "SMART_TURN_SHA256",
    "ModelVerificationError",
    "SmartTurn",
    "TurnModelBusy",
    "TurnModelStatistics",
    "TurnPrediction",
    "smart_turn_path",
]

SMART_TURN_SHA256: Final = "2bb026316b14a660486a75b1733cd3fbab8c2fd0314dc9af7be49f8cca967e4f"
SMART_TURN_DISTRIBUTION: Final = "pipecat-ai"
SMART_TURN_VERSION: Final = "1.14.0"
SMART_TURN_FILE: Final = "pipecat/audio/turn/smart_turn/data/smart-turn-v3.2-cpu.onnx"
INSTALL_HINT: Final = (
    f"pip install 'voxloop[smart-turn]' && "
    f"pip install --no-deps {SMART_TURN_DISTRIBUTION}=={SMART_TURN_VERSION}"
)

SAMPLE_RATE: Final = 16000
WINDOW_S: Final = 8
WINDOW_SAMPLES: Final = WINDOW_S * SAMPLE_RATE
N_MELS: Final = 80
N_FRAMES: Final = 800
_NORM_EPS: Final = 1e-7


def _unavailable() -> ModelVerificationError:
    return ModelVerificationError(
        f"the audio end-of-turn model needs the smart-turn extra, which is not installed: "
        f"{INSTALL_HINT}"
    )


def smart_turn_path() -> Path:
    """Where the installed ``pipecat-ai`` wheel put the Smart Turn v3.2 ONNX file.

    The file is located through the distribution's metadata; pipecat is not imported.

    Raises:
        ModelVerificationError: ``pipecat-ai`` is not installed, or its wheel holds no
            such file (the message names the install command).
    """
    try:
        dist = importlib.metadata.distribution(SMART_TURN_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise _unavailable() from None
    if not any(str(f) == SMART_TURN_FILE for f in dist.files or ()):
        raise ModelVerificationError(
            f"{SMART_TURN_DISTRIBUTION} {dist.version} has no Smart Turn v3.2 model: "
            f"pip install --no-deps {SMART_TURN_DISTRIBUTION}=={SMART_TURN_VERSION}"
        )
    return Path(str(dist.locate_file(SMART_TURN_FILE)))


class TurnModelBusy(RuntimeError):
    """Too many end-of-turn judgements are already waiting for the model.

    Decide without the model this time (the caller's fallback rule).
    """


@dataclass(frozen=True, slots=True, kw_only=True)
class TurnModelStatistics:
    """Load of a :class:`SmartTurn`'s worker.

    Attributes:
        pending: :meth:`SmartTurn.apredict` calls queued or running now.
        refused_busy: calls refused with :class:`TurnModelBusy` so far.
    """

    pending: int
    refused_busy: int


@dataclass(frozen=True, slots=True, kw_only=True)
class TurnPrediction:
    """One end-of-turn judgement.

    Attributes:
        probability: 0-1, how likely the turn is complete (the model's sigmoid output;
            above 0.5 is the model's "complete").
        inference_ms: wall time of that call (features and model), in milliseconds.
    """

    probability: float
    inference_ms: float

    @property
    def complete(self) -> bool:
        return self.probability > 0.5


class SmartTurn:
    """Smart Turn v3.2: the probability that a turn is complete, from its audio.

    Args:
        path: the ONNX file (``None``: the one in the installed ``pipecat-ai`` wheel).
            Either way it must be the pinned file (sha256 :data:`SMART_TURN_SHA256`).

    Raises:
        ModelVerificationError: the extra or the wheel is not installed, or the file is
            missing or is not the pinned one. The message is one line naming the fix.

        max_pending: how many :meth:`apredict` calls may be queued or running at once;
            one more is refused with :class:`TurnModelBusy` at once (a judgement that
            waits behind many others comes too late to be of use).

    Thread safety: :meth:`predict` may be called from several threads at once.
    :meth:`apredict` runs calls one at a time in this object's worker thread;
    :meth:`aclose` stops that thread.
    """

    def __init__(self, path: Path | None = None, *, max_pending: int = 4) -> None:
        if max_pending < 1:
            raise ValueError("max_pending must be at least 1")
        try:
            import onnxruntime
            from faster_whisper.feature_extractor import FeatureExtractor
        except ImportError:
            raise _unavailable() from None
        if path is None:
            path = smart_turn_path()
        verify_sha256(path, SMART_TURN_SHA256)
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
        self._session: Any = onnxruntime.InferenceSession(
            str(path), sess_options=options, providers=["CPUExecutionProvider"]
        )
        self._features: Any = FeatureExtractor(
            feature_size=N_MELS, sampling_rate=SAMPLE_RATE, chunk_length=WINDOW_S
        )
        self._path = path
        self._executor = concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix="voxloop-smart-turn"
        )
        self._max_pending = max_pending
        self._pending = 0
        self._busy = 0
        self._lock = threading.Lock()

    @property
    def path(self) -> Path:
        """The verified ONNX file in use."""
        return self._path

    def window(self, pcm: bytes, sample_rate: int = SAMPLE_RATE) -> npt.NDArray[np.float32]:
        """The model's input audio: the last 8 s at 16 kHz, left-padded, normalised.

        Args:
            pcm: mono PCM16 little-endian, the turn so far (any length, may be empty).
            sample_rate: of ``pcm``, in Hz (a rate voxloop supports; resampled to 16 kHz).

        Returns:
            float32 array of shape ``(128000,)``, zero mean and unit variance
            (all zeros for silence).

        Raises:
            ValueError: an odd byte count or an unsupported rate.
        """
        pcm = check_pcm(pcm)
        check_rate(sample_rate)
        # Only the last 8 s are heard (and, from another rate, 20 ms of filter run-in).
        keep = WINDOW_S * sample_rate + (0 if sample_rate == SAMPLE_RATE else sample_rate // 50)
        x = np.frombuffer(pcm, "<i2")[-keep:].astype(np.float32) / 32768.0
        if sample_rate != SAMPLE_RATE:
            # In floating point: PCM16 rounding would show in the quiet mel bins.
            x = np.asarray(soxr.resample(x, sample_rate, SAMPLE_RATE, quality="HQ"), np.float32)
            x = x[-WINDOW_SAMPLES:]
        x = np.pad(x, (WINDOW_SAMPLES - x.size, 0))
        normalised: npt.NDArray[np.float32] = (
            (x - x.mean()) / np.sqrt(x.var() + _NORM_EPS)
        ).astype(np.float32)
        return normalised

    def features(self, pcm: bytes, sample_rate: int = SAMPLE_RATE) -> npt.NDArray[np.float32]:
        """Whisper log-mel features of :meth:`window`, as the model takes them.

        Returns:
            float32 array of shape ``(80, 800)`` (mel bins x 10 ms frames).

        Raises:
            ValueError: an odd byte count or an unsupported rate.
        """
        feats = self._features(self.window(pcm, sample_rate), padding=0)
        out: npt.NDArray[np.float32] = np.ascontiguousarray(feats[:, :N_FRAMES], np.float32)
        return out

    def predict(self, pcm: bytes, sample_rate: int = SAMPLE_RATE) -> float:
        """The probability (0-1) that the turn in ``pcm`` is complete.

        Args:
            pcm: mono PCM16 little-endian, the user's turn so far (the model hears
                its last 8 s); include the trailing silence heard so far.
            sample_rate: of ``pcm``, in Hz.

        Raises:
            ValueError: an odd byte count or an unsupported rate.
        """
        feats = self.features(pcm, sample_rate)
        out = self._session.run(None, {"input_features": feats[None]})
        return float(np.asarray(out[0]).reshape(-1)[0])

    def predict_timed(self, pcm: bytes, sample_rate: int = SAMPLE_RATE) -> TurnPrediction:
        """:meth:`predict` with the wall time it took.

        Raises:
            ValueError: an odd byte count or an unsupported rate.
        """
        t0 = time.perf_counter()
        probability = self.predict(pcm, sample_rate)
        return TurnPrediction(
            probability=probability, inference_ms=(time.perf_counter() - t0) * 1000
        )

    async def apredict(self, pcm: bytes, sample_rate: int = SAMPLE_RATE) -> TurnPrediction:
        """:meth:`predict_timed` in this object's worker thread (the event loop stays free).

        Calls from several tasks run one after another, at most ``max_pending`` queued or
        running. Cancelling the awaiting task drops a call that has not started (one already
        running finishes in the background).

        Raises:
            TurnModelBusy: ``max_pending`` calls are already queued or running.
            ValueError: an odd byte count or an unsupported rate.
            RuntimeError: after :meth:`aclose`.
        """
        with self._lock:
            if self._pending >= self._max_pending:
                self._busy += 1
                raise TurnModelBusy(f"{self._pending} end-of-turn judgements already pending")
            self._pending += 1
        try:
            future = self._executor.submit(self.predict_timed, pcm, sample_rate)
        except BaseException:
            self._done()
            raise
        future.add_done_callback(lambda _: self._done())
        return await asyncio.wrap_future(future)

    def _done(self) -> None:
        with self._lock:
            self._pending -= 1

    def statistics(self) -> TurnModelStatistics:
        """A snapshot of the worker's load."""
        with self._lock:
            return TurnModelStatistics(pending=self._pending, refused_busy=self._busy)

    def warmup(self) -> None:
        """Run the model once on silence: the first call sets up the session's buffers."""
        self.predict(b"")

    async def aclose(self) -> None:
        """Stop the worker thread (queued :meth:`apredict` calls are cancelled)."""
        self._executor.shutdown(wait=False, cancel_futures=True)
