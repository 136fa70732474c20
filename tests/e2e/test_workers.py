"""Several workers sharing PostgreSQL-or-SQLite and Redis, as operators run them: real
``voxloop serve`` processes, a real ``redis-server``, real sockets.

What must hold across workers: a session dropped on one resumes on another with its
history; a temporary token is redeemed once however many workers race for it; a rate
limit counts a key's requests wherever they land. And a worker going away drains: no
session is cut mid-reply, and sessions it cannot wait for resume elsewhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets

from audio.resample import resample_all
from audio.wav import read_wav
from runtime.bench.workers import connection_worker, established, listening, worker_pids
from runtime.client.connection import Auth
from runtime.client.runner import connect_pcm
from runtime.llm.reference import ReplyPlan
from runtime.protocol import events as ev
from runtime.secret import Secret
from runtime.sessions.resume import ResumableState
from runtime.sessions.shared_state import (
    RedisRateLimiter,
    RedisSessionStore,
    RedisTokenUses,
    connect,
)

from ..helpers import EndpointThread
from ..redis_server import redis_server

pytestmark = pytest.mark.timeout(300)

SPEECH = Path(__file__).resolve().parents[1] / "data" / "speech"

API_KEY = "vk-workers-operator"
LLM_KEY = "sk-workers-llm-5e4d3c"
LONG_REPLY = (
    "Here is the whole forecast for the week ahead, day by day, with the wind and the rain "
    "and the temperatures at dawn and at dusk, so that you can plan every walk."
)


@dataclass
class Worker:
    http: str
    proc: subprocess.Popen[str]
    log: Path

    @property
    def ws(self) -> str:
        return "ws" + self.http[4:] + "/v1/ws"


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    with redis_server() as url:
        yield url


@pytest.fixture(scope="module")
def endpoint() -> Iterator[EndpointThread]:
    with EndpointThread(ReplyPlan(replies=("Noted.",), ttft_ms=20, itl_ms=5),
                        api_key=LLM_KEY) as thread:  # fmt: skip
        yield thread


def start_worker(
    data: Path, endpoint: EndpointThread, redis_url: str | None, *args: str, **env: str
) -> Worker:
    log = data.parent / f"worker-{len(list(data.parent.glob('worker-*.log')))}.log"
    with log.open("a") as handle:
        proc = subprocess.Popen(
            [sys.executable, "-m", "runtime.cli", "serve", "--port", "0", "--data-dir", str(data),
             *args],
            stdout=subprocess.PIPE, stderr=handle, text=True,
            env={**os.environ, "VOXLOOP_API_KEYS": API_KEY,
                 "VOXLOOP_ALLOW_PRIVATE_ENDPOINTS": "127.0.0.1",
                 "VOXLOOP_LLM_BASE_URL": endpoint.base_url, "VOXLOOP_LLM_MODEL": "workers",
                 "VOXLOOP_LLM_API_KEY": LLM_KEY, "VOXLOOP_TTS": "espeak",
                 **({"VOXLOOP_REDIS_URL": redis_url} if redis_url else {}), **env},
        )  # fmt: skip
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.startswith("voxloop serve listening on "), log.read_text()
    return Worker(line.rsplit(" ", 1)[1].strip(), proc, log)


def stop(worker: Worker, *, signalled: bool = False) -> int:
    """Stop a worker (``signalled``: it was sent SIGTERM already; wait for its exit)."""
    if not signalled and worker.proc.poll() is None:
        worker.proc.send_signal(signal.SIGTERM)
    code = worker.proc.wait(timeout=60)
    assert worker.proc.stdout is not None
    worker.proc.stdout.close()
    assert "Traceback" not in worker.log.read_text(), worker.log.read_text()
    return code


@pytest.fixture
def pair(
    tmp_path: Path, endpoint: EndpointThread, redis_url: str
) -> Iterator[tuple[Worker, Worker]]:
    """Two separate worker processes on one database and one Redis."""
    data = tmp_path / "data"
    a = start_worker(data, endpoint, redis_url)
    b = start_worker(data, endpoint, redis_url)
    try:
        yield a, b
    finally:
        stop(a)
        stop(b)


async def until(ws: Any, kind: str) -> dict[str, Any]:
    """Events up to and including the first of type ``kind``; returns that one."""
    while True:
        event = json.loads(await ws.recv())
        if event["type"] == kind:
            return dict(event)
        assert event["type"] != "session.error", event


async def open_session(url: str, **connect: Any) -> tuple[Any, dict[str, Any]]:
    ws = await websockets.connect(url, **connect)
    await ws.send(json.dumps({"type": "session.update",
                              "session": {"system_prompt": "You are brief."}}))  # fmt: skip
    return ws, await until(ws, "session.ready")


async def resume_and_reply(worker: Worker, ready: dict[str, Any]) -> dict[str, Any]:
    """Resume the session of ``ready`` on ``worker`` with its resume token, get one reply,
    end it; returns the new ``session.ready``."""
    resumed = await websockets.connect(
        worker.ws, additional_headers={"Authorization": ready["resume_token"]}
    )
    await resumed.send(json.dumps({"type": "session.resume",
                                   "session_id": ready["session_id"]}))  # fmt: skip
    again = await until(resumed, "session.ready")
    await resumed.send('{"type": "reply.create"}')
    await until(resumed, "reply.done")
    await resumed.send('{"type": "session.end"}')
    await until(resumed, "session.ended")
    await resumed.close()
    return again


def key() -> dict[str, Any]:
    return {"additional_headers": {"Authorization": API_KEY}}


# -- the shared state, against a real Redis -----------------------------------------


async def test_redis_session_store_keeps_a_state_for_the_grace_and_gives_it_once(
    redis_url: str,
) -> None:
    redis = connect(redis_url)
    try:
        store = RedisSessionStore(redis, prefix="t1:")
        state = ResumableState(
            session_id="sess_x", owner="key:o", resume_token_hash="h", spec={"a": [1]},
            history=[{"role": "user", "content": "hi"}], started_at=1.5, expires_at=99.5,
            audio_seconds=2.25,
        )  # fmt: skip
        await store.save(state, 30.0)
        ttl_ms = await redis.pttl("t1:session:sess_x")
        assert 29_000 < ttl_ms <= 30_000
        taken = await asyncio.gather(*(store.take("sess_x") for _ in range(20)))
        assert [t for t in taken if t is not None] == [state]
        assert await store.take("sess_x") is None
        await store.save(state, 30.0)
        await store.discard("sess_x")
        assert await store.take("sess_x") is None
    finally:
        await redis.aclose()


async def test_redis_token_uses_and_rate_limits_are_exact(redis_url: str) -> None:
    redis = connect(redis_url)
    try:
        uses = RedisTokenUses(redis, prefix="t2:")
        wins = await asyncio.gather(*(uses.first_use("jti-1", 60) for _ in range(50)))
        assert wins.count(True) == 1
        assert 0 < await redis.ttl("t2:token:jti-1") <= 60
        limiter = RedisRateLimiter(redis, prefix="t2:", clock=lambda: 600.0)
        first = [await limiter.allow("s", "key:a", 3) for _ in range(4)]
        other = await limiter.allow("s", "key:b", 3)
        later = RedisRateLimiter(redis, prefix="t2:", clock=lambda: 660.0)
        assert (first, other, await later.allow("s", "key:a", 3)) == (
            [True, True, True, False],
            True,
            True,
        )
    finally:
        await redis.aclose()


def test_a_wrong_redis_url_is_one_line(tmp_path: Path, endpoint: EndpointThread) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "runtime.cli", "serve", "--port", "0", "--data-dir",
         str(tmp_path / "d"), "--workers", "2"],
        capture_output=True, text=True, timeout=60, check=False,
        env={**os.environ, "VOXLOOP_API_KEYS": API_KEY, "VOXLOOP_REDIS_URL": "http://x"},
    )  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "voxloop: error: VOXLOOP_REDIS_URL must be redis://host:port/db (or rediss://, unix://)"
    ]


def test_several_workers_without_redis_are_refused(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "runtime.cli", "serve", "--port", "0", "--data-dir",
         str(tmp_path / "d"), "--workers", "3"],
        capture_output=True, text=True, timeout=60, check=False,
        env={**{k: v for k, v in os.environ.items() if k != "VOXLOOP_REDIS_URL"},
             "VOXLOOP_API_KEYS": API_KEY},
    )  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "voxloop: error: --workers 3 needs VOXLOOP_REDIS_URL (redis://host:6379/0): without "
        "shared state a session dropped on one worker cannot resume on another"
    ]
    assert done.stdout == ""


# -- across workers --------------------------------------------------------------------


def test_a_token_is_redeemed_once_across_two_workers(pair: tuple[Worker, Worker]) -> None:
    a, b = pair
    token = httpx.get(f"{a.http}/v1/token?expires_in_seconds=60",
                      headers={"Authorization": API_KEY}, timeout=30).json()["token"]  # fmt: skip

    async def attempt(worker: Worker) -> str:
        try:
            ws, _ = await open_session(f"{worker.ws}?token={token}")
        except (AssertionError, websockets.ConnectionClosed):
            return "refused"
        await ws.send('{"type": "session.end"}')
        await until(ws, "session.ended")
        await ws.close()
        return "ready"

    async def race() -> list[str]:
        return await asyncio.gather(*(attempt(w) for w in (a, b) * 25))

    outcomes = asyncio.run(race())
    assert sorted(outcomes) == ["ready"] + ["refused"] * 49


def test_a_dropped_session_resumes_on_another_worker_with_its_history(
    pair: tuple[Worker, Worker], endpoint: EndpointThread
) -> None:
    a, b = pair

    async def run() -> tuple[str, dict[str, Any]]:
        ws, ready = await open_session(a.ws, **key())
        await ws.send(json.dumps({"type": "conversation.message", "role": "user",
                                  "content": "My name is Ada."}))  # fmt: skip
        await ws.send('{"type": "reply.create"}')
        await until(ws, "reply.done")
        # A drop: the transport goes away without session.end.
        ws.transport.abort()
        await ws.wait_closed()
        # The owner's resume token, on the other worker.
        return ready["session_id"], await resume_and_reply(b, ready)

    session_id, again = asyncio.run(run())
    assert again["session_id"] == session_id
    last = endpoint.chats()[-1].body
    assert last is not None
    contents = [(m["role"], m["content"]) for m in last["messages"] if m["role"] != "system"]
    assert contents[:2] == [("user", "My name is Ada."), ("assistant", "Noted.")]


def test_session_starts_are_rate_limited_across_workers(
    tmp_path: Path, endpoint: EndpointThread, redis_url: str
) -> None:
    data = tmp_path / "data"
    env = {"VOXLOOP_SESSIONS_PER_MINUTE": "3", "VOXLOOP_REDIS_PREFIX": "rl-test:"}
    a = start_worker(data, endpoint, redis_url, **env)
    b = start_worker(data, endpoint, redis_url, **env)
    try:

        async def attempt(worker: Worker) -> str:
            ws = await websockets.connect(worker.ws, **key())
            # A refused start may be closed (after its error event) before this arrives.
            with contextlib.suppress(websockets.ConnectionClosed):
                await ws.send('{"type": "session.update", "session": {"system_prompt": "x"}}')
            event = json.loads(await ws.recv())
            if event["type"] == "session.ready":
                await ws.send('{"type": "session.end"}')
                await until(ws, "session.ended")
            await ws.close()
            return str(event.get("code") or event["type"])

        async def sequence() -> list[str]:
            return [await attempt(w) for w in (a, b, a, b)]

        outcomes = asyncio.run(sequence())
    finally:
        stop(a)
        stop(b)
    assert outcomes == ["session.ready", "session.ready", "session.ready", "at_capacity"]


# -- one port, several processes; drain ---------------------------------------------------


def test_serve_workers_on_one_port_and_a_clean_stop(
    tmp_path: Path, endpoint: EndpointThread, redis_url: str
) -> None:
    worker = start_worker(tmp_path / "data", endpoint, redis_url, "--workers", "2")
    try:
        pids = set()
        with httpx.Client(base_url=worker.http, timeout=30) as client:
            answers = 0
            while answers < 40:  # new connections spread over the processes
                ready = client.get("/readyz", headers={"Connection": "close"})
                body = ready.json()
                if ready.status_code == 503 and body.get("speech_engines") == "loading":
                    # A worker loads its speech engines for a few seconds after it starts,
                    # and says so; a readiness probe asks again, as here.
                    time.sleep(0.2)
                    continue
                assert ready.status_code == 200, ready.text
                answers += 1
                pids.add(body.pop("worker"))
                assert body == {"status": "ready", "database": "ok", "redis": "ok",
                                "sessions": "ok", "speech_engines": "ok"}  # fmt: skip
        children = worker_pids(worker.proc.pid)
        sockets = listening(children, int(worker.http.rsplit(":", 1)[1]))
    finally:
        code = stop(worker)
    assert code == 0
    # Two worker processes serve the one port (which one accepts a connection is the
    # kernel's choice): every answer came from one of them.
    assert len(children) == 2, children
    assert pids and pids <= set(children), (pids, children)
    # Each listens on a socket of its own (the kernel spreads connections evenly over
    # them; one shared socket goes to whichever worker went idle last).
    assert [len(held) for held in sockets.values()] == [1, 1], sockets
    assert len(set().union(*sockets.values())) == 2, sockets


def test_a_port_a_run_of_workers_holds_is_refused_to_another_run(
    tmp_path: Path, endpoint: EndpointThread, redis_url: str
) -> None:
    # Each worker's socket allows others on its port (SO_REUSEPORT): a second run, with
    # one worker or several, must still be refused the port, not join the first run.
    worker = start_worker(tmp_path / "data", endpoint, redis_url, "--workers", "2")
    port = worker.http.rsplit(":", 1)[1]
    try:
        for workers in ("2", "1"):
            second = subprocess.run(
                [sys.executable, "-m", "runtime.cli", "serve", "--port", port,
                 "--data-dir", str(tmp_path / "data2"), "--workers", workers],
                capture_output=True, text=True, timeout=120,
                env={**os.environ, "VOXLOOP_API_KEYS": API_KEY, "VOXLOOP_REDIS_URL": redis_url},
            )  # fmt: skip
            assert second.returncode == 1, second.stderr
            # One line: nothing was built or logged before the port was refused.
            assert second.stderr == (
                f"voxloop: error: cannot listen on 127.0.0.1:{port}: Address already in use\n"
            ), second.stderr
            assert "listening" not in second.stdout
    finally:
        assert stop(worker) == 0


def test_sigterm_drains_a_session_after_its_reply(tmp_path: Path, redis_url: str) -> None:
    plan = ReplyPlan(replies=(LONG_REPLY,), ttft_ms=20, itl_ms=40)
    with EndpointThread(plan, api_key=LLM_KEY) as slow:
        worker = start_worker(tmp_path / "data", slow, redis_url, "--drain-timeout", "60")

        async def run() -> tuple[list[str], int | None, str, int]:
            ws, _ = await open_session(worker.ws, **key())
            await ws.send('{"type": "reply.create"}')
            await until(ws, "reply.started")
            worker.proc.send_signal(signal.SIGTERM)
            types: list[str] = []
            text = ""
            with contextlib.suppress(websockets.ConnectionClosed):
                while True:
                    event = json.loads(await ws.recv())
                    if event["type"] != "reply.audio":
                        types.append(event["type"])
                    if event["type"] == "transcript.agent":
                        text = event["text"]
            # The worker refuses new sessions while it drains, or is gone.
            readiness = -1
            with contextlib.suppress(httpx.HTTPError):
                async with httpx.AsyncClient() as client:
                    readiness = (await client.get(f"{worker.http}/readyz")).status_code
            return types, ws.close_code, text, readiness

        types, close_code, text, readiness = asyncio.run(run())
        code = stop(worker, signalled=True)
    # The reply was spoken to its end, then the session ended cleanly.
    assert types[-2:] == ["reply.done", "session.ended"]
    assert "session.error" not in types
    assert text == LONG_REPLY
    assert close_code == 1000
    assert code == 0
    assert readiness in (503, -1)
    log = worker.log.read_text()
    assert '"msg": "draining 1 session(s) for up to 60 s"' in log, log
    assert '"msg": "drained: 1 session(s) ended, 0 handed off to resume"' in log, log


def test_sigterm_ends_a_session_between_replies_at_once(tmp_path: Path, redis_url: str) -> None:
    # Its reply is over: nothing is being spoken, so the drain ends it now (session.ended,
    # 1000), not when the drain timeout hands it off.
    with EndpointThread(ReplyPlan(replies=("Done.",)), api_key=LLM_KEY) as endpoint:
        worker = start_worker(tmp_path / "data", endpoint, redis_url, "--drain-timeout", "60")

        async def run() -> tuple[list[str], int | None]:
            ws, _ = await open_session(worker.ws, **key())
            await ws.send('{"type": "reply.create"}')
            await until(ws, "reply.done")
            worker.proc.send_signal(signal.SIGTERM)
            types: list[str] = []
            with contextlib.suppress(websockets.ConnectionClosed):
                while True:
                    types.append(json.loads(await ws.recv())["type"])
            return types, ws.close_code

        types, close_code = asyncio.run(run())
        code = stop(worker, signalled=True)
    assert (types, close_code, code) == (["session.ended"], 1000, 0)
    log = worker.log.read_text()
    assert '"msg": "drained: 1 session(s) ended, 0 handed off to resume"' in log, log


def test_a_drain_timeout_hands_the_session_off_to_another_worker(
    tmp_path: Path, endpoint: EndpointThread, redis_url: str
) -> None:
    plan = ReplyPlan(replies=(LONG_REPLY,), ttft_ms=20, itl_ms=200)
    data = tmp_path / "data"
    with EndpointThread(plan, api_key=LLM_KEY) as slow:
        leaving = start_worker(data, slow, redis_url, "--drain-timeout", "0.5")
        staying = start_worker(data, slow, redis_url)
        try:

            async def run() -> tuple[int | None, str, str]:
                ws, ready = await open_session(leaving.ws, **key())
                await ws.send('{"type": "reply.create"}')
                await until(ws, "reply.started")
                leaving.proc.send_signal(signal.SIGTERM)
                with contextlib.suppress(websockets.ConnectionClosed):
                    while True:
                        await ws.recv()
                resumed = await websockets.connect(
                    staying.ws, additional_headers={"Authorization": ready["resume_token"]}
                )
                await resumed.send(json.dumps({"type": "session.resume",
                                               "session_id": ready["session_id"]}))  # fmt: skip
                again = await until(resumed, "session.ready")
                await resumed.send('{"type": "session.end"}')
                await until(resumed, "session.ended")
                await resumed.close()
                return ws.close_code, ready["session_id"], again["session_id"]

            close_code, before, after = asyncio.run(run())
            assert stop(leaving, signalled=True) == 0
        finally:
            stop(staying)
    assert close_code == 1012
    assert after == before


def test_metrics_count_what_happened(tmp_path: Path, endpoint: EndpointThread) -> None:
    worker = start_worker(tmp_path / "data", endpoint, None)
    try:

        async def run() -> None:
            ws, _ = await open_session(worker.ws, **key())
            await ws.send('{"type": "reply.create"}')
            await until(ws, "reply.done")
            await ws.send('{"type": "session.end"}')
            await until(ws, "session.ended")
            await ws.close()

        asyncio.run(run())
        with httpx.Client(base_url=worker.http, timeout=30) as client:
            anonymous = client.get("/metrics")
            scraped = client.get("/metrics", headers={"Authorization": f"Bearer {API_KEY}"})
    finally:
        stop(worker)
    assert anonymous.status_code == 401
    assert scraped.headers["content-type"].startswith("text/plain; version=")
    lines = set(scraped.text.splitlines())
    assert 'voxloop_sessions_total{reason="ended"} 1.0' in lines
    assert 'voxloop_replies_total{status="completed"} 1.0' in lines
    assert "voxloop_live_sessions 0.0" in lines


def test_a_killed_workers_session_resumes_on_another_from_its_last_reply(
    tmp_path: Path, endpoint: EndpointThread, redis_url: str
) -> None:
    data = tmp_path / "data"
    doomed = start_worker(data, endpoint, redis_url)
    other = start_worker(data, endpoint, redis_url)
    try:

        async def run() -> tuple[str, str]:
            ws, ready = await open_session(doomed.ws, **key())
            await ws.send(json.dumps({"type": "conversation.message", "role": "user",
                                      "content": "Remember the number 42."}))  # fmt: skip
            await ws.send('{"type": "reply.create"}')
            await until(ws, "reply.done")
            # A second reply: the state kept after the first one is surely written by now
            # (a crash loses at most what happened since the last reply).
            await ws.send('{"type": "reply.create"}')
            await until(ws, "reply.done")
            # The worker dies without a chance to save anything (no drain, no release).
            doomed.proc.kill()
            doomed.proc.wait(timeout=30)
            with contextlib.suppress(websockets.ConnectionClosed):
                await ws.recv()
            again = await resume_and_reply(other, ready)
            return ready["session_id"], again["session_id"]

        before, after = asyncio.run(run())
    finally:
        stop(other)
        assert doomed.proc.stdout is not None
        doomed.proc.stdout.close()
    assert after == before
    last = endpoint.chats()[-1].body
    assert last is not None
    said = [(m["role"], m["content"]) for m in last["messages"] if m["role"] != "system"]
    assert said[:2] == [("user", "Remember the number 42."), ("assistant", "Noted.")]


def scrape(http: str) -> dict[str, float]:
    """One ``/metrics`` scrape on a new connection: ``{"name{labels}": value}``."""
    text = httpx.get(f"{http}/metrics", headers={"Authorization": API_KEY,
                                                 "Connection": "close"}, timeout=30).text  # fmt: skip
    return {m[1]: float(m[2]) for m in re.finditer(r"^(voxloop_\S+) (\S+)$", text, re.M)}


def wait_both_ready(worker: Worker) -> list[int]:
    """Ask /readyz on new connections until both workers of a ``--workers 2`` run say ready."""
    ready: set[int] = set()
    with httpx.Client(base_url=worker.http, timeout=30) as client:
        while len(ready) < 2:
            answer = client.get("/readyz", headers={"Connection": "close"})
            if answer.status_code == 200:
                ready.add(answer.json()["worker"])
            else:  # a worker loading its speech engines says so; a probe asks again
                time.sleep(0.2)
    return sorted(ready)


def test_one_scrape_reports_the_sum_over_the_workers(
    tmp_path: Path, endpoint: EndpointThread, redis_url: str
) -> None:
    temp = tmp_path / "tmp"
    temp.mkdir()
    # The kernel picks each connection's worker at random: room for every session the
    # loop below may open on one worker.
    worker = start_worker(tmp_path / "data", endpoint, redis_url, "--workers", "2",
                          TMPDIR=str(temp), VOXLOOP_MAX_SESSIONS="40")  # fmt: skip
    port = int(worker.http.rsplit(":", 1)[1])
    try:
        pids = wait_both_ready(worker)
        assert pids == worker_pids(worker.proc.pid)
        # The run's metric files: one directory, one set of files per worker.
        (shared,) = temp.glob("voxloop-metrics-*")

        async def sessions_on_both() -> tuple[dict[int, int], list[dict[str, float]]]:
            # New sessions until each worker holds at least two (the kernel picks the
            # worker of each connection), all open at once.
            opened: list[tuple[Any, int]] = []
            async with contextlib.AsyncExitStack() as held:  # closed even on a failure
                while min(sum(1 for _, w in opened if w == pid) for pid in pids) < 2:
                    assert len(opened) < 40, opened
                    ws, _ = await open_session(worker.ws, **key())
                    held.push_async_callback(ws.close)
                    owner = connection_worker(pids, port, ws.local_address[1])
                    assert owner in pids
                    opened.append((ws, owner))
                for ws, _ in opened:
                    await ws.send(json.dumps({"type": "conversation.message", "role": "user",
                                              "content": "Hello."}))  # fmt: skip
                    await ws.send('{"type": "reply.create"}')
                    await until(ws, "reply.done")
                during = [scrape(worker.http) for _ in range(4)]
                for ws, _ in opened:
                    await ws.send('{"type": "session.end"}')
                    await until(ws, "session.ended")
                    await ws.close()
            share = {pid: sum(1 for _, w in opened if w == pid) for pid in pids}
            return share, during

        share, during = asyncio.run(sessions_on_both())
        after = [scrape(worker.http) for _ in range(4)]
    finally:
        assert stop(worker) == 0
    total = sum(share.values())
    # Whichever worker answers the scrape (a new connection each), it reports all sessions.
    for scraped in during:
        assert scraped["voxloop_live_sessions"] == total
        assert scraped['voxloop_replies_total{status="completed"}'] == total
    for scraped in after:
        assert scraped["voxloop_live_sessions"] == 0
        assert scraped['voxloop_sessions_total{reason="ended"}'] == total
        assert scraped['voxloop_replies_total{status="completed"}'] == total
    # The metric files of the run are gone with it.
    assert not shared.exists()


def test_a_killed_workers_counts_stay_in_the_sum_and_its_live_sessions_leave_it(
    tmp_path: Path, endpoint: EndpointThread, redis_url: str
) -> None:
    worker = start_worker(tmp_path / "data", endpoint, redis_url, "--workers", "2")
    port = int(worker.http.rsplit(":", 1)[1])
    try:
        pids = wait_both_ready(worker)

        async def run() -> tuple[int, list[int], dict[str, float]]:
            opened: dict[int, Any] = {}
            async with contextlib.AsyncExitStack() as held:  # closed even on a failure
                tries = 0
                while len(opened) < 2:  # one session on each worker (others closed at once)
                    tries += 1
                    assert tries <= 40, opened
                    ws, _ = await open_session(worker.ws, **key())
                    held.push_async_callback(ws.close)
                    owner = connection_worker(pids, port, ws.local_address[1])
                    assert owner in pids
                    if owner in opened:
                        await ws.send('{"type": "session.end"}')
                        await until(ws, "session.ended")
                        await ws.close()
                        continue
                    opened[owner] = ws
                    await ws.send('{"type": "reply.create"}')
                    await until(ws, "reply.done")
                victim, survivor = pids
                os.kill(victim, signal.SIGKILL)
                with contextlib.suppress(websockets.ConnectionClosed):
                    while True:
                        await opened[victim].recv()
                # The supervisor replaces the dead worker (and forgets its live gauges first);
                # the replacement answers readiness once its engines are loaded.
                now = await asyncio.to_thread(wait_both_ready, worker)
                scraped = await asyncio.to_thread(scrape, worker.http)
                ws = opened[survivor]
                await ws.send('{"type": "session.end"}')
                await until(ws, "session.ended")
                await ws.close()
                return victim, now, scraped

        victim, now, scraped = asyncio.run(run())
        final = scrape(worker.http)
    finally:
        assert stop(worker) == 0
    assert victim not in now and len(now) == 2
    # The killed worker's finished replies and sessions stay counted; its live session
    # is no longer live anywhere.
    assert scraped["voxloop_live_sessions"] == 1
    assert scraped['voxloop_replies_total{status="completed"}'] == 2
    assert final["voxloop_live_sessions"] == 0
    assert final['voxloop_replies_total{status="completed"}'] == 2


def test_a_session_killed_before_its_first_turn_resumes_and_again_after_its_resume(
    tmp_path: Path, endpoint: EndpointThread, redis_url: str
) -> None:
    data = tmp_path / "data"
    first, second, third = (start_worker(data, endpoint, redis_url) for _ in range(3))

    async def lease_ms(session_id: str) -> int:
        redis = connect(redis_url)
        try:
            return int(await redis.pttl(f"voxloop:live:{session_id}"))
        finally:
            await redis.aclose()

    async def killed(worker: Worker, ws: Any) -> None:
        worker.proc.kill()
        worker.proc.wait(timeout=30)
        with contextlib.suppress(websockets.ConnectionClosed):
            while True:
                await ws.recv()

    async def run() -> tuple[list[str], list[int], bool]:
        ws, ready = await open_session(first.ws, **key())
        leases = [await lease_ms(ready["session_id"])]
        # The lease is renewed while the session runs: its time to live goes up again.
        renewed = False
        for _ in range(100):
            await asyncio.sleep(0.1)
            now = await lease_ms(ready["session_id"])
            if now > leases[-1]:
                renewed = True
                break
            leases.append(now)
        # Killed before any turn: the state was kept before session.ready.
        await killed(first, ws)
        again = await websockets.connect(
            second.ws, additional_headers={"Authorization": ready["resume_token"]}
        )
        await again.send(json.dumps({"type": "session.resume",
                                     "session_id": ready["session_id"]}))  # fmt: skip
        resumed = await until(again, "session.ready")
        # Killed right after the resume took the state: kept again before session.ready.
        await killed(second, again)
        final = await resume_and_reply(third, resumed)
        return [ready["session_id"], resumed["session_id"], final["session_id"]], leases, renewed

    try:
        ids, leases, renewed = asyncio.run(run())
    finally:
        stop(third)
        for gone in (first, second):
            assert gone.proc.stdout is not None
            gone.proc.stdout.close()
    assert ids == [ids[0]] * 3
    assert 0 < leases[0] <= 4000, leases
    assert renewed, leases


def test_a_turn_whose_worker_dies_before_its_reply_is_answered_after_the_resume(
    tmp_path: Path, redis_url: str
) -> None:
    answer = "It is sunny in Paris today."
    plan = ReplyPlan(replies=(answer,), ttft_ms=1500, itl_ms=10)
    audio = read_wav(SPEECH / "shared-00-piper.wav")
    pcm = resample_all(audio.mono(), audio.sample_rate, 24_000)
    with EndpointThread(plan, api_key=LLM_KEY) as slow:
        worker = start_worker(tmp_path / "data", slow, redis_url, "--workers", "2")
        port = int(worker.http.rsplit(":", 1)[1])
        try:
            pids = wait_both_ready(worker)
            seen: list[tuple[str, str]] = []
            killed: list[int] = []

            def on_event(event: Any) -> None:
                kind = str(getattr(event, "type", type(event).__name__))
                detail = str(getattr(event, "text", None) or getattr(event, "status", ""))
                seen.append((kind, detail))
                if kind == "reply.started" and not killed:
                    # The worker of the session dies while the reply is on its way.
                    (owner,) = [pid for pid, n in established(pids, port).items() if n]
                    os.kill(owner, signal.SIGKILL)
                    killed.append(owner)

            session = ev.SessionPatch(keys=frozenset({"system_prompt"}),
                                      system_prompt="You are brief.")  # fmt: skip
            asyncio.run(connect_pcm(pcm, url=worker.ws, auth=Auth(api_key=Secret(API_KEY)),
                                    session=session, on_event=on_event))  # fmt: skip
            requests = [c.body for c in slow.chats() if c.body is not None]
        finally:
            assert stop(worker) == 0
    assert len(killed) == 1
    kinds = [k for k, _ in seen if k not in ("reply.audio", "transcript.agent.delta",
                                              "transcript.user.delta")]  # fmt: skip
    said = next(d for k, d in seen if k == "transcript.user")
    after = kinds[kinds.index("ConnectionDropped") :]
    assert after[:3] == ["ConnectionDropped", "session.ready", "SessionResumed"], kinds
    assert after[3:] == ["reply.started", "transcript.agent", "reply.done", "session.ended"], kinds
    assert [d for k, d in seen if k == "transcript.agent"] == [answer]
    assert seen[-2] == ("reply.done", "completed")
    # The worker that took over asked with the user's words last, unanswered.
    last = [(m["role"], m["content"]) for m in requests[-1]["messages"] if m["role"] != "system"]
    assert last == [("user", said)]
    assert len(requests) == 2


def test_a_session_whose_state_redis_lost_is_kept_again_and_resumes_after_a_kill(
    tmp_path: Path, endpoint: EndpointThread
) -> None:
    data = tmp_path / "data"
    with redis_server() as url:
        doomed = start_worker(data, endpoint, url)
        other = start_worker(data, endpoint, url)
        try:

            async def run() -> tuple[str, str, list[bool]]:
                redis = connect(url)
                try:
                    ws, ready = await open_session(doomed.ws, **key())
                    sid = ready["session_id"]
                    await ws.send(json.dumps({"type": "conversation.message", "role": "user",
                                              "content": "My name is Ada."}))  # fmt: skip
                    await ws.send('{"type": "reply.create"}')
                    await until(ws, "reply.done")
                    # Redis loses everything (a restart without persistence).
                    await redis.flushall()
                    lost = [bool(await redis.exists(f"voxloop:session:{sid}"))]
                    # The worker's next lease renewal finds its mark gone and keeps the state
                    # again, with no new turn needed.
                    for _ in range(100):
                        if await redis.exists(f"voxloop:session:{sid}"):
                            lost.append(True)
                            break
                        await asyncio.sleep(0.1)
                    doomed.proc.kill()
                    doomed.proc.wait(timeout=30)
                    with contextlib.suppress(websockets.ConnectionClosed):
                        while True:
                            await ws.recv()
                    again = await resume_and_reply(other, ready)
                    return sid, again["session_id"], lost
                finally:
                    await redis.aclose()

            before, after, kept = asyncio.run(run())
        finally:
            stop(other)
            assert doomed.proc.stdout is not None
            doomed.proc.stdout.close()
    assert kept == [False, True]
    assert after == before
    last = endpoint.chats()[-1].body
    assert last is not None
    said = [(m["role"], m["content"]) for m in last["messages"] if m["role"] != "system"]
    assert said[:2] == [("user", "My name is Ada."), ("assistant", "Noted.")]


def test_a_worker_replaced_while_redis_is_away_starts_and_the_others_go_on(
    tmp_path: Path, endpoint: EndpointThread
) -> None:
    with redis_server() as url:
        worker = start_worker(tmp_path / "data", endpoint, url, "--workers", "2")
        port = int(worker.http.rsplit(":", 1)[1])
        try:
            pids = wait_both_ready(worker)

            async def run() -> tuple[int, list[int], str]:
                ws, _ = await open_session(worker.ws, **key())
                try:
                    survivor = connection_worker(pids, port, ws.local_address[1])
                    [victim] = [pid for pid in pids if pid != survivor]
                    redis = connect(url)
                    with contextlib.suppress(Exception):  # the server goes: no answer
                        await redis.shutdown(nosave=True)
                    await redis.aclose()
                    os.kill(victim, signal.SIGKILL)
                    # The supervisor starts a replacement, which starts without Redis.
                    for _ in range(600):
                        now = await asyncio.to_thread(worker_pids, worker.proc.pid)
                        started = "redis unavailable at start" in worker.log.read_text()
                        if started and len(now) == 2 and victim not in now:
                            break
                        await asyncio.sleep(0.1)
                    # The session on the other worker goes on.
                    await ws.send('{"type": "reply.create"}')
                    done = await until(ws, "reply.done")
                    return victim, now, str(done["status"])
                finally:
                    await ws.close()

            victim, now, status = asyncio.run(run())
            running = worker.proc.poll() is None
        finally:
            code = stop(worker)
    assert running and victim not in now and len(now) == 2
    assert status == "completed"
    assert code == 0
    assert worker.log.read_text().count('"msg": "redis unavailable at start"') == 1


def test_a_second_sigterm_hands_the_session_off_at_once(tmp_path: Path, redis_url: str) -> None:
    plan = ReplyPlan(replies=(LONG_REPLY,), ttft_ms=20, itl_ms=200)
    data = tmp_path / "data"
    with EndpointThread(plan, api_key=LLM_KEY) as slow:
        leaving = start_worker(data, slow, redis_url, "--drain-timeout", "60")
        staying = start_worker(data, slow, redis_url)
        try:

            async def run() -> tuple[list[str], int | None, str, str]:
                ws, ready = await open_session(leaving.ws, **key())
                await ws.send('{"type": "reply.create"}')
                await until(ws, "reply.started")
                leaving.proc.send_signal(signal.SIGTERM)
                for _ in range(300):  # the drain has begun when readiness says so
                    async with httpx.AsyncClient() as client:
                        if (await client.get(f"{leaving.http}/readyz")).status_code == 503:
                            break
                    await asyncio.sleep(0.1)
                leaving.proc.send_signal(signal.SIGTERM)  # stop now
                types: list[str] = []
                with contextlib.suppress(websockets.ConnectionClosed):
                    while True:
                        types.append(json.loads(await ws.recv())["type"])
                again = await resume_and_reply(staying, ready)
                return types, ws.close_code, ready["session_id"], again["session_id"]

            types, close_code, before, after = asyncio.run(run())
            code = stop(leaving, signalled=True)
        finally:
            stop(staying)
    assert "session.ended" not in types and close_code == 1012
    assert after == before and code == 0
    log = leaving.log.read_text()
    assert '"msg": "drained: 0 session(s) ended, 1 handed off to resume"' in log, log
