from __future__ import annotations

import pytest

from runtime.conversation.config import TurnDetection
from runtime.conversation.session import is_backchannel
from runtime.conversation.turns import (
    TRANSITIONS,
    InvalidState,
    TurnState,
    TurnStateMachine,
    diagram,
)


def test_the_normal_cycle_and_barge_in_path():
    sm = TurnStateMachine()
    for state in (
        TurnState.USER_SPEAKING,
        TurnState.THINKING,
        TurnState.SPEAKING,
        TurnState.INTERRUPTED,
        TurnState.USER_SPEAKING,
        TurnState.THINKING,
        TurnState.SPEAKING,
        TurnState.LISTENING,
    ):
        sm.to(state)
    assert sm.state is TurnState.LISTENING
    assert sm.history[0] is TurnState.LISTENING and len(sm.history) == 9


@pytest.mark.parametrize(
    ("start", "target"),
    [(s, t) for s in TurnState for t in TurnState if t is not s and t not in TRANSITIONS[s]],
)
def test_every_illegal_transition_raises(start: TurnState, target: TurnState):
    sm = TurnStateMachine()
    sm._state = start
    with pytest.raises(InvalidState, match=f"cannot go from {start.value} to {target.value}"):
        sm.to(target)


def test_the_diagram_lists_every_transition():
    text = diagram()
    assert text.count("-->") == sum(len(v) for v in TRANSITIONS.values())


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Uh-huh.", True),
        ("Okay", True),
        ("mm hmm", True),
        ("", True),
        ("Wait, stop.", False),
        ("Okay, but what about Tuesday?", False),
    ],
)
def test_backchannels(text: str, expected: bool):
    assert is_backchannel(text) is expected


def test_turn_detection_is_validated():
    with pytest.raises(ValueError, match="pause_ms"):
        TurnDetection(pause_ms=500, min_silence_ms=400)
    with pytest.raises(ValueError, match="vad_threshold"):
        TurnDetection(vad_threshold=2)
