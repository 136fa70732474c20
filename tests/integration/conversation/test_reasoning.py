"""Reasoning is never spoken, and a first reply is never held: whole conversations.

Real audio in (Whisper), real voice out (Piper), the reference endpoint over a
loopback socket answering in each shape reasoning comes in. Each test starts
with a fresh process memory (the autouse fixture), as a new ``talk`` does.
"""

from __future__ import annotations

import logging
from typing import Any

import pytest

from runtime.conversation import events as ev
from runtime.conversation.config import SessionConfig
from runtime.endpoints import URLPolicy
from runtime.llm.client import ChatClient, ChatRequest, ClientTimeouts, Endpoint
from runtime.llm.reference import ReferenceEndpoint, ReplyPlan
from runtime.llm.stream import TextDelta
from runtime.speech.engines.piper import PiperTTS
from runtime.speech.engines.whisper import WhisperSTT
from runtime.speech.text import SpeechSegmenter
from runtime.talk import talk_pcm

from ...helpers import is_warm_up
from .test_conversation import silence, utterance

REASONING = "The user wants the weather so I should answer briefly"
ANSWER = "It is sunny in Paris."
LONG_FIRST = (
    "The forecast for Paris this afternoon shows clear skies with a gentle breeze from the "
    "west and temperatures climbing to twenty two degrees by four o'clock. Enjoy it."
)


async def test_a_long_first_sentence_is_spoken_before_the_endpoint_sends_its_last_token():
    # A new process, an endpoint and model it knows nothing of: the first reply's first
    # segment goes out while the endpoint is still generating. The endpoint sends 10
    # tokens and then hangs: a client holding the reply until its end would get no
    # segment at all (and fail on its stall deadline).
    plan = ReplyPlan(replies=(LONG_FIRST,), itl_ms=5, fault="hang", fault_after=10)
    async with ReferenceEndpoint(plan) as server:
        llm = ChatClient(
            Endpoint(server.base_url, "my-llm"), policy=URLPolicy.operator(),
            timeouts=ClientTimeouts(stall_s=30),
        )  # fmt: skip
        async with llm:
            assert llm.leading_reasoning is False and llm.reasoning_source == "default"
            segmenter = SpeechSegmenter()
            request = ChatRequest(messages=[{"role": "user", "content": "Weather?"}])
            released: list[tuple[int, list[str]]] = []
            deltas = 0
            async with llm.stream(request) as stream:
                async for event in stream:
                    if isinstance(event, TextDelta):
                        deltas += 1
                        released.append((deltas, segmenter.push(event.text)))
                        if deltas == 10:  # all the endpoint sends: it now hangs
                            break
            [record] = [r for r in server.requests if r.path.endswith("/chat/completions")]
            assert record.tokens_sent == 10 < len(LONG_FIRST.split())
            assert not record.finished.is_set()
    first = [(n, segments) for n, segments in released if segments]
    # No clause mark in sight: the first segment is the first seven words.
    # It is released with the delta that shows its last word ended (the 8th).
    assert first == [(8, ["The forecast for Paris this afternoon shows"])]


def llm_for(server: ReferenceEndpoint, model: str, **kwargs: Any) -> ChatClient:
    return ChatClient(Endpoint(server.base_url, model), policy=URLPolicy.operator(), **kwargs)


async def converse(
    server: ReferenceEndpoint,
    whisper: WhisperSTT,
    piper: PiperTTS,
    *,
    model: str,
    warm_up: bool = True,
    **client: Any,
) -> tuple[list[str], list[dict[str, Any]]]:
    """Two spoken turns; returns what the agent said and the history."""
    first, second = utterance("shared-00-piper"), utterance("shared-01-piper")
    pcm = silence(1.0) + first + silence(3.0) + second + silence(0.5)
    events: list[ev.ConversationEvent] = []
    sessions: list[Any] = []
    async with llm_for(server, model, **client) as llm:
        await talk_pcm(
            pcm, llm=llm, stt=whisper, tts=piper, config=SessionConfig(warm_prompt=warm_up),
            on_event=events.append, on_session=sessions.append,
        )  # fmt: skip
    said = [e.text for e in events if isinstance(e, ev.AgentTranscript)]
    return said, sessions[0].history


def assert_no_reasoning(said: list[str], history: list[dict[str, Any]]) -> None:
    assert said == [ANSWER, ANSWER]
    assistant = [m["content"] for m in history if m["role"] == "assistant"]
    assert assistant == [ANSWER, ANSWER]
    assert not any("user wants" in m["content"] for m in history if m["content"])


@pytest.mark.parametrize(
    ("shape", "model", "setting"),
    [
        ("field", "my-llm", None),  # reasoning_content: any model
        ("tags", "my-llm", None),  # <think>…</think> in the content
        ("template", "DeepSeek-R1-Distill-Qwen-7B", None),  # a known family's name
        ("template", "my-reasoner", True),  # an unknown name, and the setting
        ("template", "my-reasoner", None),  # an unknown name: the warm-up teaches it
    ],
)
async def test_no_reasoning_is_spoken_whatever_its_shape(
    whisper: WhisperSTT, piper: PiperTTS, shape: str, model: str, setting: bool | None
):
    if shape == "template":
        plan = ReplyPlan(
            ttft_ms=50, itl_ms=5, replies=(f"{REASONING}.</think>\n\n{ANSWER}",),
            warm_up_reply="They greet me.</think>Hello!",
        )  # fmt: skip
    else:
        plan = ReplyPlan(
            ttft_ms=50, itl_ms=5, replies=(ANSWER,), reasoning=REASONING,
            think_tags=shape == "tags",
        )  # fmt: skip
    async with ReferenceEndpoint(plan) as server:
        said, history = await converse(
            server, whisper, piper, model=model, leading_reasoning=setting
        )
        if setting is None and shape == "template" and model == "my-reasoner":
            # The warm-up ran to its end before the first turn and showed the block.
            [warm] = [r for r in server.requests if r.body and is_warm_up(r)]
            assert warm.disconnected_ns is None and warm.tokens_sent > 0
    assert_no_reasoning(said, history)


async def test_an_unknown_template_without_warm_up_or_setting_is_spoken_once_then_learned(
    whisper: WhisperSTT, piper: PiperTTS, caplog: pytest.LogCaptureFixture
):
    # What the setting is for: with no warm-up, the first reply of an endpoint that opens
    # the block in its template with no marker and no known name is read as the answer
    # until its lone </think>. The second is right, and one warning names the setting.
    caplog.set_level(logging.WARNING, logger="voxloop.llm")
    plan = ReplyPlan(ttft_ms=50, itl_ms=5, replies=(f"{REASONING}.</think>\n\n{ANSWER}",))
    async with ReferenceEndpoint(plan) as server:
        said, history = await converse(server, whisper, piper, model="my-reasoner", warm_up=False)
    assert said[0].startswith(f"{REASONING}.") and said[1:] == [ANSWER]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "--think-block template" in warnings[0]
    # With the setting, the same endpoint is never wrong.
    caplog.clear()
    async with ReferenceEndpoint(plan) as server:
        said, history = await converse(
            server, whisper, piper, model="my-reasoner", warm_up=False, leading_reasoning=True
        )
    assert_no_reasoning(said, history)
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]
