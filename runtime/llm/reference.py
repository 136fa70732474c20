"""A reference OpenAI-compatible streaming endpoint (loopback HTTP/1.1, optional TLS).

Theory of operation
-------------------
A small asyncio server built on h11 (sans-I/O HTTP/1.1) that answers
``POST …/chat/completions`` with a real ``text/event-stream`` exactly as
OpenAI-compatible servers do: an optional role-only first chunk, content
deltas one token per chunk after a configurable time to first token and
inter-token gap, a finish chunk, an optional usage chunk (``choices: []`` or
non-empty ``choices``, as different servers send it) and ``data: [DONE]``.
``GET …/models`` lists the model (used for connection prewarming).

A :class:`ReplyPlan` says how to answer, including faults: an HTTP status
(4xx/5xx/429 with ``Retry-After``), a redirect, hanging before or after the
headers, dropping the connection mid-stream, a malformed line, reasoning
first (``reasoning_content`` or ``<think>`` tags), a tool call whose id, name
and argument fragments arrive in separate deltas, or rejecting
``stream_options``. Plans can be queued for the next requests; otherwise the
default plan answers.

A plan can also serve a recorded body verbatim (``body``, cut into pieces of
``chunk_size`` bytes, each written and flushed on its own), compress what it
sends (``content_encoding``: gzip, deflate or br, flushed after every piece as
a compressing proxy does, error bodies included) and keep the connection open
after the body instead of ending the response (``hold_open``).

Like a careless real server, every error answer quotes the credentials it
was given: the presented ``Authorization`` value appears in the error message
and in an ``x-presented-authorization`` header, so a client that does not
redact what it quotes leaks the key in its errors.

Capacity model: with ``capacity=N`` the server decodes at most N streams at
once, as a real inference server has a fixed number of slots (llama.cpp's
``--parallel``, a batch size): a request that finds every slot busy waits in
a first-come-first-served queue before its time to first token starts, so
TTFT grows with the load once it exceeds the capacity (an M/D/N queue under
Poisson arrivals). Each record keeps when it was admitted to a slot and when it gave the slot back.

While a response streams, the server watches the socket, so a client
disconnect is seen at once and recorded (tests assert on it). Every request
is recorded with the server's own timestamps (``time.perf_counter_ns``), so
a client's TTFT can be checked against the server's.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import math
import re
import ssl
import time
import zlib
from collections import deque
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Final, Literal, Self

import h11

from runtime.llm.client import WARM_UP_PROMPT

FaultKind = Literal[
    "none", "status", "redirect", "hang_headers", "hang", "drop", "malformed", "empty"
]
ContentEncoding = Literal["identity", "gzip", "deflate", "br"]
UsageMode = Literal["none", "empty_choices", "with_choices"]

_MAX_BODY: Final = 4 * 1024 * 1024
_TOKEN = re.compile(r"\s*\S+")
DEFAULT_REPLY: Final = (
    "Sure, I can help with that. Your order shipped this morning and should arrive "
    "on Thursday. Is there anything else I can do for you?"
)


@dataclass(frozen=True, slots=True, kw_only=True)
class ReplyPlan:
    """How the reference endpoint answers one request.

    Attributes:
        replies: reply texts, used in turn by successive requests.
        warm_up_reply: the text that answers a warm-up request (the system
            prompt and ``WARM_UP_PROMPT``, as ``ChatClient.warm_up`` sends),
            without taking a turn from ``replies`` or a queued plan (``None``:
            a warm-up is answered like any request).
        ttft_ms: delay from the request to the first content token.
        itl_ms: delay between tokens.
        role_chunk: send a role-only chunk at once (before the TTFT delay).
        usage: how to send usage when the request asks for it.
        finish_chunk: send a chunk with ``finish_reason`` (llama-cpp-python omits it).
        done: send ``data: [DONE]``.
        fault: a failure to produce (see the module docstring).
        status: the HTTP status for ``fault="status"``.
        retry_after: ``Retry-After`` header value for status faults.
        fault_after: tokens sent before ``drop``/``malformed``/``hang``.
        reasoning: reasoning text streamed before the answer.
        think_tags: stream the reasoning inside ``<think>`` in ``content``
            instead of ``reasoning_content``.
        tool_name: answer with a call to this tool (when the request has tools
            and its last message is not a tool result).
        tool_arguments: the call's JSON arguments (``None`` sends ``null``).
        tool_after_text: with ``tool_name``, stream the reply text first and then
            the call (a model that says goodbye and hangs up in one round).
        reject_stream_options: answer 400 when ``stream_options`` is sent.
        body: serve these bytes as the whole response body instead of a reply.
        content_type: the response's content type with ``body``.
        chunk_size: write ``body`` in pieces of this many bytes (``None``: at once).
        content_encoding: compress every body this plan sends (SSE and errors).
        hold_open: after the body, keep the connection open and never end the response.
        declared_encoding: a ``Content-Encoding`` header sent with ``body`` as is
            (a proxy that relabels bodies, or an encoding the client never offered).
    """

    replies: tuple[str, ...] = (DEFAULT_REPLY,)
    warm_up_reply: str | None = "Hello!"
    ttft_ms: float = 0.0
    itl_ms: float = 0.0
    role_chunk: bool = True
    usage: UsageMode = "empty_choices"
    finish_chunk: bool = True
    done: bool = True
    fault: FaultKind = "none"
    status: int = 500
    retry_after: str | None = None
    fault_after: int = 3
    reasoning: str = ""
    think_tags: bool = False
    tool_name: str | None = None
    tool_after_text: bool = False
    tool_arguments: str | None = '{"city": "Paris"}'
    reject_stream_options: bool = False
    body: bytes | None = None
    content_type: str = "text/event-stream; charset=utf-8"
    chunk_size: int | None = None
    content_encoding: ContentEncoding = "identity"
    hold_open: bool = False
    declared_encoding: str | None = None

    def __post_init__(self) -> None:
        if self.chunk_size is not None and self.chunk_size < 1:
            raise ValueError("chunk_size must be positive")
        if not all(0 <= ms < math.inf for ms in (self.ttft_ms, self.itl_ms)):
            raise ValueError("delays must be finite and not negative (milliseconds)")
        if not self.replies:
            raise ValueError("at least one reply is required")


@dataclass(slots=True)
class RequestRecord:
    """What the server saw and did for one request (server clock, ns)."""

    connection: int
    method: str
    path: str
    headers: dict[str, str]
    body: dict[str, Any] | None
    received_ns: int
    first_token_ns: int | None = None
    ended_ns: int | None = None
    disconnected_ns: int | None = None
    status: int = 0
    tokens_sent: int = 0
    admitted_ns: int | None = None
    released_ns: int | None = None
    finished: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def queued_ms(self) -> float | None:
        """Time spent waiting for a free slot (capacity model), ms."""
        if self.admitted_ns is None:
            return None
        return (self.admitted_ns - self.received_ns) / 1e6

    @property
    def ttft_ms(self) -> float | None:
        """The server's own time from the request to the first token leaving it."""
        if self.first_token_ns is None:
            return None
        return (self.first_token_ns - self.received_ns) / 1e6


