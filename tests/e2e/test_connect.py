"""``voxloop connect`` against a real ``voxloop serve`` process: real sockets, real speech
through the real engines, and a loopback OpenAI-compatible endpoint that checks the
Bearer key it receives and records what it was asked."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from audio.resample import resample_all
from audio.wav import read_wav, write_wav
from runtime.client.connection import (
    Auth,
    ConnectionDropped,
    SessionResumed,
    VoiceAgentClient,
)
from runtime.client.runner import RATE, WireCodec, connect_pcm
from runtime.llm.reference import ReplyPlan
from runtime.protocol import events as ev
from runtime.secret import Secret

from ..helpers import REAL, SPEECH, EndpointThread, missing

# Real-time conversations, and the server's first session loads its speech engines.
pytestmark = pytest.mark.timeout(240)

API_KEY = "vk-connect-operator"
LLM_KEY = "sk-connect-llm-7f6e5d"
ROOT = Path(__file__).resolve().parents[2]
REPLIES = ("It's sunny in Paris today.", "Done, the table is booked.")


@dataclass
class Served:
    http: str
    ws: str
    proc: subprocess.Popen[str]
    log: Path


@pytest.fixture(scope="module")
def endpoint() -> Iterator[EndpointThread]:
    with EndpointThread(
        ReplyPlan(replies=REPLIES, ttft_ms=30, itl_ms=5), api_key=LLM_KEY
    ) as thread:
        yield thread


@pytest.fixture(autouse=True)
def initial_replies(endpoint: EndpointThread) -> None:
    """Each test starts with the endpoint's own replies (a test may have queued others)."""
    endpoint.answer()


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, endpoint: EndpointThread) -> Iterator[Served]:
    data = tmp_path_factory.mktemp("connect") / "data"
    log = data.parent / "server.log"
    with log.open("a") as handle:
        proc = subprocess.Popen(
            [sys.executable, "-m", "runtime.cli", "serve", "--port", "0", "--data-dir", str(data)],
            stdout=subprocess.PIPE, stderr=handle, text=True,
            env={**os.environ, "VOXLOOP_API_KEYS": API_KEY,
                 "VOXLOOP_ALLOW_PRIVATE_ENDPOINTS": "127.0.0.1",
                 "VOXLOOP_LLM_BASE_URL": endpoint.base_url, "VOXLOOP_LLM_MODEL": "server-default",
                 "VOXLOOP_LLM_API_KEY": LLM_KEY},
        )  # fmt: skip
        assert proc.stdout is not None
        try:
            line = proc.stdout.readline()
            assert line.startswith("voxloop serve listening on "), log.read_text()
            http = line.rsplit(" ", 1)[1].strip()
            yield Served(http, "ws" + http[4:] + "/v1/ws", proc, log)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)
            proc.stdout.close()
    assert "Traceback" not in log.read_text(), log.read_text()


def create_agent(served: Served, **fields: Any) -> str:
    """A stored agent without its own ``llm``: it answers on the server's default endpoint
    (stored endpoints must be https; the loopback endpoint is plain http)."""
    body = {"name": "connect-test", "system_prompt": "You are brief.",
            "voice": {"voice_id": "ivy"}, **fields}  # fmt: skip
    response = httpx.post(f"{served.http}/v1/agents", json=body,
                          headers={"Authorization": API_KEY}, timeout=30)  # fmt: skip
    assert response.status_code in (200, 201), response.text
    agent_id: str = response.json()["id"]
    return agent_id


def connect_cli(served: Served, *args: str, key: str = API_KEY) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "runtime.cli", "connect", served.ws, *args],
        capture_output=True, text=True, timeout=180, check=False,
        env={**os.environ, "VOXLOOP_API_KEY": key},
    )  # fmt: skip


def words(text: str) -> str:
    return " ".join(re.sub(r"[^a-z0-9 ]", "", text.lower()).split())


