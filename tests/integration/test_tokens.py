"""Single-use temporary tokens, redeemed by two workers that share one database."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from runtime.agents.secrets import KeyRing
from runtime.agents.store import Store, sqlite_url
from runtime.server.app import Api, Settings

from ..helpers import missing
from ..postgres import PostgresServer


@pytest.fixture(params=["sqlite", "postgresql"])
async def workers(
    request: pytest.FixtureRequest, tmp_path: Path, postgres: PostgresServer | None
) -> AsyncIterator[tuple[Api, Api]]:
    if request.param == "postgresql":
        if postgres is None:
            missing("PostgreSQL is not installed (apt-get install postgresql; .ci/run does)")
        url = postgres.new_database()
    else:
        url = sqlite_url(tmp_path)
    ring = KeyRing.generate()  # both workers are configured with the same secret key
    settings = Settings(api_keys=frozenset({"k"}), data_dir=tmp_path, database_url=url, ring=ring)
    stores = [Store(url), Store(url)]
    for store in stores:
        await store.start()
    try:
        yield Api(settings, stores[0]), Api(settings, stores[1])
    finally:
        for store in stores:
            await store.aclose()


async def test_a_token_works_once_across_workers(workers: tuple[Api, Api]):
    a, b = workers
    token = a.tokens.mint({"jti": "t1", "exp": int(time.time()) + 60, "msd": 600})
    claims = await b.tokens.redeem(token)
    assert claims is not None and claims["msd"] == 600
    assert await a.tokens.redeem(token) is None
    assert await b.tokens.redeem(token) is None


async def test_expired_forged_and_garbage_tokens_are_refused(workers: tuple[Api, Api]):
    a, b = workers
    expired = a.tokens.mint({"jti": "t2", "exp": int(time.time()) - 1, "msd": 600})
    assert await b.tokens.redeem(expired) is None
    genuine = a.tokens.mint({"jti": "t3", "exp": int(time.time()) + 60, "msd": 600})
    _, _, mac = genuine.partition(".")
    forged = (
        a.tokens.mint({"jti": "t3", "exp": int(time.time()) + 9999, "msd": 600}).split(".")[0]
        + "."
        + mac
    )
    assert await b.tokens.redeem(forged) is None
    for garbage in ("", "abc", "abc.def", "..."):
        assert await b.tokens.redeem(garbage) is None
    assert await b.tokens.redeem(genuine) is not None


async def test_concurrent_redemptions_of_one_token_succeed_exactly_once(workers: tuple[Api, Api]):
    a, b = workers
    for n in range(3):
        token = a.tokens.mint({"jti": f"race-{n}", "exp": int(time.time()) + 60, "msd": 600})
        results = await asyncio.gather(*(w.tokens.redeem(token) for w in (a, b) * 10))
        winners = [r for r in results if r is not None]
        assert len(winners) == 1 and winners[0]["jti"] == f"race-{n}"


async def test_tokens_survive_a_key_rotation_on_another_worker(workers: tuple[Api, Api]):
    a, b = workers
    token = a.tokens.mint({"jti": "rot", "exp": int(time.time()) + 60, "msd": 600})
    b.box.ring = b.box.ring.rotated()  # b now signs with a new primary key, keeps the old one
    newer = b.tokens.mint({"jti": "rot2", "exp": int(time.time()) + 60, "msd": 600})
    assert await b.tokens.redeem(token) is not None
    assert (
        await a.tokens.redeem(newer) is None
    )  # a does not hold b's new key (no key file to re-read)
    assert await b.tokens.redeem(newer) is not None
