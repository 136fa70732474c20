"""The mark-acknowledged playout: whole frames, paced sending, played position from echoes,
clear, pause and resume."""

from __future__ import annotations

import asyncio

import pytest

from audio.g711 import ulaw_encode
from runtime.sessions.marked import MarkedPlayout

RATE = 8000
FRAME = 160


class FarEnd:
    """Records what the playout sent, in order."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, object]] = []

    def audio(self, payload: bytes) -> None:
        self.sent.append(("media", payload))

    def mark(self, name: str) -> None:
        self.sent.append(("mark", name))

    def clear(self) -> None:
        self.sent.append(("clear", None))

    def marks(self) -> list[str]:
        return [str(v) for k, v in self.sent if k == "mark"]

    def media(self) -> list[bytes]:
        return [v for k, v in self.sent if k == "media" and isinstance(v, bytes)]


def playout(far: FarEnd, **kwargs: int) -> MarkedPlayout:
    return MarkedPlayout(
        RATE, encode=ulaw_encode, send_audio=far.audio, send_mark=far.mark,
        send_clear=far.clear, **kwargs,
    )  # fmt: skip


def ramp(samples: int, start: int = 1) -> bytes:
    return b"".join(((start + i) % 2000 + 100).to_bytes(2, "little") for i in range(samples))


async def until(predicate: object, steps: int = 400) -> None:
    for _ in range(steps):
        if callable(predicate) and predicate():
            return
        await asyncio.sleep(0.005)
    raise AssertionError("condition not reached")


async def test_whole_frames_marks_and_a_padded_tail() -> None:
    far = FarEnd()
    p = playout(far, lead_ms=200, buffer_ms=1000)
    runner = asyncio.get_running_loop().create_task(p.run())
    pcm = ramp(RATE // 10 + 50)  # 100 ms + 50 samples
    await p.write(pcm)
    await until(lambda: len(far.marks()) == 4)
    runner.cancel()
    # 5 whole frames in pieces of 2, then the 50-sample tail padded with μ-law silence.
    assert [len(m) for m in far.media()] == [320, 320, 160, 160]
    assert far.media()[-1] == ulaw_encode(pcm[800 * 2 :]) + b"\xff" * (FRAME - 50)
    assert b"".join(far.media())[:800] == ulaw_encode(pcm[: 800 * 2])
    # Each piece is followed by a mark naming the written position at its end.
    assert far.marks() == ["0.320", "0.640", "0.800", "0.850"]
    assert [k for k, _ in far.sent] == ["media", "mark"] * 4
    assert (p.played_samples, p.queued_samples) == (0, 850)


async def test_played_position_is_what_the_echoes_say() -> None:
    far = FarEnd()
    p = playout(far, lead_ms=1000, buffer_ms=1000)
    runner = asyncio.get_running_loop().create_task(p.run())
    await p.write(ramp(1600))
    await until(lambda: len(far.marks()) == 5)
    assert p.acknowledge("0.320") and p.played_samples == 320
    assert p.acknowledge("0.960") and p.played_samples == 960
    assert not p.acknowledge("0.640")  # an older echo never moves it back
    assert not p.acknowledge("garbage") and p.played_samples == 960
    # An interruption: clear, and the echoes Twilio sends for the dropped marks are stale.
    assert p.clear_buffer() == 640
    assert far.sent[-1] == ("clear", None)
    assert not p.acknowledge("0.1280") and not p.acknowledge("0.1600")
    assert (p.played_samples, p.queued_samples) == (960, 0)
    stats = p.statistics()
    assert (stats.clears, stats.stale_marks, stats.marks_acknowledged) == (1, 3, 3)
    # The next reply's marks carry the new epoch and count again.
    await p.write(ramp(320))
    await until(lambda: far.marks()[-1] == "1.1280")
    assert p.acknowledge("1.1280") and p.played_samples == 1280
    runner.cancel()


async def test_clear_with_nothing_at_the_far_end_sends_nothing() -> None:
    far = FarEnd()
    p = playout(far)
    assert p.clear_buffer() == 0
    assert far.sent == []


async def test_pause_holds_the_unplayed_audio_and_resume_sends_it_again() -> None:
    far = FarEnd()
    p = playout(far, lead_ms=1000, buffer_ms=1000)
    runner = asyncio.get_running_loop().create_task(p.run())
    pcm = ramp(960)
    await p.write(pcm)
    await until(lambda: len(far.marks()) == 3)
    assert p.acknowledge("0.320")
    p.pause()
    assert far.sent[-1] == ("clear", None) and p.paused
    sent_before = len(far.sent)
    await asyncio.sleep(0.05)
    assert len(far.sent) == sent_before  # nothing is sent while paused
    p.resume()
    await until(lambda: len(far.marks()) == 5)
    runner.cancel()
    # Resumed from the acknowledged position: the audio after sample 320, once more.
    again = b"".join(far.media()[3:])
    assert again == ulaw_encode(pcm[320 * 2 :])
    assert far.marks()[3:] == ["1.640", "1.960"]
    assert not p.acknowledge("0.960")  # the echo of the cleared mark is stale
    assert p.acknowledge("1.960") and p.played_samples == 960


async def test_wait_for_playout_returns_on_the_last_echo() -> None:
    far = FarEnd()
    p = playout(far, lead_ms=1000, buffer_ms=1000)
    runner = asyncio.get_running_loop().create_task(p.run())
    await p.write(ramp(320))
    await until(lambda: len(far.marks()) == 1)
    waiter = asyncio.get_running_loop().create_task(p.wait_for_playout())
    await asyncio.sleep(0.02)
    assert not waiter.done()
    p.acknowledge("0.320")
    await asyncio.wait_for(waiter, 1.0)
    runner.cancel()


def test_a_bad_rate_is_refused() -> None:
    with pytest.raises(ValueError, match="rate"):
        MarkedPlayout(
            7, encode=ulaw_encode, send_audio=print, send_mark=print, send_clear=lambda: None
        )
