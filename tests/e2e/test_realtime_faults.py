"""What networks, clients and endpoints do to a live call, against a real ``voxloop serve``:
a half-open old socket taken over by a resume, a client that stops reading (with a small
receive window), slots held by silent sockets, an endpoint that streams NUL and lone
surrogates, odd characters in every client text, and a fuzzed stream of client events
after which the same session still answers a spoken turn."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets
import websockets.sync.client
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.client import ClientProtocol
from websockets.frames import Close, Frame, Opcode
from websockets.http11 import Response
from websockets.uri import parse_uri

from runtime.llm.reference import ReplyPlan
from runtime.protocol import events as ev

from ..helpers import EndpointThread
from .test_realtime import (
    LONG_REPLY,
    inline,
    plan,
    silence,
    speech,
    spoken,
)
from .test_realtime import connect as _connect_fixture  # noqa: F401  (the fixture)
from .voice_agent import (
    API_KEY,
    LLM_KEY,
    OTHER_KEY,
    Server,
    running_server,
    start_server,
    stop_server,
)

TYPED = {"invalid_format", "invalid_value", "invalid_audio", "invalid_config", "immutable_field",
         "audio_rate_violation", "agent_id_not_first"}  # fmt: skip


@pytest.fixture
def connect(_connect_fixture: Any) -> Any:  # noqa: F811
    """Opens clients of the real protocol (closed after the test)."""
    return _connect_fixture


@pytest.fixture(scope="module")
def endpoint() -> Iterator[EndpointThread]:
    with EndpointThread(ReplyPlan(replies=("Okay.",)), api_key=LLM_KEY) as thread:
        yield thread


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A server whose only rule for a client that stops reading is the full queue."""
    with running_server(
        tmp_path_factory.mktemp("faults") / "data",
        {"VOXLOOP_ALLOW_PRIVATE_ENDPOINTS": "127.0.0.1", "VOXLOOP_OUTBOUND_MESSAGES": "16",
         "VOXLOOP_CLIENT_STALL_SECONDS": "600"},
    ) as srv:  # fmt: skip
        yield srv


# -- a client that can stop reading (and answering pings) without closing ------------------


class RawClient:
    """A WebSocket client on a plain socket that reads only when told to (no pongs then)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 proto: ClientProtocol) -> None:  # fmt: skip
        self.reader, self.writer, self.proto = reader, writer, proto
        self.events: list[dict[str, Any]] = []
        self.close: Close | None = None
        self.ended = False  # EOF or reset

    @classmethod
    async def open(cls, url: str, key: str = API_KEY, rcvbuf: int | None = None) -> RawClient:
        uri = parse_uri(url)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:  # before connect: the window the server may fill
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, (uri.host, uri.port))
        # A small limit: the stream stops taking data from the socket soon after the
        # test stops reading (asyncio pauses at twice the limit).
        reader, writer = await asyncio.open_connection(sock=sock, limit=4096)
        proto = ClientProtocol(uri)
        request = proto.connect()
        request.headers["Authorization"] = f"Bearer {key}"
        proto.send_request(request)
        client = cls(reader, writer, proto)
        client._flush()
        while not any(isinstance(e, Response) for e in await client._read_some()):
            pass
        return client

    def _flush(self) -> None:
        for data in self.proto.data_to_send():
            if data:
                self.writer.write(data)

    async def _read_some(self) -> list[object]:
        try:
            data = await self.reader.read(65536)
        except ConnectionResetError:
            data = b""
        if not data:
            self.ended = True
            self.proto.receive_eof()
        else:
            self.proto.receive_data(data)
        out: list[object] = list(self.proto.events_received())
        for event in out:
            if isinstance(event, Frame) and event.opcode is Opcode.TEXT:
                self.events.append(json.loads(bytes(event.data)))
            elif isinstance(event, Frame) and event.opcode is Opcode.CLOSE:
                self.close = Close.parse(event.data)
        self._flush()  # pongs, the close echo
        return out

    async def send(self, doc: dict[str, Any]) -> None:
        self.proto.send_text(json.dumps(doc).encode())
        self._flush()
        await self.writer.drain()

    async def next(self, kind: str) -> dict[str, Any]:
        """Read until an event of ``kind`` (answering pings meanwhile)."""
        async with asyncio.timeout(60):
            while True:
                found = [e for e in self.events if e["type"] == kind]
                if found:
                    self.events = self.events[self.events.index(found[0]) + 1 :]
                    return found[0]
                if self.ended:
                    raise AssertionError(f"connection ended waiting for {kind}")
                await self._read_some()

    async def read_to_end(self) -> None:
        """Read everything until the connection ends."""
        async with asyncio.timeout(60):
            while not self.ended:
                await self._read_some()

    async def aclose(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()


def holds_connection(pid: int, client: RawClient) -> bool:
    """Whether process ``pid`` still has a descriptor for the server end of ``client``'s
    connection (Linux: the socket's inode in ``/proc/net/tcp`` among its descriptors)."""
    port = client.writer.get_extra_info("sockname")[1]
    inodes = set()
    with open("/proc/net/tcp") as table:
        for row in table.read().splitlines()[1:]:
            fields = row.split()
            if int(fields[2].split(":")[1], 16) == port and fields[9] != "0":
                inodes.add(f"socket:[{fields[9]}]")
    links = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            links.add(os.readlink(f"/proc/{pid}/fd/{fd}"))
    return bool(inodes & links)


async def poll(condition: Any, within: float) -> bool:
    """Whether ``condition()`` holds within ``within`` seconds (an outside process's state
    has no event to wait for)."""
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.2)
    return True