def loud_blocks(pcm: bytes, rate: int = RATE) -> np.ndarray:
    x = np.frombuffer(pcm, dtype="<i2").astype(np.float64) / 32768
    n = len(x) // (rate // 100)
    rms = np.sqrt(np.mean(x[: n * (rate // 100)].reshape(n, -1) ** 2, axis=1))
    blocks: np.ndarray = np.nonzero(20 * np.log10(rms + 1e-9) > -40)[0]
    return blocks


def test_two_spoken_turns_headless_with_a_stored_agent(
    served: Served, endpoint: EndpointThread, tmp_path: Path
):
    agent = create_agent(served)
    out, metrics = tmp_path / "out.wav", tmp_path / "m.json"
    clip = SPEECH / "conv-two_turns.wav"
    n_before = len(endpoint.chats())
    result = connect_cli(served, "--agent-id", agent, "--input", str(clip), "--output", str(out),
                         "--metrics-json", str(metrics))  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    doc = json.loads(metrics.read_text())
    turns = doc["turns"]
    assert doc["session_id"].startswith("sess_")
    users = [words(t["user_text"]) for t in turns]
    assert len(users) == 2 and "weather like in" in users[0] and "book a table for" in users[1]
    assert [t["agent_text"] for t in turns] == list(REPLIES)
    assert all(t["v2v_ms"] > t["endpointing_ms"] > 0 and not t["interrupted"] for t in turns)
    assert f"agent {REPLIES[1]}" in result.stdout
    # The endpoint answered, given its key, and the second request had the history.
    chats = endpoint.chats()[n_before:]
    assert len(chats) == 2
    assert chats[1].headers.get("authorization") == f"Bearer {LLM_KEY}"
    history = [(m["role"], m["content"]) for m in chats[1].body["messages"]][1:]  # type: ignore[index]
    assert history[1] == ("assistant", REPLIES[0]) and history[-1][0] == "user"
    # The recording: the user on the left exactly as sent, the agent on the right after each turn.
    stereo = read_wav(out)
    assert (stereo.channels, stereo.sample_rate) == (2, RATE)
    src = read_wav(clip)
    user = resample_all(src.mono(), src.sample_rate, RATE)
    assert stereo.channel(0)[: len(user)] == user
    agent_blocks = loud_blocks(stereo.channel(1))
    first_user_end = 2.532
    assert agent_blocks.size and agent_blocks[0] / 100 > first_user_end
    second = agent_blocks[agent_blocks / 100 > 10.947]
    assert second.size, "no agent audio after the second turn"


def test_mulaw_in_and_out_with_an_inline_session_on_real_speech(served: Served, tmp_path: Path):
    # A real telephone recording (8 kHz), sent as μ-law; the reply comes back as μ-law.
    src = read_wav(REAL / "hello-world.wav")
    clip = tmp_path / "hello.wav"
    write_wav(clip, bytes(8000) + src.mono() + bytes(8000), src.sample_rate)
    out, metrics = tmp_path / "out.wav", tmp_path / "m.json"
    result = connect_cli(served, "--system-prompt", "Be brief.", "--input-encoding", "pcmu",
                         "--output-encoding", "pcmu", "--input", str(clip), "--output", str(out),
                         "--metrics-json", str(metrics))  # fmt: skip
    assert result.returncode == 0, result.stderr
    [turn] = json.loads(metrics.read_text())["turns"]
    assert words(turn["user_text"]) == "hello world"
    assert turn["agent_text"] in REPLIES
    right = read_wav(out).channel(1)
    # μ-law at 8 kHz upsampled: nothing above 4 kHz in the agent's audio.
    x = np.frombuffer(right, dtype="<i2").astype(np.float64)
    spectrum = np.abs(np.fft.rfft(x)) ** 2
    freqs = np.fft.rfftfreq(len(x), 1 / RATE)
    assert spectrum[freqs > 4200].sum() < 0.001 * spectrum.sum()
    assert loud_blocks(right).size > 50  # at least half a second of speech


def test_client_tool_round_trip_from_the_command_line(
    served: Served, endpoint: EndpointThread, tmp_path: Path
):
    tool = {"type": "function", "name": "get_weather", "description": "Weather for a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}  # fmt: skip
    agent = create_agent(served, tools=[tool])
    # Every request the same plan: the call while the user's message is the last one, the
    # answer once the tool's result is (so a speculative request the turn did not keep, on
    # a busy machine, takes nothing from the next).
    endpoint.answer(
        default=ReplyPlan(
            tool_name="get_weather",
            tool_arguments='{"city": "Paris"}',
            replies=("It is eighteen degrees.",),
            ttft_ms=30,
            itl_ms=5,
        )
    )
    metrics = tmp_path / "m.json"
    result = connect_cli(served, "--agent-id", agent, "--input", str(SPEECH / "shared-00-piper.wav"),
                         "--tool-result", 'get_weather={"temp_c": 18}',
                         "--metrics-json", str(metrics))  # fmt: skip
    assert result.returncode == 0, result.stderr
    lines = [line.split(" (")[0] for line in result.stdout.splitlines()
             if line.startswith(("agent", "tool call"))]  # fmt: skip
    assert lines == ["tool call get_weather", "agent It is eighteen degrees."]
    messages = endpoint.chats()[-1].body["messages"]  # type: ignore[index]
    assert messages[-1]["role"] == "tool" and messages[-1]["content"] == '{"temp_c": 18}'
    # One turn: the reply went on after the tool's result (a new reply.started).
    [turn] = json.loads(metrics.read_text())["turns"]
    assert turn["agent_text"] == "It is eighteen degrees."
    assert turn["v2v_ms"] > turn["endpointing_ms"] > 0 and not turn["interrupted"]


def test_a_turn_taken_back_prints_as_one_sentence(
    served: Served, endpoint: EndpointThread, tmp_path: Path
):
    # "I want to fly from Boston to" [900 ms] "New York next week.": the turn ends at the
    # pause, and the user goes on before the slow reply is heard; as talk prints it.
    agent = create_agent(served)
    slow = ReplyPlan(replies=("Which day?",), ttft_ms=3000, itl_ms=5)
    endpoint.answer(*[slow] * 6)
    clip = tmp_path / "in.wav"
    write_wav(clip, bytes(8000) + read_wav(SPEECH / "paused-boston.wav").pcm + bytes(32000), 16000)
    metrics = tmp_path / "m.json"
    result = connect_cli(served, "--agent-id", agent, "--input", str(clip),
                         "--metrics-json", str(metrics))  # fmt: skip
    assert result.returncode == 0, result.stderr
    # One turn, the whole of it: the withdrawn reply is no turn.
    [turn] = json.loads(metrics.read_text())["turns"]
    assert "new york next week" in turn["user_text"].lower(), turn
    assert (turn["agent_text"], turn["interrupted"]) == ("Which day?", False)
    you = [line for line in result.stdout.splitlines() if line.startswith("you ")]
    assert len(you) == 2 and you[1].endswith("(went on: replaces the line above)"), result.stdout
    assert "new york next week" in you[1].lower() and "(went on" not in you[0], result.stdout
    agent_lines = [line for line in result.stdout.splitlines() if line.startswith("agent")]
    assert agent_lines == ["agent Which day?"], result.stdout


def test_what_is_said_is_printed_as_said_brackets_included(
    served: Served, endpoint: EndpointThread, tmp_path: Path
):
    text = "Press the [/] key, then [bold]enter[/bold] and type [red] twice."
    agent = create_agent(served)
    endpoint.answer(default=text)  # every request (a speculative one the turn did not keep too)
    result = connect_cli(served, "--agent-id", agent, "--input",
                         str(SPEECH / "shared-09-piper.wav"))  # fmt: skip
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if line.startswith("agent")]
    assert lines == [f"agent {text}"], result.stdout


def test_exit_codes_against_the_server(served: Served, endpoint: EndpointThread, tmp_path: Path):
    clip = SPEECH / "shared-09-piper.wav"
    bad = connect_cli(served, "--agent-id", "agent_x", "--input", str(clip), key="not-a-key")
    assert bad.returncode == 4, bad.stderr
    assert bad.stderr.startswith("voxloop: error: ") and "(unauthorized)" in bad.stderr
    assert "not-a-key" not in bad.stderr
    missing = connect_cli(served, "--agent-id", "agent_nope", "--input", str(clip))
    assert missing.returncode == 5 and "(agent_not_found)" in missing.stderr, missing.stderr
    # A token is single use: the second session with it is refused.
    token = httpx.get(f"{served.http}/v1/token", params={"expires_in_seconds": 60},
                      headers={"Authorization": API_KEY}, timeout=30).json()["token"]  # fmt: skip
    agent = create_agent(served)
    first = connect_cli(served, "--agent-id", agent, "--token", token, "--input", str(clip))
    assert first.returncode == 0, first.stderr
    again = connect_cli(served, "--agent-id", agent, "--token", token, "--input", str(clip))
    assert again.returncode == 4 and "(unauthorized)" in again.stderr, again.stderr
    assert token not in again.stderr


async def test_a_dropped_socket_is_resumed_and_the_conversation_goes_on(
    served: Served, endpoint: EndpointThread
):
    agent = create_agent(served)
    session = ev.SessionPatch(keys=frozenset({"agent_id"}), agent_id=agent)
    codec = WireCodec("audio/pcm")
    loop = asyncio.get_running_loop()

    def clip(name: str) -> bytes:
        audio = read_wav(SPEECH / name)
        pcm = resample_all(audio.mono(), audio.sample_rate, RATE)
        return bytes(RATE // 2 * 2) + pcm + bytes(RATE * 2 * 2)

    async with VoiceAgentClient(
        served.ws, session=session, auth=Auth(api_key=Secret(API_KEY))
    ) as client:
        seen: list[Any] = []
        first_done = asyncio.Event()
        second_done = asyncio.Event()

        async def consume() -> None:
            async for event in client.events():
                seen.append(event)
                if isinstance(event, ev.ReplyDone):
                    (second_done if first_done.is_set() else first_done).set()

        async def speak(pcm: bytes) -> None:
            t0 = loop.time()
            for i in range(0, len(pcm), 2400):
                with_delay = t0 + (i + 2400) / 2 / RATE - loop.time()
                if with_delay > 0:
                    await asyncio.sleep(with_delay)  # the microphone's real-time pace
                await client.send_audio(codec.encode(pcm[i : i + 2400]))

        async with asyncio.TaskGroup() as tg:
            tg.create_task(consume())
            await speak(clip("shared-00-piper.wav"))
            await first_done.wait()
            assert client._ws is not None
            client._ws.transport.abort()  # the network drops: no close frame
            while not any(isinstance(e, SessionResumed) for e in seen):
                await speak(bytes(2400 * 2))  # the user waits on the line
            await speak(clip("shared-01-piper.wav"))
            await second_done.wait()
            await client.end()
    assert client.error is None and client.protocol.ended is not None
    assert any(isinstance(e, ConnectionDropped) and e.close_code is None for e in seen)
    users = [words(e.text) for e in seen if isinstance(e, ev.TranscriptUser)]
    # (Whisper's spelling of "Paris" and "7:30" varies with where the turn was cut.)
    assert len(users) == 2 and "weather like in" in users[0] and "book a table for" in users[1]
    assert client.statistics().resumes == 1
    messages = endpoint.chats()[-1].body["messages"]  # type: ignore[index]
    assert [m["role"] for m in messages[1:]] == ["user", "assistant", "user"]


def test_the_documented_python_example_runs_as_written(served: Served, tmp_path: Path):
    page = (ROOT / "docs" / "protocol.md").read_text(encoding="utf-8")
    section = page.split("## A client in plain Python (`websockets`)", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    (tmp_path / "client.py").write_text(code, encoding="utf-8")
    audio = read_wav(SPEECH / "shared-04-piper.wav")  # "Please cancel my subscription."
    write_wav(tmp_path / "question-24k.wav",
              bytes(12000) + resample_all(audio.mono(), audio.sample_rate, 24000), 24000)  # fmt: skip
    result = subprocess.run(
        [sys.executable, "client.py", "question-24k.wav"], cwd=tmp_path, capture_output=True,
        text=True, timeout=120, check=False,
        env={**os.environ, "VOXLOOP_URL": served.ws, "VOXLOOP_API_KEY": API_KEY},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("session sess_")
    assert "cancel my subscription" in lines[1].lower() and lines[1].startswith("you:")
    assert lines[2].startswith("agent: ") and lines[2][7:] in REPLIES
    assert lines[-1] == "session.ended"
    reply = read_wav(tmp_path / "reply.wav")
    assert reply.sample_rate == 24000 and loud_blocks(reply.pcm).size > 50


LONG_REPLY = (
    "The weather in Paris today is mild and mostly sunny, with a light breeze from the west, "
    "a high of about twenty degrees in the afternoon, and a small chance of showers late in "
    "the evening, so you may want to bring a light jacket if you plan to stay out after dark."
)


async def test_barge_in_cuts_the_playback_where_the_user_started_talking(
    served: Served, endpoint: EndpointThread
):
    endpoint.answer(ReplyPlan(replies=(LONG_REPLY,), ttft_ms=30, itl_ms=5))
    audio = read_wav(SPEECH / "conv-barge_in.wav")  # a question, then "Wait, stop, ..." at 6.6 s
    pcm = resample_all(audio.mono(), audio.sample_rate, RATE)
    loop = asyncio.get_running_loop()
    timeline: list[tuple[float, object]] = []
    session = ev.SessionPatch(keys=frozenset({"system_prompt"}), system_prompt="Be brief.")
    result = await connect_pcm(
        pcm, url=served.ws, auth=Auth(api_key=Secret(API_KEY)), session=session,
        on_event=lambda e: timeline.append((loop.time(), e)),
    )  # fmt: skip
    t0 = next(t for t, e in timeline if isinstance(e, ev.SessionReady))
    cut = [m for m in result.metrics if m.interrupted]
    assert cut, result.metrics
    first = cut[0]
    assert first.agent_text and LONG_REPLY.startswith(first.agent_text.rstrip(".,"))
    assert len(first.agent_text) < len(LONG_REPLY) / 2
    # Nothing of the cut reply is heard after input.speech.started (the server stops
    # sending, the client flushes what it holds) until the next reply.
    began = next(t - t0 for t, e in timeline
                 if isinstance(e, ev.ReplyStarted) and e.reply_id == first.reply_id)  # fmt: skip
    started = [t - t0 for t, e in timeline if isinstance(e, ev.InputSpeechStarted)]
    replies = [t - t0 for t, e in timeline if isinstance(e, ev.ReplyStarted)]
    barge = next(t for t in started if t > began)
    after = next((t for t in replies if t > barge), result.duration_s)
    agent = loud_blocks(result.agent) / 100
    assert any(began < t < barge for t in agent), "the agent did not speak"
    assert not any(barge + 0.03 < t < after for t in agent), "audio played after the flush"


def test_live_mode_on_real_devices_with_echo_cancellation(served: Served, tmp_path: Path):
    # PortAudio through an ALSA null device (no sound card): the microphone delivers
    # silence through the echo canceller (16 kHz, resampled to the wire's 24 kHz), the
    # speaker plays the greeting as its reference; Ctrl-C ends the session cleanly.
    (tmp_path / ".asoundrc").write_text(
        "pcm.!default { type null }\npcm.voxloop_null { type null }\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "runtime.cli", "connect", served.ws, "--greeting", "Hello there.",
         "--input-device", "voxloop_null", "--output-device", "voxloop_null"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "HOME": str(tmp_path), "VOXLOOP_API_KEY": API_KEY},
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        if "listening" not in first:
            _, err = proc.communicate(timeout=60)
            assert "PortAudio is not installed" in err and "Traceback" not in err
            missing("PortAudio is not installed (apt-get install libportaudio2; .ci/run does)")
        # With the aec extra installed (as in dev), echo cancellation is the default.
        assert "connected; listening, echo: aec (speak over the agent to interrupt it)" in first
        greeting = proc.stdout.readline()  # the server's greeting, played into the null speaker
        assert "Hello there." in greeting
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
