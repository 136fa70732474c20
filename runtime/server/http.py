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

:class:`TransportWebSocketProtocol` is uvicorn's WebSocket protocol that hands
the connection's transport to the application (the scope extension
``voxloop.transport``): the WebSocket adapter reads how much waits in its write
buffer (a client that stops reading) and aborts it when a close cannot leave.
Use it as ``uvicorn.Config(…, ws=TransportWebSocketProtocol)``.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from typing import Final

from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.http11 import Request

HEAD_TIMEOUT_S: Final = 10.0
WS_SEND_BUFFER: Final = 128 * 1024
"""The kernel send buffer of a WebSocket connection (bytes; Linux doubles it): about four
seconds of 24 kHz ``reply.audio`` as base64."""


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


class TransportWebSocketProtocol(WebSocketsSansIOProtocol):
    """uvicorn's WebSocket protocol with the transport in the scope (see the module).

    The socket's kernel send buffer is fixed at :data:`WS_SEND_BUFFER` bytes (Linux
    grows it to megabytes otherwise): what a client does not take shows in the
    transport's write buffer within seconds, not after a minute of audio.
    """

    def handle_connect(self, event: Request) -> None:
        sock = self.transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, WS_SEND_BUFFER)
        super().handle_connect(event)
        scope = getattr(self, "scope", None)
        if scope is not None:  # the application task has not run yet
            scope.setdefault("extensions", {})["voxloop.transport"] = {"transport": self.transport}
