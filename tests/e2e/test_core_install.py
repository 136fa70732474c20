"""The core package without extras, installed into a fresh virtual environment.

A newcomer who runs ``pip install voxloop`` (no ``embedded`` extra) gets one
line naming the extra for every speech command, and an agent service that
stores agents (voices it cannot speak are flagged, not refused). pip resolves
the dependencies from its cache or the configured index; when it cannot, the
test is a visible skip (a failure under VOXLOOP_TEST_STRICT, as in CI).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import venv
from pathlib import Path

import httpx
import pytest

from ..helpers import SPEECH, missing

# Installing the dependencies into a fresh environment takes minutes on a busy machine.
pytestmark = pytest.mark.timeout(900)

ROOT = Path(__file__).parents[2]
HINT = "which is not installed: pip install 'voxloop[embedded]'"


@pytest.fixture(scope="module")
def core(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with voxloop installed from a copy of this tree, without extras."""
    base = tmp_path_factory.mktemp("core")
    source = base / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
    for name in ("runtime", "audio"):
        shutil.copytree(ROOT / name, source / name, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    env_dir = base / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    python = env_dir / "bin" / "python"
    result = subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
         str(source)],
        capture_output=True, text=True, timeout=900, check=False,
    )  # fmt: skip
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["pip failed"])[-1]
        missing(f"cannot install the core package here (no index or cache?): {last}")
    return env_dir


def voxloop(env_dir: Path, *args: str, env: dict[str, str] | None = None):
    # Run from the venv's directory so nothing imports this checkout instead.
    return subprocess.run(
        [str(env_dir / "bin" / "voxloop"), *args], capture_output=True, text=True,
        timeout=180, check=False, cwd=env_dir, env={**os.environ, **(env or {})},
    )  # fmt: skip


def test_the_install_has_no_speech_stack(core: Path):
    probe = subprocess.run(
        [str(core / "bin" / "python"), "-c",
         "import importlib.util as u, runtime, sys; "
         "print(runtime.__file__); "
         "print([m for m in ('faster_whisper', 'piper', 'espeakng_loader', 'matplotlib', 'h2')"
         " if u.find_spec(m)])"],
        capture_output=True, text=True, timeout=60, check=True, cwd=core,
    )  # fmt: skip
    where, found = probe.stdout.splitlines()
    assert where.startswith(str(core)) and found == "[]"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("transcribe", str(SPEECH / "shared-04-piper.wav")),
         f"the whisper speech-to-text engine needs the 'embedded' extra, {HINT}"),
        (("say", "hello", "-o", "hello.wav"),
         f"the piper text-to-speech engine needs the 'embedded' extra, {HINT}"),
        (("say", "hello", "-o", "hello.wav", "--engine", "espeak"),
         f"the espeak text-to-speech engine needs the 'embedded' extra, {HINT}"),
        (("talk", "--demo"), f"the whisper speech-to-text engine needs the 'embedded' extra, {HINT}"),
        (("bench", "ttft", "--reference", "--plot", "p.png"),
         "--plot needs the 'plot' extra, which is not installed: pip install 'voxloop[plot]'"),
        (("bench", "ttft", "--reference", "--http2"),
         "--http2 needs the 'http2' extra, which is not installed: pip install 'voxloop[http2]'"),
    ],
)  # fmt: skip
def test_every_missing_extra_is_one_line(core: Path, args: tuple[str, ...], message: str):
    result = voxloop(core, *args)
    assert result.stderr == f"voxloop: error: {message}\n"
    assert result.returncode == 3 and result.stdout == ""


