"""The browser page against a real ``voxloop serve``, in a real headless Chromium.

Chromium's fake microphone plays a conversation WAV into ``getUserMedia``; the page
captures it through its AudioWorklet, talks to the server over the realtime
WebSocket with a single-use link from ``voxloop agents link``, and plays the agent
through its playback worklet, whose output the test records (the worklet's tap) and
transcribes with the embedded recognizer: what a person would hear.
"""

from __future__ import annotations

import asyncio
import contextlib
import difflib
import json
import os
import re
import shutil
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
from runtime.llm.reference import ReplyPlan

from ..helpers import SPEECH, EndpointThread, conversation, missing

pytestmark = pytest.mark.timeout(300)

API_KEY = "vk-page-operator"
LLM_KEY = "sk-page-llm-3c2b1a"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = Path(os.environ.get("VOXLOOP_TEST_ARTIFACTS", "test-artifacts"))
GREETING = "Hello there."
REPLIES = ("It's sunny in Paris today.", "Done, the table is booked.")
LONG_REPLY = (
    "Paris today is mild and bright, with a light breeze from the west, a few high clouds "
    "in the afternoon, and a clear evening that should be perfect for a walk along the river "
    "before dinner, so you will not need an umbrella at all."
)
LEAD_IN_S = 5.0  # silence before the user speaks: the greeting plays first


@dataclass
class Served:
    http: str
    proc: subprocess.Popen[str]
    log: Path


def words(text: str) -> list[str]:
    return re.sub(r"[^a-z0-9' ]", " ", text.lower().replace("’", "'")).split()


def start_server(data: Path, endpoint: EndpointThread, **env: str) -> Served:
    log = data.parent / "server.log"
    with log.open("a") as handle:
        proc = subprocess.Popen(
            [sys.executable, "-m", "runtime.cli", "serve", "--port", "0", "--data-dir", str(data)],
            stdout=subprocess.PIPE, stderr=handle, text=True,
            env={**os.environ, "VOXLOOP_API_KEYS": API_KEY,
                 "VOXLOOP_LLM_BASE_URL": endpoint.base_url, "VOXLOOP_LLM_MODEL": "page-test",
                 "VOXLOOP_LLM_API_KEY": LLM_KEY, "VOXLOOP_ALLOW_PRIVATE_ENDPOINTS": "127.0.0.1",
                 **env},
        )  # fmt: skip
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.startswith("voxloop serve listening on "), log.read_text()
    served = Served(line.rsplit(" ", 1)[1].strip(), proc, log)
    asyncio.run(warm_up(served))
    return served


async def warm_up(served: Served) -> None:
    """One short session, so the page's session does not wait for the engines to load
    (the fake microphone starts playing when the page opens it, ready or not)."""
    import websockets

    async with websockets.connect(
        "ws" + served.http[4:] + "/v1/ws", additional_headers={"Authorization": API_KEY}
    ) as ws:
        await ws.send('{"type": "session.update", "session": {"system_prompt": "warm-up"}}')
        while '"session.ready"' not in str(await ws.recv()):
            pass
        await ws.send('{"type": "session.end"}')
        while '"session.ended"' not in str(await ws.recv()):
            pass


def stop_server(served: Served) -> None:
    served.proc.send_signal(signal.SIGTERM)
    served.proc.wait(timeout=30)
    assert served.proc.stdout is not None
    served.proc.stdout.close()
    assert "Traceback" not in served.log.read_text(), served.log.read_text()


def create_agent(served: Served) -> str:
    response = httpx.post(
        f"{served.http}/v1/agents",
        json={"name": "page", "system_prompt": "You are brief.", "greeting": GREETING,
              "voice": {"voice_id": "ivy"}},
        headers={"Authorization": API_KEY}, timeout=30,
    )  # fmt: skip
    assert response.status_code == 201, response.text
    agent_id: str = response.json()["id"]
    return agent_id


def link(served: Served, agent_id: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "runtime.cli", "agents", "link", agent_id, "--url", served.http,
         "--expires-in", "120"],
        capture_output=True, text=True, timeout=60, check=False,
        env={**os.environ, "VOXLOOP_API_KEY": API_KEY},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    url = done.stdout.strip()
    assert re.fullmatch(re.escape(served.http) + r"/#agent=agent_\w+&token=[\w.\-%]+", url), url
    return url


