"""All SQL lives here, one repository per aggregate. Repositories never commit: the ORM ones
work in the caller's session (Database.transaction commits it); the data path's run one statement
per pooled autocommit connection, each committing on its own (a detokenize's release, a re-read
of its grants and its events, is one transaction of its own); the sealer's run in the
transaction Database.raw_transaction holds."""

from app.db.repositories.approvals import ApprovalRepository
from app.db.repositories.audit import AuditFilter, AuditRepository
from app.db.repositories.console import ConsoleSessionRepository, LiveSession
from app.db.repositories.data_path import (
    DataPathRepository,
    EventRow,
    GrantTerms,
    KeyCredentials,
    RecordRow,
)
from app.db.repositories.data_types import DataTypeRepository, load_registry
from app.db.repositories.erasure import ErasedRow, ErasureRepository, ReportRecord, ReportRepository
from app.db.repositories.grants import GrantMirrorRepository, GrantRepository
from app.db.repositories.keys import KeyRepository, Rewrapped, WrappedKey
from app.db.repositories.principals import ApiKeyRepository, PrincipalRepository
from app.db.repositories.seal import SealRepository

__all__ = [
    "ApiKeyRepository",
    "ApprovalRepository",
    "AuditFilter",
    "AuditRepository",
    "ConsoleSessionRepository",
    "DataPathRepository",
    "DataTypeRepository",
    "ErasedRow",
    "ErasureRepository",
    "EventRow",
    "GrantMirrorRepository",
    "GrantRepository",
    "GrantTerms",
    "KeyCredentials",
    "KeyRepository",
    "LiveSession",
    "PrincipalRepository",
    "RecordRow",
    "ReportRecord",
    "ReportRepository",
    "Rewrapped",
    "SealRepository",
    "WrappedKey",
    "load_registry",
]
