"""Speculative replies and session warm-up, on real audio, real engines and the reference endpoint.

A speculative reply starts at the user's pause, on the transcript decoded then;
the server's receive times and the session's events share one clock
(``perf_counter_ns``).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest

from audio.frame import AudioFrame
from audio.reframe import Reframer
from audio.vad import default_vad, segment_pcm
from audio.wav import read_wav
from runtime.conversation import events as ev
from runtime.conversation.config import SessionConfig, TurnDetection
from runtime.conversation.session import RATE, ConversationSession
from runtime.conversation.sinks import ImmediateSink
from runtime.conversation.tools import ClientTool
from runtime.llm.reference import ReferenceEndpoint, ReplyPlan
from runtime.speech.engines.piper import PiperTTS
from runtime.speech.engines.whisper import WhisperSTT
from runtime.speech.tts import warm_up
from runtime.talk import talk_pcm

from ...helpers import SPEECH, manifest
from .script import Step, Until, run_script
from .test_conversation import active, chat_bodies, llm_for, normalise, silence, utterance


@pytest.fixture
async def endpoint() -> AsyncIterator[ReferenceEndpoint]:
    async with ReferenceEndpoint(ReplyPlan(ttft_ms=50, itl_ms=5)) as server:
        yield server


CANCEL = "Please cancel my subscription."
ADDRESS = "I'd like to change my delivery address."
SPECULATIVE = " ".join(f"Never heard, sentence number {n}." for n in range(1, 40))


def chats(endpoint: ReferenceEndpoint) -> list[Any]:
    return [r for r in endpoint.requests if r.path.endswith("/chat/completions")]


async def one_turn(
    endpoint: ReferenceEndpoint, whisper: WhisperSTT, piper: Any, config: SessionConfig
) -> tuple[list[ev.ConversationEvent], Any]:
    endpoint.plan = ReplyPlan(ttft_ms=50, itl_ms=5, replies=("Your subscription is cancelled.",))
    pcm = silence(0.4) + utterance("shared-04-piper") + silence(1.5)
    events: list[ev.ConversationEvent] = []
    async with llm_for(endpoint) as llm:
        result = await talk_pcm(
            pcm, llm=llm, stt=whisper, tts=piper, config=config, on_event=events.append
        )
    return events, result


async def test_speculation_is_on_by_default_and_the_request_leaves_before_the_end_of_turn(
    endpoint: ReferenceEndpoint, whisper: WhisperSTT, piper: PiperTTS
):
    events, result = await one_turn(endpoint, whisper, piper, SessionConfig())
    [request] = chats(endpoint)
    assert normalise(request.body["messages"][-1]["content"]) == normalise(CANCEL)
    # The reply spoken is the one started at the pause, on the transcript decoded then.
    [metrics] = result.metrics
    assert metrics.speculative is True
    td = SessionConfig().turn_detection
    assert metrics.endpointing_ms is not None and metrics.endpointing_ms >= td.min_silence_ms - 20
    assert [e.text for e in events if isinstance(e, ev.AgentTranscript)] == [
        "Your subscription is cancelled."
    ]


async def test_no_speculation_when_disabled(
    endpoint: ReferenceEndpoint, whisper: WhisperSTT, piper: PiperTTS
):
    events, result = await one_turn(endpoint, whisper, piper, SessionConfig(speculative=False))
    [stopped] = [e for e in events if isinstance(e, ev.SpeechStopped)]
    [request] = chats(endpoint)
    # Nothing is asked before the end of the turn is confirmed.
    assert request.received_ns > stopped.t_ns
    [metrics] = result.metrics
    assert metrics.speculative is False
    assert [e.text for e in events if isinstance(e, ev.AgentTranscript)] == [
        "Your subscription is cancelled."
    ]


async def test_resuming_after_the_pause_cancels_the_speculative_reply_and_it_is_never_spoken(
    endpoint: ReferenceEndpoint, whisper: WhisperSTT, piper: PiperTTS
):
    # A long end-of-turn silence, so the silence between the two sentences is a pause; the
    # user goes on once the speculative request has left (however long the decode takes).
    config = SessionConfig(
        turn_detection=TurnDetection(pause_ms=160, min_silence_ms=5000, max_silence_ms=5000)
    )
    # The speculative reply streams for seconds: it is still streaming when the user resumes.
    # Later requests (the user may pause again inside the second sentence) all get "Done.".
    endpoint.plan = ReplyPlan(ttft_ms=50, itl_ms=20, replies=(SPECULATIVE, *["Done."] * 20))
    first, second = utterance("shared-04-piper"), utterance("shared-05-piper")
    asked = Until("the speculative request", lambda _p: bool(chats(endpoint)), limit_s=4.0)
    steps: list[Step] = [silence(0.4), first, asked, second, silence(0.5)]
    async with llm_for(endpoint) as llm:
        result = await run_script(steps, llm=llm, stt=whisper, tts=piper, config=config)
    events = result.events
    requests = chats(endpoint)
    assert len(requests) >= 2
    spec, final = requests[0], requests[-1]
    # The first request carried only what was said before the pause, and was abandoned
    # (the client hung up) once the user went on.
    assert normalise(spec.body["messages"][-1]["content"]) == normalise(CANCEL)
    assert spec.disconnected_ns is not None and spec.disconnected_ns < final.received_ns
    # Its reply was never heard: nothing plays before the user's second sentence ends.
    assert not active(result.agent, 0.0, result.starts[4])
    heard = normalise(final.body["messages"][-1]["content"])
    assert heard == normalise(f"{CANCEL} {ADDRESS}")
    # Only the reply to the whole turn was spoken, and its audio came from the second pause's
    # speculation (the transcript matched the final one).
    assert [e.text for e in events if isinstance(e, ev.AgentTranscript)] == ["Done."]
    assert sum(isinstance(e, ev.ReplyStarted) for e in events) == 1
    [metrics] = result.metrics
    assert metrics.speculative is True
    assert "Never heard" not in str(chat_bodies(endpoint)[-1]["messages"])


class WarmupRecorder:
    """A real engine, with a record of when it was warmed and asked to speak."""

    def __init__(self, inner: PiperTTS) -> None:
        self.inner = inner
        self.calls: list[str] = []

    @property
    def name(self) -> str:
        return self.inner.name

    def voices(self) -> Any:
        return self.inner.voices()

    def synthesize(self, text: str, *, voice: str | None = None, sample_rate: int = 24000) -> Any:
        self.calls.append(f"synthesize {text}")
        return self.inner.synthesize(text, voice=voice, sample_rate=sample_rate)

    async def warmup(self) -> None:
        self.calls.append("warmup")
        await self.inner.warmup()
        self.calls.append("warm")

    async def aclose(self) -> None:
        await self.inner.aclose()


async def test_the_tts_is_warmed_up_when_the_session_starts(
    endpoint: ReferenceEndpoint, whisper: WhisperSTT, piper: PiperTTS
):
    tts = WarmupRecorder(piper)
    await one_turn(endpoint, whisper, tts, SessionConfig())
    assert tts.calls == ["warmup", "warm", "synthesize Your subscription is cancelled."]


async def test_warm_up_is_optional_and_never_raises(piper: PiperTTS):
    class Failing(WarmupRecorder):
        async def warmup(self) -> None:
            raise RuntimeError("model session failed")

    await warm_up(Failing(piper))  # logged, not raised
    await warm_up(piper)
    chunks = [c async for c in piper.synthesize("Ready.", sample_rate=16000)]
    assert sum(len(c.pcm) for c in chunks) > 16000 * 2 // 10


async def warm_session(endpoint: ReferenceEndpoint, whisper: WhisperSTT, piper: PiperTTS) -> Any:
    """One session with ``warm_prompt``: silence only, so the warm-up is the only request."""
    async with llm_for(endpoint, leading_reasoning=None) as llm:
        await talk_pcm(
            silence(1.0), llm=llm, stt=whisper, tts=piper,
            config=SessionConfig(system_prompt="You are Northwind's agent.", warm_prompt=True),
        )  # fmt: skip
        return llm.leading_reasoning, llm.reasoning_source


async def test_warm_prompt_sends_the_system_prompt_and_learns_the_first_reply_can_stream(
    endpoint: ReferenceEndpoint, whisper: WhisperSTT, piper: PiperTTS
):
    endpoint.plan = ReplyPlan(ttft_ms=50, itl_ms=5, replies=("Not a warm-up answer.",))
    assert await warm_session(endpoint, whisper, piper) == (False, "learned")
    [request] = chats(endpoint)
    messages = request.body["messages"]
    assert messages[0]["role"] == "system"
    assert messages[0]["content"].startswith("You are Northwind's agent.")
    assert messages[1] == {"role": "user", "content": "Say hello."}
    assert request.body["max_tokens"] == 32


async def test_warm_prompt_learns_nothing_from_a_reply_cut_short_or_inside_reasoning(
    endpoint: ReferenceEndpoint, whisper: WhisperSTT, piper: PiperTTS
):
    # Cut at max_tokens (no "stop"): a template-opened think block may still be open.
    endpoint.plan = ReplyPlan(
        ttft_ms=50, itl_ms=5, warm_up_reply="Okay so the user", finish_chunk=False
    )
    assert await warm_session(endpoint, whisper, piper) == (False, "default")
    # A closing think tag: the template opens one, and the client keeps that.
    endpoint.plan = ReplyPlan(ttft_ms=50, itl_ms=5, warm_up_reply="They greet me.</think>OK.")
    assert await warm_session(endpoint, whisper, piper) == (True, "learned")


async def test_no_warm_prompt_by_default(
    endpoint: ReferenceEndpoint, whisper: WhisperSTT, piper: PiperTTS
):
    async with llm_for(endpoint, leading_reasoning=None) as llm:
        await talk_pcm(silence(1.0), llm=llm, stt=whisper, tts=piper, config=SessionConfig())
        assert llm.reasoning_source == "default"
    assert chats(endpoint) == []


def said_text(name: str) -> str:
    return next(str(r["text"]) for r in manifest() if r["file"] == f"{name}.wav")


LONG_TURN = tuple(f"shared-{i:02}-piper" for i in (2, 5, 6, 7, 3, 4, 9, 11))


def spoken(name: str) -> bytes:
    """The utterance's speech only (its leading and trailing silence cut)."""
    pcm = utterance(name)
    segments = segment_pcm(pcm, 16000, default_vad())
    start, end = segments[0][0], segments[-1][1]
    return pcm[int(start * 16000) * 2 : int(end * 16000) * 2]


