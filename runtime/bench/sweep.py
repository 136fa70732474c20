"""Load sweeps: how an endpoint's voice latency holds up as the load grows.

A sweep runs one **step** per load value, per endpoint (endpoints one after
the other, so they never compete for this machine's CPU):

* ``concurrency=N`` (closed loop): N callers, each sending its next request
  as soon as the previous one ended (or, replaying conversations, after the
  turn's think time);
* ``rate=R`` (open loop): requests (or, replaying conversations, calls)
  arrive as a Poisson process of R per second, whether or not earlier ones
  have been answered, as independent callers do.

**Steady state.** Each step first runs ``warmup_s`` seconds whose requests
are not measured (connections opened, queues filled), then a measurement
window of at least ``duration_s`` seconds that also goes on until
``min_requests`` measured requests were sent (at most three times ``duration_s``).
Requests sent in the window are measured through to their end. The window
is split in two halves by send time; the step is **steady** when the p50 of
the gated latency (the SLO's first metric) in the second half is within
``steady_tolerance`` (±25 %) of the first half's, or within
:data:`STEADY_FLOOR_MS` of it (a few ms of jitter on a fast endpoint is no
drift). An unsteady step is run again with a window twice as long,
``extensions`` times at most, and is
reported as unsteady if it still drifts (an open-loop rate above the
endpoint's capacity never settles: its queue and latency grow for as long
as it runs).

**Voice SLO.** A request passes when it succeeded and every budgeted
metric is within its budget (default: the first speakable segment within
:data:`DEFAULT_FIRST_SENTENCE_MS`). The pass rate (goodput share) is
passes / measured requests, errors counted as misses. The **knee** is the
largest load whose step, and every lighter step, keeps a pass rate
≥ :data:`TARGET_PASS_RATE`. The sweep stops early after a step whose pass rate is
below ``stop_below`` (heavier loads would only be worse).

**Client overhead.** During each step the client's own event-loop thread
is measured: CPU time per request (``time.thread_time``), the share of the
step it was busy, and how late a 50 ms timer on the loop fires (loop lag,
p99: the error that waiting for the loop adds to a timestamp). The step is
flagged **client-bound** when the loop was busy ≥ :data:`CLIENT_BUSY_LIMIT`
of the time or its lag p99 ≥ :data:`CLIENT_LAG_LIMIT_MS`: then the latencies
measure this machine, not the endpoint.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from typing import Any, Final, Literal, Protocol

from runtime.bench.conversations import Conversation
from runtime.bench.stats import summarize
from runtime.bench.ttft import (
    METRICS,
    BenchTarget,
    RequestResult,
    TTFTBenchmark,
    config_kind,
)
from runtime.errors import URLPolicyError
from runtime.llm.client import ChatClient

Mode = Literal["concurrency", "rate"]

DEFAULT_ENDPOINTING_MS: Final = 300.0
"""voxloop's default endpointing silence (``TurnDetection.min_silence_ms``)."""
SLO_MARGIN_MS: Final = 500.0
"""What the default budget allows after the endpointing silence: a reply heard
within about a second of the end of speech (first segment + first TTS audio)."""
DEFAULT_FIRST_SENTENCE_MS: Final = DEFAULT_ENDPOINTING_MS + SLO_MARGIN_MS
TARGET_PASS_RATE: Final = 0.95
STEADY_FLOOR_MS: Final = 20.0
CLIENT_BUSY_LIMIT: Final = 0.8
CLIENT_LAG_LIMIT_MS: Final = 50.0
LAG_PROBE_S: Final = 0.05
SLO_METRICS: Final = (
    "headers_ms",
    "first_event_ms",
    "ttft_ms",
    "first_answer_ms",
    "first_sentence_ms",
    "ttst_ms",
    "tpot_ms",
    "e2e_ms",
)


@dataclass(frozen=True, slots=True)
class SweepSpec:
    """``concurrency=1,2,4`` or ``rate=0.5,1,2`` (requests or calls per second)."""

    mode: Mode
    values: tuple[float, ...]

    @classmethod
    def parse(cls, text: str) -> SweepSpec:
        """Raises: ValueError with a one-line reason."""
        mode, sep, rest = text.partition("=")
        mode = mode.strip()
        if not sep or mode not in ("concurrency", "rate"):
            raise ValueError("--sweep takes concurrency=N,N,… or rate=R,R,…")
        try:
            values = tuple(float(v) for v in rest.split(",") if v.strip())
        except ValueError:
            raise ValueError(f"--sweep {mode}= takes numbers separated by commas") from None
        if not values:
            raise ValueError(f"--sweep {mode}= needs at least one value")
        if mode == "concurrency" and any(v < 1 or v != int(v) for v in values):
            raise ValueError("--sweep concurrency= takes whole numbers of at least 1")
        if mode == "rate" and any(not v > 0 for v in values):
            raise ValueError("--sweep rate= takes positive rates (requests per second)")
        if list(values) != sorted(set(values)):
            raise ValueError("--sweep values must increase")
        return cls("concurrency" if mode == "concurrency" else "rate", values)

    def label(self, value: float) -> str:
        return str(int(value)) if self.mode == "concurrency" else f"{value:g}"


