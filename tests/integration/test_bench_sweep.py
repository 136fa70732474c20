"""Load sweeps against the reference endpoint on loopback, with its capacity model."""

from __future__ import annotations

import asyncio

import jsonschema
import pytest

from runtime.bench.conversations import Conversation, Turn
from runtime.bench.reference_thread import ReferenceThread
from runtime.bench.report import SCHEMA, sweep_document
from runtime.bench.sweep import SLO, StepSettings, SweepSpec, Workload, sweep_targets
from runtime.bench.ttft import BenchSettings, BenchTarget, TTFTBenchmark
from runtime.llm.reference import ReferenceEndpoint, ReplyPlan

# 25 tokens: 20 ms to the first, then 20 ms apart: a stream holds its slot ~500 ms and its
# first sentence ("Sure, I can help with that.", 6 tokens) is ready ~120 ms after sending.
PLAN = ReplyPlan(ttft_ms=20, itl_ms=20)
# Below the capacity a turn's first sentence is ready in ~120 ms; past it, a caller waits a
# whole stream (~500 ms) for a slot first. The budget sits ~250 ms from either side, so a
# loaded machine's scheduling delays do not move the knee.
BUDGET = SLO.parse(["first_sentence_ms=370"])


async def test_capacity_model_queues_requests_first_come_first_served():
    async with ReferenceEndpoint(ReplyPlan(ttft_ms=0, itl_ms=30), capacity=2) as server:
        bench = TTFTBenchmark([BenchTarget("r", server.base_url, "m")], BenchSettings(warmup=0))
        async with bench.client_for(bench.targets[0]) as client:
            target = bench.targets[0]
            results = await asyncio.gather(*(bench.request(client, target, i, "warm")
                                             for i in range(4)))  # fmt: skip
    assert all(r.ok for r in results)
    records = sorted(
        (r for r in server.requests if r.path.endswith("/chat/completions")),
        key=lambda r: r.received_ns,
    )
    assert len(records) == 4
    admitted = [r.admitted_ns for r in records]
    assert None not in admitted
    # two streams at once: the third and fourth are admitted only as the first two end,
    # in the order they arrived
    released = sorted(r.released_ns or 0 for r in records[:2])
    assert records[2].admitted_ns is not None and records[3].admitted_ns is not None
    assert records[2].admitted_ns >= released[0]
    assert records[3].admitted_ns >= released[1]
    assert records[2].admitted_ns <= records[3].admitted_ns
    # the first two never waited: admitted before either stream ended
    assert all(r.admitted_ns is not None and r.admitted_ns < released[0] for r in records[:2])
    assert all(r.tokens_sent == 25 for r in records)
    with pytest.raises(ValueError, match="capacity"):
        ReferenceEndpoint(capacity=0)


@pytest.mark.timeout(120)
def test_sweep_finds_the_knee_at_the_configured_capacity():
    capacity = 4
    with ReferenceThread(PLAN, capacity=capacity) as ref:
        target = BenchTarget("reference", ref.base_url, "voxloop-reference")
        bench = TTFTBenchmark([target], BenchSettings(warmup=1))
        spec = SweepSpec.parse("concurrency=1,2,4,8,16")
        settings = StepSettings(duration_s=1.0, warmup_s=0.4, min_requests=20, extensions=1)
        [sweep] = asyncio.run(sweep_targets(bench, spec, settings, BUDGET, Workload()))
    doc = sweep_document([sweep], spec, BUDGET, settings={}, workload={"kind": "prompts"},
                         steady_tolerance=settings.steady_tolerance)  # fmt: skip
    jsonschema.validate(doc, SCHEMA)
    [ep] = doc["endpoints"]
    rates = {s["load"]: s["slo"]["pass_rate"] for s in ep["steps"]}
    assert ep["knee"] == {"max_load_passing": 4.0, "first_failing": 8.0}, rates
    # past the capacity half the callers wait a whole stream: none meets the budget, and
    # the sweep stops there instead of running 16
    assert list(rates) == [1.0, 2.0, 4.0, 8.0]
    assert rates[8.0] is not None and rates[8.0] < 0.5
    assert ep["stopped_early"] is True
    steps = {s["load"]: s for s in ep["steps"]}
    # throughput grows up to the capacity, then stays (the slots are the limit)
    tput = {load: s["throughput"]["requests_per_s"] for load, s in steps.items()}
    assert tput[4.0] > 2 * tput[1.0], tput
    ttft = {load: s["metrics"]["ttft_ms"]["p50"] for load, s in steps.items()}
    assert ttft[8.0] > ttft[4.0] + 300, ttft
    for s in ep["steps"]:
        assert s["errors"] == {}
        # a window closes after its duration once 20 requests went out, or at 3 x duration
        assert s["requests"] >= 20 or s["window_s"] >= 3 * 1.0 * s["runs"], s
        assert s["metrics"]["ttst_ms"]["p50"] >= 10
        assert s["client"]["cpu_ms_per_request"] > 0


