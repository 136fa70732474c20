"""The key-state row: which key id new secrets are sealed with.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"


def upgrade() -> None:
    op.create_table(
        "secret_state",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("primary_kid", sa.String(64), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("secret_state")
