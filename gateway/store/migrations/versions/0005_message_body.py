"""Message bodies in their own table, so leases and outcomes never rewrite the bytes.

Revision ID: 0005
Revises: 0004

"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = "0005"
down_revision: str | Sequence[str] | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "message_body",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("raw", sa.LargeBinary(), nullable=False),
        sa.ForeignKeyConstraint(["id"], ["message.id"]),
        sa.PrimaryKeyConstraint("id"),
    )
    op.execute("INSERT INTO message_body (id, raw) SELECT id, raw FROM message")
    with op.batch_alter_table("message", schema=None) as batch_op:
        batch_op.drop_column("raw")


def downgrade() -> None:
    with op.batch_alter_table("message", schema=None) as batch_op:
        batch_op.add_column(sa.Column("raw", sa.LargeBinary(), nullable=False, server_default=""))
    op.execute(
        "UPDATE message SET raw = (SELECT raw FROM message_body WHERE message_body.id = message.id)"
    )
    op.drop_table("message_body")
