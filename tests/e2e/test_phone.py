"""Phone calls black-box: a real ``voxloop serve`` process with the Twilio bridge, driven by
streamdouble (a Twilio Media Streams simulator: pacing, mark echoes, ``clear``, DTMF,
impairments) with real speech through the embedded engines, and a loopback
OpenAI-compatible endpoint."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import types
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import streamdouble.session as sd_session
import websockets
from streamdouble.api import CallReport, run_scenario
from streamdouble.chaos import Impairments
from streamdouble.scenario import parse as parse_scenario
from streamdouble.session import SessionConfig
from twilio.request_validator import RequestValidator
from whisper_normalizer.english import EnglishTextNormalizer

from runtime.llm.reference import ReplyPlan

from ..helpers import SPEECH, EndpointThread

API_KEY = "vk-phone-operator"
LLM_KEY = "sk-phone-llm-7f6e5d"
AUTH_TOKEN = "twilio-auth-token-0123456789abcdef"
QUESTION = SPEECH / "shared-00-piper.wav"  # "What's the weather like in Paris today?"
CANCEL = SPEECH / "shared-04-piper.wav"  # "Please cancel my subscription."
LONG_REPLY = (
    "Sure. The weather in Paris today is mild and mostly sunny, with a light breeze from the west, "
    "a high of about twenty degrees in the afternoon, and a small chance of showers late in "
    "the evening, so you may want to bring a light jacket if you plan to stay out after dark."
)
_normalise = EnglishTextNormalizer()


def norm(text: str) -> str:
    return str(_normalise(text))


# -- the server ---------------------------------------------------------------------------------


@dataclass
class Server:
    http: str
    media: str
    proc: subprocess.Popen[str]
    log: Path
    handle: Any

    def lines(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log.read_text().splitlines():
            if line.startswith("{"):
                out.append(json.loads(line))
        return out

    async def call_over(self, stream_sid: str) -> dict[str, Any]:
        """The call's ``twilio call over`` line (the server writes it once it saw the end)."""
        for _ in range(400):
            found = [
                d for d in self.lines()
                if d["msg"] == "twilio call over" and d.get("stream_sid") == stream_sid
            ]  # fmt: skip
            if found:
                assert len(found) == 1
                return found[0]
            await asyncio.sleep(0.05)
        raise AssertionError(self.log.read_text()[-3000:])


@pytest.fixture(scope="module")
def endpoint() -> Iterator[EndpointThread]:
    with EndpointThread(ReplyPlan(replies=("Okay.",), ttft_ms=30, itl_ms=5), api_key=LLM_KEY) as t:
        yield t


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    data_dir = tmp_path_factory.mktemp("phone") / "data"
    log = data_dir.parent / "server.log"
    handle = log.open("a")
    proc = subprocess.Popen(
        [sys.executable, "-m", "runtime.cli", "serve", "--port", "0", "--data-dir", str(data_dir)],
        stdout=subprocess.PIPE, stderr=handle, text=True,
        env={**os.environ, "VOXLOOP_API_KEYS": API_KEY, "VOXLOOP_TWILIO_AUTH_TOKEN": AUTH_TOKEN,
             "VOXLOOP_ALLOW_PRIVATE_ENDPOINTS": "127.0.0.1"},
    )  # fmt: skip
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.startswith("voxloop serve listening on "), log.read_text()
    http = line.rsplit(" ", 1)[1].strip()
    srv = Server(http, "ws" + http[4:] + "/twilio/media", proc, log, handle)
    try:
        yield srv
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        proc.stdout.close()
        handle.close()
        text = log.read_text()
        assert "Traceback" not in text, text
        assert AUTH_TOKEN not in text and LLM_KEY not in text


def make_agent(server: Server, endpoint: EndpointThread, **fields: Any) -> str:
    body = {
        "name": "Phone",
        "system_prompt": "You answer the phone.",
        "voice": {"voice_id": "joe"},
        "llm": [{"base_url": endpoint.base_url, "model": "agent-model", "api_key": LLM_KEY}],
        **fields,
    }
    r = httpx.post(f"{server.http}/v1/agents", json=body, headers={"Authorization": API_KEY})
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


