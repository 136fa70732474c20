"""The time-to-first-token benchmark: compares chat-completions endpoints.

Each endpoint gets one **cold** request on a fresh client (new TCP/TLS
connection, nothing resolved), ``warmup`` discarded requests, then
``requests`` measured **warm** requests with ``concurrency`` in flight. Every
request records the client's timestamps (see ``runtime.llm.client``), the
time the speech segmenter would release the first segment
(``first_sentence_ms``) and, on failure, the error kind and its message
(the key redacted). Failures and hangs are counted, never fatal: the deadline
(``timeout_s``) bounds every request.

With ``fallback=True`` the targets are one ``llm`` list instead, in order: every
request goes through the :class:`~runtime.llm.fallback.FallbackChatClient` a
session builds (every entry but the last without retries of its own, a
session's deadlines, circuits and early start). Each request then records which
entry answered (``entry``), which were skipped and why (``skipped``) and
``caller_ttft_ms``: from the request's start to the first token, connect and
the entries that failed included — the wait the caller hears.

Error kinds are the endpoint client's (``auth``, ``rate_limit``, ``server``,
``rejected``, ``timeout``, ``stall``, ``malformed``, ``dropped``,
``connect``, ``tls``) plus ``dns`` (the host name does not resolve),
``url_policy`` (the URL or an address it resolves to is not allowed) and
``config`` (e.g. the key's environment variable is not set). Each report
keeps the first message of every kind.
"""

from __future__ import annotations

import asyncio
import csv
import json
import logging
import os
import tomllib
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final

from runtime.bench.files import read_utf8
from runtime.bench.stats import summarize
from runtime.clock import Clock, MonotonicClock, ns_to_ms
from runtime.endpoints import Resolver, URLPolicy, has_user_info
from runtime.errors import EndpointError, URLPolicyError
from runtime.llm.client import (
    ChatClient,
    ChatRequest,
    ClientTimeouts,
    Endpoint,
    RetryPolicy,
)
from runtime.llm.fallback import FallbackChatClient, FallbackStream
from runtime.llm.stream import TextDelta
from runtime.secret import Secret
from runtime.speech.text import SpeechSegmenter

log = logging.getLogger("voxloop.bench")

METRICS: Final = (
    "headers_ms",
    "first_event_ms",
    "ttft_ms",
    "first_answer_ms",
    "first_sentence_ms",
    "ttst_ms",
    "itl_ms",
    "tpot_ms",
    "e2e_ms",
    "tokens_per_s",
)

VOICE_SYSTEM_PROMPT: Final = (
    "You are a friendly voice assistant for Northwind Outfitters. Your replies are "
    "spoken aloud: answer in one or two short sentences, no lists, no markdown, no emoji. "
    "Say numbers, dates and times the way a person would say them."
)

VOICE_CONTEXT: Final[tuple[dict[str, str], ...]] = (
    {"role": "assistant", "content": "Hi, thanks for calling Northwind. How can I help you today?"},
    {"role": "user", "content": "Hi, I ordered a rain jacket last week and wanted to check on it."},
    {
        "role": "assistant",
        "content": "Happy to help. Could you tell me the order number or the email on the order?",
    },
    {"role": "user", "content": "Sure, it's under jamie dot lee at example dot com."},
    {
        "role": "assistant",
        "content": "Thanks, Jamie. I found an order for a storm shell jacket in navy, size medium.",
    },
)

# The caller's latest turn changes from request to request, as in a real
# conversation: endpoints may reuse the shared prefix (prompt caching) but
# cannot answer from a cache of the whole prompt.
VOICE_QUESTIONS: Final = (
    "That's the one. When is it going to arrive?",
    "Can I still change the delivery address?",
    "Is it possible to swap it for a large instead?",
    "What's your return policy if it doesn't fit?",
    "Could you send the tracking number to my email?",
    "Will I need to sign for the package?",
    "Do you have the same jacket in forest green?",
    "How long does a refund usually take?",
)


