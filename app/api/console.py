"""The console (/console): server-rendered pages for admins and auditors over the same services as
the JSON API. It never shows a value: no console path detokenizes.

A session cookie (Path=/console, HttpOnly, SameSite=Strict, Secure outside development) stands
for a server-side session; /v1 reads only the Authorization header, so the cookie never
authenticates an API call. Every state-changing form carries the session's CSRF token (the
sign-in form a double-submit token of its own).
"""

from __future__ import annotations

import json
import re
import secrets
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Annotated, Any, TypeVar, get_args
from urllib.parse import quote

from fastapi import APIRouter, Depends, Form, Query, Request
from fastapi import Path as FastApiPath
from fastapi.responses import HTMLResponse, RedirectResponse, Response, StreamingResponse
from fastapi.templating import Jinja2Templates
from pydantic import BaseModel, ValidationError
from sqlalchemy.orm import Session

from app.access import ADMINS, AUDIT_READERS, EQUALS
from app.api.deps import ContextDep, SessionDep, VaultDep
from app.api.errors import status_of
from app.api.grants import grant_request
from app.api.paging import decode_cursor, split_page
from app.api.schemas import (
    CUSTOMER_ID_PATTERN,
    DATA_TYPE_PATTERN,
    DataTypePut,
    GrantCreate,
    PrincipalCreate,
)
from app.container import Vault
from app.datatypes import Mask, Normalize
from app.db.models import Approval, Grant
from app.db.repositories import AuditFilter
from app.errors import InvalidInput, RateLimited, VaultError
from app.services.alerts import event_fields
from app.services.console import ConsoleLogin
from app.services.context import OPERATIONS, Caller, RequestContext, utcnow
from app.services.data_types import FIELDS, DataTypeChanges

ASSETS = Path(__file__).resolve().parent.parent / "console"
COOKIE = "piivault_console"
SIGN_IN_COOKIE = "piivault_console_signin"
# Scripts and styles from the vault only (no inline script or style), nothing framed, forms post
# only back to the vault.
CONSOLE_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
PAGE = 50

templates = Jinja2Templates(directory=ASSETS / "templates")
router = APIRouter(prefix="/console", include_in_schema=False)
T = TypeVar("T")


class SignInRequired(Exception):
    """No live console session: the page answers with the sign-in form."""


def _secure(request: Request) -> bool:
    vault: Vault = request.app.state.vault
    return vault.settings.environment != "development"


def _set_cookie(request: Request, response: Response, name: str, value: str, max_age: int | None) -> None:
    response.set_cookie(
        name,
        value,
        max_age=max_age,
        path="/console",
        secure=_secure(request),
        httponly=True,
        samesite="strict",
    )


def get_login(request: Request, vault: VaultDep, session: SessionDep) -> ConsoleLogin:
    login = vault.console.resume(session, request.cookies.get(COOKIE))
    if login is None:
        raise SignInRequired()
    return login


LoginDep = Annotated[ConsoleLogin, Depends(get_login)]
CsrfField = Annotated[str | None, Form(alias="csrf_token", max_length=128)]


@dataclass(frozen=True, slots=True)
class ConsoleForm:
    """What a state-changing form works with: the signed-in login, the request's transaction and
    context, and whether the form carried the session's CSRF token."""

    request: Request
    vault: Vault
    session: Session
    login: ConsoleLogin
    ctx: RequestContext
    csrf_ok: bool

    @property
    def caller(self) -> Caller:
        return self.login.caller

    def run(
        self, action: Callable[[], Response], *, roles: frozenset[Any] | None = None, page: str = ""
    ) -> Response:
        """The action, once the CSRF token and then the role (when given) pass; any refusal is the
        error page. The token first: a forged form is refused before the role check audits it."""

        def checked() -> Response:
            if not self.csrf_ok:
                raise InvalidInput(
                    "the form is stale or was not sent by this console; reload and retry", field="csrf_token"
                )
            if roles is not None:
                _require(self.vault, self.login, roles, page, self.ctx)
            return action()

        return _attempt(self.request, self.session, self.login, checked)

    def redirect(
        self, to: str, action: Callable[[], object], *, roles: frozenset[Any] | None = None, page: str = ""
    ) -> Response:
        """run, for an action whose page is another: done, the browser is sent to `to` (303)."""

        def then_redirect() -> Response:
            action()
            return RedirectResponse(to, status_code=303)

        return self.run(then_redirect, roles=roles, page=page)


