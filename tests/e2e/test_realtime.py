"""The Voice Agent WebSocket black-box: a real ``voxloop serve`` process, real sockets,
real speech through the real engines, and a loopback OpenAI-compatible endpoint that
checks the Bearer key it receives."""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets
from whisper_normalizer.english import EnglishTextNormalizer

from audio.g711 import ulaw_decode, ulaw_encode
from audio.resample import resample_all
from audio.wav import read_wav
from runtime.llm.reference import ReplyPlan
from runtime.protocol import events as ev

from ..helpers import SPEECH, EndpointThread
from .voice_agent import (
    API_KEY,
    LLM_KEY,
    OTHER_KEY,
    EventSocket,
    Server,
    running_server,
    sockets,
    start_server,
    stop_server,
)

DEFAULT_KEY = "sk-server-default-0a9b8c"
LONG_REPLY = (
    "Sure. The weather in Paris today is mild and mostly sunny, with a light breeze from the west, "
    "a high of about twenty degrees in the afternoon, and a small chance of showers late in "
    "the evening, so you may want to bring a light jacket if you plan to stay out after dark."
)


# -- the loopback endpoint (its own thread and loop, shared by the module) -----------------


def plan(*replies: str, **kwargs: Any) -> ReplyPlan:
    return ReplyPlan(replies=replies or ("Okay.",), ttft_ms=30, itl_ms=5, **kwargs)


@pytest.fixture(scope="module")
def endpoint() -> Iterator[EndpointThread]:
    with EndpointThread(ReplyPlan(replies=("Okay.",)), api_key=LLM_KEY) as thread:
        yield thread


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with running_server(
        tmp_path_factory.mktemp("realtime") / "data",
        {"VOXLOOP_ALLOW_PRIVATE_ENDPOINTS": "127.0.0.1",
         "VOXLOOP_STATIC_HOSTS": json.dumps({"llm.example.com": ["93.184.216.34"]})},
    ) as srv:  # fmt: skip
        yield srv


# -- the client --------------------------------------------------------------------------------


def _decoded(message: str | bytes) -> ev.ServerEvent:
    event = ev.decode_server_event(message)
    assert not isinstance(event, ev.UnknownServerEvent), message
    return event


Client = EventSocket[ev.ServerEvent]
"""A client that reads frames with voxloop's own codec."""


@pytest.fixture
async def connect() -> AsyncIterator[Any]:
    async with sockets(lambda ws: Client(ws, _decoded, lambda e: e.type)) as open_ws:

        async def open_(
            url: str, key: str | None = API_KEY, *, bearer: bool = True, query: str = ""
        ) -> Client:
            headers = {"Authorization": f"Bearer {key}" if bearer else key} if key else {}
            client: Client = await open_ws(url + query, headers, max_size=None)
            return client

        yield open_


def inline(endpoint: EndpointThread, **session: Any) -> dict[str, Any]:
    llm = [{"base_url": endpoint.base_url, "model": "agent-model", "api_key": LLM_KEY}]
    return {"type": "session.update", "session": {"llm": llm, **session}}


def speech(name: str, rate: int) -> bytes:
    audio = read_wav(SPEECH / f"{name}.wav")
    return resample_all(audio.mono(), audio.sample_rate, rate)


def silence(seconds: float, rate: int) -> bytes:
    return bytes(int(seconds * rate) * 2)


def words(text: str) -> str:
    return " ".join("".join(c for c in text.lower() if c.isalnum() or c == " ").split())


_normalise = EnglishTextNormalizer()


def spoken(text: str) -> str:
    """Whisper's English normalisation (numbers folded), times written one way."""
    return str(_normalise(text)).replace("7 30", "730")


def audio_of(events: list[ev.ServerEvent], reply_id: str) -> bytes:
    return b"".join(
        e.data for e in events if isinstance(e, ev.ReplyAudio) and e.reply_id == reply_id
    )


def types(events: list[ev.ServerEvent]) -> list[str]:
    out: list[str] = []
    for e in events:
        if not out or out[-1] != e.type or e.type not in ("reply.audio", "transcript.user.delta"):
            out.append(e.type)
    return out


# -- authentication ------------------------------------------------------------------------------


async def test_credentials_are_checked_on_the_upgrade(server: Server, connect: Any) -> None:
    for key, query in ((None, ""), ("wrong-key", ""), (None, "?token=forged.token")):
        client = await connect(server.ws, key, query=query)
        events, code = await client.closed()
        assert code == 1008
        assert [(e.type, e.code) for e in events if isinstance(e, ev.SessionError)] == [
            ("session.error", "unauthorized")
        ]
        assert len(events) == 1
    # The raw key (no Bearer) is accepted, as on the REST API.
    client = await connect(server.ws, API_KEY, bearer=False)
    await client.send({"type": "session.update", "session": {"agent_id": "agent_nope"}})
    events, code = await client.closed()
    assert [(e.type, getattr(e, "code", None)) for e in events] == [
        ("session.error", "agent_not_found")
    ]
    assert code == 1008


async def test_a_token_starts_exactly_one_session(
    server: Server, endpoint: EndpointThread, connect: Any
) -> None:
    async with httpx.AsyncClient(base_url=server.http, headers={"Authorization": API_KEY}) as rest:
        response = await rest.get(
            "/v1/token", params={"expires_in_seconds": 60, "max_session_duration_seconds": 600}
        )
    token = response.json()["token"]
    first = await connect(server.ws, None, query=f"?token={token}")
    await first.send(inline(endpoint))
    ready = await first.next("session.ready")
    assert isinstance(ready, ev.SessionReady)
    # The token's cap bounds the session.
    assert ready.expires_at is not None and ready.timestamp is not None
    assert 599 <= ready.expires_at - ready.timestamp <= 601
    again = await connect(server.ws, None, query=f"?token={token}")
    events, code = await again.closed()
    assert code == 1008
    assert [getattr(e, "code", None) for e in events] == ["unauthorized"]


# -- lifecycle, greeting, errors ------------------------------------------------------------------


