"""Chaos soak: several workers on one port, Redis, real speech, and everything failing.

Runs ``voxloop serve --workers 2`` (uvicorn's supervisor on one port) with a
throwaway ``redis-server`` and a loopback reference endpoint, and keeps
``--sessions`` concurrent realtime conversations of real speech going (each one a
two-turn recording streamed in real time through the resuming client, then
``session.end``, then a new session) for ``--minutes``. Meanwhile:

* the endpoint fails at random in every mode the reference endpoint has (HTTP
  5xx, 429, hang, drop mid-stream, malformed stream, an empty body, slow first
  token), ``--fault-rate`` of its requests;
* Redis is restarted once (a third of the way in: its data is gone);
* one worker process is killed (SIGKILL, two thirds of the way in): its sessions
  must resume on the other worker from the state last kept (before ``session.ready``,
  at each transcribed user turn, after each reply).

The client behaves as a real one: a drop under a live session is resumed (on
whichever worker accepts the new connection), and a connection refused or closed
before ``session.ready`` is counted (``failed_before_ready``) and retried as a new
session.

Reported (JSON on stdout, ``--json FILE`` too):

* sessions: new ones that got ``session.ready``, ended cleanly, dropped, resumed, and
  lost (failed for good after ``session.ready``, with the events each one saw);
* user turns by outcome (:mod:`runtime.bench.soak`): answered, apologised, superseded
  (the user spoke again before a reply began; the next reply answers both), and
  neither (the goal: none; each one's events are listed); ``answered_or_apologised`` is
  the share of turns that are not ``neither``;
* v2v p50/p99 at the client during the chaos;
* ``/metrics`` scraped ten times during the run and once at the end beside the soak's
  own counts (sessions ended, live sessions, turns, replies by status, endpoint errors
  by kind), with every mismatch named; one scrape reports all the workers of the run,
  a killed worker's counts included;
* each worker's resident memory sampled every ``--sample-seconds``, and its drift after
  warm-up (from a sixth of the run after the worker started): a least-squares slope in
  MB per hour with its standard error;
* each worker's open sockets before the first session and after the last (a worker
  started in the run has no "before"), and the client connections still open at the
  end (a leak: the goal is 0);
* ``leaks``: each worker's asyncio tasks and open sockets as its ``/metrics`` gauges
  (``voxloop_asyncio_tasks``, ``voxloop_open_sockets``, one series per worker) give them
  before the first session and after the last has ended and the live sessions are 0,
  and their difference, ``tasks_leaked`` and ``sockets_leaked`` (the goal: 0 each; the
  fewest of three scrapes a second apart, so a scrape's own request is not counted; a
  worker started in the run has no "before" and no difference);
* tracebacks in the server's log.

The full run: ``python -m benchmarks.chaos_soak --minutes 10 --sessions 8``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import httpx

from audio.resample import resample_all
from audio.wav import read_wav
from runtime.bench.reference_thread import ReferenceThread
from runtime.bench.soak import Seen, drift, turns
from runtime.bench.workers import established, open_sockets, rss_kb, worker_pids
from runtime.client.connection import Auth, ConnectionDropped, SessionResumed
from runtime.client.protocol import SessionFailure
from runtime.client.runner import connect_pcm
from runtime.llm.reference import ReferenceEndpoint, ReplyPlan
from runtime.protocol import events as ev
from runtime.secret import Secret

ROOT = Path(__file__).resolve().parents[1]
SPEECH = ROOT / "tests" / "data" / "speech" / "conv-two_turns.wav"
API_KEY = "vk-chaos"
LLM_KEY = "sk-chaos-llm"
REPLY = "Sure, I can help with that right away."


def faults() -> list[ReplyPlan]:
    """One plan per failure mode of the reference endpoint."""

    def plan(**fault: Any) -> ReplyPlan:
        return ReplyPlan(replies=(REPLY,), ttft_ms=40, itl_ms=10, **fault)

    return [
        plan(fault="status", status=500),
        plan(fault="status", status=503),
        plan(fault="status", status=429, retry_after="1"),
        plan(fault="hang"),
        plan(fault="hang_headers"),
        plan(fault="drop"),
        plan(fault="malformed"),
        plan(fault="empty"),
        ReplyPlan(replies=(REPLY,), ttft_ms=2500, itl_ms=10),  # slow
    ]


def _queue(server: ReferenceEndpoint, plans: list[ReplyPlan]) -> None:
    server.queue(*plans)


@dataclass
class Tally:
    attempts: int = 0  # connections opened for a new session
    sessions: int = 0  # new sessions that got session.ready
    ended: int = 0  # ... and ended with session.ended
    lost: int = 0  # ... and failed for good after session.ready
    dropped: int = 0  # sockets that dropped under a live session (the client resumed)
    resumed: int = 0  # session.ready after a drop
    live: int = 0  # sessions between their session.ready and their end, now
    session_ended: int = 0  # session.ended received
    replies_here: int = 0  # replies to user turns on the connection that heard them
    before_ready: dict[str, int] = field(default_factory=dict)  # failed before session.ready
    outcomes: dict[str, int] = field(default_factory=dict)  # user turns by outcome
    replies: dict[str, int] = field(default_factory=dict)  # reply.done by status
    errors: dict[str, int] = field(default_factory=dict)  # reply.error by code
    lost_by: dict[str, int] = field(default_factory=dict)
    v2v_ms: list[float] = field(default_factory=list)
    unanswered: list[dict[str, Any]] = field(default_factory=list)  # turns left without
    lost_sessions: list[dict[str, Any]] = field(default_factory=list)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_redis(port: int, root: str) -> subprocess.Popen[str]:
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server is not installed (apt-get install redis-server)")
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", root], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    assert proc.stdout is not None
    for line in proc.stdout:
        if "Ready to accept connections" in line:
            return proc
    raise SystemExit(f"redis-server exited {proc.wait()}")


def _seen(event: Any, t: float) -> Seen | None:
    match event:
        case ConnectionDropped(close_code=code):
            return Seen(t, "dropped", str(code))
        case SessionResumed():
            return Seen(t, "resumed")
        case ev.TranscriptUser(item_id=item_id):
            return Seen(t, "transcript.user", item_id)
        case ev.ReplyDone(status=status, reply_id=reply_id):
            return Seen(t, "reply.done", status, reply_id or "")
        case ev.ReplyAudio(reply_id=reply_id):
            return Seen(t, "reply.audio", "", reply_id or "")
        case ev.ReplyStarted(reply_id=reply_id):
            return Seen(t, "reply.started", "", reply_id)
        case ev.ReplyError(code=code):
            return Seen(t, "reply.error", code)
        case ev.SessionReady() | ev.SessionEnded() | ev.SessionError():
            return Seen(t, event.type, getattr(event, "code", ""))
    return None


async def conversation(url: str, pcm: bytes, tally: Tally, t0: float) -> None:
    """One conversation, as a real client has it: a connection refused or closed before
    ``session.ready`` is counted and retried as a new session (by the caller's loop)."""
    seen: list[Seen] = []
    audible: set[str] = set()

    def on_event(event: Any) -> None:
        item = _seen(event, time.monotonic() - t0)
        if item is None:
            return
        if item.kind == "reply.audio":
            if item.reply_id in audible:
                return  # once per reply: that some of its audio came
            audible.add(item.reply_id)
        seen.append(item)
        if item.kind == "reply.done":
            tally.replies[item.detail] = tally.replies.get(item.detail, 0) + 1
        elif item.kind == "reply.error":
            tally.errors[item.detail] = tally.errors.get(item.detail, 0) + 1
        elif item.kind == "dropped":
            tally.dropped += 1
        elif item.kind == "resumed":
            tally.resumed += 1
        elif item.kind == "session.ended":
            tally.session_ended += 1
        elif item.kind == "session.ready" and sum(e.kind == "session.ready" for e in seen) == 1:
            tally.sessions += 1
            tally.live += 1

    tally.attempts += 1
    session = ev.SessionPatch(keys=frozenset({"system_prompt"}), system_prompt="You are brief.")
    failure: str | None = None
    try:
        result = await connect_pcm(
            pcm, url=url, auth=Auth(api_key=Secret(API_KEY)), session=session, on_event=on_event,
        )  # fmt: skip
    except SessionFailure as exc:
        failure = exc.code
    except (OSError, ConnectionError) as exc:
        failure = type(exc).__name__
    if any(e.kind == "session.ready" for e in seen):
        tally.live -= 1
    else:
        # Counted, and retried as a new session by the caller, as a real client does.
        code = failure or "no_ready"
        tally.before_ready[code] = tally.before_ready.get(code, 0) + 1
        return
    if failure is not None:
        tally.lost += 1
        tally.lost_by[failure] = tally.lost_by.get(failure, 0) + 1
        tally.lost_sessions.append(
            {"failure": failure, "events": [[round(e.t, 2), e.kind, e.detail] for e in seen]}
        )
    else:
        tally.ended += 1
        tally.v2v_ms += [m.v2v_ms for m in result.metrics if m.v2v_ms is not None]
    for turn in turns(seen):
        tally.replies_here += turn.replies_here
        tally.outcomes[turn.outcome] = tally.outcomes.get(turn.outcome, 0) + 1
        if turn.outcome == "neither":
            tally.unanswered.append({
                "t": round(turn.t, 2), "session": "lost" if failure else "ended",
                "events": [[round(e.t, 2), e.kind, e.detail] for e in turn.events],
            })  # fmt: skip


def parse_metrics(text: str) -> dict[str, float]:
    """A Prometheus text exposition as ``{"name{labels}": value}`` (voxloop's series)."""
    found = re.finditer(r"^(voxloop_[a-z_]+(?:\{[^}]*\})?) ([0-9.e+-]+)$", text, flags=re.M)
    return {m[1]: float(m[2]) for m in found}


def per_worker(scraped: dict[str, float], name: str) -> dict[str, int]:
    """A gauge with one series per worker (``pid`` label): ``{pid: value}``."""
    out: dict[str, int] = {}
    for key, value in scraped.items():
        match = re.fullmatch(rf'{name}\{{pid="(\d+)"\}}', key)
        if match:
            out[match[1]] = round(value)
    return out


async def worker_counts(http: str, workers: int) -> dict[str, dict[str, int]]:
    """Each worker's ``tasks`` and ``sockets`` from ``/metrics``: the fewest of three scrapes
    a second apart (a scrape's own request and connection come and go), once every one of
    ``workers`` has written its gauges. ``{pid: {"tasks": n, "sockets": n}}``."""
    seen: list[dict[str, dict[str, int]]] = []
    async with httpx.AsyncClient(timeout=30, headers={"Connection": "close"}) as client:
        for _ in range(60):
            scraped = parse_metrics((await client.get(f"{http}/metrics")).text)
            tasks = per_worker(scraped, "voxloop_asyncio_tasks")
            sockets = per_worker(scraped, "voxloop_open_sockets")
            if len(tasks) >= workers:
                seen.append({pid: {"tasks": tasks[pid], "sockets": sockets.get(pid, 0)}
                             for pid in tasks})  # fmt: skip
                if len(seen) == 3:
                    break
            await asyncio.sleep(1.0)
    return {
        pid: {k: min(s[pid][k] for s in seen if pid in s) for k in ("tasks", "sockets")}
        for pid in (seen[-1] if seen else {})
    }


async def drained(http: str) -> None:
    """Wait (at most 60 s) until ``/metrics`` says no session is live."""
    async with httpx.AsyncClient(timeout=30, headers={"Connection": "close"}) as client:
        for _ in range(120):
            scraped = parse_metrics((await client.get(f"{http}/metrics")).text)
            if not scraped.get("voxloop_live_sessions"):
                return
            await asyncio.sleep(0.5)


def leaks(
    before: dict[str, dict[str, int]], after: dict[str, dict[str, int]]
) -> dict[str, dict[str, int | None]]:
    """Per worker: its tasks and sockets before and after, and what was left behind."""
    out: dict[str, dict[str, int | None]] = {}
    for pid, end in after.items():
        start = before.get(pid)
        out[pid] = {
            "tasks_before": start["tasks"] if start else None, "tasks_after": end["tasks"],
            "tasks_leaked": end["tasks"] - start["tasks"] if start else None,
            "sockets_before": start["sockets"] if start else None,
            "sockets_after": end["sockets"],
            "sockets_leaked": end["sockets"] - start["sockets"] if start else None,
        }  # fmt: skip
    return out


def by_label(scraped: dict[str, float], name: str, label: str) -> dict[str, int]:
    """The series ``name`` by the value of ``label``: ``{value: count}``."""
    out: dict[str, int] = {}
    for key, value in scraped.items():
        match = re.fullmatch(rf'{name}\{{{label}="([^"]*)"\}}', key)
        if match and value:
            out[match[1]] = out.get(match[1], 0) + round(value)
    return out


def compare(scraped: dict[str, float], tally: Tally, *, final: bool) -> dict[str, Any]:
    """/metrics beside the client's own counts; ``mismatches`` names each that differs.

    During the run (``final`` false) events in flight at the scrape differ by a few, and
    turns are counted by the client when their conversation ends, so they are compared
    at the end only."""
    replies = by_label(scraped, "voxloop_replies_total", "status")
    client_replies = dict(tally.replies)
    # The server counts a reply the client cancelled as interrupted.
    if "cancelled" in client_replies:
        client_replies["interrupted"] = client_replies.get("interrupted", 0) + client_replies.pop(
            "cancelled"
        )
    errors = by_label(scraped, "voxloop_endpoint_errors_total", "code")
    rows: dict[str, tuple[int, int]] = {
        "sessions ended (session.ended)": (
            by_label(scraped, "voxloop_sessions_total", "reason").get("ended", 0),
            tally.session_ended,
        ),
        "live sessions": (round(scraped.get("voxloop_live_sessions", 0.0)), tally.live),
    }
    if final:
        rows["turns (replies to the user's speech)"] = (
            round(sum(v for k, v in scraped.items() if k.startswith("voxloop_turns_total"))),
            tally.replies_here,
        )
    for status in sorted(set(replies) | set(client_replies)):
        rows[f"replies {status}"] = (replies.get(status, 0), client_replies.get(status, 0))
    for code in sorted(set(errors) | set(tally.errors)):
        rows[f"endpoint errors {code}"] = (errors.get(code, 0), tally.errors.get(code, 0))
    return {
        "rows": {k: {"metrics": m, "soak": c} for k, (m, c) in rows.items()},
        "mismatches": [k for k, (m, c) in rows.items() if m != c],
    }


async def chaos(args: argparse.Namespace) -> dict[str, Any]:
    audio = read_wav(SPEECH)
    pcm = resample_all(audio.mono(), audio.sample_rate, 24_000)
    rng = random.Random(args.seed)
    tally = Tally()
    events: list[str] = []
    root = tempfile.mkdtemp(prefix="voxloop-chaos-")
    redis_port = free_port()
    redis = start_redis(redis_port, root)
    plan = ReplyPlan(replies=(REPLY,), ttft_ms=40, itl_ms=10)
    rss: dict[int, list[tuple[float, float]]] = {}
    born: dict[int, float] = {}
    scrapes: list[dict[str, Any]] = []
    with ReferenceThread(plan, api_key=LLM_KEY) as endpoint:
        log = Path(root) / "serve.log"
        with log.open("a") as handle:
            server = subprocess.Popen(  # noqa: ASYNC220 - once, before the load
                [sys.executable, "-m", "runtime.cli", "serve", "--port", "0", "--workers", "2",
                 "--data-dir", str(Path(root) / "data")],
                stdout=subprocess.PIPE, stderr=handle, text=True,
                env={**os.environ, "VOXLOOP_API_KEYS": API_KEY,
                     "VOXLOOP_REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
                     "VOXLOOP_ALLOW_PRIVATE_ENDPOINTS": "127.0.0.1",
                     "VOXLOOP_LLM_BASE_URL": endpoint.base_url, "VOXLOOP_LLM_MODEL": "chaos",
                     "VOXLOOP_LLM_API_KEY": LLM_KEY, "VOXLOOP_METRICS_PUBLIC": "1",
                     "VOXLOOP_SESSIONS_PER_MINUTE": "100000"},
            )  # fmt: skip
        assert server.stdout is not None
        http = server.stdout.readline().rsplit(" ", 1)[1].strip()
        url = "ws" + http[4:] + "/v1/ws"
        # The supervisor prints the address once the socket listens; its workers answer
        # /readyz once their apps have started.
        async with httpx.AsyncClient(timeout=60) as client:
            for _ in range(120):
                if (await client.get(f"{http}/readyz")).status_code == 200:
                    break
                await asyncio.sleep(0.5)
        counts_start = await worker_counts(http, 2)
        sockets_start = {pid: open_sockets(pid) for pid in worker_pids(server.pid)}
        t0 = time.monotonic()
        deadline = t0 + args.minutes * 60

        async def caller() -> None:
            while time.monotonic() < deadline:
                await conversation(url, pcm, tally, t0)

        async def fault_injector() -> None:
            modes = faults()
            while time.monotonic() < deadline:
                queued = [rng.choice(modes) if rng.random() < args.fault_rate else plan
                          for _ in range(4)]  # fmt: skip
                endpoint.call(partial(_queue, plans=queued))
                await asyncio.sleep(1.0)

        async def disasters() -> None:
            nonlocal redis
            await asyncio.sleep(args.minutes * 60 / 3)
            redis.terminate()
            redis.wait(30)
            redis = start_redis(redis_port, root)
            events.append(f"{time.monotonic() - t0:.0f}s: redis restarted")
            await asyncio.sleep(args.minutes * 60 / 3)
            victim = worker_pids(server.pid)[0]
            os.kill(victim, signal.SIGKILL)
            events.append(f"{time.monotonic() - t0:.0f}s: worker {victim} killed")

        async def sampler() -> None:
            # Each worker's resident memory every few seconds (a replacement from its start).
            async with httpx.AsyncClient(timeout=30) as client:
                last_scrape = 0.0
                while time.monotonic() < deadline:
                    now = time.monotonic() - t0
                    for pid in worker_pids(server.pid):
                        born.setdefault(pid, now)
                        if kb := rss_kb(pid):
                            rss.setdefault(pid, []).append((now, float(kb)))
                    if now - last_scrape >= args.minutes * 60 / 10:
                        last_scrape = now
                        scraped = parse_metrics((await client.get(f"{http}/metrics")).text)
                        scrapes.append({"t": round(now), **compare(scraped, tally, final=False)})
                    await asyncio.sleep(args.sample_seconds)

        async with asyncio.TaskGroup() as tg:
            for _ in range(args.sessions):
                tg.create_task(caller())
            tg.create_task(fault_injector())
            tg.create_task(disasters())
            tg.create_task(sampler())
        await drained(http)
        async with httpx.AsyncClient(timeout=30) as client:
            final = parse_metrics((await client.get(f"{http}/metrics")).text)
        counts_end = await worker_counts(http, len(worker_pids(server.pid)))
        # Every session is over: each worker's sockets beside those it held before the first.
        sockets_end = {pid: open_sockets(pid) for pid in worker_pids(server.pid)}
        port = int(http.rsplit(":", 1)[1])
        clients_end = established(worker_pids(server.pid), port)
        server.send_signal(signal.SIGTERM)
        server.wait(120)
        server.stdout.close()
    redis.terminate()
    redis.wait(30)
    tracebacks = log.read_text().count("Traceback")

    # Drift after warm-up: a worker's samples from a sixth of the run after it started.
    warm = args.minutes * 60 / 6
    drifts = {}
    for pid, points in rss.items():
        kept = [(t, kb) for t, kb in points if t >= born[pid] + warm]
        d = drift(kept)
        drifts[str(pid)] = {
            "mb_per_hour": d.mb_per_hour, "stderr_mb_per_hour": d.stderr_mb_per_hour,
            "samples": d.samples, "span_s": d.span_s,
            "rss_mb_first": round(kept[0][1] / 1024, 1) if kept else None,
            "rss_mb_last": round(kept[-1][1] / 1024, 1) if kept else None,
            "born_s": round(born[pid]),
        }  # fmt: skip
    v2v = sorted(tally.v2v_ms)
    user_turns = sum(tally.outcomes.values())
    covered = sum(tally.outcomes.get(k, 0) for k in ("answered", "apologised", "superseded"))
    return {
        "minutes": args.minutes,
        "sessions_concurrent": args.sessions,
        "fault_rate": args.fault_rate,
        "events": events,
        "attempts": tally.attempts,
        "failed_before_ready": tally.before_ready,
        "sessions": tally.sessions,
        "ended": tally.ended,
        "dropped": tally.dropped,
        "resumed": tally.resumed,
        "lost": tally.lost,
        "lost_by": tally.lost_by,
        "user_turns": user_turns,
        "turn_outcomes": tally.outcomes,
        "answered_or_apologised": round(covered / max(1, user_turns), 4),
        "replies": tally.replies,
        "errors": tally.errors,
        "v2v_ms_p50": statistics.median(v2v) if v2v else None,
        "v2v_ms_p99": v2v[min(len(v2v) - 1, int(len(v2v) * 0.99))] if v2v else None,
        "metrics_during": scrapes,
        "metrics_final": compare(final, tally, final=True),
        "rss_drift": drifts,
        "leaks": leaks(counts_start, counts_end),
        "sockets_start": {str(k): v for k, v in sockets_start.items()},
        "sockets_end": {str(k): v for k, v in sockets_end.items()},
        "client_connections_end": {str(k): v for k, v in clients_end.items()},
        "tracebacks_in_log": tracebacks,
        "unanswered_turns": tally.unanswered[:20],
        "lost_sessions": tally.lost_sessions[:20],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--sessions", type=int, default=8)
    parser.add_argument("--fault-rate", type=float, default=0.3)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--sample-seconds", type=float, default=5.0,
                        help="how often each worker's memory is read (default: 5)")  # fmt: skip
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    report = asyncio.run(chaos(args))
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
