"""What a soak's client saw, counted: user turns and their outcome, replies, endpoint errors,
and the drift of a memory series.

A conversation is recorded as the events its client received, in order
(:class:`Seen`). :func:`turns` splits them into user turns: a turn starts at a
``transcript.user`` and runs to the next one of a different item (the same item
transcribed again is the same turn, continued). Each turn is then:

* ``answered``: a reply finished (``reply.done`` completed or interrupted) in it;
* ``apologised``: a ``reply.error`` in it (the user heard the apology);
* ``superseded``: no reply had started when the user spoke again (the next turn's
  reply answers both: the words are in the history);
* ``neither``: none of these (a turn the user was left without).

:func:`drift` fits a least-squares line to ``(seconds, KiB)`` samples and gives
its slope in MB per hour with the slope's standard error.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

__all__ = ["Drift", "Seen", "Turn", "drift", "turns"]

Outcome = Literal["answered", "apologised", "superseded", "neither"]


@dataclass(frozen=True, slots=True)
class Seen:
    """One event a soak client received: ``t`` seconds since the run began, the event's
    ``kind`` (its protocol type, or ``dropped`` / ``resumed`` for the client's own), and
    ``detail`` (the item id of ``transcript.user``, the status of ``reply.done``, the code of
    ``reply.error``, the close code of ``dropped``), and the ``reply_id`` of reply events
    (``reply.audio`` recorded once per reply: that some of it arrived)."""

    t: float
    kind: str
    detail: str = ""
    reply_id: str = ""


@dataclass(slots=True)
class Turn:
    """One user turn and what followed it up to the next one."""

    item_id: str
    t: float
    events: list[Seen] = field(default_factory=list)
    superseded: bool = False

    @property
    def replies_here(self) -> int:
        """Replies finished on the connection that heard the turn, as the server counts
        turn metrics (``voxloop_turns_total``): a reply after a resume answers from the kept
        state, not from the speech, and a reply interrupted before any of its audio came
        was withdrawn (the user went on with the same turn) and is no turn of its own."""
        count = 0
        audible: set[str] = set()
        for e in self.events:
            if e.kind in ("dropped", "resumed", "session.ready"):
                break
            if e.kind == "reply.audio":
                audible.add(e.reply_id)
            elif e.kind == "reply.done":
                count += e.detail != "interrupted" or e.reply_id in audible
        return count

    @property
    def outcome(self) -> Outcome:
        kinds = [e.kind for e in self.events]
        if "reply.error" in kinds:
            return "apologised"
        if any(e.kind == "reply.done" and e.detail in ("completed", "interrupted")
               for e in self.events):  # fmt: skip
            return "answered"
        if self.superseded:
            return "superseded"
        return "neither"


def turns(seen: Sequence[Seen]) -> list[Turn]:
    """The user turns of one conversation's events, in order (see the module docstring)."""
    found: list[Turn] = []
    current: Turn | None = None
    for event in seen:
        if event.kind == "transcript.user":
            continued = (
                current is not None
                and event.detail == current.item_id
                and not any(e.kind in ("session.ready", "resumed") for e in current.events)
            )
            if continued:
                continue
            if current is not None and not any(e.kind == "reply.started" for e in current.events):
                current.superseded = True
            current = Turn(event.detail, event.t)
            found.append(current)
        elif current is not None:
            current.events.append(event)
    return found


@dataclass(frozen=True, slots=True)
class Drift:
    """A least-squares slope: ``mb_per_hour`` ± ``stderr_mb_per_hour`` over ``samples``
    points spanning ``span_s`` seconds (None when fewer than three points)."""

    mb_per_hour: float | None
    stderr_mb_per_hour: float | None
    samples: int
    span_s: float


def drift(points: Sequence[tuple[float, float]]) -> Drift:
    """The slope of ``(seconds, KiB)`` points in MB (10⁶ bytes) per hour, with its standard
    error (ordinary least squares; samples taken close together are correlated, so the
    error is a lower bound of the real uncertainty)."""
    n = len(points)
    span = points[-1][0] - points[0][0] if points else 0.0
    if n < 3 or span <= 0:
        return Drift(None, None, n, round(span, 1))
    mx = sum(t for t, _ in points) / n
    my = sum(kb for _, kb in points) / n
    sxx = sum((t - mx) ** 2 for t, _ in points)
    slope = sum((t - mx) * (kb - my) for t, kb in points) / sxx  # KiB per second
    residual = sum((kb - (my + slope * (t - mx))) ** 2 for t, kb in points)
    stderr = math.sqrt(residual / (n - 2) / sxx)
    per_hour = 1024 * 3600 / 1e6  # KiB/s -> MB/h
    return Drift(round(slope * per_hour, 1), round(stderr * per_hour, 1), n, round(span, 1))
