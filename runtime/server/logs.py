"""Structured (JSON lines) logging for the server, with no request bodies or secrets.

Every record becomes one JSON object on one line: ``ts``, ``level``,
``logger``, ``msg`` (the formatted message, so third-party lines such as
Alembic's read as they should), the identifier fields listed in
:data:`FIELDS` when a record carries them in ``extra``, and for errors an
``exception`` object (``type``, ``message``, ``frames``) instead of an escaped
traceback. voxloop's own messages are static strings; secrets are never
passed to a logger.

:class:`AccessLog` writes one ``request`` line per HTTP request or WebSocket
session: method, path (never the query string, which may carry a token),
status, duration and a request id (the client's ``X-Request-ID`` when it is
a short token, else a new one; echoed in the response). Bodies and headers
are never logged.
"""

from __future__ import annotations

import json
import logging
import re
import time
import traceback
import uuid
from contextvars import ContextVar
from typing import Any, Final

FIELDS: Final = (
    "session_id",
    "agent_id",
    "reason",
    "duration_s",
    "code",
    "queued",
    "buffered",
    "tasks",
    "kind",
    "endpoint",
    "status",
    "method",
    "path",
    "duration_ms",
    "request_id",
    "url",
    "signal",
    "error",
    # sessions and phone calls
    "session_id",
    "call_sid",
    "stream_sid",
    "reason",
    "code",
    "event",
    "turn",
    "turns",
    "rejected_messages",
    "dtmf_messages",
    "marks_sent",
    "marks_acknowledged",
    "clears",
    "played_ms",
    "pieces_sent",
    "pacing_p50_ms",
    "pacing_p99_ms",
    "pacing_max_ms",
    "underrun_ms",
    # per-turn metrics (runtime.conversation.events.TurnMetrics, in ms)
    "interrupted",
    "speculative",
    "stt_final_ms",
    "ttft_ms",
    "first_sentence_ms",
    "tts_first_audio_ms",
    "v2v_ms",
    "overhead_ms",
    "endpointing_ms",
    "llm_entry",
    "llm_host",
    "llm_skipped",
    # endpoint failover (runtime.llm.fallback)
    "entry",
    "host",
    "skipped",
    "realtime",
    "speech_engines",
    "readiness",
    "stt",
    "tts",
    "load_s",
)
MAX_FRAMES: Final = 20

access_log = logging.getLogger("voxloop.access")


class JsonFormatter(logging.Formatter):
    """Formats a record as one JSON object (see the module docstring)."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, object] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": _message(record),
        }
        for name in FIELDS:
            value = record.__dict__.get(name)
            if isinstance(value, str | int | float):
                doc[name] = value
        if record.exc_info and record.exc_info[0] is not None:
            doc["exception"] = exception_fields(record.exc_info[1])
        return json.dumps(doc)


def _message(record: logging.LogRecord) -> str:
    try:
        return record.getMessage()
    except (TypeError, ValueError):  # arguments that do not fit the format string
        return str(record.msg)


def exception_fields(exc: BaseException | None) -> dict[str, object]:
    """``{"type", "message", "frames": ["file:line in function", …]}`` (innermost last).

    An exception group (a task group's failure) is reported by the first
    exception inside it, with ``others`` counting the rest: the line names the
    real error, not ``ExceptionGroup … (1 sub-exception)``.
    """
    if exc is None:
        return {}
    others = 0
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        others += len(exc.exceptions) - 1
        exc = exc.exceptions[0]
    frames = traceback.extract_tb(exc.__traceback__)[-MAX_FRAMES:]
    doc: dict[str, object] = {
        "type": type(exc).__name__,
        "message": str(exc).splitlines()[0][:500] if str(exc) else "",
        "frames": [f"{f.filename}:{f.lineno} in {f.name}" for f in frames],
    }
    if others:
        doc["others"] = others
    return doc


def configure(level: int) -> None:
    """Send every logger's records (voxloop, uvicorn, Alembic, …) to stderr as JSON lines."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access", "alembic"):
        # Their own handlers (if any) would print plain text next to the JSON lines.
        logger = logging.getLogger(name)
        logger.handlers[:] = []
        logger.propagate = True


_REQUEST_ID: Final = re.compile(r"[A-Za-z0-9._-]{1,64}")

current_request_id: ContextVar[str | None] = ContextVar("voxloop_request_id", default=None)
"""The id of the request being handled (set by :class:`AccessLog`; error bodies carry it)."""


class AccessLog:
    """ASGI middleware: one ``request`` log line per HTTP request or WebSocket session."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        kind = scope["type"]
        if kind not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        given = next((v for k, v in scope.get("headers", ()) if k == b"x-request-id"), b"")
        text = given.decode("latin-1")
        request_id = text if _REQUEST_ID.fullmatch(text) else uuid.uuid4().hex
        started = time.perf_counter()
        status = 0
        reset = current_request_id.set(request_id)

        async def send_logged(message: Any) -> None:
            nonlocal status
            match message["type"]:
                case "http.response.start":
                    status = int(message["status"])
                    headers = [
                        (k, v) for k, v in message.get("headers", ()) if k != b"x-request-id"
                    ]
                    headers.append((b"x-request-id", request_id.encode()))
                    message = {**message, "headers": headers}
                case "websocket.accept":
                    status = 101
                case "websocket.close" if not status:
                    status = 403
                case "websocket.http.response.start":
                    status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_logged)
        except Exception:
            status = status or 500
            raise
        finally:
            current_request_id.reset(reset)
            access_log.info(
                "request",
                extra={
                    "method": scope.get("method", "WEBSOCKET"),
                    "path": scope.get("path", ""),
                    "status": status,
                    "duration_ms": round((time.perf_counter() - started) * 1000, 2),
                    "request_id": request_id,
                },
            )
