"""Who may do what, from the README's API table, checked against the rules in app.access; a few rows
through the real app to show the services apply them; and "active grant" in SQL and in Python."""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import psycopg
import pytest
from fastapi.testclient import TestClient
from psycopg.types.json import Jsonb
from sqlalchemy import create_engine, select
from sqlalchemy.orm import Session

from app.access import (
    GrantSet,
    Role,
    grant_active,
    key_issue_refusal,
    may_decide_approvals,
    may_disable,
    may_issue_key,
    may_manage_grants,
    may_manage_principals,
    may_read_audit,
    may_read_customer_report,
    may_receive_grant,
    may_retire_grant,
    may_revoke_key,
)
from app.api import approvals, audit, customers, grants, keys, principals, tokens
from app.db.models import Grant
from app.db.repositories import GrantRepository, GrantTerms
from app.db.session import normalise_url
from tests.conftest import Actors, assert_error, bearer, create_principal

ADMIN, SERVICE, AUDITOR = Role.ADMIN, Role.SERVICE, Role.AUDITOR
NOW = datetime(2030, 6, 1, 12, 0, tzinfo=UTC)

# Who the actor acts on (or, for data, what grant it holds).
Relation = Literal[
    "-",  # a role gate: only the actor's role matters
    "self",
    "other",
    "other holding grants",
    "active grant",
    "expired grant",
    "revoked grant",
    "pending grant",
    "no grant",
]


@dataclass(frozen=True, slots=True)
class Party:
    id: uuid.UUID
    role: str


@dataclass(frozen=True, slots=True)
class Case:
    action: str  # the route's name (as in the audit trail), or ReceiveGrant
    actor: Role
    relation: Relation
    target: Role | None  # the other principal's role, where there is one
    expected: str  # "allowed", "denied", or the audit reason of a refused key issuance

    def __str__(self) -> str:
        target = f" {self.target}" if self.target else ""
        return f"{self.action}: {self.actor} -> {self.relation}{target}"


def gate(actions: tuple[str, ...], allowed: frozenset[Role]) -> list[Case]:
    """Rows for role-gated actions: each role, allowed or not."""
    return [
        Case(action, role, "-", None, "allowed" if role in allowed else "denied")
        for action in actions
        for role in Role
    ]


ADMIN_ONLY = frozenset({ADMIN})
EVERY_ROLE = tuple(Role)