# Async: no I/O of its own (the login and the session are dependencies of their own).
async def get_form(
    request: Request,
    vault: VaultDep,
    session: SessionDep,
    login: LoginDep,
    ctx: ContextDep,
    csrf: CsrfField = None,
) -> ConsoleForm:
    return ConsoleForm(request, vault, session, login, ctx, login.csrf_ok(csrf))


FormDep = Annotated[ConsoleForm, Depends(get_form)]


def _render(
    request: Request, name: str, login: ConsoleLogin | None, status_code: int = 200, **values: Any
) -> HTMLResponse:
    values.update(login=login, csrf_token=login.csrf_token if login else None, now=utcnow())
    return templates.TemplateResponse(request, name, values, status_code=status_code)


def _retry_after(response: Response, err: VaultError) -> Response:
    """Retry-After on a rate-limit refusal, as the API sends it."""
    if isinstance(err, RateLimited):
        response.headers["Retry-After"] = str(err.retry_after_s)
    return response


def _refused(request: Request, session: Session, login: ConsoleLogin | None, err: VaultError) -> HTMLResponse:
    """The error page: the same message and status the API gives (messages never hold a value).
    Whatever the failed action wrote is rolled back, as in the API."""
    session.rollback()
    page = _render(request, "error.html", login, status_of(err), error=err, status=status_of(err))
    _retry_after(page, err)
    return page


def _attempt(
    request: Request, session: Session, login: ConsoleLogin, action: Callable[[], T]
) -> T | HTMLResponse:
    try:
        return action()
    except VaultError as err:
        return _refused(request, session, login, err)


M = TypeVar("M", bound=BaseModel)


def _validated(model: type[M], **fields: Any) -> M:
    """A form as the API's own body model: the same rules, the first problem named as a field."""
    try:
        return model(**fields)
    except ValidationError as err:
        problem = err.errors()[0]
        field = ".".join(str(part) for part in problem.get("loc", ())) or None
        raise InvalidInput(
            f"{field}: {problem['msg']}" if field else str(problem["msg"]), field=field
        ) from None


def _require(
    vault: Vault, login: ConsoleLogin, roles: frozenset[Any], page: str, ctx: RequestContext
) -> None:
    vault.principals.require_role(login.caller, roles, f"Console:{page}", ctx)


def describe_grant(grant: Grant, grantee_name: str | None = None) -> str:
    """What a grant covers, in words: "Decrypt DriverLicense of any customer until 2027-01-31"."""
    context = dict(grant.constraint_context or {})
    exact = grant.constraint_kind == EQUALS
    data_type = context.get("dataType")
    customer = context.get("customerID")
    kinds = data_type if data_type else "any data type"
    whose = f"of customer {customer}" if customer else "of any customer"
    words = f"{' and '.join(grant.operations)} {kinds} {whose}"
    others = {k: v for k, v in context.items() if k not in ("dataType", "customerID")}
    if others:
        words += " where " + ", ".join(f"{k} is {v}" for k, v in sorted(others.items()))
    if exact and context:
        words += " (the context must be exactly this)"
    if grant.reveal != "plain" and "Decrypt" in grant.operations:
        words += " (masked values only)"
    words += f" until {grant.expires_at:%Y-%m-%d %H:%M} UTC" if grant.expires_at else ", with no expiry"
    return f"{grantee_name}: {words}" if grantee_name else words


# Sign-in and sign-out


@router.get("/sign-in", response_class=HTMLResponse)
def sign_in_form(request: Request, vault: VaultDep, session: SessionDep) -> Response:
    if vault.console.resume(session, request.cookies.get(COOKIE)) is not None:
        return RedirectResponse("/console", status_code=303)
    token = secrets.token_urlsafe(32)
    response = _render(request, "sign_in.html", None, sign_in_token=token)
    _set_cookie(request, response, SIGN_IN_COOKIE, token, max_age=600)
    return response


