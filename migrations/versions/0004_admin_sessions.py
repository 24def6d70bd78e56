"""admin_sessions: the dashboard's signed-in browsers, so that signing out revokes a cookie

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-25 18:10:00

Until this revision a dashboard cookie was valid on its signature alone until it expired.
From here on a cookie is a session only while its row exists. Cookies issued before the
upgrade have no row: those browsers are asked to sign in again.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import api.models

revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "admin_sessions",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("key", sa.String(length=64), nullable=False),
        sa.Column("created_at", api.models.UTCDateTime(timezone=True), nullable=False),
        sa.Column("expires_at", api.models.UTCDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_admin_sessions")),
        sa.UniqueConstraint("key", name=op.f("uq_admin_sessions_key")),
    )
    with op.batch_alter_table("admin_sessions", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_admin_sessions_expires_at"), ["expires_at"], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table("admin_sessions", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_admin_sessions_expires_at"))
    op.drop_table("admin_sessions")