def start_message(stream_sid: str, call_sid: str, agent: str, sample_rate: int = 8000) -> str:
    """Twilio's Media Streams ``start`` for ``agent``: μ-law, mono, at ``sample_rate``."""
    return json.dumps({"event": "start", "streamSid": stream_sid,
                       "start": {"callSid": call_sid, "accountSid": "AC1",
                                 "customParameters": {"agent_id": agent},
                                 "mediaFormat": {"encoding": "audio/x-mulaw",
                                                 "sampleRate": sample_rate, "channels": 1}}})  # fmt: skip


def sign(url: str, params: dict[str, str] | None = None, token: str = AUTH_TOKEN) -> str:
    return str(RequestValidator(token).compute_signature(url, params or {}))


class _SignedWebsockets(types.ModuleType):
    """streamdouble's ``websockets`` with Twilio's signature on every upgrade (as Twilio sends)."""

    def __init__(self) -> None:
        super().__init__("websockets")

    def __getattr__(self, name: str) -> Any:
        return getattr(websockets, name)

    @staticmethod
    def connect(url: str, **kwargs: Any) -> Any:
        headers = {"X-Twilio-Signature": sign(url)}
        return websockets.connect(url, additional_headers=headers, **kwargs)


@pytest.fixture(autouse=True)
def _signed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sd_session, "websockets", _SignedWebsockets())


async def place(
    server: Server, agent_id: str, steps: list[Any], *, call_sid: str, **config: Any
) -> CallReport:
    scenario = parse_scenario({"name": call_sid, "steps": steps}, base_dir=SPEECH)
    cfg = SessionConfig(
        custom_parameters={"agent_id": agent_id, "call_sid": call_sid},
        response_timeout_s=60, quiet_period_s=1.5, max_call_s=120, **config,
    )  # fmt: skip
    report = await run_scenario(server.media, scenario, config=cfg)
    assert report.violations == [], report.violations
    return report


def user_texts(endpoint: EndpointThread) -> list[str]:
    return [m["content"] for m in last_messages(endpoint) if m["role"] == "user"]


def last_messages(endpoint: EndpointThread) -> list[dict[str, Any]]:
    chats = endpoint.chats()
    assert chats
    body = chats[-1].body
    assert body is not None
    return list(body["messages"])


def media_sizes(report: CallReport) -> list[int]:
    return [int(e.detail["bytes"]) for e in report.result.events_of("media_received")]


# -- calls --------------------------------------------------------------------------------------


async def test_greeting_then_a_spoken_turn(server: Server, endpoint: EndpointThread) -> None:
    greeting = "Hello, thanks for calling. How can I help?"
    agent = make_agent(server, endpoint, greeting=greeting)
    endpoint.answer(ReplyPlan(replies=("It is sunny.",), ttft_ms=30, itl_ms=5))
    report = await place(
        server, agent, [{"wait_for": "audio"}, {"wait": 4.0}, {"say": str(QUESTION)},
                        {"wait": 5.0}], call_sid="CAgreeting",
    )  # fmt: skip
    # Every payload is whole 20 ms frames of μ-law; the greeting came first, unprompted.
    sizes = media_sizes(report)
    assert sizes and all(n % 160 == 0 for n in sizes)
    assert report.time_to_first_audio_ms is not None
    # The caller's question reached the model, transcribed, after the greeting in the history.
    messages = last_messages(endpoint)
    assert [m["role"] for m in messages] == ["system", "assistant", "user"]
    assert messages[1]["content"] == greeting
    # (Whisper tiny hears "Paris" as "pairs" in some runs of this clip.)
    assert norm(messages[2]["content"]).replace("pairs", "paris") == norm(
        "What's the weather like in Paris today?"
    )
    # Marks after the audio were echoed; nothing was cleared.
    assert report.result.marks_echoed and report.result.clears_received == 0
    line = await server.call_over(report.stream_sid)
    assert (line["reason"], line["agent_id"], line["turns"]) == ("caller_hangup", agent, 1)
    assert line["stream_sid"] == report.stream_sid and line["duration_ms"] > 0
    # Everything sent was acknowledged: reply audio of greeting + answer, no stale marks.
    assert line["marks_acknowledged"] == line["marks_sent"]
    # One line per answered turn: the session's, with the call's ids (not a second one).
    metrics = [d for d in server.lines() if d["msg"] == "turn metrics"
               and d.get("session_id") == line["session_id"]]  # fmt: skip
    assert len(metrics) == 1 and metrics[0]["v2v_ms"] > 0 and "user_text" not in metrics[0]
    assert (metrics[0]["stream_sid"], metrics[0]["call_sid"], metrics[0]["turn"]) == (
        report.stream_sid, line["call_sid"], 1,
    )  # fmt: skip


