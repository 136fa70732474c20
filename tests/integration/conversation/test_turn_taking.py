"""Turn-taking on real audio through the real engines: interruptions, back-channels, no lost words.

Each conversation runs in real time against the reference endpoint, whose first
reply lasts well over ten seconds, so the user always talks over it. The agent
speaks with espeak-ng; the user's speech is the Piper voice or a recording, heard
by Whisper. The user talks over the reply once it has been heard for a second
(:mod:`.script`), however late a busy machine brings it.
"""

from __future__ import annotations

import numpy as np
import pytest
from whisper_normalizer.english import EnglishTextNormalizer

from audio.frame import AudioFrame
from audio.vad import NoiseGatedVAD, WebRtcVAD
from audio.wav import read_wav
from runtime.conversation import events as ev
from runtime.conversation.config import SessionConfig, TurnDetection
from runtime.conversation.policy import Decision, TurnTakingPolicy
from runtime.conversation.session import ConversationSession, SpeechGate
from runtime.conversation.sinks import ImmediateSink
from runtime.llm.reference import ReferenceEndpoint, ReplyPlan
from runtime.speech.engines.espeak import EspeakTTS
from runtime.speech.engines.piper import PiperTTS
from runtime.speech.engines.whisper import WhisperSTT
from runtime.talk import OUTPUT_RATE, talk_pcm

from ...helpers import SPEECH, noise
from .script import Scripted, Step, Until, agent_heard_for, last_heard, run_script
from .test_conversation import LONG_REPLY, active, chat_bodies, llm_for, silence, utterance

normalise = EnglishTextNormalizer()
SECOND = "Sorry, what did you mean?"


def said(text: str) -> str:
    return str(normalise(text)).replace(",", "")


async def converse(
    steps: list[Step],
    whisper: WhisperSTT,
    espeak: EspeakTTS,
    *,
    config: SessionConfig | None = None,
) -> tuple[Scripted, list[ev.ConversationEvent], list[list[dict[str, str]]]]:
    plan = ReplyPlan(ttft_ms=50, itl_ms=5, replies=(LONG_REPLY, SECOND))
    async with ReferenceEndpoint(plan) as server, llm_for(server) as llm:
        result = await run_script(steps, llm=llm, stt=whisper, tts=espeak, config=config)
        requests = [body["messages"] for body in chat_bodies(server)]
    return result, result.events, requests


def over_the_reply(question: bytes, words: bytes) -> list[Step]:
    """A question, then ``words`` said once its (long) answer has been heard for a second."""
    return [silence(0.4), question, agent_heard_for(1.0), words, silence(0.5)]


async def speak(piper: PiperTTS, text: str) -> bytes:
    return b"".join([c.pcm async for c in piper.synthesize(text, sample_rate=16000)])


def statuses(events: list[ev.ConversationEvent]) -> list[str]:
    return [e.status for e in events if isinstance(e, ev.ReplyDone)]


def check_interrupted(
    events: list[ev.ConversationEvent],
    requests: list[list[dict[str, str]]],
    interruption: str,
) -> None:
    """The reply was cut, the history holds the heard prefix, then the user's whole interruption.

    A pause inside the interruption may end the user's turn early; a reply to that part is then
    withdrawn before a word of it is heard, and the turn goes on: one user message.
    """
    done = statuses(events)
    assert done[0] == "interrupted" and done[-1] == "completed"
    agent = [e for e in events if isinstance(e, ev.AgentTranscript)]
    cut = agent[0]
    assert cut.interrupted and cut.text and LONG_REPLY.startswith(cut.text)
    assert len(cut.text) < len(LONG_REPLY) / 2
    assert all(a.interrupted and a.text == "" for a in agent[1:-1])
    last = requests[-1]
    assert [m["role"] for m in last[:3]] == ["system", "user", "assistant"]
    assert said(last[1]["content"]) in {
        said("What's the weather like in Paris today?"),
        said("What's the weather like in pairs today?"),
    }
    assert last[2]["content"] == cut.text
    assert [m["role"] for m in last[3:]] == ["user"]
    assert said(last[3]["content"]).endswith(said(interruption))


async def test_an_interruption_starting_with_um_pauses_the_agent_at_um_and_cuts_it(
    whisper: WhisperSTT, espeak: EspeakTTS
):
    # The question until 2.5 s; "Um" at 6.60-6.85 s, "wait" at 7.00-7.25 s, "stop, that's not
    # what I asked." until 9.5 s. The recording goes on from 6.0 s once the reply is heard.
    pcm = read_wav(SPEECH / "interrupt-starting-with-um.wav").mono()
    split = 6 * 16000 * 2
    result, events, requests = await converse(
        [pcm[:split], agent_heard_for(1.0), pcm[split:]], whisper, espeak
    )
    check_interrupted(events, requests, "wait, stop, that's not what I asked.")
    # The agent was talking when the user began; it paused at "Um" (speech over the reply) and,
    # the words after it interrupting, never went on.
    um, end = (result.starts[2] + s - 6.0 for s in (6.6, 9.5))
    assert active(result.agent, um - 0.6, um)
    cut_at = last_heard(result.agent, um, end)
    assert cut_at is None or cut_at < um + 0.3


