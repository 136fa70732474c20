"""First reply vs later replies: first token → first segment on a fresh client.

A new process knows nothing of the endpoint it talks to. This streams, on a
fresh client each run (a fresh reasoning memory: a new process), two replies
with a long first sentence from the reference endpoint over loopback, through
:class:`SpeechSegmenter` with times as the conversation core does, and reports
first token → first segment for the first reply and for the second:

* ``auto``: the default (an unknown model name streams at once);
* ``hold``: the first reply held until the stream decides whether the chat
  template opened a think block (what the client did for an unknown endpoint
  before; ``ChatClient.stream(..., decide=True)``);
* ``warm-up``: the default after :meth:`ChatClient.warm_up` (as talk and serve
  sessions start).

Run: ``python -m benchmarks.first_reply [--runs 5 --itl-ms 20 --ttft-ms 200]``
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time

from runtime.endpoints import URLPolicy
from runtime.llm.client import ChatClient, ChatRequest, Endpoint, ReasoningMemory
from runtime.llm.reference import ReferenceEndpoint, ReplyPlan
from runtime.llm.stream import TextDelta
from runtime.speech.text import SpeechSegmenter

LONG_FIRST = (
    "The forecast for Paris this afternoon shows clear skies with a gentle breeze from the "
    "west and temperatures climbing to twenty two degrees by four o'clock, so it is a good "
    "day for a walk along the river before dinner. Enjoy it."
)
REQUEST = ChatRequest(messages=[{"role": "user", "content": "What is the weather in Paris?"}])


async def first_segment_ms(llm: ChatClient, *, decide: bool) -> float:
    """First token → first segment of one reply, ms."""
    segmenter = SpeechSegmenter()
    t_first: float | None = None
    async with llm.stream(REQUEST, decide=decide) as stream:
        async for event in stream:
            now = time.perf_counter() * 1000
            if t_first is None and stream.timings.first_token_ns is not None:
                t_first = stream.timings.first_token_ns / 1e6
            if isinstance(event, TextDelta) and segmenter.push(event.text, now):
                assert t_first is not None
                return now - t_first
    raise RuntimeError("the reply released no segment before its end")


async def one_run(server: ReferenceEndpoint, mode: str) -> tuple[float, float]:
    llm = ChatClient(
        Endpoint(server.base_url, "my-llm"), policy=URLPolicy.operator(),
        reasoning_memory=ReasoningMemory(),
    )  # fmt: skip
    async with llm:
        await llm.prewarm()
        if mode == "warm-up":
            await llm.warm_up("You are a helpful voice assistant.")
        first = await first_segment_ms(llm, decide=mode == "hold")
        second = await first_segment_ms(llm, decide=False)
    return first, second


async def amain(args: argparse.Namespace) -> None:
    plan = ReplyPlan(replies=(LONG_FIRST,), ttft_ms=args.ttft_ms, itl_ms=args.itl_ms)
    results: dict[str, list[tuple[float, float]]] = {"auto": [], "hold": [], "warm-up": []}
    async with ReferenceEndpoint(plan) as server:
        for _ in range(args.runs):
            for mode in results:  # alternating rounds
                results[mode].append(await one_run(server, mode))
    rows = []
    for mode, runs in results.items():
        first = statistics.median(r[0] for r in runs)
        second = statistics.median(r[1] for r in runs)
        rows.append(
            {"mode": mode, "first_reply_ms": round(first), "second_reply_ms": round(second)}
        )
        print(json.dumps(rows[-1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--itl-ms", type=float, default=20.0)
    parser.add_argument("--ttft-ms", type=float, default=200.0)
    asyncio.run(amain(parser.parse_args()))


if __name__ == "__main__":
    main()
