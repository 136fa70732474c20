"""The Twilio Media Streams codec: Twilio's documented message shapes in, typed events out."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from runtime.protocol import twilio as tw

# Shaped as Twilio's "Media Streams - WebSocket Messages" examples.
CONNECTED = {"event": "connected", "protocol": "Call", "version": "1.0.0"}
START = {
    "event": "start",
    "sequenceNumber": "1",
    "start": {
        "accountSid": "AC123",
        "streamSid": "MZ18ad3ab5a668481ce02b83e7395059f0",
        "callSid": "CA123",
        "tracks": ["inbound"],
        "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
        "customParameters": {"agent_id": "agent_1", "from": "+15550001111"},
    },
    "streamSid": "MZ18ad3ab5a668481ce02b83e7395059f0",
}
PAYLOAD = bytes(range(160))
MEDIA = {
    "event": "media",
    "sequenceNumber": "3",
    "media": {
        "track": "inbound",
        "chunk": "1",
        "timestamp": "5",
        "payload": base64.b64encode(PAYLOAD).decode(),
    },
    "streamSid": "MZ1",
}
MARK = {"event": "mark", "sequenceNumber": "4", "streamSid": "MZ1", "mark": {"name": "0.320"}}
DTMF = {"event": "dtmf", "streamSid": "MZ1", "sequenceNumber": "5",
        "dtmf": {"track": "inbound_track", "digit": "1"}}  # fmt: skip
STOP = {"event": "stop", "sequenceNumber": "5", "streamSid": "MZ1",
        "stop": {"accountSid": "AC123", "callSid": "CA123"}}  # fmt: skip


def test_every_twilio_message_decodes_to_its_event() -> None:
    assert tw.decode(json.dumps(CONNECTED)) == tw.Connected(protocol="Call", version="1.0.0")
    start = tw.decode(json.dumps(START))
    assert start == tw.Start(
        stream_sid="MZ18ad3ab5a668481ce02b83e7395059f0", call_sid="CA123", account_sid="AC123",
        tracks=("inbound",), custom_parameters={"agent_id": "agent_1", "from": "+15550001111"},
    )  # fmt: skip
    assert tw.decode(json.dumps(MEDIA)) == tw.Media(
        stream_sid="MZ1", payload=PAYLOAD, track="inbound", chunk=1, timestamp_ms=5
    )
    assert tw.decode(json.dumps(MARK).encode()) == tw.Mark(stream_sid="MZ1", name="0.320")
    assert tw.decode(json.dumps(DTMF)) == tw.Dtmf(stream_sid="MZ1", digit="1")
    assert tw.decode(json.dumps(STOP)) == tw.Stop(stream_sid="MZ1", call_sid="CA123")


@pytest.mark.parametrize(
    ("text", "code", "event"),
    [
        ("{not json", "invalid_json", None),
        ("[1, 2]", "invalid_json", None),
        ('{"streamSid": "MZ1"}', "invalid_event", None),
        ('{"event": "warp"}', "invalid_event", "warp"),
        ('{"event": "media", "streamSid": "MZ1", "media": {}}', "invalid_field", "media"),
        ('{"event": "media", "streamSid": "MZ1", "media": {"payload": "!!"}}', "invalid_field",
         "media"),
        ('{"event": "media", "media": {"payload": ""}}', "invalid_field", "media"),
        ('{"event": "mark", "streamSid": "MZ1", "mark": "x"}', "invalid_field", "mark"),
        ('{"event": "dtmf", "streamSid": "MZ1", "dtmf": {"digit": "x"}}', "invalid_field", "dtmf"),
        ('{"event": "start", "streamSid": "MZ1", "start": {}}', "invalid_field", "start"),
        ('{"event": "start", "start": {"callSid": "CA1"}}', "invalid_field", "start"),
        ('{"event": "stop"}', "invalid_field", "stop"),
    ],
)  # fmt: skip
def test_malformed_messages_are_typed_errors(text: str, code: str, event: str | None) -> None:
    with pytest.raises(tw.TwilioProtocolError) as info:
        tw.decode(text)
    assert (info.value.code, info.value.event) == (code, event)


def test_a_stream_in_another_format_is_refused() -> None:
    doc: dict[str, Any] = json.loads(json.dumps(START))
    doc["start"]["mediaFormat"]["sampleRate"] = 16000
    with pytest.raises(tw.TwilioProtocolError) as info:
        tw.decode(json.dumps(doc))
    assert info.value.code == "unsupported_format"


def test_outbound_messages_have_twilios_shapes() -> None:
    frames = bytes([0xFF]) * 320
    assert json.loads(tw.media("MZ1", frames)) == {
        "event": "media", "streamSid": "MZ1",
        "media": {"payload": base64.b64encode(frames).decode()},
    }  # fmt: skip
    assert json.loads(tw.mark("MZ1", "0.320")) == {
        "event": "mark",
        "streamSid": "MZ1",
        "mark": {"name": "0.320"},
    }
    assert json.loads(tw.clear("MZ1")) == {"event": "clear", "streamSid": "MZ1"}
    for bad in (b"", b"\xff" * 100):
        with pytest.raises(ValueError, match="whole 20 ms frames"):
            tw.media("MZ1", bad)


def test_twiml_documents() -> None:
    assert tw.connect_stream_twiml(
        "wss://v.example.com/twilio/media", {"agent_id": "a&b", "from": '+1"5'}
    ) == (
        '<?xml version="1.0" encoding="UTF-8"?><Response><Connect>'
        '<Stream url="wss://v.example.com/twilio/media">'
        '<Parameter name="agent_id" value="a&amp;b"/><Parameter name="from" value=\'+1"5\'/>'
        "</Stream></Connect></Response>"
    )
    assert tw.say_hangup_twiml("No <agent>.") == (
        '<?xml version="1.0" encoding="UTF-8"?>'
        "<Response><Say>No &lt;agent&gt;.</Say><Hangup/></Response>"
    )


@given(st.text(max_size=200) | st.binary(max_size=200).map(lambda b: b.decode("latin-1")))
def test_any_text_is_an_event_or_a_typed_error(text: str) -> None:
    code: str | None = None
    try:
        event = tw.decode(text)
    except tw.TwilioProtocolError as exc:
        code = exc.code
    else:
        assert isinstance(event, tw.Connected | tw.Start | tw.Media | tw.Mark | tw.Dtmf | tw.Stop)
    assert code in (None, "invalid_json", "invalid_event", "invalid_field", "unsupported_format")