async def test_barge_in_clears_and_keeps_what_was_played(
    server: Server, endpoint: EndpointThread
) -> None:
    agent = make_agent(server, endpoint)
    endpoint.answer(
        ReplyPlan(replies=(LONG_REPLY,), ttft_ms=30, itl_ms=5),
        ReplyPlan(replies=("Okay, cancelled.",), ttft_ms=30, itl_ms=5),
    )
    report = await place(
        server, agent,
        [{"say": str(QUESTION)}, {"wait_for": "audio"}, {"wait": 3.0}, {"say": str(CANCEL)},
         {"wait": 5.0}],
        call_sid="CAbargein",
    )  # fmt: skip
    assert report.result.clears_received == 1
    events = [(e.kind, e.at) for e in report.result.events]
    clear_at = next(at for kind, at in events if kind == "clear_received")
    # Nothing of the interrupted reply follows the clear: the next audio is the new reply,
    # which comes only after the caller's turn is over (well over a second later).
    after = [at for kind, at in events if kind == "media_received" and at > clear_at]
    assert not after or after[0] - clear_at > 0.5
    # The history keeps what the mark echoes say was played: a strict, non-empty prefix.
    messages = last_messages(endpoint)
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
    heard = messages[2]["content"]
    assert heard and LONG_REPLY.startswith(heard) and heard != LONG_REPLY
    assert norm(messages[3]["content"]) == norm("Please cancel my subscription.")
    line = await server.call_over(report.stream_sid)
    assert line["clears"] == 1 and line["reason"] == "caller_hangup", server.lines()[-12:]


async def test_dtmf_reaches_the_model_as_text(server: Server, endpoint: EndpointThread) -> None:
    agent = make_agent(server, endpoint)
    endpoint.answer(ReplyPlan(replies=("You pressed four two.",), ttft_ms=30, itl_ms=5))
    report = await place(
        server, agent, [{"wait": 0.5}, {"dtmf": "42#"}, {"wait_for": "audio"}, {"wait": 1.0}],
        call_sid="CAdtmf",
    )  # fmt: skip
    assert report.spoke
    assert user_texts(endpoint) == ["DTMF: 42#"]
    assert (await server.call_over(report.stream_sid))["dtmf_messages"] == 1


async def test_end_call_hangs_up_after_the_goodbye_was_played(
    server: Server, endpoint: EndpointThread
) -> None:
    agent = make_agent(server, endpoint)
    goodbye = "Goodbye, thanks for calling."
    endpoint.answer(
        ReplyPlan(replies=(goodbye,), ttft_ms=30, itl_ms=5, tool_name="end_call",
                  tool_arguments="{}", tool_after_text=True),
        ReplyPlan(fault="empty"),  # after the tool result: nothing more to say
    )  # fmt: skip
    report = await place(
        server, agent, [{"say": str(QUESTION)}, {"wait": 20.0}], call_sid="CAendcall"
    )
    # The agent closed the stream (Twilio then ends the call), after the echo of its
    # "hangup" mark, sent once the goodbye's own marks had all been echoed.
    assert report.result.closed_by == "agent"
    assert report.result.marks_received[-1] == "hangup"
    assert report.result.marks_echoed[-1] == "hangup"
    assert set(report.result.marks_received) == set(report.result.marks_echoed)
    # The whole goodbye was sent (about 1.5 s of speech), padded to whole frames.
    assert len(report.audio_received) > 8000
    assert "end_call" in [t["function"]["name"] for t in (endpoint.chats()[-1].body or {})["tools"]]
    line = await server.call_over(report.stream_sid)
    assert line["reason"] == "agent_hangup" and line["marks_acknowledged"] == line["marks_sent"]


