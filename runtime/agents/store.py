"""Storage for agents and token use, through SQLAlchemy's async engine.

SQLite (a file in the data directory) by default; PostgreSQL by URL for
several workers. The schema is created and upgraded by Alembic migrations
(``runtime/agents/migrations``) at start. Secrets are stored only sealed
(``runtime.agents.secrets``); the public agent document never holds them.

Concurrency guarantee
---------------------
Every write is one transaction that first locks what it changes, so a ``200``
means the change is stored and no concurrent writer can undo it:

* :meth:`Store.writing` opens the transaction. On PostgreSQL it takes
  ``SELECT … FOR UPDATE`` on the agent's row (concurrent ``PUT`` s of one agent
  are serialised; other agents are not blocked) and ``FOR SHARE`` on the
  key-state row; on SQLite it starts with ``BEGIN IMMEDIATE`` (one writer at a
  time, readers unaffected thanks to WAL).
* The caller merges its partial update into the row it read *inside* that
  transaction, so two ``PUT`` s of different fields both survive.
* The key-state row names the primary key id new secrets are sealed with
  (``secret_state.primary_kid``). Rotation changes it under an exclusive lock,
  so after it commits no writer can seal under the old key.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import json
import os
import secrets as pysecrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from runtime.safetext import unsafe_char

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

secret_state = sa.Table(
    "secret_state",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("primary_kid", sa.String(64), nullable=False),
)

SQLITE_BUSY_TIMEOUT_S: Final = 30.0


class StoreError(Exception):
    """The database cannot be used (the message is one line, without passwords)."""


def now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def sqlite_url(data_dir: Path) -> str:
    return f"sqlite+aiosqlite:///{data_dir / 'voxloop.db'}"


def database_url(text: str) -> str:
    """Map the database URLs people write to the async drivers voxloop ships.

    ``postgresql://…`` and ``postgres://…`` (the usual ``DATABASE_URL`` forms)
    become ``postgresql+asyncpg://…`` (libpq's ``sslmode`` becomes asyncpg's
    ``ssl``); ``sqlite:///path`` becomes ``sqlite+aiosqlite:///path``. The
    explicit async forms are kept.

    Raises:
        ValueError: another scheme or driver, an in-memory SQLite database, or
            not a URL (the message never shows a password).
    """
    try:
        url = make_url(text.strip())
    except (ArgumentError, ValueError):
        raise ValueError(
            "the database URL is not a URL; use postgresql://user:password@host/db "
            "or sqlite:///path/voxloop.db"
        ) from None
    backend, _, driver = url.drivername.partition("+")
    shown = url.render_as_string(hide_password=True)
    if backend in ("postgresql", "postgres") and driver in ("", "asyncpg"):
        url = url.set(drivername="postgresql+asyncpg")
        if "sslmode" in url.query:
            query = dict(url.query)
            mode = query.pop("sslmode")
            url = url.set(query={**query, "ssl": mode})
        return url.render_as_string(hide_password=False)
    if backend == "sqlite" and driver in ("", "aiosqlite"):
        if not url.database or url.database == ":memory:":
            raise ValueError(f"an in-memory SQLite database ({shown}) would lose every agent")
        return url.set(drivername="sqlite+aiosqlite").render_as_string(hide_password=False)
    raise ValueError(
        f"unsupported database URL {shown}: voxloop ships the asyncpg and aiosqlite drivers; "
        "use postgresql://… or sqlite:///…"
    )


def shown_url(url: str) -> str:
    """``url`` with the password masked (for messages)."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except (ArgumentError, ValueError):
        return "(malformed URL)"


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


@dataclass(slots=True)
class WriteTx:
    """One open write transaction (see :meth:`Store.writing`).

    Attributes:
        row: the agent as stored, locked for this transaction (``None``: absent,
            or a create).
        primary_kid: the key id new secrets must be sealed with (``None``: the
            database does not say; use the worker's own primary key).
    """

    conn: AsyncConnection
    row: AgentRow | None
    primary_kid: str | None

    async def insert(self, row: AgentRow) -> None:
        await self.conn.execute(agents.insert().values(**_asdict(row)))

    async def replace(self, row: AgentRow) -> None:
        await self.conn.execute(agents.update().where(agents.c.id == row.id).values(**_asdict(row)))