@dataclass(frozen=True, slots=True)
class SLO:
    """Latency budgets a turn must meet (ms); a request passes when it meets all of them."""

    budgets: tuple[tuple[str, float], ...] = (("first_sentence_ms", DEFAULT_FIRST_SENTENCE_MS),)

    @classmethod
    def parse(cls, items: Sequence[str]) -> SLO:
        """``["first_sentence_ms=800", "ttft_ms=400"]``; empty gives the default.

        Raises: ValueError with a one-line reason.
        """
        if not items:
            return cls()
        budgets: dict[str, float] = {}
        for item in items:
            metric, sep, value = item.partition("=")
            metric = metric.strip()
            if not sep or metric not in SLO_METRICS:
                names = ", ".join(SLO_METRICS)
                raise ValueError(f"--slo takes METRIC=MS with METRIC one of {names}")
            try:
                budget = float(value)
            except ValueError:
                raise ValueError(f"--slo {metric}= takes a number of milliseconds") from None
            if not budget > 0:
                raise ValueError(f"--slo {metric}= must be positive")
            budgets[metric] = budget
        return cls(tuple(budgets.items()))

    @property
    def gate_metric(self) -> str:
        return self.budgets[0][0]

    def passes(self, result: RequestResult) -> bool:
        if not result.ok:
            return False
        for metric, budget in self.budgets:
            value = getattr(result, metric)
            if value is None or value > budget:
                return False
        return True

    def to_json(self) -> dict[str, Any]:
        return {"budgets_ms": dict(self.budgets), "target_pass_rate": TARGET_PASS_RATE}


@dataclass(frozen=True, slots=True)
class PassRate:
    passed: int
    total: int

    @property
    def rate(self) -> float | None:
        return self.passed / self.total if self.total else None


def pass_rate(results: Sequence[RequestResult], slo: SLO) -> PassRate:
    """Passes over all measured requests (a failed request is a miss)."""
    return PassRate(sum(slo.passes(r) for r in results), len(results))


@dataclass(frozen=True, slots=True)
class StepSettings:
    """How long each step runs (see the module docstring)."""

    duration_s: float = 20.0
    warmup_s: float = 3.0
    min_requests: int = 20
    extensions: int = 1
    steady_tolerance: float = 0.25
    stop_below: float = 0.5
    seed: int = 0
    think_scale: float = 1.0

    def __post_init__(self) -> None:
        if not self.duration_s > 0:
            raise ValueError("--step-seconds must be positive")
        if self.warmup_s < 0:
            raise ValueError("--step-warmup must not be negative")
        if self.min_requests < 1:
            raise ValueError("--step-min-requests must be at least 1")
        if self.extensions < 0:
            raise ValueError("--step-extensions must not be negative")
        if not 0 <= self.stop_below <= 1:
            raise ValueError("--stop-below must be a percentage within 0..100")
        if self.think_scale < 0:
            raise ValueError("--think-scale must not be negative")


@dataclass(slots=True)
class ClientLoad:
    """The client's own cost during a step (its event-loop thread)."""

    cpu_s: float
    wall_s: float
    requests: int
    lag_ms: list[float] = field(default_factory=list)

    @property
    def busy(self) -> float:
        return self.cpu_s / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def cpu_ms_per_request(self) -> float | None:
        return self.cpu_s * 1000 / self.requests if self.requests else None

    @property
    def lag_p99_ms(self) -> float | None:
        stats = summarize(self.lag_ms)
        return stats["p99"] if stats else None

    @property
    def bound_reason(self) -> str | None:
        if self.busy >= CLIENT_BUSY_LIMIT:
            return f"client event loop busy {self.busy:.0%} of the step"
        lag = self.lag_p99_ms
        if lag is not None and lag >= CLIENT_LAG_LIMIT_MS:
            return f"client event loop lag p99 {lag:.1f} ms"
        return None

    def to_json(self) -> dict[str, Any]:
        return {
            "cpu_ms_per_request": self.cpu_ms_per_request,
            "busy": self.busy,
            "loop_lag_p99_ms": self.lag_p99_ms,
            "bound": self.bound_reason is not None,
            "reason": self.bound_reason,
        }


