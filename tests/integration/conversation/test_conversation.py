"""The conversation core on real audio, real engines and the reference endpoint over sockets.

Audio runs in real time (the sink plays against the loop clock), so each
conversation takes as long as it would for a person; inputs are kept short.
Where the user must hear the agent before going on, the input waits for it
(:mod:`.script`): the tests assert what was said and in what order, not how soon.
"""

from __future__ import annotations

import asyncio
import difflib
import ipaddress
import itertools
import json
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from whisper_normalizer.english import EnglishTextNormalizer

from audio.vad import default_vad, segment_pcm
from audio.wav import read_wav
from runtime.conversation import events as ev
from runtime.conversation.config import SessionConfig, TurnDetection
from runtime.conversation.history import SpokenSegment, heard_prefix
from runtime.conversation.reply import TOOL_CUT
from runtime.conversation.session import ConversationSession
from runtime.conversation.sinks import ImmediateSink
from runtime.conversation.tools import ClientTool, HttpTool
from runtime.endpoints import URLPolicy
from runtime.llm.client import ChatClient, ClientTimeouts, Endpoint, RetryPolicy
from runtime.llm.reference import ReferenceEndpoint, ReplyPlan
from runtime.speech.engines.piper import PiperTTS
from runtime.speech.engines.whisper import WhisperSTT
from runtime.speech.text import SegmenterConfig
from runtime.speech.tts import AudioChunk
from runtime.talk import OUTPUT_RATE

from ...helpers import SPEECH, serve_asgi
from .script import Step, Until, agent_heard_for, last_heard, replies_done, run_script

normalise = EnglishTextNormalizer()


def said(text: str) -> str:
    return str(normalise(text)).replace(",", "")


LONG_REPLY = (
    "Let me tell you about the weather in Paris this week. Monday starts cloudy with a light breeze. "
    "Tuesday brings scattered showers in the afternoon. Wednesday is sunny and warm. Thursday cools "
    "down again with some wind from the north. Friday looks pleasant for a walk along the river."
)


def utterance(name: str) -> bytes:
    return read_wav(SPEECH / f"{name}.wav").mono()


def silence(seconds: float) -> bytes:
    return bytes(int(seconds * 16000) * 2)


def active(pcm24k: bytes, start_s: float, end_s: float) -> bool:
    x = np.frombuffer(pcm24k, "<i2")[int(start_s * OUTPUT_RATE) : int(end_s * OUTPUT_RATE)]
    return bool(x.size) and float(np.sqrt(np.mean(x.astype(np.float64) ** 2))) > 100


@pytest.fixture
async def endpoint() -> AsyncIterator[ReferenceEndpoint]:
    async with ReferenceEndpoint(ReplyPlan(ttft_ms=50, itl_ms=5)) as server:
        yield server


def llm_for(server: ReferenceEndpoint, **kwargs) -> ChatClient:
    # The reference endpoint never opens think blocks in a template: replies stream.
    kwargs.setdefault("leading_reasoning", False)
    return ChatClient(Endpoint(server.base_url, "m"), policy=URLPolicy.operator(), **kwargs)


def chat_bodies(server: ReferenceEndpoint) -> list[dict[str, Any]]:
    return [r.body for r in server.requests if r.path.endswith("/chat/completions") and r.body]


