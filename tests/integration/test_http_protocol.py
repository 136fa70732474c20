"""The agent service's HTTP protocol closes connections whose request head never completes."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator

import uvicorn
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from runtime.server.http import GuardedH11Protocol


class QuickHead(GuardedH11Protocol):
    head_timeout_s = 0.3


async def hello(request):
    return PlainTextResponse("hi")


@contextlib.asynccontextmanager
async def serving() -> AsyncIterator[int]:
    app = Starlette(routes=[Route("/", hello)])
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)  # clients may connect at once; the server accepts when it runs
    config = uvicorn.Config(
        app, http=QuickHead, log_level="warning", lifespan="off", timeout_keep_alive=60
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        yield sock.getsockname()[1]
    finally:
        server.should_exit = True
        await task
        sock.close()


async def test_half_sent_heads_and_silent_connections_are_closed():
    async with serving() as port:
        for sent in (b"", b"GET / HTTP/1.1\r\nHost: x\r\n"):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(sent)
            await writer.drain()
            assert await reader.read() == b""  # the server closed it (EOF), no response
            writer.close()


async def test_complete_requests_are_served_and_the_deadline_restarts_after_each():
    async with serving() as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        for _ in range(2):
            writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            await writer.drain()
            head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200 OK")
            assert await reader.readexactly(2) == b"hi"
        # Then half of a third request head: closed after the deadline, well before keep-alive.
        writer.write(b"GET / HTTP/1.1\r\n")
        await writer.drain()
        assert await reader.read() == b""
        writer.close()


async def test_a_websocket_outlives_the_head_deadline():
    import websockets
    from starlette.routing import WebSocketRoute

    async def echo(ws):
        await ws.accept()
        async for text in ws.iter_text():
            await ws.send_text(text)

    app = Starlette(routes=[WebSocketRoute("/ws", echo)])
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    server = uvicorn.Server(
        uvicorn.Config(app, http=QuickHead, log_level="warning", lifespan="off")
    )
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        async with websockets.connect(f"ws://127.0.0.1:{sock.getsockname()[1]}/ws") as ws:
            for i in range(3):
                # Each wait outlasts the 0.3 s head deadline; the WebSocket stays open.
                await asyncio.sleep(QuickHead.head_timeout_s * 2)
                await ws.send(f"ping {i}")
                assert await ws.recv() == f"ping {i}"
    finally:
        server.should_exit = True
        await task
        sock.close()
