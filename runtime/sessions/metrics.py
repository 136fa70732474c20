"""Prometheus metrics of a server: sessions, turns, latencies, endpoint errors, queues.

Served at ``GET /metrics`` (text exposition format) by ``voxloop serve``. A single
process serves its own series. The worker processes of one ``serve --workers N``
share a directory of metric files (prometheus-client's multiprocess mode, chosen
by ``PROMETHEUS_MULTIPROC_DIR``, which ``serve`` sets): whichever worker answers a
scrape reports the sum over all the workers of that run, counters of workers that
died included (their files stay), gauges over the live workers only. Separate
processes or machines are scraped each (a scraper adds the ``instance`` label). Agent labels
are bounded: the first :data:`MAX_AGENT_LABELS` stored agents seen get their own
label value, later ones count as ``other`` and inline sessions as ``inline``, so a
server with many agents cannot blow up the scraper's memory.

Histograms are in seconds (Prometheus convention); the per-turn record of
:class:`~runtime.conversation.events.TurnMetrics` is in milliseconds and is
converted once here.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from pathlib import Path
from typing import Final

from prometheus_client import CONTENT_TYPE_LATEST as CONTENT_TYPE
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

from runtime.conversation import events as core

MAX_AGENT_LABELS: Final = 50
#: Latency buckets (seconds) that resolve the voice range: 50 ms … 10 s.
BUCKETS: Final = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0)
LAG_INTERVAL_S: Final = 0.25
#: How often the worker's task and descriptor counts are refreshed (seconds).
RESOURCES_INTERVAL_S: Final = 1.0

#: The environment variable that puts prometheus-client in multiprocess mode (the
#: directory of the metric files the workers of one run share).
MULTIPROC_ENV: Final = "PROMETHEUS_MULTIPROC_DIR"

__all__ = ["CONTENT_TYPE", "MULTIPROC_ENV", "SessionMetrics"]


def shared_dir() -> str | None:
    """The metric files' directory when this process is one of several workers, else None."""
    return os.environ.get(MULTIPROC_ENV) or None


