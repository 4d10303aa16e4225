"""Replies to customers, the pure part: whether a mail may be answered at all, which
reply its outcome calls for, what the customer is told of each refused part, and the
reply's headers. No I/O: the templates are rendered and the reply sent elsewhere
(:mod:`mailingest.adapters.smtp`, :mod:`mailingest.application.replies`).

Who is never answered (RFC 3834 section 2, and what ticketing systems learnt from mail
loops and backscatter: Zammad, FreeScout, osTicket, Request Tracker): a mail whose
sender failed authentication (the From may be forged: the reply would go to an
innocent address), a null or missing return path (bounces), ``MAILER-DAEMON``,
``postmaster`` and ``noreply`` addresses, ``Auto-Submitted`` other than ``no``
(out-of-office replies, bounces, other robots), ``Precedence: bulk|list|junk``, any
``List-*`` header (mailing lists), ``X-Auto-Response-Suppress`` (Exchange's own
"do not answer me"), and our own replies (``X-Loop`` naming us, or a Message-ID of
our replies' domain).
"""

from __future__ import annotations

import email.header
import email.parser
import email.policy
import hashlib
import re
from collections.abc import Iterator
from dataclasses import dataclass
from email.message import EmailMessage
from email.utils import formataddr, getaddresses, parseaddr

from mailingest.core.states import MailState

KINDS: tuple[str, ...] = ("received", "refused", "unknown")

# what the customer is told a refused part was (the templates word it per language)
PART_CODES: tuple[str, ...] = ("archive", "type", "too_large", "unreadable", "too_many", "none")

_ROBOT_LOCAL = re.compile(
    r"^(mailer-daemon|postmaster|no[-_.]?reply|do[-_.]?not[-_.]?reply|bounces?)([+-].*)?$",
    re.IGNORECASE,
)
_BULK = frozenset({"bulk", "list", "junk"})
_ARCHIVES = frozenset({"zip", "rar", "7z", "tar", "gzip", "bzip2", "xz", "cab"})


@dataclass(frozen=True)
class Headers:
    """What the suppression rules read of a mail: its header fields alone."""

    return_path: str | None  # None: no Return-Path field; "": the null path <>
    sender: str  # the From address, lower case ("" when none or several)
    subject: str
    message_id: str  # without angle brackets
    references: str  # as written
    auto_submitted: str
    precedence: str
    list_fields: tuple[str, ...]  # the List-* fields it has
    auto_response_suppress: str
    x_loop: tuple[str, ...]


def headers_of(raw: bytes) -> Headers:
    """The header fields of a mail's raw bytes (its body is not read)."""
    parser = email.parser.BytesHeaderParser(policy=email.policy.compat32)
    message = parser.parsebytes(raw)

    def one(name: str) -> str:
        value = message.get(name)
        return " ".join(str(value).split()) if value is not None else ""

    path = message.get("Return-Path")
    senders = [a for _, a in getaddresses(message.get_all("From") or []) if a]
    return Headers(
        return_path=None if path is None else parseaddr(str(path))[1].strip(),
        sender=senders[0].lower() if len(senders) == 1 else "",
        subject=_decoded(one("Subject")),
        message_id=one("Message-ID").strip("<>"),
        references=one("References"),
        auto_submitted=one("Auto-Submitted").lower(),
        precedence=one("Precedence").lower(),
        list_fields=tuple(sorted({k for k in message if k.lower().startswith("list-")})),
        auto_response_suppress=one("X-Auto-Response-Suppress"),
        x_loop=tuple(" ".join(str(v).split()).lower() for v in message.get_all("X-Loop") or []),
    )


def _decoded(value: str) -> str:
    try:
        return str(email.header.make_header(email.header.decode_header(value)))
    except Exception:  # noqa: BLE001 - a broken encoded-word keeps its raw text
        return value


@dataclass(frozen=True)
class Ours:
    """How our own replies are recognised: the address they come from, and the domain
    of their Message-IDs."""

    address: str
    domain: str