@router.post("/sign-in", response_class=HTMLResponse)
def sign_in(
    request: Request,
    vault: VaultDep,
    session: SessionDep,
    ctx: ContextDep,
    api_key: Annotated[str, Form(max_length=256)],
    sign_in_token: Annotated[str, Form(max_length=128)],
) -> Response:
    expected = request.cookies.get(SIGN_IN_COOKIE, "")
    if not expected or not secrets.compare_digest(expected.encode(), sign_in_token.encode()):
        err = InvalidInput("the sign-in form is stale; reload it and sign in again", field="csrf_token")
        return _refused(request, session, None, err)
    try:
        # The API's screen first: a source blocked for failed authentications is refused (429,
        # Retry-After) before the key is looked at, and its failures are counted as the API's.
        secret, _ = vault.console.sign_in(session, api_key.strip(), ctx)
    except VaultError as err:
        session.rollback()
        token = secrets.token_urlsafe(32)
        refused = _render(request, "sign_in.html", None, status_of(err), sign_in_token=token, error=err)
        _set_cookie(request, refused, SIGN_IN_COOKIE, token, max_age=600)
        _retry_after(refused, err)
        return refused
    signed_in = RedirectResponse("/console", status_code=303)
    _set_cookie(request, signed_in, COOKIE, secret, max_age=vault.settings.console_session_s)
    signed_in.delete_cookie(SIGN_IN_COOKIE, path="/console")
    return signed_in


@router.post("/sign-out")
def sign_out(form: FormDep) -> Response:
    request, login = form.request, form.login
    if not form.csrf_ok:
        return _refused(request, form.session, login, InvalidInput("the form is stale", field="csrf_token"))
    form.vault.console.sign_out(form.session, request.cookies.get(COOKIE, ""), login, form.ctx)
    response = RedirectResponse("/console/sign-in", status_code=303)
    response.delete_cookie(COOKIE, path="/console", secure=_secure(request), httponly=True, samesite="strict")
    return response


@router.get("")
def home(login: LoginDep) -> Response:
    return RedirectResponse("/console/approvals" if login.caller.role in ADMINS else "/console/audit", 303)


# Approvals (dual control): the one queue of four-eyes requests


def _approvals_page(
    request: Request,
    vault: Vault,
    session: Session,
    login: ConsoleLogin,
    status: str,
    cursor: str | None,
    **extra: Any,
) -> HTMLResponse:
    after = decode_cursor("a", cursor)
    rows = vault.approvals.list(session, status=status or None, after=after, limit=PAGE + 1)
    page, next_cursor = split_page("a", rows, PAGE)
    names = {p.id: p.name for p in vault.principals.list(session)}
    now = utcnow()
    shown = []
    for approval in page:
        covers = ""
        if approval.kind == "grant" and approval.target_id:
            grant = vault.grants.get(session, uuid.UUID(approval.target_id))
            covers = describe_grant(grant, names.get(grant.grantee_id, str(grant.grantee_id)))
        shown.append(
            {
                "approval": approval,
                "status": approval.status_at(now),
                "requester": names.get(approval.requested_by, str(approval.requested_by)),
                "covers": covers,
                "mine": approval.requested_by == login.caller.id,
            }
        )
    return _render(
        request,
        "approvals.html",
        login,
        approvals=shown,
        next_cursor=next_cursor,
        status=status,
        enabled=vault.approvals.enabled,
        **extra,
    )


@router.get("/approvals", response_class=HTMLResponse)
def approvals(
    request: Request,
    vault: VaultDep,
    session: SessionDep,
    login: LoginDep,
    ctx: ContextDep,
    status: Annotated[str, Query(max_length=16)] = "pending",
    cursor: Annotated[str | None, Query(max_length=64)] = None,
) -> Response:
    def show() -> HTMLResponse:
        _require(vault, login, ADMINS, "ListApprovals", ctx)
        return _approvals_page(request, vault, session, login, status, cursor)

    return _attempt(request, session, login, show)


