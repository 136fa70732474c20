"""A live session: one conversation core, its tasks, and core events rendered as
Voice Agent protocol events."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import itertools
import logging
import re
import secrets as pysecrets
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, Literal, Protocol

from audio.frame import AudioFrame
from runtime.conversation import events as core
from runtime.conversation.session import ConversationSession
from runtime.conversation.sinks import AudioSink
from runtime.llm.client import ChatClient
from runtime.llm.fallback import FallbackChatClient
from runtime.protocol import events as ev
from runtime.sessions.errors import SessionRefused
from runtime.sessions.ingress import AudioIngress
from runtime.sessions.playout import PacedSink, pacing_fields, wire_encoder
from runtime.sessions.resume import LEASE_RENEW_S, LEASE_S, ResumableState
from runtime.sessions.spec import SessionSpec

if TYPE_CHECKING:
    from runtime.sessions.runner import SessionRunner

log = logging.getLogger("voxloop.session")

Emit = Callable[[ev.ServerEvent], None]

ENDPOINT_MESSAGES: Final[dict[str, str]] = {
    "connect": "the agent's endpoint cannot be reached",
    "tls": "the agent's endpoint failed the TLS handshake",
    "auth": "the agent's endpoint refused its credentials",
    "rate_limit": "the agent's endpoint is rate limiting",
    "rejected": "the agent's endpoint rejected the request",
    "server": "the agent's endpoint failed",
    "timeout": "the agent's endpoint did not answer in time",
    "stall": "the agent's endpoint stopped streaming",
    "malformed": "the agent's endpoint sent a stream that cannot be read",
    "dropped": "the agent's endpoint dropped the connection",
    "error": "the agent's endpoint failed",
}
"""What the client of a stored agent reads in ``reply.error.message``, by ``code``: never the
endpoint's own words (see the server log for those)."""


def redact(text: str, secret: str | None, limit: int = 300) -> str:
    """``text`` without ``secret`` in the forms an echoing endpoint may give it: as is,
    base64 (standard or URL-safe, with or without padding), reversed, or spaced out;
    and cut to ``limit`` characters."""
    if secret and len(secret) >= 4:
        raw = secret.encode()
        forms = {secret, secret[::-1], base64.b64encode(raw).decode(),
                 base64.urlsafe_b64encode(raw).decode()}  # fmt: skip
        forms |= {f.rstrip("=") for f in forms}
        for form in sorted(forms, key=len, reverse=True):
            text = text.replace(form, "[redacted]")
        spaced = r"\W{0,3}".join(re.escape(c) for c in secret)
        text = re.sub(spaced, "[redacted]", text)
    return text if len(text) <= limit else text[: limit - 1] + "…"


#: ``handoff``: a draining worker closed the socket; the state is kept for a resume.
EndReason = Literal["ended", "expired", "dropped", "handoff"]


class Playout(AudioSink, Protocol):
    """A sink the session runs (:meth:`run` sends its audio) and asks how much is unplayed.

    The same interface for the WebSocket's paced sink and the phone's
    mark-acknowledged playout: :meth:`pause` stops the audio where the listener
    is (what was heard stays in ``played_samples``), :meth:`resume` plays the
    rest from there, :meth:`~AudioSink.clear_buffer` drops it.
    """

    @property
    def queued_samples(self) -> int: ...

    @property
    def paused(self) -> bool: ...

    def pause(self) -> None: ...

    def resume(self) -> None: ...

    async def run(self) -> None: ...


#: Makes the session's playout instead of the paced ``reply.audio`` sink (the phone's
#: mark-acknowledged playout); gets the output rate.
PlayoutFactory = Callable[[int], Playout]
#: Sees every core event (metrics, logs), after the session has rendered it.
Observer = Callable[[core.ConversationEvent], None]


@dataclass(slots=True)
class _ProtoReply:
    """The protocol's view of one core reply (split in two around a client tool call)."""

    core_id: str
    reply_id: str
    item_id: str
    samples: int = 0  # written to the sink (the timeline of the deltas)
    sent: int = 0  # sent to the client
    delta_end_ms: int = 0
    texts: list[str] = field(default_factory=list)
    closed: bool = False  # reply.done sent for this part (a tool call is pending)
    spoken_before: list[str] = field(default_factory=list)


