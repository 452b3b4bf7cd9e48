"""api key source; file activity time (stale uploads and deleted files are swept)

Revision ID: 0003
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Every key stored before this revision came from configuration.
    with op.batch_alter_table("api_keys") as batch:
        batch.add_column(sa.Column("source", sa.String(length=16), nullable=False, server_default="config"))
    with op.batch_alter_table("files") as batch:
        batch.add_column(sa.Column("updated_at", sa.BigInteger(), nullable=True))
        batch.create_index("ix_files_status_updated", ["status", "updated_at"])


def downgrade() -> None:
    with op.batch_alter_table("files") as batch:
        batch.drop_index("ix_files_status_updated")
        batch.drop_column("updated_at")
    with op.batch_alter_table("api_keys") as batch:
        batch.drop_column("source")
