"""``VoiceAgentClient`` and the headless runner over real sockets, against a
small loopback peer that speaks the Voice Agent protocol with the real codec.

The peer is scripted (no speech engines): it checks credentials on the
upgrade, binds ``agent_1`` only, answers a voiced stretch of input audio
followed by 300 ms of silence with a whole turn (a 440 Hz tone as the reply's
audio), answers ``reply.create`` with a tool call, and can drop the TCP
connection mid-session to exercise resume.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from websockets.asyncio.server import ServerConnection, serve
from websockets.http11 import Request, Response

from audio.wav import read_wav
from runtime.client.connection import (
    Auth,
    ConnectionDropped,
    HandshakeRejected,
    ServerUnreachable,
    SessionResumed,
    VoiceAgentClient,
    websocket_url,
)
from runtime.client.protocol import PlaybackFlush, SessionFailure, State
from runtime.client.runner import connect_pcm
from runtime.protocol.events import (
    InputAudio,
    ProtocolError,
    ReplyAudio,
    ReplyCreate,
    ReplyDone,
    SessionEnd,
    SessionPatch,
    SessionResume,
    SessionUpdate,
    ToolCall,
    ToolResult,
    decode_client_event,
)
from runtime.secret import Secret
from tests.helpers import tone

KEY = "vx_test_key"
BIND = SessionPatch(keys=frozenset({"agent_id"}), agent_id="agent_1")
CHUNK = 2400  # 50 ms of 24 kHz PCM16


def _rms(pcm: bytes) -> float:
    x = np.frombuffer(pcm, dtype="<i2").astype(np.float64)
    return float(np.sqrt(np.mean(x**2))) if x.size else 0.0


@dataclass
class Peer:
    drop_after_audio: int | None = None  # abort TCP after this many input.audio (once)
    forget_on_drop: bool = False  # the dropped session cannot be resumed
    expire_after_audio: int | None = None  # session_expired after this many input.audio
    received: list[dict[str, Any]] = field(default_factory=list)
    auth_headers: list[str | None] = field(default_factory=list)
    sessions: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    tool_results: list[ToolResult] = field(default_factory=list)
    port: int = 0
    audio_seen: asyncio.Event = field(default_factory=asyncio.Event)
    _dropped: bool = False

    def process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        auth = request.headers.get("Authorization")
        self.auth_headers.append(auth)
        if auth == "Bearer reject-http":
            return connection.respond(HTTPStatus.UNAUTHORIZED, "Unauthorized\n")
        if request.path.split("?")[0] != "/v1/ws" or auth == "Bearer not-voxloop":
            return connection.respond(HTTPStatus.NOT_FOUND, "Not Found\n")
        return None

    async def send(self, ws: ServerConnection, doc: dict[str, Any]) -> None:
        await ws.send(json.dumps(doc))

    async def handler(self, ws: ServerConnection) -> None:
        auth = ws.request.headers.get("Authorization") if ws.request else None
        path = ws.request.path if ws.request else ""
        if auth not in (f"Bearer {KEY}", "Bearer rt_1") and "token=tok_1" not in path:
            await self.send(ws, {"type": "session.error", "code": "unauthorized",
                                 "message": "Invalid API key"})  # fmt: skip
            await ws.close(1008, "unauthorized")
            return
        first = decode_client_event(await ws.recv())
        if isinstance(first, SessionResume):
            if first.session_id not in self.sessions or auth not in (
                f"Bearer {KEY}",
                "Bearer rt_1",
            ):
                await self.send(ws, {"type": "session.error", "code": "session_not_found",
                                     "message": "no resumable session"})  # fmt: skip
                await ws.close(1008, "session_not_found")
                return
            sid = first.session_id
        else:
            assert isinstance(first, SessionUpdate)
            if first.session.agent_id not in (None, "agent_1"):
                await self.send(ws, {"type": "session.error", "code": "agent_not_found",
                                     "message": "Agent not found", "param": "session.agent_id"})  # fmt: skip
                await ws.close(1008, "agent_not_found")
                return
            sid = f"sess_{len(self.sessions) + 1}"
            self.sessions[sid] = []
        await self.send(ws, {"type": "session.ready", "session_id": sid, "resume_token": "rt_1",
                             "expires_at": 1900000000,
                             "config": {"input": {"format": {"encoding": "audio/pcm"}},
                                        "output": {"format": {"encoding": "audio/pcm"}}}})  # fmt: skip
        voiced = silent = audio_msgs = 0
        replies = 0
        try:
            async for text in ws:
                try:
                    event = decode_client_event(text)
                except ProtocolError as exc:
                    await self.send(ws, {"type": "session.error", "code": exc.code,
                                         "message": exc.message})  # fmt: skip
                    continue
                self.sessions[sid].append({"type": event.type})
                match event:
                    case InputAudio(audio=audio):
                        audio_msgs += 1
                        self.audio_seen.set()
                        if self.drop_after_audio == audio_msgs and not self._dropped:
                            self._dropped = True
                            if self.forget_on_drop:
                                del self.sessions[sid]
                            ws.transport.abort()
                            return
                        if self.expire_after_audio == audio_msgs:
                            await self.send(ws, {"type": "session.error", "code": "session_expired",
                                                 "message": "the session reached its maximum duration"})  # fmt: skip
                            await self.send(ws, {"type": "session.ended",
                                                 "session_duration_seconds": 0.5,
                                                 "audio_duration_seconds": 0.5})  # fmt: skip
                            await ws.close(1008, "session expired")
                            return
                        if _rms(audio) > 300:
                            if voiced == 0:
                                await self.send(ws, {"type": "input.speech.started"})
                            voiced += 1
                            silent = 0
                        elif voiced:
                            silent += 1
                            if silent == 6:  # 300 ms
                                voiced = silent = 0
                                replies += 1
                                await self._turn(ws, f"reply_{replies}")
                    case ReplyCreate():
                        replies += 1
                        rid = f"reply_{replies}"
                        await self.send(ws, {"type": "reply.started", "reply_id": rid})
                        await self.send(ws, {"type": "tool.call", "call_id": "call_1",
                                             "name": "get_weather", "arguments": {"city": "Paris"},
                                             "reply_id": rid})  # fmt: skip
                        await self.send(ws, {"type": "reply.done", "reply_id": rid,
                                             "status": "completed"})  # fmt: skip
                    case ToolResult():
                        self.tool_results.append(event)
                    case SessionEnd():
                        await self.send(ws, {"type": "session.ended",
                                             "session_duration_seconds": 1.5,
                                             "audio_duration_seconds": 1.0})  # fmt: skip
                        await ws.close(1000)
                        return
        except Exception:  # the client went away
            return

    async def _turn(self, ws: ServerConnection, rid: str) -> None:
        await self.send(ws, {"type": "input.speech.stopped"})
        await self.send(
            ws, {"type": "transcript.user", "text": "Hello there.", "item_id": "item_1"}
        )
        await self.send(ws, {"type": "reply.started", "reply_id": rid})
        audio = tone(440, 0.3, 24000)
        for i in range(0, len(audio), CHUNK):
            data = base64.b64encode(audio[i : i + CHUNK]).decode()
            await self.send(ws, {"type": "reply.audio", "reply_id": rid, "data": data})
        await self.send(ws, {"type": "transcript.agent", "reply_id": rid,
                             "text": "Hi! How can I help?", "interrupted": False})  # fmt: skip
        await self.send(ws, {"type": "reply.done", "reply_id": rid, "status": "completed"})


@contextlib.asynccontextmanager
async def running(peer: Peer) -> AsyncIterator[str]:
    async with serve(peer.handler, "127.0.0.1", 0, process_request=peer.process_request) as server:
        peer.port = server.sockets[0].getsockname()[1]
        yield f"ws://127.0.0.1:{peer.port}/v1/ws"


async def test_binds_with_bearer_key_and_ends_cleanly():
    peer = Peer()
    async with running(peer) as url:
        async with VoiceAgentClient(url, session=BIND, auth=Auth(api_key=Secret(KEY))) as client:
            assert client.session_id == "sess_1"
            assert client.protocol.expires_at == 1900000000
            assert await client.send_audio(bytes(CHUNK)) is True
            await client.end()
            events = [e async for e in client.events()]
        assert client.protocol.state is State.ENDED and client.error is None
        assert client.protocol.ended is not None
        assert client.protocol.ended.session_duration_seconds == 1.5
        assert [type(e).__name__ for e in events] == ["SessionReady", "SessionEnded"]
    assert peer.auth_headers == [f"Bearer {KEY}"]
    assert peer.sessions["sess_1"] == [{"type": "input.audio"}, {"type": "session.end"}]


async def test_leaving_without_end_closes_and_does_not_resume():
    peer = Peer()
    async with running(peer) as url:
        async with VoiceAgentClient(url, session=BIND, auth=Auth(api_key=Secret(KEY))) as client:
            assert await client.send_audio(bytes(CHUNK))
        assert client.protocol.state is State.FAILED
        assert client.error is not None and client.error.code == "connection_closed"
        assert client.statistics().resumes == 0
    assert peer.auth_headers == [f"Bearer {KEY}"]  # no second connection


async def test_token_goes_in_the_query_and_failures_are_typed():
    peer = Peer()
    async with running(peer) as url:
        async with VoiceAgentClient(url, session=BIND, auth=Auth(token=Secret("tok_1"))) as client:
            assert client.session_id == "sess_1"
            await client.end()
        assert peer.auth_headers[-1] is None

        with pytest.raises(SessionFailure) as bad_key:
            async with VoiceAgentClient(url, session=BIND, auth=Auth(api_key=Secret("wrong"))):
                pass
        assert (bad_key.value.code, bad_key.value.close_code) == ("unauthorized", 1008)
        assert "wrong" not in str(bad_key.value)

        with pytest.raises(HandshakeRejected) as http:
            async with VoiceAgentClient(
                url, session=BIND, auth=Auth(api_key=Secret("reject-http"))
            ):
                pass
        assert (http.value.code, http.value.status) == ("unauthorized", 401)

        unknown = SessionPatch(keys=frozenset({"agent_id"}), agent_id="agent_404")
        with pytest.raises(SessionFailure) as missing:
            async with VoiceAgentClient(url, session=unknown, auth=Auth(api_key=Secret(KEY))):
                pass
        assert (missing.value.code, missing.value.message) == ("agent_not_found", "Agent not found")
    # The peer is gone: nothing listens on that port any more.
    with pytest.raises(ServerUnreachable) as unreachable:
        async with VoiceAgentClient(url, session=BIND, auth=Auth(api_key=Secret(KEY)),
                                    open_timeout_s=2):  # fmt: skip
            pass
    assert unreachable.value.code == "unreachable"
    assert f"127.0.0.1:{peer.port}" in unreachable.value.message


async def test_a_dropped_socket_is_resumed_with_the_session_id():
    peer = Peer(drop_after_audio=3)
    async with running(peer) as url:
        async with VoiceAgentClient(url, session=BIND, auth=Auth(token=Secret("tok_1"))) as client:
            seen: list[object] = []

            async def consume() -> None:
                async for event in client.events():
                    seen.append(event)

            async with asyncio.TaskGroup() as tg:
                tg.create_task(consume())
                while client.protocol.statistics().resumes == 0:
                    await client.send_audio(bytes(CHUNK))
                    await asyncio.sleep(0.01)  # a microphone's pace, roughly
                assert await client.send_audio(bytes(CHUNK)) is True
                await client.end()
        assert client.protocol.state is State.ENDED
    kinds = [type(e).__name__ for e in seen]
    assert kinds == ["SessionReady", "ConnectionDropped", "SessionReady", "SessionResumed",
                     "SessionEnded"]  # fmt: skip
    assert seen[1] == ConnectionDropped(close_code=None)
    assert seen[3] == SessionResumed(session_id="sess_1")
    # Single-use token: the resume used the session's resume token.
    assert peer.auth_headers == [None, "Bearer rt_1"]
    # Audio of the old socket, then the resumed socket's audio and the end; one session.
    assert list(peer.sessions) == ["sess_1"]
    assert peer.sessions["sess_1"][-1] == {"type": "session.end"}
    assert client.statistics().resumes == 1


async def test_tool_result_is_sent_after_reply_done(tmp_path: Path):
    peer = Peer()
    async with (
        running(peer) as url,
        VoiceAgentClient(url, session=BIND, auth=Auth(api_key=Secret(KEY))) as client,
    ):
        await client.send(ReplyCreate(instructions="Check the weather."))
        async for event in client.events():
            if isinstance(event, ToolCall):
                await client.submit_tool_result(event.call_id, '{"temp_c": 18}')
            if isinstance(event, ReplyDone):
                break
        await client.end()
    assert peer.tool_results == [ToolResult(call_id="call_1", result='{"temp_c": 18}')]
    assert peer.sessions["sess_1"] == [{"type": "reply.create"}, {"type": "tool.result"},
                                       {"type": "session.end"}]  # fmt: skip


async def test_headless_run_records_both_sides_and_times_the_turn(tmp_path: Path):
    peer = Peer()
    user = bytes(CHUNK * 4) + tone(300, 0.5, 24000, amplitude=0.3) + bytes(CHUNK * 2)
    out, metrics = tmp_path / "out.wav", tmp_path / "m.json"
    events: list[object] = []
    async with running(peer) as url:
        result = await connect_pcm(
            user, url=url, auth=Auth(api_key=Secret(KEY)), session=BIND, output_wav=out,
            metrics_json=metrics, on_event=events.append,
        )  # fmt: skip
    [turn] = result.metrics
    assert (turn.user_text, turn.agent_text, turn.interrupted) == (
        "Hello there.",
        "Hi! How can I help?",
        False,
    )
    # The voice ends 0.7 s in; the peer answers after 6 silent chunks (300 ms), at once (how
    # soon after that is the machine's business, not this test's).
    assert turn.v2v_ms is not None and turn.v2v_ms >= 300
    assert turn.endpointing_ms is not None and turn.endpointing_ms <= turn.v2v_ms
    stereo = read_wav(out)
    assert stereo.channels == 2 and stereo.sample_rate == 24000
    left, right = stereo.channel(0), stereo.channel(1)
    assert left[: len(user)] == user
    # The reply's 300 ms tone is on the right channel, once, after the user's voice.
    loud = np.nonzero(np.abs(np.frombuffer(right, dtype="<i2")) > 1000)[0]
    assert loud.size and loud[0] / 24000 > 0.7
    assert 0.29 < (loud[-1] - loud[0]) / 24000 < 0.31
    # v2v is the silence heard between the voice and the reply in the recording (to a message).
    assert abs((loud[0] / 24000 - 0.7) * 1000 - turn.v2v_ms) < 50
    doc = json.loads(metrics.read_text())
    assert doc["session_id"] == "sess_1"
    assert doc["turns"][0]["v2v_ms"] == turn.v2v_ms and doc["turns"][0]["ttft_ms"] is None
    assert sum(isinstance(e, ReplyAudio) for e in events) == 6  # 300 ms in 50 ms messages
    # input.speech.started flushed the (empty) playback once; nothing was cut.
    assert [e for e in events if isinstance(e, PlaybackFlush)] == [
        PlaybackFlush(reason="speech_started")
    ]
    assert result.duration_s >= len(user) / 2 / 24000


async def test_cli_exit_codes(tmp_path: Path):
    import os
    import signal
    import sys

    peer = Peer()
    clip = tmp_path / "in.wav"
    from audio.wav import write_wav

    write_wav(clip, bytes(CHUNK * 4) + tone(300, 0.5, 24000, amplitude=0.3), 24000)

    async def cli(*args: str, key: str = KEY) -> tuple[int, str, str]:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "runtime.cli", "connect", *args,
            env={**os.environ, "VOXLOOP_API_KEY": key}, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await proc.communicate()
        assert proc.returncode is not None
        return proc.returncode, out.decode(), err.decode()

    async with running(peer) as url:
        out_wav, metrics = tmp_path / "o.wav", tmp_path / "m.json"
        code, out, err = await cli(url, "--agent-id", "agent_1", "--input", str(clip),
                                   "--output", str(out_wav), "--metrics-json", str(metrics))  # fmt: skip
        assert code == 0, err
        assert "Hello there." in out and "Hi! How can I help?" in out
        assert json.loads(metrics.read_text())["turns"][0]["user_text"] == "Hello there."
        code, _, err = await cli(url, "--agent-id", "agent_1", "--input", str(clip), key="wrong")
        assert (code, err) == (4, "voxloop: error: Invalid API key (unauthorized)\n")
        code, _, err = await cli(url, "--agent-id", "nope", "--input", str(clip))
        assert (code, err) == (5, "voxloop: error: Agent not found (agent_not_found)\n")
        # Ctrl-C in the middle of a headless run: a clean session.end, then exit 130.
        long_clip = tmp_path / "long.wav"
        write_wav(long_clip, bytes(24000 * 2 * 30), 24000)
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "runtime.cli", "connect", url, "--agent-id", "agent_1",
            "--input", str(long_clip), env={**os.environ, "VOXLOOP_API_KEY": KEY},
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        peer.audio_seen.clear()
        await peer.audio_seen.wait()
        proc.send_signal(signal.SIGINT)
        _, err_b = await proc.communicate()
        assert proc.returncode == 130 and b"Traceback" not in err_b, err_b
        last = list(peer.sessions)[-1]
        assert peer.sessions[last][-1] == {"type": "session.end"}
        # An HTTP server without the WebSocket there: the upgrade is refused.
        wrong = url.replace("/v1/ws", "/nothing-here")
        code, _, err = await cli(wrong, "--agent-id", "agent_1", "--input", str(clip),
                                 key="reject-http-404")  # fmt: skip
        assert (code, err) == (
            3, f"voxloop: error: no Voice Agent WebSocket at {wrong} (HTTP 404); voxloop serve "
               f"answers at {url} (http_404)\n"
        )  # fmt: skip
        # The right path on a server that is not voxloop's (it has no WebSocket anywhere): no
        # advice to try that same URL.
        code, _, err = await cli(url, "--agent-id", "agent_1", "--input", str(clip),
                                 key="not-voxloop")  # fmt: skip
        assert (code, err) == (
            3, f"voxloop: error: no Voice Agent WebSocket at {url} (HTTP 404); the server there "
               "is not voxloop serve (http_404)\n"
        )  # fmt: skip
    # A drop the server does not let us resume from: exit 6; an expired session: exit 7.
    for other_peer, exit_code, message in [
        (
            Peer(drop_after_audio=3, forget_on_drop=True),
            6,
            "no resumable session (session_not_found)",
        ),
        (
            Peer(expire_after_audio=3),
            7,
            "the session reached its maximum duration (session_expired)",
        ),
    ]:
        async with running(other_peer) as other:
            code, _, err = await cli(other, "--agent-id", "agent_1", "--input", str(clip))
        assert code == exit_code and err.splitlines()[-1] == f"voxloop: error: {message}", err
        assert "Traceback" not in err
    code, _, err = await cli(url, "--agent-id", "agent_1", "--input", str(clip))
    assert (code, err) == (3, f"voxloop: error: cannot reach 127.0.0.1:{peer.port} (connection "
                              "refused); is the server running? (unreachable)\n")  # fmt: skip
    for args, message in [
        (["--agent-id", "a", "--greeting", "Hi"], "no inline session settings"),
        (["--output", "x.wav"], "need --input"),
        (["--input", str(tmp_path / "missing.wav")], "no such file"),
        (["--min-silence-ms", "5"], "between 50 and 10000"),
        (["--tool-result", "nameonly"], "NAME=TEXT"),
        (
            ["--tool-result", "book table=ok"],
            "voxloop: error: --tool-result: 'book table' cannot name a tool (letters, digits, _ and - "
            "only)\n",
        ),
        (
            ["--tool-result", "a=1", "--tool-result", "a=2"],
            "voxloop: error: --tool-result answers 'a' twice\n",
        ),
    ]:
        code, _, err = await cli(url, *args)
        assert code == 2 and message in err and "Traceback" not in err, (args, err)
    code, _, err = await cli("ftp://x/", "--agent-id", "a")
    assert code == 2 and "not a ws://" in err
    env_less = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "runtime.cli", "connect", url, "--api-key-env", "VOXLOOP_NO_SUCH_KEY",
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, err_b = await env_less.communicate()
    assert env_less.returncode == 2 and b"VOXLOOP_NO_SUCH_KEY is not set" in err_b


def test_websocket_url_forms():
    assert websocket_url("http://127.0.0.1:8080") == "ws://127.0.0.1:8080/v1/ws"
    assert websocket_url("https://voice.example.com/") == "wss://voice.example.com/v1/ws"
    assert websocket_url("ws://h:1/v1/ws?x=1") == "ws://h:1/v1/ws?x=1"
    with pytest.raises(ValueError, match="not a ws"):
        websocket_url("ftp://h/")
