"""admin API: projects (with a monthly budget), key ids/names/last use/revocation, endpoint source

Revision ID: 0007
Revises: 0006
"""

from __future__ import annotations

import secrets

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "projects",
        sa.Column("id", sa.String(length=128), nullable=False),
        sa.Column("name", sa.String(length=256), nullable=False),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        sa.Column("archived_at", sa.BigInteger(), nullable=True),
        sa.Column("monthly_budget_usd", sa.Float(), nullable=True),
        sa.Column("source", sa.String(length=16), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("projects") as batch:
        batch.create_index("ix_projects_created", ["created_at", "id"], unique=False)

    with op.batch_alter_table("api_keys") as batch:
        batch.add_column(sa.Column("id", sa.String(length=64), nullable=True))
        batch.add_column(sa.Column("name", sa.String(length=256), nullable=True))
        batch.add_column(sa.Column("redacted_value", sa.String(length=32), nullable=True))
        batch.add_column(sa.Column("last_used_at", sa.BigInteger(), nullable=True))
        batch.add_column(sa.Column("revoked_at", sa.BigInteger(), nullable=True))
    # Keys stored before this revision get a random public id (unrelated to the key's hash).
    conn = op.get_bind()
    keys = sa.table("api_keys", sa.column("key_hash", sa.String), sa.column("id", sa.String))
    for (key_hash,) in conn.execute(sa.select(keys.c.key_hash)).all():
        conn.execute(keys.update().where(keys.c.key_hash == key_hash).values(id="key_" + secrets.token_hex(12)))
    with op.batch_alter_table("api_keys") as batch:
        batch.alter_column("id", existing_type=sa.String(length=64), nullable=False)
        batch.create_index("ux_api_keys_id", ["id"], unique=True)

    # Every endpoint stored before this revision came from the webhooks file.
    with op.batch_alter_table("webhook_endpoints") as batch:
        batch.add_column(sa.Column("source", sa.String(length=16), nullable=False, server_default="config"))


def downgrade() -> None:
    with op.batch_alter_table("webhook_endpoints") as batch:
        batch.drop_column("source")
    with op.batch_alter_table("api_keys") as batch:
        batch.drop_index("ux_api_keys_id")
        for column in ("revoked_at", "last_used_at", "redacted_value", "name", "id"):
            batch.drop_column(column)
    with op.batch_alter_table("projects") as batch:
        batch.drop_index("ix_projects_created")
    op.drop_table("projects")