BASE_PATH: Final = "/v1"
CHAT_PATH: Final = f"{BASE_PATH}/chat/completions"
MODELS_PATH: Final = f"{BASE_PATH}/models"


class _Disconnected(Exception):
    pass


class ReferenceEndpoint:
    """The server. Use as ``async with ReferenceEndpoint(plan) as server: …``.

    Args:
        plan: the default reply plan.
        host: where to listen (loopback by default).
        port: 0 picks a free port.
        api_key: when set, requests must carry ``Authorization: Bearer <api_key>``.
        ssl_context: serve HTTPS with this context.
        model: the model id reported in chunks and ``/models``.
        capacity: streams decoded at once (``None``: unlimited); more wait in a FIFO queue.
        access_log: called with one line per request when it is answered
            (``POST /v1/chat/completions 200 412 ms``), e.g. ``print``.

    Routes: exactly ``POST /v1/chat/completions`` and ``GET /v1/models`` (the
    base URL is :attr:`base_url`); any other path is a 404 that names both, so a
    base URL with a missing or doubled ``/v1`` fails here as on a real server.
    """

    def __init__(
        self,
        plan: ReplyPlan | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        api_key: str | None = None,
        ssl_context: ssl.SSLContext | None = None,
        model: str = "voxloop-reference",
        capacity: int | None = None,
        access_log: Callable[[str], None] | None = None,
    ) -> None:
        if capacity is not None and capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.capacity = capacity
        self._slots = _Slots(capacity)
        self.plan = plan or ReplyPlan()
        self._access_log = access_log
        self._host = host
        self._port = port
        self._api_key = api_key
        self._ssl = ssl_context
        self.model = model
        self._server: asyncio.Server | None = None
        self._queued: deque[ReplyPlan] = deque()
        self._conn_ids = itertools.count(1)
        self._reply_index = 0
        self._handlers: set[asyncio.Task[None]] = set()
        self.requests: list[RequestRecord] = []
        self.connections = 0
        self.request_arrived = asyncio.Event()

    # -- lifecycle ------------------------------------------------------------

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._on_connection, self._host, self._port, ssl=self._ssl
        )

    async def aclose(self) -> None:
        if self._server is None:
            return
        self._server.close()
        for task in list(self._handlers):
            task.cancel()
        if self._handlers:
            await asyncio.gather(*self._handlers, return_exceptions=True)
        await self._server.wait_closed()
        self._server = None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def serve_forever(self) -> None:
        assert self._server is not None
        await self._server.serve_forever()

    @property
    def port(self) -> int:
        assert self._server is not None, "server not started"
        return int(self._server.sockets[0].getsockname()[1])

    @property
    def base_url(self) -> str:
        scheme = "https" if self._ssl else "http"
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"{scheme}://{host}:{self.port}/v1"

    def queue(self, *plans: ReplyPlan) -> None:
        """Answer the next requests with these plans, in order."""
        self._queued.extend(plans)

    # -- connection handling ----------------------------------------------------

    async def _on_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        self.connections += 1
        conn_id = next(self._conn_ids)
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=64 * 1024)
        try:
            while True:
                request = await self._read_request(conn, reader, conn_id)
                if request is None:
                    break
                await self._respond(conn, reader, writer, request)
                if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                    break
                conn.start_next_cycle()
        except (ConnectionError, h11.ProtocolError, _Disconnected, ssl.SSLError):
            pass
        except asyncio.CancelledError:
            # The server is shutting down: do not wait for a TLS close_notify
            # from a client that keeps the connection in its pool.
            writer.transport.abort()
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError, ssl.SSLError, asyncio.CancelledError):
                await writer.wait_closed()
            self._handlers.discard(task)

    async def _read_request(
        self, conn: h11.Connection, reader: asyncio.StreamReader, conn_id: int
    ) -> RequestRecord | None:
        head: h11.Request | None = None
        body = bytearray()
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = await reader.read(65536)
                conn.receive_data(data)
                continue
            if isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
                return None
            if isinstance(event, h11.Request):
                head = event
            elif isinstance(event, h11.Data):
                body += event.data
                if len(body) > _MAX_BODY:
                    raise _Disconnected
            elif isinstance(event, h11.EndOfMessage):
                break
        assert head is not None
        headers = {k.decode().lower(): v.decode("latin-1") for k, v in head.headers}
        parsed: dict[str, Any] | None
        try:
            doc = json.loads(body) if body else None
            parsed = doc if isinstance(doc, dict) else None
        except ValueError:
            parsed = None
        record = RequestRecord(
            connection=conn_id,
            method=head.method.decode(),
            path=head.target.decode(),
            headers=headers,
            body=parsed,
            received_ns=time.perf_counter_ns(),
        )
        self.requests.append(record)
        self.request_arrived.set()
        return record

    async def _respond(
        self,
        conn: h11.Connection,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        record: RequestRecord,
    ) -> None:
        try:
            path = record.path.split("?", 1)[0].rstrip("/")
            if self._api_key is not None and record.headers.get("authorization") != (
                f"Bearer {self._api_key}"
            ):
                await self._json(
                    conn, writer, record, 401,
                    _error(f"Incorrect API key provided: {_presented(record)}", "invalid_api_key"),
                )  # fmt: skip
                return
            if record.method == "GET" and path == MODELS_PATH:
                doc = {"object": "list", "data": [{"id": self.model, "object": "model"}]}
                await self._json(conn, writer, record, 200, doc)
                return
            if record.method != "POST" or path != CHAT_PATH:
                message = (
                    f"no route {record.method} {path or '/'}: this endpoint serves POST "
                    f"{CHAT_PATH} and GET {MODELS_PATH} (base URL {self.base_url})"
                )
                await self._json(conn, writer, record, 404, _error(message, "not_found"))
                return
            body = record.body
            if body is None or not isinstance(body.get("messages"), list):
                await self._json(
                    conn, writer, record, 400, _error("'messages' is required", "invalid_request")
                )
                return
            if self.plan.warm_up_reply is not None and _is_warm_up(body["messages"]):
                plan = self.plan  # a warm-up takes no queued plan
            else:
                plan = self._queued.popleft() if self._queued else self.plan
            await self._chat(conn, reader, writer, record, plan, body)
        finally:
            record.ended_ns = time.perf_counter_ns()
            record.finished.set()
            if self._access_log is not None:
                ms = (record.ended_ns - record.received_ns) / 1e6
                path = record.path.split("?", 1)[0]
                self._access_log(f"{record.method} {path} {record.status or '-'} {ms:.0f} ms")

    async def _json(
        self,
        conn: h11.Connection,
        writer: asyncio.StreamWriter,
        record: RequestRecord,
        status: int,
        doc: object,
        extra: list[tuple[str, str]] | None = None,
        encoding: ContentEncoding = "identity",
    ) -> None:
        payload = json.dumps(doc).encode()
        headers = [("content-type", "application/json")]
        if encoding != "identity":
            encoder = _Encoder(encoding)
            payload = encoder.encode(payload) + encoder.finish()
            headers.append(("content-encoding", encoding))
        if status >= 400 and "authorization" in record.headers:
            headers.append(("x-presented-authorization", record.headers["authorization"]))
        headers += [("content-length", str(len(payload))), *(extra or [])]
        record.status = status
        await _write(writer, conn.send(h11.Response(status_code=status, headers=headers)))
        await _write(writer, conn.send(h11.Data(data=payload)))
        await _write(writer, conn.send(h11.EndOfMessage()))

    async def _chat(
        self,
        conn: h11.Connection,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        record: RequestRecord,
        plan: ReplyPlan,
        body: dict[str, Any],
    ) -> None:
        if plan.reject_stream_options and "stream_options" in body:
            await self._json(
                conn, writer, record, 400,
                _error("Unrecognized request argument supplied: stream_options", "invalid_request"),
                encoding=plan.content_encoding,
            )  # fmt: skip
            return
        if plan.fault == "status":
            extra = [("retry-after", plan.retry_after)] if plan.retry_after else []
            await self._json(
                conn,
                writer,
                record,
                plan.status,
                _error(f"simulated {plan.status} for the key {_presented(record)}", "simulated"),
                extra,
                encoding=plan.content_encoding,
            )
            return
        if plan.fault == "redirect":
            record.status = 307
            await _write(
                writer,
                conn.send(
                    h11.Response(
                        status_code=307,
                        headers=[("location", "http://169.254.169.254/"), ("content-length", "0")],
                    )
                ),
            )
            await _write(writer, conn.send(h11.EndOfMessage()))
            return

        watcher = asyncio.ensure_future(_watch_eof(reader))
        try:
            streaming = asyncio.ensure_future(
                self._slots.run(record, self._stream(conn, writer, record, plan, body))
            )
            done, _ = await asyncio.wait({watcher, streaming}, return_when=asyncio.FIRST_COMPLETED)
            if watcher in done:
                record.disconnected_ns = time.perf_counter_ns()
                streaming.cancel()
                with contextlib.suppress(asyncio.CancelledError, ConnectionError, _Disconnected):
                    await streaming
                raise _Disconnected
            streaming.result()
        finally:
            for task in (watcher,):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, ConnectionError):
                    await task

    async def _stream(
        self,
        conn: h11.Connection,
        writer: asyncio.StreamWriter,
        record: RequestRecord,
        plan: ReplyPlan,
        body: dict[str, Any],
    ) -> None:
        if plan.fault == "hang_headers":
            await asyncio.Event().wait()
        record.status = 200
        if body.get("stream") is not True:
            await self._json(conn, writer, record, 200, self._completion(plan, body))
            return
        headers = [
            ("content-type", plan.content_type if plan.body is not None else _SSE_TYPE),
            ("cache-control", "no-cache"),
        ]
        encoder: _Encoder | None = None
        if plan.content_encoding != "identity":
            encoder = _Encoder(plan.content_encoding)
            headers.append(("content-encoding", plan.content_encoding))
        elif plan.declared_encoding is not None:
            headers.append(("content-encoding", plan.declared_encoding))
        await _write(writer, conn.send(h11.Response(status_code=200, headers=headers)))

        async def send(data: bytes) -> None:
            if encoder is not None:
                data = encoder.encode(data)
            await _write(writer, conn.send(h11.Data(data=data)))

        async def end() -> None:
            if encoder is not None:
                await _write(writer, conn.send(h11.Data(data=encoder.finish())))
            if plan.hold_open:
                # As a server whose worker keeps the response open after the
                # last event: the client must not wait for the end.
                await asyncio.Event().wait()
            await _write(writer, conn.send(h11.EndOfMessage()))

        if plan.body is not None:
            step = plan.chunk_size or max(1, len(plan.body))
            for at in range(0, len(plan.body), step):
                await send(plan.body[at : at + step])
            await end()
            return
        rid = f"chatcmpl-ref{len(self.requests)}"
        created = int(time.time())

        def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
            doc = {
                "id": rid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": self.model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
            }
            return b"data: " + json.dumps(doc).encode() + b"\n\n"

        if plan.role_chunk:
            await send(chunk({"role": "assistant", "content": ""}))
        if plan.fault == "hang" and plan.fault_after == 0:
            await asyncio.Event().wait()
        if plan.ttft_ms:
            await asyncio.sleep(plan.ttft_ms / 1000)

        tokens: list[dict[str, Any]] = []
        if plan.reasoning:
            pieces = _TOKEN.findall(plan.reasoning)
            if plan.think_tags:
                pieces = ["<think>", *pieces, "</think>\n\n"]
                tokens += [{"content": p} for p in pieces]
            else:
                tokens += [{"reasoning_content": p} for p in pieces]
        tools = body.get("tools")
        messages = body["messages"]
        last_role = (
            messages[-1].get("role") if messages and isinstance(messages[-1], dict) else None
        )
        finish = "stop"
        if plan.tool_name and tools and last_role != "tool":
            finish = "tool_calls"
            if plan.tool_after_text:
                text = plan.replies[self._reply_index % len(plan.replies)]
                self._reply_index += 1
                tokens += [{"content": t} for t in _TOKEN.findall(text)]
            call_id = f"call_ref{len(self.requests)}"
            tokens.append(
                {
                    "tool_calls": [
                        {
                            "index": 0,
                            "id": call_id,
                            "type": "function",
                            "function": {"arguments": ""},
                        }
                    ]
                }
            )
            tokens.append({"tool_calls": [{"index": 0, "function": {"name": plan.tool_name}}]})
            args = plan.tool_arguments
            if args is None:
                tokens.append({"tool_calls": [{"index": 0, "function": {"arguments": None}}]})
            else:
                third = max(1, len(args) // 3)
                for part in (args[:third], args[third : 2 * third], args[2 * third :]):
                    if part:
                        tokens.append(
                            {"tool_calls": [{"index": 0, "function": {"arguments": part}}]}
                        )
        elif plan.fault != "empty":
            if plan.warm_up_reply is not None and _is_warm_up(messages):
                text = plan.warm_up_reply
            else:
                text = plan.replies[self._reply_index % len(plan.replies)]
                self._reply_index += 1
            tokens += [{"content": t} for t in _TOKEN.findall(text)]

        for i, delta in enumerate(tokens):
            if i == plan.fault_after:
                if plan.fault == "drop":
                    writer.transport.abort()
                    raise _Disconnected
                if plan.fault == "malformed":
                    await send(b'data: {"choices": [{"index": 0, "delta": {"content": "oops"\n\n')
                    break
                if plan.fault == "hang":
                    await asyncio.Event().wait()
            if i and plan.itl_ms:
                await asyncio.sleep(plan.itl_ms / 1000)
            await send(chunk(delta))
            record.tokens_sent += 1
            if record.first_token_ns is None:
                record.first_token_ns = time.perf_counter_ns()

        if plan.finish_chunk:
            await send(chunk({}, finish))
        options = body.get("stream_options")
        if plan.usage != "none" and isinstance(options, dict) and options.get("include_usage"):
            usage = {
                "prompt_tokens": sum(
                    len(str(m.get("content", ""))) // 4 for m in messages if isinstance(m, dict)
                ),
                "completion_tokens": len(tokens),
                "total_tokens": 0,
            }
            usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
            doc: dict[str, Any] = {
                "id": rid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": self.model,
                "choices": [],
                "usage": usage,
            }
            if plan.usage == "with_choices":
                doc["choices"] = [{"index": 0, "delta": {}, "finish_reason": None}]
            await send(b"data: " + json.dumps(doc).encode() + b"\n\n")
        if plan.done:
            await send(b"data: [DONE]\n\n")
        await end()

    def _completion(self, plan: ReplyPlan, body: dict[str, Any]) -> dict[str, Any]:
        text = plan.replies[self._reply_index % len(plan.replies)]
        self._reply_index += 1
        return {
            "id": f"chatcmpl-ref{len(self.requests)}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": "stop",
                }
            ],
        }


