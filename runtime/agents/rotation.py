"""Key rotation for stored secrets (``voxloop secrets rotate-key``).

Theory of operation
-------------------
Rotation is safe to interrupt at any instant and safe while servers keep
writing, because its steps happen in this order:

1. **The new key ring is made durable first**: written to the key file
   (atomically, fsynced) or, with ``VOXLOOP_SECRET_KEY``, printed (and
   flushed) as the new value to set. It still holds every old key. Nothing has
   been sealed with the new key yet.
2. **The database's primary key id is switched** (``secret_state``), under an
   exclusive lock that waits for writers in flight. From then on every server
   seals under the new key: servers using the key file re-read it when they
   meet the new key id (no restart needed); servers configured through
   ``VOXLOOP_SECRET_KEY`` cannot know the new key, so their writes that carry
   secrets are refused (503, nothing stored) until they are restarted with
   the printed value. Reads keep working throughout.
3. **Each agent is resealed in its own transaction**, with its row locked, so
   a concurrent ``PUT`` is either before (and gets resealed) or after (and
   already uses the new key); nothing a client was told is stored is undone.
4. **Secrets that do not open are reported** (agent id and field, never the
   value) and left as they are; the command then exits 1.
5. **Old keys are retired only when unused**: after the pass, keys that no
   stored secret names are dropped from the key file (or from the printed
   ring). With any failure, nothing is retired.

Killed at any point, every stored secret opens with the key file on disk or
with the last ring printed. Two rotations never interleave: with a key file
they take an exclusive lock on ``secret.key.lock`` in the data directory, and
the switch of step 2 is a compare-and-swap on the primary key id, so a
rotation that raced another one stops before sealing anything.
"""

from __future__ import annotations

import asyncio
import fcntl
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TextIO

from runtime.agents.secrets import KeyRing, SecretBox, SecretError
from runtime.agents.store import (
    AgentRow,
    Store,
    StoreError,
    database_url,
    sqlite_url,
)


class RotationError(Exception):
    """Rotation cannot start (one line: a missing data directory, key file, database…)."""


@dataclass(slots=True)
class RotationReport:
    """What :func:`rotate` did.

    Attributes:
        ring: the final key ring (what the key file holds or what to set).
        resealed: secrets re-encrypted under the new key.
        failures: ``"<agent id> <field>: <reason>"`` for secrets that did not open.
        retired: key ids removed because nothing used them any more.
    """

    ring: KeyRing
    resealed: int = 0
    failures: list[str] = field(default_factory=list)
    retired: list[str] = field(default_factory=list)


def _reseal_row(
    row: AgentRow, box: SecretBox, kid: str, report: RotationReport
) -> tuple[list[dict[str, str]], dict[str, dict[str, dict[str, str]]], bool]:
    changed = False

    def reseal(sealed: str, context: str, where: str) -> str:
        """``sealed`` under ``kid``; one that cannot be opened is kept and reported."""
        nonlocal changed
        try:
            new = box.reseal(sealed, context=f"{row.id}:{context}", kid=kid)
        except SecretError as exc:
            report.failures.append(f"{row.id} {where}: {exc}")
            return sealed
        if new != sealed:
            report.resealed += 1
            changed = True
        return new

    llm = [
        {**entry, "api_key": reseal(entry["api_key"], "llm.api_key", f"llm[{i}].api_key")}
        for i, entry in enumerate(row.llm)
    ]
    tool_secrets = {
        tool: {
            name: {
                **meta,
                "sealed": reseal(
                    meta["sealed"], f"tool:{tool}:{name}", f"tools.{tool}.http.headers.{name}"
                ),
            }
            for name, meta in headers.items()
        }
        for tool, headers in row.tool_secrets.items()
    }
    return llm, tool_secrets, changed


def _kids(row: AgentRow, box: SecretBox) -> set[str]:
    tokens = [e["api_key"] for e in row.llm]
    tokens += [m["sealed"] for headers in row.tool_secrets.values() for m in headers.values()]
    kids = set()
    for token in tokens:
        try:
            kids.add(box.key_id(token))
        except SecretError:
            continue
    return kids


