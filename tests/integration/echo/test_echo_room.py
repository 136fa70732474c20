"""Full duplex on a simulated laptop: the real session hears its own voice through a room.

Real speech, real Whisper and Piper, the reference endpoint over a socket,
and the agent's audio fed back through :class:`audio.room.EchoRoom` (a
synthetic room, an unreported delay, loudspeaker distortion, noise and
clock drift). The many-replies sweep is ``benchmarks/aec.py`` (self-interruptions
over many replies, double talk, WER); these are the cases that pin the behaviour,
among them the conversations in which the agent used to interrupt itself.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from whisper_normalizer.english import EnglishTextNormalizer

from audio.room import RoomConfig
from audio.vad import default_vad, segment_pcm
from audio.wav import read_wav
from runtime.conversation import events as ev
from runtime.conversation.config import SessionConfig
from runtime.echo_sim import RoomResult, talk_through_room
from runtime.endpoints import URLPolicy
from runtime.llm.client import ChatClient, Endpoint
from runtime.llm.reference import ReferenceEndpoint, ReplyPlan
from runtime.speech.engines.piper import PiperTTS
from runtime.speech.engines.whisper import WhisperSTT

from ...helpers import SPEECH

normalise = EnglishTextNormalizer()
REPLY = (
    "Paris will be mild this week. Monday starts cloudy with a light breeze. "
    "Tuesday brings scattered showers in the afternoon, and Wednesday is sunny and warm."
)
# A laptop at a moderate volume: an echo the devices do not report, a
# reverberant room, mild speaker distortion, noise and the speaker's clock
# 0.1 % fast. (Louder, distorting speakers: see benchmarks/aec.py.)
HARD_ROOM = RoomConfig(
    delay_ms=150, rt60_s=0.3, echo_db=-6.0, drive=0.5, noise_dbfs=-55.0, drift=0.001, seed=7
)
# A speaker driven loud into distortion: the echo as loud as what is played.
LOUD_DISTORTING = RoomConfig(
    delay_ms=80, rt60_s=0.3, echo_db=0.0, drive=1.5, noise_dbfs=-60.0, drift=0.001, seed=3
)
# Without cancellation the same room makes the agent interrupt itself.
LOUD_ROOM = RoomConfig(
    delay_ms=180, rt60_s=0.35, echo_db=-3.0, drive=1.0, noise_dbfs=-55.0, drift=0.001, seed=7
)


def utterance(name: str) -> bytes:
    return read_wav(SPEECH / f"{name}.wav").mono()


def silence(seconds: float) -> bytes:
    return bytes(int(seconds * 16000) * 2)


@pytest.fixture
async def endpoint() -> AsyncIterator[ReferenceEndpoint]:
    async with ReferenceEndpoint(ReplyPlan(ttft_ms=50, itl_ms=5, replies=(REPLY,))) as server:
        yield server


async def converse(
    endpoint: ReferenceEndpoint, whisper: WhisperSTT, piper: PiperTTS, user: bytes, **kwargs
) -> RoomResult:
    llm = ChatClient(Endpoint(endpoint.base_url, "m"), policy=URLPolicy.operator())
    async with llm:
        return await talk_through_room(
            user, llm=llm, stt=whisper, tts=piper, config=SessionConfig(), **kwargs
        )


def of(result: RoomResult, kind: type) -> list[Any]:
    return [e for _, e in result.events if isinstance(e, kind)]


async def test_without_it_the_same_room_makes_the_agent_interrupt_itself(
    endpoint: ReferenceEndpoint, whisper: WhisperSTT, piper: PiperTTS
):
    user = silence(0.4) + utterance("shared-00-piper") + silence(0.5)
    result = await converse(
        endpoint, whisper, piper, user, room=LOUD_ROOM, echo="off", max_wait_s=8.0
    )
    assert of(result, ev.ReplyDone)[0].status == "interrupted"


@pytest.mark.parametrize("room", [HARD_ROOM, LOUD_DISTORTING], ids=["moderate", "loud"])
async def test_the_agent_never_interrupts_itself_while_the_user_listens(
    endpoint: ReferenceEndpoint, whisper: WhisperSTT, piper: PiperTTS, room: RoomConfig
):
    # The conversations in which the agent used to take its own voice for the user's
    # (what the canceller leaves of a distorting speaker, and of its first seconds).
    user = silence(0.4) + utterance("shared-00-piper") + silence(0.5)
    result = await converse(endpoint, whisper, piper, user, room=room, echo="aec")
    assert [d.status for d in of(result, ev.ReplyDone)] == ["completed"]
    texts = [normalise(u.text) for u in of(result, ev.UserTranscript)]
    assert texts == [normalise("What's the weather like in Paris today?")]
    # The whole reply was played.
    [spoken] = of(result, ev.AgentTranscript)
    assert not spoken.interrupted and normalise(spoken.text) == normalise(REPLY)


async def test_the_user_interrupts_by_voice_over_the_echo(
    endpoint: ReferenceEndpoint, whisper: WhisperSTT, piper: PiperTTS
):
    question, stop = utterance("shared-00-piper"), utterance("shared-11-piper")
    # Well into the reply (which starts 1-3 s after the question, with the
    # machine's load), past the canceller's first seconds.
    user = silence(0.4) + question + silence(4.5) + stop + silence(0.5)
    result = await converse(endpoint, whisper, piper, user, room=HARD_ROOM, echo="aec")
    assert of(result, ev.ReplyDone)[0].status == "interrupted"
    # Cut after the user started talking over it, not before (that would be
    # the agent interrupting itself). How soon is benchmarks/aec.py's business.
    (_, _), (onset, _) = segment_pcm(user, 16000, default_vad())
    cut = next(t for t, e in result.events if isinstance(e, ev.ReplyDone))
    assert cut > onset
    # The interruption became the next user turn(s), and none of them is the
    # agent's own voice (how many of the user's words survive double talk is
    # benchmarks/aec.py's WER).
    texts = [normalise(u.text) for u in of(result, ev.UserTranscript)]
    assert texts[0] == normalise("What's the weather like in Paris today?")
    agent_only = set(normalise(REPLY).split()) - set(
        normalise(
            "What's the weather like in Paris today? Wait, stop, that's not what I asked."
        ).split()
    )
    assert texts[1:] and all(texts[1:]), texts
    assert not any(set(t.split()) & agent_only for t in texts[1:]), texts