def suppressed(headers: Headers, *, authenticated: bool, ours: Ours) -> str | None:
    """Why this mail must not be answered (the first reason), or None when it may be."""
    return next(_reasons_not_to_answer(headers, authenticated, ours), None)


def _reasons_not_to_answer(headers: Headers, authenticated: bool, ours: Ours) -> Iterator[str]:
    if not authenticated:
        yield "sender not authenticated (a reply could go to a forged address)"
    if headers.return_path is None:
        yield "no Return-Path"
    elif headers.return_path in ("", "<>"):
        yield "null Return-Path (a bounce)"
    for address in (headers.return_path or "", headers.sender):
        local = address.rpartition("@")[0] or address
        if address and _ROBOT_LOCAL.match(local):
            yield f"{address} is a robot's address"
    if not headers.sender:
        yield "no single sender address in From:"
    if headers.sender == ours.address.lower():
        yield "our own address"
    if headers.auto_submitted and headers.auto_submitted.split(";")[0].strip() != "no":
        yield f"Auto-Submitted: {headers.auto_submitted}"
    if headers.list_fields:
        yield f"a mailing list ({headers.list_fields[0]})"
    if headers.precedence in _BULK:
        yield f"Precedence: {headers.precedence}"
    if headers.auto_response_suppress:
        yield f"X-Auto-Response-Suppress: {headers.auto_response_suppress}"
    if any(ours.address.lower() in loop for loop in headers.x_loop):
        yield "X-Loop: our own reply"
    if headers.message_id.lower().endswith("@" + ours.domain.lower()):
        yield "our own reply (its Message-ID)"


# why a reply was not sent, as a small fixed set (a metric label, status's counts)
_WHY_KINDS: tuple[tuple[str, str], ...] = (
    ("sender not authenticated", "unauthenticated"),
    ("no Return-Path", "bounce"),
    ("null Return-Path", "bounce"),
    ("is a robot's address", "robot"),
    ("Auto-Submitted", "auto_submitted"),
    ("Precedence", "bulk"),
    ("a mailing list", "list"),
    ("X-Auto-Response-Suppress", "auto_response_suppress"),
    ("X-Loop", "loop"),
    ("our own", "loop"),
    ("replies to this address in", "rate_limit"),
    ("replies are off", "off"),
    ("nothing the customer can act on", "nothing_to_say"),
)


def why_kind(why: str) -> str:
    """The kind of a reason not to answer, for a metric label."""
    return next((kind for text, kind in _WHY_KINDS if text in why), "other")


def kind_for(state: str, reason: str, refused_parts: str) -> str | None:
    """The reply a decided mail calls for: ``received`` (filed, nothing refused),
    ``refused`` (filed with parts refused, or set aside for what it carried),
    ``unknown`` (the sender has no entity), or None (set aside for a reason the
    customer cannot act on: Alloy refused, a bug, a mail that could not be read)."""
    if state == MailState.DONE:
        return "refused" if refused_parts else "received"
    if state != MailState.QUARANTINED:
        return None
    if reason.startswith("unknown sender"):
        return "unknown"
    if part_code(reason) is not None:
        return "refused"
    return None


def part_code(reason: str) -> str | None:
    """What a screening reason means to a customer (one of PART_CODES), or None when
    it is nothing the customer sent wrong."""
    lowered = reason.lower()
    if lowered.startswith("no documents attached"):
        return "none"
    if lowered.startswith(("attachment too large", "message too large")):
        return "too_large"
    if lowered.startswith("too many documents"):
        return "too_many"
    if lowered.startswith(("a part could not be decoded", "the mail is truncated")):
        return "unreadable"
    if lowered.startswith("refused content"):
        match = re.search(r"\) is ([a-z0-9]+) \(", reason)
        if match is None:
            return "unreadable"  # a winmail.dat that cannot be unpacked
        return "archive" if match[1] in _ARCHIVES else "type"
    return None


@dataclass(frozen=True)
class RefusedPart:
    name: str  # the part's file name as the customer sent it ("" for the whole mail)
    code: str  # one of PART_CODES