def log_lines(server: Server, msg: str) -> list[dict[str, Any]]:
    lines = []
    for line in server.log.read_text().splitlines():
        if line.startswith("{") and json.loads(line).get("msg") == msg:
            lines.append(json.loads(line))
    return lines


# -- 1. a half-open old socket ------------------------------------------------------------


async def test_a_resume_takes_the_session_over_from_a_half_open_socket(
    server: Server, endpoint: EndpointThread, connect: Any
) -> None:
    endpoint.answer(plan("First answer."), plan("Second answer."))
    old = await RawClient.open(server.ws)
    await old.send(inline(endpoint))
    ready = await old.next("session.ready")
    await old.send({"type": "conversation.message", "role": "user", "content": "One."})
    await old.send({"type": "reply.create"})
    assert (await old.next("transcript.agent"))["text"] == "First answer."
    await old.next("reply.done")
    # The phone changes networks: the old socket neither reads nor answers pings from now on.

    # Another credential is refused, and takes nothing over.
    intruder = await connect(server.ws, OTHER_KEY)
    await intruder.send({"type": "session.resume", "session_id": ready["session_id"]})
    events, code = await intruder.closed()
    assert [getattr(e, "code", None) for e in events] == ["session_forbidden"] and code == 1008

    new = await connect(server.ws)
    await new.send({"type": "session.resume", "session_id": ready["session_id"]})
    resumed = await new.next("session.ready", "session.error")
    assert isinstance(resumed, ev.SessionReady), resumed
    assert resumed.session_id == ready["session_id"]
    await new.send({"type": "conversation.message", "role": "user", "content": "Two."})
    await new.send({"type": "reply.create"})
    events = await new.until("reply.done")
    assert [e.text for e in events if isinstance(e, ev.TranscriptAgent)] == ["Second answer."]
    messages = endpoint.chats()[-1].body["messages"]  # type: ignore[index]
    assert [m.get("content") for m in messages[1:]] == ["One.", "First answer.", "Two."]

    # The old socket was closed for it: reading again, it finds the close frame.
    await old.read_to_end()
    assert old.close is not None
    assert (old.close.code, old.close.reason) == (1008, "session resumed on another connection")
    over = [line for line in log_lines(server, "session over")
            if line["session_id"] == ready["session_id"]]  # fmt: skip
    assert over[0]["reason"] == "taken over" and over[0]["agent_id"] == "inline"
    await new.send({"type": "session.end"})
    await new.closed()
    await old.aclose()


# -- 3. a client that stops reading ----------------------------------------------------------


