"""Ordered fallback endpoints with a circuit breaker per entry.

Theory of operation
-------------------
A :class:`FallbackChatClient` holds several :class:`~runtime.llm.client.ChatClient`
(an agent's ``llm`` list, in order) and offers the same interface the
conversation core uses: ``stream(request)``, ``prewarm()``, ``warm_up()``,
``aclose()``.

* **Failover before the first token.** ``stream`` opens the first entry whose
  circuit lets a request through and reads until its first generated delta
  (content, reasoning or a tool call). Any endpoint failure before that point
  (connect error, TLS, 5xx, 429, 4xx, a timeout to the first token, a
  malformed or dropped stream, a refused address) closes that request and
  opens the next entry at once. Every entry shares one first-token budget:
  the request's ``first_token_timeout_s``, else the longest of the clients'
  ``first_token_budget_s`` (5 s by default); each entry gets what is left (and
  no more than its own deadline), so the caller hears the reply later, never
  after more than the budget. When every entry failed
  (or the budget ran out) the last error is raised, as one endpoint would.
* **After the first token nothing is retried**: the reply cannot be taken
  back. An error then is raised as is and counts against the entry (an entry
  counts as healthy when its reply ends, or is closed by the caller, without
  an error), so an endpoint that always stalls mid-reply opens its circuit.
* **Circuit breaker** (:class:`CircuitBreaker`): ``failure_threshold``
  consecutive failures open an entry's circuit for ``open_s``; while open the
  entry is skipped without paying its timeout. After ``open_s`` one request
  probes it (half-open); success closes the circuit, failure opens it again.
  When every circuit is open, all entries are tried in order anyway (a call
  is never refused without asking an endpoint). Time comes from an injected
  :class:`~runtime.clock.Clock`.
* **Prewarm and warm-up** go to the first entry whose circuit is closed. A
  prewarm that cannot connect, or a warm-up that fails or times out, opens
  that entry's circuit at once (:meth:`CircuitBreaker.trip`) and the next
  entry is prewarmed or warmed up instead, so the first turn already skips a
  dead primary.
* **Asking the next entry early** (hedging; ``hedge_after_s``, ``"auto"`` by
  default): when the entry being waited on has produced no token after a
  while, the next entry is asked too; the first to produce a token answers and
  the other request is closed (nothing is spoken twice). The entry keeps its
  chance until its own first-token deadline. ``"auto"`` waits
  :func:`early_start_s`: twice the slowest of the entry's last
  :data:`EARLY_SAMPLES` times to first token in this process (the warm-up
  counts), at least :data:`EARLY_MIN_S`, or :data:`EARLY_DEFAULT_S` before
  the entry has been measured; never as long as the entry's own deadline
  (then the next entry is asked when it fails). An entry that loses such a
  race counts a failure (two in a row open its circuit). The cost is a
  duplicate request (tokens billed twice, a slot taken) on every turn slower
  than that; ``None`` turns it off (the next entry is asked only when the
  entry fails).

Each :class:`FallbackStream` says which entry answered (``entry``) and why the
others were not used (``skipped``: ``(index, reason)`` pairs, the reason an
error kind such as ``"timeout"`` or ``"circuit_open"``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Final, Literal, Self

from runtime.clock import Clock, MonotonicClock
from runtime.errors import EndpointError, URLPolicyError
from runtime.llm.client import ChatClient, ChatRequest, ChatStream, Endpoint, StreamTimings
from runtime.llm.stream import ChatEvent, ReasoningDelta, TextDelta, ToolCallDelta, Usage

log = logging.getLogger("voxloop.llm")

CircuitState = Literal["closed", "open", "half_open"]
_GENERATED: Final = (TextDelta, ReasoningDelta, ToolCallDelta)

EARLY_FACTOR: Final = 2.0
"""The next entry is asked after this many times the entry's slowest recent first token."""
EARLY_SAMPLES: Final = 8
"""How many of the entry's most recent times to first token are considered."""
EARLY_MIN_S: Final = 0.5
"""The earliest the next entry is asked (seconds): a fast endpoint's jitter is not a failure."""
EARLY_DEFAULT_S: Final = 1.5
"""When the next entry is asked while the entry has no measured time to first token (seconds)."""


