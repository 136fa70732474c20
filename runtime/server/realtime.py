"""The Voice Agent WebSocket: ``/v1/ws`` on the agent service's ASGI app.

Theory of operation
-------------------
One connection, one socket, three owned tasks (one ``TaskGroup``):

* the **receiver** reads JSON text frames, decodes them with the pure codec
  (``runtime.protocol.events``) and hands them to the :class:`LiveSession`;
  a bad frame gets a ``session.error`` with its code and nothing else happens;
* the **session** (:meth:`LiveSession.run`) runs the conversation;
* the **sender** writes server events from a bounded queue; a client that
  stops reading is dropped (its session stays resumable) when the queue is
  full or when nothing it was sent has left the socket for
  :attr:`RunnerLimits.client_stall_s` (what waits in the transport's write
  buffer counts, not only the queue);
* a **watchdog** measures that stall.

Before that, the upgrade is authenticated (``Authorization: <key>`` or
``Bearer <key>``, ``?token=`` single-use tokens, or a resume token); a bad
credential gets ``session.error`` ``unauthorized`` and close 1008. The first
message must be ``session.update`` (bind) or ``session.resume``; the server
answers ``session.ready``. Teardown: ``session.end`` → ``session.ended`` →
close 1000; the duration cap → ``session_expired`` → ``session.ended`` →
close 1008; a dropped socket keeps the session for the resume grace period.

Slots: a socket takes a session slot only once it binds (or resumes) a
session; until then it counts against its credential's small bound of
unbound connections. A ``session.resume`` by the session's owner while the
old socket is still open here (half-open after a network change) takes the
session over at once: the old socket is closed with 1008.

Every close is bounded: the close frame has
:attr:`RunnerLimits.close_timeout_s` to leave, else the transport is
aborted and its descriptor released (a client that does not read would
otherwise pin the socket and its buffers until it left).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time
from collections.abc import Awaitable, Callable, Collection
from typing import Final, Literal

from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from runtime.agents.tokens import Tokens
from runtime.protocol import events as ev
from runtime.secret import Secret
from runtime.sessions import (
    EnginesUnavailable,
    LiveSession,
    Principal,
    SessionRefused,
    SessionRunner,
    SessionSpec,
    key_owner,
    load_failure,
)

log = logging.getLogger("voxloop.realtime")

CLOSE_NORMAL: Final = 1000
CLOSE_SERVICE_RESTART: Final = 1012
CLOSE_POLICY: Final = 1008
CLOSE_INTERNAL: Final = 1011
_FLUSH_S: Final = 2.0
_WATCH_S: Final = 0.25
RESUME_PREFIX: Final = "rt_"
TRANSPORT_EXTENSION: Final = "voxloop.transport"
"""The ASGI scope extension through which the server hands the socket's transport over
(``{"transport": asyncio.Transport}``; see ``runtime.server.http``)."""

EndReason = Literal["ended", "expired", "dropped", "not reading", "taken over", "failed", "handoff"]
_CLOSES: Final[dict[str, tuple[int, str]]] = {
    "ended": (CLOSE_NORMAL, ""),
    "expired": (CLOSE_POLICY, "session expired"),
    "not reading": (CLOSE_POLICY, "client not reading"),
    "taken over": (CLOSE_POLICY, "session resumed on another connection"),
    "failed": (CLOSE_INTERNAL, ""),
    "dropped": (CLOSE_POLICY, "connection lost"),
    # The worker is going away: the client resumes the session on another one.
    "handoff": (CLOSE_SERVICE_RESTART, "server restarting; resume the session"),
}


class _Closed(Exception):
    """The connection is over (the client left or was dropped)."""


class Connection:
    """One ``/v1/ws`` connection."""

    def __init__(
        self,
        websocket: WebSocket,
        api_keys: Collection[str],
        tokens: Tokens,
        runner: SessionRunner,
    ) -> None:
        self.ws = websocket
        self.api_keys = api_keys
        self.tokens = tokens
        self.runner = runner
        self.queue: asyncio.Queue[ev.ServerEvent | None] = asyncio.Queue(
            maxsize=runner.limits.outbound_messages
        )
        self.slow = asyncio.Event()
        self.slow_reason = ""
        self.taken_over = asyncio.Event()
        self.accepting = True
        # Reading pauses while the client is slow to take our answers (backpressure).
        self._low_water = runner.limits.outbound_messages // 4
        self._high_water = runner.limits.outbound_messages // 2
        self._drained = asyncio.Event()
        self._drained.set()
        extension = websocket.scope.get("extensions", {}).get(TRANSPORT_EXTENSION) or {}
        self.transport: asyncio.Transport | None = extension.get("transport")
        self._written = 0  # bytes of text frames handed to the transport
        self._fields: dict[str, str] = {}
        self._waiting = contextlib.ExitStack()
        # The last first message refused (a session.update that cannot run …): when no
        # acceptable one follows in time, that refusal, not a timeout, closes the socket.
        self._refused: SessionRefused | ev.ProtocolError | None = None

    # -- outgoing -----------------------------------------------------------------

    def emit(self, event: ev.ServerEvent) -> None:
        """Queue a server event (never blocks; a full queue drops the client)."""
        if not self.accepting:
            return
        try:
            self.queue.put_nowait(event)
        except asyncio.QueueFull:
            self._not_reading("queue full")

    def _not_reading(self, why: str) -> None:
        if self.slow.is_set():
            return
        self.accepting = False
        self.slow_reason = why
        self.slow.set()
        log.warning(
            "client dropped: not reading",
            extra={**self._fields, "reason": why, "queued": self.queue.qsize(),
                   "buffered": self._buffered()},
        )  # fmt: skip

    def _buffered(self) -> int:
        """Bytes waiting in the transport's write buffer (the kernel would take no more)."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return 0
        return transport.get_write_buffer_size()

    def error(self, code: str, message: str, param: str | None = None) -> None:
        self.emit(ev.SessionError(code=code, message=message, param=param, timestamp=time.time()))

    async def send_loop(self) -> None:
        while (event := await self.queue.get()) is not None:
            if self.queue.qsize() <= self._low_water:
                self._drained.set()
            text = ev.encode(event)
            try:
                await self.ws.send_text(text)
            except (WebSocketDisconnect, RuntimeError, OSError):
                self.accepting = False
                return
            self._written += len(text)

    async def watch(self) -> None:
        """Drop the client once nothing waiting for it has left for ``client_stall_s``."""
        loop = asyncio.get_running_loop()
        delivered = -1
        since = loop.time()
        while True:
            await asyncio.sleep(_WATCH_S)
            buffered = self._buffered()
            now_delivered = self._written - buffered
            waiting = buffered > 0 or not self.queue.empty()
            if not waiting or now_delivered != delivered:
                delivered = now_delivered
                since = loop.time()
            elif loop.time() - since >= self.runner.limits.client_stall_s:
                self._not_reading("stalled")
                return

    async def _send_now(self, event: ev.ServerEvent) -> None:
        # Bounded: a client that does not read must not hold the handler.
        with contextlib.suppress(WebSocketDisconnect, RuntimeError, OSError, TimeoutError):
            async with asyncio.timeout(_FLUSH_S):
                await self.ws.send_text(ev.encode(event))

    async def _close(self, code: int, reason: str = "") -> None:
        """Close with ``code``; abort the transport when the close cannot leave in time."""
        if self.ws.application_state is not WebSocketState.CONNECTED:
            self._abort_if_stuck()
            return
        try:
            async with asyncio.timeout(self.runner.limits.close_timeout_s):
                await self.ws.close(code, reason)
                # The close frame may wait behind unread data; the transport has no
                # event for an empty buffer, so it is polled.
                while self._buffered() > 0:  # noqa: ASYNC110
                    await asyncio.sleep(_WATCH_S / 5)
        except TimeoutError:  # before OSError, of which it is a subclass
            self._abort()
        except (WebSocketDisconnect, RuntimeError, OSError):
            pass

    def _abort_if_stuck(self) -> None:
        if self._buffered() > 0:
            self._abort()

    def _abort(self) -> None:
        transport = self.transport
        if transport is not None:
            log.info(
                "connection aborted: the close did not complete",
                extra={**self._fields, "buffered": self._buffered()},
            )
            transport.abort()

    def take_over(self) -> None:
        """The session's owner resumed it from another connection: drop this one."""
        self.taken_over.set()

    # -- authentication -------------------------------------------------------------

    async def authenticate(self) -> Principal | SessionRefused:
        """Who is connecting: an API key, a temporary token or a resume token.

        Each may come as ``Authorization: Bearer <credential>`` (or the raw value) or
        as ``?token=<credential>``; when both are given and the header's credential is
        not valid, the query's is tried.
        """
        header = self.ws.headers.get("authorization", "").strip()
        if header.lower().startswith("bearer "):
            header = header[7:].strip()
        query = self.ws.query_params.get("token")
        refused: SessionRefused | None = None
        for credential in (header, query):
            if not credential:
                continue
            found = await self._credential(credential)
            if isinstance(found, Principal):
                return found
            refused = refused or found
        return refused or SessionRefused(
            "unauthorized", "missing credentials: Authorization or ?token="
        )

    async def _credential(self, value: str) -> Principal | SessionRefused:
        if not value.isascii():  # no credential has such characters (compare_digest refuses them)
            return SessionRefused("unauthorized", "invalid credential")
        if any(hmac.compare_digest(value, k) for k in self.api_keys):
            return Principal(kind="key", owner=key_owner(value))
        if value.startswith(RESUME_PREFIX):
            return Principal(kind="resume", owner="", resume_token=Secret(value))
        if "." not in value:
            return SessionRefused("unauthorized", "invalid API key")
        claims = await self.tokens.redeem(value)
        if claims is None:
            return SessionRefused("unauthorized", "invalid, expired or already used token")
        # A token belongs to the account of the key that minted it.
        owner = claims.get("own")
        return Principal(
            kind="token",
            owner=owner if isinstance(owner, str) and owner else f"token:{claims.get('jti')}",
            max_duration_s=int(claims.get("msd") or 0) or None,
        )

    # -- the connection -------------------------------------------------------------

    async def serve(self) -> None:
        principal = await self.authenticate()
        await self.ws.accept()
        if isinstance(principal, SessionRefused):
            await self._refuse(principal)
            return
        try:
            await self.runner.admit(principal)
            with contextlib.ExitStack() as self._waiting:
                # Counted as unbound until its first message arrives (see _first).
                self._waiting.enter_context(self.runner.unbound(principal.owner or "resume"))
                live = await self._first(principal)
        except _Closed:
            self._abort_if_stuck()
            return
        except TimeoutError:
            refused = self._refused
            if refused is not None:
                # The client's update was refused and nothing acceptable followed: that
                # refusal is the cause, said again as the closing error.
                await self._refuse(SessionRefused(
                    refused.code,
                    f"{refused.message} (no acceptable session.update followed in time)",
                    param=refused.param,
                ))  # fmt: skip
                return
            await self._refuse(SessionRefused(
                "agent_timeout", "no session.update arrived in time after the upgrade"
            ))  # fmt: skip
            return
        except SessionRefused as exc:
            await self._refuse(exc)
            return
        await self._serve(live)

    async def _refuse(self, exc: SessionRefused) -> None:
        await self._send_now(
            ev.SessionError(code=exc.code, message=exc.message, param=exc.param,
                            timestamp=time.time())
        )  # fmt: skip
        await self._close(CLOSE_INTERNAL if exc.code == "internal_error" else CLOSE_POLICY)

    async def _receive(self) -> ev.ClientEvent | ev.ProtocolError:
        message = await self.ws.receive()
        if message["type"] == "websocket.disconnect":
            raise _Closed
        text = message.get("text")
        if text is None:
            return ev.ProtocolError(
                "invalid_format", "binary frames are not used: send JSON text frames"
            )
        try:
            return ev.decode_client_event(text)
        except ev.ProtocolError as exc:
            return exc

    async def _first(self, principal: Principal) -> LiveSession:
        """Wait for a valid ``session.update`` or ``session.resume``; the session it
        binds holds a slot (give it back with :meth:`SessionRunner.free_slot`)."""
        # The deadline is the client's: loading the speech engines for the worker's first
        # session (seconds on a busy machine) does not count against it.
        deadline = asyncio.get_running_loop().time() + self.runner.limits.ready_timeout_s
        while True:
            async with asyncio.timeout_at(deadline):
                event = await self._receive()
            if isinstance(event, ev.ProtocolError):
                self._refused = event
                await self._send_now(_error_event(event.code, event.message, event.param))
                continue
            self._waiting.close()  # it spoke: no longer a silent socket of its credential
            try:
                if isinstance(event, ev.SessionResume):
                    live = await self.runner.resume(event.session_id, principal, self.emit)
                    try:
                        self.runner.take_slot()
                    except SessionRefused:
                        await self.runner.release(live, keep=True)  # it stays resumable
                        raise
                    return live
                if principal.kind == "resume":
                    raise SessionRefused("unauthorized", "a resume token only resumes its session")
                if isinstance(event, ev.SessionUpdate):
                    spec: SessionSpec = await self.runner.bind(event.session)
                    await self._engines()
                    self.runner.take_slot()
                    return self.runner.start(spec, principal, self.emit)
                raise SessionRefused(
                    "invalid_format", f"send session.update before {event.type}", param="type"
                )
            except SessionRefused as exc:
                if exc.fatal:
                    raise
                self._refused = exc
                await self._send_now(_error_event(exc.code, exc.message, exc.param))

    async def _engines(self) -> None:
        try:
            await self.runner.engines.get()
        except EnginesUnavailable as exc:
            raise SessionRefused("agent_init_failed", str(exc)) from None
        except Exception as exc:
            log.exception("speech engines failed to load")
            raise SessionRefused("agent_init_failed", load_failure(exc)) from None

    async def _serve(self, live: LiveSession) -> None:
        """Run a bound session (holding its slot) until it ends; then close the socket."""
        self._fields = {"session_id": live.session_id, "agent_id": live.spec.agent_id or "inline"}
        reason: EndReason = "failed"
        attached = False
        refused: SessionRefused | None = None
        try:
            if live.spec.llm is not None:
                await self.runner.check_endpoint(live.spec, "agent_init_failed")
            await self._engines()
            if self.runner.checkpoints:
                # The state is kept where every worker reads it before the client hears
                # session.ready: a worker dying at any moment after it (a new session
                # before its first turn, a resumed one whose state was taken) leaves the
                # session resumable on another.
                await self.runner.checkpoint(live)
            self.emit(ev.SessionReady(
                session_id=live.session_id, config=live.spec.public(),
                expires_at=int(live.expires_at), resume_token=live.resume_token,
                timestamp=time.time(),
            ))  # fmt: skip
            log.info("session ready", extra=self._fields)
            self.runner.attach(live, self.take_over)
            attached = True
            reason = await self._run(live)
        except SessionRefused as exc:
            refused = exc
        finally:
            keep = attached and reason in ("dropped", "not reading", "taken over", "handoff")
            await self.runner.release(live, keep=keep, reason=reason)
            self.runner.free_slot()
        if refused is not None:
            await self._refuse(refused)
            return
        log.info("session over", extra={
            **self._fields, "reason": reason,
            "duration_s": round(time.time() - live.started_at, 3),
            "tasks": len(asyncio.all_tasks()),  # the worker's, for leak checks (benchmarks/soak.py)
            **live.pacing(),
        })  # fmt: skip
        if reason == "failed":
            await self._send_now(_error_event("internal_error", "the session failed"))
        await self._close(*_CLOSES[reason])

    async def _run(self, live: LiveSession) -> EndReason:
        reason: EndReason = "dropped"
        failed = False
        try:
            async with asyncio.TaskGroup() as tg:
                sender = tg.create_task(self.send_loop())
                session = tg.create_task(live.run())
                receiver = tg.create_task(self._receive_loop(live))
                slow = tg.create_task(self.slow.wait())
                taken = tg.create_task(self.taken_over.wait())
                watchdog = tg.create_task(self.watch())
                done, _ = await asyncio.wait(
                    {session, receiver, slow, sender, taken}, return_when=asyncio.FIRST_COMPLETED
                )
                if session in done:
                    reason = session.result()
                elif taken in done:
                    reason = "taken over"
                elif slow in done:
                    reason = "not reading"
                for task in (receiver, slow, session, taken, watchdog):
                    task.cancel()
                if reason in ("ended", "expired"):
                    if reason == "expired":
                        self.error("session_expired", "the session reached its maximum duration")
                    self.emit(ev.SessionEnded(
                        session_duration_seconds=round(time.time() - live.started_at, 3),
                        audio_duration_seconds=round(live.audio_seconds, 3)
                        if live.audio_seconds else None,
                        timestamp=time.time(),
                    ))  # fmt: skip
                    self.accepting = False
                    with contextlib.suppress(asyncio.QueueFull):
                        self.queue.put_nowait(None)
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(_FLUSH_S):
                            await asyncio.shield(sender)
                sender.cancel()
        except* Exception:
            log.exception("session failed", extra=self._fields)
            failed = True
        return "failed" if failed else reason

    async def _receive_loop(self, live: LiveSession) -> None:
        # Messages sent right after session.ready wait in the socket until the core runs.
        await live.wait_started()
        while True:
            if self.queue.qsize() >= self._high_water:
                self._drained.clear()
                await self._drained.wait()
            try:
                event = await self._receive()
            except (_Closed, WebSocketDisconnect):
                return
            if isinstance(event, ev.ProtocolError):
                self.error(event.code, event.message, event.param)
                continue
            try:
                live.handle(event)
            except SessionRefused as exc:
                self.error(exc.code, exc.message, exc.param)


