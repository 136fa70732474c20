"""End of the caller's speech → first agent audio at the caller, over a simulated Twilio call.

The caller is streamdouble (Twilio Media Streams with real-time pacing and mark
echoes) streaming a clip (``benchmarks/data/user_hello.wav`` by default: 1 s of
silence, "Hello world!", silence; 8 kHz). streamdouble reports the time to the
first agent audio from the start of the stream; the end of speech in the clip
(the last 10 ms window above -40 dBFS) is subtracted.

voxloop runs as ``voxloop serve`` (a subprocess, embedded engines: Whisper and
Piper) with a stored agent without a greeting, pointing at ``--llm-base-url``.
With ``--peer ws://…/media-stream`` the same caller also calls another Twilio
bot (e.g. Pipecat's, ``../shared/peers/pipecat_twilio_bot.py``), in alternating
rounds, and the medians and their ratio are printed side by side.

Run: ``python -m benchmarks.phone_eos --llm-base-url http://127.0.0.1:8080/v1
--llm-model smollm2 [--peer ws://127.0.0.1:8765/media-stream] [--rounds 3 --runs 5]``
(without ``--llm-base-url`` the reference endpoint answers, 100 ms to its first token).
Pin for fair numbers: ``--pin 0`` runs ``voxloop serve`` on CPU 0 (the LLM on another).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import types
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from audio.wav import read_wav

CLIP = Path(__file__).resolve().parent / "data" / "user_hello.wav"
TOKEN = "bench-twilio-token"
KEY = "bench-key"
PROMPT = "You are a helpful phone assistant. Answer in one short sentence."


def speech_end_ms(path: Path) -> int:
    """The end of the last 10 ms window above -40 dBFS (as ``eos_bench.py`` computes it)."""
    wav = read_wav(path)
    x = np.frombuffer(wav.mono(), "<i2").astype(np.float32) / 32768
    win = wav.sample_rate // 100
    k = len(x) // win
    db = 20 * np.log10(np.sqrt((x[: k * win].reshape(k, win) ** 2).mean(1)) + 1e-9)
    return int((np.where(db > -40)[0][-1] + 1) * 10)


def _sign_streamdouble() -> None:
    import streamdouble.session as sd_session
    import websockets
    from twilio.request_validator import RequestValidator

    class Signed(types.ModuleType):
        def __getattr__(self, name: str) -> Any:
            return getattr(websockets, name)

        @staticmethod
        def connect(url: str, **kwargs: Any) -> Any:
            headers = {"X-Twilio-Signature": RequestValidator(TOKEN).compute_signature(url, {})}
            return websockets.connect(url, additional_headers=headers, **kwargs)

    sd_session.websockets = Signed("websockets")


async def one_call(url: str, clip: Path, params: dict[str, str]) -> float | None:
    from streamdouble.api import call
    from streamdouble.session import SessionConfig

    config = SessionConfig(custom_parameters=params, response_timeout_s=25, quiet_period_s=1.5)
    report = await call(url, audio_path=clip, config=config)
    ttfa: float | None = report.time_to_first_audio_ms
    return ttfa


def start_voxloop(data: Path, pin: str | None) -> tuple[subprocess.Popen[str], str]:
    cmd = [sys.executable, "-m", "runtime.cli", "serve", "--port", "0", "--no-access-log",
           "--data-dir", str(data)]  # fmt: skip
    if pin is not None:
        cmd = ["taskset", "-c", pin, *cmd]
    env = {**os.environ, "VOXLOOP_API_KEYS": KEY, "VOXLOOP_TWILIO_AUTH_TOKEN": TOKEN,
           "VOXLOOP_ALLOW_PRIVATE_ENDPOINTS": "127.0.0.1", "OMP_NUM_THREADS": "1"}  # fmt: skip
    log = (data.parent / "serve.log").open("w")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True, env=env)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith("voxloop serve listening on "):
        raise SystemExit(f"voxloop serve did not start: see {data.parent / 'serve.log'}")
    return proc, line.rsplit(" ", 1)[1].strip()


def _turn_parts(log: Path) -> dict[str, float]:
    """Medians of the server's ``turn metrics`` lines (where voxloop's time went)."""
    rows = [json.loads(x) for x in log.read_text().splitlines() if '"turn metrics"' in x]
    keys = ("endpointing_ms", "stt_final_ms", "ttft_ms", "tts_first_audio_ms", "v2v_ms")
    return {
        k: round(statistics.median(r[k] for r in rows if k in r))
        for k in keys
        if any(k in r for r in rows)
    }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--llm-base-url")
    parser.add_argument("--llm-model", default="smollm2")
    parser.add_argument("--clip", type=Path, default=CLIP)
    parser.add_argument("--peer", help="another Twilio bot's media-stream URL (alternating rounds)")
    parser.add_argument("--peer-name", default="pipecat")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--runs", type=int, default=5, help="calls per system per round")
    parser.add_argument("--pin", help="CPU list for voxloop serve (taskset -c)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    _sign_streamdouble()
    end_ms = speech_end_ms(args.clip)
    tmp = Path(tempfile.mkdtemp(prefix="phone-eos-"))
    reference = None
    base_url = args.llm_base_url
    if base_url is None:
        from runtime.bench.reference_thread import ReferenceThread
        from runtime.llm.reference import ReplyPlan

        reference = ReferenceThread(ReplyPlan(replies=("Hello! How can I help?",), ttft_ms=100,
                                              itl_ms=10))  # fmt: skip
        reference.__enter__()
        base_url = reference.base_url
    proc, http = start_voxloop(tmp / "data", args.pin)
    try:
        async with httpx.AsyncClient(base_url=http, headers={"Authorization": KEY}) as rest:
            r = await rest.post("/v1/agents", json={
                "name": "EOS", "system_prompt": PROMPT, "voice": {"voice_id": "joe"},
                "llm": [{"base_url": base_url, "model": args.llm_model, "api_key": "none"}],
            })  # fmt: skip
            r.raise_for_status()
            agent = r.json()["id"]
        systems = {"voxloop": ("ws" + http[4:] + "/twilio/media", {"agent_id": agent})}
        if args.peer:
            systems[args.peer_name] = (args.peer, {})
        # One warm-up call each (models load on the first call), not counted.
        for url, params in systems.values():
            await one_call(url, args.clip, params)
        values: dict[str, list[float]] = {name: [] for name in systems}
        for rnd in range(args.rounds):
            for name, (url, params) in systems.items():
                got = []
                for _ in range(args.runs):
                    ttfa = await one_call(url, args.clip, params)
                    if ttfa is not None:
                        got.append(ttfa - end_ms)
                values[name] += got
                shown = [round(v) for v in got]
                median = f"median {statistics.median(got):.0f}" if got else "no audio"
                print(f"round {rnd + 1} {name:8} EOS->first audio ms {shown} {median}")
        summary = {n: round(statistics.median(v)) for n, v in values.items() if v}
        print("medians (ms):", summary)
        if args.peer and len(summary) == 2:
            print(
                f"voxloop / {args.peer_name} = {summary['voxloop'] / summary[args.peer_name]:.2f}"
            )
        parts = _turn_parts(tmp / "serve.log")
        print("voxloop's own turn metrics, medians (ms):", parts)
        if args.json:
            doc = {"speech_end_ms": end_ms, "values": values, "medians": summary,
                   "voxloop_turn_metrics": parts}  # fmt: skip
            args.json.write_text(json.dumps(doc, indent=1) + "\n")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        if reference is not None:
            reference.__exit__(None, None, None)


if __name__ == "__main__":
    asyncio.run(main())
