"""Two key rotations that no file lock serialises (keys from the environment, or two hosts
on one database): the primary-key compare-and-swap lets one win, and the other changes
nothing, on SQLite and on PostgreSQL."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from runtime.agents.rotation import RotationError, rotate
from runtime.agents.secrets import KeyRing, SecretBox
from runtime.agents.store import AgentRow, Store, sqlite_url

from ..helpers import missing
from ..postgres import PostgresServer


class PausedStore(Store):
    """A real store whose rotation stops just before the primary-key swap until told."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.reached = asyncio.Event()
        self.go = asyncio.Event()

    async def set_primary(self, kid: str, *, expect: str | None) -> bool:
        self.reached.set()
        await self.go.wait()
        return await super().set_primary(kid, expect=expect)


@pytest.fixture(params=["sqlite", "postgresql"])
async def url(
    request: pytest.FixtureRequest, tmp_path: Path, postgres: PostgresServer | None
) -> AsyncIterator[str]:
    if request.param == "postgresql":
        if postgres is None:
            missing("PostgreSQL is not installed (apt-get install postgresql; .ci/run does)")
        yield postgres.new_database()
    else:
        yield sqlite_url(tmp_path)


async def test_a_rotation_that_lost_the_race_changes_nothing(url: str) -> None:
    ring = KeyRing.generate()  # both hosts hold the same ring (VOXLOOP_SECRET_KEY)
    first, second = PausedStore(url), Store(url)
    await first.start()
    await second.start()
    try:
        await first.init_primary(ring.primary)
        box = SecretBox(ring)
        stamp = dt.datetime.now(dt.UTC)
        for n in range(3):
            agent_id = f"agent_{n}"
            async with second.writing(agent_id) as tx:
                await tx.insert(AgentRow(
                    agent_id, f"A{n}", stamp, stamp, {"name": f"A{n}"},
                    [{"base_url": "https://e.example/v1", "model": "m",
                      "api_key": box.seal(f"sk-{n}", context=f"{agent_id}:llm.api_key")}],
                    {},
                ))  # fmt: skip

        printed: dict[str, list[KeyRing]] = {"first": [], "second": []}
        loser_box, winner_box = SecretBox(ring), SecretBox(ring)
        racing = asyncio.create_task(rotate(first, loser_box, printed["first"].append))
        await first.reached.wait()  # the first read the primary id and is about to swap it
        report = await rotate(second, winner_box, printed["second"].append)
        first.go.set()
        with pytest.raises(RotationError, match="another key rotation changed the primary key"):
            await racing

        winner = printed["second"][-1]
        loser_key = printed["first"][0].primary
        assert loser_key != winner.primary and loser_key not in winner.keys
        assert await second.primary_kid() == winner.primary
        assert report.resealed == 3 and report.failures == []
        # Every secret opens with the winner's ring, sealed under its primary key; the loser
        # sealed nothing.
        readers = SecretBox(winner)
        for n in range(3):
            row = await second.get_agent(f"agent_{n}")
            assert row is not None
            sealed = row.llm[0]["api_key"]
            assert readers.key_id(sealed) == winner.primary
            opened = readers.open(sealed, context=f"agent_{n}:llm.api_key")
            assert opened.reveal() == f"sk-{n}"
    finally:
        await first.aclose()
        await second.aclose()
