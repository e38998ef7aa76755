"""All SQL lives here, one repository per aggregate. Repositories never commit: the ORM ones
work in the caller's session (Database.transaction commits it); the data path's run one statement
per pooled autocommit connection, each committing on its own; the sealer's run in the
transaction Database.raw_transaction holds."""

from app.db.repositories.audit import AuditFilter, AuditRepository
from app.db.repositories.data_path import (
    DataPathRepository,
    EventRow,
    GrantTerms,
    KeyCredentials,
    RecordRow,
)
from app.db.repositories.data_types import DataTypeRepository, load_registry
from app.db.repositories.grants import GrantRepository
from app.db.repositories.keys import KeyRepository, Rewrapped, WrappedKey
from app.db.repositories.principals import ApiKeyRepository, PrincipalRepository
from app.db.repositories.seal import SealRepository

__all__ = [
    "ApiKeyRepository",
    "AuditFilter",
    "AuditRepository",
    "DataPathRepository",
    "DataTypeRepository",
    "EventRow",
    "GrantRepository",
    "GrantTerms",
    "KeyCredentials",
    "KeyRepository",
    "PrincipalRepository",
    "RecordRow",
    "Rewrapped",
    "SealRepository",
    "WrappedKey",
    "load_registry",
]