def voice_messages(system_prompt: str = VOICE_SYSTEM_PROMPT, turn: int = 0) -> list[dict[str, str]]:
    """The default prompt: a voice-style system prompt, a realistic multi-turn context,
    and the caller's latest question (``turn`` picks one)."""
    question = VOICE_QUESTIONS[turn % len(VOICE_QUESTIONS)]
    return [
        {"role": "system", "content": system_prompt},
        *VOICE_CONTEXT,
        {"role": "user", "content": question},
    ]


@dataclass(frozen=True, slots=True)
class BenchTarget:
    """One endpoint to benchmark (the key is read from ``api_key_env`` at run time)."""

    name: str
    base_url: str
    model: str
    api_key_env: str | None = None


@dataclass(frozen=True, slots=True)
class BenchSettings:
    requests: int = 20
    warmup: int = 2
    concurrency: int = 1
    timeout_s: float = 30.0
    max_tokens: int | None = 128
    http2: bool = False

    def __post_init__(self) -> None:
        if self.requests < 1:
            raise ValueError("--requests must be at least 1")
        if self.warmup < 0:
            raise ValueError("--warmup must not be negative")
        if self.concurrency < 1:
            raise ValueError("--concurrency must be at least 1")
        if not self.timeout_s > 0:
            raise ValueError("--timeout must be positive")


@dataclass(slots=True)
class RequestResult:
    endpoint: str
    index: int
    phase: str  # "cold" | "warmup" | "warm"
    ok: bool
    error: str | None = None
    message: str | None = None
    new_connection: bool = False
    headers_ms: float | None = None
    first_event_ms: float | None = None
    ttft_ms: float | None = None
    first_answer_ms: float | None = None
    first_sentence_ms: float | None = None
    ttst_ms: float | None = None
    tpot_ms: float | None = None
    e2e_ms: float | None = None
    output_tokens: int = 0
    tokens_per_s: float | None = None
    itl_ms: list[float] = field(default_factory=list)
    started_ns: int | None = None
    reply: str = ""
    # Fallback runs: the entry that answered, the entries skipped ``(index, reason)``,
    # and the wait from the request's start to the first token (ms).
    entry: int | None = None
    skipped: list[tuple[int, str]] = field(default_factory=list)
    caller_ttft_ms: float | None = None


@dataclass(slots=True)
class EndpointReport:
    target: BenchTarget
    results: list[RequestResult] = field(default_factory=list)
    entries: list[BenchTarget] = field(default_factory=list)
    """A fallback run's ``llm`` list, in order (empty for one endpoint)."""

    @property
    def warm(self) -> list[RequestResult]:
        return [r for r in self.results if r.phase == "warm"]

    @property
    def cold(self) -> RequestResult | None:
        return next((r for r in self.results if r.phase == "cold"), None)

    def errors(self) -> dict[str, int]:
        return dict(Counter(r.error for r in self.warm if r.error))

    def error_messages(self) -> dict[str, str]:
        """The first message of each error kind, over every phase (cold included)."""
        first: dict[str, str] = {}
        for r in self.results:
            if r.error and r.error not in first:
                first[r.error] = r.message or ""
        return first

    def metric_samples(self, metric: str) -> list[float]:
        ok = [r for r in self.warm if r.ok]
        if metric == "itl_ms":
            return [gap for r in ok for gap in r.itl_ms]
        values = (getattr(r, metric) for r in ok)
        return [v for v in values if v is not None]

    def to_json(self, passes: Callable[[RequestResult], bool] | None = None) -> dict[str, Any]:
        """The summary; with ``passes`` (an SLO check) also ``slo``: passed/total/pass_rate."""
        cold = self.cold
        slo: dict[str, Any] = {}
        if passes is not None:
            warm = self.warm
            passed = sum(passes(r) for r in warm)
            rate = passed / len(warm) if warm else None
            slo = {"slo": {"passed": passed, "total": len(warm), "pass_rate": rate}}
        fallback: dict[str, Any] = {}
        if self.entries:
            fallback = {"fallback": self.fallback_json()}
        return {
            **slo,
            **fallback,
            "name": self.target.name,
            "base_url": self.target.base_url,
            "model": self.target.model,
            "requests": len(self.warm),
            "ok": sum(r.ok for r in self.warm),
            "errors": self.errors(),
            "error_messages": self.error_messages(),
            "metrics": {m: summarize(self.metric_samples(m)) for m in METRICS},
            "cold": None
            if cold is None
            else {
                "ok": cold.ok,
                "error": cold.error,
                "message": cold.message,
                "ttft_ms": cold.ttft_ms,
                "headers_ms": cold.headers_ms,
                "e2e_ms": cold.e2e_ms,
            },
        }

    def fallback_json(self) -> dict[str, Any]:
        """A fallback run: the entries, who answered the warm requests, the caller's
        TTFT and every request (cold and warm-up included) with its entry and skips."""
        names = [t.name for t in self.entries]

        def name(index: int | None) -> str | None:
            return None if index is None else names[index]

        answered = Counter(name(r.entry) for r in self.warm if r.ok)
        return {
            "entries": [
                {"name": t.name, "base_url": t.base_url, "model": t.model} for t in self.entries
            ],
            "answered_by": {n: answered.get(n, 0) for n in names},
            "caller_ttft_ms": summarize(
                [r.caller_ttft_ms for r in self.warm if r.ok and r.caller_ttft_ms is not None]
            ),
            "requests": [
                {
                    "phase": r.phase,
                    "index": r.index,
                    "ok": r.ok,
                    "entry": name(r.entry),
                    "skipped": [{"entry": names[i], "reason": why} for i, why in r.skipped],
                    "caller_ttft_ms": r.caller_ttft_ms,
                    "ttft_ms": r.ttft_ms,
                    "error": r.error,
                }
                for r in self.results
            ],
        }


