"""Session configuration: the Voice Agent session fields plus voxloop's latency knobs."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final

from runtime.conversation.tools import Tool

SPOKEN_GUIDANCE: Final = (
    "Your reply is spoken aloud by a text-to-speech voice: answer in short, natural sentences, "
    "without markdown, lists, code or emoji, and say numbers the way a person would."
)
# Silence (ms) after which what was said is decoded for the speculative reply, before the pause
# (see TurnDetection.speculate_ms). Measured side by side with Pipecat, voxloop on one core: end
# of speech to first audio 390 vs 530 ms ("Hello world!") and 470 vs 650 ms (phone speech);
# the turn-taking decisions do not move (docs/benchmarks.md, turn-taking).
SPECULATE_MS: Final[int | None] = 40
APOLOGY: Final = "Sorry, I'm having trouble answering right now. Could you say that again?"


@dataclass(frozen=True, slots=True)
class TurnDetection:
    """End of turn and barge-in (Voice Agent ``input.turn_detection`` plus voxloop knobs).

    Attributes:
        vad_threshold: speech probability threshold (0-1).
        min_silence_ms: silence that ends a turn whose transcript reads complete.
        max_silence_ms: silence that ends any turn.
        interrupt_response: whether user speech can cut the agent off.
        pause_ms: silence after which the transcript the end of turn is decided on is
            decoded (and a speculative reply starts, unless ``speculate_ms`` started one).
        speculate_ms: silence (ms) after which what was said so far is decoded for a
            speculative reply only, before ``pause_ms`` (40 by default): the reply's request
            leaves sooner, while the end of turn still reads the decode at ``pause_ms`` (a
            reply whose text differs from it is started again on it). ``None``, or a value
            not below ``pause_ms``: no early decode.
        min_speech_ms: speech needed before a user turn starts.
        barge_in_ms: speech needed, while the agent talks, before it counts as an interruption.
        barge_in_min_words: words needed (back-channels such as "uh-huh" never count).
    """

    vad_threshold: float = 0.5
    min_silence_ms: int = 300
    max_silence_ms: int = 1200
    interrupt_response: bool = True
    pause_ms: int = 160
    speculate_ms: int | None = SPECULATE_MS
    min_speech_ms: int = 60
    barge_in_ms: int = 200
    barge_in_min_words: int = 1

    def __post_init__(self) -> None:
        if not 0.0 <= self.vad_threshold <= 1.0:
            raise ValueError("vad_threshold must be within 0..1")
        if not 0 < self.pause_ms <= self.min_silence_ms <= self.max_silence_ms:
            raise ValueError("need 0 < pause_ms <= min_silence_ms <= max_silence_ms")
        if self.speculate_ms is not None and self.speculate_ms <= 0:
            raise ValueError("speculate_ms must be positive (or None: no early decode)")
        if self.barge_in_ms < 0 or self.min_speech_ms < 0 or self.barge_in_min_words < 0:
            raise ValueError("barge-in and speech thresholds must not be negative")


@dataclass(frozen=True, slots=True)
class SessionConfig:
    """What one conversation is configured with."""

    system_prompt: str = "You are a helpful voice assistant."
    greeting: str | None = None
    voice: str | None = None
    tools: tuple[Tool, ...] = ()
    turn_detection: TurnDetection = field(default_factory=TurnDetection)
    spoken_guidance: bool = True
    speculative: bool = True
    apology: str = APOLOGY
    max_tool_rounds: int = 4
    temperature: float | None = None
    # The chat-completions ``max_tokens`` (None: none is sent, as the hosted platform
    # sends none; some endpoints reject it or cut answers short with it).
    max_tokens: int | None = None
    # The longest the caller waits in silence for a reply's first token, across
    # the endpoint client's retries, before the apology (None: the client's own
    # first_token_budget_s, 5 s).
    first_token_timeout_s: float | None = None
    # At session start, while the greeting plays (or the first turn is spoken), send one
    # short request: the system prompt and "Say hello.", 32 tokens at most
    # (ChatClient.warm_up). The endpoint caches the prompt's prefix (llama.cpp: the
    # first reply's TTFT drops several fold) and the client learns whether replies start
    # inside a template-opened think block. The first reply's request cancels it if it
    # is still running. Off in the core; talk, serve and the benchmarks turn it on.
    warm_prompt: bool = False
