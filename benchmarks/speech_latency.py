"""Embedded speech engines: STT finalisation latency, TTS first audio and RTF, loop stalls.

``stt_final_ms`` is the time from the end of the user's turn (the end-of-turn
silence has elapsed) to the final transcript, over the 12 test utterances
(1.5-3.7 s) fed as 20 ms frames:

* ``naive``: faster-whisper's ``transcribe`` on the whole turn at end of turn (30 s window);
* ``short window``: voxloop's decoder at end of turn, no pause hint;
* ``pause trick``: ``pause()`` when the speech stopped, ``finalize()`` after the
  end-of-turn silence (``--silence-ms``), as the conversation core does.

TTS: time to the first audio chunk and real-time factor (synthesis time /
audio duration) for Piper and espeak-ng on the same sentences, at 24 kHz.

Loop stall: the longest time the event loop was blocked (a 5 ms ticker's
worst lateness) while STT and TTS ran back to back.

Run: ``python -m benchmarks.speech_latency [--runs 3 --silence-ms 300]``
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from audio.reframe import Reframer
from audio.wav import read_wav
from runtime.speech.engines.espeak import EspeakTTS
from runtime.speech.engines.piper import PiperTTS
from runtime.speech.engines.whisper import WhisperConfig, WhisperSTT
from runtime.speech.tts import TextToSpeech

DATA = Path(__file__).resolve().parent.parent / "tests" / "data" / "speech"


def utterances() -> list[tuple[str, bytes]]:
    items = [json.loads(line) for line in (DATA / "manifest.jsonl").read_text().splitlines()]
    return [(item["text"], read_wav(DATA / item["file"]).mono()) for item in items]


async def stt_final_ms(stt: WhisperSTT, pcm: bytes, *, pause: bool, silence_ms: int) -> float:
    turn = stt.start_turn()
    for frame in Reframer(16000, 20).process(pcm):
        turn.push(frame)
    if pause:
        turn.pause()
    await asyncio.sleep(silence_ms / 1000)  # the end-of-turn silence, in real time
    t0 = time.perf_counter()
    await turn.finalize()
    return (time.perf_counter() - t0) * 1000


def naive_ms(stt: WhisperSTT, pcm: bytes) -> float:
    audio = np.frombuffer(pcm, dtype="<i2").astype(np.float32) / 32768.0
    t0 = time.perf_counter()
    segments, _ = stt._model.transcribe(audio, language="en", beam_size=1, without_timestamps=True)
    " ".join(s.text for s in segments)
    return (time.perf_counter() - t0) * 1000


async def tts_numbers(tts: TextToSpeech, texts: list[str]) -> tuple[float, float]:
    firsts, rtfs = [], []
    for text in texts:
        t0 = time.perf_counter()
        first = None
        audio_ms = 0.0
        async for chunk in tts.synthesize(text, sample_rate=24000):
            if first is None:
                first = (time.perf_counter() - t0) * 1000
            audio_ms += chunk.duration_ms
        elapsed = (time.perf_counter() - t0) * 1000
        firsts.append(first or 0.0)
        rtfs.append(elapsed / audio_ms)
    return statistics.median(firsts), statistics.median(rtfs)


async def loop_stall_ms(work: asyncio.Future[object]) -> float:
    worst = 0.0
    while not work.done():
        t0 = time.perf_counter()
        await asyncio.sleep(0.005)
        worst = max(worst, (time.perf_counter() - t0) * 1000 - 5)
    await work
    return worst


async def main_async(args: argparse.Namespace) -> dict[str, object]:
    stt = await WhisperSTT.load()
    stt30 = await WhisperSTT.load(config=WhisperConfig(short_window=False))
    piper, espeak = PiperTTS(), EspeakTTS()
    items = utterances()
    texts = [t for t, _ in items]
    results: dict[str, list[float]] = {"naive": [], "short_window": [], "pause_trick": []}
    for _ in range(args.runs):
        for _, pcm in items:
            results["naive"].append(naive_ms(stt, pcm))
            results["short_window"].append(
                await stt_final_ms(stt, pcm, pause=False, silence_ms=args.silence_ms)
            )
            results["pause_trick"].append(
                await stt_final_ms(stt, pcm, pause=True, silence_ms=args.silence_ms)
            )
    piper_first, piper_rtf = await tts_numbers(piper, texts)
    espeak_first, espeak_rtf = await tts_numbers(espeak, texts)

    async def everything() -> None:
        for text, pcm in items[:6]:
            await stt.transcribe(pcm, 16000)
            async for _ in piper.synthesize(text, sample_rate=24000):
                pass

    stall = await loop_stall_ms(asyncio.ensure_future(everything()))
    for engine in (stt, stt30, piper, espeak):
        await engine.aclose()
    summary: dict[str, object] = {
        "stt_final_ms": {
            k: {"p50": statistics.median(v), "p90": float(np.percentile(v, 90))}
            for k, v in results.items()
        },
        "tts": {
            "piper": {"first_audio_ms_p50": piper_first, "rtf_p50": piper_rtf},
            "espeak": {"first_audio_ms_p50": espeak_first, "rtf_p50": espeak_rtf},
        },
        "loop_stall_ms_max": stall,
        "silence_ms": args.silence_ms,
    }
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="embedded speech engine latency")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--silence-ms", type=int, default=300)
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/speech_latency.json"))
    args = parser.parse_args(argv)
    summary = asyncio.run(main_async(args))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(summary, indent=2) + "\n")
    stt = summary["stt_final_ms"]
    tts = summary["tts"]
    assert isinstance(stt, dict)
    assert isinstance(tts, dict)
    print(f"stt_final_ms over 12 utterances x {args.runs} runs, silence {args.silence_ms} ms\n")
    print("| STT at end of turn | stt_final_ms p50 | p90 |")
    print("|---|---|---|")
    for name, label in (
        ("naive", "faster-whisper transcribe (30 s window)"),
        ("short_window", "voxloop short window, no pause hint"),
        ("pause_trick", "voxloop with the pause trick"),
    ):
        print(f"| {label} | {stt[name]['p50']:.1f} | {stt[name]['p90']:.1f} |")
    print("\n| TTS | first audio p50 (ms) | RTF p50 |")
    print("|---|---|---|")
    for name in ("piper", "espeak"):
        print(f"| {name} | {tts[name]['first_audio_ms_p50']:.1f} | {tts[name]['rtf_p50']:.3f} |")
    print(
        f"\nlongest event-loop stall while STT and TTS ran: {summary['loop_stall_ms_max']:.2f} ms"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