def load_targets(path: Path) -> list[BenchTarget]:
    """Read ``[[endpoints]]`` tables (``name``, ``base_url``, ``model``, ``api_key_env``).

    Raises:
        ValueError: the file is missing, not TOML, or an entry is incomplete.
    """
    text = read_utf8(path)
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"{path} is not valid TOML: {exc}") from None
    entries = doc.get("endpoints")
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"{path} has no [[endpoints]] tables")
    targets = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise ValueError(f"{path}: endpoints[{i}] is not a table")
        for key in ("base_url", "model"):
            if key not in entry:
                raise ValueError(f"{path}: endpoints[{i}].{key} is required (a string)")
        for key in ("name", "base_url", "model", "api_key_env"):
            if key in entry and (not isinstance(entry[key], str) or not entry[key]):
                raise ValueError(f"{path}: endpoints[{i}].{key} must be a non-empty string")
        if has_user_info(entry["base_url"]):
            raise ValueError(
                f"{path}: endpoints[{i}].base_url holds user information (user:password@): "
                "keys go in the environment variable api_key_env names, never in a URL"
            )
        key_env = entry.get("api_key_env")
        unknown = set(entry) - {"name", "base_url", "model", "api_key_env"}
        if unknown:
            raise ValueError(
                f"{path}: endpoints[{i}] has unknown keys: {', '.join(sorted(unknown))}"
            )
        targets.append(
            BenchTarget(
                name=entry.get("name") or entry["base_url"],
                base_url=entry["base_url"],
                model=entry["model"],
                api_key_env=key_env,
            )
        )
    return targets


def load_prompts(path: Path) -> list[list[dict[str, Any]]]:
    """Read prompts from JSON Lines: ``{"prompt": "text"}`` or ``{"messages": [...]}`` per line.

    Raises:
        ValueError: unreadable file, bad JSON, or a line of neither form.
    """
    lines = read_utf8(path).splitlines()
    prompts: list[list[dict[str, Any]]] = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            doc = json.loads(line)
        except ValueError:
            raise ValueError(f"{path}:{number}: not valid JSON") from None
        if isinstance(doc, dict) and isinstance(doc.get("prompt"), str):
            prompts.append([{"role": "user", "content": doc["prompt"]}])
        elif (
            isinstance(doc, dict)
            and isinstance(doc.get("messages"), list)
            and doc["messages"]
            and all(isinstance(m, dict) and "role" in m for m in doc["messages"])
        ):
            prompts.append(doc["messages"])
        else:
            expected = '{"prompt": …} or {"messages": [...]}'
            raise ValueError(f"{path}:{number}: expected {expected}")
    if not prompts:
        raise ValueError(f"{path} has no prompts")
    return prompts


