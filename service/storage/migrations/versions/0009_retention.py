"""Retention: a batch's output_expires_after, an index to find expired files, named leases.

Revision ID: 0009
Revises: 0008
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("batches") as batch:
        batch.add_column(sa.Column("output_expires_after", sa.BigInteger(), nullable=True))
    op.create_index("ix_files_status_expires", "files", ["status", "expires_at"])
    op.create_table(
        "leases",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("owner", sa.String(128), nullable=True),
        sa.Column("until", sa.Float(), nullable=False, server_default="0"),
    )


def downgrade() -> None:
    op.drop_table("leases")
    op.drop_index("ix_files_status_expires", table_name="files")
    with op.batch_alter_table("batches") as batch:
        batch.drop_column("output_expires_after")
