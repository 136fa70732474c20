"""The Voice Agent WebSocket events, as typed values (pure: text in, events out).

Theory of operation
-------------------
Every WebSocket frame of the Voice Agent protocol is one JSON text message
with a ``type``. This module turns such text into one frozen dataclass from a
closed set and back, in both directions:

* the server side calls :func:`decode_client_event` on what a client sent and
  :func:`encode` on the server events it emits;
* a client calls :func:`encode` on the client events it sends and
  :func:`decode_server_event` on what the server sent.

Nothing here does I/O; state-dependent rules (``agent_id`` only in the first
update, immutable fields, tool-call timing) belong to the session that holds
the state. What *is* checked here is everything one message shows on its own:
JSON syntax, the ``type``, field types and ranges, base64 audio, and that a
stored-agent bind carries ``agent_id`` alone.

Decoding is liberal in what it accepts (the forms older clients send:
``input.type: "audio"``, ``turn_detection.type``, ``voice`` as a string or
``{"voice_id": ...}``, HTTP-tool headers as a dict or a list, ``tool.result``
results as objects, ``tool.call`` ``args``) and encoding is conservative
(always ``type``, ``arguments`` as an object, ``reply.done`` ``status``,
``reply_id``/``item_id`` wherever the current schema has them). Unknown keys
in a client message are ignored, so newer clients keep working; in ``session.update``
each is named (:func:`unknown_fields`) so that the session reports it as a warning.

A malformed client message raises :class:`ProtocolError` carrying the error
code of the protocol's error table (``invalid_format``, ``invalid_value``,
``invalid_audio``, ``invalid_config``) and the offending field as ``param``;
the server answers it with a ``session.error`` and the session goes on.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal, cast

from runtime.errors import VoiceAgentError
from runtime.safetext import unsafe_char
from runtime.secret import Secret

MAX_MESSAGE_CHARS: Final = 512 * 1024
"""The largest client message accepted (characters of JSON text)."""
MAX_DEPTH: Final = 32
"""The deepest nesting of objects and lists a client message may have (as on the REST API)."""

Encoding = Literal["audio/pcm", "audio/pcmu", "audio/pcma"]
ENCODINGS: Final[dict[str, int]] = {"audio/pcm": 24000, "audio/pcmu": 8000, "audio/pcma": 8000}
"""Each wire encoding and its (only) sample rate."""

ErrorCode = Literal[
    "unauthorized",
    "forbidden",
    "internal_error",
    "server_error",
    "at_capacity",
    "agent_init_failed",
    "agent_timeout",
    "agent_not_found",
    "agent_id_not_first",
    "session_not_found",
    "session_forbidden",
    "session_expired",
    "invalid_format",
    "invalid_audio",
    "audio_rate_violation",
    "invalid_value",
    "immutable_field",
    "invalid_config",
]
FATAL_CODES: Final[frozenset[str]] = frozenset(
    {"unauthorized", "forbidden", "agent_not_found", "session_not_found", "session_forbidden",
     "session_expired", "at_capacity", "agent_init_failed", "internal_error"}
)  # fmt: skip
"""Codes after which the server closes the socket (1008, or 1011 for ``internal_error``)."""

ReplyStatus = Literal["completed", "interrupted", "cancelled", "failed"]


class ProtocolError(VoiceAgentError):
    """A message that breaks the protocol.

    Attributes:
        code: the protocol's error code (``invalid_format``, ``invalid_value`` …).
        message: one human-readable line (never contains audio, keys or secrets).
        param: the offending field (``session.output.volume``), when there is one.
    """

    def __init__(self, code: ErrorCode, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.code: ErrorCode = code
        self.message = message
        self.param = param


# -- session configuration (session.update.session) ------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class AudioFormat:
    """One direction's wire format; the sample rate follows from the encoding."""

    encoding: Encoding = "audio/pcm"

    @property
    def sample_rate(self) -> int:
        return ENCODINGS[self.encoding]

    def to_json(self) -> dict[str, Any]:
        return {"encoding": self.encoding, "sample_rate": self.sample_rate}


@dataclass(frozen=True, slots=True, kw_only=True)
class TurnDetectionPatch:
    """``input.turn_detection``: only the fields the client set (others ``None``)."""

    vad_threshold: float | None = None
    min_silence: int | None = None
    max_silence: int | None = None
    interrupt_response: bool | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class InputPatch:
    format: AudioFormat | None = None
    keyterms: tuple[str, ...] | None = None
    turn_detection: TurnDetectionPatch | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class OutputPatch:
    voice: str | None = None
    format: AudioFormat | None = None
    volume: float | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class HttpToolSpec:
    url: str
    method: str = "POST"
    headers: Mapping[str, Secret] = field(default_factory=dict)


@dataclass(frozen=True, slots=True, kw_only=True)
class ToolSpec:
    """A tool in the protocol's flat form. ``http`` absent: a client tool."""

    name: str
    description: str = ""
    parameters: Mapping[str, Any] = field(
        default_factory=lambda: {"type": "object", "properties": {}}
    )
    execution_mode: Literal["interactive", "hold"] = "interactive"
    timeout_seconds: float = 120.0
    http: HttpToolSpec | None = None

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "type": "function",
            "name": self.name,
            "description": self.description,
            "parameters": dict(self.parameters),
            "execution_mode": self.execution_mode,
            "timeout_seconds": self.timeout_seconds,
        }
        if self.http is not None:
            doc["http"] = {"url": self.http.url, "http_method": self.http.method}
        return doc