ProgressHook = Callable[[str, RequestResult], None]


class TTFTBenchmark:
    """Runs the benchmark for a list of targets.

    Args:
        targets: endpoints to compare (run one after another, so they do not
            compete for this machine's CPU).
        settings: request counts, concurrency and deadline.
        prompts: message lists used in turn by successive requests; the
            default is :func:`voice_messages` with a changing last question.
        policy: URL policy (the operator's: local endpoints are allowed).
        resolver: host resolver (injectable).
        clock: monotonic clock.
        on_result: called after every request (progress display).
        fallback: the targets are one ``llm`` list (see the module docstring).
    """

    def __init__(
        self,
        targets: Sequence[BenchTarget],
        settings: BenchSettings,
        *,
        prompts: Sequence[Sequence[dict[str, Any]]] | None = None,
        policy: URLPolicy | None = None,
        resolver: Resolver | None = None,
        clock: Clock | None = None,
        on_result: ProgressHook | None = None,
        env: dict[str, str] | None = None,
        fallback: bool = False,
    ) -> None:
        if fallback and len(targets) < 2:
            raise ValueError("a fallback run needs at least two endpoints")
        self.fallback = fallback
        self.targets = list(targets)
        self.settings = settings
        self.prompts = [list(p) for p in prompts] if prompts else None
        self._policy = policy or URLPolicy.operator()
        self._resolver = resolver
        self._clock = clock or MonotonicClock()
        self._on_result = on_result
        self._env = env if env is not None else dict(os.environ)
        self._sent = 0

    def _client(
        self,
        target: BenchTarget,
        *,
        timeouts: ClientTimeouts | None = None,
        retry: RetryPolicy | None = None,
    ) -> ChatClient:
        key: Secret | None = None
        if target.api_key_env:
            value = self._env.get(target.api_key_env)
            if value is None:
                raise ValueError(f"environment variable {target.api_key_env} is not set")
            key = Secret(value)
        t = self.settings.timeout_s
        return ChatClient(
            Endpoint(target.base_url, target.model, key, target.name),
            policy=self._policy,
            resolver=self._resolver,
            clock=self._clock,
            timeouts=timeouts
            or ClientTimeouts(connect_s=t, first_token_s=t, first_token_budget_s=t, stall_s=t),
            retry=retry or RetryPolicy(max_attempts=1),
            http2=self.settings.http2,
        )

    def _fallback_client(self) -> FallbackChatClient:
        """The targets as a session's ``llm`` list: a session's deadlines, every entry
        but the last without retries of its own."""
        for t in self.targets:
            if t.api_key_env and t.api_key_env not in self._env:
                raise ValueError(f"environment variable {t.api_key_env} is not set")
        last = len(self.targets) - 1
        clients = [
            self._client(
                t,
                timeouts=ClientTimeouts(),
                retry=RetryPolicy() if i == last else RetryPolicy(max_attempts=1),
            )
            for i, t in enumerate(self.targets)
        ]
        return FallbackChatClient(clients, clock=self._clock)

    async def run(self) -> list[EndpointReport]:
        if self.fallback:
            return [await self.run_target(self.fallback_target())]
        return [await self.run_target(target) for target in self.targets]

    def fallback_target(self) -> BenchTarget:
        """The one target a fallback run reports on (named ``fallback``; its URL and
        model are the first entry's)."""
        first = self.targets[0]
        return BenchTarget(name="fallback", base_url=first.base_url, model=first.model)

    async def run_target(self, target: BenchTarget) -> EndpointReport:
        report = EndpointReport(target, entries=list(self.targets) if self.fallback else [])
        client: ChatClient | FallbackChatClient
        try:
            client = self._fallback_client() if self.fallback else self._client(target)
        except (URLPolicyError, ValueError) as exc:
            kind, message = config_kind(exc), str(exc)
            report.results.extend(
                RequestResult(target.name, i, "warm", ok=False, error=kind, message=message)
                for i in range(self.settings.requests)
            )
            self._notify(target, report.results[0])
            return report
        async with client:
            report.results.append(await self._one(client, target, 0, "cold"))
            self._notify(target, report.results[-1])
            for i in range(self.settings.warmup):
                report.results.append(await self._one(client, target, i, "warmup"))
                self._notify(target, report.results[-1])
            report.results.extend(await self._warm(client, target))
        return report

    async def _warm(
        self, client: ChatClient | FallbackChatClient, target: BenchTarget
    ) -> list[RequestResult]:
        results: list[RequestResult] = []
        pending = iter(range(self.settings.requests))

        async def worker() -> None:
            for i in pending:
                result = await self._one(client, target, i, "warm")
                results.append(result)
                self._notify(target, result)

        async with asyncio.TaskGroup() as tg:
            for _ in range(min(self.settings.concurrency, self.settings.requests)):
                tg.create_task(worker())
        results.sort(key=lambda r: r.index)
        return results

    @staticmethod
    def _redacted(client: ChatClient | FallbackChatClient, message: str) -> str:
        key = client.endpoint.api_key
        return key.redact(message) if key is not None else message

    def _notify(self, target: BenchTarget, result: RequestResult) -> None:
        if result.error:
            log.info(
                "%s: %s request %d failed (%s): %s",
                target.name, result.phase, result.index, result.error, result.message,
            )  # fmt: skip
        if self._on_result is not None:
            self._on_result(target.name, result)

    def next_messages(self) -> list[dict[str, Any]]:
        """The next prompt in turn (``--prompts`` or the default voice conversation)."""
        self._sent += 1
        if self.prompts:
            return self.prompts[(self._sent - 1) % len(self.prompts)]
        return voice_messages(turn=self._sent)

    async def request(
        self,
        client: ChatClient,
        target: BenchTarget,
        index: int,
        phase: str,
        messages: Sequence[dict[str, Any]] | None = None,
    ) -> RequestResult:
        """Send one streamed request and measure it (failures are recorded, never raised)."""
        return await self._one(client, target, index, phase, messages)

    def client_for(self, target: BenchTarget) -> ChatClient:
        """A new client for ``target`` (closed by the caller: ``async with``).

        Raises:
            ValueError: the key's environment variable is not set.
            URLPolicyError: the URL is not allowed.
        """
        return self._client(target)

    async def _one(
        self,
        client: ChatClient | FallbackChatClient,
        target: BenchTarget,
        index: int,
        phase: str,
        messages: Sequence[dict[str, Any]] | None = None,
    ) -> RequestResult:
        if messages is None:
            messages = self.next_messages()
        request = ChatRequest(messages=list(messages), max_tokens=self.settings.max_tokens)
        result = RequestResult(target.name, index, phase, ok=False)
        result.started_ns = self._clock.now_ns()
        segmenter = SpeechSegmenter()
        first_segment_ns: int | None = None
        stream: Any = None
        reply: list[str] = []
        try:
            async with client.stream(request) as stream:
                async for event in stream:
                    if not isinstance(event, TextDelta):
                        continue
                    reply.append(event.text)
                    if first_segment_ns is None and segmenter.push(event.text):
                        first_segment_ns = self._clock.now_ns()
                if first_segment_ns is None and segmenter.flush():
                    first_segment_ns = self._clock.now_ns()
            result.ok = True
        except URLPolicyError as exc:
            result.error = config_kind(exc)
            result.message = self._redacted(client, str(exc))
            return result
        except EndpointError as exc:
            result.error = exc.kind
            result.message = self._redacted(client, str(exc))
        if stream is None:
            return result
        if isinstance(stream, FallbackStream):
            result.entry = stream.entry if result.ok else None
            result.skipped = list(stream.skipped)
        t = stream.timings
        if t.first_token_ns is not None and result.started_ns is not None:
            result.caller_ttft_ms = ns_to_ms(t.first_token_ns - result.started_ns)
        result.new_connection = t.new_connection
        result.headers_ms = t.headers_ms
        result.first_event_ms = t.first_event_ms
        result.ttft_ms = t.ttft_ms
        result.first_answer_ms = t.first_answer_ms
        if first_segment_ns is not None and t.sent_ns is not None:
            result.first_sentence_ms = ns_to_ms(first_segment_ns - t.sent_ns)
        result.itl_ms = t.itl_ms
        if result.itl_ms:
            result.ttst_ms = result.itl_ms[0]
        result.reply = "".join(reply)
        result.tpot_ms = t.tpot_ms
        result.e2e_ms = t.e2e_ms
        result.output_tokens = t.output_tokens
        if result.ok and t.tpot_ms and result.output_tokens > 1:
            result.tokens_per_s = 1000.0 / t.tpot_ms
        return result