# The README's API table, "who" column, one row per (action, actor, relation).
TABLE: list[Case] = [
    # POST /v1/principals, GET /v1/principals(/{id}): admin
    *gate(("CreatePrincipal", "ListPrincipals", "GetPrincipal"), ADMIN_ONLY),
    # GET /v1/principals/me: anyone, about itself
    *[Case("GetOwnPrincipal", role, "self", None, "allowed") for role in EVERY_ROLE],
    # PUT /v1/principals/{id}/rate-limit: admin
    *gate(("SetRateLimit",), ADMIN_ONLY),
    # POST /v1/principals/{id}/keys: the principal itself; an admin only for principals that hold
    # no grants and are not admins
    *[Case("CreateApiKey", role, "self", None, "allowed") for role in EVERY_ROLE],
    Case("CreateApiKey", ADMIN, "other", SERVICE, "allowed"),
    Case("CreateApiKey", ADMIN, "other", AUDITOR, "allowed"),
    Case("CreateApiKey", ADMIN, "other holding grants", SERVICE, "grantee_holds_grants"),
    Case("CreateApiKey", ADMIN, "other", ADMIN, "other_admin"),
    Case("CreateApiKey", SERVICE, "other", SERVICE, "role_required"),
    Case("CreateApiKey", SERVICE, "other holding grants", SERVICE, "role_required"),
    Case("CreateApiKey", AUDITOR, "other", SERVICE, "role_required"),
    Case("CreateApiKey", SERVICE, "other", ADMIN, "role_required"),
    # DELETE /v1/principals/{id}/keys/{key_id}: admin, or the principal itself
    *[Case("RevokeApiKey", role, "self", None, "allowed") for role in EVERY_ROLE],
    *[Case("RevokeApiKey", ADMIN, "other", target, "allowed") for target in EVERY_ROLE],
    *[Case("RevokeApiKey", SERVICE, "other", target, "denied") for target in EVERY_ROLE],
    *[Case("RevokeApiKey", AUDITOR, "other", target, "denied") for target in EVERY_ROLE],
    # DELETE /v1/principals/{id}: admin (never itself)
    *[Case("DisablePrincipal", ADMIN, "other", target, "allowed") for target in EVERY_ROLE],
    Case("DisablePrincipal", ADMIN, "self", None, "denied"),
    Case("DisablePrincipal", SERVICE, "other", SERVICE, "denied"),
    Case("DisablePrincipal", AUDITOR, "other", SERVICE, "denied"),
    Case("DisablePrincipal", SERVICE, "self", None, "denied"),
    # POST, GET, DELETE /v1/grants: admin
    *gate(("CreateGrant", "ListGrants", "GetGrant", "RevokeGrant"), ADMIN_ONLY),
    # The four-eyes queue: admin (which admin may approve what: tests/test_dual_control.py)
    *gate(
        ("ListApprovals", "GetApproval", "ApproveRequest", "RejectRequest", "ApproveGrant", "RejectGrant"),
        ADMIN_ONLY,
    ),
    # Grants go only to service principals (whoever the admin is).
    Case("ReceiveGrant", ADMIN, "other", SERVICE, "allowed"),
    Case("ReceiveGrant", ADMIN, "other", ADMIN, "denied"),
    Case("ReceiveGrant", ADMIN, "other", AUDITOR, "denied"),
    Case("ReceiveGrant", ADMIN, "self", None, "denied"),
    # POST /v1/grants/{id}/retire: the grantee
    Case("RetireGrant", SERVICE, "self", None, "allowed"),
    Case("RetireGrant", SERVICE, "other", SERVICE, "denied"),
    Case("RetireGrant", ADMIN, "other", SERVICE, "denied"),
    Case("RetireGrant", AUDITOR, "other", SERVICE, "denied"),
    # POST /v1/tokens(/batch): Encrypt grant; GET /v1/tokens/{token}, POST /v1/tokens/detokenize:
    # Decrypt grant; POST /v1/tokens/lookup: Lookup grant. The data path reads only the grants
    # naming its operation.
    *[
        Case(action, SERVICE, relation, None, "allowed" if relation == "active grant" else "denied")
        for action in (
            "Tokenize",
            "TokenizeBatch",
            "Detokenize",
            "DetokenizeBatch",
            "Lookup",
            "EraseToken",
            "EraseCustomer",
        )
        for relation in ("active grant", "expired grant", "revoked grant", "pending grant", "no grant")
    ],
    *[
        Case(action, role, "no grant", None, "denied")
        for action in ("Tokenize", "Detokenize", "Lookup", "EraseToken", "EraseCustomer")
        for role in (ADMIN, AUDITOR)
    ],
    # GET /v1/customers/{id}/report: admin, auditor (the audit-read rule)
    *gate(("CustomerReport",), frozenset({ADMIN, AUDITOR})),
    # GET /v1/audit/events, GET /v1/audit/verify: admin, auditor
    *gate(("ListAuditEvents", "VerifyAuditTrail"), frozenset({ADMIN, AUDITOR})),
    # GET /v1/keys: admin, auditor
    *gate(("ListKeys",), frozenset({ADMIN, AUDITOR})),
]


def grant_terms(relation: Relation) -> list[GrantTerms]:
    dead = NOW - timedelta(hours=1)
    grant_of = {
        "active grant": [GrantTerms(uuid.uuid4(), None, None, None, None, None)],
        "expired grant": [GrantTerms(uuid.uuid4(), None, None, dead, None, None)],
        "revoked grant": [GrantTerms(uuid.uuid4(), None, None, None, dead, None)],
        "pending grant": [GrantTerms(uuid.uuid4(), None, None, None, None, None, awaiting_approval=True)],
        "no grant": [],
    }
    return grant_of[relation]


