from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator

import pytest

from runtime.endpoints import URLPolicy
from runtime.llm.client import (
    REASONING_MEMORY,
    TTFT_MEMORY,
    ChatClient,
    ClientTimeouts,
    Endpoint,
    RetryPolicy,
)
from runtime.llm.reference import ReferenceEndpoint
from runtime.secret import Secret

from .postgres import PostgresServer, postgres_server


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer | None]:
    """One throwaway PostgreSQL server for the whole session (``None``: not installed)."""
    yield from postgres_server()


@pytest.fixture(autouse=True)
def _fresh_reasoning_memory() -> None:
    # Loopback ports are reused between tests: what one test's endpoint taught
    # the process must not carry over to the next test's endpoint on that port.
    REASONING_MEMORY.clear()
    TTFT_MEMORY.clear()


@pytest.fixture
async def server() -> AsyncIterator[ReferenceEndpoint]:
    async with ReferenceEndpoint() as srv:
        yield srv


ClientFactory = Callable[..., ChatClient]


@pytest.fixture
async def make_client() -> AsyncIterator[ClientFactory]:
    made: list[ChatClient] = []

    def factory(
        base_url: str,
        *,
        api_key: str | None = None,
        timeouts: ClientTimeouts | None = None,
        retry: RetryPolicy | None = None,
        model: str = "test-model",
        **kwargs: object,
    ) -> ChatClient:
        kwargs.setdefault("policy", URLPolicy.operator())
        # The reference endpoint never opens think blocks in a template: text is
        # released as it streams (the tests of the automatic choice pass None).
        kwargs.setdefault("leading_reasoning", False)
        client = ChatClient(
            Endpoint(base_url, model, Secret(api_key) if api_key else None),
            timeouts=timeouts or ClientTimeouts(connect_s=5, first_token_s=5, stall_s=5),
            retry=retry or RetryPolicy(max_attempts=2, backoff_s=0),
            **kwargs,  # type: ignore[arg-type]
        )
        made.append(client)
        return client

    yield factory
    for client in made:
        await client.aclose()
