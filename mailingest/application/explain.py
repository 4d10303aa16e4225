"""``mailingest explain MAIL.eml``: what the inbox would do with one mail, sending nothing.

The same screening, rules and entity resolution a worker runs (``screen_for``, ``ruled``,
``entity_of``),
read-only: no IMAP, no Alloy, no ledger write; the sender directory (file, Redis,
CRM hook) is asked, as a worker would ask it. For an operator who wants to know why a
mail was (or would be) quarantined, filed partly, left alone by the rules, or filed on
which entity, and what the rules would do with it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime

from mailingest.adapters.senders import SenderResolver
from mailingest.application.pipeline import entity_of, ruled, screen_for
from mailingest.config.settings import InboxSettings, Settings
from mailingest.core.states import MailState


@dataclass
class Explanation:
    inbox: str
    policies: dict[str, str]
    sender: str | None = None
    outcome: str = ""  # the state it would end in: done (filed), quarantined or ignored
    reason: str = ""  # why quarantined
    entity: str | None = None
    entity_source: str = ""
    documents: list[dict[str, object]] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    # with rules: those that apply, why the others did not, and what they assign
    rules: list[str] | None = None
    passed_over: list[str] = field(default_factory=list)
    actions: list[str] = field(default_factory=list)
    note: str | None = None
    agent_email: str | None = None


def explain(
    settings: Settings, inbox: InboxSettings, resolver: SenderResolver, raw: bytes
) -> Explanation:
    out = Explanation(
        inbox.name,
        {"on_refused_part": inbox.on_refused_part, "forwarded": inbox.forwarded},
    )
    screened = screen_for(settings, inbox, raw)
    # its age counts from its Date: to now (a worker counts from arrival to fetch)
    screened, verdict = ruled(inbox, screened, None, datetime.now(UTC))
    out.notes = list(screened.notes)
    out.refused = list(screened.refused)
    mail = screened.mail
    out.sender = mail.sender if mail else None
    if verdict.ruled:
        out.rules = [rule.name for rule in verdict.applied]
        out.passed_over = [f"{name}: {why}" for name, why in verdict.passed_over]
        out.actions = list(verdict.actions)
        out.note = verdict.note(inbox.note)
        out.agent_email = verdict.agent_email(inbox.agent_email)
        if not verdict.taken:
            out.outcome, out.reason = MailState.IGNORED, verdict.why_not()
            return out
    out.documents = [
        {
            "part": doc.spec.index,
            "name": f"{doc.spec.name}.{doc.spec.extension}",
            "type": doc.spec.type,
            "content": doc.kind,
            "bytes": len(doc.payload),
        }
        for doc in screened.documents
    ]
    if screened.refusal is not None or mail is None:
        out.outcome, out.reason = MailState.QUARANTINED, screened.refusal or "cannot parse the mail"
        return out
    if not mail.sender:
        out.outcome, out.reason = MailState.QUARANTINED, "no single sender address in From:"
        return out
    found = entity_of(settings, inbox, resolver, mail)
    if isinstance(found, str):
        out.outcome, out.reason = MailState.QUARANTINED, found
        return out
    out.entity, out.entity_source = found
    out.outcome = MailState.DONE
    return out


def render(explanation: Explanation) -> str:
    e = explanation
    policies = ", ".join(f"{k} = {v}" for k, v in e.policies.items())
    lines = [f"inbox {e.inbox} ({policies})", f"sender: {e.sender or '-'}"]
    if e.rules is not None:
        lines.append(f"rules applied: {', '.join(e.rules) or 'none'}")
        lines += [f"  passed over: {why}" for why in e.passed_over]
        if e.rules:
            lines.append(
                f"  then: {' + '.join(e.actions)}; note {e.note!r} by {e.agent_email or '-'}"
            )
    if e.entity:
        lines.append(f"entity: {e.entity} (found by {e.entity_source})")
    for doc in e.documents:
        lines.append(
            f"  document: part {doc['part']}  {doc['name']}  type {doc['type']}  "
            f"({doc['content']}, {doc['bytes']} bytes)"
        )
    lines += [f"  refused: {reason}" for reason in e.refused]
    lines += [f"  note: {note}" for note in e.notes]
    if e.outcome == MailState.QUARANTINED:
        lines.append(f"outcome: quarantined: {e.reason}")
    elif e.outcome == MailState.IGNORED:
        lines.append("outcome: left in the inbox untouched (no rule takes it)")
    else:
        count = len(e.documents)
        lines.append(
            f"outcome: {count} document(s) to Alloy, then filed as processed"
            + (f"; {len(e.refused)} part(s) refused" if e.refused else "")
        )
    lines.append("(nothing was sent: no IMAP, no Alloy, no ledger write)")
    return "\n".join(lines)
