"""Load sweeps: parsing, pass-rate arithmetic, Poisson arrivals on a virtual clock, the sweep
controller, the report's JSON schema, the HTML page and ``--compare``."""

from __future__ import annotations

import asyncio
import copy
import json
import random
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from runtime.bench.conversations import (
    BUILTIN,
    ENDPOINTING_MS,
    estimate_think_s,
    load_conversations,
)
from runtime.bench.report import (
    SCHEMA,
    SCHEMA_ID,
    compare,
    load_document,
    render_html,
    sweep_document,
)
from runtime.bench.sweep import (
    DEFAULT_FIRST_SENTENCE_MS,
    SLO,
    ClientLoad,
    EndpointSweep,
    PassRate,
    StepResult,
    StepSettings,
    SweepController,
    SweepSpec,
    dispatch_poisson,
    knee,
    pass_rate,
)
from runtime.bench.ttft import BenchTarget, RequestResult


def req(i: int, fs: float | None = 100.0, *, ok: bool = True, ttft: float | None = 50.0,
        error: str | None = None) -> RequestResult:  # fmt: skip
    return RequestResult(
        "e", i, "warm", ok=ok, error=error, first_sentence_ms=fs, ttft_ms=ttft,
        ttst_ms=5.0 if ok else None, e2e_ms=None if fs is None else fs + 200,
        output_tokens=10 if ok else 0, started_ns=i,
    )  # fmt: skip


def step(load: float, values: Sequence[float | None], *, window_s: float = 10.0) -> StepResult:
    results = [req(i, v) for i, v in enumerate(values)]
    return StepResult(load, window_s, results, ClientLoad(cpu_s=0.5, wall_s=10.0, requests=20))


# -- parsing ------------------------------------------------------------------------


def test_sweep_spec_parses_both_modes_and_rejects_nonsense():
    assert SweepSpec.parse("concurrency=1,2,4,8,16") == SweepSpec(
        "concurrency", (1.0, 2.0, 4.0, 8.0, 16.0)
    )
    assert SweepSpec.parse("rate=0.5,1,2.5") == SweepSpec("rate", (0.5, 1.0, 2.5))
    for bad, message in (
        ("users=1,2", "concurrency=N"),
        ("concurrency=1,2.5", "whole numbers"),
        ("concurrency=0,1", "whole numbers"),
        ("rate=0,1", "positive"),
        ("rate=2,1", "increase"),
        ("rate=1,1", "increase"),
        ("rate=", "at least one"),
        ("rate=a", "numbers"),
    ):
        with pytest.raises(ValueError, match=message):
            SweepSpec.parse(bad)


def test_slo_default_is_the_endpointing_silence_plus_the_margin():
    assert DEFAULT_FIRST_SENTENCE_MS == 800.0
    assert SLO.parse([]).budgets == (("first_sentence_ms", 800.0),)
    assert SLO.parse(["first_sentence_ms=650", "ttft_ms=300"]).budgets == (
        ("first_sentence_ms", 650.0),
        ("ttft_ms", 300.0),
    )
    for bad, message in (("tokens_per_s=3", "METRIC=MS"), ("ttft_ms=x", "milliseconds"),
                         ("ttft_ms=0", "positive"), ("ttft_ms", "METRIC=MS")):  # fmt: skip
        with pytest.raises(ValueError, match=message):
            SLO.parse([bad])


# -- pass rates and the knee ------------------------------------------------------------


def test_pass_rate_counts_errors_and_missing_values_as_misses_exactly():
    results = [
        req(0, 120.0),
        req(1, 800.0),  # exactly on the budget: passes
        req(2, 800.5),  # just over
        req(3, None),  # no speakable segment at all
        req(4, None, ok=False, ttft=None, error="timeout"),
        req(5, 10.0),
        req(6, 799.9),
        req(7, 30.0, ttft=400.0),
    ]
    rate = pass_rate(results, SLO())
    assert rate == PassRate(passed=5, total=8) and rate.rate == 0.625
    both = SLO.parse(["first_sentence_ms=800", "ttft_ms=300"])
    assert pass_rate(results, both) == PassRate(passed=4, total=8)
    assert pass_rate([], SLO()).rate is None