class LiveSession:
    """One running conversation. Create with :meth:`SessionRunner.start`.

    Call :meth:`run` in a task; feed client events with :meth:`handle`;
    end it with :meth:`end` (``session.end``) or by cancelling :meth:`run`
    (a dropped socket: the state is kept for a resume).
    """

    def __init__(
        self,
        runner: SessionRunner,
        *,
        session_id: str,
        spec: SessionSpec,
        owner: str,
        started_at: float,
        expires_at: float,
        history: list[dict[str, Any]] | None,
        audio_seconds: float,
        emit: Emit,
        playout: PlayoutFactory | None = None,
        observe: Observer | None = None,
        log_context: Mapping[str, str] | None = None,
    ) -> None:
        self.runner = runner
        self.session_id = session_id
        self.spec = spec
        self.owner = owner
        self.started_at = started_at
        self.expires_at = expires_at
        self._prior_history = history
        self._audio_before = audio_seconds
        self._emit = emit
        self._make_playout = playout
        self._observe = observe
        self._log_context = dict(log_context or {})
        self._turns_logged = 0
        self.resume_token = "rt_" + pysecrets.token_urlsafe(24)
        self._ingress = AudioIngress(spec.input_format, runner.limits.input_buffer_ms)
        self._encode = wire_encoder(spec.output_format, spec.volume)
        self._session: ConversationSession | None = None
        self._llm: ChatClient | FallbackChatClient | None = None
        self._ended = asyncio.Event()
        self._started = asyncio.Event()
        self._end_reason: EndReason = "dropped"
        self._finish_after_reply = False
        self._unanswered: str | None = None  # the user's last words, until their reply is done
        self._replies: dict[str, _ProtoReply] = {}
        self._ids = itertools.count(1)
        self._user_item: str | None = None
        self._last_user_item: str | None = None  # of the last transcript.user sent
        self._early_results: list[ev.ToolResult] = []
        self._pending_calls: dict[str, str] = {}  # call_id -> core reply id
        self._last_violation = -1.0
        self._tg: asyncio.TaskGroup | None = None
        self._sink: Playout | None = None
        self._speaking: _ProtoReply | None = None
        self._speaking_core: str | None = None  # the core's id of the reply being spoken
        self._item_ids = itertools.count(1)
        self._cancelled: set[str] = set()

    # -- lifecycle ------------------------------------------------------------------

    @property
    def audio_seconds(self) -> float:
        return self._audio_before + self._ingress.received_seconds

    async def run(self) -> EndReason:
        """Run until the session ends, expires, or is cancelled (dropped).

        Returns:
            Why it stopped: ``ended`` (``session.end``), ``expired``.
        """
        # A resume arriving at another worker waits for this session's release (or for
        # the lease, renewed while the session runs here, to lapse: this worker died).
        await self.runner.states.running(self.session_id, LEASE_S)
        stt, tts = await self.runner.engines.get()
        assert self.spec.llm is not None
        self._llm = self.runner.chat_client(*self.spec.endpoints, max_tokens=self.spec.max_tokens)
        sink: Playout
        if self._make_playout is not None:
            sink = self._make_playout(self.spec.output_format.sample_rate)
        else:
            sink = PacedSink(
                self.spec.output_format.sample_rate, self.runner.limits.output_lead_ms,
                self._on_audio, tag=lambda: self._speaking,
                buffer_ms=self.runner.limits.output_buffer_ms,
            )  # fmt: skip
        self._sink = sink
        config = self.runner.core_config(self.spec)
        if self._prior_history is not None:
            config = dataclasses.replace(config, greeting=None)  # already spoken
        session = ConversationSession(
            config=config, llm=self._llm, stt=stt, tts=tts, sink=sink,
            on_event=self._on_core_event, tool_policy=self.runner.policy,
            tool_resolver=self.runner.resolver, prior_history=self._prior_history or (),
        )  # fmt: skip
        self._session = session
        try:
            async with asyncio.TaskGroup() as tg:
                self._tg = tg
                conversation = tg.create_task(session.run(self._frames()))
                pacer = tg.create_task(sink.run())
                lease = tg.create_task(self._hold_lease())
                remaining = self.expires_at - time.time()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(max(0.0, remaining)):
                        await self._ended.wait()
                if not self._ended.is_set():
                    self._end_reason = "expired"
                conversation.cancel()
                pacer.cancel()
                lease.cancel()
        finally:
            self._tg = None
            await self._llm.aclose()
        return self._end_reason

    def pacing(self) -> dict[str, float]:
        """How late the agent's audio left against real time: ``pacing_p50_ms``,
        ``pacing_p99_ms``, ``pacing_max_ms``, and ``underrun_ms``, the silence inside
        replies whose audio came late (empty before any audio, or with a playout
        other than the paced sink)."""
        if isinstance(self._sink, PacedSink):
            fields = pacing_fields(self._sink.lateness_ms)
            return fields | {"underrun_ms": round(self._sink.underrun_ms, 1)} if fields else {}
        return {}

    async def _hold_lease(self) -> None:
        # Renews the mark that the session runs here until cancelled (the session stops).
        if not self.runner.checkpoints:
            return
        while True:
            await asyncio.sleep(LEASE_RENEW_S)
            await self.runner.renew_lease(self)

    async def wait_started(self) -> None:
        """Wait until the conversation runs (client events may be handled from then on)."""
        await self._started.wait()

    async def _frames(self) -> AsyncIterator[AudioFrame]:
        # The core asks for the first frame once it runs (history begun, greeting started).
        self._started.set()
        prior = self._prior_history or []
        if prior and prior[-1].get("role") == "user" and self._session is not None:
            # Resumed after the user's last words were kept but before they were answered
            # (the worker that heard them went away): answer them now.
            self._session.create_reply()
        async for frame in self._ingress.frames():
            yield frame

    def end(self) -> None:
        """``session.end``: stop now; the state is not kept (a no-op once stopping)."""
        if self._ended.is_set():
            return
        self._end_reason = "ended"
        self._ended.set()

    def finish_after_reply(self) -> None:
        """End (as :meth:`end`) once the reply being spoken is done, or now if none is."""
        self._finish_after_reply = True
        if self._speaking is None:
            self.end()

    def hand_off(self) -> None:
        """Stop now and keep the state: the client resumes on another worker."""
        if not self._ended.is_set():
            self._end_reason = "handoff"
            self._ended.set()

    def history(self) -> list[dict[str, Any]]:
        """The conversation so far, with the user's last words while their reply is pending."""
        if self._session is not None:
            messages = [dict(m) for m in self._session.history]
        else:
            messages = list(self._prior_history or [])
        if self._unanswered and messages[-1:] != [{"role": "user", "content": self._unanswered}]:
            messages.append({"role": "user", "content": self._unanswered})
        return messages

    def snapshot(self) -> ResumableState:
        """The state to keep for a resume (secrets sealed)."""
        return self.runner.seal_state(self)

    # -- client events ----------------------------------------------------------------

    def handle(self, event: ev.ClientEvent) -> None:
        """Apply one client event (after ``session.ready``).

        Raises:
            SessionRefused: a rule of the session was broken (``agent_id_not_first``,
                ``immutable_field``, ``invalid_config`` …); the session goes on.
        """
        session = self._session
        match event:
            case ev.InputAudio(audio=audio):
                if self._ingress.feed(audio):
                    now = time.monotonic()
                    if now - self._last_violation >= 1.0:
                        self._last_violation = now
                        raise SessionRefused(
                            "audio_rate_violation",
                            "audio is arriving faster than real time; the oldest was dropped",
                            param="audio",
                        )
            case ev.SessionUpdate(session=patch):
                self._update(patch)
            case ev.ReplyCreate(instructions=instructions):
                if session is not None:
                    session.create_reply(instructions)
            case ev.ConversationMessage(role=role, content=content):
                if session is not None:
                    session.add_message(role, content)
            case ev.ToolResult() as result:
                self._tool_result(result)
            case ev.ReplyCancel(reply_id=reply_id):
                self._cancel_reply(reply_id)
            case ev.SessionEnd():
                self.end()
            case ev.SessionResume():
                raise SessionRefused(
                    "invalid_format", "session.resume must be the first message", param="type"
                )

    def _cancel_reply(self, reply_id: str | None) -> None:
        current = [r for r in self._replies.values() if not r.closed]
        if reply_id is not None and all(r.reply_id != reply_id for r in current):
            raise SessionRefused(
                "invalid_value", f"reply {reply_id[:64]!r} is not in progress", param="reply_id"
            )
        if self._session is not None and self._session.cancel_reply():
            # Every reply the core still runs, a part closed for a client tool call included
            # (it waits for the result): its end is reported as cancelled.
            self._cancelled.update(self._replies)
        elif not current:
            # Nothing to stop (it ended, or never started): said, not silently dropped.
            raise SessionRefused("invalid_value", "no reply is in progress", param="type")

    def _update(self, patch: ev.SessionPatch) -> None:
        if patch.agent_id is not None:
            raise SessionRefused(
                "agent_id_not_first", "agent_id may only be sent in the first session.update",
                param="session.agent_id",
            )  # fmt: skip
        if (name := self.spec.immutable_change(patch)) is not None:
            raise SessionRefused(
                "immutable_field", f"{name} cannot change after session.ready", param=name
            )
        if patch.llm is not None:
            raise SessionRefused(
                "immutable_field", "session.llm cannot change after session.ready",
                param="session.llm",
            )  # fmt: skip
        spec = self.spec.apply(patch)
        if spec.voice != self.spec.voice:
            spec = self.runner.resolve_voice(spec, "invalid_value")
        self.spec = spec
        if patch.input is not None and patch.input.format is not None:
            self._ingress.set_format(spec.input_format)
        self._encode = wire_encoder(spec.output_format, spec.volume)
        if self._session is not None:
            config = self.runner.core_config(spec)
            self._session.reconfigure(
                dataclasses.replace(config, greeting=self._session.config.greeting)
            )
        self._emit(ev.SessionUpdated(config=spec.public()))

    def _tool_result(self, result: ev.ToolResult) -> None:
        core_id = self._pending_calls.get(result.call_id)
        if core_id is None:
            raise SessionRefused(
                "invalid_value", f"no tool call {result.call_id!r} is waiting for a result",
                param="call_id",
            )  # fmt: skip
        reply = self._replies.get(core_id)
        if reply is not None and not reply.closed:
            # Sent before reply.done: held until the reply's part is over.
            self._early_results.append(result)
            return
        self._submit(result)

    def _submit(self, result: ev.ToolResult) -> None:
        self._pending_calls.pop(result.call_id, None)
        if self._session is not None:
            self._session.submit_tool_result(
                result.call_id, result.result, is_error=result.is_error
            )

    # -- core events -> protocol events ---------------------------------------------

    def _new_id(self, prefix: str) -> str:
        counter = self._item_ids if prefix == "item" else self._ids
        return f"{prefix}_{self.session_id[-6:]}_{next(counter)}"

    def _reply(self, core_id: str) -> _ProtoReply:
        reply = self._replies.get(core_id)
        if reply is None:
            reply = _ProtoReply(core_id, self._new_id("reply"), self._new_id("item"))
            self._replies[core_id] = reply
        return reply

    def _reopen(self, reply: _ProtoReply) -> None:
        # The answer continues after a tool result: a new protocol reply.
        reply.spoken_before += reply.texts
        reply.texts = []
        reply.reply_id = self._new_id("reply")
        reply.item_id = self._new_id("item")
        reply.samples = 0
        reply.sent = 0
        reply.delta_end_ms = 0
        reply.closed = False
        self._emit(ev.ReplyStarted(reply_id=reply.reply_id, item_id=reply.item_id))

    def _on_audio(self, pcm: bytes, reply: _ProtoReply | None) -> None:
        if reply is None:
            return
        reply.sent += len(pcm) // 2
        self._emit(ev.ReplyAudio(data=self._encode(pcm), reply_id=reply.reply_id))

    def _on_core_event(self, event: core.ConversationEvent) -> None:
        self._render(event)
        self.runner.metrics.observe(self.spec.agent_id, event)
        if self.runner.tracer is not None:
            self.runner.tracer.observe(self.session_id, self.spec.agent_id, event)
        if self._observe is not None:
            self._observe(event)
        if isinstance(event, core.UserTranscript):
            self._unanswered = event.text
        elif isinstance(event, core.ReplyDone):
            self._unanswered = None
        kept = self._tg is not None and self.runner.checkpoints
        if isinstance(event, core.UserTranscript) and kept and self._tg is not None:
            # The user's words are kept before the reply exists: a worker that dies now
            # leaves them to be answered on the next one.
            self._tg.create_task(self.runner.checkpoint(self))
        if isinstance(event, core.ReplyDone):
            if self._finish_after_reply:
                self.end()
            elif self._tg is not None and self.runner.checkpoints:
                # After each reply the state is kept where other workers can read it, so
                # a worker that dies (no release) leaves its sessions resumable elsewhere.
                self._tg.create_task(self.runner.checkpoint(self))

    def _render(self, event: core.ConversationEvent) -> None:
        emit = self._emit
        match event:
            case core.SpeechStarted(continued=continued):
                # The user went on with the turn just transcribed: its item is replaced.
                reuse = self._last_user_item if continued else None
                self._user_item = reuse or self._new_id("item")
                emit(ev.InputSpeechStarted())
            case core.SpeechStopped():
                emit(ev.InputSpeechStopped())
            case core.UserTranscriptDelta(text=text):
                emit(ev.TranscriptUserDelta(text=text, item_id=self._user_item))
            case core.UserTranscript(text=text, item_id=item_id):
                self._last_user_item = self._user_item or item_id
                emit(ev.TranscriptUser(text=text, item_id=self._last_user_item))
                self._user_item = None
            case core.ReplyStarted(reply_id=core_id):
                reply = self._reply(core_id)
                self._speaking, self._speaking_core = reply, core_id
                emit(ev.ReplyStarted(reply_id=reply.reply_id, item_id=reply.item_id))
            case core.ReplyAudio(reply_id=core_id, pcm=pcm):
                # Written to the sink, which sends it paced (_on_audio).
                reply = self._reply(core_id)
                if reply.closed:
                    self._reopen(reply)
                reply.samples += len(pcm) // 2
            case core.AgentTranscriptDelta(reply_id=core_id, delta=delta):
                reply = self._reply(core_id)
                if reply.closed:
                    self._reopen(reply)
                rate = self.spec.output_format.sample_rate
                end_ms = reply.samples * 1000 // rate
                reply.texts.append(delta)
                emit(ev.TranscriptAgentDelta(
                    delta=delta, reply_id=reply.reply_id, item_id=reply.item_id,
                    start_ms=reply.delta_end_ms, end_ms=end_ms,
                ))  # fmt: skip
                reply.delta_end_ms = end_ms
            case core.ToolCallRequested(reply_id=core_id, call_id=call_id, name=name,
                                        arguments=arguments):  # fmt: skip
                self._pending_calls[call_id] = core_id
                if self._tg is not None:
                    self._tg.create_task(self._close_for_tool(core_id, call_id, name, arguments))
            case core.AgentTranscript(reply_id=core_id, text=text, interrupted=interrupted):
                reply = self._reply(core_id)
                if reply.closed:
                    if not interrupted:
                        return  # nothing was said after the tool result
                    self._reopen(reply)
                before = " ".join(reply.spoken_before)
                if before and text.startswith(before):
                    text = text[len(before) :].strip()
                emit(ev.TranscriptAgent(
                    text=text, reply_id=reply.reply_id, item_id=reply.item_id,
                    interrupted=interrupted,
                ))  # fmt: skip
            case core.ReplyDone(reply_id=core_id, status=status):
                done = self._replies.pop(core_id, None) or self._reply(core_id)
                if core_id == self._speaking_core:  # nothing is being spoken now
                    self._speaking, self._speaking_core = None, None
                self._replies.pop(core_id, None)
                if done.closed and status == "completed":
                    return
                if status == "interrupted" and core_id in self._cancelled:
                    self._cancelled.discard(core_id)
                    emit(ev.ReplyDone(reply_id=done.reply_id, status="cancelled"))
                else:
                    emit(ev.ReplyDone(reply_id=done.reply_id, status=status))
                if status == "interrupted":
                    # Results for an interrupted reply are dropped (the call is over).
                    for call_id, owner in list(self._pending_calls.items()):
                        if owner == core_id:
                            del self._pending_calls[call_id]
                    self._early_results = [
                        r for r in self._early_results if r.call_id in self._pending_calls
                    ]
            case core.ReplyError(reply_id=core_id, code=code, message=message,
                                 retryable=retryable, status_code=status_code):  # fmt: skip
                reply = self._reply(core_id)
                if self.spec.agent_id is not None:
                    # A stored agent's endpoint is the operator's: its words (which may
                    # echo its key) go to the operator's log, the client gets the kind.
                    said = message
                    for entry in self.spec.endpoints:
                        if entry.api_key is not None:
                            said = redact(said, entry.api_key.reveal())
                    log.warning("endpoint error", extra={
                        "session_id": self.session_id, "agent_id": self.spec.agent_id,
                        "code": code, "status": status_code or 0, "error": said,
                    })  # fmt: skip
                    message = ENDPOINT_MESSAGES.get(code, ENDPOINT_MESSAGES["error"])
                emit(ev.ReplyError(
                    reply_id=reply.reply_id, code=code, message=message, retryable=retryable,
                    status_code=status_code,
                ))  # fmt: skip
            case core.TurnMetrics() as metrics:
                # Which llm entry answered and why others were skipped, with the latencies
                # (never the words: user and agent text stay out of the log).
                fields = {k: v for k, v in metrics.to_json().items()
                          if k not in ("user_text", "agent_text") and v is not None}  # fmt: skip
                self._turns_logged += 1
                log.info("turn metrics", extra={
                    "session_id": self.session_id, "agent_id": self.spec.agent_id or "inline",
                    **self._log_context, "turn": self._turns_logged, **fields,
                })  # fmt: skip

    async def _close_for_tool(
        self, core_id: str, call_id: str, name: str, arguments: dict[str, Any]
    ) -> None:
        """Finish the reply's first part once its transition phrase has been played.

        The core asks for the tool as soon as the model's round ends, while
        the phrase before the call may still be in the TTS. Once no audio has
        arrived for a moment and the sink has played what it admitted, the
        part ends: ``transcript.agent`` → ``tool.call`` → ``reply.done``.
        """
        reply = self._replies.get(core_id)
        if reply is None:
            return
        sink = self._sink
        quiet = 0
        last = reply.samples
        while quiet < 3:
            await asyncio.sleep(0.05)
            if core_id not in self._replies:
                return  # interrupted meanwhile
            queued = sink.queued_samples if sink is not None else 0
            if reply.samples == last and queued == 0:
                quiet += 1
            else:
                quiet = 0
                last = reply.samples
        self._emit(ev.TranscriptAgent(
            text=" ".join(reply.texts), reply_id=reply.reply_id, item_id=reply.item_id,
            interrupted=False,
        ))  # fmt: skip
        self._emit(ev.ToolCall(
            call_id=call_id, name=name, arguments=arguments, reply_id=reply.reply_id
        ))  # fmt: skip
        self._emit(ev.ReplyDone(reply_id=reply.reply_id, status="completed"))
        reply.closed = True
        early = [r for r in self._early_results if r.call_id == call_id]
        self._early_results = [r for r in self._early_results if r.call_id != call_id]
        for result in early:
            self._submit(result)
