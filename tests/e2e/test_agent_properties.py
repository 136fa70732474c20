"""Property-based tests of the REST API, through real HTTP against ``voxloop serve``.

Bodies are generated from the agent schema and then mutated at one place (a
value replaced by any JSON value, including NaN, huge numbers, lone
surrogates, NUL and deep nesting; a key removed; an unknown key added). The
invariant: a 2xx and the change is stored, or a 4xx and nothing changed; never
a 5xx; the server stays healthy.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ..helpers import missing
from ..postgres import PostgresServer
from .test_server import API_KEY, Server, start_server, stop

LLM = {"base_url": "https://api.example.com/v1", "model": "m", "api_key": "sk-prop-secret"}

ODD_TEXT = st.sampled_from(
    ["\ud800", "a\x00b", "a\r\nb", "１２７", "x" * 30_000, "", " ", "\u202e", "ivy"]
)
JSON_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**30), max_value=10**30)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
    | ODD_TEXT
)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=6,
) | st.builds(lambda n: json.loads("[" * n + "]" * n), st.integers(30, 60))

TOOLS = st.lists(
    st.fixed_dictionaries(
        {"name": st.from_regex(r"[a-z_]{1,8}", fullmatch=True)},
        optional={
            "description": st.text(max_size=20),
            "timeout_seconds": st.integers(1, 300),
            "execution_mode": st.sampled_from(["interactive", "hold"]),
            "http": st.fixed_dictionaries(
                {"url": st.just("https://tools.example.com/x")},
                optional={
                    "http_method": st.sampled_from(["GET", "POST"]),
                    "headers": st.just([{"name": "Authorization", "value": "Bearer t"}]),
                },
            ),
        },
    ),
    max_size=2,
    unique_by=lambda t: t["name"],
)

AGENTS = st.fixed_dictionaries(
    {
        "name": st.text(min_size=1, max_size=20).filter(lambda s: s.strip() and "\x00" not in s),
        "system_prompt": st.text(max_size=40).filter(lambda s: "\x00" not in s),
        "voice": st.sampled_from(["ivy", {"voice_id": "ivy"}]),
    },
    optional={
        "greeting": st.none() | st.text(max_size=20).filter(lambda s: "\x00" not in s),
        "input": st.fixed_dictionaries(
            {},
            optional={
                "keyterms": st.lists(
                    st.text(max_size=8).filter(lambda s: "\x00" not in s), max_size=3
                ),
                "turn_detection": st.fixed_dictionaries(
                    {},
                    optional={
                        "min_silence": st.integers(50, 10_000),
                        "vad_threshold": st.floats(0, 1),
                        "interrupt_response": st.booleans(),
                    },
                ),
            },
        ),
        "output": st.fixed_dictionaries({}, optional={"volume": st.integers(0, 100)}),
        "tools": TOOLS,
        "llm": st.sampled_from([[], [LLM]]),
    },
)


def paths(doc: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix] if prefix else []
    if isinstance(doc, dict):
        for k, v in doc.items():
            out += paths(v, (*prefix, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            out += paths(v, (*prefix, i))
    return out


def containers(doc: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix] if isinstance(doc, dict) else []
    if isinstance(doc, dict):
        for k, v in doc.items():
            out += containers(v, (*prefix, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            out += containers(v, (*prefix, i))
    return out


def at(doc: Any, path: tuple[Any, ...]) -> Any:
    for part in path:
        doc = doc[part]
    return doc


def mutate(data: st.DataObject, body: dict[str, Any]) -> dict[str, Any]:
    body = json.loads(json.dumps(body))
    kind = data.draw(st.sampled_from(["none", "replace", "remove", "unknown"]))
    if kind == "replace":
        path = data.draw(st.sampled_from(paths(body)))
        at(body, path[:-1])[path[-1]] = data.draw(JSON_VALUES)
    elif kind == "remove":
        path = data.draw(st.sampled_from(paths(body)))
        parent = at(body, path[:-1])
        del parent[path[-1]]
    elif kind == "unknown":
        path = data.draw(st.sampled_from(containers(body) or [()]))
        at(body, path)[data.draw(st.sampled_from(["colour", "extra", "_x"]))] = 1
    return body


def encode(body: Any) -> bytes:
    return json.dumps(body, allow_nan=True).encode("utf-8", "surrogatepass")


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def prop_server(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    postgres: PostgresServer | None,
) -> Iterator[Server]:
    url = None
    if request.param == "postgresql":
        if postgres is None:
            missing("PostgreSQL is not installed (apt-get install postgresql; .ci/run does)")
        url = postgres.new_database()
    srv = start_server(Path(tmp_path_factory.mktemp("prop")) / "data", database_url=url)
    try:
        yield srv
    finally:
        stop(srv)


def client(server: Server) -> httpx.Client:
    return server.client(API_KEY)


@settings(
    max_examples=80,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data(), body=AGENTS)
def test_create_is_stored_or_refused_never_a_5xx(
    prop_server: Server, data: st.DataObject, body: dict[str, Any]
):
    c = client(prop_server)
    sent = mutate(data, body)
    before = c.get("/v1/agents").json()
    r = c.post("/v1/agents", content=encode(sent), headers={"Content-Type": "application/json"})
    assert r.status_code < 500, (r.status_code, r.text[:300])
    assert len(r.content) < 2000 or r.status_code == 201
    after = c.get("/v1/agents").json()
    if r.status_code == 201:
        stored = c.get(f"/v1/agents/{r.json()['id']}").json()
        assert stored == r.json()
        assert stored["name"] == sent["name"] and stored["system_prompt"] == sent["system_prompt"]
        assert stored["greeting"] == sent.get("greeting")
        assert stored["input"] == sent.get("input", {}) and stored["output"] == sent.get(
            "output", {}
        )
        assert [t["name"] for t in stored["tools"]] == [t["name"] for t in sent.get("tools", [])]
        assert stored["llm"] == [
            {"base_url": e["base_url"], "model": e["model"]} for e in sent.get("llm", [])
        ]
        assert "sk-prop-secret" not in r.text
        assert len(after) == len(before) + 1
        assert c.delete(f"/v1/agents/{stored['id']}").status_code == 204
    else:
        assert r.status_code == 422, r.text
        assert after == before
        assert isinstance(r.json()["param"], str)


@settings(
    max_examples=80,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data(), body=AGENTS)
def test_update_is_stored_or_changes_nothing(
    prop_server: Server, data: st.DataObject, body: dict[str, Any]
):
    c = client(prop_server)
    agents = c.get("/v1/agents").json()
    if agents:
        agent_id = agents[0]["id"]
    else:
        agent_id = c.post(
            "/v1/agents", json={"name": "target", "system_prompt": "p", "voice": "ivy"}
        ).json()["id"]
    before = c.get(f"/v1/agents/{agent_id}").json()
    # A partial update: some of the generated fields, then mutated.
    keys = data.draw(st.sets(st.sampled_from(sorted(body)), min_size=1))
    sent = mutate(data, {k: body[k] for k in keys})
    r = c.put(
        f"/v1/agents/{agent_id}", content=encode(sent), headers={"Content-Type": "application/json"}
    )
    assert r.status_code < 500, (r.status_code, r.text[:300])
    after = c.get(f"/v1/agents/{agent_id}").json()
    if r.status_code == 200:
        assert after == r.json()
        for key in ("name", "system_prompt", "greeting", "input", "output"):
            expected = sent[key] if key in sent else before[key]
            assert after[key] == expected, key
        if "voice" not in sent:
            assert after["voice"] == before["voice"]
        if "llm" not in sent:
            assert after["llm"] == before["llm"]
        if "tools" not in sent:
            assert after["tools"] == before["tools"]
    else:
        assert r.status_code == 422, r.text
        assert after == before
    assert c.get("/v1/agents").status_code == 200
