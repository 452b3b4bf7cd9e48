"""Results stored as they are served.

Revision ID: 0011
Revises: 0010

`batch_results.response_pb` is a result's body as the API serves it (`BatchResult.response`, a
serialized google.protobuf.Struct), written once when the result is stored, so that a page of
results is not rebuilt from JSON at each read. NULL on results stored before this revision (and on
bodies that are not JSON objects): those are still built from `response_json` when read.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("batch_results") as batch:
        batch.add_column(sa.Column("response_pb", sa.LargeBinary(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("batch_results") as batch:
        batch.drop_column("response_pb")
