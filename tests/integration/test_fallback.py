"""Ordered fallback endpoints: failover before the first token and the circuit of each
entry, through real loopback endpoints (the reference endpoint's fault modes)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator

import pytest

from runtime.clock import ManualClock
from runtime.errors import EndpointServerError, StreamDropped
from runtime.llm.client import TTFT_MEMORY, ChatRequest, ClientTimeouts, RetryPolicy
from runtime.llm.fallback import (
    EARLY_DEFAULT_S,
    EARLY_MIN_S,
    CircuitBreaker,
    FallbackChatClient,
    FallbackPolicy,
    early_start_s,
)
from runtime.llm.reference import ReferenceEndpoint, ReplyPlan
from runtime.llm.stream import TextDelta

from ..conftest import ClientFactory

REQ = ChatRequest(
    messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
)
TIMEOUTS = ClientTimeouts(connect_s=2, first_token_s=0.4, first_token_budget_s=5, stall_s=2)
NO_RETRY = RetryPolicy(max_attempts=1)


@pytest.fixture
async def backup() -> AsyncIterator[ReferenceEndpoint]:
    async with ReferenceEndpoint(ReplyPlan(replies=("From the backup.",))) as srv:
        yield srv


def state(breaker: CircuitBreaker) -> str:
    return breaker.state


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"


def pair(
    make_client: ClientFactory,
    primary_url: str,
    backup_url: str,
    *,
    clock: ManualClock | None = None,
    policy: FallbackPolicy | None = None,
) -> FallbackChatClient:
    return FallbackChatClient(
        [
            make_client(primary_url, api_key="sk-primary-1", timeouts=TIMEOUTS, retry=NO_RETRY),
            make_client(backup_url, api_key="sk-backup-2", timeouts=TIMEOUTS),
        ],
        clock=clock or ManualClock(),
        policy=policy,
    )


async def reply_text(client: FallbackChatClient) -> tuple[str, int | None, list[tuple[int, str]]]:
    async with client.stream(REQ) as stream:
        text = "".join([e.text async for e in stream if isinstance(e, TextDelta)])
    return text, stream.entry, stream.skipped


FAULTS = [
    (ReplyPlan(fault="status", status=500), "server"),
    (ReplyPlan(fault="status", status=503), "server"),
    (ReplyPlan(fault="status", status=429, retry_after="1"), "rate_limit"),
    (ReplyPlan(fault="hang_headers"), "timeout"),
    (ReplyPlan(fault="hang", fault_after=0), "timeout"),
    (ReplyPlan(fault="malformed", fault_after=0), "malformed"),
    (ReplyPlan(fault="drop", fault_after=0), "dropped"),
    (ReplyPlan(fault="status", status=401), "auth"),
]


@pytest.mark.parametrize(("plan", "kind"), FAULTS, ids=[f"{p.fault}-{p.status}" for p, _ in FAULTS])
async def test_each_fault_before_the_first_token_fails_over(
    server: ReferenceEndpoint,
    backup: ReferenceEndpoint,
    make_client: ClientFactory,
    plan: ReplyPlan,
    kind: str,
):
    server.plan = plan
    client = pair(make_client, server.base_url, backup.base_url)
    text, entry, skipped = await reply_text(client)
    assert (text, entry, skipped) == ("From the backup.", 1, [(0, kind)])
    # One request each: the primary was not retried, the backup answered.
    assert [r.path for r in server.requests] == ["/v1/chat/completions"]
    assert [r.path for r in backup.requests] == ["/v1/chat/completions"]
    assert client.breakers[0].failures == 1 and client.breakers[1].failures == 0


async def test_a_connect_error_fails_over(backup: ReferenceEndpoint, make_client: ClientFactory):
    client = pair(make_client, closed_port_url(), backup.base_url)
    assert await reply_text(client) == ("From the backup.", 1, [(0, "connect")])


async def test_a_healthy_primary_answers_and_the_backup_is_not_asked(
    server: ReferenceEndpoint, backup: ReferenceEndpoint, make_client: ClientFactory
):
    server.plan = ReplyPlan(replies=("From the primary.",))
    client = pair(make_client, server.base_url, backup.base_url)
    assert await reply_text(client) == ("From the primary.", 0, [])
    assert backup.requests == []


async def test_a_fault_after_the_first_token_is_not_retried(
    server: ReferenceEndpoint, backup: ReferenceEndpoint, make_client: ClientFactory
):
    server.plan = ReplyPlan(replies=("One two three four five.",), fault="drop", fault_after=2)
    client = pair(make_client, server.base_url, backup.base_url)
    got: list[str] = []
    with pytest.raises(StreamDropped):
        async with client.stream(REQ) as stream:
            async for event in stream:
                if isinstance(event, TextDelta):
                    got.append(event.text)
    assert "".join(got) == "One two"
    assert stream.entry == 0
    assert backup.requests == []  # the reply was not asked again elsewhere
    assert client.breakers[0].failures == 1


async def test_when_every_entry_fails_the_last_error_is_raised(
    server: ReferenceEndpoint, backup: ReferenceEndpoint, make_client: ClientFactory
):
    server.plan = ReplyPlan(fault="status", status=500)
    backup.plan = ReplyPlan(fault="status", status=502)
    client = pair(make_client, server.base_url, backup.base_url)
    with pytest.raises(EndpointServerError) as info:
        await reply_text(client)
    assert "502" in str(info.value) or info.value.status_code == 502
    # Each entry's key is redacted from its own quoted error.
    assert "sk-backup-2" not in str(info.value) and "sk-primary-1" not in str(info.value)


async def test_the_circuit_opens_skips_half_opens_and_closes_on_a_virtual_clock(
    server: ReferenceEndpoint, backup: ReferenceEndpoint, make_client: ClientFactory
):
    clock = ManualClock()
    client = pair(
        make_client, server.base_url, backup.base_url, clock=clock,
        policy=FallbackPolicy(failure_threshold=2, open_s=30),
    )  # fmt: skip
    server.plan = ReplyPlan(fault="status", status=500)
    assert (await reply_text(client))[1:] == (1, [(0, "server")])
    assert state(client.breakers[0]) == "closed"
    assert (await reply_text(client))[1:] == (1, [(0, "server")])
    assert state(client.breakers[0]) == "open"
    # Open: the primary is skipped without a request.
    assert (await reply_text(client))[1:] == (1, [(0, "circuit_open")])
    assert len(server.requests) == 2
    clock.advance_ms(29_999)
    assert (await reply_text(client))[1:] == (1, [(0, "circuit_open")])
    assert len(server.requests) == 2
    # After open_s: one probe. It fails: open again for another open_s.
    clock.advance_ms(1)
    assert state(client.breakers[0]) == "half_open"
    assert (await reply_text(client))[1:] == (1, [(0, "server")])
    assert len(server.requests) == 3 and state(client.breakers[0]) == "open"
    assert (await reply_text(client))[1:] == (1, [(0, "circuit_open")])
    # The primary recovers: the next probe closes the circuit.
    server.plan = ReplyPlan(replies=("Back again.",))
    clock.advance_ms(30_000)
    assert await reply_text(client) == ("Back again.", 0, [])
    assert state(client.breakers[0]) == "closed" and client.breakers[0].failures == 0
    assert await reply_text(client) == ("Back again.", 0, [])


async def test_when_every_circuit_is_open_the_entries_are_still_asked(
    server: ReferenceEndpoint, backup: ReferenceEndpoint, make_client: ClientFactory
):
    client = pair(
        make_client, server.base_url, backup.base_url,
        policy=FallbackPolicy(failure_threshold=1, open_s=30),
    )  # fmt: skip
    server.plan = ReplyPlan(fault="status", status=500)
    backup.plan = ReplyPlan(fault="status", status=500)
    with pytest.raises(EndpointServerError):
        await reply_text(client)
    assert [b.state for b in client.breakers] == ["open", "open"]
    backup.plan = ReplyPlan(replies=("Still here.",))
    assert await reply_text(client) == ("Still here.", 1, [(0, "server")])
    assert [b.state for b in client.breakers] == ["open", "closed"]


async def test_prewarm_and_warm_up_go_to_the_first_entry_whose_circuit_is_closed(
    server: ReferenceEndpoint, backup: ReferenceEndpoint, make_client: ClientFactory
):
    client = pair(
        make_client, server.base_url, backup.base_url,
        policy=FallbackPolicy(failure_threshold=1, open_s=30),
    )  # fmt: skip
    await client.prewarm()
    assert await client.warm_up("Be brief.") == "stop"
    assert [r.path for r in server.requests] == ["/v1/models", "/v1/chat/completions"]
    assert backup.requests == []
    server.plan = ReplyPlan(fault="status", status=500)
    await reply_text(client)
    assert state(client.breakers[0]) == "open"
    await client.prewarm()
    assert await client.warm_up("Be brief.") == "stop"
    assert [r.path for r in backup.requests] == [
        "/v1/chat/completions",
        "/v1/models",
        "/v1/chat/completions",
    ]


async def test_hedging_asks_the_next_entry_when_the_first_is_slow(
    server: ReferenceEndpoint, backup: ReferenceEndpoint, make_client: ClientFactory
):
    # The primary takes 3 s to its first token; the hedge asks the backup after 0.1 s.
    server.plan = ReplyPlan(ttft_ms=3000)
    client = FallbackChatClient(
        [
            make_client(server.base_url, timeouts=ClientTimeouts(first_token_s=5)),
            make_client(backup.base_url),
        ],
        clock=ManualClock(),
        policy=FallbackPolicy(hedge_after_s=0.1),
    )
    assert await reply_text(client) == ("From the backup.", 1, [(0, "hedged")])
    assert len(server.requests) == 1 and len(backup.requests) == 1
    await server.requests[0].finished.wait()
    assert server.requests[0].disconnected_ns is not None  # the loser was closed
    # Losing the race counts as a failure (two in a row open the circuit).
    assert state(client.breakers[0]) == "closed" and client.breakers[0].failures == 1


def test_a_breaker_frees_its_probe_when_the_request_is_cancelled():
    clock = ManualClock()
    breaker = CircuitBreaker(clock, failure_threshold=1, open_s=1)
    breaker.failure()
    assert state(breaker) == "open" and not breaker.allow()
    clock.advance_ms(1000)
    assert breaker.allow() and not breaker.allow()  # one probe at a time
    breaker.release()
    assert breaker.allow()
    breaker.success()
    assert state(breaker) == "closed"
    with pytest.raises(ValueError, match="failure_threshold must be >= 1"):
        CircuitBreaker(clock, failure_threshold=0)


async def test_an_entry_that_always_fails_after_its_first_token_opens_its_circuit(
    server: ReferenceEndpoint, backup: ReferenceEndpoint, make_client: ClientFactory
):
    server.plan = ReplyPlan(replies=("One two three four.",), fault="drop", fault_after=1)
    client = pair(make_client, server.base_url, backup.base_url)
    for _ in range(2):
        with pytest.raises(StreamDropped):
            await reply_text(client)
    assert state(client.breakers[0]) == "open" and backup.requests == []
    assert await reply_text(client) == ("From the backup.", 1, [(0, "circuit_open")])


def test_the_next_entry_is_asked_early_by_the_entrys_measured_times_to_first_token():
    # No time measured yet: the default; then twice the slowest of the last 8 times,
    # never before EARLY_MIN_S, and not at all when that is not before the deadline.
    assert (EARLY_DEFAULT_S, EARLY_MIN_S) == (1.5, 0.5)
    assert early_start_s((), 4.0) == 1.5
    assert early_start_s((0.01, 0.02), 4.0) == 0.5
    assert early_start_s((0.4, 0.9, 0.3), 4.0) == 1.8
    assert early_start_s((3.0, *[0.2] * 8), 4.0) == 0.5  # only the last 8 count
    assert early_start_s((3.0, *[0.2] * 7), 4.0) is None  # 6 s: the deadline comes first
    assert early_start_s((), 1.0) is None
    with pytest.raises(ValueError, match="hedge_after_s"):
        FallbackPolicy(hedge_after_s=0)


def test_a_tripped_breaker_opens_at_once_and_half_opens_on_the_virtual_clock():
    clock = ManualClock()
    breaker = CircuitBreaker(clock, failure_threshold=3, open_s=30)
    breaker.trip()
    assert state(breaker) == "open" and breaker.failures == 3 and not breaker.allow()
    clock.advance_ms(29_999)
    assert state(breaker) == "open"
    clock.advance_ms(1)
    assert state(breaker) == "half_open" and breaker.allow()
    breaker.success()
    assert state(breaker) == "closed" and breaker.failures == 0


async def test_a_silent_primary_costs_its_early_start_then_its_circuit_opens(
    server: ReferenceEndpoint, backup: ReferenceEndpoint, make_client: ClientFactory
):
    # The warm-up measures the primary (loopback: a few ms), so the backup is asked
    # after EARLY_MIN_S when the primary says nothing; its deadline is 4 s.
    clock = ManualClock()
    client = FallbackChatClient(
        [
            make_client(server.base_url, retry=NO_RETRY,
                        timeouts=ClientTimeouts(first_token_s=4, first_token_budget_s=5)),
            make_client(backup.base_url),
        ],
        clock=clock,
    )  # fmt: skip
    assert await client.warm_up("Be brief.") == "stop"
    (measured,) = TTFT_MEMORY.recent((server.base_url, "test-model"))
    assert 0 < measured < 0.25 and client.early_start_s(0) == EARLY_MIN_S
    assert client.early_start_s(1) is None  # the last entry has no next one
    server.plan = ReplyPlan(fault="hang_headers")
    for _ in range(2):
        assert await reply_text(client) == ("From the backup.", 1, [(0, "hedged")])
    # Each lost race closed the primary's request and counted a failure: two opened it.
    assert len(server.requests) == 3 and state(client.breakers[0]) == "open"
    for request in server.requests[1:]:
        await request.finished.wait()
        assert request.disconnected_ns is not None
    assert await reply_text(client) == ("From the backup.", 1, [(0, "circuit_open")])
    assert len(server.requests) == 3 and len(backup.requests) == 3


async def test_a_slow_primary_keeps_its_chance_and_the_backups_request_is_closed(
    server: ReferenceEndpoint, backup: ReferenceEndpoint, make_client: ClientFactory
):
    server.plan = ReplyPlan(replies=("From the primary.",), ttft_ms=900)
    backup.plan = ReplyPlan(replies=("From the backup.",), ttft_ms=3000)
    client = FallbackChatClient(
        [make_client(server.base_url, retry=NO_RETRY), make_client(backup.base_url)],
        clock=ManualClock(),
    )
    TTFT_MEMORY.record((server.base_url, "test-model"), 0.1)  # asked early after 0.5 s
    assert await reply_text(client) == ("From the primary.", 0, [])
    assert len(backup.requests) == 1
    await backup.requests[0].finished.wait()
    assert backup.requests[0].disconnected_ns is not None and backup.requests[0].tokens_sent == 0
    assert client.breakers[0].failures == 0 and client.breakers[1].failures == 0
    # The primary's time was learned: the next early start waits longer.
    after = client.early_start_s(0)
    assert after is not None and after > 1.8
    assert after == pytest.approx(2 * max(TTFT_MEMORY.recent((server.base_url, "test-model"))))


async def test_a_failed_warm_up_opens_the_circuit_and_warms_up_the_next_entry(
    server: ReferenceEndpoint,
    backup: ReferenceEndpoint,
    make_client: ClientFactory,
    caplog: pytest.LogCaptureFixture,
):
    server.plan = ReplyPlan(fault="hang_headers")
    client = pair(make_client, server.base_url, backup.base_url)  # deadline 0.4 s
    with caplog.at_level("WARNING", logger="voxloop.llm"):
        assert await client.warm_up("Be brief.") == "stop"
    assert state(client.breakers[0]) == "open"
    [line] = [r for r in caplog.records if "warm-up" in r.getMessage()]
    assert line.getMessage() == (
        "endpoint entry 0 (127.0.0.1) warm-up failed; its circuit is open for 30 s"
    )
    assert (line.entry, line.kind) == (0, "failed")  # type: ignore[attr-defined]
    assert [r.path for r in backup.requests] == ["/v1/chat/completions"]
    # The first turn already skips the primary: no request, no timeout paid.
    assert await reply_text(client) == ("From the backup.", 1, [(0, "circuit_open")])
    assert len(server.requests) == 1


async def test_a_prewarm_that_cannot_connect_opens_the_circuit(
    backup: ReferenceEndpoint, make_client: ClientFactory
):
    client = pair(make_client, closed_port_url(), backup.base_url)
    assert await client.prewarm() is True
    assert state(client.breakers[0]) == "open"
    assert [r.path for r in backup.requests] == ["/v1/models"]
    assert await reply_text(client) == ("From the backup.", 1, [(0, "circuit_open")])


async def test_each_entry_sends_its_own_max_tokens(
    server: ReferenceEndpoint, backup: ReferenceEndpoint, make_client: ClientFactory
):
    server.plan = ReplyPlan(fault="status", status=500)
    client = FallbackChatClient(
        [
            make_client(server.base_url, retry=NO_RETRY, max_tokens=40),
            make_client(backup.base_url, max_tokens=60),
        ],
        clock=ManualClock(),
    )
    assert (await reply_text(client))[1] == 1
    assert server.requests[-1].body is not None and server.requests[-1].body["max_tokens"] == 40
    assert backup.requests[-1].body is not None and backup.requests[-1].body["max_tokens"] == 60
    # A request asking fewer keeps its own (the warm-up's 32); one asking more is capped.
    assert await client.clients[1].warm_up("Be brief.") == "stop"
    assert backup.requests[-1].body is not None and backup.requests[-1].body["max_tokens"] == 32
    wide = ChatRequest(messages=REQ.messages, max_tokens=500)
    async with client.clients[1].stream(wide) as stream:
        async for _ in stream:
            pass
    assert backup.requests[-1].body is not None and backup.requests[-1].body["max_tokens"] == 60


async def test_a_reply_cancelled_during_the_race_frees_the_next_entrys_probe(
    server: ReferenceEndpoint, backup: ReferenceEndpoint, make_client: ClientFactory
):
    # The backup's circuit is half-open; the race takes its one probe, then the reply is
    # cancelled (the caller spoke again): the probe must be free for the next turn.
    clock = ManualClock()
    server.plan = ReplyPlan(fault="hang_headers")
    backup.plan = ReplyPlan(fault="hang_headers")
    client = FallbackChatClient(
        [make_client(server.base_url, retry=NO_RETRY), make_client(backup.base_url)],
        clock=clock,
        policy=FallbackPolicy(hedge_after_s=0.001),
    )
    client.breakers[1].trip()
    clock.advance_ms(30_000)
    assert state(client.breakers[1]) == "half_open"
    # The race starts after 1 ms, long before this 0.3 s timer cancels the reply.
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.3):
            await reply_text(client)
    assert state(client.breakers[1]) == "half_open"
    assert client.breakers[1].allow()  # the probe is free
    assert client.breakers[0].failures == 0 and client.breakers[1].failures == 2