async def test_lifecycle_greeting_updates_and_every_error_code(
    server: Server, endpoint: EndpointThread, connect: Any
) -> None:
    endpoint.answer(plan("Hello from the model."), plan("Noted."), plan("Still here."))
    client = await connect(server.ws)
    # Anything but session.update first is refused without ending the connection.
    await client.send({"type": "reply.create"})
    err = await client.next("session.error")
    assert isinstance(err, ev.SessionError)
    assert (err.code, err.param) == ("invalid_format", "type")
    greeting = "Hi there, how can I help you today?"
    await client.send(inline(endpoint, system_prompt="You are terse.", greeting=greeting,
                             output={"voice": "ivy", "volume": 100}))  # fmt: skip
    ready = await client.next("session.ready")
    assert isinstance(ready, ev.SessionReady)
    assert ready.session_id.startswith("sess_")
    assert ready.resume_token and ready.resume_token.startswith("rt_")
    assert ready.config is not None
    assert ready.config["system_prompt"] == "You are terse."
    assert ready.config["greeting"] == greeting
    assert ready.config["output"] == {
        "type": "audio", "voice": "ivy",
        "format": {"encoding": "audio/pcm", "sample_rate": 24000}, "volume": 100.0,
    }  # fmt: skip
    assert ready.config["llm"] == [{"base_url": endpoint.base_url, "model": "agent-model"}]
    assert LLM_KEY not in json.dumps(ready.config)
    # The greeting is spoken verbatim, in the documented order, without any client action.
    events = await client.until("reply.done")
    kinds = types(events)
    assert [k for k in kinds if k not in ("reply.audio", "transcript.agent.delta")] == [
        "reply.started", "transcript.agent", "reply.done",
    ]  # fmt: skip
    assert set(kinds[1:-2]) == {"reply.audio", "transcript.agent.delta"}
    started, done = events[0], events[-1]
    assert isinstance(started, ev.ReplyStarted) and isinstance(done, ev.ReplyDone)
    final = events[-2]
    assert isinstance(final, ev.TranscriptAgent)
    assert (final.text, final.interrupted, final.reply_id) == (greeting, False, started.reply_id)
    assert (done.status, done.reply_id) == ("completed", started.reply_id)
    deltas = [e for e in events if isinstance(e, ev.TranscriptAgentDelta)]
    pcm = audio_of(events, started.reply_id)
    # The deltas say the greeting, and their timings tile the reply's audio (24 kHz PCM16).
    assert " ".join(d.delta for d in deltas) == greeting
    assert deltas[0].start_ms == 0
    assert all(a.end_ms == b.start_ms for a, b in itertools.pairwise(deltas))
    assert deltas[-1].end_ms == len(pcm) // 2 * 1000 // 24000
    assert len(pcm) > 24000 * 2  # more than a second of speech
    assert endpoint.chats() == [] or all(
        r.body and r.body["messages"][-1]["content"] != greeting for r in endpoint.chats()
    )

    bad: list[tuple[str, str, str | None]] = [
        ("{not json", "invalid_format", None),
        (json.dumps({"type": "bogus"}), "invalid_format", "type"),
        (json.dumps({"no": "type"}), "invalid_format", "type"),
        (json.dumps({"type": "session.update", "session": {"output": {"volume": "loud"}}}),
         "invalid_value", "session.output.volume"),
        (json.dumps({"type": "input.audio", "audio": "%%%not base64"}), "invalid_audio", "audio"),
        (json.dumps({"type": "session.update", "session": {"greeting": "Other"}}),
         "immutable_field", "session.greeting"),
        (json.dumps({"type": "session.update", "session": {"output": {"voice": "en-gb"}}}),
         "immutable_field", "session.output.voice"),
        (json.dumps({"type": "session.update",
                     "session": {"output": {"format": {"encoding": "audio/pcmu"}}}}),
         "immutable_field", "session.output.format"),
        (json.dumps({"type": "session.update", "session": {"agent_id": "agent_x"}}),
         "agent_id_not_first", "session.agent_id"),
        (json.dumps({"type": "session.update", "session": {"input": {"turn_detection": {
            "min_silence": 900, "max_silence": 100}}}}), "invalid_config",
         "session.input.turn_detection.min_silence"),
        (json.dumps({"type": "tool.result", "call_id": "call_unknown", "result": "{}"}),
         "invalid_value", "call_id"),
        (json.dumps({"type": "reply.create", "instructions": "x" * (600 * 1024)}),
         "invalid_format", "message"),
    ]  # fmt: skip
    for text, code, param in bad:
        await client.send(text)
        err = await client.next("session.error")
        assert isinstance(err, ev.SessionError)
        assert (err.code, err.param) == (code, param), text[:80]
        assert err.timestamp is not None
    await client.ws.send(b"\x00\x01binary")
    err = await client.next("session.error")
    assert isinstance(err, ev.SessionError) and err.code == "invalid_format"

    # A later update is acknowledged with the new effective configuration.
    await client.send({"type": "session.update", "session": {"system_prompt": "Be brief.",
                       "greeting": greeting, "output": {"volume": 50}}})  # fmt: skip
    updated = await client.next("session.updated")
    assert isinstance(updated, ev.SessionUpdated) and updated.config is not None
    assert updated.config["system_prompt"] == "Be brief."
    assert updated.config["output"]["volume"] == 50.0

    # conversation.message adds to the history; reply.create answers with instructions.
    await client.send({"type": "conversation.message", "role": "user", "content": "Hi model."})
    await client.send({"type": "reply.create", "instructions": "Answer in French."})
    events = await client.until("reply.done")
    final = next(e for e in events if isinstance(e, ev.TranscriptAgent))
    assert final.text == "Hello from the model."
    assert isinstance(events[-1], ev.ReplyDone) and events[-1].status == "completed"
    request = endpoint.chats()[-1]
    assert request.headers["authorization"] == f"Bearer {LLM_KEY}"
    assert request.body is not None
    assert request.body["model"] == "agent-model"
    messages = request.body["messages"]
    assert messages[0]["role"] == "system" and messages[0]["content"].startswith("Be brief.")
    assert messages[1:] == [
        {"role": "assistant", "content": greeting},
        {"role": "user", "content": "Hi model."},
        {"role": "system", "content": "Answer in French."},
    ]

    # reply.cancel cuts the reply in progress.
    endpoint.answer(plan(LONG_REPLY))
    await client.send({"type": "reply.create"})
    first_audio = await client.next("reply.audio")
    assert isinstance(first_audio, ev.ReplyAudio)
    await client.send({"type": "reply.cancel", "reply_id": first_audio.reply_id})
    events = await client.until("reply.done")
    final = next(e for e in events if isinstance(e, ev.TranscriptAgent))
    assert final.interrupted and len(final.text) < len(LONG_REPLY)
    assert isinstance(events[-1], ev.ReplyDone) and events[-1].status == "cancelled"
    # reply.create during a reply: the reply it cuts is done before the new one starts.
    endpoint.answer(plan(LONG_REPLY), plan("Second thoughts."))
    await client.send({"type": "reply.create"})
    cut_audio = await client.next("reply.audio")
    assert isinstance(cut_audio, ev.ReplyAudio)
    await client.send({"type": "reply.create"})
    start = len(client.seen)
    await client.next("reply.done")
    events = await client.until("reply.done")
    seen = client.seen[start:]
    order = [(type(e).__name__, getattr(e, "reply_id", "")) for e in seen
             if isinstance(e, ev.ReplyStarted | ev.ReplyDone)]  # fmt: skip
    second = next(e for e in seen if isinstance(e, ev.ReplyStarted)).reply_id
    assert order == [("ReplyDone", cut_audio.reply_id), ("ReplyStarted", second),
                     ("ReplyDone", second)]  # fmt: skip
    assert [e.status for e in seen if isinstance(e, ev.ReplyDone)] == ["interrupted", "completed"]
    assert next(e for e in events if isinstance(e, ev.TranscriptAgent)).text == "Second thoughts."
    # A cancel with nothing in progress is said, not dropped; the session goes on.
    for cancel, message, param in (
        ({"type": "reply.cancel"}, "no reply is in progress", "type"),
        ({"type": "reply.cancel", "reply_id": "reply_x"}, "reply 'reply_x' is not in progress",
         "reply_id"),
    ):  # fmt: skip
        await client.send(cancel)
        error = await client.next("session.error")
        assert isinstance(error, ev.SessionError)
        assert (error.code, error.message, error.param) == ("invalid_value", message, param)

    # session.end -> session.ended -> close 1000.
    await client.send({"type": "session.end"})
    events, code = await client.closed()
    assert code == 1000
    ended = events[-1]
    assert isinstance(ended, ev.SessionEnded)
    assert ended.session_duration_seconds > 0
    assert ended.audio_duration_seconds is None  # no audio was sent


