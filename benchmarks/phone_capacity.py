"""How many phone calls one ``voxloop serve`` process carries, with the speech engines remote.

The server process (this one) runs the voxloop app (uvicorn, the Twilio bridge,
the session host, the conversation core) and nothing else. A helper process
(``--callers``) runs everything around it on loopback: the OpenAI-compatible
audio stand-in of :mod:`benchmarks.standins` (``/v1/audio/transcriptions`` answers a
fixed sentence after 50 ms; ``/v1/audio/speech`` streams 24 kHz PCM, 70 ms per
character), the
reference chat endpoint, and N simultaneous callers driven by streamdouble
(Twilio Media Streams with pacing and mark echoes): each hears the greeting,
asks a question (real speech, ``tests/data/speech/shared-00-piper.wav``) and
hears the answer. So what is measured is the bridge and the core, not the models.

For each N: the server's CPU time and peak RSS during the round (per call),
the outbound pacing lateness of every paced piece (how late each ``media`` left
against its schedule; p50/p99 over all calls, from the ``twilio call over``
lines), the event loop's lag (a 10 ms timer's overshoot, p99), and whether
every call was answered (its greeting and its answer arrived).

Calls arrive spread over ``--spread`` seconds (4 by default), then overlap for
the rest of the round.

Run: ``python -m benchmarks.phone_capacity --calls 10 25 50 [--json out.json]``
(pin it for steadier numbers: ``taskset -c 0`` for this process; the helper
follows its parent's mask unless you start it elsewhere).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import resource
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path
from typing import Any

import httpx

from benchmarks.machine import lag_p99_ms, start_lag_probe
from benchmarks.standins import REPLY, audio_app, serve_app

SPEECH = Path(__file__).resolve().parent.parent / "tests" / "data" / "speech"
QUESTION = SPEECH / "shared-00-piper.wav"
TOKEN = "bench-twilio-token"
KEY = "bench-key"


# -- the helper process: stand-ins and callers ------------------------------------------------


async def _one_call(url: str, agent_id: str, index: int, delay: float) -> dict[str, Any]:
    import streamdouble.session as sd_session
    from streamdouble.api import run_scenario
    from streamdouble.scenario import parse
    from streamdouble.session import SessionConfig

    del sd_session
    await asyncio.sleep(delay)  # calls arrive spread out, as a line's calls do
    scenario = parse({"name": f"call{index}", "steps": [
        {"wait_for": "audio"}, {"wait": 3.0}, {"say": str(QUESTION)}, {"wait": 6.0},
    ]}, base_dir=SPEECH)  # fmt: skip
    config = SessionConfig(custom_parameters={"agent_id": agent_id}, response_timeout_s=30,
                           quiet_period_s=1.0, max_call_s=90)  # fmt: skip
    report = await run_scenario(url, scenario, config=config)
    media = report.result.events_of("media_received")
    return {
        "spoke": report.spoke,
        "first_audio_ms": report.time_to_first_audio_ms,
        "audio_s": round(len(report.audio_received) / 8000, 2),
        "media": len(media),
        "violations": len(report.violations),
        "stream_sid": report.stream_sid,
    }


def _signed() -> None:
    """streamdouble's upgrades carry Twilio's signature, as Twilio's do."""
    import streamdouble.session as sd_session
    import websockets
    from twilio.request_validator import RequestValidator

    class Signed(types.ModuleType):
        def __getattr__(self, name: str) -> Any:
            return getattr(websockets, name)

        @staticmethod
        def connect(url: str, **kwargs: Any) -> Any:
            sig = RequestValidator(TOKEN).compute_signature(url, {})
            return websockets.connect(url, additional_headers={"X-Twilio-Signature": sig},
                                      **kwargs)  # fmt: skip

    sd_session.websockets = Signed("websockets")


async def callers_main() -> None:
    from runtime.llm.reference import ReferenceEndpoint, ReplyPlan

    _signed()
    _, audio_port = await serve_app(audio_app())
    async with ReferenceEndpoint(ReplyPlan(replies=(REPLY,), ttft_ms=100, itl_ms=10)) as llm:
        print(json.dumps({"audio": f"http://127.0.0.1:{audio_port}/v1",
                          "llm": llm.base_url}), flush=True)  # fmt: skip
        loop = asyncio.get_running_loop()
        while line := await loop.run_in_executor(None, sys.stdin.readline):
            n_text, url, agent_id, spread = line.split()
            n = int(n_text)
            results = await asyncio.gather(
                *(_one_call(url, agent_id, i, i * float(spread) / n) for i in range(n))
            )
            print(json.dumps(results), flush=True)


# -- the server process ----------------------------------------------------------------------


class _CallLines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[dict[str, Any]] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage() == "twilio call over":
            self.lines.append(dict(record.__dict__))


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * p))]


