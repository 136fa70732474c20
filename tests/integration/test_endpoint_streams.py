"""Recorded response bodies served over loopback HTTP the way real servers send them:
compressed, in small pieces, with the connection held open after the last event."""

from __future__ import annotations

import logging

import pytest

from runtime.errors import (
    EndpointAuthError,
    EndpointRateLimited,
    EndpointServerError,
    EndpointTimeout,
    MalformedStream,
)
from runtime.llm.client import ChatRequest, ClientTimeouts, ReasoningMemory, RetryPolicy
from runtime.llm.reference import ReferenceEndpoint, ReplyPlan
from runtime.llm.stream import ReasoningDelta, TextDelta, ToolCall

from ..conftest import ClientFactory
from ..helpers import DATA

STREAMS = DATA / "endpoint-streams"
REQ = ChatRequest(messages=[{"role": "user", "content": "Hi"}])
KEY = "sk-live-secret-value-42"


def recorded(name: str) -> bytes:
    return (STREAMS / name).read_bytes()


async def collect(client, request=REQ):
    async with client.stream(request) as stream:
        events = [e async for e in stream]
    return stream, events


def text_of(events) -> str:
    return "".join(e.text for e in events if isinstance(e, TextDelta))


@pytest.mark.parametrize("encoding", ["gzip", "deflate", "br"])
@pytest.mark.parametrize("chunk_size", [None, 7, 1])
async def test_compressed_stream_is_decoded(
    server: ReferenceEndpoint, make_client: ClientFactory, encoding, chunk_size
):
    server.plan = ReplyPlan(
        body=recorded("served-gzip.sse"), content_encoding=encoding, chunk_size=chunk_size
    )
    stream, events = await collect(make_client(server.base_url))
    assert text_of(events) == "Hi there."
    assert stream.timings.attempts == 1
    assert server.requests[0].headers["accept-encoding"] == "gzip, deflate, br"


@pytest.mark.parametrize("encoding", ["gzip", "deflate", "br"])
async def test_compressed_error_body_is_readable(
    server: ReferenceEndpoint, make_client: ClientFactory, encoding
):
    server.plan = ReplyPlan(fault="status", status=503, content_encoding=encoding)
    client = make_client(server.base_url, api_key=KEY, retry=RetryPolicy(max_attempts=1))
    with pytest.raises(EndpointServerError) as info:
        await collect(client)
    # The server quoted the key it was given; the client redacted it.
    assert str(info.value) == "endpoint failed (HTTP 503): simulated 503 for the key ********"


async def test_body_that_does_not_decode_is_malformed(
    server: ReferenceEndpoint, make_client: ClientFactory
):
    # Labelled gzip, sent plain: as a proxy that rewrites headers but not bodies.
    server.plan = ReplyPlan(body=recorded("served-gzip.sse"), declared_encoding="gzip")
    client = make_client(server.base_url, retry=RetryPolicy(max_attempts=1))
    with pytest.raises(MalformedStream) as info:
        await collect(client)
    assert str(info.value) == "endpoint sent a body that does not decode as 'gzip'"
    assert info.value.retryable is True


async def test_encoding_the_client_never_offered_is_named(
    server: ReferenceEndpoint, make_client: ClientFactory
):
    server.plan = ReplyPlan(body=b"(zstd frames)", declared_encoding="zstd")
    with pytest.raises(MalformedStream) as info:
        await collect(make_client(server.base_url))
    assert str(info.value) == (
        "endpoint compressed the stream with 'zstd', which voxloop does not decode "
        "(gzip, deflate and br are)"
    )
    assert info.value.retryable is False and len(server.requests) == 1


