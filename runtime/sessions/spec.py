"""A session's effective configuration: a stored agent or inline ``session.update``
merged into one :class:`SessionSpec`, and the server's default endpoint."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from runtime.conversation.config import SessionConfig, TurnDetection
from runtime.conversation.tools import ClientTool, HttpTool, Tool
from runtime.protocol import events as ev
from runtime.secret import Secret
from runtime.sessions.errors import SessionRefused


@dataclass(frozen=True, slots=True)
class SessionSpec:
    """A bound session's effective configuration (secrets held as :class:`Secret`)."""

    system_prompt: str = ""
    greeting: str | None = None
    voice: str | None = None
    tools: tuple[ev.ToolSpec, ...] = ()
    input_format: ev.AudioFormat = field(default_factory=ev.AudioFormat)
    output_format: ev.AudioFormat = field(default_factory=ev.AudioFormat)
    volume: float = 100.0
    keyterms: tuple[str, ...] = ()
    turn_detection: TurnDetection = field(default_factory=TurnDetection)
    llm: ev.LLMSpec | None = None
    fallbacks: tuple[ev.LLMSpec, ...] = ()
    """The ``llm`` entries after the first, in order (tried when those before fail)."""
    agent_id: str | None = None
    # The installed voice that speaks ``voice`` (a hosted name or the voice's own id).
    voice_id: str | None = None
    # What this server does differently from what the session asked (``warnings`` entries).
    warnings: tuple[Mapping[str, str], ...] = ()
    # The server's chat-completions max_tokens (each llm entry's own wins; None: none sent).
    # Sent by the entries' clients (see SessionRunner.chat_client), not by the core.
    max_tokens: int | None = None

    def public(self) -> dict[str, Any]:
        """The configuration as ``session.ready``/``session.updated`` report it (no secrets).

        The published schema: ``input`` and ``output`` carry ``"type": "audio"``,
        ``output.voice`` the voice name the session speaks with, ``turn_detection`` the
        effective values; ``warnings`` lists what this server does differently.
        """
        td = self.turn_detection
        return {
            **({"agent_id": self.agent_id} if self.agent_id else {}),
            "system_prompt": self.system_prompt,
            "greeting": self.greeting,
            "tools": [t.to_json() for t in self.tools],
            "input": {
                "type": "audio",
                "format": self.input_format.to_json(),
                "keyterms": list(self.keyterms),
                "turn_detection": {
                    "vad_threshold": td.vad_threshold,
                    "min_silence": td.min_silence_ms,
                    "max_silence": td.max_silence_ms,
                    "interrupt_response": td.interrupt_response,
                },
            },
            "output": {
                "type": "audio",
                "voice": self.voice,
                "format": self.output_format.to_json(),
                "volume": self.volume,
            },
            "llm": [entry_public(e) for e in self.endpoints],
            "warnings": [dict(w) for w in self.warnings],
        }

    @property
    def endpoints(self) -> tuple[ev.LLMSpec, ...]:
        """Every ``llm`` entry, in order (empty when none is set)."""
        return () if self.llm is None else (self.llm, *self.fallbacks)

    def core_config(self) -> SessionConfig:
        return SessionConfig(
            system_prompt=self.system_prompt,
            greeting=self.greeting,
            voice=self.voice_id or self.voice,
            tools=tuple(_core_tool(t) for t in self.tools),
            turn_detection=self.turn_detection,
            warm_prompt=True,
            # Each entry's client sends its max_tokens (the entry's own, else the server's).
            max_tokens=None,
        )

    def apply(self, patch: ev.SessionPatch) -> SessionSpec:
        """This configuration with a ``session.update`` applied.

        Raises:
            SessionRefused: ``invalid_config`` for turn-detection values that
                do not fit together.
        """
        spec = self
        if patch.ignored:
            known = {w.get("param") for w in spec.warnings}
            added = tuple(_ignored(param) for param in patch.ignored if param not in known)
            spec = dataclasses.replace(spec, warnings=spec.warnings + added)
        if patch.system_prompt is not None:
            spec = dataclasses.replace(spec, system_prompt=patch.system_prompt)
        if "greeting" in patch.keys:
            spec = dataclasses.replace(spec, greeting=patch.greeting or None)
        if patch.tools is not None:
            spec = dataclasses.replace(spec, tools=patch.tools)
        if patch.llm is not None:
            spec = dataclasses.replace(
                spec, llm=patch.llm[0] if patch.llm else None, fallbacks=tuple(patch.llm[1:])
            )
        if patch.input is not None:
            if patch.input.format is not None:
                spec = dataclasses.replace(spec, input_format=patch.input.format)
            if patch.input.keyterms is not None:
                spec = dataclasses.replace(spec, keyterms=patch.input.keyterms)
            if patch.input.turn_detection is not None:
                spec = dataclasses.replace(
                    spec, turn_detection=_turn_detection(spec.turn_detection,
                                                         patch.input.turn_detection)
                )  # fmt: skip
        if patch.output is not None:
            out = patch.output
            if out.voice is not None:
                spec = dataclasses.replace(spec, voice=out.voice)
            if out.format is not None:
                spec = dataclasses.replace(spec, output_format=out.format)
            if out.volume is not None:
                spec = dataclasses.replace(spec, volume=out.volume)
        return spec

    def to_state(self, seal: Seal) -> dict[str, Any]:
        """Every field, for a resumable session's state (JSON-serialisable).

        Unlike :meth:`public`, nothing is left out: each ``llm`` entry and tool keeps
        every setting, and ``turn_detection`` every knob. Secrets are sealed with
        ``seal(secret, label)``, labels ``llm`` (the first entry's key), ``llm:N``
        (entry N's) and ``tool:HEADER`` (an HTTP tool's header).
        """
        return {
            "format": STATE_FORMAT,
            "system_prompt": self.system_prompt,
            "greeting": self.greeting,
            "voice": self.voice,
            "tools": [_tool_state(t, seal) for t in self.tools],
            "input_format": self.input_format.encoding,
            "output_format": self.output_format.encoding,
            "volume": self.volume,
            "keyterms": list(self.keyterms),
            "turn_detection": dataclasses.asdict(self.turn_detection),
            "llm": [
                _llm_state(e, "llm" if i == 0 else f"llm:{i}", seal)
                for i, e in enumerate(self.endpoints)
            ],
            "agent_id": self.agent_id,
            "voice_id": self.voice_id,
            "warnings": [dict(w) for w in self.warnings],
            "max_tokens": self.max_tokens,
        }

    @classmethod
    def from_state(cls, doc: Mapping[str, Any], open_: Open) -> SessionSpec:
        """The spec :meth:`to_state` wrote; ``open_(sealed, label)`` opens its secrets.

        Raises:
            KeyError, TypeError, ValueError: not a state this version wrote.
        """
        if doc.get("format") != STATE_FORMAT:
            raise ValueError(f"not a session state of format {STATE_FORMAT}")
        entries = [
            _llm_from_state(e, "llm" if i == 0 else f"llm:{i}", open_)
            for i, e in enumerate(doc["llm"])
        ]
        return cls(
            system_prompt=doc["system_prompt"],
            greeting=doc["greeting"],
            voice=doc["voice"],
            tools=tuple(_tool_from_state(t, open_) for t in doc["tools"]),
            input_format=ev.AudioFormat(encoding=doc["input_format"]),
            output_format=ev.AudioFormat(encoding=doc["output_format"]),
            volume=float(doc["volume"]),
            keyterms=tuple(doc["keyterms"]),
            turn_detection=TurnDetection(**doc["turn_detection"]),
            llm=entries[0] if entries else None,
            fallbacks=tuple(entries[1:]),
            agent_id=doc["agent_id"],
            voice_id=doc["voice_id"],
            warnings=tuple(doc["warnings"]),
            max_tokens=doc["max_tokens"],
        )

    def immutable_change(self, patch: ev.SessionPatch) -> str | None:
        """The first field a later update may not change, if it changes one."""
        if "greeting" in patch.keys and (patch.greeting or None) != self.greeting:
            return "session.greeting"
        if patch.output is not None:
            if patch.output.voice is not None and patch.output.voice != self.voice:
                return "session.output.voice"
            if patch.output.format is not None and patch.output.format != self.output_format:
                return "session.output.format"
        return None


