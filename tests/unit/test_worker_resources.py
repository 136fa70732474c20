"""The worker's resource gauges: asyncio tasks and open descriptors, read from the process
itself (``/proc/self/fd``), and the chaos soak's per-worker leak arithmetic."""

from __future__ import annotations

import asyncio
import os
import socket
from pathlib import Path

import pytest

from benchmarks.chaos_soak import leaks, parse_metrics, per_worker
from runtime.sessions.metrics import SessionMetrics, open_descriptors

pytestmark = pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc")


def _gauges(metrics: SessionMetrics) -> dict[str, float]:
    scraped = parse_metrics(metrics.exposition().decode())
    return {k: v for k, v in scraped.items()
            if k in ("voxloop_asyncio_tasks", "voxloop_open_fds", "voxloop_open_sockets")}  # fmt: skip


def test_open_descriptors_counts_sockets_and_files_exactly() -> None:
    held, sockets = open_descriptors() or (0, 0)
    a, b = socket.socketpair()
    r, w = os.pipe()
    try:
        assert open_descriptors() == (held + 4, sockets + 2)
    finally:
        for fd in (r, w):
            os.close(fd)
        a.close()
        b.close()
    assert open_descriptors() == (held, sockets)


def test_open_descriptors_is_none_without_proc(tmp_path: Path) -> None:
    assert open_descriptors(tmp_path / "absent") is None


async def test_the_gauges_follow_tasks_and_sockets_at_each_scrape() -> None:
    metrics = SessionMetrics()
    before = _gauges(metrics)
    assert before["voxloop_asyncio_tasks"] == len(asyncio.all_tasks())
    held, sockets = open_descriptors() or (0, 0)
    assert (before["voxloop_open_fds"], before["voxloop_open_sockets"]) == (held, sockets)

    gate = asyncio.Event()
    waiting = [asyncio.create_task(gate.wait()) for _ in range(3)]
    a, b = socket.socketpair()
    try:
        during = _gauges(metrics)
        assert during == {
            "voxloop_asyncio_tasks": before["voxloop_asyncio_tasks"] + 3,
            "voxloop_open_fds": before["voxloop_open_fds"] + 2,
            "voxloop_open_sockets": before["voxloop_open_sockets"] + 2,
        }
    finally:
        a.close()
        b.close()
        gate.set()
        await asyncio.gather(*waiting)
    assert _gauges(metrics) == before


def test_the_soak_reads_each_workers_series_and_what_it_left() -> None:
    text = (
        'voxloop_asyncio_tasks{pid="101"} 7.0\n'
        'voxloop_asyncio_tasks{pid="202"} 9.0\n'
        'voxloop_open_sockets{pid="101"} 6.0\n'
        'voxloop_open_sockets{pid="202"} 5.0\n'
        "voxloop_live_sessions 0.0\n"
    )
    scraped = parse_metrics(text)
    assert per_worker(scraped, "voxloop_asyncio_tasks") == {"101": 7, "202": 9}
    assert per_worker(scraped, "voxloop_open_sockets") == {"101": 6, "202": 5}
    before = {"101": {"tasks": 7, "sockets": 6}}
    after = {"101": {"tasks": 8, "sockets": 6}, "202": {"tasks": 9, "sockets": 5}}
    assert leaks(before, after) == {
        "101": {"tasks_before": 7, "tasks_after": 8, "tasks_leaked": 1,
                "sockets_before": 6, "sockets_after": 6, "sockets_leaked": 0},
        "202": {"tasks_before": None, "tasks_after": 9, "tasks_leaked": None,
                "sockets_before": None, "sockets_after": 5, "sockets_leaked": None},
    }  # fmt: skip
