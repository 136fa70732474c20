"""Endpoint failures reported inside the stream, as the conversation hears them."""

from __future__ import annotations

import pytest

from runtime.conversation import events as ev
from runtime.conversation.config import SessionConfig
from runtime.conversation.session import ConversationSession
from runtime.conversation.sinks import ImmediateSink
from runtime.endpoints import URLPolicy
from runtime.llm.client import ChatClient, Endpoint, RetryPolicy
from runtime.llm.reference import ReferenceEndpoint, ReplyPlan
from runtime.speech.engines.piper import PiperTTS
from runtime.speech.engines.whisper import WhisperSTT
from runtime.talk import OUTPUT_RATE

from ...helpers import DATA

ERROR_FIELD = (DATA / "endpoint-streams" / "error-field-line.sse").read_bytes()
PARTIAL_THEN_ERROR = (
    b'data: {"choices":[{"index":0,"delta":{"content":"Your order shipped on Monday."}}]}\n\n'
    b'data: {"choices":[{"index":0,"delta":{"content":" It should"}}]}\n\n' + ERROR_FIELD
)


async def converse(server: ReferenceEndpoint, piper: PiperTTS, whisper: WhisperSTT, texts):
    events: list[ev.ConversationEvent] = []
    async with ChatClient(
        Endpoint(server.base_url, "m"),
        policy=URLPolicy.operator(),
        retry=RetryPolicy(max_attempts=2, backoff_s=0),
        leading_reasoning=False,
    ) as llm:
        session = ConversationSession(
            config=SessionConfig(),
            llm=llm,
            stt=whisper,
            tts=piper,
            sink=ImmediateSink(OUTPUT_RATE),
            on_event=events.append,
        )

        async def frames():
            for text in texts:
                session.inject_user_text(text)
                await session.wait_idle()
            return
            yield

        await session.run(frames())
    return events, session


@pytest.mark.parametrize(
    ("first", "spoken"),
    [
        # Before any text: retried like a 5xx (both attempts fail), then the apology.
        ([ReplyPlan(body=ERROR_FIELD), ReplyPlan(body=ERROR_FIELD)], ""),
        # After partial text: never retried, never a finished reply (what had
        # arrived is spoken, then the apology).
        ([ReplyPlan(body=PARTIAL_THEN_ERROR)], "Your order shipped on Monday. It should"),
    ],
    ids=["before-text", "after-text"],
)
async def test_error_field_is_a_failed_reply_with_the_apology(
    piper: PiperTTS, whisper: WhisperSTT, first: list[ReplyPlan], spoken: str
):
    async with ReferenceEndpoint(ReplyPlan(replies=("All good now.",))) as server:
        server.queue(*first)
        events, session = await converse(server, piper, whisper, ["Where is my order?", "Hello?"])
        chat_requests = [r for r in server.requests if r.path.endswith("/chat/completions")]
    errors = [e for e in events if isinstance(e, ev.ReplyError)]
    assert [(e.code, e.message, e.retryable, e.status_code) for e in errors] == [
        ("server", "endpoint reported an error in the stream (code 500): boom", not spoken, 500)
    ]
    transcripts = [e.text for e in events if isinstance(e, ev.AgentTranscript)]
    apology = session.config.apology
    assert transcripts[0] == (f"{spoken} {apology}" if spoken else apology)
    assert transcripts[-1] == "All good now."
    assert [e.status for e in events if isinstance(e, ev.ReplyDone)] == ["failed", "completed"]
    assert len(chat_requests) == len(first) + 1
