"""A simulated laptop: the agent's voice travels from the speaker to the microphone.

For tests and benchmarks of echo cancellation without a sound card. What the
speaker plays goes through, in order:

1. loudspeaker nonlinearity (``tanh(drive * x) / drive``: unity gain for
   quiet sounds, loud peaks compressed; ``drive`` 1 is mild);
2. the speaker's clock running ``drift`` faster (positive) or slower than the
   microphone's (a resampling by ``1 + drift``), together with the change of
   rate from the speaker's to the microphone's;
3. a room impulse response (:func:`synthetic_rir`: a direct path, early
   reflections and an exponentially decaying diffuse tail, seeded);
4. a delay (``delay_ms``) the devices do not report;

and is added to what else reaches the microphone (the user's voice) together
with background noise (``noise_dbfs``, seeded). Everything is deterministic
for a given :class:`RoomConfig`.

The speaker's clock drift means it plays ``1 + drift`` times as many samples
per second of the microphone's clock: feed :meth:`EchoRoom.play` that much
more audio per block than the nominal rate (see :mod:`runtime.echo_sim`),
and the echo keeps pace with the microphone. Should the delay line ever run
dry (less audio played than that), the echo resumes after a gap of silence,
as after an underrun in a real device.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import soxr

from audio.frame import check_pcm, check_rate

FloatArray = npt.NDArray[np.float64]


@dataclass(frozen=True, slots=True, kw_only=True)
class RoomConfig:
    """One acoustic condition.

    Attributes:
        delay_ms: extra delay from the speaker to the microphone (not reported).
        rt60_s: reverberation time of the synthetic room.
        echo_db: level of the echo relative to what was played (dB).
        drive: loudspeaker nonlinearity; 0 is linear, 1 is mild (a full-scale
            peak comes out 2.4 dB lower).
        noise_dbfs: background noise level at the microphone (dBFS RMS),
            ``None`` for none.
        drift: speaker clock relative to the microphone clock (0.001 = +0.1 %).
        seed: seeds the room response and the noise.
    """

    delay_ms: float = 60.0
    rt60_s: float = 0.25
    echo_db: float = -6.0
    drive: float = 1.0
    noise_dbfs: float | None = -60.0
    drift: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.delay_ms < 0 or self.rt60_s <= 0 or self.drive < 0:
            raise ValueError("delay_ms and drive must not be negative; rt60_s must be positive")
        if abs(self.drift) >= 0.01:
            raise ValueError("drift must be within ±1 %")


def synthetic_rir(sample_rate: int, rt60_s: float, seed: int) -> FloatArray:
    """A room impulse response of unit energy.

    A direct path, five early reflections within 2 to 20 ms, and a diffuse tail
    of Gaussian noise decaying by 60 dB over ``rt60_s``.

    Raises:
        ValueError: unsupported rate or non-positive ``rt60_s``.
    """
    check_rate(sample_rate)
    if rt60_s <= 0:
        raise ValueError("rt60_s must be positive")
    rng = np.random.default_rng(seed)
    n = int(rt60_s * sample_rate)
    t = np.arange(n) / sample_rate
    h = 0.3 * rng.standard_normal(n) * np.exp(-6.9 * t / rt60_s)
    h[0] = 1.0
    for _ in range(5):
        at = int(rng.uniform(0.002, 0.02) * sample_rate)
        h[at] += rng.uniform(-0.6, 0.6)
    result: FloatArray = h / np.sqrt(np.sum(h**2))
    return result


class EchoRoom:
    """The echo path from a speaker to a microphone, streaming.

    Args:
        config: the acoustic condition.
        speaker_rate: rate of what :meth:`play` receives.
        mic_rate: rate of what :meth:`capture` returns.

    Raises:
        ValueError: unsupported rates.
    """

    def __init__(self, config: RoomConfig, *, speaker_rate: int, mic_rate: int = 16000) -> None:
        self.config = config
        self._speaker_rate = check_rate(speaker_rate)
        self._mic_rate = check_rate(mic_rate)
        self._rir = synthetic_rir(mic_rate, config.rt60_s, config.seed) * 10 ** (
            config.echo_db / 20
        )
        self._resampler = soxr.ResampleStream(
            speaker_rate * (1 + config.drift), mic_rate, 1, dtype="float64", quality="HQ"
        )
        self._tail: FloatArray = np.zeros(len(self._rir) - 1)
        self._fifo: FloatArray = np.zeros(int(config.delay_ms * mic_rate / 1000))
        self._noise_rng = np.random.default_rng(config.seed + 1)
        self._spectra: dict[int, npt.NDArray[np.complex128]] = {}
        self.underruns = 0

    def play(self, pcm: bytes) -> None:
        """The speaker played ``pcm`` (PCM16 at the speaker's rate).

        Raises:
            ValueError: odd byte count.
        """
        x = np.frombuffer(check_pcm(pcm), "<i2").astype(np.float64) / 32768
        drive = self.config.drive
        if drive > 0:
            x = np.tanh(drive * x) / drive
        y = self._resampler.resample_chunk(x, last=False)
        if len(y):
            self._fifo = np.concatenate([self._fifo, self._convolve(y)])

    def _convolve(self, x: FloatArray) -> FloatArray:
        m = len(self._rir)
        n = len(x) + m - 1
        size = 1 << (n - 1).bit_length()
        spectrum = self._spectra.get(size)
        if spectrum is None:
            spectrum = self._spectra[size] = np.fft.rfft(self._rir, size)
        full = np.fft.irfft(np.fft.rfft(x, size) * spectrum, size)[:n]
        full[: m - 1] += self._tail
        self._tail = full[len(x) :].copy()
        out: FloatArray = full[: len(x)]
        return out

    def echo(self, samples: int) -> FloatArray:
        """The next ``samples`` of echo at the microphone (float, full scale 1.0)."""
        take = min(samples, len(self._fifo))
        out = np.zeros(samples)
        out[:take] = self._fifo[:take]
        self._fifo = self._fifo[take:]
        if take < samples:
            self.underruns += 1
        return out

    def capture(self, near: bytes) -> bytes:
        """What the microphone records: ``near`` (PCM16, the user) plus echo and noise.

        Raises:
            ValueError: odd byte count.
        """
        user = np.frombuffer(check_pcm(near), "<i2").astype(np.float64) / 32768
        mixed = user + self.echo(len(user))
        if self.config.noise_dbfs is not None:
            level = 10 ** (self.config.noise_dbfs / 20)
            mixed += level * self._noise_rng.standard_normal(len(user))
        return (np.clip(mixed, -1.0, 32767 / 32768) * 32768).astype("<i2").tobytes()
