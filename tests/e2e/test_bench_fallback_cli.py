"""``voxloop bench ttft --fallback``: the endpoints as one llm list, the primary in a
fault mode, through real loopback reference endpoints and the command as users run it."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

from runtime.bench.reference_thread import ReferenceThread
from runtime.llm.fallback import EARLY_DEFAULT_S
from runtime.llm.reference import ReplyPlan


def bench(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "runtime.cli", "bench", "ttft", "--quiet", *args],
        capture_output=True, text=True, timeout=120, check=False,
        env={**os.environ, "COLUMNS": "200"},
    )  # fmt: skip


def test_a_silent_primary_is_raced_then_skipped_and_the_report_says_so(tmp_path: Path):
    silent = ReplyPlan(fault="hang_headers")
    healthy = ReplyPlan(replies=("From the backup.",))
    out, rows = tmp_path / "r.json", tmp_path / "r.csv"
    with ReferenceThread(silent) as primary, ReferenceThread(healthy) as backup:
        result = bench(
            "--base-url", primary.base_url, "--name", "primary",
            "--base-url", backup.base_url, "--name", "backup", "--model", "m",
            "--fallback", "--requests", "3", "--warmup", "1",
            "--json", str(out), "--csv", str(rows),
        )  # fmt: skip
        primary_requests = [r for r in primary.records() if r.path.endswith("/completions")]
    assert result.returncode == 0, result.stderr
    [report] = json.loads(out.read_text())["endpoints"]
    assert (report["name"], report["ok"], report["requests"]) == ("fallback", 3, 3)
    fb = report["fallback"]
    assert [e["name"] for e in fb["entries"]] == ["primary", "backup"]
    assert fb["answered_by"] == {"primary": 0, "backup": 3}
    steps = [(r["phase"], r["entry"], r["skipped"]) for r in fb["requests"]]
    hedged = [{"entry": "primary", "reason": "hedged"}]
    skipped = [{"entry": "primary", "reason": "circuit_open"}]
    # No time to first token measured: the backup is asked after the default early start,
    # the primary's request closed; two lost races open its circuit and it is skipped.
    assert steps == [
        ("cold", "backup", hedged),
        ("warmup", "backup", hedged),
        ("warm", "backup", skipped),
        ("warm", "backup", skipped),
        ("warm", "backup", skipped),
    ]
    assert len(primary_requests) == 2
    assert all(r.disconnected_ns is not None and r.status == 0 for r in primary_requests)
    cold = fb["requests"][0]
    assert cold["caller_ttft_ms"] >= EARLY_DEFAULT_S * 1000
    for r in fb["requests"]:
        assert r["ok"] and r["caller_ttft_ms"] >= r["ttft_ms"] > 0
    assert fb["caller_ttft_ms"]["n"] == 3
    with rows.open() as fh:
        csv_rows = list(csv.DictReader(fh))
    assert [(r["phase"], r["entry"], r["skipped"]) for r in csv_rows] == [
        ("cold", "1", "0:hedged"), ("warmup", "1", "0:hedged"),
        *[("warm", "1", "0:circuit_open")] * 3,
    ]  # fmt: skip
    assert "warm requests answered by: primary 0, backup 3" in result.stdout
    assert "backup" in result.stdout and "primary (circuit_open)" in result.stdout


def test_a_failing_primary_is_skipped_for_its_error_kind(tmp_path: Path):
    out = tmp_path / "r.json"
    with (
        ReferenceThread(ReplyPlan(fault="status", status=503)) as primary,
        ReferenceThread(ReplyPlan(replies=("From the backup.",))) as backup,
    ):
        urls = [primary.base_url, backup.base_url]
        result = bench(
            "--base-url", urls[0], "--base-url", urls[1], "--model", "m",
            "--fallback", "--requests", "2", "--warmup", "0", "--json", str(out),
        )  # fmt: skip
    assert result.returncode == 0, result.stderr
    fb = json.loads(out.read_text())["endpoints"][0]["fallback"]
    assert [e["name"] for e in fb["entries"]] == urls
    assert [[s["reason"] for s in r["skipped"]] for r in fb["requests"]] == [
        ["server"],
        ["server"],
        ["circuit_open"],
    ]


def test_fallback_needs_two_endpoints_and_no_sweep():
    one = bench("--base-url", "http://127.0.0.1:9/v1", "--model", "m", "--fallback")
    assert one.returncode == 2
    assert one.stderr.strip().endswith(
        "--fallback needs at least two endpoints (repeat --base-url)"
    )
    swept = bench(
        "--base-url", "http://127.0.0.1:9/v1", "--base-url", "http://127.0.0.1:10/v1",
        "--model", "m", "--fallback", "--sweep", "concurrency=1,2",
    )  # fmt: skip
    assert swept.returncode == 2
    assert "--fallback runs one llm list" in swept.stderr and "Traceback" not in swept.stderr
