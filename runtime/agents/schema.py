"""Agent definitions: the REST schema (the Voice Agent agent object) as pydantic models.

The same models validate request bodies and generate ``/openapi.json``
(:func:`openapi_document`), so the published schema cannot drift from what
the server accepts. Everything is pure except :func:`check_urls`, which
resolves endpoint and HTTP-tool hosts through the URL policy.

Validation happens in two steps, both before anything is written:

1. :func:`parse_json` turns the raw body into plain JSON values and refuses
   what a database or a later reader could not hold: ``NaN``/``Infinity``
   (and numbers that overflow to them), lone surrogate escapes, NUL
   characters, nesting deeper than :data:`MAX_DEPTH`.
2. :func:`validate_agent` checks the shapes (unknown fields are refused at
   every level, types are strict: ``"1"`` is not a number, ``true`` is not 1).

Every problem is a :class:`FieldError` naming the field (``llm[0].base_url``,
``tools[1].http.headers[0].value``, ``input.turn_detection.min_silence``…).
Messages never echo secrets, and echoed user text is shortened.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any, Final, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    JsonValue,
    SecretStr,
    ValidationError,
    model_validator,
)
from pydantic.json_schema import models_json_schema

from runtime.endpoints import Resolver, URLPolicy, check_endpoint_url
from runtime.errors import URLPolicyError
from runtime.protocol.events import (
    ENCODINGS,
    FIRST_TOKEN_TIMEOUT_MS,
    MAX_LLM_ENTRIES,
    SINGLE_ENTRY_MESSAGE,
)
from runtime.secret import Secret

MAX_TEXT: Final = 20_000
MAX_DEPTH: Final = 32
MAX_TOOLS: Final = 128
MAX_HEADERS: Final = 32
MAX_URL: Final = 2048
MAX_MESSAGE: Final = 300
MAX_PROBLEMS: Final = 20  # field problems listed in one error response
HTTP_METHODS: Final = ("GET", "POST", "PUT", "PATCH", "DELETE")


class FieldError(ValueError):
    """A request body problem, tied to a field path (``param``).

    ``problems``: every ``(param, message)`` found in the body, the first being this one's
    (a body with several wrong fields names each).
    """

    def __init__(
        self, param: str, message: str, problems: list[tuple[str, str]] | None = None
    ) -> None:
        message = shorten(message)
        super().__init__(f"{param}: {message}")
        self.param = param
        self.message = message
        self.problems = problems or [(param, message)]


def shorten(text: str, limit: int = MAX_MESSAGE) -> str:
    """``text`` cut to ``limit`` characters (error bodies stay small)."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


# -- step 1: JSON -------------------------------------------------------------------


def _reject_constant(name: str) -> Any:
    raise FieldError("body", f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise FieldError("body", "a number is too large")
    return value


def _check_tree(value: Any, path: str, depth: int) -> None:
    """``depth``: how many containers enclose ``value`` (the body itself is at 0)."""
    if isinstance(value, str):
        _check_text(value, path or "body")
        return
    if not isinstance(value, dict | list):
        return
    if depth >= MAX_DEPTH:
        raise FieldError("body", f"is nested deeper than {MAX_DEPTH} levels")
    if isinstance(value, dict):
        for key, item in value.items():
            _check_text(key, path or "body")
            _check_tree(item, f"{path}.{key}" if path else key, depth + 1)
    else:
        for i, item in enumerate(value):
            _check_tree(item, f"{path}[{i}]", depth + 1)


def _check_text(text: str, path: str) -> None:
    if "\x00" in text:
        raise FieldError(path, "must not contain NUL characters")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise FieldError(path, "contains an unpaired surrogate (not valid Unicode)") from None


def parse_json(data: bytes) -> Any:
    """Decode a request body into JSON values a database can store.

    Raises:
        FieldError: not UTF-8 JSON, a non-finite number, an unpaired surrogate,
            a NUL character, or nesting deeper than :data:`MAX_DEPTH` (``param``
            names the place when it is known).
    """
    try:
        text = data.decode("utf-8")
        value = json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float)
    except FieldError:
        raise
    except RecursionError:
        raise FieldError("body", f"is nested deeper than {MAX_DEPTH} levels") from None
    except ValueError:  # includes UnicodeDecodeError and integers of thousands of digits
        raise FieldError("body", "is not valid JSON") from None
    _check_tree(value, "", 0)
    return value


