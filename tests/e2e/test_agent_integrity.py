"""The agent service never loses or corrupts what operators store: a real ``voxloop serve``.

Bad input of every measured kind is a 4xx naming the field with nothing stored;
every route needs the key; stored rows hold no plaintext on either database;
database URLs people write work, and wrong ones are one line before "listening".
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import create_async_engine

from runtime.agents.store import database_url

from ..helpers import missing
from ..postgres import PostgresServer
from .test_server import (
    AGENT,
    API_KEY,
    HEADER_SECRET,
    LLM_KEY,
    Server,
    start_server,
    stop,
)
from .test_server import server as server

VOXLOOP = [sys.executable, "-m", "runtime.cli"]

ROUTES = [
    ("POST", "/v1/agents"),
    ("GET", "/v1/agents"),
    ("GET", "/v1/agents/{id}"),
    ("PUT", "/v1/agents/{id}"),
    ("DELETE", "/v1/agents/{id}"),
    ("GET", "/v1/token?expires_in_seconds=60"),
    ("POST", "/v1/tokens"),
    ("GET", "/v1/voices"),
]


def raw_request(server: Server, method: str, path: str, headers: list[tuple[bytes, bytes]], body: bytes = b"") -> tuple[int, dict[str, str], bytes]:  # fmt: skip
    """One request on its own connection, with header bytes exactly as given."""
    host, port = server.url.removeprefix("http://").split(":")
    lines = [f"{method} {path} HTTP/1.1".encode(), f"Host: {host}".encode(), f"Content-Length: {len(body)}".encode(), b"Connection: close"]  # fmt: skip
    lines += [name + b": " + value for name, value in headers]
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(b"\r\n".join(lines) + b"\r\n\r\n" + body)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, payload = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    parsed = {k.lower(): v.strip() for k, _, v in (h.partition(":") for h in header_lines)}
    return int(status_line.split()[1]), parsed, payload


def test_every_route_needs_the_key(server: Server):
    agent_id = server.client().post("/v1/agents", json=AGENT).json()["id"]
    for method, path in ROUTES:
        path = path.replace("{id}", agent_id)
        for key, code, detail in (
            (None, "missing_authorization", "Missing authorization header"),
            ("wrong-key", "unauthorized", "Unauthorized"),
            ("Bearer wrong-key", "unauthorized", "Unauthorized"),
            (f"Bearer{API_KEY}", "unauthorized", "Unauthorized"),
            (API_KEY + "x", "unauthorized", "Unauthorized"),
        ):
            r = server.client(key).request(method, path, json={"name": "x"})
            assert (r.status_code, r.json()) == (401, {
                "code": code, "message": detail, "param": None,
                "request_id": r.headers["x-request-id"], "detail": detail,
            }), (method, path, key)  # fmt: skip
        if method == "GET":
            for key in (API_KEY, f"Bearer {API_KEY}", "second-key"):
                assert server.client(key).get(path).status_code == 200, (path, key)
    # Nothing above changed the agent.
    assert server.client().get(f"/v1/agents/{agent_id}").json()["name"] == AGENT["name"]


def test_non_ascii_authorization_is_a_401_not_a_500(server: Server):
    for value in (
        "é".encode("latin-1"),
        "Bearer ключ".encode(),
        b"\xff\xfe",
        API_KEY.encode() + b"\xe9",
    ):
        status, _, body = raw_request(server, "GET", "/v1/agents", [(b"Authorization", value)])
        doc = json.loads(body)
        assert (status, doc["code"], doc["detail"]) == (401, "unauthorized", "Unauthorized"), value


# Raw bodies that gave 500s (and were often stored anyway).
AGENT_JSON = json.dumps({k: v for k, v in AGENT.items() if k != "tools"})
BAD_BODIES: list[tuple[bytes, str]] = [
    (AGENT_JSON[:-1].encode() + b', "input": {"x": NaN}}', "body"),
    (AGENT_JSON[:-1].encode() + b', "input": {"x": Infinity}}', "body"),
    (AGENT_JSON[:-1].encode() + b', "input": {"x": 1e999}}', "body"),
    (AGENT_JSON[:-1].encode() + b', "greeting": "\\ud800"}', "greeting"),
    (AGENT_JSON[:-1].encode() + b', "system_prompt": "a\\u0000b"}', "system_prompt"),
    (AGENT_JSON[:-1].encode() + b', "input": ' + b"[" * 1000 + b"]" * 1000 + b"}", "body"),
    (AGENT_JSON[:-1].encode() + b', "input": {"keyterms": ["a"], "colour": 1}}', "input.colour"),
    (AGENT_JSON[:-1].encode() + b', "output": {"format": {"encoding": "audio/pcm", "x": 1}}}', "output.format.x"),
    (json.dumps({**AGENT, "llm": [{"base_url": "https://api.example.com/v1", "model": "m", "api_key": "k\r\nX: y"}]}).encode(), "llm[0].api_key"),
    (json.dumps({**AGENT, "llm": [{"base_url": "https://api.example.com/v1", "model": "m\x00", "api_key": "k"}]}).encode(), "llm[0].model"),
    (json.dumps({**AGENT, "tools": [{"name": "t", "http": {"url": "https://tools.example.com/", "headers": [{"name": "A\nB", "value": "v"}]}}]}).encode(), "tools[0].http.headers[0].name"),
    (json.dumps({**AGENT, "llm": [{"base_url": "https://１２７.0.0.1/v1", "model": "m", "api_key": "k"}]}).encode(), "llm[0].base_url"),
    (json.dumps({**AGENT, "llm": [{"base_url": "https://[fec0::1]/v1", "model": "m", "api_key": "k"}]}).encode(), "llm[0].base_url"),
    (json.dumps({**AGENT, "llm": [{"base_url": "https://192.0.0.8/v1", "model": "m", "api_key": "k"}]}).encode(), "llm[0].base_url"),
    (json.dumps({**AGENT, "llm": [{"base_url": "http://internal.example.com/v1", "model": "m", "api_key": "k"}]}).encode(), "llm[0].base_url"),
]  # fmt: skip


def test_bad_bodies_are_4xx_naming_the_field_and_nothing_changes(server: Server):
    c = server.client()
    agent = c.post("/v1/agents", json=AGENT).json()
    before = c.get(f"/v1/agents/{agent['id']}").json()
    for body, param in BAD_BODIES:
        for method, path in (("POST", "/v1/agents"), ("PUT", f"/v1/agents/{agent['id']}")):
            status, _, payload = raw_request(
                server, method, path, [(b"Authorization", API_KEY.encode()), (b"Content-Type", b"application/json")], body
            )  # fmt: skip
            assert status == 422, (param, payload[:200])
            doc = json.loads(payload)
            assert doc["param"] == param, (doc, body[:120])
            assert len(payload) < 1000 and b"k\r\nX" not in payload
    assert [a["id"] for a in c.get("/v1/agents").json()] == [agent["id"]]
    assert c.get(f"/v1/agents/{agent['id']}").json() == before
    # The huge invalid voice is not echoed back.
    r = c.post("/v1/agents", json={**AGENT, "voice": "v" * 900_000})
    assert r.status_code == 422 and len(r.content) < 1000
    # The server is still healthy.
    assert c.get(f"/v1/agents/{agent['id']}").status_code == 200


def test_header_without_stored_value_is_refused_inside_the_transaction(server: Server):
    c = server.client()
    agent = c.post("/v1/agents", json=AGENT).json()
    before = c.get(f"/v1/agents/{agent['id']}").json()
    body = {"name": "changed", "tools": [{"name": "lookup", "http": {"url": "https://tools.example.com/x", "headers": [{"name": "X-New"}]}}]}  # fmt: skip
    r = c.put(f"/v1/agents/{agent['id']}", json=body)
    assert r.status_code == 422 and r.json()["param"] == "tools[0].http.headers[0].value"
    assert c.get(f"/v1/agents/{agent['id']}").json() == before


@pytest.mark.parametrize(
    "value",
    ["١٢٣", "１２", "²", "9" * 5000, "-5", "5.0", " 5", "0x10", ""],
)
def test_token_parameters_in_odd_numbers_are_400(server: Server, value: str):
    r = server.client().get("/v1/token", params={"expires_in_seconds": value})
    assert r.status_code == 400
    assert r.json()["param"] == "expires_in_seconds"
    assert r.json()["detail"] == "must be an integer from 1 to 600"


def test_pagination_envelope_and_the_plain_array(server: Server):
    c = server.client()
    ids = [c.post("/v1/agents", json={**AGENT, "name": f"a{i}"}).json()["id"] for i in range(7)]
    everything = c.get("/v1/agents").json()
    assert isinstance(everything, list) and [a["id"] for a in everything] == ids[::-1]
    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        params: dict[str, Any] = {"limit": 3}
        if cursor:
            params["cursor"] = cursor
        page = c.get("/v1/agents", params=params).json()
        pages += 1
        seen += [a["id"] for a in page["agents"]]
        cursor = page["response_metadata"]["next_cursor"]
        assert page["has_more"] is bool(cursor)
        if not cursor:
            break
    assert seen == ids[::-1] and pages == 3
    for params, param in (
        ({"limit": 0}, "limit"),
        ({"limit": 201}, "limit"),
        ({"cursor": "garbage"}, "cursor"),
    ):
        r = c.get("/v1/agents", params=params)
        assert r.status_code == 400 and r.json()["param"] == param


async def _rows(url: str) -> list[dict[str, Any]]:
    engine = create_async_engine(url)
    try:
        async with engine.connect() as conn:
            result = await conn.execute(
                sa.text("select id, name, config, llm, tool_secrets from agents")
            )
            return [dict(r) for r in result.mappings()]
    finally:
        await engine.dispose()


def test_stored_rows_hold_sealed_secrets_only(request: pytest.FixtureRequest, server: Server):
    c = server.client()
    agent = c.post("/v1/agents", json=AGENT).json()
    url = request.node.callspec.params["server"]
    db_url = f"sqlite+aiosqlite:///{server.data_dir / 'voxloop.db'}"
    if url == "postgresql":
        assert server.database_url is not None
        db_url = server.database_url
    rows = asyncio.run(_rows(db_url))
    assert [r["id"] for r in rows] == [agent["id"]]
    text = json.dumps(rows, default=str)
    assert LLM_KEY not in text and "tool-secret" not in text and HEADER_SECRET not in text
    llm = rows[0]["llm"] if isinstance(rows[0]["llm"], list) else json.loads(rows[0]["llm"])
    assert llm[0]["api_key"].startswith("v1.k") and llm[0]["model"] == "gpt-test"
    secrets = (
        rows[0]["tool_secrets"]
        if isinstance(rows[0]["tool_secrets"], dict)
        else json.loads(rows[0]["tool_secrets"])
    )
    assert list(secrets) == ["lookup"] and secrets["lookup"]["Authorization"]["sealed"].startswith(
        "v1.k"
    )


def test_database_urls_people_write(tmp_path: Path, postgres: PostgresServer | None):
    if postgres is None:
        missing("PostgreSQL is not installed (apt-get install postgresql; .ci/run does)")
    plain = postgres.new_database().replace("postgresql+asyncpg://", "postgres://")
    sqlite_path = tmp_path / "elsewhere.db"
    for url in (plain, f"sqlite:///{sqlite_path}"):
        srv = start_server(tmp_path / f"d{len(url)}", database_url=url)
        try:
            r = srv.client().post("/v1/agents", json=AGENT)
            assert r.status_code == 201
        finally:
            stop(srv)
    assert sqlite_path.is_file()
    assert (
        database_url("postgresql://u:pw@h/db?sslmode=require")
        == "postgresql+asyncpg://u:pw@h/db?ssl=require"
    )


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("mysql://root:hunter2@127.0.0.1/x", "voxloop: error: unsupported database URL mysql://root:***@127.0.0.1/x: voxloop ships the asyncpg and aiosqlite drivers; use postgresql://… or sqlite:///…"),
        ("postgresql+psycopg2://u@h/db", "voxloop: error: unsupported database URL postgresql+psycopg2://u@h/db: voxloop ships the asyncpg and aiosqlite drivers; use postgresql://… or sqlite:///…"),
        ("sqlite://", "voxloop: error: an in-memory SQLite database (sqlite://) would lose every agent"),
        ("not a url", "voxloop: error: the database URL is not a URL; use postgresql://user:password@host/db or sqlite:///path/voxloop.db"),
    ],
)  # fmt: skip
def test_unsupported_database_urls_are_one_line_exit_2(tmp_path: Path, url: str, message: str):
    env = {**os.environ, "VOXLOOP_API_KEYS": API_KEY}
    out = subprocess.run([*VOXLOOP, "serve", "--port", "0", "--data-dir", str(tmp_path), "--database-url", url],
                         capture_output=True, text=True, env=env, timeout=60, check=False)  # fmt: skip
    assert (out.returncode, out.stdout, out.stderr) == (2, "", message + "\n")


def test_unreachable_database_is_one_line_before_listening(tmp_path: Path):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "VOXLOOP_API_KEYS": API_KEY}
    url = f"postgresql://voxloop:s3cret-pw@127.0.0.1:{port}/voxloop"
    out = subprocess.run([*VOXLOOP, "serve", "--port", "0", "--data-dir", str(tmp_path), "--database-url", url],
                         capture_output=True, text=True, env=env, timeout=60, check=False)  # fmt: skip
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.startswith(
        f"voxloop: error: cannot open the database postgresql+asyncpg://voxloop:***@127.0.0.1:{port}/voxloop: "
    )
    assert len(out.stderr.splitlines()) == 1 and "s3cret-pw" not in out.stderr


def test_wrong_postgres_password_is_one_line(tmp_path: Path, postgres: PostgresServer | None):
    if postgres is None:
        missing("PostgreSQL is not installed (apt-get install postgresql; .ci/run does)")
    env = {**os.environ, "VOXLOOP_API_KEYS": API_KEY}
    url = f"postgresql://nobody:pw@127.0.0.1:{postgres.port}/missing_db"
    out = subprocess.run([*VOXLOOP, "serve", "--port", "0", "--data-dir", str(tmp_path), "--database-url", url],
                         capture_output=True, text=True, env=env, timeout=60, check=False)  # fmt: skip
    assert out.returncode == 2 and out.stdout == "" and len(out.stderr.splitlines()) == 1
    assert 'role "nobody" does not exist' in out.stderr


@pytest.mark.parametrize(
    ("args", "setup", "message"),
    [
        (["--data-dir", "{tmp}/typo"], None, "voxloop: error: the data directory {tmp}/typo does not exist (check --data-dir or VOXLOOP_DATA_DIR)"),
        (["--data-dir", "{tmp}"], "empty", "voxloop: error: no database at {tmp}/voxloop.db: nothing to rotate (check --data-dir)"),
        (["--data-dir", "{tmp}"], "db-only", "voxloop: error: cannot read the key file {tmp}/secret.key: No such file or directory"),
    ],
)  # fmt: skip
def test_rotate_key_refuses_instead_of_creating_a_store(
    tmp_path: Path, args: list[str], setup: str | None, message: str
):
    if setup == "db-only":
        (tmp_path / "voxloop.db").write_bytes(b"")
    env = {k: v for k, v in os.environ.items() if not k.startswith("VOXLOOP_")}
    out = subprocess.run([*VOXLOOP, "secrets", "rotate-key", *(a.replace("{tmp}", str(tmp_path)) for a in args)],
                         capture_output=True, text=True, env=env, timeout=60, check=False)  # fmt: skip
    assert (out.returncode, out.stdout, out.stderr) == (
        2,
        "",
        message.replace("{tmp}", str(tmp_path)) + "\n",
    )
    assert not (tmp_path / "typo").exists() and not (tmp_path / "secret.key").exists()


def test_openapi_is_served_and_matches_the_models(server: Server):
    doc = httpx.get(f"{server.url}/openapi.json", timeout=10).json()
    assert doc["components"]["schemas"]["AgentCreate"]["additionalProperties"] is False
    assert "AgentPage" in doc["components"]["schemas"]


def test_a_500_closes_the_connection_and_says_nothing_inside(
    request: pytest.FixtureRequest, server: Server
):
    agent_id = server.client().post("/v1/agents", json=AGENT).json()["id"]
    # Break the database under the running server.
    url = f"sqlite+aiosqlite:///{server.data_dir / 'voxloop.db'}"
    if request.node.callspec.params["server"] == "postgresql":
        assert server.database_url is not None
        url = server.database_url
    asyncio.run(_execute(url, "drop table agents"))
    c = server.client()  # keep-alive
    ok = c.get("/v1/voices")
    assert ok.status_code == 200 and "connection" not in ok.headers
    r = c.get(f"/v1/agents/{agent_id}")
    assert r.status_code == 500 and r.headers["connection"] == "close"
    assert r.json() == {
        "code": "internal_error", "message": "internal error", "param": None,
        "request_id": r.headers["x-request-id"], "detail": "internal error",
    }  # fmt: skip
    # Token minting does not need the table: the server is still up.
    assert server.client().get("/v1/token", params={"expires_in_seconds": 5}).status_code == 200


async def _execute(url: str, statement: str) -> None:
    engine = create_async_engine(url)
    try:
        async with engine.begin() as conn:
            await conn.execute(sa.text(statement))
    finally:
        await engine.dispose()
