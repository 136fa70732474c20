"""Voice-to-voice latency, measured from the audio, per clip and reply shape.

Each clip is played into ``voxloop talk``'s file mode in real time; the stereo
recording (left the user, right the agent, one timeline) is analysed: for
every user turn, the end of the user's speech (last 10 ms block above -40 dBFS
in the left channel, as ``../shared/peers/eos_bench.py`` measures Pipecat)
to the agent's first sound (first block above -40 dBFS in the right channel
after it). The session's own per-turn metrics are reported beside it.

Reply shapes: ``short`` answer, ``long-first`` (a long first sentence with an
early comma), ``list`` and ``numbers``. Against the reference endpoint each
shape is a fixed set of replies; against a real endpoint (``--base-url``) the
shape is asked for in the system prompt (small models follow it loosely; the
first segment actually spoken is in the JSON).

Run (reference endpoint at a known TTFT):
    python -m benchmarks.v2v --runs 5
Run against a real local endpoint (e.g. llama.cpp on core 1; pin voxloop to core 0):
    taskset -c 0 python -m benchmarks.v2v --base-url http://127.0.0.1:8090/v1 --model smollm2 \
        --clip benchmarks/data/user_hello.wav --clip ../shared/peers/user_diane.wav --runs 5
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from audio.resample import resample_all
from audio.wav import read_wav
from runtime.bench.reference_thread import ReferenceThread
from runtime.conversation.config import SessionConfig, TurnDetection
from runtime.conversation.events import AgentTranscriptDelta, ConversationEvent
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
SHAPES: dict[str, tuple[str, ...]] = {
    "short": (
        "Hello! How can I help you today?",
        "It's sunny and mild in Paris today, around eighteen degrees.",
        "Done. I've booked a table for two at seven thirty tonight.",
    ),
    "long-first": (
        "Hello World, welcome to our little corner of the world where everyone is friendly "
        "and the coffee is always hot and fresh. What can I do for you?",
        "The best way to get to the airport from the city centre at this time of the evening "
        "is the express train from the central station. It takes twenty minutes.",
    ),
    "list": (
        "Here are three options: first, the basic plan with five gigabytes of data; second, "
        "the family plan for four lines; third, the unlimited plan.",
        "You will need three things:\n1. Two cups of flour.\n2. One cup of sugar.\n3. Three eggs.",
    ),
    "numbers": (
        "Your total is $1,249.50 for 3 items, due on March 14, 2026 at 7:30 p.m.",
        "The flight leaves at 6:45 a.m. from gate 23 and lands at 10:15, about 3 hours later.",
    ),
}
# Asked of a real endpoint, appended to the system prompt.
SHAPE_PROMPTS: dict[str, str] = {
    "short": "Answer in one short sentence.",
    "long-first": "Begin your answer with one long sentence of at least thirty words.",
    "list": "Answer with a numbered list of three items.",
    "numbers": "Answer with prices, dates, times and quantities written as digits.",
}


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
    clip: Path,
    endpoint: Endpoint,
    stt: WhisperSTT,
    tts: PiperTTS,
    config: SessionConfig,
    leading_reasoning: bool | None = None,
) -> dict[str, Any]:
    audio = read_wav(clip)
    pcm16k = resample_all(audio.mono(), audio.sample_rate, 16000)
    first_segments: dict[str, str] = {}  # reply id -> the first segment spoken

    def on_event(event: ConversationEvent) -> None:
        if isinstance(event, AgentTranscriptDelta):
            first_segments.setdefault(event.reply_id, event.delta)

    async with ChatClient(
        endpoint, policy=URLPolicy.operator(), leading_reasoning=leading_reasoning
    ) as llm:
        result = await talk_pcm(pcm16k, llm=llm, stt=stt, tts=tts, config=config, on_event=on_event)
    return {
        "audio_v2v_ms": audio_v2v_ms(result.user, result.agent, OUTPUT_RATE),
        "turns": [m.to_json() for m in result.metrics],
        "first_segments": list(first_segments.values()),
    }


PARTS = ("v2v_ms", "endpointing_ms", "stt_final_ms", "ttft_ms", "first_sentence_ms",
         "tts_first_audio_ms", "overhead_ms")  # fmt: skip


def summary(values: list[float]) -> dict[str, float]:
    return {
        "p50": statistics.median(values),
        "p90": float(np.percentile(values, 90)),
        "max": max(values),
        "n": float(len(values)),
    }


def config_for(args: argparse.Namespace, shape: str | None) -> SessionConfig:
    base = SessionConfig()
    td = base.turn_detection
    if args.min_silence_ms is not None:
        td = TurnDetection(
            min_silence_ms=args.min_silence_ms,
            max_silence_ms=max(td.max_silence_ms, args.min_silence_ms),
            pause_ms=min(td.pause_ms, args.min_silence_ms),
        )
    prompt = base.system_prompt
    if shape is not None and args.base_url:
        prompt = f"{prompt} {SHAPE_PROMPTS[shape]}"
    speculate = getattr(args, "speculate_ms", None)
    if speculate is not None:
        td = replace(td, speculate_ms=speculate or None)
    return replace(base, turn_detection=td, system_prompt=prompt, warm_prompt=args.warm_prompt)


def group(runs: list[dict[str, Any]]) -> dict[str, Any]:
    audio = [v for r in runs for v in r["audio_v2v_ms"]]
    parts: dict[str, list[float]] = {}
    for r in runs:
        for t in r["turns"]:
            for key in PARTS:
                if t[key] is not None:
                    parts.setdefault(key, []).append(t[key])
    return {
        "audio_v2v_ms": summary(audio) if audio else None,
        "parts": {k: summary(v) for k, v in parts.items()},
    }


async def main_async(
    args: argparse.Namespace, endpoints: dict[str | None, Endpoint]
) -> dict[str, Any]:
    stt = await WhisperSTT.load()
    tts = PiperTTS()
    clips = args.clip or list(CLIPS)
    runs = []
    # Rounds alternate clips and shapes, so machine load affects all alike.
    for _ in range(args.runs):
        for shape, endpoint in endpoints.items():
            for clip in clips:
                result = await run_clip(
                    clip, endpoint, stt, tts, config_for(args, shape),
                    False if args.no_think_template else None,
                )  # fmt: skip
                runs.append({"clip": clip.name, "shape": shape or "as answered", **result})
    await stt.aclose()
    await tts.aclose()
    groups = {
        f"{clip} / {shape}": group([r for r in runs if (r["clip"], r["shape"]) == (clip, shape)])
        for clip, shape in dict.fromkeys((r["clip"], r["shape"]) for r in runs)
    }
    return {"runs": runs, "groups": groups, **group(runs)}


def table(doc: dict[str, Any]) -> str:
    keys = ("endpointing_ms", "stt_final_ms", "ttft_ms", "first_sentence_ms",
            "tts_first_audio_ms", "overhead_ms")  # fmt: skip
    lines = [
        "| clip / reply shape | turns | v2v from the audio p50 (max) | "
        + " | ".join(k.removesuffix("_ms") for k in keys)
        + " |",
        "|---|---|---|" + "---|" * len(keys),
    ]
    for name, g in {**doc["groups"], "all": doc}.items():
        a = g["audio_v2v_ms"]
        if a is None:
            continue
        cells = [f"{g['parts'][k]['p50']:.0f}" if k in g["parts"] else "-" for k in keys]
        lines.append(
            f"| {name} | {int(a['n'])} | **{a['p50']:.0f}** ({a['max']:.0f}) | "
            + " | ".join(cells)
            + " |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="voice-to-voice latency from the audio")
    parser.add_argument("--base-url", help="endpoint (default: the reference endpoint)")
    parser.add_argument("--model", default="default", help="model name sent to the endpoint")
    parser.add_argument("--reference-ttft-ms", type=float, default=200.0)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--clip", type=Path, action="append", help="clip(s) to use instead")
    parser.add_argument(
        "--shape", action="append", choices=sorted(SHAPES),
        help="reply shape(s) (default: all with the reference endpoint, the model's own "
        "answer with --base-url)",
    )  # fmt: skip
    parser.add_argument("--min-silence-ms", type=int, default=None, help="end-of-turn silence")
    parser.add_argument(
        "--speculate-ms", type=int, default=None,
        help="silence before the early speculative decode (TurnDetection.speculate_ms; "
        "default: the default, 0: none)",
    )  # fmt: skip
    parser.add_argument(
        "--no-warm-prompt", dest="warm_prompt", action="store_false",
        help="no warm-up request at session start (warm_prompt, on as in talk and serve)",
    )  # fmt: skip
    parser.add_argument(
        "--no-think-template", action="store_true",
        help="tell the endpoint client the chat template opens no think block, so the first "
        "reply streams at once (ChatClient(leading_reasoning=False))",
    )  # fmt: skip
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/v2v.json"))
    args = parser.parse_args(argv)
    if args.base_url:
        shapes: list[str | None] = list(args.shape or [None])
        endpoints = {shape: Endpoint(args.base_url, args.model) for shape in shapes}
        doc = asyncio.run(main_async(args, endpoints))
        label = f"{args.base_url} ({args.model})"
    else:
        with contextlib.ExitStack() as stack:
            refs = {
                shape: stack.enter_context(
                    ReferenceThread(
                        ReplyPlan(ttft_ms=args.reference_ttft_ms, itl_ms=20.0,
                                  replies=SHAPES[shape])
                    )
                )
                for shape in args.shape or list(SHAPES)
            }  # fmt: skip
            endpoints = {s: Endpoint(ref.base_url, args.model) for s, ref in refs.items()}
            doc = asyncio.run(main_async(args, dict(endpoints)))
        label = f"reference endpoint (TTFT {args.reference_ttft_ms:g} ms, ITL 20 ms)"
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"{label}: {args.runs} runs of {len(args.clip or CLIPS)} clips\n")
    print(table(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
