"""Voice-to-voice latency, measured from the audio.

Each clip is played into ``voxloop talk``'s file mode in real time; the stereo
recording (left the user, right the agent, one timeline) is analysed: for
every user turn, the end of the user's speech (last 10 ms block above -40 dBFS
in the left channel, as ``../shared/peers/eos_bench.py`` measures Pipecat)
to the agent's first sound (first block above -40 dBFS in the right channel
after it). The session's own per-turn metrics are reported beside it.

Run (reference endpoint at a known TTFT):
    python -m benchmarks.v2v --runs 5
Run against a real local endpoint (e.g. llama.cpp on core 1; pin voxloop to core 0):
    taskset -c 0 python -m benchmarks.v2v --base-url http://127.0.0.1:8090/v1 --runs 5
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
from pathlib import Path
from typing import Any

import numpy as np

from audio.resample import resample_all
from audio.wav import read_wav
from runtime.bench.reference_thread import ReferenceThread
from runtime.conversation.config import SessionConfig, TurnDetection
from runtime.endpoints import URLPolicy
from runtime.llm.client import ChatClient, Endpoint
from runtime.llm.reference import ReplyPlan
from runtime.speech.engines.piper import PiperTTS
from runtime.speech.engines.whisper import WhisperSTT
from runtime.talk import OUTPUT_RATE, talk_pcm

ROOT = Path(__file__).resolve().parent.parent
CLIPS = (
    ROOT / "benchmarks" / "data" / "user_hello.wav",
    ROOT / "tests" / "data" / "speech" / "conv-two_turns.wav",
)
REPLIES = (
    "Hello! How can I help you today?",
    "It's sunny and mild in Paris today, around eighteen degrees.",
    "Done. I've booked a table for two at seven thirty tonight.",
)


def _db(pcm: bytes, rate: int) -> np.ndarray:
    x = np.frombuffer(pcm, dtype="<i2").astype(np.float64) / 32768.0
    win = rate // 100
    n = len(x) // win
    rms = np.sqrt(np.mean(x[: n * win].reshape(n, win) ** 2, axis=1))
    db: np.ndarray = 20 * np.log10(rms + 1e-9)
    return db


def audio_v2v_ms(user: bytes, agent: bytes, rate: int, threshold_db: float = -40.0) -> list[float]:
    """End of each user utterance -> first agent sound after it, from the recording."""
    u, a = _db(user, rate) > threshold_db, _db(agent, rate) > threshold_db
    # User utterances: runs of loud blocks, merging gaps shorter than 600 ms.
    ends: list[int] = []
    last = None
    for i in (int(v) for v in np.nonzero(u)[0]):
        if last is not None and i - last > 60:
            ends.append(last)
        last = i
    if last is not None:
        ends.append(last)
    out = []
    for end in ends:
        after = np.nonzero(a[end + 1 :])[0]
        if after.size:
            out.append(float((after[0] + 1) * 10))
    return out


async def run_clip(
    clip: Path, base_url: str, stt: WhisperSTT, tts: PiperTTS, config: SessionConfig
) -> dict[str, Any]:
    audio = read_wav(clip)
    pcm16k = resample_all(audio.mono(), audio.sample_rate, 16000)
    async with ChatClient(Endpoint(base_url, "default"), policy=URLPolicy.operator()) as llm:
        result = await talk_pcm(pcm16k, llm=llm, stt=stt, tts=tts, config=config)
    return {
        "audio_v2v_ms": audio_v2v_ms(result.user, result.agent, OUTPUT_RATE),
        "turns": [m.to_json() for m in result.metrics],
    }


def summary(values: list[float]) -> dict[str, float]:
    return {
        "p50": statistics.median(values),
        "p90": float(np.percentile(values, 90)),
        "n": float(len(values)),
    }


async def main_async(args: argparse.Namespace, base_url: str) -> dict[str, Any]:
    stt = await WhisperSTT.load()
    tts = PiperTTS()
    clips = args.clip or list(CLIPS)
    config = SessionConfig()
    if args.min_silence_ms is not None:
        td = config.turn_detection
        config = SessionConfig(
            turn_detection=TurnDetection(
                min_silence_ms=args.min_silence_ms,
                max_silence_ms=max(td.max_silence_ms, args.min_silence_ms),
                pause_ms=min(td.pause_ms, args.min_silence_ms),
            )
        )
    runs = [
        {"clip": clip.name, **await run_clip(clip, base_url, stt, tts, config)}
        for _ in range(args.runs)
        for clip in clips
    ]
    await stt.aclose()
    await tts.aclose()
    audio = [v for r in runs for v in r["audio_v2v_ms"]]
    parts: dict[str, list[float]] = {}
    for r in runs:
        for t in r["turns"]:
            for key in ("v2v_ms", "endpointing_ms", "stt_final_ms", "ttft_ms",
                        "first_sentence_ms", "tts_first_audio_ms", "overhead_ms"):  # fmt: skip
                if t[key] is not None:
                    parts.setdefault(key, []).append(t[key])
    return {
        "runs": runs,
        "audio_v2v_ms": summary(audio),
        "parts": {k: summary(v) for k, v in parts.items()},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="voice-to-voice latency from the audio")
    parser.add_argument("--base-url", help="endpoint (default: the reference endpoint)")
    parser.add_argument("--reference-ttft-ms", type=float, default=200.0)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--clip", type=Path, action="append", help="clip(s) to use instead")
    parser.add_argument("--min-silence-ms", type=int, default=None, help="end-of-turn silence")
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/v2v.json"))
    args = parser.parse_args(argv)
    if args.base_url:
        doc = asyncio.run(main_async(args, args.base_url))
        label = args.base_url
    else:
        plan = ReplyPlan(ttft_ms=args.reference_ttft_ms, itl_ms=20.0, replies=REPLIES)
        with ReferenceThread(plan) as ref:
            doc = asyncio.run(main_async(args, ref.base_url))
        label = f"reference endpoint (TTFT {args.reference_ttft_ms:g} ms, ITL 20 ms)"
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(doc, indent=2) + "\n")
    a = doc["audio_v2v_ms"]
    print(
        f"{label}: {int(a['n'])} turns over {args.runs} runs of {len(args.clip or CLIPS)} clips\n"
    )
    print("| measure | p50 (ms) | p90 (ms) |")
    print("|---|---|---|")
    print(f"| **v2v from the audio** (end of user speech → first agent sound) | "
          f"**{a['p50']:.0f}** | {a['p90']:.0f} |")  # fmt: skip
    for key, s in doc["parts"].items():
        print(f"| {key} (self-reported) | {s['p50']:.1f} | {s['p90']:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
