"""Twilio Media Streams, the pure codec: JSON text in, typed events out; messages out as text.

Theory of operation
-------------------
A bidirectional stream (TwiML ``<Connect><Stream>``) is one WebSocket on which
Twilio sends JSON text messages, each with an ``event`` field
(Twilio docs, "Media Streams - WebSocket Messages"):

* ``connected`` — first, once: ``protocol`` ("Call"), ``version``;
* ``start`` — once: ``streamSid``, ``start.callSid``, ``start.accountSid``,
  ``start.tracks``, ``start.customParameters`` (the TwiML ``<Parameter>``s) and
  ``start.mediaFormat`` (``audio/x-mulaw``, 8000 Hz, 1 channel);
* ``media`` — the caller's audio: ``media.payload`` is base64 G.711 μ-law,
  ``media.chunk`` counts from 1, ``media.timestamp`` is ms since the stream began;
* ``mark`` — the echo of a ``mark`` we sent, once the audio queued before it has
  played (or once a ``clear`` dropped it: an echo says nothing about hearing);
* ``dtmf`` — a key the caller pressed: ``dtmf.digit``;
* ``stop`` — the stream is over (the caller hung up, or the call was redirected).

The server sends ``media`` (base64 μ-law, 8 kHz), ``mark`` (``mark.name``) and
``clear`` (drop every buffered ``media``), each naming the ``streamSid``.

:func:`decode` turns one text message into one :data:`InboundEvent`, or raises
:class:`TwilioProtocolError` with a code saying what was wrong; nothing here
touches a socket or a clock. :func:`media`, :func:`mark` and :func:`clear`
build the outbound messages; :func:`connect_stream_twiml` and
:func:`say_hangup_twiml` build the TwiML documents the voice webhook answers.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal
from xml.sax.saxutils import escape, quoteattr

MULAW: Final = "audio/x-mulaw"
RATE: Final = 8000
FRAME_BYTES: Final = 160  # 20 ms of 8 kHz μ-law
SILENCE: Final = 0xFF  # μ-law's own silence code (+0)
DTMF_DIGITS: Final = frozenset("0123456789*#ABCD")
# The largest message accepted: a few seconds of audio in one media message.
MAX_MESSAGE_CHARS: Final = 256 * 1024

ErrorCode = Literal["invalid_json", "invalid_event", "invalid_field", "unsupported_format"]


class TwilioProtocolError(Exception):
    """A message Twilio should not have sent (the remote peer's fault).

    Attributes:
        code: ``invalid_json`` (not a JSON object), ``invalid_event`` (no or an
            unknown ``event``), ``invalid_field`` (a field missing or of the
            wrong type), ``unsupported_format`` (a ``start`` with a media format
            other than 8 kHz mono μ-law).
        message: one line, safe to log (no payloads).
        event: the message's ``event`` when it had one.
    """

    def __init__(self, code: ErrorCode, message: str, event: str | None = None) -> None:
        super().__init__(message)
        self.code: ErrorCode = code
        self.message = message
        self.event = event


@dataclass(frozen=True, slots=True, kw_only=True)
class Connected:
    protocol: str
    version: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Start:
    """The stream began. ``custom_parameters`` are the TwiML ``<Parameter>``s."""

    stream_sid: str
    call_sid: str
    account_sid: str
    tracks: tuple[str, ...]
    custom_parameters: Mapping[str, str] = field(default_factory=dict)
    encoding: str = MULAW
    sample_rate: int = RATE
    channels: int = 1


@dataclass(frozen=True, slots=True, kw_only=True)
class Media:
    """Caller audio: ``payload`` is G.711 μ-law at 8 kHz (usually 160 bytes, 20 ms)."""

    stream_sid: str
    payload: bytes
    track: str = "inbound"
    chunk: int | None = None
    timestamp_ms: int | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Mark:
    stream_sid: str
    name: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Dtmf:
    stream_sid: str
    digit: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Stop:
    stream_sid: str
    call_sid: str | None = None


InboundEvent = Connected | Start | Media | Mark | Dtmf | Stop


def _obj(value: Any, where: str, event: str) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        raise TwilioProtocolError("invalid_field", f"{where} must be an object", event)
    return value


def _str(doc: Mapping[str, Any], key: str, where: str, event: str) -> str:
    value = doc.get(key)
    if not isinstance(value, str) or not value:
        raise TwilioProtocolError("invalid_field", f"{where}.{key} must be a string", event)
    return value


def _opt_int(doc: Mapping[str, Any], key: str) -> int | None:
    value = doc.get(key)
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and value.isdigit():
        return int(value)  # Twilio sends chunk and timestamp as strings
    return None


def decode(text: str | bytes) -> InboundEvent:
    """One Media Streams message → one typed event.

    Args:
        text: the WebSocket text message (bytes are read as UTF-8).

    Returns:
        :class:`Connected`, :class:`Start`, :class:`Media`, :class:`Mark`,
        :class:`Dtmf` or :class:`Stop`.

    Raises:
        TwilioProtocolError: the message is not one of those, well formed.
    """
    if len(text) > MAX_MESSAGE_CHARS:
        raise TwilioProtocolError("invalid_json", "message too large")
    try:
        doc = json.loads(text)
    except (ValueError, UnicodeDecodeError):
        raise TwilioProtocolError("invalid_json", "not JSON") from None
    if not isinstance(doc, dict):
        raise TwilioProtocolError("invalid_json", "not a JSON object")
    event = doc.get("event")
    if not isinstance(event, str):
        raise TwilioProtocolError("invalid_event", "no event field")
    match event:
        case "connected":
            return Connected(
                protocol=str(doc.get("protocol", "")), version=str(doc.get("version", ""))
            )
        case "start":
            return _start(doc)
        case "media":
            sid = _str(doc, "streamSid", "message", event)
            body = _obj(doc.get("media"), "media", event)
            raw = body.get("payload")
            if not isinstance(raw, str):
                raise TwilioProtocolError("invalid_field", "media.payload must be base64", event)
            try:
                payload = base64.b64decode(raw, validate=True)
            except (binascii.Error, ValueError):
                raise TwilioProtocolError(
                    "invalid_field", "media.payload must be base64", event
                ) from None
            track = body.get("track", "inbound")
            return Media(
                stream_sid=sid, payload=payload,
                track=track if isinstance(track, str) else "inbound",
                chunk=_opt_int(body, "chunk"), timestamp_ms=_opt_int(body, "timestamp"),
            )  # fmt: skip
        case "mark":
            sid = _str(doc, "streamSid", "message", event)
            body = _obj(doc.get("mark"), "mark", event)
            return Mark(stream_sid=sid, name=_str(body, "name", "mark", event))
        case "dtmf":
            sid = _str(doc, "streamSid", "message", event)
            body = _obj(doc.get("dtmf"), "dtmf", event)
            digit = _str(body, "digit", "dtmf", event)
            if digit not in DTMF_DIGITS:
                raise TwilioProtocolError("invalid_field", "dtmf.digit is not a key", event)
            return Dtmf(stream_sid=sid, digit=digit)
        case "stop":
            sid = _str(doc, "streamSid", "message", event)
            stop = doc.get("stop")
            call = stop.get("callSid") if isinstance(stop, dict) else None
            return Stop(stream_sid=sid, call_sid=call if isinstance(call, str) else None)
    raise TwilioProtocolError("invalid_event", f"unknown event {event[:40]!r}", event[:40])


def _start(doc: Mapping[str, Any]) -> Start:
    event = "start"
    body = _obj(doc.get("start"), "start", event)
    sid = doc.get("streamSid") or body.get("streamSid")
    if not isinstance(sid, str) or not sid:
        raise TwilioProtocolError("invalid_field", "start.streamSid must be a string", event)
    params = body.get("customParameters") or {}
    if not isinstance(params, dict):
        raise TwilioProtocolError(
            "invalid_field", "start.customParameters must be an object", event
        )
    fmt = _obj(body.get("mediaFormat") or {}, "start.mediaFormat", event)
    encoding = fmt.get("encoding", MULAW)
    rate = _opt_int(fmt, "sampleRate") or RATE
    channels = _opt_int(fmt, "channels") or 1
    if encoding != MULAW or rate != RATE or channels != 1:
        raise TwilioProtocolError(
            "unsupported_format", "start.mediaFormat must be audio/x-mulaw, 8000 Hz, mono", event
        )
    tracks = body.get("tracks") or ["inbound"]
    return Start(
        stream_sid=sid,
        call_sid=_str(body, "callSid", "start", event),
        account_sid=str(body.get("accountSid", "")),
        tracks=tuple(str(t) for t in tracks) if isinstance(tracks, list) else ("inbound",),
        custom_parameters={str(k): str(v) for k, v in params.items()},
        encoding=encoding, sample_rate=rate, channels=channels,
    )  # fmt: skip


# -- server -> Twilio --------------------------------------------------------------------------


def media(stream_sid: str, payload: bytes) -> str:
    """A ``media`` message: ``payload`` is μ-law at 8 kHz, a whole number of 20 ms frames.

    Raises:
        ValueError: ``payload`` is not a whole number of 160-byte frames.
    """
    if not payload or len(payload) % FRAME_BYTES:
        raise ValueError(f"a media payload is whole 20 ms frames, not {len(payload)} bytes")
    data = base64.b64encode(payload).decode("ascii")
    return json.dumps({"event": "media", "streamSid": stream_sid, "media": {"payload": data}})


def mark(stream_sid: str, name: str) -> str:
    """A ``mark`` message; Twilio echoes it once the audio sent before it has played."""
    return json.dumps({"event": "mark", "streamSid": stream_sid, "mark": {"name": name}})


def clear(stream_sid: str) -> str:
    """A ``clear`` message: Twilio drops the audio it holds and echoes the pending marks."""
    return json.dumps({"event": "clear", "streamSid": stream_sid})


# -- TwiML -------------------------------------------------------------------------------------


def connect_stream_twiml(url: str, parameters: Mapping[str, str]) -> str:
    """``<Response><Connect><Stream url=…>`` with ``<Parameter>``s (Twilio drops a Stream
    URL's query string, so the call facts travel as parameters)."""
    params = "".join(
        f"<Parameter name={quoteattr(k)} value={quoteattr(v)}/>" for k, v in parameters.items()
    )
    return (
        '<?xml version="1.0" encoding="UTF-8"?>'
        f"<Response><Connect><Stream url={quoteattr(url)}>{params}</Stream></Connect></Response>"
    )


def say_hangup_twiml(text: str) -> str:
    """``<Response><Say>text</Say><Hangup/></Response>``."""
    return (
        '<?xml version="1.0" encoding="UTF-8"?>'
        f"<Response><Say>{escape(text)}</Say><Hangup/></Response>"
    )
