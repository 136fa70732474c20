"""The silence a caller hears in each endpoint fault mode.

For every way an endpoint fails, a loopback reference endpoint is put in that
mode and a chat client asks it for a reply, as the conversation core does at
the end of a user's turn. Measured from the request:

* ``silence_s``: the longest stretch in which the agent has nothing to say —
  until the first speakable text, between texts, and from the last text to
  the end of the stream or the error that makes the agent apologise;
* ``outcome``: ``reply`` (spoken and finished), ``apology`` (an error before
  any text: the apology is spoken), ``reply+apology`` (text, then an error),
  or ``nothing`` (a "successful" reply with nothing in it: the caller hears
  silence until they speak again).

Text-to-speech time is not included (the apology's first audio follows the
error by Piper's time to first audio, ~50 ms; see "Speech engines").

The servers run in this process; each measurement runs in a subprocess
against the client of a source tree (``--tree``), so the same servers measure
an older client too::

    nice -n 10 python -m benchmarks.fault_silence --runs 3 --json after.json
    git worktree add /tmp/before <commit>
    nice -n 10 python -m benchmarks.fault_silence --runs 3 --tree /tmp/before --json before.json
    python -m benchmarks.fault_silence --table before.json after.json

With ``--fallback`` a second, healthy reference endpoint is the ``llm`` list's
second entry (``FallbackChatClient``, the first entry without retries of its
own, as the session runner builds it): ``silence_s`` is then the caller's
silence on the first failure of the faulty primary (a new client's first
request: no time to first token measured yet), ``warm_silence_s`` the first
request of a new client after its warm-up (as a session sends it when it
starts; the warm-up's own time is not the caller's), and ``open_silence_s``
the silence once the primary's circuit is open (the requests in between are
not measured)::

    python -m benchmarks.fault_silence \
        --runs 3 --json one.json
    python -m benchmarks.fault_silence \
        --runs 3 --fallback --json fallback.json
    python -m benchmarks.fault_silence --fallback-table one.json fallback.json

A third file (``--fallback-table one.json fallback.json before.json``, the
same run with ``--tree`` of an older tree) adds its first failure beside.

The client is measured with its default deadlines and retries; a client that
supports ``leading_reasoning`` is told the endpoint does not open think blocks
(as it knows from an endpoint's second reply on).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
STREAMS = ROOT / "tests" / "data" / "endpoint-streams"

# name -> (description, plans for successive requests; None: nothing listens)
MODES: dict[str, tuple[str, list[dict[str, Any]] | None]] = {
    "healthy": ("answers at once", [{}]),
    "http-500": ("HTTP 500 on every request", [{"fault": "status", "status": 500}]),
    "http-503-once": (
        "HTTP 503 once, then answers",
        [{"fault": "status", "status": 503}, {}],
    ),
    "http-429": (
        "HTTP 429, Retry-After: 1, on every request",
        [{"fault": "status", "status": 429, "retry_after": "1"}],
    ),
    "refused": ("nothing listens on the port", None),
    "no-headers": ("accepts, never sends response headers", [{"fault": "hang_headers"}]),
    "no-first-token": (
        "headers and a role chunk, then nothing",
        [{"fault": "hang", "fault_after": 0}],
    ),
    "stall-mid-reply": ("three tokens, then nothing", [{"fault": "hang", "fault_after": 3}]),
    "drop-before-token": (
        "connection dropped before the first token",
        [{"fault": "drop", "fault_after": 0}],
    ),
    "done-held-open": (
        "[DONE], then the connection stays open",
        [{"body": "done-then-held-open.sse", "hold_open": True}],
    ),
    "error-field": (
        "llama.cpp `error:` SSE field on every request",
        [{"body": "error-field-line.sse"}],
    ),
    "gzip-body": (
        "the stream gzip-compressed",
        [{"body": "served-gzip.sse", "content_encoding": "gzip"}],
    ),
    "html-200": (
        "a proxy's HTML page with status 200",
        [{"body": "<html><body>Bad gateway</body></html>", "content_type": "text/html"}],
    ),
}


def _plan(spec: dict[str, Any]) -> Any:
    from runtime.llm.reference import ReplyPlan

    spec = dict(spec)
    body = spec.pop("body", None)
    if body is not None:
        path = STREAMS / body
        spec["body"] = path.read_bytes() if path.suffix == ".sse" else body.encode()
    return ReplyPlan(replies=("Sure, I can help with that.",), **spec)


async def _serve(runs: int) -> tuple[dict[str, str], list[Any]]:
    from runtime.llm.reference import ReferenceEndpoint

    urls: dict[str, str] = {}
    servers: list[Any] = []
    for name, (_, plans) in MODES.items():
        if plans is None:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                urls[name] = f"http://127.0.0.1:{s.getsockname()[1]}/v1"
            continue
        server = ReferenceEndpoint(_plan(plans[-1]))
        await server.start()
        servers.append((server, plans))
        urls[name] = server.base_url
    return urls, servers


def _refill(servers: list[Any]) -> None:
    for server, plans in servers:
        server._queued.clear()
        server.queue(*[_plan(p) for p in plans[:-1]])


async def _orchestrate(args: argparse.Namespace, tree: Path, script: str) -> dict[str, Any]:
    from runtime.llm.reference import ReferenceEndpoint

    urls, servers = await _serve(args.runs)
    backup = ReferenceEndpoint(_plan({}))
    await backup.start()
    extra = ["--fallback-url", backup.base_url] if args.fallback else []
    env = dict(os.environ)
    env["PYTHONPATH"] = str(tree)
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in MODES}
    try:
        for _ in range(args.runs):
            for name in MODES:
                _refill(servers)
                # Run as a script from the measured tree, so its `runtime` is imported.
                proc = await asyncio.create_subprocess_exec(
                    sys.executable, script, "--measure", urls[name], *extra,
                    cwd=str(tree), env=env, stdout=subprocess.PIPE,
                )  # fmt: skip
                out, _ = await proc.communicate()
                results[name].append(json.loads(out))
                print(f"{name:20s} {results[name][-1]}", file=sys.stderr)
    finally:
        for server, _ in servers:
            await server.aclose()
        await backup.aclose()
    summary = {}
    for name, runs in results.items():
        silences = [r["silence_s"] for r in runs]
        outcomes = sorted({r["outcome"] for r in runs})
        summary[name] = {
            "description": MODES[name][0],
            "silence_s": statistics.median(silences),
            "silence_max_s": max(silences),
            "outcome": "/".join(outcomes),
            "attempts": max(r["attempts"] for r in runs),
            "error": runs[-1]["error"],
        }
        if args.fallback:
            summary[name]["open_silence_s"] = statistics.median(r["open_silence_s"] for r in runs)
            summary[name]["open_outcome"] = "/".join(sorted({r["open_outcome"] for r in runs}))
            summary[name]["warm_silence_s"] = statistics.median(r["warm_silence_s"] for r in runs)
            summary[name]["warm_outcome"] = "/".join(sorted({r["warm_outcome"] for r in runs}))
            summary[name]["warm_skipped"] = runs[-1]["warm_skipped"]
            summary[name]["entry"] = runs[-1]["entry"]
            summary[name]["skipped"] = runs[-1]["skipped"]
    return {"tree": str(tree), "runs": args.runs, "fallback": args.fallback, "modes": summary}


async def _measure(url: str, fallback_url: str | None) -> dict[str, Any]:
    # Runs against whichever tree is first on PYTHONPATH: only APIs both old
    # and new clients have are used (the fallback client only with --fallback).
    import inspect

    from runtime.endpoints import URLPolicy
    from runtime.llm.client import ChatClient, Endpoint

    kwargs: dict[str, Any] = {"policy": URLPolicy.operator()}
    if "leading_reasoning" in inspect.signature(ChatClient).parameters:
        kwargs["leading_reasoning"] = False
    if fallback_url is None:
        async with ChatClient(Endpoint(url, "any"), **kwargs) as client:
            return await _one(client)
    from runtime.llm.client import RetryPolicy
    from runtime.llm.fallback import FallbackChatClient

    def pair() -> FallbackChatClient:
        return FallbackChatClient(
            [
                ChatClient(Endpoint(url, "any"), retry=RetryPolicy(max_attempts=1), **kwargs),
                ChatClient(Endpoint(fallback_url, "any"), **kwargs),
            ]
        )

    async with pair() as fallback:
        first = await _one(fallback)
        # Open the primary's circuit (if it fails), then measure the next request.
        for _ in range(fallback.policy.failure_threshold):
            if fallback.breakers[0].state != "closed":
                break
            await _one(fallback)
        opened = await _one(fallback)
    first["open_silence_s"] = opened["silence_s"]
    first["open_outcome"] = opened["outcome"]
    first["circuit"] = fallback.breakers[0].state
    # A session's start: the warm-up, then the first turn.
    async with pair() as warmed:
        await warmed.warm_up("You are a helpful assistant.")
        after = await _one(warmed)
    first["warm_silence_s"] = after["silence_s"]
    first["warm_outcome"] = after["outcome"]
    first["warm_skipped"] = after["skipped"]
    return first


async def _one(client: Any) -> dict[str, Any]:
    from runtime.errors import EndpointError
    from runtime.llm.client import ChatRequest
    from runtime.llm.stream import TextDelta

    request = ChatRequest(messages=[{"role": "user", "content": "Can you help me?"}])
    marks: list[float] = []
    text = ""
    error = None
    attempts = 0
    entry: int | None = None
    skipped: list[Any] = []
    t0 = time.perf_counter()
    try:
        async with client.stream(request) as stream:
            async for event in stream:
                if isinstance(event, TextDelta) and event.text.strip():
                    marks.append(time.perf_counter() - t0)
                    text += event.text
            attempts = stream.timings.attempts
            entry = getattr(stream, "entry", 0)
            skipped = list(getattr(stream, "skipped", []))
    except EndpointError as exc:
        error = f"{exc.kind}: {exc}"
        attempts = -1
    end = time.perf_counter() - t0
    points = [0.0, *marks, end]
    silence = max(b - a for a, b in itertools.pairwise(points))
    if error is None:
        outcome = "reply" if text else "nothing"
    else:
        outcome = "reply+apology" if text else "apology"
    if not text and error is None:
        silence = end  # silent success: nothing until the caller speaks again
    return {
        "silence_s": round(silence, 3),
        "end_s": round(end, 3),
        "outcome": outcome,
        "text": text,
        "error": error,
        "attempts": attempts,
        "entry": entry,
        "skipped": skipped,
    }


def _silence(row: dict[str, Any]) -> str:
    if row["outcome"] == "nothing":
        return "until the caller speaks again"
    return f"{row['silence_s']:.2f}"


def _table(before_path: str, after_path: str) -> str:
    before = json.loads(Path(before_path).read_text())["modes"]
    after = json.loads(Path(after_path).read_text())["modes"]
    rows = [
        "| endpoint fault | silence before (s) | outcome before "
        "| silence after (s) | outcome after |",
        "|---|---:|---|---:|---|",
    ]
    for name, (desc, _) in MODES.items():
        b, a = before[name], after[name]
        cells = [desc, _silence(b), b["outcome"], _silence(a), a["outcome"]]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def _fallback_table(one_path: str, fallback_path: str, before_path: str | None = None) -> str:
    one = json.loads(Path(one_path).read_text())["modes"]
    fb = json.loads(Path(fallback_path).read_text())["modes"]
    before = json.loads(Path(before_path).read_text())["modes"] if before_path else None
    # The circuit-open request is a later one (its connection is warm): it is compared
    # with the healthy primary's request at the same position.
    healthy = fb["healthy"]["open_silence_s"]
    head = ["primary endpoint fault", "one endpoint: silence (s), outcome"]
    if before is not None:
        head.append("first failure, before: silence (s), outcome")
    head += [
        "first failure: silence (s), outcome",
        "first turn after the warm-up: silence (s), outcome",
        "circuit open: silence (s), outcome",
        "circuit open minus a healthy primary (ms)",
    ]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * (len(head) - 1) + "---:|"]
    for name, (desc, _) in MODES.items():
        o, f = one[name], fb[name]
        extra = (f["open_silence_s"] - healthy) * 1000
        cells = [desc, f"{_silence(o)}, {o['outcome']}"]
        if before is not None:
            cells.append(f"{_silence(before[name])}, {before[name]['outcome']}")
        cells += [
            f"{_silence(f)}, {f['outcome']}",
            f"{f['warm_silence_s']:.2f}, {f['warm_outcome']}",
            f"{f['open_silence_s']:.2f}, {f['open_outcome']}",
            f"{extra:.0f}",
        ]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--tree", help="source tree whose client is measured (default: this one)")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    parser.add_argument("--table", nargs=2, metavar=("BEFORE", "AFTER"))
    parser.add_argument(
        "--fallback", action="store_true", help="a healthy second endpoint behind the faulty one"
    )
    parser.add_argument("--fallback-url", help=argparse.SUPPRESS)
    parser.add_argument(
        "--fallback-table", nargs="+", metavar="FILE", help="ONE FALLBACK [FALLBACK_BEFORE]"
    )
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(asyncio.run(_measure(args.measure, args.fallback_url))))
        return
    if args.fallback_table:
        if len(args.fallback_table) not in (2, 3):
            parser.error("--fallback-table takes ONE FALLBACK [FALLBACK_BEFORE]")
        print(_fallback_table(*args.fallback_table))
        return
    if args.table:
        print(_table(*args.table))
        return
    tree = Path(args.tree).resolve() if args.tree else ROOT
    result = asyncio.run(_orchestrate(args, tree, str(Path(__file__).resolve())))
    text = json.dumps(result, indent=2)
    if args.json:
        Path(args.json).write_text(text + "\n")
    for name, row in result["modes"].items():
        print(f"{name:20s} {row['silence_s']:6.2f} s  {row['outcome']:14s} {row['error'] or ''}")


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