async def server_main(counts: list[int], spread: float, out: Path | None) -> None:
    import uvicorn

    from runtime.server.app import create_app, settings_from_env

    # Started once, before the rounds; its lines are read through an executor.
    helper = subprocess.Popen(  # noqa: ASYNC220
        [sys.executable, "-m", "benchmarks.phone_capacity", "--callers"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert helper.stdin is not None
    assert helper.stdout is not None
    urls = json.loads(helper.stdout.readline())
    data = Path(tempfile.mkdtemp(prefix="phone-capacity-"))
    # The speech engines are voxloop's openai engines, served by the stand-ins, from the
    # server's own settings.
    env = {"VOXLOOP_API_KEYS": KEY, "VOXLOOP_TWILIO_AUTH_TOKEN": TOKEN,
           "VOXLOOP_ALLOW_PRIVATE_ENDPOINTS": "127.0.0.1", "VOXLOOP_MAX_SESSIONS": "1000",
           "VOXLOOP_STT": "openai", "VOXLOOP_STT_BASE_URL": urls["audio"],
           "VOXLOOP_STT_MODEL": "stand-in", "VOXLOOP_TTS": "openai",
           "VOXLOOP_TTS_BASE_URL": urls["audio"], "VOXLOOP_TTS_MODEL": "stand-in"}  # fmt: skip
    settings = settings_from_env(env, data_dir=data)
    app = create_app(settings)
    handler = _CallLines()
    logging.getLogger("voxloop.telephony").addHandler(handler)
    logging.getLogger("voxloop.telephony").setLevel(logging.INFO)
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning",
                            access_log=False, ws_max_size=1 << 20)  # fmt: skip
    server = uvicorn.Server(config)
    serving = asyncio.get_running_loop().create_task(server.serve())
    while not server.started:  # noqa: ASYNC110 - uvicorn offers no event for it
        await asyncio.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    base = f"http://127.0.0.1:{port}"
    async with httpx.AsyncClient(base_url=base, headers={"Authorization": KEY}) as rest:
        r = await rest.post("/v1/agents", json={
            "name": "Capacity", "system_prompt": "Answer briefly.", "voice": {"voice_id": "alloy"},
            "greeting": "Hello, thanks for calling the front desk. How can I help you today?",
            "llm": [{"base_url": urls["llm"], "model": "m", "api_key": "k"}],
        })  # fmt: skip
        assert r.status_code == 201, r.text
        agent_id = r.json()["id"]
    media_url = f"ws://127.0.0.1:{port}/twilio/media"
    rounds = []
    loop = asyncio.get_running_loop()
    for n in counts:
        handler.lines.clear()
        lags: list[float] = []
        stop = asyncio.Event()

        async def monitor(lags: list[float] = lags, stop: asyncio.Event = stop) -> None:
            while not stop.is_set():
                t = loop.time()
                await asyncio.sleep(0.01)
                lags.append((loop.time() - t - 0.01) * 1000)

        watcher = loop.create_task(monitor())
        # The machine's own lag next to ours: an idle process timing the same 10 ms sleeps.
        probe = start_lag_probe()
        cpu0 = resource.getrusage(resource.RUSAGE_SELF)
        wall0 = time.monotonic()
        rss0 = _rss_mb()
        peak = rss0
        helper.stdin.write(f"{n} {media_url} {agent_id} {spread}\n")
        helper.stdin.flush()
        reading = loop.run_in_executor(None, helper.stdout.readline)
        while not reading.done():
            peak = max(peak, _rss_mb())
            await asyncio.sleep(0.2)
        results = json.loads(await reading)
        for _ in range(100):  # the last call-over lines follow the callers' stops
            if len(handler.lines) >= n:
                break
            await asyncio.sleep(0.05)
        stop.set()
        await watcher
        baseline = lag_p99_ms(probe)
        cpu1 = resource.getrusage(resource.RUSAGE_SELF)
        wall = time.monotonic() - wall0
        cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
        p50s = [float(d["pacing_p50_ms"]) for d in handler.lines if "pacing_p50_ms" in d]
        p99s = [float(d["pacing_p99_ms"]) for d in handler.lines if "pacing_p99_ms" in d]
        answered = sum(1 for r in results if r["spoke"] and r["audio_s"] > 4.0)
        row = {
            "calls": n,
            "answered": answered,
            "violations": sum(r["violations"] for r in results),
            "wall_s": round(wall, 1),
            "cpu_s": round(cpu, 2),
            "cpu_per_call_pct": round(100 * cpu / wall / n, 2),
            "rss_mb_start": round(rss0, 1),
            "rss_mb_peak": round(peak, 1),
            "rss_per_call_mb": round((peak - rss0) / n, 2),
            "pacing_p50_ms": round(_pct(p50s, 0.5), 2),
            "pacing_p99_ms_worst_call": round(max(p99s), 2) if p99s else None,
            "pacing_p99_ms_median_call": round(_pct(p99s, 0.5), 2),
            "loop_lag_p99_ms": round(_pct(lags, 0.99), 2),
            "idle_process_lag_p99_ms": round(float(baseline), 2),
            "first_audio_ms_median": round(_pct([r["first_audio_ms"] or 0 for r in results], 0.5)),
            "call_over_lines": len(handler.lines),
        }
        rounds.append(row)
        print(json.dumps(row), flush=True)
    helper.stdin.close()
    helper.wait(timeout=30)
    server.should_exit = True
    await serving
    result = {"cpus": os.cpu_count(), "spread_s": spread, "rounds": rounds}
    if out is not None:
        out.write_text(json.dumps(result, indent=1) + "\n")  # noqa: ASYNC240 - after the run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, nargs="+", default=[10, 25, 50])
    parser.add_argument("--json", type=Path)
    parser.add_argument(
        "--spread", type=float, default=4.0, help="seconds over which a round's calls arrive"
    )
    parser.add_argument("--callers", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.callers:
        asyncio.run(callers_main())
    else:
        asyncio.run(server_main(args.calls, args.spread, args.json))


if __name__ == "__main__":
    main()