@dataclass(frozen=True, slots=True, kw_only=True)
class LLMSpec:
    """An OpenAI-compatible endpoint and its own settings (voxloop extensions):
    ``max_tokens`` caps each reply of this entry; ``first_token_timeout_ms`` is
    how long this entry may take to its first token before it counts as failed
    (milliseconds; ``None``: the client's 4000)."""

    base_url: str
    model: str
    api_key: Secret | None = None
    # Whether the model's chat template opens a think block before every reply
    # ("auto", "template" or "none"; see runtime.llm.think).
    think_block: Literal["auto", "template", "none"] = "auto"
    max_tokens: int | None = None
    first_token_timeout_ms: int | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class SessionPatch:
    """A ``session.update`` payload: what the client set.

    Attributes:
        keys: the top-level keys present (so an explicit ``"greeting": null``
            is told apart from an absent greeting).
    """

    keys: frozenset[str]
    agent_id: str | None = None
    system_prompt: str | None = None
    greeting: str | None = None
    tools: tuple[ToolSpec, ...] | None = None
    input: InputPatch | None = None
    output: OutputPatch | None = None
    llm: tuple[LLMSpec, ...] | None = None
    ignored: tuple[str, ...] = ()
    """Fields accepted but without effect on this server (see :data:`IGNORED_INPUT`)."""


IGNORED_INPUT: Final = {
    "transcription_mode": "end-of-turn timing comes from input.turn_detection and the "
    "server's own turn model",
    "language_codes": "the recognizer detects the language itself",
    "voice_focus": "there is no server-side voice focus; audio is used as it arrives",
    "voice_focus_threshold": "there is no server-side voice focus",
    "continuous_partials": "partial transcripts are sent while the user speaks either way",
    "transcription_prompt": "the recognizer takes no prompt",
}
"""``session.input`` fields accepted without effect, and why (each gets a ``warnings`` entry)."""

IGNORED_TURN_DETECTION: Final = {
    "type": "turn detection is always semantic (silence plus the turn model)",
    "interruption_delay": "barge-in is decided by the speech detector and the turn model",
    "uninterruptible_turns": "every turn may be interrupted unless interrupt_response is false",
}
"""``session.input.turn_detection`` fields accepted without effect, and why."""

IGNORED_TOOL: Final = {
    "response_instructions": "tool results reach the model as they are; put guidance in "
    "the tool's description or the system prompt",
}

NOT_SUPPORTED: Final = {
    "webhook": "inline webhooks are not supported by this server yet",
    "pre_connect_requests": "telephony pre-connect requests are not supported yet",
    "transfer_targets": "telephony transfers are not supported yet",
    "outbound_trunk_id": "telephony trunks are not supported yet",
    "caller_id": "telephony caller ids are not supported yet",
}
"""Session (and agent) fields refused with a message naming them."""

TOOL_NOT_SUPPORTED: Final = {
    "dtmf_collected_arguments": "telephony keypad (DTMF) arguments are not supported yet",
}


def ignored_reason(param: str) -> str:
    """Why the field at ``param`` (``session.input.language_codes`` …) has no effect."""
    leaf = param.rsplit(".", 1)[-1]
    if ".turn_detection." in param:
        return IGNORED_TURN_DETECTION.get(leaf, "")
    if ".tools[" in param or param.startswith("tools["):
        return IGNORED_TOOL.get(leaf, "")
    return IGNORED_INPUT.get(leaf, "")


# -- client -> server ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class SessionUpdate:
    session: SessionPatch
    type: Literal["session.update"] = "session.update"


@dataclass(frozen=True, slots=True, kw_only=True)
class SessionResume:
    session_id: str
    type: Literal["session.resume"] = "session.resume"


@dataclass(frozen=True, slots=True, kw_only=True)
class InputAudio:
    audio: bytes = field(repr=False)  # decoded, in the input encoding
    type: Literal["input.audio"] = "input.audio"


@dataclass(frozen=True, slots=True, kw_only=True)
class ToolResult:
    call_id: str
    result: str
    is_error: bool = False
    type: Literal["tool.result"] = "tool.result"


@dataclass(frozen=True, slots=True, kw_only=True)
class ReplyCreate:
    instructions: str | None = None
    type: Literal["reply.create"] = "reply.create"


@dataclass(frozen=True, slots=True, kw_only=True)
class ConversationMessage:
    role: Literal["user", "system"]
    content: str
    type: Literal["conversation.message"] = "conversation.message"


@dataclass(frozen=True, slots=True, kw_only=True)
class ReplyCancel:
    reply_id: str | None = None
    type: Literal["reply.cancel"] = "reply.cancel"


@dataclass(frozen=True, slots=True, kw_only=True)
class SessionEnd:
    type: Literal["session.end"] = "session.end"


ClientEvent = (
    SessionUpdate
    | SessionResume
    | InputAudio
    | ToolResult
    | ReplyCreate
    | ConversationMessage
    | ReplyCancel
    | SessionEnd
)

# -- server -> client ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class SessionReady:
    session_id: str
    config: Mapping[str, Any] | None = None
    expires_at: int | None = None
    resume_token: str | None = field(default=None, repr=False)
    timestamp: float | None = None
    type: Literal["session.ready"] = "session.ready"


@dataclass(frozen=True, slots=True, kw_only=True)
class SessionUpdated:
    config: Mapping[str, Any] | None = None
    timestamp: float | None = None
    type: Literal["session.updated"] = "session.updated"


@dataclass(frozen=True, slots=True, kw_only=True)
class SessionError:
    code: str
    message: str
    param: str | None = None
    session_id: str | None = None
    timestamp: float | None = None
    type: Literal["session.error"] = "session.error"


