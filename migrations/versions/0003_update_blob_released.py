"""updates.blob_released_at: when an update's blob stopped being kept

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-25 17:00:00

An accepted update keeps its SHA-256 (what was accepted: an identical retry still gets the
same answer), but once its round is aggregated and past ``FEDSRD_KEEP_UPLOADS`` the blob is
released for garbage collection; this column says when. Existing updates stay kept.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import api.models

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("updates") as batch:
        batch.add_column(
            sa.Column("blob_released_at", api.models.UTCDateTime(timezone=True), nullable=True)
        )


def downgrade() -> None:
    with op.batch_alter_table("updates") as batch:
        batch.drop_column("blob_released_at")
