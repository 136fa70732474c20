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
from typing import Any


@dataclass(frozen=True, slots=True)
class SpokenSegment:
    """A segment of text and where its audio lies (samples, from the reply's first sample)."""

    text: str
    start: int
    end: int


@dataclass(slots=True)
class SpokenLog:
    """The segments of one reply, in the order they were played."""

    segments: list[SpokenSegment] = field(default_factory=list)

    def add(self, text: str, start: int, end: int) -> None:
        if end > start:
            self.segments.append(SpokenSegment(text, start, end))

    @property
    def text(self) -> str:
        return " ".join(s.text for s in self.segments)


def heard_prefix(segments: list[SpokenSegment], played: int) -> str:
    """The words of ``segments`` a listener heard once ``played`` samples were played.

    A segment cut part-way contributes the share of its words proportional to
    the share of its audio played (rounded down). ``played`` <= 0 gives "".
    """
    words: list[str] = []
    for seg in segments:
        if seg.end <= played:
            words += seg.text.split()
        elif seg.start < played:
            seg_words = seg.text.split()
            fraction = (played - seg.start) / max(1, seg.end - seg.start)
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
