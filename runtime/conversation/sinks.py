"""Where agent audio goes: the sink port and a real-time timeline sink for file mode.

A sink plays audio in real time and reports its playout position, so the core
knows what the user actually heard. :class:`audio.devices.Speaker` is a sink;
:class:`TimelineSink` is a virtual one that "plays" against the event loop's
clock and records exactly what a listener would have heard on a timeline
(cleared audio is cut where it was cut).
"""

from __future__ import annotations

import asyncio
from typing import Protocol

from audio.frame import check_pcm, check_rate


class AudioSink(Protocol):
    @property
    def sample_rate(self) -> int: ...

    @property
    def played_samples(self) -> int:
        """Samples written so far that have been played (never decreases)."""

    async def write(self, pcm: bytes) -> None:
        """Queue audio; may wait (backpressure)."""

    def clear_buffer(self) -> int:
        """Drop what has not been played yet; returns the samples dropped."""

    async def wait_for_playout(self) -> None:
        """Wait until everything written has been played."""


class TimelineSink:
    """A virtual speaker paced by the loop clock, recording a timeline.

    Args:
        sample_rate: playback rate.
        t0: loop time (``loop.time()``) of timeline position 0.
        high_water_ms: :meth:`write` waits while more than this is queued.
    """

    def __init__(self, sample_rate: int, t0: float, *, high_water_ms: int = 300) -> None:
        self._rate = check_rate(sample_rate)
        self._t0 = t0
        self._high = sample_rate * high_water_ms // 1000
        self.timeline = bytearray()
        self._end = 0  # timeline position (samples) where queued audio ends
        self._written = 0

    @property
    def sample_rate(self) -> int:
        return self._rate

    def _now_pos(self) -> int:
        return int((asyncio.get_running_loop().time() - self._t0) * self._rate)

    @property
    def played_samples(self) -> int:
        return self._written - max(0, self._end - self._now_pos())

    @property
    def queued_samples(self) -> int:
        return max(0, self._end - self._now_pos())

    async def write(self, pcm: bytes) -> None:
        pcm = check_pcm(pcm)
        # A timer, not polling: each sleep lasts exactly until enough has played.
        while self._end - self._now_pos() > self._high:  # noqa: ASYNC110
            await asyncio.sleep((self._end - self._now_pos() - self._high) / self._rate)
        start = max(self._end, self._now_pos())
        end = start + len(pcm) // 2
        if len(self.timeline) < end * 2:
            self.timeline += bytes(end * 2 - len(self.timeline))
        self.timeline[start * 2 : end * 2] = pcm
        self._end = end
        self._written += len(pcm) // 2

    def clear_buffer(self) -> int:
        now = self._now_pos()
        if self._end <= now:
            return 0
        dropped = self._end - now
        del self.timeline[now * 2 :]
        self._written -= dropped
        self._end = now
        return dropped

    async def wait_for_playout(self) -> None:
        while (remaining := self._end - self._now_pos()) > 0:  # noqa: ASYNC110
            await asyncio.sleep(remaining / self._rate)

    def audio(self, total_samples: int | None = None) -> bytes:
        """The recorded timeline, padded with silence to ``total_samples``."""
        data = bytes(self.timeline)
        if total_samples is not None and len(data) < total_samples * 2:
            data += bytes(total_samples * 2 - len(data))
        return data


class ImmediateSink:
    """Plays everything the moment it is written (offline rendering, batch jobs).

    The playout position always equals what was written, so nothing is ever
    "unheard" and :meth:`clear_buffer` drops nothing.
    """

    def __init__(self, sample_rate: int) -> None:
        self._rate = check_rate(sample_rate)
        self.audio = bytearray()

    @property
    def sample_rate(self) -> int:
        return self._rate

    @property
    def played_samples(self) -> int:
        return len(self.audio) // 2

    async def write(self, pcm: bytes) -> None:
        self.audio += check_pcm(pcm)
        await asyncio.sleep(0)

    def clear_buffer(self) -> int:
        return 0

    async def wait_for_playout(self) -> None:
        await asyncio.sleep(0)