async def test_endpoint_failure_is_a_reply_error_and_the_session_goes_on(
    server: Server, endpoint: EndpointThread, connect: Any
) -> None:
    client = await connect(server.ws)
    await client.send(inline(endpoint))
    await client.next("session.ready")
    endpoint.answer(
        ReplyPlan(fault="status", status=503), ReplyPlan(fault="status", status=503),
        plan("Back again."),
    )  # fmt: skip
    await client.send({"type": "reply.create"})
    events = await client.until("reply.done")
    error = next(e for e in events if isinstance(e, ev.ReplyError))
    assert (error.code, error.retryable, error.status_code) == ("server", True, 503)
    assert error.reply_id == events[-1].reply_id
    assert LLM_KEY not in error.message
    assert any(isinstance(e, ev.ReplyAudio) for e in events)  # the spoken apology
    await client.send({"type": "reply.create"})
    events = await client.until("reply.done")
    assert next(e for e in events if isinstance(e, ev.TranscriptAgent)).text == "Back again."
    assert events[-1].status == "completed"


async def test_https_to_a_plain_http_endpoint_is_the_one_line_in_reply_error(
    server: Server, endpoint: EndpointThread, connect: Any
) -> None:
    client = await connect(server.ws)
    https = "https" + endpoint.base_url[4:]
    llm = [{"base_url": https, "model": "agent-model", "api_key": LLM_KEY}]
    await client.send({"type": "session.update", "session": {"llm": llm}})
    await client.next("session.ready")
    await client.send({"type": "reply.create"})
    events = await client.until("reply.done")
    error = next(e for e in events if isinstance(e, ev.ReplyError))
    where = endpoint.base_url.split("/")[2]
    assert (error.code, error.retryable, error.message) == (
        "tls", False,
        f"{https}: the server at {where} speaks plain http, not TLS; use {endpoint.base_url}",
    )  # fmt: skip


async def test_an_inline_fallback_endpoint_answers_when_the_first_fails(
    server: Server, endpoint: EndpointThread, connect: Any
) -> None:
    with EndpointThread(ReplyPlan(replies=("From the backup.",)), api_key="sk-backup-77") as backup:
        client = await connect(server.ws)
        update = inline(endpoint)
        update["session"]["llm"].append(
            {"base_url": backup.base_url, "model": "backup-model", "api_key": "sk-backup-77"}
        )
        await client.send(update)
        ready = await client.next("session.ready")
        assert isinstance(ready, ev.SessionReady)
        assert ready.config is not None and ready.config["llm"] == [
            {"base_url": endpoint.base_url, "model": "agent-model"},
            {"base_url": backup.base_url, "model": "backup-model"},
        ]
        endpoint.answer(ReplyPlan(fault="status", status=503))
        await client.send({"type": "reply.create"})
        events = await client.until("reply.done")
        assert not any(isinstance(e, ev.ReplyError) for e in events)  # no apology
        agent = next(e for e in events if isinstance(e, ev.TranscriptAgent))
        assert agent.text == "From the backup." and events[-1].status == "completed"
        # The first entry was asked and failed; the backup answered.
        assert endpoint.records()[-1].status == 503
        assert backup.records()[-1].status == 200
    lines = [json.loads(x) for x in server.log.read_text().splitlines() if x.startswith("{")]
    failover = [x for x in lines if x.get("logger") == "voxloop.llm" and x.get("entry") == 0]
    assert failover and (failover[-1]["kind"], failover[-1]["host"]) == ("server", "127.0.0.1")
    assert "trying the next entry" in failover[-1]["msg"]
    assert not any(LLM_KEY in x or "sk-backup-77" in x for x in server.log.read_text().splitlines())


async def test_each_inline_llm_entry_has_its_own_first_token_timeout_and_max_tokens(
    server: Server, endpoint: EndpointThread, connect: Any
) -> None:
    with EndpointThread(ReplyPlan(replies=("From the backup.",)), api_key="sk-backup-78") as backup:
        client = await connect(server.ws)
        update = inline(endpoint)
        update["session"]["llm"][0] |= {"first_token_timeout_ms": 300, "max_tokens": 40}
        second = {"base_url": backup.base_url, "model": "backup-model", "api_key": "sk-backup-78"}
        # Bad values are typed errors naming the entry's field; the connection stays open.
        for bad, message in ((50, "100"), (30_001, "30000"), (150.5, "integer"), ("300", "number")):
            wrong = {**second, "first_token_timeout_ms": bad}
            await client.send({**update, "session": {"llm": [*update["session"]["llm"], wrong]}})
            err = await client.next("session.error")
            assert isinstance(err, ev.SessionError)
            assert err.param == "session.llm[1].first_token_timeout_ms", err
            assert message in err.message and "sk-backup-78" not in err.message
        update["session"]["llm"].append({**second, "max_tokens": 60})
        await client.send(update)
        ready = await client.next("session.ready")
        assert isinstance(ready, ev.SessionReady)
        assert ready.config is not None and ready.config["llm"] == [
            {"base_url": endpoint.base_url, "model": "agent-model", "max_tokens": 40,
             "first_token_timeout_ms": 300},
            {"base_url": backup.base_url, "model": "backup-model", "max_tokens": 60},
        ]  # fmt: skip
        # The first entry says nothing: after its own 300 ms the backup answers.
        endpoint.answer(ReplyPlan(fault="hang_headers"))
        await client.send({"type": "reply.create"})
        events = await client.until("reply.done")
        assert not any(isinstance(e, ev.ReplyError) for e in events)
        agent = next(e for e in events if isinstance(e, ev.TranscriptAgent))
        assert agent.text == "From the backup." and events[-1].status == "completed"
        hung, answered = endpoint.chats()[-1], backup.chats()[-1]
        assert hung.body is not None and hung.body["max_tokens"] == 40
        assert answered.body is not None and answered.body["max_tokens"] == 60
    lines = [json.loads(x) for x in server.log.read_text().splitlines() if x.startswith("{")]
    failover = [x for x in lines if x.get("logger") == "voxloop.llm" and x.get("entry") == 0]
    assert failover and failover[-1]["kind"] == "timeout"


