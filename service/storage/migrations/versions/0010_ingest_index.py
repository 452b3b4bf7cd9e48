"""Ingest without parsing twice or storing bodies twice.

Revision ID: 0010
Revises: 0009

`file_line_index` keeps, per uploaded file, what the upload learnt of each line while it streamed
(custom_id, model, url, byte offset and length, token counts), so creating a batch from the file
checks and stores its lines without parsing a body again. `batch_requests.line_offset` /
`line_length` point a request at its line in the batch's input file instead of copying the body
into `body_json` ("" then). Rows from before this revision keep NULL there and their `body_json`;
files uploaded before it have no index and are read the slow way. `ix_batches_input_file` finds
the batches that read a file, for the sweeper (which copies their bodies in before purging it).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "file_line_index",
        sa.Column("file_id", sa.String(length=64), nullable=False),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("data", sa.LargeBinary(), nullable=False),
        sa.ForeignKeyConstraint(["file_id"], ["files.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("file_id", "seq"),
    )
    with op.batch_alter_table("batch_requests") as batch:
        batch.add_column(sa.Column("line_offset", sa.BigInteger(), nullable=True))
        batch.add_column(sa.Column("line_length", sa.Integer(), nullable=True))
    op.create_index("ix_batches_input_file", "batches", ["input_file_id"])


def downgrade() -> None:
    op.drop_index("ix_batches_input_file", table_name="batches")
    with op.batch_alter_table("batch_requests") as batch:
        batch.drop_column("line_length")
        batch.drop_column("line_offset")
    op.drop_table("file_line_index")
