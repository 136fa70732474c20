from __future__ import annotations

from pathlib import Path

import pytest

from runtime.conversation.config import TurnDetection
from runtime.conversation.policy import is_backchannel
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


# Written out by hand, independently of the table: a change to either must be deliberate.
GOLDEN = {
    ("listening", "user_speaking"),  # the user starts a turn
    ("listening", "thinking"),  # a greeting or an injected message
    ("user_speaking", "listening"),  # the turn ended with nothing transcribed
    ("user_speaking", "thinking"),  # end of turn
    ("thinking", "speaking"),  # first reply audio
    ("thinking", "listening"),  # empty transcript, empty or failed reply
    ("thinking", "interrupted"),  # the user interrupts before the first audio
    ("thinking", "user_speaking"),  # the reply ended with the user's words pending
    ("speaking", "listening"),  # the reply is done
    ("speaking", "interrupted"),  # barge-in
    ("speaking", "thinking"),  # a new reply replaces the current one
    ("interrupted", "user_speaking"),  # the interruption is the next turn
    ("interrupted", "listening"),
}


def test_the_table_is_the_golden_one():
    table = {(s.value, t.value) for s, targets in TRANSITIONS.items() for t in targets}
    assert table == GOLDEN
    assert ("listening", "speaking") not in table


def test_the_documented_diagram_is_the_table():
    page = (Path(__file__).parents[2] / "docs" / "conversation.md").read_text()
    block = page.split("```mermaid\n", 1)[1].split("```", 1)[0].strip()
    assert block == diagram()
    edges = {tuple(line.split(" --> ")) for line in block.splitlines()[1:]}
    assert {(a.strip(), b.strip()) for a, b in edges} == GOLDEN


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
