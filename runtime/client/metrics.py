"""Per-turn latency seen from the client (pure: timestamps in, metrics out).

What a person on the line experiences is the time from the end of their own
speech to the agent's first sound. A client knows both ends: it sends the
speech (so it knows when the voice in it ended) and it receives the first
``reply.audio``. :class:`VoiceEndTracker` finds the voice's end in the audio
the client sends — the last 10 ms block above -40 dBFS, the rule the
voice-to-voice benchmarks apply to recordings — and :class:`TurnTimer` follows
the server's events to pair each user turn with the reply that answers it.

All times are seconds on one monotonic clock that the caller passes in
(``loop.time()`` in the adapters).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

import numpy as np

from runtime.protocol.events import (
    InputSpeechStopped,
    ReplyAudio,
    ReplyDone,
    ReplyStarted,
    ToolCall,
    TranscriptAgent,
    TranscriptUser,
)

VOICE_DBFS: Final = -40.0
BLOCK_MS: Final = 10


class VoiceEndTracker:
    """Remembers when the voice in a 16-bit mono PCM stream last ended.

    Args:
        sample_rate: rate of the PCM pushed.
        threshold_dbfs: a 10 ms block whose RMS is above this is voice.
    """

    def __init__(self, sample_rate: int, threshold_dbfs: float = VOICE_DBFS) -> None:
        self._rate = sample_rate
        self._block = sample_rate * BLOCK_MS // 1000
        self._threshold = 10 ** (threshold_dbfs / 20) * 32768.0
        self._carry = b""
        self.last_voice_end: float | None = None

    def push(self, pcm: bytes, t_end: float) -> None:
        """Take the next chunk; its last sample was captured at ``t_end``."""
        data = self._carry + pcm
        n = len(data) // (2 * self._block)
        self._carry = data[n * 2 * self._block :]
        if n == 0:
            return
        x = np.frombuffer(data[: n * 2 * self._block], dtype="<i2").astype(np.float64)
        rms = np.sqrt(np.mean(x.reshape(n, self._block) ** 2, axis=1))
        voiced = np.nonzero(rms > self._threshold)[0]
        if voiced.size:
            # Samples after the last voiced block: the rest of the whole blocks plus the carry.
            after = (n - 1 - int(voiced[-1])) * self._block + len(self._carry) // 2
            self.last_voice_end = t_end - after / self._rate


def _ms(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else round((b - a) * 1000.0, 1)


@dataclass(frozen=True, slots=True, kw_only=True)
class ClientTurnMetrics:
    """One answered user turn, timed at the client (ms; ``None`` where it did not happen).

    Attributes:
        v2v_ms: end of the user's voice → first ``reply.audio`` received.
        endpointing_ms: end of the voice → ``input.speech.stopped`` received.
        stt_final_ms: ``input.speech.stopped`` → ``transcript.user`` received.
        reply_started_ms: end of the voice → ``reply.started`` received.
        item_id: the user turn's item (``transcript.user``; not in :meth:`to_json`).
    """

    reply_id: str
    user_text: str
    agent_text: str
    interrupted: bool
    v2v_ms: float | None
    endpointing_ms: float | None
    stt_final_ms: float | None
    reply_started_ms: float | None
    item_id: str = ""

    def to_json(self) -> dict[str, Any]:
        """The same keys as ``voxloop talk``'s metrics; the server-internal
        stages (time to first token, first sentence, synthesis, overhead) are
        not visible over the socket and are ``null``."""
        return {
            "reply_id": self.reply_id,
            "user_text": self.user_text,
            "agent_text": self.agent_text,
            "interrupted": self.interrupted,
            "stt_final_ms": self.stt_final_ms,
            "ttft_ms": None,
            "first_sentence_ms": None,
            "tts_first_audio_ms": None,
            "v2v_ms": self.v2v_ms,
            "overhead_ms": None,
            "endpointing_ms": self.endpointing_ms,
            "reply_started_ms": self.reply_started_ms,
            "speculative": None,
        }


@dataclass(slots=True)
class _Turn:
    voice_end: float | None = None
    stopped: float | None = None
    user_text: str = ""
    transcript_at: float | None = None
    item_id: str = ""
    reply_id: str | None = None
    reply_started: float | None = None
    first_audio: float | None = None
    agent_text: str = ""
    interrupted: bool = False
    calls_tool: bool = False  # its reply's part ended with a tool call: the reply goes on


class TurnTimer:
    """Pairs user turns with their replies and times them.

    Feed it the audio sent (:meth:`audio_sent`) and every application event
    (:meth:`on_event`); it returns a :class:`ClientTurnMetrics` when the reply
    to a user turn is done. Replies that answer no user turn (the greeting,
    ``reply.create``) are not turns. A reply whose part ends with ``tool.call``
    goes on after the result as a new ``reply.started``: the same turn (its text
    both parts', its first audio the first heard). A turn taken back (the user
    went on before hearing its reply: the next ``transcript.user`` carries the
    same ``item_id``) is no turn of its own: its withdrawn reply leaves
    :attr:`metrics`, and the whole turn is the next one.
    """

    def __init__(self, sample_rate: int) -> None:
        self.voice = VoiceEndTracker(sample_rate)
        self._awaiting: _Turn | None = None  # the user turn whose reply has not started
        self._replies: dict[str, _Turn] = {}
        self._current = ""  # the latest reply.started (events without a reply_id)
        self._after_tool: _Turn | None = None  # a turn whose reply waits on a tool result
        self.metrics: list[ClientTurnMetrics] = []

    def audio_sent(self, pcm: bytes, t_end: float) -> None:
        """16-bit PCM at ``sample_rate`` whose last sample was sent at ``t_end``."""
        self.voice.push(pcm, t_end)

    def on_event(self, event: object, now: float) -> ClientTurnMetrics | None:
        """Take one event received at ``now``; returns a finished turn, if any."""
        match event:
            case InputSpeechStopped():
                finished = self._finish_after_tool()
                self._awaiting = _Turn(voice_end=self.voice.last_voice_end, stopped=now)
                return finished
            case TranscriptUser(text=text, item_id=item_id):
                if self._awaiting is not None:
                    self._awaiting.user_text = text
                    self._awaiting.transcript_at = now
                    self._awaiting.item_id = item_id
                    self._drop_taken_back(item_id)
            case ReplyStarted(reply_id=reply_id):
                self._current = reply_id
                awaiting, self._awaiting = self._awaiting, None
                if awaiting is None and self._after_tool is not None:
                    # The reply goes on after its tool result: the same turn.
                    awaiting, self._after_tool = self._after_tool, None
                    awaiting.calls_tool = False
                    self._replies[reply_id] = awaiting
                elif awaiting is not None:
                    awaiting.reply_id, awaiting.reply_started = reply_id, now
                    self._replies[reply_id] = awaiting
            case ReplyAudio(reply_id=reply_id):
                playing = self._replies.get(reply_id or self._current)
                if playing is not None and playing.first_audio is None:
                    playing.first_audio = now
            case TranscriptAgent(reply_id=reply_id, text=text, interrupted=interrupted):
                spoken = self._replies.get(reply_id or self._current)
                if spoken is not None:
                    spoken.agent_text = " ".join(t for t in (spoken.agent_text, text) if t)
                    spoken.interrupted = interrupted
            case ToolCall(reply_id=reply_id):
                calling = self._replies.get(reply_id or self._current)
                if calling is not None:
                    calling.calls_tool = True
            case ReplyDone(reply_id=reply_id, status=status):
                done = self._replies.pop(reply_id or self._current, None)
                if done is not None and done.calls_tool and status == "completed":
                    self._after_tool = done  # finished when the reply after the result is
                elif done is not None:
                    return self._finish(done, interrupted=status == "interrupted")
        return None

    def _finish_after_tool(self) -> ClientTurnMetrics | None:
        """A new user turn: a turn still waiting for the reply after its tool ends here."""
        waiting, self._after_tool = self._after_tool, None
        return None if waiting is None else self._finish(waiting, interrupted=False)

    def _drop_taken_back(self, item_id: str) -> None:
        if item_id:
            self.metrics[:] = [m for m in self.metrics if m.item_id != item_id]

    def _finish(self, turn: _Turn, *, interrupted: bool) -> ClientTurnMetrics:
        m = ClientTurnMetrics(
            reply_id=turn.reply_id or "",
            user_text=turn.user_text,
            agent_text=turn.agent_text,
            interrupted=turn.interrupted or interrupted,
            v2v_ms=_ms(turn.voice_end, turn.first_audio),
            endpointing_ms=_ms(turn.voice_end, turn.stopped),
            stt_final_ms=_ms(turn.stopped, turn.transcript_at),
            reply_started_ms=_ms(turn.voice_end, turn.reply_started),
            item_id=turn.item_id,
        )
        self.metrics.append(m)
        return m
