from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from runtime.errors import EndpointServerError, MalformedStream
from runtime.llm.sse import SSEEvent
from runtime.llm.stream import (
    ChatChunkDecoder,
    ChatEvent,
    Finish,
    ReasoningDelta,
    StreamStarted,
    TextDelta,
    ToolCall,
    ToolCallDelta,
    Usage,
)


def chunk(delta: dict[str, Any] | None = None, finish: str | None = None, **extra: Any) -> SSEEvent:
    doc: dict[str, Any] = {"id": "c1", "model": "m", "object": "chat.completion.chunk"}
    doc["choices"] = (
        [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish}]
    )
    doc.update(extra)
    return SSEEvent(data=json.dumps(doc))


def run(*events: SSEEvent, eof: bool = True) -> list[ChatEvent]:
    dec = ChatChunkDecoder()
    out: list[ChatEvent] = []
    for ev in events:
        out += dec.receive_event(ev)
    if eof:
        out += dec.receive_eof()
    return out


def text_of(events: list[ChatEvent]) -> str:
    return "".join(e.text for e in events if isinstance(e, TextDelta))


def reasoning_of(events: list[ChatEvent]) -> str:
    return "".join(e.text for e in events if isinstance(e, ReasoningDelta))


def test_role_chunk_starts_the_stream_and_text_follows():
    events = run(
        chunk({"role": "assistant", "content": ""}),
        chunk({"content": "Hello"}),
        chunk({"content": " there"}),
        chunk({}, "stop"),
        SSEEvent(data="[DONE]"),
    )
    assert events[0] == StreamStarted(response_id="c1", model="m")
    assert text_of(events) == "Hello there"
    assert events[-1] == Finish(reason="stop")
    assert sum(isinstance(e, StreamStarted) for e in events) == 1


def test_usage_chunk_with_empty_choices():
    events = run(
        chunk({"content": "a"}, "stop"),
        chunk(None, usage={"prompt_tokens": 10, "completion_tokens": 1, "total_tokens": 11}),
    )
    assert Usage(prompt_tokens=10, completion_tokens=1, total_tokens=11) in events