@pytest.mark.parametrize(
    ("body", "ctype", "shown"),
    [
        (
            b"<html><body><h1>502 Bad Gateway</h1></body></html>\n",
            "text/html",
            "HTTP 200 (text/html) with '<html><body><h1>502 Bad Gateway</h1></body></html>'",
        ),
        (b"", "text/event-stream", "HTTP 200 (text/event-stream) with an empty body"),
        (
            b": keep-alive\n\n",
            "text/event-stream",
            "HTTP 200 (text/event-stream) with ': keep-alive'",
        ),
    ],
)
async def test_success_without_any_event_is_a_retryable_error(
    server: ReferenceEndpoint, make_client: ClientFactory, body, ctype, shown
):
    server.plan = ReplyPlan(body=body, content_type=ctype)
    with pytest.raises(MalformedStream) as info:
        await collect(make_client(server.base_url))
    assert str(info.value) == f"endpoint answered {shown} without a single server-sent event"
    assert info.value.retryable is True
    assert len(server.requests) == 2  # retried like any failure before the first token


async def test_success_without_any_event_then_a_good_answer(
    server: ReferenceEndpoint, make_client: ClientFactory
):
    server.queue(ReplyPlan(body=b"<html>proxy</html>", content_type="text/html"))
    server.plan = ReplyPlan(replies=("Back again.",))
    stream, events = await collect(make_client(server.base_url))
    assert text_of(events) == "Back again." and stream.timings.attempts == 2


@pytest.mark.timeout(15)
@pytest.mark.parametrize("encoding", ["identity", "gzip"])
async def test_done_ends_a_stream_the_server_holds_open(
    server: ReferenceEndpoint, make_client: ClientFactory, encoding
):
    server.plan = ReplyPlan(
        body=recorded("done-then-held-open.sse"), hold_open=True, content_encoding=encoding
    )
    # Deadlines far beyond the test's timeout: only [DONE] can end this stream.
    client = make_client(
        server.base_url,
        timeouts=ClientTimeouts(first_token_s=60, first_token_budget_s=60, stall_s=60),
    )
    stream, events = await collect(client)
    assert text_of(events) == "Hi there." and stream.finish_reason == "stop"
    record = server.requests[0]
    await record.finished.wait()
    assert record.disconnected_ns is not None  # the client hung up; the server never ended


@pytest.mark.timeout(15)
async def test_done_line_without_its_blank_line_on_a_held_connection(
    server: ReferenceEndpoint, make_client: ClientFactory
):
    body = recorded("done-then-held-open.sse").rstrip(b"\n") + b"\n"  # no blank line after it
    server.plan = ReplyPlan(body=body, hold_open=True, chunk_size=9)
    client = make_client(
        server.base_url,
        timeouts=ClientTimeouts(first_token_s=60, first_token_budget_s=60, stall_s=60),
    )
    _, events = await collect(client)
    assert text_of(events) == "Hi there."


async def test_done_then_end_of_body_keeps_the_connection(
    server: ReferenceEndpoint, make_client: ClientFactory
):
    server.plan = ReplyPlan(body=recorded("done-then-held-open.sse"))
    client = make_client(server.base_url)
    for _ in range(3):
        _, events = await collect(client)
        assert text_of(events) == "Hi there."
    assert server.connections == 1


async def test_error_field_is_retried_then_raised(
    server: ReferenceEndpoint, make_client: ClientFactory
):
    server.plan = ReplyPlan(body=recorded("error-field-line.sse"))
    with pytest.raises(EndpointServerError) as info:
        await collect(make_client(server.base_url))
    assert str(info.value) == "endpoint reported an error in the stream (code 500): boom"
    assert info.value.retryable is True
    assert len(server.requests) == 2


async def test_error_field_then_a_good_answer(
    server: ReferenceEndpoint, make_client: ClientFactory
):
    server.queue(ReplyPlan(body=recorded("error-field-line.sse"), content_encoding="gzip"))
    server.plan = ReplyPlan(replies=("Fine now.",))
    stream, events = await collect(make_client(server.base_url))
    assert text_of(events) == "Fine now." and stream.timings.attempts == 2