async def test_a_client_that_stops_reading_is_dropped_when_its_queue_is_full(
    server: Server, endpoint: EndpointThread, connect: Any
) -> None:
    """The queue bound (16 events here) drops the client, not the keepalive."""
    endpoint.answer(plan(LONG_REPLY))
    client = await RawClient.open(server.ws, rcvbuf=4096)
    assert holds_connection(server.proc.pid, client)
    await client.send(inline(endpoint, greeting=LONG_REPLY))
    ready = await client.next("session.ready")
    # It stops reading: the greeting's audio fills the socket, then the queue.
    assert await poll(lambda: any(
        line.get("session_id") == ready["session_id"]
        for line in log_lines(server, "client dropped: not reading")), within=60)  # fmt: skip
    (dropped,) = [line for line in log_lines(server, "client dropped: not reading")
                  if line["session_id"] == ready["session_id"]]  # fmt: skip
    assert (dropped["reason"], dropped["queued"]) == ("queue full", 16)
    assert dropped["buffered"] > 0  # the transport held what the client did not take
    # The close cannot leave behind the unread audio: the transport is aborted, and the
    # server's descriptor is released while the client still holds its end open.
    assert await poll(lambda: not holds_connection(server.proc.pid, client), within=30)
    (aborted,) = [line for line in log_lines(server, "connection aborted: the close did not complete")
                  if line["session_id"] == ready["session_id"]]  # fmt: skip
    assert aborted["agent_id"] == "inline"
    await client.read_to_end()
    await client.aclose()
    assert client.close is None or client.close.code == 1008
    # The session stays resumable.
    again = await connect(server.ws)
    await again.send({"type": "session.resume", "session_id": ready["session_id"]})
    assert isinstance(await again.next("session.ready"), ev.SessionReady)
    await again.send({"type": "session.end"})
    await again.closed()


async def test_a_stalled_client_is_dropped_within_the_bound_and_its_descriptor_released(
    endpoint: EndpointThread, tmp_path: Path
) -> None:
    """The stall rule: nothing left the socket for 2 s while events waited (the queue is
    large); the close cannot leave, so the transport is aborted."""
    srv = start_server(tmp_path / "stall", {
        "VOXLOOP_ALLOW_PRIVATE_ENDPOINTS": "127.0.0.1", "VOXLOOP_CLIENT_STALL_SECONDS": "2",
        "VOXLOOP_OUTBOUND_MESSAGES": "100000",
    })  # fmt: skip
    try:
        endpoint.answer(plan(LONG_REPLY))
        client = await RawClient.open(srv.ws, rcvbuf=4096)
        assert holds_connection(srv.proc.pid, client)
        await client.send(inline(endpoint, greeting=LONG_REPLY + " " + LONG_REPLY))
        ready = await client.next("session.ready")
        assert await poll(lambda: not holds_connection(srv.proc.pid, client), within=60)
        (dropped,) = log_lines(srv, "client dropped: not reading")
        assert (dropped["session_id"], dropped["reason"]) == (ready["session_id"], "stalled")
        assert dropped["buffered"] > 0
        assert [line["session_id"] for line in
                log_lines(srv, "connection aborted: the close did not complete")] == [
            ready["session_id"]]  # fmt: skip
        await client.read_to_end()
        await client.aclose()
        assert client.close is None or client.close.code == 1008
    finally:
        stop_server(srv)


# -- 4. slots -------------------------------------------------------------------------------


async def test_silent_sockets_take_no_slot_and_have_their_own_bound(
    endpoint: EndpointThread, connect: Any, tmp_path: Path
) -> None:
    srv = start_server(tmp_path / "slots", {
        "VOXLOOP_ALLOW_PRIVATE_ENDPOINTS": "127.0.0.1", "VOXLOOP_MAX_SESSIONS": "1",
        "VOXLOOP_UNBOUND_PER_CREDENTIAL": "3",
    })  # fmt: skip
    try:
        silent = [await connect(srv.ws) for _ in range(3)]
        # A fourth unbound socket of the same key is over its bound...
        fourth = await connect(srv.ws)
        events, code = await fourth.closed()
        assert [getattr(e, "code", None) for e in events] == ["at_capacity"] and code == 1008
        # ...but the one slot is still free for a session.
        endpoint.answer(plan("Here."))
        real = await connect(srv.ws, OTHER_KEY)
        await real.send(inline(endpoint))
        assert isinstance(await real.next("session.ready"), ev.SessionReady)
        # Now it is taken: a bind gets at_capacity.
        await silent[0].send(inline(endpoint))
        events, code = await silent[0].closed()
        assert [getattr(e, "code", None) for e in events] == ["at_capacity"] and code == 1008
        await real.send({"type": "reply.create"})
        turn = await real.until("reply.done")
        assert [e.text for e in turn if isinstance(e, ev.TranscriptAgent)] == ["Here."]
        await real.send({"type": "session.end"})
        await real.closed()
    finally:
        stop_server(srv)


# -- 2. odd characters ----------------------------------------------------------------------


