"""Injectable monotonic clocks.

Pipeline logic never reads the wall clock; it asks a :class:`Clock` for
monotonic nanoseconds so tests can drive time and benchmarks can share the
instrumentation that runs in production.
"""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    """A source of monotonic time in nanoseconds."""

    def now_ns(self) -> int: ...


class MonotonicClock:
    """The real clock: ``time.perf_counter_ns``."""

    __slots__ = ()

    def now_ns(self) -> int:
        return time.perf_counter_ns()


class ManualClock:
    """A clock that only moves when told to (for tests and replay)."""

    __slots__ = ("_now",)

    def __init__(self, start_ns: int = 0) -> None:
        self._now = start_ns

    def now_ns(self) -> int:
        return self._now

    def advance_ms(self, ms: float) -> None:
        if ms < 0:
            raise ValueError("a monotonic clock cannot go backwards")
        self._now += round(ms * 1_000_000)


def ns_to_ms(ns: int) -> float:
    return ns / 1_000_000