@dataclass(frozen=True, slots=True, kw_only=True)
class SessionEnded:
    session_duration_seconds: float
    audio_duration_seconds: float | None
    timestamp: float | None = None
    type: Literal["session.ended"] = "session.ended"


@dataclass(frozen=True, slots=True, kw_only=True)
class InputSpeechStarted:
    timestamp: float | None = None
    type: Literal["input.speech.started"] = "input.speech.started"


@dataclass(frozen=True, slots=True, kw_only=True)
class InputSpeechStopped:
    timestamp: float | None = None
    type: Literal["input.speech.stopped"] = "input.speech.stopped"


@dataclass(frozen=True, slots=True, kw_only=True)
class TranscriptUserDelta:
    text: str  # the whole partial so far (replace, do not append)
    item_id: str | None = None
    timestamp: float | None = None
    type: Literal["transcript.user.delta"] = "transcript.user.delta"


@dataclass(frozen=True, slots=True, kw_only=True)
class TranscriptUser:
    text: str
    item_id: str
    timestamp: float | None = None
    type: Literal["transcript.user"] = "transcript.user"


@dataclass(frozen=True, slots=True, kw_only=True)
class ReplyStarted:
    reply_id: str
    item_id: str | None = None
    timestamp: float | None = None
    type: Literal["reply.started"] = "reply.started"


@dataclass(frozen=True, slots=True, kw_only=True)
class ReplyAudio:
    data: bytes = field(repr=False)  # raw audio in the output encoding (base64 on the wire)
    reply_id: str | None = None
    timestamp: float | None = None
    type: Literal["reply.audio"] = "reply.audio"


@dataclass(frozen=True, slots=True, kw_only=True)
class TranscriptAgentDelta:
    delta: str
    reply_id: str | None = None
    item_id: str | None = None
    start_ms: int | None = None  # position in the reply's audio
    end_ms: int | None = None
    timestamp: float | None = None
    type: Literal["transcript.agent.delta"] = "transcript.agent.delta"


@dataclass(frozen=True, slots=True, kw_only=True)
class TranscriptAgent:
    text: str
    reply_id: str | None = None
    item_id: str | None = None
    interrupted: bool = False
    timestamp: float | None = None
    type: Literal["transcript.agent"] = "transcript.agent"


@dataclass(frozen=True, slots=True, kw_only=True)
class ReplyDone:
    reply_id: str | None = None
    status: ReplyStatus = "completed"
    timestamp: float | None = None
    type: Literal["reply.done"] = "reply.done"


@dataclass(frozen=True, slots=True, kw_only=True)
class ToolCall:
    call_id: str
    name: str
    arguments: Mapping[str, Any]
    reply_id: str | None = None
    timestamp: float | None = None
    type: Literal["tool.call"] = "tool.call"


@dataclass(frozen=True, slots=True, kw_only=True)
class ReplyError:
    code: str
    message: str
    retryable: bool
    reply_id: str | None = None
    status_code: int | None = None
    provider_code: str | None = None
    provider_param: str | None = None
    timestamp: float | None = None
    type: Literal["reply.error"] = "reply.error"


@dataclass(frozen=True, slots=True, kw_only=True)
class UnknownServerEvent:
    """A server event of a type this codec does not know (newer servers); clients skip it."""

    type: str
    payload: Mapping[str, Any]


ServerEvent = (
    SessionReady
    | SessionUpdated
    | SessionError
    | SessionEnded
    | InputSpeechStarted
    | InputSpeechStopped
    | TranscriptUserDelta
    | TranscriptUser
    | ReplyStarted
    | ReplyAudio
    | TranscriptAgentDelta
    | TranscriptAgent
    | ReplyDone
    | ToolCall
    | ReplyError
)

# -- field readers -------------------------------------------------------------------------


def _fail(param: str, message: str, code: ErrorCode = "invalid_value") -> ProtocolError:
    return ProtocolError(code, f"{param} {message}", param=param)


def _str(doc: Mapping[str, Any], key: str, param: str, *, required: bool = False) -> str | None:
    value = doc.get(key)
    if value is None:
        if required:
            raise _fail(f"{param}{key}", "is required", "invalid_format")
        return None
    if not isinstance(value, str):
        raise _fail(f"{param}{key}", "must be a string")
    return value


def _bool(doc: Mapping[str, Any], key: str, param: str) -> bool | None:
    value = doc.get(key)
    if value is None:
        return None
    if not isinstance(value, bool):
        raise _fail(f"{param}{key}", "must be a boolean")
    return value


def _number(doc: Mapping[str, Any], key: str, param: str, low: float, high: float) -> float | None:
    value = doc.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise _fail(f"{param}{key}", "must be a number")
    if not low <= value <= high:
        raise _fail(f"{param}{key}", f"must be from {_plain(low)} to {_plain(high)}")
    return float(value)


def _int(doc: Mapping[str, Any], key: str, param: str, low: int, high: int) -> int | None:
    value = _number(doc, key, param, low, high)
    if value is None:
        return None
    if not value.is_integer():
        raise _fail(f"{param}{key}", "must be an integer")
    return int(value)


