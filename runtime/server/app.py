"""The agent service's HTTP API (Starlette): agents, temporary tokens, voices.

Every route but ``/``, ``/health``, ``/healthz`` (liveness), ``/readyz``
(readiness: 503 until the speech engines, loaded at start-up, are ready),
``/docs`` and ``/openapi.json`` needs an API key (``Authorization: <key>``
or ``Bearer <key>``). Bodies are limited in size and time, parsed and
validated completely (``runtime.agents.schema``) before anything is
written, and each request is one database transaction; secrets (endpoint
``api_key`` s, HTTP-tool header values) are sealed before they are stored
and never appear in a response, a log line or an error. No input produces
a 500; if a bug does, the response says ``Connection: close``.

For the realtime server
-----------------------
* :meth:`Api.load_agent` loads a stored agent by id with its secrets opened
  in memory (:class:`LoadedAgent`: ``llm[i].api_key`` and tool header values
  as :class:`~runtime.secret.Secret`).
* :meth:`Api.redeem` checks a temporary token and records its single use
  atomically (one row insert; a second redemption on any worker fails).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import hashlib
import hmac
import html
import json
import logging
import os
import re
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from runtime import __version__
from runtime.agents.schema import (
    AgentInput,
    FieldError,
    check_llm_count,
    check_urls,
    openapi_document,
    parse_json,
    shorten,
    validate_agent,
)
from runtime.agents.secrets import (
    KeyRing,
    KeyUnavailable,
    SecretBox,
    SecretError,
)
from runtime.agents.store import (
    AgentRow,
    Store,
    StoreError,
    WriteTx,
    database_url,
    decode_cursor,
    now,
    sqlite_url,
)
from runtime.agents.tokens import Tokens
from runtime.endpoints import Resolver, StaticResolver, SystemResolver, URLPolicy
from runtime.protocol.events import IGNORED_INPUT, IGNORED_TOOL, IGNORED_TURN_DETECTION, LLMSpec
from runtime.secret import Secret
from runtime.server.logs import AccessLog, current_request_id
from runtime.server.page import PageSettings, page_response, page_routes, wants_page
from runtime.server.realtime import realtime_endpoint, unknown_socket
from runtime.server.telephony import MEDIA_PATH, VOICE_PATH, Telephony, TwilioSettings
from runtime.server.worker import drain_on_signals
from runtime.sessions import (
    Engines,
    RunnerLimits,
    SessionRunner,
    default_llm_from_env,
    key_owner,
)
from runtime.sessions.limits import positive_setting as _positive
from runtime.sessions.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from runtime.sessions.shared_state import (
    MemoryRateLimiter,
    RateLimiter,
    RedisRateLimiter,
    RedisSessionStore,
    RedisTokenUses,
)
from runtime.sessions.shared_state import connect as connect_redis
from runtime.sessions.tracing import TurnTracer
from runtime.speech.voices import VoiceMap, voice_map_from_env

if TYPE_CHECKING:
    from redis.asyncio import Redis

    from runtime.speech.engines.registry import RemoteOptions

log = logging.getLogger("voxloop.server")

MAX_BODY: Final = 1 << 20
BODY_TIMEOUT_S: Final = 30.0
TOKEN_TTL_MAX: Final = 600
SESSION_MAX: Final = 10_800
PAGE_MAX: Final = 200
_ASCII_INT: Final = re.compile(r"[0-9]{1,9}")


@dataclass
class Settings:
    """Server configuration (see :func:`settings_from_env`).

    Attributes:
        key_file: where ``ring`` was read from (``None`` with ``VOXLOOP_SECRET_KEY``);
            re-read when another process rotates the key.
    """

    api_keys: frozenset[str]
    data_dir: Path
    database_url: str
    ring: KeyRing
    policy: URLPolicy = field(default_factory=URLPolicy)
    resolver: Resolver = field(default_factory=SystemResolver)
    # Voice ids (and aliases) an agent may name: every voice voxloop's engines have.
    voices: frozenset[str] = frozenset()
    # Those this installation can speak; agents naming others are stored with a warning.
    installed_voices: frozenset[str] = frozenset()
    key_file: Path | None = None
    limits: RunnerLimits = field(default_factory=RunnerLimits)
    default_llm: LLMSpec | None = None
    stt_engine: str = "whisper"
    tts_engine: str = "piper"
    # Where remote speech engines live (VOXLOOP_STT_BASE_URL …; None: embedded engines).
    stt_remote: RemoteOptions | None = None
    tts_remote: RemoteOptions | None = None
    twilio: TwilioSettings = field(default_factory=TwilioSettings)
    page: PageSettings = field(default_factory=PageSettings)
    # Live state shared by several workers (resume, token uses, rate limits); None: memory.
    redis_url: str | None = None
    redis_prefix: str = "voxloop:"
    # /metrics without a key (for a scraper on a private network).
    metrics_public: bool = False
    # Per credential owner a minute, counted across workers with Redis.
    sessions_per_minute: int = 120
    tokens_per_minute: int = 600
    # SIGTERM: how long live sessions may finish their reply before they are handed off.
    drain_timeout_s: float = 30.0
    # What each voice name speaks with on this server's TTS engine (None: the default map).
    voice_map: VoiceMap | None = None
    # GET /v1/agents: "auto" (the envelope for clients that page or identify as the
    # agents SDK, the bare array otherwise), "array" or "envelope".
    agents_list: str = "auto"
    # The chat-completions max_tokens for every session (None: none sent); an agent's
    # llm[0].max_tokens wins.
    max_tokens: int | None = None
    # OpenTelemetry spans of answered turns (VOXLOOP_OTEL_TRACES), or None.
    traces: TurnTracer | None = None


def policy_from_env(env: Mapping[str, str]) -> URLPolicy:
    """The stored-endpoint URL policy with ``VOXLOOP_ALLOW_PRIVATE_ENDPOINTS`` applied.

    ``1``/``true``/``yes``/``all`` allow every non-public address; otherwise a
    comma-separated list of host names and CIDRs. Allowed private hosts may
    use plain ``http``; public hosts always need ``https``.

    Raises:
        ValueError: an entry is neither a host name nor a network.
    """
    policy = URLPolicy()
    allow = env.get("VOXLOOP_ALLOW_PRIVATE_ENDPOINTS", "").strip()
    if allow.lower() in ("1", "true", "yes", "all"):
        return URLPolicy(allow_private=True)
    if allow:
        try:
            return policy.with_allowlist(allow.split(","))
        except ValueError as exc:
            raise ValueError(f"VOXLOOP_ALLOW_PRIVATE_ENDPOINTS: {exc}") from None
    return policy


def settings_from_env(
    env: Mapping[str, str], *, data_dir: Path | None = None, database_url: str | None = None
) -> Settings:
    """Build settings from ``VOXLOOP_*`` environment variables (and flags that override them).

    Raises:
        ValueError: a variable is malformed, the database URL is not supported,
            or no API key is configured.
        SecretError: the key ring cannot be read.
    """
    from runtime.speech.engines.registry import (
        engine_voices,
        installed_voice_ids,
        known_voices,
        remote_options_from_env,
        voice_ids,
    )

    keys = frozenset(k.strip() for k in env.get("VOXLOOP_API_KEYS", "").split(",") if k.strip())
    if not keys:
        raise ValueError("set VOXLOOP_API_KEYS to the comma-separated keys that may call the API")
    directory = data_dir or Path(env.get("VOXLOOP_DATA_DIR", "voxloop-data"))
    raw_url = database_url or env.get("VOXLOOP_DATABASE_URL")
    url = _database_url(raw_url) if raw_url else sqlite_url(directory)
    key_file: Path | None = None
    if env.get("VOXLOOP_SECRET_KEY"):
        ring = KeyRing.from_env(env["VOXLOOP_SECRET_KEY"])
    else:
        key_file = directory / "secret.key"
        ring = KeyRing.load_or_create(key_file)
    policy = policy_from_env(env)
    resolver: Resolver = SystemResolver()
    if env.get("VOXLOOP_STATIC_HOSTS"):
        try:
            table = json.loads(env["VOXLOOP_STATIC_HOSTS"])
        except ValueError:
            table = None
        if not isinstance(table, dict) or not all(isinstance(v, list) for v in table.values()):
            raise ValueError("VOXLOOP_STATIC_HOSTS must be a JSON object of host -> [addresses]")
        resolver = StaticResolver({str(k): [str(a) for a in v] for k, v in table.items()})
    stt_engine = env.get("VOXLOOP_STT", "whisper").strip() or "whisper"
    tts_engine = env.get("VOXLOOP_TTS", "piper").strip() or "piper"
    stt_remote = remote_options_from_env(env, "STT", stt_engine, policy)
    tts_remote = remote_options_from_env(env, "TTS", tts_engine, policy)
    voice_map = voice_map_from_env(env, tts_engine, engine_voices(tts_engine))
    # A remote TTS engine speaks its own voices: they are installed as far as agents go.
    remote_voices = voice_ids(engine_voices(tts_engine)) if tts_remote is not None else frozenset()
    agents_list = env.get("VOXLOOP_AGENTS_LIST", "auto").strip().lower() or "auto"
    if agents_list not in ("auto", "array", "envelope"):
        raise ValueError("VOXLOOP_AGENTS_LIST must be auto, array or envelope")
    raw_max = env.get("VOXLOOP_LLM_MAX_TOKENS", "").strip()
    if raw_max and (not _ASCII_INT.fullmatch(raw_max) or int(raw_max) < 1):
        raise ValueError("VOXLOOP_LLM_MAX_TOKENS must be a positive integer")
    max_tokens = int(raw_max) if raw_max else None
    return Settings(
        keys, directory, url, ring, policy, resolver,
        voice_ids(known_voices()) | voice_map.names(), installed_voice_ids() | remote_voices,
        key_file=key_file,
        limits=RunnerLimits.from_env(env), default_llm=default_llm_from_env(env),
        stt_engine=stt_engine, tts_engine=tts_engine, stt_remote=stt_remote,
        tts_remote=tts_remote,
        twilio=TwilioSettings.from_env(env),
        page=PageSettings.from_env(env),
        redis_url=_redis_url(env.get("VOXLOOP_REDIS_URL", "").strip()) or None,
        redis_prefix=env.get("VOXLOOP_REDIS_PREFIX", "voxloop:"),
        metrics_public=env.get("VOXLOOP_METRICS_PUBLIC", "").strip().lower()
        in ("1", "true", "yes"),
        sessions_per_minute=_positive(env, "VOXLOOP_SESSIONS_PER_MINUTE", 120),
        tokens_per_minute=_positive(env, "VOXLOOP_TOKENS_PER_MINUTE", 600),
        drain_timeout_s=_seconds(env, "VOXLOOP_DRAIN_TIMEOUT", 30.0),
        voice_map=voice_map, agents_list=agents_list, max_tokens=max_tokens,
        traces=TurnTracer.from_env(env),
    )  # fmt: skip


def _redis_url(url: str) -> str:
    if url and not url.startswith(("redis://", "rediss://", "unix://")):
        raise ValueError("VOXLOOP_REDIS_URL must be redis://host:port/db (or rediss://, unix://)")
    return url


def _seconds(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0 <= value <= 3600:
        raise ValueError(f"{name} must be a number of seconds from 0 to 3600")
    return value


def _database_url(text: str) -> str:
    return database_url(text)


async def check_database(settings: Settings) -> None:
    """Connect to the database and migrate it, then close (before a server says "listening");
    with ``VOXLOOP_REDIS_URL``, check that Redis answers too.

    Raises:
        StoreError: the database cannot be reached or opened, or its secrets are
            sealed under a key this key ring lacks (one line).
    """
    store = Store(settings.database_url)
    await store.start()
    try:
        kid = await store.init_primary(settings.ring.primary)
    finally:
        await store.aclose()
    if not SecretBox(settings.ring, key_file=settings.key_file).has_key(kid):
        raise StoreError(
            f"the database's secrets are sealed under key {kid!r}, which this key ring does not "
            "hold; set VOXLOOP_SECRET_KEY to the ring the last `voxloop secrets rotate-key` printed"
        )
    if settings.redis_url:
        redis = connect_redis(settings.redis_url)
        try:
            await redis.ping()
        except Exception as exc:
            raise StoreError(
                f"cannot reach Redis at VOXLOOP_REDIS_URL ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else 'no answer'})"
            ) from None
        finally:
            await redis.aclose()


class BodyRefused(FieldError):
    """A body refused before its end (too large, too slow): the answer closes the
    connection, so the rest of the body is never read."""


def _field_error(status: int, exc: FieldError, code: str) -> JSONResponse:
    closing = {"connection": "close"} if isinstance(exc, BodyRefused) else None
    return _error(
        status, exc.message, param=exc.param, code=code, headers=closing, problems=exc.problems
    )


_STATUS_CODES: Final = {
    400: "invalid_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "invalid_request",
    422: "validation_error",
    429: "rate_limited",
    500: "internal_error",
    503: "unavailable",
}


def _error(
    status: int,
    message: str,
    *,
    param: str | None = None,
    code: str | None = None,
    headers: Mapping[str, str] | None = None,
    problems: list[tuple[str, str]] | None = None,
) -> JSONResponse:
    """The error envelope every failed request gets.

    ``{"code", "message", "param", "request_id", "errors"?, "detail"}``: ``code`` a
    machine-readable string (``_STATUS_CODES`` by status unless given), ``message`` one
    line, ``param`` the offending field or ``null``, ``errors`` one ``{param, message}``
    per field problem, ``request_id`` the ``X-Request-ID`` header's value, and ``detail``
    the message again for clients written against the older ``{"detail": ...}`` form.
    """
    message = shorten(message)
    request_id = current_request_id.get() or uuid.uuid4().hex
    body: dict[str, Any] = {
        "code": code or _STATUS_CODES.get(status, "error"),
        "message": message,
        "param": None,
        "request_id": request_id,
    }
    if param:
        param = shorten(param, 200)
        body["param"] = param
        body["errors"] = [
            {"param": shorten(p, 200), "message": shorten(m)}
            for p, m in (problems or [(param, message)])
        ]
    body["detail"] = message
    out = dict(headers or {})
    out["X-Request-ID"] = request_id
    return JSONResponse(body, status_code=status, headers=out)


async def _http_exception(request: Request, exc: Exception) -> Response:
    """Unknown routes (404) and methods (405) answer with the JSON error envelope too."""
    assert isinstance(exc, HTTPException)
    messages = {404: "no such route", 405: f"method {request.method} is not allowed here"}
    message = messages.get(exc.status_code, str(exc.detail))
    headers = dict(exc.headers or {})
    if exc.status_code == 405:
        # Every method the path has (one route per method), not only the first route's.
        allowed = {
            method
            for route in request.app.routes
            if isinstance(route, Route) and route.path_regex.match(request.url.path)
            for method in route.methods or ()
        }
        headers["Allow"] = ", ".join(sorted(allowed))
    return _error(exc.status_code, message, headers=headers)


def _iso(value: Any) -> str:
    text = str(value.isoformat())
    return text if value.tzinfo else text + "+00:00"


ENTRY_SETTINGS: Final = ("max_tokens", "first_token_timeout_ms")
"""An ``llm`` entry's own settings, stored and read back beside its URL and model."""


