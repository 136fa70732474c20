"""The early speculative decode (``speculate_ms``), on real audio, Whisper and the reference endpoint.

The reply's request leaves on the transcript decoded at ``speculate_ms`` of
silence; the end of turn still reads the transcript decoded at ``pause_ms``.
The server's receive times and the session's decisions share one clock
(``perf_counter_ns``).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from audio.frame import AudioFrame
from runtime.conversation import events as ev
from runtime.conversation.config import SessionConfig, TurnDetection
from runtime.conversation.policy import (
    Decision,
    EndTurn,
    Pause,
    Resume,
    Speculate,
    StartTurn,
    TurnTakingPolicy,
)
from runtime.llm.reference import ReferenceEndpoint, ReplyPlan
from runtime.speech.engines.piper import PiperTTS
from runtime.speech.engines.whisper import WhisperSTT

from .script import Scripted, Step, Until, run_script
from .test_conversation import active, llm_for, normalise, silence, utterance
from .test_speculation import ADDRESS, CANCEL, SPECULATIVE, chats


class RecordingPolicy(TurnTakingPolicy):
    """The default policy, with a record of its decisions and of the transcripts it read."""

    def __init__(self, td: TurnDetection) -> None:
        super().__init__(td)
        self.decisions: list[tuple[int, Decision]] = []  # (t_ns, decision)
        self.read: list[str] = []

    def frame(self, speech: bool, t_ns: int) -> list[Decision]:
        out = super().frame(speech, t_ns)
        self.decisions += [(t_ns, d) for d in out]
        return out

    def partial(
        self, text: str, end_confidence: float | None = None, t_ns: int | None = None
    ) -> list[Decision]:
        self.read.append(text)
        return super().partial(text, end_confidence, t_ns)


@pytest.fixture
async def endpoint() -> AsyncIterator[ReferenceEndpoint]:
    async with ReferenceEndpoint(ReplyPlan(ttft_ms=50, itl_ms=5)) as server:
        yield server


async def converse(
    endpoint: ReferenceEndpoint,
    whisper: WhisperSTT,
    piper: PiperTTS,
    td: TurnDetection,
    plan: ReplyPlan,
    steps: list[Step],
) -> tuple[Scripted, RecordingPolicy]:
    """``steps`` through a session on ``td``, Whisper warm, the endpoint answering ``plan``."""
    await asyncio.to_thread(whisper.warmup)
    policy = RecordingPolicy(td)
    endpoint.plan = plan
    async with llm_for(endpoint) as llm:
        result = await run_script(
            steps, llm=llm, stt=whisper, tts=piper,
            config=SessionConfig(turn_detection=td), policy=policy,
        )  # fmt: skip
    return result, policy


def frames(pcm: bytes) -> list[AudioFrame]:
    return [AudioFrame(pcm=pcm[i : i + 640], sample_rate=16000) for i in range(0, len(pcm), 640)]


async def test_the_early_decode_feeds_the_speculative_reply_only(whisper: WhisperSTT) -> None:
    # Whisper's turn: the early decode is neither the partial the end of turn reads nor the
    # final transcript; both come from the pause's decode of the longer audio.
    await asyncio.to_thread(whisper.warmup)
    turn = whisper.start_turn()
    said = utterance("shared-04-piper") + silence(0.06)
    for f in frames(said):
        turn.push(f)
    assert turn.speculate(within_ms=60_000) is True
    early = await turn.early()
    assert early is not None and normalise(early.text) == normalise(CANCEL)
    assert early.audio_ms == len(said) / 32
    assert turn.partial is None
    assert await turn.speculative() is None
    for f in frames(silence(0.1)):
        turn.push(f)
    turn.pause()
    paused = await turn.speculative()
    assert paused is not None and paused.audio_ms == (len(said) + 3200) / 32
    partial = turn.partial
    assert partial is not None and partial.audio_ms == paused.audio_ms
    final = await turn.finalize()
    assert final.speculative is True and final.text == paused.text
    assert final.end_confidence == paused.end_confidence


async def test_a_busy_or_slow_recognizer_skips_the_early_decode(whisper: WhisperSTT) -> None:
    await asyncio.to_thread(whisper.warmup)
    turn = whisper.start_turn()
    for f in frames(utterance("shared-04-piper")):
        turn.push(f)
    # Its recent decodes took longer than the time left before the pause's decode.
    assert turn.speculate(within_ms=0.0) is False
    assert await turn.early() is None
    # Already decoding (the pause's decode is queued or running).
    turn.pause()
    assert turn.speculate(within_ms=60_000) is False
    await turn.speculative()
    await turn.aclose()


async def test_the_request_leaves_on_the_early_transcript_and_the_end_is_decided_at_the_pause(
    endpoint: ReferenceEndpoint, whisper: WhisperSTT, piper: PiperTTS
) -> None:
    td = TurnDetection(speculate_ms=40, pause_ms=600, min_silence_ms=800, max_silence_ms=1200)
    plan = ReplyPlan(ttft_ms=50, itl_ms=5, replies=("Your subscription is cancelled.",))
    steps: list[Step] = [silence(0.4), utterance("shared-04-piper"), silence(1.5)]
    result, policy = await converse(endpoint, whisper, piper, td, plan, steps)
    kinds = [type(d) for _, d in policy.decisions]
    # One turn: it ends once, after the pause, whatever speculations came and went inside it.
    assert kinds[0] is StartTurn and kinds.count(EndTurn) == 1 and kinds[-1] is EndTurn
    assert kinds[-3:] == [Speculate, Pause, EndTurn]
    [t_speculate] = [t for t, d in policy.decisions[-3:] if isinstance(d, Speculate)]
    [t_pause] = [t for t, d in policy.decisions if isinstance(d, Pause)]
    # The one request left on the early transcript, before the pause's decode was even asked.
    [request] = chats(endpoint)
    assert normalise(request.body["messages"][-1]["content"]) == normalise(CANCEL)
    assert t_speculate < request.received_ns < t_pause
    # The end of turn read only the pause's decode: one transcript, the final one.
    [final] = [e.text for e in result.events if isinstance(e, ev.UserTranscript)]
    assert policy.read == [final]
    [metrics] = result.metrics
    assert metrics.speculative is True
    assert sum(isinstance(e, ev.ReplyStarted) for e in result.events) == 1
    assert [e.text for e in result.events if isinstance(e, ev.AgentTranscript)] == [
        "Your subscription is cancelled."
    ]


async def test_going_on_after_the_early_decode_withdraws_its_reply(
    endpoint: ReferenceEndpoint, whisper: WhisperSTT, piper: PiperTTS
) -> None:
    # The pause's decode never comes between the two sentences: only the early one.
    td = TurnDetection(speculate_ms=40, pause_ms=3000, min_silence_ms=3000, max_silence_ms=5000)
    plan = ReplyPlan(ttft_ms=50, itl_ms=20, replies=(SPECULATIVE, *["Done."] * 20))
    first, second = utterance("shared-04-piper"), utterance("shared-05-piper")
    asked = Until("the early request", lambda _p: bool(chats(endpoint)), limit_s=4.0)
    steps: list[Step] = [silence(0.4), first, asked, second, silence(3.5)]
    result, policy = await converse(endpoint, whisper, piper, td, plan, steps)
    requests = chats(endpoint)
    spec, final = requests[0], requests[-1]
    # The early request carried the first sentence and was abandoned when the user went on,
    # with no pause between: speculated, then resumed.
    assert normalise(spec.body["messages"][-1]["content"]) == normalise(CANCEL)
    assert spec.disconnected_ns is not None and spec.disconnected_ns < final.received_ns
    before_second = [d for t, d in policy.decisions if t < spec.disconnected_ns]
    assert Pause not in [type(d) for d in before_second]
    assert [type(d) for _, d in policy.decisions].count(Resume) >= 1
    # Nothing of it was heard; no word of the turn was lost: one user message, both sentences.
    assert not active(result.agent, 0.0, result.starts[4])
    assert normalise(final.body["messages"][-1]["content"]) == normalise(f"{CANCEL} {ADDRESS}")
    [transcript] = [e.text for e in result.events if isinstance(e, ev.UserTranscript)]
    assert normalise(transcript) == normalise(f"{CANCEL} {ADDRESS}")
    assert [e.text for e in result.events if isinstance(e, ev.AgentTranscript)] == ["Done."]
    assert sum(isinstance(e, ev.ReplyStarted) for e in result.events) == 1
    assert "Never heard" not in str(final.body["messages"])
