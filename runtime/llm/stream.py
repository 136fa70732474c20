"""Pure decoding of OpenAI chat-completions stream chunks into typed events.

Theory of operation
-------------------
:class:`ChatChunkDecoder` takes the SSE events of one streamed
``/chat/completions`` response and produces a closed set of typed events:

* :class:`StreamStarted` once, at the first chunk with a non-empty
  ``choices`` (often a role-only chunk);
* :class:`TextDelta` for speakable content and :class:`ReasoningDelta` for
  reasoning — never speakable. Reasoning arrives as ``reasoning_content`` or
  ``reasoning`` fields, as typed content parts (``{"type": "thinking", …}``),
  or inside ``content`` between ``<think>`` and ``</think>`` (tags may be split
  across chunks). When the chat template itself wrote the opening tag (as
  DeepSeek-R1 and QwQ templates do), only a lone ``</think>`` appears in the
  output: everything before it is reasoning. See "Template-opened reasoning";
* ``content`` is a string or a list of typed parts: ``text`` (and
  ``output_text``) parts are content, ``thinking``/``reasoning`` parts are
  reasoning, a ``refusal`` (part or field) is speakable, other part types
  (images, audio) carry nothing to speak and are skipped;
* :class:`ToolCallDelta` per tool-call fragment and, when the choice finishes
  (or the stream ends), one assembled :class:`ToolCall` per call, in the order
  the calls started. A fragment belongs to the call with its ``index``,
  except that a fragment carrying a new ``id`` always starts a new call
  (servers that reuse index 0 for every parallel call), and a fragment
  without ``index`` continues the latest call unless it carries a new ``id``.
  ``id`` and ``name`` may arrive in separate fragments, ``arguments``
  fragments are concatenated and ``null``/absent arguments become ``"{}"``;
* :class:`Usage` from a chunk carrying ``usage`` (with empty or non-empty
  ``choices``); :class:`Finish` with the ``finish_reason``.

Only choice index 0 is read (voxloop never asks for ``n > 1``). ``data:
[DONE]`` is terminal: :attr:`ChatChunkDecoder.done` turns true, held text is
released and anything after it is ignored (servers that keep the connection
open are not waited for). A body that simply ends is complete too.

Errors: anything that is not a JSON object in the documented shape raises
:class:`MalformedStream`. A failure reported in the stream — an SSE event
named ``error`` (llama.cpp's ``error:`` field, or ``event: error``) or a
chunk with an ``error`` object — raises the error its code calls for, with
the rules of an HTTP status (:func:`status_error`): a 5xx or a code-less
failure is a retryable :class:`EndpointServerError`, a 429 is
:class:`EndpointRateLimited`, another 4xx is :class:`EndpointRejected`. It is
never the end of a successful reply, whether text came before it or not.

Template-opened reasoning
-------------------------
Nothing in a stream says, before the ``</think>``, that the template opened a
think block, and speech cannot be taken back. ``leading_reasoning`` says what
to do with content that starts a reply: ``True`` — it is reasoning until
``</think>``; ``False`` — it is the answer (a stray ``</think>`` is dropped);
``None`` (unknown) — it is held back until the stream decides: a
``</think>`` makes it reasoning, a ``<think>`` or the end of the stream makes
it the answer, and so does reasoning arriving in a separate field (the server
parses reasoning itself). :attr:`ChatChunkDecoder.leading_reasoning` reports
the decision so a client can remember it for the next replies.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Final

from runtime.errors import (
    EndpointAuthError,
    EndpointError,
    EndpointRateLimited,
    EndpointRejected,
    EndpointServerError,
    EndpointTimeout,
    MalformedStream,
)
from runtime.llm.sse import SSEEvent
from runtime.safetext import safe_json

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


class _ThinkSplitter:
    """``<think>…</think>`` in streamed content, including a lone ``</think>``.

    Text that could be the beginning of either tag is held back until the
    next piece decides it, so any split of the same content gives the same
    pieces (joined).
    """

    __slots__ = (
        "_head",
        "_held",
        "_inside",
        "_template_opened",
        "_undecided",
        "closed",
        "ended_undecided",
        "stray",
    )

    def __init__(self, leading_reasoning: bool | None) -> None:
        self._inside = leading_reasoning is True
        self._template_opened = leading_reasoning is True
        self._undecided = leading_reasoning is None
        self.closed = False  # a think block was closed in this reply
        self.stray = False  # a closing tag came while the reply was known not to be inside one
        self.ended_undecided = False  # the content ended before anything decided its start
        self._held = ""
        self._head: list[str] = []

    @property
    def leading_reasoning(self) -> bool | None:
        """Whether the reply started inside reasoning (``None``: not decided yet)."""
        if self._undecided:
            return None
        return self._template_opened

    @property
    def inside(self) -> bool:
        return self._inside

    def decide_plain(self) -> list[tuple[bool, str]]:
        """The reply does not start inside reasoning: release the held head as text."""
        if not self._undecided:
            return []
        self._undecided = False
        head, self._head = "".join(self._head), []
        return [(False, head)] if head else []

    def feed(self, text: str) -> list[tuple[bool, str]]:
        out: list[tuple[bool, str]] = []
        buf = self._held + text
        self._held = ""
        while buf:
            at_open = buf.find(_THINK_OPEN)
            at_close = buf.find(_THINK_CLOSE)
            if at_open == -1 and at_close == -1:
                keep = _partial_tag_suffix(buf)
                self._emit(out, buf[: len(buf) - keep])
                self._held = buf[len(buf) - keep :]
                break
            if at_close == -1 or (at_open != -1 and at_open < at_close):
                self._emit(out, buf[:at_open])
                if self._undecided:
                    out.extend(self.decide_plain())
                self._inside = True
                buf = buf[at_open + len(_THINK_OPEN) :]
                continue
            before = buf[:at_close]
            self.closed = True
            if self._inside:
                self._emit(out, before)
            elif self._undecided:
                # The template opened the block: everything so far was reasoning.
                head = "".join(self._head) + before
                self._head = []
                self._undecided = False
                self._template_opened = True
                if head:
                    out.append((True, head))
            else:
                self.stray = True
                self._emit(out, before)  # a stray closing tag is never spoken
            self._inside = False
            buf = buf[at_close + len(_THINK_CLOSE) :]
        return out

    def flush(self) -> list[tuple[bool, str]]:
        """The content ended: release what is held (an undecided head is the answer)."""
        held, self._held = self._held, ""
        out: list[tuple[bool, str]] = []
        self._emit(out, held)
        if self._undecided:
            self.ended_undecided = True
        out.extend(self.decide_plain())
        return out

    def _emit(self, out: list[tuple[bool, str]], text: str) -> None:
        if not text:
            return
        if self._undecided and not self._inside:
            self._head.append(text)
        else:
            out.append((self._inside, text))


def _partial_tag_suffix(buf: str) -> int:
    """Length of the longest end of ``buf`` that could begin a think tag."""
    for n in range(min(len(_THINK_CLOSE) - 1, len(buf)), 0, -1):
        tail = buf[-n:]
        if _THINK_OPEN.startswith(tail) or _THINK_CLOSE.startswith(tail):
            return n
    return 0


_TEXT_PARTS: Final = frozenset({"text", "output_text"})
_REASONING_PARTS: Final = frozenset({"thinking", "reasoning", "reasoning_text", "summary_text"})


def _part_text(value: object) -> str:
    """Text of a part field: a string, or a list of nested text parts (Mistral's thinking)."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return "".join(
            item if isinstance(item, str) else _part_text(item.get("text"))
            for item in value
            if isinstance(item, str | dict)
        )
    return ""