@dataclass(frozen=True, slots=True)
class LoadedLLM:
    """An agent's endpoint with its key opened (in memory only)."""

    base_url: str
    model: str
    api_key: Secret
    max_tokens: int | None = None
    first_token_timeout_ms: int | None = None


@dataclass(frozen=True, slots=True)
class LoadedAgent:
    """A stored agent ready to run.

    Attributes:
        doc: the public agent (as ``GET /v1/agents/{id}`` returns it).
        llm: the endpoints, in order (the first and its fallbacks), keys opened.
        tool_headers: tool name -> header name -> value, opened.
    """

    doc: dict[str, Any]
    llm: tuple[LoadedLLM, ...]
    tool_headers: dict[str, dict[str, Secret]]


class Unavailable(Exception):
    """A write cannot be done now (503); nothing was stored."""


class Api:
    def __init__(self, settings: Settings, store: Store) -> None:
        self.settings = settings
        self.store = store
        self.redis: Redis | None = connect_redis(settings.redis_url) if settings.redis_url else None
        self.limiter: RateLimiter = (
            RedisRateLimiter(self.redis, settings.redis_prefix) if self.redis is not None
            else MemoryRateLimiter()
        )  # fmt: skip
        self.runner: SessionRunner | None = None
        self.box = SecretBox(settings.ring, key_file=settings.key_file)
        self.tokens = Tokens(
            self.box, store,
            RedisTokenUses(self.redis, settings.redis_prefix) if self.redis is not None else None,
        )  # fmt: skip
        self._api_keys = tuple(k.encode("utf-8") for k in settings.api_keys)

    # -- plumbing ---------------------------------------------------------------

    def authorized(self, request: Request) -> JSONResponse | None:
        raw = request.headers.get("authorization")
        if not raw:
            return _error(401, "Missing authorization header", code="missing_authorization")
        # Header values are bytes (decoded as latin-1 by Starlette); compare bytes, so a
        # non-ASCII value is simply a wrong key.
        key = raw[7:].strip() if raw.lower().startswith("bearer ") else raw.strip()
        given = key.encode("latin-1", "replace")
        if not any(hmac.compare_digest(given, k) for k in self._api_keys):
            return _error(401, "Unauthorized", code="unauthorized")
        return None

    async def body(self, request: Request, *, empty: Any = ...) -> Any:
        """The request body as checked JSON (``empty``, when given, for an empty body).

        Raises:
            FieldError: too large, too slow (more than ``BODY_TIMEOUT_S``), or not acceptable JSON.
        """
        length = request.headers.get("content-length")
        if length is not None and (not _ASCII_INT.fullmatch(length) or int(length) > MAX_BODY):
            raise BodyRefused("body", f"is larger than {MAX_BODY} bytes")
        data = bytearray()
        try:
            async with asyncio.timeout(BODY_TIMEOUT_S):
                async for chunk in request.stream():
                    data += chunk
                    if len(data) > MAX_BODY:
                        raise BodyRefused("body", f"is larger than {MAX_BODY} bytes")
        except TimeoutError:
            raise BodyRefused("body", f"was not received within {BODY_TIMEOUT_S:.0f} s") from None
        if not data and empty is not ...:
            return empty
        return parse_json(bytes(data))

    def public(self, row: AgentRow) -> dict[str, Any]:
        config = dict(row.config)
        tools = []
        for tool in config.get("tools", []):
            tool = {"id": tool_id(row.id, tool["name"]), **tool}
            if "http" in tool:
                stored = row.tool_secrets.get(tool["name"], {})
                http = dict(tool["http"])
                http["headers"] = [
                    {"name": name, "last_set_at": meta["last_set_at"]}
                    for name, meta in stored.items()
                ]
                tool["http"] = http
            tools.append(tool)
        return {
            "id": row.id,
            "name": row.name,
            "system_prompt": config.get("system_prompt", ""),
            "voice": config.get("voice"),
            "greeting": config.get("greeting"),
            "input": config.get("input", {}),
            "output": config.get("output", {}),
            "tools": tools,
            "llm": [
                {"base_url": e["base_url"], "model": e["model"]}
                | {k: e[k] for k in ENTRY_SETTINGS if e.get(k) is not None}
                for e in row.llm
            ],
            "created_at": _iso(row.created_at),
            "updated_at": _iso(row.updated_at),
            "warnings": self.warnings(config),
        }

    def _seal_kid(self, tx: WriteTx, agent: AgentInput) -> str:
        """The key id to seal this write's secrets with (the database's primary key id).

        Raises:
            Unavailable: the write carries a secret and this server lacks that key.
        """
        kid = tx.primary_kid or self.box.ring.primary
        carries_secret = bool(agent.llm) or any(
            h.value is not None for t in agent.tools or [] for h in t.headers
        )
        if not carries_secret:
            return kid
        if not self.box.has_key(kid):
            raise Unavailable(
                f"stored secrets are now sealed under key {kid!r}, which this server does not "
                "have; restart it with the rotated VOXLOOP_SECRET_KEY"
            )
        return kid

    def voice_map(self) -> VoiceMap:
        from runtime.speech.engines.registry import known_voices

        if self.settings.voice_map is None:
            engine = self.settings.tts_engine
            self.settings.voice_map = VoiceMap(
                engine, [v for v in known_voices() if v.engine == engine]
            )
        return self.settings.voice_map

    def warnings(self, config: dict[str, Any]) -> list[dict[str, str]]:
        """What a stored agent asks for that this installation does differently (empty: nothing).

        A voice name of the hosted catalogue (``voice_alias``), a voice not installed
        (``voice_not_installed``), and each field accepted without effect (``ignored_field``).
        """
        out: list[dict[str, str]] = []
        voice = config.get("voice") or {}
        voice_id = voice.get("voice_id") if isinstance(voice, dict) else None
        if voice_id is not None:
            resolved = self.voice_map().resolve(voice_id)
            target = resolved.voice_id if resolved is not None else voice_id
            if resolved is not None and (alias := resolved.warning("voice")) is not None:
                out.append(alias)
            installed = self.settings.installed_voices
            if installed is not None and target not in installed:
                out.append({
                    "param": "voice", "code": "voice_not_installed",
                    "message": (
                        f"voice {voice_id!r} is not installed on this server"
                        if target == voice_id
                        else f"voice {voice_id!r} speaks with {target!r}, which is not "
                        "installed on this server"
                    )
                    + ", so the agent cannot speak yet: install the speech engines "
                    "(pip install 'voxloop[embedded]')",
                })  # fmt: skip
        inp = config.get("input") or {}
        fields = [(f"input.{k}", IGNORED_INPUT[k]) for k in IGNORED_INPUT if k in inp]
        td = inp.get("turn_detection") or {}
        fields += [
            (f"input.turn_detection.{k}", IGNORED_TURN_DETECTION[k])
            for k in IGNORED_TURN_DETECTION
            if k in td
        ]
        for i, tool in enumerate(config.get("tools", [])):
            fields += [(f"tools[{i}].{k}", IGNORED_TOOL[k]) for k in IGNORED_TOOL if k in tool]
        out += [ignored_warning(param, why) for param, why in fields]
        return out

    def _apply(
        self, row_id: str, agent: AgentInput, old: AgentRow | None, kid: str
    ) -> tuple[dict[str, Any], list[dict[str, Any]], dict[str, Any]]:
        config = (
            dict(old.config) if old else {"greeting": None, "input": {}, "output": {}, "tools": []}
        )
        config.update({k: v for k, v in agent.fields.items() if k != "name"})
        llm = list(old.llm) if old else []
        if agent.llm is not None:
            llm = [
                {
                    "base_url": e.base_url,
                    "model": e.model,
                    "api_key": self.box.seal(e.api_key, context=f"{row_id}:llm.api_key", kid=kid),
                    **({"max_tokens": e.max_tokens} if e.max_tokens is not None else {}),
                    **(
                        {"first_token_timeout_ms": e.first_token_timeout_ms}
                        if e.first_token_timeout_ms is not None
                        else {}
                    ),
                }
                for e in agent.llm
            ]
        secrets = dict(old.tool_secrets) if old else {}
        if agent.tools is not None:
            stamp = _iso(now())
            new_secrets: dict[str, dict[str, dict[str, str]]] = {}
            for i, tool in enumerate(agent.tools):
                name = tool.doc["name"]
                kept = secrets.get(name, {})
                headers: dict[str, dict[str, str]] = {}
                for j, h in enumerate(tool.headers):
                    if h.remove:
                        continue
                    if h.value is not None:
                        sealed = self.box.seal(
                            h.value, context=f"{row_id}:tool:{name}:{h.name}", kid=kid
                        )
                        headers[h.name] = {"sealed": sealed, "last_set_at": stamp}
                    elif h.name in kept:
                        headers[h.name] = kept[h.name]
                    else:
                        raise FieldError(
                            f"tools[{i}].http.headers[{j}].value",
                            f"header {shorten(h.name, 60)!r} has no stored value; give its value",
                        )
                if headers:
                    new_secrets[name] = headers
            secrets = new_secrets
            config["tools"] = [t.doc for t in agent.tools]
        return config, llm, secrets

    # -- routes -------------------------------------------------------------------

    async def create_agent(self, request: Request) -> Response:
        if (denied := self.authorized(request)) is not None:
            return denied
        try:
            agent = validate_agent(
                await self.body(request), partial=False, voices=self.settings.voices
            )
            check_llm_count(agent, single_entry=self.settings.limits.single_llm_entry)
            await check_urls(agent, self.settings.policy, self.settings.resolver)
            row_id = Store.new_agent_id()
            async with self.store.writing() as tx:
                config, llm, secrets = self._apply(row_id, agent, None, self._seal_kid(tx, agent))
                stamp = now()
                row = AgentRow(
                    row_id, str(agent.fields["name"]), stamp, stamp, config, llm, secrets
                )
                await tx.insert(row)
        except FieldError as exc:
            return _field_error(422, exc, "validation_error")
        except (Unavailable, KeyUnavailable) as exc:
            return _error(503, str(exc), code="key_unavailable")
        log.info("agent created", extra={"agent_id": row_id})
        return JSONResponse(self.public(row), status_code=201)

    async def list_agents(self, request: Request) -> Response:
        if (denied := self.authorized(request)) is not None:
            return denied
        params = request.query_params
        paged = "limit" in params or "cursor" in params
        envelope = self.settings.agents_list == "envelope" or (
            self.settings.agents_list == "auto"
            and (paged or request.headers.get("user-agent", "").startswith(SDK_USER_AGENT))
        )
        try:
            limit = (_int_param(request, "limit", 1, PAGE_MAX) or 50) if envelope else None
            after = None
            if params.get("cursor"):
                try:
                    after = decode_cursor(params["cursor"])
                except ValueError as exc:
                    raise FieldError("cursor", str(exc)) from None
        except FieldError as exc:
            return _field_error(400, exc, "invalid_request")
        rows, next_cursor = await self.store.list_agents(limit, after)
        items = [
            {
                "id": r.id,
                "name": r.name,
                "created_at": _iso(r.created_at),
                "updated_at": _iso(r.updated_at),
                "deleted_at": None,
            }
            for r in rows
        ]
        if not envelope:
            return JSONResponse(items)
        return JSONResponse(
            {
                "agents": items,
                "has_more": bool(next_cursor),
                "response_metadata": {"next_cursor": next_cursor},
            }
        )

    async def get_agent(self, request: Request) -> Response:
        if (denied := self.authorized(request)) is not None:
            return denied
        row = await self.store.get_agent(request.path_params["agent_id"])
        if row is None:
            return _error(404, "agent not found", code="agent_not_found")
        return JSONResponse(self.public(row))

    async def update_agent(self, request: Request) -> Response:
        if (denied := self.authorized(request)) is not None:
            return denied
        agent_id = request.path_params["agent_id"]
        try:
            if await self.store.get_agent(agent_id) is None:
                return _error(404, "agent not found", code="agent_not_found")
            agent = validate_agent(
                await self.body(request), partial=True, voices=self.settings.voices
            )
            check_llm_count(agent, single_entry=self.settings.limits.single_llm_entry)
            await check_urls(agent, self.settings.policy, self.settings.resolver)
            # Read, merge and write in one transaction with the row locked: concurrent
            # PUTs of different fields both survive.
            async with self.store.writing(agent_id) as tx:
                old = tx.row
                if old is None:
                    return _error(404, "agent not found", code="agent_not_found")
                config, llm, secrets = self._apply(old.id, agent, old, self._seal_kid(tx, agent))
                name = str(agent.fields.get("name", old.name))
                row = AgentRow(old.id, name, old.created_at, now(), config, llm, secrets)
                await tx.replace(row)
        except FieldError as exc:
            return _field_error(422, exc, "validation_error")
        except (Unavailable, KeyUnavailable) as exc:
            return _error(503, str(exc), code="key_unavailable")
        log.info("agent updated", extra={"agent_id": agent_id})
        return JSONResponse(self.public(row))

    async def delete_agent(self, request: Request) -> Response:
        if (denied := self.authorized(request)) is not None:
            return denied
        if not await self.store.delete_agent(request.path_params["agent_id"]):
            return _error(404, "agent not found", code="agent_not_found")
        return Response(status_code=204)

    def _mint(self, request: Request, ttl: int, session: int | None) -> tuple[str, int]:
        """A token for the calling key's account, and its expiry (Unix seconds)."""
        key = _presented_key(request)
        exp = int(time.time()) + ttl
        claims = {
            "jti": os.urandom(16).hex(),
            "exp": exp,
            "msd": session or SESSION_MAX,
            # The minting key's account: its sessions may be resumed by that account.
            "own": key_owner(key),
        }
        return self.tokens.mint(claims), exp

    async def token(self, request: Request) -> Response:
        """``GET /v1/token?expires_in_seconds=…`` → ``{token, expires_in_seconds}``."""
        if (denied := self.authorized(request)) is not None:
            return denied
        owner = key_owner(_presented_key(request))
        if not await self.limiter.allow("tokens", owner, self.settings.tokens_per_minute):
            return _error(429, "too many tokens minted with this key; wait a minute",
                          code="rate_limited", headers={"Retry-After": "60"})  # fmt: skip
        try:
            ttl = _int_param(request, "expires_in_seconds", 1, TOKEN_TTL_MAX, required=True)
            session = _int_param(request, "max_session_duration_seconds", 60, SESSION_MAX)
        except FieldError as exc:
            return _field_error(400, exc, "invalid_request")
        token, _ = self._mint(request, ttl or 0, session)
        return JSONResponse({"token": token, "expires_in_seconds": ttl})

    async def create_token(self, request: Request) -> Response:
        """``POST /v1/tokens`` with JSON ``{expires_in_seconds?: 1..600 (60),
        max_session_duration_seconds?: 60..10800}`` → ``{token, expires_at}`` (ISO 8601, UTC)."""
        if (denied := self.authorized(request)) is not None:
            return denied
        owner = key_owner(_presented_key(request))
        if not await self.limiter.allow("tokens", owner, self.settings.tokens_per_minute):
            return _error(429, "too many tokens minted with this key; wait a minute",
                          code="rate_limited", headers={"Retry-After": "60"})  # fmt: skip
        try:
            body = await self.body(request, empty={})
            if not isinstance(body, dict):
                raise FieldError("body", "must be a JSON object")
            unknown = sorted(set(body) - {"expires_in_seconds", "max_session_duration_seconds"})
            if unknown:
                raise FieldError(unknown[0], "is not a known field")
            ttl = _int_field(body, "expires_in_seconds", 1, TOKEN_TTL_MAX)
            session = _int_field(body, "max_session_duration_seconds", 60, SESSION_MAX)
        except FieldError as exc:
            return _field_error(422, exc, "validation_error")
        token, exp = self._mint(request, 60 if ttl is None else ttl, session)
        expires_at = datetime.datetime.fromtimestamp(exp, datetime.UTC).isoformat()
        return JSONResponse({"token": token, "expires_at": expires_at})

    async def voices(self, request: Request) -> Response:
        if (denied := self.authorized(request)) is not None:
            return denied
        from runtime.speech.engines.registry import known_voices

        installed = self.settings.installed_voices
        engine = self.settings.tts_engine
        listed = self.voice_map().listing(installed)
        others = [
            {"voice_id": v.id, "name": v.name, "language": v.language, "engine": v.engine,
             "gender": v.gender, "aliases": list(v.aliases), "installed": v.id in installed,
             "speaks_with": v.id}
            for v in known_voices() if v.engine != engine
        ]  # fmt: skip
        return JSONResponse(listed + others)

    async def openapi(self, request: Request) -> Response:
        return JSONResponse(OPENAPI)

    # -- for the realtime server --------------------------------------------------

    async def load_agent(self, agent_id: str) -> LoadedAgent | None:
        """The stored agent ``agent_id`` with its secrets opened in memory (``None``: absent).

        Raises:
            SecretError: a stored secret does not open (wrong or missing key); the
                message names the field, never the value.
        """
        row = await self.store.get_agent(agent_id)
        if row is None:
            return None
        llm = []
        for i, entry in enumerate(row.llm):
            try:
                key = self.box.open(entry["api_key"], context=f"{row.id}:llm.api_key")
            except SecretError as exc:
                raise SecretError(f"agent {row.id} llm[{i}].api_key: {exc}") from None
            llm.append(
                LoadedLLM(
                    entry["base_url"], entry["model"], key, entry.get("max_tokens"),
                    entry.get("first_token_timeout_ms"),
                )
            )  # fmt: skip
        headers: dict[str, dict[str, Secret]] = {}
        for tool, stored in row.tool_secrets.items():
            headers[tool] = {}
            for name, meta in stored.items():
                try:
                    headers[tool][name] = self.box.open(
                        meta["sealed"], context=f"{row.id}:tool:{tool}:{name}"
                    )
                except SecretError as exc:
                    raise SecretError(f"agent {row.id} tool {tool} header {name}: {exc}") from None
        return LoadedAgent(self.public(row), tuple(llm), headers)

    # -- public pages (no API key): what this is, whether it is up, its API ---------

    async def index(self, request: Request) -> Response:
        if wants_page(request):
            return page_response()
        return JSONResponse({
            "service": "voxloop agent service", "version": __version__,
            "health": "/health", "healthz": "/healthz", "readyz": "/readyz",
            "realtime": "/v1/ws", "docs": "/docs", "openapi": "/openapi.json",
            "page": "/ (in a browser)",
        })  # fmt: skip

    async def healthz(self, request: Request) -> Response:
        """Liveness: the process answers (no dependency is checked)."""
        return JSONResponse({"status": "ok"})

    async def readyz(self, request: Request) -> Response:
        """Readiness: the database (and Redis) answer, the speech engines are loaded and the
        worker is not draining."""
        checks: dict[str, str] = {}
        try:
            await self.store.ping()
            checks["database"] = "ok"
        except Exception:
            checks["database"] = "unreachable"
        if self.redis is not None:
            try:
                await self.redis.ping()
                checks["redis"] = "ok"
            except Exception:
                checks["redis"] = "unreachable"
        checks["sessions"] = (
            "draining" if self.runner is not None and self.runner.draining else "ok"
        )
        if self.runner is not None:
            # Loaded at start-up; until then a session would wait for them.
            engines = self.runner.engines
            checks["speech_engines"] = "ok" if engines.ready else (engines.problem or "loading")
        ready = all(v == "ok" for v in checks.values())
        return JSONResponse(
            {"status": "ready" if ready else "unavailable", **checks, "worker": os.getpid()},
            200 if ready else 503,
        )

    async def metrics(self, request: Request) -> Response:
        """Prometheus text exposition of this worker's metrics."""
        if not self.settings.metrics_public and (denied := self.authorized(request)) is not None:
            return denied
        assert self.runner is not None
        return Response(self.runner.metrics.exposition(), media_type=METRICS_CONTENT_TYPE)

    async def health(self, request: Request) -> Response:
        try:
            await self.store.ping()
        except Exception:
            log.error("health check failed", exc_info=True)
            return JSONResponse({"status": "unavailable", "database": "unreachable"}, 503)
        return JSONResponse({"status": "ok", "version": __version__})

    async def docs(self, request: Request) -> Response:
        return HTMLResponse(DOCS_HTML)