def refused_parts(reasons: str) -> list[RefusedPart]:
    """The parts a customer is told of, from a record's reason or refused_parts
    ("; "-joined screening reasons): each with its file name and code."""
    out = []
    for reason in _split(reasons):
        code = part_code(reason)
        if code is None:
            continue
        named = re.search(r"part \d+ \(([^)]*?)(?:, in [^)]*)?\)", reason)
        out.append(RefusedPart(named[1] if named else "", code))
    return out


def _split(reasons: str) -> list[str]:
    """Screening joins reasons with "; " (a reason holds none of its own but in
    parentheses, which are kept together)."""
    parts, depth, start = [], 0, 0
    for i, char in enumerate(reasons):
        depth += char == "("
        depth -= char == ")"
        if depth == 0 and reasons.startswith("; ", i):
            parts.append(reasons[start:i])
            start = i + 2
    parts.append(reasons[start:])
    return [p.strip() for p in parts if p.strip()]


def reply_message_id(message_key: str, kind: str, domain: str) -> str:
    """The Message-ID of the reply of ``kind`` to the mail ``message_key``: the same
    for every try, so a send a crash left unconfirmed is recognisable at the far end."""
    digest = hashlib.sha256(f"{message_key}\0{kind}".encode("utf-8", "surrogateescape"))
    return f"reply-{kind}-{digest.hexdigest()[:32]}@{domain}"


def reply_subject(subject: str) -> str:
    """``Re: <subject>``, without stacking ``Re:``."""
    subject = " ".join(subject.split())
    if re.match(r"(re|aw|sv|antw)\s*:", subject, re.IGNORECASE):
        return subject
    return f"Re: {subject}" if subject else "Re: your documents"


def references(headers: Headers) -> str:
    """The References of a reply: the mail's own, then the mail (RFC 5322 3.6.4)."""
    own = f"<{headers.message_id}>" if headers.message_id else ""
    return " ".join(part for part in (headers.references, own) if part)


@dataclass(frozen=True)
class Plan:
    """Which reply a decided mail gets, or why none."""

    kind: str | None
    why: str = ""


def plan(*, state: str, reason: str, refused: str, block: str, enabled: frozenset[str]) -> Plan:
    """The reply for a decided mail: what its outcome calls for (``kind_for``), as the
    inbox sends it (a mail filed with parts refused gets ``received`` when ``refused``
    replies are off), unless ``block`` (why the mail must not be answered) says no."""
    if block:
        return Plan(None, block)
    kind = kind_for(state, reason, refused)
    if kind == "refused" and kind not in enabled and state == MailState.DONE:
        kind = "received"
    if kind is None:
        return Plan(None, "its outcome is nothing the customer can act on")
    if kind not in enabled:
        return Plan(None, f"{kind} replies are off")
    return Plan(kind)


def compose(
    *,
    to: str,
    from_address: str,
    from_name: str,
    subject: str,
    message_id: str,
    original: str,
    references: str,
    language: str,
    text: str,
    html: str | None,
    date: str,
) -> EmailMessage:
    """The reply: to one recipient, ``Auto-Submitted: auto-replied`` (RFC 3834),
    threaded under the customer's mail, its Message-ID derived from the mail."""
    msg = EmailMessage()
    msg["From"] = formataddr((from_name, from_address))
    msg["To"] = to
    msg["Subject"] = reply_subject(subject)
    msg["Date"] = date
    msg["Message-ID"] = f"<{message_id}>"
    if original:
        msg["In-Reply-To"] = f"<{original}>"
    if references:
        msg["References"] = references
    msg["Auto-Submitted"] = "auto-replied"
    msg["X-Auto-Response-Suppress"] = "All"  # Exchange: no out-of-office back to us
    msg["X-Loop"] = from_address
    msg.set_content(text)
    if html is not None:
        msg.add_alternative(html, subtype="html")
    msg["Content-Language"] = language  # after the content: set_content clears Content-*
    return msg