def _error_event(code: str, message: str, param: str | None = None) -> ev.SessionError:
    return ev.SessionError(code=code, message=message, param=param, timestamp=time.time())


def realtime_endpoint(
    api_keys: Collection[str], tokens: Tokens, runner: SessionRunner
) -> Callable[[WebSocket], Awaitable[None]]:
    """The Starlette WebSocket endpoint for ``/v1/ws``.

    Args:
        api_keys: the server's API keys (``Authorization``).
        tokens: redeems single-use ``?token=`` credentials.
        runner: binds and runs the sessions.
    """

    async def endpoint(websocket: WebSocket) -> None:
        await Connection(websocket, api_keys, tokens, runner).serve()

    return endpoint


SOCKET_PATH: Final = "/v1/ws"


async def unknown_socket(websocket: WebSocket) -> None:
    """A WebSocket upgrade to a path with no socket: HTTP 404 naming :data:`SOCKET_PATH`.

    (Refused by default with 403, which a client reads as refused credentials.) A server
    without the WebSocket denial-response extension closes the handshake instead.
    """
    from starlette.responses import PlainTextResponse

    path = websocket.url.path
    response = PlainTextResponse(
        f"no WebSocket at {path}: the Voice Agent WebSocket is {SOCKET_PATH}", status_code=404
    )
    try:
        await websocket.send_denial_response(response)
    except RuntimeError:
        await websocket.close(CLOSE_POLICY)
