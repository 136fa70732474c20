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
        """Wait until everything written has been played (not while paused)."""

    @property
    def paused(self) -> bool: ...

    def pause(self) -> None:
        """Stop playing where the listener is; what was played stays counted, the rest is held."""

    def resume(self) -> None:
        """Play the held audio from where :meth:`pause` stopped: nothing lost or repeated.

        :meth:`clear_buffer` while paused drops the held audio and ends the pause.
        """


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
        self._held: bytearray | None = None  # audio held by a pause (not on the timeline)
        self._resumed = asyncio.Event()
        self._resumed.set()

    @property
    def sample_rate(self) -> int:
        return self._rate

    def _now_pos(self) -> int:
        return int((asyncio.get_running_loop().time() - self._t0) * self._rate)

    @property
    def played_samples(self) -> int:
        return self._written - self.queued_samples

    @property
    def queued_samples(self) -> int:
        held = len(self._held) // 2 if self._held is not None else 0
        return max(0, self._end - self._now_pos()) + held

    @property
    def paused(self) -> bool:
        return self._held is not None

    def pause(self) -> None:
        if self._held is not None:
            return
        now = self._now_pos()
        self._held = (
            bytearray(self.timeline[now * 2 : self._end * 2]) if self._end > now else (bytearray())
        )
        if self._end > now:
            del self.timeline[now * 2 :]
            self._end = now
        self._resumed.clear()

    def resume(self) -> None:
        held, self._held = self._held, None
        if held is None:
            return
        self._resumed.set()
        if held:
            self._place(bytes(held))

    def _place(self, pcm: bytes) -> None:
        start = max(self._end, self._now_pos())
        end = start + len(pcm) // 2
        if len(self.timeline) < end * 2:
            self.timeline += bytes(end * 2 - len(self.timeline))
        self.timeline[start * 2 : end * 2] = pcm
        self._end = end

    async def write(self, pcm: bytes) -> None:
        pcm = check_pcm(pcm)
        while self._held is not None and len(self._held) > self._high * 2:
            await self._resumed.wait()
        if self._held is not None:
            self._held += pcm
            self._written += len(pcm) // 2
            return
        # A timer, not polling: each sleep lasts exactly until enough has played.
        while self._end - self._now_pos() > self._high:  # noqa: ASYNC110
            await asyncio.sleep((self._end - self._now_pos() - self._high) / self._rate)
        if self._held is not None:  # paused meanwhile
            self._held += pcm
        else:
            self._place(pcm)
        self._written += len(pcm) // 2

    def clear_buffer(self) -> int:
        held, self._held = self._held, None
        self._resumed.set()
        dropped = len(held) // 2 if held is not None else 0
        now = self._now_pos()
        if self._end > now:
            dropped += self._end - now
            del self.timeline[now * 2 :]
            self._end = now
        self._written -= dropped
        return dropped

    async def wait_for_playout(self) -> None:
        while True:
            if self._held is not None:
                await self._resumed.wait()
                continue
            remaining = self._end - self._now_pos()
            if remaining <= 0:
                return
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
    "unheard" and :meth:`clear_buffer` drops nothing; :meth:`pause` only marks it paused.
    """

    def __init__(self, sample_rate: int) -> None:
        self._rate = check_rate(sample_rate)
        self.audio = bytearray()
        self._paused = False

    @property
    def paused(self) -> bool:
        return self._paused

    def pause(self) -> None:
        self._paused = True

    def resume(self) -> None:
        self._paused = False

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
        self._paused = False
        return 0

    async def wait_for_playout(self) -> None:
        await asyncio.sleep(0)
