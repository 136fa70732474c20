"""What the black-box WebSocket tests share: a real ``voxloop serve`` process and a client of
the Voice Agent WebSocket that reads every frame on a task into a queue.

The client is generic in how a frame is read: the realtime tests decode frames with
voxloop's own codec (``runtime.protocol.events``), the conformance tests read them as
raw JSON, checked against the published reference only.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

import websockets

API_KEY = "vk-realtime-operator"
OTHER_KEY = "vk-second-operator"
LLM_KEY = "sk-agent-llm-5e4d3c2b1a"


# -- the server -------------------------------------------------------------------------------


@dataclass
class Server:
    http: str
    ws: str
    proc: subprocess.Popen[str]
    log: Path
    handle: Any = None
    data_dir: Path | None = None


def start_server(data_dir: Path, env: dict[str, str]) -> Server:
    """``voxloop -v serve`` on a free port with the keys ``API_KEY`` and ``OTHER_KEY``; its
    log goes to ``<data_dir>-server.log`` next to ``data_dir``."""
    log = data_dir.parent / f"{data_dir.name}-server.log"
    handle = log.open("a")
    proc = subprocess.Popen(
        [sys.executable, "-m", "runtime.cli", "-v", "serve", "--port", "0", "--data-dir",
         str(data_dir)],
        stdout=subprocess.PIPE, stderr=handle, text=True,
        env={**os.environ, "VOXLOOP_API_KEYS": f"{API_KEY},{OTHER_KEY}", **env},
    )  # fmt: skip
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.startswith("voxloop serve listening on "), log.read_text()
    http = line.rsplit(" ", 1)[1].strip()
    return Server(http, "ws" + http[4:] + "/v1/ws", proc, log, handle, data_dir)


def stop_server(server: Server) -> None:
    """SIGTERM, wait, and check that the server logged no traceback."""
    if server.proc.poll() is None:
        server.proc.send_signal(signal.SIGTERM)
        server.proc.wait(timeout=30)
    assert server.proc.stdout is not None
    server.proc.stdout.close()
    server.handle.close()
    assert "Traceback" not in server.log.read_text(), server.log.read_text()


@contextlib.contextmanager
def running_server(data_dir: Path, env: dict[str, str]) -> Iterator[Server]:
    """:func:`start_server`, stopped (and its log checked) at the end."""
    server = start_server(data_dir, env)
    try:
        yield server
    finally:
        stop_server(server)


# -- the client ---------------------------------------------------------------------------------

E = TypeVar("E")


@dataclass
class EventSocket(Generic[E]):
    """A Voice Agent WebSocket client: JSON text frames out, each frame in read by ``decode``
    into an event whose type ``kind`` gives, on a task, into a queue."""

    ws: websockets.ClientConnection
    decode: Callable[[str | bytes], E]
    kind: Callable[[E], str]
    within_s: float = 30.0
    """How long :meth:`next` and :meth:`until` wait by default."""
    closed_within_s: float = 15.0
    """How long :meth:`closed` waits by default."""
    seen: list[E] = field(default_factory=list)
    queue: asyncio.Queue[E | None] = field(default_factory=asyncio.Queue)
    task: asyncio.Task[None] | None = None

    async def _read(self) -> None:
        try:
            async for message in self.ws:
                await self.queue.put(self.decode(message))
        except websockets.ConnectionClosed:
            pass
        finally:
            await self.queue.put(None)

    async def send(self, doc: dict[str, Any] | str) -> None:
        await self.ws.send(doc if isinstance(doc, str) else json.dumps(doc))

    async def next(self, *kinds: str, within: float | None = None) -> E:
        """The next event of one of ``kinds`` (events before it are kept in ``seen``)."""
        async with asyncio.timeout(within or self.within_s):
            while True:
                event = await self.queue.get()
                if event is None:
                    await self.queue.put(None)
                    raise AssertionError(f"closed ({self.ws.close_code}) waiting for {kinds}")
                self.seen.append(event)
                if self.kind(event) in kinds:
                    return event

    async def until(self, kind: str, within: float | None = None) -> list[E]:
        """Every event up to and including the next ``kind``."""
        start = len(self.seen)
        await self.next(kind, within=within)
        return self.seen[start:]

    async def closed(self, within: float | None = None) -> tuple[list[E], int | None]:
        """Events until the server closes, and the close code."""
        start = len(self.seen)
        async with asyncio.timeout(within or self.closed_within_s):
            while (event := await self.queue.get()) is not None:
                self.seen.append(event)
        await self.queue.put(None)
        await self.ws.wait_closed()
        return self.seen[start:], self.ws.close_code

    async def stream(self, data: bytes, bytes_per_s: int, chunk: int) -> None:
        """Send audio in real time, in ``chunk``-byte messages."""
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        for i in range(0, len(data), chunk):
            piece = data[i : i + chunk]
            await self.send({"type": "input.audio", "audio": base64.b64encode(piece).decode()})
            delay = t0 + (i + len(piece)) / bytes_per_s - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)  # real-time pacing of the microphone


S = TypeVar("S", bound=EventSocket[Any])


@contextlib.asynccontextmanager
async def sockets(
    make: Callable[[websockets.ClientConnection], S],
) -> AsyncIterator[Callable[..., Any]]:
    """For a fixture: ``open_(url, headers={…}, **connect_kwargs)`` connects, wraps the
    connection with ``make`` and starts its reader; every socket opened is closed (and its
    reader awaited) at the end."""
    opened: list[S] = []

    async def open_(url: str, headers: dict[str, str], **kwargs: Any) -> S:
        ws = await websockets.connect(url, additional_headers=headers, **kwargs)
        client = make(ws)
        client.task = asyncio.get_running_loop().create_task(client._read())
        opened.append(client)
        return client

    yield open_
    for c in opened:
        await c.ws.close()
        if c.task is not None:
            await c.task