_SSE_TYPE: Final = "text/event-stream; charset=utf-8"


class _Slots:
    """The capacity model: at most ``capacity`` coroutines run at once, the rest queue FIFO."""

    def __init__(self, capacity: int | None) -> None:
        self._free = capacity
        self._waiting: deque[asyncio.Future[None]] = deque()

    async def run(self, record: RequestRecord, work: Coroutine[Any, Any, None]) -> None:
        if self._free is None:
            record.admitted_ns = time.perf_counter_ns()
            await work
            return
        try:
            if self._free > 0 and not self._waiting:
                self._free -= 1
            else:
                turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
                self._waiting.append(turn)
                try:
                    await turn  # the slot is handed over by the one that releases it
                except asyncio.CancelledError:
                    if turn.done() and not turn.cancelled():
                        self._release()  # handed a slot just as the client left
                    else:
                        self._waiting.remove(turn)
                    raise
        except BaseException:
            work.close()
            raise
        record.admitted_ns = time.perf_counter_ns()
        try:
            await work
        finally:
            record.released_ns = time.perf_counter_ns()
            self._release()

    def _release(self) -> None:
        assert self._free is not None
        while self._waiting:
            turn = self._waiting.popleft()
            if not turn.done():
                turn.set_result(None)  # the slot passes straight to the next in line
                return
        self._free += 1