def _encode_cursor(row: AgentRow) -> str:
    doc = json.dumps([_iso(row.created_at), row.id]).encode()
    return base64.urlsafe_b64encode(doc).rstrip(b"=").decode()


def decode_cursor(text: str) -> tuple[dt.datetime, str]:
    """The position a ``next_cursor`` names.

    Raises:
        ValueError: not a cursor this server issued.
    """
    try:
        doc = json.loads(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)))
        stamp, agent_id = doc
        when = dt.datetime.fromisoformat(stamp)
    except (ValueError, TypeError, RecursionError):  # RecursionError: deeply nested JSON
        raise ValueError("is not a cursor from a previous page") from None
    if not isinstance(agent_id, str) or when.tzinfo is None or not storable(agent_id):
        raise ValueError("is not a cursor from a previous page")
    return when, agent_id


def storable(text: str) -> bool:
    """Whether a database text column can hold ``text`` (PostgreSQL refuses NUL and
    unpaired surrogates; an agent id with them names no agent)."""
    return unsafe_char(text) is None


def _iso(value: dt.datetime) -> str:
    return (value if value.tzinfo else value.replace(tzinfo=dt.UTC)).isoformat()


class Store:
    """The agents, token uses and key state in one database.

    Args:
        url: an SQLAlchemy async URL (see :func:`database_url` for the forms
            people write).
    """

    def __init__(self, url: str) -> None:
        self.url = url
        self.sqlite = url.startswith("sqlite")
        connect_args: dict[str, Any] = {"timeout": SQLITE_BUSY_TIMEOUT_S} if self.sqlite else {}
        self.engine = create_async_engine(url, connect_args=connect_args)
        if self.sqlite:
            _sqlite_transactions(self.engine)

    async def start(self) -> None:
        """Connect and migrate.

        Raises:
            StoreError: the database cannot be reached or opened (one line).
        """
        try:
            if self.sqlite:
                _private_file(self.url)
            await migrate(self.engine)
        except Exception as exc:
            await self.engine.dispose()
            raise StoreError(
                f"cannot open the database {shown_url(self.url)}: {_reason(exc)}"
            ) from None

    async def aclose(self) -> None:
        await self.engine.dispose()

    async def ping(self) -> None:
        """Run ``SELECT 1`` (the health check).

        Raises:
            sqlalchemy.exc.SQLAlchemyError, OSError: the database does not answer.
        """
        async with self.engine.connect() as conn:
            await conn.execute(sa.text("SELECT 1"))

    @staticmethod
    def new_agent_id() -> str:
        return "agent_" + pysecrets.token_hex(16)

    # -- key state ------------------------------------------------------------------

    async def init_primary(self, kid: str) -> str:
        """Record ``kid`` as the primary key id if none is recorded; return the recorded one."""
        async with self._begin(write=True) as conn:
            current = await conn.scalar(sa.select(secret_state.c.primary_kid))
            if current is None:
                await conn.execute(secret_state.insert().values(id=1, primary_kid=kid))
                return kid
            return str(current)

    async def primary_kid(self) -> str | None:
        async with self.engine.connect() as conn:
            value = await conn.scalar(sa.select(secret_state.c.primary_kid))
        return None if value is None else str(value)

    async def set_primary(self, kid: str, *, expect: str | None) -> bool:
        """Switch the primary key id from ``expect`` to ``kid`` (compare-and-swap).

        Waits for writers that hold the old one. Returns False, changing nothing,
        if the recorded id is not ``expect``.
        """
        async with self._begin(write=True) as conn:
            query = sa.select(secret_state.c.primary_kid)
            if not self.sqlite:
                query = query.with_for_update()
            current = await conn.scalar(query)
            if current != expect:
                return False
            if current is None:
                await conn.execute(secret_state.insert().values(id=1, primary_kid=kid))
            else:
                await conn.execute(secret_state.update().values(primary_kid=kid))
            return True

    # -- agents ---------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def writing(self, agent_id: str | None = None) -> AsyncIterator[WriteTx]:
        """One write transaction: the agent's row (if any) is locked until it ends.

        An exception inside the block rolls everything back.
        """
        async with self._begin(write=True) as conn:
            kid_query = sa.select(secret_state.c.primary_kid)
            if not self.sqlite:
                kid_query = kid_query.with_for_update(read=True)
            kid = await conn.scalar(kid_query)
            row = None
            if agent_id is not None:
                query = sa.select(agents).where(agents.c.id == agent_id)
                if not self.sqlite:
                    query = query.with_for_update()
                found = (await conn.execute(query)).mappings().first()
                row = None if found is None else AgentRow(**dict(found))
            yield WriteTx(conn, row, None if kid is None else str(kid))

    async def get_agent(self, agent_id: str) -> AgentRow | None:
        if not storable(agent_id):
            return None
        async with self.engine.connect() as conn:
            result = await conn.execute(sa.select(agents).where(agents.c.id == agent_id))
            row = result.mappings().first()
        return None if row is None else AgentRow(**dict(row))

    async def list_agents(
        self, limit: int | None = None, after: tuple[dt.datetime, str] | None = None
    ) -> tuple[list[AgentRow], str]:
        """Agents newest first (ties by id), and the cursor of the next page (``""``: no more).

        Args:
            limit: page size; ``None`` returns every agent.
            after: a position from :func:`decode_cursor`.
        """
        query = sa.select(agents).order_by(agents.c.created_at.desc(), agents.c.id)
        if after is not None:
            stamp, agent_id = after
            query = query.where(
                sa.or_(
                    agents.c.created_at < stamp,
                    sa.and_(agents.c.created_at == stamp, agents.c.id > agent_id),
                )
            )
        if limit is not None:
            query = query.limit(limit + 1)
        async with self.engine.connect() as conn:
            rows = [AgentRow(**dict(r)) for r in (await conn.execute(query)).mappings()]
        if limit is not None and len(rows) > limit:
            return rows[:limit], _encode_cursor(rows[limit - 1])
        return rows, ""

    async def agent_ids(self) -> list[str]:
        async with self.engine.connect() as conn:
            return [
                str(r) for r in (await conn.scalars(sa.select(agents.c.id).order_by(agents.c.id)))
            ]

    async def delete_agent(self, agent_id: str) -> bool:
        if not storable(agent_id):
            return False
        async with self._begin(write=True) as conn:
            result = await conn.execute(agents.delete().where(agents.c.id == agent_id))
            return bool(result.rowcount)

    async def use_token(self, jti: str) -> bool:
        """Record a token's single use atomically. False if it was used before (on any worker)."""
        try:
            async with self._begin(write=True) as conn:
                await conn.execute(token_uses.insert().values(jti=jti, used_at=now()))
        except IntegrityError:
            return False
        return True

    # -- compatibility ----------------------------------------------------------------

    async def insert_agent(self, row: AgentRow) -> None:
        async with self.writing() as tx:
            await tx.insert(row)

    @contextlib.asynccontextmanager
    async def _begin(self, *, write: bool) -> AsyncIterator[AsyncConnection]:
        async with self.engine.connect() as conn:
            if write and self.sqlite:
                conn = await conn.execution_options(voxloop_immediate=True)
            async with conn.begin():
                yield conn