async def test_an_endpoint_streaming_nul_and_lone_surrogates_is_spoken_safely(
    server: Server, endpoint: EndpointThread, connect: Any
) -> None:
    endpoint.answer(plan("Hello\x00 there\ud800, my\udfff friend\x07."), plan("\x00\udc00"),
                    plan("Still here."))  # fmt: skip
    client = await connect(server.ws)
    await client.send(inline(endpoint))
    await client.next("session.ready")
    await client.send({"type": "reply.create"})
    events = await client.until("reply.done")
    agent = next(e for e in events if isinstance(e, ev.TranscriptAgent))
    assert agent.text == "Hello there, my friend."
    assert sum(len(e.data) for e in events if isinstance(e, ev.ReplyAudio)) > 24000
    assert isinstance(events[-1], ev.ReplyDone) and events[-1].status == "completed"
    # A reply of nothing but such characters says nothing, and the session goes on.
    await client.send({"type": "reply.create"})
    events = await client.until("reply.done")
    assert not [e for e in events if isinstance(e, ev.ReplyAudio | ev.SessionError)]
    await client.send({"type": "reply.create"})
    events = await client.until("reply.done")
    assert [e.text for e in events if isinstance(e, ev.TranscriptAgent)] == ["Still here."]


async def test_odd_characters_from_the_client_are_typed_errors_naming_the_field(
    server: Server, endpoint: EndpointThread, connect: Any
) -> None:
    client = await connect(server.ws)
    # Before the bind: a NUL in the greeting is refused, and the client may try again.
    await client.send(inline(endpoint, greeting="Hi\x00"))
    error = await client.next("session.error")
    assert isinstance(error, ev.SessionError)
    assert (error.code, error.param) == ("invalid_value", "session.greeting")
    nan_tool = ('{"type":"session.update","session":{"tools":[{"name":"t","parameters":'
                '{"type":"object","properties":{"x":{"type":"number","maximum":NaN}}}}]}}')  # fmt: skip
    await client.send(nan_tool)
    error = await client.next("session.error")
    assert isinstance(error, ev.SessionError)
    assert (error.code, error.param) == (
        "invalid_value",
        "session.tools[0].parameters.properties.x.maximum",
    )
    # The local-use NAT64 prefix is refused by the URL policy here as on the REST API.
    await client.send({"type": "session.update", "session": {"llm": [
        {"base_url": "https://[64:ff9b:1::a00:1]/v1", "model": "m", "api_key": "k"}]}})  # fmt: skip
    error = await client.next("session.error")
    assert isinstance(error, ev.SessionError)
    assert (error.code, error.param) == ("invalid_config", "llm[0].base_url")
    assert "local-use NAT64" in error.message
    await client.send(inline(endpoint, greeting="Hi\u202e there \U0001f469\u200d\U0001f52c."))
    ready = await client.next("session.ready")
    assert isinstance(ready, ev.SessionReady) and ready.config is not None
    await client.until("reply.done")  # the greeting was spoken
    for raw, param in (
        ('{"type":"session.update","session":{"system_prompt":"a\\ud800b"}}',
         "session.system_prompt"),
        ('{"type":"conversation.message","role":"user","content":"\\udc00"}', "content"),
        ('{"type":"reply.create","instructions":"x\\u0000"}', "instructions"),
        ('{"type":"tool.result","call_id":"c","result":{"v":"\\ud83d"}}', "result.v"),
        ('{"type":"tool.result","call_id":"c","result":{"v":Infinity}}', "result.v"),
    ):  # fmt: skip
        await client.send(raw)
        error = await client.next("session.error")
        assert isinstance(error, ev.SessionError)
        assert (error.code, error.param) == ("invalid_value", param), raw
    endpoint.answer(plan("Fine."))
    await client.send({"type": "reply.create"})
    events = await client.until("reply.done")
    assert [e.text for e in events if isinstance(e, ev.TranscriptAgent)] == ["Fine."]


# -- the fuzz test ----------------------------------------------------------------------------

ODD_TEXT = st.lists(st.one_of(
    st.sampled_from(["\x00", "\x01", "\x7f", "\x9f", "\ufffe", "\ufeff", "\u202e", "\u200d",
                     "\u2028", "e\u0301", "\U0001f469\u200d\U0001f52c", "\ue000", "\\", '"']),
    st.text(max_size=3),
), max_size=6).map("".join)  # fmt: skip
JUNK = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70),
                 st.floats(allow_nan=False, allow_infinity=False), ODD_TEXT,
                 st.lists(st.integers(), max_size=2), st.dictionaries(ODD_TEXT, st.integers(), max_size=2))  # fmt: skip


