"""``voxloop bench ttft``: compare chat-completions endpoints by time to first token."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import sys
from pathlib import Path
from typing import Any

from runtime.cli.checks import add_ca_bundle_flag, use_ca_bundle, with_scheme
from runtime.cli.common import (
    EXIT_OK,
    CommandError,
    Parser,
    UsageError,
    check_output,
    fmt,
    require,
    rich_console,
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
        url = with_scheme(url)
        targets.append(BenchTarget(name=name or url, base_url=url, model=model, api_key_env=key))
    return targets


def _numbered(name: str, n: int) -> list[str | None]:
    return [f"{name}-{i + 1}" for i in range(n)]


def _cmd_bench_ttft(args: argparse.Namespace) -> int:
    from runtime.bench.ttft import BenchSettings, BenchTarget, load_prompts

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
    for flag, path in (("--json", args.json_path), ("--csv", args.csv_path),
                       ("--plot", args.plot_path)):  # fmt: skip
        if path is not None:
            check_output(path, flag)
    for target in targets:
        if target.api_key_env and target.api_key_env not in os.environ:
            raise UsageError(f"environment variable {target.api_key_env} is not set")
    if args.reference_ttft_ms < 0 or args.reference_itl_ms < 0:
        raise UsageError("reference delays must not be negative")

    with contextlib.ExitStack() as stack:
        reference = None
        if args.reference:
            from runtime.bench.reference_thread import ReferenceThread
            from runtime.llm.reference import ReplyPlan

            reference = stack.enter_context(
                ReferenceThread(
                    ReplyPlan(ttft_ms=args.reference_ttft_ms, itl_ms=args.reference_itl_ms)
                )
            )
            targets.append(
                BenchTarget(
                    name="reference", base_url=reference.base_url, model="voxloop-reference"
                )
            )
        reports = _run_bench(targets, settings, prompts, quiet=args.quiet)
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
            write_json(reports, args.json_path, extra)
        if args.csv_path is not None:
            write_csv(reports, args.csv_path)
        if args.plot_path is not None:
            write_plot(reports, args.plot_path)
    except (OSError, ValueError) as exc:
        _print_reports(reports, extra)
        raise CommandError(f"cannot write results: {exc}") from None
    _print_reports(reports, extra)
    return EXIT_OK


def _run_bench(
    targets: list[Any], settings: Any, prompts: list[Any] | None, *, quiet: bool
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
        tasks = {t.name: progress.add_task(t.name, total=per_target, status="") for t in targets}

        def on_result(name: str, result: Any) -> None:
            status = f"ttft {result.ttft_ms:.0f} ms" if result.ttft_ms else (result.error or "")
            progress.update(tasks[name], advance=1, status=status)

        bench = TTFTBenchmark(targets, settings, prompts=prompts, on_result=on_result)
        reports: list[Any] = asyncio.run(bench.run())
    return reports


_STATS = ("p50", "p90", "p95", "p99", "max", "mean")


def _print_reports(reports: list[Any], extra: dict[str, Any]) -> None:
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
            errors.add_row(doc["name"], kind, str(count), message or "-")
        console.print(errors)
    for doc in docs:
        detail = Table(title=f"{doc['name']} — {doc['model']} @ {doc['base_url']}")
        detail.add_column("metric")
        for name in _STATS:
            detail.add_column(name, justify="right")
        for metric, stats in doc["metrics"].items():
            if stats:
                detail.add_row(
                    metric, *(fmt(stats[s]) for s in ("p50", "p90", "p95", "p99", "max", "mean"))
                )
        console.print(detail)
    ref = extra.get("reference_server")
    if ref:
        console.print(
            f"reference endpoint: server-side ttft p50 {ref['ttft_ms_p50']:.2f} ms "
            f"(configured {ref['configured_ttft_ms']:.0f} ms)"
        )
