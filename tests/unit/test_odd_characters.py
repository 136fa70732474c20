"""Every text path with every odd character class: nothing a client or an endpoint sends
makes a string a speech engine refuses or a WebSocket frame cannot carry.

Client text (greeting, instructions, ``conversation.message``, tool results, tool
parameters) is refused with a typed ``invalid_value`` naming the field, or accepted
and encodable; endpoint text (content deltas, tool-call arguments) is made safe.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runtime.conversation.tools import ClientTool, ToolRunner
from runtime.llm.sse import SSEEvent
from runtime.llm.stream import ChatChunkDecoder, TextDelta, ToolCall
from runtime.protocol import events as ev
from runtime.safetext import safe_json, safe_text
from runtime.sessions.spec import SessionSpec
from runtime.speech.text import clean_for_speech

# One representative (or a range) of each class of character a text may hold.
ODD = st.one_of(
    st.sampled_from(["\x00", "\x01", "\x07", "\x1b", "\x7f", "\x85", "\x9f"]),  # C0, DEL, C1
    st.sampled_from(["\ud800", "\udbff", "\udc00", "\udfff"]),  # unpaired surrogates
    st.sampled_from(["\ufffe", "\uffff", "\U0010ffff", "\ufdd0"]),  # noncharacters
    st.sampled_from(["\ufeff", "\u200b", "\u200d", "\u2028", "\u2029"]),  # BOM, zero-width, seps
    st.sampled_from(["\u202e", "\u2066", "\u061c"]),  # bidirectional controls
    st.sampled_from(["\u0301", "e\u0301", "\U0001f469\u200d\U0001f52c", "\U0001f1eb\U0001f1f7"]),
    st.sampled_from(["\ue000", "\U000f0000", "\t", "\n", "\r", "\\", '"', "&#0;", "&#xd800;"]),
    st.characters(codec=None),  # anything at all
)
TEXT = st.lists(st.one_of(ODD, st.text(max_size=4)), max_size=12).map("".join)
SAFE = settings(max_examples=150, derandomize=True, deadline=None)


def _speakable_and_sendable(text: str) -> None:
    text.encode("utf-8")  # a WebSocket text frame can carry it
    assert "\x00" not in text


def _client_messages(text: str) -> list[tuple[str, dict[str, Any]]]:
    return [
        ("session.greeting", {"type": "session.update", "session": {"greeting": text}}),
        ("session.system_prompt",
         {"type": "session.update", "session": {"system_prompt": text}}),
        ("session.input.keyterms[0]",
         {"type": "session.update", "session": {"input": {"keyterms": [text]}}}),
        ("session.tools[0].description", {"type": "session.update", "session": {
            "tools": [{"name": "t", "description": text}]}}),
        ("session.tools[0].parameters.properties.x.description",
         {"type": "session.update", "session": {"tools": [{"name": "t", "parameters": {
             "type": "object", "properties": {"x": {"description": text}}}}]}}),
        ("instructions", {"type": "reply.create", "instructions": text}),
        ("content", {"type": "conversation.message", "role": "user", "content": text}),
        ("result", {"type": "tool.result", "call_id": "c1", "result": text}),
        ("result.note", {"type": "tool.result", "call_id": "c1", "result": {"note": text}}),
    ]  # fmt: skip


@SAFE
@given(TEXT)
def test_client_text_is_refused_by_field_or_accepted_and_sendable(text: str) -> None:
    # What a client sends is JSON: a pair of surrogate escapes is one character.
    decoded = json.loads(json.dumps(text))
    bad = "\x00" in decoded or any("\ud800" <= c <= "\udfff" for c in decoded)
    for param, doc in _client_messages(text):
        wire = json.dumps(doc)  # escapes: what a client really sends
        if bad:
            with pytest.raises(ev.ProtocolError) as refused:
                ev.decode_client_event(wire)
            assert (refused.value.code, refused.value.param) == ("invalid_value", param)
            continue
        event = ev.decode_client_event(wire)
        if isinstance(event, ev.SessionUpdate):
            config = SessionSpec().apply(event.session).public()
            out = ev.encode(ev.SessionReady(session_id="s", config=config))
            out.encode("utf-8")
            assert json.loads(out)["config"] == json.loads(json.dumps(config))


@SAFE
@given(st.sampled_from(["NaN", "Infinity", "-Infinity", "1e999", "-1e999"]))
def test_non_finite_numbers_are_refused_where_they_stand(number: str) -> None:
    schema = '{"type":"object","properties":{"x":{"type":"number","maximum":NUMBER}}}'
    tools = '[{"name":"t","parameters":' + schema.replace("NUMBER", number) + "}]"
    wire = '{"type":"session.update","session":{"tools":' + tools + "}}"
    with pytest.raises(ev.ProtocolError) as refused:
        ev.decode_client_event(wire)
    assert refused.value.code == "invalid_value"
    assert refused.value.param == "session.tools[0].parameters.properties.x.maximum"


def test_nesting_deeper_than_the_rest_api_allows_is_refused() -> None:
    deep: Any = "x"
    for _ in range(ev.MAX_DEPTH + 1):
        deep = {"a": deep}
    wire = json.dumps({"type": "tool.result", "call_id": "c", "result": deep})
    with pytest.raises(ev.ProtocolError) as refused:
        ev.decode_client_event(wire)
    assert refused.value.code == "invalid_value"
    assert refused.value.message.endswith(f"is nested deeper than {ev.MAX_DEPTH} levels")


def _stream(*deltas: dict[str, Any]) -> list[Any]:
    decoder = ChatChunkDecoder()
    out: list[Any] = []
    for delta in deltas:
        doc = {"id": "c", "object": "chat.completion.chunk",
               "choices": [{"index": 0, "delta": delta, "finish_reason": None}]}  # fmt: skip
        out += decoder.receive_event(SSEEvent(data=json.dumps(doc)))
    out += decoder.receive_event(SSEEvent(data="[DONE]"))
    return out


@SAFE
@given(TEXT, TEXT)
def test_endpoint_deltas_are_made_safe(first: str, second: str) -> None:
    events = _stream({"content": first}, {"content": second})
    text = "".join(e.text for e in events if isinstance(e, TextDelta))
    _speakable_and_sendable(text)
    # Each delta is its own JSON document: a surrogate pair split between two is two halves.
    first, second = json.loads(json.dumps(first)), json.loads(json.dumps(second))
    assert text == safe_text(first) + safe_text(second)
    _speakable_and_sendable(clean_for_speech(first + second))


@SAFE
@given(TEXT, TEXT)
def test_endpoint_tool_call_arguments_are_made_safe(name_part: str, value: str) -> None:
    arguments = json.dumps({"city": value, name_part: 1})
    events = _stream({"tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                                      "function": {"name": "lookup", "arguments": arguments}}]})  # fmt: skip
    (call,) = [e for e in events if isinstance(e, ToolCall)]
    seen: list[dict[str, Any]] = []

    async def run() -> None:
        asked = asyncio.Event()

        def on_call(call_id: str, name: str, args: dict[str, Any]) -> None:
            seen.append(args)
            asked.set()

        runner = ToolRunner((ClientTool(name="lookup", timeout_s=1),), on_client_call=on_call)
        task = asyncio.create_task(runner.run(call))
        await asked.wait()
        runner.submit(call.id, "ok")
        assert await task == "ok"

    asyncio.run(run())
    (args,) = seen
    assert args == safe_json(json.loads(arguments))
    assert all(safe_text(k) == k and safe_text(str(v)) == str(v) for k, v in args.items())
    out = ev.encode(ev.ToolCall(call_id=call.id, name="lookup", arguments=args))
    out.encode("utf-8")
    assert "\x00" not in json.loads(out)["arguments"]["city"]


@SAFE
@given(TEXT)
def test_safe_text_removes_exactly_the_unsafe_classes(text: str) -> None:
    out = safe_text(text)
    _speakable_and_sendable(out)
    kept = [c for c in text if not (
        c <= "\x08" or "\x0b" <= c <= "\x0c" or "\x0e" <= c <= "\x1f" or "\x7f" <= c <= "\x9f"
        or "\ud800" <= c <= "\udfff" or c in "\ufffe\uffff")]  # fmt: skip
    assert out == "".join(kept)