def _session_fields() -> st.SearchStrategy[dict[str, Any]]:
    tool = st.fixed_dictionaries({"name": st.one_of(st.just("lookup"), ODD_TEXT)}, optional={
        "description": st.one_of(ODD_TEXT, JUNK),
        "parameters": st.one_of(JUNK, st.just({"type": "object", "properties": {
            "x": {"type": "number", "maximum": 1e308}}})),
        "timeout_seconds": JUNK, "execution_mode": st.one_of(st.just("hold"), JUNK),
        "http": st.one_of(JUNK, st.just({"url": "http://127.0.0.1:9/x"})),
    })  # fmt: skip
    return st.fixed_dictionaries({}, optional={
        "system_prompt": st.one_of(ODD_TEXT, JUNK), "greeting": st.one_of(ODD_TEXT, JUNK),
        "tools": st.one_of(JUNK, st.lists(tool, max_size=2)),
        "input": st.one_of(JUNK, st.fixed_dictionaries({}, optional={
            "format": st.one_of(JUNK, st.just({"encoding": "audio/pcmu", "sample_rate": 24000})),
            "keyterms": st.one_of(JUNK, st.lists(ODD_TEXT, max_size=3)),
            "turn_detection": st.one_of(JUNK, st.fixed_dictionaries({}, optional={
                "min_silence": JUNK, "max_silence": JUNK, "vad_threshold": JUNK}))})),
        "output": st.one_of(JUNK, st.fixed_dictionaries({}, optional={
            "volume": JUNK, "voice": st.one_of(ODD_TEXT, JUNK),
            "format": st.one_of(JUNK, st.just({"encoding": "audio/pcma"}))})),
        "llm": st.one_of(JUNK, st.just([{"base_url": "http://10.0.0.1/v1", "model": "m"}])),
        "agent_id": st.one_of(ODD_TEXT, JUNK),
    })  # fmt: skip


def client_events() -> st.SearchStrategy[str]:
    """Every client event type (but ``session.end``), well formed or not, as wire text."""
    docs = st.one_of(
        st.builds(lambda s: {"type": "session.update", "session": s},
                  st.one_of(_session_fields(), JUNK)),
        st.builds(lambda a: {"type": "input.audio", "audio": a},
                  st.one_of(st.binary(max_size=64).map(lambda b: base64.b64encode(b).decode()),
                            ODD_TEXT, JUNK)),
        st.builds(lambda c, r, e: {"type": "tool.result", "call_id": c, "result": r, "is_error": e},
                  st.one_of(ODD_TEXT, JUNK), st.one_of(ODD_TEXT, JUNK), JUNK),
        st.builds(lambda i: {"type": "reply.create", "instructions": i}, st.one_of(ODD_TEXT, JUNK)),
        st.builds(lambda r, c: {"type": "conversation.message", "role": r, "content": c},
                  st.one_of(st.sampled_from(["user", "system"]), JUNK), st.one_of(ODD_TEXT, JUNK)),
        st.builds(lambda r: {"type": "reply.cancel", "reply_id": r}, st.one_of(ODD_TEXT, JUNK)),
        st.builds(lambda s: {"type": "session.resume", "session_id": s}, st.one_of(ODD_TEXT, JUNK)),
        st.builds(lambda t: {"type": t}, st.one_of(ODD_TEXT, JUNK)),
    )  # fmt: skip
    raw = st.sampled_from(['{"type":"tool.result","call_id":"c","result":NaN}',
                           '{"type":"reply.create","instructions":"\\ud800"}', "[]", "{",
                           '{"type":"session.update","session":{"greeting":"\\u0000"}}'])  # fmt: skip
    return st.one_of(docs.map(json.dumps), raw)