class ChatChunkDecoder:
    """Turns SSE events of a chat-completions stream into :data:`ChatEvent` s.

    Args:
        leading_reasoning: whether a reply's content starts inside a think
            block the chat template opened (``None``: decide from the stream;
            see the module docstring).
    """

    __slots__ = (
        "_by_index",
        "_calls",
        "_calls_emitted",
        "_deltas",
        "_done",
        "_response_id",
        "_started",
        "_think",
    )

    def __init__(self, *, leading_reasoning: bool | None = None) -> None:
        self._started = False
        self._done = False
        self._deltas = 0
        self._think = _ThinkSplitter(leading_reasoning)
        self._calls: list[_PartialCall] = []
        self._by_index: dict[int, _PartialCall] = {}
        self._calls_emitted = False
        self._response_id: str | None = None

    @property
    def done(self) -> bool:
        """Whether ``data: [DONE]`` was received (the stream is over)."""
        return self._done

    @property
    def deltas(self) -> int:
        """Generated deltas received so far (content, reasoning, tool calls), counting
        content held back while undecided; heartbeats do not count."""
        return self._deltas

    @property
    def leading_reasoning(self) -> bool | None:
        """Whether this reply started inside a template-opened think block, once decided."""
        return self._think.leading_reasoning

    @property
    def think_closed(self) -> bool:
        """Whether a ``</think>`` closed a think block in this reply."""
        return self._think.closed

    @property
    def decided_by_end(self) -> bool:
        """Whether the start was undecided until the content ended (nothing showed the
        template's behaviour: a reply cut at ``max_tokens`` may still be inside reasoning)."""
        return self._think.ended_undecided

    @property
    def stray_close(self) -> bool:
        """Whether a ``</think>`` came outside any think block (dropped, never spoken)."""
        return self._think.stray

    def receive_event(self, event: SSEEvent) -> list[ChatEvent]:
        """Decode one SSE event.

        Raises:
            MalformedStream: the event is not a chat-completions chunk.
            EndpointError: the endpoint reported a failure in the stream
                (subclass by its code, see :func:`status_error`).
        """
        if self._done:
            return []
        data = event.data.strip()
        if event.event == "error":
            raise _in_band_error(_json_or_text(data))
        if data == "[DONE]":
            self._done = True
            return self._finish_text() + self._emit_calls()
        try:
            # Every string an endpoint sends is made safe before anything reads it.
            chunk = safe_json(json.loads(data))
        except ValueError:
            raise MalformedStream(
                f"stream event is not JSON: {_shown(data)!r}", retryable=True
            ) from None
        if not isinstance(chunk, dict):
            raise MalformedStream("stream event is not a JSON object", retryable=True)
        if chunk.get("error"):
            raise _in_band_error(chunk["error"])
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
                out.extend(self._reasoning(reasoning))
                break
        content = delta.get("content")
        if isinstance(content, str):
            out.extend(self._content(content))
        elif isinstance(content, list):
            for part in content:
                out.extend(self._part(part))
        elif content is not None:
            raise MalformedStream("'content' is not a string or a list of parts", retryable=True)
        refusal = delta.get("refusal")
        if isinstance(refusal, str) and refusal:
            out.extend(self._speakable(refusal))
        tool_calls = delta.get("tool_calls")
        if tool_calls is not None:
            if not isinstance(tool_calls, list):
                raise MalformedStream("'tool_calls' is not a list", retryable=True)
            out.extend(self._tool_delta(call) for call in tool_calls)
        reason = choice.get("finish_reason")
        if isinstance(reason, str) and reason:
            out.extend(self._finish_text())
            out.extend(self._emit_calls())
            out.append(Finish(reason=reason))
        return out

    def _content(self, text: str) -> list[ChatEvent]:
        if not text:
            return []
        self._deltas += 1
        return [
            ReasoningDelta(text=piece) if is_reasoning else TextDelta(text=piece)
            for is_reasoning, piece in self._think.feed(text)
        ]

    def _reasoning(self, text: str) -> list[ChatEvent]:
        # Reasoning in its own field or part: the server separates it, so the
        # content that follows is the answer, not a template-opened block.
        self._deltas += 1
        out: list[ChatEvent] = [ReasoningDelta(text=text)]
        if self._think.leading_reasoning is None and not self._think.inside:
            out.extend(TextDelta(text=t) for _, t in self._think.decide_plain())
        return out

    def _speakable(self, text: str) -> list[ChatEvent]:
        self._deltas += 1
        out: list[ChatEvent] = [TextDelta(text=t) for _, t in self._think.decide_plain()]
        out.append(TextDelta(text=text))
        return out

    def _part(self, part: object) -> list[ChatEvent]:
        if isinstance(part, str):
            return self._content(part)
        if not isinstance(part, dict):
            raise MalformedStream("a content part is not an object", retryable=True)
        kind = part.get("type")
        if kind in _TEXT_PARTS:
            return self._content(_part_text(part.get("text")))
        if kind in _REASONING_PARTS:
            for key in ("thinking", "reasoning", "text", "summary"):
                text = _part_text(part.get(key))
                if text:
                    return self._reasoning(text)
            return []
        if kind == "refusal":
            text = _part_text(part.get("refusal"))
            return self._speakable(text) if text else []
        # Images, audio and other parts carry nothing to speak.
        return []

    def _tool_delta(self, call: object) -> ToolCallDelta:
        if not isinstance(call, dict):
            raise MalformedStream("a tool call delta is not an object", retryable=True)
        index = call.get("index")
        if index is not None and (not isinstance(index, int) or isinstance(index, bool)):
            raise MalformedStream("tool call 'index' is not an integer", retryable=True)
        fn = call.get("function") or {}
        if not isinstance(fn, dict):
            raise MalformedStream("tool call 'function' is not an object", retryable=True)
        raw_id = call.get("id")
        call_id = raw_id if isinstance(raw_id, str) and raw_id else None
        raw_name = fn.get("name")
        name = raw_name if isinstance(raw_name, str) and raw_name else None
        args = fn.get("arguments")
        if args is None:
            args = ""
        elif not isinstance(args, str):
            # Some servers send the arguments as an object rather than a string.
            args = json.dumps(args, separators=(",", ":"))
        partial = (
            self._by_index.get(index)
            if index is not None
            else (self._calls[-1] if self._calls else None)
        )
        if partial is None or (call_id is not None and partial.id not in (None, call_id)):
            # A new call: an unseen index, or a new id (even under a reused index).
            partial = _PartialCall(len(self._calls))
            self._calls.append(partial)
        if index is not None:
            self._by_index[index] = partial
        self._deltas += 1
        if call_id is not None and partial.id is None:
            partial.id = call_id
        if name is not None and partial.name is None:
            partial.name = name
        if args:
            partial.arguments.append(args)
        return ToolCallDelta(index=partial.index, id=call_id, name=name, arguments=args)

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
        for partial in self._calls:
            index = partial.index
            if not partial.name:
                raise MalformedStream(f"tool call {index} has no function name", retryable=True)
            arguments = "".join(partial.arguments).strip() or "{}"
            call_id = partial.id or f"call_{self._response_id or 'voxloop'}_{index}"
            out.append(ToolCall(index=index, id=call_id, name=partial.name, arguments=arguments))
        return out