async def test_two_turn_conversation(
    endpoint: ReferenceEndpoint, whisper: WhisperSTT, piper: PiperTTS
):
    endpoint.plan = ReplyPlan(
        ttft_ms=50, itl_ms=5, replies=("It is sunny in Paris.", "Your table is booked.")
    )
    first, second = utterance("shared-00-piper"), utterance("shared-01-piper")
    # The silence that ends any turn is never reached: a finished sentence ends its turn on
    # its words. The user asks again once the first answer has been heard.
    td = TurnDetection(min_silence_ms=300, max_silence_ms=20_000)
    steps: list[Step] = [silence(0.4), first, replies_done(1), silence(0.5), second, silence(0.5)]
    async with llm_for(endpoint) as llm:
        result = await run_script(
            steps, llm=llm, stt=whisper, tts=piper, config=SessionConfig(turn_detection=td)
        )
    events = result.events
    agent = [e for e in events if isinstance(e, ev.AgentTranscript)]
    assert [a.text for a in agent] == ["It is sunny in Paris.", "Your table is booked."]
    assert not any(a.interrupted for a in agent)
    assert [e.status for e in events if isinstance(e, ev.ReplyDone)] == ["completed", "completed"]
    # The second request carries the whole history, in the documented shape.
    bodies = chat_bodies(endpoint)
    messages = bodies[-1]["messages"]
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
    # (Whisper tiny hears "Paris" as "pairs" now and then.)
    assert normalise(messages[1]["content"]).replace("pairs", "paris") == normalise(
        "What's the weather like in Paris today?"
    )
    assert messages[2]["content"] == "It is sunny in Paris."
    assert normalise(messages[3]["content"]).replace("7 30", "730") == normalise(
        "Book a table for two at seven thirty tonight."
    )
    # Both replies are audible after their user turns, on one timeline, never over them.
    (s1, e1), (s2, e2) = segment_pcm(result.user, 16000, default_vad())
    # (How soon is the benchmarks' business: on a busy machine the replies come later.)
    assert not active(result.agent, s1, e1) and active(result.agent, e1, s2)
    assert not active(result.agent, s2, e2)
    assert active(result.agent, e2, len(result.agent) / (2 * OUTPUT_RATE))
    assert [m.user_text for m in result.metrics] == [messages[1]["content"], messages[3]["content"]]
    for m in result.metrics:
        assert m.ttft_ms is not None and m.ttft_ms >= 50
        assert m.overhead_ms is not None and m.overhead_ms >= 0
        # The turn ended on its words, after min_silence_ms and before max_silence_ms; the
        # reply was heard after the turn ended.
        assert m.endpointing_ms is not None and m.v2v_ms is not None
        assert td.min_silence_ms - 20 <= m.endpointing_ms < td.max_silence_ms
        assert m.endpointing_ms <= m.v2v_ms
    # Every event carries a timestamp from the session clock.
    assert all(isinstance(e.t_ns, int) and e.t_ns > 0 for e in events)
    # The input audio kept for re-transcription is let go when the session ends (the
    # session's objects wait for the cyclic collector; its audio must not).
    assert len(result.session._audio) == 0


async def test_barge_in_cuts_the_reply_and_keeps_only_what_was_heard(
    endpoint: ReferenceEndpoint, whisper: WhisperSTT, piper: PiperTTS
):
    endpoint.plan = ReplyPlan(
        ttft_ms=50, itl_ms=5, replies=(LONG_REPLY, "Sorry, what did you ask?")
    )
    first, stop = (
        utterance("shared-00-piper"),
        utterance("shared-11-piper"),
    )  # "Wait, stop, that's not what I asked."
    # The user barges in once the reply has been playing for a second.
    steps: list[Step] = [silence(0.4), first, agent_heard_for(1.0), stop, silence(0.5)]
    async with llm_for(endpoint) as llm:
        result = await run_script(steps, llm=llm, stt=whisper, tts=piper)
    events = result.events
    first_reply = next(e for e in events if isinstance(e, ev.AgentTranscript))
    assert first_reply.interrupted
    assert first_reply.text and LONG_REPLY.startswith(first_reply.text.rstrip(".,"))
    assert len(first_reply.text) < len(LONG_REPLY) / 2
    assert next(e.status for e in events if isinstance(e, ev.ReplyDone)) == "interrupted"
    # History holds only the heard prefix; the interruption became the next user turn.
    messages = chat_bodies(endpoint)[-1]["messages"]
    assert messages[2] == {"role": "assistant", "content": first_reply.text}
    assert "stop" in messages[3]["content"].lower()
    # The agent's audio stops while the user is still talking over it (how soon is measured in
    # benchmarks/turn_taking.py, not here: the decode that decides runs slower on a busy machine),
    # and the answer to the interruption only starts once they have finished.
    barge = result.starts[3]
    user_end = segment_pcm(result.user, 16000, default_vad())[-1][1]
    assert active(result.agent, barge - 0.6, barge)
    # The agent fell silent for good before the user finished (at least 300 ms before).
    cut = last_heard(result.agent, barge, user_end)
    assert cut is not None and cut < user_end - 0.3
    assert result.metrics[0].interrupted
    # The agent paused at the onset and the interruption cut it there: the history keeps
    # exactly the words of the audio that was played (silences aside).
    seq = core_sequence(events)
    assert seq[:4] == ["speech.started", "speech.stopped", "transcript.user", "reply.started"]
    # Then, in an order the loop decides: the interruption's turn opens and the first reply ends
    # interrupted; the second reply answers it. No other turn, no other reply.
    second = seq.index("reply.started", 4)
    assert sorted(seq[4:second]) == sorted(
        ["speech.started", "speech.stopped", "transcript.user", "transcript.agent (interrupted)",
         "reply.done interrupted"]
    ), seq  # fmt: skip
    assert seq.count("speech.started") == 2 and seq.count("reply.started") == 2, seq
    # The answer to the interruption starts only after the user finished: up to then the
    # timeline holds the first reply alone.
    assert first_reply.text in texts_heard(result, until_s=user_end, reply=LONG_REPLY)


