"""The socket side of the Voice Agent client: :class:`ClientProtocol` over ``websockets``.

Theory of operation
-------------------
:class:`VoiceAgentClient` owns one reader task (in a task group that lives as
long as the ``async with`` block). The reader feeds every text frame to the
pure :class:`~runtime.client.protocol.ClientProtocol`, writes what it wants to
send, and hands the application events to a bounded queue read through
:meth:`VoiceAgentClient.events` (a slow consumer slows the reader, which lets
the socket apply backpressure to the server — nothing grows without bound).

Writes from the application (:meth:`~VoiceAgentClient.send_audio`, tool
results, :meth:`~VoiceAgentClient.end`) and from the reader go through one
lock, so frames leave in the order the protocol queued them.

When the socket drops without ``session.ended``, the reader dials again with
a growing back-off and sends ``session.resume`` until the server's resume
window (30 s) is over; the application sees :class:`ConnectionDropped` and,
on success, :class:`SessionResumed`. Input audio offered meanwhile is dropped
(live audio cannot wait) and counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from types import TracebackType
from typing import Final, Self
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import (
    ConnectionClosed,
    InvalidHandshake,
    InvalidStatus,
    InvalidURI,
)

from runtime.client.protocol import (
    AppEvent,
    ClientProtocol,
    ClientStatistics,
    SessionFailure,
    State,
)
from runtime.endpoints import has_user_info, tls_failure
from runtime.protocol.events import ClientEvent, SessionPatch
from runtime.secret import Secret

log = logging.getLogger(__name__)

RESUME_WINDOW_S: Final = 30.0
MAX_MESSAGE_BYTES: Final = 4 * 1024 * 1024
EVENT_QUEUE: Final = 256
_BACKOFF: Final = (0.05, 0.1, 0.2, 0.5, 1.0, 2.0)


class ServerUnreachable(SessionFailure):
    """No WebSocket could be opened (refused, no such host, timeout, not a WebSocket)."""

    def __init__(self, message: str) -> None:
        super().__init__("unreachable", message)


class HandshakeRejected(SessionFailure):
    """The server answered the upgrade with an HTTP error (401/403: bad credentials)."""

    def __init__(self, status: int, url: str = "") -> None:
        code = {401: "unauthorized", 403: "forbidden"}.get(status, f"http_{status}")
        if status in (401, 403):
            message = f"the server refused the credentials: HTTP {status}"
        elif url:
            parts = urlsplit(url)
            tried = f"{parts.scheme}://{parts.netloc}{parts.path}"
            socket_url = urlunsplit((parts.scheme, parts.netloc, "/v1/ws", "", ""))
            path = parts.path.rstrip("/")
            if path == "/v1/ws":
                advice = "the server there is not voxloop serve"
            else:
                advice = f"voxloop serve answers at {socket_url}"
            if path.endswith(("/v1", "/chat/completions", "/models")):
                advice += (
                    "; if that is a chat-completions endpoint, give it to voxloop serve "
                    "(VOXLOOP_LLM_BASE_URL, or an agent's llm.base_url) and connect to the server"
                )
            message = f"no Voice Agent WebSocket at {tried} (HTTP {status}); {advice}"
        else:
            message = f"no Voice Agent WebSocket at that URL: HTTP {status}"
        super().__init__(code, message)
        self.status = status


@dataclass(frozen=True, slots=True, kw_only=True)
class Auth:
    """Credentials for the upgrade: an API key (``Authorization: Bearer``) or a
    single-use token (``?token=``). Neither is ever logged."""

    api_key: Secret | None = None
    token: Secret | None = field(default=None, repr=False)


@dataclass(frozen=True, slots=True, kw_only=True)
class ConnectionDropped:
    """The socket dropped without ``session.ended``; resuming."""

    close_code: int | None


@dataclass(frozen=True, slots=True, kw_only=True)
class SessionResumed:
    """``session.resume`` succeeded on a new socket; the conversation goes on."""

    session_id: str


Event = AppEvent | ConnectionDropped | SessionResumed


def websocket_url(url: str) -> str:
    """The WebSocket URL for a server address: ``http(s)`` becomes ``ws(s)``, and
    an address without a path gets the protocol's path ``/v1/ws``.

    Raises:
        ValueError: not an http(s)/ws(s) URL, or one holding user information.
    """
    if has_user_info(url):
        raise ValueError(
            "the URL holds user information (user:password@): the key goes in "
            "VOXLOOP_API_KEY (or --token), never in the URL"
        )
    parts = urlsplit(url)
    scheme = {"http": "ws", "https": "wss", "ws": "ws", "wss": "wss"}.get(parts.scheme.lower())
    if scheme is None or not parts.netloc:
        raise ValueError(f"not a ws://, wss://, http:// or https:// URL: {url!r}")
    path = parts.path if parts.path not in ("", "/") else "/v1/ws"
    return urlunsplit((scheme, parts.netloc, path, parts.query, ""))


def _with_token(url: str, token: str) -> str:
    parts = urlsplit(url)
    query = [(k, v) for k, v in parse_qsl(parts.query) if k != "token"] + [("token", token)]
    return urlunsplit((parts.scheme, parts.netloc, parts.path, urlencode(query), ""))


class VoiceAgentClient:
    """One Voice Agent session over a WebSocket.

    ``async with VoiceAgentClient(...) as client`` connects, sends the first
    ``session.update`` and returns once ``session.ready`` arrived. Consume
    :meth:`events` while the session runs (it ends when the session does),
    stream audio with :meth:`send_audio`, and finish with :meth:`end`.

    Args:
        url: ``ws(s)://host/v1/ws`` (see :func:`websocket_url`).
        session: the first ``session.update`` payload.
        auth: the API key or token for the upgrade.
        resume_window_s: how long to keep trying ``session.resume`` after a drop.
        open_timeout_s: bound of one connection attempt (TCP, TLS, upgrade).
        ready_timeout_s: bound of the wait for ``session.ready``.

    Raises (from ``__aenter__``):
        ServerUnreachable: no WebSocket could be opened.
        HandshakeRejected: the upgrade was refused with an HTTP status.
        SessionFailure: the server refused the session (``unauthorized``,
            ``agent_not_found``, ``at_capacity`` …, or closed before ready).
        ValueError: a malformed URL.
    """

    def __init__(
        self,
        url: str,
        *,
        session: SessionPatch,
        auth: Auth,
        resume_window_s: float = RESUME_WINDOW_S,
        open_timeout_s: float = 10.0,
        ready_timeout_s: float = 30.0,
    ) -> None:
        self.url = websocket_url(url)
        self.protocol = ClientProtocol(session)
        self._auth = auth
        self._resume_window = resume_window_s
        self._open_timeout = open_timeout_s
        self._ready_timeout = ready_timeout_s
        self._ws: ClientConnection | None = None
        self._lock = asyncio.Lock()
        self._events: asyncio.Queue[Event | None] = asyncio.Queue(maxsize=EVENT_QUEUE)
        self._ready = asyncio.Event()
        self._over = asyncio.Event()
        self._stack = contextlib.AsyncExitStack()
        self._closing = False
        self._reader_task: asyncio.Task[None] | None = None

    # -- lifecycle -----------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        async with contextlib.AsyncExitStack() as stack:
            self._ws = await self._dial(resume=False)
            stack.push_async_callback(self._close_socket)
            tg = await stack.enter_async_context(asyncio.TaskGroup())
            self.protocol.connection_made()
            await self._flush()
            self._reader_task = tg.create_task(self._reader())
            if await self._wait_ready():
                self._stack = stack.pop_all()
                return self
            failure = self.protocol.error or SessionFailure(
                "agent_timeout", f"no session.ready within {self._ready_timeout:g} s"
            )
            await self._close_socket()
        # Raised outside the task group, so callers see the failure itself.
        raise failure

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:  # fmt: skip
        # Closing the socket ends the reader; one still handing events to a consumer that
        # has gone is cancelled. Then the task group exits.
        await self._close_socket()
        if self._reader_task is not None and not self._over.is_set():
            self._reader_task.cancel()
        await self._stack.__aexit__(exc_type, exc, tb)

    async def _wait_ready(self) -> bool:
        ready = asyncio.ensure_future(self._ready.wait())
        over = asyncio.ensure_future(self._over.wait())
        try:
            await asyncio.wait(
                {ready, over}, timeout=self._ready_timeout, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            ready.cancel()
            over.cancel()
        return self.protocol.state is State.READY

    # -- application API -----------------------------------------------------------------------

    @property
    def session_id(self) -> str | None:
        return self.protocol.session_id

    @property
    def over(self) -> bool:
        """The session ended (cleanly or not); nothing more will be sent."""
        return self.protocol.state in (State.ENDED, State.FAILED)

    @property
    def error(self) -> SessionFailure | None:
        """Why the session failed (``None`` while it runs or after a clean end)."""
        return self.protocol.error

    async def events(self) -> AsyncIterator[Event]:
        """The application events, in order, until the session is over."""
        while (event := await self._events.get()) is not None:
            yield event

    async def send_audio(self, data: bytes) -> bool:
        """Send one chunk of input audio (in the input encoding; ~50 ms recommended).

        Returns:
            ``False`` when dropped (not ready yet, reconnecting, or over).
        """
        if not self.protocol.send_audio(data):
            return False
        await self._flush()
        return True

    async def send(self, event: ClientEvent) -> None:
        """Send another client event (``reply.create``, ``conversation.message`` …).

        Raises:
            InvalidState: the session is not ready.
        """
        self.protocol.send(event)
        await self._flush()

    async def submit_tool_result(
        self, call_id: str, result: str, *, is_error: bool = False
    ) -> None:
        """Answer a ``tool.call`` (sent under the protocol's timing rule)."""
        self.protocol.submit_tool_result(call_id, result, is_error=is_error)
        await self._publish()
        await self._flush()

    async def end(self, timeout_s: float = 5.0) -> None:
        """End the session cleanly: ``session.end``, then wait for ``session.ended``
        and the server's close (at most ``timeout_s``, then the socket is closed)."""
        self.protocol.end()
        await self._flush()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                await self._over.wait()
        await self._close_socket()

    def statistics(self) -> ClientStatistics:
        return self.protocol.statistics()

    # -- internals -----------------------------------------------------------------------------

    async def _dial(self, *, resume: bool) -> ClientConnection:
        url, headers = self.url, {}
        if self._auth.api_key is not None:
            headers["Authorization"] = f"Bearer {self._auth.api_key.reveal()}"
        elif resume and self.protocol.resume_token:
            # A single-use token cannot be redeemed twice: resume with the session's own token.
            headers["Authorization"] = f"Bearer {self.protocol.resume_token}"
        elif self._auth.token is not None:
            url = _with_token(url, self._auth.token.reveal())
        try:
            return await connect(
                url, additional_headers=headers, open_timeout=self._open_timeout,
                max_size=MAX_MESSAGE_BYTES, compression=None, proxy=None,
                user_agent_header="voxloop-connect",
            )  # fmt: skip
        except InvalidURI as exc:
            raise ValueError(f"not a valid WebSocket URL: {self.url}") from exc
        except InvalidStatus as exc:
            raise HandshakeRejected(exc.response.status_code, self.url) from None
        except (OSError, TimeoutError, InvalidHandshake) as exc:
            raise ServerUnreachable(self._unreachable(exc)) from None

    def _unreachable(self, exc: BaseException) -> str:
        host = urlsplit(self.url).netloc
        if isinstance(exc, ConnectionRefusedError):
            return f"cannot reach {host} (connection refused); is the server running?"
        if isinstance(exc, socket.gaierror):
            return f"cannot reach {host}: the host name does not resolve"
        if isinstance(exc, TimeoutError):
            return f"cannot reach {host}: no answer within {self._open_timeout:g} s"
        if isinstance(exc, InvalidHandshake):
            return (
                f"cannot reach {host}: not a WebSocket server (it did not answer the upgrade "
                "request with a WebSocket handshake)"
            )
        if isinstance(exc, ssl.SSLCertVerificationError):
            return (
                f"cannot reach {host}: the server's certificate is not trusted ({tls_failure(exc)})"
            )
        if isinstance(exc, ssl.SSLError):
            return f"cannot reach {host}: TLS handshake failed: {tls_failure(exc)}"
        assert isinstance(exc, OSError)
        return f"cannot reach {host}: {exc.strerror or 'the connection failed'}"

    async def _close_socket(self) -> None:
        self._closing = True  # our own close is not a drop to resume from
        ws = self._ws
        if ws is not None:
            await ws.close()

    async def _flush(self) -> None:
        async with self._lock:
            ws = self._ws
            for text in self.protocol.data_to_send():
                if ws is None:
                    continue
                # A closed socket: the reader sees the close and decides what happens next.
                with contextlib.suppress(ConnectionClosed):
                    await ws.send(text)

    async def _publish(self) -> None:
        for event in self.protocol.events_received():
            await self._events.put(event)

    async def _reader(self) -> None:
        try:
            while True:
                ws = self._ws
                assert ws is not None
                try:
                    async for text in ws:
                        resuming = self.protocol.state is State.BINDING and self._ready.is_set()
                        self.protocol.receive_text(text)
                        await self._flush()
                        await self._publish()
                        if self.protocol.state is State.READY:
                            if resuming:
                                sid = self.protocol.session_id or ""
                                await self._events.put(SessionResumed(session_id=sid))
                            self._ready.set()
                        if self.protocol.state in (State.ENDED, State.FAILED):
                            break
                except ConnectionClosed:
                    pass
                if self.protocol.state in (State.ENDED, State.FAILED):
                    break
                code = ws.close_code if ws.close_code != 1006 else None
                self.protocol.connection_lost(code, ws.close_reason or "")
                if self._closing:
                    message = "the client closed the connection without session.end"
                    self.protocol.give_up(message, "connection_closed")
                await self._publish()
                if not self.protocol.resumable or not self._ready.is_set():
                    break
                await self._events.put(ConnectionDropped(close_code=code))
                if not await self._resume():
                    break
            await self._publish()
            await self._events.put(None)  # the end of events()
        finally:
            self._over.set()

    async def _resume(self) -> bool:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._resume_window
        attempt = 0
        while loop.time() < deadline and not self._closing:
            await asyncio.sleep(_BACKOFF[min(attempt, len(_BACKOFF) - 1)])
            attempt += 1
            self.protocol.reconnect()
            try:
                self._ws = await self._dial(resume=True)
            except HandshakeRejected as exc:
                self.protocol.connection_lost(None)
                self.protocol.give_up(exc.message)
                return False
            except SessionFailure:
                self.protocol.connection_lost(None)
                continue
            self.protocol.connection_made()
            await self._flush()
            return True
        self.protocol.give_up(f"could not resume within {self._resume_window:g} s")
        return False