async def test_error_field_after_partial_text_is_not_a_finished_reply(
    server: ReferenceEndpoint, make_client: ClientFactory
):
    body = (
        b'data: {"choices":[{"index":0,"delta":{"content":"The order"}}]}\n\n'
        b'data: {"choices":[{"index":0,"delta":{"content":" shipped"}}]}\n\n'
        + recorded("error-field-line.sse")
    )
    server.plan = ReplyPlan(body=body, chunk_size=16)
    received: list[str] = []
    with pytest.raises(EndpointServerError) as info:
        async with make_client(server.base_url).stream(REQ) as stream:
            async for event in stream:
                if isinstance(event, TextDelta):
                    received.append(event.text)
    assert received == ["The order", " shipped"]
    assert info.value.retryable is False  # text reached the listener: never repeated
    assert stream.finish_reason is None
    assert len(server.requests) == 1


async def test_key_echoed_in_an_in_band_error_is_redacted(
    server: ReferenceEndpoint, make_client: ClientFactory, caplog: pytest.LogCaptureFixture
):
    caplog.set_level(logging.DEBUG)
    body = f'error: {{"code":500,"message":"upstream refused Bearer {KEY}"}}\n\n'.encode()
    server.plan = ReplyPlan(body=body)
    client = make_client(server.base_url, api_key=KEY, retry=RetryPolicy(max_attempts=1))
    with pytest.raises(EndpointServerError) as info:
        await collect(client)
    assert str(info.value) == (
        "endpoint reported an error in the stream (code 500): upstream refused Bearer ********"
    )
    assert KEY not in repr(info.value.args) and KEY not in caplog.text


async def test_key_echoed_by_a_refusing_endpoint_never_shows(
    make_client: ClientFactory, caplog: pytest.LogCaptureFixture
):
    caplog.set_level(logging.DEBUG)
    wrong = "sk-wrong-but-still-secret-7"
    async with ReferenceEndpoint(api_key=KEY) as srv:
        with pytest.raises(EndpointAuthError) as info:
            await collect(make_client(srv.base_url, api_key=wrong))
    # The server echoed the key in its body and in a header; neither reaches the
    # error or the log (httpcore logs response headers at DEBUG).
    assert str(info.value) == (
        "endpoint refused the credentials (HTTP 401): Incorrect API key provided: ********"
    )
    assert wrong not in caplog.text
    assert "receive_response_headers.complete (header values not logged)" in caplog.text


R1 = "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B"


async def test_closing_think_only_from_a_known_family_is_reasoning_and_remembered(
    server: ReferenceEndpoint, make_client: ClientFactory
):
    server.plan = ReplyPlan(body=recorded("closing-think-only.sse"), chunk_size=5)
    client = make_client(server.base_url, leading_reasoning=None, model=R1)
    assert client.leading_reasoning is None and client.reasoning_source == "model name"
    _, events = await collect(client)
    assert text_of(events) == "Hi there."
    assert "".join(e.text for e in events if isinstance(e, ReasoningDelta)) == (
        "Plan a short reply."
    )
    assert client.leading_reasoning is True and client.reasoning_source == "learned"
    # The next reply streams its reasoning at once, as the template opens it.
    server.plan = ReplyPlan(replies=("Think more.</think>Hello again.",))
    _, events = await collect(client)
    assert text_of(events) == "Hello again."
    assert isinstance(events[1], ReasoningDelta) and events[1].text == "Think"