def entry_public(entry: ev.LLMSpec) -> dict[str, Any]:
    """An ``llm`` entry as reads show it: no key; optional settings only when set."""
    doc: dict[str, Any] = {"base_url": entry.base_url, "model": entry.model}
    if entry.max_tokens is not None:
        doc["max_tokens"] = entry.max_tokens
    if entry.first_token_timeout_ms is not None:
        doc["first_token_timeout_ms"] = entry.first_token_timeout_ms
    if entry.think_block != "auto":
        doc["think_block"] = entry.think_block
    return doc


STATE_FORMAT: Final = 2
"""The version of :meth:`SessionSpec.to_state`'s document (states without one were
written as :meth:`SessionSpec.public` plus sealed keys)."""

Seal = Callable[[Secret, str], str]
"""Seals a secret under a label (``llm``, ``llm:1``, ``tool:X-Key``): the sealed text."""
Open = Callable[[str, str], Secret]
"""Opens what :data:`Seal` sealed under that label."""


def _llm_state(entry: ev.LLMSpec, label: str, seal: Seal) -> dict[str, Any]:
    doc = {f.name: getattr(entry, f.name) for f in dataclasses.fields(entry)}
    doc["api_key"] = None if entry.api_key is None else seal(entry.api_key, label)
    return doc


