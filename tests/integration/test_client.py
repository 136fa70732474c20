"""The endpoint client against the reference endpoint over real loopback sockets."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import ssl

import pytest
import trustme

from runtime.clock import ManualClock
from runtime.endpoints import StaticResolver, URLPolicy
from runtime.errors import (
    EndpointAuthError,
    EndpointError,
    EndpointRateLimited,
    EndpointRejected,
    EndpointServerError,
    EndpointStalled,
    EndpointTimeout,
    MalformedStream,
    StreamDropped,
    URLPolicyError,
)
from runtime.llm.client import ChatRequest, ClientTimeouts, RetryPolicy
from runtime.llm.reference import ReferenceEndpoint, ReplyPlan
from runtime.llm.stream import (
    Finish,
    ReasoningDelta,
    StreamStarted,
    TextDelta,
    ToolCall,
    Usage,
)

from ..conftest import ClientFactory

REQ = ChatRequest(
    messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
)
KEY = "sk-live-secret-value-42"


async def collect(client, request=REQ):
    async with client.stream(request) as stream:
        events = [e async for e in stream]
    return stream, events


async def test_streams_text_with_ordered_timings_and_usage(
    server: ReferenceEndpoint, make_client: ClientFactory
):
    server.plan = ReplyPlan(replies=("Hello there, friend.",), itl_ms=1)
    # An endpoint known not to open think blocks: its text is released as it streams.
    client = make_client(server.base_url, leading_reasoning=False)
    stream, events = await collect(client)
    assert isinstance(events[0], StreamStarted)
    assert "".join(e.text for e in events if isinstance(e, TextDelta)) == "Hello there, friend."
    assert Finish(reason="stop") in events
    assert stream.usage is not None and stream.usage.completion_tokens == 3
    t = stream.timings
    assert t.headers_ms is not None and t.first_event_ms is not None and t.ttft_ms is not None
    assert 0 <= t.headers_ms <= t.first_event_ms <= t.ttft_ms <= t.e2e_ms
    assert t.first_answer_ms == t.ttft_ms
    assert len(t.itl_ms) == 2 and t.tpot_ms is not None
    # What the endpoint received is the documented request shape.
    body = server.requests[-1].body
    assert body is not None
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["model"] == "test-model" and body["messages"] == list(REQ.messages)
    assert "tools" not in body


async def test_measured_ttft_is_not_below_the_servers_delay(
    server: ReferenceEndpoint, make_client: ClientFactory
):
    # The role chunk is sent at once, the first token half a second later: the first event is
    # timed at the role chunk, before the first token (both are read at once only by a client
    # kept off the CPU for the whole half second).
    server.plan = ReplyPlan(ttft_ms=500)
    stream, _ = await collect(make_client(server.base_url))
    t = stream.timings
    assert t.ttft_ms is not None and t.ttft_ms >= 500
    assert t.first_event_ms is not None and t.first_event_ms < t.ttft_ms


async def test_injected_clock_drives_the_timestamps(
    server: ReferenceEndpoint, make_client: ClientFactory
):
    clock = ManualClock(start_ns=1_000)
    stream, _ = await collect(make_client(server.base_url, clock=clock))
    # A clock that never moves yields zero durations: nothing reads another clock.
    assert stream.timings.ttft_ms == 0 and stream.timings.e2e_ms == 0


async def test_bearer_key_sent_and_tools_in_openai_form(
    server: ReferenceEndpoint, make_client: ClientFactory
):
    server.plan = ReplyPlan(tool_name="get_weather", tool_arguments='{"city": "Paris"}')
    tools = [
        {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
    ]
    client = make_client(server.base_url, api_key=KEY)
    stream, events = await collect(client, ChatRequest(messages=REQ.messages, tools=tools))
    record = server.requests[-1]
    assert record.headers["authorization"] == f"Bearer {KEY}"
    assert (
        record.body is not None
        and record.body["tools"] == tools
        and record.body["tool_choice"] == "auto"
    )
    calls = [e for e in events if isinstance(e, ToolCall)]
    assert len(calls) == 1 and calls[0].name == "get_weather"
    assert json.loads(calls[0].arguments) == {"city": "Paris"}
    assert stream.finish_reason == "tool_calls"
    assert stream.timings.ttft_ms is not None  # a tool-call delta counts as the first token
    assert stream.timings.first_answer_ms is None


async def test_tool_call_with_null_arguments(server: ReferenceEndpoint, make_client: ClientFactory):
    server.plan = ReplyPlan(tool_name="now", tool_arguments=None)
    tools = [{"type": "function", "function": {"name": "now"}}]
    _, events = await collect(
        make_client(server.base_url), ChatRequest(messages=REQ.messages, tools=tools)
    )
    assert [e.arguments for e in events if isinstance(e, ToolCall)] == ["{}"]


@pytest.mark.parametrize("think_tags", [False, True])
async def test_reasoning_first_is_separated(
    server: ReferenceEndpoint, make_client: ClientFactory, think_tags: bool
):
    server.plan = ReplyPlan(replies=("Answer.",), reasoning="Let me think.", think_tags=think_tags)
    stream, events = await collect(make_client(server.base_url))
    assert (
        "".join(e.text for e in events if isinstance(e, ReasoningDelta)).strip() == "Let me think."
    )
    assert "".join(e.text for e in events if isinstance(e, TextDelta)).strip() == "Answer."
    t = stream.timings
    assert t.ttft_ms is not None and t.first_answer_ms is not None and t.first_answer_ms > t.ttft_ms


@pytest.mark.parametrize("usage", ["none", "empty_choices", "with_choices"])
@pytest.mark.parametrize(("finish", "done"), [(True, True), (False, True), (True, False)])
async def test_stream_endings_and_usage_forms(
    server: ReferenceEndpoint, make_client: ClientFactory, usage, finish, done
):
    server.plan = ReplyPlan(replies=("One two.",), usage=usage, finish_chunk=finish, done=done)
    stream, events = await collect(make_client(server.base_url))
    assert "".join(e.text for e in events if isinstance(e, TextDelta)) == "One two."
    assert (stream.usage is not None) is (usage != "none")
    assert sum(isinstance(e, Usage) for e in events) == (usage != "none")


async def test_empty_completion_is_valid(server: ReferenceEndpoint, make_client: ClientFactory):
    server.plan = ReplyPlan(fault="empty")
    stream, events = await collect(make_client(server.base_url))
    assert not [e for e in events if isinstance(e, TextDelta)]
    assert stream.finish_reason == "stop"
    assert stream.timings.ttft_ms is None


@pytest.mark.parametrize(
    ("plan", "error", "retryable"),
    [
        (ReplyPlan(fault="status", status=401), EndpointAuthError, False),
        (ReplyPlan(fault="status", status=403), EndpointAuthError, False),
        (ReplyPlan(fault="status", status=404), EndpointRejected, False),
        (ReplyPlan(fault="status", status=500), EndpointServerError, True),
        (ReplyPlan(fault="status", status=503), EndpointServerError, True),
        (ReplyPlan(fault="status", status=429, retry_after="60"), EndpointRateLimited, True),
        (ReplyPlan(fault="redirect"), EndpointRejected, False),
        (ReplyPlan(fault="malformed", fault_after=0), MalformedStream, True),
        (ReplyPlan(fault="drop", fault_after=0), StreamDropped, True),
    ],
)
async def test_error_kinds_without_retry(
    server: ReferenceEndpoint, make_client: ClientFactory, plan, error, retryable
):
    server.plan = plan
    client = make_client(server.base_url, api_key=KEY, retry=RetryPolicy(max_attempts=1))
    with pytest.raises(error) as info:
        await collect(client)
    assert info.value.retryable is retryable
    assert KEY not in str(info.value) and KEY not in repr(info.value)
    assert len(server.requests) == 1


async def test_redirect_is_not_followed(server: ReferenceEndpoint, make_client: ClientFactory):
    server.plan = ReplyPlan(fault="redirect")
    with pytest.raises(EndpointRejected, match="redirect"):
        await collect(make_client(server.base_url))
    assert len(server.requests) == 1  # one request, and nothing to the Location


async def test_rate_limit_honours_retry_after(
    server: ReferenceEndpoint, make_client: ClientFactory
):
    server.queue(ReplyPlan(fault="status", status=429, retry_after="0"))
    stream, events = await collect(make_client(server.base_url))
    assert any(isinstance(e, TextDelta) for e in events)
    assert stream.timings.attempts == 2
    assert len(server.requests) == 2


async def test_rate_limit_with_long_retry_after_is_not_waited_out(
    server: ReferenceEndpoint, make_client: ClientFactory
):
    server.queue(ReplyPlan(fault="status", status=429, retry_after="120"))
    with pytest.raises(EndpointRateLimited) as info:
        await collect(make_client(server.base_url))
    assert info.value.retry_after_s == 120
    assert len(server.requests) == 1


@pytest.mark.parametrize(
    "first",
    [
        ReplyPlan(fault="status", status=500),
        ReplyPlan(fault="drop", fault_after=0),
        ReplyPlan(fault="malformed", fault_after=0),
    ],
)
async def test_retry_before_first_token(
    server: ReferenceEndpoint, make_client: ClientFactory, first: ReplyPlan
):
    server.queue(first)
    stream, events = await collect(make_client(server.base_url))
    assert sum(isinstance(e, StreamStarted) for e in events) == 1
    assert "".join(e.text for e in events if isinstance(e, TextDelta)) == ReplyPlan().replies[0]
    assert stream.timings.attempts == 2


@pytest.mark.parametrize(
    ("plan", "error", "message"),
    [
        (ReplyPlan(fault="drop", fault_after=3), StreamDropped,
         "connection dropped mid-stream: the server closed the connection or broke the HTTP "
         "protocol"),
        (ReplyPlan(fault="malformed", fault_after=3), MalformedStream, None),
    ],
)  # fmt: skip
async def test_no_retry_after_the_first_token(
    server: ReferenceEndpoint, make_client: ClientFactory, plan, error, message
):
    server.plan = plan
    received: list[str] = []
    with pytest.raises(error) as info:
        async with make_client(server.base_url).stream(REQ) as stream:
            async for event in stream:
                if isinstance(event, TextDelta):
                    received.append(event.text)
    assert len(received) == 3
    assert info.value.retryable is False
    assert len(server.requests) == 1
    if message is not None:  # what a session's reply.error says: words, not httpx's names
        assert str(info.value) == message


async def test_timeout_before_first_token_then_retry_succeeds(
    server: ReferenceEndpoint, make_client: ClientFactory
):
    server.queue(ReplyPlan(fault="hang", fault_after=0))
    client = make_client(server.base_url, timeouts=ClientTimeouts(first_token_s=0.2, stall_s=1))
    stream, events = await collect(client)
    assert any(isinstance(e, TextDelta) for e in events)
    assert stream.timings.attempts == 2
    await server.requests[0].finished.wait()
    assert server.requests[0].disconnected_ns is not None  # the hung request was abandoned


@pytest.mark.parametrize(
    "plan", [ReplyPlan(fault="hang_headers"), ReplyPlan(fault="hang", fault_after=0)]
)
async def test_timeout_before_first_token(
    server: ReferenceEndpoint, make_client: ClientFactory, plan: ReplyPlan
):
    server.plan = plan
    client = make_client(
        server.base_url,
        timeouts=ClientTimeouts(first_token_s=0.2),
        retry=RetryPolicy(max_attempts=1),
    )
    with pytest.raises(EndpointTimeout) as info:
        await collect(client)
    assert info.value.retryable


async def test_check_of_an_endpoint_that_never_answers_times_out(
    server: ReferenceEndpoint, make_client: ClientFactory
):
    server.plan = ReplyPlan(fault="hang_headers")
    client = make_client(
        server.base_url,
        timeouts=ClientTimeouts(first_token_s=0.2),
        retry=RetryPolicy(max_attempts=1),
    )
    with pytest.raises(EndpointTimeout) as info:
        await client.check()
    assert str(info.value) == "no response within 0.2 s of the request"
    await server.requests[0].finished.wait()
    assert server.requests[0].disconnected_ns is not None  # the hung request was abandoned


async def test_stall_between_tokens(server: ReferenceEndpoint, make_client: ClientFactory):
    server.plan = ReplyPlan(fault="hang", fault_after=2)
    client = make_client(server.base_url, timeouts=ClientTimeouts(first_token_s=5, stall_s=0.2))
    with pytest.raises(EndpointStalled) as info:
        await collect(client)
    assert not info.value.retryable
    assert len(server.requests) == 1


async def test_include_usage_dropped_once_and_remembered(
    server: ReferenceEndpoint, make_client: ClientFactory
):
    server.plan = ReplyPlan(reject_stream_options=True, replies=("Fine.",))
    client = make_client(server.base_url)
    _, events = await collect(client)
    assert "".join(e.text for e in events if isinstance(e, TextDelta)) == "Fine."
    assert [("stream_options" in (r.body or {})) for r in server.requests] == [True, False]
    assert client.include_usage is False
    await collect(client)
    assert "stream_options" not in (server.requests[-1].body or {})


async def test_a_400_unrelated_to_stream_options_keeps_asking_for_usage(
    server: ReferenceEndpoint, make_client: ClientFactory
):
    server.plan = ReplyPlan(fault="status", status=400)
    client = make_client(server.base_url)
    with pytest.raises(EndpointRejected):
        await collect(client)
    assert len(server.requests) == 2
    assert client.include_usage is True


async def test_auth_against_keyed_endpoint_and_key_never_logged(
    make_client: ClientFactory, caplog: pytest.LogCaptureFixture
):
    caplog.set_level(logging.DEBUG)
    async with ReferenceEndpoint(api_key=KEY) as srv:
        with pytest.raises(EndpointAuthError) as info:
            await collect(make_client(srv.base_url, api_key="sk-wrong-key"))
        assert "sk-wrong-key" not in str(info.value)
        _, events = await collect(make_client(srv.base_url, api_key=KEY))
        assert any(isinstance(e, TextDelta) for e in events)
    assert KEY not in caplog.text and "sk-wrong-key" not in caplog.text


async def test_prewarm_opens_the_connection_and_requests_reuse_it(
    server: ReferenceEndpoint, make_client: ClientFactory
):
    client = make_client(server.base_url)
    await client.prewarm()
    assert server.connections == 1 and client.connections_opened == 1
    for _ in range(3):
        stream, _ = await collect(client)
        assert stream.timings.new_connection is False
    assert server.connections == 1
    assert {r.connection for r in server.requests} == {1}


async def test_cold_request_reports_new_connection(
    server: ReferenceEndpoint, make_client: ClientFactory
):
    stream, _ = await collect(make_client(server.base_url))
    assert stream.timings.new_connection is True


async def test_connect_error_is_typed_and_retryable(make_client: ClientFactory):
    async with ReferenceEndpoint() as srv:
        url = srv.base_url
    client = make_client(url, retry=RetryPolicy(max_attempts=1))
    with pytest.raises(EndpointError) as info:
        await collect(client)
    assert info.value.kind == "connect" and info.value.retryable
    assert str(info.value) == "could not connect to the endpoint: Connection refused"


# -- cancellation -------------------------------------------------------------


@pytest.mark.parametrize(
    ("plan", "tokens_before_cancel"),
    [
        (ReplyPlan(fault="hang_headers"), 0),
        (ReplyPlan(fault="hang", fault_after=0), 0),
        (ReplyPlan(itl_ms=50), 3),
    ],
    ids=["before-headers", "after-headers", "mid-stream"],
)
async def test_cancelling_the_consumer_closes_the_response(
    server: ReferenceEndpoint,
    make_client: ClientFactory,
    plan: ReplyPlan,
    tokens_before_cancel: int,
):
    server.plan = plan
    client = make_client(server.base_url)
    await client.prewarm()
    got = asyncio.Event()
    seen: list[str] = []

    async def consume() -> None:
        async with client.stream(REQ) as stream:
            async for event in stream:
                if isinstance(event, TextDelta):
                    seen.append(event.text)
                    if len(seen) == tokens_before_cancel:
                        got.set()

    server.request_arrived.clear()
    task = asyncio.create_task(consume())
    if tokens_before_cancel:
        await got.wait()
    else:
        while len(server.requests) < 2:  # the prewarm GET, then our POST
            server.request_arrived.clear()
            await server.request_arrived.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    record = server.requests[-1]
    await record.finished.wait()
    # The endpoint saw the disconnect and stopped generating.
    assert record.disconnected_ns is not None
    assert record.tokens_sent == tokens_before_cancel
    # The pool is consistent: the cancelled connection was discarded, not reused.
    assert client._transport.pool_connection_count() == 0
    server.plan = ReplyPlan()
    stream, events = await collect(client)
    assert any(isinstance(e, TextDelta) for e in events)
    assert stream.timings.new_connection is True


async def test_breaking_out_early_closes_the_response(
    server: ReferenceEndpoint, make_client: ClientFactory
):
    server.plan = ReplyPlan(itl_ms=20)
    client = make_client(server.base_url)
    async with client.stream(REQ) as stream:
        async for event in stream:
            if isinstance(event, TextDelta):
                break
    record = server.requests[-1]
    await record.finished.wait()
    assert record.disconnected_ns is not None
    assert record.tokens_sent < 5


# -- pinned connections, TLS and the URL policy ----------------------------------


@pytest.fixture(scope="module")
def tls_ca() -> trustme.CA:
    return trustme.CA()


def tls_contexts(ca: trustme.CA, cert_name: str) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """A server context with a certificate for ``cert_name`` and a client context trusting ``ca``."""
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(cert_name).configure_cert(server_ctx)
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)
    return server_ctx, client_ctx


async def test_tls_connect_is_pinned_to_the_checked_address(
    tls_ca: trustme.CA, make_client: ClientFactory
):
    server_ctx, client_ctx = tls_contexts(tls_ca, "llm.example.test")
    async with ReferenceEndpoint(ssl_context=server_ctx) as srv:
        resolver = StaticResolver({"llm.example.test": ["127.0.0.1"]})
        policy = URLPolicy().with_allowlist(["127.0.0.1/32"])
        url = f"https://llm.example.test:{srv.port}/v1"
        client = make_client(url, policy=policy, resolver=resolver, verify=client_ctx)
        _, events = await collect(client)
        assert any(isinstance(e, TextDelta) for e in events)
        # SNI/certificate and Host stay the name although we connected to the address.
        assert srv.requests[-1].headers["host"] == f"llm.example.test:{srv.port}"
        # DNS now "rebinds" to a forbidden address: the client never asks again.
        resolver._table["llm.example.test"] = ["10.0.0.1"]
        await collect(client)
        assert resolver.calls == 1


async def test_http2_offer_falls_back_to_http1_over_tls(
    tls_ca: trustme.CA, make_client: ClientFactory
):
    server_ctx, client_ctx = tls_contexts(tls_ca, "llm.example.test")
    async with ReferenceEndpoint(ssl_context=server_ctx) as srv:
        client = make_client(
            f"https://llm.example.test:{srv.port}/v1",
            policy=URLPolicy().with_allowlist(["127.0.0.0/8"]),
            resolver=StaticResolver({"llm.example.test": ["127.0.0.1"]}),
            verify=client_ctx,
            http2=True,
        )
        _, events = await collect(client)
        assert any(isinstance(e, TextDelta) for e in events)


async def test_certificate_for_another_name_is_refused(
    tls_ca: trustme.CA, make_client: ClientFactory
):
    server_ctx, client_ctx = tls_contexts(tls_ca, "other.example.test")
    async with ReferenceEndpoint(ssl_context=server_ctx) as srv:
        client = make_client(
            f"https://llm.example.test:{srv.port}/v1",
            policy=URLPolicy().with_allowlist(["127.0.0.1/32"]),
            resolver=StaticResolver({"llm.example.test": ["127.0.0.1"]}),
            verify=client_ctx,
            retry=RetryPolicy(max_attempts=1),
        )
        with pytest.raises(EndpointError) as info:
            await collect(client)
        assert info.value.kind == "tls" and info.value.retryable is False
        assert str(info.value) == (
            "TLS handshake with the endpoint failed: "
            "Hostname mismatch, certificate is not valid for 'llm.example.test'."
        )
        assert len(srv.requests) == 0


async def test_strict_policy_refuses_a_name_resolving_to_loopback(
    server: ReferenceEndpoint, make_client: ClientFactory
):
    resolver = StaticResolver({"api.example.com": ["127.0.0.1"]})
    client = make_client(
        f"https://api.example.com:{server.port}/v1", policy=URLPolicy(), resolver=resolver
    )
    with pytest.raises(URLPolicyError, match="loopback"):
        await collect(client)
    with pytest.raises(URLPolicyError):
        await client.prewarm()
    assert server.requests == []


def test_strict_policy_refuses_http_and_literals_at_construction(make_client: ClientFactory):
    with pytest.raises(URLPolicyError):
        make_client("http://api.example.com/v1", policy=URLPolicy())
    with pytest.raises(URLPolicyError):
        make_client("https://127.0.0.1/v1", policy=URLPolicy())


async def test_http2_is_used_when_the_endpoint_offers_it(
    tls_ca: trustme.CA, make_client: ClientFactory, tmp_path
):
    # A real HTTP/2 server (hypercorn, TLS + ALPN) streaming an OpenAI-style SSE body.
    from hypercorn.asyncio import serve
    from hypercorn.config import Config

    seen: list[str] = []

    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        seen.append(scope["http_version"])
        while (await receive()).get("more_body"):
            pass
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"text/event-stream")],
            }
        )
        for piece in ("Hello", " over", " h2."):
            chunk = {"choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": None}]}
            await send(
                {
                    "type": "http.response.body",
                    "body": f"data: {json.dumps(chunk)}\n\n".encode(),
                    "more_body": True,
                }
            )
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})

    cert = tls_ca.issue_cert("h2.example.test")
    cert.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
    cert.cert_chain_pems[0].write_to_path(str(tmp_path / "cert.pem"))
    # A listening socket handed to hypercorn: clients can connect before it starts serving.
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    port = listener.getsockname()[1]
    config = Config()
    config.bind = [f"fd://{listener.fileno()}"]
    config.certfile = str(tmp_path / "cert.pem")
    config.keyfile = str(tmp_path / "key.pem")
    config.alpn_protocols = ["h2", "http/1.1"]
    config.accesslog = config.errorlog = None
    config.graceful_timeout = 0.1
    stop = asyncio.Event()
    task = asyncio.create_task(serve(app, config, shutdown_trigger=stop.wait))
    client_ctx = ssl.create_default_context()
    tls_ca.configure_trust(client_ctx)
    client = make_client(
        f"https://h2.example.test:{port}/v1",
        policy=URLPolicy().with_allowlist(["127.0.0.1/32"]),
        resolver=StaticResolver({"h2.example.test": ["127.0.0.1"]}),
        verify=client_ctx,
        http2=True,
    )
    try:
        stream, events = await collect(client)
    finally:
        await client.aclose()
        stop.set()
        await task
        listener.detach()  # hypercorn owns (and has closed) the descriptor
    assert "".join(e.text for e in events if isinstance(e, TextDelta)) == "Hello over h2."
    assert stream.timings.http_version == "HTTP/2"
    assert seen == ["2"]