class _Encoder:
    """Streaming Content-Encoding: every piece is flushed so it can be decoded at once."""

    def __init__(self, encoding: ContentEncoding) -> None:
        self._brotli: Any = None
        self._zlib: Any = None
        if encoding == "br":
            import brotli

            self._brotli = brotli.Compressor()
        else:
            # gzip: a gzip member (wbits 31); deflate: the zlib format RFC 9110 names.
            self._zlib = zlib.compressobj(wbits=31 if encoding == "gzip" else 15)

    def encode(self, data: bytes) -> bytes:
        if self._brotli is not None:
            return bytes(self._brotli.process(data)) + bytes(self._brotli.flush())
        return bytes(self._zlib.compress(data)) + bytes(self._zlib.flush(zlib.Z_SYNC_FLUSH))

    def finish(self) -> bytes:
        if self._brotli is not None:
            return bytes(self._brotli.finish())
        return bytes(self._zlib.flush(zlib.Z_FINISH))


def _is_warm_up(messages: list[Any]) -> bool:
    return (
        len(messages) == 2
        and isinstance(messages[1], dict)
        and messages[1].get("role") == "user"
        and messages[1].get("content") == WARM_UP_PROMPT
    )


def _presented(record: RequestRecord) -> str:
    value = record.headers.get("authorization", "")
    return value.removeprefix("Bearer ") or "(none)"


def _error(message: str, code: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": "invalid_request_error", "code": code}}


async def _write(writer: asyncio.StreamWriter, data: bytes | None) -> None:
    if data:
        writer.write(data)
        await writer.drain()


async def _watch_eof(reader: asyncio.StreamReader) -> None:
    # HTTP/1.1 clients send nothing while a response streams (no pipelining
    # from httpx), so the next read only returns when the peer goes away.
    while True:
        data = await reader.read(65536)
        if not data:
            return
