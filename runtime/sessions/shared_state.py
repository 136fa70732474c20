"""Live state that several workers share: resumable sessions, single-use token redemptions and
per-key rate limits, in this process's memory (one worker) or in Redis (several).

With ``VOXLOOP_REDIS_URL`` set, every worker reads and writes the same keys, so a
session dropped on one worker resumes on another, a temporary token is redeemed
once across all of them, and a rate limit counts a key's requests wherever they
land. Redis is used through the ``redis`` package's asyncio client; each operation
is one atomic command (``SET … PX``, ``GETDEL``, ``SET NX``, ``INCR``), so no
locks are held and no clustering logic lives here.

Keys (all under ``VOXLOOP_REDIS_PREFIX``, default ``voxloop:``):

* ``session:<id>`` — a :class:`ResumableState` as JSON (secrets sealed), expiring
  after the resume grace period;
* ``live:<id>`` — the session runs on some worker: a lease of a few seconds that the worker
  renews every second (a resume arriving at another worker waits on ``released:<id>``
  until that worker has saved the state, or until the lease lapses because the worker
  died, at most 10 s); a renewal that finds the lease gone (Redis lost its data) saves
  the session's state again;
* ``token:<jti>`` — a redeemed token, kept as long as the token could be valid;
* ``rate:<scope>:<key>:<minute>`` — a request count, expiring after the minute.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Final, Protocol, TypeVar

from redis.exceptions import RedisError

from runtime.sessions.errors import SessionRefused
from runtime.sessions.resume import ResumableState

if TYPE_CHECKING:
    from redis.asyncio import Redis

DEFAULT_PREFIX: Final = "voxloop:"
#: Longest single blocking wait (below the client's 5 s socket timeout).
BLOCK_SLICE_S: Final = 1.0

log = logging.getLogger("voxloop.session")

_T = TypeVar("_T")


async def _command(call: Awaitable[_T]) -> _T:
    """Await one Redis operation in a task of its own, shielded from the caller's cancellation.

    The ``redis`` package's asyncio client can lose a cancellation that arrives while a
    command is in flight (about one in ten at random points in a renewal loop): the
    cancelled task then runs on, and a session's lease renewal kept its session from
    ending. Shielded, the caller's cancellation is raised in the caller at once; the
    command finishes by itself (bounded by the client's socket timeout) and its outcome
    is dropped when nobody waits for it any more.
    """
    task = asyncio.ensure_future(call)
    task.add_done_callback(_outcome_dropped)
    return await asyncio.shield(task)


def _outcome_dropped(task: asyncio.Future[Any]) -> None:
    # Retrieved here so that an abandoned command's error is not reported as never retrieved.
    if not task.cancelled():
        task.exception()


class RateLimiter(Protocol):
    """At most a number of events per minute for each key."""

    async def allow(self, scope: str, key: str, limit: int) -> bool:
        """Count one event of ``key`` in ``scope``; ``False`` when over ``limit`` a minute."""


class MemoryRateLimiter:
    """:class:`RateLimiter` in this process (a sliding 60 s window per key)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._seen: dict[tuple[str, str], collections.deque[float]] = {}

    async def allow(self, scope: str, key: str, limit: int) -> bool:
        now = self._clock()
        for k in [k for k, q in self._seen.items() if q and q[-1] <= now - 60]:
            del self._seen[k]
        seen = self._seen.setdefault((scope, key), collections.deque())
        while seen and seen[0] <= now - 60:
            seen.popleft()
        if len(seen) >= limit:
            return False
        seen.append(now)
        return True


class RedisSessionStore:
    """:class:`~runtime.sessions.resume.SessionStateStore` in Redis, shared by every worker.

    Redis going away (a restart, a failover) ends no session: a state that cannot be
    saved is logged and the session goes on (it is saved again after its next reply);
    a resume that cannot read the state is refused with ``server_error`` (retryable).
    """

    def __init__(self, redis: Redis, prefix: str = DEFAULT_PREFIX) -> None:
        self._redis = redis
        self._prefix = prefix

    def _key(self, session_id: str) -> str:
        return f"{self._prefix}session:{session_id}"

    async def save(self, state: ResumableState, ttl_s: float) -> None:
        body = json.dumps(dataclasses.asdict(state), separators=(",", ":"))
        try:
            await _command(
                self._redis.set(self._key(state.session_id), body, px=max(1, round(ttl_s * 1000)))
            )
        except RedisError as exc:
            _unavailable("save", state.session_id, exc)

    async def peek(self, session_id: str) -> ResumableState | None:
        try:
            raw = await _command(self._redis.get(self._key(session_id)))
        except RedisError as exc:
            raise _refused(session_id, exc) from None
        return None if raw is None else ResumableState(**json.loads(raw))

    async def take(self, session_id: str) -> ResumableState | None:
        try:
            raw = await _command(self._redis.getdel(self._key(session_id)))
        except RedisError as exc:
            raise _refused(session_id, exc) from None
        return None if raw is None else ResumableState(**json.loads(raw))

    async def discard(self, session_id: str) -> None:
        try:
            await _command(self._redis.delete(self._key(session_id)))
        except RedisError as exc:
            _unavailable("discard", session_id, exc)

    async def running(self, session_id: str, ttl_s: float) -> bool:
        try:
            mark = f"{self._prefix}live:{session_id}"
            before = await _command(
                self._redis.set(mark, b"1", px=max(1, round(ttl_s * 1000)), get=True)
            )
        except RedisError as exc:
            _unavailable("mark", session_id, exc)
            return True  # unknown: nothing can be saved now anyway
        return before is not None

    async def released(self, session_id: str) -> None:
        # The live mark goes, and a resume waiting on another worker is woken.
        done = f"{self._prefix}released:{session_id}"

        async def release() -> None:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.delete(f"{self._prefix}live:{session_id}")
                pipe.rpush(done, b"1")
                pipe.expire(done, 60)
                await pipe.execute()

        try:
            await _command(release())
        except RedisError as exc:
            _unavailable("release", session_id, exc)

    async def wait_released(self, session_id: str, timeout_s: float) -> None:
        try:
            if not await _command(self._redis.exists(f"{self._prefix}live:{session_id}")):
                return
            # In slices shorter than the client's socket timeout; after each, a lease that
            # lapsed (its worker died without a release) ends the wait.
            loop = asyncio.get_running_loop()
            deadline = loop.time() + timeout_s
            while (left := deadline - loop.time()) > 0:
                woken = await _command(self._redis.blpop(
                    [f"{self._prefix}released:{session_id}"], timeout=min(left, BLOCK_SLICE_S)
                ))  # fmt: skip
                if woken is not None:
                    return
                if not await _command(self._redis.exists(f"{self._prefix}live:{session_id}")):
                    return
        except RedisError as exc:
            _unavailable("wait", session_id, exc)


class RedisTokenUses:
    """Single-use token redemption in Redis: the first ``SET NX`` of a token id wins."""

    def __init__(self, redis: Redis, prefix: str = DEFAULT_PREFIX) -> None:
        self._redis = redis
        self._prefix = prefix

    async def first_use(self, jti: str, ttl_s: int) -> bool:
        """Record the use of token ``jti``; ``True`` only for the first, on any worker.

        With Redis unreachable the token is not redeemed (``False``: refused, and still
        unused, so the client may try it again once Redis is back).
        """
        try:
            done = await _command(self._redis.set(f"{self._prefix}token:{jti}", b"1", nx=True,
                                                  ex=max(1, ttl_s)))  # fmt: skip
        except RedisError as exc:
            _unavailable("redeem", jti[:8], exc)
            return False
        return bool(done)


# One key's sliding window, atomically: forget starts older than 60 s, refuse at the limit,
# else note this start (refused attempts are not counted, as in MemoryRateLimiter).
_SLIDING_WINDOW = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', tonumber(ARGV[1]) - 60)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then return 0 end
redis.call('ZADD', KEYS[1], ARGV[1], ARGV[3])
redis.call('EXPIRE', KEYS[1], 61)
return 1
"""


class RedisRateLimiter:
    """:class:`RateLimiter` in Redis: a sliding 60 s window per key (a sorted set of start
    times, checked and updated in one script), the same rule as :class:`MemoryRateLimiter`
    across every worker. No burst of twice the limit across a minute's boundary."""

    def __init__(
        self, redis: Redis, prefix: str = DEFAULT_PREFIX, clock: Callable[[], float] = time.time
    ) -> None:
        self._redis = redis
        self._prefix = prefix
        self._clock = clock

    async def allow(self, scope: str, key: str, limit: int) -> bool:
        now = self._clock()
        name = f"{self._prefix}rate:{scope}:{key}"
        member = f"{now!r}:{uuid.uuid4().hex}"
        try:
            allowed = await _command(
                self._redis.eval(_SLIDING_WINDOW, 1, name, repr(now), str(limit), member)
            )
        except RedisError as exc:
            # A limit that cannot be counted does not stop calls (it is not a security gate).
            _unavailable("rate limit", scope, exc)
            return True
        return int(allowed) == 1


def _unavailable(what: str, key: str, exc: Exception) -> None:
    log.warning(f"redis unavailable ({what})", extra={"key": key, "error": type(exc).__name__})


def _refused(session_id: str, exc: Exception) -> SessionRefused:
    _unavailable("resume", session_id, exc)
    return SessionRefused("server_error", "session state is unavailable right now; try again")


def connect(url: str) -> Redis:
    """A client for ``url`` (``redis://[:password@]host:port/db``, ``rediss://`` for TLS).

    Raises:
        ValueError: the URL is not a Redis URL.
    """
    from redis.asyncio import Redis

    if not url.startswith(("redis://", "rediss://", "unix://")):
        raise ValueError("VOXLOOP_REDIS_URL must be redis://host:port/db (or rediss://, unix://)")
    client: Redis = Redis.from_url(url, socket_connect_timeout=5, socket_timeout=5)
    return client
