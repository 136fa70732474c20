"""The endpoint client's Python example (docs/endpoint-client.md) runs as written."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

PAGE = Path(__file__).resolve().parents[2] / "docs" / "endpoint-client.md"


def snippet() -> str:
    text = PAGE.read_text(encoding="utf-8")
    section = text.split("# Using the endpoint client from Python", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match is not None
    return match.group(1)


def test_the_python_example_runs_against_a_local_http_endpoint():
    code = snippet()
    assert 'Endpoint("http://127.0.0.1:8089/v1"' in code
    server = subprocess.Popen(
        [sys.executable, "-m", "runtime.cli", "endpoint", "serve", "--port", "0", "--ttft-ms", "0",
         "--itl-ms", "0", "--reply", "Hello from the reference endpoint."],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert server.stdout is not None
        line = server.stdout.readline()
        assert line.startswith("reference endpoint listening: "), line
        port = line.rsplit(":", 1)[1].split("/")[0]
        # Only the port differs from the page (tests use OS-assigned ports).
        run = subprocess.run([sys.executable, "-c", code.replace(":8089/", f":{port}/")],
                             capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
    finally:
        server.terminate()
        server.communicate(timeout=20)
    assert run.returncode == 0, run.stderr
    first, second = run.stdout.splitlines()
    assert first == "Hello from the reference endpoint."
    assert re.fullmatch(r"ttft \d+ ms", second)
