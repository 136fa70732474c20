"""Storage for agents and token use, through SQLAlchemy's async engine.

SQLite (a file in the data directory) by default; PostgreSQL by URL for
several workers. The schema is created and upgraded by Alembic migrations
(``runtime/server/migrations``) at start. Secrets are stored only sealed
(``runtime.server.secrets``); the public agent document never holds them.
"""

from __future__ import annotations

import datetime as dt
import secrets as pysecrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from runtime.server.secrets import SecretBox

metadata = sa.MetaData()

agents = sa.Table(
    "agents",
    metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("name", sa.String(1000), nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("config", sa.JSON, nullable=False),
    sa.Column("llm", sa.JSON, nullable=False),
    sa.Column("tool_secrets", sa.JSON, nullable=False),
)

token_uses = sa.Table(
    "token_uses",
    metadata,
    sa.Column("jti", sa.String(64), primary_key=True),
    sa.Column("used_at", sa.DateTime(timezone=True), nullable=False),
)


def now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def sqlite_url(data_dir: Path) -> str:
    return f"sqlite+aiosqlite:///{data_dir / 'voxloop.db'}"


async def migrate(engine: AsyncEngine) -> None:
    """Bring the schema to the newest migration."""
    from alembic import command
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(Path(__file__).parent / "migrations"))

    def upgrade(connection: sa.Connection) -> None:
        config.attributes["connection"] = connection
        command.upgrade(config, "head")

    async with engine.begin() as conn:
        await conn.run_sync(upgrade)


@dataclass(frozen=True, slots=True)
class AgentRow:
    id: str
    name: str
    created_at: dt.datetime
    updated_at: dt.datetime
    config: dict[str, Any]
    llm: list[dict[str, Any]]
    tool_secrets: dict[str, dict[str, dict[str, str]]]


class Store:
    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = create_async_engine(url)

    async def start(self) -> None:
        await migrate(self.engine)

    async def aclose(self) -> None:
        await self.engine.dispose()

    @staticmethod
    def new_agent_id() -> str:
        return "agent_" + pysecrets.token_hex(16)

    async def insert_agent(self, row: AgentRow) -> None:
        async with self.engine.begin() as conn:
            await conn.execute(agents.insert().values(**_asdict(row)))

    async def replace_agent(self, row: AgentRow) -> bool:
        async with self.engine.begin() as conn:
            values = _asdict(row)
            result = await conn.execute(
                agents.update().where(agents.c.id == row.id).values(**values)
            )
            return bool(result.rowcount)

    async def get_agent(self, agent_id: str) -> AgentRow | None:
        async with self.engine.connect() as conn:
            result = await conn.execute(sa.select(agents).where(agents.c.id == agent_id))
            row = result.mappings().first()
        return None if row is None else AgentRow(**dict(row))

    async def list_agents(self, limit: int = 1000) -> list[AgentRow]:
        async with self.engine.connect() as conn:
            result = await conn.execute(
                sa.select(agents).order_by(agents.c.created_at.desc(), agents.c.id).limit(limit)
            )
            return [AgentRow(**dict(r)) for r in result.mappings()]

    async def delete_agent(self, agent_id: str) -> bool:
        async with self.engine.begin() as conn:
            result = await conn.execute(agents.delete().where(agents.c.id == agent_id))
            return bool(result.rowcount)

    async def use_token(self, jti: str) -> bool:
        """Record a token's single use. False if it was used before (on any worker)."""
        try:
            async with self.engine.begin() as conn:
                await conn.execute(token_uses.insert().values(jti=jti, used_at=now()))
        except IntegrityError:
            return False
        return True


def _asdict(row: AgentRow) -> dict[str, Any]:
    return {name: getattr(row, name) for name in AgentRow.__slots__}


async def reseal_all(store: Store, box: SecretBox) -> int:
    """Re-encrypt every stored secret under the key ring's primary key. Returns how many changed."""
    changed = 0
    for row in await store.list_agents(limit=1_000_000):
        llm = []
        for entry in row.llm:
            new = box.reseal(entry["api_key"], context=f"{row.id}:llm.api_key")
            changed += new != entry["api_key"]
            llm.append({**entry, "api_key": new})
        secrets: dict[str, dict[str, dict[str, str]]] = {}
        for tool, headers in row.tool_secrets.items():
            secrets[tool] = {}
            for name, meta in headers.items():
                new = box.reseal(meta["sealed"], context=f"{row.id}:tool:{tool}:{name}")
                changed += new != meta["sealed"]
                secrets[tool][name] = {**meta, "sealed": new}
        await store.replace_agent(
            AgentRow(row.id, row.name, row.created_at, row.updated_at, row.config, llm, secrets)
        )
    return changed
