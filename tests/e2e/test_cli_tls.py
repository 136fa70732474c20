"""Endpoints behind a private CA: refused with a pointer to --ca-bundle, trusted with it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme

VOXLOOP = [sys.executable, "-m", "runtime.cli"]


@pytest.fixture
def private_endpoint(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """``voxloop endpoint serve`` over https with a certificate from a private CA."""
    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1")
    cert.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "server.pem"))
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    proc = subprocess.Popen(
        [*VOXLOOP, "endpoint", "serve", "--port", "0", "--ttft-ms", "5", "--itl-ms", "1",
         "--tls-cert", str(tmp_path / "server.pem"), "--tls-key", str(tmp_path / "server.pem")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert "listening" in line, proc.stderr.read() if proc.stderr else ""
        yield line.rsplit(" ", 1)[1].strip(), tmp_path / "ca.pem"
    finally:
        proc.terminate()
        proc.communicate(timeout=30)


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*VOXLOOP, *args], capture_output=True, text=True, timeout=120,
                          check=False, env={**os.environ, **(env or {})})  # fmt: skip


def test_untrusted_certificate_points_at_the_ca_bundle(private_endpoint: tuple[str, Path]):
    url, _ = private_endpoint
    result = run("talk", "--demo", "--base-url", url, env={"VOXLOOP_CA_BUNDLE": ""})
    assert result.returncode == 3, result.stderr
    assert result.stderr.splitlines()[-1] == (
        f"voxloop: error: --base-url {url}: the server's certificate is not trusted "
        "(unable to get local issuer certificate); for a private CA or a self-signed "
        "certificate pass --ca-bundle FILE.pem (or set VOXLOOP_CA_BUNDLE)"
    )
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("how", ["flag", "env"])
def test_bench_trusts_the_private_ca(private_endpoint: tuple[str, Path], tmp_path: Path, how: str):
    url, ca = private_endpoint
    out = tmp_path / "bench.json"
    flags = ["--ca-bundle", str(ca)] if how == "flag" else []
    env = {"VOXLOOP_CA_BUNDLE": str(ca) if how == "env" else ""}
    result = run("bench", "ttft", "--base-url", url, "--model", "voxloop-reference",
                 "--requests", "2", "--warmup", "0", "--json", str(out), *flags, env=env)  # fmt: skip
    assert result.returncode == 0, result.stderr
    [endpoint] = json.loads(out.read_text())["endpoints"]
    assert endpoint["ok"] == 2 and endpoint["errors"] == {}


def test_a_missing_ca_bundle_is_a_usage_error(tmp_path: Path):
    result = run("bench", "ttft", "--reference", "--ca-bundle", str(tmp_path / "nope.pem"))
    assert result.returncode == 2
    assert result.stderr == (
        f"voxloop: error: the CA bundle {tmp_path / 'nope.pem'} does not exist "
        "(--ca-bundle or VOXLOOP_CA_BUNDLE)\n"
    )
