"""Stored agents with fallback endpoints: every entry's key sealed, masked and rotated,
``PUT`` replacing the list, and the server setting that keeps the one-entry rule."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path

from .test_server import AGENT, HEADER_SECRET, start_server, stop

KEYS = ("sk-first-entry-11aa", "sk-second-entry-22bb", "sk-third-entry-33cc")
ENTRIES = [
    {"base_url": "https://api.example.com/v1", "model": "m1", "api_key": KEYS[0]},
    {"base_url": "https://api.example.com/v2", "model": "m2", "api_key": KEYS[1]},
    {"base_url": "https://tools.example.com/v1", "model": "m3", "api_key": KEYS[2]},
]
MASKED = [{"base_url": e["base_url"], "model": e["model"]} for e in ENTRIES]


def test_every_entry_is_sealed_masked_replaced_and_rotated(tmp_path: Path):
    data = tmp_path / "data"
    srv = start_server(data)
    try:
        c = srv.client()
        created = c.post("/v1/agents", json={**AGENT, "llm": ENTRIES})
        assert created.status_code == 201, created.text
        aid = created.json()["id"]
        for text in (created.text, c.get(f"/v1/agents/{aid}").text, c.get("/v1/agents").text):
            assert not any(k in text for k in KEYS)
        assert c.get(f"/v1/agents/{aid}").json()["llm"] == MASKED
        # A URL the policy refuses, in any entry, names that entry.
        bad = [*ENTRIES[:2], {**ENTRIES[2], "base_url": "https://internal.example.com/v1"}]
        r = c.put(f"/v1/agents/{aid}", json={"llm": bad})
        assert (r.status_code, r.json()["param"]) == (422, "llm[2].base_url")
        assert c.get(f"/v1/agents/{aid}").json()["llm"] == MASKED
    finally:
        stop(srv)
    db = (data / "voxloop.db").read_bytes()
    assert b"m3" in db and not any(k.encode() in db for k in KEYS)
    old_key = json.loads((data / "secret.key").read_text())["primary"]
    out = subprocess.run(
        [sys.executable, "-m", "runtime.cli", "secrets", "rotate-key", "--data-dir", str(data)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    ring = json.loads((data / "secret.key").read_text())
    # Three endpoint keys and one tool header.
    assert out.stdout.splitlines()[0] == f"re-encrypted 4 secrets under key {ring['primary']}"
    assert ring["primary"] != old_key and list(ring["keys"]) == [ring["primary"]]
    with sqlite3.connect(data / "voxloop.db") as conn:
        (llm,) = conn.execute("select llm from agents").fetchone()
    assert llm.count(f"v1.{ring['primary']}.") == 3 and f"v1.{old_key}." not in llm
    srv = start_server(data)
    try:
        c = srv.client()
        assert c.get(f"/v1/agents/{aid}").json()["llm"] == MASKED
        # PUT replaces the whole list.
        r = c.put(f"/v1/agents/{aid}", json={"llm": ENTRIES[1:2]})
        assert r.status_code == 200 and r.json()["llm"] == MASKED[1:2]
    finally:
        stop(srv)
    log = srv.log.read_text()
    assert not any(k in log for k in KEYS) and HEADER_SECRET not in log


def test_the_single_entry_setting_refuses_a_second_entry(tmp_path: Path):
    srv = start_server(tmp_path / "data", {"VOXLOOP_LLM_SINGLE_ENTRY": "1"})
    try:
        c = srv.client()
        r = c.post("/v1/agents", json={**AGENT, "llm": ENTRIES[:2]})
        assert r.status_code == 422
        assert r.json()["param"] == "llm[1]"
        assert r.json()["detail"] == (
            "this server accepts one llm entry (VOXLOOP_LLM_SINGLE_ENTRY is set): "
            "fallback endpoints are turned off"
        )
        assert c.get("/v1/agents").json() == []
        created = c.post("/v1/agents", json={**AGENT, "llm": ENTRIES[:1]})
        assert created.status_code == 201
        aid = created.json()["id"]
        r = c.put(f"/v1/agents/{aid}", json={"llm": ENTRIES})
        assert (r.status_code, r.json()["param"]) == (422, "llm[1]")
        assert c.get(f"/v1/agents/{aid}").json()["llm"] == MASKED[:1]
    finally:
        stop(srv)


def test_each_entry_keeps_its_own_settings_and_bad_values_name_the_field(tmp_path: Path):
    srv = start_server(tmp_path / "data")
    try:
        c = srv.client()
        entries = [
            {**ENTRIES[0], "first_token_timeout_ms": 1200, "max_tokens": 90},
            {**ENTRIES[1], "max_tokens": 150},
        ]
        for bad, message in (
            (99, "greater than or equal to 100"),
            (30_001, "less than or equal to 30000"),
            (1200.5, "must be an integer"),
            ("1200", "must be an integer"),
            (True, "must be an integer"),
        ):
            body = {**AGENT, "llm": [entries[0], {**entries[1], "first_token_timeout_ms": bad}]}
            r = c.post("/v1/agents", json=body)
            assert r.status_code == 422, r.text
            assert r.json()["param"] == "llm[1].first_token_timeout_ms"
            assert message in r.json()["detail"] and KEYS[1] not in r.text
        assert c.get("/v1/agents").json() == []
        created = c.post("/v1/agents", json={**AGENT, "llm": entries})
        assert created.status_code == 201, created.text
        aid = created.json()["id"]
        shown = [
            {**MASKED[0], "max_tokens": 90, "first_token_timeout_ms": 1200},
            {**MASKED[1], "max_tokens": 150},
        ]
        assert created.json()["llm"] == shown
        assert c.get(f"/v1/agents/{aid}").json()["llm"] == shown
        # PUT of other fields keeps the list and its settings; PUT of the list replaces them.
        assert c.put(f"/v1/agents/{aid}", json={"name": "renamed"}).json()["llm"] == shown
        r = c.put(f"/v1/agents/{aid}", json={"llm": [ENTRIES[1]]})
        assert r.json()["llm"] == MASKED[1:2]
    finally:
        stop(srv)
