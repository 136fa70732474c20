"""Concurrent writers and key rotation: every acknowledged change survives, every secret opens.

A real ``voxloop serve`` on SQLite and on PostgreSQL takes concurrent ``PUT`` s of
different fields of one agent while ``voxloop secrets rotate-key`` runs twice;
afterwards every acknowledged value is in the final state and every secret
decrypts to its last acknowledged value. Rotation is also killed at random
points, repeatedly: afterwards every secret opens with a key on disk or printed.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from runtime.agents.secrets import KeyRing, SecretBox
from runtime.agents.store import AgentRow, Store, now, sqlite_url
from runtime.server.app import Api, Settings

from .test_server import AGENT, API_KEY, Server
from .test_server import server as server

VOXLOOP = [sys.executable, "-m", "runtime.cli"]
ROUNDS = 10

# field -> value of round i (each writer owns one field).
FIELDS: dict[str, Callable[[int], Any]] = {
    "name": lambda i: f"name-{i}",
    "system_prompt": lambda i: f"prompt-{i}",
    "greeting": lambda i: f"greeting-{i}",
    "input": lambda i: {"keyterms": [f"term-{i}"]},
    "output": lambda i: {"volume": i},
    "llm": lambda i: [{"base_url": "https://api.example.com/v1", "model": f"m-{i}", "api_key": f"sk-llm-{i}"}],
    "tools": lambda i: [{"name": "lookup", "http": {"url": "https://tools.example.com/x", "headers": [{"name": "Authorization", "value": f"tool-{i}"}]}}],
}  # fmt: skip


async def _writer(client: httpx.AsyncClient, agent_id: str, name: str, acked: dict[str, int]):
    for i in range(ROUNDS):
        r = await client.put(f"/v1/agents/{agent_id}", json={name: FIELDS[name](i)})
        assert r.status_code == 200, r.text
        acked[name] = i


async def _rotate(data_dir: Path, database_url: str | None) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VOXLOOP_")}
    args = [*VOXLOOP, "secrets", "rotate-key", "--data-dir", str(data_dir)]
    if database_url:
        args += ["--database-url", database_url]
    proc = await asyncio.create_subprocess_exec(
        *args, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    assert out.decode().startswith("re-encrypted "), out.decode()


async def _load(data_dir: Path, database_url: str, agent_id: str):
    ring = KeyRing.load(data_dir / "secret.key")
    settings = Settings(
        frozenset({"k"}), data_dir, database_url, ring, key_file=data_dir / "secret.key"
    )
    store = Store(database_url)
    await store.start()
    try:
        return await Api(settings, store).load_agent(agent_id)
    finally:
        await store.aclose()


def test_concurrent_puts_and_rotation_lose_nothing(server: Server):
    agent_id = server.client().post("/v1/agents", json=AGENT).json()["id"]
    acked: dict[str, int] = {}

    async def run() -> None:
        async with httpx.AsyncClient(
            base_url=server.url, headers={"Authorization": API_KEY}, timeout=60
        ) as client:
            writers = [_writer(client, agent_id, name, acked) for name in FIELDS]
            rotations = [_rotate(server.data_dir, server.database_url) for _ in range(2)]
            await asyncio.gather(*writers, *rotations)

    asyncio.run(run())
    assert acked == dict.fromkeys(FIELDS, ROUNDS - 1)
    got = server.client().get(f"/v1/agents/{agent_id}").json()
    last = ROUNDS - 1
    assert got["name"] == f"name-{last}" and got["system_prompt"] == f"prompt-{last}"
    assert got["greeting"] == f"greeting-{last}"
    assert got["input"] == {"keyterms": [f"term-{last}"]} and got["output"] == {"volume": last}
    assert got["llm"] == [{"base_url": "https://api.example.com/v1", "model": f"m-{last}"}]
    assert [h["name"] for h in got["tools"][0]["http"]["headers"]] == ["Authorization"]
    url = server.database_url or sqlite_url(server.data_dir)
    loaded = asyncio.run(_load(server.data_dir, url, agent_id))
    assert loaded is not None
    assert loaded.llm[0].api_key.reveal() == f"sk-llm-{last}"
    assert loaded.tool_headers["lookup"]["Authorization"].reveal() == f"tool-{last}"
    # A third rotation after the dust settles retires every key but the newest.
    asyncio.run(_rotate(server.data_dir, server.database_url))
    ring = json.loads((server.data_dir / "secret.key").read_text())
    assert list(ring["keys"]) == [ring["primary"]]
    loaded = asyncio.run(_load(server.data_dir, url, agent_id))
    assert loaded is not None and loaded.llm[0].api_key.reveal() == f"sk-llm-{last}"


# -- crash safety -----------------------------------------------------------------------

AGENTS = 300


async def _populate(data_dir: Path, ring: KeyRing) -> dict[str, tuple[str, str]]:
    store = Store(sqlite_url(data_dir))
    await store.start()
    await store.init_primary(ring.primary)
    box = SecretBox(ring)
    expected: dict[str, tuple[str, str]] = {}
    try:
        async with store.writing() as tx:
            for i in range(AGENTS):
                aid = Store.new_agent_id()
                key, header = f"sk-{i}", f"hdr-{i}"
                llm = [{"base_url": "https://api.example.com/v1", "model": "m",
                        "api_key": box.seal(key, context=f"{aid}:llm.api_key")}]  # fmt: skip
                sealed = box.seal(header, context=f"{aid}:tool:t:X-Key")
                secrets = {
                    "t": {"X-Key": {"sealed": sealed, "last_set_at": "2026-01-01T00:00:00+00:00"}}
                }
                config = {
                    "system_prompt": "p",
                    "voice": {"voice_id": "ivy"},
                    "tools": [{"name": "t"}],
                }
                stamp = now()
                await tx.insert(AgentRow(aid, f"a{i}", stamp, stamp, config, llm, secrets))
                expected[aid] = (key, header)
    finally:
        await store.aclose()
    return expected


async def _check_all_open(
    data_dir: Path, ring: KeyRing, expected: dict[str, tuple[str, str]]
) -> set[str]:
    """Open every secret with ``ring``; return the key ids in use."""
    store = Store(sqlite_url(data_dir))
    await store.start()
    box = SecretBox(ring)
    used: set[str] = set()
    try:
        rows, _ = await store.list_agents()
    finally:
        await store.aclose()
    assert len(rows) == AGENTS
    for row in rows:
        key, header = expected[row.id]
        assert box.open(row.llm[0]["api_key"], context=f"{row.id}:llm.api_key").reveal() == key
        sealed = row.tool_secrets["t"]["X-Key"]["sealed"]
        assert box.open(sealed, context=f"{row.id}:tool:t:X-Key").reveal() == header
        used |= {box.key_id(row.llm[0]["api_key"]), box.key_id(sealed)}
    return used


def _merge(rings: list[KeyRing]) -> KeyRing:
    keys: dict[str, bytes] = {}
    for r in rings:
        keys.update(r.keys)
    return KeyRing(primary=rings[-1].primary, keys=keys)


@pytest.mark.parametrize("mode", ["key-file", "env"])
def test_rotation_killed_at_random_points_never_loses_a_secret(tmp_path: Path, mode: str):
    data = tmp_path / "data"
    data.mkdir()
    ring = KeyRing.generate()
    if mode == "key-file":
        ring.save(data / "secret.key")
    expected = asyncio.run(_populate(data, ring))
    rng = random.Random(20261129)
    base_env = {k: v for k, v in os.environ.items() if not k.startswith("VOXLOOP_")}
    printed: list[KeyRing] = [ring]  # env mode: every ring the command printed
    outcomes = []
    for _ in range(5):
        env = dict(base_env)
        if mode == "env":
            env["VOXLOOP_SECRET_KEY"] = printed[-1].to_env()
        proc = subprocess.Popen([*VOXLOOP, "secrets", "rotate-key", "--data-dir", str(data)],
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
        try:
            proc.wait(timeout=rng.uniform(0.4, 2.5))
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
        out, err = proc.communicate(timeout=30)
        outcomes.append(proc.returncode)
        assert proc.returncode in (0, -signal.SIGKILL), err
        if mode == "env":
            printed += [
                KeyRing.from_env(line.split("=", 1)[1])
                for line in out.splitlines()
                if line.startswith("VOXLOOP_SECRET_KEY=")
            ]
            known = _merge(printed)
        else:
            known = KeyRing.load(data / "secret.key")  # only what is on disk
        asyncio.run(_check_all_open(data, known, expected))
    assert -signal.SIGKILL in outcomes  # at least one run was interrupted
    # A run to the end reseals everything under one key and retires the rest.
    env = dict(base_env)
    if mode == "env":
        env["VOXLOOP_SECRET_KEY"] = _merge(printed).to_env()
    done = subprocess.run([*VOXLOOP, "secrets", "rotate-key", "--data-dir", str(data)],
                          env=env, capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr
    final = (
        KeyRing.from_env([line for line in done.stdout.splitlines() if line.startswith("VOXLOOP_SECRET_KEY=")][-1].split("=", 1)[1])
        if mode == "env"
        else KeyRing.load(data / "secret.key")
    )  # fmt: skip
    assert list(final.keys) == [final.primary]
    assert asyncio.run(_check_all_open(data, final, expected)) == {final.primary}
    assert f"re-encrypted {2 * AGENTS} secrets under key {final.primary}" in done.stdout


def test_secrets_that_do_not_open_are_reported_and_nothing_is_retired(tmp_path: Path):
    data = tmp_path / "data"
    data.mkdir()
    ring = KeyRing.generate()
    ring.save(data / "secret.key")
    asyncio.run(_populate_small(data, ring))
    env = {k: v for k, v in os.environ.items() if not k.startswith("VOXLOOP_")}
    out = subprocess.run([*VOXLOOP, "secrets", "rotate-key", "--data-dir", str(data)],
                         env=env, capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
    assert out.returncode == 1 and "Traceback" not in out.stderr
    lines = out.stdout.splitlines()
    new = KeyRing.load(data / "secret.key")
    assert lines[0] == f"re-encrypted 1 secrets under key {new.primary}"
    assert (
        lines[1]
        == "cannot open: agent_bad llm[0].api_key: the sealed value does not open (tampered, or another record's)"
    )
    assert lines[2] == "1 secrets did not open and were left as they are; no key was retired"
    assert set(new.keys) == {ring.primary, new.primary}


async def _populate_small(data: Path, ring: KeyRing) -> None:
    store = Store(sqlite_url(data))
    await store.start()
    box = SecretBox(ring)
    try:
        async with store.writing() as tx:
            for aid in ("agent_bad", "agent_good"):
                # agent_bad's key was sealed for another record: it cannot open here.
                context = f"{'agent_other' if aid == 'agent_bad' else aid}:llm.api_key"
                llm = [
                    {
                        "base_url": "https://api.example.com/v1",
                        "model": "m",
                        "api_key": box.seal("k", context=context),
                    }
                ]
                stamp = now()
                await tx.insert(
                    AgentRow(aid, aid, stamp, stamp, {"voice": {"voice_id": "ivy"}}, llm, {})
                )
    finally:
        await store.aclose()


def test_env_key_rotation_with_a_running_worker(tmp_path: Path):
    """With VOXLOOP_SECRET_KEY a running server cannot learn the new key: its secret-carrying
    writes are refused (503, nothing stored) until it restarts with the printed ring."""
    from .test_server import start_server, stop

    old = KeyRing.generate()
    data = tmp_path / "data"
    srv = start_server(data, extra_env={"VOXLOOP_SECRET_KEY": old.to_env()})
    try:
        c = srv.client()
        agent = c.post("/v1/agents", json=AGENT).json()
        env = {k: v for k, v in os.environ.items() if not k.startswith("VOXLOOP_")}
        out = subprocess.run([*VOXLOOP, "secrets", "rotate-key", "--data-dir", str(data)],
                             env={**env, "VOXLOOP_SECRET_KEY": old.to_env()},
                             capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
        assert out.returncode == 0, out.stderr
        printed = [
            line.split("=", 1)[1]
            for line in out.stdout.splitlines()
            if line.startswith("VOXLOOP_SECRET_KEY=")
        ]
        new = KeyRing.from_env(printed[-1])
        assert list(new.keys) == [new.primary] and new.primary not in old.keys
        before = c.get(f"/v1/agents/{agent['id']}").json()
        r = c.put(
            f"/v1/agents/{agent['id']}",
            json={"name": "x", "llm": [{**AGENT["llm"][0], "api_key": "sk-new"}]},
        )
        assert r.status_code == 503 and r.json()["code"] == "key_unavailable"
        assert "VOXLOOP_SECRET_KEY" in r.json()["detail"] and "sk-new" not in r.text
        assert c.get(f"/v1/agents/{agent['id']}").json() == before  # nothing stored; reads work
        assert (
            c.put(f"/v1/agents/{agent['id']}", json={"greeting": "still fine"}).status_code == 200
        )
    finally:
        stop(srv)
    # Restarting with the old ring is refused before listening; with the printed ring it works.
    stale = subprocess.run([*VOXLOOP, "serve", "--port", "0", "--data-dir", str(data)],
                           env={**os.environ, "VOXLOOP_API_KEYS": API_KEY, "VOXLOOP_SECRET_KEY": old.to_env()},
                           capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
    assert stale.returncode == 2 and stale.stdout == ""
    assert stale.stderr == (
        f"voxloop: error: the database's secrets are sealed under key '{new.primary}', which this key ring "
        "does not hold; set VOXLOOP_SECRET_KEY to the ring the last `voxloop secrets rotate-key` printed\n"
    )
    srv = start_server(data, extra_env={"VOXLOOP_SECRET_KEY": new.to_env()})
    try:
        r = srv.client().put(
            f"/v1/agents/{agent['id']}", json={"llm": [{**AGENT["llm"][0], "api_key": "sk-new"}]}
        )
        assert r.status_code == 200
    finally:
        stop(srv)
    loaded = asyncio.run(_load_env(data, new, agent["id"]))
    assert loaded is not None and loaded.llm[0].api_key.reveal() == "sk-new"


async def _load_env(data_dir: Path, ring: KeyRing, agent_id: str):
    url = sqlite_url(data_dir)
    store = Store(url)
    await store.start()
    try:
        return await Api(Settings(frozenset({"k"}), data_dir, url, ring), store).load_agent(
            agent_id
        )
    finally:
        await store.aclose()
