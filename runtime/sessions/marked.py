"""Playout whose truth is the far end's acknowledgements (Twilio's mark echoes).

Theory of operation
-------------------
:class:`MarkedPlayout` is the session's speaker when the audio is played by a
remote party that buffers it (Twilio plays what it is sent, in order, and
echoes a ``mark`` once the audio before it has played). It is an
:class:`~runtime.conversation.sinks.AudioSink`:

* :meth:`write` takes PCM16 at the sink's rate. Audio is kept in whole frames
  (20 ms); a tail shorter than a frame waits for the next write and, when its
  turn to play comes with nothing after it, is padded with the encoding's own
  silence code. Every payload sent is whole frames.
* :meth:`run` sends frames paced to real time, never more than ``lead_ms``
  ahead of what the far end is playing, ``piece_frames`` frames per message,
  each piece followed by a mark named ``"<epoch>.<position>"`` (the written-sample
  position at the end of the piece).
* :meth:`acknowledge` takes an echoed mark name. An echo of the current epoch
  moves :attr:`played_samples` to its position: that, and nothing else, is what
  the listener heard. :meth:`clear_buffer` (an interruption) sends ``clear``,
  drops everything not acknowledged and starts a new epoch, so marks echoed
  because of the ``clear`` (Twilio echoes every pending mark when it drops its
  buffer) are not counted as heard.
* :meth:`pause` (``clear`` and hold the audio not acknowledged) and
  :meth:`resume` (send it again from where the acknowledgements stopped) let the
  conversation wait while it decides whether speech over a reply is an
  interruption; :meth:`clear_buffer` after a pause discards what was held.

Nothing here knows Twilio's JSON: the adapter passes three callbacks
(``send_audio``, ``send_mark``, ``send_clear``) that must not block.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from audio.frame import check_pcm, check_rate

ECHO_GRACE_S: Final = 2.0


@dataclass(frozen=True, slots=True)
class PlayoutStatistics:
    """A snapshot: what was sent and acknowledged, and how late pieces were sent (ms)."""

    pieces_sent: int
    marks_sent: int
    marks_acknowledged: int
    stale_marks: int
    clears: int
    padded_frames: int
    written_samples: int
    played_samples: int
    lateness_ms: tuple[float, ...]


class MarkedPlayout:
    """A paced sender in whole frames whose played position comes from mark echoes.

    Args:
        sample_rate: the rate audio is written at (the wire's rate: 8000 for μ-law).
        encode: PCM16 → wire bytes (one byte per sample, as G.711).
        send_audio: sends one payload (whole frames of wire bytes); must not block.
        send_mark: sends a mark with this name; must not block.
        send_clear: asks the far end to drop what it holds; must not block.
        lead_ms: how far ahead of the far end's playout audio is sent.
        buffer_ms: how far ahead of real time :meth:`write` accepts audio (>= lead).
        frame_ms: the frame size (20 ms on Twilio).
        piece_frames: frames per message (each piece is followed by a mark).
        silence: the wire's silence code (0xFF for μ-law).
        echo_grace_s: how long :meth:`wait_for_playout` waits past the expected end
            for the last echo.
    """

    def __init__(
        self,
        sample_rate: int,
        *,
        encode: Callable[[bytes], bytes],
        send_audio: Callable[[bytes], None],
        send_mark: Callable[[str], None],
        send_clear: Callable[[], None],
        lead_ms: int = 200,
        buffer_ms: int = 300,
        frame_ms: int = 20,
        piece_frames: int = 2,
        silence: int = 0xFF,
        echo_grace_s: float = ECHO_GRACE_S,
    ) -> None:
        self._rate = check_rate(sample_rate)
        self._encode = encode
        self._send_audio = send_audio
        self._send_mark = send_mark
        self._send_clear = send_clear
        self._frame = sample_rate * frame_ms // 1000  # samples per frame
        self._frame_s = frame_ms / 1000
        self._lead_s = lead_ms / 1000
        self._buffer_s = max(buffer_ms, lead_ms) / 1000
        self._piece = max(1, piece_frames)
        self._silence = bytes([silence])
        self._grace = echo_grace_s
        # Frames not sent yet: (written position at the frame's end, pcm, loop time written).
        self._unsent: collections.deque[tuple[int, bytes, float]] = collections.deque()
        # Frames sent, not acknowledged (kept for a resume after a pause).
        self._unacked: collections.deque[tuple[int, bytes, float]] = collections.deque()
        self._tail = b""  # less than a frame, waiting for more
        self._tail_at = 0.0
        self._written = 0
        self._acked = 0
        self._epoch = 0
        self._play_end = 0.0  # loop time when the audio sent so far ends playing
        self._paused = False
        self._sent_in_epoch = False
        self._wake = asyncio.Event()
        self._acked_event = asyncio.Event()
        self._pieces = 0
        self._marks = 0
        self._marks_acked = 0
        self._stale = 0
        self._clears = 0
        self._padded = 0
        self._late: collections.deque[float] = collections.deque(maxlen=20_000)

    # -- the AudioSink port ------------------------------------------------------------

    @property
    def sample_rate(self) -> int:
        return self._rate

    @property
    def played_samples(self) -> int:
        """Samples the far end has acknowledged playing (never decreases within a reply)."""
        return self._acked

    @property
    def queued_samples(self) -> int:
        """Samples written that the far end has not acknowledged."""
        return self._written - self._acked

    @property
    def paused(self) -> bool:
        return self._paused

    def _ahead_s(self, now: float) -> float:
        unsent = sum(len(f) // 2 for _, f, _ in self._unsent) + len(self._tail) // 2
        return max(0.0, self._play_end - now) + unsent / self._rate

    async def write(self, pcm: bytes) -> None:
        """Queue audio; waits while more than ``buffer_ms`` is ahead of real time."""
        pcm = check_pcm(pcm)
        loop = asyncio.get_running_loop()
        while (ahead := self._ahead_s(loop.time())) > self._buffer_s:  # noqa: ASYNC110
            await asyncio.sleep(ahead - self._buffer_s)
        data = self._tail + pcm
        whole = len(data) // (self._frame * 2) * self._frame * 2
        base = self._written - len(self._tail) // 2
        now = loop.time()
        for i in range(0, whole, self._frame * 2):
            end = base + (i + self._frame * 2) // 2
            self._unsent.append((end, data[i : i + self._frame * 2], now))
        self._tail = data[whole:]
        self._tail_at = now
        self._written += len(pcm) // 2
        self._wake.set()

    def clear_buffer(self) -> int:
        """Drop everything not acknowledged (``clear`` if any of it was sent).

        Returns:
            The samples dropped (written, not acknowledged).
        """
        dropped = self._written - self._acked
        # Sent anything since the last clear: clear, even if the echoes say it all played
        # (an echo may be on its way; a clear of an empty buffer costs nothing).
        sent = self._sent_in_epoch
        self._unsent.clear()
        self._unacked.clear()
        self._tail = b""
        self._written = self._acked
        if sent and not self._paused:
            self._clear_far_end()
        self._paused = False
        self._play_end = 0.0
        self._wake.set()
        self._acked_event.set()
        return dropped

    def pause(self) -> None:
        """Stop playing now: ``clear`` at the far end, hold what it had not played."""
        if self._paused:
            return
        self._paused = True
        if self._sent_in_epoch:
            self._clear_far_end()
        # Sent but not acknowledged goes back in front of what was never sent.
        self._unsent.extendleft(reversed(self._unacked))
        self._unacked.clear()
        self._play_end = 0.0

    def resume(self) -> None:
        """Play the held audio again from the last acknowledged position."""
        if self._paused:
            self._paused = False
            self._wake.set()

    def _clear_far_end(self) -> None:
        self._sent_in_epoch = False
        self._epoch += 1  # echoes of earlier marks no longer say anything was heard
        self._clears += 1
        self._send_clear()

    def acknowledge(self, name: str) -> bool:
        """An echoed mark. Returns whether it moved the played position (current epoch)."""
        epoch, _, pos = name.partition(".")
        if not (epoch.isdigit() and pos.isdigit()) or int(epoch) != self._epoch:
            self._stale += 1
            return False
        position = int(pos)
        self._marks_acked += 1
        while self._unacked and self._unacked[0][0] <= position:
            self._unacked.popleft()
        if position > self._acked:
            self._acked = min(position, self._written)
            self._acked_event.set()
            return True
        return False

    async def wait_for_playout(self) -> None:
        """Wait until every written sample was acknowledged (or the echoes are overdue)."""
        loop = asyncio.get_running_loop()
        while self._acked < self._written:
            self._acked_event.clear()
            overdue = max(self._play_end, loop.time()) + self._ahead_s(loop.time()) + self._grace
            try:
                async with asyncio.timeout_at(overdue):
                    await self._acked_event.wait()
            except TimeoutError:
                if not self._unsent and not self._tail and not self._paused:
                    return  # the far end stopped echoing: the marks say what was heard

    def statistics(self) -> PlayoutStatistics:
        return PlayoutStatistics(
            pieces_sent=self._pieces, marks_sent=self._marks, marks_acknowledged=self._marks_acked,
            stale_marks=self._stale, clears=self._clears, padded_frames=self._padded,
            written_samples=self._written, played_samples=self._acked,
            lateness_ms=tuple(self._late),
        )  # fmt: skip

    # -- sending -----------------------------------------------------------------------

    async def run(self) -> None:
        """Send the queued audio in real time, forever (cancel to stop)."""
        loop = asyncio.get_running_loop()
        while True:
            if self._paused or (not self._unsent and not self._tail):
                self._wake.clear()
                await self._wake.wait()
                continue
            now = loop.time()
            due = self._play_end - self._lead_s  # when the next piece should go
            if not self._unsent:
                # Only a partial frame: wait for more until its turn to play has come.
                due = self._play_end - self._frame_s
            if due > now:
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(due - now):
                        await self._wake.wait()  # more audio, a clear or a pause
                continue
            # How late the piece leaves against its schedule, or against the moment its
            # audio arrived when the audio came after its schedule (the TTS was behind).
            ready = self._unsent[0][2] if self._unsent else self._tail_at
            self._send_piece(now, max(0.0, now - max(due, ready)))

    def _send_piece(self, now: float, late_s: float) -> None:
        frames: list[tuple[int, bytes, float]] = []
        while self._unsent and len(frames) < self._piece:
            frames.append(self._unsent.popleft())
        payload = b"".join(self._encode(pcm) for _, pcm, _ in frames)
        if not frames:
            # The tail's turn came and nothing followed it: pad it to a whole frame.
            end = self._written
            samples = len(self._tail) // 2
            payload = self._encode(self._tail) + self._silence * (self._frame - samples)
            frames.append((end, self._tail, now))
            self._tail = b""
            self._padded += 1
        self._pieces += 1
        self._late.append(late_s * 1000)
        self._unacked.extend(frames)
        self._play_end = max(self._play_end, now) + len(payload) / self._rate
        self._send_audio(payload)
        self._sent_in_epoch = True
        self._marks += 1
        self._send_mark(f"{self._epoch}.{frames[-1][0]}")
