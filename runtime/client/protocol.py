"""The client side of the Voice Agent protocol, as a pure state machine (no I/O).

Theory of operation
-------------------
:class:`ClientProtocol` holds everything a client must remember about one
session and applies the protocol's client-side rules; a thin asyncio adapter
(:mod:`runtime.client.connection`) moves text frames between it and a socket.
Inputs are method calls (:meth:`~ClientProtocol.connection_made`,
:meth:`~ClientProtocol.receive_text`, :meth:`~ClientProtocol.send_audio`,
:meth:`~ClientProtocol.submit_tool_result`, :meth:`~ClientProtocol.end`,
:meth:`~ClientProtocol.connection_lost`); outputs are pulled:
:meth:`~ClientProtocol.data_to_send` (JSON text frames, in order) and
:meth:`~ClientProtocol.events_received` (what the application acts on: the
server's events plus :class:`PlaybackFlush` and :class:`ToolResultDiscarded`).

The session's states and their only transitions::

    CONNECTING ──connection_made──▶ BINDING ──session.ready──▶ READY ──end()──▶ ENDING
        ▲                              │                         │                │
        │                              │ fatal error             │ socket lost    │ session.ended
        │                              ▼                         ▼                ▼
        └────────reconnect──────── DISCONNECTED ◀──────────── (resumable)       ENDED
                                       │ resume refused / window over
                                       ▼
                                     FAILED

The rules, from the protocol's lifecycle section:

* The first message is ``session.update`` (or ``session.resume`` with the
  session id on a new socket after a drop); audio is sent only once
  ``session.ready`` arrived — before that it is dropped and counted.
* Playback is flushed on ``input.speech.started`` (the user talks over the
  agent) and on a ``reply.done`` whose status is ``interrupted``.
* ``tool.result`` is sent only while a completed ``reply.done`` is the latest
  turn event (no ``reply.started`` or ``input.speech.started`` after it):
  results submitted earlier wait and go out with that ``reply.done``; results
  for a reply that ended ``interrupted`` are discarded.
* A ``session.error`` before ``session.ready`` fails the session at once with
  that error (the client sent one configuration; the server refused it).
* A socket closed after ``session.ended`` is the clean end; one closed
  without it (and without a fatal ``session.error`` or a 1008 policy close)
  is a network drop, resumable with ``session.resume`` while the server keeps
  the session (30 s).
"""

from __future__ import annotations

import enum
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal

from runtime.errors import VoiceAgentError
from runtime.protocol.events import (
    CLIENT_EVENT_TYPES,
    FATAL_CODES,
    ClientEvent,
    InputAudio,
    InputSpeechStarted,
    ProtocolError,
    ReplyDone,
    ReplyStarted,
    ServerEvent,
    SessionEnd,
    SessionEnded,
    SessionError,
    SessionPatch,
    SessionReady,
    SessionResume,
    SessionUpdate,
    ToolCall,
    ToolResult,
    UnknownServerEvent,
    decode_server_event,
    encode,
)

CLOSE_NORMAL: Final = 1000
CLOSE_POLICY: Final = 1008
CLOSE_INTERNAL: Final = 1011


class State(enum.Enum):
    CONNECTING = "connecting"
    BINDING = "binding"
    READY = "ready"
    ENDING = "ending"
    ENDED = "ended"
    DISCONNECTED = "disconnected"
    FAILED = "failed"


TRANSITIONS: Final[dict[State, frozenset[State]]] = {
    State.CONNECTING: frozenset({State.BINDING, State.FAILED, State.DISCONNECTED}),
    State.BINDING: frozenset(
        {State.READY, State.ENDING, State.ENDED, State.FAILED, State.DISCONNECTED}
    ),
    State.READY: frozenset({State.ENDING, State.ENDED, State.FAILED, State.DISCONNECTED}),
    State.ENDING: frozenset({State.ENDED, State.FAILED}),
    State.DISCONNECTED: frozenset({State.CONNECTING, State.FAILED}),
    State.ENDED: frozenset(),
    State.FAILED: frozenset(),
}


class InvalidState(VoiceAgentError):
    """A call that the session's current state does not allow (the caller's mistake)."""