async def test_caller_hangs_up_mid_greeting(server: Server, endpoint: EndpointThread) -> None:
    agent = make_agent(server, endpoint, greeting=LONG_REPLY)
    report = await place(
        server, agent, [{"wait_for": "audio"}, {"wait": 0.5}, "hangup"], call_sid="CAhangup"
    )
    assert report.result.closed_by == "caller"
    assert (await server.call_over(report.stream_sid))["reason"] == "socket_closed"


async def test_jitter_and_loss_do_not_break_the_call(
    server: Server, endpoint: EndpointThread
) -> None:
    agent = make_agent(server, endpoint)
    endpoint.answer(ReplyPlan(replies=("It is sunny.",), ttft_ms=30, itl_ms=5))
    report = await place(
        server, agent, [{"say": str(QUESTION)}, {"wait_for": "audio"}, {"wait": 1.0}],
        call_sid="CAjitter", impairments=Impairments(loss=0.03, jitter_ms=40), chaos_seed=7,
    )  # fmt: skip
    assert report.result.frames_dropped > 0 and report.spoke
    words = set(norm(user_texts(endpoint)[0]).replace("pairs", "paris").split())
    assert {"weather", "paris", "today"} <= words
    assert (await server.call_over(report.stream_sid))["reason"] == "caller_hangup"


# -- webhook, signatures, malformed messages ----------------------------------------------------


def test_voice_webhook_signatures_behind_a_proxy(server: Server, endpoint: EndpointThread) -> None:
    agent = make_agent(server, endpoint)
    form = {"CallSid": "CAhook", "From": "+15550001111", "To": "+15550002222",
            "Direction": "inbound"}  # fmt: skip
    path = f"/twilio/voice?agent_id={agent}"
    local = server.http + path
    # Unsigned, wrongly signed, signed with another token: 403, nothing answered.
    for headers in ({}, {"X-Twilio-Signature": "bm90IGEgc2lnbmF0dXJl"},
                    {"X-Twilio-Signature": sign(local, form, token="another-token")}):  # fmt: skip
        r = httpx.post(local, data=form, headers=headers)
        assert (r.status_code, r.text) == (403, "forbidden\n")
    # Signed over the URL Twilio used: answered with the stream and the call facts.
    r = httpx.post(local, data=form, headers={"X-Twilio-Signature": sign(local, form)})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/xml")
    assert f'<Stream url="{server.media}">' in r.text
    params = dict(re.findall(r'<Parameter name="([^"]+)" value="([^"]*)"/>', r.text))
    assert params == {"agent_id": agent, "call_sid": "CAhook", "from": "+15550001111",
                      "to": "+15550002222", "direction": "inbound"}  # fmt: skip
    # Behind a TLS proxy on a non-default port: Twilio signed the public https URL.
    public = f"https://voice.example.com:8443{path}"
    proxy = {"X-Forwarded-Proto": "https", "Host": "voice.example.com:8443"}
    r = httpx.post(local, data=form, headers={**proxy, "X-Twilio-Signature": sign(public, form)})
    assert r.status_code == 200
    assert '<Stream url="wss://voice.example.com:8443/twilio/media">' in r.text
    # The same signature without the proxy's headers, or over http, does not pass.
    r = httpx.post(local, data=form, headers={"X-Twilio-Signature": sign(public, form)})
    assert r.status_code == 403
    insecure = f"http://voice.example.com:8443{path}"
    r = httpx.post(local, data=form, headers={**proxy, "X-Twilio-Signature": sign(insecure, form)})
    assert r.status_code == 403
    # A body no Twilio webhook sends is refused before it is read whole.
    r = httpx.post(local, content=b"a=" + b"x" * 70_000,
                   headers={"Content-Type": "application/x-www-form-urlencoded"})  # fmt: skip
    assert r.status_code == 413
    # An unknown agent: the caller is told, the call hangs up.
    gone = server.http + "/twilio/voice?agent_id=agent_nope"
    r = httpx.post(gone, data=form, headers={"X-Twilio-Signature": sign(gone, form)})
    assert r.status_code == 200
    assert "<Say>Sorry, this number is not connected to an agent. Goodbye.</Say><Hangup/>" in r.text
    assert any(d["msg"] == "twilio call for an unknown agent" for d in server.lines())


