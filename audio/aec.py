"""Acoustic echo cancellation with WebRTC's audio processing module (AEC3).

The binding is the ``livekit`` package (Apache-2.0), whose
``rtc.AudioProcessingModule`` wraps WebRTC's APM: echo cancellation (AEC3,
with its own delay estimator and residual-echo suppressor), a high-pass filter,
noise suppression and gain control. It is an optional dependency (the ``aec``
extra); :func:`available` says whether it is installed, and
:class:`WebRtcEchoCanceller` raises :class:`EchoCancellerUnavailable` with the
install hint when it is not.

The APM works on exactly 10 ms frames: :meth:`WebRtcEchoCanceller.process`
takes any whole number of 10 ms (a 20 ms microphone frame is two), feeds each
far-end (reverse) piece before its near-end piece, and returns the cleaned
near-end frame with the same timestamp. It runs about 0.1 ms per 10 ms on this
class of machine (``benchmarks/aec.py``), and is meant to run on the audio
device's callback thread (see :class:`audio.echo.EchoPath`), not on the event
loop.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Final

from audio.echo import EchoPath
from audio.frame import AudioFrame

SUPPORTED_RATES: Final = (8000, 16000, 32000, 48000)
INSTALL_HINT: Final = "echo cancellation needs the aec extra: pip install 'voxloop[aec]'"


class EchoCancellerUnavailable(RuntimeError):
    """The WebRTC audio processing binding (``livekit``) is not installed."""


def available() -> bool:
    """Whether :class:`WebRtcEchoCanceller` can be created (the ``aec`` extra is installed).

    Imports the binding (it loads a native library) to be sure.
    """
    try:
        _rtc()
    except EchoCancellerUnavailable:
        return False
    return True


def _rtc() -> Any:
    try:
        from livekit import rtc
    except (ImportError, OSError):  # not installed, or its native library does not load
        raise EchoCancellerUnavailable(INSTALL_HINT) from None
    return rtc


@dataclass(frozen=True, slots=True)
class CancellerStatistics:
    frames: int  # 10 ms near-end frames processed
    far_frames: int  # 10 ms far-end frames that carried audio (not silence)
    busy_ns: int  # time spent in the APM


class WebRtcEchoCanceller:
    """WebRTC AEC3 behind :class:`audio.echo.EchoCanceller`.

    Args:
        sample_rate: rate of both signals: 8000, 16000, 32000 or 48000 Hz.
        noise_suppression: also run WebRTC's noise suppressor on the near end.
        high_pass_filter: remove DC and rumble from the near end (on by default).

    Raises:
        EchoCancellerUnavailable: the ``aec`` extra is not installed.
        ValueError: unsupported rate.

    The caller aligns the far end with the near end from the devices' reported
    latencies (:class:`audio.echo.EchoPath`); AEC3's delay estimator finds
    what remains (the acoustic path and misreported latency; measured up to
    300 ms in ``benchmarks/aec.py``).

    Not thread-safe: call :meth:`process` from one thread at a time.
    """

    def __init__(
        self,
        sample_rate: int = 16000,
        *,
        noise_suppression: bool = False,
        high_pass_filter: bool = True,
    ) -> None:
        if sample_rate not in SUPPORTED_RATES:
            raise ValueError(f"sample_rate must be one of {SUPPORTED_RATES}, got {sample_rate!r}")
        self._rtc = _rtc()
        self._rate = sample_rate
        self._chunk = sample_rate // 100
        self._options = {
            "echo_cancellation": True,
            "noise_suppression": noise_suppression,
            "high_pass_filter": high_pass_filter,
        }
        self._silence = bytes(self._chunk * 2)
        self._frames = 0
        self._far_frames = 0
        self._busy_ns = 0
        self._apm = self._new_apm()

    def _new_apm(self) -> Any:
        return self._rtc.AudioProcessingModule(**self._options)

    @property
    def sample_rate(self) -> int:
        return self._rate

    def process(self, near: AudioFrame, far: AudioFrame | None) -> AudioFrame:
        """Cancel the echo of ``far`` in ``near``.

        Args:
            near: microphone frame, a whole number of 10 ms at :attr:`sample_rate`.
            far: what the speaker played during the same interval (same length
                and rate), or ``None`` when nothing was played.

        Returns:
            The cleaned microphone frame (same ``pts`` and length).

        Raises:
            ValueError: wrong rate, not a whole number of 10 ms, or lengths differ.
        """
        if near.sample_rate != self._rate:
            raise ValueError(f"near-end rate {near.sample_rate} != {self._rate}")
        step = self._chunk * 2
        if len(near.pcm) % step:
            raise ValueError("the near-end frame must be a whole number of 10 ms")
        if far is not None and (far.sample_rate != self._rate or len(far.pcm) != len(near.pcm)):
            raise ValueError("the far-end frame must match the near-end frame's rate and length")
        rtc = self._rtc
        out = bytearray()
        started = time.perf_counter_ns()
        for i in range(0, len(near.pcm), step):
            far_pcm = self._silence if far is None else far.pcm[i : i + step]
            if far_pcm != self._silence:
                self._far_frames += 1
            reverse = rtc.AudioFrame(bytearray(far_pcm), self._rate, 1, self._chunk)
            self._apm.process_reverse_stream(reverse)
            piece = bytearray(near.pcm[i : i + step])
            self._apm.process_stream(rtc.AudioFrame(piece, self._rate, 1, self._chunk))
            out += piece
            self._frames += 1
        self._busy_ns += time.perf_counter_ns() - started
        return AudioFrame(pcm=bytes(out), sample_rate=self._rate, pts=near.pts)

    def reset(self) -> None:
        """Forget the learned echo path (a new device or a new conversation)."""
        self._apm = self._new_apm()

    def statistics(self) -> CancellerStatistics:
        return CancellerStatistics(self._frames, self._far_frames, self._busy_ns)


def echo_path(sample_rate: int = 16000) -> EchoPath:
    """What live mode uses: AEC3 with the high-pass filter and noise suppression,
    and the residual-echo gate (:class:`audio.echo.ResidualEchoGate`).

    Noise suppression keeps the noise floor steady: without it the echo
    suppressor pumps background noise up and down, and a VAD that tracks the
    noise floor then takes the noise for speech.

    Raises:
        EchoCancellerUnavailable: the ``aec`` extra is not installed.
    """
    return EchoPath(WebRtcEchoCanceller(sample_rate, noise_suppression=True), sample_rate)