# -- step 2: shapes -----------------------------------------------------------------


def _no_line_breaks(value: str) -> str:
    if any(c in value for c in "\r\n\x00"):
        raise ValueError("must not contain line breaks or NUL characters")
    return value


def _not_blank(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be empty")
    return value


def _secret_line(value: SecretStr) -> SecretStr:
    text = value.get_secret_value()
    if not text:
        raise ValueError("must not be empty")
    if any(c in text for c in "\r\n\x00"):
        raise ValueError("must not contain line breaks or NUL characters")
    return value


_TOKEN_CHARS: Final = frozenset(
    "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
)


def _header_name(value: str) -> str:
    if not value or not set(value) <= _TOKEN_CHARS:
        raise ValueError("must be an HTTP header name (letters, digits and !#$%&'*+-.^_`|~)")
    return value


Text = Annotated[str, Field(max_length=MAX_TEXT)]
Name = Annotated[str, Field(max_length=1000), AfterValidator(_not_blank)]
Line = Annotated[
    str, Field(max_length=1000), AfterValidator(_no_line_breaks), AfterValidator(_not_blank)
]
URLText = Annotated[str, Field(max_length=MAX_URL)]
SecretLine = Annotated[SecretStr, Field(max_length=8192), AfterValidator(_secret_line)]
HeaderName = Annotated[str, Field(max_length=256), AfterValidator(_header_name)]
ToolName = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")]
Short = Annotated[str, Field(max_length=500)]
LanguageCode = Annotated[str, Field(max_length=16)]
Unit = Annotated[float, Field(ge=0, le=1)]
SilenceMs = Annotated[int, Field(ge=50, le=10_000)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class VoiceRef(_Model):
    voice_id: Annotated[str, Field(min_length=1, max_length=200)]


def _voice_form(value: Any) -> Any:
    return {"voice_id": value} if isinstance(value, str) else value


Voice = Annotated[VoiceRef, BeforeValidator(_voice_form)]


class AudioFormat(_Model):
    encoding: Literal["audio/pcm", "audio/pcmu", "audio/pcma"] | None = None
    sample_rate: Literal[8000, 16000, 24000] | None = None


class TurnDetection(_Model):
    type: Literal["server_vad", "semantic_vad"] | None = None
    vad_threshold: Unit | None = None
    min_silence: SilenceMs | None = None
    max_silence: SilenceMs | None = None
    interrupt_response: bool | None = None
    interruption_delay: Annotated[int, Field(ge=0, le=10_000)] | None = None
    uninterruptible_turns: Annotated[list[Short], Field(max_length=100)] | None = None


class InputConfig(_Model):
    """The stored form of the WebSocket ``session.input`` (PROTOCOL §3.5)."""

    type: Annotated[Literal["audio"] | None, _audio_only("text input")] = None
    format: AudioFormat | None = None
    keyterms: Annotated[list[Short], Field(max_length=100)] | None = None
    turn_detection: TurnDetection | None = None
    transcription_mode: Literal["min_latency", "balanced", "max_accuracy"] | None = None
    language_codes: Annotated[list[LanguageCode], Field(max_length=32)] | None = None
    voice_focus: Literal["near-field", "far-field"] | None = None
    voice_focus_threshold: Unit | None = None
    continuous_partials: bool | None = None
    transcription_prompt: Annotated[str, Field(max_length=1750)] | None = None


class OutputConfig(_Model):
    """The stored form of ``session.output`` without the voice (PROTOCOL §3.5)."""

    type: Annotated[Literal["audio"] | None, _audio_only("a text-only agent")] = None
    format: AudioFormat | None = None
    volume: Annotated[float, Field(ge=0, le=100)] | None = None


class HeaderIn(_Model):
    """An HTTP-tool header on write: ``value`` sets it, name only keeps it, ``remove`` drops it."""

    name: HeaderName
    value: SecretLine | None = None
    remove: bool = False

    @model_validator(mode="after")
    def _value_or_remove(self) -> HeaderIn:
        if self.remove and self.value is not None:
            raise ValueError("give value or remove, not both")
        return self


def _header_form(value: Any) -> Any:
    if isinstance(value, dict):  # the older form: {"Name": "value"}
        return [{"name": k, "value": v} for k, v in value.items()]
    return value


def _unique_headers(value: list[HeaderIn]) -> list[HeaderIn]:
    seen: set[str] = set()
    for header in value:
        if header.name.lower() in seen:
            raise ValueError(f"header {header.name!r} is given twice")
        seen.add(header.name.lower())
    return value


class HttpIn(_Model):
    url: URLText
    http_method: Literal["GET", "POST", "PUT", "PATCH", "DELETE"] = "POST"
    headers: Annotated[
        list[HeaderIn],
        Field(max_length=MAX_HEADERS),
        BeforeValidator(_header_form),
        AfterValidator(_unique_headers),
    ] = Field(default_factory=list)


class ResponseInstructions(_Model):
    success: Short | None = None
    error: Short | None = None


def _empty_parameters() -> dict[str, JsonValue]:
    return {"type": "object", "properties": {}}


def _not_supported(why: str) -> Any:
    def check(value: Any) -> Any:
        if value is not None:
            raise ValueError(why)
        return value

    return BeforeValidator(check)


def _interactive(value: Any) -> Any:
    if value == "hold":
        raise ValueError('"hold" is not supported yet; use "interactive"')
    return value


def _audio_only(note: str) -> Any:
    def check(value: Any) -> Any:
        if value == "text":
            raise ValueError(f'"text" ({note}) is not supported yet')
        return value

    return BeforeValidator(check)


Unsupported = Annotated[JsonValue | None, Field(json_schema_extra={"deprecated": True})]


class ToolIn(_Model):
    """A tool in the flat form (PROTOCOL §2.4); without ``http`` it is answered by the client.

    ``id`` is assigned by the server (stable while ``name`` is unchanged) and ignored on writes.
    """

    id: Annotated[str, Field(max_length=200)] | None = None
    type: Literal["function"] = "function"
    name: ToolName
    description: Text = ""
    parameters: dict[str, JsonValue] = Field(default_factory=_empty_parameters)
    execution_mode: Annotated[Literal["interactive"], BeforeValidator(_interactive)] = "interactive"
    timeout_seconds: Annotated[int | float, Field(ge=1, le=300)] = 120
    http: HttpIn | None = None
    response_instructions: ResponseInstructions | None = None
    dtmf_collected_arguments: Annotated[
        Unsupported, _not_supported("telephony keypad (DTMF) arguments are not supported yet")
    ] = None


def _unique_tools(value: list[ToolIn]) -> list[ToolIn]:
    seen: set[str] = set()
    for tool in value:
        if tool.name in seen:
            raise ValueError(f"tool name {tool.name!r} is used twice")
        seen.add(tool.name)
    return value


Tools = Annotated[list[ToolIn], Field(max_length=MAX_TOOLS), AfterValidator(_unique_tools)]


class LLMIn(_Model):
    """Your own OpenAI-compatible endpoint (PROTOCOL §2.3); ``api_key`` is write-only."""

    base_url: URLText
    model: Line
    api_key: SecretLine
    # voxloop extensions, per entry: the chat-completions max_tokens of this entry's
    # requests (absent: the server's VOXLOOP_LLM_MAX_TOKENS, else none sent), and how long
    # this entry may take to its first token before the next entry is asked (ms).
    max_tokens: Annotated[int, Field(ge=1, le=1_000_000)] | None = None
    first_token_timeout_ms: (
        Annotated[int, Field(ge=FIRST_TOKEN_TIMEOUT_MS[0], le=FIRST_TOKEN_TIMEOUT_MS[1])] | None
    ) = None


def _llm_form(value: Any) -> Any:
    return [value] if isinstance(value, dict) else value  # one entry given as an object


LLMList = Annotated[list[LLMIn], Field(max_length=MAX_LLM_ENTRIES), BeforeValidator(_llm_form)]
"""An endpoint and its fallbacks, in order (the first answers while it is healthy)."""


class AgentCreate(_Model):
    """``POST /v1/agents``."""

    name: Name
    system_prompt: Text
    voice: Voice
    greeting: Text | None = None
    input: InputConfig = Field(default_factory=InputConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    tools: Tools = Field(default_factory=list)
    llm: LLMList = Field(default_factory=list)
    pre_connect_requests: Annotated[
        Unsupported, _not_supported("telephony pre-connect requests are not supported yet")
    ] = None
    transfer_targets: Annotated[
        Unsupported, _not_supported("telephony transfers are not supported yet")
    ] = None
    outbound_trunk_id: Annotated[
        Unsupported, _not_supported("telephony trunks are not supported yet")
    ] = None
    caller_id: Annotated[
        Unsupported, _not_supported("telephony caller ids are not supported yet")
    ] = None


def _absent() -> Any:
    """Absent by default, but ``null`` is not a value (only ``greeting`` may be null)."""
    return Field(default=None)


class AgentUpdate(_Model):
    """``PUT /v1/agents/{id}``: fields present replace the stored value, absent fields are kept.

    ``tools`` and ``llm`` are replaced wholesale; ``"llm": []`` clears the endpoint.
    """

    name: Name = _absent()
    system_prompt: Text = _absent()
    voice: Voice = _absent()
    greeting: Text | None = None
    input: InputConfig = _absent()
    output: OutputConfig = _absent()
    tools: Tools = _absent()
    llm: LLMList = _absent()
    pre_connect_requests: Annotated[
        Unsupported, _not_supported("telephony pre-connect requests are not supported yet")
    ] = None
    transfer_targets: Annotated[
        Unsupported, _not_supported("telephony transfers are not supported yet")
    ] = None
    outbound_trunk_id: Annotated[
        Unsupported, _not_supported("telephony trunks are not supported yet")
    ] = None
    caller_id: Annotated[
        Unsupported, _not_supported("telephony caller ids are not supported yet")
    ] = None


# -- responses (for the OpenAPI document) --------------------------------------------


class HeaderOut(_Model):
    name: str
    last_set_at: str


class HttpOut(_Model):
    url: str
    http_method: str
    headers: list[HeaderOut]


class ToolOut(_Model):
    id: str  # server-assigned, stable while the name is unchanged
    type: Literal["function"]
    name: str
    description: str
    parameters: dict[str, JsonValue]
    execution_mode: str
    timeout_seconds: int | float
    http: HttpOut | None = None
    response_instructions: ResponseInstructions | None = None


class LLMOut(_Model):
    base_url: str
    model: str
    max_tokens: int | None = None
    first_token_timeout_ms: int | None = None


class AgentWarning(_Model):
    """Something that keeps a stored agent from working on this installation."""

    param: str
    code: str
    message: str


class Agent(_Model):
    """An agent as every read returns it (secrets removed)."""

    id: str
    name: str
    system_prompt: str
    voice: VoiceRef
    greeting: str | None
    input: InputConfig
    output: OutputConfig
    tools: list[ToolOut]
    llm: list[LLMOut]
    created_at: str
    updated_at: str
    warnings: list[AgentWarning]


class AgentSummary(_Model):
    id: str
    name: str
    created_at: str
    updated_at: str
    deleted_at: None


class ResponseMetadata(_Model):
    next_cursor: str


class AgentPage(_Model):
    """``GET /v1/agents?limit=…[&cursor=…]``: one page, newest first."""

    agents: list[AgentSummary]
    has_more: bool
    response_metadata: ResponseMetadata


class ErrorItem(_Model):
    param: str
    message: str


class ErrorBody(_Model):
    detail: str
    code: str | None = None
    param: str | None = None
    errors: list[ErrorItem] | None = None


class TokenOut(_Model):
    token: str
    expires_in_seconds: int


class VoiceOut(_Model):
    voice_id: str
    name: str
    language: str
    engine: str
    aliases: list[str]
    installed: bool  # false: agents may name it, but this installation cannot speak it


# -- the validated result ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LLMInput:
    base_url: str
    model: str
    api_key: Secret
    max_tokens: int | None = None
    first_token_timeout_ms: int | None = None


@dataclass(frozen=True, slots=True)
class HeaderInput:
    name: str
    value: Secret | None = None  # None: keep the stored value
    remove: bool = False


@dataclass(frozen=True, slots=True)
class ToolInput:
    doc: dict[str, Any]  # the public definition (no header values)
    url: str | None = None
    headers: tuple[HeaderInput, ...] = ()


@dataclass(slots=True)
class AgentInput:
    """A validated body. Keys absent from ``fields`` (and ``None`` tools/llm) are kept on PUT."""

    fields: dict[str, Any] = field(default_factory=dict)
    tools: list[ToolInput] | None = None
    llm: list[LLMInput] | None = None


_TAGS: Final = frozenset({"str", "int", "float", "bool", "list", "dict", "none"})


def _param(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in _TAGS or "[" in part or part[:1].isupper():
            continue  # a union branch or a validator, not a field
        else:
            out += f".{part}" if out else part
    return out or "body"


_MESSAGES: Final = {
    "missing": "is required",
    "extra_forbidden": "is not a known field",
    "string_type": "must be a string",
    "int_type": "must be an integer",
    "float_type": "must be a number",
    "bool_type": "must be true or false",
    "list_type": "must be a list",
    "dict_type": "must be an object",
    "model_type": "must be an object",
    "model_attributes_type": "must be an object",
}


def _message(error: Mapping[str, Any]) -> str:
    kind = str(error["type"])
    if kind in _MESSAGES:
        return _MESSAGES[kind]
    ctx = error.get("ctx") or {}
    if kind == "too_long" and "max_length" in ctx and "actual_length" in ctx:
        return f"accepts at most {ctx['max_length']} entries, not {ctx['actual_length']}"
    message = str(error["msg"])
    message = message.removeprefix("Value error, ")
    return message[:1].lower() + message[1:]


def validate_agent(body: Any, *, partial: bool, voices: frozenset[str]) -> AgentInput:
    """Check a create (``partial=False``) or update (``partial=True``) body.

    Args:
        body: the parsed JSON (see :func:`parse_json`).
        partial: an update: absent fields are kept.
        voices: the voice ids (and aliases) voxloop knows; others are refused.

    Raises:
        FieldError: the first problem found (the ``param`` of the first
            pydantic error, in document order), with every problem of the body's shape
            (up to :data:`MAX_PROBLEMS`) in ``problems``.
    """
    if not isinstance(body, dict):
        raise FieldError("body", "must be a JSON object")
    model: type[AgentCreate | AgentUpdate] = AgentUpdate if partial else AgentCreate
    try:
        parsed = model.model_validate(body)
    except ValidationError as exc:
        found = [
            (_param(e["loc"]), shorten(_message(e)))
            for e in exc.errors(include_url=False, include_input=False)
        ]
        raise FieldError(*found[0], problems=found[:MAX_PROBLEMS]) from None
    given = parsed.model_fields_set
    _check_runnable(parsed)
    out = AgentInput()
    for name in ("name", "system_prompt", "greeting"):
        if name in given:
            out.fields[name] = getattr(parsed, name)
    if "voice" in given:
        voice_id = parsed.voice.voice_id
        if voice_id not in voices:
            shown = ", ".join(sorted(voices)) or "none"
            raise FieldError(
                "voice", f"unknown voice {shorten(voice_id, 60)!r}; known voices: {shown}"
            )
        out.fields["voice"] = {"voice_id": voice_id}
    for name in ("input", "output"):
        if name in given or not partial:
            value = getattr(parsed, name)
            out.fields[name] = value.model_dump(mode="json", exclude_unset=True)
    if "tools" in given or not partial:
        out.tools = [_tool(t) for t in parsed.tools]
    if "llm" in given or not partial:
        out.llm = [
            LLMInput(
                e.base_url,
                e.model,
                Secret(e.api_key.get_secret_value()),
                e.max_tokens,
                e.first_token_timeout_ms,
            )
            for e in parsed.llm
        ]
    return out


def _check_runnable(parsed: AgentCreate | AgentUpdate) -> None:
    """Refuse what the WebSocket would refuse to run, with the same words
    (``runtime.protocol.events`` reads a stored agent as a ``session.update``).

    Raises:
        FieldError: a format whose sample rate is not its encoding's, or a
            ``min_silence`` above ``max_silence``.
    """
    for name in ("input", "output"):
        config = getattr(parsed, name)
        fmt = config.format if config is not None else None
        if fmt is not None and fmt.sample_rate is not None:
            encoding = fmt.encoding or "audio/pcm"
            if fmt.sample_rate != ENCODINGS[encoding]:
                raise FieldError(
                    f"{name}.format.sample_rate", f"must be {ENCODINGS[encoding]} for {encoding}"
                )
    td = parsed.input.turn_detection if parsed.input is not None else None
    low, high = (td.min_silence, td.max_silence) if td is not None else (None, None)
    if low is not None and high is not None and low > high:
        raise FieldError("input.turn_detection.min_silence", "must not exceed max_silence")


def _tool(tool: ToolIn) -> ToolInput:
    doc = tool.model_dump(
        mode="json", exclude={"id", "http", "response_instructions", "dtmf_collected_arguments"}
    )
    if tool.response_instructions is not None:
        doc["response_instructions"] = tool.response_instructions.model_dump(exclude_none=True)
    if tool.http is None:
        return ToolInput(doc=doc)
    doc["http"] = {"url": tool.http.url, "http_method": tool.http.http_method}
    headers = tuple(
        HeaderInput(
            name=h.name,
            value=None if h.value is None else Secret(h.value.get_secret_value()),
            remove=h.remove,
        )
        for h in tool.http.headers
    )
    return ToolInput(doc=doc, url=tool.http.url, headers=headers)


def check_llm_count(agent: AgentInput, *, single_entry: bool) -> None:
    """Refuse a second ``llm`` entry when the server keeps the one-entry rule.

    Raises:
        FieldError: ``llm[1]``, saying which setting refuses it.
    """
    if single_entry and agent.llm is not None and len(agent.llm) > 1:
        raise FieldError("llm[1]", SINGLE_ENTRY_MESSAGE)


async def check_urls(agent: AgentInput, policy: URLPolicy, resolver: Resolver) -> None:
    """Resolve and check every endpoint and HTTP-tool URL under the policy.

    Raises:
        FieldError: a URL is not allowed or does not resolve.
    """
    for i, entry in enumerate(agent.llm or []):
        try:
            await check_endpoint_url(entry.base_url, policy, resolver)
        except URLPolicyError as exc:
            raise FieldError(f"llm[{i}].base_url", str(exc)) from None
    for i, tool in enumerate(agent.tools or []):
        if tool.url is not None:
            try:
                await check_endpoint_url(tool.url, policy, resolver)
            except URLPolicyError as exc:
                raise FieldError(f"tools[{i}].http.url", str(exc)) from None


# -- OpenAPI -------------------------------------------------------------------------


def openapi_document(version: str) -> dict[str, Any]:
    """The OpenAPI 3.1 document, generated from the models above."""
    _, defs = models_json_schema(
        [
            (AgentCreate, "validation"),
            (AgentUpdate, "validation"),
            (Agent, "serialization"),
            (AgentSummary, "serialization"),
            (AgentPage, "serialization"),
            (ErrorBody, "serialization"),
            (TokenOut, "serialization"),
            (VoiceOut, "serialization"),
        ],
        ref_template="#/components/schemas/{model}",
    )

    def ref(name: str) -> dict[str, Any]:
        return {"$ref": f"#/components/schemas/{name}"}

    def json_body(schema: dict[str, Any], description: str) -> dict[str, Any]:
        return {"description": description, "content": {"application/json": {"schema": schema}}}

    errors = {
        "401": json_body(ref("ErrorBody"), "missing or wrong API key"),
        "422": json_body(ref("ErrorBody"), "invalid body; `param` names the field"),
    }
    not_found = {"404": json_body(ref("ErrorBody"), "no such agent (`agent_not_found`)")}
    key_unavailable = {
        "503": json_body(
            ref("ErrorBody"),
            "`key_unavailable`: the key was rotated and this server lacks the new key "
            "(restart it with the rotated VOXLOOP_SECRET_KEY); nothing was stored",
        )
    }
    agent_id = {"name": "agent_id", "in": "path", "required": True, "schema": {"type": "string"}}
    query = [
        {"name": "limit", "in": "query", "required": False,
         "schema": {"type": "integer", "minimum": 1, "maximum": 200},
         "description": "page size; with limit or cursor the answer is an AgentPage"},
        {"name": "cursor", "in": "query", "required": False, "schema": {"type": "string"},
         "description": "the previous page's response_metadata.next_cursor"},
    ]  # fmt: skip
    token_query = [
        {"name": "expires_in_seconds", "in": "query", "required": True,
         "schema": {"type": "integer", "minimum": 1, "maximum": 600}},
        {"name": "max_session_duration_seconds", "in": "query", "required": False,
         "schema": {"type": "integer", "minimum": 60, "maximum": 10800, "default": 10800}},
    ]  # fmt: skip
    return {
        "openapi": "3.1.0",
        "info": {"title": "voxloop agent service", "version": version},
        "security": [{"apiKey": []}],
        "components": {
            "securitySchemes": {
                "apiKey": {"type": "apiKey", "in": "header", "name": "Authorization"}
            },
            "schemas": defs["$defs"],
        },
        "paths": {
            "/v1/agents": {
                "post": {
                    "summary": "Create an agent",
                    "requestBody": {
                        "required": True,
                        "content": {"application/json": {"schema": ref("AgentCreate")}},
                    },
                    "responses": {
                        "201": json_body(ref("Agent"), "the stored agent"),
                        **errors,
                        **key_unavailable,
                    },
                },
                "get": {
                    "summary": "List agents, newest first",
                    "parameters": query,
                    "responses": {
                        "200": json_body(
                            {
                                "oneOf": [
                                    {"type": "array", "items": ref("AgentSummary")},
                                    ref("AgentPage"),
                                ]
                            },
                            "every agent as an array, or one page when limit/cursor is given",
                        ),
                        **errors,
                    },
                },
            },
            "/v1/agents/{agent_id}": {
                "parameters": [agent_id],
                "get": {
                    "summary": "Get an agent",
                    "responses": {
                        "200": json_body(ref("Agent"), "the agent"),
                        **errors,
                        **not_found,
                    },
                },
                "put": {
                    "summary": "Update an agent (fields present replace, absent are kept)",
                    "requestBody": {
                        "required": True,
                        "content": {"application/json": {"schema": ref("AgentUpdate")}},
                    },
                    "responses": {
                        "200": json_body(ref("Agent"), "the updated agent"),
                        **errors,
                        **not_found,
                        **key_unavailable,
                    },
                },
                "delete": {
                    "summary": "Delete an agent",
                    "responses": {"204": {"description": "deleted"}, **errors, **not_found},
                },
            },
            "/v1/token": {
                "get": {
                    "summary": "Mint a single-use temporary token for the realtime endpoint",
                    "parameters": token_query,
                    "responses": {
                        "200": json_body(ref("TokenOut"), "the token"),
                        "400": json_body(
                            ref("ErrorBody"), "a parameter is missing or out of range"
                        ),
                        "401": errors["401"],
                    },
                },
            },
            "/v1/voices": {
                "get": {
                    "summary": "Voices agents may name, and whether this server can speak them",
                    "responses": {
                        "200": json_body({"type": "array", "items": ref("VoiceOut")}, "voices"),
                        "401": errors["401"],
                    },
                },
            },
        },
    }
