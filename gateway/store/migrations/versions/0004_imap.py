"""IMAP sync: mail accounts and their folders' cursors.

Revision ID: 0004
Revises: 0003

"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Upgrade schema: only the IMAP tables (gateway/imap/models.py)."""
    op.create_table(
        "mail_account",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("email", sa.String(length=320), nullable=False),
        sa.Column("owner", sa.String(length=320), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("sharing", sa.String(length=16), nullable=False),
        sa.Column("selected_contacts", sa.JSON(), nullable=False),
        sa.Column("is_primary", sa.Boolean(), nullable=False),
        sa.Column("provider", sa.String(length=32), nullable=False),
        sa.Column("imap_host", sa.String(length=255), nullable=False),
        sa.Column("imap_port", sa.Integer(), nullable=False),
        sa.Column("imap_security", sa.String(length=16), nullable=False),
        sa.Column("username", sa.String(length=320), nullable=False),
        sa.Column("smtp_host", sa.String(length=255), nullable=False),
        sa.Column("smtp_port", sa.Integer(), nullable=False),
        sa.Column("smtp_security", sa.String(length=16), nullable=False),
        sa.Column("allow_unverified_certificate", sa.Boolean(), nullable=False),
        sa.Column("auth_method", sa.String(length=16), nullable=False),
        sa.Column("secret", sa.LargeBinary(), nullable=False),
        sa.Column("max_connections", sa.Integer(), nullable=False),
        sa.Column("sync_mode", sa.String(length=16), nullable=False),
        sa.Column("start_from", sa.String(length=32), nullable=False),
        sa.Column("start_at", sa.Float(), nullable=False),
        sa.Column("folders", sa.JSON(), nullable=False),
        sa.Column("aliases", sa.JSON(), nullable=False),
        sa.Column("emit_deleted", sa.Boolean(), nullable=False),
        sa.Column("emit_archived", sa.Boolean(), nullable=False),
        sa.Column("allow_mailbox_changes", sa.Boolean(), nullable=False),
        sa.Column("enabled", sa.Boolean(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("reported_status", sa.String(length=16), nullable=True),
        sa.Column("progress", sa.Float(), nullable=True),
        sa.Column("last_sync_at", sa.Float(), nullable=True),
        sa.Column("last_error", sa.String(), nullable=True),
        sa.Column("last_error_at", sa.Float(), nullable=True),
        sa.Column("auth_failures", sa.Integer(), nullable=False),
        sa.Column("lease_owner", sa.String(length=64), nullable=True),
        sa.Column("lease_expires_at", sa.Float(), nullable=True),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("updated_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("mail_account", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_mail_account_email"), ["email"], unique=False)
        batch_op.create_index(batch_op.f("ix_mail_account_owner"), ["owner"], unique=False)

    op.create_table(
        "mail_folder",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("account_id", sa.String(length=40), nullable=False),
        sa.Column("name", sa.String(length=1000), nullable=False),
        sa.Column("special_use", sa.String(length=32), nullable=True),
        sa.Column("uidvalidity", sa.BigInteger(), nullable=True),
        sa.Column("last_uid", sa.BigInteger(), nullable=False),
        sa.Column("highest_modseq", sa.BigInteger(), nullable=True),
        sa.Column("uidnext", sa.BigInteger(), nullable=True),
        sa.Column("messages", sa.Integer(), nullable=True),
        sa.Column("initial_done", sa.Boolean(), nullable=False),
        sa.Column("initial_total", sa.Integer(), nullable=False),
        sa.Column("initial_processed", sa.Integer(), nullable=False),
        sa.Column("fetched", sa.Integer(), nullable=False),
        sa.Column("logged", sa.Integer(), nullable=False),
        sa.Column("sync_started_at", sa.Float(), nullable=True),
        sa.Column("updated_at", sa.Float(), nullable=False),
        sa.ForeignKeyConstraint(["account_id"], ["mail_account.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("account_id", "name", name="uq_mail_folder_account_name"),
    )
    with op.batch_alter_table("mail_folder", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_mail_folder_account_id"), ["account_id"], unique=False)

    op.create_table(
        "mail_link",
        sa.Column("account_id", sa.String(length=40), nullable=False),
        sa.Column("key", sa.String(length=1000), nullable=False),
        sa.Column("folder", sa.String(length=1000), nullable=False),
        sa.Column("uidvalidity", sa.BigInteger(), nullable=False),
        sa.Column("uid", sa.BigInteger(), nullable=False),
        sa.Column("message_id", sa.String(length=32), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.ForeignKeyConstraint(["account_id"], ["mail_account.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("account_id", "key"),
    )
    with op.batch_alter_table("mail_link", schema=None) as batch_op:
        batch_op.create_index("ix_mail_link_place", ["account_id", "folder", "uid"], unique=False)


def downgrade() -> None:
    """Downgrade schema: drop the IMAP tables, children first."""
    with op.batch_alter_table("mail_link", schema=None) as batch_op:
        batch_op.drop_index("ix_mail_link_place")
    op.drop_table("mail_link")
    with op.batch_alter_table("mail_folder", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_mail_folder_account_id"))
    op.drop_table("mail_folder")
    with op.batch_alter_table("mail_account", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_mail_account_owner"))
        batch_op.drop_index(batch_op.f("ix_mail_account_email"))
    op.drop_table("mail_account")