def test_knee_is_the_largest_load_before_the_first_failing_step():
    loads = [1, 2, 4, 8, 16]
    assert knee(loads, [1.0, 0.95, 0.96, 0.94, 1.0]) == (4, 8)  # a later recovery does not count
    assert knee(loads, [1.0, 1.0, 1.0, 1.0, 0.99]) == (16, None)
    assert knee(loads, [0.5, 1.0, 1.0, 1.0, 1.0]) == (None, 1)
    assert knee([1, 2], [1.0, None]) == (1, 2)  # a step with no request fails


def test_step_json_throughput_percentiles_and_steadiness():
    s = step(4, [100.0] * 10 + [130.0] * 10, window_s=8.0)
    s.results.append(req(20, None, ok=False, ttft=None, error="server"))
    doc = s.to_json(SLO.parse(["first_sentence_ms=120"]), 0.25)
    assert (doc["requests"], doc["ok"], doc["errors"]) == (21, 20, {"server": 1})
    assert doc["throughput"] == {"requests_per_s": 2.5, "output_tokens_per_s": 25.0}
    assert doc["slo"] == {"passed": 10, "total": 21, "pass_rate": 10 / 21}
    assert doc["metrics"]["first_sentence_ms"]["p50"] == 115.0
    assert doc["metrics"]["ttst_ms"]["p50"] == 5.0
    # halves by send time: the first 10 requests, then the other 11 (one failed)
    assert doc["steady"]["first_half_p50_ms"] == 100.0
    assert doc["steady"]["second_half_p50_ms"] == 130.0
    assert doc["steady"]["steady"] is False  # 1.3 > 1.25
    assert s.steady("first_sentence_ms", 0.30) is True
    # measured by a runner: the requests that ended inside the window, whenever sent
    s.completed = (12, 300)
    assert s.to_json(SLO(), 0.25)["throughput"] == {"requests_per_s": 1.5,
                                                   "output_tokens_per_s": 37.5}  # fmt: skip
    assert doc["client"] == {"cpu_ms_per_request": 25.0, "busy": 0.05, "loop_lag_p99_ms": None,
                             "bound": False, "reason": None}  # fmt: skip


def test_client_is_reported_as_the_bottleneck():
    busy = ClientLoad(cpu_s=9.0, wall_s=10.0, requests=100)
    assert busy.bound_reason == "client event loop busy 90% of the step"
    lagging = ClientLoad(cpu_s=1.0, wall_s=10.0, requests=100, lag_ms=[1.0] * 50 + [80.0] * 5)
    assert lagging.bound_reason is not None and "lag p99" in lagging.bound_reason
    assert ClientLoad(cpu_s=1.0, wall_s=10.0, requests=100, lag_ms=[2.0] * 50).bound_reason is None


# -- Poisson arrivals on a virtual clock ------------------------------------------------


class VirtualTimer:
    """Time moves only when the (single) sleeper sleeps; ``late`` adds one overshoot."""

    def __init__(self, late: tuple[int, float] | None = None) -> None:
        self.t = 0.0
        self.sleeps = 0
        self.late = late

    def now(self) -> float:
        return self.t

    async def sleep(self, seconds: float) -> None:
        self.sleeps += 1
        self.t += seconds
        if self.late and self.sleeps == self.late[0]:
            self.t += self.late[1]
        await asyncio.sleep(0)


async def arrivals(rate: float, horizon: float, seed: int, timer: VirtualTimer) -> list[float]:
    times: list[float] = []
    count = await dispatch_poisson(
        rate, lambda: timer.now() >= horizon, lambda: times.append(timer.now()), timer,
        random.Random(seed),
    )  # fmt: skip
    assert count == len(times)
    return times


