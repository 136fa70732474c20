"""Capacity of a worker: when a level of concurrent sessions holds, and the tables.

A *level* is a number of realtime sessions run at once against ``voxloop serve``;
it *holds* when the service criterion (:class:`Criterion`) holds for it: every
user turn of every session answered, no error event, the agent's audio paced to
real time (the worst session's p99 lateness, which bounds the level's own p99,
at most ``pacing_p99_ms`` above the p99 timer overshoot of an idle process timed
beside the level: on a shared machine the neighbours' load is not the worker's),
and the median end of speech → first agent audio within ``v2v_factor`` x the
one-session figure of the same run. The capacity is the largest level that holds
with every smaller level holding too.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class Criterion:
    """When a level holds.

    Attributes:
        pacing_p99_ms: the worst session's p99 lateness of the agent's audio pieces
            against real time, ms, at most this above the idle process's p99 lag.
        v2v_factor: the level's median voice-to-voice (end of the user's speech →
            first agent audio at the client) at most this x the one-session median.
    """

    pacing_p99_ms: float = 20.0
    v2v_factor: float = 1.5

    def describe(self) -> str:
        """The criterion as one sentence (for reports)."""
        return (
            "every user turn answered, no error event, the worst session's p99 pacing "
            f"lateness ≤ {self.pacing_p99_ms:g} ms + an idle process's p99 timer lag at the "
            f"same time, and median v2v ≤ {self.v2v_factor:g}x the 1-session median"
        )


@dataclass(frozen=True, slots=True)
class Level:
    """What one level measured.

    Attributes:
        sessions: concurrent sessions.
        expected_turns: user turns each session's recording holds.
        user_turns: user turns the server transcribed (``transcript.user``), all sessions.
        answered: of those, the ones a reply (``reply.done``) followed.
        errors: error events and failed sessions by code.
        v2v_ms: every turn's end of speech → first agent audio at the client, ms.
        pacing_p99_ms: each session's p99 lateness of its audio pieces, ms.
        cpu_pct: the server processes' CPU time over the level's wall time, % of one core.
        rss_mb: the server processes' peak resident memory together, MiB.
        client_cpu_pct: the load generator's own CPU (clients and stand-ins), % of one core.
        wall_s: the level's duration, seconds.
        underrun_ms: each session's silence inside replies whose audio came late, ms.
        machine_lag_ms: an idle process's p99 overshoot of 10 ms timers during the level.
    """

    sessions: int
    expected_turns: int
    user_turns: int
    answered: int
    errors: Mapping[str, int]
    v2v_ms: Sequence[float]
    pacing_p99_ms: Sequence[float]
    cpu_pct: float
    rss_mb: float
    client_cpu_pct: float = 0.0
    wall_s: float = 0.0
    underrun_ms: Sequence[float] = ()
    machine_lag_ms: float = 0.0


def percentile(values: Sequence[float], p: float) -> float | None:
    """The nearest-rank ``p``-th percentile (0-100) of ``values``; ``None`` when empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * p // 100))  # ceil(n·p/100), at least the first
    return float(ordered[int(rank) - 1])


def failures(level: Level, baseline_v2v_ms: float | None, criterion: Criterion) -> list[str]:
    """Why ``level`` does not hold (empty: it holds); ``baseline_v2v_ms`` is the
    one-session median (``None``: this is the one-session level, judged on the rest)."""
    out: list[str] = []
    if level.errors:
        out.append("errors " + ", ".join(f"{k} x{v}" for k, v in sorted(level.errors.items())))
    expected = level.sessions * level.expected_turns
    if level.answered < expected:
        out.append(f"{expected - level.answered} of {expected} turns unanswered")
    worst = max(level.pacing_p99_ms, default=None)
    if worst is None:
        out.append("no paced audio")
    elif worst > criterion.pacing_p99_ms + level.machine_lag_ms:
        out.append(
            f"pacing p99 {worst:g} ms > {criterion.pacing_p99_ms:g} + {level.machine_lag_ms:g} ms"
        )
    median = percentile(level.v2v_ms, 50)
    if median is None:
        out.append("no v2v sample")
    elif baseline_v2v_ms is not None and median > criterion.v2v_factor * baseline_v2v_ms:
        out.append(f"v2v p50 {median:.0f} ms > {criterion.v2v_factor:g}x {baseline_v2v_ms:.0f} ms")
    return out


def rss_slope(points: Sequence[tuple[int, float]]) -> float | None:
    """Least-squares MiB per session through (sessions, RSS MiB) points; ``None`` with
    fewer than two distinct session counts."""
    if len({n for n, _ in points}) < 2:
        return None
    mean_n = sum(n for n, _ in points) / len(points)
    mean_r = sum(r for _, r in points) / len(points)
    num = sum((n - mean_n) * (r - mean_r) for n, r in points)
    den = sum((n - mean_n) ** 2 for n, _ in points)
    return num / den