async def test_an_inline_session_without_llm_is_told_clearly(
    server: Server, endpoint: EndpointThread, connect: Any
) -> None:
    client = await connect(server.ws)
    await client.send({"type": "session.update", "session": {"system_prompt": "x"}})
    err = await client.next("session.error")
    assert isinstance(err, ev.SessionError)
    assert (err.code, err.param) == ("invalid_config", "session.llm")
    assert "VOXLOOP_LLM_BASE_URL" in err.message
    # The connection stays open for a corrected update.
    await client.send(inline(endpoint))
    assert isinstance(await client.next("session.ready"), ev.SessionReady)
    # A private endpoint that is not allowlisted is refused the same way.
    other = await connect(server.ws)
    await other.send({"type": "session.update", "session": {"llm": [
        {"base_url": "http://10.1.2.3/v1", "model": "m", "api_key": "k"}]}})  # fmt: skip
    err = await other.next("session.error")
    assert isinstance(err, ev.SessionError)
    assert (err.code, err.param) == ("invalid_config", "llm[0].base_url")
    # A voice this server cannot speak is an invalid value (the socket stays open).
    await other.send(inline(endpoint, output={"voice": "nova"}))
    err = await other.next("session.error")
    assert isinstance(err, ev.SessionError)
    assert (err.code, err.param) == ("invalid_value", "session.output.voice")
    # The older URL reaches the same endpoint.
    legacy = await connect(server.ws.replace("/v1/ws", "/v1/realtime"))
    await legacy.send(inline(endpoint, output={"voice": "ivy"}))
    assert isinstance(await legacy.next("session.ready"), ev.SessionReady)


async def test_a_refused_update_is_the_closing_error_not_a_timeout(
    server: Server, endpoint: EndpointThread, connect: Any
) -> None:
    client = await connect(server.ws)
    await client.send(inline(endpoint, output={"voice": "nova"}))
    # Nothing acceptable follows: when the first-message deadline (10 s) passes, the server
    # closes with the refusal it already sent, not agent_timeout ("no session.update arrived").
    events, code = await client.closed(within=60)
    assert [(e.type, e.code, e.message) for e in events if isinstance(e, ev.SessionError)] == [
        ("session.error", "invalid_value", "unknown voice 'nova'"),
        ("session.error", "invalid_value",
         "unknown voice 'nova' (no acceptable session.update followed in time)"),
    ]  # fmt: skip
    assert code == 1008
    # With no message at all, the timeout is still the cause.
    silent = await connect(server.ws)
    events, code = await silent.closed(within=60)
    assert [(e.type, e.code) for e in events] == [("session.error", "agent_timeout")]


async def test_unknown_socket_paths_are_404_naming_the_socket(server: Server) -> None:
    for path in ("/v1", "/v1/wss", "/ws"):
        url = server.ws.replace("/v1/ws", path)
        with pytest.raises(websockets.InvalidStatus) as refused:
            await websockets.connect(url, additional_headers={"Authorization": API_KEY})
        response = refused.value.response
        assert response.status_code == 404
        assert response.body == (
            f"no WebSocket at {path}: the Voice Agent WebSocket is /v1/ws".encode()
        )
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "runtime.cli", "connect", server.ws.replace("/v1/ws", "/v1"),
        "--input", str(SPEECH / "shared-04-piper.wav"), stderr=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.DEVNULL, env={**os.environ, "VOXLOOP_API_KEY": API_KEY},
    )  # fmt: skip
    _, err = await proc.communicate()
    assert (proc.returncode, err.decode()) == (
        3, f"voxloop: error: no Voice Agent WebSocket at {server.ws[:-3]} (HTTP 404); voxloop "
           f"serve answers at {server.ws}; if that is a chat-completions endpoint, give it to "
           "voxloop serve (VOXLOOP_LLM_BASE_URL, or an agent's llm.base_url) and connect to the "
           "server (http_404)\n",
    )  # fmt: skip


def test_the_engines_load_at_start_up_and_readyz_says_when(tmp_path: Path) -> None:
    import httpx

    proc = subprocess.Popen(
        [sys.executable, "-m", "runtime.cli", "serve", "--port", "0", "--data-dir",
         str(tmp_path / "data")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "VOXLOOP_API_KEYS": API_KEY},
    )  # fmt: skip
    assert proc.stdout is not None and proc.stderr is not None
    try:
        http = proc.stdout.readline().rsplit(" ", 1)[1].strip()
        # (Lines about optional parts, such as the phone bridge being off, may come first.)
        while (started := json.loads(proc.stderr.readline()))["msg"] != "started":
            assert started["level"] == "info", started
        assert (started["speech_engines"], started["readiness"]) == ("loading", "/readyz")
        assert started["realtime"] == "ws" + http[4:] + "/v1/ws"
        # Loading takes seconds: the first answer comes before it is done.
        loading = httpx.get(f"{http}/readyz")
        body = loading.json()
        assert (loading.status_code, body.pop("worker")) == (503, proc.pid)
        assert body == {"status": "unavailable", "database": "ok", "sessions": "ok",
                        "speech_engines": "loading"}  # fmt: skip
        assert httpx.get(f"{http}/healthz").json()["status"] == "ok"
        while (line := json.loads(proc.stderr.readline()))["msg"] != "speech engines ready":
            assert line["level"] == "info", line
        assert (line["stt"], line["tts"]) == ("whisper", "piper") and line["load_s"] > 0
        ready = httpx.get(f"{http}/readyz")
        body = ready.json()
        assert (ready.status_code, body.pop("worker")) == (200, proc.pid)
        assert body == {"status": "ready", "database": "ok", "sessions": "ok",
                        "speech_engines": "ok"}  # fmt: skip
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        proc.stdout.close()
        proc.stderr.close()
    assert proc.returncode == 0


# -- spoken turns ---------------------------------------------------------------------------------


async def test_two_spoken_turns_with_the_history_in_the_second_request(
    server: Server, endpoint: EndpointThread, connect: Any
) -> None:
    endpoint.answer(plan("It is sunny in Paris."), plan("Your table is booked."))
    client = await connect(server.ws)
    await client.send(inline(endpoint))
    await client.next("session.ready")
    audio = speech("conv-two_turns", 24000) + silence(2.0, 24000)
    # Odd-sized messages: samples straddle messages and must be carried over.
    streaming = asyncio.get_running_loop().create_task(client.stream(audio, 48000, 1999))
    first = await client.until("reply.done", within=40)
    second = await client.until("reply.done", within=40)
    await streaming
    for turn, user_text, agent_text in (
        (first, "What's the weather like in Paris today?", "It is sunny in Paris."),
        (second, "Book a table for two at seven thirty tonight.", "Your table is booked."),
    ):
        # Audio and agent deltas interleave between reply.started and transcript.agent.
        kinds = types(turn)
        assert [k for k in kinds if k not in ("reply.audio", "transcript.agent.delta")][-5:] == [
            "input.speech.stopped", "transcript.user", "reply.started", "transcript.agent",
            "reply.done",
        ]  # fmt: skip
        body = kinds[kinds.index("reply.started") + 1 : kinds.index("transcript.agent")]
        assert set(body) == {"reply.audio", "transcript.agent.delta"}
        assert kinds[0] == "input.speech.started"
        user = next(e for e in turn if isinstance(e, ev.TranscriptUser))
        assert spoken(user.text) == spoken(user_text)
        deltas = [e for e in turn if isinstance(e, ev.TranscriptUserDelta)]
        assert all(d.item_id == user.item_id for d in deltas)
        agent = next(e for e in turn if isinstance(e, ev.TranscriptAgent))
        assert (agent.text, agent.interrupted) == (agent_text, False)
    messages = endpoint.chats()[-1].body["messages"]  # type: ignore[index]
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
    assert messages[2]["content"] == "It is sunny in Paris."
    assert words(messages[1]["content"]) == words("What's the weather like in Paris today?")
    assert all(r.headers["authorization"] == f"Bearer {LLM_KEY}" for r in endpoint.chats())


