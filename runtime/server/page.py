"""The browser page: ``GET /`` for browsers, its static files under ``/page/``, and,
when an operator publishes a page for one agent, per-visitor tokens at ``POST /page/token``.

The page (``runtime/server/page/``: plain HTML, CSS and ES modules, no build step and
no CDN) talks to a stored agent over the realtime WebSocket with a single-use token;
it never holds an API key. Links carry the token in the fragment
(``/#agent=ID&token=…``), which browsers do not send to the server, so it never
reaches an access log.

Page-only mode (``VOXLOOP_PAGE_AGENT``, off by default): anyone who can open the
page may talk to that one agent. Each visitor gets a token that expires in
``VOXLOOP_PAGE_TOKEN_SECONDS`` (default 60) for a session of at most
``VOXLOOP_PAGE_SESSION_SECONDS`` (default 600), and a client address may mint at
most ``VOXLOOP_PAGE_TOKENS_PER_MINUTE`` (default 6) tokens a minute (429 beyond; counted
across workers with Redis).
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import BaseRoute, Route

from runtime.agents.tokens import Tokens
from runtime.sessions.limits import positive_setting as _positive
from runtime.sessions.shared_state import RateLimiter

STATIC: Final = Path(__file__).parent / "page"
# The page's files and their media types (nothing else under /page/ is served).
FILES: Final = {
    "index.html": "text/html; charset=utf-8",
    "page.css": "text/css; charset=utf-8",
    "page.js": "text/javascript; charset=utf-8",
    "capture.js": "text/javascript; charset=utf-8",
    "playback.js": "text/javascript; charset=utf-8",
    "resampler.js": "text/javascript; charset=utf-8",
}
# The page needs the microphone and nothing from elsewhere.
HEADERS: Final = {
    "Content-Security-Policy": (
        "default-src 'self'; connect-src 'self' ws: wss:; img-src 'self' data:; "
        "style-src 'self'; script-src 'self'; object-src 'none'; base-uri 'none'; "
        "frame-ancestors 'none'"
    ),
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}


@dataclass(frozen=True, slots=True)
class PageSettings:
    """Page-only mode (``agent_id`` set) and its token limits.

    Attributes:
        agent_id: the one agent visitors may talk to; ``None``: links only.
        token_seconds: how long a visitor's token may wait before the socket opens.
        session_seconds: the session cap carried by a visitor's token.
        tokens_per_minute: tokens one client address may mint a minute.
    """

    agent_id: str | None = None
    token_seconds: int = 60
    session_seconds: int = 600
    tokens_per_minute: int = 6

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> PageSettings:
        """Read ``VOXLOOP_PAGE_AGENT``, ``VOXLOOP_PAGE_TOKEN_SECONDS``,
        ``VOXLOOP_PAGE_SESSION_SECONDS``, ``VOXLOOP_PAGE_TOKENS_PER_MINUTE``.

        Raises:
            ValueError: a number is not a positive integer, or out of range.
        """
        d = cls()
        settings = cls(
            agent_id=env.get("VOXLOOP_PAGE_AGENT", "").strip() or None,
            token_seconds=_positive(env, "VOXLOOP_PAGE_TOKEN_SECONDS", d.token_seconds),
            session_seconds=_positive(env, "VOXLOOP_PAGE_SESSION_SECONDS", d.session_seconds),
            tokens_per_minute=_positive(env, "VOXLOOP_PAGE_TOKENS_PER_MINUTE", d.tokens_per_minute),
        )
        if settings.token_seconds > 600:
            raise ValueError("VOXLOOP_PAGE_TOKEN_SECONDS must be at most 600")
        if not 60 <= settings.session_seconds <= 10_800:
            raise ValueError("VOXLOOP_PAGE_SESSION_SECONDS must be from 60 to 10800")
        return settings


def wants_page(request: Request) -> bool:
    """A browser navigating to ``/`` (it asks for HTML); other clients get the JSON index."""
    return "text/html" in request.headers.get("accept", "")


def page_response() -> Response:
    """The page's HTML."""
    return FileResponse(STATIC / "index.html", media_type=FILES["index.html"], headers=HEADERS)


def page_routes(settings: PageSettings, tokens: Tokens, limiter: RateLimiter) -> list[BaseRoute]:
    """``GET /page/{name}`` (the page's files) and ``POST /page/token`` (page-only mode).

    Args:
        limiter: counts page tokens per client address (shared by the workers with Redis).
    """

    async def asset(request: Request) -> Response:
        name = request.path_params["name"]
        if name not in FILES:
            return JSONResponse({"code": "not_found", "message": "no such page file"}, 404)
        return FileResponse(STATIC / name, media_type=FILES[name], headers=HEADERS)

    async def token(request: Request) -> Response:
        if settings.agent_id is None:
            return JSONResponse(
                {"code": "not_found", "message": "this server publishes no page agent "
                 "(VOXLOOP_PAGE_AGENT); open a link from `voxloop agents link`"}, 404,
            )  # fmt: skip
        client = request.client.host if request.client else "unknown"
        if not await limiter.allow("page", client, settings.tokens_per_minute):
            return JSONResponse(
                {"code": "rate_limited", "message": "too many conversations from this address; "
                 "wait a minute"}, 429, headers={"Retry-After": "60"},
            )  # fmt: skip
        claims = {
            "jti": os.urandom(16).hex(),
            "exp": int(time.time()) + settings.token_seconds,
            "msd": settings.session_seconds,
        }
        return JSONResponse(
            {"agent_id": settings.agent_id, "token": tokens.mint(claims),
             "expires_in_seconds": settings.token_seconds},
            headers={"Cache-Control": "no-store"},
        )  # fmt: skip

    return [
        Route("/page/token", token, methods=["POST"]),
        Route("/page/{name}", asset, methods=["GET"]),
    ]