async def test_an_interruption_starting_with_okay_is_not_a_backchannel(
    whisper: WhisperSTT, piper: PiperTTS, espeak: EspeakTTS
):
    words = await speak(piper, "Okay, but I meant the other one.")
    _, events, requests = await converse(
        over_the_reply(utterance("shared-00-piper"), words), whisper, espeak
    )
    check_interrupted(events, requests, "but I meant the other one.")
    assert said(requests[-1][3]["content"]).startswith("okay")


async def test_digits_interrupt(whisper: WhisperSTT, piper: PiperTTS, espeak: EspeakTTS):
    digits = await speak(piper, "One, two, three, four.")
    _, events, requests = await converse(
        over_the_reply(utterance("shared-00-piper"), digits), whisper, espeak
    )
    assert statuses(events) == ["interrupted", "completed"]
    # The answered request holds the whole number; a request started speculatively at the
    # pause after "three" (and withdrawn when the user went on) holds a beginning of it.
    assert said(requests[-1][3]["content"]).replace("one", "1") == "1 2 3 4"
    for early in requests[1:-1]:
        assert "1 2 3 4".startswith(said(early[3]["content"]).replace("one", "1"))


async def test_okay_okay_is_a_backchannel(whisper: WhisperSTT, piper: PiperTTS, espeak: EspeakTTS):
    okay = await speak(piper, "Okay, okay.")
    _, events, requests = await converse(
        over_the_reply(utterance("shared-00-piper"), okay), whisper, espeak
    )
    assert statuses(events) == ["completed"]
    replies = [e for e in events if isinstance(e, ev.AgentTranscript)]
    assert len(replies) == 1 and replies[0].text == LONG_REPLY and not replies[0].interrupted
    assert len(requests) == 1  # the acknowledgement claims no turn


async def test_speech_over_a_reply_that_cannot_be_interrupted_is_the_next_turn(
    whisper: WhisperSTT, espeak: EspeakTTS
):
    # "No, I meant next Friday, not this one."
    steps = over_the_reply(utterance("shared-00-piper"), utterance("shared-10-piper"))
    config = SessionConfig(turn_detection=TurnDetection(interrupt_response=False))
    result, events, requests = await converse(steps, whisper, espeak, config=config)
    assert statuses(events) == ["completed", "completed"]
    first = next(e for e in events if isinstance(e, ev.AgentTranscript))
    assert first.text == LONG_REPLY and not first.interrupted
    assert [m["role"] for m in requests[1]] == ["system", "user", "assistant", "user"]
    assert requests[1][2]["content"] == LONG_REPLY
    # (Whisper tiny hears "I meant" as "I am at" now and then.)
    words = said(requests[1][3]["content"])
    assert words.startswith("no i ") and words.endswith("next friday not this one")
    # The agent finished first, then answered what was said meanwhile.
    user_turns = [e for e in events if isinstance(e, ev.UserTranscript)]
    done = [e for e in events if isinstance(e, ev.ReplyDone)]
    assert user_turns[1].t_ns > done[0].t_ns
    assert result.history[-1] == {"role": "assistant", "content": SECOND}


@pytest.mark.parametrize(
    ("head", "tail", "pause_ms", "expected"),
    [
        ("My order number is", "four five seven two one.", 900, "my order number is 45721"),
        ("Can you remind me to", "call my sister tomorrow?", 600, "can you remind me to call my"),
        ("The meeting is on", "Tuesday at three.", 300, "the meeting is on tuesday at 3"),
    ],
)
async def test_a_pause_inside_a_sentence_does_not_end_the_turn(
    whisper: WhisperSTT, piper: PiperTTS, head: str, tail: str, pause_ms: int, expected: str
):
    # The transcript at the pause ends on a word that leaves the sentence hanging.
    pcm = (
        silence(0.4) + await speak(piper, head) + silence(pause_ms / 1000)
        + await speak(piper, tail) + silence(0.5)
    )  # fmt: skip
    events: list[ev.ConversationEvent] = []
    plan = ReplyPlan(ttft_ms=50, itl_ms=5, replies=("Done.",))
    async with ReferenceEndpoint(plan) as server, llm_for(server) as llm:
        await talk_pcm(
            pcm, llm=llm, stt=whisper, tts=piper, config=SessionConfig(), on_event=events.append
        )
    turns = [
        said(e.text).replace("4 5 7 2 1", "45721")
        for e in events
        if isinstance(e, ev.UserTranscript)
    ]
    assert len(turns) == 1
    assert turns[0].startswith(expected)


