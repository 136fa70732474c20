"""What keeps a headless client on the line: a reply awaited across a drop and its resume."""

from __future__ import annotations

from runtime.client.connection import ConnectionDropped, SessionResumed
from runtime.client.runner import REPLY_WAIT_S, _Activity
from runtime.protocol.events import InputSpeechStarted, InputSpeechStopped, ReplyDone, ReplyStarted


def test_a_reply_cut_by_a_drop_is_awaited_again_from_the_resume() -> None:
    activity = _Activity()
    activity.on_event(InputSpeechStarted(), 0.0)
    activity.on_event(InputSpeechStopped(), 1.0)
    activity.on_event(
        ReplyStarted(reply_id="r1", item_id="i1"), 2.0
    )  # its reply.done never comes: the worker died
    activity.on_event(ConnectionDropped(close_code=None), 3.0)
    # Resuming keeps the client on the line however long it takes.
    assert activity.busy(3.0 + 10 * REPLY_WAIT_S)
    activity.on_event(SessionResumed(session_id="sess_x"), 40.0)
    # The resumed session answers the user's last words: awaited from the resume on.
    assert activity.busy(40.0 + REPLY_WAIT_S - 0.1)
    assert not activity.busy(40.0 + REPLY_WAIT_S)
    activity.on_event(ReplyStarted(reply_id="r1", item_id="i1"), 42.0)
    assert activity.busy(100.0)
    activity.on_event(ReplyDone(status="completed"), 43.0)
    assert not activity.busy(43.0)


def test_a_drop_with_nothing_awaited_awaits_nothing_after_the_resume() -> None:
    activity = _Activity()
    activity.on_event(ConnectionDropped(close_code=1012), 0.0)
    assert activity.busy(0.0)
    activity.on_event(SessionResumed(session_id="sess_x"), 1.0)
    assert not activity.busy(1.0)
