"""Agent service throughput: agent reads and token mints per second.

Starts ``voxloop serve`` (one uvicorn worker, SQLite by default) as a
subprocess, stores ``--agents`` agents, then drives it over loopback with
``--concurrency`` requests in flight for ``--seconds`` per measurement, three
times each; reports the median requests per second.

Run: ``python -m benchmarks.server_load [--database-url postgresql+asyncpg://…]``
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

KEY = "bench-key"


def start(data_dir: Path, database_url: str | None) -> tuple[subprocess.Popen[str], str]:
    env = {**os.environ, "VOXLOOP_API_KEYS": KEY,
           "VOXLOOP_STATIC_HOSTS": json.dumps({"api.example.com": ["93.184.216.34"]})}  # fmt: skip
    cmd = [sys.executable, "-m", "runtime.cli", "serve", "--port", "0", "--data-dir", str(data_dir)]
    if database_url:
        cmd += ["--database-url", database_url]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    return proc, line.rsplit(" ", 1)[1].strip()


def wrk_rate(
    url: str, path: str, seconds: float, concurrency: int, script: Path | None = None
) -> float:
    """Requests per second measured by wrk (one thread), which costs far less CPU than Python."""
    out = subprocess.run(
        ["wrk", "-t1", f"-c{concurrency}", f"-d{seconds:g}s", "-H", f"Authorization: {KEY}",
         *(["-s", str(script)] if script else []), url + path],
        capture_output=True, text=True, check=True, timeout=seconds + 30,
    ).stdout  # fmt: skip
    if "Non-2xx or 3xx responses" in out:
        raise RuntimeError(f"wrk saw errors on {path}:\n{out}")
    line = next(x for x in out.splitlines() if x.startswith("Requests/sec:"))
    return float(line.split()[1])


# Every request updates the same agent: the worst case for the row lock.
PUT_SCRIPT = """wrk.method = "PUT"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"greeting": "Hello again!", "input": {"turn_detection": {"min_silence": 400}}}'
"""
PUT_BODY = {"greeting": "Hello again!", "input": {"turn_detection": {"min_silence": 400}}}


async def rate(
    url: str, paths: list[str], seconds: float, concurrency: int, *, put: bool = False
) -> float:
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": KEY}, limits=limits) as c:
        deadline = time.perf_counter() + seconds
        done = 0

        async def worker() -> None:
            nonlocal done
            while time.perf_counter() < deadline:
                if put:
                    r = await c.put(random.choice(paths), json=PUT_BODY)
                else:
                    r = await c.get(random.choice(paths))
                r.raise_for_status()
                done += 1

        t0 = time.perf_counter()
        async with asyncio.TaskGroup() as tg:
            for _ in range(concurrency):
                tg.create_task(worker())
        return done / (time.perf_counter() - t0)


async def main_async(args: argparse.Namespace, url: str) -> dict[str, float]:
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": KEY}) as c:
        ids = []
        for i in range(args.agents):
            llm = [{"base_url": "https://api.example.com/v1", "model": "m", "api_key": "sk-x"}]
            body = {"name": f"agent {i}", "system_prompt": "Be brief.", "voice": "ivy", "llm": llm}
            r = await c.post("/v1/agents", json=body)
            r.raise_for_status()
            ids.append(r.json()["id"])
    reads = [f"/v1/agents/{i}" for i in ids]
    mints = ["/v1/token?expires_in_seconds=60"]
    if args.tool == "wrk":
        script = Path(tempfile.mkdtemp()) / "put.lua"
        script.write_text(PUT_SCRIPT, encoding="utf-8")

        def med(path: str, lua: Path | None = None) -> float:
            return statistics.median(
                [wrk_rate(url, path, args.seconds, args.concurrency, lua) for _ in range(3)]
            )

        return {
            "agent_updates_per_s": med(reads[0], script),
            "agent_reads_per_s": med(reads[0]),
            "token_mints_per_s": med(mints[0]),
            "agent_list_per_s": med("/v1/agents"),
        }
    return {
        "agent_updates_per_s": statistics.median(
            [await rate(url, reads[:1], args.seconds, args.concurrency, put=True) for _ in range(3)]
        ),
        "agent_reads_per_s": statistics.median(
            [await rate(url, reads, args.seconds, args.concurrency) for _ in range(3)]
        ),
        "token_mints_per_s": statistics.median(
            [await rate(url, mints, args.seconds, args.concurrency) for _ in range(3)]
        ),
        "agent_list_per_s": statistics.median(
            [await rate(url, ["/v1/agents"], args.seconds, args.concurrency) for _ in range(3)]
        ),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="agent service throughput")
    parser.add_argument("--agents", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--database-url")
    parser.add_argument(
        "--tool",
        choices=("wrk", "python"),
        default="wrk" if shutil.which("wrk") else "python",
        help="load generator (wrk from Debian's package, or an httpx client)",
    )
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        proc, url = start(Path(tmp), args.database_url)
        try:
            result = asyncio.run(main_async(args, url))
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=20)
    store = "PostgreSQL" if args.database_url else "SQLite"
    print(f"one uvicorn worker, {store}, {args.concurrency} requests in flight ({args.tool}), "
          f"median of 3 x {args.seconds:g} s\n")  # fmt: skip
    print("| operation | requests/s |")
    print("|---|---|")
    print(f"| PUT /v1/agents/{{id}} (one agent) | {result['agent_updates_per_s']:.0f} |")
    print(f"| GET /v1/agents/{{id}} | {result['agent_reads_per_s']:.0f} |")
    print(f"| GET /v1/agents ({args.agents} agents) | {result['agent_list_per_s']:.0f} |")
    print(f"| GET /v1/token (mint) | {result['token_mints_per_s']:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