def texts_heard(result: Any, until_s: float, reply: str) -> set[str]:
    """The first reply's text as far as a listener heard it up to ``until_s`` on the timeline.

    What was played, silences aside (a pause of the reply, the sink's gaps), is a prefix of the
    reply's audio; the sample count it ends on, to the sample, falls between two written samples
    of equal value, so the set holds the text for each sample count that fits. Audio written
    after the last finished segment belongs to the segment the cut fell in: its text is the
    rest of ``reply`` up to a mark where such a segment may end.
    """
    events = result.events
    first_id = next(e.reply_id for e in events if isinstance(e, ev.ReplyStarted))
    segments: list[SpokenSegment] = []
    written = bytearray()
    for e in events:
        if isinstance(e, ev.ReplyAudio) and e.reply_id == first_id:
            written += e.pcm
        elif isinstance(e, ev.AgentTranscriptDelta) and e.reply_id == first_id:
            start = segments[-1].end if segments else 0
            segments.append(SpokenSegment(e.delta, start, len(written) // 2))
    done = segments[-1].end if segments else 0
    cuts = [segments]
    if len(written) // 2 > done:
        # A segment after the first ends at a clause mark or at a sentence's end once it holds
        # min_chars: the candidates run up to the first such sentence end.
        rest = reply.split()[sum(len(seg.text.split()) for seg in segments) :]
        cuts = []
        for i, word in enumerate(rest):
            text = " ".join(rest[: i + 1])
            if word[-1] in ".,;:!?" and len(text) >= SegmenterConfig().min_chars:
                cuts.append([*segments, SpokenSegment(text, done, len(written) // 2)])
                if word[-1] in ".!?":
                    break
    upto = result.agent[: int(until_s * OUTPUT_RATE) * 2]
    played = int(np.count_nonzero(np.frombuffer(upto, "<i2")))
    nonzero = np.cumsum(np.frombuffer(bytes(written), "<i2") != 0)
    first_k = int(np.searchsorted(nonzero, played, side="left")) + 1
    last_k = int(np.searchsorted(nonzero, played, side="right"))
    assert 0 < first_k <= last_k < len(written) // 2
    return {heard_prefix(cut, k) for cut in cuts for k in range(first_k, last_k + 1)}


def without_zeros(pcm: bytes) -> bytes:
    """The samples that are not exact silence (what a pause or a gap of the sink adds is)."""
    x = np.frombuffer(pcm, "<i2")
    return bytes(x[x != 0].tobytes())


def zero_runs(pcm24k: bytes, min_s: float) -> list[tuple[float, float]]:
    """``(start, end)`` seconds of each run of exact silence at least ``min_s`` long."""
    x = np.frombuffer(pcm24k, "<i2")
    edges = np.diff(np.concatenate(([0], (x == 0).astype(np.int8), [0])))
    starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
    return [
        (a / OUTPUT_RATE, b / OUTPUT_RATE)
        for a, b in zip(starts, ends, strict=True)
        if b - a >= min_s * OUTPUT_RATE
    ]


def core_sequence(events: list[ev.ConversationEvent]) -> list[str]:
    """The turn and reply events in order (what the realtime protocol renders)."""
    names = {
        ev.SpeechStarted: "speech.started", ev.SpeechStopped: "speech.stopped",
        ev.UserTranscript: "transcript.user", ev.ReplyStarted: "reply.started",
        ev.AgentTranscript: "transcript.agent", ev.ReplyDone: "reply.done",
    }  # fmt: skip
    out = []
    for e in events:
        name = names.get(type(e))
        if name == "transcript.agent":
            assert isinstance(e, ev.AgentTranscript)
            name += " (interrupted)" if e.interrupted else ""
        if name == "reply.done":
            assert isinstance(e, ev.ReplyDone)
            name += f" {e.status}"
        if name is not None:
            out.append(name)
    return out


async def test_a_backchannel_over_the_reply_pauses_it_and_it_goes_on_heard_whole_once(
    endpoint: ReferenceEndpoint, whisper: WhisperSTT, piper: PiperTTS
):
    endpoint.plan = ReplyPlan(ttft_ms=50, itl_ms=5, replies=(LONG_REPLY,))
    # A hummed "Mm-hmm." (Whisper writes it "MMM." or, unsure of every word, "MMI.", "MMO.").
    mm = utterance("mm-hmm-piper")
    steps: list[Step] = [
        silence(0.4),
        utterance("shared-00-piper"),
        agent_heard_for(1.5),
        mm,
        silence(0.5),
    ]
    async with llm_for(endpoint) as llm:
        result = await run_script(steps, llm=llm, stt=whisper, tts=piper)
    events = result.events
    # One turn, one reply, completed: the back-channel opened no turn and no second reply.
    assert core_sequence(events) == [
        "speech.started", "speech.stopped", "transcript.user", "reply.started",
        "transcript.agent", "reply.done completed",
    ], [e.text for e in events if isinstance(e, ev.UserTranscript)]  # fmt: skip
    replies = {e.reply_id for e in events if isinstance(e, ev.ReplyAudio)}
    assert len(replies) == 1
    agent = next(e for e in events if isinstance(e, ev.AgentTranscript))
    assert agent.text == LONG_REPLY and not agent.interrupted
    assert result.history[-1] == {"role": "assistant", "content": LONG_REPLY}
    # The agent paused while the user said it: a stretch of silence (no sentence pause of the
    # voice is as long) that begins during the back-channel.
    mm_start = result.starts[3]
    mm_end = mm_start + len(mm) / 2 / 16000
    pauses = [(a, b) for a, b in zero_runs(result.agent, 0.6) if mm_start <= a <= mm_end]
    assert len(pauses) == 1, zero_runs(result.agent, 0.3)
    # Nothing lost or repeated: what was heard, silences aside, is every sample the voice made,
    # once, in order.
    written = b"".join(e.pcm for e in events if isinstance(e, ev.ReplyAudio))
    assert without_zeros(result.agent) == without_zeros(written)
    # And as a listener hears it: every word of the reply, none twice.
    # (Each stretch between long silences on its own: Whisper hears 30 s at a time.)
    gaps = zero_runs(result.agent, 0.6)
    cuts = [0, *[int(a * OUTPUT_RATE) * 2 for a, _ in gaps], len(result.agent)]
    texts = []
    for a, b in itertools.pairwise(cuts):
        if np.any(np.frombuffer(result.agent[a:b], "<i2")):
            texts.append((await whisper.transcribe(result.agent[a:b], OUTPUT_RATE)).text)
    heard = " ".join(texts)
    got, want = said(heard).split(), said(LONG_REPLY).split()
    ops = difflib.SequenceMatcher(a=want, b=got, autojunk=False).get_opcodes()
    stretches = [(op, want[i1:i2], got[j1:j2]) for op, i1, i2, j1, j2 in ops if op != "equal"]
    # A misheard word or two is the recognizer; a lost or repeated stretch is not.
    assert all(i2 - i1 <= 2 and j2 - j1 <= 2 for _, i1, i2, j1, j2 in ops if _ != "equal"), (
        stretches
    )
    assert abs(len(got) - len(want)) <= 2, stretches


async def test_after_a_backchannel_resumed_the_reply_an_interruption_cuts_it_where_it_was_heard(
    endpoint: ReferenceEndpoint, whisper: WhisperSTT, piper: PiperTTS
):
    endpoint.plan = ReplyPlan(ttft_ms=50, itl_ms=5, replies=(LONG_REPLY, "Sorry, go ahead."))
    mm, stop = utterance("mm-hmm-piper"), utterance("shared-11-piper")
    # "Mm-hmm." over the reply, which pauses and goes on; then "Wait, stop, that's not what I
    # asked." once it has been heard again for a while.
    steps: list[Step] = [
        silence(0.4), utterance("shared-00-piper"), agent_heard_for(1.0), mm,
        agent_heard_for(3.5), stop, silence(0.5),
    ]  # fmt: skip
    async with llm_for(endpoint) as llm:
        result = await run_script(steps, llm=llm, stt=whisper, tts=piper)
    events = result.events
    seq = core_sequence(events)
    # The back-channel opened no turn; the interruption did, and it alone was answered.
    assert seq.count("speech.started") == 2 and seq.count("reply.started") == 2, seq
    assert seq.count("reply.done interrupted") == 1, seq
    first_reply = next(e for e in events if isinstance(e, ev.AgentTranscript))
    assert first_reply.interrupted
    # It paused during the "Mm-hmm" and went on: the pause and the words on both sides of it
    # were heard, and the history keeps exactly those words, no more.
    mm_start = result.starts[3]
    mm_end = mm_start + len(mm) / 2 / 16000
    assert [a for a, _ in zero_runs(result.agent, 0.6) if mm_start <= a <= mm_end] != []
    user_end = segment_pcm(result.user, 16000, default_vad())[-1][1]
    assert active(result.agent, mm_end + 0.6, result.starts[5])
    assert first_reply.text in texts_heard(result, until_s=user_end, reply=LONG_REPLY)
    assert LONG_REPLY.startswith(first_reply.text.rstrip(".,")) and len(first_reply.text) < len(
        LONG_REPLY
    )
    messages = chat_bodies(endpoint)[-1]["messages"]
    assert messages[2] == {"role": "assistant", "content": first_reply.text}
    assert "stop" in messages[3]["content"].lower()
    assert len(messages) == 4  # the back-channel is in no message


async def test_no_interruption_when_interrupt_response_is_off(
    endpoint: ReferenceEndpoint, whisper: WhisperSTT, piper: PiperTTS
):
    endpoint.plan = ReplyPlan(
        ttft_ms=50, itl_ms=5, replies=("Sure. It will be sunny all week in Paris.",)
    )
    # "Wait, stop, that's not what I asked." said over the reply once it is heard.
    steps: list[Step] = [silence(0.4), utterance("shared-00-piper"), agent_heard_for(0.3),
             utterance("shared-11-piper"), silence(0.3)]  # fmt: skip
    config = SessionConfig(turn_detection=TurnDetection(interrupt_response=False))
    async with llm_for(endpoint) as llm:
        result = await run_script(steps, llm=llm, stt=whisper, tts=piper, config=config)
    first = next(e for e in result.events if isinstance(e, ev.AgentTranscript))
    assert not first.interrupted and first.text == "Sure. It will be sunny all week in Paris."
    # The agent finished first, then answered what was said over it.
    assert [e.status for e in result.events if isinstance(e, ev.ReplyDone)] == ["completed"] * 2


async def test_greeting_is_spoken_verbatim_and_kept_in_history(
    endpoint: ReferenceEndpoint, whisper: WhisperSTT, piper: PiperTTS
):
    endpoint.plan = ReplyPlan(ttft_ms=50, itl_ms=5, replies=("Of course.",))
    greeting = "Hi, this is Northwind. How can I help?"
    # The user speaks once the greeting is over.
    steps: list[Step] = [replies_done(1), silence(0.5), utterance("shared-04-piper"), silence(0.3)]
    async with llm_for(endpoint) as llm:
        result = await run_script(
            steps, llm=llm, stt=whisper, tts=piper, config=SessionConfig(greeting=greeting)
        )
    transcripts = [e for e in result.events if isinstance(e, ev.AgentTranscript)]
    assert transcripts[0].text == greeting and not transcripts[0].interrupted
    assert active(result.agent, 0.0, result.starts[2])  # heard before the user spoke
    messages = chat_bodies(endpoint)[0]["messages"]
    assert messages[1] == {"role": "assistant", "content": greeting}
    assert messages[2]["role"] == "user"


async def run_injected(
    server: ReferenceEndpoint,
    piper: PiperTTS,
    whisper: WhisperSTT,
    texts: list[str],
    *,
    config: SessionConfig | None = None,
    llm_kwargs: dict[str, Any] | None = None,
    on_session=None,
    tool_policy=None,
) -> tuple[list[ev.ConversationEvent], ConversationSession]:
    """Drive a session with text turns (``conversation.message`` + ``reply.create``), rendering audio offline."""
    events: list[ev.ConversationEvent] = []
    async with llm_for(server, **(llm_kwargs or {})) as llm:
        session = ConversationSession(
            config=config or SessionConfig(),
            llm=llm,
            stt=whisper,
            tts=piper,
            sink=ImmediateSink(OUTPUT_RATE),
            on_event=events.append,
            tool_policy=tool_policy,
        )
        if on_session:
            on_session(session)

        async def frames():
            for text in texts:
                session.inject_user_text(text)
                await session.wait_idle()
            return
            yield

        await session.run(frames())
    return events, session


@pytest.mark.parametrize(
    "fault",
    [
        ReplyPlan(fault="status", status=500),
        ReplyPlan(fault="status", status=429, retry_after="0"),
        ReplyPlan(fault="hang", fault_after=0),
        ReplyPlan(fault="drop", fault_after=3),
        ReplyPlan(fault="malformed", fault_after=2),
    ],
    ids=["500", "429", "hang", "drop-mid-reply", "malformed"],
)
async def test_endpoint_failures_apologise_and_the_next_turn_works(
    endpoint: ReferenceEndpoint, whisper: WhisperSTT, piper: PiperTTS, fault: ReplyPlan
):
    endpoint.plan = ReplyPlan(replies=("All good now.",))
    # Before the first token the client retries once; after it, never.
    after_first_token = fault.fault in ("drop", "malformed") and fault.fault_after > 0
    endpoint.queue(*([fault] if after_first_token else [fault, fault]))
    events, session = await run_injected(
        endpoint,
        piper,
        whisper,
        ["Hello?", "Are you there?"],
        llm_kwargs={
            "timeouts": ClientTimeouts(first_token_s=0.3, stall_s=0.3),
            "retry": RetryPolicy(max_attempts=2, backoff_s=0),
        },
    )
    errors = [e for e in events if isinstance(e, ev.ReplyError)]
    assert len(errors) == 1
    assert errors[0].code in {"server", "rate_limit", "timeout", "dropped", "malformed"}
    transcripts = [e for e in events if isinstance(e, ev.AgentTranscript)]
    assert session.config.apology in transcripts[0].text
    assert transcripts[-1].text == "All good now."
    assert [e.status for e in events if isinstance(e, ev.ReplyDone)] == ["failed", "completed"]
    # The failed turn's user message is kept; the apology is not put in the model's mouth.
    roles = [m["role"] for m in session.history]
    assert roles == ["system", "user", "user", "assistant"]


class FullSpeaker(ImmediateSink):
    """A speaker whose buffer takes the first write and then stays full (the reply paused
    over the user): later writes wait; ``played`` is set by the test."""

    def __init__(self, sample_rate: int) -> None:
        super().__init__(sample_rate)
        self.played = 0
        self.writes: list[int] = []
        self._never = asyncio.Event()

    @property
    def played_samples(self) -> int:
        return self.played

    async def write(self, pcm: bytes) -> None:
        if self.writes:
            await self._never.wait()
        self.writes.append(len(pcm) // 2)
        self.audio += pcm


async def cut_after_the_first_write(
    endpoint: ReferenceEndpoint, tts: Any, whisper: WhisperSTT, played_share: float
) -> tuple[FullSpeaker, list[ev.ConversationEvent], ConversationSession]:
    """One reply to "Hello?" on a :class:`FullSpeaker`, cut once its first write is in and
    ``played_share`` of that write has played."""
    endpoint.plan = ReplyPlan(
        replies=("It's sunny and mild in Paris today, around eighteen degrees.",)
    )
    sink = FullSpeaker(OUTPUT_RATE)
    events: list[ev.ConversationEvent] = []

    def on_event(event: ev.ConversationEvent) -> None:
        events.append(event)
        if isinstance(event, ev.ReplyAudio) and len(sink.writes) == 1 and not sink.played:
            sink.played = int(sink.writes[0] * played_share)
            asyncio.get_running_loop().call_soon(session.cancel_reply)

    async with llm_for(endpoint) as llm:
        session = ConversationSession(
            config=SessionConfig(), llm=llm, stt=whisper, tts=tts, sink=sink, on_event=on_event
        )

        async def frames() -> AsyncIterator[Any]:
            session.inject_user_text("Hello?")
            await session.wait_idle()
            return
            yield

        await session.run(frames())
    return sink, events, session


async def test_a_barge_in_before_a_segments_last_chunk_keeps_what_was_heard_of_it(
    endpoint: ReferenceEndpoint, piper: PiperTTS, whisper: WhisperSTT
):
    # Piper writes a segment in two chunks: the sentence, then the resampler's tail. Cut
    # while the tail waits on a full speaker, half of the sentence's audio played: the words
    # of that half were heard, and only they go into the history.
    sink, events, session = await cut_after_the_first_write(endpoint, piper, whisper, 0.5)
    assert len(sink.writes) == 1  # the tail never got in: the cut came before it
    done = [e for e in events if isinstance(e, ev.AgentTranscript)]
    assert [(e.text, e.interrupted) for e in done] == [("It's sunny and", True)]
    assert session.history[-1] == {"role": "assistant", "content": "It's sunny and"}


class StreamingVoice:
    """Piper's audio for each segment, written in 100 ms chunks, as a streaming voice does."""

    def __init__(self, inner: PiperTTS) -> None:
        self.inner = inner

    @property
    def name(self) -> str:
        return "streaming-piper"

    def voices(self) -> Any:
        return self.inner.voices()

    def synthesize(self, text: str, *, voice: str | None = None, sample_rate: int = 24000) -> Any:
        return _Chunked(self.inner.synthesize(text, voice=voice, sample_rate=sample_rate))

    async def aclose(self) -> None:
        """The wrapped voice is the fixture's: it stays open."""


class _Chunked:
    def __init__(self, run: Any) -> None:
        self.run = run

    def __aiter__(self) -> AsyncIterator[AudioChunk]:
        return self._chunks()

    async def _chunks(self) -> AsyncIterator[AudioChunk]:
        async for chunk in self.run:
            step = chunk.sample_rate // 10 * 2
            for i in range(0, len(chunk.pcm), step):
                yield AudioChunk(
                    pcm=chunk.pcm[i : i + step], sample_rate=chunk.sample_rate, text=chunk.text
                )

    def cancel(self) -> None:
        self.run.cancel()

    async def aclose(self) -> None:
        await self.run.aclose()


async def test_a_barge_in_early_in_a_streaming_voices_segment_does_not_claim_the_segment(
    endpoint: ReferenceEndpoint, piper: PiperTTS, whisper: WhisperSTT
):
    # The voice had written 100 ms of a 2 s clause when the user cut in, and all of it
    # played: none of the clause's seven words was heard (it was all of them).
    voice = StreamingVoice(piper)
    sink, events, session = await cut_after_the_first_write(endpoint, voice, whisper, 1.0)
    assert len(sink.writes) == 1 and 0 < sink.writes[0] <= OUTPUT_RATE // 10
    done = [e for e in events if isinstance(e, ev.AgentTranscript)]
    assert [(e.text, e.interrupted) for e in done] == [("", True)]
    assert session.history[-1] == {"role": "user", "content": "Hello?"}


async def test_empty_completion_says_nothing(
    endpoint: ReferenceEndpoint, whisper: WhisperSTT, piper: PiperTTS
):
    endpoint.queue(ReplyPlan(fault="empty"))
    endpoint.plan = ReplyPlan(replies=("Yes?",))
    events, _ = await run_injected(endpoint, piper, whisper, ["Hmm.", "Hello?"])
    assert not [e for e in events if isinstance(e, ev.ReplyError)]
    transcripts = [e.text for e in events if isinstance(e, ev.AgentTranscript)]
    assert transcripts == ["", "Yes?"]
    assert not [e for e in events if isinstance(e, ev.ReplyAudio) and e.reply_id == "reply_1"]


async def test_client_tool_round_trip(
    endpoint: ReferenceEndpoint, whisper: WhisperSTT, piper: PiperTTS
):
    endpoint.queue(ReplyPlan(tool_name="get_weather", tool_arguments='{"city": "Paris"}'))
    endpoint.plan = ReplyPlan(replies=("It is twenty degrees in Paris.",))
    holder: dict[str, Any] = {}

    def watch(session: ConversationSession) -> None:
        holder["session"] = session
        original = session._emit_hook

        def hook(event):
            original(event)
            if isinstance(event, ev.ToolCallRequested):
                session.submit_tool_result(event.call_id, json.dumps({"temp_c": 20}))

        session._emit_hook = hook

    config = SessionConfig(
        tools=(
            ClientTool(
                "get_weather",
                "Current weather",
                {"type": "object", "properties": {"city": {"type": "string"}}},
            ),
        )
    )
    events, _ = await run_injected(
        endpoint, piper, whisper, ["Weather in Paris?"], config=config, on_session=watch
    )
    calls = [e for e in events if isinstance(e, ev.ToolCallRequested)]
    assert (
        len(calls) == 1
        and calls[0].name == "get_weather"
        and calls[0].arguments == {"city": "Paris"}
    )
    bodies = chat_bodies(endpoint)
    assert bodies[0]["tools"][0]["function"]["name"] == "get_weather"
    second = bodies[1]["messages"]
    assert (
        second[-2]["role"] == "assistant"
        and second[-2]["tool_calls"][0]["function"]["name"] == "get_weather"
    )
    assert second[-1] == {
        "role": "tool",
        "tool_call_id": calls[0].call_id,
        "content": '{"temp_c": 20}',
    }
    assert [e.text for e in events if isinstance(e, ev.AgentTranscript)] == [
        "It is twenty degrees in Paris."
    ]


async def test_a_turn_whose_reply_ran_a_tool_is_not_taken_back_and_the_tool_runs_once(
    endpoint: ReferenceEndpoint, whisper: WhisperSTT, piper: PiperTTS
):
    # "I want to fly from Boston to" [pause] "New York next week.": the turn ends at the
    # pause and its reply calls a client tool at once, which answers slowly (here: once the
    # user speaks again). Before the reply is audible the user goes on: a turn whose reply
    # ran a tool is not taken back (the tool acted; taking it back called it again for the
    # same words, and left its first call out of the history); the user's words interrupt.
    config = SessionConfig(
        tools=(ClientTool("find_flights", "Flights between two cities",
                          {"type": "object", "properties": {"to": {"type": "string"}}}),),
    )  # fmt: skip
    endpoint.queue(ReplyPlan(ttft_ms=50, itl_ms=5, tool_name="find_flights",
                             tool_arguments='{"to": "?"}'))  # fmt: skip
    endpoint.plan = ReplyPlan(ttft_ms=50, itl_ms=5, replies=("Which day?",))
    pcm = utterance("paused-boston")
    first, rest = pcm[: 2 * 16000 * 2], pcm[2 * 16000 * 2 :]
    called = Until(
        "the tool call",
        lambda p: any(isinstance(e, ev.ToolCallRequested) for e in p.events),
        limit_s=4.0,
    )
    pending: list[str] = []

    def slow_tool(session: ConversationSession, event: ev.ConversationEvent) -> None:
        if isinstance(event, ev.ToolCallRequested):
            pending.append(event.call_id)
        elif isinstance(event, ev.SpeechStarted) and pending:
            session.submit_tool_result(pending.pop(), '{"flights": 3}')

    steps: list[Step] = [silence(0.4), first, called, rest, silence(0.5)]
    async with llm_for(endpoint) as llm:
        result = await run_script(
            steps, llm=llm, stt=whisper, tts=piper, config=config, on_event=slow_tool
        )
    calls = [e for e in result.events if isinstance(e, ev.ToolCallRequested)]
    assert [c.name for c in calls] == ["find_flights"]
    history = result.session.history
    asked = [m for m in history if m.get("tool_calls")]
    answers = [m for m in history if m["role"] == "tool"]
    assert [m["tool_calls"][0]["id"] for m in asked] == [calls[0].call_id]
    assert answers == [{"role": "tool", "tool_call_id": calls[0].call_id, "content": TOOL_CUT}]
    users = [normalise(m["content"]) for m in history if m["role"] == "user"]
    assert len(users) == 2 and "new york next week" in users[1], users
    assert history[-1] == {"role": "assistant", "content": "Which day?"}


async def test_http_tool_against_a_loopback_server(
    endpoint: ReferenceEndpoint, whisper: WhisperSTT, piper: PiperTTS
):
    seen: list[dict[str, Any]] = []

    async def weather(request: Request):
        seen.append(await request.json())
        return PlainTextResponse("sunny, 21 C " + "x" * 20000)

    async def moved(request: Request):
        return PlainTextResponse(
            "", status_code=302, headers={"location": "http://169.254.169.254/"}
        )

    app = Starlette(
        routes=[
            Route("/weather", weather, methods=["POST"]),
            Route("/moved", moved, methods=["POST"]),
        ]
    )
    async with serve_asgi(app) as port:
        tools = (
            HttpTool("weather", f"http://127.0.0.1:{port}/weather"),
            HttpTool("moved", f"http://127.0.0.1:{port}/moved"),
            HttpTool("private", "http://10.1.2.3/x"),
        )
        # Only loopback is allowed, explicitly, for this test.
        policy = URLPolicy(
            require_https=False, allowed_networks=(ipaddress.ip_network("127.0.0.0/8"),)
        )
        for name in ("weather", "moved", "private"):
            endpoint.queue(
                ReplyPlan(tool_name=name, tool_arguments='{"city": "Paris"}'),
                ReplyPlan(replies=("Done.",)),
            )
        events, session = await run_injected(
            endpoint,
            piper,
            whisper,
            ["one", "two", "three"],
            config=SessionConfig(tools=tools),
            tool_policy=policy,
        )
    assert seen == [{"city": "Paris"}]
    tool_results = [m["content"] for m in session.history if m["role"] == "tool"]
    assert tool_results[0].startswith("sunny, 21 C") and len(tool_results[0]) == 8 * 1024
    assert tool_results[1] == "Error: the tool answered HTTP 302."
    assert tool_results[2].startswith("Error: the tool's URL is not allowed")
    assert [e.text for e in events if isinstance(e, ev.AgentTranscript)] == [
        "Done.",
        "Done.",
        "Done.",
    ]


async def test_the_connection_is_prewarmed_at_session_start(
    endpoint: ReferenceEndpoint, whisper: WhisperSTT, piper: PiperTTS
):
    await run_injected(endpoint, piper, whisper, ["Hi"])
    assert endpoint.requests[0].path.endswith("/models")
    assert {r.connection for r in endpoint.requests} == {1}
