"""run traffic totals (bytes up, down, FedAvg-equivalent)

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25 09:00:00

Adds the running totals the dashboard's run list shows and fills them in for runs that
already have closed rounds, with the rule of ``api.services.rounds.round_traffic`` as it
stood at this revision (inlined: a migration must not change when the application does).
"""

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_COLUMNS = ("bytes_up", "bytes_down", "fedavg_bytes")


def upgrade() -> None:
    with op.batch_alter_table("runs") as batch:
        for name in _COLUMNS:
            batch.add_column(sa.Column(name, sa.BigInteger(), server_default="0", nullable=False))
    _backfill()


def _backfill() -> None:
    runs = sa.table(
        "runs",
        sa.column("id", sa.Integer),
        sa.column("config", sa.JSON),
        sa.column("layout", sa.JSON),
        *(sa.column(name, sa.BigInteger) for name in _COLUMNS),
    )
    rounds = sa.table(
        "rounds",
        sa.column("run_id", sa.Integer),
        sa.column("status", sa.String),
        sa.column("delta_size", sa.BigInteger),
        sa.column("metrics", sa.JSON),
    )
    conn = op.get_bind()
    totals: dict[int, list[int]] = {}
    params: dict[int, int] = {}
    for run_id, config, layout in conn.execute(sa.select(runs.c.id, runs.c.config, runs.c.layout)):
        rank = int(config["lora"]["rank"])
        params[run_id] = sum(rank * (int(o) + int(i)) for o, i in layout.values())
    closed = sa.select(rounds.c.run_id, rounds.c.delta_size, rounds.c.metrics).where(
        rounds.c.status == "closed"
    )
    for run_id, delta_size, metrics in conn.execute(closed):
        m: dict[str, Any] = metrics or {}
        n = len(m.get("participants", []))
        t = totals.setdefault(run_id, [0, 0, 0])
        t[0] += int(m.get("bytes_up", 0))
        t[1] += int(delta_size or 0) * n
        t[2] += 2 * n * params.get(run_id, 0) * 4
    for run_id, (up, down, fedavg) in totals.items():
        conn.execute(
            sa.update(runs)
            .where(runs.c.id == run_id)
            .values(bytes_up=up, bytes_down=down, fedavg_bytes=fedavg)
        )


def downgrade() -> None:
    with op.batch_alter_table("runs") as batch:
        for name in _COLUMNS:
            batch.drop_column(name)