async def test_barge_in_keeps_the_heard_prefix(
    server: Server, endpoint: EndpointThread, connect: Any
) -> None:
    endpoint.answer(plan(LONG_REPLY), default="Sorry, what did you ask?")
    before = len(endpoint.chats())
    client = await connect(server.ws)
    await client.send(inline(endpoint))
    await client.next("session.ready")
    audio = speech("conv-barge_in", 24000) + silence(3.0, 24000)
    streaming = asyncio.get_running_loop().create_task(client.stream(audio, 48000, 2400))
    first = await client.until("reply.done", within=40)
    # The interruption becomes the next turn; its reply completes (a pause inside
    # "Wait, stop, that's not what I asked" may cut an early answer short first).
    later: list[ev.ServerEvent] = []
    for _ in range(3):
        later = await client.until("reply.done", within=40)
        if later[-1].status == "completed":  # type: ignore[union-attr]
            break
    await streaming
    cut = next(e for e in first if isinstance(e, ev.TranscriptAgent))
    assert cut.interrupted
    assert cut.text and LONG_REPLY.startswith(cut.text.rstrip(".,"))
    assert len(cut.text) < len(LONG_REPLY) / 2
    assert first[-1].status == "interrupted"
    assert types(first).index("input.speech.started") < types(first).index("transcript.agent")
    # The history holds only the heard prefix, then the whole interruption in one user message
    # (a pause inside it that ended the turn early is taken back before its reply is heard,
    # and the transcript sent at the pause is replaced: the same item).
    messages = endpoint.chats()[-1].body["messages"]  # type: ignore[index]
    assert len(endpoint.chats()) > before + 1
    assert messages[2] == {"role": "assistant", "content": cut.text}
    assert [m["role"] for m in messages[3:]] == ["user"]
    said = messages[3]["content"].lower()
    assert "wait" in said and "stop" in said
    users = [e for e in client.seen if isinstance(e, ev.TranscriptUser)]
    assert len({u.item_id for u in users[1:]}) == 1 and users[-1].text == messages[3]["content"]
    final = next(e for e in later if isinstance(e, ev.TranscriptAgent))
    assert (final.text, final.interrupted) == ("Sorry, what did you ask?", False)


async def test_a_turn_taken_back_replaces_its_transcript(
    server: Server, endpoint: EndpointThread, connect: Any
) -> None:
    # "I want to fly from Boston to" [900 ms] "New York next week.": at the pause the head reads
    # as a finished sentence, the turn ends, and the user goes on before the (slow) reply is heard.
    slow = ReplyPlan(replies=("Which day?",), ttft_ms=3000, itl_ms=5)
    endpoint.answer(slow, slow)
    before = len(endpoint.chats())
    client = await connect(server.ws)
    await client.send(inline(endpoint))
    await client.next("session.ready")
    audio = silence(0.4, 24000) + speech("paused-boston", 24000) + silence(1.0, 24000)
    streaming = asyncio.get_running_loop().create_task(client.stream(audio, 48000, 2400))
    withdrawn = await client.until("reply.done", within=40)
    answered = await client.until("reply.done", within=40)
    await streaming
    assert withdrawn[-1].status == "interrupted"
    assert not any(isinstance(e, ev.ReplyAudio) for e in withdrawn)
    cut = next(e for e in withdrawn if isinstance(e, ev.TranscriptAgent))
    assert (cut.text, cut.interrupted) == ("", True)
    # The turn goes on: input.speech.started again, and the whole sentence is sent as the same
    # item, replacing the transcript sent at the pause.
    assert types(withdrawn).count("input.speech.started") == 2
    users = [e for e in client.seen if isinstance(e, ev.TranscriptUser)]
    assert len(users) == 2 and users[0].item_id == users[1].item_id
    assert spoken(users[1].text).endswith(spoken("fly from Boston to New York next week."))
    final = next(e for e in answered if isinstance(e, ev.TranscriptAgent))
    assert (final.text, final.interrupted) == ("Which day?", False)
    messages = endpoint.chats()[-1].body["messages"]  # type: ignore[index]
    assert len(endpoint.chats()) == before + 2
    assert [m["role"] for m in messages] == ["system", "user"]
    assert messages[1]["content"] == users[1].text


async def test_mulaw_in_and_mulaw_out(
    server: Server, endpoint: EndpointThread, connect: Any
) -> None:
    endpoint.answer(plan("It is sunny in Paris."))
    client = await connect(server.ws)
    await client.send(inline(endpoint, input={"format": {"encoding": "audio/pcmu"}},
                             output={"format": {"encoding": "audio/pcmu"}}))  # fmt: skip
    ready = await client.next("session.ready")
    assert isinstance(ready, ev.SessionReady) and ready.config is not None
    assert ready.config["input"]["format"] == {"encoding": "audio/pcmu", "sample_rate": 8000}
    pcm8 = speech("shared-00-piper", 8000) + silence(2.0, 8000)
    streaming = asyncio.get_running_loop().create_task(client.stream(ulaw_encode(pcm8), 8000, 400))
    events = await client.until("reply.done", within=40)
    await streaming
    user = next(e for e in events if isinstance(e, ev.TranscriptUser))
    # Telephone-band audio: the words may come back slightly off, the sentence does not.
    assert words(user.text).startswith("whats the weather like in")
    reply = next(e for e in events if isinstance(e, ev.ReplyStarted))
    chunks = [e.data for e in events if isinstance(e, ev.ReplyAudio)]
    # Pieces of at most 40 ms of 8 kHz μ-law (one byte per sample).
    assert max(len(c) for c in chunks) == 320
    pcm = ulaw_decode(b"".join(chunks))
    delta = [e for e in events if isinstance(e, ev.TranscriptAgentDelta)][-1]
    assert delta.end_ms == len(pcm) // 2 * 1000 // 8000
    assert max(abs(int.from_bytes(pcm[i : i + 2], "little", signed=True))
               for i in range(0, len(pcm), 2)) > 3000  # fmt: skip
    assert reply.reply_id == delta.reply_id
    await client.send({"type": "session.end"})
    events, code = await client.closed()
    ended = events[-1]
    assert isinstance(ended, ev.SessionEnded) and code == 1000
    assert ended.audio_duration_seconds == pytest.approx(len(pcm8) / 2 / 8000, abs=0.01)


# -- tools -----------------------------------------------------------------------------------------


WEATHER_TOOL = {
    "type": "function",
    "name": "get_weather",
    "description": "Weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
}
#: The model's first round: a transition phrase, then a call of the weather tool.
WEATHER_CALL = ReplyPlan(
    tool_name="get_weather", tool_arguments='{"city": "Paris"}', replies=("Let me check.",)
)


