"""Capacity: how many concurrent realtime sessions a worker carries, and memory per session.

For each configuration — the speech engines (``embedded``: Whisper and Piper in the
worker; ``remote``: voxloop's ``openai`` engines against the loopback stand-ins of
:mod:`benchmarks.standins`, so the worker does no model work) x ``--workers`` (1:
one ``voxloop serve`` process; 2: ``voxloop serve --workers 2`` on one port with a
throwaway ``redis-server``) — it starts the server, warms it with a round of
sessions, then ramps through ``--levels``: N realtime sessions at once, each
streaming the two-turn recording ``tests/data/speech/conv-two_turns.wav`` in real
time through voxloop's own client (:func:`runtime.client.runner.connect_pcm`),
arriving over ``--spread`` seconds. The chat endpoint is the reference endpoint
(100 ms to the first token) in the stand-ins' process.

Per level: the server processes' CPU (% of one core) and peak RSS together, the RSS
per session (slope from the first level), v2v p50/p90 at the client (end of the
user's speech → first agent audio), the pacing of the agent's audio (each session's
p99 lateness from its ``session over`` log line; the worst session's bounds the
level's) beside an idle process's timer lag at the same time (the machine's share),
the silence inside replies whose audio came late (underrun), turns answered and
error events. A level holds under
:class:`runtime.bench.capacity.Criterion`; the ramp stops at the first level that
does not (``--all-levels``: runs them all).

Run (one engines kind per run, both worker counts; JSON and Markdown out)::

    python -m benchmarks.capacity --engines remote \\
        --levels 1 4 8 16 24 32 --json benchmarks/results/capacity-remote.json

Exit status: 0 when it ran (whatever held); 1 with one line when a server does not start
or become ready; 2 for bad options.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from audio.resample import resample_all
from audio.wav import read_wav
from benchmarks.chaos_soak import free_port, start_redis
from benchmarks.machine import lag_p99_ms, start_lag_probe
from runtime.bench.capacity import Criterion, Level, Run, markdown
from runtime.bench.workers import rss_kb, worker_pids
from runtime.client.connection import Auth
from runtime.client.protocol import SessionFailure
from runtime.client.runner import connect_pcm
from runtime.protocol import events as ev
from runtime.secret import Secret

ROOT = Path(__file__).resolve().parents[1]
SPEECH = ROOT / "tests" / "data" / "speech" / "conv-two_turns.wav"
TURNS = 2  # user turns in the recording
KEY = "vk-capacity"
TICK = os.sysconf("SC_CLK_TCK")


@dataclass
class Tally:
    user_turns: int = 0
    answered: int = 0
    v2v_ms: list[float] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)

    def error(self, code: str) -> None:
        self.errors[code] = self.errors.get(code, 0) + 1


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process (all its threads); 0 once it is gone."""
    with contextlib.suppress(OSError):
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / TICK
    return 0.0


async def session(url: str, pcm: bytes, delay: float, tally: Tally) -> None:
    """One realtime session of the recording; counts its turns, replies and errors."""
    await asyncio.sleep(delay)
    seen: list[str] = []

    def on_event(event: Any) -> None:
        kind = getattr(event, "type", "")
        seen.append(kind)
        if kind in ("reply.error", "session.error"):
            tally.error(f"{kind}:{event.code}")

    patch = ev.SessionPatch(keys=frozenset({"system_prompt"}), system_prompt="Answer briefly.")
    try:
        result = await connect_pcm(
            pcm, url=url, auth=Auth(api_key=Secret(KEY)), session=patch, on_event=on_event
        )
    except SessionFailure as exc:
        tally.error(f"failed:{exc.code}")
        return
    except (OSError, ConnectionError) as exc:
        tally.error(type(exc).__name__)
        return
    turns = [i for i, k in enumerate(seen) if k == "transcript.user"]
    tally.user_turns += len(turns)
    for n, start in enumerate(turns):
        end = turns[n + 1] if n + 1 < len(turns) else len(seen)
        if "reply.done" in seen[start:end] and "reply.error" not in seen[start:end]:
            tally.answered += 1
    tally.v2v_ms += [m.v2v_ms for m in result.metrics if m.v2v_ms is not None]


