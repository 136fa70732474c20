"""Voice to voice over the realtime WebSocket, next to ``voxloop talk`` in-process.

The same clips, in the same run, in alternating rounds:

* **talk**: :func:`runtime.talk.talk_pcm` in this process (the conversation
  core with Whisper and Piper, no socket);
* **ws**: :func:`runtime.client.runner.connect_pcm` — the ``voxloop connect``
  client — streaming to a ``voxloop serve`` subprocess over ``/v1/ws`` (the
  same core, engines and settings behind the socket), 50 ms chunks of 24 kHz
  PCM in real time, the reply played on a virtual real-time speaker.

Both answer from one reference endpoint (a known TTFT) in a thread of this
process. Each run's stereo recording is measured the same way (end of the
user's speech → the agent's first sound, -40 dBFS in 10 ms blocks, as
:mod:`benchmarks.v2v`), and the self-reported numbers are given beside it:
``talk``'s session ``v2v_ms`` and the client's ``v2v_ms`` (end of the voice
it sent → first ``reply.audio`` received). The difference of the medians is
what the socket path adds.

``--transport N`` measures the socket path alone, free of the speech stack:
N round trips of a 50 ms ``input.audio`` chunk to a loopback peer (its own
thread and event loop, the real ``websockets`` and the real codec on both
sides) answered by a 40 ms ``reply.audio`` piece; half the round trip is what
one hop of the socket path costs.

Run:
    nice -n 10 python -m benchmarks.ws_v2v --rounds 3
    python -m benchmarks.ws_v2v --transport 2000
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
from pathlib import Path
from typing import Any

from audio.resample import resample_all
from audio.wav import read_wav
from benchmarks.v2v import CLIPS, SHAPES, audio_v2v_ms
from runtime.bench.reference_thread import ReferenceThread
from runtime.client.connection import Auth
from runtime.client.protocol import SessionFailure
from runtime.client.runner import RATE, connect_pcm
from runtime.conversation.config import SessionConfig
from runtime.endpoints import URLPolicy
from runtime.llm.client import ChatClient, Endpoint
from runtime.llm.reference import ReplyPlan
from runtime.protocol.events import SessionPatch
from runtime.secret import Secret
from runtime.speech.engines.piper import PiperTTS
from runtime.speech.engines.whisper import WhisperSTT
from runtime.talk import OUTPUT_RATE, talk_pcm

API_KEY = "vk-bench-ws"
REPLIES = SHAPES["short"]
INLINE = SessionPatch(keys=frozenset({"system_prompt"}), system_prompt="You are brief.")


def start_server(data_dir: Path, llm_base_url: str) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "runtime.cli", "serve", "--port", "0", "--data-dir", str(data_dir)],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        env={**os.environ, "VOXLOOP_API_KEYS": API_KEY,
             "VOXLOOP_ALLOW_PRIVATE_ENDPOINTS": "127.0.0.1",
             "VOXLOOP_LLM_BASE_URL": llm_base_url, "VOXLOOP_LLM_MODEL": "default"},
    )  # fmt: skip
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith("voxloop serve listening on "):
        proc.kill()
        raise SystemExit(f"voxloop serve did not start: {line!r}")
    http = line.rsplit(" ", 1)[1].strip()
    return proc, "ws" + http[4:] + "/v1/ws"


async def run_talk(clip: Path, base_url: str, stt: WhisperSTT, tts: PiperTTS) -> dict[str, Any]:
    audio = read_wav(clip)
    pcm16k = resample_all(audio.mono(), audio.sample_rate, 16000)
    async with ChatClient(Endpoint(base_url, "default"), policy=URLPolicy.operator()) as llm:
        result = await talk_pcm(
            pcm16k, llm=llm, stt=stt, tts=tts, config=SessionConfig(warm_prompt=True)
        )
    return {
        "audio_v2v_ms": audio_v2v_ms(result.user, result.agent, OUTPUT_RATE),
        "v2v_ms": [m.v2v_ms for m in result.metrics if m.v2v_ms is not None],
    }


async def run_ws(clip: Path, url: str) -> dict[str, Any]:
    audio = read_wav(clip)
    pcm = resample_all(audio.mono(), audio.sample_rate, RATE)
    result = await connect_pcm(pcm, url=url, auth=Auth(api_key=Secret(API_KEY)), session=INLINE)
    return {
        "audio_v2v_ms": audio_v2v_ms(result.user, result.agent, RATE),
        "v2v_ms": [m.v2v_ms for m in result.metrics if m.v2v_ms is not None],
    }


async def main_async(args: argparse.Namespace, base_url: str, url: str) -> dict[str, Any]:
    stt = await WhisperSTT.load()
    tts = PiperTTS()
    clips = args.clip or list(CLIPS)
    # One warm-up of each path (model loading, first connections), not counted.
    await run_talk(clips[0], base_url, stt, tts)
    for attempt in range(3):
        try:
            await run_ws(clips[0], url)
            break
        except SessionFailure as exc:
            # The server loads its speech engines with the first session; on a busy
            # machine that can outlast the wait for the first message.
            print(f"warm-up: {exc.message} ({exc.code}); again", file=sys.stderr)
            if attempt == 2:
                raise
    rounds: list[dict[str, Any]] = []
    for r in range(args.rounds):
        order = ("talk", "ws") if r % 2 == 0 else ("ws", "talk")
        doc: dict[str, Any] = {"talk": [], "ws": []}
        for clip in clips:
            for path in order:
                run = await (run_talk(clip, base_url, stt, tts) if path == "talk"
                             else run_ws(clip, url))  # fmt: skip
                doc[path].append({"clip": clip.name, **run})
        rounds.append(doc)
        print(f"round {r + 1}: " + ", ".join(
            f"{p} {_median(doc[p], 'audio_v2v_ms'):.0f} ms" for p in ("talk", "ws")
        ), file=sys.stderr)  # fmt: skip
    await stt.aclose()
    await tts.aclose()
    return {"rounds": rounds}


def _values(runs: list[dict[str, Any]], key: str) -> list[float]:
    return [float(v) for run in runs for v in run[key]]


def _median(runs: list[dict[str, Any]], key: str) -> float:
    values = _values(runs, key)
    return statistics.median(values) if values else float("nan")


def transport(n: int) -> list[float]:
    """Round trips (ms) of input.audio → reply.audio through a loopback WebSocket peer."""
    import threading
    import time

    from websockets.asyncio.client import connect
    from websockets.asyncio.server import ServerConnection, serve

    from runtime.protocol import events as ev

    piece = ev.encode(ev.ReplyAudio(data=bytes(1920), reply_id="reply_1"))  # 40 ms at 24 kHz
    started = threading.Event()
    port: list[int] = []

    async def peer(ws: ServerConnection) -> None:
        async for text in ws:
            event = ev.decode_client_event(text)
            assert isinstance(event, ev.InputAudio)
            await ws.send(piece)

    async def server_main() -> None:
        async with serve(peer, "127.0.0.1", 0, compression=None) as server:
            port.append(server.sockets[0].getsockname()[1])
            started.set()
            await asyncio.get_running_loop().create_future()

    thread = threading.Thread(target=lambda: asyncio.run(server_main()), daemon=True)
    thread.start()
    started.wait(10)

    async def client_main() -> list[float]:
        out: list[float] = []
        chunk = ev.InputAudio(audio=bytes(2400))  # 50 ms at 24 kHz
        async with connect(f"ws://127.0.0.1:{port[0]}", compression=None, proxy=None) as ws:
            for _ in range(n):
                t = time.perf_counter()
                await ws.send(ev.encode(chunk))
                reply = ev.decode_server_event(await ws.recv())
                assert isinstance(reply, ev.ReplyAudio)
                out.append((time.perf_counter() - t) * 1000)
        return out

    return asyncio.run(client_main())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="voice to voice: WebSocket vs in-process")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--reference-ttft-ms", type=float, default=200.0)
    parser.add_argument("--clip", type=Path, action="append", help="clip(s) to use instead")
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/ws_v2v.json"))
    parser.add_argument("--transport", type=int, metavar="N", help="only the socket path, N times")
    args = parser.parse_args(argv)
    if args.transport:
        import numpy as np

        rtts = transport(args.transport)
        p50, p90, p99 = (float(np.percentile(rtts, q)) for q in (50, 90, 99))
        print(f"input.audio (50 ms) -> reply.audio (40 ms) round trip over loopback, "
              f"{len(rtts)} times: p50 {p50:.2f} ms, p90 {p90:.2f} ms, "
              f"p99 {p99:.2f} ms")  # fmt: skip
        return 0
    plan = ReplyPlan(ttft_ms=args.reference_ttft_ms, itl_ms=20.0, replies=REPLIES)
    with ReferenceThread(plan) as ref, tempfile.TemporaryDirectory() as tmp:
        proc, url = start_server(Path(tmp) / "data", ref.base_url)
        try:
            doc = asyncio.run(main_async(args, ref.base_url, url))
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)
            if proc.stdout is not None:
                proc.stdout.close()
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"reference endpoint (TTFT {args.reference_ttft_ms:g} ms), "
          f"{len(args.clip or CLIPS)} clips, {args.rounds} rounds\n")  # fmt: skip
    print("| round | talk (in-process) | ws (voxloop connect → serve) | ws - talk |")
    print("|---|---|---|---|")
    all_talk: list[dict[str, Any]] = []
    all_ws: list[dict[str, Any]] = []
    for i, r in enumerate(doc["rounds"], 1):
        t, w = _median(r["talk"], "audio_v2v_ms"), _median(r["ws"], "audio_v2v_ms")
        print(f"| {i} | {t:.0f} ms | {w:.0f} ms | {w - t:+.0f} ms |")
        all_talk += r["talk"]
        all_ws += r["ws"]
    t, w = _median(all_talk, "audio_v2v_ms"), _median(all_ws, "audio_v2v_ms")
    n = len(_values(all_ws, "audio_v2v_ms"))
    print(
        f"| all {n} turns, from the audio | **{t:.0f} ms** | **{w:.0f} ms** | **{w - t:+.0f} ms** |"
    )
    ts, ws = _median(all_talk, "v2v_ms"), _median(all_ws, "v2v_ms")
    print(f"| self-reported `v2v_ms` | {ts:.0f} ms | {ws:.0f} ms | {ws - ts:+.0f} ms |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
