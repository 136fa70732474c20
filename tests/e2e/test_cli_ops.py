"""Discoverability and operations: help text, the server's public routes, logs, stopping."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx

from audio.wav import read_wav
from runtime.cli import build_parser

VOXLOOP = [sys.executable, "-m", "runtime.cli"]


def _parsers(parser: argparse.ArgumentParser, name: str = "voxloop"):
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub in action.choices.items():
                yield from _parsers(sub, f"{name} {sub_name}")


def test_every_option_of_every_command_has_help_and_shows_its_default():
    undocumented = []
    for name, parser in _parsers(build_parser()):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction | argparse._HelpAction):
                continue
            if not action.help:
                undocumented.append(f"{name} {action.dest}")
        text = parser.format_help()
        for action in parser._actions:
            default = action.default
            if (
                action.option_strings
                and isinstance(default, int | float | str)
                and (not isinstance(default, bool) and default != argparse.SUPPRESS)
            ):
                assert f"(default: {default})" in " ".join(text.split()), (name, action.dest)
    assert undocumented == []


def test_help_documents_the_settings():
    serve = subprocess.run([*VOXLOOP, "serve", "--help"], capture_output=True, text=True,
                           check=True, env={**os.environ, "COLUMNS": "100"}).stdout  # fmt: skip
    for setting in ("VOXLOOP_API_KEYS", "VOXLOOP_DATA_DIR", "VOXLOOP_DATABASE_URL",
                    "VOXLOOP_SECRET_KEY", "VOXLOOP_ALLOW_PRIVATE_ENDPOINTS", "/health"):  # fmt: skip
        assert setting in serve
    agents = subprocess.run([*VOXLOOP, "agents", "list", "--help"], capture_output=True,
                            text=True, check=True).stdout  # fmt: skip
    assert "VOXLOOP_URL" in agents and "http://127.0.0.1:8080" in agents
    talk = subprocess.run([*VOXLOOP, "talk", "--help"], capture_output=True, text=True,
                          check=True).stdout  # fmt: skip
    assert "--stt-base-url" in talk and "--tts-api-key-env" in talk


def test_serve_public_routes_access_log_and_a_clean_sigterm(tmp_path: Path):
    log_path = tmp_path / "server.log"
    env = {**os.environ, "VOXLOOP_API_KEYS": "key-1"}
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            [*VOXLOOP, "serve", "--port", "0", "--data-dir", str(tmp_path / "data")],
            stdout=subprocess.PIPE, stderr=log, text=True, env=env,
        )  # fmt: skip
        try:
            assert proc.stdout is not None
            url = proc.stdout.readline().rsplit(" ", 1)[1].strip()
            with httpx.Client(base_url=url) as client:
                index = client.get("/")
                health = client.get("/health", headers={"X-Request-ID": "req-42"})
                docs = client.get("/docs")
                token = client.get(
                    "/v1/token?expires_in_seconds=60", headers={"Authorization": "key-1"}
                )
            assert index.json() == {"service": "voxloop agent service", "version": "0.1.0",
                                    "health": "/health", "healthz": "/healthz",
                                    "readyz": "/readyz", "realtime": "/v1/ws", "docs": "/docs",
                                    "openapi": "/openapi.json",
                                    "page": "/ (in a browser)"}  # fmt: skip
            assert health.status_code == 200 and health.json() == {
                "status": "ok",
                "version": "0.1.0",
            }
            assert health.headers["x-request-id"] == "req-42"
            assert docs.headers["content-type"].startswith("text/html")
            assert "<code>/v1/agents/{agent_id}</code>" in docs.text
            assert token.status_code == 200
            # The agents CLI: --url after the subcommand, and a bare host:port.
            listed = subprocess.run(
                [*VOXLOOP, "agents", "list", "--url", url.removeprefix("http://")],
                capture_output=True, text=True, timeout=60, check=False,
                env={**os.environ, "VOXLOOP_API_KEY": "key-1"},
            )  # fmt: skip
            assert listed.returncode == 0, listed.stderr
            assert json.loads(listed.stdout) == []
            # Names print as written (not \\u escapes); an id that is no id is refused at once.
            made = subprocess.run(
                [*VOXLOOP, "agents", "create", "--url", url, "--name", "Café 🎉",
                 "--system-prompt", "Be brief."],
                capture_output=True, text=True, timeout=60, check=False,
                env={**os.environ, "VOXLOOP_API_KEY": "key-1"},
            )  # fmt: skip
            assert made.returncode == 0, made.stderr
            assert json.loads(made.stdout)["name"] == "Café 🎉"
            assert '"name": "Café 🎉"' in made.stdout and "\\u" not in made.stdout
            doubled = subprocess.run(
                [*VOXLOOP, "agents", "list", "--url", f"{url}/v1"], capture_output=True,
                text=True, timeout=60, check=False, env={**os.environ, "VOXLOOP_API_KEY": "key-1"},
            )  # fmt: skip
            assert (doubled.returncode, doubled.stderr) == (
                1,
                f"voxloop: error: GET {url}/v1/v1/agents: HTTP 404: no such route; --url (or "
                f"VOXLOOP_URL) is the server's address, without /v1: {url}\n",
            )
            empty = subprocess.run(
                [*VOXLOOP, "agents", "get", "", "--url", url], capture_output=True, text=True,
                timeout=60, check=False, env={**os.environ, "VOXLOOP_API_KEY": "key-1"},
            )  # fmt: skip
            assert (empty.returncode, empty.stderr) == (
                2,
                "voxloop agents get: error: argument agent_id: not an agent id: '' (an id is "
                "letters, digits, _ and -: agent_…) (see voxloop agents get --help)\n",
            )
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)
            assert proc.stdout is not None
            proc.stdout.close()
    assert proc.returncode == 0
    lines = [json.loads(line) for line in log_path.read_text().splitlines()]
    requests = [r for r in lines if r["msg"] == "request"]
    assert [(r["method"], r["path"], r["status"]) for r in requests] == [
        ("GET", "/", 200), ("GET", "/health", 200), ("GET", "/docs", 200),
        ("GET", "/v1/token", 200), ("GET", "/v1/agents", 200), ("POST", "/v1/agents", 201),
        ("GET", "/v1/v1/agents", 404),
    ]  # fmt: skip
    assert requests[1]["request_id"] == "req-42"
    assert all(len(r["request_id"]) == 32 for i, r in enumerate(requests) if i != 1)
    assert all(r["duration_ms"] >= 0 and r["logger"] == "voxloop.access" for r in requests)
    log_text = log_path.read_text()
    assert "key-1" not in log_text and "expires_in_seconds" not in log_text  # no query, no keys
    # Start-up notes (a bridge left off) may come first, then "started" with the URL.
    first = next(i for i, r in enumerate(lines) if r["msg"] == "started")
    assert lines[first]["url"] == url
    assert all(r["level"] == "info" for r in lines[:first])
    assert lines[-1] == {**lines[-1], "msg": "shutdown", "signal": "SIGTERM", "level": "info"}
    assert all("%s" not in r["msg"] for r in lines)


def ignore_sigint() -> None:
    """As a script's background job starts (``voxloop talk … &``): SIGINT ignored, inherited."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def test_interrupted_talk_keeps_the_conversation_so_far(tmp_path: Path):
    out, metrics = tmp_path / "out.wav", tmp_path / "m.json"
    # Started with SIGINT ignored, as a test run in the background starts everything: talk
    # still stops on SIGINT (as connect does), not only when the terminal's Ctrl-C reaches it.
    proc = subprocess.Popen(
        [*VOXLOOP, "talk", "--demo", "--output", str(out), "--metrics-json", str(metrics)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=ignore_sigint,
    )  # fmt: skip
    assert proc.stdout is not None
    first = proc.stdout.readline()  # the first user turn has been heard
    assert first.startswith("you ")
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert f"voxloop: interrupted; the conversation so far is in {out}, {metrics}" in err
    recording = read_wav(out)
    assert recording.channels == 2 and recording.duration_s > 1.0
    turns = json.loads(metrics.read_text())["turns"]
    assert turns[0]["user_text"] == "What's the weather like in Paris today?"
