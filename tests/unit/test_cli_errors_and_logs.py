"""The one-line error for anything unforeseen, and the JSON log line format."""

from __future__ import annotations

import json
import logging
import sys

from runtime.cli.common import EXIT_FAILED, EXIT_UNAVAILABLE, Unavailable, UsageError, describe
from runtime.errors import EndpointConnectError
from runtime.server.logs import JsonFormatter


def test_exception_groups_are_reduced_to_their_first_leaf():
    group = ExceptionGroup("task group", [ExceptionGroup("inner", [UsageError("bad flag")])])
    error = describe(group)
    assert isinstance(error, UsageError) and error.message == "bad flag"


def test_unforeseen_exceptions_are_one_line_with_what_to_do():
    error = describe(KeyError("first line\nsecond line"))
    assert error.exit_code == EXIT_FAILED
    assert error.message == (
        "unexpected KeyError: 'first line\\nsecond line' (run with -v to see where; please report it)"
    )
    missing = describe(ModuleNotFoundError("No module named 'piper'", name="piper"))
    assert isinstance(missing, Unavailable) and missing.exit_code == EXIT_UNAVAILABLE
    assert missing.message.startswith("the optional package 'piper' is not installed: ")
    endpoint = describe(EndpointConnectError("cannot connect to the endpoint", retryable=True))
    assert endpoint.message == "cannot connect to the endpoint"


def record(msg: str, *args: object, exc: bool = False) -> logging.LogRecord:
    info = None
    if exc:
        try:
            raise ValueError("the reason")
        except ValueError:
            info = sys.exc_info()
    return logging.LogRecord("alembic.runtime", logging.INFO, __file__, 1, msg, args, info)


def test_log_lines_are_formatted_json_with_a_structured_exception():
    line = json.loads(JsonFormatter().format(record("Running upgrade %s -> %s", "", "0001")))
    assert line["msg"] == "Running upgrade  -> 0001" and line["logger"] == "alembic.runtime"
    assert set(line) == {"ts", "level", "logger", "msg"}
    failed = json.loads(JsonFormatter().format(record("health check failed", exc=True)))
    exception = failed["exception"]
    assert exception["type"] == "ValueError" and exception["message"] == "the reason"
    assert exception["frames"][-1].endswith(" in record")
    assert "Traceback" not in json.dumps(failed)
