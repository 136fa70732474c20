"""One assistant reply, from the request to the speaker, and how it is accounted.

Theory of operation
-------------------
:class:`ReplyRunner` carries one :class:`Reply` through its life: the text it
answers (a transcript, possibly still being decoded by speculation), the
endpoint's streamed tokens (tool rounds included), the segmenter, the TTS and
the sink. A reply that is not yet *committed* (a speculative one) prepares its
audio but holds it, and buffers its events, until the session adopts it; the
tools its model asks for run only then.
When it ends — completed, failed (an apology is spoken) or cancelled — it is
recorded once (:meth:`ReplyRunner.finish`): the history gets what the user
actually heard (:mod:`runtime.conversation.history`), the client gets
``AgentTranscript`` and ``ReplyDone``, and an answered turn gets its
``TurnMetrics``. A reply the user went on from before hearing it
(``withdrawn``) leaves no trace in the history.

The session decides *which* reply runs and when it is cut; this module only
runs it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Final

from audio.vad import trim_leading_silence
from runtime.clock import Clock, ns_to_ms
from runtime.conversation.config import SessionConfig
from runtime.conversation.events import (
    AgentTranscript,
    AgentTranscriptDelta,
    ConversationEvent,
    ReplyAudio,
    ReplyDone,
    ReplyError,
    ReplyStarted,
    TurnMetrics,
)
from runtime.conversation.history import History, SpokenLog, heard_prefix
from runtime.conversation.sinks import AudioSink
from runtime.conversation.tools import ToolRunner, openai_tool
from runtime.errors import EndpointError
from runtime.llm.client import ChatClient, ChatRequest
from runtime.llm.fallback import FallbackChatClient
from runtime.llm.stream import TextDelta, ToolCall
from runtime.safetext import safe_text
from runtime.speech.text import SpeechSegmenter
from runtime.speech.tts import TextToSpeech

__all__ = ["Reply", "ReplyRunner"]

log = logging.getLogger("voxloop.session")


@dataclass(slots=True)
class Reply:
    """One assistant reply and its timings (ns, session clock)."""

    id: str
    text_source: Callable[[], Awaitable[str]] | None  # None: no new user message
    fixed_text: str | None = None  # greeting / apology: spoken verbatim, no LLM
    instructions: str | None = None
    speculative: bool = False
    early: bool = False  # speculative, on the decode at speculate_ms (not the pause's)
    turn: int | None = None  # the user turn it answers (None: greeting, injected, create_reply)
    withdrawn: bool = False  # the user went on before hearing it: no trace in the history
    carried: tuple[str, ...] = ()  # earlier turns' words folded into user_text
    committed: asyncio.Event = field(default_factory=asyncio.Event)
    buffered: list[ConversationEvent] = field(default_factory=list)
    # The reply this one cut (create_reply, a typed message during a reply): it finishes,
    # its reply.done sent, before this one starts, so two replies never overlap on the wire.
    after: asyncio.Task[None] | None = None
    user_text: str = ""
    spoken: SpokenLog = field(default_factory=SpokenLog)
    written: int = 0
    base_played: int | None = None
    generated: list[str] = field(default_factory=list)
    tool_messages: list[dict[str, Any]] = field(default_factory=list)
    status: str = "completed"
    t_end: int | None = None  # the user actually stopped speaking
    t_eot: int | None = None  # end of turn confirmed
    t_stt: int | None = None  # final transcript available
    t_text: int | None = None  # transcript used for the request available
    t_sent: int | None = None
    ttft_ms: float | None = None
    llm_entry: int | None = None
    llm_host: str | None = None
    llm_skipped: list[tuple[int, str]] = field(default_factory=list)
    t_seg: int | None = None
    t_tts_start: int | None = None
    t_chunk: int | None = None
    t_out: int | None = None
    stt_final_ms: float | None = None


TOOL_CUT: Final = "Error: no result: the user spoke before the tool answered."
"""The result a tool call gets in the history when its reply was cut before it answered."""


class ReplyRunner:
    """Runs replies for one session (see the module docstring).

    Args:
        llm, tts, sink: the endpoint client, the voice and where audio is played.
        history: the session's history (read for requests, written when a reply ends).
        tools: runs the model's tool calls.
        config: the session's current configuration (read at each use).
        clock: the session clock.
        emit: receives every event, synchronously.
        prewarmed: set once the endpoint connection is open (the first request waits).
        on_first_audio: called when a reply's first audio goes to the sink.
        metrics: where each answered turn's :class:`TurnMetrics` is appended.
        before_request: called just before each request to the endpoint.
        on_tools: called when a reply (committed) is about to run its model's tool calls.
    """

    def __init__(
        self,
        *,
        llm: ChatClient | FallbackChatClient,
        tts: TextToSpeech,
        sink: AudioSink,
        history: History,
        tools: ToolRunner,
        config: Callable[[], SessionConfig],
        clock: Clock,
        emit: Callable[[ConversationEvent], None],
        prewarmed: asyncio.Event,
        on_first_audio: Callable[[Reply], None],
        metrics: list[TurnMetrics],
        before_request: Callable[[], None] = lambda: None,
        on_tools: Callable[[Reply], None] = lambda _reply: None,
    ) -> None:
        self._before_request = before_request
        self._on_tools = on_tools
        self._llm = llm
        self._tts = tts
        self._sink = sink
        self._history = history
        self._tools = tools
        self._config = config
        self._clock = clock
        self._emit = emit
        self._prewarmed = prewarmed
        self._on_first_audio = on_first_audio
        self.metrics = metrics

    def remit(self, reply: Reply, event: ConversationEvent) -> None:
        if reply.committed.is_set():
            self._emit(event)
        else:
            reply.buffered.append(event)

    async def run(self, reply: Reply) -> None:
        segments: asyncio.Queue[str | None] = asyncio.Queue(maxsize=8)
        try:
            if reply.after is not None:
                await asyncio.wait([reply.after])  # its outcome is its own (cancelled)
                reply.after = None
            if reply.text_source is not None:
                reply.user_text = (await reply.text_source()).strip()
                if reply.t_text is None:
                    reply.t_text = self._clock.now_ns()
                if not reply.user_text:
                    return
            self.remit(reply, ReplyStarted(t_ns=self._clock.now_ns(), reply_id=reply.id))
            async with asyncio.TaskGroup() as rtg:
                rtg.create_task(self._speak(reply, segments))
                await self._generate(reply, segments)
            if not reply.committed.is_set():
                await reply.committed.wait()
            await self._sink.wait_for_playout()
            self.finish(reply, interrupted=False)
        except asyncio.CancelledError:
            if reply.committed.is_set() and reply.status != "done":
                dropped = self._sink.clear_buffer()
                log.debug("reply interrupted", extra={"dropped_samples": dropped})
                self.finish(reply, interrupted=True)
            raise

    async def _generate(self, reply: Reply, segments: asyncio.Queue[str | None]) -> None:
        segmenter = SpeechSegmenter()
        try:
            if reply.fixed_text is not None:
                for seg in segmenter.push(reply.fixed_text) + segmenter.flush():
                    await self._put_segment(reply, segments, seg)
            else:
                await self._generate_rounds(reply, segmenter, segments)
        except EndpointError as exc:
            reply.status = "failed"
            self.remit(
                reply,
                ReplyError(
                    t_ns=self._clock.now_ns(), reply_id=reply.id, code=exc.kind,
                    message=str(exc), retryable=exc.retryable, status_code=exc.status_code,
                ),
            )  # fmt: skip
            for seg in segmenter.flush():
                await self._put_segment(reply, segments, seg)
            apology = SpeechSegmenter()
            for seg in apology.push(self._config().apology) + apology.flush():
                await segments.put(seg)
        # Not in a `finally`: when the reply is cancelled, the speaker is cancelled with it, and
        # waiting here on a full queue (a held speculative reply) would never end.
        await segments.put(None)

    async def _generate_rounds(
        self, reply: Reply, segmenter: SpeechSegmenter, segments: asyncio.Queue[str | None]
    ) -> None:
        for _ in range(self._config().max_tool_rounds + 1):
            calls = await self._llm_round(reply, segmenter, segments)
            if not calls:
                break
            await self._run_tools(reply, calls)

    async def _llm_round(
        self, reply: Reply, segmenter: SpeechSegmenter, segments: asyncio.Queue[str | None]
    ) -> list[ToolCall]:
        request = ChatRequest(
            messages=self._messages(reply),
            tools=[openai_tool(t) for t in self._config().tools],
            temperature=self._config().temperature,
            max_tokens=self._config().max_tokens,
            first_token_timeout_s=self._config().first_token_timeout_s,
        )
        calls: list[ToolCall] = []
        text_parts: list[str] = []
        # A reply right at the start reuses the connection being opened, not a second one.
        await self._prewarmed.wait()
        self._before_request()
        async with self._llm.stream(request) as stream:
            async for event in stream:
                if isinstance(event, TextDelta):
                    text_parts.append(event.text)
                    for seg in segmenter.push(event.text, ns_to_ms(self._clock.now_ns())):
                        await self._put_segment(reply, segments, seg)
                elif isinstance(event, ToolCall):
                    calls.append(event)
            if reply.t_sent is None:
                reply.t_sent = stream.timings.sent_ns
                reply.ttft_ms = stream.timings.ttft_ms
                reply.llm_entry = stream.entry
                reply.llm_host = stream.host
                reply.llm_skipped = list(stream.skipped)
        for seg in segmenter.flush():
            await self._put_segment(reply, segments, seg)
        text = "".join(text_parts).strip()
        reply.generated.append(text)
        if calls:
            reply.tool_messages.append(
                {
                    "role": "assistant",
                    "content": text or None,
                    "tool_calls": [c.to_message() for c in calls],
                }
            )
        return calls

    async def _run_tools(self, reply: Reply, calls: list[ToolCall]) -> None:
        # A speculative reply runs no tool before its turn is over and it is the reply: a
        # tool acts (a client's, an HTTP call), and the turn may yet go on or change.
        await reply.committed.wait()
        self._on_tools(reply)
        answered = 0
        try:
            for call in calls:
                result = await self._tools.run(call)
                reply.tool_messages.append(
                    {"role": "tool", "tool_call_id": call.id, "content": result}
                )
                answered += 1
        except asyncio.CancelledError:
            # Cut (a barge-in) before every call had its result: the history still answers
            # each call, as an endpoint requires of the next request.
            for call in calls[answered:]:
                reply.tool_messages.append(
                    {"role": "tool", "tool_call_id": call.id, "content": TOOL_CUT}
                )
            raise

    async def _put_segment(
        self, reply: Reply, segments: asyncio.Queue[str | None], seg: str
    ) -> None:
        if reply.t_seg is None:
            reply.t_seg = self._clock.now_ns()
        await segments.put(seg)

    async def _speak(self, reply: Reply, segments: asyncio.Queue[str | None]) -> None:
        rate = self._sink.sample_rate
        while (seg := await segments.get()) is not None:
            if reply.t_tts_start is None:
                reply.t_tts_start = self._clock.now_ns()
            start = reply.written
            # Whatever the text's source, a speech engine never sees a NUL or a lone surrogate.
            run = self._tts.synthesize(safe_text(seg), voice=self._config().voice, sample_rate=rate)
            complete = False
            try:
                async for chunk in run:
                    pcm = chunk.pcm
                    if reply.t_chunk is None:
                        # The voice's leading silence would only add to the latency.
                        pcm = trim_leading_silence(pcm, rate)
                        reply.t_chunk = self._clock.now_ns()
                    if not reply.committed.is_set():
                        await reply.committed.wait()
                    if reply.t_out is None:
                        reply.base_played = self._sink.played_samples
                        reply.t_out = self._clock.now_ns()
                        self._on_first_audio(reply)
                    await self._sink.write(pcm)
                    reply.written += len(pcm) // 2
                    self._emit(
                        ReplyAudio(t_ns=self._clock.now_ns(), reply_id=reply.id, pcm=pcm,
                                   sample_rate=rate)
                    )  # fmt: skip
                complete = True
            finally:
                # Cancelled between two chunks (a barge-in): the run's response is closed
                # here, in this task, not whenever its generator is collected.
                await run.aclose()
                # What was written counts, also when a barge-in cuts the segment before its
                # last chunk (a voice's trailing chunk waiting on a paused, full sink): what
                # the listener heard of it is then read from it.
                reply.spoken.add(seg, start, reply.written, complete=complete, sample_rate=rate)
            if reply.written > start:
                self._emit(
                    AgentTranscriptDelta(t_ns=self._clock.now_ns(), reply_id=reply.id, delta=seg)
                )

    def heard_text(self, reply: Reply) -> str:
        if reply.base_played is None:
            return ""
        return heard_prefix(reply.spoken.segments, self._sink.played_samples - reply.base_played)

    def finish(self, reply: Reply, *, interrupted: bool) -> None:
        reply_status = reply.status
        reply.status = "done"
        now = self._clock.now_ns()
        agent_text = self.heard_text(reply) if interrupted else reply.spoken.text
        if interrupted:
            assistant = agent_text  # only what the user heard
        elif reply.fixed_text is not None:
            assistant = reply.fixed_text
        elif reply_status == "failed":
            assistant = ""  # the apology is not put in the model's mouth
        else:
            assistant = " ".join(t for t in reply.generated if t)
        if not reply.withdrawn:
            self._history.record(
                user_text=reply.user_text if reply.text_source is not None else "",
                tool_messages=reply.tool_messages,
                assistant_text=assistant,
            )
        self._emit(
            AgentTranscript(t_ns=now, reply_id=reply.id, text=agent_text, interrupted=interrupted)
        )
        status = (
            "interrupted"
            if interrupted
            else ("failed" if reply_status == "failed" else "completed")
        )
        self._emit(ReplyDone(t_ns=now, reply_id=reply.id, status=status))  # type: ignore[arg-type]
        if reply.text_source is not None and reply.t_end is not None and not reply.withdrawn:
            metrics = self._metrics(reply, agent_text, interrupted)
            self.metrics.append(metrics)
            self._emit(metrics)

    def _metrics(self, reply: Reply, agent_text: str, interrupted: bool) -> TurnMetrics:
        def ms(a: int | None, b: int | None) -> float | None:
            return None if a is None or b is None else ns_to_ms(b - a)

        first_sentence = ms(reply.t_sent, reply.t_seg)
        tts_first = ms(reply.t_tts_start, reply.t_chunk)
        v2v = ms(reply.t_end, reply.t_out)
        endpointing = ms(reply.t_end, reply.t_eot)
        overhead: float | None = None
        t = (reply.t_text, reply.t_sent, reply.t_seg, reply.t_tts_start, reply.t_chunk,
             reply.t_out, reply.t_eot)  # fmt: skip
        if all(x is not None for x in t):
            t_text, t_sent, t_seg, t_tts, t_chunk, t_out, t_eot = (int(x or 0) for x in t)
            # The runtime's own cost on the critical path: handing the transcript to
            # the request, the first segment to the TTS, and the first audio to the sink.
            glue = (t_sent - t_text) + (t_tts - t_seg) + (t_out - max(t_chunk, t_eot))
            overhead = ns_to_ms(max(0, glue))
        return TurnMetrics(
            t_ns=self._clock.now_ns(), reply_id=reply.id, user_text=reply.user_text,
            agent_text=agent_text, interrupted=interrupted, stt_final_ms=reply.stt_final_ms,
            ttft_ms=reply.ttft_ms, first_sentence_ms=first_sentence, tts_first_audio_ms=tts_first,
            v2v_ms=v2v, overhead_ms=overhead, endpointing_ms=endpointing,
            speculative=reply.speculative, llm_entry=reply.llm_entry, llm_host=reply.llm_host,
            llm_skipped=tuple(reply.llm_skipped),
        )  # fmt: skip

    def _messages(self, reply: Reply) -> list[dict[str, Any]]:
        return self._history.request(
            user_text=reply.user_text if reply.text_source is not None else "",
            tool_messages=reply.tool_messages,
            instructions=reply.instructions,
        )
