"""Cross-check ``voxloop bench ttft`` against GuideLLM on the same local endpoint.

Both tools send the same single-turn prompts (``benchmarks/prompts/voice_questions.jsonl``)
one at a time to the same OpenAI-compatible server, alternating for ``--rounds``
rounds so drift on a shared machine hits both. Reports each round's TTFT and
ITL medians and the median over rounds.

GuideLLM is not a voxloop dependency: install it in its own virtual environment
(``python -m venv /tmp/gvenv && /tmp/gvenv/bin/pip install guidellm``) and pass
``--guidellm /tmp/gvenv/bin/guidellm``. Example with a local llama.cpp server::

    python -m benchmarks.cross_check_guidellm --base-url http://127.0.0.1:8090/v1 \\
        --guidellm /tmp/gvenv/bin/guidellm --requests 40 --rounds 3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from runtime.bench.ttft import BenchSettings, BenchTarget, TTFTBenchmark, load_prompts

PROMPTS = Path(__file__).resolve().parent / "prompts" / "voice_questions.jsonl"


def run_voxloop(base_url: str, model: str, requests: int, max_tokens: int) -> dict[str, float]:
    target = BenchTarget(name="voxloop", base_url=base_url, model=model)
    bench = TTFTBenchmark(
        [target],
        BenchSettings(requests=requests, warmup=2, max_tokens=max_tokens),
        prompts=load_prompts(PROMPTS),
    )
    [report] = asyncio.run(bench.run())
    return {
        "ttft_p50": statistics.median(report.metric_samples("ttft_ms")),
        "ttft_p90": statistics.quantiles(report.metric_samples("ttft_ms"), n=10)[-1],
        "itl_p50": statistics.median(report.metric_samples("itl_ms")),
        "ok": float(sum(r.ok for r in report.warm)),
    }


def run_guidellm(exe: str, base_url: str, requests: int) -> dict[str, float]:
    target = base_url.removesuffix("/v1")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "guidellm.json"
        # GuideLLM sends each dataset row once: cycle the prompts to `requests` rows.
        rows = [line for line in PROMPTS.read_text().splitlines() if line.strip()]
        data = Path(tmp) / "prompts.jsonl"
        data.write_text("".join(rows[i % len(rows)] + "\n" for i in range(requests)))
        cmd = [
            exe, "run",
            "--backend", f"kind=openai_http,target={target}",
            "--profile", "kind=synchronous",
            "--constraint", f"kind=max_requests,count={requests}",
            "--data", f"kind=json_file,path={data}",
            "--output", f"kind=json,path={out}",
            "--disable-console",
        ]  # fmt: skip
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        subprocess.run(cmd, check=True, capture_output=True, env=env, timeout=1800)
        doc = json.loads(out.read_text())
    done = doc["benchmarks"][0]["requests"]["successful"]
    ttft = [float(r["time_to_first_token_ms"]) for r in done]
    itl = [float(r["inter_token_latency_ms"]) for r in done if r.get("inter_token_latency_ms")]
    return {
        "ttft_p50": statistics.median(ttft),
        "ttft_p90": statistics.quantiles(ttft, n=10)[-1],
        "itl_p50": statistics.median(itl),
        "ok": float(len(done)),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="voxloop bench ttft vs GuideLLM")
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--model", default="local")
    parser.add_argument("--guidellm", required=True, help="path to the guidellm executable")
    parser.add_argument("--requests", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/cross_check.json"))
    args = parser.parse_args(argv)

    rounds = [
        {
            "voxloop": run_voxloop(args.base_url, args.model, args.requests, args.max_tokens),
            "guidellm": run_guidellm(args.guidellm, args.base_url, args.requests),
        }
        for _ in range(args.rounds)
    ]
    summary = {
        tool: {k: statistics.median(r[tool][k] for r in rounds) for k in rounds[0][tool]}
        for tool in ("voxloop", "guidellm")
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"rounds": rounds, "median": summary}, indent=2) + "\n")
    print(
        f"{args.rounds} rounds x {args.requests} sequential requests, same prompts and endpoint\n"
    )
    print("| tool | ttft p50 (ms) | ttft p90 (ms) | itl p50 (ms) | ok |")
    print("|---|---|---|---|---|")
    for tool, m in summary.items():
        print(f"| {tool} | {m['ttft_p50']:.1f} | {m['ttft_p90']:.1f} | {m['itl_p50']:.2f} "
              f"| {m['ok']:.0f}/{args.requests} |")  # fmt: skip
    ratio = summary["voxloop"]["ttft_p50"] / summary["guidellm"]["ttft_p50"]
    print(f"\nvoxloop / guidellm ttft p50 ratio: {ratio:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
