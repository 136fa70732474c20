"""The HTTP/1.1 protocol the agent service runs on: uvicorn's h11 protocol with a head deadline.

uvicorn times out idle keep-alive connections only after a response; a client
that connects and sends nothing, or half a request head, holds a connection
(and a file descriptor) forever. :class:`GuardedH11Protocol` closes a
connection whose next request head (request line and headers) has not fully
arrived :data:`HEAD_TIMEOUT_S` seconds after the connection opened or the
previous response ended. Bodies have their own deadline in the handlers
(``runtime.server.app.BODY_TIMEOUT_S``).

Use it as ``uvicorn.Config(app, http=GuardedH11Protocol, …)``. After a WebSocket
upgrade the connection belongs to the WebSocket protocol and the deadline no
longer applies.
"""

from __future__ import annotations

import asyncio
from typing import Final

from uvicorn.protocols.http.h11_impl import H11Protocol

HEAD_TIMEOUT_S: Final = 10.0


class GuardedH11Protocol(H11Protocol):
    """``H11Protocol`` that closes connections whose request head is late (see the module)."""

    head_timeout_s: float = HEAD_TIMEOUT_S
    _head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        before = self.cycle
        super().data_received(data)
        if self._upgraded():
            self._disarm()  # a WebSocket now owns the connection
        elif self.cycle is not before:
            self._disarm()  # a new request head arrived
        elif self.cycle is None or self.cycle.response_complete:
            self._arm()  # part of a head: the deadline keeps running

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._disarm()
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        if self._head_timer is None and not self.transport.is_closing():
            self._head_timer = self.loop.call_later(self.head_timeout_s, self._head_late)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _upgraded(self) -> bool:
        return bool(self.transport.get_protocol() is not self)

    def _head_late(self) -> None:
        self._head_timer = None
        waiting = self.cycle is None or self.cycle.response_complete
        if waiting and not self._upgraded() and not self.transport.is_closing():
            self.transport.close()
