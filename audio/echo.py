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

import threading
import time
import warnings
from collections import deque
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import numpy.typing as npt

from audio.frame import AudioFrame, check_pcm, check_rate
from audio.resample import Quality, Resampler
from audio.vad import frame_level_db

Floats = npt.NDArray[np.float64]


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
    the room, and in bursts after (what a loudspeaker driven into distortion
    adds, the room's reverberation), some echo remains, which a VAD calls
    speech. This gate decides, per block, whether there is near-end speech (the
    user) in it, from what the far end (the reference) can explain:

    * Per band (``bands`` mel-spaced bands up to 7.6 kHz), the echo the far end
      can cause now is predicted from the reference: its band powers at the
      echo path's delay (estimated by correlating the microphone's band
      envelopes with the reference's at every lag up to ``max_delay_ms``;
      the whole range until it is known), with a reverberation tail
      decaying at ``rt60_ms``.
    * What the echo path does to that, per band, is learned from the
      far-end-only blocks of the last ``learn_ms``: a high percentile
      (``percentile``) of microphone / predicted (the room's gain) and of
      cleaned / predicted (what the canceller leaves; high while it learns,
      low once it has converged). Until enough has been seen both are taken
      as large (nothing is explained away).
    * A block has near-end speech when energy the far end cannot explain
      (more than ``margin_db`` above the learned bound) makes up at least
      ``share`` of the block's energy and is ``audible_db`` above the noise
      floor: in the microphone's signal; or in the canceller's output, when
      the microphone too holds audible energy (at least ``mic_share`` of it)
      above what the room's gain explains (what a distorting speaker leaves
      can exceed what the canceller usually leaves, not what the room makes).
      Until ``converge_ms`` of far-end audio the room's bound is
      ``early_margin_db`` wider, and until ``learn_ms / 2`` of the canceller's
      output was learned its bound is ``early_left_margin_db`` wider.

    A block with near-end speech for ``confirm_ms`` in a row passes (the
    canceller's output), and so do the next ``hold_ms`` (word endings); so
    does everything while no far-end audio was heard for ``window_ms``.
    Everything else is echo: scaled down to the noise floor of the cleaned
    signal (never below it, so the VAD's own noise-floor tracking is not
    disturbed). The price: a user much quieter at the microphone than the echo
    cannot interrupt by voice until the canceller has converged.

    Args:
        window_ms: how long far-end audio counts as possibly audible.
        max_delay_ms: the longest echo path delay looked for (beyond what
            the devices report).
        rt60_ms: the reverberation assumed in the prediction (longer is safer).
        learn_ms: how much far-end audio the gains are learned from.
        min_learn_ms: far-end audio needed before the room's gain is used.
        converge_ms: far-end audio needed before what the canceller leaves is
            used (it is learned from the second half of that on).
        percentile: the gains' percentile over that audio (100: the largest).
        margin_db: how far above the learned bound energy counts as unexplained.
        early_margin_db, early_left_margin_db: the wider margins while learning.
        share: the unexplained share of a block's energy that makes it speech.
        mic_share: the share the microphone must hold too, for the canceller's
            output to count.
        audible_db: how far above the noise floor the unexplained energy must be.
        hold_ms: blocks passed after near-end speech.
        confirm_ms: how long near-end speech must last before the block passes.
        far_active_dbfs: far-end level that counts as audio.
        bands: number of bands.

    Raises:
        ValueError: a negative duration or an out-of-range setting.

    Blocks must keep one length (a reset starts over when it changes).
    About 0.2-0.3 ms per 20 ms block (numpy; ``benchmarks/aec.py``).
    """

    def __init__(
        self,
        *,
        window_ms: int = 1000,
        max_delay_ms: int = 500,
        rt60_ms: int = 600,
        learn_ms: int = 5000,
        min_learn_ms: int = 500,
        converge_ms: int = 3000,
        percentile: float = 100.0,
        margin_db: float = 3.0,
        early_margin_db: float = 3.0,
        early_left_margin_db: float = 6.0,
        share: float = 0.2,
        mic_share: float = 0.0,
        audible_db: float = 10.0,
        hold_ms: int = 200,
        confirm_ms: int = 40,
        far_active_dbfs: float = -50.0,
        bands: int = 18,
    ) -> None:
        if min(window_ms, max_delay_ms, rt60_ms, learn_ms, min_learn_ms, hold_ms, confirm_ms) < 0:
            raise ValueError("durations must not be negative")
        if not 0 < percentile <= 100 or not 0 < share <= 1 or not 0 <= mic_share <= 1 or bands < 2:
            raise ValueError(
                "percentile must be in (0, 100], share in (0, 1], mic_share in [0, 1], bands >= 2"
            )
        self._window_s = window_ms / 1000
        self._max_delay_s = max_delay_ms / 1000
        self._rt60_s = rt60_ms / 1000
        self._learn_s = learn_ms / 1000
        self._min_learn_s = min_learn_ms / 1000
        self._converge_s = converge_ms / 1000
        self._percentile = percentile
        self._margin = 10 ** (margin_db / 10)
        self._early = 10 ** (early_margin_db / 10)
        self._early_left = 10 ** (early_left_margin_db / 10)
        self._share = share
        self._mic_share = mic_share
        self._audible = 10 ** (audible_db / 10)
        self._hold_s = hold_ms / 1000
        self._confirm_s = confirm_ms / 1000
        self._far_active = far_active_dbfs
        self._bands = bands
        self._block = 0  # samples per block the state was built for
        self.echo_blocks = 0
        self.double_talk_blocks = 0
        self.reset()

    def reset(self) -> None:
        """Forget everything learned (a new device or a new conversation)."""
        self._block = 0
        self._since_far_s = float("inf")
        self._hold_left_s = 0.0
        self._evidence_s = 0.0
        self._levels: deque[float] = deque(maxlen=500)  # cleaned block levels (dBFS)

    def _setup(self, samples: int, seconds: float) -> None:
        rate = samples / seconds
        self._block = samples
        self._window = np.hanning(samples)
        freqs = np.fft.rfftfreq(samples, 1 / rate)
        mel = np.linspace(_mel(125.0), _mel(min(7600.0, rate / 2 * 0.95)), self._bands + 1)
        edges = 700 * (10 ** (mel / 2595) - 1)
        index = np.searchsorted(edges, freqs, side="right") - 1
        index[(freqs < edges[0]) | (freqs >= edges[-1])] = -1
        self._band_of = index
        self._lags = max(1, int(np.ceil(self._max_delay_s / seconds))) + 2
        self._far_history: deque[Floats] = deque(
            [np.zeros(self._bands)] * self._lags, maxlen=self._lags
        )
        self._log_far: deque[Floats] = deque(
            [np.zeros(self._bands)] * self._lags, maxlen=self._lags
        )
        self._xcorr = np.zeros(self._lags)
        self._mean_near = np.zeros(self._bands)
        self._mean_far = np.zeros(self._bands)
        self._delay_updates = 0
        self._decay = 10 ** (-6.0 * seconds / self._rt60_s) if self._rt60_s > 0 else 0.0
        self._predicted = np.zeros(self._bands)
        learn = max(1, round(self._learn_s / seconds))
        self._room: deque[Floats] = deque(maxlen=learn)
        self._left: deque[Floats] = deque(maxlen=learn)
        self._trusted_left = learn // 2
        self._min_learned = max(1, round(self._min_learn_s / seconds))
        self._converged_after = max(1, round(self._converge_s / seconds))
        self._learned = 0
        self._gain_room = np.full(self._bands, np.inf)
        self._gain_left = np.full(self._bands, np.inf)
        quiet = max(1, round(5.0 / seconds))
        self._quiet_near: deque[Floats] = deque(maxlen=quiet)
        self._quiet_clean: deque[Floats] = deque(maxlen=quiet)
        self._heard_quiet = False  # a block without far-end audio (else the floors are guessed)
        self._floor_near = np.zeros(self._bands)
        self._floor_clean = np.zeros(self._bands)
        self._count = 0

    def _powers(self, pcm: bytes) -> Floats:
        x = np.frombuffer(pcm, "<i2").astype(np.float64) / 32768
        spectrum = np.abs(np.fft.rfft(x * self._window)) ** 2
        keep = self._band_of >= 0
        powers = np.bincount(self._band_of[keep], spectrum[keep], minlength=self._bands)
        return np.asarray(powers, dtype=np.float64)

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
        samples = len(near) // 2
        if samples != self._block:
            self.reset()
            self._setup(samples, seconds)
        out_db = frame_level_db(cleaned)
        self._levels.append(out_db)
        n, e = self._powers(near), self._powers(cleaned)
        active = far is not None and frame_level_db(far) >= self._far_active
        f = self._powers(far) if active and far is not None else np.zeros(self._bands)
        self._far_history.appendleft(f)
        self._log_far.appendleft(np.log(f + 1e-12))
        self._count += 1
        if self._count % 10 == 1:
            self._update_noise_floor()
            self._floor_db = float(np.percentile(self._levels, 10))
        self._since_far_s = 0.0 if active else self._since_far_s + seconds
        if self._since_far_s > self._window_s:
            if not self._heard_quiet:
                self._quiet_near.clear()
                self._quiet_clean.clear()
                self._heard_quiet = True
            self._quiet_near.append(n)
            self._quiet_clean.append(e)
            self._hold_left_s = self._evidence_s = 0.0
            return cleaned
        if not self._heard_quiet:
            # The agent spoke first (a greeting): until a quiet moment, the floors are
            # taken from everything heard, the gaps between its words (too high: safe).
            self._quiet_near.append(n)
            self._quiet_clean.append(e)
        predicted = self._predict(n, active)
        # The room's gain is trusted fully once ``converge_ms`` went into it, and
        # what the canceller leaves once half of ``learn_ms`` did.
        early = self._early if self._learned < self._converged_after else 1.0
        late = self._early_left if len(self._left) < self._trusted_left else 1.0
        # The microphone alone, or what the canceller left when the microphone also
        # holds a little the room cannot explain (a leftover of a distorting speaker
        # is more than the canceller usually leaves, but no more than the room makes).
        evidence = self._unexplained(n, predicted, early * self._gain_room, self._floor_near) or (
            self._unexplained(e, predicted, late * self._gain_left, self._floor_clean)
            and self._unexplained(
                n, predicted, self._gain_room / self._margin, self._floor_near, self._mic_share
            )
        )
        self._evidence_s = self._evidence_s + seconds if evidence else 0.0
        if self._evidence_s >= self._confirm_s:
            self._hold_left_s = self._hold_s
            self.double_talk_blocks += 1
            return cleaned
        if self._hold_left_s > 0:
            self._hold_left_s -= seconds
            return cleaned
        if not evidence:
            self._learn(n, e, predicted)
        self.echo_blocks += 1
        floor = self._floor_db
        if out_db <= floor:
            return cleaned
        gain = 10 ** ((floor - out_db) / 20)
        x = np.frombuffer(cleaned, "<i2").astype(np.float64) * gain
        return x.astype("<i2").tobytes()

    def _predict(self, n: Floats, active: bool) -> Floats:
        history = np.array(self._far_history)  # (lags, bands), newest first
        if active:
            # The lag at which the microphone's band envelopes follow the reference's.
            log_near = np.log(n + 1e-12)
            self._mean_near += 0.02 * (log_near - self._mean_near)
            self._mean_far += 0.02 * (self._log_far[0] - self._mean_far)
            logs = np.array(self._log_far) - self._mean_far
            score = logs @ (log_near - self._mean_near)
            self._xcorr += 0.02 * (score - self._xcorr)
            self._delay_updates += 1
        if self._delay_updates >= 50:
            lag = int(np.argmax(self._xcorr))
            now = history[max(0, lag - 1) : lag + 2].max(axis=0)
        else:
            now = history.max(axis=0)
        self._predicted = np.maximum(now, self._decay * self._predicted)
        return self._predicted

    def _unexplained(
        self,
        x: Floats,
        predicted: Floats,
        gain: Floats,
        floor: Floats,
        share: float | None = None,
    ) -> bool:
        bound = np.where(np.isfinite(gain), self._margin * gain * predicted, np.inf)
        excess = np.maximum(x - bound - floor, 0.0)
        total = float(excess.sum())
        share = self._share if share is None else share
        return total >= share * float(x.sum()) and total >= self._audible * max(
            float(floor.sum()), 1e-9
        )

    def _learn(self, n: Floats, e: Floats, predicted: Floats) -> None:
        # Bands where the reference is well above the microphone's noise.
        significant = predicted > 10 * self._floor_near + 1e-12
        if not significant.any():
            return
        with np.errstate(divide="ignore", invalid="ignore"):
            room = np.maximum(n - self._floor_near, 0.0) / predicted
            left = np.maximum(e - self._floor_clean, 0.0) / predicted
            self._room.append(np.where(significant, room, np.nan))
            if self._learned >= self._converged_after // 2:
                # What the canceller leaves while it is still learning is no
                # measure of what it leaves once it has.
                self._left.append(np.where(significant, left, np.nan))
        self._learned += 1
        if len(self._room) >= self._min_learned and self._count % 5 == 0:
            self._gain_room = self._bound(self._room)
            if self._learned >= self._converged_after and self._left:
                self._gain_left = self._bound(self._left)

    def _bound(self, ratios: deque[Floats]) -> Floats:
        x = np.array(ratios)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # bands never significant
            if self._percentile >= 100:
                bound = np.nanmax(x, axis=0)
            else:
                bound = np.nanpercentile(x, self._percentile, axis=0)
        return np.where(np.isnan(bound), np.inf, bound)

    def _update_noise_floor(self) -> None:
        if self._quiet_near:
            self._floor_near = np.percentile(np.array(self._quiet_near), 10, axis=0)
            self._floor_clean = np.percentile(np.array(self._quiet_clean), 10, axis=0)


def _mel(hz: float) -> float:
    return float(2595 * np.log10(1 + hz / 700))


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
