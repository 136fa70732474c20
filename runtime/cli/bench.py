"""``voxloop bench ttft``: compare chat-completions endpoints by time to first token."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import sys
from pathlib import Path
from typing import Any

from runtime.cli.checks import add_ca_bundle_flag, no_user_info, use_ca_bundle, with_scheme
from runtime.cli.common import (
    EXIT_OK,
    CommandError,
    Parser,
    UsageError,
    check_outputs,
    fmt,
    require,
    rich_console,
    wrote,
)


def register(sub: Any) -> None:
    bench = sub.add_parser(
        "bench", help="benchmarks", description="Benchmarks of the endpoints voxloop talks to."
    )
    bench_sub = bench.add_subparsers(dest="bench_command", required=True, parser_class=Parser)
    p = bench_sub.add_parser(
        "ttft",
        help="compare chat-completions endpoints by time to first token",
        description="Measure headers/first event/TTFT/first answer/first sentence/ITL/TPOT/e2e "
        "per endpoint: one cold request, warm-up, then the measured warm requests.",
    )
    p.add_argument(
        "--base-url",
        action="append",
        default=[],
        help="endpoint base URL, e.g. https://host/v1 or host:port/v1 (repeatable)",
    )
    p.add_argument(
        "--model", action="append", default=[], help="model per --base-url (or one for all)"
    )
    p.add_argument("--name", action="append", default=[], help="display name per --base-url")
    p.add_argument(
        "--api-key-env", action="append", default=[], help="env var holding the key, per --base-url"
    )
    p.add_argument("--config", type=Path, help="TOML file with [[endpoints]] tables")
    add_ca_bundle_flag(p)
    p.add_argument(
        "--reference", action="store_true", help="also benchmark the built-in reference endpoint"
    )
    p.add_argument(
        "--reference-ttft-ms",
        type=float,
        default=200.0,
        help="the reference endpoint's time to first token, ms",
    )
    p.add_argument(
        "--reference-itl-ms",
        type=float,
        default=20.0,
        help="the reference endpoint's delay between tokens, ms",
    )
    p.add_argument("--requests", type=int, default=20, help="measured warm requests per endpoint")
    p.add_argument("--warmup", type=int, default=2, help="discarded requests after the cold one")
    p.add_argument("--concurrency", type=int, default=1, help="requests in flight at once")
    p.add_argument("--timeout", type=float, default=30.0, help="deadline per request, seconds")
    p.add_argument("--max-tokens", type=int, default=128, help="0 sends no max_tokens")
    p.add_argument("--http2", action="store_true", help="offer HTTP/2 (needs the http2 extra: h2)")
    p.add_argument(
        "--prompts",
        type=Path,
        help='JSON Lines of {"prompt": …} or {"messages": […]} (default: a voice conversation)',
    )
    p.add_argument("--json", type=Path, dest="json_path", help="write the summary as JSON")
    p.add_argument("--csv", type=Path, dest="csv_path", help="write one row per request")
    p.add_argument(
        "--plot",
        type=Path,
        dest="plot_path",
        help="write distributions (.png/.svg/.html; needs the plot extra: matplotlib)",
    )
    p.add_argument(
        "--reference-capacity",
        type=int,
        default=None,
        help="streams the reference endpoint decodes at once; more wait in a queue "
        "(default: unlimited)",
    )
    load = p.add_argument_group("load sweeps (see docs/benchmarking.md)")
    load.add_argument(
        "--sweep",
        metavar="concurrency=N,… | rate=R,…",
        help="one step per value: N callers in a closed loop, or Poisson arrivals of R per second",
    )
    load.add_argument(
        "--step-seconds", type=float, default=20.0, help="measured window of each step, seconds"
    )
    load.add_argument(
        "--step-warmup", type=float, default=3.0, help="unmeasured start of each step, seconds"
    )
    load.add_argument(
        "--step-min-requests",
        type=int,
        default=20,
        help="a step's window goes on until this many measured requests were sent",
    )
    load.add_argument(
        "--step-extensions",
        type=int,
        default=1,
        help="times an unsteady step is run again with a window twice as long",
    )
    load.add_argument(
        "--stop-below",
        type=float,
        default=50.0,
        help="stop the sweep after a step whose SLO pass rate is below this percentage "
        "(0 runs every step)",
    )
    load.add_argument("--seed", type=int, default=0, help="seed of the Poisson arrivals")
    load.add_argument(
        "--slo",
        action="append",
        default=[],
        metavar="METRIC=MS",
        help="latency budget a turn must meet (repeatable; default first_sentence_ms=800)",
    )
    load.add_argument(
        "--conversations",
        metavar="FILE.jsonl|builtin",
        help="replay multi-turn conversations (JSON Lines, a talk --metrics-json file, or "
        "'builtin')",
    )
    load.add_argument(
        "--think-scale",
        type=float,
        default=1.0,
        help="multiply the think time between conversation turns (0: none)",
    )
    load.add_argument(
        "--report", type=Path, dest="report_path", help="write the sweep as one HTML page"
    )
    load.add_argument(
        "--compare",
        nargs=2,
        type=Path,
        metavar=("A.json", "B.json"),
        help="show two --json results side by side with the changes marked (runs nothing)",
    )
    load.add_argument(
        "--threshold",
        type=float,
        default=10.0,
        help="--compare marks changes of at least this many percent",
    )
    p.add_argument(
        "--fallback",
        action="store_true",
        help="the --base-url endpoints are one llm list, in order: every request goes through "
        "the fallback client a session uses, and the report says per request which entry "
        "answered, which were skipped and why, and the TTFT the caller waits",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(handler=_cmd_bench_ttft)


def _targets_from_flags(args: argparse.Namespace) -> list[Any]:
    from runtime.bench.ttft import BenchTarget, load_targets

    targets: list[BenchTarget] = []
    if args.config is not None:
        targets.extend(load_targets(args.config))
    urls: list[str] = args.base_url
    n = len(urls)
    if not n:
        if args.model or args.name or args.api_key_env:
            raise ValueError("--model/--name/--api-key-env need a --base-url")
        return targets

    def per_url(values: list[str], flag: str, default: str | None) -> list[str | None]:
        if not values:
            if default is None and flag == "--model":
                raise ValueError("--model is required with --base-url")
            return [default] * n
        if len(values) == 1:
            return [values[0]] * n if flag != "--name" or n == 1 else _numbered(values[0], n)
        if len(values) != n:
            raise ValueError(f"give {flag} once, or once per --base-url ({n})")
        return list(values)

    models = per_url(args.model, "--model", None)
    names = per_url(args.name, "--name", None)
    keys = per_url(args.api_key_env, "--api-key-env", None)
    for url, model, name, key in zip(urls, models, names, keys, strict=True):
        assert model is not None
        no_user_info(url, "--base-url")
        url = with_scheme(url)
        # A key named on the command line must be there; one named in a --config
        # file is counted as a `config` error of that endpoint (the others still run).
        if key and key not in os.environ:
            raise ValueError(f"environment variable {key} is not set")
        targets.append(BenchTarget(name=name or url, base_url=url, model=model, api_key_env=key))
    return targets


def _numbered(name: str, n: int) -> list[str | None]:
    return [f"{name}-{i + 1}" for i in range(n)]


def _cmd_bench_ttft(args: argparse.Namespace) -> int:
    from runtime.bench.sweep import SLO
    from runtime.bench.ttft import BenchSettings, BenchTarget, load_prompts

    if args.compare is not None:
        return _cmd_compare(args.compare[0], args.compare[1], args.threshold)
    sweep = _sweep_options(args)
    try:
        slo = SLO.parse(args.slo)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    try:
        settings = BenchSettings(
            requests=args.requests,
            warmup=args.warmup,
            concurrency=args.concurrency,
            timeout_s=args.timeout,
            max_tokens=args.max_tokens or None,
            http2=args.http2,
        )
        targets = _targets_from_flags(args)
        prompts = load_prompts(args.prompts) if args.prompts is not None else None
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if not targets and not args.reference:
        raise UsageError("give at least one --base-url, a --config file, or --reference")
    if args.fallback:
        if sweep is not None or args.reference:
            raise UsageError(
                "--fallback runs one llm list: it does not combine with --reference or the "
                "load sweep options"
            )
        if len(targets) < 2:
            raise UsageError("--fallback needs at least two endpoints (repeat --base-url)")
    if args.plot_path is not None and args.plot_path.suffix.lower() not in (
        ".png",
        ".svg",
        ".html",
    ):
        raise UsageError("--plot must end in .png, .svg or .html")
    use_ca_bundle(args.ca_bundle)
    # Optional packages and output paths are checked now, not after the benchmark.
    if args.plot_path is not None:
        require("matplotlib")
    if args.http2:
        require("h2")
    reads = [("--config", args.config), ("--prompts", args.prompts)]
    if args.conversations not in (None, "builtin"):
        reads.append(("--conversations", Path(args.conversations)))
    check_outputs(
        [("--json", args.json_path), ("--csv", args.csv_path), ("--plot", args.plot_path),
         ("--report", args.report_path)],
        reads=reads,
    )  # fmt: skip
    from runtime.llm.reference import ReplyPlan

    try:
        reference_plan = ReplyPlan(ttft_ms=args.reference_ttft_ms, itl_ms=args.reference_itl_ms)
    except ValueError as exc:
        raise UsageError(f"reference {exc}") from None
    if args.reference_capacity is not None and args.reference_capacity < 1:
        raise UsageError("--reference-capacity must be at least 1")

    with contextlib.ExitStack() as stack:
        reference = None
        if args.reference:
            from runtime.bench.reference_thread import ReferenceThread

            reference = stack.enter_context(
                ReferenceThread(reference_plan, capacity=args.reference_capacity)
            )
            targets.append(
                BenchTarget(
                    name="reference", base_url=reference.base_url, model="voxloop-reference"
                )
            )
        if sweep is not None:
            return _run_sweep(args, targets, settings, prompts, slo, sweep)
        reports = _run_bench(targets, settings, prompts, quiet=args.quiet, fallback=args.fallback)
        extra: dict[str, Any] = {}
        if reference is not None:
            records = [r for r in reference.records() if r.path.endswith("/chat/completions")]
            server_ttft = [
                r.ttft_ms for r in records[-settings.requests :] if r.ttft_ms is not None
            ]
            if server_ttft:
                extra["reference_server"] = {
                    "ttft_ms_p50": statistics.median(server_ttft),
                    "configured_ttft_ms": args.reference_ttft_ms,
                }
    from runtime.bench.ttft import write_csv, write_json, write_plot

    # Files first: the tables below may go to a pipe that closes early.
    try:
        if args.json_path is not None:
            write_json(reports, args.json_path, extra, passes=slo.passes)
        if args.csv_path is not None:
            write_csv(reports, args.csv_path)
        if args.plot_path is not None:
            write_plot(reports, args.plot_path)
    except (OSError, ValueError) as exc:
        _print_reports(reports, extra)
        raise CommandError(f"cannot write results: {exc}") from None
    _print_reports(reports, extra)
    wrote(args.json_path, args.csv_path, args.plot_path)
    return EXIT_OK


def _sweep_options(args: argparse.Namespace) -> Any:
    """The sweep to run (``None`` for a plain run); --conversations/--report without
    --sweep make a one-step sweep at --concurrency."""
    from runtime.bench.sweep import StepSettings, SweepSpec

    try:
        if args.sweep is not None:
            spec = SweepSpec.parse(args.sweep)
        elif args.conversations is not None or args.report_path is not None:
            if args.concurrency < 1:
                raise ValueError("--concurrency must be at least 1")
            spec = SweepSpec("concurrency", (float(args.concurrency),))
        else:
            return None
        settings = StepSettings(
            duration_s=args.step_seconds,
            warmup_s=args.step_warmup,
            min_requests=args.step_min_requests,
            extensions=args.step_extensions,
            stop_below=args.stop_below / 100,
            seed=args.seed,
            think_scale=args.think_scale,
        )
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    return spec, settings


def _run_sweep(
    args: argparse.Namespace,
    targets: list[Any],
    settings: Any,
    prompts: list[Any] | None,
    slo: Any,
    sweep: tuple[Any, Any],
) -> int:
    from runtime.bench.conversations import BUILTIN, load_conversations
    from runtime.bench.report import sweep_document, write_html
    from runtime.bench.sweep import StepResult, Workload, sweep_targets
    from runtime.bench.ttft import TTFTBenchmark

    spec, step_settings = sweep
    conversations = None
    workload_doc: dict[str, Any] = {"kind": "prompts"}
    if args.conversations is not None:
        try:
            conversations = (
                list(BUILTIN)
                if args.conversations == "builtin"
                else load_conversations(Path(args.conversations))
            )
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        workload_doc = {
            "kind": "conversations",
            "source": args.conversations,
            "conversations": len(conversations),
            "turns": sum(len(c.turns) for c in conversations),
            "think_scale": step_settings.think_scale,
        }
    else:
        workload_doc["source"] = str(args.prompts) if args.prompts else "voice (default)"
    err = rich_console(stderr=True)

    def on_step(target: Any, step: StepResult, steady: bool) -> None:
        if args.quiet:
            return
        doc = step.to_json(slo, step_settings.steady_tolerance)
        fs = doc["metrics"].get(slo.gate_metric) or {}
        rate = doc["slo"]["pass_rate"]
        err.print(
            f"{target.name} {spec.mode}={spec.label(step.load)}: {doc['requests']} requests, "
            f"{slo.gate_metric} p50 {fmt(fs.get('p50'))} ms, "
            f"pass {'-' if rate is None else f'{rate:.1%}'}" + ("" if steady else " (not steady)"),
            highlight=False,
        )

    bench = TTFTBenchmark(targets, settings, prompts=prompts)
    results = asyncio.run(
        sweep_targets(bench, spec, step_settings, slo, Workload(conversations), on_step=on_step)
    )
    doc = sweep_document(
        results,
        spec,
        slo,
        settings={
            "step_seconds": step_settings.duration_s,
            "step_warmup_s": step_settings.warmup_s,
            "step_min_requests": step_settings.min_requests,
            "step_extensions": step_settings.extensions,
            "steady_tolerance": step_settings.steady_tolerance,
            "stop_below": step_settings.stop_below,
            "seed": step_settings.seed,
            "warmup": settings.warmup,
            "timeout_s": settings.timeout_s,
            "max_tokens": settings.max_tokens,
            "http2": settings.http2,
            "reference_capacity": args.reference_capacity if args.reference else None,
        },
        workload=workload_doc,
        steady_tolerance=step_settings.steady_tolerance,
    )
    try:
        if args.json_path is not None:
            args.json_path.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
        if args.report_path is not None:
            write_html(doc, args.report_path)
        if args.csv_path is not None:
            _write_sweep_csv(results, args.csv_path)
    except OSError as exc:
        _print_sweep(doc)
        raise CommandError(f"cannot write results: {exc}") from None
    _print_sweep(doc)
    return EXIT_OK


def _write_sweep_csv(sweeps: list[Any], path: Path) -> None:
    import csv

    from runtime.bench.ttft import CSV_FIELDS, csv_row

    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=("load", *CSV_FIELDS))
        writer.writeheader()
        for sweep in sweeps:
            for step in sweep.steps:
                for r in step.results:
                    writer.writerow({"load": step.load, **csv_row(r)})


def _print_sweep(doc: dict[str, Any]) -> None:
    from rich import box
    from rich.markup import escape
    from rich.table import Table

    console = rich_console()
    mode = doc["sweep"]["mode"]
    target = doc["slo"]["target_pass_rate"]
    budgets = ", ".join(f"{m} <= {v:g} ms" for m, v in doc["slo"]["budgets_ms"].items())
    for ep in doc["endpoints"]:
        if ep["error"]:
            console.print(escape(f"{ep['name']}: not run ({ep['error']}): {ep['message']}"))
            continue
        load = Table(
            title=escape(f"{ep['name']} - {ep['model']} @ {ep['base_url']}"),
            caption="* not steady; client: its CPU ms per request",
            box=box.SIMPLE_HEAD,
        )
        for column in (mode, "ok", "errors", "req/s", "out tok/s", "SLO pass", "client"):
            load.add_column(column, justify="left" if column == "errors" else "right")
        latency = Table(title=escape(f"{ep['name']}: latency, ms"), box=box.SIMPLE_HEAD)
        for column in (mode, "ttft p50", "ttft p95", "ttst p50", "1st sentence p50", "p95",
                       "p99", "e2e p50"):  # fmt: skip
            latency.add_column(column, justify="right")
        for s in ep["steps"]:
            m = s["metrics"]

            def st(metric: str, which: str, m: dict[str, Any] = m) -> str:
                return fmt((m.get(metric) or {}).get(which))

            rate = s["slo"]["pass_rate"]
            load.add_row(
                f"{s['load']:g}",
                f"{s['ok']}/{s['requests']}",
                ", ".join(f"{k}={v}" for k, v in sorted(s["errors"].items())) or "-",
                f"{s['throughput']['requests_per_s']:.2f}",
                f"{s['throughput']['output_tokens_per_s']:.0f}",
                ("-" if rate is None else f"{rate:.1%}") + ("" if s["steady"]["steady"] else "*"),
                "BOUND" if s["client"]["bound"] else fmt(s["client"]["cpu_ms_per_request"]),
            )
            latency.add_row(
                f"{s['load']:g}",
                st("ttft_ms", "p50"),
                st("ttft_ms", "p95"),
                st("ttst_ms", "p50"),
                st("first_sentence_ms", "p50"),
                st("first_sentence_ms", "p95"),
                st("first_sentence_ms", "p99"),
                st("e2e_ms", "p50"),
            )
        console.print(load)
        console.print(latency)
        best = ep["knee"]["max_load_passing"]
        unit = "concurrent callers" if mode == "concurrency" else "arrivals/s"
        console.print(
            f"{ep['name']}: largest {mode} with >= {target:.0%} of turns within {budgets}: "
            + ("none of the steps" if best is None else f"{best:g} {unit}")
            + (" (sweep stopped early)" if ep["stopped_early"] else ""),
            highlight=False,
        )
        for s in ep["steps"]:
            if s["client"]["bound"]:
                console.print(
                    f"{ep['name']} {mode}={s['load']:g}: the client was the bottleneck "
                    f"({s['client']['reason']}); its latencies measure this machine",
                    highlight=False,
                )


def _cmd_compare(a: Path, b: Path, threshold: float) -> int:
    from rich.markup import escape
    from rich.table import Table

    from runtime.bench.report import compare, load_document

    if not threshold > 0:
        raise UsageError("--threshold must be positive")
    try:
        doc_a, doc_b = load_document(a), load_document(b)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    changes = compare(doc_a, doc_b, threshold / 100)
    console = rich_console()
    table = Table(title=escape(f"{a.name} -> {b.name} (changes of {threshold:g} % or more marked)"))
    for column in ("endpoint", "load", "", "A", "B", "change", ""):
        table.add_column(column, justify="left" if column in ("endpoint", "") else "right")
    for c in changes:
        rel = c.relative
        if c.label == "pass rate" and c.a is not None and c.b is not None:
            change = f"{(c.b - c.a) * 100:+.1f} pts"
        else:
            change = "-" if rel is None else f"{rel:+.1%}"
        value = (lambda v: "-" if v is None else f"{v:.1%}") if c.label == "pass rate" else fmt
        table.add_row(
            c.endpoint,
            "-" if c.load is None else f"{c.load:g}",
            c.label,
            value(c.a),
            value(c.b),
            change,
            {"worse": "WORSE", "better": "better"}.get(c.mark, c.mark),
        )
    console.print(table)
    worse = sum(c.mark == "worse" for c in changes)
    better = sum(c.mark == "better" for c in changes)
    console.print(
        f"{worse} worse, {better} better, {len(changes) - worse - better} unchanged or new"
    )
    return EXIT_OK


def _run_bench(
    targets: list[Any],
    settings: Any,
    prompts: list[Any] | None,
    *,
    quiet: bool,
    fallback: bool = False,
) -> list[Any]:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from runtime.bench.ttft import TTFTBenchmark

    per_target = 1 + settings.warmup + settings.requests
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        disable=quiet or not sys.stderr.isatty(),
        transient=True,
        console=rich_console(stderr=True),
    ) as progress:
        tasks: dict[str, Any] = {}

        def on_result(name: str, result: Any) -> None:
            status = f"ttft {result.ttft_ms:.0f} ms" if result.ttft_ms else (result.error or "")
            progress.update(tasks[name], advance=1, status=status)

        bench = TTFTBenchmark(
            targets, settings, prompts=prompts, on_result=on_result, fallback=fallback
        )
        for t in [bench.fallback_target()] if fallback else targets:
            tasks[t.name] = progress.add_task(t.name, total=per_target, status="")
        reports: list[Any] = asyncio.run(bench.run())
    return reports


_STATS = ("p50", "p90", "p95", "p99", "max", "mean")


def _print_reports(reports: list[Any], extra: dict[str, Any]) -> None:
    from rich.markup import escape
    from rich.table import Table

    console = rich_console()
    docs = [report.to_json() for report in reports]
    summary = Table(title="Endpoints (warm requests; ms unless noted)")
    summary.add_column("")
    for doc in docs:
        summary.add_column(doc["name"], justify="right")

    def stat(metric: str, which: str) -> list[str]:
        out = []
        for doc in docs:
            s = doc["metrics"].get(metric)
            out.append(fmt(s[which]) if s else "-")
        return out

    def cold_ttft(doc: dict[str, Any]) -> str:
        cold = doc["cold"]
        if not cold:
            return "-"
        return fmt(cold["ttft_ms"]) if cold["ok"] else str(cold["error"])

    summary.add_row("ok", *(f"{d['ok']}/{d['requests']}" for d in docs))
    summary.add_row(
        "errors",
        *(", ".join(f"{k}={v}" for k, v in sorted(d["errors"].items())) or "-" for d in docs),
    )
    rows = (
        ("ttft p50", "ttft_ms", "p50"),
        ("ttft p90", "ttft_ms", "p90"),
        ("ttft p99", "ttft_ms", "p99"),
        ("first answer p50", "first_answer_ms", "p50"),
        ("first sentence p50", "first_sentence_ms", "p50"),
        ("headers p50", "headers_ms", "p50"),
        ("itl p50", "itl_ms", "p50"),
        ("tpot p50", "tpot_ms", "p50"),
        ("tokens/s p50", "tokens_per_s", "p50"),
        ("e2e p50", "e2e_ms", "p50"),
    )
    for label, metric, which in rows:
        summary.add_row(label, *stat(metric, which))
    summary.add_row("cold ttft", *(cold_ttft(d) for d in docs))
    console.print(summary)
    failures = [(d, kind, message) for d in docs for kind, message in d["error_messages"].items()]
    if failures:
        errors = Table(title="Errors (the first message of each kind)")
        for column in ("endpoint", "kind", "count", "first message"):
            errors.add_column(column, overflow="fold")
        for doc, kind, message in failures:
            count = doc["errors"].get(kind, 0) + (
                1 if (doc["cold"] or {}).get("error") == kind else 0
            )
            errors.add_row(escape(doc["name"]), kind, str(count), escape(message or "-"))
        console.print(errors)
    for doc in docs:
        detail = Table(title=escape(f"{doc['name']} — {doc['model']} @ {doc['base_url']}"))
        detail.add_column("metric")
        for name in _STATS:
            detail.add_column(name, justify="right")
        for metric, stats in doc["metrics"].items():
            if stats:
                detail.add_row(
                    metric, *(fmt(stats[s]) for s in ("p50", "p90", "p95", "p99", "max", "mean"))
                )
        console.print(detail)
    for doc in docs:
        if "fallback" in doc:
            _print_fallback(doc["fallback"])
    ref = extra.get("reference_server")
    if ref:
        console.print(
            f"reference endpoint: server-side ttft p50 {ref['ttft_ms_p50']:.2f} ms "
            f"(configured {ref['configured_ttft_ms']:.0f} ms)"
        )


def _print_fallback(fb: dict[str, Any]) -> None:
    from rich.table import Table

    console = rich_console()
    names = [e["name"] for e in fb["entries"]]
    table = Table(title="Fallback: per request (caller ttft: from the request's start, ms)")
    for column in ("phase", "#", "answered by", "skipped (why)", "caller ttft", "entry ttft"):
        table.add_column(column, justify="right" if "ttft" in column or column == "#" else "left")
    for r in fb["requests"]:
        skipped = ", ".join(f"{s['entry']} ({s['reason']})" for s in r["skipped"]) or "-"
        table.add_row(
            r["phase"],
            str(r["index"]),
            r["entry"] or f"none ({r['error']})",
            skipped,
            fmt(r["caller_ttft_ms"]),
            fmt(r["ttft_ms"]),
        )
    console.print(table)
    counts = ", ".join(f"{n} {fb['answered_by'][n]}" for n in names)
    ttft = fb["caller_ttft_ms"] or {}
    console.print(
        f"warm requests answered by: {counts}; caller ttft p50 {fmt(ttft.get('p50'))} ms, "
        f"p95 {fmt(ttft.get('p95'))} ms, max {fmt(ttft.get('max'))} ms",
        highlight=False,
    )
