"""The data-type registry: which types exist, what each accepts, how each is normalised and masked.

The rules themselves are pure (app/datatypes.py). Here: the admin's PUT (built-ins change only in
retention; a normaliser is fixed once records of the type exist), and the data path's copy of the
registry. That copy is held in process and re-read at most every CACHE_TTL_S, so tokenize and
detokenize add no round trip: a PUT drops this process's copy at once; another replica sees a
change within CACHE_TTL_S, and a type it has never seen (one just registered) at its first use,
since a miss re-reads the registry (at most every MISS_RELOAD_S, so a request costs one read at most).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from sqlalchemy.orm import Session

from app.datatypes import DataTypeSpec, Mask, Normalize, PatternError, compile_pattern, normaliser
from app.db.models import DataType
from app.db.repositories import DataTypeRepository, load_registry
from app.db.session import Database, on_commit
from app.errors import (
    BuiltinDataType,
    Conflict,
    DataTypeInUse,
    InvalidInput,
    InvalidValue,
    NotFound,
    UnknownDataType,
)
from app.services.audit import Auditor, Subject, build_event
from app.services.context import Caller, RequestContext, utcnow

CACHE_TTL_S = 5.0
MISS_RELOAD_S = 0.5

FIELDS = ("pattern", "normalize", "mask", "lookup", "max_retention_days")


@dataclass(frozen=True, slots=True)
class DataTypeChanges:
    """A PUT's body: `given` names the fields the body set (the others keep their value, or take
    a new type's defaults); pattern and max_retention_days may be set to None (none)."""

    given: frozenset[str]
    pattern: str | None = None
    normalize: Normalize = "none"
    mask: Mask = "none"
    lookup: bool = False
    max_retention_days: int | None = None


def spec_of(row: DataType) -> DataTypeSpec:
    return DataTypeSpec(
        name=row.name,
        builtin=row.builtin,
        pattern=row.pattern,
        # A CHECK constraint keeps both to their literals.
        normalize=row.normalize,  # type: ignore[arg-type]
        mask=row.mask,  # type: ignore[arg-type]
        lookup=row.lookup,
        max_retention_days=row.max_retention_days,
    )


class DataTypeService:
    def __init__(self, database: Database, auditor: Auditor, *, ttl_s: float = CACHE_TTL_S) -> None:
        self._database = database
        self._auditor = auditor
        self._ttl_s = ttl_s
        self._snapshot: dict[str, DataTypeSpec] | None = None
        self._loaded_at = -math.inf
        self._generation = 0
        self._refreshing = False

    # The data path's copy (async: it runs on the event loop).

    def invalidate(self) -> None:
        """Drop this process's copy (after a PUT commits): the next request reads the registry."""
        self._generation += 1
        self._snapshot = None
        self._loaded_at = -math.inf

    async def _reload(self) -> dict[str, DataTypeSpec]:
        generation = self._generation
        self._refreshing = True
        try:
            snapshot = await load_registry(self._database)
        finally:
            self._refreshing = False
        # A PUT that committed while this read ran may not be in it: keep it only if none did.
        if generation == self._generation:
            self._snapshot, self._loaded_at = snapshot, time.monotonic()
        return snapshot

    async def registry(self) -> Mapping[str, DataTypeSpec]:
        snapshot = self._snapshot
        if snapshot is not None and time.monotonic() - self._loaded_at < self._ttl_s:
            return snapshot
        if snapshot is not None and self._refreshing:
            return snapshot  # one refresh at a time; meanwhile the copy a moment older serves
        return await self._reload()

    async def spec(self, name: str, registry: Mapping[str, DataTypeSpec] | None = None) -> DataTypeSpec:
        """The type's rules, or UnknownDataType (naming the field data_type)."""
        found = (registry if registry is not None else await self.registry()).get(name)
        if found is None and time.monotonic() - self._loaded_at >= MISS_RELOAD_S:
            found = (await self._reload()).get(name)
        if found is None:
            raise UnknownDataType(
                f"data_type {name!r} is not registered (see GET /v1/data-types)", field="data_type"
            )
        return found

    async def check_value(
        self, data_type: str, value: str, registry: Mapping[str, DataTypeSpec] | None = None
    ) -> DataTypeSpec:
        """The type's rules if the value is one of its type; else UnknownDataType or InvalidValue,
        whose message names the field and the type and never the value."""
        spec = await self.spec(data_type, registry)
        if not spec.accepts(value):
            raise InvalidValue(f"value is not a valid {spec.name}", field="value")
        return spec

    async def max_retention_days(self, data_type: str) -> int | None:
        """The longest a record of this type may be kept (None: no limit). For retention."""
        return (await self.spec(data_type)).max_retention_days

    async def normaliser(self, data_type: str) -> Callable[[str], str]:
        """The function a value of this type is normalised with (before a fingerprint)."""
        return normaliser((await self.spec(data_type)).normalize)

    # The admin's side (sync: the admin routes run in worker threads, in an ORM session).

    def list(self, session: Session) -> Sequence[DataType]:
        return DataTypeRepository(session).list()

    def get(self, session: Session, name: str) -> DataType:
        found = DataTypeRepository(session).get(name)
        if found is None:
            raise NotFound(f"data type {name!r} is not registered", field="name")
        return found

    def require_registered(self, session: Session, names: Sequence[str], field: str) -> None:
        """For a new grant: a dataType it names must be registered (else it would match nothing)."""
        missing = sorted(set(names) - DataTypeRepository(session).names_registered(names))
        if missing:
            raise UnknownDataType(f"data type {missing[0]!r} is not registered", field=field)

    def put(
        self, session: Session, actor: Caller, name: str, changes: DataTypeChanges, ctx: RequestContext
    ) -> tuple[DataType, bool]:
        """Register a custom type or change one; of a built-in, only max_retention_days. Audited
        in the same transaction. Returns the type and whether it was created."""
        repository = DataTypeRepository(session)
        row = repository.get(name, for_update=True)
        created = row is None
        if row is None:
            # `ssn` beside `SSN` is a typo waiting to store data under the wrong rules.
            twin = repository.same_name_but_case(name)
            if twin is not None:
                raise Conflict(
                    f"data type {twin!r} is registered; names may not differ only in case", field="name"
                )
            row = DataType(
                name=name, builtin=False, pattern=None, normalize="none", mask="none", lookup=False
            )
        wanted = {key: getattr(changes, key) for key in FIELDS if key in changes.given}
        if row.builtin:
            for key, value in wanted.items():
                if key != "max_retention_days" and getattr(row, key) != value:
                    raise BuiltinDataType(
                        f"{name} is built in: only max_retention_days can change, not {key}", field=key
                    )
        if wanted.get("pattern") is not None:
            try:
                compile_pattern(str(wanted["pattern"]))
            except PatternError as err:
                raise InvalidInput(str(err), field="pattern") from None
        if (
            not created
            and "normalize" in wanted
            and wanted["normalize"] != row.normalize
            and repository.has_records(name)
        ):
            raise DataTypeInUse(
                f"records of {name} exist, so its normalize cannot change from {row.normalize}",
                field="normalize",
            )
        for key, value in wanted.items():
            setattr(row, key, value)
        row.updated_at = utcnow()
        if created:
            repository.add(row)
        action = "CreateDataType" if created else "UpdateDataType"
        self._auditor.record(
            session, [build_event(action, "allowed", ctx, actor, Subject(data_type=name, target_id=name))]
        )
        session.flush()
        session.refresh(row)
        on_commit(session, self.invalidate)
        return row, created