async def test_client_tool_round_trip_follows_the_timing_rule(
    server: Server, endpoint: EndpointThread, connect: Any
) -> None:
    endpoint.answer(WEATHER_CALL, plan("It is twenty degrees in Paris."))
    client = await connect(server.ws)
    # The messages follow session.update at once: they wait until the session runs.
    await client.send(inline(endpoint, tools=[WEATHER_TOOL]))  # fmt: skip
    await client.send({"type": "conversation.message", "role": "user", "content": "Weather?"})
    await client.send({"type": "reply.create"})
    assert isinstance(await client.next("session.ready"), ev.SessionReady)
    call = await client.next("tool.call")
    assert isinstance(call, ev.ToolCall)
    assert (call.name, dict(call.arguments)) == ("get_weather", {"city": "Paris"})
    # reply.done follows the call; the result is sent when reply.done is the latest event.
    done = await client.next("reply.done")
    assert isinstance(done, ev.ReplyDone) and done.status == "completed"
    assert done.reply_id == call.reply_id
    first_part = client.seen[client.seen.index(next(
        e for e in client.seen if isinstance(e, ev.ReplyStarted))):]  # fmt: skip
    assert types(first_part)[-3:] == ["transcript.agent", "tool.call", "reply.done"]
    assert client.queue.empty()
    await client.send({"type": "tool.result", "call_id": call.call_id,
                       "result": json.dumps({"temp_c": 20})})  # fmt: skip
    events = await client.until("reply.done")
    assert types(events)[0] == "reply.started"
    started = events[0]
    assert isinstance(started, ev.ReplyStarted) and started.reply_id != call.reply_id
    final = next(e for e in events if isinstance(e, ev.TranscriptAgent))
    assert final.text == "It is twenty degrees in Paris."
    messages = endpoint.chats()[-1].body["messages"]  # type: ignore[index]
    assert messages[-2]["tool_calls"][0]["function"]["name"] == "get_weather"
    assert messages[-1] == {"role": "tool", "tool_call_id": call.call_id,
                            "content": '{"temp_c": 20}'}  # fmt: skip


# -- resume ----------------------------------------------------------------------------------------


async def test_resume_continues_the_conversation(
    server: Server, endpoint: EndpointThread, connect: Any
) -> None:
    endpoint.answer(plan("First answer."), plan("Second answer."), plan("Third answer."))
    client = await connect(server.ws)
    await client.send(inline(endpoint, greeting="Welcome back."))
    ready = await client.next("session.ready")
    assert isinstance(ready, ev.SessionReady)
    await client.until("reply.done")
    await client.send({"type": "conversation.message", "role": "user", "content": "One."})
    await client.send({"type": "reply.create"})
    await client.until("reply.done")
    await client.ws.close()  # a drop: no session.end

    # Another key of the server is another owner.
    other = await connect(server.ws, OTHER_KEY)
    await other.send({"type": "session.resume", "session_id": ready.session_id})
    events, code = await other.closed()
    assert [getattr(e, "code", None) for e in events] == ["session_forbidden"] and code == 1008

    # The resume token works as the credential (a browser's single-use token is spent).
    again = await connect(server.ws, None, query=f"?token={ready.resume_token}")
    await again.send({"type": "session.resume", "session_id": ready.session_id})
    resumed = await again.next("session.ready")
    assert isinstance(resumed, ev.SessionReady)
    assert resumed.session_id == ready.session_id
    assert resumed.expires_at == ready.expires_at
    assert resumed.resume_token != ready.resume_token
    await again.send({"type": "conversation.message", "role": "user", "content": "Two."})
    await again.send({"type": "reply.create"})
    events = await again.until("reply.done")
    # No second greeting; the history continues.
    assert [e.text for e in events if isinstance(e, ev.TranscriptAgent)] == ["Second answer."]
    messages = endpoint.chats()[-1].body["messages"]  # type: ignore[index]
    assert messages[1:] == [
        {"role": "assistant", "content": "Welcome back."},
        {"role": "user", "content": "One."},
        {"role": "assistant", "content": "First answer."},
        {"role": "user", "content": "Two."},
    ]
    await again.ws.close()

    # With the API key, after a second drop.
    third = await connect(server.ws)
    await third.send({"type": "session.resume", "session_id": ready.session_id})
    assert isinstance(await third.next("session.ready"), ev.SessionReady)
    await third.send({"type": "session.end"})
    events, code = await third.closed()
    assert isinstance(events[-1], ev.SessionEnded) and code == 1000

    # An ended session cannot be resumed.
    late = await connect(server.ws)
    await late.send({"type": "session.resume", "session_id": ready.session_id})
    events, code = await late.closed()
    assert [getattr(e, "code", None) for e in events] == ["session_not_found"] and code == 1008


# -- bad input never ends the session ----------------------------------------------------------


async def test_audio_faster_than_real_time_is_bounded(
    server: Server, endpoint: EndpointThread, connect: Any
) -> None:
    endpoint.answer(plan("Still fine."))
    client = await connect(server.ws)
    await client.send(inline(endpoint))
    await client.next("session.ready")
    burst = silence(1.0, 24000)
    for _ in range(6):  # six seconds of audio at once
        await client.send({"type": "input.audio", "audio": base64.b64encode(burst).decode()})
    err = await client.next("session.error")
    assert isinstance(err, ev.SessionError)
    assert (err.code, err.param) == ("audio_rate_violation", "audio")
    await client.send({"type": "reply.create"})
    events = await client.until("reply.done")
    assert next(e for e in events if isinstance(e, ev.TranscriptAgent)).text == "Still fine."


def mutations(seed: int, count: int) -> Iterator[str]:
    import random

    rng = random.Random(seed)
    valid = [
        {"type": "session.update", "session": {"system_prompt": "p", "output": {"volume": 80}}},
        {"type": "input.audio", "audio": base64.b64encode(bytes(64)).decode()},
        {"type": "tool.result", "call_id": "c", "result": "{}"},
        {"type": "conversation.message", "role": "user", "content": "hi"},
        {"type": "reply.cancel"},
        {"type": "session.update", "session": {"input": {"turn_detection": {"min_silence": 300}}}},
    ]
    junk: list[Any] = [None, True, -1, 1e308, "", "x" * 50, [], {}, {"a": [1]}, "audio/pcmu"]
    for _ in range(count):
        doc = json.loads(json.dumps(rng.choice(valid)))
        op = rng.randrange(5)
        if op == 0:  # replace a field's value
            target = doc if "session" not in doc or rng.random() < 0.5 else doc["session"]
            target[rng.choice(list(target))] = rng.choice(junk)
            yield json.dumps(doc)
        elif op == 1:  # add an unknown field
            doc[rng.choice(["x", "type2", "session_id", "audio"])] = rng.choice(junk)
            yield json.dumps(doc)
        else:  # corrupt the text
            text = json.dumps(doc)
            i = rng.randrange(len(text))
            if op == 2:
                yield text[:i]
            elif op == 3:
                yield text[:i] + rng.choice(['"', "{", "}", "\\", "\x00", "é", ","]) + text[i:]
            else:
                yield text[:i] + text[i + 1 :]


