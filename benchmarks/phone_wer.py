"""Word error rate on the phone: the test utterances at 16 kHz vs through 8 kHz G.711 μ-law.

Each utterance of ``tests/data/speech/manifest.jsonl`` (and the real recording
``tests/data/real/hello-world.wav``) is transcribed twice by the embedded STT
(faster-whisper with its pinned model): as recorded at 16 kHz, and after the path
a phone call takes through the bridge (resampled to 8 kHz, μ-law encoded and
decoded, resampled back to 16 kHz by the session's ingress resampler). WER is
computed with Whisper's English normaliser (jiwer), per condition over all
words; the per-item lines show where they differ.

Run: ``python -m benchmarks.phone_wer [--json out.json]``
"""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path

import jiwer
from whisper_normalizer.english import EnglishTextNormalizer

from audio.g711 import ulaw_decode, ulaw_encode
from audio.resample import resample_all
from audio.wav import read_wav
from runtime.speech.engines.registry import load_stt

DATA = Path(__file__).resolve().parent.parent / "tests" / "data"
RATE = 16000


def items() -> list[tuple[str, bytes, str]]:
    rows = [json.loads(x) for x in (DATA / "speech" / "manifest.jsonl").read_text().splitlines()]
    out = []
    for row in rows:
        wav = read_wav(DATA / "speech" / row["file"])
        out.append((row["file"], resample_all(wav.mono(), wav.sample_rate, RATE), row["text"]))
    real = read_wav(DATA / "real" / "hello-world.wav")
    out.append(
        ("hello-world.wav", resample_all(real.mono(), real.sample_rate, RATE), "Hello world!")
    )
    return out


def phone(pcm16k: bytes) -> bytes:
    """The bridge's path: 8 kHz μ-law on the wire, back to 16 kHz for the core."""
    narrow = resample_all(pcm16k, RATE, 8000)
    return resample_all(ulaw_decode(ulaw_encode(narrow)), 8000, RATE)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    norm = EnglishTextNormalizer()
    stt = await load_stt("whisper")
    refs: list[str] = []
    hyps: dict[str, list[str]] = {"16k": [], "8k_ulaw": []}
    rows = []
    try:
        for name, pcm, text in items():
            ref = norm(text)
            wide = (await stt.transcribe(pcm, RATE)).text
            narrow = (await stt.transcribe(phone(pcm), RATE)).text
            refs.append(ref)
            hyps["16k"].append(norm(wide))
            hyps["8k_ulaw"].append(norm(narrow))
            rows.append({"item": name, "reference": text, "16k": wide, "8k_ulaw": narrow})
            mark = "" if norm(wide) == norm(narrow) else "   <- differs"
            print(f"{name:24} 16k: {wide!r}\n{'':24}  8k: {narrow!r}{mark}")
    finally:
        await stt.aclose()
    result = {
        "items": len(refs),
        "words": sum(len(r.split()) for r in refs),
        "wer_16k": round(jiwer.wer(refs, hyps["16k"]), 4),
        "wer_8k_ulaw": round(jiwer.wer(refs, hyps["8k_ulaw"]), 4),
        "rows": rows,
    }
    print(
        f"\n{result['items']} utterances, {result['words']} words: WER 16 kHz "
        f"{result['wer_16k']:.1%}, 8 kHz μ-law {result['wer_8k_ulaw']:.1%}"
    )
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    asyncio.run(main())
