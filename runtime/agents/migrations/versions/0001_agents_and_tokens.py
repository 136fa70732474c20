"""Agents and single-use token bookkeeping.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None


def upgrade() -> None:
    op.create_table(
        "agents",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("name", sa.String(1000), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("config", sa.JSON, nullable=False),
        sa.Column("llm", sa.JSON, nullable=False),
        sa.Column("tool_secrets", sa.JSON, nullable=False),
    )
    op.create_index("ix_agents_created_at", "agents", ["created_at"])
    op.create_table(
        "token_uses",
        sa.Column("jti", sa.String(64), primary_key=True),
        sa.Column("used_at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("token_uses")
    op.drop_index("ix_agents_created_at", "agents")
    op.drop_table("agents")
