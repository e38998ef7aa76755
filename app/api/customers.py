"""A customer's records as a whole: erasure (GDPR Art. 17) and the subject-access report (Art. 15)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path

from app.api.deps import AuditorDep, ContextDep, DataCallDep, SessionDep, VaultDep
from app.api.openapi import AUTHENTICATED, documented
from app.api.schemas import CUSTOMER_ID_PATTERN, CustomerEraseRequest, CustomerErasureOut, CustomerReportOut

router = APIRouter(prefix="/v1/customers", tags=["customers"])

CustomerPath = Annotated[str, Path(pattern=CUSTOMER_ID_PATTERN, max_length=128, examples=["12345"])]


@router.post(
    "/{customer_id}/erase",
    name="EraseCustomer",
    **documented(
        "eraseCustomer",
        "Erase a customer's records",
        errors=(*AUTHENTICATED, 400, 413),
        descriptions={503: "Stopped part-way (what was erased stays erased): retry to finish."},
    ),
)
async def erase_customer(
    customer_id: CustomerPath, body: CustomerEraseRequest, vault: VaultDep, call: DataCallDep
) -> CustomerErasureOut:
    """Erase the customer's records (of `data_types`, if given) that the caller's Erase grants
    cover, in batches. A 503 means it stopped part-way: what was erased stays erased, and the same
    request again finishes the job."""
    result = await vault.erasure.erase_customer(
        presented=call.presented,
        customer_id=customer_id,
        data_types=body.data_types,
        reason=body.reason,
        ctx=call.ctx,
    )
    return CustomerErasureOut(erased=result.erased, tokens=result.tokens)


@router.get(
    "/{customer_id}/report",
    name="CustomerReport",
    **documented("getCustomerReport", "A customer's subject-access report", errors=AUTHENTICATED),
)
def customer_report(
    customer_id: CustomerPath, vault: VaultDep, session: SessionDep, auditor: AuditorDep, ctx: ContextDep
) -> CustomerReportOut:
    """The subject-access report (GDPR Art. 15), for admins and auditors: every record of the
    customer (tombstones too) and every access to them from the audit trail. Never a value."""
    report = vault.reports.customer_report(session, auditor, customer_id, ctx)
    return CustomerReportOut.model_validate(report, from_attributes=True)