async def test_poisson_arrivals_hold_the_rate_over_a_long_run():
    rate, horizon = 5.0, 4000.0
    times = await arrivals(rate, horizon, 7, VirtualTimer())
    expected = rate * horizon  # 20000, standard deviation sqrt(20000) = 141
    assert abs(len(times) - expected) < 0.02 * expected
    gaps = [b - a for a, b in zip([0.0, *times], times, strict=False)]
    assert abs(statistics.fmean(gaps) - 1 / rate) < 0.02 / rate
    # exponential gaps: coefficient of variation 1 (a fixed-interval schedule would give 0)
    assert abs(statistics.pstdev(gaps) / statistics.fmean(gaps) - 1) < 0.03
    # counts per 10 s window are Poisson: variance equals the mean
    windows = [0] * int(horizon / 10)
    for t in times:
        windows[min(int(t / 10), len(windows) - 1)] += 1
    assert abs(statistics.pvariance(windows) / statistics.fmean(windows) - 1) < 0.15
    assert times == await arrivals(rate, horizon, 7, VirtualTimer())  # seeded
    assert times != await arrivals(rate, horizon, 8, VirtualTimer())


async def test_a_late_wakeup_does_not_shift_the_later_arrivals():
    on_time = await arrivals(2.0, 30.0, 3, VirtualTimer())
    late = await arrivals(2.0, 30.0, 3, VirtualTimer(late=(5, 1.5)))
    assert late[4] == pytest.approx(on_time[4] + 1.5)
    # arrivals due during the overshoot go out at once, then the schedule is on time again
    caught_up = [i for i in range(5, len(on_time)) if late[i] == pytest.approx(on_time[i])]
    assert caught_up and caught_up[0] <= 10
    assert late[caught_up[0]:] == pytest.approx(on_time[caught_up[0]:len(late)])  # fmt: skip


# -- the sweep controller -----------------------------------------------------------------


async def test_controller_extends_unsteady_steps_and_stops_past_saturation():
    calls: list[tuple[float, float]] = []
    # pass rates with the default 800 ms budget: 20/20, 19/20, 18/20, 5/20, (never run)
    over = {1: 0, 2: 1, 4: 2, 8: 15, 16: 20}

    async def run_step(load: float, duration: float) -> StepResult:
        calls.append((load, duration))
        bad = over[int(load)]
        values: Sequence[float | None] = [900.0] * bad + [100.0] * (20 - bad)
        if load == 8:  # misses spread over the window: steady
            values = [900.0, 900.0, 900.0, 100.0] * 5
        if load == 4 and duration == 10.0:  # drifting: the second half twice as slow
            values = [100.0] * 8 + [200.0] * 10 + [900.0] * 2
        return step(load, values)

    seen: list[tuple[float, int, bool]] = []
    controller = SweepController(
        SweepSpec.parse("concurrency=1,2,4,8,16"),
        StepSettings(duration_s=10.0, extensions=1, stop_below=0.5),
        SLO(),
        run_step,
        lambda s, steady: seen.append((s.load, s.runs, steady)),
    )
    steps = await controller.run()
    assert calls == [(1, 10.0), (2, 10.0), (4, 10.0), (4, 20.0), (8, 10.0)]
    assert seen == [(1, 1, True), (2, 1, True), (4, 1, False), (4, 2, True), (8, 1, True)]
    assert [s.runs for s in steps] == [1, 1, 2, 1]
    assert [pass_rate(s.results, SLO()).rate for s in steps] == [1.0, 0.95, 0.9, 0.25]
    assert knee([s.load for s in steps], [pass_rate(s.results, SLO()).rate for s in steps]) == (
        2,
        4,
    )
    assert controller.stopped_early is True


async def test_controller_keeps_an_unsteady_step_after_its_last_extension():
    calls: list[float] = []

    async def run_step(load: float, duration: float) -> StepResult:
        calls.append(duration)
        return step(load, [100.0] * 10 + [300.0] * 10)  # never settles

    steps = await SweepController(
        SweepSpec.parse("rate=1"), StepSettings(duration_s=5.0, extensions=2, stop_below=0),
        SLO(), run_step,
    ).run()  # fmt: skip
    assert calls == [5.0, 10.0, 20.0]
    assert steps[0].runs == 3
    assert steps[0].to_json(SLO(), 0.25)["steady"]["steady"] is False


