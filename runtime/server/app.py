"""The agent service's HTTP API (Starlette): agents, temporary tokens, voices.

Every route but ``/openapi.json`` needs an API key (``Authorization: <key>`` or
``Bearer <key>``). Bodies are limited in size and validated field by field;
secrets (endpoint ``api_key`` s, HTTP-tool header values) are sealed before
they are stored and never appear in a response, a log line or an error.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from runtime.endpoints import Resolver, StaticResolver, SystemResolver, URLPolicy
from runtime.server.agents import AgentInput, FieldError, check_urls, validate_agent
from runtime.server.secrets import KeyRing, SecretBox, b64url_decode, b64url_encode
from runtime.server.store import AgentRow, Store, now, sqlite_url

log = logging.getLogger("voxloop.server")

MAX_BODY: Final = 1 << 20
TOKEN_TTL_MAX: Final = 600
SESSION_MAX: Final = 10_800


@dataclass
class Settings:
    """Server configuration (see :func:`settings_from_env`)."""

    api_keys: frozenset[str]
    data_dir: Path
    database_url: str
    ring: KeyRing
    policy: URLPolicy = field(default_factory=URLPolicy)
    resolver: Resolver = field(default_factory=SystemResolver)
    voices: frozenset[str] = frozenset()


def settings_from_env(
    env: Mapping[str, str], *, data_dir: Path | None = None, database_url: str | None = None
) -> Settings:
    """Build settings from ``VOXLOOP_*`` environment variables (and flags that override them).

    Raises:
        ValueError: a variable is malformed or no API key is configured.
    """
    from runtime.speech.engines.registry import installed_voice_ids

    keys = frozenset(k.strip() for k in env.get("VOXLOOP_API_KEYS", "").split(",") if k.strip())
    if not keys:
        raise ValueError("set VOXLOOP_API_KEYS to the comma-separated keys that may call the API")
    directory = data_dir or Path(env.get("VOXLOOP_DATA_DIR", "voxloop-data"))
    url = database_url or env.get("VOXLOOP_DATABASE_URL") or sqlite_url(directory)
    if env.get("VOXLOOP_SECRET_KEY"):
        ring = KeyRing.from_env(env["VOXLOOP_SECRET_KEY"])
    else:
        ring = KeyRing.load_or_create(directory / "secret.key")
    policy = URLPolicy()
    allow = env.get("VOXLOOP_ALLOW_PRIVATE_ENDPOINTS", "").strip()
    if allow.lower() in ("1", "true", "yes", "all"):
        policy = URLPolicy(allow_private=True)
    elif allow:
        policy = policy.with_allowlist(allow.split(","))
    resolver: Resolver = SystemResolver()
    if env.get("VOXLOOP_STATIC_HOSTS"):
        table = json.loads(env["VOXLOOP_STATIC_HOSTS"])
        if not isinstance(table, dict):
            raise ValueError("VOXLOOP_STATIC_HOSTS must be a JSON object of host -> [addresses]")
        resolver = StaticResolver({str(k): [str(a) for a in v] for k, v in table.items()})
    return Settings(keys, directory, url, ring, policy, resolver, installed_voice_ids())


def _error(
    status: int, message: str, *, param: str | None = None, code: str | None = None
) -> JSONResponse:
    body: dict[str, Any] = {"detail": message}
    if code:
        body["code"] = code
    if param:
        body["param"] = param
        body["errors"] = [{"param": param, "message": message}]
    return JSONResponse(body, status_code=status)


def _iso(value: Any) -> str:
    text = str(value.isoformat())
    return text if value.tzinfo else text + "+00:00"


class Api:
    def __init__(self, settings: Settings, store: Store) -> None:
        self.settings = settings
        self.store = store
        self.box = SecretBox(settings.ring)
        self._token_key = hashlib.sha256(
            b"voxloop-token-v1" + settings.ring.keys[settings.ring.primary]
        ).digest()

    # -- plumbing ---------------------------------------------------------------

    def authorized(self, request: Request) -> JSONResponse | None:
        header = request.headers.get("authorization")
        if not header:
            return _error(401, "Missing authorization header")
        key = header[7:].strip() if header.lower().startswith("bearer ") else header.strip()
        if not any(hmac.compare_digest(key, k) for k in self.settings.api_keys):
            return _error(401, "Unauthorized")
        return None

    async def body(self, request: Request) -> Any:
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > MAX_BODY):
            raise FieldError("body", f"is larger than {MAX_BODY} bytes")
        data = bytearray()
        async for chunk in request.stream():
            data += chunk
            if len(data) > MAX_BODY:
                raise FieldError("body", f"is larger than {MAX_BODY} bytes")
        try:
            return json.loads(data)
        except ValueError:
            raise FieldError("body", "is not valid JSON") from None

    def public(self, row: AgentRow) -> dict[str, Any]:
        config = dict(row.config)
        tools = []
        for tool in config.get("tools", []):
            tool = dict(tool)
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
            "llm": [{"base_url": e["base_url"], "model": e["model"]} for e in row.llm],
            "created_at": _iso(row.created_at),
            "updated_at": _iso(row.updated_at),
        }

    def _apply(
        self, row_id: str, agent: AgentInput, old: AgentRow | None
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
                    "api_key": self.box.seal(e.api_key, context=f"{row_id}:llm.api_key"),
                }
                for e in agent.llm
            ]
        secrets = dict(old.tool_secrets) if old else {}
        if agent.tools is not None:
            stamp = _iso(now())
            new_secrets: dict[str, dict[str, dict[str, str]]] = {}
            for tool in agent.tools:
                name = tool.doc["name"]
                kept = secrets.get(name, {})
                headers: dict[str, dict[str, str]] = {}
                for h in tool.headers:
                    if h.remove:
                        continue
                    if h.value is not None:
                        sealed = self.box.seal(h.value, context=f"{row_id}:tool:{name}:{h.name}")
                        headers[h.name] = {"sealed": sealed, "last_set_at": stamp}
                    elif h.name in kept:
                        headers[h.name] = kept[h.name]
                    else:
                        raise FieldError(
                            f"tools.{name}.http.headers", f"header {h.name!r} has no stored value"
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
            await check_urls(agent, self.settings.policy, self.settings.resolver)
            row_id = Store.new_agent_id()
            config, llm, secrets = self._apply(row_id, agent, None)
        except FieldError as exc:
            return _error(422, exc.message, param=exc.param, code="validation_error")
        stamp = now()
        row = AgentRow(row_id, str(agent.fields["name"]), stamp, stamp, config, llm, secrets)
        await self.store.insert_agent(row)
        log.info("agent created", extra={"agent_id": row_id})
        return JSONResponse(self.public(row), status_code=201)

    async def list_agents(self, request: Request) -> Response:
        if (denied := self.authorized(request)) is not None:
            return denied
        rows = await self.store.list_agents()
        return JSONResponse(
            [
                {
                    "id": r.id,
                    "name": r.name,
                    "created_at": _iso(r.created_at),
                    "updated_at": _iso(r.updated_at),
                    "deleted_at": None,
                }
                for r in rows
            ]
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
        old = await self.store.get_agent(request.path_params["agent_id"])
        if old is None:
            return _error(404, "agent not found", code="agent_not_found")
        try:
            agent = validate_agent(
                await self.body(request), partial=True, voices=self.settings.voices
            )
            await check_urls(agent, self.settings.policy, self.settings.resolver)
            config, llm, secrets = self._apply(old.id, agent, old)
        except FieldError as exc:
            return _error(422, exc.message, param=exc.param, code="validation_error")
        name = str(agent.fields.get("name", old.name))
        row = AgentRow(old.id, name, old.created_at, now(), config, llm, secrets)
        await self.store.replace_agent(row)
        log.info("agent updated", extra={"agent_id": old.id})
        return JSONResponse(self.public(row))

    async def delete_agent(self, request: Request) -> Response:
        if (denied := self.authorized(request)) is not None:
            return denied
        if not await self.store.delete_agent(request.path_params["agent_id"]):
            return _error(404, "agent not found", code="agent_not_found")
        return Response(status_code=204)

    async def token(self, request: Request) -> Response:
        if (denied := self.authorized(request)) is not None:
            return denied
        try:
            ttl = _int_param(request, "expires_in_seconds", 1, TOKEN_TTL_MAX, required=True)
            session = _int_param(request, "max_session_duration_seconds", 60, SESSION_MAX)
        except FieldError as exc:
            return _error(400, exc.message, param=exc.param, code="invalid_request")
        claims = {
            "jti": os.urandom(16).hex(),
            "exp": int(time.time()) + (ttl or 0),
            "msd": session or SESSION_MAX,
        }
        return JSONResponse({"token": self.mint(claims), "expires_in_seconds": ttl})

    async def voices(self, request: Request) -> Response:
        if (denied := self.authorized(request)) is not None:
            return denied
        from runtime.speech.engines.registry import installed_voices

        return JSONResponse([
            {"voice_id": v.id, "name": v.name, "language": v.language, "engine": v.engine,
             "aliases": list(v.aliases)}
            for v in installed_voices()
        ])  # fmt: skip

    async def openapi(self, request: Request) -> Response:
        return JSONResponse(OPENAPI)

    # -- tokens -------------------------------------------------------------------

    def mint(self, claims: dict[str, Any]) -> str:
        body = b64url_encode(json.dumps(claims, separators=(",", ":")).encode())
        mac = hmac.new(self._token_key, body.encode(), hashlib.sha256).digest()
        return f"{body}.{b64url_encode(mac)}"

    async def redeem(self, token: str) -> dict[str, Any] | None:
        """The token's claims if it is genuine, unexpired and not used before; marks it used."""
        body, _, mac = token.partition(".")
        expected = hmac.new(self._token_key, body.encode(), hashlib.sha256).digest()
        try:
            given = b64url_decode(mac)
            claims = json.loads(b64url_decode(body))
        except ValueError:
            return None
        if not hmac.compare_digest(given, expected) or not isinstance(claims, dict):
            return None
        if int(claims.get("exp", 0)) < time.time():
            return None
        if not await self.store.use_token(str(claims.get("jti"))):
            return None
        return claims