async def test_a_long_turn_whose_last_stretch_is_short_reaches_the_endpoint_whole(
    endpoint: ReferenceEndpoint, whisper: WhisperSTT, piper: PiperTTS
):
    # Eight sentences said without a pause (more than the recognizer's 8 s commit), a pause,
    # then a short "No.". At the pause after it the eight are committed (their decode is done
    # by then on all but a very busy machine) and only the stretch after them, about 1.3 s,
    # is decoded, with the committed text (72 tokens) as Whisper's prompt: longer than such a
    # stretch's token budget. Its word must still come out, with its confidences.
    assert whisper.config.commit_after_s == 8.0
    endpoint.plan = ReplyPlan(ttft_ms=50, itl_ms=5, replies=("Done.",) * 4)
    first = silence(0.2).join(spoken(name) for name in LONG_TURN)
    assert len(first) > whisper.config.commit_after_s * 16000 * 2
    short = read_wav(SPEECH / "short-no.wav").mono()
    td = TurnDetection(pause_ms=600, min_silence_ms=1500, max_silence_ms=4000)
    steps: list[Step] = [silence(0.4), first, silence(0.9), short, silence(0.5)]
    async with llm_for(endpoint) as llm:
        result = await run_script(
            steps, llm=llm, stt=whisper, tts=piper, config=SessionConfig(turn_detection=td)
        )
    expected = " ".join([*(said_text(n) for n in LONG_TURN), "No."])
    finals = [e.text for e in result.events if isinstance(e, ev.UserTranscript)]
    assert len(finals) == 1 and normalise(finals[0]) == normalise(expected)
    messages = chat_bodies(endpoint)[-1]["messages"]
    assert [m["role"] for m in messages] == ["system", "user"]
    assert messages[1]["content"] == finals[0]
    assert [e.status for e in result.events if isinstance(e, ev.ReplyDone)] == ["completed"]
    # The turn ended on its confident last word, not on the silence that ends any turn.
    [metrics] = result.metrics
    assert metrics.endpointing_ms is not None
    assert td.min_silence_ms - 20 <= metrics.endpointing_ms < td.max_silence_ms