def test_step_settings_are_checked():
    with pytest.raises(ValueError, match="--step-seconds"):
        StepSettings(duration_s=0)
    with pytest.raises(ValueError, match="--stop-below"):
        StepSettings(stop_below=1.5)


# -- the report ---------------------------------------------------------------------------


def make_doc(fs_at_8: float = 900.0, name: str = "ref") -> dict[str, Any]:
    sweep = EndpointSweep(BenchTarget(name, "http://127.0.0.1:1/v1", "m"))
    sweep.cold = req(0, 150.0)
    sweep.steps = [step(1, [100.0] * 20), step(2, [120.0] * 20), step(4, [150.0] * 20),
                   step(8, [fs_at_8] * 20)]  # fmt: skip
    sweep.stopped_early = True
    spec = SweepSpec.parse("concurrency=1,2,4,8,16")
    return sweep_document([sweep], spec, SLO(), settings={"step_seconds": 10.0},
                          workload={"kind": "prompts"}, steady_tolerance=0.25)  # fmt: skip


def test_report_json_follows_its_schema():
    doc = make_doc()
    jsonschema.validate(doc, SCHEMA)
    assert doc["schema"] == SCHEMA_ID
    [ep] = doc["endpoints"]
    assert ep["knee"] == {"max_load_passing": 4.0, "first_failing": 8.0}
    assert [s["slo"]["pass_rate"] for s in ep["steps"]] == [1.0, 1.0, 1.0, 0.0]
    assert doc["slo"] == {"budgets_ms": {"first_sentence_ms": 800.0}, "target_pass_rate": 0.95}
    assert doc["machine"]["cpus"] >= 1
    # the schema can fail: a step without its pass rate, a wrong mode
    broken = copy.deepcopy(doc)
    del broken["endpoints"][0]["steps"][1]["slo"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, SCHEMA)
    broken = copy.deepcopy(doc)
    broken["sweep"]["mode"] = "users"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, SCHEMA)


def test_html_report_is_self_contained_with_plots_and_tables():
    page = render_html(make_doc())
    assert page.count("<svg") == 4
    assert "Voice SLO pass rate" in page and "First speakable segment" in page
    assert "budget 800 ms" in page
    assert "<td>4 callers</td><td>8</td>" in page  # the knee table
    assert "<td>none</td>" not in page
    for fetched in ("<script", "src=", "<link", "@import", "url("):
        assert fetched not in page


def test_compare_marks_what_changed(tmp_path: Path):
    a, b = make_doc(), make_doc(fs_at_8=700.0)
    (tmp_path / "a.json").write_text(json.dumps(a))
    (tmp_path / "b.json").write_text(json.dumps(b))
    changes = compare(load_document(tmp_path / "a.json"), load_document(tmp_path / "b.json"))
    by = {(c.load, c.label): c for c in changes}
    fs = by[(8.0, "first sentence p50 ms")]
    assert (fs.a, fs.b, fs.mark) == (900.0, 700.0, "better")
    assert fs.relative == pytest.approx(-2 / 9)
    rate = by[(8.0, "pass rate")]
    assert (rate.a, rate.b, rate.mark) == (0.0, 1.0, "better")
    assert by[(None, "largest load ≥ 95 %")].mark == "better"
    assert (by[(None, "largest load ≥ 95 %")].a, by[(None, "largest load ≥ 95 %")].b) == (4.0, 8.0)
    assert by[(1.0, "first sentence p50 ms")].mark == ""
    assert {c.mark for c in changes if c.load in (1.0, 2.0, 4.0)} == {""}
    # and the other way round, the same changes are worse
    back = {(c.load, c.label): c.mark for c in compare(b, a)}
    assert back[(8.0, "first sentence p50 ms")] == "worse"
    assert back[(8.0, "pass rate")] == "worse"


