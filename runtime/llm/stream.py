"""Pure decoding of OpenAI chat-completions stream chunks into typed events.

Theory of operation
-------------------
:class:`ChatChunkDecoder` takes the SSE events of one streamed
``/chat/completions`` response and produces a closed set of typed events:

* :class:`StreamStarted` once, at the first chunk with a non-empty
  ``choices`` (often a role-only chunk);
* :class:`TextDelta` for speakable content and :class:`ReasoningDelta` for
  reasoning (``reasoning_content``, ``reasoning``, or ``<think>…</think>``
  inside ``content``, even when a tag is split across chunks) — reasoning is
  never speakable;
* :class:`ToolCallDelta` per tool-call fragment and, when the choice finishes
  (or the stream ends), one assembled :class:`ToolCall` per index: ``id`` and
  ``name`` may arrive in separate deltas, ``arguments`` fragments are
  concatenated and ``null``/absent arguments become ``"{}"``;
* :class:`Usage` from a chunk carrying ``usage`` (with empty or non-empty
  ``choices``); :class:`Finish` with the ``finish_reason``.

Only choice index 0 is read (voxloop never asks for ``n > 1``). A stream may
end with ``data: [DONE]`` or simply end; both are complete. Anything that is
not a JSON object in the documented shape raises :class:`MalformedStream`;
an in-band ``{"error": …}`` object raises :class:`EndpointServerError`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Final

from runtime.errors import EndpointServerError, MalformedStream
from runtime.llm.sse import SSEEvent
from runtime.tags import TagSplitter

_THINK_OPEN: Final = "<think>"
_THINK_CLOSE: Final = "</think>"
_MAX_SHOWN: Final = 120


@dataclass(frozen=True, slots=True, kw_only=True)
class StreamStarted:
    response_id: str | None = None
    model: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class TextDelta:
    text: str


@dataclass(frozen=True, slots=True, kw_only=True)
class ReasoningDelta:
    text: str


@dataclass(frozen=True, slots=True, kw_only=True)
class ToolCallDelta:
    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class ToolCall:
    index: int
    id: str
    name: str
    arguments: str

    def to_message(self) -> dict[str, Any]:
        """The ``tool_calls`` entry of an assistant message in OpenAI form."""
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class Usage:
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    total_tokens: int | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Finish:
    reason: str


ChatEvent = StreamStarted | TextDelta | ReasoningDelta | ToolCallDelta | ToolCall | Usage | Finish


def _shown(text: str) -> str:
    return text if len(text) <= _MAX_SHOWN else text[:_MAX_SHOWN] + "…"


@dataclass(slots=True)
class _PartialCall:
    index: int
    id: str | None = None
    name: str | None = None
    arguments: list[str] = field(default_factory=list)


class ChatChunkDecoder:
    """Turns SSE events of a chat-completions stream into :data:`ChatEvent` s."""

    __slots__ = ("_calls", "_calls_emitted", "_done", "_response_id", "_started", "_think")

    def __init__(self) -> None:
        self._started = False
        self._done = False
        self._think = TagSplitter(_THINK_OPEN, _THINK_CLOSE)
        self._calls: dict[int, _PartialCall] = {}
        self._calls_emitted = False
        self._response_id: str | None = None

    @property
    def done(self) -> bool:
        """Whether ``data: [DONE]`` was received."""
        return self._done

    def receive_event(self, event: SSEEvent) -> list[ChatEvent]:
        """Decode one SSE event.

        Raises:
            MalformedStream: the event is not a chat-completions chunk.
            EndpointServerError: the endpoint sent an in-band error object.
        """
        data = event.data.strip()
        if data == "[DONE]":
            self._done = True
            return self._finish_text() + self._emit_calls()
        if self._done:
            raise MalformedStream("data received after [DONE]", retryable=False)
        try:
            chunk = json.loads(data)
        except ValueError:
            raise MalformedStream(
                f"stream event is not JSON: {_shown(data)!r}", retryable=True
            ) from None
        if not isinstance(chunk, dict):
            raise MalformedStream("stream event is not a JSON object", retryable=True)
        if chunk.get("error"):
            raise EndpointServerError(
                f"endpoint reported an error mid-stream: {_error_text(chunk['error'])}",
                retryable=True,
            )
        out: list[ChatEvent] = []
        choices = chunk.get("choices")
        if choices is None:
            choices = []
        if not isinstance(choices, list):
            raise MalformedStream("'choices' is not a list", retryable=True)
        if choices and not self._started:
            self._started = True
            rid = chunk.get("id")
            model = chunk.get("model")
            self._response_id = rid if isinstance(rid, str) else None
            out.append(
                StreamStarted(
                    response_id=self._response_id,
                    model=model if isinstance(model, str) else None,
                )
            )
        for choice in choices:
            if not isinstance(choice, dict):
                raise MalformedStream("a choice is not an object", retryable=True)
            if choice.get("index", 0) != 0:
                continue
            out.extend(self._choice(choice))
        usage = chunk.get("usage")
        if isinstance(usage, dict):
            out.append(
                Usage(
                    prompt_tokens=_int_or_none(usage.get("prompt_tokens")),
                    completion_tokens=_int_or_none(usage.get("completion_tokens")),
                    total_tokens=_int_or_none(usage.get("total_tokens")),
                )
            )
        return out

    def receive_eof(self) -> list[ChatEvent]:
        """The body ended (with or without ``[DONE]``): flush what is held."""
        return self._finish_text() + self._emit_calls()

    def _choice(self, choice: dict[str, Any]) -> list[ChatEvent]:
        out: list[ChatEvent] = []
        delta = choice.get("delta")
        if delta is None:
            delta = choice.get("message") or {}
        if not isinstance(delta, dict):
            raise MalformedStream("'delta' is not an object", retryable=True)
        for key in ("reasoning_content", "reasoning"):
            reasoning = delta.get(key)
            if isinstance(reasoning, str) and reasoning:
                out.append(ReasoningDelta(text=reasoning))
                break
        content = delta.get("content")
        if content is not None and not isinstance(content, str):
            raise MalformedStream("'content' is not a string", retryable=True)
        if content:
            for is_reasoning, piece in self._think.feed(content):
                out.append(ReasoningDelta(text=piece) if is_reasoning else TextDelta(text=piece))
        tool_calls = delta.get("tool_calls")
        if tool_calls is not None:
            if not isinstance(tool_calls, list):
                raise MalformedStream("'tool_calls' is not a list", retryable=True)
            for position, call in enumerate(tool_calls):
                out.append(self._tool_delta(position, call))
        reason = choice.get("finish_reason")
        if isinstance(reason, str) and reason:
            out.extend(self._finish_text())
            out.extend(self._emit_calls())
            out.append(Finish(reason=reason))
        return out

    def _tool_delta(self, position: int, call: object) -> ToolCallDelta:
        if not isinstance(call, dict):
            raise MalformedStream("a tool call delta is not an object", retryable=True)
        index = call.get("index", position)
        if not isinstance(index, int):
            raise MalformedStream("tool call 'index' is not an integer", retryable=True)
        fn = call.get("function") or {}
        if not isinstance(fn, dict):
            raise MalformedStream("tool call 'function' is not an object", retryable=True)
        call_id = call.get("id")
        name = fn.get("name")
        args = fn.get("arguments")
        if args is None:
            args = ""
        elif not isinstance(args, str):
            # Some servers send the arguments as an object rather than a string.
            args = json.dumps(args, separators=(",", ":"))
        partial = self._calls.setdefault(index, _PartialCall(index))
        if isinstance(call_id, str) and call_id and partial.id is None:
            partial.id = call_id
        if isinstance(name, str) and name and partial.name is None:
            partial.name = name
        if args:
            partial.arguments.append(args)
        return ToolCallDelta(
            index=index,
            id=call_id if isinstance(call_id, str) and call_id else None,
            name=name if isinstance(name, str) and name else None,
            arguments=args,
        )

    def _finish_text(self) -> list[ChatEvent]:
        return [
            ReasoningDelta(text=piece) if is_reasoning else TextDelta(text=piece)
            for is_reasoning, piece in self._think.flush()
        ]

    def _emit_calls(self) -> list[ChatEvent]:
        if self._calls_emitted or not self._calls:
            return []
        self._calls_emitted = True
        out: list[ChatEvent] = []
        for index in sorted(self._calls):
            partial = self._calls[index]
            if not partial.name:
                raise MalformedStream(f"tool call {index} has no function name", retryable=True)
            arguments = "".join(partial.arguments).strip() or "{}"
            call_id = partial.id or f"call_{self._response_id or 'voxloop'}_{index}"
            out.append(ToolCall(index=index, id=call_id, name=partial.name, arguments=arguments))
        return out


def _int_or_none(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _error_text(error: object) -> str:
    if isinstance(error, dict):
        message = error.get("message")
        if isinstance(message, str):
            return _shown(message)
    return _shown(str(error))