def _private_file(url: str) -> None:
    """Create the SQLite database file readable by its owner only (0600, like the key
    file); SQLite gives its ``-wal`` and ``-shm`` files the database file's mode."""
    path = make_url(url).database
    if not path or path == ":memory:" or path.startswith("file:"):
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.fchmod(fd, 0o600)
    finally:
        os.close(fd)
    for suffix in ("-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError):
            os.chmod(path + suffix, 0o600)


def _sqlite_transactions(engine: AsyncEngine) -> None:
    """Real transactions on SQLite: ``BEGIN IMMEDIATE`` for writes, WAL journal.

    The sqlite3 module's own transaction handling starts a transaction only
    before the first write, so a read-modify-write would not be atomic.
    """

    @event.listens_for(engine.sync_engine, "connect")
    def _connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA busy_timeout={int(SQLITE_BUSY_TIMEOUT_S * 1000)}")
        cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _begin(conn: sa.Connection) -> None:
        immediate = conn.get_execution_options().get("voxloop_immediate")
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


def _reason(exc: BaseException) -> str:
    """A one-line reason for a database failure, without URLs or passwords."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    orig = getattr(exc, "orig", None)
    if isinstance(orig, BaseException):
        exc = orig
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    if isinstance(exc, OSError) and exc.strerror:
        text = exc.strerror
    name = type(exc).__name__
    return f"{name}: {text}"[:300] if text else name


def _asdict(row: AgentRow) -> dict[str, Any]:
    return {name: getattr(row, name) for name in AgentRow.__slots__}
