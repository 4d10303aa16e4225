"""The ledger: what happened to every mail and every document, kept in Redis.

One :class:`Ledger`, three jobs, one module each:

* :mod:`.records`: mail and document records and their slots (what Alloy holds for a
  document). A mail id lives in exactly one ``mailingest:state:<state>`` set; the
  states, and which may go to which, are :mod:`mailingest.core.states` (diagram:
  ``docs/states.md``). Every transition is a compare-and-set in one Lua script
  (:mod:`.scripts`), checked against the table before it is sent;
* :mod:`.staging`: mail and document bytes, staged under a TTL and passed between
  tasks by key (never through the broker), encrypted at rest when a key is set;
* :mod:`.inbox_state`: per inbox, the poll's single flight, the watermarks, the last
  poll's outcome, the UIDs that cannot be fetched.

All run on one clock, Redis's (:mod:`.clock`).
"""

from __future__ import annotations

from mailingest.adapters.ledger.base import Store
from mailingest.adapters.ledger.clock import RedisClock, now_ms
from mailingest.adapters.ledger.inbox_state import InboxState
from mailingest.adapters.ledger.records import (
    Attempt,
    MailRecords,
    PlannedDocument,
    doubt_key,
    fingerprint,
)
from mailingest.adapters.ledger.replies import ReplyRecords
from mailingest.adapters.ledger.staging import Staging
from mailingest.core.records import DocumentRecord, MailRecord, MailRef, Slot
from mailingest.core.states import (
    COUNTED,
    DECIDED,
    IN_FLIGHT,
    MAIL_STATES,
    DocumentState,
    MailState,
)

# the old names, kept for the many callers (and tests) that use ``L.QUEUED`` and kin
QUEUED = MailState.QUEUED
PARSING = MailState.PARSING
DOCUMENTS_PENDING = MailState.DOCUMENTS_PENDING
DONE = MailState.DONE
QUARANTINED = MailState.QUARANTINED
FAILED = MailState.FAILED
REPLAYED = MailState.REPLAYED
IGNORED = MailState.IGNORED
PLANNED = DocumentState.PLANNED
DESCRIBED = DocumentState.DESCRIBED
UPLOADED = DocumentState.UPLOADED
LOST = DocumentState.LOST


class Ledger(MailRecords, Staging, InboxState, ReplyRecords):
    """The ledger of every mail, document and inbox (see the module's docstring)."""


__all__ = [
    "COUNTED",
    "DECIDED",
    "DESCRIBED",
    "DOCUMENTS_PENDING",
    "DONE",
    "FAILED",
    "IGNORED",
    "IN_FLIGHT",
    "LOST",
    "MAIL_STATES",
    "PARSING",
    "PLANNED",
    "QUARANTINED",
    "QUEUED",
    "REPLAYED",
    "UPLOADED",
    "Attempt",
    "DocumentRecord",
    "DocumentState",
    "InboxState",
    "Ledger",
    "MailRecord",
    "MailRecords",
    "MailRef",
    "MailState",
    "PlannedDocument",
    "RedisClock",
    "Slot",
    "Staging",
    "Store",
    "doubt_key",
    "fingerprint",
    "now_ms",
]