def microphone(tmp: Path, name: str, lead_in_s: float, tail_s: float) -> Path:
    """The conversation WAV with silence before (the greeting) and after (the last reply)."""
    audio = read_wav(SPEECH / f"{name}.wav")
    pcm, rate = audio.mono(), audio.sample_rate
    silence = bytes(2 * round(rate * lead_in_s))
    path = tmp / f"mic-{name}.wav"
    write_wav(path, silence + pcm + bytes(2 * round(rate * tail_s)), rate)
    return path


@pytest.fixture(scope="module")
def chromium() -> str:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    if not Path(CHROMIUM).exists():
        missing("Chromium is not installed (apt-get install chromium; .ci/run does)")
    try:
        import playwright.async_api  # noqa: F401
    except ImportError:
        missing("playwright is not installed (pip install -e '.[dev]')")
    return CHROMIUM


async def open_page(pw: Any, chromium: str, mic: Path, url: str) -> tuple[Any, Any]:
    browser = await pw.chromium.launch(
        executable_path=chromium,
        args=["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
              "--disable-background-networking", "--disable-component-update", "--disable-sync",
              "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
              f"--use-file-for-fake-audio-capture={mic}%noloop",
              "--autoplay-policy=no-user-gesture-required"],
    )  # fmt: skip
    # The page's CSP forbids eval; the test's own probes need it.
    page = await browser.new_page(bypass_csp=True)
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    await page.goto(url)
    page.errors = errors
    return browser, page


async def wait_for(page: Any, expression: str, timeout_s: float) -> None:
    await page.wait_for_function(expression, timeout=timeout_s * 1000)