def _int_param(
    request: Request, name: str, low: int, high: int, *, required: bool = False
) -> int | None:
    raw = request.query_params.get(name)
    if raw is None:
        if required:
            raise FieldError(name, "is required")
        return None
    if not raw.isdigit() or not low <= int(raw) <= high:
        raise FieldError(name, f"must be an integer from {low} to {high}")
    return int(raw)


def create_app(settings: Settings) -> Starlette:
    store = Store(settings.database_url)
    api = Api(settings, store)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        await store.start()
        try:
            yield
        finally:
            await store.aclose()

    app = Starlette(
        routes=[
            Route("/v1/agents", api.create_agent, methods=["POST"]),
            Route("/v1/agents", api.list_agents, methods=["GET"]),
            Route("/v1/agents/{agent_id}", api.get_agent, methods=["GET"]),
            Route("/v1/agents/{agent_id}", api.update_agent, methods=["PUT"]),
            Route("/v1/agents/{agent_id}", api.delete_agent, methods=["DELETE"]),
            Route("/v1/token", api.token, methods=["GET"]),
            Route("/v1/voices", api.voices, methods=["GET"]),
            Route("/openapi.json", api.openapi, methods=["GET"]),
        ],
        lifespan=lifespan,
    )
    app.state.api = api
    return app


OPENAPI: Final = json.loads((Path(__file__).parent / "openapi.json").read_text(encoding="utf-8"))
