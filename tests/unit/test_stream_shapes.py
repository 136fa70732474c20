"""Response bodies real OpenAI-compatible servers send, through the pure decoders.

The recorded bodies in ``tests/data/endpoint-streams`` are decoded whole and
split at every byte boundary; each gives the same events.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from runtime.errors import (
    EndpointAuthError,
    EndpointError,
    EndpointRateLimited,
    EndpointRejected,
    EndpointServerError,
    MalformedStream,
)
from runtime.llm.sse import SSEDecoder, SSEEvent
from runtime.llm.stream import (
    ChatChunkDecoder,
    ChatEvent,
    ReasoningDelta,
    StreamStarted,
    TextDelta,
    ToolCall,
    ToolCallDelta,
)

from ..helpers import DATA

STREAMS = DATA / "endpoint-streams"


def body(name: str) -> bytes:
    return (STREAMS / name).read_bytes()


def decode(
    *pieces: bytes, leading_reasoning: bool | None = None
) -> tuple[list[ChatEvent], ChatChunkDecoder]:
    """Bytes in as a client reads them (pieces), typed events out, [DONE] terminal."""
    sse = SSEDecoder()
    dec = ChatChunkDecoder(leading_reasoning=leading_reasoning)
    out: list[ChatEvent] = []
    for piece in pieces:
        sse.receive_data(piece)
        for event in sse.events_received():
            out += dec.receive_event(event)
        if dec.done:
            return out, dec
    sse.receive_eof()
    for event in sse.events_received():
        out += dec.receive_event(event)
    out += dec.receive_eof()
    return out, dec


def text_of(events: list[ChatEvent]) -> str:
    return "".join(e.text for e in events if isinstance(e, TextDelta))


def reasoning_of(events: list[ChatEvent]) -> str:
    return "".join(e.text for e in events if isinstance(e, ReasoningDelta))


def calls_of(events: list[ChatEvent]) -> list[ToolCall]:
    return [e for e in events if isinstance(e, ToolCall)]


def sse(*deltas: dict[str, Any], done: bool = True) -> bytes:
    out = b"".join(
        b"data: " + json.dumps({"choices": [{"index": 0, "delta": d}]}).encode() + b"\n\n"
        for d in deltas
    )
    return out + (b"data: [DONE]\n\n" if done else b"")


def deltas_of(sse_dec: SSEDecoder, dec: ChatChunkDecoder) -> list[ChatEvent]:
    """The events of what ``sse_dec`` holds, without the StreamStarted marker."""
    events = [e for ev in sse_dec.events_received() for e in dec.receive_event(ev)]
    return [e for e in events if not isinstance(e, StreamStarted)]


def every_split(data: bytes) -> list[tuple[bytes, bytes]]:
    return [(data[:i], data[i:]) for i in range(len(data) + 1)]


def summary(events: list[ChatEvent]) -> tuple[str, str, list[ToolCall]]:
    return text_of(events), reasoning_of(events), calls_of(events)


# -- the recorded cases, whole and at every byte boundary -----------------------

EXPECTED = {
    "served-gzip.sse": ("Hi there.", "", []),
    "done-then-held-open.sse": ("Hi there.", "", []),
    "content-as-parts.sse": ("Hi there.", "", []),
    "closing-think-only.sse": ("Hi there.", "Plan a short reply.", []),
    "two-tool-calls-one-index.sse": (
        "",
        "",
        [
            ToolCall(index=0, id="call_a", name="get_weather", arguments='{"city":"Paris"}'),
            ToolCall(index=1, id="call_b", name="get_time", arguments='{"tz":"CET"}'),
        ],
    ),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_recorded_stream_at_every_byte_boundary(name: str):
    data = body(name)
    whole, _ = decode(data)
    assert summary(whole) == EXPECTED[name]
    for head, tail in every_split(data):
        events, _ = decode(head, tail)
        assert summary(events) == EXPECTED[name], (head, tail)


def test_recorded_stream_one_byte_at_a_time():
    data = body("closing-think-only.sse")
    events, dec = decode(*(data[i : i + 1] for i in range(len(data))))
    assert summary(events) == EXPECTED["closing-think-only.sse"]
    assert dec.leading_reasoning is True


def test_error_field_line_is_a_retryable_server_error_at_every_byte_boundary():
    data = body("error-field-line.sse")
    for head, tail in every_split(data):
        with pytest.raises(EndpointServerError) as info:
            decode(head, tail)
        assert str(info.value) == "endpoint reported an error in the stream (code 500): boom"
        assert info.value.retryable is True and info.value.status_code == 500


# -- end of stream ---------------------------------------------------------------


def test_done_ends_the_stream_even_if_more_follows_in_the_same_read():
    data = sse({"content": "Hi."}) + sse({"content": " Late."}, done=False)
    events, dec = decode(data)
    assert dec.done and text_of(events) == "Hi."


# -- error signalling ------------------------------------------------------------


@pytest.mark.parametrize(
    ("payload", "kind", "message", "retryable", "status"),
    [
        (
            '{"code":500,"message":"boom","type":"server_error"}',
            EndpointServerError,
            "endpoint reported an error in the stream (code 500): boom",
            True,
            500,
        ),
        (
            '{"code":503,"message":"Loading model","type":"unavailable_error"}',
            EndpointServerError,
            "endpoint reported an error in the stream (code 503): Loading model",
            True,
            503,
        ),
        (
            '{"code":400,"message":"the request exceeds the context size",'
            '"type":"exceed_context_size_error"}',
            EndpointRejected,
            "endpoint reported an error in the stream (code 400): "
            "the request exceeds the context size",
            False,
            400,
        ),
        (
            '{"error":{"message":"slow down","code":"429"}}',
            EndpointRateLimited,
            "endpoint reported an error in the stream (code 429): slow down",
            True,
            429,
        ),
        (
            '{"code":401,"message":"bad key"}',
            EndpointAuthError,
            "endpoint reported an error in the stream (code 401): bad key",
            False,
            401,
        ),
        (
            "upstream went away",
            EndpointServerError,
            "endpoint reported an error in the stream (no code): upstream went away",
            True,
            None,
        ),
        (
            '{"message":"Internal error","type":"server_error","code":"internal"}',
            EndpointServerError,
            "endpoint reported an error in the stream (no code): Internal error",
            True,
            None,
        ),
    ],
)
def test_error_field_follows_http_status_rules(
    payload: str, kind: type[EndpointError], message: str, retryable: bool, status: int | None
):
    for data in (
        f"error: {payload}\n\n".encode(),
        f"event: error\ndata: {payload}\n\n".encode(),
    ):
        with pytest.raises(kind) as info:
            decode(data)
        assert type(info.value) is kind
        assert str(info.value) == message
        assert info.value.retryable is retryable and info.value.status_code == status


def test_error_after_partial_text_is_raised_not_a_finished_reply():
    data = sse({"content": "The answer"}, done=False) + b'error: {"code":500,"message":"boom"}\n\n'
    sse_dec = SSEDecoder()
    dec = ChatChunkDecoder(leading_reasoning=False)
    sse_dec.receive_data(data)
    events = sse_dec.events_received()
    assert dec.receive_event(events[0])[-1] == TextDelta(text="The answer")
    with pytest.raises(EndpointServerError, match="boom"):
        dec.receive_event(events[1])


def test_error_data_chunk_in_band_keeps_its_code():
    with pytest.raises(EndpointRejected) as info:
        decode(b'data: {"error": {"message": "too long", "code": 413}}\n\n')
    assert info.value.status_code == 413


# -- content shapes --------------------------------------------------------------


def test_content_parts_by_meaning():
    data = sse(
        {"content": [{"type": "thinking", "thinking": [{"type": "text", "text": "Look up."}]}]},
        {"content": [{"type": "text", "text": "It is "}, {"type": "output_text", "text": "9."}]},
        {"content": [{"type": "image_url", "image_url": {"url": "data:,"}}]},
        {"content": [{"type": "reasoning", "text": " Done."}]},
        {"content": [" Bye."]},
    )
    events, _ = decode(data)
    assert text_of(events) == "It is 9. Bye."
    assert reasoning_of(events) == "Look up. Done."


def test_refusal_is_spoken():
    events, _ = decode(sse({"refusal": "I can't help with that."}))
    assert text_of(events) == "I can't help with that."
    events, _ = decode(sse({"content": [{"type": "refusal", "refusal": "No."}]}))
    assert text_of(events) == "No."


def test_content_part_that_is_not_an_object_is_malformed():
    with pytest.raises(MalformedStream, match="content part"):
        decode(sse({"content": [5]}))


# -- reasoning the template opened --------------------------------------------------

THOUGHT = "The user greets me. Keep it short, and say hello back."


@pytest.mark.parametrize("step", [1, 2, 3, 7, 100])
def test_lone_closing_tag_makes_everything_before_it_reasoning(step: int):
    content = THOUGHT + "</think>\n\nHello! How can I help?"
    pieces = [content[i : i + step] for i in range(0, len(content), step)]
    events, dec = decode(sse(*({"content": p} for p in pieces)))
    assert reasoning_of(events) == THOUGHT
    assert text_of(events) == "\n\nHello! How can I help?"
    assert "</think>" not in text_of(events) and dec.leading_reasoning is True


def test_undecided_start_holds_text_until_the_stream_decides():
    dec = ChatChunkDecoder()
    sse_dec = SSEDecoder()
    sse_dec.receive_data(sse({"content": "Hello"}, {"content": " there."}, done=False))
    held = deltas_of(sse_dec, dec)
    assert held == [] and dec.deltas == 2 and dec.leading_reasoning is None
    assert dec.receive_event(SSEEvent(data="[DONE]")) == [TextDelta(text="Hello there.")]
    assert dec.leading_reasoning is False


def test_explicit_think_tags_decide_at_once():
    events, dec = decode(sse({"content": "<think>hmm"}, {"content": "</think>Yes."}))
    assert reasoning_of(events) == "hmm" and text_of(events) == "Yes."
    assert dec.leading_reasoning is False


def test_reasoning_field_decides_that_content_is_the_answer():
    dec = ChatChunkDecoder()
    sse_dec = SSEDecoder()
    sse_dec.receive_data(sse({"reasoning_content": "think"}, {"content": "Yes"}, done=False))
    events = deltas_of(sse_dec, dec)
    assert events == [ReasoningDelta(text="think"), TextDelta(text="Yes")]


def test_known_template_start_streams_reasoning_at_once():
    dec = ChatChunkDecoder(leading_reasoning=True)
    sse_dec = SSEDecoder()
    sse_dec.receive_data(sse({"content": "Plan"}, {"content": ".</think>Hi"}, done=False))
    events = deltas_of(sse_dec, dec)
    assert events == [
        ReasoningDelta(text="Plan"),
        ReasoningDelta(text="."),
        TextDelta(text="Hi"),
    ]


def test_known_plain_start_streams_text_and_drops_a_stray_closing_tag():
    dec = ChatChunkDecoder(leading_reasoning=False)
    sse_dec = SSEDecoder()
    sse_dec.receive_data(sse({"content": "Hi"}, {"content": "</thi"}, {"content": "nk> there"}))
    events = deltas_of(sse_dec, dec)
    assert events[0] == TextDelta(text="Hi")
    assert text_of(events) == "Hi there"


# -- tool calls ------------------------------------------------------------------


def call_delta(**fields: Any) -> dict[str, Any]:
    return {"tool_calls": [fields]}


def fn(name: str | None = None, arguments: str | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if name is not None:
        out["name"] = name
    if arguments is not None:
        out["arguments"] = arguments
    return out


def test_new_id_under_a_reused_index_starts_a_new_call_even_in_fragments():
    data = sse(
        call_delta(index=0, id="a", function=fn("f", '{"x"')),
        call_delta(index=0, function=fn(arguments=":1}")),
        call_delta(index=0, id="b", function=fn("g", "")),
        call_delta(index=0, function=fn(arguments='{"y":2}')),
    )
    events, _ = decode(data)
    assert calls_of(events) == [
        ToolCall(index=0, id="a", name="f", arguments='{"x":1}'),
        ToolCall(index=1, id="b", name="g", arguments='{"y":2}'),
    ]
    deltas = [e for e in events if isinstance(e, ToolCallDelta)]
    assert [d.index for d in deltas] == [0, 0, 1, 1]


def test_deltas_without_index():
    data = sse(
        call_delta(id="a", function=fn("f", '{"x":')),
        call_delta(function=fn(arguments="1}")),
        call_delta(id="b", function=fn("g", "{}")),
    )
    events, _ = decode(data)
    assert calls_of(events) == [
        ToolCall(index=0, id="a", name="f", arguments='{"x":1}'),
        ToolCall(index=1, id="b", name="g", arguments="{}"),
    ]


def test_repeated_id_and_name_on_every_fragment_is_one_call():
    data = sse(
        call_delta(index=0, id="a", function=fn("f", '{"x"')),
        call_delta(index=0, id="a", function=fn("f", ":1}")),
    )
    assert calls_of(decode(data)[0]) == [ToolCall(index=0, id="a", name="f", arguments='{"x":1}')]


def test_interleaved_parallel_calls_by_index():
    data = sse(
        {"tool_calls": [{"index": 0, "id": "a", "function": fn("f", "{")}]},
        {"tool_calls": [{"index": 1, "id": "b", "function": fn("g", "{")}]},
        {"tool_calls": [{"index": 0, "function": fn(arguments="}")}]},
        {"tool_calls": [{"index": 1, "function": fn(arguments="}")}]},
    )
    assert calls_of(decode(data)[0]) == [
        ToolCall(index=0, id="a", name="f", arguments="{}"),
        ToolCall(index=1, id="b", name="g", arguments="{}"),
    ]
