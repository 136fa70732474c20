"""The first-segment policy: how soon speech can start, and what it costs in naturalness.

For every reply shape (short answer, long first sentence, list, number-heavy)
and every candidate policy, each reply is streamed through
:class:`SpeechSegmenter` as ~4-character tokens at a fixed inter-token
latency (``--itl-ms``), with times, as the conversation core does. Measured:

* ``seg_ms``: first token → first segment released;
* ``first_words``: words in the first segment;
* ``synth_ms``: Piper's time to the first audio of that segment (median of
  ``--runs``; pin to one core for stable numbers);
* ``audio_ms``: ``seg_ms + synth_ms``, first token → first audio;
* ``gaps_ms``: silence inside the reply when each segment is synthesized once
  released and after the previous one, and played after the previous one;
* ``wer``: TTS → STT round trip of the whole reply as the segments are spoken
  (Piper without sampling noise, so only the segmentation differs; Whisper
  tiny.en; Whisper's English normaliser), against the reply text.

Run: ``taskset -c 0 python -m benchmarks.first_segment [--itl-ms 20 --runs 3]``
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import jiwer
from whisper_normalizer.english import EnglishTextNormalizer

from runtime.speech.engines.piper import PiperTTS
from runtime.speech.engines.whisper import WhisperSTT
from runtime.speech.text import SegmenterConfig, SpeechSegmenter

SHAPES: dict[str, tuple[str, ...]] = {
    "short answer": (
        "Sure. Your order shipped this morning and should arrive on Thursday.",
        "Yes, the pharmacy is open until nine tonight. Anything else?",
        "Hello! How can I help you today?",
    ),
    "long first sentence": (
        "Hello World, welcome to our little corner of the world where everyone is friendly and "
        "the coffee is always hot. What can I do for you?",
        "The best way to get to the airport from the city centre at this time of the evening "
        "is the express train from the central station. It takes about twenty minutes.",
        "I checked the availability for the weekend you mentioned and it looks like there are "
        "still a few rooms left with a view of the lake. Shall I book one?",
    ),
    "list": (
        "Here are three options. First, the basic plan with five gigabytes of data. Second, "
        "the family plan for four lines. Third, the unlimited plan with international calls.",
        "You will need three things for the recipe: two cups of flour, one cup of sugar and "
        "three eggs. Mix them well and bake for thirty minutes.",
    ),
    "short first clause": (
        "Diana New Jersey, that's a lovely name. How can I help you today?",
        "Of course, I can book that for you. Which evening would you like?",
        "Good morning, thanks for calling the clinic. What can I do for you?",
        "Hi there, nice to meet you. What brings you here today?",
    ),
    "number-heavy": (
        "Your total is $1,249.50 for 3 items, due on March 14, 2026 at 7:30 p.m. "
        "The reference number is 4 8 2 7 1.",
        "The flight leaves at 6:45 a.m. from gate 23 and lands at 10:15 local time, about "
        "3 hours and 30 minutes later. Boarding starts 40 minutes before departure.",
    ),
}
POLICIES: dict[str, SegmenterConfig] = {
    "marks only": SegmenterConfig(first_words=0, eager_chars=24),
    "5 words": SegmenterConfig(first_words=5, eager_chars=24),
    "7 words, a clause mark from 24 characters (before)": SegmenterConfig(eager_chars=24),
    "7 words, a clause mark from 16 characters": SegmenterConfig(eager_chars=16),
    "7 words, a clause mark from 12 characters (default)": SegmenterConfig(),
    "9 words": SegmenterConfig(first_words=9, eager_chars=24),
    "12 words": SegmenterConfig(first_words=12, eager_chars=24),
}
_TOKEN = re.compile(r"\s*\S{1,4}")
normalise = EnglishTextNormalizer()


def stream(text: str, config: SegmenterConfig, itl_ms: float) -> list[tuple[float, str]]:
    """``(ms after the first token, segment)`` for ``text`` streamed at ``itl_ms``."""
    seg = SpeechSegmenter(config)
    out: list[tuple[float, str]] = []
    t = 0.0
    for i, token in enumerate(_TOKEN.findall(text)):
        t = i * itl_ms
        out += [(t, s) for s in seg.push(token, now_ms=t)]
    return out + [(t + itl_ms, s) for s in seg.flush()]


def gaps_ms(released: list[float], synth: list[float], durations: list[float]) -> float:
    """Silence inside the reply: each segment is synthesized after it is released and the
    previous one is synthesized, and plays after the previous one has played."""
    ready = play_end = 0.0
    gap = 0.0
    for i, (rel, syn, dur) in enumerate(zip(released, synth, durations, strict=True)):
        ready = max(rel, ready) + syn
        start = ready if i == 0 else max(ready, play_end)
        if i:
            gap += start - play_end
        play_end = start + dur
    return gap


async def first_audio_ms(tts: PiperTTS, text: str) -> float:
    t0 = time.perf_counter()
    async for _ in tts.synthesize(text, sample_rate=24000):
        break
    return (time.perf_counter() - t0) * 1000


async def spoken(tts: PiperTTS, segments: list[str]) -> tuple[bytes, list[float], list[float]]:
    """The reply's audio (16 kHz), each segment's synthesis time and duration (ms)."""
    pcm = bytearray()
    synth: list[float] = []
    durations: list[float] = []
    for s in segments:
        t0 = time.perf_counter()
        n = len(pcm)
        async for chunk in tts.synthesize(s, sample_rate=16000):
            pcm += chunk.pcm
        synth.append((time.perf_counter() - t0) * 1000)
        durations.append((len(pcm) - n) / 32)
    return bytes(pcm), synth, durations


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    tts = PiperTTS(noise_scale=0.0, noise_w=0.0)
    stt = await WhisperSTT.load()
    await first_audio_ms(tts, "Warm up.")
    policies = {
        name: replace(cfg, first_after_ms=args.first_after_ms) for name, cfg in POLICIES.items()
    }
    rows: list[dict[str, Any]] = []
    for shape, replies in SHAPES.items():
        for reply in replies:
            # Policies alternate within each reply, so machine load affects all alike.
            for name, cfg in policies.items():
                released = stream(reply, cfg, args.itl_ms)
                seg_ms, segments = released[0][0], [s for _, s in released]
                synth = statistics.median(
                    [await first_audio_ms(tts, segments[0]) for _ in range(args.runs)]
                )
                pcm, seg_synth, durations = await spoken(tts, segments)
                heard = await stt.transcribe(pcm, 16000)
                ref, hyp = normalise(reply), normalise(heard.text)
                rows.append(
                    {
                        "shape": shape, "policy": name, "reply": reply, "segments": segments,
                        "seg_ms": seg_ms, "first_words": len(segments[0].split()),
                        "synth_ms": synth, "audio_ms": seg_ms + synth,
                        "errors": jiwer.process_words(ref, hyp).wer * len(ref.split()),
                        "words": len(ref.split()), "heard": heard.text,
                        "gap_ms": gaps_ms([t for t, _ in released], seg_synth, durations),
                    }
                )  # fmt: skip
    await tts.aclose()
    await stt.aclose()
    return {"itl_ms": args.itl_ms, "first_after_ms": args.first_after_ms, "rows": rows}


def table(doc: dict[str, Any]) -> str:
    lines = [
        "| shape | policy | seg_ms | first words | synth_ms | audio_ms | gaps_ms | WER |",
        "|---|---|---|---|---|---|---|---|",
    ]
    rows = doc["rows"]
    shapes = [*dict.fromkeys(r["shape"] for r in rows), "all"]
    for shape in shapes:
        for policy in POLICIES:
            sel = [r for r in rows if r["policy"] == policy and shape in ("all", r["shape"])]
            med = {
                k: statistics.median(r[k] for r in sel)
                for k in ("seg_ms", "first_words", "synth_ms", "audio_ms", "gap_ms")
            }
            wer = sum(r["errors"] for r in sel) / max(1, sum(r["words"] for r in sel))
            lines.append(
                f"| {shape} | {policy} | {med['seg_ms']:.0f} | {med['first_words']:.0f} | "
                f"{med['synth_ms']:.0f} | {med['audio_ms']:.0f} | {med['gap_ms']:.0f} | "
                f"{100 * wer:.1f}% |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="first-segment policy: latency and WER")
    parser.add_argument("--itl-ms", type=float, default=20.0, help="inter-token latency")
    parser.add_argument("--first-after-ms", type=float, default=None, help="time rule")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/first_segment.json"))
    args = parser.parse_args(argv)
    doc = asyncio.run(main_async(args))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"ITL {args.itl_ms:g} ms, time rule {args.first_after_ms} ms\n")
    print(table(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