async def test_fuzzed_messages_only_get_typed_errors(
    server: Server, endpoint: EndpointThread, connect: Any
) -> None:
    endpoint.answer(plan("Alive and well."))
    client = await connect(server.ws)
    await client.send(inline(endpoint))
    await client.next("session.ready")
    count = 10_000
    for text in mutations(12, count):
        await client.send(text)
    await client.send({"type": "reply.create"})
    events = await client.until("reply.done", within=60)
    codes = {e.code for e in client.seen if isinstance(e, ev.SessionError)}
    assert codes <= {"invalid_format", "invalid_value", "invalid_audio", "invalid_config",
                     "immutable_field", "audio_rate_violation"}  # fmt: skip
    assert "invalid_format" in codes and "invalid_value" in codes
    assert next(e for e in events if isinstance(e, ev.TranscriptAgent)).text == "Alive and well."
    assert server.proc.poll() is None


# -- stored agents ---------------------------------------------------------------------------------

TOOL_SECRET = "Bearer tool-header-secret-77"


async def rest(server: Server, method: str, path: str, body: Any = None) -> httpx.Response:
    async with httpx.AsyncClient(base_url=server.http, headers={"Authorization": API_KEY}) as c:
        return await c.request(method, path, json=body)


async def test_a_stored_agent_answers_on_its_own_llm_with_its_tools(
    server: Server, endpoint: EndpointThread, connect: Any
) -> None:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    from ..helpers import serve_asgi

    seen: list[tuple[str, str | None]] = []

    async def weather(request: Request) -> JSONResponse:
        seen.append((str(request.query_params.get("city")), request.headers.get("authorization")))
        return JSONResponse({"temp_c": 21, "sky": "clear"})

    tool_app = Starlette(routes=[Route("/weather", weather)])
    async with serve_asgi(tool_app) as port:
        created = await rest(server, "POST", "/v1/agents", {
            "name": "Front desk", "system_prompt": "You are the front desk.",
            "voice": {"voice_id": "ivy"}, "greeting": "Front desk, hello.",
            "output": {"format": {"encoding": "audio/pcmu"}, "volume": 80},
            "input": {"turn_detection": {"min_silence": 400}},
            "tools": [
                {"name": "weather", "description": "Weather for a city",
                 "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
                 "http": {"url": f"http://127.0.0.1:{port}/weather", "http_method": "GET",
                          "headers": [{"name": "Authorization", "value": TOOL_SECRET}]}},
                {"name": "transfer", "description": "Transfer the call"},
            ],
            "llm": [{"base_url": endpoint.base_url, "model": "stored-model", "api_key": LLM_KEY}],
        })  # fmt: skip
        assert created.status_code == 201, created.text
        agent_id = created.json()["id"]
        endpoint.answer(
            ReplyPlan(tool_name="weather", tool_arguments='{"city": "Oslo"}', replies=("",)),
            plan("It is clear and twenty one degrees in Oslo."),
        )
        client = await connect(server.ws)
        await client.send({"type": "session.update", "session": {"agent_id": agent_id}})
        ready = await client.next("session.ready")
        assert isinstance(ready, ev.SessionReady) and ready.config is not None
        config = ready.config
        assert config["agent_id"] == agent_id
        assert config["system_prompt"] == "You are the front desk."
        assert config["output"] == {
            "type": "audio", "voice": "ivy",
            "format": {"encoding": "audio/pcmu", "sample_rate": 8000}, "volume": 80.0,
        }  # fmt: skip
        assert config["input"]["turn_detection"]["min_silence"] == 400
        assert [t["name"] for t in config["tools"]] == ["weather", "transfer"]
        assert config["llm"] == [{"base_url": endpoint.base_url, "model": "stored-model"}]
        assert TOOL_SECRET not in json.dumps(config) and LLM_KEY not in json.dumps(config)
        greeting = await client.until("reply.done")
        assert next(e for e in greeting if isinstance(e, ev.TranscriptAgent)).text == (
            "Front desk, hello."
        )
        # μ-law out at 8 kHz: one byte per sample, 40 ms pieces.
        assert max(len(e.data) for e in greeting if isinstance(e, ev.ReplyAudio)) == 320
        await client.send({"type": "conversation.message", "role": "user",
                           "content": "Weather in Oslo?"})  # fmt: skip
        await client.send({"type": "reply.create"})
        events = await client.until("reply.done")
    # The HTTP tool ran server-side, with its stored header; nothing about it on the socket.
    assert seen == [("Oslo", TOOL_SECRET)]
    assert not any(isinstance(e, ev.ToolCall) for e in events)
    assert next(e for e in events if isinstance(e, ev.TranscriptAgent)).text == (
        "It is clear and twenty one degrees in Oslo."
    )
    requests = endpoint.chats()[-2:]
    assert all(r.headers["authorization"] == f"Bearer {LLM_KEY}" for r in requests)
    body = requests[-1].body
    assert body is not None and body["model"] == "stored-model"
    assert body["messages"][0]["content"].startswith("You are the front desk.")
    assert [t["function"]["name"] for t in body["tools"]] == ["weather", "transfer"]
    assert json.loads(body["messages"][-1]["content"]) == {"temp_c": 21, "sky": "clear"}
    assert body["messages"][-1]["role"] == "tool"


async def test_a_stored_agent_that_cannot_run_is_refused(
    server: Server, endpoint: EndpointThread, connect: Any, tmp_path: Path
) -> None:
    # No llm and no server default.
    bare = await rest(server, "POST", "/v1/agents",
                      {"name": "Bare", "system_prompt": "x", "voice": "ivy"})  # fmt: skip
    assert bare.status_code == 201, bare.text
    client = await connect(server.ws)
    await client.send({"type": "session.update", "session": {"agent_id": bare.json()["id"]}})
    events, code = await client.closed()
    assert [getattr(e, "code", None) for e in events] == ["agent_init_failed"] and code == 1008
    assert "VOXLOOP_LLM_BASE_URL" in events[0].message

    # An endpoint whose name now resolves to a private address is refused, not called.
    public = await rest(server, "POST", "/v1/agents", {
        "name": "Moved", "system_prompt": "x", "voice": "ivy",
        "llm": [{"base_url": "https://llm.example.com/v1", "model": "m", "api_key": LLM_KEY}],
    })  # fmt: skip
    assert public.status_code == 201, public.text
    assert server.data_dir is not None
    moved = start_server(server.data_dir, {
        "VOXLOOP_STATIC_HOSTS": json.dumps({"llm.example.com": ["10.9.8.7"]})})  # fmt: skip
    try:
        client = await connect(moved.ws)
        await client.send({"type": "session.update", "session": {"agent_id": public.json()["id"]}})
        events, code = await client.closed()
    finally:
        stop_server(moved)
    assert [getattr(e, "code", None) for e in events] == ["agent_init_failed"] and code == 1008
    error = events[0]
    assert isinstance(error, ev.SessionError)
    assert error.param == "llm[0].base_url"
    assert "10.9.8.7" in error.message and LLM_KEY not in error.message