async def rotate(
    store: Store, box: SecretBox, persist: Callable[[KeyRing], None]
) -> RotationReport:
    """Add a new primary key, reseal every secret under it, retire unused keys.

    Args:
        store: the started store.
        box: holds the current ring; it is switched to the new one.
        persist: makes a ring durable (saves the key file, or prints it); called
            with the new ring before anything is sealed with it, and again with
            the retired ring at the end if keys were retired.
    """
    current = await store.primary_kid()
    if current is not None and current not in box.ring.keys:
        raise RotationError(
            f"the database's secrets are sealed under key {current!r}, which this key ring does "
            "not hold; use the ring printed by the last rotation"
        )
    ring = box.ring.rotated()
    persist(ring)
    box.ring = ring
    if not await store.set_primary(ring.primary, expect=current):
        raise RotationError("another key rotation changed the primary key meanwhile; run again")
    report = RotationReport(ring=ring)
    for agent_id in await store.agent_ids():
        async with store.writing(agent_id) as tx:
            if tx.row is None:
                continue  # deleted meanwhile
            llm, tool_secrets, changed = _reseal_row(tx.row, box, ring.primary, report)
            if changed:
                await tx.replace(
                    AgentRow(tx.row.id, tx.row.name, tx.row.created_at, tx.row.updated_at,
                             tx.row.config, llm, tool_secrets)
                )  # fmt: skip
    if report.failures:
        return report
    used: set[str] = set()
    rows, _ = await store.list_agents()
    for row in rows:
        used |= _kids(row, box)
    report.retired = sorted(set(ring.keys) - used - {ring.primary})
    if report.retired:
        report.ring = ring.only(used)
        persist(report.ring)
        box.ring = report.ring
    return report


def _lock(path: Path) -> IO[str]:
    handle = path.open("a")
    fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
    return handle


async def rotate_command(
    env: Mapping[str, str],
    out: TextIO,
    *,
    data_dir: Path | None = None,
    database: str | None = None,
) -> int:
    """``voxloop secrets rotate-key``: returns 0, or 1 when some secrets did not open.

    Needs no API keys. Refuses (rather than creating anything) when the data
    directory, the key file or the SQLite database does not exist.

    Raises:
        RotationError: a setting is wrong or the database cannot be opened (one line).
    """
    directory = data_dir or Path(env.get("VOXLOOP_DATA_DIR", "voxloop-data"))
    if not directory.is_dir():
        raise RotationError(
            f"the data directory {directory} does not exist (check --data-dir or VOXLOOP_DATA_DIR)"
        )
    raw_url = database or env.get("VOXLOOP_DATABASE_URL")
    try:
        url = database_url(raw_url) if raw_url else sqlite_url(directory)
    except ValueError as exc:
        raise RotationError(str(exc)) from None
    if url.startswith("sqlite"):
        path = Path(url.split(":///", 1)[1])
        if not path.is_file():  # noqa: ASYNC240 (one stat before any I/O starts)
            raise RotationError(f"no database at {path}: nothing to rotate (check --data-dir)")
    from_env = bool(env.get("VOXLOOP_SECRET_KEY"))
    key_file = directory / "secret.key"
    try:
        ring = KeyRing.from_env(env["VOXLOOP_SECRET_KEY"]) if from_env else KeyRing.load(key_file)
    except SecretError as exc:
        raise RotationError(str(exc)) from None

    def persist(new: KeyRing) -> None:
        if from_env:
            out.write(f"VOXLOOP_SECRET_KEY={new.to_env()}\n")
            out.flush()
        else:
            new.save(key_file)

    lock = None
    if not from_env:
        # One rotation at a time per key file; the ring is read again under the lock.
        lock = await asyncio.to_thread(_lock, directory / "secret.key.lock")
    try:
        if not from_env:
            ring = KeyRing.load(key_file)
        if from_env:
            out.write("set VOXLOOP_SECRET_KEY to the new key ring (old keys kept for reading):\n")
        store = Store(url)
        try:
            await store.start()
        except StoreError as exc:
            raise RotationError(str(exc)) from None
        try:
            await store.init_primary(ring.primary)
            report = await rotate(store, SecretBox(ring), persist)
        finally:
            await store.aclose()
    finally:
        if lock is not None:
            lock.close()
    out.write(f"re-encrypted {report.resealed} secrets under key {report.ring.primary}\n")
    if report.retired:
        out.write(f"retired unused keys: {', '.join(report.retired)}\n")
        if from_env:
            out.write("the final VOXLOOP_SECRET_KEY is the last one printed above\n")
    for failure in report.failures:
        out.write(f"cannot open: {failure}\n")
    if report.failures:
        out.write(
            f"{len(report.failures)} secrets did not open and were left as they are; "
            "no key was retired\n"
        )
    out.flush()
    return 1 if report.failures else 0