def early_start_s(recent_s: Sequence[float], deadline_s: float) -> float | None:
    """When to ask the next entry too, for an entry with a next one (the ``"auto"`` rule).

    Args:
        recent_s: the entry's recent times to first token, oldest first (seconds).
        deadline_s: the entry's own first-token deadline (seconds).

    Returns:
        Seconds after the entry's request starts: :data:`EARLY_FACTOR` times the
        slowest of the last :data:`EARLY_SAMPLES` times, at least
        :data:`EARLY_MIN_S`; :data:`EARLY_DEFAULT_S` with no time measured.
        ``None`` when that is not before ``deadline_s`` (the entry's failure at
        its deadline moves on anyway).
    """
    window = recent_s[-EARLY_SAMPLES:]
    after = max(EARLY_MIN_S, EARLY_FACTOR * max(window)) if window else EARLY_DEFAULT_S
    return after if after < deadline_s else None


class CircuitBreaker:
    """Health of one entry: ``closed`` → ``open`` → ``half_open`` → ``closed``.

    Args:
        clock: monotonic time (injectable; tests use a manual clock).
        failure_threshold: consecutive failures that open the circuit.
        open_s: how long an open circuit skips the entry before one probe.
    """

    def __init__(self, clock: Clock, *, failure_threshold: int = 2, open_s: float = 30.0) -> None:
        if failure_threshold < 1 or open_s <= 0:
            raise ValueError("failure_threshold must be >= 1 and open_s > 0")
        self._clock = clock
        self.failure_threshold = failure_threshold
        self._open_ns = int(open_s * 1e9)
        self._state: CircuitState = "closed"
        self._failures = 0
        self._opened_ns = 0
        self._probing = False

    @property
    def state(self) -> CircuitState:
        if self._state == "open" and self._clock.now_ns() - self._opened_ns >= self._open_ns:
            return "half_open"
        return self._state

    @property
    def failures(self) -> int:
        """Consecutive failures so far."""
        return self._failures

    def allow(self) -> bool:
        """Whether a request may go to the entry now (takes the half-open probe)."""
        state = self.state
        if state == "closed":
            return True
        if state == "half_open" and not self._probing:
            self._state = "half_open"
            self._probing = True
            return True
        return False

    def release(self) -> None:
        """A request ended without telling anything (cancelled): free the probe."""
        self._probing = False

    def success(self) -> None:
        self._state = "closed"
        self._failures = 0
        self._probing = False

    def failure(self) -> None:
        self._failures += 1
        probing, self._probing = self._probing, False
        if probing or self._failures >= self.failure_threshold:
            self._state = "open"
            self._opened_ns = self._clock.now_ns()

    def trip(self) -> None:
        """Open the circuit now, whatever the count (the entry is known to be down)."""
        self._failures = max(self._failures + 1, self.failure_threshold)
        self._probing = False
        self._state = "open"
        self._opened_ns = self._clock.now_ns()


@dataclass(frozen=True, slots=True)
class FallbackPolicy:
    """How the entries are used (see the module docstring).

    Attributes:
        failure_threshold: consecutive failures that open an entry's circuit.
        open_s: seconds an open circuit skips its entry before one probe.
        hedge_after_s: ask the next entry too when the current one has produced
            no token after this many seconds; ``"auto"``: after
            :func:`early_start_s` of the entry's measured times to first token;
            ``None``: only when the entry fails.
    """

    failure_threshold: int = 2
    open_s: float = 30.0
    hedge_after_s: float | Literal["auto"] | None = "auto"

    def __post_init__(self) -> None:
        after = self.hedge_after_s
        if after is not None and after != "auto" and not after > 0:
            raise ValueError("hedge_after_s must be positive, 'auto' or None")