def transcribe(samples: np.ndarray, rate: int) -> str:
    from runtime.speech.engines.whisper import WhisperSTT

    pcm = (np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes()

    async def run() -> str:
        stt = await WhisperSTT.load()
        try:
            return (await stt.transcribe(resample_all(pcm, rate, 16_000), 16_000)).text
        finally:
            await stt.aclose()

    return asyncio.run(run())


def test_a_conversation_in_the_browser(chromium: str, tmp_path: Path) -> None:
    from playwright.async_api import async_playwright

    utterances = conversation("conv-two_turns")
    mic = microphone(tmp_path, "conv-two_turns", LEAD_IN_S, 8.0)
    with EndpointThread(
        ReplyPlan(replies=REPLIES, ttft_ms=30, itl_ms=5), api_key=LLM_KEY
    ) as endpoint:
        served = start_server(tmp_path / "data", endpoint,
                              VOXLOOP_ALLOW_PRIVATE_ENDPOINTS="127.0.0.1")  # fmt: skip
        try:
            agent_id = create_agent(served)
            url = link(served, agent_id)

            async def run() -> dict[str, Any]:
                async with async_playwright() as pw:
                    browser, page = await open_page(pw, chromium, mic, url)
                    try:
                        # The token left the address bar before anything else happened.
                        assert "token=" not in page.url
                        await page.click("#start")
                        await wait_for(page, "window.voxloop.state === 'live'", 60)
                        await page.evaluate("window.voxloop.tap(true)")
                        # Both turns answered and their replies played out.
                        await wait_for(page, "window.voxloop.latencies.length === 2", 120)
                        # The greeting and both replies played to their ends.
                        await wait_for(page, "window.voxloop.drained.length === 3", 60)
                        await page.evaluate("window.voxloop.tap(false)")
                        await wait_for(page, "window.voxloop.played.length > 0", 10)
                        await page.screenshot(path=str(ARTIFACTS / "page-conversation.png"),
                                              full_page=True)  # fmt: skip
                        state: dict[str, Any] = await page.evaluate("""() => ({
                            users: [...document.querySelectorAll('#transcript li.user .text')]
                                .map(e => e.textContent),
                            agents: [...document.querySelectorAll('#transcript li.agent .text')]
                                .map(e => e.textContent),
                            cells: [...document.querySelectorAll('#latency td.ms')]
                                .map(e => e.textContent),
                            events: window.voxloop.events,
                            latencies: window.voxloop.latencies,
                            rate: window.voxloop.sampleRate,
                            played: window.voxloop.played.map(a => Array.from(a)),
                        })""")
                        state["errors"] = page.errors
                        # The link was single-use: a second visit is refused in plain words.
                        second = await browser.new_page(bypass_csp=True)
                        await second.goto(url)
                        await second.click("#start")
                        await second.wait_for_selector("#error:not([hidden])", timeout=60_000)
                        state["reused"] = await second.text_content("#error")
                        await second.screenshot(path=str(ARTIFACTS / "page-used-link.png"))
                        return state
                    finally:
                        await browser.close()

            state = asyncio.run(run())
        finally:
            stop_server(served)

    assert state["errors"] == []
    # Both user turns, in order, recognised from what the fake microphone played.
    assert len(state["users"]) == 2
    assert "paris" in words(state["users"][0])
    assert {"book", "table"} <= set(words(state["users"][1]))
    assert [words(t) for t in state["agents"]] == [words(GREETING), *map(words, REPLIES)]
    # One latency per answered turn, shown in the table.
    assert len(state["latencies"]) == 2
    assert state["cells"] == [f"{ms} ms" for ms in state["latencies"]]
    events = state["events"]
    assert events[0] == "session.ready"
    assert events.count("transcript.user") == 2
    assert events.count("reply.done") == 3
    assert state["reused"] is not None and "already been used" in state["reused"]
    # What the page played: the greeting and both replies, whole, once each, in order.
    played = np.concatenate([np.asarray(block, dtype=np.float32) for block in state["played"]])
    heard = words(transcribe(played, state["rate"]))
    expected = words(GREETING) + [w for reply in REPLIES for w in words(reply)]
    # Nothing missing or repeated: a lost or repeated stretch shows up as words deleted or
    # inserted. The recogniser may mishear a word or two ("sunning"), and on a loaded machine a
    # glitch of the browser's own audio thread may blur one; at most three words of the 14.
    ops = difflib.SequenceMatcher(a=expected, b=heard, autojunk=False).get_opcodes()
    edits = [(op, expected[i1:i2], heard[j1:j2]) for op, i1, i2, j1, j2 in ops if op != "equal"]
    assert all(op == "replace" for op, _, _ in edits), (edits, utterances)
    assert sum(max(len(a), len(b)) for _, a, b in edits) <= 3, edits


def test_an_interruption_empties_the_playback_buffer(chromium: str, tmp_path: Path) -> None:
    from playwright.async_api import async_playwright

    mic = microphone(tmp_path, "conv-barge_in", LEAD_IN_S, 6.0)
    plan = ReplyPlan(replies=(LONG_REPLY, "Sorry, what did you ask?"), ttft_ms=30, itl_ms=5)
    with EndpointThread(plan, api_key=LLM_KEY) as endpoint:
        served = start_server(tmp_path / "data", endpoint,
                              VOXLOOP_ALLOW_PRIVATE_ENDPOINTS="127.0.0.1")  # fmt: skip
        try:
            url = link(served, create_agent(served))

            async def run() -> dict[str, Any]:
                async with async_playwright() as pw:
                    browser, page = await open_page(pw, chromium, mic, url)
                    try:
                        await page.click("#start")
                        await wait_for(page, "window.voxloop.state === 'live'", 60)
                        await wait_for(
                            page,
                            "document.querySelector('#transcript li.agent.interrupted')",
                            120,
                        )
                        await page.screenshot(path=str(ARTIFACTS / "page-interrupted.png"),
                                              full_page=True)  # fmt: skip
                        state: dict[str, Any] = await page.evaluate("""() => ({
                            events: window.voxloop.events,
                            cleared: window.voxloop.cleared,
                            interrupted: document.querySelector(
                                '#transcript li.agent.interrupted .text').textContent,
                        })""")
                        return state
                    finally:
                        await browser.close()

            state = asyncio.run(run())
        finally:
            stop_server(served)

    events = state["events"]
    # The server's interruption: the reply was cut, and the page dropped what it had queued.
    assert "input.speech.started" in events
    cut = events.index("input.speech.started")
    assert "reply.done" in events[cut:]
    # The page emptied its playback buffer at the interruption. (The server pauses the reply
    # at the user's first speech, so by the decision the buffer holds at most what was sent
    # ahead, and often nothing: what matters is that the page cleared it and played no more.)
    assert state["cleared"], state["cleared"]
    # What was heard of the long reply is a strict beginning of it.
    heard = words(state["interrupted"])
    assert (
        heard and heard == words(LONG_REPLY)[: len(heard)] and len(heard) < len(words(LONG_REPLY))
    )


@pytest.fixture(scope="module")
def page_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Served, str]]:
    """A server publishing a page for one agent, 2 tokens a minute per address."""
    data = tmp_path_factory.mktemp("page-only") / "data"
    with EndpointThread(ReplyPlan(replies=REPLIES), api_key=LLM_KEY) as endpoint:
        served = start_server(data, endpoint, VOXLOOP_PAGE_AGENT="agent_published",
                              VOXLOOP_PAGE_TOKENS_PER_MINUTE="2",
                              VOXLOOP_PAGE_SESSION_SECONDS="120")  # fmt: skip
        try:
            yield served, create_agent(served)
        finally:
            stop_server(served)


