"""Agent definitions: validation of REST bodies (the Voice Agent agent object).

Pure except for :func:`check_urls`, which resolves endpoint and HTTP-tool hosts
through the URL policy. Every problem is a :class:`FieldError` naming the
field (``llm[0].base_url``, ``tools[1].http.headers[0].value``…); secrets are
never echoed in messages.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Final

from runtime.endpoints import Resolver, URLPolicy, check_endpoint_url
from runtime.errors import URLPolicyError
from runtime.secret import Secret

FIELDS: Final = frozenset(
    {"name", "system_prompt", "voice", "greeting", "input", "output", "tools", "llm"}
)
TOOL_FIELDS: Final = frozenset(
    {"type", "name", "description", "parameters", "execution_mode", "timeout_seconds", "http",
     "response_instructions"}
)  # fmt: skip
HTTP_METHODS: Final = ("GET", "POST", "PUT", "PATCH", "DELETE")
MAX_TEXT: Final = 20_000


class FieldError(ValueError):
    """A request body problem, tied to a field path."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(f"{param}: {message}")
        self.param = param
        self.message = message


@dataclass(frozen=True, slots=True)
class LLMInput:
    base_url: str
    model: str
    api_key: Secret


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
    """A validated body. ``None`` means the field was absent (PUT keeps it)."""

    fields: dict[str, Any] = field(default_factory=dict)
    tools: list[ToolInput] | None = None
    llm: list[LLMInput] | None = None


def _text(value: Any, param: str, *, required: bool = True, nullable: bool = False) -> str | None:
    if value is None:
        if nullable:
            return None
        raise FieldError(param, "is required" if required else "must be a string")
    if not isinstance(value, str):
        raise FieldError(param, "must be a string")
    if len(value) > MAX_TEXT:
        raise FieldError(param, f"must be at most {MAX_TEXT} characters")
    return value


