"""The ``voxloop`` command as users run it (subprocesses, real sockets)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import httpx
import pytest

VOXLOOP = [sys.executable, "-m", "runtime.cli"]


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*VOXLOOP, *args], capture_output=True, text=True, timeout=120, env=env, check=False
    )


def test_console_script_is_installed():
    scripts = {ep.name: ep.value for ep in entry_points(group="console_scripts")}
    assert scripts.get("voxloop") == "runtime.cli:main"


def test_bench_ttft_against_the_reference_endpoint(tmp_path: Path):
    out = tmp_path / "bench.json"
    result = run(
        "bench", "ttft", "--reference", "--reference-ttft-ms", "20", "--reference-itl-ms", "1",
        "--requests", "4", "--warmup", "1", "--json", str(out), "--csv", str(tmp_path / "b.csv"),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "ttft p50" in result.stdout and "reference" in result.stdout
    doc = json.loads(out.read_text())
    [endpoint] = doc["endpoints"]
    assert endpoint["name"] == "reference" and endpoint["ok"] == 4
    assert endpoint["metrics"]["ttft_ms"]["p50"] >= 20
    assert doc["reference_server"]["configured_ttft_ms"] == 20
    assert (tmp_path / "b.csv").read_text().count("\n") == 7  # header, cold, 1 warm-up, 4 measured


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((), "at least one --base-url"),
        (("--reference", "--requests", "0"), "--requests"),
        (("--base-url", "http://127.0.0.1:1/v1"), "--model is required"),
        (
            (
                "--base-url",
                "http://a/v1",
                "--base-url",
                "http://b/v1",
                "--model",
                "m",
                "--name",
                "x",
                "--name",
                "y",
                "--name",
                "z",
            ),
            "--name once",
        ),
        (
            (
                "--base-url",
                "http://127.0.0.1:1/v1",
                "--model",
                "m",
                "--api-key-env",
                "VOXLOOP_SURELY_UNSET",
            ),
            "VOXLOOP_SURELY_UNSET is not set",
        ),
        (("--reference", "--plot", "out.gif"), "--plot"),
        (("--reference", "--no-such-flag"), "unrecognized arguments"),
        (("--config", "/nonexistent.toml"), "cannot read"),
    ],
)
def test_bad_arguments_exit_2_with_a_message(args: tuple[str, ...], message: str):
    env = {k: v for k, v in os.environ.items() if k != "VOXLOOP_SURELY_UNSET"}
    result = run("bench", "ttft", *args, env=env)
    assert result.returncode == 2
    [line] = result.stderr.splitlines()  # one line, no usage block
    assert message in line and line.startswith("voxloop"), line


def test_endpoint_serve_and_bench_against_it(tmp_path: Path):
    env = {**os.environ, "REF_KEY": "sk-serve-key"}
    proc = subprocess.Popen(
        [*VOXLOOP, "endpoint", "serve", "--port", "0", "--ttft-ms", "5", "--itl-ms", "0",
         "--api-key-env", "REF_KEY", "--reply", "Hello from the reference."],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("reference endpoint listening: http://127.0.0.1:")
        base_url = line.split(": ", 1)[1].strip()
        r = httpx.get(f"{base_url}/models", headers={"Authorization": "Bearer sk-serve-key"})
        assert r.json()["data"][0]["id"] == "voxloop-reference"
        assert httpx.get(f"{base_url}/models").status_code == 401

        out = tmp_path / "r.json"
        good = run("bench", "ttft", "--base-url", base_url, "--model", "m", "--name", "served",
                   "--api-key-env", "REF_KEY", "--requests", "2", "--warmup", "0", "--json", str(out),
                   env=env)  # fmt: skip
        assert good.returncode == 0, good.stderr
        assert json.loads(out.read_text())["endpoints"][0]["ok"] == 2
        assert "sk-serve-key" not in good.stdout + good.stderr

        env["WRONG"] = "sk-wrong"
        env["COLUMNS"] = "200"
        bad = run("-v", "bench", "ttft", "--base-url", base_url, "--model", "m",
                  "--api-key-env", "WRONG", "--requests", "2", "--warmup", "0",
                  "--json", str(out), env=env)  # fmt: skip
        assert bad.returncode == 0  # the run completed; the failures are in the report
        assert json.loads(out.read_text())["endpoints"][0]["errors"] == {"auth": 2}
        # The server quoted the wrong key; the table and the -v lines show its message, redacted.
        message = (
            "endpoint refused the credentials (HTTP 401): Incorrect API key provided: ********"
        )
        assert f"│ auth │ 3     │ {message}" in bad.stdout
        assert f"warm request 0 failed (auth): {message}" in bad.stderr
        assert "sk-wrong" not in bad.stdout + bad.stderr
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
    assert proc.returncode == 0
    assert "Traceback" not in err


def test_endpoint_serve_answers_exactly_its_two_routes_with_an_access_line_each():
    proc = subprocess.Popen(
        [*VOXLOOP, "endpoint", "serve", "--port", "0", "--ttft-ms", "0", "--itl-ms", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        base_url = proc.stdout.readline().split(": ", 1)[1].strip()
        root = base_url.removesuffix("/v1")
        chat = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True}
        assert httpx.get(f"{base_url}/models").status_code == 200
        assert httpx.post(f"{base_url}/chat/completions", json=chat).status_code == 200
        for wrong in (f"{root}/chat/completions", f"{base_url}/v1/chat/completions",
                      f"{root}/api/v1/chat/completions"):  # fmt: skip
            answer = httpx.post(wrong, json=chat)
            assert answer.status_code == 404, wrong
            path = wrong[len(root) :]
            assert answer.json()["error"]["message"] == (
                f"no route POST {path}: this endpoint serves POST /v1/chat/completions and "
                f"GET /v1/models (base URL {base_url})"
            )
        assert httpx.get(f"{root}/models").status_code == 404
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
    access = [" ".join(line.split()[:3]) for line in err.splitlines()]
    assert access == [
        "GET /v1/models 200", "POST /v1/chat/completions 200",
        "POST /chat/completions 404", "POST /v1/v1/chat/completions 404",
        "POST /api/v1/chat/completions 404", "GET /models 404",
    ]  # fmt: skip
    assert all(line.endswith(" ms") for line in err.splitlines())


def test_endpoint_serve_rejects_bad_arguments():
    result = run("endpoint", "serve", "--fault", "explode")
    assert result.returncode == 2 and "invalid choice" in result.stderr
    result = run("endpoint", "serve", "--ttft-ms", "-1")
    assert result.returncode == 2 and "negative" in result.stderr