@dataclass
class Run:
    """One configuration's ramp: engines, workers, idle RSS and its levels in order."""

    engines: str
    workers: int
    idle_rss_mb: float
    levels: list[Level] = field(default_factory=list)

    def rows(self, criterion: Criterion) -> list[dict[str, Any]]:
        """One JSON-ready row per level, with ``holds`` and ``why_not``.

        ``rss_per_session_mb`` is the slope from the first level to this one
        ((RSS(N) - RSS(first)) / (N - first)); ``None`` for the first level.
        """
        if not self.levels:
            return []
        first = self.levels[0]
        baseline = percentile(first.v2v_ms, 50) if first.sessions == 1 else None
        out = []
        for level in self.levels:
            why = failures(level, None if level is first else baseline, criterion)
            slope = (
                None
                if level.sessions == first.sessions
                else (level.rss_mb - first.rss_mb) / (level.sessions - first.sessions)
            )
            out.append({
                "sessions": level.sessions,
                "holds": not why,
                "why_not": why,
                "cpu_pct": round(level.cpu_pct, 1),
                "client_cpu_pct": round(level.client_cpu_pct, 1),
                "rss_mb": round(level.rss_mb, 1),
                "rss_per_session_mb": None if slope is None else round(slope, 2),
                "v2v_p50_ms": _round(percentile(level.v2v_ms, 50)),
                "v2v_p90_ms": _round(percentile(level.v2v_ms, 90)),
                "pacing_p99_ms_worst": _round(max(level.pacing_p99_ms, default=None), 2),
                "pacing_p99_ms_median": _round(percentile(level.pacing_p99_ms, 50), 2),
                "underrun_ms_worst": _round(max(level.underrun_ms, default=None), 1),
                "machine_lag_p99_ms": round(level.machine_lag_ms, 2),
                "user_turns": level.user_turns,
                "answered": level.answered,
                "errors": dict(level.errors),
                "wall_s": round(level.wall_s, 1),
            })  # fmt: skip
        return out

    def capacity(self, criterion: Criterion) -> int:
        """The largest level that holds with every level before it holding (0: none)."""
        held = 0
        for row in self.rows(criterion):
            if not row["holds"]:
                break
            held = row["sessions"]
        return held

    def summary(self, criterion: Criterion) -> dict[str, Any]:
        """Capacity (``at_least``: every level held, so the capacity is the last level
        or more), capacity per worker, the largest level that held (above a level that
        did not, with ``--all-levels``) and the RSS slope over every level."""
        capacity = self.capacity(criterion)
        slope = rss_slope([(lv.sessions, lv.rss_mb) for lv in self.levels])
        return {
            "engines": self.engines,
            "workers": self.workers,
            "capacity": capacity,
            # Every level held: the capacity is at least the last level's, not found.
            "at_least": bool(self.levels) and all(r["holds"] for r in self.rows(criterion)),
            # With --all-levels a level may hold above one that did not (a one-off outlier).
            "largest_held": max(
                (r["sessions"] for r in self.rows(criterion) if r["holds"]), default=0
            ),
            "per_worker": round(capacity / self.workers, 1),
            "idle_rss_mb": round(self.idle_rss_mb, 1),
            "rss_slope_mb_per_session": None if slope is None else round(slope, 2),
        }


def _round(value: float | None, digits: int = 0) -> float | None:
    if value is None:
        return None
    return round(value, digits) if digits else float(round(value))


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def markdown(runs: Sequence[Run], criterion: Criterion) -> str:
    """The levels table and the summary table (capacity, per worker, 1 → 2 workers)."""
    lines = [
        "| engines | workers | sessions | holds | server CPU % | RSS MiB | MiB/session | "
        "v2v p50 ms | v2v p90 ms | pacing p99 ms (worst) | idle lag p99 ms | "
        "underrun ms (worst) | turns answered | errors |",
        "|---|--:|--:|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|",
    ]
    for run in runs:
        for row in run.rows(criterion):
            errors = ", ".join(f"{k} x{v}" for k, v in sorted(row["errors"].items())) or "0"
            lines.append(
                f"| {run.engines} | {run.workers} | {row['sessions']} | "
                f"{'yes' if row['holds'] else 'no'} | {_cell(row['cpu_pct'])} | "
                f"{_cell(row['rss_mb'])} | {_cell(row['rss_per_session_mb'])} | "
                f"{_cell(row['v2v_p50_ms'])} | {_cell(row['v2v_p90_ms'])} | "
                f"{_cell(row['pacing_p99_ms_worst'])} | {_cell(row['machine_lag_p99_ms'])} | "
                f"{_cell(row['underrun_ms_worst'])} | "
                f"{row['answered']}/{row['sessions'] * run.levels[0].expected_turns} | {errors} |"
            )
    lines += [
        "",
        "| engines | workers | capacity (sessions) | per worker | largest level held | "
        "idle RSS MiB | RSS slope MiB/session | vs 1 worker |",
        "|---|--:|--:|--:|--:|--:|--:|--:|",
    ]
    single = {r.engines: r.capacity(criterion) for r in runs if r.workers == 1}
    for run in runs:
        s = run.summary(criterion)
        one = single.get(run.engines)
        more = ">= " if s["at_least"] else ""
        ratio = "-" if run.workers == 1 or not one else f"{more}{s['capacity'] / one:.2f}x"
        lines.append(
            f"| {run.engines} | {run.workers} | {more}{s['capacity']} | "
            f"{more}{_cell(s['per_worker'])} | {s['largest_held']} | "
            f"{_cell(s['idle_rss_mb'])} | {_cell(s['rss_slope_mb_per_session'])} | {ratio} |"
        )
    return "\n".join(lines) + "\n"