def config_kind(exc: Exception) -> str:
    """The error kind of a client that cannot be made: ``dns``, ``url_policy`` or ``config``."""
    if isinstance(exc, URLPolicyError):
        return "dns" if exc.reason == "unresolvable" else "url_policy"
    return "config"


def write_json(
    reports: Sequence[EndpointReport],
    path: Path,
    extra: dict[str, Any] | None = None,
    *,
    passes: Callable[[RequestResult], bool] | None = None,
) -> None:
    doc: dict[str, Any] = {"endpoints": [r.to_json(passes) for r in reports]}
    if extra:
        doc.update(extra)
    path.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")


CSV_FIELDS: Final = (
    "endpoint", "index", "phase", "ok", "error", "message", "new_connection", "headers_ms",
    "first_event_ms", "ttft_ms", "first_answer_ms", "first_sentence_ms", "ttst_ms", "tpot_ms",
    "e2e_ms", "output_tokens", "tokens_per_s", "itl_ms_mean", "entry", "skipped",
    "caller_ttft_ms",
)  # fmt: skip


def csv_row(r: RequestResult) -> dict[str, Any]:
    """One request as a CSV row (``CSV_FIELDS``; ``skipped`` as ``index:reason`` pairs)."""
    row = asdict(r)
    row.pop("started_ns")
    row.pop("reply")
    gaps = row.pop("itl_ms")
    row["itl_ms_mean"] = sum(gaps) / len(gaps) if gaps else None
    row["skipped"] = " ".join(f"{i}:{why}" for i, why in r.skipped)
    return row


