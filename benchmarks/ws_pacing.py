"""How far ahead of real time ``reply.audio`` reaches a client of ``/v1/ws``.

Starts ``voxloop serve`` as a subprocess and the reference endpoint in a
thread, opens ``--sessions`` sessions one after another whose greeting is a
paragraph of speech, and timestamps every ``reply.audio`` message on arrival.
A simulated client plays the audio as it arrives (a buffer drained in real
time, silence when it runs dry): the *lead* at a message is what the client
holds unplayed once the message is added, and the *underrun* is the silence
it played inside the greeting while waiting for audio. The lead's bound is
the server's ``VOXLOOP_AUDIO_LEAD_MS`` (300 ms by default) plus one 40 ms
piece; a barge-in can leave at most that much audio buffered at the client.

Run: ``python -m benchmarks.ws_pacing [--sessions 3] [--lead-ms 300] [--buffer-ms 300]``
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import websockets

from runtime.bench.reference_thread import ReferenceThread
from runtime.llm.reference import ReplyPlan

KEY = "bench-key"
GREETING = (
    "Thanks for calling the front desk. Our opening hours are nine to five on weekdays, and "
    "ten to two on Saturdays. You can book, change or cancel a table with me right now, or "
    "ask about the menu, parking and accessibility."
)


def start(data_dir: Path, lead_ms: int, buffer_ms: int) -> tuple[subprocess.Popen[str], str]:
    env = {
        **os.environ, "VOXLOOP_API_KEYS": KEY, "VOXLOOP_ALLOW_PRIVATE_ENDPOINTS": "127.0.0.1",
        "VOXLOOP_AUDIO_LEAD_MS": str(lead_ms), "VOXLOOP_AUDIO_BUFFER_MS": str(buffer_ms),
    }  # fmt: skip
    cmd = [sys.executable, "-m", "runtime.cli", "serve", "--port", "0", "--data-dir", str(data_dir)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env=env)  # fmt: skip
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith("voxloop serve listening on "):
        raise SystemExit("voxloop serve did not start")
    return proc, "ws" + line.rsplit(" ", 1)[1].strip()[4:] + "/v1/ws"


async def one_session(url: str, base_url: str) -> tuple[list[float], float]:
    """The lead (ms) at each reply.audio arrival of the greeting, and the underrun (ms)."""
    loop = asyncio.get_running_loop()
    leads: list[float] = []
    underrun = 0.0
    async with websockets.connect(url, additional_headers={"Authorization": KEY}) as ws:
        await ws.send(json.dumps({"type": "session.update", "session": {
            "greeting": GREETING, "llm": [{"base_url": base_url, "model": "m"}]}}))  # fmt: skip
        last: float | None = None
        buffered = 0.0
        async for message in ws:
            event = json.loads(message)
            if event["type"] == "reply.audio":
                now = loop.time()
                if last is not None:
                    played = (now - last) * 1000
                    underrun += max(0.0, played - buffered)
                    buffered = max(0.0, buffered - played)
                last = now
                buffered += len(base64.b64decode(event["data"])) / 2 / 24000 * 1000
                leads.append(buffered)
            elif event["type"] == "reply.done":
                break
        await ws.send(json.dumps({"type": "session.end"}))
    return leads, underrun


async def main_async(args: argparse.Namespace) -> None:
    data_dir = Path(tempfile.mkdtemp(prefix="voxloop-pacing-"))
    proc, url = start(data_dir, args.lead_ms, args.buffer_ms)
    try:
        with ReferenceThread(ReplyPlan()) as ref:
            all_leads: list[float] = []
            underruns: list[float] = []
            for i in range(args.sessions):
                leads, underrun = await one_session(url, ref.base_url)
                all_leads += leads
                underruns.append(underrun)
                print(f"session {i + 1}: {len(leads)} messages, lead max {max(leads):.0f} ms, "
                      f"underrun {underrun:.0f} ms")  # fmt: skip
        ordered = sorted(all_leads)
        p50 = statistics.median(ordered)
        p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
        summary = {
            "messages": len(ordered), "lead_ms_p50": round(p50, 1), "lead_ms_p99": round(p99, 1),
            "lead_ms_max": round(ordered[-1], 1), "configured_lead_ms": args.lead_ms,
            "configured_buffer_ms": args.buffer_ms,
            "underrun_ms_median": round(statistics.median(underruns), 1),
        }  # fmt: skip
        print(json.dumps(summary))
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        shutil.rmtree(data_dir, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, default=3)
    parser.add_argument("--lead-ms", type=int, default=300)
    parser.add_argument("--buffer-ms", type=int, default=300)
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