def _presented_key(request: Request) -> str:
    """The API key of an authorized request (``Authorization: <key>`` or ``Bearer <key>``)."""
    raw = request.headers.get("authorization", "")
    return (raw[7:] if raw.lower().startswith("bearer ") else raw).strip()


SDK_USER_AGENT: Final = "assemblyai-agents-python/"
"""The agents SDK's User-Agent prefix: its clients read the paged agents envelope."""


def tool_id(agent_id: str, name: str) -> str:
    """A stored tool's server-assigned id: stable while the agent and the tool's name are."""
    digest = hashlib.sha256(f"{agent_id}\0{name}".encode()).hexdigest()
    return "tool_" + digest[:24]


def ignored_warning(param: str, why: str) -> dict[str, str]:
    """The ``warnings`` entry for a field accepted without effect."""
    return {
        "param": param,
        "code": "ignored_field",
        "message": f"{param} is accepted but has no effect on this server: {why}",
    }


def _int_field(body: Mapping[str, Any], name: str, low: int, high: int) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise FieldError(name, f"must be an integer from {low} to {high}")
    return value


def _int_param(
    request: Request, name: str, low: int, high: int, *, required: bool = False
) -> int | None:
    raw = request.query_params.get(name)
    if raw is None:
        if required:
            raise FieldError(name, "is required")
        return None
    # ASCII digits only: str.isdigit() also accepts "²" and "١٢٣".
    if not _ASCII_INT.fullmatch(raw) or not low <= int(raw) <= high:
        raise FieldError(name, f"must be an integer from {low} to {high}")
    return int(raw)