async def test_an_unknown_model_streams_at_once_and_a_wrong_guess_is_learned_and_logged_once(
    server: ReferenceEndpoint, make_client: ClientFactory, caplog: pytest.LogCaptureFixture
):
    caplog.set_level(logging.WARNING, logger="voxloop.llm")
    server.plan = ReplyPlan(replies=("Plan a reply.</think>Hi there.",))
    client = make_client(server.base_url, leading_reasoning=None)
    assert client.leading_reasoning is False and client.reasoning_source == "default"
    _, events = await collect(client)
    # Streamed as it came: the reasoning before the lone </think> was taken as the answer.
    assert [e.text for e in events if isinstance(e, TextDelta)][:3] == ["Plan", " a", " reply."]
    assert text_of(events) == "Plan a reply.Hi there."
    assert client.leading_reasoning is True and client.reasoning_source == "learned"
    [warning] = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert warning.getMessage() == (
        f"endpoint {server.base_url} model test-model opens a think block in its chat "
        "template; the reasoning before the first </think> was taken as the answer once. "
        "Set think_block to 'template' (--think-block template, or the agent's llm "
        "think_block) to read it as reasoning from the start"
    )
    # From the next reply on, and for every new client of that endpoint and model.
    _, events = await collect(client)
    assert text_of(events) == "Hi there."
    other = make_client(server.base_url, leading_reasoning=None)
    assert other.leading_reasoning is True
    _, events = await collect(other)
    assert text_of(events) == "Hi there."
    # The same model behind another URL is another endpoint.
    assert make_client("http://127.0.0.1:9/v1", leading_reasoning=None).leading_reasoning is False


async def test_a_family_reply_without_a_block_is_released_at_its_end_then_streams(
    server: ReferenceEndpoint, make_client: ClientFactory
):
    server.plan = ReplyPlan(replies=("One two three.",))
    client = make_client(server.base_url, leading_reasoning=None, model="QwQ-32B")
    stream, events = await collect(client)
    assert [e.text for e in events if isinstance(e, TextDelta)] == ["One two three."]
    t = stream.timings
    assert t.ttft_ms is not None and t.first_answer_ms is not None
    assert t.ttft_ms < t.first_answer_ms  # generated at once, released at the end
    assert len(t.token_ns) == 3
    assert client.leading_reasoning is False
    _, events = await collect(client)
    assert [e.text for e in events if isinstance(e, TextDelta)] == ["One", " two", " three."]
    # A new client for the same endpoint and model (a new session) knows it too.
    other = make_client(server.base_url, leading_reasoning=None, model="QwQ-32B")
    assert other.leading_reasoning is False
    _, events = await collect(other)
    assert [e.text for e in events if isinstance(e, TextDelta)] == ["One", " two", " three."]
    memory = ReasoningMemory()
    fresh = make_client(
        server.base_url, leading_reasoning=None, reasoning_memory=memory, model="QwQ-32B"
    )
    assert fresh.leading_reasoning is None


async def test_a_family_reply_cut_at_the_token_limit_teaches_nothing(
    server: ReferenceEndpoint, make_client: ClientFactory
):
    server.plan = ReplyPlan(replies=("Okay so the user",), finish_chunk=False)
    client = make_client(server.base_url, leading_reasoning=None, model=R1)
    _, events = await collect(client)
    assert text_of(events) == "Okay so the user" and client.leading_reasoning is None


async def test_reasoning_in_a_field_decides_a_family_reply_at_once(
    server: ReferenceEndpoint, make_client: ClientFactory
):
    # A server that parses the reasoning itself (vLLM's reasoning parser, llama.cpp's
    # reasoning_format): the answer streams as soon as the field shows it.
    server.plan = ReplyPlan(replies=("One two three.",), reasoning="Let me see.")
    client = make_client(
        server.base_url, leading_reasoning=None, model="Qwen3-30B-A3B-Thinking-2507"
    )
    _, events = await collect(client)
    assert [e.text for e in events if isinstance(e, TextDelta)] == ["One", " two", " three."]
    assert client.leading_reasoning is False


def test_reasoning_memory_is_bounded():
    memory = ReasoningMemory(size=2)
    for i in range(3):
        memory.remember((f"http://h{i}/v1", "m"), i % 2 == 0)
    assert [memory.get((f"http://h{i}/v1", "m")) for i in range(3)] == [None, False, True]


