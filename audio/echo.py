"""Keeping the agent from hearing itself (laptop mode).

Four pieces:

* :class:`HalfDuplexGate` — reliable and free: while the agent's audio is
  playing (and for ``tail_ms`` after, for the room's echo to die down),
  microphone frames are replaced by silence, so neither the VAD nor the STT
  hears the agent. The cost is that the user cannot barge in by voice while
  the agent speaks on open speakers; use headphones (or an echo canceller) to
  keep barge-in.
* :class:`EchoCanceller` — the interface a real acoustic echo canceller
  plugs into: it sees the far-end (speaker) signal and the near-end
  (microphone) signal and returns the cleaned microphone signal.
  :class:`NoEchoCancellation` is the pass-through default;
  :class:`audio.aec.WebRtcEchoCanceller` (WebRTC AEC3, the ``aec`` extra)
  is the real one.
* :class:`EchoPath` — pairs each microphone block with the far-end audio that
  was audible while it was captured, and runs the canceller on it. It is
  called from the sound devices' callback threads: the speaker hands it
  exactly the block it gives the device, stamped with the time the device
  reports that block will reach the DAC; the microphone hands it each block
  stamped with the time the device reports it was captured. The far end is
  looked up by time, so the devices' reported latencies (and their clock
  drift) are taken out before the canceller sees the signals; the canceller
  only has to model the room and whatever latency the devices misreport.
* :class:`ResidualEchoGate` — what the canceller leaves of the agent's voice
  is scaled down to the noise floor before the VAD sees it; the user talking
  over the agent passes.

Theory of operation of :class:`EchoPath`: far-end audio is resampled to the
microphone's rate and appended to a bounded history (``history_ms``). Its
positions count the resampler's *input* (soxr releases output in bursts).
An *anchor* maps history positions to device time: (position, time) of the
last speaker block. Each block extends the mapping by its length and moves
the anchor's time a fraction (``smoothing``) of the way towards the device's
own time stamp: clock drift between the two devices is followed, time-stamp
jitter is averaged out. A stamp more than ``reanchor_ms`` off (an underrun,
a restarted stream) moves the anchor at once. A microphone block captured
at time ``t`` takes the history samples from position
``anchor + (t - anchor_time) * rate`` on; positions the history does not
hold (before the first speaker block, or already forgotten) are silence.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from audio.frame import AudioFrame, check_pcm, check_rate
from audio.resample import Quality, Resampler
from audio.vad import frame_level_db


class EchoCanceller(Protocol):
    """Acoustic echo cancellation on aligned 16-bit mono frames at one rate."""

    def process(self, near: AudioFrame, far: AudioFrame | None) -> AudioFrame: ...

    def reset(self) -> None: ...


class NoEchoCancellation:
    """Pass-through."""

    def process(self, near: AudioFrame, far: AudioFrame | None) -> AudioFrame:
        return near

    def reset(self) -> None:
        return None


class HalfDuplexGate:
    """Silences the microphone while the agent is audible.

    Call :meth:`playing` with the sample position (at the microphone's rate)
    until which the agent's audio will be audible; :meth:`process` then passes
    or silences each microphone frame by its own timestamp.
    """

    def __init__(self, tail_ms: int = 150) -> None:
        if tail_ms < 0:
            raise ValueError("tail_ms must not be negative")
        self._tail_ms = tail_ms
        self._until_pts = -1
        self.gated_frames = 0

    def playing(self, until_pts: int) -> None:
        """The agent is audible up to ``until_pts`` (microphone samples)."""
        self._until_pts = max(self._until_pts, until_pts)

    def stop(self, at_pts: int) -> None:
        """Playback was cut at ``at_pts`` (barge-in or clear)."""
        self._until_pts = min(self._until_pts, at_pts)

    def is_open(self, frame: AudioFrame) -> bool:
        tail = self._tail_ms * frame.sample_rate // 1000
        return frame.pts >= self._until_pts + tail

    def process(self, frame: AudioFrame) -> AudioFrame:
        if self.is_open(frame):
            return frame
        self.gated_frames += 1
        return AudioFrame(pcm=bytes(len(frame.pcm)), sample_rate=frame.sample_rate, pts=frame.pts)


class ResidualEchoGate:
    """Keeps what the canceller left of the agent's voice away from the VAD.

    A canceller removes most of the echo but not all of it: while it learns
    the room, and in short bursts after (a syllable the speaker distorted, the
    room's reverberation), some echo remains, which a VAD calls speech. This
    gate decides, per block, whether the cleaned block is near-end speech
    (the user) or what is left of the echo:

    * no far-end audio in the last ``window_ms`` (the echo path's delay and
      reverberation): it passes;
    * until the canceller has converged (the median of what it removed from
      the last 25 loud blocks reaches ``converged_db``, after at least
      ``min_warmup_ms`` and at most ``max_warmup_ms`` of far-end audio): echo;
    * the canceller removed less than ``double_talk_db`` *and* the microphone
      is about as loud as the echo usually is (within ``loudness_db`` of the
      recent loud echo level) for ``confirm_ms`` in a row: something it cannot
      cancel is there, the user's voice (double talk): it passes, and so do
      the next ``hold_ms`` (word endings);
    * otherwise echo.

    An echo block is scaled down to the noise floor of the cleaned signal
    (its recent quiet level), never below it, so the VAD's own noise-floor
    tracking is not disturbed. The price: a user much quieter at the
    microphone than the echo cannot interrupt by voice.

    Args:
        window_ms: how long far-end audio counts as possibly audible.
        min_warmup_ms, max_warmup_ms: bounds of the learning phase (far-end audio).
        converged_db: median removal that ends the learning phase.
        double_talk_db: at most this much removed suggests near-end speech.
        loudness_db: how far below the loud echo level near-end speech may be.
        hold_ms: blocks passed after near-end speech.
        confirm_ms: how long the signs of double talk must last (what the
            canceller leaves of the echo comes in shorter bursts).
        far_active_dbfs: far-end level that counts as audio.
    """

    def __init__(
        self,
        *,
        window_ms: int = 1000,
        min_warmup_ms: int = 2000,
        max_warmup_ms: int = 4000,
        converged_db: float = 15.0,
        double_talk_db: float = 10.0,
        loudness_db: float = 12.0,
        hold_ms: int = 200,
        confirm_ms: int = 40,
        far_active_dbfs: float = -50.0,
    ) -> None:
        if min(window_ms, min_warmup_ms, max_warmup_ms, hold_ms) < 0:
            raise ValueError("durations must not be negative")
        self._window_s = window_ms / 1000
        self._min_warmup_s = min_warmup_ms / 1000
        self._max_warmup_s = max_warmup_ms / 1000
        self._converged_db = converged_db
        self._converged = False
        self._removed: deque[float] = deque(maxlen=25)
        self._double_talk = double_talk_db
        self._loudness = loudness_db
        self._hold_s = hold_ms / 1000
        self._confirm_s = confirm_ms / 1000
        self._double_talk_s = 0.0
        self._far_active = far_active_dbfs
        self._since_far_s = float("inf")
        self._far_heard_s = 0.0
        self._hold_left_s = 0.0
        self._echo_levels: deque[float] = deque(maxlen=150)  # mic levels while the far end plays
        self._quiet_levels: deque[float] = deque(maxlen=150)  # cleaned levels
        self.echo_blocks = 0
        self.double_talk_blocks = 0

    def process(self, near: bytes, cleaned: bytes, far: bytes | None, seconds: float) -> bytes:
        """Gate one block.

        Args:
            near: the microphone block before cancellation.
            cleaned: the canceller's output for it.
            far: the far-end block aligned with it, or ``None``.
            seconds: the block's duration.

        Returns:
            ``cleaned``, or ``cleaned`` scaled down to the noise floor when it is echo.
        """
        near_db, out_db = frame_level_db(near), frame_level_db(cleaned)
        self._quiet_levels.append(out_db)
        if far is not None and frame_level_db(far) >= self._far_active:
            self._since_far_s = 0.0
        else:
            self._since_far_s += seconds
        if self._since_far_s > self._window_s:
            self._hold_left_s = 0.0
            return cleaned
        self._far_heard_s += seconds
        self._echo_levels.append(near_db)
        loud_echo = float(np.percentile(self._echo_levels, 90))
        loud = near_db >= loud_echo - self._loudness
        double_talk = loud and near_db - out_db < self._double_talk
        if not double_talk:
            self._double_talk_s = 0.0
        if not self._converged:
            if loud:
                self._removed.append(near_db - out_db)
            self._converged = self._far_heard_s >= self._max_warmup_s or (
                self._far_heard_s >= self._min_warmup_s
                and len(self._removed) == self._removed.maxlen
                and statistics.median(self._removed) >= self._converged_db
            )
        elif double_talk:
            # Speech goes on; a leftover of the echo comes in short bursts.
            self._double_talk_s += seconds
        if self._converged and self._double_talk_s >= self._confirm_s:
            self._hold_left_s = self._hold_s
            self.double_talk_blocks += 1
            return cleaned
        if self._converged and self._hold_left_s > 0:
            self._hold_left_s -= seconds
            return cleaned
        self.echo_blocks += 1
        floor = float(np.percentile(self._quiet_levels, 10))
        if out_db <= floor:
            return cleaned
        gain = 10 ** ((floor - out_db) / 20)
        x = np.frombuffer(cleaned, "<i2").astype(np.float64) * gain
        return x.astype("<i2").tobytes()

    def reset(self) -> None:
        self._since_far_s = float("inf")
        self._far_heard_s = 0.0
        self._hold_left_s = 0.0
        self._double_talk_s = 0.0
        self._converged = False
        self._removed.clear()
        self._echo_levels.clear()
        self._quiet_levels.clear()


@dataclass(frozen=True, slots=True)
class EchoPathStatistics:
    far_blocks: int  # speaker blocks received
    near_blocks: int  # microphone blocks processed
    cancelled_blocks: int  # microphone blocks that had a far-end reference
    reanchors: int  # times the far-end time mapping was moved (drift, underruns)
    echo_blocks: int  # blocks the residual gate attenuated as echo
    double_talk_blocks: int  # blocks it passed as near-end speech over far-end audio
    busy_ns: int  # time spent in the canceller and the gate


class EchoPath:
    """The far-end reference and the canceller between a speaker and a microphone.

    Args:
        canceller: the echo canceller (called from the microphone's thread only).
        sample_rate: the microphone's (and the canceller's) rate in Hz.
        history_ms: how much far-end audio is kept for lookup (bounds memory
            and the largest device latency that can be aligned).
        reanchor_ms: a speaker time stamp further than this from the mapping
            moves it at once.
        smoothing: the share of each time stamp's disagreement with the
            mapping taken up per block (0.05: jitter averaged over ~20 blocks;
            a 0.1 % drift followed with a lag under 0.5 ms).
        residual_gate: the gate after the canceller (default: a
            :class:`ResidualEchoGate` with its defaults).
        gate_residual: ``False`` for no gate (measurements).

    Raises:
        ValueError: unsupported rate, or non-positive ``history_ms``.

    Thread-safe: :meth:`played` and :meth:`captured` may run on different threads.
    """

    def __init__(
        self,
        canceller: EchoCanceller,
        sample_rate: int = 16000,
        *,
        history_ms: int = 2000,
        reanchor_ms: float = 20.0,
        smoothing: float = 0.05,
        residual_gate: ResidualEchoGate | None = None,
        gate_residual: bool = True,
    ) -> None:
        self._rate = check_rate(sample_rate)
        if history_ms <= 0:
            raise ValueError("history_ms must be positive")
        self._canceller = canceller
        self._gate = residual_gate or (ResidualEchoGate() if gate_residual else None)
        self._max = sample_rate * history_ms // 1000 * 2
        self._tolerance = reanchor_ms / 1000
        self._smoothing = smoothing
        self._lock = threading.Lock()
        self._resampler: Resampler | None = None
        self._quality: Quality = "HQ"
        self._far = bytearray()
        self._far_start = 0  # history position of self._far[0]
        self._far_base = 0  # history position of the resampler's first output
        self._far_in = 0  # samples the resampler has taken in
        self._anchor: tuple[int, float] | None = None  # (position, device time)
        self._near_pts = 0
        self._far_blocks = 0
        self._near_blocks = 0
        self._cancelled = 0
        self._reanchors = 0
        self._busy_ns = 0

    @property
    def sample_rate(self) -> int:
        return self._rate

    def played(self, pcm: bytes, sample_rate: int, at: float) -> None:
        """The speaker handed ``pcm`` to the device (its callback thread).

        Args:
            pcm: exactly the block given to the device, silence included.
            sample_rate: the speaker's rate.
            at: device time (seconds) when its first sample reaches the DAC.

        Raises:
            ValueError: odd byte count or unsupported rate.
        """
        pcm = check_pcm(pcm)
        with self._lock:
            if self._resampler is None or self._resampler.in_rate != sample_rate:
                self._resampler = Resampler(sample_rate, self._rate, self._quality)
                self._far_base = self._far_start + len(self._far) // 2
                self._far_in = 0
            # The block's position counts the resampler's input, not its
            # output: soxr releases output in bursts, the input is exact.
            position = self._far_base + self._far_in * self._rate // sample_rate
            self._far_in += len(pcm) // 2
            pcm = self._resampler.process(pcm)
            if self._anchor is None:
                self._anchor = (position, at)
            else:
                expected = self._anchor[1] + (position - self._anchor[0]) / self._rate
                error = at - expected
                if abs(error) > self._tolerance:
                    self._anchor = (position, at)
                    self._reanchors += 1
                else:
                    self._anchor = (position, expected + self._smoothing * error)
            self._far += pcm
            excess = len(self._far) - self._max
            if excess > 0:
                del self._far[:excess]
                self._far_start += excess // 2
            self._far_blocks += 1

    def _far_at(self, at: float, samples: int) -> bytes | None:
        with self._lock:
            if self._anchor is None:
                return None
            position, anchor_time = self._anchor
            start = position + round((at - anchor_time) * self._rate) - self._far_start
            end = start + samples
            held = len(self._far) // 2
            lo, hi = max(start, 0), min(end, held)
            if lo >= hi:
                return None
            piece = bytes(self._far[lo * 2 : hi * 2])
        return bytes((lo - start) * 2) + piece + bytes((end - hi) * 2)

    def captured(self, pcm: bytes, at: float) -> bytes:
        """Cancel the echo in a microphone block (its callback thread).

        Args:
            pcm: the block at :attr:`sample_rate`, a whole number of 10 ms.
            at: device time (seconds) when its first sample was captured.

        Returns:
            The cleaned block, same length.

        Raises:
            ValueError: odd byte count, or a length the canceller rejects.
        """
        pcm = check_pcm(pcm)
        samples = len(pcm) // 2
        far_pcm = self._far_at(at, samples)
        near = AudioFrame(pcm=pcm, sample_rate=self._rate, pts=self._near_pts)
        far = (
            None
            if far_pcm is None
            else AudioFrame(pcm=far_pcm, sample_rate=self._rate, pts=self._near_pts)
        )
        started = time.perf_counter_ns()
        out = self._canceller.process(near, far).pcm
        if self._gate is not None:
            out = self._gate.process(pcm, out, far_pcm, samples / self._rate)
        self._busy_ns += time.perf_counter_ns() - started
        self._near_pts += samples
        self._near_blocks += 1
        if far is not None:
            self._cancelled += 1
        return out

    def reset(self) -> None:
        """Forget the far-end history and the canceller's echo path."""
        with self._lock:
            self._far.clear()
            self._far_start = 0
            self._anchor = None
            self._resampler = None
        self._canceller.reset()
        if self._gate is not None:
            self._gate.reset()

    def statistics(self) -> EchoPathStatistics:
        with self._lock:
            far_blocks, reanchors = self._far_blocks, self._reanchors
        gate = self._gate
        return EchoPathStatistics(
            far_blocks, self._near_blocks, self._cancelled, reanchors,
            gate.echo_blocks if gate else 0, gate.double_talk_blocks if gate else 0,
            self._busy_ns,
        )  # fmt: skip
