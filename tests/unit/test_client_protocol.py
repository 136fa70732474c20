"""The client-side protocol rules, on recorded server event sequences (no sockets)."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest

from runtime.client.protocol import (
    TRANSITIONS,
    ClientProtocol,
    InvalidState,
    PlaybackFlush,
    State,
    ToolResultDiscarded,
)
from runtime.protocol.events import (
    ReplyAudio,
    ReplyCreate,
    SessionPatch,
    SessionUpdate,
)

BIND = SessionPatch(keys=frozenset({"agent_id"}), agent_id="agent_1")


def ready(proto: ClientProtocol, **extra) -> None:
    proto.connection_made()
    proto.data_to_send()
    msg = {"type": "session.ready", "session_id": "sess_1", "resume_token": "rt_1", **extra}
    proto.receive_text(json.dumps(msg))


def state_of(proto: ClientProtocol) -> State:
    return proto.state  # a call, so checks after state changes are not narrowed away


def feed(proto: ClientProtocol, *messages: dict[str, Any]) -> list[Any]:
    for m in messages:
        proto.receive_text(json.dumps(m))
    return proto.events_received()


def sent(proto: ClientProtocol) -> list[dict[str, Any]]:
    return [json.loads(t) for t in proto.data_to_send()]


def test_first_message_is_the_update_and_audio_waits_for_ready():
    proto = ClientProtocol(BIND)
    assert proto.send_audio(b"\x01\x00" * 10) is False
    proto.connection_made()
    assert sent(proto) == [{"type": "session.update", "session": {"agent_id": "agent_1"}}]
    assert state_of(proto) is State.BINDING
    assert proto.send_audio(b"\x02\x00") is False
    assert sent(proto) == []
    feed(proto, {"type": "session.ready", "session_id": "sess_9", "resume_token": "tok",
                 "expires_at": 1760000000, "config": {"output": {"format": {"encoding": "audio/pcmu"}}}})  # fmt: skip
    assert state_of(proto) is State.READY
    assert (proto.session_id, proto.resume_token, proto.expires_at) == ("sess_9", "tok", 1760000000)
    assert proto.ready_config == {"output": {"format": {"encoding": "audio/pcmu"}}}
    assert proto.send_audio(b"\x03\x00\x04\x00") is True
    assert sent(proto) == [
        {"type": "input.audio", "audio": base64.b64encode(b"\x03\x00\x04\x00").decode()}
    ]
    stats = proto.statistics()
    assert (stats.audio_bytes_sent, stats.audio_bytes_dropped) == (4, 22)


def test_playback_is_flushed_on_speech_started_and_interrupted_reply_done():
    proto = ClientProtocol(BIND)
    ready(proto)
    proto.events_received()
    events = feed(
        proto,
        {"type": "reply.started", "reply_id": "r1"},
        {"type": "reply.audio", "reply_id": "r1", "data": base64.b64encode(b"\0\0").decode()},
        {"type": "input.speech.started"},
        {"type": "transcript.agent", "reply_id": "r1", "text": "It is", "interrupted": True},
        {"type": "reply.done", "reply_id": "r1", "status": "interrupted"},
        {"type": "reply.started", "reply_id": "r2"},
        {"type": "reply.done", "reply_id": "r2", "status": "completed"},
    )
    kinds = [type(e).__name__ for e in events]
    assert kinds == ["ReplyStarted", "ReplyAudio", "InputSpeechStarted", "PlaybackFlush",
                     "TranscriptAgent", "ReplyDone", "PlaybackFlush", "ReplyStarted", "ReplyDone"]  # fmt: skip
    assert events[3] == PlaybackFlush(reason="speech_started")
    assert events[6] == PlaybackFlush(reason="interrupted", reply_id="r1")
    assert isinstance(events[1], ReplyAudio) and events[1].data == b"\0\0"


def test_tool_result_waits_until_reply_done_is_the_latest_event():
    proto = ClientProtocol(BIND)
    ready(proto)
    feed(proto, {"type": "reply.started", "reply_id": "r1"},
         {"type": "tool.call", "call_id": "c1", "name": "get_weather", "arguments": {"city": "Paris"}})  # fmt: skip
    # The agent is still speaking its transition phrase: held.
    proto.submit_tool_result("c1", '{"temp_c": 18}')
    assert sent(proto) == []
    feed(proto, {"type": "reply.done", "reply_id": "r1", "status": "completed"})
    assert sent(proto) == [{"type": "tool.result", "call_id": "c1", "result": '{"temp_c": 18}',
                            "is_error": False}]  # fmt: skip
    # A second call answered after its reply.done: sent at once.
    feed(proto, {"type": "reply.started", "reply_id": "r2"},
         {"type": "tool.call", "call_id": "c2", "name": "book", "arguments": {}},
         {"type": "reply.done", "reply_id": "r2"})  # fmt: skip
    proto.submit_tool_result("c2", "failed", is_error=True)
    assert sent(proto) == [
        {"type": "tool.result", "call_id": "c2", "result": "failed", "is_error": True}
    ]
    with pytest.raises(ValueError, match="no outstanding tool call"):
        proto.submit_tool_result("c2", "again")


def test_tool_result_after_a_new_turn_began_waits_for_the_next_reply_done():
    proto = ClientProtocol(BIND)
    ready(proto)
    feed(proto, {"type": "reply.started", "reply_id": "r1"},
         {"type": "tool.call", "call_id": "c1", "name": "t", "arguments": {}},
         {"type": "reply.done", "reply_id": "r1"},
         {"type": "input.speech.started"})  # fmt: skip
    proto.submit_tool_result("c1", "late")
    assert sent(proto) == []
    feed(
        proto, {"type": "reply.started", "reply_id": "r2"}, {"type": "reply.done", "reply_id": "r2"}
    )
    assert [m["call_id"] for m in sent(proto)] == ["c1"]


def test_tool_results_of_an_interrupted_reply_are_discarded():
    proto = ClientProtocol(BIND)
    ready(proto)
    feed(proto, {"type": "reply.started", "reply_id": "r1"},
         {"type": "tool.call", "call_id": "c1", "name": "t", "arguments": {}},
         {"type": "tool.call", "call_id": "c2", "name": "t", "arguments": {}})  # fmt: skip
    proto.submit_tool_result("c1", "held")
    events = feed(proto, {"type": "reply.done", "reply_id": "r1", "status": "interrupted"})
    assert ToolResultDiscarded(call_id="c1") in events
    proto.submit_tool_result("c2", "too late")  # its reply is gone
    assert proto.events_received() == [ToolResultDiscarded(call_id="c2")]
    feed(
        proto, {"type": "reply.started", "reply_id": "r2"}, {"type": "reply.done", "reply_id": "r2"}
    )
    assert sent(proto) == []


def test_a_drop_is_resumed_with_the_session_id_and_audio_is_dropped_meanwhile():
    proto = ClientProtocol(BIND)
    ready(proto)
    proto.connection_lost(None)
    assert state_of(proto) is State.DISCONNECTED and proto.resumable
    assert proto.send_audio(b"\0\0") is False
    proto.reconnect()
    proto.connection_made()
    assert sent(proto) == [{"type": "session.resume", "session_id": "sess_1"}]
    feed(proto, {"type": "session.ready", "session_id": "sess_1", "resume_token": "rt_2"})
    assert state_of(proto) is State.READY and proto.resume_token == "rt_2"
    assert proto.statistics().resumes == 1
    # A refused resume is final.
    proto.connection_lost(1006)
    proto.reconnect()
    proto.connection_made()
    feed(
        proto, {"type": "session.error", "code": "session_not_found", "message": "Session expired"}
    )
    proto.connection_lost(1008, "")
    assert state_of(proto) is State.FAILED
    assert proto.error is not None and proto.error.code == "session_not_found"
    assert proto.error.close_code == 1008


def test_clean_end_and_failures_before_ready():
    proto = ClientProtocol(BIND)
    ready(proto)
    proto.end()
    assert sent(proto) == [{"type": "session.end"}]
    assert state_of(proto) is State.ENDING
    assert proto.send_audio(b"\0\0") is False
    feed(
        proto,
        {"type": "session.ended", "session_duration_seconds": 3.5, "audio_duration_seconds": None},
    )
    proto.connection_lost(1000)
    assert state_of(proto) is State.ENDED and proto.error is None
    assert proto.ended is not None and proto.ended.session_duration_seconds == 3.5

    expired = ClientProtocol(BIND)
    ready(expired)
    feed(expired, {"type": "session.error", "code": "session_expired", "message": "cap reached"},
         {"type": "session.ended", "session_duration_seconds": 60.0, "audio_duration_seconds": 59.5})  # fmt: skip
    expired.connection_lost(1008)
    assert state_of(expired) is State.ENDED
    assert expired.error is not None and expired.error.code == "session_expired"

    unknown = ClientProtocol(BIND)
    unknown.connection_made()
    feed(
        unknown, {"type": "session.error", "code": "agent_not_found", "message": "Agent not found"}
    )
    unknown.connection_lost(1008)
    assert state_of(unknown) is State.FAILED
    assert unknown.error is not None
    assert (unknown.error.code, unknown.error.message) == ("agent_not_found", "Agent not found")

    refused = ClientProtocol(BIND)
    refused.connection_made()
    refused.connection_lost(1008, "unauthorized")
    assert refused.error is not None and refused.error.code == "unauthorized"

    slow = ClientProtocol(BIND)
    slow.connection_made()
    feed(slow, {"type": "session.error", "code": "agent_timeout", "message": "no session.update"})
    slow.connection_lost(1008)
    assert slow.error is not None and slow.error.code == "agent_timeout"

    dropped = ClientProtocol(BIND)
    dropped.connection_made()
    dropped.connection_lost(None)
    assert state_of(dropped) is State.FAILED and not dropped.resumable
    assert dropped.error is not None and "before session.ready" in dropped.error.message


def test_non_fatal_errors_and_junk_keep_the_session():
    proto = ClientProtocol(BIND)
    ready(proto)
    events = feed(
        proto, {"type": "session.error", "code": "invalid_audio", "message": "bad base64"}
    )
    assert state_of(proto) is State.READY and len(events) == 2  # ready + the error
    proto.receive_text("not json")
    proto.receive_text(json.dumps({"type": "future.event", "x": 1}))
    proto.receive_text(json.dumps({"type": "reply.started"}))  # missing reply_id
    assert proto.statistics().ignored_messages == 3
    assert proto.events_received() == []
    proto.connection_lost(None)
    assert state_of(proto) is State.DISCONNECTED  # a non-fatal error does not end the session


def test_other_client_events_need_a_ready_session():
    proto = ClientProtocol(BIND)
    with pytest.raises(InvalidState):
        proto.send(ReplyCreate(instructions="Say hi."))
    ready(proto)
    proto.send(ReplyCreate(instructions="Say hi."))
    assert sent(proto) == [{"type": "reply.create", "instructions": "Say hi."}]
    with pytest.raises(ValueError, match=r"first session\.update"):
        proto.send(SessionUpdate(session=BIND))
    with pytest.raises(InvalidState):
        proto.connection_made()


def test_every_state_has_a_transition_row_and_terminal_states_are_final():
    assert set(TRANSITIONS) == set(State)
    assert TRANSITIONS[State.ENDED] == TRANSITIONS[State.FAILED] == frozenset()
    proto = ClientProtocol(BIND)
    ready(proto)
    with pytest.raises(InvalidState, match="reconnect in state ready"):
        proto.reconnect()
    proto.connection_lost(1011)  # an internal error without session.error: resumable
    assert state_of(proto) is State.DISCONNECTED
    proto.give_up("window over")
    assert state_of(proto) is State.FAILED and proto.error is not None
    assert proto.error.code == "resume_failed"


@pytest.mark.parametrize(
    ("first", "what"),
    [
        ("hello", "not a JSON event"),
        ("[1, 2]", "not a JSON event"),
        ('{"kind": "ready"}', "not a JSON event"),
        (json.dumps({"type": "session.update", "session": {"agent_id": "agent_1"}}),
         "'session.update', the client's own event sent back"),
    ],
)  # fmt: skip
def test_a_first_message_no_voice_agent_server_sends_fails_the_session_at_once(
    first: str, what: str
):
    proto = ClientProtocol(BIND)
    proto.connection_made()
    proto.data_to_send()
    proto.receive_text(first)
    assert state_of(proto) is State.FAILED
    assert proto.error is not None
    assert (proto.error.code, proto.error.message) == (
        "unreachable",
        f"the server there is not a Voice Agent server: its first message was {what}",
    )


def test_an_unknown_or_malformed_event_is_skipped_first_or_later():
    proto = ClientProtocol(BIND)
    proto.connection_made()
    proto.data_to_send()
    # A newer server's event type, or a known type with a bad field: a Voice Agent server's.
    proto.receive_text('{"type": "session.welcome"}')
    proto.receive_text('{"type": "session.ready"}')  # no session_id
    assert state_of(proto) is State.BINDING
    feed(proto, {"type": "session.ready", "session_id": "sess_1", "resume_token": "rt_1"})
    assert state_of(proto) is State.READY
    # Once the server spoke the protocol, anything odd is skipped as before.
    proto.receive_text("hello")
    proto.receive_text(json.dumps({"type": "session.update", "session": {}}))
    assert state_of(proto) is State.READY
