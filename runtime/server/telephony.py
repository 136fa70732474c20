"""Phone calls: the Twilio voice webhook and the Media Streams socket, on the session host.

Theory of operation
-------------------
``POST /twilio/voice?agent_id=ID`` is a Twilio number's voice webhook (and the
``url`` of calls placed with ``voxloop call``). Its ``X-Twilio-Signature`` is
checked with the ``twilio`` package's ``RequestValidator`` and
``VOXLOOP_TWILIO_AUTH_TOKEN``, over the URL Twilio requested: the public one
(``VOXLOOP_PUBLIC_URL``, else the request's ``Host`` with ``X-Forwarded-Proto``).
A bad or missing signature is a 403 and nothing starts. A known agent gets
``<Connect><Stream url="wss://…/twilio/media">`` with the agent and the call
facts as ``<Parameter>``s (Twilio drops a Stream URL's query string); an
unknown one gets ``<Say>`` and ``<Hangup/>``.

``WS /twilio/media`` checks the signature on the upgrade (403 when it fails),
then reads Media Streams messages through the pure codec
(:mod:`runtime.protocol.twilio`). On ``start`` it binds the stored agent and
starts a :class:`~runtime.sessions.LiveSession` whose input and output are
8 kHz μ-law: the caller's payloads go into the session once (decoded and
resampled once, by the session's ingress), and the agent's voice is produced
at 8 kHz and encoded once. The session's speaker is a
:class:`~runtime.sessions.marked.MarkedPlayout`: ``media`` paced in real time
a small lead ahead of Twilio's playout, whole 20 ms frames padded with 0xFF,
a ``mark`` after each piece; the echoes are the played position the history
keeps, and an interruption sends ``clear`` (echoes that follow it count for
nothing).

``dtmf`` digits are collected and reach the model as one user message
``DTMF: <digits>`` (after ``#`` or a second without another key), followed by a
reply. The ``end_call`` tool, added to every phone session, hangs up once the
goodbye before it has been played: a ``hangup`` mark, its echo, then the socket
closes (which ends ``<Connect>``, and with no more TwiML, the call).
``stop`` or a dropped socket ends the session. Each call logs one JSON line at
the start and one at the end (call and stream ids, agent id, duration, end
reason), one ``turn metrics`` line per answered turn, and a typed
``twilio message rejected`` line for a malformed message (the call goes on).
No audio, transcript or secret is logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import importlib.util
import logging
import time
import urllib.parse
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from starlette.requests import Request
from starlette.responses import Response
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from runtime.conversation import events as core
from runtime.protocol import events as ev
from runtime.protocol import twilio as tw
from runtime.secret import Secret
from runtime.sessions import LiveSession, Principal, SessionRefused, SessionRunner, wire_encoder
from runtime.sessions.marked import MarkedPlayout
from runtime.sessions.playout import pacing_fields

log = logging.getLogger("voxloop.telephony")

VOICE_PATH: Final = "/twilio/voice"
MEDIA_PATH: Final = "/twilio/media"
END_CALL: Final = "end_call"
HANGUP_MARK: Final = "hangup"
DTMF_PAUSE_S: Final = 1.0
START_TIMEOUT_S: Final = 10.0
MAX_WEBHOOK_BYTES: Final = 64 * 1024  # Twilio's voice webhook form is a few hundred bytes
HANGUP_ECHO_TIMEOUT_S: Final = 5.0
OUTBOUND_MESSAGES: Final = 1024  # ~20 s of 20 ms messages; a Twilio that stops reading is dropped
PCMU: Final = ev.AudioFormat(encoding="audio/pcmu")
END_CALL_RESULT: Final = (
    "The call ends as soon as what you said has been played to the caller. Say nothing more."
)
UNKNOWN_AGENT_SAY: Final = "Sorry, this number is not connected to an agent. Goodbye."

END_CALL_TOOL: Final = ev.ToolSpec(
    name=END_CALL,
    description=(
        "Hang up the phone call. Say goodbye first: the call ends once everything "
        "said before this call has been played to the caller."
    ),
)


@dataclass(frozen=True, slots=True)
class TwilioSettings:
    """The phone bridge's settings.

    Attributes:
        auth_token: ``VOXLOOP_TWILIO_AUTH_TOKEN``; without it every Twilio request
            is refused (403).
        public_url: ``VOXLOOP_PUBLIC_URL``, the scheme, host and port Twilio
            reaches this server at (``https://voice.example.com``); without it the
            request's ``Host`` and ``X-Forwarded-Proto`` say.
    """

    auth_token: Secret | None = None
    public_url: str | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> TwilioSettings:
        """Read ``VOXLOOP_TWILIO_AUTH_TOKEN`` and ``VOXLOOP_PUBLIC_URL``.

        Raises:
            ValueError: the public URL is not ``http(s)://host[:port][/prefix]``.
        """
        token = env.get("VOXLOOP_TWILIO_AUTH_TOKEN", "").strip()
        if token and importlib.util.find_spec("twilio") is None:
            raise ValueError(
                "VOXLOOP_TWILIO_AUTH_TOKEN is set but the twilio package is missing: "
                "pip install 'voxloop[phone]'"
            )
        public = env.get("VOXLOOP_PUBLIC_URL", "").strip().rstrip("/") or None
        if public is not None:
            parts = urllib.parse.urlsplit(public)
            if parts.scheme not in ("http", "https") or not parts.hostname or parts.query:
                raise ValueError(
                    "VOXLOOP_PUBLIC_URL must look like https://voice.example.com (scheme and host)"
                )
        return cls(auth_token=Secret(token) if token else None, public_url=public)


def public_url(
    settings: TwilioSettings, scheme: str, headers: Mapping[str, str], path: str, query: str
) -> str:
    """The URL Twilio requested: the configured public base, else the forwarded one.

    Args:
        scheme: the request's own scheme (``http``/``https``/``ws``/``wss``).
        headers: the request headers (``host``, ``x-forwarded-proto``, ``x-forwarded-host``).
        path, query: the request's path and raw query string.
    """
    websocket = scheme in ("ws", "wss")
    if settings.public_url is not None:
        base = settings.public_url
    else:
        proto = headers.get("x-forwarded-proto", "").split(",")[0].strip().lower()
        if proto in ("ws", "wss"):
            proto = "https" if proto == "wss" else "http"
        if proto not in ("http", "https"):
            proto = "https" if scheme in ("https", "wss") else "http"
        host = headers.get("x-forwarded-host", "").split(",")[0].strip() or headers.get("host", "")
        base = f"{proto}://{host}"
    if websocket:
        base = "wss" + base[5:] if base.startswith("https") else "ws" + base[4:]
    return base + path + (f"?{query}" if query else "")


def stream_url(settings: TwilioSettings, scheme: str, headers: Mapping[str, str]) -> str:
    """The ``wss://…/twilio/media`` URL to put in ``<Stream>``."""
    return public_url(settings, "wss" if scheme == "https" else "ws", headers, MEDIA_PATH, "")


def _signature_ok(
    settings: TwilioSettings, url: str, params: Mapping[str, str], signature: str
) -> bool:
    if settings.auth_token is None or not signature:
        return False
    from twilio.request_validator import RequestValidator  # the ``phone`` extra

    validator = RequestValidator(settings.auth_token.reveal())
    candidates = [url]
    if url.startswith(("wss://", "ws://")):
        # The stream URL as configured is wss://; accept its https:// spelling too.
        candidates.append("https" + url[3:] if url.startswith("wss") else "http" + url[2:])
    return any(validator.validate(u, dict(params), signature) for u in candidates)


class Telephony:
    """The two Twilio routes of ``voxloop serve``.

    Args:
        runner: binds and runs the sessions.
        settings: the auth token and public URL.
        agent_exists: whether a stored agent with this id exists.
    """

    def __init__(
        self,
        runner: SessionRunner,
        settings: TwilioSettings,
        agent_exists: Callable[[str], Awaitable[bool]],
    ) -> None:
        self.runner = runner
        self.settings = settings
        self.agent_exists = agent_exists
        if settings.auth_token is None:
            log.info("twilio bridge off: VOXLOOP_TWILIO_AUTH_TOKEN is not set")

    async def voice(self, request: Request) -> Response:
        """``POST /twilio/voice?agent_id=ID``: TwiML that connects the call to the media socket."""
        raw = bytearray()
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > MAX_WEBHOOK_BYTES:
                log.warning("twilio webhook body too large", extra={"path": VOICE_PATH})
                return Response("request body too large\n", status_code=413,
                                media_type="text/plain")  # fmt: skip
        body = raw.decode("utf-8", "replace")
        params = dict(urllib.parse.parse_qsl(body, keep_blank_values=True))
        headers = {k.lower(): v for k, v in request.headers.items()}
        url = public_url(
            self.settings, request.url.scheme, headers, request.url.path,
            request.scope.get("query_string", b"").decode("latin-1"),
        )  # fmt: skip
        call_sid = params.get("CallSid", "")[:64]
        if not _signature_ok(self.settings, url, params, headers.get("x-twilio-signature", "")):
            log.warning(
                "twilio signature rejected",
                extra={"path": VOICE_PATH, "call_sid": call_sid, "url": url.split("?")[0]},
            )
            return Response("forbidden\n", status_code=403, media_type="text/plain")
        agent_id = request.query_params.get("agent_id", "")[:128]
        if not agent_id or not await self.agent_exists(agent_id):
            log.warning(
                "twilio call for an unknown agent",
                extra={"agent_id": agent_id, "call_sid": call_sid},
            )
            return Response(tw.say_hangup_twiml(UNKNOWN_AGENT_SAY), media_type="text/xml")
        facts = {
            "agent_id": agent_id,
            "call_sid": call_sid,
            "from": params.get("From", ""),
            "to": params.get("To", ""),
            "direction": params.get("Direction", ""),
        }
        twiml = tw.connect_stream_twiml(
            stream_url(self.settings, request.url.scheme, headers), facts
        )
        log.info("twilio call answered", extra={"agent_id": agent_id, "call_sid": call_sid})
        return Response(twiml, media_type="text/xml")

    async def media(self, websocket: WebSocket) -> None:
        """``WS /twilio/media``: one call's Media Stream."""
        headers = {k.lower(): v for k, v in websocket.headers.items()}
        url = public_url(self.settings, websocket.url.scheme, headers, MEDIA_PATH, "")
        if not _signature_ok(self.settings, url, {}, headers.get("x-twilio-signature", "")):
            log.warning("twilio signature rejected", extra={"path": MEDIA_PATH})
            await websocket.close(1008)  # before accept: the upgrade is answered 403
            return
        await websocket.accept()
        await Call(websocket, self.runner).serve()


class _Hangup(Exception):
    """The call is over (the socket closed or Twilio said ``stop``)."""


class Call:
    """One Media Stream: the socket, the session, the playout and the call's log lines."""

    def __init__(self, websocket: WebSocket, runner: SessionRunner) -> None:
        self.ws = websocket
        self.runner = runner
        self.stream_sid = ""
        self.call_sid = ""
        self.agent_id = ""
        self.started = time.monotonic()
        self.reason = "socket_closed"
        self.turns = 0
        self.rejected = 0
        self.dtmf_messages = 0
        self.outbound: asyncio.Queue[str | None] = asyncio.Queue(maxsize=OUTBOUND_MESSAGES)
        self.playout: MarkedPlayout | None = None
        self.live: LiveSession | None = None
        self._hangup_echo = asyncio.Event()
        self._hanging_up = False
        self._end_call = asyncio.Event()
        self._digits: list[str] = []
        self._digit = asyncio.Event()
        self._over = asyncio.Event()

    def _ids(self, **more: Any) -> dict[str, Any]:
        return {
            "call_sid": self.call_sid, "stream_sid": self.stream_sid, "agent_id": self.agent_id,
            **({"session_id": self.live.session_id} if self.live is not None else {}), **more,
        }  # fmt: skip

    # -- the socket ------------------------------------------------------------------------

    def send(self, text: str) -> None:
        """Queue one message for Twilio (never blocks; a Twilio that does not read is dropped)."""
        try:
            self.outbound.put_nowait(text)
        except asyncio.QueueFull:
            if not self._over.is_set():
                log.warning("twilio not reading: call dropped", extra=self._ids())
                self.reason = "not_reading"
                self._over.set()

    async def _send_loop(self) -> None:
        while (text := await self.outbound.get()) is not None:
            try:
                await self.ws.send_text(text)
            except (WebSocketDisconnect, RuntimeError, OSError):
                self._over.set()
                return

    async def _receive(self) -> tw.InboundEvent | None:
        """The next well-formed message (a malformed one is logged and skipped)."""
        while True:
            try:
                message = await self.ws.receive()
            except (WebSocketDisconnect, RuntimeError, OSError):
                raise _Hangup from None
            if message["type"] == "websocket.disconnect":
                raise _Hangup
            text = message.get("text")
            if text is None:
                text = message.get("bytes") or b""
            try:
                return tw.decode(text)
            except tw.TwilioProtocolError as exc:
                self.rejected += 1
                log.warning(
                    "twilio message rejected",
                    extra=self._ids(code=exc.code, error=exc.message,
                                    event=exc.event or ""),
                )  # fmt: skip
                if exc.code == "unsupported_format" and not self.stream_sid:
                    # A stream whose audio cannot be heard or spoken: hang up at once rather
                    # than hold a silent call open until the start times out.
                    raise _Hangup from None

    async def _close(self) -> None:
        if self.ws.application_state is WebSocketState.CONNECTED:
            with contextlib.suppress(WebSocketDisconnect, RuntimeError, OSError, TimeoutError):
                async with asyncio.timeout(2.0):
                    await self.ws.close(1000)

    # -- the call --------------------------------------------------------------------------

    async def serve(self) -> None:
        try:
            start = await self._wait_start()
        except (_Hangup, TimeoutError):
            log.warning("twilio stream ended before start", extra=self._ids())
            await self._close()
            return
        self.stream_sid = start.stream_sid
        self.call_sid = start.call_sid
        self.agent_id = start.custom_parameters.get("agent_id", "")[:128]
        try:
            with self.runner.slot():
                await self._run(start)
        except SessionRefused as exc:
            self.reason = "refused"
            log.warning("twilio call refused", extra=self._ids(code=exc.code, error=exc.message))
        finally:
            await self._close()
            self._log_end()

    async def _wait_start(self) -> tw.Start:
        async with asyncio.timeout(START_TIMEOUT_S):
            while True:
                event = await self._receive()
                if isinstance(event, tw.Start):
                    return event
                if isinstance(event, tw.Stop):
                    raise _Hangup

    async def _bind(self) -> Any:
        if not self.agent_id:
            raise SessionRefused("agent_not_found", "the stream has no agent_id parameter")
        patch = ev.SessionPatch(keys=frozenset({"agent_id"}), agent_id=self.agent_id)
        spec = await self.runner.bind(patch)
        tools = spec.tools
        if all(t.name != END_CALL for t in tools):
            tools = (*tools, END_CALL_TOOL)
        await self.runner.engines.get()
        return dataclasses.replace(spec, input_format=PCMU, output_format=PCMU, tools=tools)

    def _make_playout(self, rate: int) -> MarkedPlayout:
        limits = self.runner.limits
        volume = self.live.spec.volume if self.live is not None else 100.0
        self.playout = MarkedPlayout(
            rate, encode=wire_encoder(PCMU, volume),
            send_audio=lambda payload: self.send(tw.media(self.stream_sid, payload)),
            send_mark=lambda name: self.send(tw.mark(self.stream_sid, name)),
            send_clear=lambda: self.send(tw.clear(self.stream_sid)),
            lead_ms=min(limits.output_lead_ms, 200), buffer_ms=limits.output_buffer_ms,
        )  # fmt: skip
        return self.playout

    async def _run(self, start: tw.Start) -> None:
        spec = await self._bind()
        principal = Principal(kind="key", owner="twilio:" + (start.account_sid or "unknown"))
        live = self.runner.start(
            spec,
            principal,
            self._on_event,
            playout=self._make_playout,
            observe=self._observe,
            log_context={"call_sid": self.call_sid, "stream_sid": self.stream_sid},
        )
        self.live = live
        self.started = time.monotonic()
        log.info("twilio call started", extra=self._ids())
        self.runner.attach(live)
        try:
            async with asyncio.TaskGroup() as tg:
                sender = tg.create_task(self._send_loop())
                session = tg.create_task(live.run())
                receiver = tg.create_task(self._receive_loop(live))
                keys = tg.create_task(self._dtmf_loop(live))
                hangup = tg.create_task(self._hang_up())
                over = tg.create_task(self._over.wait())
                done, _ = await asyncio.wait({session, receiver, over},
                                             return_when=asyncio.FIRST_COMPLETED)  # fmt: skip
                if session in done and session.result() == "expired":
                    self.reason = "expired"
                for task in (receiver, keys, over, hangup):
                    task.cancel()
                live.end()
                await session
                with contextlib.suppress(asyncio.QueueFull):
                    self.outbound.put_nowait(None)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(2.0):
                        await asyncio.shield(sender)
                sender.cancel()
        except* Exception:
            log.exception("twilio call failed", extra=self._ids())
            self.reason = "failed"
        finally:
            await self.runner.release(live, keep=False)

    async def _receive_loop(self, live: LiveSession) -> None:
        await live.wait_started()
        while True:
            try:
                event = await self._receive()
            except _Hangup:
                self.reason = self.reason if self._hanging_up else "socket_closed"
                return
            match event:
                case tw.Media(payload=payload, track=track):
                    if track in ("inbound", "inbound_track") and payload:
                        with contextlib.suppress(SessionRefused):  # faster than real time
                            live.handle(ev.InputAudio(audio=payload))
                case tw.Mark(name=name):
                    if name == HANGUP_MARK:
                        self._hangup_echo.set()
                    elif self.playout is not None:
                        self.playout.acknowledge(name)
                case tw.Dtmf(digit=digit):
                    self._digits.append(digit)
                    self._digit.set()
                case tw.Stop():
                    if not self._hanging_up:
                        self.reason = "caller_hangup"
                    return
                case tw.Start():
                    # One stream per socket: a second start changes nothing, and is counted.
                    self.rejected += 1
                    log.warning("twilio message rejected", extra=self._ids(
                        code="invalid_event", error="a second start on the same stream",
                        event="start",
                    ))  # fmt: skip
                case tw.Connected():
                    pass

    async def _dtmf_loop(self, live: LiveSession) -> None:
        """Digits become one ``DTMF: <digits>`` user message after ``#`` or a pause."""
        while True:
            await self._digit.wait()
            self._digit.clear()
            if self._digits and self._digits[-1] != "#":
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(DTMF_PAUSE_S):
                        while not self._digits or self._digits[-1] != "#":
                            self._digit.clear()
                            await self._digit.wait()
            digits, self._digits = "".join(self._digits), []
            self._digit.clear()
            if digits:
                self.dtmf_messages += 1
                live.handle(ev.ConversationMessage(role="user", content=f"DTMF: {digits}"))
                live.handle(ev.ReplyCreate())

    # -- session events ----------------------------------------------------------------------

    def _on_event(self, event: ev.ServerEvent) -> None:
        match event:
            case ev.ToolCall(name=name, call_id=call_id):
                if name == END_CALL and self.live is not None:
                    # Answered at once: the reply goes on to its end (the goodbye may still be
                    # in the TTS), and the hang-up follows the end of that reply.
                    self._hanging_up = True
                    self.reason = "agent_hangup"
                    with contextlib.suppress(SessionRefused):
                        self.live.handle(ev.ToolResult(call_id=call_id, result=END_CALL_RESULT))
                elif self.live is not None:
                    with contextlib.suppress(SessionRefused):
                        self.live.handle(ev.ToolResult(
                            call_id=call_id, result="this tool is not available on a phone call",
                            is_error=True,
                        ))  # fmt: skip
            case ev.SessionError(code=code):
                log.warning("twilio call session error", extra=self._ids(code=code))
            case ev.ReplyError(code=code):
                log.warning("twilio call reply error", extra=self._ids(code=code))
            case _:
                pass

    async def _hang_up(self) -> None:
        """The goodbye was played (the tool call comes after it): a mark, its echo, close."""
        await self._end_call.wait()
        if self.playout is not None:
            await self.playout.wait_for_playout()
        self.send(tw.mark(self.stream_sid, HANGUP_MARK))
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(HANGUP_ECHO_TIMEOUT_S):
                await self._hangup_echo.wait()
        self._over.set()

    def _observe(self, event: core.ConversationEvent) -> None:
        if isinstance(event, core.ReplyDone) and self._hanging_up:
            self._end_call.set()  # the reply that asked to hang up is over: its audio played
        if isinstance(event, core.TurnMetrics):
            self.turns += 1  # its "turn metrics" line is the session's, with the call's ids

    def _log_end(self) -> None:
        stats = self.playout.statistics() if self.playout is not None else None
        extra = self._ids(
            reason=self.reason,
            duration_ms=round((time.monotonic() - self.started) * 1000, 1),
            turns=self.turns,
            rejected_messages=self.rejected,
            dtmf_messages=self.dtmf_messages,
        )
        if stats is not None:
            extra.update(
                marks_sent=stats.marks_sent, marks_acknowledged=stats.marks_acknowledged,
                clears=stats.clears, played_ms=stats.played_samples // 8,
                pieces_sent=stats.pieces_sent, **pacing_fields(stats.lateness_ms),
            )  # fmt: skip
        log.info("twilio call over", extra=extra)