def over_lines(log: Path, offset: int) -> list[dict[str, Any]]:
    """The ``session over`` log lines written after ``offset`` bytes."""
    with log.open("rb") as handle:
        handle.seek(offset)
        text = handle.read().decode(errors="replace")
    out = []
    for line in text.splitlines():
        if line.startswith("{"):
            with contextlib.suppress(ValueError):
                doc = json.loads(line)
                if doc.get("msg") == "session over":
                    out.append(doc)
    return out


class Server:
    """``voxloop serve`` (``--workers`` N) with its Redis, logging to a file."""

    def __init__(self, engines: str, workers: int, urls: dict[str, str], root: Path) -> None:
        self.workers = workers
        self.log = root / f"serve-{engines}-{workers}.log"
        self.redis: subprocess.Popen[str] | None = None
        env = {**os.environ, "VOXLOOP_API_KEYS": KEY,
               "VOXLOOP_ALLOW_PRIVATE_ENDPOINTS": "127.0.0.1",
               "VOXLOOP_LLM_BASE_URL": urls["llm"], "VOXLOOP_LLM_MODEL": "capacity",
               "VOXLOOP_MAX_SESSIONS": "1000", "VOXLOOP_SESSIONS_PER_MINUTE": "100000",
               "VOXLOOP_UNBOUND_PER_CREDENTIAL": "1000"}  # fmt: skip
        if engines == "remote":
            env.update({"VOXLOOP_STT": "openai", "VOXLOOP_STT_BASE_URL": urls["audio"],
                        "VOXLOOP_STT_MODEL": "stand-in", "VOXLOOP_TTS": "openai",
                        "VOXLOOP_TTS_BASE_URL": urls["audio"],
                        "VOXLOOP_TTS_MODEL": "stand-in"})  # fmt: skip
        if workers > 1:
            port = free_port()
            self.redis = start_redis(port, str(root))
            env["VOXLOOP_REDIS_URL"] = f"redis://127.0.0.1:{port}/0"
        with self.log.open("w") as handle:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "runtime.cli", "serve", "--port", "0", "--workers",
                 str(workers), "--data-dir", str(root / f"data-{engines}-{workers}"),
                 "--no-access-log"],
                stdout=subprocess.PIPE, stderr=handle, text=True, env=env,
            )  # fmt: skip
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line.startswith("voxloop serve listening on "):
            self.stop()
            raise SystemExit(f"voxloop serve did not start: {self.log.read_text()[-2000:]}")
        self.http = line.rsplit(" ", 1)[1].strip()
        self.url = "ws" + self.http[4:] + "/v1/ws"

    def pids(self) -> list[int]:
        return worker_pids(self.proc.pid) if self.workers > 1 else [self.proc.pid]

    async def ready(self) -> None:
        """Every worker answers ``/readyz`` 200 (engines loaded): a run of successes."""
        streak = 0
        async with httpx.AsyncClient(timeout=30) as client:
            for _ in range(600):
                ok = (await client.get(f"{self.http}/readyz")).status_code == 200
                streak = streak + 1 if ok else 0
                if streak >= 4 * self.workers:
                    return
                await asyncio.sleep(0.25)
        raise SystemExit("voxloop serve did not become ready")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(120)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        if self.redis is not None:
            self.redis.terminate()
            self.redis.wait(30)


async def level(server: Server, pcm: bytes, n: int, spread: float, helper_pid: int) -> Level:
    pids = server.pids()
    offset = server.log.stat().st_size
    tally = Tally()
    cpu0 = {pid: cpu_s(pid) for pid in pids}
    self0 = resource.getrusage(resource.RUSAGE_SELF)
    helper0 = cpu_s(helper_pid)
    probe = start_lag_probe()
    wall0 = time.monotonic()
    peak = 0.0
    sessions = asyncio.gather(*(session(server.url, pcm, i * spread / n, tally)
                                for i in range(n)))  # fmt: skip
    while not sessions.done():
        peak = max(peak, sum(rss_kb(pid) for pid in pids) / 1024)
        await asyncio.wait({sessions}, timeout=0.25)
    await sessions
    wall = time.monotonic() - wall0
    machine_lag = lag_p99_ms(probe)
    cpu = sum(cpu_s(pid) - cpu0[pid] for pid in pids)
    self1 = resource.getrusage(resource.RUSAGE_SELF)
    client = (self1.ru_utime - self0.ru_utime + self1.ru_stime - self0.ru_stime
              + cpu_s(helper_pid) - helper0)  # fmt: skip
    lines: list[dict[str, Any]] = []
    for _ in range(100):  # the last lines follow the last closes
        lines = over_lines(server.log, offset)
        if len(lines) >= n:
            break
        await asyncio.sleep(0.05)
    return Level(
        sessions=n, expected_turns=TURNS, user_turns=tally.user_turns, answered=tally.answered,
        errors=tally.errors, v2v_ms=tally.v2v_ms,
        pacing_p99_ms=[float(d["pacing_p99_ms"]) for d in lines if "pacing_p99_ms" in d],
        underrun_ms=[float(d["underrun_ms"]) for d in lines if "underrun_ms" in d],
        machine_lag_ms=machine_lag,
        cpu_pct=100 * cpu / wall, rss_mb=peak, client_cpu_pct=100 * client / wall, wall_s=wall,
    )  # fmt: skip


