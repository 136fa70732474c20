"""Conversations scripted by order: the user goes on once the agent has done what the test needs.

A fixed gap in the input ("the reply will be playing 4 s after the question") holds on a quiet
machine and not on a busy one, where the decode and the reply come later. A script waits instead:
the input runs in real time as in ``voxloop talk --input`` (the agent plays against the loop
clock, the user is recorded frame by frame), and an :class:`Until` step streams silence until
its condition holds, so every test asserts what was said and in what order, never how soon.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from audio.frame import AudioFrame
from audio.reframe import Reframer
from runtime.conversation import events as ev
from runtime.conversation.config import SessionConfig
from runtime.conversation.policy import TurnTakingPolicy
from runtime.conversation.session import RATE, ConversationSession
from runtime.conversation.sinks import TimelineSink
from runtime.llm.client import ChatClient
from runtime.speech.stt import SpeechToText
from runtime.speech.tts import TextToSpeech
from runtime.talk import OUTPUT_RATE, TAIL_S, LoopPacer

# What a condition may take before the script gives up (seconds of input): far beyond any
# decode or reply on a busy machine, and a failure naming the step rather than a hang.
WAIT_LIMIT_S = 60.0


@dataclass
class Progress:
    """What the script's conditions read while the conversation runs."""

    events: list[ev.ConversationEvent] = field(default_factory=list)
    sink: TimelineSink | None = None

    def done(self) -> list[str]:
        """The statuses of the replies finished so far, in order."""
        return [e.status for e in self.events if isinstance(e, ev.ReplyDone)]

    def heard_s(self) -> float:
        """Seconds of agent audio played so far."""
        assert self.sink is not None
        return self.sink.played_samples / OUTPUT_RATE


@dataclass(frozen=True)
class Until:
    """Silence until ``condition(progress)`` holds (``what`` names it in a failure).

    ``limit_s``: the silence after which the script fails instead.
    """

    what: str
    condition: Callable[[Progress], bool]
    limit_s: float = WAIT_LIMIT_S


def replies_done(n: int) -> Until:
    """Until ``n`` replies have finished (completed, cut or failed)."""
    return Until(f"{n} replies finished", lambda p: len(p.done()) >= n)


def agent_heard_for(seconds: float) -> Until:
    """Until the agent has been heard for ``seconds`` in all (its reply is playing)."""
    return Until(f"{seconds} s of agent audio heard", lambda p: p.heard_s() >= seconds)


Step = bytes | Until


@dataclass(frozen=True)
class Scripted:
    """A scripted conversation's outcome.

    ``user``: the user's channel as streamed (16 kHz); ``agent``: what a listener heard on the
    same timeline (24 kHz); ``starts``: the second of the timeline at which each step began.
    """

    session: ConversationSession
    events: list[ev.ConversationEvent]
    user: bytes
    agent: bytes
    starts: list[float]

    @property
    def metrics(self) -> list[ev.TurnMetrics]:
        return self.session.metrics

    @property
    def history(self) -> list[dict[str, Any]]:
        return self.session.history


async def run_script(
    steps: Sequence[Step],
    *,
    llm: ChatClient,
    stt: SpeechToText,
    tts: TextToSpeech,
    config: SessionConfig | None = None,
    policy: TurnTakingPolicy | None = None,
    on_event: Callable[[ConversationSession, ev.ConversationEvent], None] | None = None,
) -> Scripted:
    """Run the conversation ``steps`` describe (16 kHz mono PCM, or :class:`Until`).

    ``on_event`` sees each event as it happens, with the session (to answer a client tool).
    """
    progress = Progress()
    loop = asyncio.get_running_loop()
    t0 = loop.time() + 0.05
    sink = progress.sink = TimelineSink(OUTPUT_RATE, t0)
    session = ConversationSession(
        config=config or SessionConfig(), llm=llm, stt=stt, tts=tts, sink=sink,
        on_event=lambda e: record(e), policy=policy,
    )  # fmt: skip

    def record(event: ev.ConversationEvent) -> None:
        progress.events.append(event)
        if on_event is not None:
            on_event(session, event)

    pacer = LoopPacer(t0)
    recorded = bytearray()
    starts: list[float] = []
    silent = bytes(2 * RATE // 50)

    async def frames() -> AsyncIterator[AudioFrame]:
        pts = 0

        async def emit(pcm: bytes) -> AudioFrame:
            nonlocal pts
            frame = AudioFrame(pcm=pcm, sample_rate=RATE, pts=pts)
            await pacer.wait_until(frame.end_pts / RATE)
            recorded.extend(pcm)
            pts = frame.end_pts
            return frame

        for step in steps:
            starts.append(pts / RATE)
            if isinstance(step, Until):
                limit = pts + int(step.limit_s * RATE)
                while not step.condition(progress):
                    assert pts < limit, f"{step.limit_s:g} s of silence without {step.what}"
                    yield await emit(silent)
            else:
                reframer = Reframer(RATE, 20)
                for f in reframer.process(step) + reframer.flush():
                    yield await emit(f.pcm)
        # The user stays on the line, silent, until the agent is done (as talk does).
        idle_since: int | None = None
        limit = pts + int(WAIT_LIMIT_S * RATE)
        while pts < limit:
            yield await emit(silent)
            if session.busy:
                idle_since = None
            elif idle_since is None:
                idle_since = pts
            elif pts - idle_since >= TAIL_S * RATE:
                break
        else:
            raise AssertionError(f"the session was still busy {WAIT_LIMIT_S:g} s after the input")

    await session.run(frames())
    await sink.wait_for_playout()
    total = max(len(recorded) * OUTPUT_RATE // RATE, len(sink.timeline) // 2)
    return Scripted(session, progress.events, bytes(recorded), sink.audio(total), starts)


def last_heard(agent24k: bytes, start_s: float, end_s: float) -> float | None:
    """End (s) of the last 50 ms window in ``[start_s, end_s)`` with agent audio (RMS above 100).

    Where a cut reply fell silent: unlike the first long silence, a gap inside the reply (a
    sentence's pause, or the voice running late on a busy machine) does not count.
    """
    x = np.frombuffer(agent24k, "<i2").astype(np.float64)
    step = OUTPUT_RATE // 20
    last = None
    for i in range(int(start_s * OUTPUT_RATE), int(end_s * OUTPUT_RATE), step):
        w = x[i : min(i + step, int(end_s * OUTPUT_RATE))]
        if w.size and float(np.sqrt(np.mean(w * w))) > 100:
            last = (i + w.size) / OUTPUT_RATE
    return last
