"""The README's server-and-client example runs as written: its `serve` answers its `connect`."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from ..helpers import words_of

ROOT = Path(__file__).resolve().parents[2]


def example(heading: str) -> list[str]:
    """The commands of the first bash block under ``heading``, continuations joined."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    block = text.split(heading + "\n", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    return [line for line in block.replace("\\\n", " ").splitlines() if line.strip()]


def voxloop(words: list[str]) -> list[str]:
    assert words[0] == "voxloop", words
    return [sys.executable, "-m", "runtime.cli", *words[1:]]


@pytest.mark.timeout(300)
def test_the_server_and_client_example(tmp_path: Path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("VOXLOOP_")}
    ports: dict[str, str] = {}  # the README's port -> the one this run got

    def local(text: str) -> str:
        for theirs, ours in ports.items():
            text = text.replace(f":{theirs}/", f":{ours}/")
        return text

    background: list[subprocess.Popen[str]] = []
    finished: list[subprocess.CompletedProcess[str]] = []
    try:
        for line in example("### A server and a client"):
            words = shlex.split(line, comments=True)
            assigned = dict(w.split("=", 1) for w in words if re.fullmatch(r"[A-Z_]+=.*", w))
            words = [w for w in words if w not in {f"{k}={v}" for k, v in assigned.items()}]
            if words[:1] == ["export"]:
                env.update({k: local(v) for k, v in assigned.items()})
                continue
            if words[:2] == ["pip", "install"]:
                continue  # this checkout is installed already
            if words[-1] == "&":
                # A server: the README's port becomes any free one (tests share the machine).
                command = voxloop(words[:-1])
                readme_port = command[command.index("--port") + 1]
                command[command.index("--port") + 1] = "0"
                process = subprocess.Popen(
                    command, cwd=tmp_path, env=env, text=True,
                    stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                )  # fmt: skip
                background.append(process)
                assert process.stdout is not None
                # Start-up notes may come before the line that says where it listens.
                for said in iter(process.stdout.readline, ""):
                    if url := re.search(r"http://127\.0\.0\.1:(\d+)", said):
                        break
                else:
                    raise AssertionError(f"{line}: ended before it said where it listens")
                ports[readme_port] = url.group(1)
                continue
            run = subprocess.run(
                voxloop([local(w) for w in words]), cwd=tmp_path, capture_output=True,
                text=True, timeout=240, check=False, env={**env, **assigned},
            )  # fmt: skip
            assert run.returncode == 0, (line, run.stdout, run.stderr)
            finished.append(run)
    finally:
        for process in background:
            process.terminate()
            process.communicate(timeout=30)
    assert [r.args[3] for r in finished] == ["say", "connect"]
    question = ["what", "time", "do", "you", "open", "tomorrow"]
    metrics = json.loads((tmp_path / "call.json").read_text(encoding="utf-8"))
    [turn] = metrics["turns"]
    assert words_of(turn["user_text"]) == question
    assert turn["agent_text"].startswith("Sure, I can help with that.")
    assert not turn["interrupted"]
    assert (tmp_path / "call.wav").stat().st_size > 48000
