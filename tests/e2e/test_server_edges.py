"""Addresses, ids, cursors, bodies and upgrade headers at the edge of a real ``voxloop serve``,
on SQLite and on PostgreSQL: each is a 4xx, and nothing is read past a limit."""

from __future__ import annotations

import base64
import json
import socket
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from runtime.server.app import MAX_BODY

from ..helpers import missing
from ..postgres import PostgresServer
from .test_server import AGENT, API_KEY, Server, start_server, stop


@pytest.fixture(params=["sqlite", "postgresql"])
def edge_server(
    request: pytest.FixtureRequest, tmp_path: Path, postgres: PostgresServer | None
) -> Iterator[Server]:
    url = None
    if request.param == "postgresql":
        if postgres is None:
            missing("PostgreSQL is not installed (apt-get install postgresql; .ci/run does)")
        url = postgres.new_database()
    srv = start_server(tmp_path / "data", database_url=url)
    try:
        yield srv
    finally:
        stop(srv)
        assert "Traceback" not in srv.log.read_text()


def _cursor(doc: object) -> str:
    return base64.urlsafe_b64encode(json.dumps(doc).encode()).rstrip(b"=").decode()


def test_ids_and_cursors_no_database_can_hold_are_4xx(edge_server: Server) -> None:
    c = edge_server.client()
    assert c.post("/v1/agents", json=AGENT).status_code == 201
    for method in ("GET", "DELETE"):
        r = c.request(method, "/v1/agents/agent_%00x")
        assert (r.status_code, r.json()["code"]) == (404, "agent_not_found"), r.text
    r = c.put("/v1/agents/agent_%00x", json={"name": "x"})
    assert (r.status_code, r.json()["code"]) == (404, "agent_not_found"), r.text
    nested = base64.urlsafe_b64encode(b"[" * 3000 + b"]" * 3000).decode()  # RecursionError
    for cursor in (
        _cursor(["2026-01-01T00:00:00+00:00", "agent_\x00"]),
        _cursor(["2026-01-01T00:00:00+00:00", "agent_\ud800"]),
        nested,
        "%00",
    ):
        r = c.get("/v1/agents", params={"limit": 2, "cursor": cursor})
        assert r.status_code == 400, r.text
        assert (r.json()["code"], r.json()["param"]) == ("invalid_request", "cursor")
    assert c.get("/v1/agents", params={"limit": 2}).status_code == 200
    if edge_server.database_url is None:  # SQLite: the database file is its owner's only
        assert stat.S_IMODE((edge_server.data_dir / "voxloop.db").stat().st_mode) == 0o600


def test_what_a_session_cannot_run_is_refused_at_write_time(edge_server: Server) -> None:
    c = edge_server.client()
    for extra, param, message in (
        ({"input": {"format": {"encoding": "audio/pcmu", "sample_rate": 24000}}},
         "input.format.sample_rate", "must be 8000 for audio/pcmu"),
        ({"output": {"format": {"encoding": "audio/pcm", "sample_rate": 8000}}},
         "output.format.sample_rate", "must be 24000 for audio/pcm"),
        ({"input": {"turn_detection": {"min_silence": 900, "max_silence": 500}}},
         "input.turn_detection.min_silence", "must not exceed max_silence"),
    ):  # fmt: skip
        r = c.post("/v1/agents", json={**AGENT, **extra})
        assert r.status_code == 422, r.text
        assert (r.json()["param"], r.json()["detail"]) == (param, message)
        agent_id = c.post("/v1/agents", json=AGENT).json()["id"]
        r = c.put(f"/v1/agents/{agent_id}", json=extra)
        assert r.status_code == 422 and r.json()["param"] == param, r.text


def test_every_problem_of_a_body_is_listed(edge_server: Server) -> None:
    c = edge_server.client()
    r = c.post("/v1/agents", json={"name": 5, "system_prompt": 6, "voice": "ivy", "bogus": 1})
    assert r.status_code == 422, r.text
    body = r.json()
    assert (body["param"], body["detail"]) == ("name", "must be a string")
    assert body["errors"] == [
        {"param": "name", "message": "must be a string"},
        {"param": "system_prompt", "message": "must be a string"},
        {"param": "bogus", "message": "is not a known field"},
    ]
    r = c.post("/v1/agents", json={})
    assert r.json()["errors"] == [
        {"param": p, "message": "is required"} for p in ("name", "system_prompt", "voice")
    ]


def test_a_local_use_nat64_endpoint_is_refused(edge_server: Server) -> None:
    c = edge_server.client()
    for host in ("[64:ff9b:1::a00:1]", "[64:ff9b:1:a00:1::]", "[64:ff9b:1::5db8:d822]"):
        body = {**AGENT, "llm": [{"base_url": f"https://{host}/v1", "model": "m",
                                  "api_key": "k"}]}  # fmt: skip
        r = c.post("/v1/agents", json=body)
        assert r.status_code == 422, r.text
        assert r.json()["param"] == "llm[0].base_url"
        assert "local-use NAT64" in r.json()["detail"]


def test_a_chunked_body_over_the_limit_is_refused_without_reading_on(edge_server: Server) -> None:
    host, port = edge_server.url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(
            b"POST /v1/agents HTTP/1.1\r\nHost: x\r\nAuthorization: " + API_KEY.encode()
            + b"\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
        )  # fmt: skip
        # Exactly one byte over the limit, and the body never ends. Nothing is sent that
        # the server need not read: unread bytes at its close would reset the connection
        # and could discard its answer before this side reads it.
        sent = 0
        while sent <= MAX_BODY:
            piece = b"[" * min(65536, MAX_BODY + 1 - sent)
            sock.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
            sent += len(piece)
        response = b""
        while chunk := sock.recv(65536):  # the server answers, then closes
            response += chunk
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 422 "), head
    assert b"connection: close" in head.lower()
    assert json.loads(body)["detail"] == f"is larger than {MAX_BODY} bytes"


@pytest.mark.parametrize("value", ["Bearer \u00e9t\u00e9", "\u00ff" * 40, "vk-\u00e9"])
def test_a_non_ascii_authorization_on_the_upgrade_is_unauthorized(
    edge_server: Server, value: str
) -> None:
    host, port = edge_server.url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(
            b"GET /v1/ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
            b"Authorization: " + value.encode("latin-1") + b"\r\n\r\n"
        )  # fmt: skip
        response = b""
        while chunk := sock.recv(65536):
            response += chunk
    head, _, frames = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101 "), head
    # An unmasked text frame with the typed error, then the close frame with 1008.
    assert b'"code":"unauthorized"' in frames
    assert frames.endswith(b"\x88\x02\x03\xf0")  # close, 2 bytes, 1008