@router.post("/approvals/{approval_id}/approve", response_class=HTMLResponse)
def approve(approval_id: uuid.UUID, form: FormDep) -> Response:
    """A second admin carries the request out, under the API's rules (never its requester)."""

    def decide() -> Response:
        approved = form.vault.approvals.approve(form.session, form.caller, approval_id, form.ctx)
        if approved.issued_key is not None:  # create_admin: the new admin's first key, shown once
            shown = {
                "principal": str(approved.approval.details.get("name", "")),
                "key_id": approved.issued_key.key_id,
                "api_key": approved.issued_key.secret_key,
            }
            return _approvals_page(
                form.request, form.vault, form.session, form.login, "pending", None, new_key=shown
            )
        return RedirectResponse("/console/approvals", status_code=303)

    return form.run(decide)


@router.post("/approvals/{approval_id}/reject", response_class=HTMLResponse)
def reject(approval_id: uuid.UUID, form: FormDep) -> Response:
    decide = partial(form.vault.approvals.reject, form.session, form.caller, approval_id, form.ctx)
    return form.redirect("/console/approvals", decide)


# Callers


def _callers_page(
    request: Request, vault: Vault, session: Session, login: ConsoleLogin, cursor: str | None, **extra: Any
) -> HTMLResponse:
    after = decode_cursor("p", cursor)
    rows = vault.principals.list(session, after=after, limit=PAGE + 1)
    page, next_cursor = split_page("p", rows, PAGE)
    callers = [(p, vault.principals.keys_of(session, p.id)) for p in page]
    return _render(request, "callers.html", login, callers=callers, next_cursor=next_cursor, **extra)


@router.get("/callers", response_class=HTMLResponse)
def callers(
    request: Request,
    vault: VaultDep,
    session: SessionDep,
    login: LoginDep,
    ctx: ContextDep,
    cursor: Annotated[str | None, Query(max_length=64)] = None,
) -> Response:
    def show() -> HTMLResponse:
        _require(vault, login, ADMINS, "ListPrincipals", ctx)
        return _callers_page(request, vault, session, login, cursor)

    return _attempt(request, session, login, show)


@router.post("/callers", response_class=HTMLResponse)
def create_caller(
    form: FormDep,
    name: Annotated[str, Form(max_length=128)],
    role: Annotated[str, Form(max_length=16)],
) -> Response:
    def create() -> HTMLResponse:
        body = _validated(PrincipalCreate, name=name.strip(), role=role)
        created = form.vault.principals.create(form.session, form.caller, body.name, body.role, form.ctx)
        if isinstance(created, Approval):
            notice = f"Creating admin {body.name} waits for a second admin: see Approvals."
            return _callers_page(form.request, form.vault, form.session, form.login, None, notice=notice)
        principal, issued = created
        shown = {"principal": principal.name, "key_id": issued.key_id, "api_key": issued.secret_key}
        return _callers_page(form.request, form.vault, form.session, form.login, None, new_key=shown)

    return form.run(create, roles=ADMINS, page="CreatePrincipal")


@router.post("/callers/{principal_id}/disable", response_class=HTMLResponse)
def disable_caller(principal_id: uuid.UUID, form: FormDep) -> Response:
    disable = partial(form.vault.principals.disable, form.session, form.caller, principal_id, form.ctx)
    return form.redirect("/console/callers", disable, roles=ADMINS, page="DisablePrincipal")


@router.post("/callers/{principal_id}/keys", response_class=HTMLResponse)
def issue_key(principal_id: uuid.UUID, form: FormDep) -> Response:
    def issue() -> HTMLResponse:
        issued = form.vault.principals.add_key(form.session, form.caller, principal_id, form.ctx)
        principal = form.vault.principals.get(form.session, principal_id)
        shown = {"principal": principal.name, "key_id": issued.key_id, "api_key": issued.secret_key}
        return _callers_page(form.request, form.vault, form.session, form.login, None, new_key=shown)

    return form.run(issue, roles=ADMINS, page="CreateApiKey")


@router.post("/callers/{principal_id}/keys/{key_id}/revoke", response_class=HTMLResponse)
def revoke_key(
    principal_id: uuid.UUID, key_id: Annotated[str, FastApiPath(max_length=64)], form: FormDep
) -> Response:
    def revoke() -> None:
        form.vault.principals.revoke_key(form.session, form.caller, principal_id, key_id, form.ctx)

    return form.redirect("/console/callers", revoke)