def write_csv(reports: Sequence[EndpointReport], path: Path) -> None:
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=CSV_FIELDS)
        writer.writeheader()
        for report in reports:
            for r in report.results:
                writer.writerow(csv_row(r))


def write_plot(reports: Sequence[EndpointReport], path: Path) -> None:
    """Distributions per endpoint side by side (PNG, SVG or a self-contained HTML page).

    Raises:
        ValueError: the suffix is not supported or matplotlib is not installed.
    """
    suffix = path.suffix.lower()
    if suffix not in (".png", ".svg", ".html"):
        raise ValueError("--plot must end in .png, .svg or .html")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ValueError("plotting needs matplotlib: pip install 'voxloop[plot]'") from None
    import io

    shown = ("ttft_ms", "first_sentence_ms", "itl_ms", "e2e_ms")
    fig, axes = plt.subplots(1, len(shown), figsize=(4 * len(shown), 4.2))
    names = [r.target.name for r in reports]
    for ax, metric in zip(axes, shown, strict=True):
        data = [r.metric_samples(metric) or [float("nan")] for r in reports]
        ax.boxplot(data, showfliers=True)
        ax.set_xticks(range(1, len(names) + 1), names, rotation=20, ha="right")
        ax.set_title(metric)
        ax.set_ylabel("ms")
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle("voxloop bench ttft (warm requests)")
    fig.tight_layout()
    if suffix == ".html":
        buf = io.StringIO()
        fig.savefig(buf, format="svg")
        page = (
            "<!doctype html><meta charset='utf-8'><title>voxloop bench ttft</title>"
            f"<body style='font-family:sans-serif'>{buf.getvalue()}</body>\n"
        )
        path.write_text(page, encoding="utf-8")
    else:
        fig.savefig(path, dpi=110)
    plt.close(fig)
