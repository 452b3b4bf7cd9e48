"""resolve a line's route once, at intake; drop an index no query uses

Revision ID: 0002
Revises: 0001

`batch_requests.provider_model` and `batches.provider_model` hold the provider's own model name that
intake resolved, so the engine, pricing and the provider job never route a line again (an edit of
the providers file cannot re-route an accepted batch). Rows from before this revision keep NULL and
are routed once more when they run. `ix_batch_results_custom_id` served no query: results are read
by `(batch_id, idx)`, and a `custom_id` is looked up in `batch_requests`.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("batches", schema=None) as batch_op:
        batch_op.add_column(sa.Column("provider_model", sa.String(length=256), nullable=True))
    with op.batch_alter_table("batch_requests", schema=None) as batch_op:
        batch_op.add_column(sa.Column("provider_model", sa.String(length=256), nullable=True))
    with op.batch_alter_table("batch_results", schema=None) as batch_op:
        batch_op.drop_index("ix_batch_results_custom_id")


def downgrade() -> None:
    with op.batch_alter_table("batch_results", schema=None) as batch_op:
        batch_op.create_index("ix_batch_results_custom_id", ["batch_id", "custom_id"], unique=False)
    with op.batch_alter_table("batch_requests", schema=None) as batch_op:
        batch_op.drop_column("provider_model")
    with op.batch_alter_table("batches", schema=None) as batch_op:
        batch_op.drop_column("provider_model")
