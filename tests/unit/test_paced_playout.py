"""The WebSocket's paced sink: what was heard at a clear, and pause/resume with nothing lost
or sent twice."""

from __future__ import annotations

import asyncio

import pytest

from runtime.sessions.playout import PacedSink, pacing_fields

RATE = 16000


class Clock:
    """Time that moves only when the test says (seconds, from whole milliseconds)."""

    def __init__(self) -> None:
        self.ms = 0

    def __call__(self) -> float:
        return self.ms / 1000

    def advance(self, ms: int) -> None:
        self.ms += ms


def tone(seconds: float, value: int = 1000) -> bytes:
    return value.to_bytes(2, "little", signed=True) * int(seconds * RATE)


def sink(clock: Clock, *, lead_ms: int = 0) -> PacedSink:
    return PacedSink(RATE, lead_ms, lambda _pcm, _tag: None, buffer_ms=5000, clock=clock)


async def test_a_clear_keeps_exactly_what_was_played():
    clock = Clock()
    s = sink(clock)
    await s.write(tone(1.0))
    clock.advance(200)
    assert (s.played_samples, s.queued_samples) == (3200, 12800)
    assert s.clear_buffer() == 12800
    assert (s.played_samples, s.queued_samples) == (3200, 0)  # 0.2 s heard, no more
    clock.advance(500)
    assert s.played_samples == 3200
    # The next reply starts now, not where the dropped audio would have ended.
    await s.write(tone(0.5))
    clock.advance(100)
    assert (s.played_samples, s.queued_samples) == (3200 + 1600, 6400)


async def test_a_pause_holds_the_played_position_and_resume_goes_on_from_it():
    clock = Clock()
    s = sink(clock)
    await s.write(tone(1.0))
    clock.advance(200)
    s.pause()
    assert s.paused
    clock.advance(700)  # the user coughs; nothing plays
    assert (s.played_samples, s.queued_samples) == (3200, 12800)
    s.resume()
    assert not s.paused
    clock.advance(300)
    assert (s.played_samples, s.queued_samples) == (3200 + 4800, 8000)
    clock.advance(800)
    assert (s.played_samples, s.queued_samples) == (16000, 0)


async def test_a_pause_counts_what_was_already_sent_ahead_as_heard():
    # The listener holds up to lead_ms it was sent: the pause stops the sending, so
    # that audio plays out and the timeline stops at its end.
    clock = Clock()
    s = sink(clock, lead_ms=100)
    await s.write(tone(1.0))
    s._sent_end = 4800  # as run() leaves it: sent up to 0.3 s at 0.2 s, 100 ms ahead
    clock.advance(200)
    s.pause()
    clock.advance(1000)
    assert (s.played_samples, s.queued_samples) == (4800, 11200)
    # A clear while paused drops what was held; the listener heard 0.3 s.
    assert s.clear_buffer() == 11200
    assert (s.played_samples, s.paused) == (4800, False)


@pytest.mark.parametrize("lead_ms", [0, 40])
async def test_paused_and_resumed_audio_reaches_the_listener_whole_and_once(lead_ms: int):
    # Real loop time: the pieces are sent by run(). The sink is paused from inside the
    # listener after the third piece, and resumed once the test sees the pause took.
    sent: list[bytes] = []
    third = asyncio.Event()

    def listener(pcm: bytes, _tag: object) -> None:
        sent.append(pcm)
        if len(sent) == 3:
            s.pause()
            third.set()

    s = PacedSink(RATE, lead_ms, listener, piece_ms=20, buffer_ms=5000)
    pcm = b"".join(i.to_bytes(2, "little") * 160 for i in range(20))  # 20 distinct 10 ms steps
    runner = asyncio.get_running_loop().create_task(s.run())
    try:
        await s.write(pcm)
        await third.wait()
        assert len(sent) == 3 and s.paused
        played = s.played_samples
        await asyncio.sleep(0)  # run() sees the pause and sends nothing more
        assert len(sent) == 3 and s.played_samples == played == 3 * 320
        s.resume()
        await s.wait_for_playout()
    finally:
        runner.cancel()
    assert b"".join(sent) == pcm
    assert s.played_samples == len(pcm) // 2


async def test_each_piece_records_how_late_it_left_against_its_schedule():
    clock = Clock()
    sent: list[int] = []
    five = asyncio.Event()

    def on_audio(pcm: bytes, _tag: object) -> None:
        sent.append(len(pcm))
        if len(sent) == 5:
            five.set()

    s = PacedSink(RATE, 0, on_audio, buffer_ms=5000, clock=clock)
    await s.write(tone(0.2))  # five 40 ms pieces, due at 0, 40, 80, 120 and 160 ms
    clock.advance(100)  # the process comes back to them 100 ms late
    pacer = asyncio.create_task(s.run())
    await five.wait()
    pacer.cancel()
    # Each is sent now (the test's clock stands still): late by 100 - due, never below 0.
    assert s.lateness_ms == (100.0, 60.0, 20.0, 0.0, 0.0)
    assert pacing_fields(s.lateness_ms) == {
        "pacing_p50_ms": 20.0, "pacing_p99_ms": 100.0, "pacing_max_ms": 100.0,
    }  # fmt: skip
    assert pacing_fields(()) == {}


async def test_silence_inside_a_reply_is_counted_and_between_replies_is_not():
    clock = Clock()
    reply: list[object] = [object()]
    s = PacedSink(RATE, 0, lambda _pcm, _tag: None, tag=lambda: reply[0], buffer_ms=5000,
                  clock=clock)  # fmt: skip
    await s.write(tone(0.2))
    clock.advance(300)  # the reply's next sentence comes 100 ms after the first ran out
    await s.write(tone(0.2))
    assert s.underrun_ms == 100.0
    clock.advance(50)  # written ahead of time: no gap
    await s.write(tone(0.2))
    assert s.underrun_ms == 100.0
    reply[0] = object()  # the next reply starts after a pause: not a gap inside a reply
    clock.advance(1000)
    await s.write(tone(0.2))
    assert s.underrun_ms == 100.0
