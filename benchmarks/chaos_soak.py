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
  must resume on the other worker from their last reply.

Reported (JSON on stdout, ``--json FILE`` too): user turns, turns answered or
apologised (must be all), sessions started, ended cleanly, resumed and lost
(lost: a session that failed for good), v2v p50/p99 at the client during the
chaos, /metrics scraped at the end (its session and reply counts beside the
soak's own), and per worker RSS at the start and end (drift per hour).
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
from runtime.bench.workers import rss_kb, worker_pids
from runtime.client.connection import Auth
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
    sessions: int = 0
    ended: int = 0
    lost: int = 0
    resumed: int = 0
    user_turns: int = 0
    answered: int = 0
    apologised: int = 0
    v2v_ms: list[float] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)


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


async def conversation(url: str, pcm: bytes, tally: Tally) -> None:
    seen: list[str] = []

    def on_event(event: Any) -> None:
        kind = getattr(event, "type", "")
        seen.append(kind)
        if kind == "transcript.user":
            tally.user_turns += 1
        elif kind == "reply.error":
            tally.errors[event.code] = tally.errors.get(event.code, 0) + 1

    tally.sessions += 1
    session = ev.SessionPatch(keys=frozenset({"system_prompt"}), system_prompt="You are brief.")
    try:
        result = await connect_pcm(
            pcm, url=url, auth=Auth(api_key=Secret(API_KEY)), session=session, on_event=on_event,
        )  # fmt: skip
    except SessionFailure as exc:
        tally.lost += 1
        tally.errors[f"session:{exc.code}"] = tally.errors.get(f"session:{exc.code}", 0) + 1
        return
    except (OSError, ConnectionError) as exc:
        tally.lost += 1
        tally.errors[type(exc).__name__] = tally.errors.get(type(exc).__name__, 0) + 1
        return
    tally.ended += 1
    tally.resumed += seen.count("session.ready") - 1
    # Each user turn is followed by a reply (spoken, or the apology) before the next one.
    turns = [i for i, k in enumerate(seen) if k == "transcript.user"]
    for n, start in enumerate(turns):
        end = turns[n + 1] if n + 1 < len(turns) else len(seen)
        window = seen[start:end]
        if "reply.error" in window:
            tally.apologised += 1
        elif "reply.done" in window:
            tally.answered += 1
    tally.v2v_ms += [m.v2v_ms for m in result.metrics if m.v2v_ms is not None]


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
        t0 = time.monotonic()
        rss_start: dict[int, int] = {}
        deadline = t0 + args.minutes * 60

        async def caller() -> None:
            while time.monotonic() < deadline:
                await conversation(url, pcm, tally)

        async def fault_injector() -> None:
            modes = faults()
            while time.monotonic() < deadline:
                queued = [rng.choice(modes) if rng.random() < args.fault_rate else plan
                          for _ in range(4)]  # fmt: skip
                endpoint.call(partial(_queue, plans=queued))
                await asyncio.sleep(1.0)

        async def disasters() -> None:
            nonlocal redis
            # RSS is taken once the engines are loaded and the first sessions have run.
            await asyncio.sleep(args.minutes * 60 / 6)
            rss_start.update({pid: rss_kb(pid) for pid in worker_pids(server.pid)})
            await asyncio.sleep(args.minutes * 60 / 6)
            redis.terminate()
            redis.wait(30)
            redis = start_redis(redis_port, root)
            events.append(f"{time.monotonic() - t0:.0f}s: redis restarted")
            await asyncio.sleep(args.minutes * 60 / 3)
            victim = worker_pids(server.pid)[0]
            os.kill(victim, signal.SIGKILL)
            events.append(f"{time.monotonic() - t0:.0f}s: worker {victim} killed")

        async with asyncio.TaskGroup() as tg:
            for _ in range(args.sessions):
                tg.create_task(caller())
            tg.create_task(fault_injector())
            tg.create_task(disasters())
        elapsed_h = (time.monotonic() - t0 - args.minutes * 60 / 6) / 3600
        async with httpx.AsyncClient(timeout=30) as client:
            scraped = (await client.get(f"{http}/metrics")).text
        rss_end = {pid: rss_kb(pid) for pid in worker_pids(server.pid)}
        server.send_signal(signal.SIGTERM)
        server.wait(120)
        server.stdout.close()
    redis.terminate()
    redis.wait(30)
    tracebacks = log.read_text().count("Traceback")

    def metric(name: str, label: str) -> float:
        found = re.findall(rf"^{name}\{{{label}\}} ([0-9.e+]+)$", scraped, flags=re.M)
        return sum(float(v) for v in found)

    v2v = sorted(tally.v2v_ms)
    return {
        "minutes": args.minutes,
        "sessions_concurrent": args.sessions,
        "fault_rate": args.fault_rate,
        "events": events,
        "sessions": tally.sessions,
        "ended": tally.ended,
        "resumed": tally.resumed,
        "lost": tally.lost,
        "user_turns": tally.user_turns,
        "answered": tally.answered,
        "apologised": tally.apologised,
        "answered_or_apologised": round(
            (tally.answered + tally.apologised) / max(1, tally.user_turns), 4
        ),
        "errors": tally.errors,
        "v2v_ms_p50": statistics.median(v2v) if v2v else None,
        "v2v_ms_p99": v2v[min(len(v2v) - 1, int(len(v2v) * 0.99))] if v2v else None,
        # One scrape reaches one worker: its share, beside the soak's totals.
        "metrics_scrape": {
            "sessions_ended": metric("voxloop_sessions_total", 'reason="ended"'),
            "replies_completed": metric("voxloop_replies_total", 'status="completed"'),
        },
        "rss_kb_start": rss_start,
        "rss_kb_end": rss_end,
        "rss_drift_kb_per_hour": {
            str(pid): round((rss_end.get(pid, 0) - kb) / elapsed_h)
            for pid, kb in rss_start.items()
            if pid in rss_end
        },
        "tracebacks_in_log": tracebacks,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--sessions", type=int, default=8)
    parser.add_argument("--fault-rate", type=float, default=0.3)
    parser.add_argument("--seed", type=int, default=7)
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
