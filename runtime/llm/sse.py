"""A pure Server-Sent Events decoder (bytes in, events out).

Theory of operation
-------------------
Implements the event-stream interpretation of the WHATWG HTML standard
(§9.2.6 "Interpreting an event stream"): the body is split into lines ending
in CRLF, LF or CR; a blank line dispatches the event being built; lines
starting with ``:`` are comments; ``data`` lines accumulate joined by LF; one
leading space after the colon is dropped; a leading UTF-8 BOM is ignored.

Bytes may arrive split anywhere, including between the CR and LF of one line
ending and inside a multi-byte UTF-8 character; the decoder keeps the
remainder, so any split of the same stream yields the same events.

Two deliberate differences from the standard:

* at end of stream the standard discards an event that was not terminated by
  a blank line. Several OpenAI-compatible servers end their last ``data:``
  line without one, so :meth:`SSEDecoder.receive_eof` dispatches a pending
  event whose last line was complete;
* the standard ignores unknown field names, but llama.cpp's server reports a
  failure mid-stream as an ``error:`` field (``error: {"code":500,…}``). Such
  lines are collected like ``data`` and dispatched as an event named
  ``error`` (the same name ``event: error`` + ``data:`` gives), so the failure
  is never mistaken for the end of a successful stream.

No asyncio and no sockets here; ``runtime.llm.client`` feeds this from httpx.
"""

from __future__ import annotations

from dataclasses import dataclass

_BOM = "\ufeff"


@dataclass(frozen=True, slots=True, kw_only=True)
class SSEEvent:
    """One dispatched server-sent event."""

    data: str
    event: str = "message"
    id: str | None = None
    retry_ms: int | None = None


class SSEDecoder:
    """Incremental SSE decoder.

    Feed bytes with :meth:`receive_data`, signal the end with
    :meth:`receive_eof`, and collect events with :meth:`events_received`.
    """

    __slots__ = (
        "_buffer",
        "_data",
        "_eof",
        "_error",
        "_event",
        "_events",
        "_has_data",
        "_id",
        "_last_id",
        "_pending_cr",
        "_retry",
        "_started",
    )

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._pending_cr = False
        self._started = False
        self._eof = False
        self._data: list[str] = []
        self._has_data = False
        self._error: list[str] = []
        self._event = ""
        self._id: str | None = None
        self._last_id: str | None = None
        self._retry: int | None = None
        self._events: list[SSEEvent] = []

    def receive_data(self, data: bytes) -> None:
        """Feed the next bytes of the body.

        Raises:
            RuntimeError: called after :meth:`receive_eof`.
        """
        if self._eof:
            raise RuntimeError("receive_data() called after receive_eof()")
        if not data:
            return
        buf = self._buffer
        buf += data
        start = 0
        if self._pending_cr and buf[:1] == b"\n":
            # The LF of a CRLF that was split across two reads.
            start = 1
        self._pending_cr = False
        while True:
            cr = buf.find(b"\r", start)
            lf = buf.find(b"\n", start)
            if cr == -1 and lf == -1:
                break
            if cr == -1 or (lf != -1 and lf < cr):
                self._line(bytes(buf[start:lf]))
                start = lf + 1
                continue
            self._line(bytes(buf[start:cr]))
            if cr + 1 < len(buf):
                start = cr + 2 if buf[cr + 1] == 0x0A else cr + 1
            else:
                start = cr + 1
                self._pending_cr = True
        del buf[:start]

    def receive_eof(self) -> None:
        """Signal the end of the body; a complete but undispatched event is dispatched."""
        if self._eof:
            return
        self._eof = True
        if self._buffer:
            # A final line without a line ending is incomplete: keep it only
            # if it is a full field (the last "data:" of a server that never
            # wrote the terminating blank line).
            self._line(bytes(self._buffer))
            self._buffer.clear()
        self._dispatch()

    @property
    def pending_data(self) -> str | None:
        """The data of the event being built from complete lines, not yet dispatched."""
        return "\n".join(self._data) if self._has_data and not self._error else None

    def events_received(self) -> list[SSEEvent]:
        """Return and forget the events decoded so far."""
        events, self._events = self._events, []
        return events

    def _line(self, raw: bytes) -> None:
        line = raw.decode("utf-8", errors="replace")
        if not self._started:
            self._started = True
            if line.startswith(_BOM):
                line = line[1:]
        if not line:
            self._dispatch()
            return
        if line.startswith(":"):
            return
        name, colon, value = line.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._data.append(value)
            self._has_data = True
        elif name == "error":
            self._error.append(value)
        elif name == "event":
            self._event = value
        elif name == "id" and "\x00" not in value:
            self._id = value
        elif name == "retry" and value.isdigit():
            self._retry = int(value)
        # Other field names are ignored, as the standard requires.

    def _dispatch(self) -> None:
        if self._id is not None:
            self._last_id = self._id
        if self._error:
            self._events.append(
                SSEEvent(
                    data="\n".join(self._error),
                    event="error",
                    id=self._last_id,
                    retry_ms=self._retry,
                )
            )
        elif self._has_data:
            self._events.append(
                SSEEvent(
                    data="\n".join(self._data),
                    event=self._event or "message",
                    id=self._last_id,
                    retry_ms=self._retry,
                )
            )
        self._data = []
        self._has_data = False
        self._error = []
        self._event = ""
        self._id = None
        self._retry = None
