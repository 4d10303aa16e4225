"""The ledger: what happened to every mail and every document, kept in Redis.

One :class:`Ledger`, one job per module:

* :mod:`.records`: mail and document records and their slots (what Alloy holds for a
  document). A mail id lives in exactly one ``mailingest:state:<state>`` set; the
  states, and which may go to which, are :mod:`mailingest.core.states` (diagram:
  ``docs/states.md``). Every transition is a compare-and-set in one Lua script
  (:mod:`.scripts`), checked against the table before it is sent;
* :mod:`.staging`: mail and document bytes, staged under a TTL and passed between
  tasks by key (never through the broker), encrypted at rest when a key is set;
* :mod:`.inbox_state`: per inbox, the poll's single flight, the watermarks, the last
  poll's outcome, the UIDs that cannot be fetched;
* :mod:`.index`: what the console reads (mails by state, inbox and reason kind; each
  mail's history of moves) and the operators' audit log;
* :mod:`.replies`: the replies to customers, one record per mail and kind.

All run on one clock, Redis's (:mod:`.clock`).
"""

from __future__ import annotations

from mailingest.adapters.ledger.base import Store
from mailingest.adapters.ledger.clock import RedisClock, now_ms
from mailingest.adapters.ledger.inbox_state import InboxState
from mailingest.adapters.ledger.index import AuditEntry, Index, Move, Page
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


HANDLED = MailState.HANDLED


class Ledger(Index, Staging, InboxState, ReplyRecords):  # Index reads over MailRecords
    """The ledger of every mail, document and inbox (see the module's docstring)."""


__all__ = [
    "COUNTED",
    "DECIDED",
    "DESCRIBED",
    "DOCUMENTS_PENDING",
    "DONE",
    "FAILED",
    "HANDLED",
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
    "AuditEntry",
    "DocumentRecord",
    "DocumentState",
    "InboxState",
    "Index",
    "Ledger",
    "MailRecord",
    "MailRecords",
    "MailRef",
    "MailState",
    "Move",
    "Page",
    "PlannedDocument",
    "RedisClock",
    "Slot",
    "Staging",
    "Store",
    "doubt_key",
    "fingerprint",
    "now_ms",
]
