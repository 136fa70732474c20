"""The Voice Agent event codec: text in, typed events out, and back."""

from __future__ import annotations

import base64
import dataclasses
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runtime.protocol import events as ev
from runtime.secret import Secret


def dumps(doc: Any) -> str:
    return json.dumps(doc)


def error_of(text: str | bytes, **kwargs: Any) -> ev.ProtocolError:
    with pytest.raises(ev.ProtocolError) as info:
        ev.decode_client_event(text, **kwargs)
    return info.value


# -- client events -------------------------------------------------------------------------


def test_inline_session_update_with_every_field() -> None:
    doc = {
        "type": "session.update",
        "session": {
            "system_prompt": "You are concise.",
            "greeting": "Hi — how can I help?",
            "input": {
                "type": "audio",
                "format": {"encoding": "audio/pcmu", "sample_rate": 8000},
                "keyterms": ["Acme"],
                "turn_detection": {
                    "type": "server_vad",
                    "vad_threshold": 0.4,
                    "min_silence": 400,
                    "max_silence": 2000,
                    "interrupt_response": False,
                },
            },
            "output": {"voice": {"voice_id": "ivy"}, "format": {"encoding": "audio/pcma"},
                       "volume": 80},
            "tools": [
                {"type": "function", "name": "get_weather", "description": "Weather",
                 "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}},
                {"name": "lookup", "http": {"url": "https://tools.example.com/x",
                 "http_method": "get", "headers": {"Authorization": "Bearer s3cret"}},
                 "timeout_seconds": 5},
            ],
            "llm": [{"base_url": "https://api.example.com/v1", "model": "m", "api_key": "sk-1"}],
        },
    }  # fmt: skip
    event = ev.decode_client_event(dumps(doc))
    assert isinstance(event, ev.SessionUpdate)
    s = event.session
    assert s.agent_id is None
    assert s.system_prompt == "You are concise."
    assert s.greeting == "Hi — how can I help?"
    assert s.input == ev.InputPatch(
        format=ev.AudioFormat(encoding="audio/pcmu"),
        keyterms=("Acme",),
        turn_detection=ev.TurnDetectionPatch(
            vad_threshold=0.4, min_silence=400, max_silence=2000, interrupt_response=False
        ),
    )
    assert s.output == ev.OutputPatch(
        voice="ivy", format=ev.AudioFormat(encoding="audio/pcma"), volume=80.0
    )
    assert s.output.format is not None
    assert s.output.format.sample_rate == 8000
    assert s.tools is not None
    assert [t.name for t in s.tools] == ["get_weather", "lookup"]
    assert s.tools[0].http is None
    assert s.tools[0].timeout_seconds == 120.0
    http = s.tools[1].http
    assert http is not None
    assert (http.url, http.method) == ("https://tools.example.com/x", "GET")
    assert http.headers == {"Authorization": Secret("Bearer s3cret")}
    assert s.tools[1].timeout_seconds == 5.0
    assert s.llm == (
        ev.LLMSpec(base_url="https://api.example.com/v1", model="m", api_key=Secret("sk-1")),
    )
    assert s.keys == frozenset({"system_prompt", "greeting", "input", "output", "tools", "llm"})
    # Accepted without effect, and reported (never silently dropped).
    assert s.ignored == ("session.input.turn_detection.type",)
    assert "sk-1" not in repr(event)
    assert "s3cret" not in repr(event)


@pytest.mark.parametrize(
    ("session", "code", "param", "words"),
    [
        ({"webhook": {"url": "https://h.example.com", "events": ["session.started"]}},
         "invalid_config", "session.webhook", "not supported"),
        ({"pre_connect_requests": []}, "invalid_config", "session.pre_connect_requests",
         "telephony"),
        ({"output": {"type": "text"}}, "invalid_value", "session.output.type", "text-only"),
        ({"tools": [{"name": "pay", "execution_mode": "hold"}]}, "invalid_value",
         "session.tools[0].execution_mode", "hold"),
        ({"tools": [{"name": "pin", "dtmf_collected_arguments": []}]}, "invalid_config",
         "session.tools[0].dtmf_collected_arguments", "DTMF"),
    ],
)  # fmt: skip
def test_fields_this_server_cannot_honour_are_refused_by_name(
    session: dict[str, object], code: str, param: str, words: str
) -> None:
    with pytest.raises(ev.ProtocolError) as caught:
        ev.decode_client_event(dumps({"type": "session.update", "session": session}))
    assert (caught.value.code, caught.value.param) == (code, param)
    assert param in caught.value.message and words in caught.value.message


def test_fields_without_effect_are_listed() -> None:
    event = ev.decode_client_event(dumps({"type": "session.update", "session": {
        "input": {"transcription_mode": "max_accuracy", "language_codes": ["en"],
                  "voice_focus": "near-field", "continuous_partials": True,
                  "turn_detection": {"interruption_delay": 200}},
        "tools": [{"name": "t", "response_instructions": {"success": "Say done."}}],
    }}))  # fmt: skip
    assert isinstance(event, ev.SessionUpdate)
    assert event.session.ignored == (
        "session.input.transcription_mode",
        "session.input.language_codes",
        "session.input.voice_focus",
        "session.input.continuous_partials",
        "session.input.turn_detection.interruption_delay",
        "session.tools[0].response_instructions",
    )


def test_fields_this_server_does_not_know_are_listed() -> None:
    event = ev.decode_client_event(dumps({"type": "session.update", "session": {
        "system_prompt": "Be brief.", "foo": 1,
        "input": {"bar": 2, "format": {"encoding": "audio/pcm", "rate": 24000},
                  "turn_detection": {"min_silense": 300, "min_silence": 400}},
        "output": {"volume": 50, "colour": "blue"},
        "llm": [{"base_url": "https://api.example.com/v1", "model": "m", "temprature": 0.2}],
    }}))  # fmt: skip
    assert isinstance(event, ev.SessionUpdate)
    assert event.session.ignored == (
        "session.foo",
        "session.input.bar",
        "session.input.turn_detection.min_silense",
        "session.input.format.rate",
        "session.output.colour",
        "session.llm[0].temprature",
    )
    assert event.session.input is not None and event.session.input.turn_detection is not None
    assert event.session.input.turn_detection.min_silence == 400


def test_stored_agent_bind_must_be_alone() -> None:
    event = ev.decode_client_event(dumps({"type": "session.update", "session": {"agent_id": "a1"}}))
    assert isinstance(event, ev.SessionUpdate)
    assert event.session.agent_id == "a1"
    assert event.session.keys == frozenset({"agent_id"})
    err = error_of(
        dumps({"type": "session.update", "session": {"agent_id": "a1", "greeting": "x"}})
    )
    assert (err.code, err.param) == ("invalid_config", "session.agent_id")
    err = error_of(dumps({"type": "session.update", "session": {"agent_id": ""}}))
    assert (err.code, err.param) == ("invalid_value", "session.agent_id")


def test_explicit_null_greeting_is_told_apart_from_absent() -> None:
    a = ev.decode_client_event(dumps({"type": "session.update", "session": {"greeting": None}}))
    b = ev.decode_client_event(dumps({"type": "session.update", "session": {}}))
    assert isinstance(a, ev.SessionUpdate)
    assert isinstance(b, ev.SessionUpdate)
    assert "greeting" in a.session.keys
    assert "greeting" not in b.session.keys


def test_older_top_level_voice_string() -> None:
    event = ev.decode_client_event(
        dumps({"type": "session.update", "session": {"voice": "ivy", "output": {"volume": 5}}})
    )
    assert isinstance(event, ev.SessionUpdate)
    assert event.session.output == ev.OutputPatch(voice="ivy", volume=5.0)


def test_other_client_events() -> None:
    audio = bytes(range(256))
    cases: list[tuple[dict[str, Any], ev.ClientEvent]] = [
        ({"type": "session.resume", "session_id": "sess_1"}, ev.SessionResume(session_id="sess_1")),
        ({"type": "input.audio", "audio": base64.b64encode(audio).decode()},
         ev.InputAudio(audio=audio)),
        ({"type": "tool.result", "call_id": "c1", "result": "{\"t\": 1}"},
         ev.ToolResult(call_id="c1", result='{"t": 1}')),
        ({"type": "tool.result", "call_id": "c1", "result": {"t": 1}, "is_error": True},
         ev.ToolResult(call_id="c1", result='{"t": 1}', is_error=True)),
        ({"type": "reply.create"}, ev.ReplyCreate()),
        ({"type": "reply.create", "instructions": "Be brief."},
         ev.ReplyCreate(instructions="Be brief.")),
        ({"type": "conversation.message", "role": "system", "content": "x"},
         ev.ConversationMessage(role="system", content="x")),
        ({"type": "reply.cancel", "reply_id": "r1"}, ev.ReplyCancel(reply_id="r1")),
        ({"type": "reply.cancel"}, ev.ReplyCancel()),
        ({"type": "session.end", "extra": 1}, ev.SessionEnd()),
    ]  # fmt: skip
    for doc, expected in cases:
        assert ev.decode_client_event(dumps(doc)) == expected
        assert ev.decode_client_event(ev.encode(expected)) == expected


@pytest.mark.parametrize(
    ("text", "code", "param"),
    [
        ("not json", "invalid_format", None),
        ("[1, 2]", "invalid_format", None),
        ("{}", "invalid_format", "type"),
        ('{"type": 5}', "invalid_format", "type"),
        ('{"type": "bogus.event"}', "invalid_format", "type"),
        ('{"type": "session.update"}', "invalid_format", "session"),
        ('{"type": "session.update", "session": []}', "invalid_value", "session"),
        ('{"type": "session.update", "session": {"system_prompt": 3}}', "invalid_value",
         "session.system_prompt"),
        ('{"type": "session.update", "session": {"output": {"volume": 101}}}', "invalid_value",
         "session.output.volume"),
        ('{"type": "session.update", "session": {"output": {"volume": true}}}', "invalid_value",
         "session.output.volume"),
        ('{"type": "session.update", "session": {"output": {"voice": 7}}}', "invalid_value",
         "session.output.voice"),
        ('{"type": "session.update", "session": {"input": {"format": {"encoding": "audio/ogg"}}}}',
         "invalid_value", "session.input.format.encoding"),
        ('{"type": "session.update", "session": {"input": {"format": {"encoding": "audio/pcm",'
         ' "sample_rate": 16000}}}}', "invalid_value", "session.input.format.sample_rate"),
        ('{"type": "session.update", "session": {"input": {"turn_detection": {"min_silence":'
         ' 3000, "max_silence": 100}}}}', "invalid_config",
         "session.input.turn_detection.min_silence"),
        ('{"type": "session.update", "session": {"input": {"turn_detection": {"min_silence":'
         ' 10.5}}}}', "invalid_value", "session.input.turn_detection.min_silence"),
        ('{"type": "session.update", "session": {"tools": [{"name": "a"}, {"name": "a"}]}}',
         "invalid_config", "session.tools"),
        ('{"type": "session.update", "session": {"tools": [{"description": "x"}]}}',
         "invalid_format", "session.tools[0].name"),
        ('{"type": "session.update", "session": {"llm": [' + ", ".join(["{}"] * 9) + "]}}",
         "invalid_config", "session.llm"),
        ('{"type": "input.audio"}', "invalid_format", "audio"),
        ('{"type": "input.audio", "audio": "***"}', "invalid_audio", "audio"),
        ('{"type": "input.audio", "audio": 12}', "invalid_audio", "audio"),
        ('{"type": "tool.result", "result": "x"}', "invalid_format", "call_id"),
        ('{"type": "tool.result", "call_id": "c"}', "invalid_format", "result"),
        ('{"type": "tool.result", "call_id": "c", "result": "", "is_error": "no"}',
         "invalid_value", "is_error"),
        ('{"type": "conversation.message", "role": "assistant", "content": "x"}',
         "invalid_value", "role"),
        ('{"type": "reply.create", "instructions": []}', "invalid_value", "instructions"),
        ('{"type": "session.resume", "session_id": 1}', "invalid_value", "session_id"),
    ],
)  # fmt: skip
def test_malformed_messages_get_typed_errors(text: str, code: str, param: str | None) -> None:
    err = error_of(text)
    assert (err.code, err.param) == (code, param)
    assert err.message


def test_size_limit_and_binary_text() -> None:
    big = dumps({"type": "reply.create", "instructions": "x" * 100})
    assert ev.decode_client_event(big, max_chars=len(big)) == ev.ReplyCreate(instructions="x" * 100)
    err = error_of(big, max_chars=len(big) - 1)
    assert (err.code, err.param) == ("invalid_format", "message")
    assert error_of(b"\xff\xfe").code == "invalid_format"
    assert error_of("[" * 100_000).code == "invalid_format"


def test_session_update_round_trips_through_encode() -> None:
    patch = ev.SessionPatch(
        keys=frozenset({"system_prompt", "greeting", "tools", "input", "output", "llm"}),
        system_prompt="p",
        greeting=None,
        tools=(
            ev.ToolSpec(
                name="t",
                http=ev.HttpToolSpec(url="https://x.example/a", headers={"X-Key": Secret("v")}),
            ),
        ),
        input=ev.InputPatch(
            format=ev.AudioFormat(encoding="audio/pcmu"),
            keyterms=("a",),
            turn_detection=ev.TurnDetectionPatch(min_silence=100),
        ),
        output=ev.OutputPatch(voice="ivy", volume=50.0, format=ev.AudioFormat()),
        llm=(ev.LLMSpec(base_url="https://e.example/v1", model="m", api_key=Secret("k")),),
    )
    event = ev.SessionUpdate(session=patch)
    assert ev.decode_client_event(ev.encode(event)) == event


# -- server events ---------------------------------------------------------------------------


SERVER_EVENTS: list[ev.ServerEvent] = [
    ev.SessionReady(session_id="s", config={"a": 1}, expires_at=10, resume_token="t",
                    timestamp=1.5),
    ev.SessionReady(session_id="s"),
    ev.SessionUpdated(config={"b": [1]}),
    ev.SessionError(code="invalid_format", message="m", param="type", timestamp=2.0),
    ev.SessionEnded(session_duration_seconds=3.5, audio_duration_seconds=None, timestamp=3.0),
    ev.SessionEnded(session_duration_seconds=3.5, audio_duration_seconds=2.0),
    ev.InputSpeechStarted(),
    ev.InputSpeechStopped(timestamp=4.0),
    ev.TranscriptUserDelta(text="hel", item_id="i1"),
    ev.TranscriptUser(text="hello", item_id="i1"),
    ev.ReplyStarted(reply_id="r", item_id="i2"),
    ev.ReplyAudio(data=b"\x00\x01\xff", reply_id="r"),
    ev.TranscriptAgentDelta(delta="Hi.", reply_id="r", item_id="i2", start_ms=0, end_ms=420),
    ev.TranscriptAgentDelta(delta="Hi."),
    ev.TranscriptAgent(text="Hi.", reply_id="r", item_id="i2", interrupted=True),
    ev.ReplyDone(reply_id="r", status="interrupted"),
    ev.ToolCall(call_id="c", name="n", arguments={"x": [1, {"y": None}]}, reply_id="r"),
    ev.ReplyError(code="server_error", message="HTTP 500", retryable=True, reply_id="r",
                  status_code=500),
    ev.ReplyError(code="timeout", message="m", retryable=False),
]  # fmt: skip


@pytest.mark.parametrize("event", SERVER_EVENTS, ids=lambda e: e.type)
def test_server_events_round_trip(event: ev.ServerEvent) -> None:
    text = ev.encode(event)
    doc = json.loads(text)
    assert doc["type"] == event.type
    assert ev.decode_server_event(text) == event


def test_server_wire_forms() -> None:
    assert json.loads(ev.encode(ev.ReplyAudio(data=b"\x01\x02", reply_id="r"))) == {
        "type": "reply.audio", "data": "AQI=", "reply_id": "r",
    }  # fmt: skip
    assert json.loads(ev.encode(ev.TranscriptAgentDelta(delta="x"))) == {
        "type": "transcript.agent.delta", "delta": "x", "start_ms": None, "end_ms": None,
    }  # fmt: skip
    assert json.loads(ev.encode(ev.ReplyDone())) == {"type": "reply.done", "status": "completed"}
    assert json.loads(
        ev.encode(ev.SessionEnded(session_duration_seconds=1.0, audio_duration_seconds=None))
    ) == {"type": "session.ended", "session_duration_seconds": 1.0, "audio_duration_seconds": None}
    assert json.loads(ev.encode(ev.ReplyError(code="c", message="m", retryable=False))) == {
        "type": "reply.error", "code": "c", "message": "m", "retryable": False,
        "status_code": None,
    }  # fmt: skip
    assert "resume_token" not in repr(ev.SessionReady(session_id="s", resume_token="secret"))


def test_server_decoder_is_liberal() -> None:
    legacy = ev.decode_server_event('{"type":"tool.call","call_id":"c","name":"n","args":{"a":1}}')
    assert legacy == ev.ToolCall(call_id="c", name="n", arguments={"a": 1})
    as_text = ev.decode_server_event(
        '{"type":"tool.call","call_id":"c","name":"n","arguments":"{\\"a\\":2}"}'
    )
    assert as_text == ev.ToolCall(call_id="c", name="n", arguments={"a": 2})
    assert ev.decode_server_event('{"type":"reply.done"}') == ev.ReplyDone()
    assert ev.decode_server_event('{"type":"error","code":"x","message":"y"}') == ev.SessionError(
        code="x", message="y"
    )
    unknown = ev.decode_server_event('{"type":"future.event","x":1}')
    assert unknown == ev.UnknownServerEvent(
        type="future.event", payload={"type": "future.event", "x": 1}
    )
    with pytest.raises(ev.ProtocolError):
        ev.decode_server_event('{"type":"reply.started"}')
    with pytest.raises(ev.ProtocolError):
        ev.decode_server_event('{"type":"reply.audio","data":"!!"}')


# -- property-based -------------------------------------------------------------------------

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4),
    max_leaves=12,
)  # fmt: skip
TYPES = st.sampled_from([
    "session.update", "session.resume", "input.audio", "tool.result", "reply.create",
    "conversation.message", "reply.cancel", "session.end", "bogus",
])  # fmt: skip
FIELDS = st.sampled_from([
    "session", "session_id", "audio", "call_id", "result", "is_error", "instructions", "role",
    "content", "reply_id", "agent_id", "system_prompt", "greeting", "tools", "input", "output",
    "voice", "format", "volume", "llm", "turn_detection", "encoding", "sample_rate",
])  # fmt: skip
MESSAGES = st.fixed_dictionaries(
    {"type": TYPES},
    optional={
        "session": st.dictionaries(FIELDS, JSON, max_size=5),
        "session_id": JSON, "audio": JSON | st.binary(max_size=32).map(
            lambda b: base64.b64encode(b).decode()),
        "call_id": JSON, "result": JSON, "is_error": JSON, "instructions": JSON,
        "role": st.sampled_from(["user", "system", "assistant"]) | JSON, "content": JSON,
        "reply_id": JSON,
    },
)  # fmt: skip