# -- limits and the server's default endpoint ----------------------------------------------------


async def test_capacity_duration_and_the_default_endpoint(
    endpoint: EndpointThread, connect: Any, tmp_path: Path
) -> None:
    with EndpointThread(ReplyPlan(replies=("Okay.",)), api_key=DEFAULT_KEY) as default:
        default.answer(plan("From the default endpoint."))
        srv = start_server(tmp_path / "limits", {
            "VOXLOOP_MAX_SESSIONS": "1", "VOXLOOP_MAX_SESSION_SECONDS": "6",
            "VOXLOOP_ALLOW_PRIVATE_ENDPOINTS": "127.0.0.1",
            "VOXLOOP_LLM_BASE_URL": default.base_url, "VOXLOOP_LLM_MODEL": "default-model",
            "VOXLOOP_LLM_API_KEY": DEFAULT_KEY,
        })  # fmt: skip
        try:
            before = time.time()
            first = await connect(srv.ws)
            await first.send({"type": "session.update", "session": {"system_prompt": "Hi."}})
            ready = await first.next("session.ready")
            assert isinstance(ready, ev.SessionReady) and ready.config is not None
            assert ready.config["llm"] == [{"base_url": default.base_url, "model": "default-model"}]
            assert ready.expires_at is not None and ready.timestamp is not None
            # 6 s after the session started (between the connect and session.ready; whole
            # seconds, rounded down), however long the start took on a busy machine.
            assert int(before + 6) <= ready.expires_at <= ready.timestamp + 6
            # One session per worker: the second bind is refused at once.
            second = await connect(srv.ws)
            await second.send({"type": "session.update", "session": {}})
            events, code = await second.closed()
            assert [getattr(e, "code", None) for e in events] == ["at_capacity"] and code == 1008
            await first.send({"type": "reply.create"})
            events = await first.until("reply.done")
            assert next(e for e in events if isinstance(e, ev.TranscriptAgent)).text == (
                "From the default endpoint."
            )
            request = default.chats()[-1]
            assert request.headers["authorization"] == f"Bearer {DEFAULT_KEY}"
            assert request.body is not None and request.body["model"] == "default-model"
            # The duration cap: session_expired, then session.ended, then the close.
            events, code = await first.closed(within=20)
            assert [e.type for e in events][-2:] == ["session.error", "session.ended"]
            assert events[-2].code == "session_expired"
            assert code == 1008
            # The slot is free again.
            third = await connect(srv.ws)
            await third.send({"type": "session.update", "session": {}})
            assert isinstance(await third.next("session.ready"), ev.SessionReady)
        finally:
            stop_server(srv)


# -- a finished session leaves nothing behind --------------------------------------------------


async def _resources(http: str) -> dict[str, float]:
    """The worker's task and descriptor gauges and its live sessions, from one scrape."""
    async with httpx.AsyncClient(timeout=30) as web:
        text = (
            await web.get(f"{http}/metrics", headers={"Authorization": f"Bearer {API_KEY}"})
        ).text
    names = ("voxloop_asyncio_tasks", "voxloop_open_sockets", "voxloop_open_fds",
             "voxloop_live_sessions")  # fmt: skip
    found = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name in names:
            found[name] = float(value)
    assert set(found) == set(names), text
    return found


async def _settled(http: str, baseline: dict[str, float]) -> dict[str, float]:
    """Scrape until the counts are back at ``baseline`` (a closed socket's connection task
    ends just after the close) or 30 s pass; the last scrape."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 30
    while (now := await _resources(http)) != baseline and loop.time() < deadline:
        pass
    return now


async def _spoken_session(
    server: Server, endpoint: EndpointThread, connect: Any, ending: str
) -> None:
    """One session of one spoken turn, ended with ``session.end`` or dropped."""
    audio = speech("conv-two_turns", 24000)[: 24000 * 2 * 4] + silence(2.0, 24000)
    failing = [plan("Sorry.", fault="status", status=500)] * 8  # every retry fails too
    endpoint.answer(*(failing if ending == "endpoint failed" else [plan("It is sunny.")]))
    client = await connect(server.ws)
    await client.send(inline(endpoint))
    await client.next("session.ready")
    await client.stream(audio, 48000, 4800)
    outcome = await client.next("reply.done", "reply.error", within=40)
    assert outcome.type == ("reply.error" if ending == "endpoint failed" else "reply.done")
    if ending == "drop":
        await client.ws.close()  # kept for a resume: state only, no task, no socket
        return
    await client.send({"type": "session.end"})
    events, code = await client.closed()
    assert isinstance(events[-1], ev.SessionEnded) and code == 1000


async def test_finished_sessions_leave_no_task_or_socket_behind(
    server: Server, endpoint: EndpointThread, connect: Any
) -> None:
    # A first session loads what every later one shares (engine threads and their pipes).
    await _spoken_session(server, endpoint, connect, "session.end")
    previous: dict[str, float] = {}
    baseline = await _resources(server.http)
    while baseline != previous:  # the last socket's connection task ends just after its close
        previous, baseline = baseline, await _resources(server.http)
    assert baseline["voxloop_live_sessions"] == 0
    assert baseline["voxloop_asyncio_tasks"] >= 1 and baseline["voxloop_open_sockets"] >= 1
    for ending in ("session.end", "endpoint failed", "drop", "session.end"):
        await _spoken_session(server, endpoint, connect, ending)
    assert await _settled(server.http, baseline) == baseline


async def test_reply_cancel_while_a_client_tool_call_waits_ends_it_cancelled(
    server: Server, endpoint: EndpointThread, connect: Any
) -> None:
    endpoint.answer(WEATHER_CALL, plan("Goodbye."))
    client = await connect(server.ws)
    await client.send(inline(endpoint, tools=[WEATHER_TOOL]))
    await client.send({"type": "conversation.message", "role": "user", "content": "Weather?"})
    await client.send({"type": "reply.create"})
    call = await client.next("tool.call")
    assert isinstance(call, ev.ToolCall)
    done = await client.next("reply.done")
    assert isinstance(done, ev.ReplyDone) and done.status == "completed"
    # The user gives up while the client looks the weather up.
    await client.send({"type": "reply.cancel"})
    events = await client.until("reply.done")
    assert types(events) == ["reply.started", "transcript.agent", "reply.done"]
    ended = events[-1]
    assert isinstance(ended, ev.ReplyDone) and ended.status == "cancelled"
    assert ended.reply_id == events[0].reply_id != call.reply_id
    # A result for the cancelled call is refused; the session goes on and answers again.
    await client.send({"type": "tool.result", "call_id": call.call_id, "result": "{}"})
    await client.send({"type": "conversation.message", "role": "user", "content": "Bye."})
    await client.send({"type": "reply.create"})
    events = await client.until("reply.done")
    refused = events[0]
    assert isinstance(refused, ev.SessionError)
    assert (refused.code, refused.message) == (
        "invalid_value",
        f"no tool call {call.call_id!r} is waiting for a result",
    )
    assert types(events)[1] == "reply.started"
    final = next(e for e in events if isinstance(e, ev.TranscriptAgent))
    assert final.text == "Goodbye."
