"""End of speech → first agent audio: voxloop next to Pipecat and LiveKit, alternating rounds.

Each round runs, one after the other on the same clips and the same endpoint:

- voxloop: ``benchmarks.v2v`` in a fresh process (the engines load, the first turn of every
  session is measured; ``--runs`` sessions per clip), measured from its stereo recording;
- Pipecat: the peer harness ``eos_bench.py`` calling its Twilio bot (``--pipecat URL``, a bot
  already running, e.g. ``pipecat_twilio_bot.py --turn timeout``), measured at the caller;
- LiveKit: the peer harness ``livekit_headless.py`` (``--livekit-python``, the interpreter of its
  environment), one fresh process per run, measured in process.

All three take the end of speech as the last 10 ms block above -40 dBFS of the clip and the
first agent audio as what their harness reports. Medians per clip and system, and each system's
ratio to Pipecat, are printed (and written with every value to ``--json``).

Run (the endpoint and the bots pinned as in ``../shared/peers/README.md``)::

    python -m benchmarks.v2v_peers --base-url http://127.0.0.1:8392/v1 --model smollm2 \\
        --peers-dir ../shared/peers --pipecat ws://127.0.0.1:8766/media-stream \\
        --pipecat-python /path/to/pipecat-venv/bin/python \\
        --livekit-python /path/to/livekit-venv/bin/python --rounds 3 --runs 2
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

from benchmarks.phone_eos import speech_end_ms

ROOT = Path(__file__).resolve().parent.parent


PARTS = ("endpointing_ms", "stt_final_ms", "ttft_ms", "first_sentence_ms", "tts_first_audio_ms")


def run_voxloop(
    args: argparse.Namespace,
    clips: list[Path],
    out: Path,
    parts: dict[str, dict[str, list[float]]],
    speculate_ms: int | None = None,
) -> dict[str, list[float]]:
    cmd = [sys.executable, "-m", "benchmarks.v2v", "--base-url", args.base_url,
           "--model", args.model, "--runs", str(args.runs), "--json", str(out)]  # fmt: skip
    if speculate_ms is not None:
        cmd += ["--speculate-ms", str(speculate_ms)]
    for clip in clips:
        cmd += ["--clip", str(clip)]
    if args.pin is not None:
        cmd = ["taskset", "-c", args.pin, *cmd]
    subprocess.run(cmd, check=True, cwd=ROOT, capture_output=True, env=_env())
    doc = json.loads(out.read_text())
    values: dict[str, list[float]] = {}
    for run in doc["runs"]:
        values.setdefault(run["clip"], []).extend(run["audio_v2v_ms"][:1])
        for key in PARTS:
            got = [t[key] for t in run["turns"][:1] if t.get(key) is not None]
            parts.setdefault(run["clip"], {}).setdefault(key, []).extend(got)
    return values


def run_pipecat(args: argparse.Namespace, clip: Path) -> list[float]:
    cmd = [args.pipecat_python, str(args.peers_dir / "eos_bench.py"), args.pipecat, str(clip),
           str(args.runs)]  # fmt: skip
    env = _env()
    env["PATH"] = f"{Path(args.pipecat_python).parent}{os.pathsep}{env.get('PATH', '')}"
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=args.peers_dir)
    found = re.search(r"EOS->first audio ms: \[([^\]]*)\]", out.stdout)
    if found is None:
        print(f"pipecat: no result for {clip.name}: {out.stderr.strip()[-300:]}", file=sys.stderr)
        return []
    return [float(v) for v in found.group(1).split(",") if v.strip()]


def run_livekit(args: argparse.Namespace, clip: Path) -> list[float]:
    got = []
    end_s = speech_end_ms(clip) / 1000
    for _ in range(args.runs):
        cmd = [args.livekit_python, str(args.peers_dir / "livekit_headless.py"), str(clip),
               f"{end_s:.2f}", args.base_url, args.model]  # fmt: skip
        if args.pin is not None:
            cmd = ["taskset", "-c", args.pin, *cmd]
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=120,
                                 cwd=args.peers_dir)  # fmt: skip
        except subprocess.TimeoutExpired:
            print(f"livekit: {clip.name} timed out", file=sys.stderr)
            continue
        found = re.search(r"END_OF_SPEECH_TO_FIRST_AUDIO_MS (-?\d+)", out.stdout)
        if found is None:
            print(f"livekit: no result for {clip.name}: {out.stderr.strip()[-300:]}",
                  file=sys.stderr)  # fmt: skip
            continue
        got.append(float(found.group(1)))
    return got


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", required=True, help="the endpoint every system uses")
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--peers-dir", type=Path, required=True, help="the peer harnesses")
    parser.add_argument(
        "--clip", type=Path, action="append",
        help="clips (default: user_hello.wav and user_diane.wav of --peers-dir)",
    )  # fmt: skip
    parser.add_argument("--pipecat", help="the Pipecat Twilio bot's media-stream URL")
    parser.add_argument("--pipecat-python", default=sys.executable,
                        help="an interpreter with streamdouble (runs eos_bench.py)")  # fmt: skip
    parser.add_argument("--livekit-python", help="an interpreter with LiveKit Agents")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--runs", type=int, default=2, help="calls per clip, system and round")
    parser.add_argument("--pin", help="CPU list for voxloop and LiveKit (taskset -c)")
    parser.add_argument(
        "--voxloop-speculate-ms", type=int, action="append",
        help="run voxloop once per value of TurnDetection.speculate_ms (0: no early decode), "
        "each its own column, alternating within each round (default: the default only)",
    )  # fmt: skip
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/v2v_peers.json"))
    args = parser.parse_args(argv)
    args.peers_dir = args.peers_dir.resolve()
    clips = [c.resolve() for c in args.clip or [args.peers_dir / "user_hello.wav",
                                                args.peers_dir / "user_diane.wav"]]  # fmt: skip
    variants: dict[str, int | None] = {"voxloop": None}
    if args.voxloop_speculate_ms:
        variants = {f"voxloop (speculate_ms {ms or 'off'})": ms for ms in args.voxloop_speculate_ms}
    systems = (
        list(variants)
        + (["pipecat"] if args.pipecat else [])
        + (["livekit"] if args.livekit_python else [])
    )
    values: dict[str, dict[str, list[float]]] = {s: {c.name: [] for c in clips} for s in systems}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    scratch = args.json.with_suffix(".voxloop.json")
    parts: dict[str, dict[str, dict[str, list[float]]]] = {}
    for rnd in range(1, args.rounds + 1):
        for name, ms in variants.items():
            for clip, got in run_voxloop(args, clips, scratch, parts.setdefault(name, {}),
                                         ms).items():  # fmt: skip
                values[name][clip] += got
        for clip in clips:
            if args.pipecat:
                values["pipecat"][clip.name] += run_pipecat(args, clip)
            if args.livekit_python:
                values["livekit"][clip.name] += run_livekit(args, clip)
        shown = {
            s: {c: [round(v) for v in vs] for c, vs in per.items()} for s, per in values.items()
        }
        print(f"after round {rnd}: {json.dumps(shown)}", flush=True)
    scratch.unlink(missing_ok=True)
    medians: dict[str, dict[str, float | None]] = {
        s: {c: statistics.median(v) if v else None for c, v in per.items()}
        for s, per in values.items()
    }
    print()
    ratio_names = [f"{s} / pipecat" for s in systems if s != "pipecat" and "pipecat" in systems]
    print("| clip | " + " | ".join(systems + ratio_names) + " |")
    print("|---|" + "---|" * len(systems + ratio_names))
    for clip in clips:
        cells = []
        for s in systems:
            v = medians[s][clip.name]
            cells.append("-" if v is None else f"{v:.0f} ms (n={len(values[s][clip.name])})")
        ratios = []
        base = medians.get("pipecat", {}).get(clip.name)
        for s in systems:
            if s == "pipecat" or "pipecat" not in systems:
                continue
            v = medians[s][clip.name]
            ratios.append("-" if v is None or not base else f"{v / base:.2f}")
        print(f"| {clip.name} | " + " | ".join(cells + ratios) + " |")
    print("\nvoxloop's own turn metrics, medians (ms; the stages overlap):")
    print("| voxloop | clip | " + " | ".join(k.removesuffix("_ms") for k in PARTS) + " |")
    print("|---|---|" + "---|" * len(PARTS))
    for name in variants:
        for clip in clips:
            mine = parts.get(name, {}).get(clip.name, {})
            cells = [f"{statistics.median(mine[k]):.0f}" if mine.get(k) else "-" for k in PARTS]
            print(f"| {name} | {clip.name} | " + " | ".join(cells) + " |")
    doc: dict[str, Any] = {"values": values, "medians": medians, "voxloop_parts": parts,
                           "rounds": args.rounds, "runs": args.runs}  # fmt: skip
    args.json.write_text(json.dumps(doc, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