def test_the_page_and_its_files_are_served(page_server: tuple[Served, str]) -> None:
    served, _ = page_server
    with httpx.Client(base_url=served.http, timeout=30) as client:
        page = client.get("/", headers={"Accept": "text/html,application/xhtml+xml"})
        index = client.get("/", headers={"Accept": "application/json"})
        script = client.get("/page/page.js")
        worklet = client.get("/page/capture.js")
        unknown = client.get("/page/secret.key")
        escape = client.get("/page/..%2Fapp.py")
    assert page.status_code == 200 and page.headers["content-type"] == "text/html; charset=utf-8"
    assert '<script type="module" src="/page/page.js">' in page.text
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert index.json()["page"] == "/ (in a browser)"
    assert script.headers["content-type"] == "text/javascript; charset=utf-8"
    assert 'registerProcessor("vx-capture"' in worklet.text
    assert (unknown.status_code, escape.status_code) == (404, 404)


def test_page_only_mode_mints_rate_limited_tokens(page_server: tuple[Served, str]) -> None:
    served, _ = page_server
    with httpx.Client(base_url=served.http, timeout=30) as client:
        answers = [client.post("/page/token") for _ in range(3)]
        # A page token is a real single-use credential for the published agent.
        token = answers[0].json()["token"]
        used = client.get(f"/v1/agents?token={token}")
    assert [a.status_code for a in answers] == [200, 200, 429]
    assert answers[0].json()["agent_id"] == "agent_published"
    assert answers[0].json()["expires_in_seconds"] == 60
    assert answers[0].json()["token"] != answers[1].json()["token"]
    assert answers[2].headers["retry-after"] == "60"
    assert answers[2].json()["code"] == "rate_limited"
    assert used.status_code == 401  # a token opens a socket, never the REST API

    async def redeem() -> list[str]:
        import websockets

        seen = []
        for _ in range(2):
            async with websockets.connect("ws" + served.http[4:] + f"/v1/ws?token={token}") as ws:
                # A refused token is answered at the upgrade: the send may find it closed.
                with contextlib.suppress(websockets.ConnectionClosed):
                    await ws.send('{"type": "session.update", "session": {"system_prompt": "x"}}')
                event = json.loads(await ws.recv())
                seen.append(event["type"] + ":" + event.get("code", ""))
                if event["type"] == "session.ready":
                    await ws.send('{"type": "session.end"}')
        return seen

    assert asyncio.run(redeem()) == ["session.ready:", "session.error:unauthorized"]


def test_without_page_mode_page_tokens_are_not_minted(tmp_path: Path) -> None:
    with EndpointThread(ReplyPlan(replies=REPLIES), api_key=LLM_KEY) as endpoint:
        served = start_server(tmp_path / "data", endpoint)
        try:
            answer = httpx.post(f"{served.http}/page/token", timeout=30)
        finally:
            stop_server(served)
    assert answer.status_code == 404
    assert "VOXLOOP_PAGE_AGENT" in answer.json()["message"]


@pytest.mark.parametrize(
    ("args", "line", "code"),
    [
        (["agent_nosuch"], "HTTP 404", 1),
        (
            ["{agent}", "--expires-in", "0"],
            "voxloop: error: --expires-in must be from 1 to 600 seconds",
            2,
        ),
        (
            ["{agent}", "--expires-in", "601"],
            "voxloop: error: --expires-in must be from 1 to 600 seconds",
            2,
        ),
    ],
)
def test_agents_link_mistakes(
    page_server: tuple[Served, str], args: list[str], line: str, code: int
) -> None:
    served, agent = page_server
    done = subprocess.run(
        [sys.executable, "-m", "runtime.cli", "agents", "link",
         *[a.replace("{agent}", agent) for a in args], "--url", served.http],
        capture_output=True, text=True, timeout=60, check=False,
        env={**os.environ, "VOXLOOP_API_KEY": API_KEY},
    )  # fmt: skip
    assert done.returncode == code, done.stderr
    assert line in done.stderr
    assert done.stdout == "" and "Traceback" not in done.stderr