def outcome(case: Case) -> str:
    """What the rules in app.access say about one row."""
    actor = Party(uuid.uuid4(), case.actor)
    target = actor if case.relation == "self" else Party(uuid.uuid4(), case.target or SERVICE)
    holds_grants = case.relation == "other holding grants"
    verdict: bool
    match case.action:
        case "CreatePrincipal" | "ListPrincipals" | "GetPrincipal" | "SetRateLimit":
            verdict = may_manage_principals(actor.role)
        case "GetOwnPrincipal":
            verdict = case.relation == "self"
        case (
            "ListApprovals"
            | "GetApproval"
            | "ApproveRequest"
            | "RejectRequest"
            | "ApproveGrant"
            | "RejectGrant"
        ):
            verdict = may_decide_approvals(actor.role)
        case "CreateApiKey":
            reason = key_issue_refusal(actor, target, holds_grants)
            assert may_issue_key(actor, target, holds_grants) is (reason is None)
            return reason or "allowed"
        case "RevokeApiKey":
            verdict = may_revoke_key(actor, target.id)
        case "DisablePrincipal":
            verdict = may_disable(actor, target.id)
        case "CreateGrant" | "ListGrants" | "GetGrant" | "RevokeGrant":
            verdict = may_manage_grants(actor.role)
        case "ReceiveGrant":
            verdict = may_receive_grant(target.role)
        case "RetireGrant":
            verdict = may_retire_grant(actor, target.id)
        case (
            "Tokenize"
            | "TokenizeBatch"
            | "Detokenize"
            | "DetokenizeBatch"
            | "Lookup"
            | "EraseToken"
            | "EraseCustomer"
        ):
            context = {"customerID": "12345", "dataType": "DriverLicense"}
            verdict = GrantSet(grant_terms(case.relation), NOW).decide(context).allowed
        case "ListAuditEvents" | "VerifyAuditTrail" | "ListKeys":
            verdict = may_read_audit(actor.role)
        case "CustomerReport":
            verdict = may_read_customer_report(actor.role)
        case _:
            raise AssertionError(f"no rule for {case.action}")
    return "allowed" if verdict else "denied"


@pytest.mark.parametrize("case", TABLE, ids=str)
def test_who_may_do_what(case: Case) -> None:
    assert outcome(case) == case.expected


def test_the_table_covers_every_authenticated_route() -> None:
    names = {
        route.name
        for router in (
            principals.router,
            grants.router,
            approvals.router,
            audit.router,
            keys.router,
            tokens.router,
            customers.router,
        )
        for route in router.routes
        if hasattr(route, "name")
    }
    assert names == {case.action for case in TABLE} - {"ReceiveGrant"}


def test_roles_are_the_values_the_api_and_database_know() -> None:
    assert [str(role) for role in Role] == ["admin", "service", "auditor"]
    assert "admin" in frozenset({ADMIN}) and Role("auditor") is AUDITOR


def test_the_database_accepts_exactly_the_roles(db: psycopg.Connection[Any]) -> None:
    for role in Role:
        db.execute("INSERT INTO principals (id, name, role) VALUES (%s, %s, %s)", (uuid.uuid4(), role, role))
    with pytest.raises(psycopg.errors.CheckViolation):
        db.execute("INSERT INTO principals (id, name, role) VALUES (%s, 'root', 'root')", (uuid.uuid4(),))


# Through the app: the same rows, answered by the services that use the rules.


@dataclass(frozen=True, slots=True)
class Scene:
    admin: str
    admin_id: str
    auditor: str
    auditor_id: str
    kyc_key_id: str
    kyc_grant_id: str


@pytest.fixture
def scene(client: TestClient, actors: Actors) -> Scene:
    admin = bearer(actors.admin)
    listed = client.get("/v1/principals", headers=admin).json()["principals"]
    admin_id = next(p["id"] for p in listed if p["name"] == "root-admin")
    auditor = create_principal(client, actors.admin, "audit-team", role="auditor")
    kyc_grants = client.get("/v1/grants", params={"grantee": "kyc-app"}, headers=admin).json()["grants"]
    return Scene(
        actors.admin,
        admin_id,
        auditor["api_key"],
        auditor["id"],
        actors.kyc.split("_")[1],
        kyc_grants[0]["id"],
    )