@pytest.mark.timeout(120)
def test_rate_sweep_sends_poisson_arrivals_and_counts_errors_by_kind():
    with ReferenceThread(ReplyPlan(ttft_ms=5, itl_ms=1)) as ref:
        ok = BenchTarget("ok", ref.base_url, "m")
        unset = BenchTarget("nokey", ref.base_url, "m", api_key_env="VOXLOOP_TEST_UNSET_KEY")
        bench = TTFTBenchmark([unset, ok], BenchSettings(warmup=0), env={})
        spec = SweepSpec.parse("rate=10,20")
        settings = StepSettings(
            duration_s=1.5, warmup_s=0.2, min_requests=5, stop_below=0, extensions=0
        )
        first, second = asyncio.run(sweep_targets(bench, spec, settings, SLO(), Workload()))
        served = [r for r in ref.records() if r.path.endswith("/chat/completions")]
    assert (first.error, first.steps) == ("config", [])
    assert first.message == "environment variable VOXLOOP_TEST_UNSET_KEY is not set"
    assert [s.load for s in second.steps] == [10.0, 20.0]
    for s in second.steps:
        assert s.errors() == {}
        # arrivals in the window: the rate times the window, within Poisson noise
        assert abs(len(s.results) - s.load * s.window_s) < 4 * (s.load * s.window_s) ** 0.5
    # 1 cold + both steps' ramp and window requests, every one answered
    assert len(served) == 1 + second.steps[0].sent + second.steps[1].sent


@pytest.mark.timeout(120)
def test_conversation_replay_sends_the_growing_history_with_think_time():
    call = Conversation(
        id="c",
        system="Be brief.",
        turns=(
            Turn(user="Hi."),
            Turn(user="Where is my order?", think_s=0.05),
            Turn(user="Thanks.", assistant=None, think_s=0.05),
        ),
    )
    recorded = Conversation(
        id="r",
        system="Be brief.",
        turns=(Turn(user="One.", assistant="Recorded reply."), Turn(user="Two.", think_s=0.0)),
    )
    with ReferenceThread(ReplyPlan(ttft_ms=2, itl_ms=0, replies=("Okay. Done.",))) as ref:
        bench = TTFTBenchmark([BenchTarget("r", ref.base_url, "m")], BenchSettings(warmup=0))
        spec = SweepSpec.parse("concurrency=1")
        settings = StepSettings(duration_s=0.2, warmup_s=0.0, min_requests=5, stop_below=0)
        [sweep] = asyncio.run(
            sweep_targets(bench, spec, settings, SLO(), Workload([call, recorded]))
        )
        bodies = [r.body for r in ref.records() if r.path.endswith("/chat/completions")]
    convo = [b["messages"] for b in bodies[1:] if b is not None]  # after the cold request
    assert convo[0] == [{"role": "system", "content": "Be brief."},
                        {"role": "user", "content": "Hi."}]  # fmt: skip
    assert convo[1] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi."},
        {"role": "assistant", "content": "Okay. Done."},  # the endpoint's own reply
        {"role": "user", "content": "Where is my order?"},
    ]
    assert convo[2][-3:] == [{"role": "user", "content": "Where is my order?"},
                             {"role": "assistant", "content": "Okay. Done."},
                             {"role": "user", "content": "Thanks."}]  # fmt: skip
    # the recorded conversation keeps its recorded reply in the history
    assert convo[4] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "One."},
        {"role": "assistant", "content": "Recorded reply."},
        {"role": "user", "content": "Two."},
    ]
    assert sum(len(s.results) for s in sweep.steps) >= 5
