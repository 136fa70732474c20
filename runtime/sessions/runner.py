"""The session runner: binds, starts, limits and resumes the sessions of one worker."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import json
import logging
import secrets as pysecrets
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from typing import Any

from runtime.conversation.config import SessionConfig
from runtime.endpoints import Resolver, URLPolicy, check_endpoint_url
from runtime.errors import URLPolicyError
from runtime.llm.client import ChatClient, ClientTimeouts, Endpoint, RetryPolicy
from runtime.llm.fallback import FallbackChatClient
from runtime.llm.think import leading_from_setting
from runtime.protocol import events as ev
from runtime.sessions.engines import Engines
from runtime.sessions.errors import SessionRefused
from runtime.sessions.limits import RunnerLimits
from runtime.sessions.live import Emit, LiveSession, Observer, PlayoutFactory
from runtime.sessions.metrics import SessionMetrics
from runtime.sessions.principals import Principal, token_hash
from runtime.sessions.resume import (
    LEASE_S,
    MemorySessionStore,
    ResumableState,
    SessionStateStore,
)
from runtime.sessions.shared_state import MemoryRateLimiter, RateLimiter
from runtime.sessions.spec import STATE_FORMAT, SessionSpec
from runtime.sessions.tracing import TurnTracer
from runtime.speech.voices import DEFAULT_HOSTED_VOICE, VoiceMap

log = logging.getLogger("voxloop.session")


TAKEOVER_TIMEOUT_S = 10.0
"""How long a resume waits for the old socket of a session it takes over to let go."""


@dataclasses.dataclass(frozen=True, slots=True)
class _Running:
    """A session attached to a socket of this worker.

    Attributes:
        take_over: drops the socket, keeping the session for a resume.
        released: set once the session's state has been kept or discarded.
    """

    live: LiveSession
    take_over: Callable[[], None]
    released: asyncio.Event


def _allowed(principal: Principal, owner: str, resume_token_hash: str) -> bool:
    """Whether ``principal`` may resume a session: the account whose key opened it (or
    minted its token), with that key or a fresh token of its own; or its resume token."""
    if principal.kind in ("key", "token"):
        return hmac.compare_digest(principal.owner, owner)
    return (
        principal.kind == "resume"
        and principal.resume_token is not None
        and hmac.compare_digest(token_hash(principal.resume_token.reveal()), resume_token_hash)
    )


def _forbidden() -> SessionRefused:
    return SessionRefused(
        "session_forbidden", "that session belongs to another credential", param="session_id"
    )


class SessionRunner:
    """Binds, starts, limits and resumes the sessions of one worker.

    Args:
        load_agent: a stored agent by id, its secrets opened in memory (``None``: absent).
        box: seals the secrets of resumable state.
        policy, resolver: the URL policy for endpoints and HTTP tools.
        default_llm: the server's endpoint for sessions without ``llm``.
        voices: installed voice ids (and aliases).
        engines: the shared speech engines.
        limits: see :class:`RunnerLimits`.
        states: where dropped sessions wait for a resume.
    """

    def __init__(
        self,
        *,
        load_agent: Callable[[str], Awaitable[Any]],
        box: Any,
        policy: URLPolicy,
        resolver: Resolver,
        default_llm: ev.LLMSpec | None,
        voices: frozenset[str],
        engines: Engines,
        limits: RunnerLimits | None = None,
        states: SessionStateStore | None = None,
        metrics: SessionMetrics | None = None,
        limiter: RateLimiter | None = None,
        sessions_per_minute: int = 120,
        checkpoints: bool = False,
        voice_map: VoiceMap | None = None,
        max_tokens: int | None = None,
        tracer: TurnTracer | None = None,
    ) -> None:
        self.load_agent = load_agent
        self.box = box
        self.policy = policy
        self.resolver = resolver
        self.default_llm = default_llm
        self.voices = voices
        self.engines = engines
        self.limits = limits or RunnerLimits()
        self.states: SessionStateStore = states if states is not None else MemorySessionStore()
        self.metrics = metrics or SessionMetrics()
        self.limiter: RateLimiter = limiter or MemoryRateLimiter()
        self.sessions_per_minute = sessions_per_minute
        #: Save each session's state after every reply (shared stores: a dead worker's
        #: sessions resume elsewhere). Off for the in-process store, which dies with it.
        self.checkpoints = checkpoints
        #: Spans of answered turns (``VOXLOOP_OTEL_TRACES``), or ``None``.
        self.tracer = tracer
        #: Set on SIGTERM: no new sessions; live ones finish their reply (see :meth:`drain`).
        self.draining = False
        self._kept_while_draining = 0  # sessions released for a resume since the drain began
        self.voice_map = voice_map
        self.max_tokens = max_tokens
        self.active = 0
        # Connections per credential that have not bound a session yet.
        self._unbound: dict[str, int] = {}
        # Sessions running on this worker (see :class:`_Running`).
        self._running: dict[str, _Running] = {}

    def voice_known(self, voice: str) -> bool:
        return not self.voices or voice in self.voices

    def core_config(self, spec: SessionSpec) -> SessionConfig:
        """The conversation core's configuration for ``spec`` on this worker (its
        ``early_decode`` setting applied)."""
        config = spec.core_config()
        if self.limits.early_decode:
            return config
        td = dataclasses.replace(config.turn_detection, speculate_ms=None)
        return dataclasses.replace(config, turn_detection=td)

    def chat_client(
        self, *entries: ev.LLMSpec, max_tokens: int | None = None
    ) -> ChatClient | FallbackChatClient:
        """The endpoint client of a session: one entry's :class:`ChatClient`, or a
        :class:`FallbackChatClient` over several (an entry with a next one does not
        retry itself: a failure moves to the next entry at once).

        Args:
            entries: the ``llm`` entries, in order; each one's ``max_tokens`` and
                ``first_token_timeout_ms`` apply to its own requests.
            max_tokens: the server's ``max_tokens``, for entries without their own.
        """
        clients = [
            ChatClient(
                Endpoint(llm.base_url, llm.model, llm.api_key), policy=self.policy,
                resolver=self.resolver, leading_reasoning=leading_from_setting(llm.think_block),
                retry=RetryPolicy(max_attempts=1) if i < len(entries) - 1 else None,
                timeouts=entry_timeouts(llm),
                max_tokens=llm.max_tokens if llm.max_tokens is not None else max_tokens,
            )
            for i, llm in enumerate(entries)
        ]  # fmt: skip
        return clients[0] if len(clients) == 1 else FallbackChatClient(clients)

    async def admit(self, principal: Principal) -> None:
        """Count a session start of ``principal``'s owner against the per-minute limit.

        Raises:
            SessionRefused: ``at_capacity`` past ``sessions_per_minute`` (shared by the
                workers with Redis).
        """
        if principal.kind == "resume":
            return  # resuming is not starting
        if not await self.limiter.allow("sessions", principal.owner, self.sessions_per_minute):
            raise SessionRefused(
                "at_capacity", "too many sessions started with this credential; wait a minute"
            )

    def take_slot(self) -> None:
        """Take one of the worker's session slots for a session being bound or resumed
        (give it back with :meth:`free_slot`). An open socket takes none.

        Raises:
            SessionRefused: ``at_capacity``.
        """
        if self.draining:
            raise SessionRefused(
                "server_error",
                "this server is shutting down; connect again (another worker answers)",
            )
        if self.active >= self.limits.max_sessions:
            raise SessionRefused("at_capacity", "this server is at capacity; try again shortly")
        self.active += 1

    def free_slot(self) -> None:
        self.active -= 1

    @contextlib.contextmanager
    def slot(self) -> Iterator[None]:
        """Hold a session slot for the block (:meth:`take_slot` … :meth:`free_slot`).

        Raises:
            SessionRefused: ``at_capacity``.
        """
        self.take_slot()
        try:
            yield
        finally:
            self.free_slot()

    @contextlib.contextmanager
    def unbound(self, credential: str) -> Iterator[None]:
        """Count a connection of ``credential`` that has not bound a session yet.

        Raises:
            SessionRefused: ``at_capacity``: the credential already has
                :attr:`RunnerLimits.unbound_per_credential` such connections.
        """
        count = self._unbound.get(credential, 0)
        if count >= self.limits.unbound_per_credential:
            raise SessionRefused(
                "at_capacity",
                "too many connections of this credential are waiting to bind a session",
            )
        self._unbound[credential] = count + 1
        try:
            yield
        finally:
            left = self._unbound[credential] - 1
            if left:
                self._unbound[credential] = left
            else:
                del self._unbound[credential]

    # -- binding ----------------------------------------------------------------------

    async def bind(self, patch: ev.SessionPatch) -> SessionSpec:
        """The effective configuration for a first ``session.update``.

        Raises:
            SessionRefused: ``agent_not_found``, ``agent_init_failed`` (a stored
                agent that cannot run), ``invalid_value``/``invalid_config`` (an
                inline configuration that cannot run; the client may send another).
        """
        if patch.agent_id is not None:
            spec = await self._stored(patch.agent_id)
            fatal: ev.ErrorCode = "agent_init_failed"
        else:
            spec = SessionSpec().apply(patch)
            fatal = "invalid_config"
        spec = self.resolve_voice(spec, "invalid_value" if fatal == "invalid_config" else fatal)
        spec = dataclasses.replace(spec, max_tokens=self.max_tokens)
        if spec.llm is None:
            if self.default_llm is None:
                raise SessionRefused(
                    fatal,
                    "no llm is configured: give the agent or session an llm entry, or set "
                    "VOXLOOP_LLM_BASE_URL and VOXLOOP_LLM_MODEL on the server",
                    param="session.llm",
                )
            spec = dataclasses.replace(spec, llm=self.default_llm)
        if self.limits.single_llm_entry and spec.fallbacks:
            raise SessionRefused(
                "invalid_config" if fatal == "invalid_config" else fatal,
                ev.SINGLE_ENTRY_MESSAGE, param="session.llm[1]",
            )  # fmt: skip
        await self.check_endpoint(spec, fatal)
        return spec

    def resolve_voice(self, spec: SessionSpec, code: ev.ErrorCode) -> SessionSpec:
        """``spec`` with its voice name resolved to an installed voice (no name: the
        hosted default), and a ``voice_alias`` warning when the name is an alias.

        Raises:
            SessionRefused: ``code`` for a name that resolves to no installed voice.
        """
        named = spec.voice is not None
        name = spec.voice if spec.voice is not None else DEFAULT_HOSTED_VOICE
        resolved = self.voice_map.resolve(name) if self.voice_map is not None else None
        if resolved is None:
            if not named:
                return spec
            if self.voice_map is None and self.voice_known(name):
                return dataclasses.replace(spec, voice_id=name)
            raise SessionRefused(code, f"unknown voice {name!r}", param="session.output.voice")
        if not self.voice_known(resolved.voice_id):
            raise SessionRefused(
                code, f"voice {name!r} speaks with {resolved.voice_id!r}, which is not "
                "installed on this server", param="session.output.voice",
            )  # fmt: skip
        warnings = spec.warnings
        alias = resolved.warning("session.output.voice")
        if named and alias is not None:
            warnings = (*warnings, alias)
        return dataclasses.replace(spec, voice=name, voice_id=resolved.voice_id, warnings=warnings)

    async def check_endpoint(self, spec: SessionSpec, code: ev.ErrorCode) -> None:
        """Resolve and check the endpoint URL again (a name may now point elsewhere).

        Raises:
            SessionRefused: ``code``, saying why the URL is not allowed.
        """
        assert spec.llm is not None
        for i, entry in enumerate(spec.endpoints):
            try:
                await check_endpoint_url(entry.base_url, self.policy, self.resolver)
            except URLPolicyError as exc:
                raise SessionRefused(
                    code, f"the llm endpoint is not allowed: {exc}", param=f"llm[{i}].base_url"
                ) from None

    async def _stored(self, agent_id: str) -> SessionSpec:
        try:
            agent = await self.load_agent(agent_id)
        except Exception as exc:  # a sealed secret that does not open, the store failing
            log.warning("stored agent cannot be loaded", extra={"error": type(exc).__name__})
            raise SessionRefused(
                "agent_init_failed", "the stored agent cannot be loaded (see the server log)",
                param="session.agent_id",
            ) from None  # fmt: skip
        if agent is None:
            raise SessionRefused(
                "agent_not_found", f"no agent with id {agent_id[:80]!r}", param="session.agent_id"
            )
        doc = agent.doc
        tools = []
        for tool in doc.get("tools", []):
            tool = dict(tool)
            if "http" in tool:
                opened = agent.tool_headers.get(tool["name"], {})
                tool["http"] = {
                    **tool["http"],
                    "headers": [{"name": k, "value": v.reveal()} for k, v in opened.items()],
                }
            tools.append(tool)
        output = dict(doc.get("output") or {})
        if doc.get("voice") is not None and "voice" not in output:
            output["voice"] = doc["voice"]
        session = {
            "system_prompt": doc.get("system_prompt", ""),
            "greeting": doc.get("greeting"),
            "tools": tools,
            "input": doc.get("input") or {},
            "output": output,
        }
        try:
            patch = ev.parse_session(session)
        except ev.ProtocolError as exc:
            raise SessionRefused(
                "agent_init_failed", f"the stored agent cannot run: {exc.message}",
                param=exc.param,
            ) from None  # fmt: skip
        spec = dataclasses.replace(SessionSpec().apply(patch), agent_id=str(doc["id"]))
        entries = [
            ev.LLMSpec(
                base_url=entry.base_url, model=entry.model, api_key=entry.api_key,
                max_tokens=getattr(entry, "max_tokens", None),
                first_token_timeout_ms=getattr(entry, "first_token_timeout_ms", None),
            )
            for entry in agent.llm
        ]  # fmt: skip
        if entries:
            spec = dataclasses.replace(spec, llm=entries[0], fallbacks=tuple(entries[1:]))
        return spec

    # -- starting and resuming ------------------------------------------------------

    def start(
        self,
        spec: SessionSpec,
        principal: Principal,
        emit: Emit,
        *,
        now: float | None = None,
        playout: PlayoutFactory | None = None,
        observe: Observer | None = None,
        log_context: Mapping[str, str] | None = None,
    ) -> LiveSession:
        """A new session (run it with :meth:`LiveSession.run`).

        Args:
            playout: makes the session's speaker (default: ``reply.audio`` paced by
                :class:`PacedSink` and rendered through ``emit``).
            observe: sees every core event (metrics, logs).
            log_context: more fields for the session's ``turn metrics`` lines (a phone
                call's ``call_sid`` and ``stream_sid``).
        """
        started = time.time() if now is None else now
        duration = min(
            principal.max_duration_s or self.limits.max_duration_s, self.limits.max_duration_s
        )
        return LiveSession(
            self, session_id="sess_" + pysecrets.token_hex(12), spec=spec,
            owner=principal.owner, started_at=started, expires_at=started + duration,
            history=None, audio_seconds=0.0, emit=emit, playout=playout, observe=observe,
            log_context=log_context,
        )  # fmt: skip

    async def resume(self, session_id: str, principal: Principal, emit: Emit) -> LiveSession:
        """Continue a session: a dropped one, or one whose socket is still open here.

        A session still attached to a socket on this worker (the client changed
        networks and the old socket is half-open) is taken over at once: the old
        socket is closed and the session continues on the new one. Only the
        session's owner may do either; a refused attempt changes nothing (the
        grace period of the session it named runs on).

        Raises:
            SessionRefused: ``session_not_found`` (unknown, ended, or past the
                grace period), ``session_forbidden`` (another credential's
                session), ``session_expired``.
        """
        running = self._running.get(session_id)
        if running is None:
            # It may still run on another worker, whose socket is being torn down.
            await self.states.wait_released(session_id, TAKEOVER_TIMEOUT_S)
        if running is not None:
            if not _allowed(principal, running.live.owner, token_hash(running.live.resume_token)):
                raise _forbidden()
            running.take_over()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(TAKEOVER_TIMEOUT_S):
                    await running.released.wait()
        found = await self.states.peek(session_id)
        if found is not None and not _allowed(principal, found.owner, found.resume_token_hash):
            raise _forbidden()
        state = await self.states.take(session_id) if found is not None else None
        if state is None:
            raise SessionRefused(
                "session_not_found", "no resumable session with that id", param="session_id"
            )
        if state.expires_at <= time.time():
            raise SessionRefused("session_expired", "the session reached its maximum duration")
        spec = self._unseal(state)
        return LiveSession(
            self, session_id=state.session_id, spec=spec, owner=state.owner,
            started_at=state.started_at, expires_at=state.expires_at, history=state.history,
            audio_seconds=state.audio_seconds, emit=emit,
        )  # fmt: skip

    def attach(self, live: LiveSession, take_over: Callable[[], None] = lambda: None) -> None:
        """Note that ``live`` runs on this worker (until :meth:`release`).

        Args:
            take_over: drops the session's socket (keeping the session) when its
                owner resumes it from another connection (the default does nothing:
                a session that is never kept for a resume).
        """
        self._running[live.session_id] = _Running(live, take_over, asyncio.Event())
        self.metrics.session_started()

    async def release(self, live: LiveSession, *, keep: bool, reason: str | None = None) -> None:
        """The session's socket is gone: keep its state for a resume, or forget it.

        Args:
            reason: why it ended, for the metrics (default: ``dropped`` when kept,
                else ``ended``).
        """
        if live.session_id in self._running:
            self.metrics.session_ended(reason or ("dropped" if keep else "ended"))
            if keep and self.draining:
                self._kept_while_draining += 1
        try:
            if keep:
                await self.states.save(live.snapshot(), self.limits.resume_grace_s)
            else:
                await self.states.discard(live.session_id)
            await self.states.released(live.session_id)
        finally:
            running = self._running.pop(live.session_id, None)
            if running is not None:
                running.released.set()

    async def checkpoint(self, live: LiveSession) -> None:
        """Keep ``live``'s state now, as a drop would (it still runs here).

        The lease is marked before the state is written: a store that loses its data
        between the two writes then has no lease, which the next renewal
        (:meth:`renew_lease`) notices and keeps the state again. The other order could
        leave a lease with no state behind it, which no renewal would mend.
        """
        try:
            await self.states.running(live.session_id, LEASE_S)
            await self.states.save(live.snapshot(), self.limits.resume_grace_s)
        except Exception as exc:  # the shared store failing must not end the session
            log.warning("checkpoint failed", extra={
                "session_id": live.session_id, "error": type(exc).__name__,
            })  # fmt: skip

    async def renew_lease(self, live: LiveSession) -> None:
        """Renew the mark that ``live`` runs here; a mark the store lost (Redis restarted
        without its data) means the state may be gone too: it is kept again now, not at
        the next turn, so a worker dying meanwhile leaves the session resumable."""
        try:
            kept = await self.states.running(live.session_id, LEASE_S)
        except Exception as exc:  # the shared store failing must not end the session
            log.warning("lease renewal failed", extra={
                "session_id": live.session_id, "error": type(exc).__name__,
            })  # fmt: skip
            return
        if not kept:
            await self.checkpoint(live)

    @property
    def live_sessions(self) -> int:
        """Sessions running on this worker now."""
        return len(self._running)

    async def drain(self, timeout_s: float) -> int:
        """Stop taking sessions and end the live ones gracefully (a worker going away).

        Each live session finishes the reply it is speaking, then ends with
        ``session.ended`` (close 1000). Those still running after ``timeout_s`` are
        handed off: their state is kept for a resume (in Redis, on any worker) and
        their socket closes 1012 (service restart) without ``session.ended``, which
        clients treat as a drop and resume.

        Returns:
            How many sessions were kept for a resume rather than ended: handed off at the
            timeout, or cut meanwhile (a second signal stopping the server, a drop).
        """
        self.draining = True
        self._kept_while_draining = 0
        for running in list(self._running.values()):
            running.live.finish_after_reply()
        if not await self._settled(timeout_s):
            for running in list(self._running.values()):
                running.live.hand_off()
            await self._settled(TAKEOVER_TIMEOUT_S)
        return self._kept_while_draining

    async def _settled(self, timeout_s: float) -> bool:
        """Wait until every session of this worker has released its state."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                while self._running:
                    await next(iter(self._running.values())).released.wait()
        return not self._running

    def seal_state(self, live: LiveSession) -> ResumableState:
        context = f"session:{live.session_id}"
        doc = live.spec.to_state(
            lambda value, label: self.box.seal(value, context=f"{context}:{label}")
        )
        return ResumableState(
            session_id=live.session_id, owner=live.owner,
            resume_token_hash=token_hash(live.resume_token), spec=doc,
            history=live.history(), started_at=live.started_at, expires_at=live.expires_at,
            audio_seconds=live.audio_seconds,
        )  # fmt: skip

    def _unseal(self, state: ResumableState) -> SessionSpec:
        context = f"session:{state.session_id}"
        if state.spec.get("format") == STATE_FORMAT:
            return SessionSpec.from_state(
                state.spec,
                lambda sealed, label: self.box.open(sealed, context=f"{context}:{label}"),
            )
        return self._unseal_public(state)

    def _unseal_public(self, state: ResumableState) -> SessionSpec:
        """A state written by an earlier version (a worker of it drained into Redis):
        :meth:`SessionSpec.public` plus sealed keys, which lacks some settings."""
        doc = json.loads(json.dumps(state.spec))
        context = f"session:{state.session_id}"
        for tool in doc["tools"]:
            if "http" in tool:
                tool["http"]["headers"] = [
                    {"name": h["name"],
                     "value": self.box.open(h["sealed"],
                                            context=f"{context}:tool:{h['name']}").reveal()}
                    for h in tool["http"]["headers"]
                ]  # fmt: skip
        llm = doc.pop("llm", [])
        key = doc.pop("llm_key", None)
        fallback_keys = doc.pop("llm_fallback_keys", [])
        agent_id = doc.pop("agent_id", None)
        voice_id = doc.pop("voice_id", None)
        max_tokens = doc.pop("server_max_tokens", None)
        warnings = tuple(doc.pop("warnings", ()))
        patch = ev.parse_session(doc)
        spec = dataclasses.replace(
            SessionSpec().apply(patch), voice_id=voice_id, max_tokens=max_tokens,
            warnings=warnings,
        )  # fmt: skip
        td = doc["input"]["turn_detection"]
        spec = dataclasses.replace(
            spec,
            agent_id=agent_id,
            turn_detection=dataclasses.replace(
                spec.turn_detection, min_silence_ms=td["min_silence"],
                max_silence_ms=td["max_silence"],
                pause_ms=min(spec.turn_detection.pause_ms, td["min_silence"]),
            ),
        )  # fmt: skip
        if llm:
            api_key = self.box.open(key, context=f"{context}:llm") if key else None
            fallbacks = []
            for i, entry in enumerate(llm[1:], start=1):
                sealed = fallback_keys[i - 1] if i - 1 < len(fallback_keys) else None
                fallbacks.append(ev.LLMSpec(
                    base_url=entry["base_url"], model=entry["model"],
                    api_key=self.box.open(sealed, context=f"{context}:llm:{i}") if sealed else None,
                    max_tokens=entry.get("max_tokens"),
                    first_token_timeout_ms=entry.get("first_token_timeout_ms"),
                ))  # fmt: skip
            spec = dataclasses.replace(
                spec,
                llm=ev.LLMSpec(base_url=llm[0]["base_url"], model=llm[0]["model"],
                               api_key=api_key, max_tokens=llm[0].get("max_tokens"),
                               first_token_timeout_ms=llm[0].get("first_token_timeout_ms")),
                fallbacks=tuple(fallbacks),
            )  # fmt: skip
        return spec


def entry_timeouts(entry: ev.LLMSpec) -> ClientTimeouts | None:
    """The client deadlines of an ``llm`` entry: its ``first_token_timeout_ms`` bounds
    its wait for the first token, retries included (``None``: the client's defaults,
    4 s an attempt and 5 s in all)."""
    if entry.first_token_timeout_ms is None:
        return None
    first = entry.first_token_timeout_ms / 1000
    return ClientTimeouts(first_token_s=first, first_token_budget_s=first)