class CloseAfterError:
    """ASGI middleware: an unhandled exception becomes a JSON 500 with ``Connection: close``.

    Only the exception's type is logged (messages could hold request data).
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as exc:
            log.error("internal error", extra={"error": type(exc).__name__})
            if started:
                raise
            response = _error(
                500, "internal error", code="internal_error", headers={"Connection": "close"}
            )
            await response(scope, receive, send)


def create_app(settings: Settings) -> Starlette:
    store = Store(settings.database_url)
    api = Api(settings, store)
    engines = Engines(
        settings.stt_engine, settings.tts_engine, stt_remote=settings.stt_remote,
        tts_remote=settings.tts_remote,
    )  # fmt: skip
    states = RedisSessionStore(api.redis, settings.redis_prefix) if api.redis is not None else None
    runner = SessionRunner(
        load_agent=api.load_agent, box=api.box, policy=settings.policy, resolver=settings.resolver,
        default_llm=settings.default_llm, voices=settings.installed_voices, engines=engines,
        limits=settings.limits, states=states, limiter=api.limiter,
        sessions_per_minute=settings.sessions_per_minute, checkpoints=api.redis is not None,
        voice_map=api.voice_map(), max_tokens=settings.max_tokens,
        tracer=settings.traces,
    )  # fmt: skip
    api.runner = runner

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        await store.start()
        await store.init_primary(settings.ring.primary)
        if api.redis is not None:
            # `serve` checked Redis before starting; a worker started later (a replacement
            # for one that died) while Redis is away starts anyway, as the running ones go
            # on: its shared state waits for Redis, and /readyz says it is unreachable.
            try:
                await api.redis.ping()
            except Exception as exc:
                log.warning("redis unavailable at start", extra={"error": type(exc).__name__})
        # The first session must not wait for the speech engines: load them now.
        engines.start()
        try:
            async with asyncio.TaskGroup() as tg:
                lag = tg.create_task(runner.metrics.watch_loop_lag())
                try:
                    with drain_on_signals(runner, settings.drain_timeout_s):
                        yield
                finally:
                    lag.cancel()
        finally:
            await engines.aclose()
            await store.aclose()
            if api.redis is not None:
                await api.redis.aclose()

    socket = realtime_endpoint(settings.api_keys, api.tokens, runner)

    async def agent_exists(agent_id: str) -> bool:
        try:
            return await api.load_agent(agent_id) is not None
        except Exception:  # a sealed secret that does not open: the call is refused later
            return True

    phone = Telephony(runner, settings.twilio, agent_exists)

    app = Starlette(
        routes=[
            Route("/v1/agents", api.create_agent, methods=["POST"]),
            Route("/v1/agents", api.list_agents, methods=["GET"]),
            Route("/v1/agents/{agent_id}", api.get_agent, methods=["GET"]),
            Route("/v1/agents/{agent_id}", api.update_agent, methods=["PUT"]),
            Route("/v1/agents/{agent_id}", api.delete_agent, methods=["DELETE"]),
            Route("/v1/token", api.token, methods=["GET"]),
            Route("/v1/tokens", api.create_token, methods=["POST"]),
            Route("/v1/voices", api.voices, methods=["GET"]),
            Route("/openapi.json", api.openapi, methods=["GET"]),
            Route("/", api.index, methods=["GET"]),
            Route("/health", api.health, methods=["GET"]),
            Route("/healthz", api.healthz, methods=["GET"]),
            Route("/readyz", api.readyz, methods=["GET"]),
            Route("/metrics", api.metrics, methods=["GET"]),
            Route("/docs", api.docs, methods=["GET"]),
            *page_routes(settings.page, api.tokens, api.limiter),
            WebSocketRoute("/v1/ws", socket),
            WebSocketRoute("/v1/realtime", socket),
            Route(VOICE_PATH, phone.voice, methods=["POST"]),
            WebSocketRoute(MEDIA_PATH, phone.media),
            WebSocketRoute("/v1/voice", socket),
            WebSocketRoute("/{path:path}", unknown_socket),
        ],
        # CloseAfterError inside AccessLog: a 500 carries the request id like every error.
        middleware=[Middleware(AccessLog), Middleware(CloseAfterError)],
        exception_handlers={HTTPException: _http_exception},
        lifespan=lifespan,
    )
    app.state.api = api
    app.state.runner = runner
    return app


OPENAPI: Final = openapi_document(__version__)


def _docs_html(spec: dict[str, Any]) -> str:
    """A self-contained page listing the API's operations (no scripts, nothing fetched)."""
    rows = []
    for path, operations in spec.get("paths", {}).items():
        for method, op in operations.items():
            if isinstance(op, dict) and "summary" in op:
                rows.append(
                    f"<tr><td><code>{html.escape(method.upper())}</code></td>"
                    f"<td><code>{html.escape(path)}</code></td>"
                    f"<td>{html.escape(str(op['summary']))}</td></tr>"
                )
    info = spec.get("info", {})
    title = html.escape(f"{info.get('title', 'voxloop')} {info.get('version', '')}".strip())
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{title}</title></head>"
        f"<body><h1>{title}</h1><p>Every <code>/v1</code> route needs "
        "<code>Authorization: Bearer &lt;key&gt;</code> (a key from VOXLOOP_API_KEYS). "
        "The full description is <a href='/openapi.json'>/openapi.json</a> (OpenAPI 3).</p>"
        f"<table><tr><th>method</th><th>path</th><th>what</th></tr>{''.join(rows)}</table>"
        "</body></html>"
    )


DOCS_HTML: Final = _docs_html(OPENAPI)
