"""a data-type registry, and masked reveal on grants

data_types holds the built-in types (their rules as in app/datatypes.py; tests check the two
agree) and registers every type already used by a record or named by a grant's constraint as a
custom type with no pattern, so existing data and grants keep working. grants.reveal says what a
grant's Decrypt reveals: the value ('plain', every existing grant) or only its mask ('masked').

Revision ID: 0004
Revises: 0003
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_ID = r"[A-Za-z0-9]"
# name, pattern, normalize, mask, lookup (as app/datatypes.BUILTINS at this revision).
BUILTINS = (
    ("SSN", r"\d{3}[ -]?\d{2}[ -]?\d{4}", "strip_separators", "ssn", True),
    ("DriverLicense", _ID + r"(?:[A-Za-z0-9 -]{0,30}" + _ID + ")?", "strip_separators", "last4", True),
    ("Passport", _ID + r"[A-Za-z0-9 -]{3,18}" + _ID, "strip_separators", "last4", True),
    ("Email", r"[^@\s]{1,64}@[^@\s.]+(?:\.[^@\s.]+)+", "lowercase", "email", True),
    ("Phone", r"\+?[ ().-]*(?:\d[ ().-]*){7,15}", "digits", "last4", True),
    ("DateOfBirth", r"\d{4}-\d{2}-\d{2}", "none", "year", False),
    ("AccountNumber", _ID + r"[A-Za-z0-9 -]{2,40}" + _ID, "strip_separators", "last4", True),
    ("CardNumber", r"\d(?:[ -]?\d){11,18}", "strip_separators", "last4", True),
    ("Name", r"[^\p{Cc}]+", "none", "none", False),
    ("Address", r"(?:[^\p{Cc}]|[\t\n\r])+", "none", "none", False),
)


def upgrade() -> None:
    data_types = op.create_table(
        "data_types",
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("builtin", sa.Boolean(), server_default=sa.text("false"), nullable=False),
        sa.Column("pattern", sa.Text(), nullable=True),
        sa.Column("normalize", sa.String(length=32), server_default=sa.text("'none'"), nullable=False),
        sa.Column("mask", sa.String(length=16), server_default=sa.text("'none'"), nullable=False),
        sa.Column("lookup", sa.Boolean(), server_default=sa.text("false"), nullable=False),
        sa.Column("max_retention_days", sa.Integer(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.CheckConstraint(
            "normalize IN ('none', 'strip_separators', 'lowercase', 'digits')", name="normalize_known"
        ),
        sa.CheckConstraint("mask IN ('last4', 'ssn', 'email', 'year', 'none')", name="mask_known"),
        sa.CheckConstraint(
            "max_retention_days IS NULL OR max_retention_days > 0", name="max_retention_days_positive"
        ),
        sa.PrimaryKeyConstraint("name"),
    )
    op.bulk_insert(
        data_types,
        [
            {"name": name, "builtin": True, "pattern": pattern, "normalize": normalize, "mask": mask,
             "lookup": lookup}
            for name, pattern, normalize, mask, lookup in BUILTINS
        ],
    )  # fmt: skip
    # Types in use become custom types with no pattern (and defaults: no normaliser, masked
    # wholly, no lookup). A grant's dataType that no record could carry (not a valid type name)
    # is left out: it matches nothing either way.
    op.execute(
        r"""
        INSERT INTO data_types (name)
        SELECT DISTINCT name FROM (
            SELECT data_type AS name FROM records
            UNION
            SELECT constraint_context ->> 'dataType' FROM grants WHERE constraint_context ? 'dataType'
        ) used
        WHERE name ~ '^[A-Za-z][A-Za-z0-9_]{0,63}$'
        ON CONFLICT (name) DO NOTHING
        """
    )
    op.add_column(
        "grants", sa.Column("reveal", sa.String(length=8), server_default=sa.text("'plain'"), nullable=False)
    )
    op.create_check_constraint("reveal_known", "grants", "reveal IN ('plain', 'masked')")


def downgrade() -> None:
    op.drop_constraint("reveal_known", "grants", type_="check")
    op.drop_column("grants", "reveal")
    op.drop_table("data_types")
