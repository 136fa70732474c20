"""``voxloop bench ttft --sweep/--report/--compare/--conversations`` as users run them."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest

from runtime.bench.report import SCHEMA

VOXLOOP = [sys.executable, "-m", "runtime.cli"]


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    env = {**(env or os.environ), "COLUMNS": "200"}
    return subprocess.run(
        [*VOXLOOP, *args], capture_output=True, text=True, timeout=120, env=env, check=False
    )


@pytest.mark.timeout(120)
def test_sweep_writes_json_html_csv_and_compares(tmp_path: Path):
    out = tmp_path / "a.json"
    result = run(
        "bench", "ttft", "--reference", "--reference-ttft-ms", "5", "--reference-itl-ms", "1",
        "--reference-capacity", "2", "--sweep", "concurrency=1,2", "--step-seconds", "0.4",
        "--step-warmup", "0.1", "--step-min-requests", "4", "--warmup", "1",
        "--conversations", "builtin", "--think-scale", "0.01",
        "--json", str(out), "--report", str(tmp_path / "r.html"), "--csv", str(tmp_path / "r.csv"),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "reference concurrency=1:" in result.stderr  # one progress line per step
    assert "largest concurrency with >= 95% of turns within first_sentence_ms <= 800 ms" in (
        result.stdout
    )
    doc = json.loads(out.read_text())
    jsonschema.validate(doc, SCHEMA)
    assert doc["sweep"] == {"mode": "concurrency", "values": [1.0, 2.0]}
    assert doc["workload"]["kind"] == "conversations" and doc["workload"]["conversations"] == 5
    assert doc["settings"]["reference_capacity"] == 2
    [ep] = doc["endpoints"]
    assert [s["load"] for s in ep["steps"]] == [1.0, 2.0]
    assert ep["knee"]["max_load_passing"] == 2.0
    page = (tmp_path / "r.html").read_text()
    assert page.count("<svg") == 4 and "src=" not in page
    with (tmp_path / "r.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert {r["load"] for r in rows} == {"1.0", "2.0"}
    assert len(rows) == sum(s["requests"] for s in ep["steps"])

    # a second run in which the endpoint got slower, compared with the first
    slower = json.loads(out.read_text())
    for step in slower["endpoints"][0]["steps"]:
        step["metrics"]["first_sentence_ms"]["p50"] *= 3
    (tmp_path / "b.json").write_text(json.dumps(slower))
    cmp = run("bench", "ttft", "--compare", str(out), str(tmp_path / "b.json"))
    assert cmp.returncode == 0, cmp.stderr
    lines = [line for line in cmp.stdout.splitlines() if "first sentence p50" in line]
    assert len(lines) == 2 and all("+200.0%" in line and "WORSE" in line for line in lines)
    assert "2 worse, 0 better" in cmp.stdout


def test_compare_and_sweep_arguments_are_checked(tmp_path: Path):
    (tmp_path / "x.json").write_text("{}")
    for args, message in (
        (("--compare", str(tmp_path / "x.json"), str(tmp_path / "x.json")), "not a voxloop"),
        (("--compare", str(tmp_path / "none.json"), str(tmp_path / "x.json")), "cannot read"),
        (("--reference", "--sweep", "users=1"), "--sweep takes"),
        (("--reference", "--sweep", "rate=1", "--slo", "speed=3"), "--slo takes"),
        (("--reference", "--sweep", "rate=1", "--step-seconds", "0"), "--step-seconds"),
        (("--reference", "--reference-capacity", "0"), "--reference-capacity"),
        (("--reference", "--conversations", str(tmp_path / "none.jsonl")), "cannot read"),
    ):
        result = run("bench", "ttft", *args)
        assert result.returncode == 2, (args, result.stderr)
        assert message in result.stderr
        assert "Traceback" not in result.stderr
    served = run("endpoint", "serve", "--capacity", "0")
    assert served.returncode == 2 and "--capacity must be at least 1" in served.stderr
    served = run("endpoint", "serve", "--fault", "status", "--status", "99")
    assert (served.returncode, served.stderr) == (
        2,
        "voxloop: error: --status must be an HTTP error status (400 to 599), not 99\n",
    )


@pytest.mark.parametrize("option", ["--config", "--prompts", "--conversations", "--compare"])
def test_an_input_file_that_is_not_utf8_is_named_in_one_line(tmp_path: Path, option: str):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes(b'[[endpoints]]\nname = "caf\xe9"\n')  # Latin-1, not UTF-8
    args = {
        "--config": ("--config", str(bad)),
        "--prompts": ("--reference", "--prompts", str(bad)),
        "--conversations": ("--reference", "--conversations", str(bad)),
        "--compare": ("--compare", str(bad), str(bad)),
    }[option]
    result = run("bench", "ttft", *args)
    assert (result.returncode, result.stderr) == (
        2,
        f"voxloop: error: {bad} is not UTF-8 text (byte 25 cannot be read)\n",
    )


def test_config_endpoint_with_an_unset_key_is_a_config_error_not_fatal(tmp_path: Path):
    config = tmp_path / "e.toml"
    config.write_text(
        '[[endpoints]]\nname = "keyless"\nbase_url = "http://127.0.0.1:9/v1"\nmodel = "m"\n'
        'api_key_env = "VOXLOOP_SURELY_UNSET_KEY"\n'
    )
    env = {k: v for k, v in os.environ.items() if k != "VOXLOOP_SURELY_UNSET_KEY"}
    out = tmp_path / "r.json"
    result = run(
        "bench", "ttft", "--config", str(config), "--reference", "--reference-ttft-ms", "1",
        "--reference-itl-ms", "0", "--requests", "2", "--warmup", "0", "--json", str(out), env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    keyless, reference = json.loads(out.read_text())["endpoints"]
    assert (keyless["name"], keyless["ok"], keyless["errors"]) == ("keyless", 0, {"config": 2})
    assert keyless["error_messages"] == {
        "config": "environment variable VOXLOOP_SURELY_UNSET_KEY is not set"
    }
    assert (reference["ok"], reference["errors"]) == (2, {})
    assert reference["slo"] == {"passed": 2, "total": 2, "pass_rate": 1.0}
