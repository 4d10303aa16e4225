"""What kind of reason a quarantine, failure or refused part has: a small fixed set of
names, fit for a metric label, a filter in the console and an index key in the ledger
(the reason's text is for people, its kind for machines)."""

from __future__ import annotations

import re

# the first pattern that matches the reason's start wins
REASON_KINDS: tuple[tuple[str, str], ...] = (
    (r"unknown sender", "unknown_sender"),
    (r"sender not authenticated", "sender_not_authenticated"),
    (r"no single sender", "no_sender"),
    (r"no documents attached", "no_documents"),
    (r"message too large", "message_too_large"),
    (r"headers too large", "headers_too_large"),
    (r"too many MIME parts|MIME nesting too deep", "too_complex"),
    (r"attachment too large", "attachment_too_large"),
    (r"too many documents", "too_many_documents"),
    (r"refused content", "refused_content"),
    (r"cannot parse|a part could not be decoded|the mail is truncated", "malformed"),
    (r"document \d+ \(.*\): Alloy already holds", "alloy_conflict"),
    (r"document \d+ \(.*\): Alloy", "alloy_rejected"),
)
OTHER = "other"
KINDS: tuple[str, ...] = (*(kind for _, kind in REASON_KINDS), OTHER)


def reason_kind(reason: str) -> str:
    """A reason's kind (``other`` when no pattern matches)."""
    for pattern, kind in REASON_KINDS:
        if re.match(pattern, reason, re.IGNORECASE):
            return kind
    return OTHER
