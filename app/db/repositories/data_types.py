"""The data-type registry's SQL: the admin routes' reads and writes in the caller's ORM session,
and the data path's read of the whole registry (a few rows) on a pooled connection."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import exists, func, select
from sqlalchemy.orm import Session

from app.datatypes import DataTypeSpec
from app.db.models import DataType, Record
from app.db.session import Database

_ALL = (
    "SELECT name, builtin, pattern, normalize, mask, lookup, max_retention_days FROM data_types ORDER BY name"
)


class DataTypeRepository:
    def __init__(self, session: Session) -> None:
        self.session = session

    def get(self, name: str, *, for_update: bool = False) -> DataType | None:
        return self.session.get(DataType, name, with_for_update=for_update)

    def list(self) -> Sequence[DataType]:
        return self.session.scalars(select(DataType).order_by(DataType.name)).all()

    def same_name_but_case(self, name: str) -> str | None:
        """A registered type whose name differs from this one only in case, if any."""
        query = select(DataType.name).where(func.lower(DataType.name) == name.lower(), DataType.name != name)
        return self.session.scalar(query.limit(1))

    def names_registered(self, names: Sequence[str]) -> set[str]:
        return set(self.session.scalars(select(DataType.name).where(DataType.name.in_(names))).all())

    def add(self, data_type: DataType) -> DataType:
        self.session.add(data_type)
        self.session.flush()
        return data_type

    def has_records(self, name: str) -> bool:
        """Whether any record is of this type (records have no index on data_type: an admin's
        rare question, asked only when a normaliser would change)."""
        return bool(self.session.scalar(select(exists().where(Record.data_type == name))))


async def load_registry(database: Database) -> dict[str, DataTypeSpec]:
    """Every registered type, for the data path's in-process copy: one round trip."""
    async with database.data_connection() as connection:
        cursor = await connection.execute(_ALL)
        rows = await cursor.fetchall()
    return {
        row[0]: DataTypeSpec(
            name=row[0],
            builtin=row[1],
            pattern=row[2],
            normalize=row[3],
            mask=row[4],
            lookup=row[5],
            max_retention_days=row[6],
        )
        for row in rows
    }