def _int_or_none(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _json_or_text(data: str) -> object:
    try:
        return json.loads(data)
    except ValueError:
        return data


def _error_text(error: object) -> str:
    if isinstance(error, dict):
        message = error.get("message")
        if isinstance(message, str):
            return _shown(" ".join(message.split()))
    return _shown(" ".join(str(error).split()))


def _error_code(error: object) -> int | None:
    if not isinstance(error, dict):
        return None
    for key in ("code", "status", "status_code"):
        value = error.get(key)
        if isinstance(value, str) and value.isdigit():
            value = int(value)
        if isinstance(value, int) and not isinstance(value, bool) and 400 <= value <= 599:
            return value
    return None


def _in_band_error(error: object) -> EndpointError:
    """The typed error for a failure reported inside a stream (HTTP status rules)."""
    if isinstance(error, dict) and isinstance(error.get("error"), dict):
        error = error["error"]
    code = _error_code(error)
    detail = _error_text(error)
    return status_error(
        code or 500,
        detail,
        None,
        what="reported an error in the stream",
        code_given=code is not None,
    )


def status_error(
    status: int,
    detail: str,
    retry_after: float | None,
    *,
    what: str = "",
    code_given: bool = True,
) -> EndpointError:
    """The typed error for an HTTP status (or an in-band error code).

    Args:
        status: the HTTP status or in-band code (500 when a failure had none).
        detail: the server's message, already redacted and shortened.
        retry_after: ``Retry-After`` in seconds, if the server sent one.
        what: for in-band errors, how the message names the failure.
        code_given: whether ``status`` came from the server (else it is not reported).

    Returns:
        401/403 → :class:`EndpointAuthError`; 429 → :class:`EndpointRateLimited`;
        408 → retryable :class:`EndpointTimeout`; 3xx and other 4xx →
        :class:`EndpointRejected`; anything else → :class:`EndpointServerError`
        (retryable except 501).
    """
    suffix = f": {detail}" if detail else ""
    if what:
        label = f"code {status}" if code_given else "no code"
        head = f"endpoint {what} ({label})"
    else:
        label = f"HTTP {status}"
        head = ""
    status_code = status if code_given else None
    if status in (401, 403):
        return EndpointAuthError(
            (head or f"endpoint refused the credentials ({label})") + suffix,
            retryable=False,
            status_code=status_code,
        )
    if status == 429:
        return EndpointRateLimited(
            (head or f"endpoint is rate limiting ({label})") + suffix,
            retry_after_s=retry_after,
            status_code=status,
        )
    if status == 408:
        return EndpointTimeout(
            (head or f"endpoint timed out the request ({label})") + suffix,
            retryable=True,
            status_code=status_code,
        )
    if 300 <= status < 400:
        return EndpointRejected(
            head + suffix
            if head
            else f"endpoint answered with a redirect ({label}); redirects are not followed",
            retryable=False,
            status_code=status_code,
        )
    if 400 <= status < 500:
        return EndpointRejected(
            (head or f"endpoint rejected the request ({label})") + suffix,
            retryable=False,
            status_code=status_code,
        )
    return EndpointServerError(
        (head or f"endpoint failed ({label})") + suffix,
        retryable=status != 501,
        status_code=status_code,
    )