@dataclass(frozen=True, slots=True)
class HttpRow:
    case: Case
    method: str
    path: str  # formatted with the Scene's fields and the Actors' ids
    caller: str  # "admin", "auditor", "kyc" or "onboarding"
    status: int
    code: str | None = None  # the error code, for a refusal
    body: dict[str, Any] | None = None


# In order: the last rows change the scene.
HTTP_ROWS = [
    HttpRow(
        Case("ListPrincipals", AUDITOR, "-", None, "denied"),
        "GET",
        "/v1/principals",
        "auditor",
        403,
        "forbidden",
    ),
    HttpRow(
        Case("ListGrants", AUDITOR, "-", None, "denied"), "GET", "/v1/grants", "auditor", 403, "forbidden"
    ),
    HttpRow(
        Case("ListAuditEvents", AUDITOR, "-", None, "allowed"), "GET", "/v1/audit/events", "auditor", 200
    ),
    HttpRow(
        Case("VerifyAuditTrail", SERVICE, "-", None, "denied"),
        "GET",
        "/v1/audit/verify",
        "kyc",
        403,
        "forbidden",
    ),
    HttpRow(Case("VerifyAuditTrail", ADMIN, "-", None, "allowed"), "GET", "/v1/audit/verify", "admin", 200),
    HttpRow(
        Case("Lookup", SERVICE, "no grant", None, "denied"),
        "POST",
        "/v1/tokens/lookup",
        "kyc",
        403,
        "grant_required",
        {"data_type": "DriverLicense", "value": "D1234-56789-01234"},
    ),
    HttpRow(
        Case("ReceiveGrant", ADMIN, "other", AUDITOR, "denied"),
        "POST",
        "/v1/grants",
        "admin",
        422,
        "invalid_input",
        {"grantee": "audit-team", "operations": ["Decrypt"]},
    ),
    HttpRow(
        Case("CreateApiKey", ADMIN, "other", AUDITOR, "allowed"),
        "POST",
        "/v1/principals/{auditor_id}/keys",
        "admin",
        201,
    ),
    HttpRow(
        Case("CreateApiKey", AUDITOR, "other", SERVICE, "role_required"),
        "POST",
        "/v1/principals/{onboarding_id}/keys",
        "auditor",
        403,
        "forbidden",
    ),
    HttpRow(
        Case("CreateApiKey", AUDITOR, "self", None, "allowed"),
        "POST",
        "/v1/principals/{auditor_id}/keys",
        "auditor",
        201,
    ),
    HttpRow(
        Case("RevokeApiKey", AUDITOR, "other", SERVICE, "denied"),
        "DELETE",
        "/v1/principals/{kyc_id}/keys/{kyc_key_id}",
        "auditor",
        403,
        "forbidden",
    ),
    HttpRow(
        Case("DisablePrincipal", ADMIN, "self", None, "denied"),
        "DELETE",
        "/v1/principals/{admin_id}",
        "admin",
        403,
        "forbidden",
    ),
    HttpRow(
        Case("RetireGrant", ADMIN, "other", SERVICE, "denied"),
        "POST",
        "/v1/grants/{kyc_grant_id}/retire",
        "admin",
        404,
        "not_found",
    ),
    HttpRow(
        Case("RetireGrant", SERVICE, "self", None, "allowed"),
        "POST",
        "/v1/grants/{kyc_grant_id}/retire",
        "kyc",
        200,
    ),
    HttpRow(
        Case("RevokeApiKey", SERVICE, "self", None, "allowed"),
        "DELETE",
        "/v1/principals/{kyc_id}/keys/{kyc_key_id}",
        "kyc",
        200,
    ),
]


