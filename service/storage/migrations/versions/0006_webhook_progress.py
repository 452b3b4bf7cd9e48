"""webhook progress events: an endpoint's progress thresholds, an event's threshold

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("webhook_endpoints") as batch:
        batch.add_column(sa.Column("progress_thresholds", sa.String(length=256), nullable=False, server_default=""))
    with op.batch_alter_table("webhook_events") as batch:
        batch.add_column(sa.Column("progress", sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("webhook_events") as batch:
        batch.drop_column("progress")
    with op.batch_alter_table("webhook_endpoints") as batch:
        batch.drop_column("progress_thresholds")
