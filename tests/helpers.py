"""Shared test helpers (test data locations, signal generators)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import NoReturn

import numpy as np
import pytest

from runtime.bench.reference_thread import ReferenceThread
from runtime.llm.client import WARM_UP_PROMPT
from runtime.llm.reference import ReferenceEndpoint, ReplyPlan, RequestRecord

DATA = Path(__file__).parent / "data"
SPEECH = DATA / "speech"
REAL = DATA / "real"


STRICT_ENV = "VOXLOOP_TEST_STRICT"


def strict() -> bool:
    """Whether a missing test prerequisite is a failure (.ci/run sets VOXLOOP_TEST_STRICT=1)."""
    return os.environ.get(STRICT_ENV, "") not in ("", "0")


def missing(reason: str) -> NoReturn:
    """A prerequisite (PortAudio, PostgreSQL, …) is missing: a visible skip, a failure in CI."""
    if strict():
        pytest.fail(f"{reason}; {STRICT_ENV} is set, so this cannot be skipped", pytrace=False)
    pytest.skip(reason)


def conversation(name: str) -> list[dict[str, float | str]]:
    doc = json.loads((SPEECH / f"{name}.json").read_text())
    utterances: list[dict[str, float | str]] = doc["utterances"]
    return utterances


def manifest() -> list[dict[str, str | float]]:
    return [
        json.loads(line) for line in (SPEECH / "manifest.jsonl").read_text().splitlines() if line
    ]


def words_of(text: str) -> list[str]:
    """The words of a transcript, lower case, without punctuation."""
    return re.findall(r"[a-z']+", text.lower())


def tone(freq: float, seconds: float, rate: int, amplitude: float = 0.5) -> bytes:
    t = np.arange(round(seconds * rate)) / rate
    return (amplitude * np.sin(2 * np.pi * freq * t) * 32767).astype("<i2").tobytes()


def noise(seconds: float, rate: int, dbfs: float, colour: str = "white", seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    n = round(seconds * rate)
    x = rng.standard_normal(n)
    if colour == "pink":
        spectrum = np.fft.rfft(x)
        spectrum /= np.sqrt(np.arange(1, len(spectrum) + 1))
        x = np.fft.irfft(spectrum, n)
    elif colour == "brown":
        x = np.cumsum(x)
        x -= np.convolve(x, np.ones(400) / 400, "same")
    x = x / np.sqrt(np.mean(x**2)) * 10 ** (dbfs / 20)
    pcm: bytes = (np.clip(x, -1, 1) * 32767).astype("<i2").tobytes()
    return pcm


@contextlib.asynccontextmanager
async def serve_asgi(
    app, *, certfile: str | None = None, keyfile: str | None = None
) -> AsyncIterator[int]:
    """Serve an ASGI app with hypercorn on a loopback port; yields the port.

    The listening socket exists before the server task starts, so clients can
    connect at once (no waiting for the server to come up).
    """
    from hypercorn.asyncio import serve
    from hypercorn.config import Config

    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    port = listener.getsockname()[1]
    config = Config()
    config.bind = [f"fd://{listener.fileno()}"]
    if certfile:
        config.certfile, config.keyfile = certfile, keyfile
        config.alpn_protocols = ["h2", "http/1.1"]
    config.accesslog = config.errorlog = None
    config.graceful_timeout = 0.1
    stop = asyncio.Event()
    task = asyncio.create_task(serve(app, config, shutdown_trigger=stop.wait))
    try:
        yield port
    finally:
        stop.set()
        await task
        listener.detach()  # hypercorn owns (and has closed) the descriptor


class EndpointThread(ReferenceThread):
    """A key-checking :class:`ReferenceEndpoint` on its own loop, shared by a test module.

    ``answer`` queues plans for the next requests and then falls back to ``default``
    (one reply text, or a plan) or, without it, to the plan the thread was started with.
    """

    def __init__(self, plan: ReplyPlan, *, api_key: str) -> None:
        super().__init__(plan, api_key=api_key)
        self._initial = plan

    def answer(self, *plans: ReplyPlan, default: str | ReplyPlan | None = None) -> None:
        if default is None:
            fallback = self._initial
        elif isinstance(default, str):
            fallback = ReplyPlan(replies=(default,))
        else:
            fallback = default

        def apply(server: ReferenceEndpoint) -> None:
            server._queued.clear()
            server.plan = fallback
            server.queue(*plans)

        self.call(apply)

    def chats(self) -> list[RequestRecord]:
        """The chat-completions requests received so far, warm-ups left out."""
        return [r for r in self.all_chats() if not is_warm_up(r)]

    def warm_ups(self) -> list[RequestRecord]:
        """The warm-up requests (``ChatClient.warm_up``) received so far."""
        return [r for r in self.all_chats() if is_warm_up(r)]

    def all_chats(self) -> list[RequestRecord]:
        return [r for r in self.records() if r.path.endswith("/chat/completions")]


def is_warm_up(record: RequestRecord) -> bool:
    """Whether a recorded request is the session warm-up (system prompt + WARM_UP_PROMPT)."""
    messages = (record.body or {}).get("messages") or []
    return len(messages) == 2 and messages[1] == {"role": "user", "content": WARM_UP_PROMPT}