class SessionMetrics:
    """The worker's metrics, in a registry of their own (tests create as many as they like)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        # Gauges of several workers add up over the live ones (a dead worker's are dropped).
        self.live_sessions = Gauge(
            "voxloop_live_sessions", "Sessions running now.", registry=r,
            multiprocess_mode="livesum",
        )  # fmt: skip
        self.sessions = Counter(
            "voxloop_sessions", "Sessions that ended, by end reason.",
            ["reason"], registry=r,
        )  # fmt: skip
        self.turns = Counter(
            "voxloop_turns", "Answered user turns, by agent.", ["agent"], registry=r
        )
        self.replies = Counter(
            "voxloop_replies", "Replies finished, by status (completed, interrupted, failed).",
            ["status"], registry=r,
        )  # fmt: skip
        self.interruptions = Counter(
            "voxloop_interruptions", "Replies cut by the user speaking over them.", registry=r
        )
        self.endpoint_errors = Counter(
            "voxloop_endpoint_errors", "Replies the endpoint failed, by error code.",
            ["code"], registry=r,
        )  # fmt: skip
        self.dropped_audio_frames = Counter(
            "voxloop_dropped_audio_frames",
            "Client audio frames dropped because a client sent faster than real time.",
            registry=r,
        )
        self.outbound_queue = Gauge(
            "voxloop_outbound_queue_messages",
            "Server events queued for clients, summed over the live sessions.", registry=r,
            multiprocess_mode="livesum",
        )  # fmt: skip
        self.loop_lag = Histogram(
            "voxloop_event_loop_lag_seconds",
            "How late the event loop ran a timer (sampled every 250 ms).",
            buckets=(0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0), registry=r,
        )  # fmt: skip
        # One series per worker (a ``pid`` label with several workers, bounded by their
        # number): a leak shows as one worker's count rising while its sessions come and go.
        self.tasks = Gauge(
            "voxloop_asyncio_tasks", "asyncio tasks of the worker's event loop.", registry=r,
            multiprocess_mode="liveall",
        )  # fmt: skip
        self.open_fds = Gauge(
            "voxloop_open_fds", "File descriptors the worker process holds open.", registry=r,
            multiprocess_mode="liveall",
        )  # fmt: skip
        self.open_sockets = Gauge(
            "voxloop_open_sockets",
            "Sockets (TCP, Unix) among the worker's open file descriptors.", registry=r,
            multiprocess_mode="liveall",
        )  # fmt: skip
        names = {
            "v2v": "voice-to-voice: the user stopped speaking to the first reply audio",
            "ttft": "the endpoint's time to first token",
            "first_sentence": "the endpoint's time to the first speakable segment",
            "tts_first_audio": "speech synthesis time to first audio",
        }
        self.latency = {
            key: Histogram(
                f"voxloop_{key}_seconds",
                f"Per answered turn, {text}.",
                ["agent"],
                buckets=BUCKETS,
                registry=r,
            )
            for key, text in names.items()
        }
        self._agents: set[str] = set()

    def agent_label(self, agent_id: str | None) -> str:
        """``agent_id``, ``other`` past the first :data:`MAX_AGENT_LABELS`, ``inline`` for none."""
        if agent_id is None:
            return "inline"
        if agent_id in self._agents:
            return agent_id
        if len(self._agents) < MAX_AGENT_LABELS:
            self._agents.add(agent_id)
            return agent_id
        return "other"

    def observe(self, agent_id: str | None, event: core.ConversationEvent) -> None:
        """Count one core event of a session of ``agent_id``."""
        match event:
            case core.TurnMetrics():
                agent = self.agent_label(agent_id)
                self.turns.labels(agent).inc()
                for key, value in (
                    ("v2v", event.v2v_ms), ("ttft", event.ttft_ms),
                    ("first_sentence", event.first_sentence_ms),
                    ("tts_first_audio", event.tts_first_audio_ms),
                ):  # fmt: skip
                    if value is not None:
                        self.latency[key].labels(agent).observe(value / 1000)
            case core.ReplyDone(status=status):
                self.replies.labels(status).inc()
                if status == "interrupted":
                    self.interruptions.inc()
            case core.ReplyError(code=code):
                self.endpoint_errors.labels(code).inc()
            case _:
                pass

    def session_started(self) -> None:
        self.live_sessions.inc()

    def session_ended(self, reason: str) -> None:
        self.live_sessions.dec()
        self.sessions.labels(reason).inc()

    def count_resources(self) -> None:
        """Refresh the worker's task, descriptor and socket gauges (call it on the
        worker's event loop; descriptors are read from ``/proc/self/fd``, and left
        unset where there is none)."""
        with contextlib.suppress(RuntimeError):  # no running loop: tasks are not counted
            self.tasks.set(len(asyncio.all_tasks()))
        counted = open_descriptors()
        if counted is not None:
            self.open_fds.set(counted[0])
            self.open_sockets.set(counted[1])

    def exposition(self) -> bytes:
        """The text exposition of every metric (``CONTENT_TYPE``): this process's, or with
        several workers (``PROMETHEUS_MULTIPROC_DIR`` set) the sum over all of them."""
        self.count_resources()
        directory = shared_dir()
        if directory is None:
            return generate_latest(self.registry)
        merged = CollectorRegistry()
        MultiProcessCollector(merged, path=directory)  # type: ignore[no-untyped-call]
        return generate_latest(merged)

    async def watch_loop_lag(self) -> None:
        """Sample the event loop's lag until cancelled (run it in the server's lifespan)."""
        loop = asyncio.get_running_loop()
        counted_at = loop.time()
        while True:
            due = loop.time() + LAG_INTERVAL_S
            await asyncio.sleep(LAG_INTERVAL_S)
            self.loop_lag.observe(max(0.0, loop.time() - due))
            if loop.time() - counted_at >= RESOURCES_INTERVAL_S:
                # Several workers: a scrape reads every worker's last written counts.
                counted_at = loop.time()
                self.count_resources()


def open_descriptors(fd_dir: Path = Path("/proc/self/fd")) -> tuple[int, int] | None:
    """``(descriptors, sockets)`` this process holds open, from ``fd_dir`` (Linux's
    ``/proc``); ``None`` where the directory cannot be read."""
    try:
        entries = list(fd_dir.iterdir())
    except OSError:
        return None
    held = sockets = 0
    for entry in entries:
        try:
            target = os.readlink(entry)
        except OSError:  # closed since the listing (the listing's own descriptor among them)
            continue
        held += 1
        sockets += target.startswith("socket:")
    return held, sockets