async def test_a_speculative_reply_runs_its_tool_only_once_the_turn_is_over(
    endpoint: ReferenceEndpoint, whisper: WhisperSTT, piper: PiperTTS
):
    # The model asks for a client tool at once, and the turn ends only seconds after the
    # pause, once that request is over: the speculative reply has its tool call long before
    # it is the reply. A tool acts, so it is asked for only then, as part of the reply.
    config = SessionConfig(
        turn_detection=TurnDetection(pause_ms=160, min_silence_ms=2500, max_silence_ms=2500),
        tools=(ClientTool("get_weather", "Current weather",
                          {"type": "object", "properties": {"city": {"type": "string"}}}),),
    )  # fmt: skip
    endpoint.queue(ReplyPlan(ttft_ms=50, itl_ms=5, tool_name="get_weather",
                             tool_arguments='{"city": "Paris"}'))  # fmt: skip
    endpoint.plan = ReplyPlan(ttft_ms=50, itl_ms=5, replies=("It is twenty degrees in Paris.",))
    # (On a machine too busy to decode within the silence, the turn ends first: then the
    # order below holds whatever the code.)
    answered = Until(
        "the speculative request's answer, or the end of the turn",
        lambda p: (
            any(r.ended_ns is not None for r in chats(endpoint))
            or any(isinstance(e, ev.SpeechStopped) for e in p.events)
        ),
        limit_s=3.0,
    )
    steps: list[Step] = [silence(0.4), utterance("shared-00-piper"), answered]

    def answer_tools(session: ConversationSession, event: ev.ConversationEvent) -> None:
        if isinstance(event, ev.ToolCallRequested):
            session.submit_tool_result(event.call_id, json.dumps({"temp_c": 20}))

    async with llm_for(endpoint) as llm:
        result = await run_script(
            steps, llm=llm, stt=whisper, tts=piper, config=config, on_event=answer_tools
        )
    kinds = [type(e).__name__ for e in result.events
             if isinstance(e, (ev.SpeechStopped, ev.ReplyStarted, ev.ToolCallRequested))]  # fmt: skip
    assert kinds == ["SpeechStopped", "ReplyStarted", "ToolCallRequested"]
    [started] = [e for e in result.events if isinstance(e, ev.ReplyStarted)]
    [call] = [e for e in result.events if isinstance(e, ev.ToolCallRequested)]
    assert (call.reply_id, call.name, call.arguments) == (
        started.reply_id,
        "get_weather",
        {"city": "Paris"},
    )
    [metrics] = result.metrics
    assert metrics.speculative is True
    [heard] = [e.text for e in result.events if isinstance(e, ev.UserTranscript)]
    first, second = chats(endpoint)
    assert first.body["messages"][-1] == {"role": "user", "content": heard}
    assert second.body["messages"][-1] == {
        "role": "tool",
        "tool_call_id": call.call_id,
        "content": '{"temp_c": 20}',
    }
    assert [e.text for e in result.events if isinstance(e, ev.AgentTranscript)] == [
        "It is twenty degrees in Paris."
    ]