class _HedgeFailed(Exception):
    """Both hedged entries failed (the second's failure is already recorded)."""

    def __init__(self, first: EndpointError | URLPolicyError) -> None:
        super().__init__()
        self.first = first


@dataclass(slots=True)
class _Attempt:
    index: int
    stack: contextlib.AsyncExitStack
    stream: ChatStream
    buffered: list[ChatEvent] = field(default_factory=list)


class FallbackChatClient:
    """Streams chat completions from the first healthy entry of an ordered list.

    Args:
        clients: the entries, in order (at least one); closed by :meth:`aclose`.
        policy: circuit and hedging settings.
        clock: monotonic time for the circuits.
    """

    def __init__(
        self,
        clients: Sequence[ChatClient],
        *,
        policy: FallbackPolicy | None = None,
        clock: Clock | None = None,
    ) -> None:
        if not clients:
            raise ValueError("at least one endpoint is required")
        self.clients = tuple(clients)
        self.policy = policy or FallbackPolicy()
        clock = clock or MonotonicClock()
        self.breakers = tuple(
            CircuitBreaker(
                clock,
                failure_threshold=self.policy.failure_threshold,
                open_s=self.policy.open_s,
            )
            for _ in self.clients
        )

    def __repr__(self) -> str:
        return f"FallbackChatClient({', '.join(repr(c) for c in self.clients)})"

    @property
    def endpoint(self) -> Endpoint:
        """The first entry's endpoint."""
        return self.clients[0].endpoint

    def host(self, index: int) -> str:
        """The host of entry ``index`` (for metrics and logs; never the key)."""
        return self.clients[index].url.host

    def early_start_s(self, index: int) -> float | None:
        """Seconds after entry ``index``'s request starts when the next entry is asked
        too (``None``: only when it fails; see :class:`FallbackPolicy`)."""
        if index >= len(self.clients) - 1:
            return None
        after = self.policy.hedge_after_s
        client = self.clients[index]
        if after == "auto":
            return early_start_s(client.recent_ttfts_s(), client.timeouts.first_token_s)
        return after

    def preferred(self) -> int:
        """The first entry whose circuit is closed (else the first)."""
        for i, breaker in enumerate(self.breakers):
            if breaker.state == "closed":
                return i
        return 0

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        for client in self.clients:
            await client.aclose()

    async def prewarm(self) -> bool:
        """Prewarm the preferred entry (see :meth:`ChatClient.prewarm`). One that
        cannot connect has its circuit opened, and the next preferred entry is
        prewarmed instead.

        Returns:
            Whether an entry's connection was opened.
        """
        tried: set[int] = set()
        while (index := self.preferred()) not in tried:
            tried.add(index)
            if await self.clients[index].prewarm():
                return True
            self.breakers[index].trip()
            self._log_down(index, "prewarm", "connect")
        return False

    async def warm_up(self, system_prompt: str) -> str | None:
        """Warm up the preferred entry (see :meth:`ChatClient.warm_up`). A warm-up
        that fails or times out opens that entry's circuit, and the next preferred
        entry is warmed up instead.

        Returns:
            The finish reason of the warm-up that answered (``None``: none did).
        """
        tried: set[int] = set()
        while (index := self.preferred()) not in tried:
            tried.add(index)
            finish = await self.clients[index].warm_up(system_prompt)
            if finish is not None:
                return finish
            self.breakers[index].trip()
            self._log_down(index, "warm-up", "failed")
        return None

    def _log_down(self, index: int, what: str, kind: str) -> None:
        log.warning(
            "endpoint entry %d (%s) %s failed; its circuit is open for %g s",
            index, self.host(index), what, self.policy.open_s,
            extra={"entry": index, "host": self.host(index), "kind": kind},
        )  # fmt: skip

    @contextlib.asynccontextmanager
    async def stream(self, request: ChatRequest) -> AsyncIterator[FallbackStream]:
        """Open a streamed completion on the first entry that produces a token.

        Yields:
            A :class:`FallbackStream` (the events of the answering entry).

        Raises:
            EndpointError: every entry failed before its first token (the last
                entry's error), or the answering entry failed after it.
            URLPolicyError: every entry failed and the last one's address is refused.
        """
        chat = FallbackStream(self, request)
        try:
            yield chat
        finally:
            await chat.aclose()