@dataclass(slots=True)
class StepResult:
    """One load step of one endpoint: its measured requests and what they add up to."""

    load: float
    window_s: float
    results: list[RequestResult]
    client: ClientLoad
    runs: int = 1
    sent: int = 0
    completed: tuple[int, int] | None = None
    """(successful requests, their output tokens) that ended inside the window, whenever sent;
    ``None``: count the window's own requests."""

    def throughput(self) -> tuple[float, float]:
        """(successful requests, output tokens) per second of the window.

        Counted as completions inside the window, so an open loop above the endpoint's
        capacity shows the rate it was served at, not the rate requests arrived at.
        """
        if not self.window_s:
            return 0.0, 0.0
        if self.completed is None:
            ok = [r for r in self.results if r.ok]
            done, tokens = len(ok), sum(r.output_tokens for r in ok)
        else:
            done, tokens = self.completed
        return done / self.window_s, tokens / self.window_s

    def errors(self) -> dict[str, int]:
        return dict(Counter(r.error for r in self.results if r.error))

    def samples(self, metric: str, results: Sequence[RequestResult] | None = None) -> list[float]:
        ok = [r for r in (self.results if results is None else results) if r.ok]
        if metric == "itl_ms":
            return [gap for r in ok for gap in r.itl_ms]
        values = (getattr(r, metric) for r in ok)
        return [v for v in values if v is not None]

    def halves(self, metric: str) -> tuple[float | None, float | None]:
        """p50 of ``metric`` over the first and the second half of the window (by send time)."""
        timed = sorted((r for r in self.results if r.started_ns is not None),
                       key=lambda r: r.started_ns or 0)  # fmt: skip
        mid = len(timed) // 2
        out: list[float | None] = []
        for part in (timed[:mid], timed[mid:]):
            stats = summarize(self.samples(metric, part))
            out.append(stats["p50"] if stats and stats["n"] >= 3 else None)
        return out[0], out[1]

    def steady(self, metric: str, tolerance: float) -> bool:
        first, second = self.halves(metric)
        if first is None or second is None:
            return not self.samples(metric)  # nothing measurable: nothing to extend for
        if abs(second - first) <= STEADY_FLOOR_MS:
            return True  # jitter of a few ms on a fast endpoint is not a drift
        ratio = second / first if first > 0 else float("inf")
        return 1 / (1 + tolerance) <= ratio <= 1 + tolerance

    def to_json(self, slo: SLO, tolerance: float) -> dict[str, Any]:
        ok = [r for r in self.results if r.ok]
        rps, tps = self.throughput()
        rate = pass_rate(self.results, slo)
        first, second = self.halves(slo.gate_metric)
        first_messages: dict[str, str] = {}
        for r in self.results:
            if r.error and r.error not in first_messages:
                first_messages[r.error] = r.message or ""
        return {
            "load": self.load,
            "window_s": self.window_s,
            "runs": self.runs,
            "requests": len(self.results),
            "ok": len(ok),
            "errors": self.errors(),
            "error_messages": first_messages,
            "throughput": {"requests_per_s": rps, "output_tokens_per_s": tps},
            "metrics": {m: summarize(self.samples(m)) for m in METRICS},
            "slo": {"passed": rate.passed, "total": rate.total, "pass_rate": rate.rate},
            "steady": {
                "steady": self.steady(slo.gate_metric, tolerance),
                "metric": slo.gate_metric,
                "first_half_p50_ms": first,
                "second_half_p50_ms": second,
            },
            "client": self.client.to_json(),
        }


def knee(
    loads: Sequence[float], rates: Sequence[float | None], target: float = TARGET_PASS_RATE
) -> tuple[float | None, float | None]:
    """The largest load whose step and every lighter one pass ≥ ``target``, and the first
    load that fails (``None`` where there is none)."""
    best: float | None = None
    for load, rate in zip(loads, rates, strict=True):
        if rate is None or rate < target:
            return best, load
        best = load
    return best, None


# -- time -----------------------------------------------------------------------


class Timer(Protocol):
    """Seconds on a monotonic clock, and sleeping on it (real, or virtual in tests)."""

    def now(self) -> float: ...

    async def sleep(self, seconds: float) -> None: ...