# Grants


@router.get("/grants", response_class=HTMLResponse)
def grants(
    request: Request,
    vault: VaultDep,
    session: SessionDep,
    login: LoginDep,
    ctx: ContextDep,
    grantee: Annotated[str | None, Query(max_length=128)] = None,
    operation: Annotated[str | None, Query(max_length=16)] = None,
    status: Annotated[str | None, Query(max_length=16)] = None,
    cursor: Annotated[str | None, Query(max_length=64)] = None,
) -> Response:
    def show() -> HTMLResponse:
        _require(vault, login, ADMINS, "ListGrants", ctx)
        active = {"active": True, "inactive": False}.get(status or "")
        after = decode_cursor("g", cursor)
        rows = vault.grants.list(session, grantee or None, active, after=after, limit=PAGE + 1)
        page, next_cursor = split_page("g", rows, PAGE)
        names = {p.id: p.name for p in vault.principals.list(session)}
        shown = [
            (g, names.get(g.grantee_id, str(g.grantee_id)), g.status_at(utcnow()), describe_grant(g))
            for g in page
            if not operation or operation in g.operations
        ]
        filters = {"grantee": grantee or "", "operation": operation or "", "status": status or ""}
        return _render(
            request,
            "grants.html",
            login,
            grants=shown,
            next_cursor=next_cursor,
            filters=filters,
            operations=OPERATIONS,
            services=[p for p in names.items()],
        )

    return _attempt(request, session, login, show)


@router.post("/grants", response_class=HTMLResponse)
def create_grant(
    form: FormDep,
    grantee: Annotated[str, Form(max_length=128)],
    operations: Annotated[list[str], Form()],
    match: Annotated[str, Form(max_length=16)] = "subset",
    customer_id: Annotated[str, Form(max_length=128)] = "",
    data_type: Annotated[str, Form(max_length=128)] = "",
    expires_at: Annotated[str, Form(max_length=40)] = "",
    name: Annotated[str, Form(max_length=128)] = "",
    reveal: Annotated[str, Form(max_length=16)] = "plain",
) -> Response:
    def create() -> None:
        context = {
            k: v.strip() for k, v in (("customerID", customer_id), ("dataType", data_type)) if v.strip()
        }
        kind = "encryption_context_equals" if match == "exact" else "encryption_context_subset"
        body = _validated(
            GrantCreate,
            grantee=grantee.strip(),
            operations=operations,
            constraints={kind: context} if context else None,
            expires_at=_form_time(expires_at),
            name=name.strip() or None,
            reveal=reveal,
        )
        form.vault.grants.create(form.session, form.caller, grant_request(body), form.ctx)

    return form.redirect("/console/grants", create, roles=ADMINS, page="CreateGrant")


def _form_time(text: str) -> datetime | None:
    """A datetime-local field (no offset: UTC, as the page says), or None when empty."""
    if not text.strip():
        return None
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise InvalidInput("expires_at is not a date and time", field="expires_at") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=utcnow().tzinfo)


@router.post("/grants/{grant_id}/revoke", response_class=HTMLResponse)
def revoke_grant(grant_id: uuid.UUID, form: FormDep) -> Response:
    revoke = partial(form.vault.grants.revoke, form.session, form.caller, grant_id, form.ctx)
    return form.redirect("/console/grants", revoke, roles=ADMINS, page="RevokeGrant")


# Audit


def _filter_time(text: str | None, field: str) -> datetime | None:
    if not text:
        return None
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise InvalidInput(f"{field} is not an RFC 3339 time", field=field) from None
    return moment if moment.tzinfo else moment.replace(tzinfo=utcnow().tzinfo)


