"""Who opened a connection: API keys, single-use tokens and resume tokens as owners."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Literal

from runtime.secret import Secret


@dataclass(frozen=True, slots=True)
class Principal:
    """Who opened the connection.

    Attributes:
        kind: ``key`` (an API key), ``token`` (a single-use token), ``resume``
            (a resume token: only ``session.resume`` is allowed).
        owner: a stable, non-secret id of the credential's owner.
        max_duration_s: the session cap the credential carries (``None``: the default).
        resume_token: the presented resume token (``kind == "resume"``).
    """

    kind: Literal["key", "token", "resume"]
    owner: str
    max_duration_s: int | None = None
    resume_token: Secret | None = None


def key_owner(api_key: str) -> str:
    """A non-secret id for an API key (for ownership checks; never the key)."""
    return "key:" + hashlib.sha256(b"voxloop-owner\0" + api_key.encode()).hexdigest()[:24]


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()