def test_compare_reads_plain_runs_and_rejects_other_files(tmp_path: Path):
    plain = {"endpoints": [{"name": "x", "requests": 4, "ok": 4, "errors": {},
                            "metrics": {"ttft_ms": {"p50": 100.0, "p95": 120.0}},
                            "slo": {"passed": 4, "total": 4, "pass_rate": 1.0}}]}  # fmt: skip
    (tmp_path / "p.json").write_text(json.dumps(plain))
    slower = copy.deepcopy(plain)
    slower["endpoints"][0]["metrics"]["ttft_ms"]["p50"] = 150.0  # type: ignore[index]
    (tmp_path / "q.json").write_text(json.dumps(slower))
    changes = compare(load_document(tmp_path / "p.json"), load_document(tmp_path / "q.json"))
    [ttft] = [c for c in changes if c.label == "ttft p50 ms"]
    assert (ttft.load, ttft.a, ttft.b, ttft.mark) == (1.0, 100.0, 150.0, "worse")
    (tmp_path / "n.json").write_text('{"turns": []}')
    with pytest.raises(ValueError, match="not a voxloop bench ttft report"):
        load_document(tmp_path / "n.json")
    (tmp_path / "s.json").write_text('{"schema": "other/9", "endpoints": []}')
    with pytest.raises(ValueError, match="unknown schema"):
        load_document(tmp_path / "s.json")


# -- conversations --------------------------------------------------------------------------


def test_conversations_from_jsonl_and_from_talk_metrics(tmp_path: Path):
    path = tmp_path / "c.jsonl"
    path.write_text(
        json.dumps({"id": "a", "system": "Be brief.", "turns": [
            {"user": "Hi."}, {"user": "Where is my order?", "think_ms": 1500},
            {"user": "Thanks.", "assistant": "You're welcome."}]}) + "\n\n"
        + json.dumps({"turns": [{"user": "One turn."}]}) + "\n"
    )  # fmt: skip
    a, b = load_conversations(path)
    assert (a.id, a.system, len(a.turns)) == ("a", "Be brief.", 3)
    assert a.think_s(0, "") == 0.0
    assert a.think_s(1, "anything") == 1.5
    # no think_ms: listen to the reply (5 words) and say "Thanks." (1 word) at 2.5 words/s,
    # then the endpointing silence
    assert a.think_s(2, "It ships on Thursday morning.") == pytest.approx(6 / 2.5 + 0.3)
    assert a.turns[2].assistant == "You're welcome."
    assert b.id == "c.jsonl:3"

    talk = tmp_path / "metrics.json"
    talk.write_text(json.dumps({"turns": [
        {"user_text": "Hello there.", "agent_text": "Hi! How can I help?", "endpointing_ms": 320},
        {"user_text": "What time is it?", "agent_text": "It's noon.", "endpointing_ms": 410.0},
    ]}))  # fmt: skip
    [call] = load_conversations(talk)
    assert [t.user for t in call.turns] == ["Hello there.", "What time is it?"]
    assert [t.assistant for t in call.turns] == ["Hi! How can I help?", "It's noon."]
    assert call.turns[1].think_s == pytest.approx((5 + 4) / 2.5 + 0.41)
    assert estimate_think_s("", "") == ENDPOINTING_MS / 1000


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("not json\n", ":1: not valid JSON"),
        ('{"turns": [{"user": ""}]}\n{}\n', 'needs "user"'),
        ('{"turns": [{"user": "a", "think_ms": -1}]}\n', "think_ms"),
        ("\n", "has no conversations"),
    ],
)
def test_bad_conversation_files_are_one_line_errors(tmp_path: Path, text: str, message: str):
    path = tmp_path / "bad.jsonl"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        load_conversations(path)


def test_builtin_conversations_are_multi_turn():
    assert len(BUILTIN) == 5
    assert all(4 <= len(c.turns) <= 6 for c in BUILTIN)
    assert len({c.id for c in BUILTIN}) == 5
