"""Run a :class:`ReferenceEndpoint` on its own event loop in a background thread.

The benchmark measures a client; a server sharing the client's event loop
would add its own scheduling jitter to every timestamp. A thread with its own
loop keeps them apart while still letting the benchmark read the server's
request records afterwards.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import Future
from types import TracebackType
from typing import Self, TypeVar

from runtime.llm.reference import ReferenceEndpoint, ReplyPlan, RequestRecord

T = TypeVar("T")


class ReferenceThread:
    """``with ReferenceThread(plan) as ref: ref.base_url …``

    Args:
        plan: how the server answers.
        host: the address it listens on.
        api_key: when set, the server requires ``Authorization: Bearer <api_key>``.
        capacity: streams the server decodes at once (its capacity model; ``None``: unlimited).
    """

    def __init__(
        self,
        plan: ReplyPlan,
        *,
        host: str = "127.0.0.1",
        api_key: str | None = None,
        capacity: int | None = None,
    ) -> None:
        self._plan = plan
        self._capacity = capacity
        self._host = host
        self._api_key = api_key
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="voxloop-reference", daemon=True)
        self._server: ReferenceEndpoint | None = None
        self._started: Future[None] = Future()
        self._stop: asyncio.Event | None = None

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._main())
        finally:
            self._loop.close()

    async def _main(self) -> None:
        self._stop = asyncio.Event()
        try:
            server = ReferenceEndpoint(
                self._plan, host=self._host, api_key=self._api_key, capacity=self._capacity
            )
            await server.start()
        except BaseException as exc:
            self._started.set_exception(exc)
            return
        self._server = server
        self._started.set_result(None)
        try:
            await self._stop.wait()
        finally:
            await server.aclose()

    def __enter__(self) -> Self:
        self._thread.start()
        self._started.result(timeout=10)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout=10)

    @property
    def base_url(self) -> str:
        assert self._server is not None
        return self._server.base_url

    @property
    def server(self) -> ReferenceEndpoint:
        """The running server; touch its state only through :meth:`call`."""
        assert self._server is not None
        return self._server

    def call(self, fn: Callable[[ReferenceEndpoint], T]) -> T:
        """Run ``fn(server)`` on the server's loop and return its result."""
        server = self.server

        async def run() -> T:
            return fn(server)

        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(timeout=10)

    def records(self) -> list[RequestRecord]:
        """The server's request records (copy, taken on the server's loop)."""
        return self.call(lambda server: list(server.requests))