class LoopTimer:
    """The real clock: ``time.perf_counter`` and ``asyncio.sleep``."""

    def now(self) -> float:
        return time.perf_counter()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds))


def poisson_gaps(rate: float, rng: random.Random) -> Iterator[float]:
    """Exponential gaps (s) between arrivals of a Poisson process of ``rate`` per second."""
    while True:
        yield rng.expovariate(rate)


async def dispatch_poisson(
    rate: float,
    until: Callable[[], bool],
    launch: Callable[[], None],
    timer: Timer,
    rng: random.Random,
) -> int:
    """Call ``launch()`` at Poisson arrival times while ``until()`` is false; returns arrivals.

    Arrivals are scheduled on absolute times (the sum of the gaps from the
    start), so a late wake-up does not shift the ones after it.
    """
    start = timer.now()
    at = start
    count = 0
    for gap in poisson_gaps(rate, rng):
        at += gap
        delay = at - timer.now()
        if delay > 0:
            await timer.sleep(delay)
        if until():
            return count
        launch()
        count += 1
    return count  # pragma: no cover - the generator is endless


@asynccontextmanager
async def measure_client(requests: Callable[[], int]) -> AsyncIterator[ClientLoad]:
    """Measure the event-loop thread's CPU time and timer lag while the block runs."""
    load = ClientLoad(cpu_s=0.0, wall_s=0.0, requests=0)
    cpu0, wall0 = time.thread_time(), time.perf_counter()

    async def probe() -> None:
        while True:
            t = time.perf_counter()
            await asyncio.sleep(LAG_PROBE_S)
            load.lag_ms.append(max(0.0, (time.perf_counter() - t - LAG_PROBE_S) * 1000))

    task = asyncio.create_task(probe())
    try:
        yield load
    finally:
        task.cancel()
        with suppress(asyncio.CancelledError):
            await task
        load.cpu_s = time.thread_time() - cpu0
        load.wall_s = time.perf_counter() - wall0
        load.requests = requests()


# -- running a step ---------------------------------------------------------------


@dataclass(slots=True)
class Workload:
    """What callers send: single prompts from the benchmark, or conversations."""

    conversations: Sequence[Conversation] | None = None
    _next: int = 0

    def next_conversation(self) -> Conversation | None:
        if not self.conversations:
            return None
        conversation = self.conversations[self._next % len(self.conversations)]
        self._next += 1
        return conversation


class StepRunner:
    """Runs steps against one endpoint with one open client."""

    def __init__(
        self,
        bench: TTFTBenchmark,
        client: ChatClient,
        target: BenchTarget,
        mode: Mode,
        settings: StepSettings,
        workload: Workload,
        *,
        timer: Timer | None = None,
    ) -> None:
        self.bench = bench
        self.client = client
        self.target = target
        self.mode = mode
        self.settings = settings
        self.workload = workload
        self.timer = timer or LoopTimer()
        self._rng = random.Random(settings.seed)

    async def run(self, load: float, duration_s: float) -> StepResult:
        s = self.settings
        timer = self.timer
        t0 = timer.now()
        measure_from = t0 + s.warmup_s
        soft_end = measure_from + duration_s
        hard_end = measure_from + 3 * duration_s
        measured: list[RequestResult] = []
        ended: list[tuple[float, int]] = []  # (when, output tokens) of every successful request
        sent = 0
        in_window = 0
        stop_at: float | None = None

        def stopped() -> bool:
            nonlocal stop_at
            if stop_at is not None:
                return True
            now = timer.now()
            if now < soft_end or (in_window < s.min_requests and now < hard_end):
                return False
            stop_at = now
            return True

        async def send(messages: list[dict[str, Any]] | None) -> RequestResult:
            nonlocal sent, in_window
            counted = timer.now() >= measure_from
            sent += 1
            in_window += counted
            result = await self.bench.request(
                self.client, self.target, sent, "warm" if counted else "ramp", messages
            )
            if counted:
                measured.append(result)
            if result.ok:
                ended.append((timer.now(), result.output_tokens))
            return result

        async def session() -> None:
            conversation = self.workload.next_conversation()
            if conversation is None:
                await send(None)
                return
            history: list[dict[str, Any]] = [{"role": "system", "content": conversation.system}]
            reply = ""
            for i, turn in enumerate(conversation.turns):
                if i:
                    wake = timer.now() + conversation.think_s(i, reply) * s.think_scale
                    # think in short slices, so a step that ends is not held up by a long pause
                    while not stopped() and timer.now() < wake:
                        await timer.sleep(min(0.25, wake - timer.now()))
                    if stopped():
                        return
                history.append({"role": "user", "content": turn.user})
                result = await send(list(history))
                if not result.ok:
                    return  # the call failed: a caller would hang up
                reply = turn.assistant if turn.assistant is not None else result.reply
                history.append({"role": "assistant", "content": reply})

        async with measure_client(lambda: sent) as client_load:
            if self.mode == "concurrency":

                async def caller() -> None:
                    while not stopped():
                        await session()

                async with asyncio.TaskGroup() as tg:
                    for _ in range(int(load)):
                        tg.create_task(caller())
            else:
                async with asyncio.TaskGroup() as tg:

                    def launch() -> None:
                        tg.create_task(session())

                    await dispatch_poisson(load, stopped, launch, timer, self._rng)
        stopped()
        assert stop_at is not None
        window_s = max(1e-9, stop_at - measure_from)
        inside = [tokens for at, tokens in ended if measure_from <= at <= stop_at]
        return StepResult(
            load, window_s, measured, client_load, sent=sent, completed=(len(inside), sum(inside))
        )


