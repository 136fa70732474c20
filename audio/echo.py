"""Keeping the agent from hearing itself (laptop mode).

Two pieces:

* :class:`HalfDuplexGate` — reliable and free: while the agent's audio is
  playing (and for ``tail_ms`` after, for the room's echo to die down),
  microphone frames are replaced by silence, so neither the VAD nor the STT
  hears the agent. The cost is that the user cannot barge in by voice while
  the agent speaks on open speakers; use headphones (or an echo canceller) to
  keep barge-in.
* :class:`EchoCanceller` — the interface a real acoustic echo canceller
  plugs into: it sees the far-end (speaker) signal and the near-end
  (microphone) signal and returns the cleaned microphone signal.
  :class:`NoEchoCancellation` is the pass-through default.
"""

from __future__ import annotations

from typing import Protocol

from audio.frame import AudioFrame


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
