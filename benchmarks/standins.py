"""Remote-protocol stand-ins for the speech engines, served on loopback by benchmarks.

:func:`audio_app` speaks OpenAI's audio API as voxloop's ``openai`` engines call it:
``POST /v1/audio/transcriptions`` answers :data:`SENTENCE` after 50 ms (a fast hosted
recogniser), ``POST /v1/audio/speech`` streams 24 kHz PCM16 (a 220 Hz tone, 70 ms per
character of the input, in 200 ms chunks). No model runs: what a benchmark measures
with them is voxloop's own work around the engines.

Run alone (``python -m benchmarks.standins``), it serves the audio stand-in and the
reference chat endpoint (``ReplyPlan`` of one short reply, 100 ms to the first token,
10 ms between tokens) on loopback, prints one JSON line ``{"audio": URL, "llm": URL}``
and serves until its standard input closes.
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

SENTENCE = "What's the weather like in Paris today?"
REPLY = "It is sunny in Paris today, twenty degrees."


def audio_app() -> Any:
    """The OpenAI audio API stand-in (a Starlette app)."""
    import numpy as np
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route

    async def transcriptions(request: Request) -> JSONResponse:
        await request.form()
        await asyncio.sleep(0.05)
        return JSONResponse({"text": SENTENCE})

    async def speech(request: Request) -> StreamingResponse:
        body = await request.json()
        seconds = 0.07 * len(str(body.get("input", "")))
        t = np.arange(int(24000 * seconds)) / 24000
        pcm = (np.sin(2 * np.pi * 220 * t) * 3000).astype("<i2").tobytes()

        async def chunks() -> Any:
            for i in range(0, len(pcm), 9600):
                yield pcm[i : i + 9600]
                await asyncio.sleep(0)

        return StreamingResponse(chunks(), media_type="audio/pcm")

    return Starlette(routes=[
        Route("/v1/audio/transcriptions", transcriptions, methods=["POST"]),
        Route("/v1/audio/speech", speech, methods=["POST"]),
    ])  # fmt: skip


async def serve_app(app: Any) -> tuple[Any, int]:
    """Serve ``app`` with uvicorn on a free loopback port; returns (handle, port)."""
    import uvicorn

    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="off")
    server = uvicorn.Server(config)
    task = asyncio.get_running_loop().create_task(server.serve())
    while not server.started:  # noqa: ASYNC110 - uvicorn offers no event for it
        await asyncio.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    return (server, task), port


async def _main() -> None:
    from runtime.llm.reference import ReferenceEndpoint, ReplyPlan

    _, audio_port = await serve_app(audio_app())
    async with ReferenceEndpoint(ReplyPlan(replies=(REPLY,), ttft_ms=100, itl_ms=10)) as llm:
        print(json.dumps({"audio": f"http://127.0.0.1:{audio_port}/v1", "llm": llm.base_url}),
              flush=True)  # fmt: skip
        loop = asyncio.get_running_loop()
        while await loop.run_in_executor(None, sys.stdin.readline):
            pass


if __name__ == "__main__":
    asyncio.run(_main())