@router.get("/audit", response_class=HTMLResponse)
def audit(
    request: Request,
    vault: VaultDep,
    session: SessionDep,
    login: LoginDep,
    ctx: ContextDep,
    principal: Annotated[str | None, Query(max_length=128)] = None,
    action: Annotated[str | None, Query(max_length=64)] = None,
    outcome: Annotated[str | None, Query(max_length=16)] = None,
    customer_id: Annotated[str | None, Query(max_length=128)] = None,
    token: Annotated[str | None, Query(max_length=128)] = None,
    since: Annotated[str | None, Query(max_length=40)] = None,
    until: Annotated[str | None, Query(max_length=40)] = None,
    cursor: Annotated[str | None, Query(max_length=20)] = None,
) -> Response:
    def show() -> HTMLResponse:
        _require(vault, login, AUDIT_READERS, "ListAuditEvents", ctx)
        principal_id, principal_name = None, None
        if principal:
            try:
                principal_id = uuid.UUID(principal)
            except ValueError:
                principal_name = principal
        if cursor is not None and not (cursor.isascii() and cursor.isdigit()):
            raise InvalidInput("cursor is not one this page made", field="cursor")
        where = AuditFilter(
            principal_id=principal_id,
            principal_name=principal_name,
            action=action or None,
            outcome=outcome or None,
            customer_id=customer_id or None,
            token=token or None,
            since=_filter_time(since, "since"),
            until=_filter_time(until, "until"),
            before_id=int(cursor) if cursor else None,
        )
        events = vault.auditor.search(session, where, PAGE + 1)
        page = events[:PAGE]
        next_cursor = str(page[-1].id) if len(events) > PAGE and page else None
        filters = {
            "principal": principal or "",
            "action": action or "",
            "outcome": outcome or "",
            "customer_id": customer_id or "",
            "token": token or "",
            "since": since or "",
            "until": until or "",
        }
        return _render(request, "audit.html", login, events=page, next_cursor=next_cursor, filters=filters)

    return _attempt(request, session, login, show)


@router.get("/audit/events/{event_id}", response_class=HTMLResponse)
def audit_event(
    request: Request,
    event_id: uuid.UUID,
    vault: VaultDep,
    session: SessionDep,
    login: LoginDep,
    ctx: ContextDep,
) -> Response:
    def show() -> HTMLResponse:
        _require(vault, login, AUDIT_READERS, "GetAuditEvent", ctx)
        event = vault.auditor.event(session, event_id)
        return _render(request, "event.html", login, fields=event_fields(event))

    return _attempt(request, session, login, show)


@router.post("/audit/verify", response_class=HTMLResponse)
def audit_verify(form: FormDep) -> Response:
    def verify() -> HTMLResponse:
        return _render(form.request, "verify.html", form.login, report=form.vault.auditor.verify())

    return form.run(verify, roles=AUDIT_READERS, page="VerifyAuditTrail")


@router.get("/audit/export")
def audit_export(
    request: Request,
    vault: VaultDep,
    session: SessionDep,
    login: LoginDep,
    ctx: ContextDep,
    since: Annotated[str | None, Query(max_length=40)] = None,
    until: Annotated[str | None, Query(max_length=40)] = None,
) -> Response:
    def export() -> Response:
        _require(vault, login, AUDIT_READERS, "ExportAuditTrail", ctx)
        start, end = _filter_time(since, "since"), _filter_time(until, "until")

        def lines() -> Iterator[bytes]:
            for event in vault.auditor.export(start, end):
                yield (json.dumps(event_fields(event), sort_keys=True) + "\n").encode()

        return StreamingResponse(
            lines(),
            media_type="application/x-ndjson",
            headers={"Content-Disposition": 'attachment; filename="pii-vault-audit.jsonl"'},
        )

    return _attempt(request, session, login, export)


# Keys


@router.get("/keys", response_class=HTMLResponse)
def keys(
    request: Request, vault: VaultDep, session: SessionDep, login: LoginDep, ctx: ContextDep
) -> Response:
    def show() -> HTMLResponse:
        _require(vault, login, AUDIT_READERS, "ListKeys", ctx)
        return _render(request, "keys.html", login, keys=vault.rotation.inventory(session))

    return _attempt(request, session, login, show)


# Data types


_TYPE_NAME = re.compile(DATA_TYPE_PATTERN)
_CUSTOMER_ID = re.compile(CUSTOMER_ID_PATTERN)