def _obj(value: Any, param: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _fail(param, "must be an object")
    return value


def _format(value: Any, param: str) -> AudioFormat:
    doc = _obj(value, param)
    encoding = _str(doc, "encoding", f"{param}.") or "audio/pcm"
    if encoding not in ENCODINGS:
        raise _fail(f"{param}.encoding", f"must be one of {', '.join(ENCODINGS)}")
    rate = _int(doc, "sample_rate", f"{param}.", 1, 1_000_000)
    if rate is not None and rate != ENCODINGS[encoding]:
        raise _fail(f"{param}.sample_rate", f"must be {ENCODINGS[encoding]} for {encoding}")
    return AudioFormat(encoding=cast("Encoding", encoding))


def _input(value: Any) -> InputPatch:
    doc = _obj(value, "session.input")
    _kind(doc, "session.input", ("audio",), "(text input) is not supported yet")
    fmt = _format(doc["format"], "session.input.format") if doc.get("format") is not None else None
    keyterms = None
    if doc.get("keyterms") is not None:
        terms = doc["keyterms"]
        if not isinstance(terms, list) or not all(isinstance(t, str) for t in terms):
            raise _fail("session.input.keyterms", "must be a list of strings")
        if len(terms) > 100:
            raise _fail("session.input.keyterms", "must have at most 100 terms", "invalid_config")
        keyterms = tuple(terms)
    td = None
    if doc.get("turn_detection") is not None:
        raw = _obj(doc["turn_detection"], "session.input.turn_detection")
        p = "session.input.turn_detection."
        td = TurnDetectionPatch(
            vad_threshold=_number(raw, "vad_threshold", p, 0.0, 1.0),
            min_silence=_int(raw, "min_silence", p, 50, 10_000),
            max_silence=_int(raw, "max_silence", p, 50, 10_000),
            interrupt_response=_bool(raw, "interrupt_response", p),
        )
        if (
            td.min_silence is not None
            and td.max_silence is not None
            and td.min_silence > td.max_silence
        ):
            raise _fail(f"{p}min_silence", "must not exceed max_silence", "invalid_config")
    return InputPatch(format=fmt, keyterms=keyterms, turn_detection=td)


def _input_ignored(value: Any) -> list[str]:
    doc = value if isinstance(value, dict) else {}
    out = [f"session.input.{k}" for k in IGNORED_INPUT if doc.get(k) is not None]
    td = doc.get("turn_detection")
    if isinstance(td, dict):
        out += [
            f"session.input.turn_detection.{k}"
            for k in IGNORED_TURN_DETECTION
            if td.get(k) is not None
        ]
    return out


_KNOWN_KEYS: Final = {
    "session": {"agent_id", "system_prompt", "greeting", "tools", "input", "output", "llm",
                "voice", *NOT_SUPPORTED},
    "session.input": {"type", "format", "keyterms", "turn_detection", *IGNORED_INPUT},
    "session.input.turn_detection": {"vad_threshold", "min_silence", "max_silence",
                                     "interrupt_response", *IGNORED_TURN_DETECTION},
    "session.output": {"type", "voice", "format", "volume"},
    "format": {"encoding", "sample_rate"},
    "llm": {"base_url", "model", "api_key", "think_block", "max_tokens",
            "first_token_timeout_ms"},
}  # fmt: skip


def unknown_fields(session: Mapping[str, Any]) -> list[str]:
    """The paths of ``session.update`` fields this server does not know (a typo, or a field
    of a newer protocol): accepted, without effect, each reported as a warning."""
    out: list[str] = []

    def check(doc: Any, path: str, known: set[str] | frozenset[str]) -> None:
        if isinstance(doc, dict):
            out.extend(f"{path}.{k}" for k in doc if k not in known)

    check(session, "session", _KNOWN_KEYS["session"])
    inp, outp = session.get("input"), session.get("output")
    check(inp, "session.input", _KNOWN_KEYS["session.input"])
    if isinstance(inp, dict):
        check(inp.get("turn_detection"), "session.input.turn_detection",
              _KNOWN_KEYS["session.input.turn_detection"])  # fmt: skip
        check(inp.get("format"), "session.input.format", _KNOWN_KEYS["format"])
    check(outp, "session.output", _KNOWN_KEYS["session.output"])
    if isinstance(outp, dict):
        check(outp.get("format"), "session.output.format", _KNOWN_KEYS["format"])
    llm = session.get("llm")
    if isinstance(llm, list):
        for i, entry in enumerate(llm):
            check(entry, f"session.llm[{i}]", _KNOWN_KEYS["llm"])
    return out


def _kind(doc: Mapping[str, Any], param: str, allowed: tuple[str, ...], note: str) -> None:
    kind = doc.get("type")
    if kind is None or kind in allowed:
        return
    if kind in ("audio", "text"):
        raise ProtocolError("invalid_value", f"{param}.type {kind!r} {note}", param=f"{param}.type")
    raise _fail(f"{param}.type", 'must be "audio"')


def _voice(value: Any, param: str) -> str:
    voice = value.get("voice_id") if isinstance(value, dict) else value
    if not isinstance(voice, str) or not voice:
        raise _fail(param, 'must be a voice id or {"voice_id": "..."}')
    return voice


def _output(value: Any) -> OutputPatch:
    doc = _obj(value, "session.output")
    _kind(doc, "session.output", ("audio",), "(a text-only agent) is not supported yet")
    voice = _voice(doc["voice"], "session.output.voice") if doc.get("voice") is not None else None
    fmt = _format(doc["format"], "session.output.format") if doc.get("format") is not None else None
    volume = _number(doc, "volume", "session.output.", 0.0, 100.0)
    return OutputPatch(voice=voice, format=fmt, volume=volume)


def _headers(value: Any, param: str) -> dict[str, Secret]:
    if isinstance(value, dict):  # the older form: {"Name": "value"}
        value = [{"name": k, "value": v} for k, v in value.items()]
    if not isinstance(value, list):
        raise _fail(param, "must be a list of {name, value} or an object")
    out: dict[str, Secret] = {}
    for i, raw in enumerate(value):
        header = _obj(raw, f"{param}[{i}]")
        name = _str(header, "name", f"{param}[{i}].", required=True)
        text = _str(header, "value", f"{param}[{i}].", required=True)
        assert name is not None
        assert text is not None
        if not name or any(c in name for c in ":\r\n ") or "\r" in text or "\n" in text:
            raise _fail(f"{param}[{i}]", "is not a valid header")
        out[name] = Secret(text)
    return out


def _plain(bound: float) -> str:
    """A bound as people write it: 1000000, not 1e+06; 0.5 as is."""
    return str(int(bound)) if float(bound).is_integer() else f"{bound:g}"


def is_tool_name(name: str) -> bool:
    """Whether ``name`` can name a tool: letters, digits, ``_`` and ``-``, at least one."""
    return bool(name) and name.replace("_", "").replace("-", "").isalnum()


def _tool(value: Any, i: int) -> ToolSpec:
    param = f"session.tools[{i}]"
    doc = _obj(value, param)
    name = _str(doc, "name", f"{param}.", required=True)
    assert name is not None
    if not is_tool_name(name):
        raise _fail(f"{param}.name", "must be an identifier (letters, digits, _ and -)")
    description = _str(doc, "description", f"{param}.") or ""
    parameters = doc.get("parameters")
    if parameters is None:
        parameters = {"type": "object", "properties": {}}
    parameters = _obj(parameters, f"{param}.parameters")
    mode = _str(doc, "execution_mode", f"{param}.") or "interactive"
    if mode == "hold":
        raise ProtocolError(
            "invalid_value",
            f'{param}.execution_mode "hold" is not supported yet; use "interactive"',
            param=f"{param}.execution_mode",
        )
    if mode != "interactive":
        raise _fail(f"{param}.execution_mode", "must be interactive or hold")
    for key, why in TOOL_NOT_SUPPORTED.items():
        if doc.get(key) is not None:
            raise ProtocolError("invalid_config", f"{param}.{key}: {why}", param=f"{param}.{key}")
    timeout = _number(doc, "timeout_seconds", f"{param}.", 1, 300)
    http = None
    if doc.get("http") is not None:
        raw = _obj(doc["http"], f"{param}.http")
        url = _str(raw, "url", f"{param}.http.", required=True)
        assert url is not None
        method = (_str(raw, "http_method", f"{param}.http.") or "POST").upper()
        if method not in ("GET", "POST", "PUT", "PATCH", "DELETE"):
            raise _fail(f"{param}.http.http_method", "must be GET, POST, PUT, PATCH or DELETE")
        headers = _headers(raw.get("headers") or [], f"{param}.http.headers")
        http = HttpToolSpec(url=url, method=method, headers=headers)
    return ToolSpec(
        name=name, description=description, parameters=parameters,
        execution_mode=cast("Literal['interactive', 'hold']", mode),
        timeout_seconds=timeout if timeout is not None else 120.0, http=http,
    )  # fmt: skip


FIRST_TOKEN_TIMEOUT_MS: Final = (100, 30_000)
"""The bounds of an ``llm`` entry's ``first_token_timeout_ms`` (milliseconds, inclusive)."""

MAX_LLM_ENTRIES: Final = 8
"""The most ``llm`` entries (an endpoint and its fallbacks, in order) a session may carry."""


SINGLE_ENTRY_MESSAGE: Final = (
    "this server accepts one llm entry (VOXLOOP_LLM_SINGLE_ENTRY is set): "
    "fallback endpoints are turned off"
)
"""Why a second ``llm`` entry is refused on a server that keeps the one-entry rule."""


def _llm(value: Any) -> tuple[LLMSpec, ...]:
    if isinstance(value, dict):  # one entry given as an object
        value = [value]
    if not isinstance(value, list):
        raise _fail("session.llm", "must be a list")
    if len(value) > MAX_LLM_ENTRIES:
        raise _fail("session.llm", f"accepts at most {MAX_LLM_ENTRIES} entries", "invalid_config")
    out = []
    for i, raw in enumerate(value):
        param = f"session.llm[{i}]."
        doc = _obj(raw, f"session.llm[{i}]")
        base_url = _str(doc, "base_url", param, required=True)
        model = _str(doc, "model", param, required=True)
        key = _str(doc, "api_key", param)
        think = _str(doc, "think_block", param) or "auto"
        if think not in ("auto", "template", "none"):
            raise _fail(f"{param}think_block", "must be 'auto', 'template' or 'none'")
        max_tokens = _int(doc, "max_tokens", param, 1, 1_000_000)
        first_token_ms = _int(doc, "first_token_timeout_ms", param, *FIRST_TOKEN_TIMEOUT_MS)
        assert base_url is not None
        assert model is not None
        out.append(
            LLMSpec(
                base_url=base_url, model=model, api_key=Secret(key) if key else None,
                think_block=cast("Literal['auto', 'template', 'none']", think),
                max_tokens=max_tokens, first_token_timeout_ms=first_token_ms,
            )
        )  # fmt: skip
    return tuple(out)


def parse_session(value: Any) -> SessionPatch:
    """Validate a session configuration object (``session.update.session``, a stored agent).

    Raises:
        ProtocolError: as :func:`decode_client_event` does for a ``session.update``.
    """
    doc = _obj(value, "session")
    keys = frozenset(doc)
    agent_id = _str(doc, "agent_id", "session.")
    if "agent_id" in doc:
        if not agent_id:
            raise _fail("session.agent_id", "must be a non-empty string")
        if len(keys) > 1:
            raise ProtocolError(
                "invalid_config",
                "session.agent_id must be the only key of a stored-agent bind",
                param="session.agent_id",
            )
        return SessionPatch(keys=keys, agent_id=agent_id)
    for key, why in NOT_SUPPORTED.items():
        if doc.get(key) is not None:
            raise ProtocolError("invalid_config", f"session.{key}: {why}", param=f"session.{key}")
    ignored: list[str] = unknown_fields(doc)
    if doc.get("input") is not None:
        ignored += _input_ignored(doc["input"])
    tools = None
    if doc.get("tools") is not None:
        if not isinstance(doc["tools"], list):
            raise _fail("session.tools", "must be a list")
        tools = tuple(_tool(t, i) for i, t in enumerate(doc["tools"]))
        ignored += [
            f"session.tools[{i}].{k}"
            for i, t in enumerate(doc["tools"])
            for k in IGNORED_TOOL
            if t.get(k) is not None
        ]
        if len({t.name for t in tools}) != len(tools):
            raise _fail("session.tools", "must have unique names", "invalid_config")
    output = _output(doc["output"]) if doc.get("output") is not None else None
    if doc.get("voice") is not None:  # the older top-level form
        voice = _voice(doc["voice"], "session.voice")
        output = OutputPatch(
            voice=voice,
            format=output.format if output else None,
            volume=output.volume if output else None,
        )
    return SessionPatch(
        keys=keys,
        system_prompt=_str(doc, "system_prompt", "session."),
        greeting=_str(doc, "greeting", "session."),
        tools=tools,
        input=_input(doc["input"]) if doc.get("input") is not None else None,
        output=output,
        llm=_llm(doc["llm"]) if doc.get("llm") is not None else None,
        ignored=tuple(ignored),
    )


def _audio(value: Any, param: str) -> bytes:
    if not isinstance(value, str):
        raise ProtocolError("invalid_audio", f"{param} must be a base64 string", param=param)
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ProtocolError("invalid_audio", f"{param} is not valid base64", param=param) from None


def _check_values(value: Any, path: str, depth: int) -> None:
    """Refuse what the REST API refuses: NUL, unpaired surrogates, ``NaN``/``Infinity``
    (and numbers that overflow to them), nesting deeper than :data:`MAX_DEPTH`."""
    if isinstance(value, str):
        if (problem := unsafe_char(value)) is not None:
            raise _fail(path or "message", problem)
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise _fail(path or "message", "must be a finite number (not NaN or Infinity)")
    elif isinstance(value, dict | list):
        if depth >= MAX_DEPTH:
            raise _fail(path or "message", f"is nested deeper than {MAX_DEPTH} levels")
        if isinstance(value, dict):
            for key, item in value.items():
                if (problem := unsafe_char(key)) is not None:
                    raise _fail(path or "message", f"has a key that {problem}")
                _check_values(item, f"{path}.{key}" if path else key, depth + 1)
        else:
            for i, item in enumerate(value):
                _check_values(item, f"{path}[{i}]", depth + 1)


def _load(text: str | bytes, *, limit: int | None) -> dict[str, Any]:
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError:
            raise ProtocolError("invalid_format", "message is not UTF-8 JSON text") from None
    if limit is not None and len(text) > limit:
        raise ProtocolError(
            "invalid_format", f"message is larger than {limit} characters", param="message"
        )
    try:
        doc = json.loads(text)
    except (ValueError, RecursionError):
        raise ProtocolError("invalid_format", "message is not valid JSON") from None
    if not isinstance(doc, dict):
        raise ProtocolError("invalid_format", "message must be a JSON object")
    kind = doc.get("type")
    if not isinstance(kind, str):
        raise ProtocolError("invalid_format", "message has no string type", param="type")
    return doc


CLIENT_EVENT_TYPES: Final = frozenset({
    "session.update", "session.resume", "input.audio", "tool.result", "reply.create",
    "conversation.message", "reply.cancel", "session.end",
})  # fmt: skip
"""The ``type`` of every client event (what :func:`decode_client_event` takes)."""


def decode_client_event(
    text: str | bytes, *, max_chars: int | None = MAX_MESSAGE_CHARS
) -> ClientEvent:
    """Decode one client message.

    Args:
        text: the frame's JSON text (bytes are read as UTF-8).
        max_chars: larger messages are refused (``None``: no limit).

    Returns:
        One of the :data:`ClientEvent` types.

    Raises:
        ProtocolError: ``invalid_format`` (not JSON, no/unknown ``type``, a
            missing field), ``invalid_value`` (a field of the wrong type or out
            of range; a NUL character, an unpaired surrogate, ``NaN``/``Infinity``
            or nesting deeper than :data:`MAX_DEPTH` anywhere), ``invalid_config``
            (a session rule), ``invalid_audio`` (audio that is not base64).
    """
    doc = _load(text, limit=max_chars)
    _check_values(doc, "", 0)
    kind = doc["type"]
    match kind:
        case "session.update":
            if "session" not in doc:
                raise ProtocolError("invalid_format", "session is required", param="session")
            return SessionUpdate(session=parse_session(doc["session"]))
        case "session.resume":
            sid = _str(doc, "session_id", "", required=True)
            assert sid is not None
            return SessionResume(session_id=sid)
        case "input.audio":
            if "audio" not in doc:
                raise ProtocolError("invalid_format", "audio is required", param="audio")
            return InputAudio(audio=_audio(doc["audio"], "audio"))
        case "tool.result":
            call_id = _str(doc, "call_id", "", required=True)
            assert call_id is not None
            if "result" not in doc:
                raise ProtocolError("invalid_format", "result is required", param="result")
            result = doc["result"]
            if not isinstance(result, str):
                result = json.dumps(result)  # liberal: objects are coerced to JSON text
            is_error = bool(_bool(doc, "is_error", ""))
            return ToolResult(call_id=call_id, result=result, is_error=is_error)
        case "reply.create":
            return ReplyCreate(instructions=_str(doc, "instructions", ""))
        case "conversation.message":
            role = _str(doc, "role", "", required=True)
            if role not in ("user", "system"):
                raise _fail("role", "must be user or system")
            content = _str(doc, "content", "", required=True)
            assert content is not None
            return ConversationMessage(
                role=cast("Literal['user', 'system']", role), content=content
            )
        case "reply.cancel":
            return ReplyCancel(reply_id=_str(doc, "reply_id", ""))
        case "session.end":
            return SessionEnd()
    raise ProtocolError("invalid_format", f"unknown message type {kind[:64]!r}", param="type")


# -- encoding --------------------------------------------------------------------------------


def _drop_none(doc: dict[str, Any], keep: tuple[str, ...] = ()) -> dict[str, Any]:
    return {k: v for k, v in doc.items() if v is not None or k in keep}


def _patch_json(patch: SessionPatch) -> dict[str, Any]:
    if patch.agent_id is not None:
        return {"agent_id": patch.agent_id}
    doc: dict[str, Any] = {}
    if "system_prompt" in patch.keys or patch.system_prompt is not None:
        doc["system_prompt"] = patch.system_prompt
    if "greeting" in patch.keys or patch.greeting is not None:
        doc["greeting"] = patch.greeting
    if patch.tools is not None:
        tools = []
        for t in patch.tools:
            tool = t.to_json()
            if t.http is not None:
                tool["http"]["headers"] = [
                    {"name": k, "value": v.reveal()} for k, v in t.http.headers.items()
                ]
            tools.append(tool)
        doc["tools"] = tools
    if patch.input is not None:
        inp: dict[str, Any] = {}
        if patch.input.format is not None:
            inp["format"] = patch.input.format.to_json()
        if patch.input.keyterms is not None:
            inp["keyterms"] = list(patch.input.keyterms)
        if patch.input.turn_detection is not None:
            td = patch.input.turn_detection
            inp["turn_detection"] = _drop_none({
                "vad_threshold": td.vad_threshold, "min_silence": td.min_silence,
                "max_silence": td.max_silence, "interrupt_response": td.interrupt_response,
            })  # fmt: skip
        doc["input"] = inp
    if patch.output is not None:
        out = _drop_none({"voice": patch.output.voice, "volume": patch.output.volume})
        if patch.output.format is not None:
            out["format"] = patch.output.format.to_json()
        doc["output"] = out
    if patch.llm is not None:
        doc["llm"] = [
            _drop_none({"base_url": e.base_url, "model": e.model,
                        "api_key": e.api_key.reveal() if e.api_key else None})
            for e in patch.llm
        ]  # fmt: skip
    return doc


def to_json(event: ClientEvent | ServerEvent) -> dict[str, Any]:
    """The event as the JSON object sent on the wire (audio base64-encoded).

    Secrets in a client ``session.update`` (an inline ``llm`` key, tool header
    values) are revealed here, since that message is what carries them.
    """
    match event:
        case SessionUpdate(session=patch):
            return {"type": event.type, "session": _patch_json(patch)}
        case InputAudio(audio=audio):
            return {"type": event.type, "audio": base64.b64encode(audio).decode("ascii")}
        case ReplyAudio():
            return _drop_none({
                "type": event.type, "data": base64.b64encode(event.data).decode("ascii"),
                "reply_id": event.reply_id, "timestamp": event.timestamp,
            })  # fmt: skip
        case SessionReady() | SessionUpdated():
            doc = {f: getattr(event, f) for f in event.__slots__}
            if doc.get("config") is not None:
                doc["config"] = dict(doc["config"])
            return _drop_none(doc)
        case ToolCall():
            return _drop_none({
                "type": event.type, "call_id": event.call_id, "name": event.name,
                "arguments": dict(event.arguments), "reply_id": event.reply_id,
                "timestamp": event.timestamp,
            })  # fmt: skip
        case SessionEnded():
            return _drop_none(
                {"type": event.type, "session_duration_seconds": event.session_duration_seconds,
                 "audio_duration_seconds": event.audio_duration_seconds,
                 "timestamp": event.timestamp},
                keep=("audio_duration_seconds",),
            )  # fmt: skip
        case TranscriptAgentDelta():
            return _drop_none(
                {"type": event.type, "delta": event.delta, "reply_id": event.reply_id,
                 "item_id": event.item_id, "start_ms": event.start_ms, "end_ms": event.end_ms,
                 "timestamp": event.timestamp},
                keep=("start_ms", "end_ms"),
            )  # fmt: skip
        case ReplyError():
            return _drop_none(
                {"type": event.type, "reply_id": event.reply_id, "code": event.code,
                 "message": event.message, "retryable": event.retryable,
                 "status_code": event.status_code, "provider_code": event.provider_code,
                 "provider_param": event.provider_param, "timestamp": event.timestamp},
                keep=("status_code",),
            )  # fmt: skip
        case _:
            return _drop_none({f: getattr(event, f) for f in event.__slots__})


def encode(event: ClientEvent | ServerEvent) -> str:
    """The event as one JSON text frame (see :func:`to_json`)."""
    return json.dumps(to_json(event), separators=(",", ":"), ensure_ascii=False)


# -- decoding server events (the client side) -----------------------------------------------


def _server_str(doc: Mapping[str, Any], key: str) -> str:
    value = doc.get(key)
    if not isinstance(value, str):
        message = f"{doc.get('type')}.{key} must be a string"
        raise ProtocolError("invalid_format", message, param=key)
    return value


def _opt_str(doc: Mapping[str, Any], key: str) -> str | None:
    value = doc.get(key)
    return value if isinstance(value, str) else None


def _opt_num(doc: Mapping[str, Any], key: str) -> float | None:
    value = doc.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _opt_int(doc: Mapping[str, Any], key: str) -> int | None:
    value = _opt_num(doc, key)
    return None if value is None else int(value)


def decode_server_event(text: str | bytes) -> ServerEvent | UnknownServerEvent:
    """Decode one server message (what a client receives).

    Returns:
        One of the :data:`ServerEvent` types, or :class:`UnknownServerEvent`
        for a type this codec does not know (to be skipped).

    Raises:
        ProtocolError: ``invalid_format`` for text that is not a typed JSON
            object or a known event without its required fields.
    """
    doc = _load(text, limit=None)
    kind: str = doc["type"]
    ts = _opt_num(doc, "timestamp")
    match kind:
        case "session.ready":
            config = doc.get("config")
            return SessionReady(
                session_id=_server_str(doc, "session_id"),
                config=config if isinstance(config, dict) else None,
                expires_at=_opt_int(doc, "expires_at"),
                resume_token=_opt_str(doc, "resume_token"), timestamp=ts,
            )  # fmt: skip
        case "session.updated":
            config = doc.get("config")
            return SessionUpdated(config=config if isinstance(config, dict) else None, timestamp=ts)
        case "session.error" | "error":
            return SessionError(
                code=_opt_str(doc, "code") or "unknown",
                message=_opt_str(doc, "message") or "", param=_opt_str(doc, "param"),
                session_id=_opt_str(doc, "session_id"), timestamp=ts,
            )  # fmt: skip
        case "session.ended":
            return SessionEnded(
                session_duration_seconds=_opt_num(doc, "session_duration_seconds") or 0.0,
                audio_duration_seconds=_opt_num(doc, "audio_duration_seconds"), timestamp=ts,
            )  # fmt: skip
        case "input.speech.started":
            return InputSpeechStarted(timestamp=ts)
        case "input.speech.stopped":
            return InputSpeechStopped(timestamp=ts)
        case "transcript.user.delta":
            return TranscriptUserDelta(
                text=_server_str(doc, "text"), item_id=_opt_str(doc, "item_id"), timestamp=ts
            )
        case "transcript.user":
            return TranscriptUser(
                text=_server_str(doc, "text"), item_id=_opt_str(doc, "item_id") or "",
                timestamp=ts,
            )  # fmt: skip
        case "reply.started":
            return ReplyStarted(
                reply_id=_server_str(doc, "reply_id"), item_id=_opt_str(doc, "item_id"),
                timestamp=ts,
            )  # fmt: skip
        case "reply.audio":
            return ReplyAudio(
                data=_audio(doc.get("data"), "data"), reply_id=_opt_str(doc, "reply_id"),
                timestamp=ts,
            )  # fmt: skip
        case "transcript.agent.delta":
            return TranscriptAgentDelta(
                delta=_server_str(doc, "delta"), reply_id=_opt_str(doc, "reply_id"),
                item_id=_opt_str(doc, "item_id"), start_ms=_opt_int(doc, "start_ms"),
                end_ms=_opt_int(doc, "end_ms"), timestamp=ts,
            )  # fmt: skip
        case "transcript.agent":
            return TranscriptAgent(
                text=_server_str(doc, "text"), reply_id=_opt_str(doc, "reply_id"),
                item_id=_opt_str(doc, "item_id"), interrupted=doc.get("interrupted") is True,
                timestamp=ts,
            )  # fmt: skip
        case "reply.done":
            status = doc.get("status") or "completed"
            if status not in ("completed", "interrupted", "cancelled", "failed"):
                status = "completed"
            return ReplyDone(
                reply_id=_opt_str(doc, "reply_id"), status=cast("ReplyStatus", status),
                timestamp=ts,
            )  # fmt: skip
        case "tool.call":
            args = doc.get("arguments", doc.get("args"))  # older builds sent "args"
            if isinstance(args, str):
                try:
                    args = json.loads(args)
                except ValueError:
                    args = None
            return ToolCall(
                call_id=_server_str(doc, "call_id"), name=_server_str(doc, "name"),
                arguments=args if isinstance(args, dict) else {},
                reply_id=_opt_str(doc, "reply_id"), timestamp=ts,
            )  # fmt: skip
        case "reply.error":
            status = doc.get("status_code")
            return ReplyError(
                code=_opt_str(doc, "code") or "error", message=_opt_str(doc, "message") or "",
                retryable=doc.get("retryable") is True, reply_id=_opt_str(doc, "reply_id"),
                status_code=status if isinstance(status, int) and not isinstance(status, bool)
                else None,
                provider_code=_opt_str(doc, "provider_code"),
                provider_param=_opt_str(doc, "provider_param"), timestamp=ts,
            )  # fmt: skip
    return UnknownServerEvent(type=kind, payload=doc)