async def test_media_socket_refuses_bad_signatures(server: Server) -> None:
    for headers in ({}, {"X-Twilio-Signature": sign(server.media, token="another-token")},
                    {"X-Twilio-Signature": sign(server.media.replace("/media", "/other"))}):  # fmt: skip
        with pytest.raises(websockets.InvalidStatus) as info:
            await websockets.connect(server.media, additional_headers=headers)
        assert info.value.response.status_code == 403


async def test_malformed_messages_are_logged_and_the_call_goes_on(
    server: Server, endpoint: EndpointThread
) -> None:
    agent = make_agent(server, endpoint, greeting="Hello there.")
    async with websockets.connect(
        server.media, additional_headers={"X-Twilio-Signature": sign(server.media)}
    ) as ws:
        await ws.send(json.dumps({"event": "connected", "protocol": "Call", "version": "1.0.0"}))
        await ws.send("{not json")
        await ws.send(start_message("MZbad", "CAmalformed", agent))
        await ws.send(json.dumps({"event": "media", "streamSid": "MZbad", "media": {}}))
        await ws.send(json.dumps({"event": "warp", "streamSid": "MZbad"}))
        await ws.send(start_message("MZother", "CAother", agent))
        silence = base64.b64encode(b"\xff" * 160).decode()
        got: list[dict[str, Any]] = []
        async with asyncio.timeout(60):
            while not any(m["event"] == "media" for m in got):
                await ws.send(json.dumps({"event": "media", "streamSid": "MZbad",
                                          "media": {"payload": silence}}))  # fmt: skip
                try:
                    async with asyncio.timeout(0.02):
                        got.append(json.loads(await ws.recv()))
                except TimeoutError:
                    pass
        await ws.send(json.dumps({"event": "stop", "streamSid": "MZbad"}))
    media = next(m for m in got if m["event"] == "media")
    assert (
        media["streamSid"] == "MZbad"
        and len(base64.b64decode(media["media"]["payload"])) % 160 == 0
    )
    line = await server.call_over("MZbad")
    rejected = [(d["code"], d.get("event", "")) for d in server.lines()
                if d["msg"] == "twilio message rejected"]  # fmt: skip
    assert ("invalid_json", "") in rejected
    assert ("invalid_field", "media") in rejected
    assert ("invalid_event", "warp") in rejected
    assert ("invalid_event", "start") in rejected  # the second start: the call stays MZbad's
    assert line["reason"] == "caller_hangup" and line["rejected_messages"] == 4


async def test_a_stream_in_a_format_that_cannot_be_heard_is_hung_up_at_once(
    server: Server, endpoint: EndpointThread
) -> None:
    agent = make_agent(server, endpoint, greeting="Hello there.")
    async with websockets.connect(
        server.media, additional_headers={"X-Twilio-Signature": sign(server.media)}
    ) as ws:
        await ws.send(json.dumps({"event": "connected", "protocol": "Call", "version": "1.0.0"}))
        await ws.send(start_message("MZwide", "CAwide", agent, sample_rate=16000))
        # A start it could play comes next: the call must not go on with it.
        with contextlib.suppress(websockets.ConnectionClosed):
            await ws.send(start_message("MZwide", "CAwide", agent))
        # The server closes the stream (Twilio then ends the call): no greeting, no media.
        async with asyncio.timeout(30):
            with pytest.raises(websockets.ConnectionClosedOK):
                while True:
                    got = json.loads(await ws.recv())
                    assert got["event"] not in ("media", "mark"), got
    rejected = [(d["code"], d.get("event", "")) for d in server.lines()
                if d["msg"] == "twilio message rejected"]  # fmt: skip
    assert rejected[-1] == ("unsupported_format", "start")
    assert any(d["msg"] == "twilio stream ended before start" for d in server.lines())