def _llm_from_state(doc: Mapping[str, Any], label: str, open_: Open) -> ev.LLMSpec:
    sealed = doc["api_key"]
    return ev.LLMSpec(**{**doc, "api_key": None if sealed is None else open_(sealed, label)})


def _tool_state(tool: ev.ToolSpec, seal: Seal) -> dict[str, Any]:
    doc = {f.name: getattr(tool, f.name) for f in dataclasses.fields(tool) if f.name != "http"}
    doc["parameters"] = dict(tool.parameters)
    if tool.http is not None:
        doc["http"] = {
            "url": tool.http.url,
            "method": tool.http.method,
            "headers": [
                [name, seal(value, f"tool:{name}")] for name, value in tool.http.headers.items()
            ],
        }
    return doc


def _tool_from_state(doc: Mapping[str, Any], open_: Open) -> ev.ToolSpec:
    fields = {k: v for k, v in doc.items() if k != "http"}
    http = doc.get("http")
    return ev.ToolSpec(
        **fields,
        http=None if http is None else ev.HttpToolSpec(
            url=http["url"], method=http["method"],
            headers={name: open_(sealed, f"tool:{name}") for name, sealed in http["headers"]},
        ),
    )  # fmt: skip


def _ignored(param: str) -> Mapping[str, str]:
    reason = ev.ignored_reason(param)
    if not reason:
        return {
            "param": param,
            "code": "unknown_field",
            "message": f"{param} is not a field this server knows; it has no effect",
        }
    return {
        "param": param,
        "code": "ignored_field",
        "message": f"{param} is accepted but has no effect on this server: {reason}",
    }


def _turn_detection(base: TurnDetection, patch: ev.TurnDetectionPatch) -> TurnDetection:
    min_silence = patch.min_silence if patch.min_silence is not None else base.min_silence_ms
    max_silence = patch.max_silence if patch.max_silence is not None else base.max_silence_ms
    if patch.min_silence is not None and patch.max_silence is None:
        max_silence = max(max_silence, min_silence)
    if min_silence > max_silence:
        raise SessionRefused(
            "invalid_config", "min_silence must not exceed max_silence",
            param="session.input.turn_detection.min_silence",
        )  # fmt: skip
    return dataclasses.replace(
        base,
        vad_threshold=(
            patch.vad_threshold if patch.vad_threshold is not None else base.vad_threshold
        ),
        min_silence_ms=min_silence,
        max_silence_ms=max_silence,
        pause_ms=min(base.pause_ms, min_silence),
        interrupt_response=(
            patch.interrupt_response
            if patch.interrupt_response is not None
            else base.interrupt_response
        ),
    )


def _core_tool(tool: ev.ToolSpec) -> Tool:
    if tool.http is None:
        return ClientTool(
            name=tool.name, description=tool.description, parameters=tool.parameters,
            timeout_s=tool.timeout_seconds,
        )  # fmt: skip
    return HttpTool(
        name=tool.name, url=tool.http.url, description=tool.description,
        parameters=tool.parameters, method=tool.http.method, headers=tool.http.headers,
        timeout_s=tool.timeout_seconds,
    )  # fmt: skip


def default_llm_from_env(env: Mapping[str, str]) -> ev.LLMSpec | None:
    """The server's default endpoint (``VOXLOOP_LLM_BASE_URL``, ``_MODEL``, ``_API_KEY``).

    Raises:
        ValueError: a base URL without a model.
    """
    base_url = env.get("VOXLOOP_LLM_BASE_URL", "").strip()
    if not base_url:
        return None
    model = env.get("VOXLOOP_LLM_MODEL", "").strip()
    if not model:
        raise ValueError("VOXLOOP_LLM_BASE_URL is set: set VOXLOOP_LLM_MODEL too")
    key = env.get("VOXLOOP_LLM_API_KEY", "")
    return ev.LLMSpec(base_url=base_url, model=model, api_key=Secret(key) if key else None)
