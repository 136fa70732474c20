"""Events out of the conversation core. They mirror the Voice Agent wire protocol.

Every event carries ``t_ns`` from the session's injected clock. The set is
closed: adapters ``match`` on it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal


@dataclass(frozen=True, slots=True, kw_only=True)
class SpeechStarted:
    """The user started talking.

    ``continued``: they went on with the turn whose transcript was just sent
    (a mid-sentence pause had ended it, its reply unheard); the next
    :class:`UserTranscript` carries the same ``item_id`` and replaces it.
    """

    t_ns: int
    continued: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class SpeechStopped:
    t_ns: int


@dataclass(frozen=True, slots=True, kw_only=True)
class UserTranscriptDelta:
    t_ns: int
    text: str


@dataclass(frozen=True, slots=True, kw_only=True)
class UserTranscript:
    t_ns: int
    text: str
    item_id: str


@dataclass(frozen=True, slots=True, kw_only=True)
class ReplyStarted:
    t_ns: int
    reply_id: str


@dataclass(frozen=True, slots=True, kw_only=True)
class ReplyAudio:
    t_ns: int
    reply_id: str
    pcm: bytes = field(repr=False)
    sample_rate: int


@dataclass(frozen=True, slots=True, kw_only=True)
class AgentTranscriptDelta:
    t_ns: int
    reply_id: str
    delta: str


@dataclass(frozen=True, slots=True, kw_only=True)
class AgentTranscript:
    t_ns: int
    reply_id: str
    text: str
    interrupted: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class ReplyDone:
    t_ns: int
    reply_id: str
    status: Literal["completed", "interrupted", "failed"]


@dataclass(frozen=True, slots=True, kw_only=True)
class ToolCallRequested:
    t_ns: int
    reply_id: str
    call_id: str
    name: str
    arguments: dict[str, Any]


@dataclass(frozen=True, slots=True, kw_only=True)
class ReplyError:
    t_ns: int
    reply_id: str
    code: str
    message: str
    retryable: bool
    status_code: int | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class TurnMetrics:
    """Latency of one answered user turn (ms). ``None`` where a part did not happen."""

    t_ns: int
    reply_id: str
    user_text: str
    agent_text: str
    interrupted: bool
    stt_final_ms: float | None
    ttft_ms: float | None
    first_sentence_ms: float | None
    tts_first_audio_ms: float | None
    v2v_ms: float | None
    overhead_ms: float | None
    endpointing_ms: float | None
    speculative: bool
    llm_entry: int | None = None
    """The index of the ``llm`` entry that answered (0: the first)."""
    llm_host: str | None = None
    """That entry's host (never its key)."""
    llm_skipped: tuple[tuple[int, str], ...] = ()
    """Entries not used, ``(index, reason)``: an error kind, ``circuit_open``,
    ``budget`` or ``hedged``."""

    def to_json(self) -> dict[str, Any]:
        return {
            "user_text": self.user_text,
            "agent_text": self.agent_text,
            "interrupted": self.interrupted,
            "stt_final_ms": self.stt_final_ms,
            "ttft_ms": self.ttft_ms,
            "first_sentence_ms": self.first_sentence_ms,
            "tts_first_audio_ms": self.tts_first_audio_ms,
            "v2v_ms": self.v2v_ms,
            "overhead_ms": self.overhead_ms,
            "endpointing_ms": self.endpointing_ms,
            "speculative": self.speculative,
            "llm_entry": self.llm_entry,
            "llm_host": self.llm_host,
            "llm_skipped": [list(s) for s in self.llm_skipped],
        }


ConversationEvent = (
    SpeechStarted
    | SpeechStopped
    | UserTranscriptDelta
    | UserTranscript
    | ReplyStarted
    | ReplyAudio
    | AgentTranscriptDelta
    | AgentTranscript
    | ReplyDone
    | ToolCallRequested
    | ReplyError
    | TurnMetrics
)
