"""The turn state machine.

Theory of operation
-------------------
One session is in exactly one of these states. Transitions are listed in one
table; anything else raises :class:`InvalidState` (a bug, never user input)::

    LISTENING ──speech──▶ USER_SPEAKING ──end of turn──▶ THINKING ──first audio──▶ SPEAKING
        ▲                      │  ▲                           │                        │
        │                 empty turn                     barge-in / failure       barge-in
        │                      ▼  │                           ▼                        ▼
        └──────────────── LISTENING ◀────────── done ─── INTERRUPTED ◀─────────────────┘

INTERRUPTED is passed through when a reply is cut by the user: the cut is
accounted (heard text, events) and the user's speech continues as a new turn
(USER_SPEAKING). A greeting or injected reply starts at THINKING from LISTENING.
"""

from __future__ import annotations

import enum
from typing import Final


class TurnState(enum.Enum):
    LISTENING = "listening"
    USER_SPEAKING = "user_speaking"
    THINKING = "thinking"
    SPEAKING = "speaking"
    INTERRUPTED = "interrupted"


class InvalidState(RuntimeError):
    """A transition the table does not allow."""


_S = TurnState
TRANSITIONS: Final[dict[TurnState, frozenset[TurnState]]] = {
    _S.LISTENING: frozenset({_S.USER_SPEAKING, _S.THINKING}),
    _S.USER_SPEAKING: frozenset({_S.LISTENING, _S.THINKING}),
    _S.THINKING: frozenset({_S.SPEAKING, _S.LISTENING, _S.INTERRUPTED, _S.USER_SPEAKING}),
    _S.SPEAKING: frozenset({_S.LISTENING, _S.INTERRUPTED, _S.THINKING}),
    _S.INTERRUPTED: frozenset({_S.USER_SPEAKING, _S.LISTENING}),
}


class TurnStateMachine:
    """Holds the current state and enforces :data:`TRANSITIONS`."""

    __slots__ = ("_state", "history")

    def __init__(self) -> None:
        self._state = TurnState.LISTENING
        self.history: list[TurnState] = [self._state]

    @property
    def state(self) -> TurnState:
        return self._state

    def to(self, new: TurnState) -> None:
        """Move to ``new``.

        Raises:
            InvalidState: the table has no such transition.
        """
        if new is self._state:
            return
        if new not in TRANSITIONS[self._state]:
            raise InvalidState(f"cannot go from {self._state.value} to {new.value}")
        self._state = new
        self.history.append(new)


def diagram() -> str:
    """The transition table as a Mermaid state diagram (for the docs)."""
    lines = ["stateDiagram-v2"]
    for src, targets in TRANSITIONS.items():
        lines += [
            f"    {src.value} --> {dst.value}" for dst in sorted(targets, key=lambda s: s.value)
        ]
    return "\n".join(lines)