def _data_types_page(
    request: Request,
    vault: Vault,
    session: Session,
    login: ConsoleLogin,
    edit: str | None = None,
    **extra: Any,
) -> HTMLResponse:
    rows = vault.data_types.list(session)
    # The form filled with a custom type's rules, to change some and keep the rest.
    editing = next((row for row in rows if row.name == edit and not row.builtin), None)
    return _render(
        request,
        "data_types.html",
        login,
        data_types=rows,
        editing=editing,
        normalizers=get_args(Normalize),
        masks=get_args(Mask),
        **extra,
    )


@router.get("/data-types", response_class=HTMLResponse)
def data_types(
    request: Request,
    vault: VaultDep,
    session: SessionDep,
    login: LoginDep,
    edit: Annotated[str | None, Query(max_length=64)] = None,
) -> Response:
    # The registry holds no personal data: every console user reads it, as every API caller can.
    return _attempt(request, session, login, lambda: _data_types_page(request, vault, session, login, edit))


def _form_days(text: str) -> int | str | None:
    """Days from a form field: empty is None (no limit); anything else goes to the body model."""
    text = text.strip()
    return int(text) if text.isascii() and text.isdigit() and len(text) <= 9 else (text or None)


@router.post("/data-types", response_class=HTMLResponse)
def put_data_type(
    form: FormDep,
    name: Annotated[str, Form(max_length=64)],
    max_retention_days: Annotated[str, Form(max_length=16)] = "",
    pattern: Annotated[str | None, Form(max_length=1024)] = None,
    normalize: Annotated[str | None, Form(max_length=32)] = None,
    mask: Annotated[str | None, Form(max_length=32)] = None,
    lookup: Annotated[str | None, Form(max_length=8)] = None,
    retention_only: Annotated[str | None, Form(max_length=8)] = None,
) -> Response:
    """PUT /v1/data-types/{name} from a form: the whole type (register or change a custom one),
    or its retention alone (any type, built-ins too). The same body model and service."""

    def put() -> Response:
        type_name = name.strip()
        if not _TYPE_NAME.fullmatch(type_name):
            raise InvalidInput(f"name: must match {DATA_TYPE_PATTERN}", field="name")
        fields: dict[str, Any] = {"max_retention_days": _form_days(max_retention_days)}
        if not retention_only:
            fields.update(
                pattern=(pattern or "").strip() or None,
                normalize=normalize or "none",
                mask=mask or "none",
                lookup=lookup == "on",
            )
        body = _validated(DataTypePut, **fields)
        given = frozenset(body.model_fields_set) & frozenset(FIELDS)
        changes = DataTypeChanges(given=given, **body.model_dump())
        row, created = form.vault.data_types.put(form.session, form.caller, type_name, changes, form.ctx)
        notice = f"{'Registered' if created else 'Changed'} {row.name}."
        return _data_types_page(form.request, form.vault, form.session, form.login, notice=notice)

    return form.run(put, roles=ADMINS, page="PutDataType")


# Subject-access report


@router.get("/customers/report")
def find_customer_report(
    login: LoginDep, customer_id: Annotated[str, Query(max_length=128)] = ""
) -> Response:
    """The audit page's small form: to the report's own address (which checks the id)."""
    wanted = customer_id.strip()
    if not wanted:
        return RedirectResponse("/console/audit", 303)
    return RedirectResponse(f"/console/customers/{quote(wanted, safe='')}/report", 303)


@router.get("/customers/{customer_id}/report", response_class=HTMLResponse)
def customer_report(
    request: Request,
    customer_id: Annotated[str, FastApiPath(max_length=256)],
    vault: VaultDep,
    session: SessionDep,
    login: LoginDep,
    ctx: ContextDep,
) -> Response:
    """GET /v1/customers/{id}/report as a page: records and accesses, never a value; admins and
    auditors; audited (CustomerReport) by the same service."""

    def show() -> HTMLResponse:
        _require(vault, login, AUDIT_READERS, "CustomerReport", ctx)
        if not _CUSTOMER_ID.fullmatch(customer_id):
            raise InvalidInput(f"customer_id: must match {CUSTOMER_ID_PATTERN}", field="customer_id")
        report = vault.reports.customer_report(session, login.caller, customer_id, ctx)
        return _render(request, "report.html", login, report=report)

    return _attempt(request, session, login, show)
