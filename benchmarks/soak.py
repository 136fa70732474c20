"""Soak: many concurrent sessions of real speech opening and closing against one ``voxloop serve``.

Starts a loopback OpenAI-compatible endpoint (the reference endpoint, short replies) and
``voxloop serve`` with it as the default endpoint, loads the speech engines with one
warm-up session, then keeps ``--sessions`` sessions running for ``--minutes``: each
session binds, streams ``benchmarks/data/user_hello.wav`` in real time (24 kHz PCM),
waits for the reply to its spoken turn, ends with ``session.end`` and is replaced by a
new one. Every ``--sample-seconds`` it reads the server process's open descriptors,
threads and resident memory from ``/proc``.

Afterwards it checks that descriptors, threads and the worker's asyncio tasks are back to
their baseline (tasks from the ``session over`` log line of a session run alone before
and after), and reports the resident memory per concurrent session and its plateau (the
median resident memory in each quarter of the run: a plateau when the last two quarters
differ by less than 5 %), and its drift after warm-up (a least-squares slope in MB per
hour with its standard error, over the samples from a sixth of the run on).

Run (the full soak, 20 minutes, 20 sessions)::

    python -m benchmarks.soak --minutes 20 --sessions 20

Exit status: 0 when every count is back to its baseline and no session failed; 1 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import websockets

from audio.resample import resample_all
from audio.wav import read_wav
from runtime.bench.reference_thread import ReferenceThread
from runtime.bench.soak import drift
from runtime.llm.reference import ReplyPlan

ROOT = Path(__file__).resolve().parent.parent
CLIP = ROOT / "benchmarks" / "data" / "user_hello.wav"
KEY = "vk-soak"
RATE = 24000
FATAL = frozenset({"unauthorized", "forbidden", "at_capacity", "agent_init_failed", "agent_timeout",
                   "session_not_found", "session_forbidden", "session_expired", "internal_error",
                   "server_error"})  # fmt: skip
REPLIES = ("Hello! How can I help you today?", "Sure, one moment.", "It is sunny today.")


@dataclass
class Counts:
    fds: int
    threads: int
    rss_kib: int


@dataclass
class Tally:
    started: int = 0
    answered: int = 0
    failed: list[str] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)  # non-fatal session.error codes


def counts(pid: int) -> Counts:
    status = Path(f"/proc/{pid}/status").read_text()
    values = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    return Counts(
        fds=len(os.listdir(f"/proc/{pid}/fd")),
        threads=int(values["Threads"].strip()),
        rss_kib=int(values["VmRSS"].split()[0]),
    )


def start_server(
    data_dir: Path, llm: str, sessions: int
) -> tuple[subprocess.Popen[str], str, Path]:
    log = data_dir.parent / "server.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "runtime.cli", "serve", "--port", "0", "--data-dir", str(data_dir),
         "--no-access-log"],
        stdout=subprocess.PIPE, stderr=log.open("w"), text=True,
        env={**os.environ, "VOXLOOP_API_KEYS": KEY, "VOXLOOP_ALLOW_PRIVATE_ENDPOINTS": "127.0.0.1",
             "VOXLOOP_LLM_BASE_URL": llm, "VOXLOOP_LLM_MODEL": "soak",
             "VOXLOOP_MAX_SESSIONS": str(sessions + 4),
             "VOXLOOP_SESSIONS_PER_MINUTE": str(sessions * 60)},
    )  # fmt: skip
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith("voxloop serve listening on "):
        proc.kill()
        raise SystemExit(f"voxloop serve did not start: {log.read_text()[-2000:]}")
    return proc, "ws" + line.rsplit(" ", 1)[1].strip()[4:] + "/v1/ws", log


async def one_session(url: str, pcm: bytes, tally: Tally) -> None:
    """Bind, speak one turn in real time, wait for the reply, end."""
    tally.started += 1
    answered = asyncio.Event()
    try:
        async with websockets.connect(
            url, additional_headers={"Authorization": f"Bearer {KEY}"}, max_size=None
        ) as ws:
            await ws.send(json.dumps({"type": "session.update",
                                      "session": {"system_prompt": "Be brief."}}))  # fmt: skip

            async def read() -> None:
                heard = False
                async for message in ws:
                    doc = json.loads(message)
                    if doc["type"] == "session.error":
                        if doc.get("code") in FATAL:
                            raise RuntimeError(f"session.error {doc.get('code')}")
                        # e.g. audio_rate_violation: a loaded server takes audio slower
                        # than real time; the session goes on.
                        tally.errors[str(doc.get("code"))] = (
                            tally.errors.get(str(doc.get("code")), 0) + 1
                        )
                    heard = heard or doc["type"] == "transcript.user"
                    if heard and doc["type"] == "reply.done":
                        answered.set()

            reader = asyncio.create_task(read())
            waiter = asyncio.create_task(answered.wait())
            try:
                step = RATE // 10 * 2  # 100 ms
                loop = asyncio.get_running_loop()
                t0 = loop.time()
                for i in range(0, len(pcm), step):
                    if reader.done():
                        break
                    chunk = base64.b64encode(pcm[i : i + step]).decode()
                    await ws.send(json.dumps({"type": "input.audio", "audio": chunk}))
                    delay = t0 + (i + step) / (RATE * 2) - loop.time()
                    if delay > 0:
                        await asyncio.sleep(delay)  # real-time pacing of a microphone
                async with asyncio.timeout(60):
                    await asyncio.wait({reader, waiter}, return_when=asyncio.FIRST_COMPLETED)
                if reader.done():
                    reader.result()  # raises what the reader met
                if answered.is_set():
                    tally.answered += 1
                await ws.send(json.dumps({"type": "session.end"}))
                async with asyncio.timeout(10):
                    await reader
            finally:
                for task in (reader, waiter):
                    task.cancel()
                await asyncio.gather(reader, waiter, return_exceptions=True)
    except (OSError, TimeoutError, RuntimeError, websockets.WebSocketException) as exc:
        tally.failed.append(f"{type(exc).__name__}: {exc}"[:200])


def log_tasks(log: Path) -> list[int]:
    out = []
    for line in log.read_text().splitlines():
        if line.startswith("{"):
            doc = json.loads(line)
            if doc.get("msg") == "session over" and "tasks" in doc:
                out.append(int(doc["tasks"]))
    return out


async def soak(args: argparse.Namespace) -> dict[str, Any]:
    audio = read_wav(CLIP)
    pcm = resample_all(audio.mono(), audio.sample_rate, RATE) + bytes(RATE * 2 * 3 // 2)
    plan = ReplyPlan(replies=REPLIES, ttft_ms=40, itl_ms=10)
    with ReferenceThread(plan) as llm, tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        data.mkdir()
        proc, url, log = start_server(data, llm.base_url, args.sessions)
        try:
            warm = Tally()
            await one_session(url, pcm, warm)  # loads the engines
            await asyncio.sleep(2)  # let the finished session's teardown settle
            await one_session(url, pcm, warm)
            await asyncio.sleep(2)
            base = counts(proc.pid)
            base_tasks = log_tasks(log)[-1]

            tally = Tally()
            samples: list[tuple[float, Counts]] = []
            deadline = time.monotonic() + args.minutes * 60

            async def worker() -> None:
                while time.monotonic() < deadline:
                    await one_session(url, pcm, tally)

            async def sampler() -> None:
                t0 = time.monotonic()
                while time.monotonic() < deadline:
                    samples.append((time.monotonic() - t0, counts(proc.pid)))
                    await asyncio.sleep(args.sample_seconds)

            await asyncio.gather(sampler(), *(worker() for _ in range(args.sessions)))
            await asyncio.sleep(5)  # teardown of the last sessions
            after_tasks_probe = Tally()
            await one_session(url, pcm, after_tasks_probe)
            await asyncio.sleep(2)
            end = counts(proc.pid)
            end_tasks = log_tasks(log)[-1]
            failures = log.read_text().count('"session failed"')
        finally:
            proc.terminate()
            proc.wait(timeout=30)

    quarters = [
        [c.rss_kib for t, c in samples if q * args.minutes * 15 <= t < (q + 1) * args.minutes * 15]
        for q in range(4)
    ]
    medians = [statistics.median(q) if q else 0 for q in quarters]
    peak_threads = max(c.threads for _, c in samples)
    # Drift after warm-up: the samples from a sixth of the run on (as the chaos soak).
    slope = drift([(t, float(c.rss_kib)) for t, c in samples if t >= args.minutes * 10])
    return {
        "sessions": args.sessions,
        "minutes": args.minutes,
        "sessions_started": tally.started,
        "sessions_answered": tally.answered,
        "client_failures": tally.failed[:10],
        "client_failure_count": len(tally.failed),
        "nonfatal_errors": tally.errors,
        "server_session_failed_lines": failures,
        "baseline": base.__dict__ | {"tasks": base_tasks},
        "after": end.__dict__ | {"tasks": end_tasks},
        "peak_fds": max(c.fds for _, c in samples),
        "peak_threads": peak_threads,
        "rss_mib_by_quarter": [round(m / 1024, 1) for m in medians],
        "rss_mib_per_session": round((medians[-1] - base.rss_kib) / 1024 / args.sessions, 2),
        "rss_drift_mb_per_hour": slope.mb_per_hour,
        "rss_drift_stderr_mb_per_hour": slope.stderr_mb_per_hour,
        "rss_drift_samples": slope.samples,
        "rss_plateau": bool(medians[2]) and abs(medians[3] - medians[2]) / medians[2] < 0.05,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=20.0)
    parser.add_argument("--sessions", type=int, default=20)
    parser.add_argument("--sample-seconds", type=float, default=5.0)
    args = parser.parse_args(argv)
    report = asyncio.run(soak(args))
    print(json.dumps(report, indent=2))
    base, after = report["baseline"], report["after"]
    back = all(after[k] <= base[k] for k in ("fds", "threads", "tasks"))
    ok = back and not report["client_failure_count"] and not report["server_session_failed_lines"]
    print(("ok" if ok else "NOT OK") + f": fds {base['fds']}→{after['fds']}, threads "
          f"{base['threads']}→{after['threads']}, tasks {base['tasks']}→{after['tasks']}, "
          f"{report['rss_mib_per_session']} MiB RSS per session, plateau "
          f"{report['rss_plateau']}, drift {report['rss_drift_mb_per_hour']} ± "
          f"{report['rss_drift_stderr_mb_per_hour']} MB/h")  # fmt: skip
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
