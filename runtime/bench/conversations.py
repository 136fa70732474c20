"""Multi-turn conversations to replay against an endpoint.

A call is not a series of independent requests: every turn sends the whole
history so far (a prefix the endpoint may cache) and turns are separated by
the time the caller spends listening to the reply, speaking and being
endpointed. A :class:`Conversation` is a system prompt and its user turns,
each with that think time and, optionally, the assistant reply recorded in
the original call.

Sources:

* ``--conversations FILE.jsonl``: one conversation per line,
  ``{"id": "…", "system": "…", "turns": [{"user": "…", "assistant": "…",
  "think_ms": 1800}, …]}`` (``id``, ``system``, ``assistant`` and
  ``think_ms`` optional);
* the per-turn records ``voxloop talk --metrics-json`` writes
  (``{"turns": [{"user_text", "agent_text", "endpointing_ms", …}]}``),
  a whole file or one such document per line;
* :data:`BUILTIN`: five customer-service calls of four to six turns.

When a turn has no ``think_ms`` it is estimated as a caller would spend it:
listening to the previous reply (spoken at :data:`WORDS_PER_S`), saying the
new turn at the same rate, and the endpointing silence
(``endpointing_ms`` from the record, else :data:`ENDPOINTING_MS`). The first
turn has no think time.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from runtime.bench.files import read_utf8
from runtime.bench.ttft import VOICE_SYSTEM_PROMPT

WORDS_PER_S: Final = 2.5  # 150 words a minute, a conversational speaking rate
ENDPOINTING_MS: Final = 300.0  # TurnDetection.min_silence_ms, voxloop's default


@dataclass(frozen=True, slots=True)
class Turn:
    """One user turn: what is said, the recorded reply (if any), the pause before it (s)."""

    user: str
    assistant: str | None = None
    think_s: float | None = None


@dataclass(frozen=True, slots=True)
class Conversation:
    id: str
    system: str
    turns: tuple[Turn, ...]

    def think_s(self, index: int, previous_reply: str) -> float:
        """Seconds between the end of reply ``index - 1`` and sending turn ``index``."""
        if index == 0:
            return 0.0
        turn = self.turns[index]
        if turn.think_s is not None:
            return turn.think_s
        return estimate_think_s(previous_reply, turn.user)

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "system": self.system,
            "turns": [
                {
                    "user": t.user,
                    **({"assistant": t.assistant} if t.assistant is not None else {}),
                    **({"think_ms": t.think_s * 1000} if t.think_s is not None else {}),
                }
                for t in self.turns
            ],
        }


def estimate_think_s(
    previous_reply: str, user: str, endpointing_ms: float = ENDPOINTING_MS
) -> float:
    """Listening to ``previous_reply`` + saying ``user`` + the endpointing silence, seconds."""
    words = len(previous_reply.split()) + len(user.split())
    return words / WORDS_PER_S + endpointing_ms / 1000


def _from_talk_record(doc: dict[str, Any], name: str) -> Conversation:
    turns: list[Turn] = []
    previous = ""
    for i, rec in enumerate(doc["turns"]):
        if not isinstance(rec, dict) or not isinstance(rec.get("user_text"), str):
            raise ValueError(f"{name}: turns[{i}] has no user_text")
        agent = rec.get("agent_text")
        agent = agent if isinstance(agent, str) else None
        endpointing = rec.get("endpointing_ms")
        think = None
        if i:
            think = estimate_think_s(
                previous,
                rec["user_text"],
                float(endpointing) if isinstance(endpointing, int | float) else ENDPOINTING_MS,
            )
        turns.append(Turn(user=rec["user_text"], assistant=agent, think_s=think))
        previous = agent or ""
    if not turns:
        raise ValueError(f"{name}: no turns")
    return Conversation(id=name, system=VOICE_SYSTEM_PROMPT, turns=tuple(turns))


def _from_line(doc: object, name: str) -> Conversation:
    if not isinstance(doc, dict) or not isinstance(doc.get("turns"), list) or not doc["turns"]:
        raise ValueError(f'{name}: expected {{"turns": [...]}}')
    first = doc["turns"][0]
    if isinstance(first, dict) and "user_text" in first:
        return _from_talk_record(doc, name)
    turns: list[Turn] = []
    for i, t in enumerate(doc["turns"]):
        if not isinstance(t, dict) or not isinstance(t.get("user"), str) or not t["user"]:
            raise ValueError(f'{name}: turns[{i}] needs "user" (a string)')
        think = t.get("think_ms")
        if think is not None and (not isinstance(think, int | float) or think < 0):
            raise ValueError(f"{name}: turns[{i}].think_ms must be a number >= 0")
        assistant = t.get("assistant")
        if assistant is not None and not isinstance(assistant, str):
            raise ValueError(f"{name}: turns[{i}].assistant must be a string")
        think_s = None if think is None else think / 1000
        turns.append(Turn(user=t["user"], assistant=assistant, think_s=think_s))
    system = doc.get("system", VOICE_SYSTEM_PROMPT)
    if not isinstance(system, str):
        raise ValueError(f"{name}: system must be a string")
    return Conversation(id=str(doc.get("id") or name), system=system, turns=tuple(turns))


def load_conversations(path: Path) -> list[Conversation]:
    """Read conversations from JSON Lines or a ``talk --metrics-json`` file.

    Raises:
        ValueError: unreadable file, bad JSON, or a line of neither form (with its line number).
    """
    text = read_utf8(path)
    try:
        whole = json.loads(text)
    except ValueError:
        whole = None
    if isinstance(whole, dict):
        return [_from_line(whole, path.stem)]
    conversations: list[Conversation] = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            doc = json.loads(line)
        except ValueError:
            raise ValueError(f"{path}:{number}: not valid JSON") from None
        conversations.append(_from_line(doc, f"{path.name}:{number}"))
    if not conversations:
        raise ValueError(f"{path} has no conversations")
    return conversations


def _call(cid: str, *turns: str) -> Conversation:
    return Conversation(
        id=cid, system=VOICE_SYSTEM_PROMPT, turns=tuple(Turn(user=t) for t in turns)
    )


BUILTIN: Final[tuple[Conversation, ...]] = (
    _call(
        "order-status",
        "Hi, I ordered a rain jacket last week and wanted to check on it.",
        "It's under jamie dot lee at example dot com.",
        "When is it going to arrive?",
        "Can I still change the delivery address?",
        "Great, thanks. That's all.",
    ),
    _call(
        "return",
        "Hello, I need to return a pair of hiking boots.",
        "They're too small. I bought them about two weeks ago.",
        "Do I have to pay for the return shipping?",
        "Okay. How long does the refund take once you get them?",
    ),
    _call(
        "exchange",
        "Hi there, can I swap a jacket for a different size?",
        "The order number is four four two one nine.",
        "I'd like a large instead of the medium.",
        "Do you have it in forest green as well?",
        "Let's do the green one in large then.",
        "Perfect, thank you so much.",
    ),
    _call(
        "store-hours",
        "Hey, what time does your downtown store close today?",
        "And are you open on Sunday?",
        "Is there parking nearby?",
        "Thanks, see you then.",
    ),
    _call(
        "account",
        "I can't log into my account on your website.",
        "I tried resetting my password but never got the email.",
        "It's jamie dot lee at example dot com.",
        "Got it, it just arrived. Thanks for your help.",
    ),
)