@pytest.mark.parametrize("seed", [1, 2])
async def test_noise_at_minus_30_dbfs_transcribes_as_nothing(whisper: WhisperSTT, seed: int):
    # Loud enough to pass the energy floor; without Whisper's own no-speech rule these decode
    # as "I'm gonna go to the right side." / "I'm gonna go to the other side.".
    pcm = noise(2.0, 16000, -30.0, "white", seed)
    assert (await whisper.transcribe(pcm, 16000)).text == ""


class SpeechLog(TurnTakingPolicy):
    """The real policy, recording the speech decisions it is fed."""

    def __init__(self, td: TurnDetection) -> None:
        super().__init__(td)
        self.speech: list[bool] = []

    def frame(self, speech: bool, t_ns: int) -> list[Decision]:
        self.speech.append(speech)
        return []  # decisions are not carried out: only the input is under test


async def test_vad_threshold_reaches_the_speech_decision(whisper: WhisperSTT, piper: PiperTTS):
    quiet = (np.frombuffer(utterance("shared-00-piper"), "<i2") * 0.05).astype("<i2").tobytes()
    counts = {}
    for threshold in (0.1, 0.9):
        td = TurnDetection(vad_threshold=threshold)
        log = SpeechLog(td)
        async with ReferenceEndpoint() as server, llm_for(server) as llm:
            session = ConversationSession(
                config=SessionConfig(turn_detection=td), llm=llm, stt=whisper, tts=piper,
                sink=ImmediateSink(16000), on_event=lambda _e: None, policy=log,
            )  # fmt: skip
            session.push(AudioFrame(pcm=quiet, sample_rate=16000, pts=0))
        # Independently: webrtcvad at the mode the threshold maps to (0.1 -> 0, 0.9 -> 3).
        gate = SpeechGate(NoiseGatedVAD(WebRtcVAD(mode=int(threshold * 4))), threshold)
        expected = [gate.is_speech(quiet[i : i + 640]) for i in range(0, len(quiet) - 639, 640)]
        assert log.speech == expected
        counts[threshold] = sum(log.speech)
    assert counts[0.9] < counts[0.1] - 10


async def test_going_on_before_the_reply_is_heard_keeps_one_user_turn(
    whisper: WhisperSTT, piper: PiperTTS
):
    # The head said as a sentence of its own: at the pause Whisper hears "I want to fly from
    # Boston, too." with a sure full stop, so the turn ends (the silence that ends any turn is
    # never reached); the reply is slow to come, and the user goes on before a word of it is
    # heard, as soon as the turn's transcript is out.
    ended = Until(
        "the turn ended on its words",
        lambda p: any(isinstance(e, ev.UserTranscript) for e in p.events),
        limit_s=15.0,
    )
    steps: list[Step] = [
        silence(0.4), await speak(piper, "I want to fly from Boston to"), ended,
        await speak(piper, "New York next week."), silence(0.5),
    ]  # fmt: skip
    config = SessionConfig(turn_detection=TurnDetection(max_silence_ms=20_000))
    plan = ReplyPlan(ttft_ms=3000, itl_ms=5, replies=("Which evening?",))
    async with ReferenceEndpoint(plan) as server, llm_for(server) as llm:
        result = await run_script(steps, llm=llm, stt=whisper, tts=piper, config=config)
        requests = [body["messages"] for body in chat_bodies(server)]
    events = result.events
    # The turn ended at the pause, and went on: its reply was withdrawn unheard.
    assert statuses(events) == ["interrupted", "completed"]
    agent = [e for e in events if isinstance(e, ev.AgentTranscript)]
    assert [(a.text, a.interrupted) for a in agent] == [("", True), ("Which evening?", False)]
    starts = [e for e in events if isinstance(e, ev.SpeechStarted)]
    assert [s.continued for s in starts] == [False, True]
    # One user message, the whole sentence, transcribed again from its first word; the
    # transcript at the pause is replaced (same item).
    users = [e for e in events if isinstance(e, ev.UserTranscript)]
    assert len({u.item_id for u in users}) == 1
    whole = said(users[-1].text)
    assert whole.endswith(said("to fly from Boston to New York next week"))
    last = requests[-1]
    assert [m["role"] for m in last] == ["system", "user"]
    assert last[1]["content"] == users[-1].text
    assert [m.user_text for m in result.metrics] == [users[-1].text]
    # Nothing was said over the user: the agent is silent until they finish.
    user_end = result.starts[4]
    assert not active(result.agent, 0.0, user_end)
    assert active(result.agent, user_end, len(result.agent) / (2 * OUTPUT_RATE))
