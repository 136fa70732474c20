"""Temporary tokens: short-lived, single-use credentials a server key mints for a browser or device.

A token is ``<claims>.<mac>``: base64url JSON claims (``jti`` a random id, ``exp`` Unix
seconds, ``msd`` the session cap in seconds, ``kid`` the signing key's id) and an
HMAC-SHA256 over them with a key derived from the secret key ring, so every worker
holding the ring verifies it. Its single use is one insert into ``token_uses``
(:meth:`~runtime.agents.store.Store.use_token`): of any number of concurrent
redemptions on workers sharing the database, exactly one wins.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from typing import Any, Protocol

from runtime.agents.secrets import SecretBox, b64url_decode, b64url_encode
from runtime.agents.store import Store


class TokenUses(Protocol):
    """Where a token's single use is recorded (the database, or Redis for several workers)."""

    async def first_use(self, jti: str, ttl_s: int) -> bool:
        """Record the use of token ``jti``; ``True`` only for the first use anywhere."""


class Tokens:
    """Mints and redeems temporary tokens with the service's key ring and store.

    Args:
        uses: records redemptions; default: the ``token_uses`` table of ``store``.
    """

    def __init__(self, box: SecretBox, store: Store, uses: TokenUses | None = None) -> None:
        self.box = box
        self.store = store
        self.uses = uses

    def _key(self, kid: str) -> bytes:
        return hashlib.sha256(b"voxloop-token-v1" + self.box.ring.keys[kid]).digest()

    def mint(self, claims: dict[str, Any]) -> str:
        """Sign ``claims`` (``jti``, ``exp`` in Unix seconds, ``msd``) into a token string."""
        claims = {**claims, "kid": self.box.ring.primary}
        body = b64url_encode(json.dumps(claims, separators=(",", ":")).encode())
        mac = hmac.new(self._key(claims["kid"]), body.encode(), hashlib.sha256).digest()
        return f"{body}.{b64url_encode(mac)}"

    async def redeem(self, token: str) -> dict[str, Any] | None:
        """The token's claims if it is genuine, unexpired and not used before; marks it used.

        Returns ``None`` for a forged, malformed, expired or already used token.
        """
        body, _, mac = token.partition(".")
        try:
            given = b64url_decode(mac)
            claims = json.loads(b64url_decode(body))
        except (ValueError, RecursionError):
            return None
        if not isinstance(claims, dict):
            return None
        kid = claims.get("kid", self.box.ring.primary)
        if not isinstance(kid, str) or not self.box.has_key(kid):
            return None
        expected = hmac.new(self._key(kid), body.encode(), hashlib.sha256).digest()
        if not hmac.compare_digest(given, expected):
            return None
        exp = claims.get("exp")
        if not isinstance(exp, int) or exp < time.time():
            return None
        jti = str(claims.get("jti"))
        if self.uses is not None:
            first = await self.uses.first_use(jti, max(1, exp - int(time.time()) + 60))
        else:
            first = await self.store.use_token(jti)
        if not first:
            return None
        return claims
