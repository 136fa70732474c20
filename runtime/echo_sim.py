"""A conversation on a simulated laptop: the agent hears its own voice through a room.

The same session as ``voxloop talk`` live mode, with the sound card replaced
by :class:`audio.room.EchoRoom`. Every 20 ms, on the event loop's clock:

1. the block the virtual speaker (:class:`TimelineSink`) played in that
   interval (``RoomConfig.drift`` more samples than the loop's clock says,
   the speaker's clock being that much fast) goes to the room and, stamped
   as a device would stamp it (its time at the DAC, ``reported_latency_s``
   after it was handed over), to the echo handling;
2. the microphone records the user's audio for the interval plus the room's
   echo and noise;
3. the echo handling of :func:`runtime.talk.talk_live` (the same
   :class:`audio.echo.EchoPath` or :class:`audio.echo.HalfDuplexGate`) cleans
   the block and the session hears it.

The room delays the echo by the reported latency plus ``RoomConfig.delay_ms``,
which the devices do not report; the canceller must find it. Runs in real
time (a conversation takes as long as it would for a person). The echo
handling runs on the loop here; in live mode it runs on the microphone's
thread.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from typing import Final

from audio.echo import EchoPath, HalfDuplexGate
from audio.frame import AudioFrame
from audio.room import EchoRoom, RoomConfig
from runtime.conversation.config import SessionConfig
from runtime.conversation.events import ConversationEvent
from runtime.conversation.session import RATE, ConversationSession
from runtime.conversation.sinks import TimelineSink
from runtime.llm.client import ChatClient
from runtime.speech.stt import SpeechToText
from runtime.speech.tts import TextToSpeech
from runtime.talk import OUTPUT_RATE, EchoMode, LoopPacer

FRAME_MS: Final = 20
TAIL_S: Final = 1.0
MAX_WAIT_S: Final = 60.0


@dataclass(slots=True)
class RoomResult:
    """What happened, on the simulation's timeline (seconds from the start).

    Attributes:
        events: every session event with the time it was emitted.
        mic: what the microphone recorded (16 kHz PCM16: user, echo, noise).
        heard: what the session heard after the echo handling (16 kHz).
        agent: what the speaker played (24 kHz PCM16).
        echo_ms: time spent in the echo handling, per 20 ms frame.
    """

    events: list[tuple[float, ConversationEvent]] = field(default_factory=list)
    mic: bytearray = field(default_factory=bytearray)
    heard: bytearray = field(default_factory=bytearray)
    agent: bytes = b""
    echo_ms: list[float] = field(default_factory=list)


async def talk_through_room(
    user: bytes,
    *,
    room: RoomConfig | None,
    echo: EchoMode,
    llm: ChatClient,
    stt: SpeechToText,
    tts: TextToSpeech,
    config: SessionConfig,
    reported_latency_s: float = 0.04,
    echo_tail_ms: int = 200,
    max_wait_s: float = MAX_WAIT_S,
) -> RoomResult:
    """Run a conversation whose microphone hears ``user`` (16 kHz PCM16) and the agent.

    Args:
        user: what the user says, on the simulation's timeline.
        room: the acoustic condition; ``None`` for a clean microphone (no echo, no noise).
        echo: the echo handling, as in :func:`runtime.talk.talk_live`.
        reported_latency_s: the speaker's reported output latency.
        max_wait_s: after the user's audio, stop after this long even if the
            agent is still busy (an agent that answers its own echo never stops).

    Raises:
        EchoCancellerUnavailable: ``"aec"`` without the ``aec`` extra.
    """
    loop = asyncio.get_running_loop()
    result = RoomResult()
    path: EchoPath | None = None
    if echo == "aec":
        from audio.aec import echo_path

        path = echo_path(RATE)
    gate = HalfDuplexGate(tail_ms=echo_tail_ms) if echo == "half-duplex" else None
    acoustic = None
    drift = 0.0
    if room is not None:
        drift = room.drift
        delay_ms = room.delay_ms + reported_latency_s * 1000
        acoustic = EchoRoom(replace(room, delay_ms=delay_ms), speaker_rate=OUTPUT_RATE)
    t0 = loop.time() + 0.05
    sink = TimelineSink(OUTPUT_RATE, t0)

    def on_event(event: ConversationEvent) -> None:
        result.events.append((loop.time() - t0, event))

    session = ConversationSession(
        config=config, llm=llm, stt=stt, tts=tts, sink=sink, on_event=on_event
    )
    pacer = LoopPacer(t0)
    near_bytes = RATE * FRAME_MS // 1000 * 2
    far_step = OUTPUT_RATE * FRAME_MS // 1000

    async def frames() -> AsyncIterator[AudioFrame]:
        k = 0
        idle_since: float | None = None
        limit = len(user) // near_bytes + int(max_wait_s * 1000 / FRAME_MS)
        while k < limit:
            t = k * FRAME_MS / 1000
            await pacer.wait_until(t + FRAME_MS / 1000)
            # The speaker's clock runs ``drift`` fast: it takes a little more
            # of the timeline per tick than the loop's clock says (up to a
            # few tens of ms ahead, within what the sink has queued).
            start, end = round(k * far_step * (1 + drift)), round((k + 1) * far_step * (1 + drift))
            far = bytes(sink.timeline[start * 2 : end * 2])
            far += bytes((end - start) * 2 - len(far))
            near = user[k * near_bytes : (k + 1) * near_bytes]
            near += bytes(near_bytes - len(near))
            if acoustic is not None:
                acoustic.play(far)
                near = acoustic.capture(near)
            result.mic += near
            started = loop.time()
            if path is not None:
                path.played(far, OUTPUT_RATE, t + reported_latency_s)
                near = path.captured(near, t)
            frame = AudioFrame(pcm=near, sample_rate=RATE, pts=k * near_bytes // 2)
            if gate is not None:
                queued = sink.queued_samples
                if queued:
                    gate.playing(frame.end_pts + queued * RATE // OUTPUT_RATE)
                frame = gate.process(frame)
            result.echo_ms.append((loop.time() - started) * 1000)
            result.heard += frame.pcm
            yield frame
            k += 1
            if (k + 1) * near_bytes <= len(user):
                continue
            # The user is done: stay on the line until the agent is.
            if session.busy:
                idle_since = None
            elif idle_since is None:
                idle_since = t
            elif t - idle_since >= TAIL_S:
                return

    await session.run(frames())
    await sink.wait_for_playout()
    result.agent = sink.audio()
    return result
