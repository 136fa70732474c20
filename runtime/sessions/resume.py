"""Resumable session state: what a dropped session keeps for the grace period, and where."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, Protocol

LEASE_S: Final = 4.0
"""How long a worker's mark that a session runs on it lasts unless renewed: a worker that
dies without a word (SIGKILL, power loss) holds up a resume elsewhere for at most this,
plus :data:`LEASE_RENEW_S`."""
LEASE_RENEW_S: Final = 1.0
"""How often a worker renews the mark of each session it runs (with several workers)."""


@dataclass(frozen=True, slots=True)
class ResumableState:
    """What a dropped session needs to continue (JSON-serialisable; secrets sealed).

    Attributes:
        spec: :meth:`SessionSpec.to_state`: every setting, secrets sealed.
        history: the messages of the conversation so far.
        started_at, expires_at: wall-clock seconds.
    """

    session_id: str
    owner: str
    resume_token_hash: str
    spec: dict[str, Any]
    history: list[dict[str, Any]]
    started_at: float
    expires_at: float
    audio_seconds: float


class SessionStateStore(Protocol):
    """Where dropped sessions wait for a resume (memory here; Redis for several workers)."""

    async def save(self, state: ResumableState, ttl_s: float) -> None:
        """Keep ``state`` for ``ttl_s`` seconds."""

    async def peek(self, session_id: str) -> ResumableState | None:
        """The state, or ``None`` if unknown or expired (kept, its deadline unchanged)."""

    async def take(self, session_id: str) -> ResumableState | None:
        """Remove and return the state, or ``None`` if unknown or expired (atomic)."""

    async def discard(self, session_id: str) -> None:
        """Forget a session (ended for good)."""

    async def running(self, session_id: str, ttl_s: float) -> bool:
        """Note that the session runs on this worker for the next ``ttl_s`` seconds (a lease
        renewed while it runs, for resumes arriving elsewhere).

        Returns:
            Whether the mark was there already: ``False`` for the first mark, and for a
            renewal after the store lost its data (a restarted Redis), when the session's
            state must be kept again.
        """

    async def released(self, session_id: str) -> None:
        """The session's state has been saved (or discarded) after its socket went away."""

    async def wait_released(self, session_id: str, timeout_s: float) -> None:
        """If the session runs on a worker, wait (at most ``timeout_s``) for its release or
        for its lease to lapse (the worker died)."""


class MemorySessionStore:
    """:class:`SessionStateStore` in this process's memory (one worker)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._states: dict[str, tuple[float, ResumableState]] = {}

    def _expire(self) -> None:
        now = self._clock()
        for sid in [s for s, (deadline, _) in self._states.items() if deadline <= now]:
            del self._states[sid]

    async def save(self, state: ResumableState, ttl_s: float) -> None:
        self._expire()
        self._states[state.session_id] = (self._clock() + ttl_s, state)

    async def peek(self, session_id: str) -> ResumableState | None:
        self._expire()
        entry = self._states.get(session_id)
        return None if entry is None else entry[1]

    async def take(self, session_id: str) -> ResumableState | None:
        self._expire()
        entry = self._states.pop(session_id, None)
        return None if entry is None else entry[1]

    async def discard(self, session_id: str) -> None:
        self._states.pop(session_id, None)

    # One worker: the runner itself knows which sessions it runs.
    async def running(self, session_id: str, ttl_s: float) -> bool:
        return True

    async def released(self, session_id: str) -> None:
        return None

    async def wait_released(self, session_id: str, timeout_s: float) -> None:
        return None

    def __len__(self) -> int:
        self._expire()
        return len(self._states)