def outcome(data: str | bytes) -> ev.ClientEvent | ev.ProtocolError:
    try:
        return ev.decode_client_event(data)
    except ev.ProtocolError as exc:
        return exc


CLIENT_CODES = ("invalid_format", "invalid_value", "invalid_audio", "invalid_config")


@settings(max_examples=600, deadline=None)
@given(MESSAGES)
def test_decoder_gives_an_event_or_a_typed_error(doc: dict[str, Any]) -> None:
    event = outcome(json.dumps(doc))
    if isinstance(event, ev.ProtocolError):
        assert event.code in CLIENT_CODES
        assert event.message
        return
    assert event.type == doc["type"]
    # A decoded event encodes to a message that decodes to the same event
    # (unknown session keys are ignored, so only the known ones survive, and what was
    # reported as ignored is not sent again).
    again = ev.decode_client_event(ev.encode(event))
    if isinstance(event, ev.SessionUpdate):
        assert isinstance(again, ev.SessionUpdate)
        assert (
            dataclasses.replace(
                again.session, keys=event.session.keys, ignored=event.session.ignored
            )
            == event.session
        )
    else:
        assert again == event


@settings(max_examples=400, deadline=None)
@given(st.text(max_size=200) | st.binary(max_size=200))
def test_decoder_never_raises_anything_else_on_arbitrary_input(data: str | bytes) -> None:
    result = outcome(data)
    if isinstance(result, ev.ProtocolError):
        assert result.code in CLIENT_CODES
    try:
        ev.decode_server_event(data)
    except ev.ProtocolError as exc:
        error: ev.ProtocolError | None = exc
    else:
        error = None
    assert error is None or error.code in ("invalid_format", "invalid_audio")


@settings(max_examples=300, deadline=None)
@given(MESSAGES.map(json.dumps), st.data())
def test_mutated_messages_are_handled(text: str, data: st.DataObject) -> None:
    # Truncate, splice or corrupt a valid-looking message at a random point.
    i = data.draw(st.integers(0, len(text)))
    junk = data.draw(st.text(max_size=4))
    for mutated in (text[:i], text[:i] + junk + text[i:], text[:i] + text[i + 1 :]):
        result = outcome(mutated)
        assert not isinstance(result, ev.ProtocolError) or result.code in CLIENT_CODES


def test_a_bound_is_written_as_people_write_it():
    doc = {"type": "session.update", "session": {"llm": [
        {"base_url": "https://llm.example/v1", "model": "m", "max_tokens": 0}]}}  # fmt: skip
    error = error_of(dumps(doc))
    assert (error.code, error.param, str(error)) == (
        "invalid_value", "session.llm[0].max_tokens",
        "session.llm[0].max_tokens must be from 1 to 1000000",
    )  # fmt: skip
