"""Client-side turn timing: the voice's end in sent audio, and turns paired with replies."""

from __future__ import annotations

from runtime.client.metrics import TurnTimer, VoiceEndTracker
from runtime.protocol.events import (
    InputSpeechStarted,
    InputSpeechStopped,
    ReplyAudio,
    ReplyDone,
    ReplyStarted,
    TranscriptAgent,
    TranscriptUser,
)
from tests.helpers import tone

RATE = 24000


def test_voice_end_is_the_end_of_the_last_loud_10ms_block():
    tracker = VoiceEndTracker(RATE)
    # 50 ms chunks: 50 ms of silence, 120 ms of tone, then silence. The chunk
    # ending at t=0.20 s holds the tone's last 20 ms followed by 30 ms of silence.
    pcm = bytes(2400) + tone(440, 0.12, RATE) + bytes(2400 * 3 - 5760 + 2400)
    for i in range(len(pcm) // 2400):
        tracker.push(pcm[i * 2400 : (i + 1) * 2400], t_end=(i + 1) * 0.05)
    assert tracker.last_voice_end is not None
    assert abs(tracker.last_voice_end - 0.17) < 1e-9
    quiet = VoiceEndTracker(RATE)
    quiet.push(bytes(4800), 0.1)
    assert quiet.last_voice_end is None


def test_voice_end_with_chunks_that_split_blocks():
    tracker = VoiceEndTracker(RATE)
    pcm = tone(440, 0.1, RATE) + bytes(2 * 2400)
    step = 700 * 2  # 29.17 ms chunks, not a multiple of 10 ms
    t = 0.0
    for i in range(0, len(pcm), step):
        chunk = pcm[i : i + step]
        t += len(chunk) / 2 / RATE
        tracker.push(chunk, t)
    assert tracker.last_voice_end is not None
    assert abs(tracker.last_voice_end - 0.1) < 1e-9


def test_turns_are_paired_with_their_replies_and_the_greeting_is_not_a_turn():
    timer = TurnTimer(RATE)
    steps = [
        (0.00, ReplyStarted(reply_id="greet")),
        (0.05, ReplyAudio(reply_id="greet", data=b"\0\0")),
        (0.90, ReplyDone(reply_id="greet")),
        (1.00, InputSpeechStarted()),
    ]
    for now, event in steps:
        assert timer.on_event(event, now) is None
    timer.audio_sent(tone(300, 0.5, RATE), t_end=1.5)  # the voice ends at 1.5 s
    timer.audio_sent(bytes(2400 * 6), t_end=1.8)
    assert timer.on_event(InputSpeechStopped(), 1.8) is None
    timer.on_event(TranscriptUser(text="What time is it?", item_id="i1"), 1.9)
    timer.on_event(ReplyStarted(reply_id="r1"), 1.95)
    timer.on_event(ReplyAudio(reply_id="r1", data=b"\0\0"), 2.125)
    timer.on_event(ReplyAudio(reply_id="r1", data=b"\0\0"), 2.2)
    timer.on_event(TranscriptAgent(reply_id="r1", text="It is", interrupted=True), 2.5)
    m = timer.on_event(ReplyDone(reply_id="r1", status="interrupted"), 2.5)
    assert m is not None and timer.metrics == [m]
    assert m.to_json() == {
        "reply_id": "r1", "user_text": "What time is it?", "agent_text": "It is",
        "interrupted": True, "stt_final_ms": 100.0, "ttft_ms": None, "first_sentence_ms": None,
        "tts_first_audio_ms": None, "v2v_ms": 625.0, "overhead_ms": None,
        "endpointing_ms": 300.0, "reply_started_ms": 450.0, "speculative": None,
    }  # fmt: skip
