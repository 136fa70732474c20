"""Audio out at the edge: the wire encoding, and the paced sink whose position is the
playout truth for what the listener heard."""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable, Iterable
from typing import Any

from audio.frame import check_rate
from audio.g711 import alaw_encode, ulaw_encode
from runtime.protocol import events as ev


def wire_encoder(fmt: ev.AudioFormat, volume: float) -> Callable[[bytes], bytes]:
    import numpy as np

    gain = max(0.0, min(100.0, volume)) / 100.0

    def scale(pcm: bytes) -> bytes:
        if gain >= 1.0:
            return pcm
        samples = np.frombuffer(pcm, dtype="<i2").astype(np.float32) * gain
        return bytes(samples.round().astype("<i2").tobytes())

    if fmt.encoding == "audio/pcmu":
        return lambda pcm: ulaw_encode(scale(pcm))
    if fmt.encoding == "audio/pcma":
        return lambda pcm: alaw_encode(scale(pcm))
    return scale


def pacing_fields(lateness_ms: Iterable[float]) -> dict[str, float]:
    """How late paced pieces left against their schedule, for a log line.

    Returns ``pacing_p50_ms``, ``pacing_p99_ms`` and ``pacing_max_ms`` (ms, two
    decimals; nearest-rank percentiles), or nothing when no piece was sent.
    """
    late = sorted(lateness_ms)
    if not late:
        return {}
    return {
        "pacing_p50_ms": round(late[len(late) // 2], 2),
        "pacing_p99_ms": round(late[min(len(late) - 1, len(late) * 99 // 100)], 2),
        "pacing_max_ms": round(late[-1], 2),
    }


class PacedSink:
    """The session's speaker: accepts audio like a device and sends it paced to real time.

    :meth:`write` queues audio on a virtual playout timeline, waiting while
    more than ``buffer_ms`` is queued (so the TTS can work ahead of playback
    and a slow sentence does not leave the listener in silence). :meth:`run`
    sends it in ``piece_ms`` pieces, each when its playout time is at most
    ``lead_ms`` away, so a listener never holds more than ``lead_ms`` of
    unplayed audio, and the playout position (``played_samples``, the loop
    clock against the timeline) is what was heard. :meth:`clear_buffer`
    drops what was not played; pieces not yet sent are never sent.
    :attr:`lateness_ms` holds how late each piece left against its send time
    (the loop's overshoot: a loaded process sends late), and :attr:`underrun_ms`
    the silence inside replies whose audio was written later than real time.

    :meth:`pause` stops sending: the listener plays out what it was already
    sent (at most ``lead_ms``) and the timeline stops at the end of it, which
    is where the played position stays. :meth:`resume` sends the rest from
    there, on a timeline moved on by the pause: nothing is lost or sent twice.
    :meth:`clear_buffer` while paused drops what was held.

    Args:
        sample_rate: the output encoding's rate (audio is produced at it).
        lead_ms: how far ahead of real time audio is sent.
        on_audio: receives each piece (PCM16 at ``sample_rate``) and the tag
            that was current when it was written.
        tag: called at each :meth:`write` (which reply the audio belongs to).
        piece_ms: the size of the pieces sent.
        buffer_ms: how far ahead of real time audio is accepted (>= ``lead_ms``).
        clock: the monotonic time in seconds (default: the loop's clock, which
            :meth:`run`'s timers follow).
    """

    def __init__(
        self,
        sample_rate: int,
        lead_ms: int,
        on_audio: Callable[[bytes, Any], None],
        tag: Callable[[], Any] = lambda: None,
        piece_ms: int = 40,
        buffer_ms: int = 0,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self._rate = check_rate(sample_rate)
        self._lead = sample_rate * lead_ms // 1000
        self._buffer = sample_rate * max(buffer_ms, lead_ms) // 1000
        self._piece = sample_rate * piece_ms // 1000 * 2
        self._on_audio = on_audio
        self._tag = tag
        self._time = clock or asyncio.get_running_loop().time
        self._t0 = self._time()
        self._end = 0
        self._written = 0
        self._shift = 0  # samples the timeline was held back by pauses
        self._paused_at: int | None = None  # timeline position the pause holds
        self._sent_end = 0  # timeline position at the end of the last piece sent
        self._resumed = asyncio.Event()
        self._resumed.set()
        # (timeline position in samples, pcm, tag) not sent yet; bounded by the
        # write-side wait (buffer + one chunk).
        self._pending: collections.deque[tuple[int, bytes, Any]] = collections.deque()
        # When the audio now pending could first be sent (its write, or the last resume):
        # the first ``lead_ms`` of a reply are due at once, not in the past.
        self._ready_at = self._t0
        self._last_tag: Any = None
        self._underrun = 0  # samples of silence inside replies (the audio came too late)
        self._wake = asyncio.Event()
        self._late: collections.deque[float] = collections.deque(maxlen=20_000)

    @property
    def lateness_ms(self) -> tuple[float, ...]:
        """How late each piece was sent against its schedule, ms to the microsecond (the
        last 20 000 pieces)."""
        return tuple(self._late)

    @property
    def underrun_ms(self) -> float:
        """Silence heard inside replies because their audio came later than real time
        (a TTS slower than real time, a loaded process), ms in all."""
        return self._underrun * 1000 / self._rate

    @property
    def sample_rate(self) -> int:
        return self._rate

    def _now(self) -> int:
        """The timeline position being played (held while paused)."""
        if self._paused_at is not None:
            return self._paused_at
        return int((self._time() - self._t0) * self._rate) - self._shift

    @property
    def paused(self) -> bool:
        return self._paused_at is not None

    def pause(self) -> None:
        """Stop sending; what was sent plays out and is counted as played."""
        if self._paused_at is not None:
            return
        self._paused_at = min(self._end, max(self._now(), self._sent_end))
        self._resumed.clear()

    def resume(self) -> None:
        """Send the held audio from where the pause stopped, on a moved-on timeline."""
        if self._paused_at is None:
            return
        raw = int((self._time() - self._t0) * self._rate)
        self._shift = raw - self._paused_at
        self._paused_at = None
        self._ready_at = self._time()
        self._resumed.set()
        self._wake.set()

    @property
    def queued_samples(self) -> int:
        """Samples written that the listener has not heard yet."""
        return max(0, self._end - self._now())

    @property
    def played_samples(self) -> int:
        return self._written - self.queued_samples

    async def write(self, pcm: bytes) -> None:
        # A timer, not polling: sleep exactly until the queue is back under its bound.
        while (ahead := self._end - self._now()) > self._buffer:
            if self._paused_at is not None:
                await self._resumed.wait()
                continue
            await asyncio.sleep((ahead - self._buffer) / self._rate)
        tag = self._tag()
        now = self._now()
        if self._written and tag is not None and tag is self._last_tag and now > self._end:
            self._underrun += now - self._end  # the same reply ran dry: the listener heard a gap
        self._last_tag = tag
        pos = max(self._end, now)
        for i in range(0, len(pcm), self._piece):
            piece = pcm[i : i + self._piece]
            if not self._pending:
                self._ready_at = self._time()
            self._pending.append((pos, piece, tag))
            pos += len(piece) // 2
        self._end = pos
        self._written += len(pcm) // 2
        self._wake.set()

    def clear_buffer(self) -> int:
        dropped = self.queued_samples
        self._written -= dropped
        if dropped:
            self._end = self._now()
        self._pending.clear()
        self._sent_end = min(self._sent_end, self._end)
        if self._paused_at is not None:
            self.resume()  # nothing is held any more
        return dropped

    async def wait_for_playout(self) -> None:
        while (remaining := self._end - self._now()) > 0:
            if self._paused_at is not None:
                await self._resumed.wait()
                continue
            await asyncio.sleep(remaining / self._rate)

    async def run(self) -> None:
        """Send the queued audio in real time, forever (cancel to stop)."""
        loop = asyncio.get_running_loop()
        while True:
            if not self._pending or self._paused_at is not None:
                self._wake.clear()
                await self._wake.wait()
                continue
            pos, piece, tag = self._pending[0]
            send_at = self._t0 + (pos + self._shift - self._lead) / self._rate
            if send_at > loop.time():
                await asyncio.sleep(send_at - loop.time())
                continue  # cleared or paused meanwhile?
            self._pending.popleft()
            due = max(send_at, self._ready_at)
            self._late.append(round(max(0.0, self._time() - due) * 1000, 3))
            self._sent_end = pos + len(piece) // 2
            self._on_audio(piece, tag)