class LateTurn:
    """A real recognizer's turn whose pause transcript is seen only once ``release`` is set."""

    def __init__(self, inner: Any, release: asyncio.Event) -> None:
        self.inner = inner
        self.release = release

    def push(self, frame: AudioFrame) -> None:
        self.inner.push(frame)

    def pause(self) -> None:
        self.inner.pause()

    def resume(self) -> None:
        self.inner.resume()

    @property
    def partial(self) -> Any:
        return self.inner.partial if self.release.is_set() else None

    async def speculative(self) -> Any:
        result = await self.inner.speculative()
        await self.release.wait()
        return result

    async def finalize(self) -> Any:
        return await self.inner.finalize()

    async def aclose(self) -> None:
        await self.inner.aclose()


class LateTranscripts:
    """Whisper, with every pause's transcript held back until ``release`` is set: a decode
    that finishes after the last frame of the end-of-turn silence."""

    def __init__(self, inner: WhisperSTT) -> None:
        self.inner = inner
        self.release = asyncio.Event()

    @property
    def name(self) -> str:
        return self.inner.name

    async def transcribe(self, pcm: bytes, sample_rate: int) -> Any:
        return await self.inner.transcribe(pcm, sample_rate)

    def start_turn(self, sample_rate: int = 16000) -> LateTurn:
        return LateTurn(self.inner.start_turn(sample_rate), self.release)

    async def aclose(self) -> None:
        pass


