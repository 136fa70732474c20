from __future__ import annotations

import json
import logging
import pickle

import httpx
import pytest

from runtime.errors import (
    EndpointAuthError,
    EndpointError,
    EndpointRateLimited,
    EndpointRejected,
    EndpointServerError,
    EndpointTimeout,
)
from runtime.llm.client import Endpoint, _error_detail, _retry_after_s
from runtime.llm.stream import status_error
from runtime.llm.transport import map_http_errors
from runtime.secret import Secret

KEY = "sk-test-0123456789abcdef"


def test_secret_never_shows_itself(caplog: pytest.LogCaptureFixture):
    s = Secret(KEY)
    assert KEY not in repr(s)
    assert KEY not in str(s)
    assert KEY not in f"{s}"
    assert KEY not in repr(Endpoint("https://api.example.com", "m", s))
    with caplog.at_level(logging.INFO):
        logging.getLogger("t").info("key %s", s)
    assert KEY not in caplog.text
    with pytest.raises(TypeError):
        pickle.dumps(s)
    assert s.reveal() == KEY
    assert s == Secret(KEY)
    assert not Secret("")


def test_secret_redacts_text():
    assert Secret(KEY).redact(f"bad key {KEY}!") == "bad key ********!"


@pytest.mark.parametrize(
    ("status", "cls", "retryable"),
    [
        (401, EndpointAuthError, False),
        (403, EndpointAuthError, False),
        (400, EndpointRejected, False),
        (404, EndpointRejected, False),
        (422, EndpointRejected, False),
        (307, EndpointRejected, False),
        (408, EndpointTimeout, True),
        (429, EndpointRateLimited, True),
        (500, EndpointServerError, True),
        (502, EndpointServerError, True),
        (503, EndpointServerError, True),
        (501, EndpointServerError, False),
    ],
)
def test_status_mapping(status: int, cls: type, retryable: bool):
    err = status_error(status, "detail", None)
    assert isinstance(err, cls)
    assert err.retryable is retryable
    assert err.status_code == status
    assert str(status) in str(err)


def test_fault_attribution():
    assert status_error(401, "", None).fault == "caller"
    assert status_error(500, "", None).fault == "endpoint"


def test_retry_after_forms():
    assert _retry_after_s("2") == 2.0
    assert _retry_after_s("0.5") == 0.5
    assert _retry_after_s(None) is None
    assert _retry_after_s("soon") is None
    assert _retry_after_s("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # in the past


def test_error_detail_extracts_message_and_redacts_key():
    body = json.dumps({"error": {"message": f"Incorrect API key provided: {KEY}"}}).encode()
    detail = _error_detail(body, Secret(KEY))
    assert KEY not in detail
    assert detail.startswith("Incorrect API key provided")
    assert _error_detail(b'{"detail": "nope"}', None) == "nope"
    assert len(_error_detail(b"x" * 5000, None)) <= 201


@pytest.mark.parametrize(
    ("raised", "kind", "message"),
    [
        (httpx.ConnectTimeout("x"), "connect",
         "could not connect to the endpoint: x"),
        (httpx.ReadTimeout("x"), "timeout",
         "the endpoint timed out: nothing received within the read timeout"),
        (httpx.WriteTimeout("x"), "timeout",
         "the endpoint timed out: the request could not be sent within the write timeout"),
        (httpx.RemoteProtocolError("Server disconnected without sending a response."), "dropped",
         "the connection to the endpoint failed: the server closed the connection or broke the "
         "HTTP protocol"),
        (httpx.ReadError(""), "dropped",
         "the connection to the endpoint failed: the connection broke while receiving"),
        (httpx.DecodingError("x"), "dropped",
         "the connection to the endpoint failed: the answer's content encoding does not decode"),
        (httpx.ConnectError(""), "connect", "could not connect to the endpoint: the connection failed"),
    ],
)  # fmt: skip
async def test_http_failures_read_as_words_not_library_names(
    raised: httpx.HTTPError, kind: str, message: str
):
    """What reaches a session's reply.error or a benchmark table names no httpx class."""
    with pytest.raises(EndpointError) as info:
        async with map_http_errors("the endpoint"):
            raise raised
    assert (info.value.kind, str(info.value)) == (kind, message)
    assert info.value.__cause__ is raised
