from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from runtime.llm.sse import SSEDecoder, SSEEvent


def decode(*chunks: bytes, eof: bool = True) -> list[SSEEvent]:
    dec = SSEDecoder()
    events: list[SSEEvent] = []
    for chunk in chunks:
        dec.receive_data(chunk)
        events += dec.events_received()
    if eof:
        dec.receive_eof()
        events += dec.events_received()
    return events


def test_simple_events():
    events = decode(b"data: one\n\ndata: two\n\n")
    assert [e.data for e in events] == ["one", "two"]
    assert all(e.event == "message" for e in events)


def test_comments_and_heartbeats_are_ignored():
    events = decode(b": keep-alive\n\n:another\ndata: x\n\n: trailing\n\n")
    assert [e.data for e in events] == ["x"]


def test_multiline_data_is_joined_with_lf():
    assert decode(b"data: a\ndata:b\ndata:  c\n\n")[0].data == "a\nb\n c"


@pytest.mark.parametrize("eol", [b"\n", b"\r\n", b"\r"])
def test_all_line_endings(eol: bytes):
    body = b"data: x" + eol + b"event: e" + eol + eol + b"data: y" + eol + eol
    events = decode(body)
    assert [(e.data, e.event) for e in events] == [("x", "e"), ("y", "message")]


def test_crlf_split_between_reads_is_one_line_ending():
    # A CR at the end of one read and its LF at the start of the next must not
    # produce an extra blank line (which would dispatch early).
    events = decode(b"data: a\r", b"\ndata: b\r\n\r\n")
    assert [e.data for e in events] == ["a\nb"]


def test_event_split_across_reads_and_inside_utf8():
    body = "data: héllo 🙂\n\n".encode()
    chunks = [body[i : i + 1] for i in range(len(body))]
    assert [e.data for e in decode(*chunks)] == ["héllo 🙂"]


def test_bom_at_start_is_ignored():
    assert decode(b"\xef\xbb\xbfdata: x\n\n")[0].data == "x"


def test_id_event_and_retry_fields():
    ev = decode(b"id: 7\nevent: delta\nretry: 1500\ndata: x\n\ndata: y\n\n")
    assert (ev[0].id, ev[0].event, ev[0].retry_ms) == ("7", "delta", 1500)
    # The last event id persists, as the standard says.
    assert ev[1].id == "7"


def test_field_without_colon_and_unknown_fields():
    assert decode(b"data\nfoo: bar\n\n")[0].data == ""


def test_event_without_data_is_not_dispatched():
    assert decode(b"event: ping\n\n") == []


def test_stream_ending_without_blank_line_dispatches_complete_event():
    assert [e.data for e in decode(b"data: [DONE]")] == ["[DONE]"]
    assert [e.data for e in decode(b"data: last\n")] == ["last"]


def test_eof_is_idempotent_and_data_after_eof_is_refused():
    dec = SSEDecoder()
    dec.receive_eof()
    dec.receive_eof()
    with pytest.raises(RuntimeError, match="after receive_eof"):
        dec.receive_data(b"data: x\n\n")


STREAM = (
    b": comment\r\n"
    b'data: {"choices":[{"delta":{"role":"assistant"}}]}\r\n\r\n'
    b'data: {"choices":[{"delta":{"content":"Hel"}}]}\n\n'
    b"data: line one\ndata: line two\n\n"
    + "data: caf\u00e9 \U0001f600\r\r".encode()
    + b"event: custom\ndata: x\n\n"
    + b"data: [DONE]\n\n"
)


@given(st.lists(st.integers(min_value=0, max_value=len(STREAM)), max_size=12))
def test_any_split_decodes_the_same(cuts: list[int]):
    points = sorted(set(cuts))
    chunks = [STREAM[a:b] for a, b in zip([0, *points], [*points, len(STREAM)], strict=True)]
    assert decode(*chunks) == decode(STREAM)
    assert [e.data for e in decode(STREAM)][-1] == "[DONE]"
