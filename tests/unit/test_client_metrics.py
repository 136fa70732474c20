"""Client-side turn timing: the voice's end in sent audio, and turns paired with replies."""

from __future__ import annotations

from runtime.client.metrics import TurnTimer, VoiceEndTracker
from runtime.protocol.events import (
    InputSpeechStarted,
    InputSpeechStopped,
    ReplyAudio,
    ReplyDone,
    ReplyStarted,
    ToolCall,
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


def test_a_reply_that_goes_on_after_its_tool_result_is_one_turn():
    timer = TurnTimer(RATE)
    timer.audio_sent(tone(300, 0.5, RATE), t_end=0.5)  # the voice ends at 0.5 s
    steps = [
        (0.8, InputSpeechStopped()),
        (0.8, TranscriptUser(text="Weather in Paris?", item_id="i1")),
        (0.9, ReplyStarted(reply_id="r1")),
        (1.1, ReplyAudio(reply_id="r1", data=b"\0\0")),
        (1.6, TranscriptAgent(reply_id="r1", text="Let me check.")),
        (1.6, ToolCall(call_id="c1", name="get_weather", arguments={}, reply_id="r1")),
        (1.6, ReplyDone(reply_id="r1")),
        (1.8, ReplyStarted(reply_id="r2")),
        (2.0, ReplyAudio(reply_id="r2", data=b"\0\0")),
        (3.0, TranscriptAgent(reply_id="r2", text="It is eighteen degrees.")),
    ]
    for now, event in steps:
        assert timer.on_event(event, now) is None
    m = timer.on_event(ReplyDone(reply_id="r2"), 3.0)
    assert m is not None and timer.metrics == [m]
    assert (m.reply_id, m.agent_text, m.interrupted) == (
        "r1",
        "Let me check. It is eighteen degrees.",
        False,
    )
    assert (m.v2v_ms, m.endpointing_ms, m.reply_started_ms) == (600.0, 300.0, 400.0)


def test_a_tool_turn_whose_reply_never_went_on_ends_at_the_next_turn():
    timer = TurnTimer(RATE)
    timer.audio_sent(tone(300, 0.5, RATE), t_end=0.5)
    for now, event in [
        (0.8, InputSpeechStopped()),
        (0.9, ReplyStarted(reply_id="r1")),
        (1.0, ToolCall(call_id="c1", name="get_weather", arguments={}, reply_id="r1")),
        (1.0, ReplyDone(reply_id="r1")),
    ]:
        assert timer.on_event(event, now) is None
    m = timer.on_event(InputSpeechStopped(), 5.0)
    assert m is not None and (m.reply_id, m.agent_text, m.v2v_ms) == ("r1", "", None)


def test_a_turn_taken_back_is_one_turn_with_the_whole_of_it():
    timer = TurnTimer(RATE)
    timer.audio_sent(tone(300, 0.5, RATE), t_end=0.5)
    timer.on_event(InputSpeechStopped(), 0.8)
    timer.on_event(TranscriptUser(text="I want to fly from Boston to", item_id="i1"), 0.8)
    timer.on_event(ReplyStarted(reply_id="r1"), 0.9)
    timer.on_event(TranscriptAgent(reply_id="r1", text="", interrupted=True), 1.2)
    withdrawn = timer.on_event(ReplyDone(reply_id="r1", status="interrupted"), 1.2)
    assert withdrawn is not None and timer.metrics == [withdrawn]
    timer.on_event(InputSpeechStarted(), 1.2)
    timer.audio_sent(tone(300, 1.0, RATE), t_end=2.2)
    timer.on_event(InputSpeechStopped(), 2.5)
    # The same item: the user went on with the turn; the withdrawn reply is no turn.
    timer.on_event(TranscriptUser(text="I want to fly from Boston to New York.", item_id="i1"), 2.5)
    assert timer.metrics == []
    timer.on_event(ReplyStarted(reply_id="r2"), 2.6)
    timer.on_event(ReplyAudio(reply_id="r2", data=b"\0\0"), 2.9)
    timer.on_event(TranscriptAgent(reply_id="r2", text="Which day?"), 3.5)
    m = timer.on_event(ReplyDone(reply_id="r2"), 3.5)
    assert m is not None and timer.metrics == [m]
    assert (m.user_text, m.agent_text, m.v2v_ms) == (
        "I want to fly from Boston to New York.",
        "Which day?",
        700.0,
    )
    # A later turn (another item) keeps the earlier ones.
    timer.on_event(InputSpeechStopped(), 6.0)
    timer.on_event(TranscriptUser(text="Monday.", item_id="i2"), 6.0)
    assert timer.metrics == [m]
