"""The conversation history and what the user actually heard.

Theory of operation
-------------------
:class:`History` is the one place that writes the messages sent to the
endpoint. A reply is recorded once, when it ends (:meth:`History.record`):
the user message that prompted it (if any), its tool round trips, then the
assistant text — all of it when the reply completed, only the words the user
heard when it was interrupted (:func:`heard_prefix`, from the sink's playout
position). An interruption's words are the next user message, so the history
reads as the conversation sounded.

:class:`SpokenLog` records where each spoken segment lies in the reply's audio
(samples from the reply's first sample), which is what :func:`heard_prefix`
cuts at.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Final

# The speech rate assumed for a segment cut before its voice had written all of it: a fast
# speaker's, below what the bundled voices take (51-91 ms per character, trailing pause
# included), so that a segment cut in its last chunk keeps its written length, and a segment
# cut early is not heard as more than a fast voice would have said by then.
FAST_MS_PER_CHAR: Final = 45.0


@dataclass(frozen=True, slots=True)
class SpokenSegment:
    """A segment of text and where its audio lies (samples, from the reply's first sample).

    ``full_end``: where its audio would have ended had it all been written, for a segment
    cut before its voice finished it (an estimate); None when ``end`` is the whole of it.
    """

    text: str
    start: int
    end: int
    full_end: int | None = None


@dataclass(slots=True)
class SpokenLog:
    """The segments of one reply, in the order they were played."""

    segments: list[SpokenSegment] = field(default_factory=list)

    def add(
        self, text: str, start: int, end: int, *, complete: bool = True, sample_rate: int = 0
    ) -> None:
        """Record a segment whose audio was written from ``start`` to ``end`` (samples).

        ``complete=False``: the voice was cut before it wrote all of the segment (a
        streaming voice writes a segment in many chunks). Its whole length is then taken
        as at least its characters at :data:`FAST_MS_PER_CHAR` (at ``sample_rate``), so
        that a cut after a tenth of a sentence's audio is not heard as the whole sentence.
        """
        if end <= start:
            return
        full_end = None
        if not complete:
            fast = round(len(text) * FAST_MS_PER_CHAR * sample_rate / 1000)
            full_end = start + max(end - start, fast)
        self.segments.append(SpokenSegment(text, start, end, full_end))

    @property
    def text(self) -> str:
        return " ".join(s.text for s in self.segments)


def heard_prefix(segments: list[SpokenSegment], played: int) -> str:
    """The words of ``segments`` a listener heard once ``played`` samples were played.

    A segment cut part-way contributes the share of its words proportional to
    the share of its audio played (rounded down), of its whole length for a segment
    its voice did not finish (``full_end``). ``played`` <= 0 gives "".
    """
    words: list[str] = []
    for seg in segments:
        full = seg.end if seg.full_end is None else seg.full_end
        if full <= played:
            words += seg.text.split()
        elif seg.start < played:
            seg_words = seg.text.split()
            fraction = (min(played, seg.end) - seg.start) / max(1, full - seg.start)
            words += seg_words[: int(len(seg_words) * fraction)]
            break
        else:
            break
    return " ".join(words)


class History:
    """The messages of one conversation (OpenAI chat shape).

    The list in :attr:`messages` is the live history; callers read it, only
    :class:`History` appends to it.
    """

    __slots__ = ("messages",)

    def __init__(self) -> None:
        self.messages: list[dict[str, Any]] = []

    def start(self, system_prompt: str) -> None:
        """Begin a conversation: the system prompt alone."""
        self.messages[:] = [{"role": "system", "content": system_prompt}]

    def restore(self, messages: list[dict[str, Any]]) -> None:
        """Continue an earlier conversation: its messages after the system prompt."""
        self.messages.extend(messages)

    def set_system(self, system_prompt: str) -> None:
        """Replace the system prompt (the configuration changed mid-conversation)."""
        if self.messages and self.messages[0].get("role") == "system":
            self.messages[0] = {"role": "system", "content": system_prompt}

    def add(self, role: str, content: str) -> None:
        """A message a client added to the conversation (``user`` or ``system``)."""
        self.messages.append({"role": role, "content": content})

    def request(
        self,
        *,
        user_text: str = "",
        tool_messages: list[dict[str, Any]] | None = None,
        instructions: str | None = None,
    ) -> list[dict[str, Any]]:
        """The messages for a request: the history, then this reply's own so far."""
        messages = list(self.messages)
        if user_text:
            messages.append({"role": "user", "content": user_text})
        messages.extend(tool_messages or ())
        if instructions:
            messages.append({"role": "system", "content": instructions})
        return messages

    def record(
        self,
        *,
        user_text: str,
        tool_messages: list[dict[str, Any]],
        assistant_text: str,
    ) -> None:
        """Append one finished reply: its user message (if any), tool messages, then the text."""
        if user_text:
            self.messages.append({"role": "user", "content": user_text})
        self.messages.extend(tool_messages)
        if assistant_text:
            self.messages.append({"role": "assistant", "content": assistant_text})

    def add_user(self, text: str) -> None:
        """A user message that got no reply of its own (it is answered with the next one)."""
        if text:
            self.messages.append({"role": "user", "content": text})
