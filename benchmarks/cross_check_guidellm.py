"""Cross-check ``voxloop bench ttft`` against GuideLLM on the same local endpoint.

Both tools send the same single-turn prompts (``benchmarks/prompts/voice_questions.jsonl``)
to the same OpenAI-compatible server with the same ``max_tokens``, at the same concurrency
(a closed loop of N streams: voxloop's ``--sweep concurrency=N`` step, GuideLLM's
``--profile kind=concurrent,streams=N``), for the same number of seconds, alternating for
``--rounds`` rounds so drift on a shared machine hits both. Per tool and concurrency it
reports TTFT p50/p90, successful requests and output tokens per second (each tool's own
numbers, and the same rate computed from each tool's per-request timestamps: see
:func:`span_rates`), the median over rounds, the voxloop/GuideLLM ratios, and whether they are
within the tolerance: TTFT p50 within ±15 % or 10 ms, the span throughputs within ±10 %.

GuideLLM is not a voxloop dependency: install it in its own virtual environment
(``python -m venv /tmp/gvenv && /tmp/gvenv/bin/pip install guidellm==0.8.1``) and pass
``--guidellm /tmp/gvenv/bin/guidellm``. Example with a local llama.cpp server::

    python -m benchmarks.cross_check_guidellm --base-url http://127.0.0.1:8080/v1 \\
        --model smollm2 --guidellm /tmp/gvenv/bin/guidellm --concurrency 1,4 --seconds 15
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
from typing import Any

from runtime.bench.stats import summarize
from runtime.bench.sweep import SLO, StepRunner, StepSettings, Workload
from runtime.bench.ttft import BenchSettings, BenchTarget, TTFTBenchmark, load_prompts

PROMPTS = Path(__file__).resolve().parent / "prompts" / "voice_questions.jsonl"
TTFT_TOLERANCE = 0.15
TTFT_FLOOR_MS = 10.0
THROUGHPUT_TOLERANCE = 0.10


def run_voxloop(
    base_url: str, model: str, concurrency: int, seconds: float, max_tokens: int
) -> dict[str, float]:
    target = BenchTarget(name="voxloop", base_url=base_url, model=model)
    bench = TTFTBenchmark(
        [target], BenchSettings(warmup=2, max_tokens=max_tokens), prompts=load_prompts(PROMPTS)
    )
    settings = StepSettings(duration_s=seconds, warmup_s=0.0, min_requests=1, extensions=0)

    async def step() -> dict[str, Any]:
        async with bench.client_for(target) as client:
            for i in range(2):
                await bench.request(client, target, i, "warmup")
            runner = StepRunner(bench, client, target, "concurrency", settings, Workload())
            result = await runner.run(concurrency, seconds)
            doc = result.to_json(SLO(), settings.steady_tolerance)
            ok = [r for r in result.results if r.ok and r.started_ns and r.e2e_ms is not None]
            starts = [(r.started_ns or 0) / 1e9 for r in ok]
            spans = [(t, t + (r.e2e_ms or 0) / 1000) for t, r in zip(starts, ok, strict=True)]
            doc["span"] = span_rates(spans, [r.output_tokens for r in ok])
            return doc

    doc = asyncio.run(step())
    m = doc["metrics"]
    return {
        **doc["span"],
        "ttft_p50": m["ttft_ms"]["p50"],
        "ttft_p90": m["ttft_ms"]["p90"],
        "itl_p50": m["itl_ms"]["p50"],
        "requests_per_s": doc["throughput"]["requests_per_s"],
        "output_tokens_per_s": doc["throughput"]["output_tokens_per_s"],
        "ok": float(doc["ok"]),
    }


def run_guidellm(
    exe: str, base_url: str, model: str, concurrency: int, seconds: float, max_tokens: int
) -> dict[str, float]:
    backend = {
        "kind": "openai_http",
        "target": base_url.removesuffix("/v1"),
        "model": model,
        "max_tokens": max_tokens,
        "validate_backend": False,
        # GuideLLM sends max_completion_tokens, which not every server reads: send both.
        "extras": {"body": {"max_tokens": max_tokens}},
    }
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "guidellm.json"
        # GuideLLM sends each dataset row once: repeat the prompts past what can be sent.
        rows = [line for line in PROMPTS.read_text().splitlines() if line.strip()]
        data = Path(tmp) / "prompts.jsonl"
        data.write_text("".join(rows[i % len(rows)] + "\n" for i in range(5000)))
        cmd = [
            exe, "run",
            "--backend", json.dumps(backend),
            "--profile", f"kind=concurrent,streams={concurrency}",
            "--constraint", f"kind=max_duration,seconds={seconds}",
            "--data", f"kind=json_file,path={data}",
            "--output", f"kind=json,path={out}",
            "--disable-console",
        ]  # fmt: skip
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        subprocess.run(cmd, check=True, capture_output=True, env=env, timeout=600)
        doc = json.loads(out.read_text())
    bench = doc["benchmarks"][0]
    done = bench["requests"]["successful"]
    ttft = summarize([float(r["time_to_first_token_ms"]) for r in done])
    itl = [float(r["inter_token_latency_ms"]) for r in done if r.get("inter_token_latency_ms")]
    metrics = bench["metrics"]
    assert ttft is not None
    spans = [(float(r["request_start_time"]), float(r["request_end_time"])) for r in done]
    return {
        **span_rates(spans, [int(r["output_tokens"] or 0) for r in done]),
        "ttft_p50": ttft["p50"],
        "ttft_p90": ttft["p90"],
        "itl_p50": statistics.median(itl),
        "requests_per_s": float(metrics["requests_per_second"]["successful"]["mean"]),
        "output_tokens_per_s": float(metrics["output_tokens_per_second"]["successful"]["mean"]),
        "ok": float(len(done)),
    }


def span_rates(spans: list[tuple[float, float]], tokens: list[int]) -> dict[str, float]:
    """Successful requests and output tokens per second from the first send to the last end.

    Both tools' own numbers count a window's edges differently (voxloop: requests sent in the
    window; GuideLLM: requests completed before its time limit); with few, long requests one
    request at an edge moves them by 10 %. This one rate, from the per-request timestamps each
    tool recorded, compares what the tools measured rather than how they window it.
    """
    if not spans:
        return {"span_requests_per_s": 0.0, "span_output_tokens_per_s": 0.0}
    span = max(end for _, end in spans) - min(start for start, _ in spans)
    return {
        "span_requests_per_s": len(spans) / span,
        "span_output_tokens_per_s": sum(tokens) / span,
    }


def within(metric: str, a: float, b: float) -> bool:
    if metric == "ttft_p50":
        return abs(a - b) <= max(TTFT_TOLERANCE * b, TTFT_FLOOR_MS)
    return abs(a - b) <= THROUGHPUT_TOLERANCE * b


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="voxloop bench ttft vs GuideLLM")
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--model", default="local")
    parser.add_argument("--guidellm", required=True, help="path to the guidellm executable")
    parser.add_argument("--concurrency", default="1,4", help="streams, comma-separated")
    parser.add_argument("--seconds", type=float, default=15.0, help="length of each run")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument(
        "--json", type=Path, default=Path("benchmarks/results/cross_check_guidellm.json")
    )
    args = parser.parse_args(argv)
    levels = [int(c) for c in args.concurrency.split(",")]

    rounds: list[dict[str, dict[str, dict[str, float]]]] = []
    for _ in range(args.rounds):
        one: dict[str, dict[str, dict[str, float]]] = {}
        for c in levels:
            one[str(c)] = {
                "voxloop": run_voxloop(args.base_url, args.model, c, args.seconds, args.max_tokens),
                "guidellm": run_guidellm(
                    args.guidellm, args.base_url, args.model, c, args.seconds, args.max_tokens
                ),
            }
        rounds.append(one)
    summary = {
        str(c): {
            tool: {
                k: statistics.median(r[str(c)][tool][k] for r in rounds)
                for k in rounds[0][str(c)][tool]
            }
            for tool in ("voxloop", "guidellm")
        }
        for c in levels
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"rounds": rounds, "median": summary}, indent=2) + "\n")
    print(f"{args.rounds} rounds x {args.seconds:g} s per tool and concurrency, same prompts,")
    print(f"max_tokens {args.max_tokens} and endpoint; medians over rounds\n")
    print("| streams | tool | ttft p50 (ms) | ttft p90 (ms) | requests/s (own) "
          "| output tok/s (own) | requests/s (span) | output tok/s (span) |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    checks: list[tuple[int, str, float, bool]] = []
    for c in levels:
        for tool, m in summary[str(c)].items():
            print(f"| {c} | {tool} | {m['ttft_p50']:.1f} | {m['ttft_p90']:.1f} "
                  f"| {m['requests_per_s']:.2f} | {m['output_tokens_per_s']:.1f} "
                  f"| {m['span_requests_per_s']:.2f} "
                  f"| {m['span_output_tokens_per_s']:.1f} |")  # fmt: skip
        v, g = summary[str(c)]["voxloop"], summary[str(c)]["guidellm"]
        checks.extend(
            (c, metric, v[metric] / g[metric], within(metric, v[metric], g[metric]))
            for metric in ("ttft_p50", "span_requests_per_s", "span_output_tokens_per_s")
        )
    print("\n| streams | metric | voxloop / GuideLLM | within tolerance |")
    print("|---|---|---|---|")
    for c, metric, ratio, ok in checks:
        print(f"| {c} | {metric} | {ratio:.3f} | {'yes' if ok else 'NO'} |")
    verdicts = [ok for *_, ok in checks]
    print(f"\n{sum(verdicts)} of {len(verdicts)} comparisons within tolerance")
    return 0 if all(verdicts) else 1


if __name__ == "__main__":
    sys.exit(main())
