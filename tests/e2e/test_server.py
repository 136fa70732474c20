"""The agent service black-box: a real ``voxloop serve`` process over real HTTP."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from ..helpers import missing
from ..postgres import PostgresServer
from ..unit.test_endpoints import HOSTILE_URLS

API_KEY = "vk-test-operator-key"
LLM_KEY = "sk-llm-secret-9f8e7d6c5b4a"
HEADER_SECRET = "Bearer tool-secret-1a2b3c4d"
HOSTS = {
    "api.example.com": ["93.184.216.34"],
    "tools.example.com": ["93.184.216.35"],
    "internal.example.com": ["10.0.0.5"],
}


@dataclass
class Server:
    url: str
    data_dir: Path
    log: Path
    proc: subprocess.Popen[str]
    log_handle: Any = None
    clients: list[httpx.Client] = field(default_factory=list)
    database_url: str | None = None

    def client(self, key: str | None = API_KEY) -> httpx.Client:
        headers = {"Authorization": key} if key else {}
        c = httpx.Client(base_url=self.url, headers=headers, timeout=10)
        self.clients.append(c)
        return c


def start_server(
    data_dir: Path, extra_env: dict[str, str] | None = None, database_url: str | None = None
) -> Server:
    log = data_dir.parent / f"{data_dir.name}-server.log"
    env = {
        **os.environ,
        "VOXLOOP_API_KEYS": f"{API_KEY},second-key",
        "VOXLOOP_STATIC_HOSTS": json.dumps(HOSTS),
        **(extra_env or {}),
    }
    err = log.open("a")
    proc = subprocess.Popen(
        [sys.executable, "-m", "runtime.cli", "-v", "serve", "--port", "0", "--data-dir", str(data_dir),
         *(["--database-url", database_url] if database_url else [])],
        stdout=subprocess.PIPE, stderr=err, text=True, env=env,
    )  # fmt: skip
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.startswith("voxloop serve listening on "), log.read_text()
    return Server(
        line.rsplit(" ", 1)[1].strip(), data_dir, log, proc, err, database_url=database_url
    )


def stop(server: Server) -> None:
    for c in server.clients:
        c.close()
    server.clients.clear()
    if server.proc.poll() is None:
        server.proc.send_signal(signal.SIGTERM)
        # A SIGTERM is a clean stop: exit status 0, not 143.
        assert server.proc.wait(timeout=20) == 0
    assert server.proc.stdout is not None
    server.proc.stdout.close()
    if server.log_handle is not None:
        server.log_handle.close()
        server.log_handle = None


@pytest.fixture(params=["sqlite", "postgresql"])
def server(
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


AGENT: dict[str, Any] = {
    "name": "Support",
    "system_prompt": "You help callers.",
    "voice": {"voice_id": "ivy"},
    "greeting": "Hi!",
    "tools": [
        {
            "name": "lookup",
            "description": "Find an order",
            "parameters": {"type": "object", "properties": {"id": {"type": "string"}}},
            "http": {
                "url": "https://tools.example.com/lookup",
                "http_method": "GET",
                "headers": [{"name": "Authorization", "value": HEADER_SECRET}],
            },
        },
        {"name": "transfer", "description": "Client-side"},
    ],
    "llm": [{"base_url": "https://api.example.com/v1", "model": "gpt-test", "api_key": LLM_KEY}],
}


def test_auth_is_required(server: Server):
    for key, code, detail in (
        (None, "missing_authorization", "Missing authorization header"),
        ("nope", "unauthorized", "Unauthorized"),
    ):
        r = server.client(key).get("/v1/agents")
        rid = r.headers["x-request-id"]
        assert r.status_code == 401 and r.json() == {
            "code": code, "message": detail, "param": None, "request_id": rid, "detail": detail,
        }  # fmt: skip
    assert server.client(f"Bearer {API_KEY}").get("/v1/agents").status_code == 200
    assert server.client("second-key").get("/v1/agents").status_code == 200
    assert server.client(None).get("/openapi.json").json()["openapi"].startswith("3.")


def test_crud_and_llm_rules(server: Server):
    c = server.client()
    r = c.post("/v1/agents", json=AGENT)
    assert r.status_code == 201, r.text
    agent = r.json()
    assert agent["llm"] == [{"base_url": "https://api.example.com/v1", "model": "gpt-test"}]
    assert agent["voice"] == {"voice_id": "ivy"} and agent["greeting"] == "Hi!"
    assert agent["tools"][0]["http"]["headers"][0]["name"] == "Authorization"
    assert set(agent["tools"][0]["http"]["headers"][0]) == {"name", "last_set_at"}
    aid = agent["id"]
    assert c.get(f"/v1/agents/{aid}").json() == agent
    # A second agent (voice as a plain string) lists first: newest first.
    second = c.post(
        "/v1/agents", json={"name": "B", "system_prompt": "x", "voice": "en_US-joe-medium"}
    ).json()
    assert [a["id"] for a in c.get("/v1/agents").json()] == [second["id"], aid]
    # PUT without llm keeps it; with llm replaces it (rotation); [] clears it.
    r = c.put(f"/v1/agents/{aid}", json={"name": "Renamed"})
    assert (
        r.status_code == 200 and r.json()["name"] == "Renamed" and r.json()["llm"] == agent["llm"]
    )
    r = c.put(
        f"/v1/agents/{aid}",
        json={
            "llm": [
                {
                    "base_url": "https://api.example.com/v2",
                    "model": "m2",
                    "api_key": "sk-rotated-1111",
                }
            ]
        },
    )
    assert r.json()["llm"] == [{"base_url": "https://api.example.com/v2", "model": "m2"}]
    assert c.put(f"/v1/agents/{aid}", json={"llm": []}).json()["llm"] == []
    # A tool header named without a value keeps the stored secret; remove deletes it.
    tools = [
        {
            **AGENT["tools"][0],
            "http": {**AGENT["tools"][0]["http"], "headers": [{"name": "Authorization"}]},
        }
    ]
    kept = c.put(f"/v1/agents/{aid}", json={"tools": tools}).json()
    assert kept["tools"][0]["http"]["headers"][0]["name"] == "Authorization"
    tools[0]["http"]["headers"] = [{"name": "Authorization", "remove": True}]
    assert (
        c.put(f"/v1/agents/{aid}", json={"tools": tools}).json()["tools"][0]["http"]["headers"]
        == []
    )
    assert c.delete(f"/v1/agents/{aid}").status_code == 204
    assert c.get(f"/v1/agents/{aid}").status_code == 404
    assert c.delete(f"/v1/agents/{aid}").status_code == 404
    assert c.put(f"/v1/agents/{aid}", json={"name": "x"}).status_code == 404


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({**AGENT, "llm": [AGENT["llm"][0]] * 9}, "llm"),
        (
            {**AGENT, "llm": [{"base_url": "https://api.example.com/v1", "model": "m"}]},
            "llm[0].api_key",
        ),
        (
            {**AGENT, "llm": [{"base_url": "https://api.example.com/v1", "api_key": "k"}]},
            "llm[0].model",
        ),
        (
            {**AGENT, "llm": [{**AGENT["llm"][0], "base_url": "https://internal.example.com/v1"}]},
            "llm[0].base_url",
        ),
        (
            {
                **AGENT,
                "llm": [{**AGENT["llm"][0], "base_url": "https://unresolvable.example.com/v1"}],
            },
            "llm[0].base_url",
        ),
        ({**AGENT, "voice": "no-such-voice"}, "voice"),
        ({**AGENT, "colour": "red"}, "colour"),
        ({**AGENT, "name": 5}, "name"),
        ({k: v for k, v in AGENT.items() if k != "system_prompt"}, "system_prompt"),
        (
            {**AGENT, "tools": [{"name": "t", "http": {"url": "http://tools.example.com/x"}}]},
            "tools[0].http.url",
        ),
        ({**AGENT, "tools": [{"name": "t", "timeout_seconds": 999}]}, "tools[0].timeout_seconds"),
        (
            {
                **AGENT,
                "tools": [
                    {
                        "name": "t",
                        "http": {
                            "url": "https://tools.example.com/x",
                            "headers": [{"name": "A", "value": "v", "remove": True}],
                        },
                    }
                ],
            },
            "tools[0].http.headers[0]",
        ),
    ],
)
def test_invalid_bodies_are_422_naming_the_field_and_nothing_is_stored(
    server: Server, body: dict[str, Any], param: str
):
    c = server.client()
    r = c.post("/v1/agents", json=body)
    assert r.status_code == 422, r.text
    assert r.json()["param"] == param
    assert LLM_KEY not in r.text
    assert c.get("/v1/agents").json() == []


def test_malformed_and_huge_bodies(server: Server):
    c = server.client()
    r = c.post("/v1/agents", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422 and r.json()["param"] == "body"
    r = c.post("/v1/agents", content=b"[1, 2]")
    assert r.status_code == 422 and "object" in r.json()["detail"]
    r = c.post("/v1/agents", content=b"{" + b" " * (2 << 20) + b"}")
    assert r.status_code == 422 and "larger" in r.json()["detail"]
    assert c.get("/v1/agents").json() == []


def test_hostile_endpoint_urls_are_all_rejected(server: Server):
    c = server.client()
    for url in HOSTILE_URLS:
        body = {**AGENT, "tools": [], "llm": [{"base_url": url, "model": "m", "api_key": LLM_KEY}]}
        r = c.post("/v1/agents", json=body)
        assert r.status_code == 422, url
        assert r.json()["param"].startswith("llm")
    assert len(HOSTILE_URLS) >= 40
    assert c.get("/v1/agents").json() == []


def test_secrets_never_leave_in_responses_database_or_logs(
    server: Server, postgres: PostgresServer | None
):
    c = server.client()
    agent = c.post("/v1/agents", json=AGENT).json()
    texts = [json.dumps(agent), c.get(f"/v1/agents/{agent['id']}").text, c.get("/v1/agents").text]
    for text in texts:
        assert LLM_KEY not in text and HEADER_SECRET not in text and "tool-secret" not in text
    stop(server)
    # Every byte the database holds: the SQLite file, or a dump of the PostgreSQL database.
    if server.database_url is None:
        db = (server.data_dir / "voxloop.db").read_bytes()
    else:
        assert postgres is not None
        db = postgres.dump(server.database_url)
    assert agent["id"].encode() in db and b"gpt-test" in db  # the agent is there, readable
    assert LLM_KEY.encode() not in db and b"tool-secret" not in db
    log = server.log.read_text()
    lines = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    assert any(line["msg"] == "agent created" and line["agent_id"] == agent["id"] for line in lines)
    assert LLM_KEY not in log and "tool-secret" not in log


def test_key_rotation_keeps_agents_readable(tmp_path: Path):
    data = tmp_path / "data"
    srv = start_server(data)
    try:
        aid = srv.client().post("/v1/agents", json=AGENT).json()["id"]
    finally:
        stop(srv)
    old_key = json.loads((data / "secret.key").read_text())["primary"]
    env = {k: v for k, v in os.environ.items() if k != "VOXLOOP_API_KEYS"}  # not needed
    out = subprocess.run([sys.executable, "-m", "runtime.cli", "secrets", "rotate-key", "--data-dir", str(data)],
                         capture_output=True, text=True, env=env, timeout=60, check=False)  # fmt: skip
    assert out.returncode == 0, out.stderr
    ring = json.loads((data / "secret.key").read_text())
    assert out.stdout.splitlines() == [
        f"re-encrypted 2 secrets under key {ring['primary']}",
        f"retired unused keys: {old_key}",
    ]
    # Every secret moved to the new key, so the old one was retired.
    assert ring["primary"] != old_key and list(ring["keys"]) == [ring["primary"]]
    # Every stored secret now names the new key id.
    import sqlite3

    with sqlite3.connect(data / "voxloop.db") as db:
        llm, tool = db.execute("select llm, tool_secrets from agents").fetchone()
    assert f"v1.{ring['primary']}." in llm and f"v1.{ring['primary']}." in tool
    srv = start_server(data)
    try:
        got = srv.client().get(f"/v1/agents/{aid}")
        assert got.status_code == 200 and got.json()["llm"][0]["model"] == "gpt-test"
    finally:
        stop(srv)


def test_tokens_and_voices(server: Server):
    c = server.client()
    r = c.get("/v1/token", params={"expires_in_seconds": 60})
    assert r.status_code == 200 and r.json()["expires_in_seconds"] == 60 and r.json()["token"]
    for params, param in (
        ({}, "expires_in_seconds"),
        ({"expires_in_seconds": 601}, "expires_in_seconds"),
        (
            {"expires_in_seconds": 5, "max_session_duration_seconds": 10},
            "max_session_duration_seconds",
        ),
    ):
        r = c.get("/v1/token", params=params)
        assert r.status_code == 400 and r.json()["param"] == param
    voices = c.get("/v1/voices").json()
    joe = next(v for v in voices if v["voice_id"] == "en_US-joe-medium")
    assert "ivy" in joe["aliases"]


def test_agents_cli_against_the_server(server: Server, tmp_path: Path):
    env = {**os.environ, "VOXLOOP_API_KEY": API_KEY, "MY_LLM_KEY": LLM_KEY}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "runtime.cli", "agents", "--url", server.url, *args],
                              capture_output=True, text=True, env=env, timeout=60, check=False)  # fmt: skip

    made = cli("create", "--name", "Front desk", "--system-prompt", "Be brief.", "--greeting", "Hello!",
               "--llm-base-url", "https://api.example.com/v1", "--llm-model", "m", "--llm-api-key-env", "MY_LLM_KEY")  # fmt: skip
    assert made.returncode == 0, made.stderr
    agent = json.loads(made.stdout)
    assert LLM_KEY not in made.stdout
    assert [a["id"] for a in json.loads(cli("list").stdout)] == [agent["id"]]
    patch = tmp_path / "patch.json"
    patch.write_text(json.dumps({"greeting": "Hi again!"}))
    assert (
        json.loads(cli("update", agent["id"], "--file", str(patch)).stdout)["greeting"]
        == "Hi again!"
    )
    assert json.loads(cli("get", agent["id"]).stdout)["greeting"] == "Hi again!"
    bad = cli("create", "--name", "x", "--system-prompt", "y", "--voice", "nope")
    assert bad.returncode == 1 and "(voice)" in bad.stderr and "Traceback" not in bad.stderr
    assert cli("delete", agent["id"]).returncode == 0
    gone = cli("get", agent["id"])
    assert gone.returncode == 1 and "HTTP 404" in gone.stderr