class FallbackStream:
    """The events of one reply from the answering entry (async iterator).

    Attributes:
        entry: the index of the entry answering (``None`` before the first event).
        skipped: ``(index, reason)`` of entries not used, in order.
    """

    def __init__(self, owner: FallbackChatClient, request: ChatRequest) -> None:
        self._owner = owner
        self._request = request
        self._budget_s = request.first_token_timeout_s or max(
            c.timeouts.first_token_budget_s for c in owner.clients
        )
        self._deadline = asyncio.get_running_loop().time() + self._budget_s
        self.entry: int | None = None
        self.skipped: list[tuple[int, str]] = []
        self._current: _Attempt | None = None
        self._opened = False
        self._done = False
        self._resolved = False

    @property
    def timings(self) -> StreamTimings:
        if self._current is None:
            return StreamTimings(started_ns=0)
        return self._current.stream.timings

    @property
    def usage(self) -> Usage | None:
        return None if self._current is None else self._current.stream.usage

    @property
    def finish_reason(self) -> str | None:
        return None if self._current is None else self._current.stream.finish_reason

    @property
    def host(self) -> str | None:
        return None if self.entry is None else self._owner.host(self.entry)

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> ChatEvent:
        if not self._opened:
            self._opened = True
            self._current = await self._open()
            self.entry = self._current.index
        current = self._current
        if current is None or self._done:
            raise StopAsyncIteration
        if current.buffered:
            return current.buffered.pop(0)
        try:
            return await anext(current.stream)
        except StopAsyncIteration:
            self._resolve(failed=False)
            raise
        except EndpointError:
            self._resolve(failed=True)
            raise

    def _resolve(self, *, failed: bool) -> None:
        """The answering entry's reply ended: its circuit learns how (once)."""
        if self._resolved or self._current is None:
            return
        self._resolved = True
        breaker = self._owner.breakers[self._current.index]
        if failed:
            breaker.failure()
        else:
            breaker.success()

    async def _start(self, index: int) -> _Attempt:
        left = self._deadline - asyncio.get_running_loop().time()
        request = dataclasses.replace(self._request, first_token_timeout_s=max(left, 0.001))
        stack = contextlib.AsyncExitStack()
        stream = await stack.enter_async_context(self._owner.clients[index].stream(request))
        return _Attempt(index, stack, stream)

    async def _first_token(self, attempt: _Attempt) -> _Attempt:
        """Read ``attempt`` until its first generated delta (or its end)."""
        async for event in attempt.stream:
            attempt.buffered.append(event)
            if isinstance(event, _GENERATED):
                break
        return attempt

    async def _try(self, index: int) -> _Attempt:
        attempt = await self._start(index)
        try:
            return await self._first_token(attempt)
        except BaseException:
            await attempt.stack.aclose()
            raise

    async def _open(self) -> _Attempt:
        owner = self._owner
        n = len(owner.clients)
        last: EndpointError | URLPolicyError | None = None
        asked = False
        for forced in (False, True):
            if forced:
                if asked:
                    break
                # Every circuit is open: ask them all in order rather than refuse the turn.
                self.skipped.clear()
            pos = 0
            while pos < n:
                index = pos
                pos += 1
                loop_time = asyncio.get_running_loop().time()
                if loop_time >= self._deadline and last is not None:
                    self.skipped.append((index, "budget"))
                    continue
                breaker = owner.breakers[index]
                if not forced and not breaker.allow():
                    self.skipped.append((index, "circuit_open"))
                    continue
                asked = True
                hedge = owner.early_start_s(index)
                try:
                    if hedge is not None and pos < n:
                        attempt, used_next = await self._hedged(index, pos, hedge, forced)
                        if used_next:
                            pos += 1
                    else:
                        attempt = await self._try(index)
                except _HedgeFailed as both:
                    pos += 1
                    last = self._failed(index, both.first, pos < n)
                    continue
                except (EndpointError, URLPolicyError) as exc:
                    last = self._failed(index, exc, pos < n)
                    continue
                except BaseException:
                    breaker.release()
                    raise
                # The entry's circuit learns at the end of the reply (a stream that
                # stalls after its first token is a failure too).
                if self.skipped:
                    log.info(
                        "endpoint entry %d (%s) answered",
                        attempt.index, owner.host(attempt.index),
                        extra={"entry": attempt.index, "host": owner.host(attempt.index),
                               "skipped": list(self.skipped)},
                    )  # fmt: skip
                return attempt
        assert last is not None
        raise last

    def _failed(
        self, index: int, exc: EndpointError | URLPolicyError, more: bool
    ) -> EndpointError | URLPolicyError:
        owner = self._owner
        owner.breakers[index].failure()
        reason = exc.kind if isinstance(exc, EndpointError) else "url_policy"
        self.skipped.append((index, reason))
        log.warning(
            "endpoint entry %d (%s) failed before its first token (%s); %s",
            index, owner.host(index), reason,
            "trying the next entry" if more else "no entry left",
            extra={"entry": index, "host": owner.host(index), "kind": reason},
        )  # fmt: skip
        return exc

    async def _hedged(
        self, first: int, second: int, after_s: float, forced: bool
    ) -> tuple[_Attempt, bool]:
        """Race ``first`` against ``second`` started ``after_s`` later, if ``first``
        has not produced a token by then.

        Returns the winner and whether ``second`` was asked (the caller moves past it).
        ``second``'s failure is recorded here; ``first``'s error is raised if both fail.
        """
        a = asyncio.create_task(self._try(first))
        b: asyncio.Task[_Attempt] | None = None
        try:
            done, _ = await asyncio.wait({a}, timeout=after_s)
            if done:
                return a.result(), False
            breaker = self._owner.breakers[second]
            if not forced and not breaker.allow():
                return await a, False
            b = asyncio.create_task(self._try(second))
            pending: set[asyncio.Task[_Attempt]] = {a, b}
            first_error: BaseException | None = None
            while pending:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    exc = task.exception()
                    if exc is None:
                        for other in pending:
                            other.cancel()
                        for other in pending:
                            with contextlib.suppress(BaseException):
                                loser = await other
                                await loser.stack.aclose()
                        if task is b:
                            # Slower than its early start and the next entry together:
                            # a failure (two in a row open its circuit).
                            reason = getattr(first_error, "kind", "url_policy")
                            self.skipped.append((first, reason if first_error else "hedged"))
                            self._owner.breakers[first].failure()
                        else:
                            breaker.release()
                        return task.result(), True
                    if task is a:
                        first_error = exc
                    if task is b:
                        breaker.failure()
                        self.skipped.append((second, getattr(exc, "kind", "url_policy")))
            exc_a = a.exception()
            assert isinstance(exc_a, EndpointError | URLPolicyError)
            raise _HedgeFailed(exc_a)
        finally:
            for leftover in (a, b):
                if leftover is not None and not leftover.done():
                    leftover.cancel()
                    if leftover is b:
                        # Cancelled with the reply (the caller went on): ``second`` told
                        # nothing, so a half-open probe it took is free again.
                        self._owner.breakers[second].release()

    async def aclose(self) -> None:
        # Closed before its end (the caller interrupted): the entry was answering.
        self._resolve(failed=False)
        self._done = True
        current, self._current = self._current, None
        if current is not None:
            self._current = None
            await current.stack.aclose()
            self._current = current  # timings stay readable after close