async def ramp(args: argparse.Namespace) -> tuple[list[Run], list[str]]:
    audio = read_wav(SPEECH)
    pcm = resample_all(audio.mono(), audio.sample_rate, 24_000)
    criterion = Criterion(args.pacing_ms, args.v2v_factor)
    runs: list[Run] = []
    notes: list[str] = []
    helper = subprocess.Popen(  # noqa: ASYNC220 - once, before the load
        [sys.executable, "-m", "benchmarks.standins"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert helper.stdin is not None
    assert helper.stdout is not None
    urls = json.loads(helper.stdout.readline())
    try:
        with tempfile.TemporaryDirectory(prefix="voxloop-capacity-") as tmp:
            for workers in args.workers:
                server = Server(args.engines, workers, urls, Path(tmp))
                try:
                    await server.ready()
                    # Warm-up: engines' first inferences, every worker's first sessions.
                    warm = Tally()
                    await asyncio.gather(*(session(server.url, pcm, 0.5 * i, warm)
                                           for i in range(2 * workers)))  # fmt: skip
                    idle = sum(rss_kb(pid) for pid in server.pids()) / 1024
                    run = Run(args.engines, workers, idle)
                    runs.append(run)
                    for n in args.levels:
                        run.levels.append(await level(server, pcm, n, args.spread, helper.pid))
                        row = run.rows(criterion)[-1]
                        print(json.dumps({"engines": args.engines, "workers": workers} | row),
                              file=sys.stderr, flush=True)  # fmt: skip
                        if not row["holds"] and not args.all_levels:
                            break
                    tracebacks = server.log.read_text().count("Traceback")
                    if tracebacks:
                        notes.append(f"{args.engines}, {workers} workers: {tracebacks} tracebacks")
                finally:
                    server.stop()
    finally:
        helper.stdin.close()
        helper.wait(30)
        helper.stdout.close()
    return runs, notes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engines", choices=("embedded", "remote"), default="remote")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument(
        "--spread", type=float, default=3.0, help="seconds over which a level's sessions arrive"
    )
    parser.add_argument(
        "--pacing-ms", type=float, default=20.0,
        help="a level holds with the worst session's p99 pacing lateness at most this (ms)",
    )  # fmt: skip
    parser.add_argument(
        "--v2v-factor", type=float, default=1.5,
        help="... and its median v2v at most this x the 1-session median",
    )  # fmt: skip
    parser.add_argument(
        "--all-levels", action="store_true",
        help="run every level, not only up to the first that does not hold",
    )  # fmt: skip
    parser.add_argument("--json", type=Path)
    parser.add_argument("--markdown", type=Path)
    args = parser.parse_args(argv)
    if args.levels[0] != 1:
        parser.error("--levels must start at 1 (the one-session v2v is the baseline)")
    criterion = Criterion(args.pacing_ms, args.v2v_factor)
    runs, notes = asyncio.run(ramp(args))
    table = markdown(runs, criterion)
    print(table)
    doc = {
        "cpus": os.cpu_count(),
        "engines": args.engines,
        "criterion": criterion.describe(),
        "spread_s": args.spread,
        "recording": str(SPEECH.relative_to(ROOT)),
        "notes": notes,
        "runs": [run.summary(criterion) | {"levels": run.rows(criterion)} for run in runs],
    }
    if args.json:
        args.json.write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    if args.markdown:
        args.markdown.write_text(table, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