def _object(value: Any, param: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise FieldError(param, "must be an object")
    return value


def validate_agent(body: Any, *, partial: bool, voices: frozenset[str]) -> AgentInput:
    """Check a create (``partial=False``) or update (``partial=True``) body.

    Raises:
        FieldError: the first problem found.
    """
    doc = _object(body, "body")
    unknown = sorted(set(doc) - FIELDS)
    if unknown:
        raise FieldError(unknown[0], "is not a known field")
    out = AgentInput()
    if not partial:
        for name in ("name", "system_prompt", "voice"):
            if name not in doc:
                raise FieldError(name, "is required")
    for name in ("name", "system_prompt"):
        if name in doc:
            out.fields[name] = _text(doc[name], name)
    if "name" in out.fields and not str(out.fields["name"]).strip():
        raise FieldError("name", "must not be empty")
    if "greeting" in doc:
        out.fields["greeting"] = _text(doc["greeting"], "greeting", nullable=True)
    if "voice" in doc:
        voice = doc["voice"]
        voice_id = voice.get("voice_id") if isinstance(voice, dict) else voice
        if not isinstance(voice_id, str):
            raise FieldError("voice", 'must be {"voice_id": "…"} or a voice id string')
        if voice_id not in voices:
            raise FieldError(
                "voice", f"unknown voice {voice_id!r}; installed: {', '.join(sorted(voices))}"
            )
        out.fields["voice"] = {"voice_id": voice_id}
    for name in ("input", "output"):
        if name in doc:
            out.fields[name] = _object(doc[name], name)
    if "tools" in doc:
        out.tools = _tools(doc["tools"])
    if "llm" in doc:
        out.llm = _llm(doc["llm"])
    return out


def _llm(value: Any) -> list[LLMInput]:
    if not isinstance(value, list):
        raise FieldError("llm", "must be a list")
    if len(value) > 1:
        raise FieldError("llm", "accepts at most one entry")
    entries = []
    for i, entry in enumerate(value):
        param = f"llm[{i}]"
        entry = _object(entry, param)
        unknown = sorted(set(entry) - {"base_url", "model", "api_key"})
        if unknown:
            raise FieldError(f"{param}.{unknown[0]}", "is not a known field")
        base_url = _text(entry.get("base_url"), f"{param}.base_url")
        model = _text(entry.get("model"), f"{param}.model")
        key = _text(entry.get("api_key"), f"{param}.api_key")
        assert base_url is not None
        assert model is not None
        assert key is not None
        if not model.strip():
            raise FieldError(f"{param}.model", "must not be empty")
        if not key:
            raise FieldError(f"{param}.api_key", "must not be empty")
        entries.append(LLMInput(base_url=base_url, model=model, api_key=Secret(key)))
    return entries


def _tools(value: Any) -> list[ToolInput]:
    if not isinstance(value, list):
        raise FieldError("tools", "must be a list")
    tools: list[ToolInput] = []
    names: set[str] = set()
    for i, raw in enumerate(value):
        param = f"tools[{i}]"
        tool = _object(raw, param)
        unknown = sorted(set(tool) - TOOL_FIELDS)
        if unknown:
            raise FieldError(f"{param}.{unknown[0]}", "is not a known field")
        name = _text(tool.get("name"), f"{param}.name")
        assert name is not None
        if not name.replace("_", "").replace("-", "").isalnum() or name in names:
            raise FieldError(
                f"{param}.name", "must be a unique identifier (letters, digits, _ and -)"
            )
        names.add(name)
        doc: dict[str, Any] = {
            "type": "function",
            "name": name,
            "description": _text(tool.get("description", ""), f"{param}.description"),
            "parameters": _object(
                tool.get("parameters", {"type": "object", "properties": {}}), f"{param}.parameters"
            ),
            "execution_mode": tool.get("execution_mode", "interactive"),
            "timeout_seconds": tool.get("timeout_seconds", 120),
        }
        if doc["execution_mode"] not in ("interactive", "hold"):
            raise FieldError(f"{param}.execution_mode", "must be interactive or hold")
        timeout = doc["timeout_seconds"]
        if (
            isinstance(timeout, bool)
            or not isinstance(timeout, int | float)
            or not 1 <= timeout <= 300
        ):
            raise FieldError(f"{param}.timeout_seconds", "must be a number from 1 to 300")
        url = None
        headers: tuple[HeaderInput, ...] = ()
        if "http" in tool:
            http = _object(tool["http"], f"{param}.http")
            unknown = sorted(set(http) - {"url", "http_method", "headers"})
            if unknown:
                raise FieldError(f"{param}.http.{unknown[0]}", "is not a known field")
            url = _text(http.get("url"), f"{param}.http.url")
            method = http.get("http_method", "POST")
            if method not in HTTP_METHODS:
                raise FieldError(
                    f"{param}.http.http_method", f"must be one of {', '.join(HTTP_METHODS)}"
                )
            headers = _headers(http.get("headers", []), f"{param}.http.headers")
            doc["http"] = {"url": url, "http_method": method}
        tools.append(ToolInput(doc=doc, url=url, headers=headers))
    return tools


def _headers(value: Any, param: str) -> tuple[HeaderInput, ...]:
    if isinstance(value, dict):  # the older form: {"Name": "value"}
        value = [{"name": k, "value": v} for k, v in value.items()]
    if not isinstance(value, list):
        raise FieldError(param, "must be a list of {name, value} or an object")
    out = []
    seen: set[str] = set()
    for i, raw in enumerate(value):
        p = f"{param}[{i}]"
        header = _object(raw, p)
        unknown = sorted(set(header) - {"name", "value", "remove"})
        if unknown:
            raise FieldError(f"{p}.{unknown[0]}", "is not a known field")
        name = _text(header.get("name"), f"{p}.name")
        assert name is not None
        if not name or any(c in name for c in ":\r\n ") or name.lower() in seen:
            raise FieldError(f"{p}.name", "must be a unique header name")
        seen.add(name.lower())
        remove = header.get("remove", False)
        if not isinstance(remove, bool):
            raise FieldError(f"{p}.remove", "must be a boolean")
        if "value" in header and remove:
            raise FieldError(p, "give value or remove, not both")
        secret = None
        if "value" in header:
            text = _text(header["value"], f"{p}.value")
            assert text is not None
            if "\r" in text or "\n" in text:
                raise FieldError(f"{p}.value", "must not contain line breaks")
            secret = Secret(text)
        out.append(HeaderInput(name=name, value=secret, remove=remove))
    return tuple(out)


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
