"""What an operator sees: session fields on every line, the real error inside a task
group's failure, and a database file only its owner can read."""

from __future__ import annotations

import base64
import json
import logging
import os
import stat
from pathlib import Path

from runtime.agents.store import Store, sqlite_url
from runtime.server.logs import JsonFormatter
from runtime.sessions.live import redact


def _line(record: logging.LogRecord) -> dict[str, object]:
    doc = json.loads(JsonFormatter().format(record))
    assert isinstance(doc, dict)
    return doc


def test_session_lines_keep_the_session_agent_reason_and_duration() -> None:
    record = logging.LogRecord("voxloop.realtime", logging.INFO, __file__, 1, "session over",
                               None, None)  # fmt: skip
    extra = {"session_id": "sess_1", "agent_id": "agent_2", "reason": "ended",
             "duration_s": 12.5, "code": 1000}  # fmt: skip
    record.__dict__.update(extra)
    doc = _line(record)
    assert {k: doc[k] for k in extra} == extra


def test_a_task_group_failure_logs_the_exception_inside() -> None:
    def fail() -> None:
        raise ValueError("embedded null character")

    try:
        try:
            fail()
        except ValueError as inner:
            raise ExceptionGroup("unhandled errors in a TaskGroup", [inner]) from None
    except ExceptionGroup as group:
        record = logging.LogRecord("voxloop.realtime", logging.ERROR, __file__, 1,
                                   "session failed", None, (type(group), group, None))  # fmt: skip
    doc = _line(record)
    exception = doc["exception"]
    assert isinstance(exception, dict)
    assert (exception["type"], exception["message"]) == ("ValueError", "embedded null character")
    assert "others" not in exception
    frames = exception["frames"]
    assert isinstance(frames, list) and frames[-1].endswith(" in fail")


def _modes(directory: Path) -> dict[str, int]:
    return {p.name: stat.S_IMODE(p.stat().st_mode) for p in directory.iterdir()}


async def test_the_sqlite_database_is_created_0600(tmp_path: Path) -> None:
    os.umask(0o022)
    store = Store(sqlite_url(tmp_path))
    await store.start()
    try:
        await store.init_primary("k1")
        modes = _modes(tmp_path)
        assert "voxloop.db" in modes
        assert modes == dict.fromkeys(modes, 0o600)
    finally:
        await store.aclose()


def test_an_endpoints_echo_of_its_key_is_redacted_in_every_usual_form() -> None:
    key = "sk-agent-llm-5e4d3c2b1a"
    raw = key.encode()
    echoes = [
        f"bad key {key}", f"bad key {key[::-1]}", f"bad key {base64.b64encode(raw).decode()}",
        f"bad key {base64.urlsafe_b64encode(raw).decode().rstrip('=')}", "bad key " + " ".join(key),
        "bad key " + "-".join(key),
    ]  # fmt: skip
    for echo in echoes:
        assert redact(echo, key) == "bad key [redacted]", echo
    assert redact("x" * 400, key) == "x" * 299 + "…"
    assert redact("no key here", None) == "no key here"