class SweepController:
    """Runs the steps of a sweep in order, extending unsteady ones, stopping past saturation.

    Args:
        spec: the sweep.
        settings: step lengths and stopping rule.
        slo: budgets (the first metric is the steadiness check's).
        run_step: ``await run_step(load, duration_s)`` runs one step.
        on_step: called after every step run (progress).
    """

    def __init__(
        self,
        spec: SweepSpec,
        settings: StepSettings,
        slo: SLO,
        run_step: Callable[[float, float], Awaitable[StepResult]],
        on_step: Callable[[StepResult, bool], None] | None = None,
    ) -> None:
        self.spec = spec
        self.settings = settings
        self.slo = slo
        self._run_step = run_step
        self._on_step = on_step
        self.stopped_early = False

    async def run(self) -> list[StepResult]:
        steps: list[StepResult] = []
        s = self.settings
        for load in self.spec.values:
            duration = s.duration_s
            for run in range(1, s.extensions + 2):
                step = await self._run_step(load, duration)
                step.runs = run
                steady = step.steady(self.slo.gate_metric, s.steady_tolerance)
                if self._on_step is not None:
                    self._on_step(step, steady)
                if steady:
                    break
                duration *= 2
            steps.append(step)
            rate = pass_rate(step.results, self.slo).rate
            if s.stop_below > 0 and (rate is None or rate < s.stop_below):
                self.stopped_early = load != self.spec.values[-1]
                break
        return steps


@dataclass(slots=True)
class EndpointSweep:
    """A sweep of one endpoint: its cold request, its steps, and why it stopped."""

    target: BenchTarget
    steps: list[StepResult] = field(default_factory=list)
    cold: RequestResult | None = None
    stopped_early: bool = False
    error: str | None = None
    message: str | None = None

    def knee(self, slo: SLO) -> tuple[float | None, float | None]:
        rates = [pass_rate(s.results, slo).rate for s in self.steps]
        return knee([s.load for s in self.steps], rates)


async def sweep_targets(
    bench: TTFTBenchmark,
    spec: SweepSpec,
    settings: StepSettings,
    slo: SLO,
    workload: Workload,
    *,
    on_step: Callable[[BenchTarget, StepResult, bool], None] | None = None,
) -> list[EndpointSweep]:
    """Sweep every target of ``bench`` in turn (one cold request, the warm-up, then the steps).

    An endpoint whose client cannot be made (a key's environment variable not
    set, a URL the policy refuses) gets no steps and its error kind
    (``config``, ``url_policy``, ``dns``) and message; the others still run.
    """
    out: list[EndpointSweep] = []
    for target in bench.targets:
        sweep = EndpointSweep(target)
        out.append(sweep)
        try:
            client = bench.client_for(target)
        except (URLPolicyError, ValueError) as exc:
            sweep.error = config_kind(exc)
            sweep.message = str(exc)
            continue
        async with client:
            sweep.cold = await bench.request(client, target, 0, "cold")
            for i in range(bench.settings.warmup):
                await bench.request(client, target, i, "warmup")
            runner = StepRunner(bench, client, target, spec.mode, settings, workload)

            def progress(step: StepResult, steady: bool, target: BenchTarget = target) -> None:
                if on_step is not None:
                    on_step(target, step, steady)

            controller = SweepController(spec, settings, slo, runner.run, progress)
            sweep.steps = await controller.run()
            sweep.stopped_early = controller.stopped_early
    return out