def test_the_service_stores_agents_and_flags_voices_it_cannot_speak(core: Path):
    env = {"VOXLOOP_API_KEYS": "core-key", "VOXLOOP_API_KEY": "core-key"}
    server = subprocess.Popen(
        [str(core / "bin" / "voxloop"), "serve", "--port", "0", "--data-dir", str(core / "data")],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=core,
        env={**os.environ, **env},
    )  # fmt: skip
    try:
        assert server.stdout is not None
        url = server.stdout.readline().rsplit(" ", 1)[1].strip()
        created = voxloop(core, "agents", "create", "--name", "Front desk", "--system-prompt",
                          "Be brief.", "--url", url, env=env)  # fmt: skip
        assert created.returncode == 0, created.stderr
        agent = json.loads(created.stdout)
        assert agent["voice"] == {"voice_id": "ivy"}
        assert agent["warnings"] == [{
            "param": "voice", "code": "voice_alias",
            "message": "voice 'ivy' is a name of the hosted catalogue; this server speaks it "
            "with the voice 'en_US-joe-medium'",
        }, {
            "param": "voice", "code": "voice_not_installed",
            "message": "voice 'ivy' speaks with 'en_US-joe-medium', which is not installed on "
            "this server, so the agent cannot speak yet: install the speech engines "
            "(pip install 'voxloop[embedded]')",
        }]  # fmt: skip
        voices = httpx.get(f"{url}/v1/voices", headers={"Authorization": "core-key"}).json()
        assert {v["voice_id"] for v in voices} >= {"en_US-joe-medium", "espeak-en-us"}
        assert not any(v["installed"] for v in voices)
        # Another provider's voice id is still a mistake, and says which voices exist.
        refused = voxloop(core, "agents", "create", "--name", "x", "--system-prompt", "y",
                          "--voice", "nova", "--url", url, env=env)  # fmt: skip
        assert refused.returncode == 1 and "(voice): unknown voice 'nova'" in refused.stderr
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=30)
        assert server.stdout is not None
        server.stdout.close()
    assert server.returncode == 0


def test_the_service_says_at_start_up_that_sessions_will_fail_and_why(core: Path):
    import asyncio

    from runtime.client.connection import Auth, VoiceAgentClient
    from runtime.client.protocol import SessionFailure
    from runtime.protocol.events import SessionPatch
    from runtime.secret import Secret

    engines = (
        "the whisper and piper speech engines need the 'embedded' extra, which is not "
        "installed: pip install 'voxloop[embedded]'"
    )
    server = subprocess.Popen(
        [str(core / "bin" / "voxloop"), "serve", "--port", "0", "--data-dir",
         str(core / "data-sessions")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=core,
        env={**os.environ, "VOXLOOP_API_KEYS": "core-key",
             "VOXLOOP_LLM_BASE_URL": "https://llm.example.com/v1", "VOXLOOP_LLM_MODEL": "m",
             "VOXLOOP_STATIC_HOSTS": json.dumps({"llm.example.com": ["93.184.216.34"]})},
    )  # fmt: skip
    assert server.stdout is not None and server.stderr is not None
    try:
        url = server.stdout.readline().rsplit(" ", 1)[1].strip()
        # (Lines about optional parts, such as the phone bridge being off, may come first.)
        while (started := json.loads(server.stderr.readline()))["msg"] != "started":
            assert started["level"] == "info", started
        assert started["speech_engines"] == "unavailable"
        warning = json.loads(server.stderr.readline())
        assert (warning["level"], warning["msg"], warning["reason"]) == (
            "warning",
            "realtime sessions will fail: the speech engines cannot load",
            engines,
        )
        ready = httpx.get(f"{url}/readyz")
        assert ready.status_code == 503
        assert (ready.json()["status"], ready.json()["speech_engines"]) == ("unavailable", engines)

        async def session() -> SessionFailure:
            patch = SessionPatch(keys=frozenset({"system_prompt"}), system_prompt="Be brief.")
            with pytest.raises(SessionFailure) as failed:
                async with VoiceAgentClient("ws" + url[4:], session=patch,
                                            auth=Auth(api_key=Secret("core-key"))):  # fmt: skip
                    pass
            return failed.value

        failure = asyncio.run(session())
        assert (failure.code, failure.message) == ("agent_init_failed", engines)
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=30)
        server.stdout.close()
        server.stderr.close()
    assert server.returncode == 0


def test_python_versions_are_stated():
    text = (ROOT / "pyproject.toml").read_text()
    assert 'requires-python = ">=3.11,<3.14"' in text
    assert sys.version_info[:2] in ((3, 11), (3, 12), (3, 13))
