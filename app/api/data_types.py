"""The data-type registry (read by any authenticated caller, changed by admins) and the limits."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Response, status

from app.api.deps import AdminDep, CallerDep, ContextDep, SessionDep, VaultDep
from app.api.schemas import (
    DATA_TYPE_PATTERN,
    DataTypeList,
    DataTypeOut,
    DataTypePut,
    ErrorResponse,
    LimitsOut,
)
from app.db.models import DataType
from app.services.data_types import DataTypeChanges

router = APIRouter(
    prefix="/v1/data-types",
    tags=["data types"],
    responses={401: {"model": ErrorResponse}},
)
limits_router = APIRouter(prefix="/v1/limits", tags=["limits"], responses={401: {"model": ErrorResponse}})

TypeName = Annotated[str, Path(pattern=DATA_TYPE_PATTERN, max_length=64, examples=["DriverLicense"])]


def data_type_out(row: DataType) -> DataTypeOut:
    return DataTypeOut.model_validate(row, from_attributes=True)


# Reading the registry needs no role: it holds no personal data, and a service needs a type's
# pattern and mask to prepare its values and read its results.


@router.get("", name="ListDataTypes")
def list_data_types(vault: VaultDep, session: SessionDep, caller: CallerDep) -> DataTypeList:
    """Every registered data type, by name: the built-ins and the custom ones."""
    return DataTypeList(data_types=[data_type_out(row) for row in vault.data_types.list(session)])


@router.get("/{name}", name="GetDataType", responses={404: {"model": ErrorResponse}})
def get_data_type(name: TypeName, vault: VaultDep, session: SessionDep, caller: CallerDep) -> DataTypeOut:
    return data_type_out(vault.data_types.get(session, name))


@router.put(
    "/{name}",
    name="PutDataType",
    responses={
        201: {"model": DataTypeOut, "description": "registered"},
        403: {"model": ErrorResponse},
        409: {"model": ErrorResponse, "description": "a built-in's rules, or a normaliser in use"},
        422: {"model": ErrorResponse},
    },
)
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


@limits_router.get("", name="GetLimits")
def get_limits(vault: VaultDep, caller: CallerDep) -> LimitsOut:
    """What a batch and a value may hold here: a client splits its batches by max_batch_items."""
    return LimitsOut(
        max_batch_items=vault.settings.max_batch_items, max_value_bytes=vault.settings.max_value_bytes
    )
