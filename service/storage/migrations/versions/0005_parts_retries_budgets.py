"""batch parts (mixed providers, provider limits), retries, idempotency keys, budgets, executor capacity

Revision ID: 0005
Revises: 0004

- `batch_parts`: one row per provider batch of a batch (or per executor provider it runs on). What a
  provider knows of a batch (its id there, its status and live counts, submit/cancel bookkeeping,
  poll failures) moves from `batches` to the batch's parts: every existing batch with lines gets
  part 0 holding exactly what its row held, so a batch in flight during the upgrade carries on.
- `batch_requests.part_no` / `.provider`: which part runs a line, on which provider;
  `.origin_idx`: a retried line's index in the first batch of its chain.
- `batches.retry_of` / `.chain_id`: RetryBatch links.
- `idempotency_keys`: CreateBatch's `Idempotency-Key`, one batch per (project, key).
- `project_spend`, `batch_charges`: monthly spend limits (reservations and actual cost).
- `capacity_slots`, `capacity_windows`, `capacity_state`: executor providers' shared capacity.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

# The per-provider columns that move from `batches` to `batch_parts` (next_poll_at stays: the
# batch's next look is the earliest of its parts').
_MOVED = ("provider_batch_id", "provider_status", "provider_completed", "provider_failed",
          "submit_started_at", "cancel_sent_at", "poll_failures")


def upgrade() -> None:
    op.create_table(
        "batch_parts",
        sa.Column("batch_id", sa.String(length=64), nullable=False),
        sa.Column("part_no", sa.Integer(), nullable=False),
        sa.Column("provider", sa.String(length=64), nullable=False),
        sa.Column("provider_model", sa.String(length=256), nullable=True),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("total", sa.Integer(), nullable=False),
        sa.Column("completed", sa.Integer(), nullable=False),
        sa.Column("failed", sa.Integer(), nullable=False),
        sa.Column("bytes", sa.BigInteger(), nullable=False),
        sa.Column("errors_json", sa.Text(), nullable=True),
        sa.Column("ended_at", sa.BigInteger(), nullable=True),
        sa.Column("provider_batch_id", sa.String(length=256), nullable=True),
        sa.Column("provider_status", sa.String(length=64), nullable=True),
        sa.Column("provider_completed", sa.Integer(), nullable=True),
        sa.Column("provider_failed", sa.Integer(), nullable=True),
        sa.Column("submit_started_at", sa.BigInteger(), nullable=True),
        sa.Column("cancel_sent_at", sa.BigInteger(), nullable=True),
        sa.Column("next_poll_at", sa.Float(), nullable=True),
        sa.Column("poll_failures", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(["batch_id"], ["batches.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("batch_id", "part_no"),
    )
    # Part 0 of every batch with lines: the batch's own provider bookkeeping. A cancelling batch's
    # part is still running at the provider (in_progress) once submitted.
    op.execute(sa.text("""
        INSERT INTO batch_parts (batch_id, part_no, provider, provider_model, status, total, completed, failed,
                                 bytes, ended_at, provider_batch_id, provider_status, provider_completed,
                                 provider_failed, submit_started_at, cancel_sent_at, next_poll_at, poll_failures)
        SELECT id, 0, provider, provider_model,
               CASE WHEN status = 'cancelling' AND provider_batch_id IS NULL THEN 'validating'
                    WHEN status = 'cancelling' THEN 'in_progress'
                    ELSE status END,
               total, completed, failed, 0,
               COALESCE(completed_at, failed_at, expired_at, cancelled_at),
               provider_batch_id, provider_status, provider_completed, provider_failed,
               submit_started_at, cancel_sent_at, next_poll_at, poll_failures
        FROM batches WHERE total > 0
    """))
    with op.batch_alter_table("batches", schema=None) as batch_op:
        for column in _MOVED:
            batch_op.drop_column(column)
        batch_op.add_column(sa.Column("retry_of", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("chain_id", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("merged_output_file_id", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("merged_error_file_id", sa.String(length=64), nullable=True))
        batch_op.create_index("ix_batches_retry_of", ["retry_of"], unique=False)
        batch_op.create_index("ix_batches_chain_id", ["chain_id"], unique=False)

    with op.batch_alter_table("batch_requests", schema=None) as batch_op:
        batch_op.add_column(sa.Column("part_no", sa.Integer(), server_default="0", nullable=False))
        batch_op.add_column(sa.Column("provider", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("origin_idx", sa.Integer(), nullable=True))
        batch_op.create_index("ix_batch_requests_part", ["batch_id", "part_no", "idx"], unique=False)

    op.create_table(
        "idempotency_keys",
        sa.Column("project", sa.String(length=128), nullable=False),
        sa.Column("key", sa.String(length=255), nullable=False),
        sa.Column("request_hash", sa.String(length=64), nullable=False),
        sa.Column("batch_id", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("project", "key"),
    )
    op.create_table(
        "project_spend",
        sa.Column("project", sa.String(length=128), nullable=False),
        sa.Column("month", sa.String(length=7), nullable=False),
        sa.Column("reserved", sa.Float(), nullable=False),
        sa.Column("spent", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("project", "month"),
    )
    op.create_table(
        "batch_charges",
        sa.Column("batch_id", sa.String(length=64), nullable=False),
        sa.Column("project", sa.String(length=128), nullable=False),
        sa.Column("month", sa.String(length=7), nullable=False),
        sa.Column("reserved", sa.Float(), nullable=False),
        sa.Column("actual", sa.Float(), nullable=True),
        sa.Column("settled_at", sa.BigInteger(), nullable=True),
        sa.ForeignKeyConstraint(["batch_id"], ["batches.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("batch_id"),
    )
    op.create_table(
        "capacity_slots",
        sa.Column("provider", sa.String(length=64), nullable=False),
        sa.Column("slot", sa.Integer(), nullable=False),
        sa.Column("holder", sa.String(length=160), nullable=True),
        sa.Column("until", sa.Float(), nullable=True),
        sa.PrimaryKeyConstraint("provider", "slot"),
    )
    op.create_table(
        "capacity_windows",
        sa.Column("provider", sa.String(length=64), nullable=False),
        sa.Column("minute", sa.BigInteger(), nullable=False),
        sa.Column("requests", sa.Integer(), nullable=False),
        sa.Column("tokens", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("provider", "minute"),
    )
    op.create_table(
        "capacity_state",
        sa.Column("provider", sa.String(length=64), nullable=False),
        sa.Column("current_limit", sa.Float(), nullable=False),
        sa.Column("backed_off_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("provider"),
    )


def downgrade() -> None:
    for table in ("capacity_state", "capacity_windows", "capacity_slots", "batch_charges", "project_spend",
                  "idempotency_keys"):
        op.drop_table(table)
    with op.batch_alter_table("batch_requests", schema=None) as batch_op:
        batch_op.drop_index("ix_batch_requests_part")
        batch_op.drop_column("origin_idx")
        batch_op.drop_column("provider")
        batch_op.drop_column("part_no")
    with op.batch_alter_table("batches", schema=None) as batch_op:
        batch_op.drop_index("ix_batches_chain_id")
        batch_op.drop_index("ix_batches_retry_of")
        batch_op.drop_column("merged_error_file_id")
        batch_op.drop_column("merged_output_file_id")
        batch_op.drop_column("chain_id")
        batch_op.drop_column("retry_of")
        batch_op.add_column(sa.Column("provider_batch_id", sa.String(length=256), nullable=True))
        batch_op.add_column(sa.Column("provider_status", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("provider_completed", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("provider_failed", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("submit_started_at", sa.BigInteger(), nullable=True))
        batch_op.add_column(sa.Column("cancel_sent_at", sa.BigInteger(), nullable=True))
        batch_op.add_column(sa.Column("poll_failures", sa.Integer(), server_default="0", nullable=False))
    # Only a batch's first part can go back on its row: downgrade before running mixed batches.
    for column in _MOVED:
        op.execute(sa.text(f"UPDATE batches SET {column} = (SELECT p.{column} FROM batch_parts p "
                           f"WHERE p.batch_id = batches.id AND p.part_no = 0) "
                           f"WHERE EXISTS (SELECT 1 FROM batch_parts p WHERE p.batch_id = batches.id "
                           f"AND p.part_no = 0)"))
    op.drop_table("batch_parts")