class SessionFailure(VoiceAgentError):
    """The session is over without a clean end.

    Attributes:
        code: the server's ``session.error`` code (``agent_not_found``,
            ``unauthorized``, ``session_not_found`` …), or ``connection_closed``
            when the socket closed with no error to explain it.
        close_code: the WebSocket close code, when the socket closed.
    """

    def __init__(self, code: str, message: str, *, close_code: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.close_code = close_code


@dataclass(frozen=True, slots=True, kw_only=True)
class PlaybackFlush:
    """Drop the agent audio not yet played, now."""

    reason: Literal["speech_started", "interrupted"]
    reply_id: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class ToolResultDiscarded:
    """A tool result was not sent: its reply ended ``interrupted``."""

    call_id: str


AppEvent = ServerEvent | PlaybackFlush | ToolResultDiscarded


@dataclass(frozen=True, slots=True)
class ClientStatistics:
    """A snapshot of one session's counters.

    Attributes:
        audio_bytes_sent: input audio handed to the socket (wire encoding).
        audio_bytes_dropped: input audio dropped because the session was not
            ready (before ``session.ready``, or while reconnecting).
        resumes: successful ``session.resume`` round trips.
        ignored_messages: server messages skipped (unknown type or malformed).
    """

    audio_bytes_sent: int
    audio_bytes_dropped: int
    resumes: int
    ignored_messages: int


@dataclass(slots=True)
class _Pending:
    result: ToolResult
    reply_id: str | None


@dataclass(slots=True)
class _Counters:
    sent: int = 0
    dropped: int = 0
    resumes: int = 0
    ignored: int = 0


@dataclass(slots=True)
class ClientProtocol:
    """One Voice Agent session, seen from the client.

    Args:
        session: the first ``session.update`` payload (an ``agent_id`` bind or
            an inline configuration).

    Attributes:
        session_id, resume_token, expires_at, ready_config: from
            ``session.ready`` (the latest one, after a resume); ``ready_config``
            is the effective session configuration the server reported.
        error: why the session failed (set once the state is ``FAILED``, or with
            ``ENDED`` when the server ended it for a reason such as ``session_expired``).
        ended: the ``session.ended`` event of a clean end.
    """

    session: SessionPatch
    state: State = State.CONNECTING
    session_id: str | None = None
    resume_token: str | None = field(default=None, repr=False)
    expires_at: int | None = None
    ready_config: Mapping[str, Any] | None = None
    error: SessionFailure | None = None
    ended: SessionEnded | None = None
    _out: list[str] = field(default_factory=list)
    _events: list[AppEvent] = field(default_factory=list)
    _resuming: bool = False
    _fatal: SessionError | None = None
    _binding_error: SessionError | None = None
    _current_reply: str | None = None
    _done_is_latest: bool = False
    _calls: dict[str, str | None] = field(default_factory=dict)  # call_id -> reply_id
    _interrupted: set[str] = field(default_factory=set)
    _pending: list[_Pending] = field(default_factory=list)
    _counters: _Counters = field(default_factory=_Counters)
    _heard: bool = False  # a message came on this connection

    # -- inputs ------------------------------------------------------------------------------

    def connection_made(self) -> None:
        """A socket is open: queue ``session.update`` (or ``session.resume`` after a drop).

        Raises:
            InvalidState: not connecting.
        """
        if self.state is not State.CONNECTING:
            raise InvalidState(f"connection_made in state {self.state.value}")
        self._heard = False
        if self._resuming:
            assert self.session_id is not None
            self._send(SessionResume(session_id=self.session_id))
        else:
            self._send(SessionUpdate(session=self.session))
        self._to(State.BINDING)

    def reconnect(self) -> None:
        """Start a new connection attempt after a drop (the adapter is dialling again).

        Raises:
            InvalidState: the session is not disconnected.
        """
        if self.state is not State.DISCONNECTED:
            raise InvalidState(f"reconnect in state {self.state.value}")
        self._fatal = self._binding_error = None
        self._to(State.CONNECTING)

    def receive_text(self, text: str | bytes) -> None:
        """Take one server message.

        Malformed messages and unknown types are skipped and counted (a newer
        server may send events this client does not know); they never raise. Only the
        first message of a connection, before ``session.ready``, is held to more: one that
        no Voice Agent server sends (not a JSON event, or a client event sent back) fails
        the session as ``unreachable``: the socket is another kind of server's.
        """
        first = self.state is State.BINDING and not self._heard
        self._heard = True
        try:
            event = decode_server_event(text)
        except ProtocolError:
            if first and not _reads_as_an_event(text):
                self._not_voice_agent("not a JSON event")
                return
            self._counters.ignored += 1
            return
        if isinstance(event, UnknownServerEvent):
            if first and event.type in CLIENT_EVENT_TYPES:
                self._not_voice_agent(f"{event.type!r}, the client's own event sent back")
                return
            self._counters.ignored += 1
            return
        self._receive(event)

    def _not_voice_agent(self, what: str) -> None:
        # A Voice Agent server's first message is session.ready or an error: whatever answers
        # here is another kind of WebSocket server (an echo, a different protocol).
        self._fail(
            "unreachable",
            f"the server there is not a Voice Agent server: its first message was {what}",
        )

    def send_audio(self, data: bytes) -> bool:
        """Queue one chunk of input audio (already in the session's input encoding).

        Returns:
            ``True`` if queued; ``False`` if dropped because the session is not
            ready (before ``session.ready``, reconnecting, ending or over).
        """
        if self.state is not State.READY:
            self._counters.dropped += len(data)
            return False
        self._counters.sent += len(data)
        self._send(InputAudio(audio=data))
        return True

    def send(self, event: ClientEvent) -> None:
        """Queue another client event (``reply.create``, ``conversation.message``,
        a later ``session.update``, ``reply.cancel``).

        Raises:
            InvalidState: the session is not ready.
            ValueError: an event with its own method (audio, tool results,
                end, resume) or a first-update-only ``agent_id``.
        """
        if isinstance(event, InputAudio | ToolResult | SessionEnd | SessionResume):
            raise ValueError(f"use the dedicated method for {event.type}")
        if isinstance(event, SessionUpdate) and event.session.agent_id is not None:
            raise ValueError("agent_id is only allowed in the first session.update")
        if self.state is not State.READY:
            raise InvalidState(f"cannot send {event.type} in state {self.state.value}")
        self._send(event)

    def submit_tool_result(self, call_id: str, result: str, *, is_error: bool = False) -> None:
        """Answer a ``tool.call``, under the timing rule.

        Sent at once if a completed ``reply.done`` is the latest turn event;
        otherwise held until the next completed ``reply.done``; discarded (a
        :class:`ToolResultDiscarded` event) if the call's reply was interrupted.

        Raises:
            ValueError: no outstanding ``tool.call`` has this ``call_id``.
        """
        if call_id not in self._calls:
            raise ValueError(f"no outstanding tool call {call_id!r}")
        reply_id = self._calls.pop(call_id)
        if reply_id is not None and reply_id in self._interrupted:
            self._events.append(ToolResultDiscarded(call_id=call_id))
            return
        pending = _Pending(ToolResult(call_id=call_id, result=result, is_error=is_error), reply_id)
        if self._done_is_latest and self.state is State.READY:
            self._send(pending.result)
        else:
            self._pending.append(pending)

    def end(self) -> None:
        """Queue ``session.end`` (a clean end; the server answers ``session.ended``).

        A no-op when the session is already ending or over.
        """
        if self.state in (State.READY, State.BINDING):
            self._send(SessionEnd())
            self._to(State.ENDING)
        elif self.state in (State.CONNECTING, State.DISCONNECTED):
            self._fail("connection_closed", "the session ended while disconnected")

    def connection_lost(self, close_code: int | None = None, reason: str = "") -> None:
        """The socket closed (``close_code`` ``None``: no close frame, a network drop).

        Decides whether the session ended cleanly, failed, or may be resumed.
        """
        if self.state in (State.ENDED, State.FAILED):
            return
        self._out.clear()  # never replayed on a new socket
        fatal = self._fatal
        if fatal is None and self.state is State.BINDING:
            # Before session.ready any error explains the close (agent_timeout, invalid_config …).
            fatal = self._binding_error
        if fatal is not None:
            self._fail(fatal.code, fatal.message or fatal.code, close_code)
        elif self.state is State.ENDING:
            self._fail("connection_closed", "the connection closed before session.ended",
                       close_code)  # fmt: skip
        elif close_code == CLOSE_POLICY and self.session_id is None:
            # Bad or used credentials close 1008 before any session exists.
            message = reason or "the server refused the credentials (close 1008)"
            self._fail("unauthorized", message, close_code)
        elif close_code == CLOSE_POLICY:
            message = reason or "the server closed the session (1008)"
            self._fail("policy_violation", message, close_code)
        elif self.session_id is None:
            what = f"code {close_code}" if close_code is not None else "no close frame"
            message = f"the connection closed before session.ready ({what})"
            self._fail("connection_closed", message, close_code)
        else:
            self._resuming = True
            self._to(State.DISCONNECTED)

    def give_up(self, message: str, code: str = "resume_failed") -> None:
        """Stop trying to resume (the resume window is over, or the client closed)."""
        if self.state in (State.DISCONNECTED, State.CONNECTING, State.BINDING):
            self._fail(code, message)

    # -- outputs -----------------------------------------------------------------------------

    def data_to_send(self) -> list[str]:
        """The text frames to write, in order (each returned once)."""
        out, self._out = self._out, []
        return out

    def events_received(self) -> list[AppEvent]:
        """What the application should act on, in order (each returned once)."""
        events, self._events = self._events, []
        return events

    @property
    def resumable(self) -> bool:
        return self.state is State.DISCONNECTED

    def statistics(self) -> ClientStatistics:
        c = self._counters
        return ClientStatistics(c.sent, c.dropped, c.resumes, c.ignored)

    # -- internals ---------------------------------------------------------------------------

    def _to(self, state: State) -> None:
        if state not in TRANSITIONS[self.state]:
            raise InvalidState(f"{self.state.value} -> {state.value} is not a transition")
        self.state = state

    def _send(self, event: ClientEvent) -> None:
        self._out.append(encode(event))

    def _fail(self, code: str, message: str, close_code: int | None = None) -> None:
        self.error = SessionFailure(code, message, close_code=close_code)
        self._out.clear()
        self._pending.clear()
        self._to(State.FAILED)

    def _receive(self, event: ServerEvent) -> None:
        match event:
            case SessionReady():
                if self.state is not State.BINDING:
                    self._counters.ignored += 1
                    return
                if self._resuming:
                    self._counters.resumes += 1
                self._resuming = False
                self.session_id = event.session_id
                self.resume_token = event.resume_token or self.resume_token
                self.expires_at = event.expires_at
                self.ready_config = event.config or self.ready_config
                self._to(State.READY)
            case SessionEnded():
                self.ended = event
                if self._fatal is not None:
                    # Ended by the server for a reason (session_expired): over, not clean.
                    fatal = self._fatal
                    self.error = SessionFailure(fatal.code, fatal.message or fatal.code)
                if self.state is not State.ENDED:
                    self._to(State.ENDED)
            case SessionError() if event.code in FATAL_CODES:
                self._fatal = event
            case SessionError() if self.state is State.BINDING:
                # Before session.ready an error is the answer to this client's update (or
                # resume): the session cannot start, so it fails now with that error,
                # not later with the server's timeout.
                self._binding_error = event
                self._fail(event.code, event.message or event.code)
            case InputSpeechStarted():
                self._done_is_latest = False
                self._events.append(event)
                self._events.append(PlaybackFlush(reason="speech_started"))
                return
            case ReplyStarted():
                self._done_is_latest = False
                self._current_reply = event.reply_id
            case ToolCall():
                self._calls[event.call_id] = event.reply_id or self._current_reply
            case ReplyDone():
                self._events.append(event)
                self._reply_done(event)
                return
        self._events.append(event)

    def _reply_done(self, event: ReplyDone) -> None:
        reply_id = event.reply_id or self._current_reply
        if event.status in ("interrupted", "cancelled"):
            self._events.append(PlaybackFlush(reason="interrupted", reply_id=reply_id))
            if reply_id is not None:
                self._interrupted.add(reply_id)
            keep: list[_Pending] = []
            for p in self._pending:
                if p.reply_id is None or p.reply_id == reply_id:
                    self._events.append(ToolResultDiscarded(call_id=p.result.call_id))
                else:
                    keep.append(p)
            self._pending = keep
            self._done_is_latest = False
            return
        self._done_is_latest = True
        if self.state is State.READY:
            for p in self._pending:
                self._send(p.result)
            self._pending.clear()


def _reads_as_an_event(text: str | bytes) -> bool:
    """Whether ``text`` is a JSON object with a string ``type`` (a Voice Agent message's shape)."""
    try:
        doc = json.loads(text)
    except ValueError:
        return False
    return isinstance(doc, dict) and isinstance(doc.get("type"), str)
