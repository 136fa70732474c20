"""Stored agents: the agent schema and its validation, the store (SQLite or PostgreSQL,
Alembic migrations), secrets sealed at rest, key rotation and temporary tokens.

* :mod:`~runtime.agents.schema` — the agent document: parsing and validation with
  field paths, the OpenAPI document generated from the same models (pure).
* :mod:`~runtime.agents.store` — agents, token uses and key state in one database.
* :mod:`~runtime.agents.secrets` — AES-GCM sealing with a key ring (environment or
  a 0600 key file).
* :mod:`~runtime.agents.rotation` — ``voxloop secrets rotate-key``: re-seal every
  secret under a new primary key.
* :mod:`~runtime.agents.tokens` — single-use temporary tokens.
"""
