"""The data-type registry (read by any authenticated caller, changed by admins) and the limits."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Response, status

from app.api.deps import AdminDep, CallerDep, ContextDep, SessionDep, VaultDep
from app.api.openapi import AUTHENTICATED, documented
from app.api.schemas import DATA_TYPE_PATTERN, DataTypeList, DataTypeOut, DataTypePut, LimitsOut
from app.db.models import DataType
from app.services.data_types import DataTypeChanges

router = APIRouter(prefix="/v1/data-types", tags=["data types"])
limits_router = APIRouter(prefix="/v1/limits", tags=["limits"])

TypeName = Annotated[str, Path(pattern=DATA_TYPE_PATTERN, max_length=64, examples=["DriverLicense"])]


def data_type_out(row: DataType) -> DataTypeOut:
    return DataTypeOut.model_validate(row, from_attributes=True)


# Reading the registry needs no role: it holds no personal data, and a service needs a type's
# pattern and mask to prepare its values and read its results.


@router.get(
    "", name="ListDataTypes", **documented("listDataTypes", "List the data types", errors=AUTHENTICATED)
)
def list_data_types(vault: VaultDep, session: SessionDep, caller: CallerDep) -> DataTypeList:
    """Every registered data type, by name: the built-ins and the custom ones."""
    return DataTypeList(data_types=[data_type_out(row) for row in vault.data_types.list(session)])


@router.get(
    "/{name}",
    name="GetDataType",
    **documented("getDataType", "Get a data type", errors=(*AUTHENTICATED, 404)),
)
def get_data_type(name: TypeName, vault: VaultDep, session: SessionDep, caller: CallerDep) -> DataTypeOut:
    return data_type_out(vault.data_types.get(session, name))


_PUT = documented(
    "putDataType",
    "Register or change a data type",
    errors=(*AUTHENTICATED, 409),
    descriptions={409: "a built-in's rules, a name that differs only in case, or a normaliser in use"},
)
_PUT["responses"][201] = {"model": DataTypeOut, "description": "registered (a new type)"}


@router.put("/{name}", name="PutDataType", **_PUT)
def put_data_type(
    name: TypeName,
    body: DataTypePut,
    vault: VaultDep,
    session: SessionDep,
    admin: AdminDep,
    ctx: ContextDep,
    response: Response,
) -> DataTypeOut:
    """Register a custom data type (201) or change one (200). Fields left out keep their value.
    A built-in type changes only in max_retention_days; a type's normalize cannot change once
    records of it exist."""
    changes = DataTypeChanges(given=frozenset(body.model_fields_set), **body.model_dump())
    row, created = vault.data_types.put(session, admin, name, changes, ctx)
    if created:
        response.status_code = status.HTTP_201_CREATED
    return data_type_out(row)


@limits_router.get(
    "", name="GetLimits", **documented("getLimits", "What a request may hold", errors=AUTHENTICATED)
)
def get_limits(vault: VaultDep, caller: CallerDep) -> LimitsOut:
    """What a batch and a value may hold here: a client splits its batches by max_batch_items."""
    return LimitsOut(
        max_batch_items=vault.settings.max_batch_items, max_value_bytes=vault.settings.max_value_bytes
    )