def test_usage_chunk_with_non_empty_choices_and_null_usage_elsewhere():
    events = run(
        chunk({"content": "a"}, usage=None),
        chunk({}, "stop", usage={"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}),
    )
    assert [e for e in events if isinstance(e, Usage)] == [
        Usage(prompt_tokens=3, completion_tokens=2, total_tokens=5)
    ]


def test_reasoning_content_and_reasoning_fields_are_never_text():
    events = run(
        chunk({"reasoning_content": "think "}),
        chunk({"reasoning": "more"}),
        chunk({"content": "Answer."}),
    )
    assert reasoning_of(events) == "think more"
    assert text_of(events) == "Answer."


@pytest.mark.parametrize(
    "pieces",
    [
        ["<think>plan it</think>Answer."],
        ["<th", "ink>plan", " it</thi", "nk>Answer."],
        ["<", "t", "h", "i", "n", "k", ">plan it<", "/", "think>", "Answer", "."],
    ],
)
def test_think_tags_split_anywhere(pieces: list[str]):
    events = run(*(chunk({"content": p}) for p in pieces))
    assert reasoning_of(events) == "plan it"
    assert text_of(events) == "Answer."


def test_angle_bracket_that_is_not_a_tag_is_text():
    events = run(chunk({"content": "1 <"}), chunk({"content": " 2 and <b>"}))
    assert text_of(events) == "1 < 2 and <b>"


def test_unterminated_think_stays_reasoning():
    events = run(chunk({"content": "<think>forever"}))
    assert text_of(events) == ""
    assert reasoning_of(events) == "forever"


def test_tool_call_assembled_by_index_with_id_and_name_in_separate_deltas():
    events = run(
        chunk(
            {
                "role": "assistant",
                "tool_calls": [
                    {"index": 0, "id": "call_1", "type": "function", "function": {"arguments": ""}}
                ],
            }
        ),
        chunk({"tool_calls": [{"index": 0, "function": {"name": "get_weather"}}]}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"city":'}}]}),
        chunk(
            {
                "tool_calls": [
                    {"index": 1, "id": "call_2", "function": {"name": "now", "arguments": None}}
                ]
            }
        ),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": ' "Paris"}'}}]}),
        chunk({}, "tool_calls"),
    )
    calls = [e for e in events if isinstance(e, ToolCall)]
    assert calls == [
        ToolCall(index=0, id="call_1", name="get_weather", arguments='{"city": "Paris"}'),
        ToolCall(index=1, id="call_2", name="now", arguments="{}"),
    ]
    assert json.loads(calls[0].arguments) == {"city": "Paris"}
    assert calls[0].to_message()["function"]["name"] == "get_weather"
    assert sum(isinstance(e, ToolCallDelta) for e in events) == 5
    assert events[-1] == Finish(reason="tool_calls")


def test_tool_call_emitted_at_eof_without_finish_and_object_arguments():
    events = run(
        chunk({"tool_calls": [{"index": 0, "function": {"name": "f", "arguments": {"a": 1}}}]})
    )
    calls = [e for e in events if isinstance(e, ToolCall)]
    assert calls == [ToolCall(index=0, id="call_c1_0", name="f", arguments='{"a":1}')]


def test_tool_call_without_name_is_malformed():
    with pytest.raises(MalformedStream, match="no function name"):
        run(
            chunk({"tool_calls": [{"index": 0, "id": "x", "function": {"arguments": "{}"}}]}),
            chunk({}, "tool_calls"),
        )


def test_done_then_eof_emits_nothing_twice():
    dec = ChatChunkDecoder()
    dec.receive_event(chunk({"content": "<thi"}))
    out = dec.receive_event(SSEEvent(data="[DONE]"))
    assert out == [TextDelta(text="<thi")]
    assert dec.done
    assert dec.receive_eof() == []


def test_other_choice_indices_are_ignored():
    doc = {
        "choices": [
            {"index": 1, "delta": {"content": "no"}},
            {"index": 0, "delta": {"content": "yes"}},
        ]
    }
    assert text_of(run(SSEEvent(data=json.dumps(doc)))) == "yes"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ("{not json", "not JSON"),
        ("[1, 2]", "not a JSON object"),
        ('{"choices": {}}', "'choices' is not a list"),
        ('{"choices": [1]}', "a choice is not an object"),
        ('{"choices": [{"delta": []}]}', "'delta' is not an object"),
        ('{"choices": [{"delta": {"content": 5}}]}', "'content' is not a string"),
        ('{"choices": [{"delta": {"tool_calls": {}}}]}', "'tool_calls' is not a list"),
        ('{"choices": [{"delta": {"tool_calls": [{"index": "0"}]}}]}', "'index' is not an integer"),
        ('{"choices": [{"delta": {"tool_calls": [5]}}]}', "not an object"),
    ],
)
def test_malformed_chunks(data: str, message: str):
    with pytest.raises(MalformedStream, match=message):
        run(SSEEvent(data=data))


def test_done_is_terminal_and_what_follows_is_ignored():
    dec = ChatChunkDecoder()
    # The start is undecided (a template may have opened a think block): held.
    assert dec.receive_event(chunk({"content": "Hi."})) == [
        StreamStarted(response_id="c1", model="m")
    ]
    assert dec.receive_event(SSEEvent(data="[DONE]")) == [TextDelta(text="Hi.")]
    assert dec.done
    assert dec.receive_event(chunk({"content": "late"})) == []
    assert dec.receive_event(SSEEvent(data="{not json")) == []
    assert dec.receive_event(SSEEvent(data="x", event="error")) == []
    assert dec.receive_eof() == []


def test_in_band_error_object_raises_server_error_with_message():
    with pytest.raises(EndpointServerError, match="model overloaded"):
        run(SSEEvent(data='{"error": {"message": "model overloaded", "code": 503}}'))


REPLY = "<think>Check the order.</think>Your order ships today, e.g. by 5 p.m."


@given(st.lists(st.integers(min_value=0, max_value=len(REPLY)), max_size=10))
def test_any_split_of_content_gives_same_text_and_reasoning(cuts: list[int]):
    points = sorted(set(cuts))
    pieces = [REPLY[a:b] for a, b in zip([0, *points], [*points, len(REPLY)], strict=True)]
    events = run(*(chunk({"content": p}) for p in pieces if p))
    assert text_of(events) == "Your order ships today, e.g. by 5 p.m."
    assert reasoning_of(events) == "Check the order."