async def test_a_pause_transcript_that_comes_after_the_silence_ends_the_turn_when_it_comes(
    endpoint: ReferenceEndpoint, whisper: WhisperSTT, piper: PiperTTS
):
    # The frames of the whole end-of-turn silence are in before the pause's transcript is:
    # the turn ends when the transcript comes, with no frame after it (a client sending 50 ms
    # chunks, or a decode slower than the silence, no longer waits for the next frame).
    endpoint.plan = ReplyPlan(ttft_ms=50, itl_ms=5, replies=("Your subscription is cancelled.",))
    stt = LateTranscripts(whisper)
    events: list[ev.ConversationEvent] = []
    stopped = asyncio.Event()

    def record(event: ev.ConversationEvent) -> None:
        events.append(event)
        if isinstance(event, ev.SpeechStopped):
            stopped.set()

    # The recording ends in 0.7 s of silence: with 0.2 s more, the silence is past
    # min_silence_ms and short of max_silence_ms (1.2 s).
    pcm = silence(0.4) + utterance("shared-04-piper") + silence(0.2)
    frames = Reframer(RATE, 20).process(pcm)

    async def user() -> AsyncIterator[AudioFrame]:
        for frame in frames:
            yield frame
        n = len(events)
        stt.release.set()  # the transcript is in; no frame follows until the turn has ended
        async with asyncio.timeout(30):
            await stopped.wait()
        assert [type(e) for e in events[n:]][:2] == [ev.UserTranscriptDelta, ev.SpeechStopped]

    async with llm_for(endpoint) as llm:
        session = ConversationSession(
            config=SessionConfig(), llm=llm, stt=stt, tts=piper, sink=ImmediateSink(24000),
            on_event=record,
        )  # fmt: skip
        await session.run(user())
    [transcript] = [e for e in events if isinstance(e, ev.UserTranscript)]
    assert normalise(transcript.text) == normalise(CANCEL)
    [metrics] = session.metrics
    assert metrics.speculative is True
    assert [e.text for e in events if isinstance(e, ev.AgentTranscript)] == [
        "Your subscription is cancelled."
    ]
