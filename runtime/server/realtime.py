"""The Voice Agent WebSocket: ``/v1/ws`` on the agent service's ASGI app.

Theory of operation
-------------------
One connection, one socket, three owned tasks (one ``TaskGroup``):

* the **receiver** reads JSON text frames, decodes them with the pure codec
  (``runtime.protocol.events``) and hands them to the :class:`LiveSession`;
  a bad frame gets a ``session.error`` with its code and nothing else happens;
* the **session** (:meth:`LiveSession.run`) runs the conversation;
* the **sender** writes server events from a bounded queue; a client that
  stops reading fills it and is dropped (its session stays resumable).

Before that, the upgrade is authenticated (``Authorization: <key>`` or
``Bearer <key>``, ``?token=`` single-use tokens, or a resume token); a bad
credential gets ``session.error`` ``unauthorized`` and close 1008. The first
message must be ``session.update`` (bind) or ``session.resume``; the server
answers ``session.ready``. Teardown: ``session.end`` → ``session.ended`` →
close 1000; the duration cap → ``session_expired`` → ``session.ended`` →
close 1008; a dropped socket keeps the session for the resume grace period.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time
from collections.abc import Awaitable, Callable, Collection
from typing import Final

from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from runtime.agents.tokens import Tokens
from runtime.protocol import events as ev
from runtime.secret import Secret
from runtime.sessions import (
    LiveSession,
    Principal,
    SessionRefused,
    SessionRunner,
    SessionSpec,
    key_owner,
)

log = logging.getLogger("voxloop.realtime")

CLOSE_NORMAL: Final = 1000
CLOSE_POLICY: Final = 1008
CLOSE_INTERNAL: Final = 1011
_FLUSH_S: Final = 2.0
RESUME_PREFIX: Final = "rt_"


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
        self.accepting = True
        # Reading pauses while the client is slow to take our answers (backpressure).
        self._low_water = runner.limits.outbound_messages // 4
        self._high_water = runner.limits.outbound_messages // 2
        self._drained = asyncio.Event()
        self._drained.set()

    # -- outgoing -----------------------------------------------------------------

    def emit(self, event: ev.ServerEvent) -> None:
        """Queue a server event (never blocks; a full queue drops the client)."""
        if not self.accepting:
            return
        try:
            self.queue.put_nowait(event)
        except asyncio.QueueFull:
            self.accepting = False
            self.slow.set()
            log.warning("client dropped: not reading", extra={"queued": self.queue.qsize()})

    def error(self, code: str, message: str, param: str | None = None) -> None:
        self.emit(ev.SessionError(code=code, message=message, param=param, timestamp=time.time()))

    async def send_loop(self) -> None:
        while (event := await self.queue.get()) is not None:
            if self.queue.qsize() <= self._low_water:
                self._drained.set()
            try:
                await self.ws.send_text(ev.encode(event))
            except (WebSocketDisconnect, RuntimeError, OSError):
                self.accepting = False
                return

    async def _send_now(self, event: ev.ServerEvent) -> None:
        # Bounded: a client that does not read must not hold the handler.
        with contextlib.suppress(WebSocketDisconnect, RuntimeError, OSError, TimeoutError):
            async with asyncio.timeout(_FLUSH_S):
                await self.ws.send_text(ev.encode(event))

    async def _close(self, code: int, reason: str = "") -> None:
        if self.ws.application_state is WebSocketState.CONNECTED:
            with contextlib.suppress(WebSocketDisconnect, RuntimeError, OSError, TimeoutError):
                async with asyncio.timeout(_FLUSH_S):
                    await self.ws.close(code, reason)

    # -- authentication -------------------------------------------------------------

    async def authenticate(self) -> Principal | SessionRefused:
        header = self.ws.headers.get("authorization", "").strip()
        token = self.ws.query_params.get("token")
        if header:
            key = header[7:].strip() if header.lower().startswith("bearer ") else header
            if any(hmac.compare_digest(key, k) for k in self.api_keys):
                return Principal(kind="key", owner=key_owner(key))
            if key.startswith(RESUME_PREFIX):
                return Principal(kind="resume", owner="", resume_token=Secret(key))
            return SessionRefused("unauthorized", "invalid API key")
        if token:
            if token.startswith(RESUME_PREFIX):
                return Principal(kind="resume", owner="", resume_token=Secret(token))
            claims = await self.tokens.redeem(token)
            if claims is None:
                return SessionRefused("unauthorized", "invalid, expired or already used token")
            return Principal(
                kind="token", owner=f"token:{claims.get('jti')}",
                max_duration_s=int(claims.get("msd") or 0) or None,
            )  # fmt: skip
        return SessionRefused("unauthorized", "missing credentials: Authorization or ?token=")

    # -- the connection -------------------------------------------------------------

    async def serve(self) -> None:
        principal = await self.authenticate()
        await self.ws.accept()
        if isinstance(principal, SessionRefused):
            await self._refuse(principal)
            return
        try:
            with self.runner.slot():
                await self._serve(principal)
        except SessionRefused as exc:
            await self._refuse(exc)

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
        """Wait for a valid ``session.update`` or ``session.resume``."""
        # The deadline is the client's: loading the speech engines for the worker's first
        # session (seconds on a busy machine) does not count against it.
        deadline = asyncio.get_running_loop().time() + self.runner.limits.ready_timeout_s
        while True:
            async with asyncio.timeout_at(deadline):
                event = await self._receive()
            if isinstance(event, ev.ProtocolError):
                await self._send_now(_error_event(event.code, event.message, event.param))
                continue
            try:
                if isinstance(event, ev.SessionResume):
                    return await self.runner.resume(event.session_id, principal, self.emit)
                if principal.kind == "resume":
                    raise SessionRefused("unauthorized", "a resume token only resumes its session")
                if isinstance(event, ev.SessionUpdate):
                    spec: SessionSpec = await self.runner.bind(event.session)
                    await self._engines()
                    return self.runner.start(spec, principal, self.emit)
                raise SessionRefused(
                    "invalid_format", f"send session.update before {event.type}", param="type"
                )
            except SessionRefused as exc:
                if exc.fatal:
                    raise
                await self._send_now(_error_event(exc.code, exc.message, exc.param))

    async def _engines(self) -> None:
        try:
            await self.runner.engines.get()
        except Exception as exc:
            log.exception("speech engines failed to load")
            raise SessionRefused(
                "agent_init_failed", f"the speech engines cannot start ({type(exc).__name__})"
            ) from None

    async def _serve(self, principal: Principal) -> None:
        try:
            live = await self._first(principal)
        except _Closed:
            return
        except TimeoutError:
            raise SessionRefused(
                "agent_timeout", "no session.update arrived in time after the upgrade"
            ) from None
        if live.spec.llm is not None:
            await self.runner.check_endpoint(live.spec, "agent_init_failed")
        await self._engines()
        self.emit(ev.SessionReady(
            session_id=live.session_id, config=live.spec.public(),
            expires_at=int(live.expires_at), resume_token=live.resume_token,
            timestamp=time.time(),
        ))  # fmt: skip
        log.info("session ready", extra={"session_id": live.session_id})
        self.runner.attach(live)
        reason = "failed"
        try:
            reason = await self._run(live)
        finally:
            await self.runner.release(live, keep=reason == "dropped")
        log.info("session over", extra={"session_id": live.session_id, "reason": reason})

    async def _run(self, live: LiveSession) -> str:
        reason = "dropped"
        failed = False
        try:
            async with asyncio.TaskGroup() as tg:
                sender = tg.create_task(self.send_loop())
                session = tg.create_task(live.run())
                receiver = tg.create_task(self._receive_loop(live))
                slow = tg.create_task(self.slow.wait())
                done, _ = await asyncio.wait(
                    {session, receiver, slow, sender}, return_when=asyncio.FIRST_COMPLETED
                )
                if session in done:
                    reason = session.result()
                for task in (receiver, slow, session):
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
            log.exception("session failed", extra={"session_id": live.session_id})
            failed = True
        if failed:
            await self._send_now(_error_event("internal_error", "the session failed"))
            await self._close(CLOSE_INTERNAL)
            return "failed"
        if reason == "ended":
            await self._close(CLOSE_NORMAL)
        elif reason == "expired":
            await self._close(CLOSE_POLICY, "session expired")
        else:
            await self._close(CLOSE_POLICY, "client not reading")
        return reason

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
