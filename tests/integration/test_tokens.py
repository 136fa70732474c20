"""Single-use temporary tokens, redeemed by two workers that share one database."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from runtime.server.app import Api, Settings
from runtime.server.secrets import KeyRing
from runtime.server.store import Store, sqlite_url

from ..helpers import missing
from ..postgres import PostgresServer, postgres_server


@pytest.fixture(scope="module")
def postgres() -> Iterator[PostgresServer | None]:
    yield from postgres_server()


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
    token = a.mint({"jti": "t1", "exp": int(time.time()) + 60, "msd": 600})
    claims = await b.redeem(token)
    assert claims is not None and claims["msd"] == 600
    assert await a.redeem(token) is None
    assert await b.redeem(token) is None


async def test_expired_forged_and_garbage_tokens_are_refused(workers: tuple[Api, Api]):
    a, b = workers
    expired = a.mint({"jti": "t2", "exp": int(time.time()) - 1, "msd": 600})
    assert await b.redeem(expired) is None
    genuine = a.mint({"jti": "t3", "exp": int(time.time()) + 60, "msd": 600})
    _, _, mac = genuine.partition(".")
    forged = (
        a.mint({"jti": "t3", "exp": int(time.time()) + 9999, "msd": 600}).split(".")[0] + "." + mac
    )
    assert await b.redeem(forged) is None
    for garbage in ("", "abc", "abc.def", "..."):
        assert await b.redeem(garbage) is None
    assert await b.redeem(genuine) is not None