def test_fuzzed_client_events_get_typed_errors_and_the_session_still_answers_speech(
    server: Server, endpoint: EndpointThread
) -> None:
    endpoint.answer(default="Okay.")
    headers = {"Authorization": f"Bearer {API_KEY}"}
    received: list[ev.ServerEvent | ev.UnknownServerEvent] = []
    turn_done = threading.Event()
    with websockets.sync.client.connect(server.ws, additional_headers=headers,
                                        max_size=None) as ws:  # fmt: skip
        ws.send(json.dumps(inline(endpoint)))
        while not isinstance(ready := ev.decode_server_event(ws.recv(timeout=60)), ev.SessionReady):
            pass

        def read() -> None:
            heard = False
            try:
                for message in ws:
                    event = ev.decode_server_event(message)
                    received.append(event)
                    heard = heard or isinstance(event, ev.TranscriptUser)
                    if heard and isinstance(event, ev.TranscriptAgent):
                        turn_done.set()
            except websockets.ConnectionClosed:
                pass
            turn_done.set()

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        sent = 0

        @settings(max_examples=400, derandomize=True, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))  # fmt: skip
        @given(client_events())
        def one(text: str) -> None:
            nonlocal sent
            ws.send(text)
            sent += 1

        one()
        # Put back what the turn needs (the fuzz may have changed the input format).
        ws.send(json.dumps({"type": "session.update", "session": {
            "system_prompt": "Be brief.", "tools": [],
            "input": {"format": {"encoding": "audio/pcm"}, "keyterms": [],
                      "turn_detection": {"min_silence": 500, "max_silence": 2000}}}}))  # fmt: skip
        ws.send(json.dumps({"type": "reply.cancel"}))
        audio = speech("shared-00-piper", 24000) + silence(2.5, 24000)
        step = 4800
        t0 = time.monotonic()
        for i in range(0, len(audio), step):
            ws.send(json.dumps({"type": "input.audio",
                                "audio": base64.b64encode(audio[i : i + step]).decode()}))  # fmt: skip
            delay = t0 + (i + step) / 48000 - time.monotonic()
            if delay > 0:
                time.sleep(delay)  # real-time pacing of the microphone
        assert turn_done.wait(timeout=60)
        assert ws.close_code is None, ws.close_reason
        ws.send(json.dumps({"type": "session.end"}))
        reader.join(timeout=60)
    assert sent >= 400
    errors = [e for e in received if isinstance(e, ev.SessionError)]
    assert {e.code for e in errors} <= TYPED
    assert {"invalid_format", "invalid_value"} <= {e.code for e in errors}
    users = [e for e in received if isinstance(e, ev.TranscriptUser)]
    assert spoken(users[-1].text) == spoken("What's the weather like in Paris today?")
    answer = received[received.index(users[-1]) :]
    assert [e.text for e in answer if isinstance(e, ev.TranscriptAgent)][:1] == ["Okay."]
    request = endpoint.chats()[-1].body
    assert request is not None and spoken(request["messages"][-1]["content"]) == spoken(
        users[-1].text
    )
    assert isinstance(received[-1], ev.SessionEnded), received[-3:]
    assert ready.session_id.startswith("sess_")
    assert server.proc.poll() is None


# -- 7. what an endpoint can leak ---------------------------------------------------------------


async def test_a_stored_agents_endpoint_errors_reach_its_client_as_a_code_only(
    server: Server, endpoint: EndpointThread, connect: Any
) -> None:
    async with httpx.AsyncClient(base_url=server.http, headers={"Authorization": API_KEY}) as c:
        created = await c.post("/v1/agents", json={
            "name": "Leaky", "system_prompt": "x", "voice": "ivy",
            "llm": [{"base_url": endpoint.base_url, "model": "m", "api_key": LLM_KEY}]})  # fmt: skip
    assert created.status_code == 201, created.text
    agent_id = created.json()["id"]
    # The endpoint answers 401 with a body that repeats the key it was given.
    endpoint.answer(ReplyPlan(fault="status", status=401), plan("Back."))
    client = await connect(server.ws)
    await client.send({"type": "session.update", "session": {"agent_id": agent_id}})
    await client.next("session.ready")
    await client.send({"type": "reply.create"})
    error = await client.next("reply.error")
    assert isinstance(error, ev.ReplyError)
    assert (error.code, error.message, error.status_code) == (
        "auth", "the agent's endpoint refused its credentials", 401)  # fmt: skip
    await client.until("reply.done")
    await client.send({"type": "reply.create"})
    events = await client.until("reply.done")
    assert [e.text for e in events if isinstance(e, ev.TranscriptAgent)] == ["Back."]
    (line,) = [d for d in log_lines(server, "endpoint error") if d["agent_id"] == agent_id]
    assert (line["code"], line["status"]) == ("auth", 401)
    assert line["error"] == (
        "endpoint refused the credentials (HTTP 401): simulated 401 for the key ********"
    )
    assert LLM_KEY not in server.log.read_text()
