"""Cost of one Smart Turn v3.2 end-of-turn judgement on this machine.

Each call judges a full 8 s window of real speech (the Harvard sentences
recording, its last 8 s): features (Whisper log-mel) and the model, on one
thread, as :meth:`runtime.speech.turn_model.SmartTurn.predict_timed` measures it.
The first call (session set-up) is not counted; the figure is the median and
p90 over ``--calls`` calls, with the feature extraction timed on its own too.

Run: ``nice -n 10 python -m benchmarks.smart_turn_cost [--calls 50]``
(needs the smart-turn extra: see docs/speech.md).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from audio.wav import read_wav
from runtime.speech.turn_model import SmartTurn

REAL = Path(__file__).resolve().parent.parent / "tests" / "data" / "real"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Smart Turn v3.2 cost per call")
    parser.add_argument("--calls", type=int, default=50)
    parser.add_argument(
        "--json", type=Path, default=Path("benchmarks/results/smart_turn_cost.json")
    )
    args = parser.parse_args(argv)

    pcm = read_wav(REAL / "speech_orig_16k.wav").mono()[-8 * 16000 * 2 :]
    t0 = time.perf_counter()
    model = SmartTurn()
    load_ms = (time.perf_counter() - t0) * 1000
    model.warmup()
    calls = [model.predict_timed(pcm) for _ in range(args.calls)]
    features_ms = []
    for _ in range(args.calls):
        t0 = time.perf_counter()
        model.features(pcm)
        features_ms.append((time.perf_counter() - t0) * 1000)
    total = sorted(c.inference_ms for c in calls)
    result = {
        "calls": args.calls,
        "window_s": 8,
        "load_ms": round(load_ms, 1),
        "call_ms_p50": round(statistics.median(total), 1),
        "call_ms_p90": round(total[int(0.9 * (len(total) - 1))], 1),
        "features_ms_p50": round(statistics.median(features_ms), 1),
        "probability": round(calls[0].probability, 3),
    }
    json.dump(result, sys.stdout, indent=2)
    print()
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
