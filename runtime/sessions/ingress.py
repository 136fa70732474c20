"""Audio in at the edge: wire bytes → 16 kHz 20 ms frames, bounded, released in real time."""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import AsyncIterator
from typing import Final

from audio.frame import AudioFrame
from audio.g711 import alaw_decode, ulaw_decode
from audio.reframe import Reframer
from audio.resample import Resampler
from runtime.conversation.session import RATE
from runtime.protocol import events as ev

FRAME_MS: Final = 20


class AudioIngress:
    """Client audio → 16 kHz 20 ms frames, bounded and released in real time.

    Args:
        fmt: the input encoding.
        capacity_ms: audio held ahead of real time; beyond it the oldest is dropped.
    """

    def __init__(self, fmt: ev.AudioFormat, capacity_ms: int) -> None:
        self._frames: collections.deque[AudioFrame] = collections.deque(
            maxlen=max(1, capacity_ms // FRAME_MS)
        )
        self._arrived = asyncio.Event()
        self.dropped_frames = 0
        self.received_samples = 0
        self._pts = 0
        self.set_format(fmt)

    def set_format(self, fmt: ev.AudioFormat) -> None:
        self._format = fmt
        self._carry = b""
        self._resampler = Resampler(fmt.sample_rate, RATE)
        self._reframer = Reframer(RATE, FRAME_MS)

    @property
    def received_seconds(self) -> float:
        return self.received_samples / self._format.sample_rate

    def feed(self, data: bytes) -> int:
        """Decode and queue one ``input.audio`` payload; returns frames dropped (0: fine)."""
        if self._format.encoding == "audio/pcmu":
            pcm = ulaw_decode(data)
        elif self._format.encoding == "audio/pcma":
            pcm = alaw_decode(data)
        else:
            # A sample may straddle two messages: keep the odd byte for the next one.
            data = self._carry + data
            cut = len(data) - len(data) % 2
            pcm, self._carry = data[:cut], data[cut:]
        self.received_samples += len(pcm) // 2
        dropped = 0
        for frame in self._reframer.process(self._resampler.process(pcm)):
            if len(self._frames) == self._frames.maxlen:
                dropped += 1
            self._frames.append(frame)
        self.dropped_frames += dropped
        self._arrived.set()
        return dropped

    async def frames(self) -> AsyncIterator[AudioFrame]:
        """Frames in real time; silence fills in when the client falls silent."""
        loop = asyncio.get_running_loop()
        step = FRAME_MS / 1000
        due: float | None = None
        silent = bytes(RATE * FRAME_MS // 1000 * 2)
        while True:
            now = loop.time()
            if self._frames:
                frame = self._frames.popleft()
                if due is None or due < now - 0.2:
                    due = now  # first audio, or the client fell behind: re-anchor
                if due > now:
                    await asyncio.sleep(due - now)
                due += step
                self._pts = frame.end_pts
                yield frame
                continue
            self._arrived.clear()
            if due is None:
                await self._arrived.wait()
                continue
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, due + 0.2 - now)):
                    await self._arrived.wait()
                    continue
            # Nothing arrived for 200 ms past due: the line is silent.
            frame = AudioFrame(pcm=silent, sample_rate=RATE, pts=self._pts)
            self._pts = frame.end_pts
            due = loop.time() + step
            yield frame
