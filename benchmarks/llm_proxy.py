"""A loopback proxy in front of a local chat-completions server, for side-by-side runs.

Every runtime compared in ``benchmarks.v2v_peers`` talks to the same llama-cpp-python server
through this proxy, which changes two things in each JSON request body and nothing else:

- ``max_tokens`` (and ``max_completion_tokens``) is capped at ``--max-tokens`` (256), and set
  when absent: a caller that hangs up mid-reply otherwise leaves the single-slot server
  generating into the next run;
- a ``developer`` message becomes ``system`` (Pipecat's OpenAI service sends the system prompt
  as ``developer``, which llama-cpp-python's chat templates reject).

Responses, streamed or not, are passed through as they arrive.

Run: ``python -m benchmarks.llm_proxy --upstream http://127.0.0.1:8391 --port 8392``
"""

from __future__ import annotations

import argparse
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.routing import Route


def rewrite(body: dict[str, Any], max_tokens: int) -> dict[str, Any]:
    """The request body as forwarded (see the module docstring)."""
    out = dict(body)
    messages = out.get("messages")
    if isinstance(messages, list):
        out["messages"] = [
            {**m, "role": "system"} if isinstance(m, dict) and m.get("role") == "developer" else m
            for m in messages
        ]
    asked = [v for v in (out.pop("max_completion_tokens", None), out.get("max_tokens")) if v]
    out["max_tokens"] = min([max_tokens, *(int(v) for v in asked)])
    return out


def app(upstream: str, max_tokens: int) -> Starlette:
    client = httpx.AsyncClient(base_url=upstream, timeout=httpx.Timeout(120.0))

    async def forward(request: Request) -> StreamingResponse:
        raw = await request.body()
        # A body that is not a JSON object is forwarded as it came.
        with contextlib.suppress(ValueError, TypeError, AttributeError):
            raw = json.dumps(rewrite(json.loads(raw), max_tokens)).encode()
        upstream_request = client.build_request(
            request.method, request.url.path, content=raw,
            headers={"content-type": request.headers.get("content-type", "application/json")},
        )  # fmt: skip
        response = await client.send(upstream_request, stream=True)

        async def body() -> AsyncIterator[bytes]:
            async for chunk in response.aiter_raw():
                yield chunk

        return StreamingResponse(
            body(),
            status_code=response.status_code,
            media_type=response.headers.get("content-type"),
            background=BackgroundTask(response.aclose),
        )

    return Starlette(routes=[Route("/{path:path}", forward, methods=["GET", "POST"])])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--upstream", required=True, help="the server's base URL (no /v1)")
    parser.add_argument("--port", type=int, default=8392)
    parser.add_argument("--max-tokens", type=int, default=256)
    args = parser.parse_args()
    uvicorn.run(app(args.upstream, args.max_tokens), host="127.0.0.1", port=args.port,
                log_level="warning")  # fmt: skip


if __name__ == "__main__":
    main()
