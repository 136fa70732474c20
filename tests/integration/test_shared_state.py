"""The Redis-backed shared state, against a real Redis: a caller cancelled while its command
is in flight stops, whatever point of the command the cancellation reaches."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from runtime.sessions.shared_state import (
    RedisRateLimiter,
    RedisSessionStore,
    RedisTokenUses,
    connect,
)

from ..redis_server import redis_server

Operation = Callable[[int], Awaitable[object]]
#: An operation, and a call afterwards with its answer once the cancelled callers' commands
#: have run (the lease is there, the first token is used, the window has starts in it).
Case = tuple[Operation, Callable[[], Awaitable[object]], object]


@pytest.fixture
async def operations() -> AsyncIterator[dict[str, Case]]:
    with redis_server() as url:
        redis = connect(url)
        store = RedisSessionStore(redis)
        tokens = RedisTokenUses(redis)
        limits = RedisRateLimiter(redis)
        try:
            yield {
                "lease renewal": (
                    lambda i: store.running("sess_1", 60.0),
                    lambda: store.running("sess_1", 60.0),
                    True,
                ),
                "token redemption": (
                    lambda i: tokens.first_use(f"jti-{i}", 60),
                    lambda: tokens.first_use("jti-0", 60),
                    False,
                ),
                "rate limit": (
                    lambda i: limits.allow("ws", "key", 1_000_000),
                    lambda: limits.allow("ws", "key", 1),
                    False,
                ),
                "state lookup": (
                    lambda i: store.peek("sess_1"),
                    lambda: store.peek("sess_1"),
                    None,
                ),
            }
        finally:
            await redis.aclose()


@pytest.mark.parametrize(
    "name", ["lease renewal", "token redemption", "rate limit", "state lookup"]
)
async def test_a_caller_cancelled_mid_command_stops(operations: dict[str, Case], name: str) -> None:
    # Each round cancels a loop of commands after a different number of loop turns, so the
    # cancellation lands at every point of a command: sending, waiting for the answer,
    # parsing it, handing the connection back. The redis package's client lost about one
    # in ten of these (the loop ran on); each must end cancelled.
    operation, check, expected = operations[name]
    still_running = []
    for turns in range(1, 121):

        async def repeat() -> None:
            i = 0
            while True:
                await operation(i)
                i += 1

        task = asyncio.create_task(repeat())
        for _ in range(turns % 40 + 1):
            await asyncio.sleep(0)
        task.cancel()
        # Not a timing check: a lost cancellation never ends, and ten seconds is far
        # beyond a command's time on loopback.
        done, _ = await asyncio.wait([task], timeout=10)
        if not done:
            still_running.append(turns)
            task.cancel()
            await asyncio.wait([task], timeout=10)
            if len(still_running) == 3:
                break
        else:
            assert task.cancelled(), task
    assert still_running == []
    assert await check() == expected
