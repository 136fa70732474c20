"""Structured (JSON lines) logging for the server, with no request bodies or secrets.

Log messages are static strings; the only structured fields are identifiers
passed in ``extra`` (``agent_id``, ``kind``…). Nothing else from a record's
``extra`` or arguments is written, so a secret cannot slip into a log line by
being formatted into a message.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Final

FIELDS: Final = ("agent_id", "kind", "endpoint", "status")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, object] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.msg if isinstance(record.msg, str) else type(record.msg).__name__,
        }
        for name in FIELDS:
            value = record.__dict__.get(name)
            if isinstance(value, str | int | float):
                doc[name] = value
        if record.exc_info and record.exc_info[0] is not None:
            doc["error"] = record.exc_info[0].__name__
        return json.dumps(doc)


def configure(level: int) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