async def test_two_tool_calls_under_one_index(
    server: ReferenceEndpoint, make_client: ClientFactory
):
    server.plan = ReplyPlan(body=recorded("two-tool-calls-one-index.sse"), chunk_size=3)
    _, events = await collect(make_client(server.base_url))
    assert [e for e in events if isinstance(e, ToolCall)] == [
        ToolCall(index=0, id="call_a", name="get_weather", arguments='{"city":"Paris"}'),
        ToolCall(index=1, id="call_b", name="get_time", arguments='{"tz":"CET"}'),
    ]


async def test_content_as_parts(server: ReferenceEndpoint, make_client: ClientFactory):
    server.plan = ReplyPlan(body=recorded("content-as-parts.sse"), content_encoding="br")
    stream, events = await collect(make_client(server.base_url))
    assert text_of(events) == "Hi there." and stream.timings.attempts == 1


# -- deadlines --------------------------------------------------------------------


async def test_a_silent_endpoint_costs_one_deadline_not_two(
    server: ReferenceEndpoint, make_client: ClientFactory
):
    server.plan = ReplyPlan(fault="hang", fault_after=0)
    client = make_client(
        server.base_url,
        timeouts=ClientTimeouts(first_token_s=0.3, first_token_budget_s=0.4),
        retry=RetryPolicy(max_attempts=2, backoff_s=0, min_retry_budget_s=0.2),
    )
    with pytest.raises(EndpointTimeout) as info:
        await collect(client)
    assert str(info.value) == "no token within 0.3 s of the request"
    assert len(server.requests) == 1  # 0.1 s left: a retry could not help


async def test_fast_failures_are_retried_within_the_budget(
    server: ReferenceEndpoint, make_client: ClientFactory
):
    server.queue(ReplyPlan(fault="status", status=502))
    client = make_client(
        server.base_url,
        timeouts=ClientTimeouts(first_token_s=5, first_token_budget_s=5),
        retry=RetryPolicy(max_attempts=2, backoff_s=0, min_retry_budget_s=1),
    )
    stream, events = await collect(client)
    assert text_of(events) == ReplyPlan().replies[0] and stream.timings.attempts == 2


async def test_request_budget_replaces_the_clients(
    server: ReferenceEndpoint, make_client: ClientFactory
):
    server.plan = ReplyPlan(fault="hang", fault_after=0)
    client = make_client(
        server.base_url,
        timeouts=ClientTimeouts(first_token_s=30, first_token_budget_s=30),
        retry=RetryPolicy(max_attempts=2, backoff_s=0, min_retry_budget_s=1),
    )
    request = ChatRequest(messages=REQ.messages, first_token_timeout_s=0.2)
    with pytest.raises(EndpointTimeout, match=r"no token within 0\.2 s"):
        await collect(client, request)
    assert len(server.requests) == 1


async def test_retry_after_longer_than_the_budget_allows_is_not_waited(
    server: ReferenceEndpoint, make_client: ClientFactory
):
    server.plan = ReplyPlan(fault="status", status=429, retry_after="1")
    client = make_client(
        server.base_url,
        timeouts=ClientTimeouts(first_token_s=1.5, first_token_budget_s=1.5),
        retry=RetryPolicy(max_attempts=2, backoff_s=0, max_retry_wait_s=2, min_retry_budget_s=1),
    )
    with pytest.raises(EndpointRateLimited) as info:
        await collect(client)
    assert info.value.retry_after_s == 1
    assert len(server.requests) == 1  # 1 s of waiting would leave 0.5 s: no retry


async def test_text_before_an_error_in_the_same_read_is_delivered_first(
    server: ReferenceEndpoint, make_client: ClientFactory
):
    body = (
        b'data: {"choices":[{"index":0,"delta":{"content":"Half an"}}]}\n\n'
        b'data: {"choices":[{"index":0,"delta":{"content":" answer"}}]}\n\n'
        + recorded("error-field-line.sse")
    )
    server.plan = ReplyPlan(body=body)  # one write: the text and the error arrive together
    received: list[str] = []
    with pytest.raises(EndpointServerError) as info:
        async with make_client(server.base_url).stream(REQ) as stream:
            async for event in stream:
                if isinstance(event, TextDelta):
                    received.append(event.text)
    assert received == ["Half an", " answer"]
    assert info.value.retryable is False and len(server.requests) == 1


