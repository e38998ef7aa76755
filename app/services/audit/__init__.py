"""Audit events: every allow and every deny, tamper-evident. Never a value, a data key or an API key.

Allowed operations write their event in the operation's own transaction (or statement), so an
operation that committed always has its event and one whose event cannot be written does not
happen. Denials are written on their own, since the request itself is refused.

Tamper evidence, in two steps. As it is written, each event gets an HMAC over every field (no lock,
so writers never queue behind each other). Moments later the sealer (one at a time, cluster-wide)
chains committed events: each gets a link (the next sequence number, the previous link's MAC and
a chain MAC binding the two to the event's MAC) in a table of its own, so an event row is written
once and never updated. The HMAC key is wrapped by the key provider (KMS), so someone with only the
database can neither forge an event nor mend the chain after changing, deleting, inserting or
reordering events. The one gap: an event deleted in the moments before it is sealed leaves no trace.

events: the format and MACs (pure); keyring: the HMAC keys; writer: Auditor; sealer; verify.
"""

from app.services.audit.events import (
    GENESIS_MAC,
    Outcome,
    Subject,
    build_event,
    chain_mac,
    event_mac,
    new_event_id,
)
from app.services.audit.keyring import AUDIT_KEY_CONTEXT, AuditKeyring
from app.services.audit.verify import VerifyReport
from app.services.audit.writer import Auditor

__all__ = [
    "AUDIT_KEY_CONTEXT",
    "GENESIS_MAC",
    "AuditKeyring",
    "Auditor",
    "Outcome",
    "Subject",
    "VerifyReport",
    "build_event",
    "chain_mac",
    "event_mac",
    "new_event_id",
]
