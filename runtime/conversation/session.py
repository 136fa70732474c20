"""The conversation core: orchestration between the turn-taking policy, the engines and the history.

Theory of operation
-------------------
:meth:`ConversationSession.run` consumes 16 kHz mono frames (a microphone, a
file paced in real time, a telephony bridge) and owns every task it starts in
one ``TaskGroup``. Per 20 ms frame, synchronously: the VAD decides speech or
not, and the turn-taking policy (:mod:`runtime.conversation.policy`, pure)
turns that into decisions the session carries out:

* ``StartTurn``: a user turn begins; its audio (with a short pre-roll) goes to
  a new STT turn.
* ``Pause`` / ``Resume``: the STT decodes what was said so far and, when
  ``speculative``, a reply starts on that transcript with its audio held
  back; if the user goes on, it is cancelled.
* ``Speculate`` (``speculate_ms``, before ``Pause``): the STT decodes what was
  said so far for the speculative reply alone, which starts on it at once.
  The end of turn still reads the decode at ``Pause``: when that one reads
  otherwise, the reply is started again on it.
* ``EndTurn``: the final transcript either confirms the speculative reply
  (its audio is released at once) or a new reply starts.
* ``ContinueTurn``: the user went on before the reply was audible (a pause
  mid-sentence ended the turn): the reply is withdrawn (nothing of it enters
  the history) and the turn's audio, from its first frame, is transcribed
  again with what follows, as one user message.
* ``CheckBurst``: speech while the agent replies is transcribed (everything
  since the burst began) and the policy re-decides as it grows.
* ``HoldReply``: the user started speaking over the reply: the sink pauses at
  once (what was played stays heard, the rest is held) while the burst is
  decided. ``ReleaseReply`` (a back-channel, a cough, noise): the sink plays
  the held reply on from where it paused; the reply is the same reply.
* ``Interrupt``: the reply task is cancelled: the HTTP stream closes, TTS
  stops, the sink's buffer is cleared, and the history keeps only the text
  that was actually played (from the sink's playout position). The burst's
  audio, from its first frame, is the next user turn.
* A reply that ends while the user is still talking (or, without
  ``interrupt_response``, after they spoke over it) hands their speech over as
  the next turn: no word is dropped.

The states of :mod:`runtime.conversation.turns` follow these decisions; the
history (:mod:`runtime.conversation.history`) is written in one place.

Endpoint failures never end the session: the client retries before the first
token; after that (or when retries are exhausted) a short apology is spoken,
a :class:`ReplyError` is emitted and the session goes back to listening.

Every event carries a timestamp from the injected clock; per-turn metrics
(``stt_final_ms``, ``ttft_ms``, ``first_sentence_ms``, ``tts_first_audio_ms``,
``v2v_ms``, ``overhead_ms``) come from the same instrumentation.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Any, Final, Literal

from audio.frame import AudioFrame
from audio.reframe import Reframer
from audio.vad import VAD, default_vad, frame_level_db
from runtime.clock import Clock, MonotonicClock, ns_to_ms
from runtime.conversation.config import SPOKEN_GUIDANCE, SessionConfig, TurnDetection
from runtime.conversation.events import (
    ConversationEvent,
    SpeechStarted,
    SpeechStopped,
    ToolCallRequested,
    TurnMetrics,
    UserTranscript,
    UserTranscriptDelta,
)
from runtime.conversation.history import History
from runtime.conversation.policy import (
    FRAME_MS,
    BackChannel,
    CheckBurst,
    ContinueTurn,
    Decision,
    EndTurn,
    HoldReply,
    Interrupt,
    Pause,
    ReleaseReply,
    Resume,
    Speculate,
    StartTurn,
    TurnTakingPolicy,
    classify,
    is_backchannel,
    same_words,
)
from runtime.conversation.reply import Reply, ReplyRunner
from runtime.conversation.sinks import AudioSink
from runtime.conversation.tools import ToolRunner
from runtime.conversation.turns import TurnState, TurnStateMachine
from runtime.endpoints import Resolver, URLPolicy
from runtime.errors import EndpointError
from runtime.llm.client import ChatClient
from runtime.llm.fallback import FallbackChatClient
from runtime.speech.stt import SpeechToText, STTTurn, Transcript
from runtime.speech.tts import TextToSpeech, warm_up

__all__ = ["FRAME_MS", "RATE", "ConversationSession", "EventHook", "SpeechGate", "is_backchannel"]

log = logging.getLogger("voxloop.session")

RATE: Final = 16000
_KEEP_MS: Final = 60_000  # input audio kept for turns and bursts (bounded)
_AUDIBLE_DBFS: Final = -55.0

EventHook = Callable[[ConversationEvent], None]


def early_decode_budget_ms(td: TurnDetection) -> float:
    """The longest a decode may take for the early one (``speculate_ms``) to be worth it.

    The early decode must not change what the end of turn reads when it reads it: the
    pause's decode, queued behind it, must still start on time (``pause_ms -
    speculate_ms``), or at least be done by the first end-of-turn check
    (``min_silence_ms``: ``speculate_ms`` plus both decodes).
    """
    early = td.speculate_ms or 0
    return max(td.pause_ms - early, (td.min_silence_ms - early) / 2)


class SpeechGate:
    """The per-frame speech decision the policy is fed.

    A frame is speech when the VAD's probability reaches ``threshold`` (0.15
    lower while speech goes on, so word endings hold) and the frame is audible
    (at least -55 dBFS: a voice's decaying tail is not speech for turn-taking;
    the VAD's own hangover would add ~60-80 ms to every turn).
    """

    __slots__ = ("_in_speech", "_threshold", "vad")

    def __init__(self, vad: VAD, threshold: float) -> None:
        self.vad = vad
        self._threshold = threshold
        self._in_speech = False

    def is_speech(self, pcm: bytes) -> bool:
        """Whether one 20 ms, 16 kHz PCM16 frame is speech."""
        p = self.vad.speech_probability(pcm)
        threshold = self._threshold - (0.15 if self._in_speech else 0.0)
        audible = frame_level_db(pcm) >= _AUDIBLE_DBFS
        self._in_speech = p >= threshold and p > 0.0 and audible
        return self._in_speech


class ConversationSession:
    """One conversation.

    Args:
        config: prompt, greeting, voice, tools and turn detection.
        llm: the endpoint client (prewarmed at start).
        stt, tts: speech engines.
        sink: where agent audio is played (reports its playout position).
        on_event: receives every event, synchronously (must not block).
        vad: 16 kHz, 20 ms VAD (default: webrtcvad behind the noise gate).
        clock: the session clock.
        tool_policy, tool_resolver: URL policy for HTTP tools.
        prior_history: messages of an earlier part of this conversation (a
            resumed session); the system prompt is this session's own.
        policy: the turn-taking policy (default: one built from ``config.turn_detection``).
    """

    def __init__(
        self,
        *,
        config: SessionConfig,
        llm: ChatClient | FallbackChatClient,
        stt: SpeechToText,
        tts: TextToSpeech,
        sink: AudioSink,
        on_event: EventHook,
        vad: VAD | None = None,
        clock: Clock | None = None,
        tool_policy: URLPolicy | None = None,
        tool_resolver: Resolver | None = None,
        prior_history: Sequence[Mapping[str, Any]] = (),
        policy: TurnTakingPolicy | None = None,
    ) -> None:
        self.config = config
        self._llm = llm
        self._stt = stt
        self._tts = tts
        self._sink = sink
        self._emit_hook = on_event
        td = config.turn_detection
        self._vad = vad or default_vad(RATE, FRAME_MS, td.vad_threshold)
        if self._vad.frame_samples != RATE * FRAME_MS // 1000:
            raise ValueError("the session's VAD must take 20 ms frames at 16 kHz")
        self._gate = SpeechGate(self._vad, td.vad_threshold)
        self._own_vad = vad is None
        self._clock = clock or MonotonicClock()
        self._tools = ToolRunner(
            config.tools, on_client_call=self._client_tool_call, policy=tool_policy,
            resolver=tool_resolver,
        )  # fmt: skip
        self.policy = policy or TurnTakingPolicy(td)
        self.turns = TurnStateMachine()
        self._history = History()
        prior = [dict(m) for m in prior_history]
        self._prior_history = prior[1:] if prior and prior[0].get("role") == "system" else prior
        self._reframer = Reframer(RATE, FRAME_MS)
        self._tg: asyncio.TaskGroup | None = None
        self._ids = itertools.count(1)
        self._audio: deque[AudioFrame] = deque(maxlen=_KEEP_MS // FRAME_MS)
        self._stt_turn: STTTurn | None = None
        self._turn_deferred = False
        self._turn_seq = 0
        self._carry: list[str] = []  # words of turns the user went on from before a reply
        self._superseded: set[int] = set()  # turns continued after their end (ContinueTurn)
        self._sent_item: tuple[int, str] | None = None  # (turn, item id) of the last transcript
        self._continued_item: str | None = None  # the item the current turn's transcript replaces
        self._last_partial = ""
        self._reply: Reply | None = None
        self._reply_task: asyncio.Task[None] | None = None
        self._spec: tuple[Reply, asyncio.Task[None]] | None = None
        self._checks: set[asyncio.Task[None]] = set()
        self._input_ended = False
        self._pending_turns = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._prewarmed = asyncio.Event()
        self._warm_task: asyncio.Task[None] | None = None
        self._requested = False
        self.metrics: list[TurnMetrics] = []
        self._replies = ReplyRunner(
            llm=llm, tts=tts, sink=sink, history=self._history, tools=self._tools,
            config=lambda: self.config, clock=self._clock, emit=self._emit,
            prewarmed=self._prewarmed, on_first_audio=self._first_audio, metrics=self.metrics,
            before_request=self._before_request, on_tools=self._tools_run,
        )  # fmt: skip

    # -- public API ------------------------------------------------------------------

    @property
    def history(self) -> list[dict[str, Any]]:
        """The messages so far (OpenAI chat shape; read-only for callers)."""
        return self._history.messages

    @property
    def busy(self) -> bool:
        """A user turn or a reply is in progress."""
        return not self._idle.is_set()

    async def wait_idle(self) -> None:
        """Wait until nothing is in progress (no user turn, no reply)."""
        await self._idle.wait()

    def _update_idle(self) -> None:
        idle = (
            self.turns.state is TurnState.LISTENING
            and self._reply_task is None
            and self._pending_turns == 0
        )
        if idle:
            self._idle.set()
        else:
            self._idle.clear()

    async def run(self, frames: AsyncIterator[AudioFrame]) -> None:
        """Run the conversation until ``frames`` ends and the last reply is done."""
        self._history.start(self._system_prompt())
        self._history.restore(self._prior_history)
        self._input_ended = False
        try:
            async with asyncio.TaskGroup() as tg:
                self._tg = tg
                tg.create_task(self._prewarm())
                if not self.config.greeting:  # a greeting warms the TTS itself, sooner
                    tg.create_task(warm_up(self._tts))
                if self.config.greeting:
                    self._start_reply(
                        Reply(id=self._new_id("reply"), text_source=None,
                               fixed_text=self.config.greeting),
                        committed=True,
                    )  # fmt: skip
                async for frame in frames:
                    self.push(frame)
                    await asyncio.sleep(0)
                self._input_ended = True
                if self._sink.paused:
                    # No more input can decide the speech the reply was paused for: play it on.
                    self._sink.resume()
                if self.turns.state is TurnState.USER_SPEAKING:
                    self._act(self.policy.end_turn())
                self._update_idle()
                await self._idle.wait()
                for task in list(self._checks):
                    task.cancel()
                if self._stt_turn is not None:
                    await self._stt_turn.aclose()
        finally:
            self._tg = None
            # The session's objects reference each other (callbacks, a cancelled task's
            # traceback), so they wait for the cyclic collector: let go of the kept
            # audio now rather than then.
            self._audio.clear()

    def push(self, frame: AudioFrame) -> None:
        """Process captured audio (16 kHz mono). Synchronous and cheap: VAD + policy."""
        if frame.sample_rate != RATE:
            raise ValueError(f"the session takes {RATE} Hz audio, got {frame.sample_rate} Hz")
        for f in self._reframer.process(frame.pcm):
            self._on_frame(f, self._gate.is_speech(f.pcm))

    def inject_user_text(self, text: str) -> None:
        """A user message without audio (``conversation.message`` + ``reply.create``)."""

        async def source() -> str:
            return text

        reply = Reply(id=self._new_id("reply"), text_source=source, after=self._cancel_reply())
        reply.t_text = self._clock.now_ns()
        self._start_reply(reply, committed=True)

    def create_reply(self, instructions: str | None = None) -> None:
        """Generate a reply now, optionally steered by one-shot instructions."""
        cut = self._cancel_reply()
        self._start_reply(
            Reply(id=self._new_id("reply"), text_source=None, instructions=instructions, after=cut),
            committed=True,
        )

    def cancel_reply(self) -> bool:
        """Cut the reply in progress (``reply.cancel``); it ends as interrupted.

        Returns:
            False when no reply was in progress.
        """
        if self._reply_task is None:
            return False
        self._cancel_reply()
        if self.turns.state in (TurnState.THINKING, TurnState.SPEAKING):
            self.turns.to(TurnState.LISTENING)
        # The floor is the user's again: what they said meanwhile becomes their turn.
        for decision in self.policy.reply_ended():
            self._act(decision)
        self._update_idle()
        return True

    def reconfigure(self, config: SessionConfig) -> None:
        """Apply a later ``session.update``: prompt, tools and turn detection.

        They take effect from the next frame or reply; a reply in progress and
        the greeting are not affected.
        """
        self.config = config
        self._tools.set_tools(config.tools)
        self._history.set_system(self._system_prompt())
        td = config.turn_detection
        self.policy.td = td
        if self._own_vad:
            self._vad = default_vad(RATE, FRAME_MS, td.vad_threshold)
        self._gate = SpeechGate(self._vad, td.vad_threshold)

    def add_message(self, role: Literal["user", "system"], content: str) -> None:
        """Append a message without audio (``conversation.message``); it does not reply."""
        self._history.add(role, content)

    def submit_tool_result(self, call_id: str, result: str, *, is_error: bool = False) -> bool:
        """Answer a client tool call (``tool.result``)."""
        return self._tools.submit(call_id, result, is_error=is_error)

    # -- input: frames, policy decisions, turns ------------------------------------

    def _on_frame(self, frame: AudioFrame, speech: bool) -> None:
        self._audio.append(frame)
        turn = self._stt_turn
        if turn is not None:
            turn.push(frame)
            self._take_partial(turn)
        for decision in self.policy.frame(speech, self._clock.now_ns()):
            self._act(decision)

    def _take_partial(self, turn: STTTurn) -> None:
        """Give the policy the turn's latest transcript, if it is new (and act on it)."""
        if turn is not self._stt_turn:
            return
        partial = turn.partial
        if partial is None or not partial.text or partial.text == self._last_partial:
            return
        self._last_partial = partial.text
        now = self._clock.now_ns()
        self._emit_hook(UserTranscriptDelta(t_ns=now, text=partial.text))
        for decision in self.policy.partial(partial.text, partial.end_confidence, now):
            self._act(decision)

    def _frames_from(self, first: int, end: int | None = None) -> list[AudioFrame]:
        """Kept frames with index in ``[first, end)`` (``end``: up to the latest)."""
        base = self.policy.frames_seen - len(self._audio)
        stop = len(self._audio) if end is None else end - base
        return list(itertools.islice(self._audio, max(0, first - base), max(0, stop)))

    def _act(self, decision: Decision) -> None:
        match decision:
            case StartTurn(first_frame=first, deferred=deferred):
                if self.turns.state is not TurnState.LISTENING:
                    self.turns.to(TurnState.LISTENING)
                self._begin_user_turn(self._frames_from(first), deferred=deferred)
            case Speculate(t_speech_end_ns=t_end):
                turn = self._stt_turn
                assert turn is not None
                speculate = getattr(turn, "speculate", None)
                within = early_decode_budget_ms(self.config.turn_detection)
                if self.config.speculative and speculate is not None and speculate(within):
                    self._speculate(turn, t_end, early=True)
            case Pause(t_speech_end_ns=t_end):
                assert self._stt_turn is not None
                self._stt_turn.pause()
                if self.config.speculative:
                    if self._spec is not None and self._spec[0].early:
                        turn, reply = self._stt_turn, self._spec[0]
                        self._spawn(self._confirm_speculation(turn, reply, t_end))
                    else:
                        self._speculate(self._stt_turn, t_end)
            case Resume():
                assert self._stt_turn is not None
                self._stt_turn.resume()
                self._cancel_speculation()
            case EndTurn():
                self._end_of_turn(decision)
            case ContinueTurn(first_frame=first):
                self._continue_turn(first)
            case CheckBurst(check_id=check_id, first_frame=first, end_frame=end):
                pcm = b"".join(f.pcm for f in self._frames_from(first, end))
                task = self._spawn(self._check_burst(check_id, pcm))
                self._checks.add(task)
                task.add_done_callback(self._checks.discard)
            case Interrupt(first_frame=first, text=text):
                log.debug("interrupted", extra={"heard": text})
                self._cancel_reply()
                if self.turns.state in (TurnState.THINKING, TurnState.SPEAKING):
                    self.turns.to(TurnState.INTERRUPTED)
                self._begin_user_turn(self._frames_from(first), deferred=False)
            case BackChannel(text=text):
                log.debug("back-channel", extra={"heard": text})
            case HoldReply():
                self._sink.pause()
            case ReleaseReply():
                self._sink.resume()

    def _continue_turn(self, first: int) -> None:
        """The user went on before hearing the reply: withdraw it and reopen their turn."""
        self._superseded.add(self._turn_seq)
        reply = self._reply
        if reply is not None and reply.turn == self._turn_seq:
            reply.withdrawn = True
            # Its user message is heard again, whole, with the rest of the turn.
            self._carry[:0] = reply.carried
        self._cancel_reply()
        sent = self._sent_item
        item = sent[1] if sent is not None and sent[0] == self._turn_seq else None
        self._begin_user_turn(
            self._frames_from(first), deferred=self._turn_deferred, continued=item is not None
        )
        self._continued_item = item

    def _begin_user_turn(
        self, frames: list[AudioFrame], *, deferred: bool, continued: bool = False
    ) -> None:
        self.turns.to(TurnState.USER_SPEAKING)
        self._turn_seq += 1
        self._turn_deferred = deferred
        self._last_partial = ""
        if self._stt_turn is not None:
            self._spawn(self._stt_turn.aclose())
        self._stt_turn = self._stt.start_turn(RATE)
        for f in frames:
            self._stt_turn.push(f)
        self._update_idle()
        self._continued_item = None
        self._emit_hook(SpeechStarted(t_ns=self._clock.now_ns(), continued=continued))
        if self._input_ended:
            # Speech taken up after the input ended: nothing more will come.
            self._act(self.policy.end_turn())

    def _speculate(self, turn: STTTurn, t_end: int, *, early: bool = False) -> None:
        self._cancel_speculation()
        speculative = getattr(turn, "early" if early else "speculative", None)
        if speculative is None:
            return

        async def source() -> str:
            result: Transcript | None = await speculative()
            # The pause's decode is in: the turn may end now rather than at the next frame.
            self._take_partial(turn)
            return self._with_carry(result.text if result is not None else "")

        reply = Reply(
            id=self._new_id("reply"), text_source=source, speculative=True, turn=self._turn_seq,
            early=early,
        )  # fmt: skip
        reply.t_end = t_end
        task = self._spawn(self._replies.run(reply))
        self._spec = (reply, task)

    async def _confirm_speculation(self, turn: STTTurn, reply: Reply, t_end: int) -> None:
        """Keep the reply started on the early decode if the pause's decode reads the same;
        otherwise start it again on the pause's (what the end of turn and the final read)."""
        try:
            early = await turn.early()  # type: ignore[attr-defined]
            paused = await turn.speculative()  # type: ignore[attr-defined]
        except EndpointError:
            return
        if self._spec is None or self._spec[0] is not reply:
            return  # the user went on, or the turn ended (the final transcript decides)
        said = early.text if early is not None else ""
        if paused is not None and same_words(paused.text, said):
            return
        self._speculate(turn, t_end)

    def _cancel_speculation(self) -> None:
        if self._spec is not None:
            _, task = self._spec
            self._spec = None
            task.cancel()

    def _with_carry(self, text: str) -> str:
        return " ".join([*self._carry, text.strip()]).strip()

    def _end_of_turn(self, decision: EndTurn) -> None:
        turn = self._stt_turn
        assert turn is not None
        self._stt_turn = None
        self.turns.to(TurnState.THINKING)
        self._emit_hook(SpeechStopped(t_ns=decision.t_ns))
        spec = self._spec
        self._spec = None
        self._pending_turns += 1
        self._update_idle()
        self._spawn(
            self._finish_turn(
                turn, spec, self._turn_seq, self._turn_deferred, decision.t_speech_end_ns,
                decision.t_ns,
            )
        )  # fmt: skip

    async def _finish_turn(
        self,
        turn: STTTurn,
        spec: tuple[Reply, asyncio.Task[None]] | None,
        seq: int,
        deferred: bool,
        t_end: int,
        t_eot: int,
    ) -> None:
        try:
            await self._finish_turn_inner(turn, spec, seq, deferred, t_end, t_eot)
        finally:
            self._pending_turns -= 1
            self._update_idle()

    async def _finish_turn_inner(
        self,
        turn: STTTurn,
        spec: tuple[Reply, asyncio.Task[None]] | None,
        seq: int,
        deferred: bool,
        t_end: int,
        t_eot: int,
    ) -> None:
        try:
            final = await turn.finalize()
        except EndpointError as exc:
            log.warning("transcription failed", extra={"kind": exc.kind})
            final = Transcript(text="")
        t_stt = self._clock.now_ns()
        heard = final.text.strip()
        if deferred and classify(heard) != "words":
            heard = ""  # an acknowledgement said over the reply claims no turn
        if heard and seq not in self._superseded:
            item = (self._continued_item if seq == self._turn_seq else None) or self._new_id("item")
            self._sent_item = (seq, item)
            self._emit_hook(UserTranscript(t_ns=t_stt, text=heard, item_id=item))
        if seq in self._superseded:
            # The user went on with this turn after its end: it is transcribed again, whole.
            self._superseded.discard(seq)
            if spec is not None:
                spec[1].cancel()
            return
        if seq != self._turn_seq:
            # The user went on talking (an interruption) before this turn was answered:
            # their words open the next turn.
            if spec is not None:
                spec[1].cancel()
            if heard:
                self._carry.append(heard)
            return
        carried = tuple(self._carry)
        text = self._with_carry(heard)
        if not text:
            if spec is not None:
                spec[1].cancel()
            if self.turns.state is TurnState.THINKING and self._reply_task is None:
                self.turns.to(TurnState.LISTENING)
                for decision in self.policy.turn_dropped():
                    self._act(decision)
            return
        self._carry.clear()
        # A reply whose transcript is not known yet is kept only when it waits for the same
        # decode as the final one (the pause's); one started on the early decode must have
        # read the same words.
        said = spec[0].user_text if spec is not None else ""
        if (
            spec is not None
            and not spec[1].done()
            and ((said and same_words(said, text)) or (not said and not spec[0].early))
        ):
            reply, task = spec
            reply.user_text = text  # the history keeps the final transcript
            reply.t_eot, reply.t_stt = t_eot, t_stt
            reply.stt_final_ms = ns_to_ms(t_stt - t_eot)
            reply.speculative = True
            reply.carried = carried
            self._adopt(reply, task)
            return
        if spec is not None:
            spec[1].cancel()

        async def source() -> str:
            return text

        reply = Reply(id=self._new_id("reply"), text_source=source, carried=carried, turn=seq)
        reply.t_end, reply.t_eot, reply.t_stt, reply.t_text = t_end, t_eot, t_stt, t_stt
        reply.stt_final_ms = ns_to_ms(t_stt - t_eot)
        self._start_reply(reply, committed=True)

    async def _check_burst(self, check_id: int, pcm: bytes) -> None:
        try:
            heard = await self._stt.transcribe(pcm, RATE)
        except EndpointError:
            heard = Transcript(text="")
        for decision in self.policy.burst_heard(check_id, heard.text, heard.confidence):
            self._act(decision)

    # -- replies ---------------------------------------------------------------------

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        assert self._tg is not None, "the session is not running"
        return self._tg.create_task(coro)

    def _start_reply(self, reply: Reply, *, committed: bool) -> None:
        if committed:
            reply.committed.set()
        task = self._spawn(self._replies.run(reply))
        self._adopt(reply, task)

    def _adopt(self, reply: Reply, task: asyncio.Task[None]) -> None:
        if self._sink.paused and not self.policy.holding:
            self._sink.resume()  # a new reply is never held by a pause it did not see
        self._reply = reply
        self._reply_task = task
        if self.turns.state is TurnState.LISTENING:
            self.turns.to(TurnState.THINKING)
        self.policy.reply_started()
        if not reply.committed.is_set():
            reply.committed.set()
        for event in reply.buffered:
            self._emit_hook(event)
        reply.buffered.clear()
        task.add_done_callback(self._reply_finished)
        self._update_idle()

    def _reply_finished(self, task: asyncio.Task[None]) -> None:
        if task is not self._reply_task:
            return
        self._reply_task = None
        self._reply = None
        if self.turns.state in (TurnState.THINKING, TurnState.SPEAKING):
            self.turns.to(TurnState.LISTENING)
        for decision in self.policy.reply_ended():
            self._act(decision)
        self._update_idle()

    def _cancel_reply(self) -> asyncio.Task[None] | None:
        """Cut the reply in progress (and any speculation); returns its task, still ending."""
        self._cancel_speculation()
        task = self._reply_task
        if task is not None:
            task.cancel()
            self._reply_task = None
            self._reply = None
            self._update_idle()
        return task

    def _emit(self, event: ConversationEvent) -> None:
        self._emit_hook(event)

    def _first_audio(self, reply: Reply) -> None:
        """A reply's first audio goes to the speaker: the user hears the agent from now on."""
        if reply is self._reply:
            self.policy.reply_audible()
        if self.turns.state is TurnState.THINKING:
            self.turns.to(TurnState.SPEAKING)

    def _tools_run(self, reply: Reply) -> None:
        """A reply runs the tools its model asked for: its turn is no longer taken back."""
        if reply is self._reply:
            self.policy.reply_acts()

    def _client_tool_call(self, call_id: str, name: str, arguments: dict[str, Any]) -> None:
        reply = self._reply
        reply_id = reply.id if reply is not None else ""
        event = ToolCallRequested(
            t_ns=self._clock.now_ns(), reply_id=reply_id, call_id=call_id, name=name,
            arguments=arguments,
        )  # fmt: skip
        if reply is not None:
            self._replies.remit(reply, event)
        else:
            self._emit_hook(event)

    # -- helpers -------------------------------------------------------------------

    def _system_prompt(self) -> str:
        prompt = self.config.system_prompt.strip()
        if self.config.spoken_guidance:
            prompt = f"{prompt}\n\n{SPOKEN_GUIDANCE}".strip()
        return prompt

    async def _prewarm(self) -> None:
        try:
            with contextlib.suppress(EndpointError, OSError, ValueError):
                await self._llm.prewarm()
        finally:
            self._prewarmed.set()
        if self.config.warm_prompt and not self._requested and self._tg is not None:
            self._warm_task = self._tg.create_task(self._warm_prompt())

    async def _warm_prompt(self) -> None:
        """The endpoint warm-up (``config.warm_prompt``, :meth:`ChatClient.warm_up`)."""
        with contextlib.suppress(EndpointError, OSError, ValueError):
            await self._llm.warm_up(self._system_prompt())

    def _before_request(self) -> None:
        """A reply is about to be requested: a warm-up still running gives way to it
        (an endpoint serving one request at a time would queue the reply behind it)."""
        self._requested = True
        task, self._warm_task = self._warm_task, None
        if task is not None and not task.done():
            task.cancel()

    def _new_id(self, prefix: str) -> str:
        return f"{prefix}_{next(self._ids)}"