async def test_what_was_learned_is_unlearned_when_the_endpoint_changes(
    server: ReferenceEndpoint, make_client: ClientFactory
):
    client = make_client(server.base_url, leading_reasoning=None, model=R1)
    server.plan = ReplyPlan(replies=("Plan.</think>Hi.",))
    _, events = await collect(client)
    assert text_of(events) == "Hi." and client.leading_reasoning is True
    # Another model behind the same name: no think block any more. That reply is
    # taken as reasoning (never spoken), and the client learns again.
    server.plan = ReplyPlan(replies=("Hello there.",))
    _, events = await collect(client)
    assert text_of(events) == "" and client.leading_reasoning is None
    _, events = await collect(client)
    assert text_of(events) == "Hello there." and client.leading_reasoning is False
    assert make_client(server.base_url, leading_reasoning=None, model=R1).leading_reasoning is False
    # And back: the stray closing tag shows the template opens the block again.
    server.plan = ReplyPlan(replies=("Plan.</think>Hi.",))
    _, events = await collect(client)
    assert text_of(events) == "Plan.Hi." and client.leading_reasoning is True
    _, events = await collect(client)
    assert text_of(events) == "Hi." and client.leading_reasoning is True


async def test_a_configured_start_is_never_unlearned(
    server: ReferenceEndpoint, make_client: ClientFactory
):
    client = make_client(server.base_url, leading_reasoning=False)
    assert client.reasoning_source == "setting"
    server.plan = ReplyPlan(replies=("Plan.</think>Hi.",))
    _, events = await collect(client)
    assert text_of(events) == "Plan.Hi." and client.leading_reasoning is False
    auto = make_client(server.base_url, leading_reasoning=None)
    assert auto.reasoning_source == "default"
    # And the setting wins over what the endpoint's replies showed.
    server.plan = ReplyPlan(replies=("Plan.</think>Hi.",))
    await collect(auto)
    assert auto.leading_reasoning is True
    _, events = await collect(make_client(server.base_url, leading_reasoning=False))
    assert text_of(events) == "Plan.Hi."


COMPLETION = (
    b'{"id":"chatcmpl-1","object":"chat.completion","model":"m","choices":[{"index":0,'
    b'"message":{"role":"assistant","content":"Hi there."},"finish_reason":"stop"}]}'
)


async def test_a_whole_completion_instead_of_a_stream_is_the_reply(
    server: ReferenceEndpoint, make_client: ClientFactory
):
    # A server (or proxy) that ignores "stream": true and answers once, in JSON.
    server.plan = ReplyPlan(
        body=COMPLETION, content_type="application/json", content_encoding="gzip"
    )
    stream, events = await collect(make_client(server.base_url))
    assert text_of(events) == "Hi there." and stream.finish_reason == "stop"


async def test_an_error_object_with_status_200_follows_its_code(
    server: ReferenceEndpoint, make_client: ClientFactory
):
    body = b'{"error": {"message": "model overloaded", "code": 503}}'
    server.plan = ReplyPlan(body=body, content_type="application/json")
    with pytest.raises(EndpointServerError) as info:
        await collect(make_client(server.base_url))
    assert (
        str(info.value) == "endpoint reported an error in the stream (code 503): model overloaded"
    )
    assert info.value.retryable is True and len(server.requests) == 2


async def test_json_that_is_not_a_completion_is_malformed(
    server: ReferenceEndpoint, make_client: ClientFactory
):
    server.plan = ReplyPlan(body=b'{"status": "ok"}', content_type="application/json")
    with pytest.raises(MalformedStream) as info:
        await collect(make_client(server.base_url))
    assert str(info.value) == (
        'endpoint answered with a JSON body that is not a chat completion: {"status": "ok"}'
    )
    assert info.value.retryable is False and len(server.requests) == 1
