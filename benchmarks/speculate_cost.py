"""The CPU an early speculative decode costs: process CPU time per conversation, side by side.

Each run is one conversation of a recording (default: ``tests/data/speech/conv-two_turns.wav``,
two user turns, and ``benchmarks/data/user_hello.wav``) through the real session with Whisper
and Piper in this process, in real time, against the reference endpoint (in this process too;
100 ms to the first token, a short reply). The variants alternate run by run: ``speculate_ms`` 40
and the early decode off (or the values given). Reported per variant: the
process CPU time per conversation (user + system, ms; median), the Whisper decodes per
conversation and the early decodes among them, and the voice-to-voice time heard in the
recording (median).

Run:
    python -m benchmarks.speculate_cost --runs 4
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import resource
import statistics
import sys
from pathlib import Path
from typing import Any

from audio.resample import resample_all
from audio.wav import read_wav
from benchmarks.v2v import audio_v2v_ms
from runtime.conversation.config import SPECULATE_MS, SessionConfig
from runtime.endpoints import URLPolicy
from runtime.llm.client import ChatClient, Endpoint
from runtime.llm.reference import ReferenceEndpoint, ReplyPlan
from runtime.speech.engines.piper import PiperTTS
from runtime.speech.engines.whisper import WhisperSTT, WhisperTurn
from runtime.talk import OUTPUT_RATE, talk_pcm

ROOT = Path(__file__).resolve().parent.parent
CLIPS = [ROOT / "tests/data/speech/conv-two_turns.wav", ROOT / "benchmarks/data/user_hello.wav"]


def cpu_ms() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return (usage.ru_utime + usage.ru_stime) * 1000


class Counting:
    """Counts the decodes Whisper runs, and the early ones."""

    def __init__(self, engine: WhisperSTT) -> None:
        self.engine = engine
        self.decodes = 0
        self.early = 0
        decode = engine.decode_confident
        speculate = WhisperTurn.speculate

        def counted(pcm: bytes, previous_text: str = "") -> Any:
            self.decodes += 1
            return decode(pcm, previous_text)

        def counted_early(turn: WhisperTurn, within_ms: float) -> bool:
            started = speculate(turn, within_ms)
            self.early += started
            return started

        engine.decode_confident = counted  # type: ignore[method-assign]
        WhisperTurn.speculate = counted_early  # type: ignore[method-assign, assignment]


async def amain(args: argparse.Namespace) -> dict[str, Any]:
    whisper = await WhisperSTT.load()
    counting = Counting(whisper)
    piper = PiperTTS()
    clips = [(c.name, read_wav(c)) for c in args.clip or CLIPS]
    pcms = [(name, resample_all(a.mono(), a.sample_rate, 16000)) for name, a in clips]
    values = args.speculate_ms or [SPECULATE_MS or 40, 0]
    rows: dict[str, dict[str, list[float]]] = {
        str(v): {"cpu_ms": [], "decodes": [], "early": [], "v2v_ms": []} for v in values
    }
    plan = ReplyPlan(ttft_ms=100, itl_ms=10, replies=("Sure, I can help with that.",) * 1000)
    async with ReferenceEndpoint(plan) as server:
        endpoint = Endpoint(server.base_url, "default")
        for _ in range(args.runs):
            for value in values:
                base = SessionConfig()
                td = dataclasses.replace(base.turn_detection, speculate_ms=value or None)
                config = dataclasses.replace(base, turn_detection=td)
                for _name, pcm in pcms:
                    counting.decodes = counting.early = 0
                    before = cpu_ms()
                    async with ChatClient(endpoint, policy=URLPolicy.operator()) as llm:
                        result = await talk_pcm(pcm, llm=llm, stt=whisper, tts=piper,
                                                config=config)  # fmt: skip
                    row = rows[str(value)]
                    row["cpu_ms"].append(cpu_ms() - before)
                    row["decodes"].append(counting.decodes)
                    row["early"].append(counting.early)
                    row["v2v_ms"] += audio_v2v_ms(result.user, result.agent, OUTPUT_RATE)
    await whisper.aclose()
    await piper.aclose()
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=4, help="conversations per clip and variant")
    parser.add_argument("--clip", type=Path, action="append", help="recordings to use instead")
    parser.add_argument(
        "--speculate-ms", type=int, action="append",
        help="variants (0: no early decode; default: 40 and 0)",
    )  # fmt: skip
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    rows = asyncio.run(amain(args))
    print("| speculate_ms | CPU per conversation (ms, median) | decodes per conversation |"
          " early decodes | v2v p50 (ms) |")  # fmt: skip
    print("|---|---|---|---|---|")
    for value, row in rows.items():
        n = len(row["cpu_ms"])
        print(
            f"| {value if value != '0' else 'off'} | {statistics.median(row['cpu_ms']):.0f} | "
            f"{sum(row['decodes']) / n:.1f} | {sum(row['early']) / n:.1f} | "
            f"{statistics.median(row['v2v_ms']):.0f} |"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