def test_the_app_answers_as_the_rules_say(client: TestClient, actors: Actors, scene: Scene) -> None:
    keys = {
        "admin": scene.admin,
        "auditor": scene.auditor,
        "kyc": actors.kyc,
        "onboarding": actors.onboarding,
    }
    ids = {"kyc_id": actors.kyc_id, "onboarding_id": actors.onboarding_id}
    for row in HTTP_ROWS:
        assert outcome(row.case) == row.case.expected, row.case
        allowed = row.case.expected == "allowed"
        assert allowed is (row.status < 400), row.case
        path = row.path.format(**ids, **dataclasses.asdict(scene))
        response = client.request(row.method, path, headers=bearer(keys[row.caller]), json=row.body)
        if allowed:
            assert response.status_code == row.status, (row.case, response.text)
        else:
            assert row.code is not None
            assert_error(response, row.status, row.code)


# "Active grant": the SQL expression and the Python predicate select the same grants.

# name: (expires_at, revoked_at, retired_at)
GRANT_STATES: dict[str, tuple[datetime | None, datetime | None, datetime | None]] = {
    "no expiry": (None, None, None),
    "expires a microsecond later": (NOW + timedelta(microseconds=1), None, None),
    "expires next year": (NOW + timedelta(days=365), None, None),
    "expires exactly now": (NOW, None, None),
    "expired": (NOW - timedelta(days=1), None, None),
    "revoked": (None, NOW - timedelta(hours=1), None),
    "revoked, stamped after now": (NOW + timedelta(days=365), NOW + timedelta(hours=1), None),
    "retired": (NOW + timedelta(days=1), None, NOW - timedelta(hours=1)),
    "revoked and expired": (NOW - timedelta(days=1), NOW - timedelta(hours=1), None),
    "revoked and retired": (None, NOW - timedelta(hours=2), NOW - timedelta(hours=1)),
}
ACTIVE_AT_NOW = {"no expiry", "expires a microsecond later", "expires next year"}


@pytest.fixture
def session(database_url: str, db: psycopg.Connection[Any]) -> Iterator[Session]:
    engine = create_engine(normalise_url(database_url))
    with Session(engine) as session:
        yield session
    engine.dispose()


def test_active_grant_is_the_same_in_sql_and_in_python(db: psycopg.Connection[Any], session: Session) -> None:
    grantee = uuid.uuid4()
    db.execute("INSERT INTO principals (id, name, role) VALUES (%s, 'app', 'service')", (grantee,))
    for name, (expires_at, revoked_at, retired_at) in GRANT_STATES.items():
        db.execute(
            "INSERT INTO grants (id, name, grantee_id, operations, constraint_context, expires_at,"
            " revoked_at, retired_at, kms_grant_id) VALUES (%s, %s, %s, '{Decrypt}', %s, %s, %s, %s, %s)",
            (uuid.uuid4(), name, grantee, Jsonb({}), expires_at, revoked_at, retired_at, f"kms-{name}"),
        )

    selected = set(session.scalars(select(Grant.name).where(Grant.active_at(NOW))))
    rejected = set(session.scalars(select(Grant.name).where(~Grant.active_at(NOW))))
    loaded = session.scalars(select(Grant)).all()
    accepted = {grant.name for grant in loaded if grant.active_at(NOW)}
    rows = db.execute("SELECT id, name, expires_at, revoked_at, retired_at FROM grants").fetchall()
    accepted_terms = {
        name for id_, name, *times in rows if grant_active(GrantTerms(id_, None, None, *times), NOW)
    }

    assert selected == accepted == accepted_terms == ACTIVE_AT_NOW
    assert rejected == set(GRANT_STATES) - ACTIVE_AT_NOW
    repository = GrantRepository(session)
    assert {g.name for g in repository.list(grantee_id=grantee, active=True, now=NOW)} == ACTIVE_AT_NOW
    assert {g.name for g in repository.list(grantee_id=grantee, active=False, now=NOW)} == rejected
    assert repository.any_active_for(grantee, NOW)
    assert not repository.any_active_for(uuid.uuid4(), NOW)
    # Every grant here is mirrored: the sweep revokes the mirrors of exactly the inactive ones.
    assert {g.name for g in repository.mirrors_to_revoke(NOW, 100)} == rejected
