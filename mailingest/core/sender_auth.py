"""Does the receiving server vouch for this sender?

The From: address of a mail picks the customer (Alloy entity) its documents are
filed on, so a forged From: would put a stranger's "passport" on a real
customer's record. This module decides, from the ``Authentication-Results``
headers (RFC 8601) that *our own* receiving server added, whether the From:
domain was authenticated: a DMARC pass (RFC 7489), or, when the policy allows
it, a DKIM or SPF pass that is *aligned* with the From: domain (relaxed
alignment: same organizational domain, found with the Public Suffix List).

Pure logic, no I/O: the Public Suffix List is the copy bundled inside the
``publicsuffixlist`` package, read from the installed package on first use;
nothing is downloaded.

Trust model, in short:

* Only headers whose authserv-id is one of ``AuthPolicy.trusted_authserv_ids``
  count; anyone can add an ``Authentication-Results`` header claiming anything.
* Of those, only the topmost one counts (see :func:`evaluate`).
* A DMARC ``fail`` in that header rejects, whatever else passed.
* Everything fails closed: no header, an unparseable header, an unusable From:
  address or an internal error all give ``accepted=False``.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from publicsuffixlist import PublicSuffixList

__all__ = [
    "AuthPolicy",
    "MethodResult",
    "Verdict",
    "evaluate",
    "normalise_domain",
    "organizational_domain",
    "parse_authentication_results",
]

log = logging.getLogger(__name__)

ACCEPTABLE_METHODS = ("dmarc", "dkim", "spf")
MAX_REASON = 300
# A header value longer than this is not one a receiving server wrote: garbage.
MAX_HEADER_CHARS = 64 * 1024

# Method names registered for Authentication-Results (IANA "Email Authentication
# Methods") plus a few common vendor ones. A dot-less ``name=value`` pair whose
# name is one of these starts a new result even without the ";" separator, so a
# sloppy "dkim=pass header.d=x dmarc=fail" cannot hide the dmarc=fail inside the
# properties of the dkim result.
_KNOWN_METHODS = frozenset(
    {
        "arc",
        "auth",
        "bimi",
        "compauth",
        "dkim",
        "dkim-adsp",
        "dkim-atps",
        "dmarc",
        "domainkeys",
        "iprev",
        "rrvs",
        "sender-id",
        "smime",
        "spf",
        "vbr",
        "x-original-dmarc",
    }
)

_KEYWORD = re.compile(r"[a-z0-9](?:[a-z0-9_-]*[a-z0-9])?")
_PROPERTY_KEY = re.compile(r"[a-z0-9_-]+(?:\.[a-z0-9_-]+)*")
_VERSION = re.compile(r"[0-9]{1,9}")
# RFC 2045 token: no SPACE, CTLs or tspecials.
_TOKEN = re.compile(r"[^\x00-\x20\x7f()<>@,;:\\\"/\[\]?=]+")
_ASCII_LABEL = re.compile(r"[a-z0-9_-]{1,63}")
_DMARC_P = re.compile(r"(?<![a-z0-9_.-])p\s*=\s*(none|quarantine|reject)(?![a-z0-9_-])", re.I)
_UNSAFE = re.compile(r"[^a-z0-9._-]")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# IDNA 2003 maps these to something else where IDNA 2008 keeps them ("faß.de"
# is "fass.de" for one and "xn--fa-hia.de" for the other): refused outright.
_IDNA_DEVIATIONS = frozenset("\u00df\u03c2\u200c\u200d")


# --------------------------------------------------------------------------
# Public types
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class AuthPolicy:
    """Whose verdicts we trust and which passes are enough.

    ``trusted_authserv_ids``: the authserv-ids of our own receiving server(s),
    e.g. ``("mx.support.example",)``; compared case-insensitively. Required.

    ``accept``: any of ``"dmarc"``, ``"dkim"``, ``"spf"``. A DKIM or SPF pass
    counts only when aligned with the From: domain (relaxed alignment: same
    organizational domain; ``header.d`` for DKIM, the ``smtp.mailfrom`` domain
    for SPF, ``smtp.helo`` when there is no mail-from).

    ``allowed_domains``: when non-empty, the From: domain or its organizational
    domain must be one of these.

    Invalid settings raise ``ValueError`` here, at configuration time; the
    stored tuples are lower-cased and normalised.
    """

    trusted_authserv_ids: tuple[str, ...]
    accept: tuple[str, ...] = ("dmarc",)
    allowed_domains: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        ids = tuple(i.strip().lower() for i in _strings(self.trusted_authserv_ids, "authserv-id"))
        if not ids or any(not i for i in ids):
            raise ValueError("AuthPolicy.trusted_authserv_ids needs at least one non-empty id")
        accept = tuple(m.strip().lower() for m in _strings(self.accept, "accept"))
        if not accept:
            raise ValueError("AuthPolicy.accept needs at least one of dmarc, dkim, spf")
        unknown = [m for m in accept if m not in ACCEPTABLE_METHODS]
        if unknown:
            raise ValueError(f"AuthPolicy.accept: unknown method(s) {unknown}; use dmarc/dkim/spf")
        allowed: list[str] = []
        for raw in _strings(self.allowed_domains, "allowed domain"):
            domain = normalise_domain(raw)
            if domain is None:
                raise ValueError(f"AuthPolicy.allowed_domains: not a domain: {raw!r}")
            allowed.append(domain)
        object.__setattr__(self, "trusted_authserv_ids", ids)
        object.__setattr__(self, "accept", tuple(dict.fromkeys(accept)))
        object.__setattr__(self, "allowed_domains", tuple(dict.fromkeys(allowed)))


@dataclass(frozen=True)
class Verdict:
    """``reason`` is one line (no CR/LF, at most 300 characters) naming only
    methods, results, the authserv-id and domains, never free text from the
    mail. ``method`` is the method that passed ("dmarc", "dkim", "spf") or None.
    """

    accepted: bool
    reason: str
    method: str | None


@dataclass(frozen=True)
class MethodResult:
    """One ``method=result`` of an Authentication-Results header.

    ``properties`` has lower-case keys such as ``header.from``, ``header.d``,
    ``header.i``, ``smtp.mailfrom``, ``smtp.helo``, ``policy.dmarc``; dot-less
    pairs (``reason=...``, Microsoft's ``action=...``) are kept under their
    own name. Values are unquoted; comments are dropped. When a key repeats,
    the first value is kept.
    """

    method: str
    result: str
    properties: dict[str, str] = field(default_factory=dict)


# --------------------------------------------------------------------------
# Domains
# --------------------------------------------------------------------------


def normalise_domain(domain: str) -> str | None:
    """The domain in lower-case ASCII (IDNA A-labels), no trailing dot; None if unusable.

    Non-ASCII domains are accepted only when they are already in IDNA normal
    form (encoding then decoding gives the same lower-cased text): "bücher.example"
    becomes "xn--bcher-kva.example", but "faß.de", full-width letters or
    invisible characters, which IDNA 2003 would silently map onto another,
    possibly differently owned, domain, give None. Never raises.
    """
    if not isinstance(domain, str):
        return None
    text = domain.strip()
    if text.endswith("."):
        text = text[:-1]
    if not text or len(text) > 1024:
        return None
    text = text.lower()
    if not text.isascii():
        if any(c in _IDNA_DEVIATIONS for c in text):
            return None
        try:
            encoded = text.encode("idna")
            if encoded.decode("idna") != text:
                return None
            text = encoded.decode("ascii")
        except (UnicodeError, ValueError):
            return None
    labels = text.split(".")
    if len(text) > 253 or not all(_ASCII_LABEL.fullmatch(label) for label in labels):
        return None
    return text


@lru_cache(maxsize=1)
def _psl() -> PublicSuffixList:
    # The list bundled in the package (publicsuffixlist/public_suffix_list.dat),
    # ICANN and private sections both: a private suffix such as github.io makes
    # alice.github.io and bob.github.io different organizations, the stricter
    # reading. Unknown TLDs count as one-label public suffixes (RFC 7489 §3.2).
    return PublicSuffixList()


def organizational_domain(domain: str) -> str:
    """The RFC 7489 §3.2 organizational domain: the public suffix plus one label.

    "mail.example.co.uk" -> "example.co.uk", "a.b.example.com" -> "example.com".
    A domain that is itself a public suffix ("co.uk") is its own organizational
    domain. Returns "" for a domain that is not usable (see
    :func:`normalise_domain`), which never aligns with anything. Never raises.
    """
    normal = normalise_domain(domain)
    if normal is None:
        return ""
    try:
        org = _psl().privatesuffix(normal)
    except Exception:  # pragma: no cover - the library does not raise on str input
        log.exception("publicsuffixlist failed on %r", normal)
        return normal
    return org if org else normal


def _aligned(domain: str | None, from_org: str) -> bool:
    return bool(domain) and bool(from_org) and organizational_domain(domain or "") == from_org


def _domain_of_address(value: str | None) -> str | None:
    """The normalised domain after the last "@" of an address-ish value."""
    if not value:
        return None
    text = value.strip()
    if text.startswith("<") and text.endswith(">"):
        text = text[1:-1].strip()
    _local, _at, domain = text.rpartition("@")
    return normalise_domain(domain)


def _from_domain(from_address: str | None) -> tuple[str | None, str]:
    """(normalised From: domain, "") or (None, reason)."""
    if from_address is None or not isinstance(from_address, str) or not from_address.strip():
        return None, "no From address"
    text = from_address.strip()
    if text.startswith("<") and text.endswith(">"):
        text = text[1:-1].strip()
    local, at, domain = text.rpartition("@")
    # Anything hinting at several addresses or a display name is refused rather
    # than guessed at: the domain checked must be the one the sender lookup uses.
    if (
        not at
        or not local
        or any(c in local for c in "<>,;")
        or _CONTROL.search(text)
        or any(c.isspace() for c in text)
    ):
        return None, "From address is not a single plain address"
    normal = normalise_domain(domain)
    if normal is None:
        return None, "From address has no usable domain"
    return normal, ""


# --------------------------------------------------------------------------
# Parsing Authentication-Results (RFC 8601 §2.2)
# --------------------------------------------------------------------------

_WORD, _QSTRING, _SEMI, _EQ = "word", "qstring", ";", "="


@dataclass(frozen=True)
class _Lexeme:
    kind: str
    text: str
    space_before: bool  # whitespace or a comment since the previous lexeme
    comments: tuple[str, ...]  # comments right before this lexeme


@dataclass(frozen=True)
class _Entry:
    result: MethodResult
    comments: tuple[str, ...]
    conflicting: frozenset[str]  # property keys given twice with different values


@dataclass(frozen=True)
class _Parsed:
    authserv_id: str
    entries: tuple[_Entry, ...]
    malformed: bool  # unterminated comment/quote, stray ")", a method without a valid result


_GARBAGE = _Parsed("", (), True)


def _lex(value: str) -> tuple[list[_Lexeme], list[str], bool]:
    """Lexemes, trailing comments, and whether the text was malformed."""
    lexemes: list[_Lexeme] = []
    pending_comments: list[str] = []
    space = False
    i, n = 0, len(value)
    while i < n:
        c = value[i]
        if c in " \t\r\n":
            space = True
            i += 1
        elif c == "(":
            depth, j, buf = 1, i + 1, []
            while j < n and depth:
                ch = value[j]
                if ch == "\\" and j + 1 < n:
                    buf.append(value[j + 1])
                    j += 2
                    continue
                if ch == "(":
                    depth += 1
                elif ch == ")":
                    depth -= 1
                    if not depth:
                        break
                buf.append(ch)
                j += 1
            if depth:
                return lexemes, pending_comments, True
            pending_comments.append("".join(buf))
            space = True
            i = j + 1
        elif c == ")":
            return lexemes, pending_comments, True
        elif c == '"':
            j, buf = i + 1, []
            while j < n and value[j] != '"':
                if value[j] == "\\" and j + 1 < n:
                    j += 1
                buf.append(value[j])
                j += 1
            if j >= n:
                return lexemes, pending_comments, True
            lexemes.append(_Lexeme(_QSTRING, "".join(buf), space, tuple(pending_comments)))
            pending_comments, space = [], False
            i = j + 1
        elif c in ";=":
            lexemes.append(_Lexeme(c, c, space, tuple(pending_comments)))
            pending_comments, space = [], False
            i += 1
        else:
            j = i
            while j < n and value[j] not in ' \t\r\n()";=':
                j += 1
            lexemes.append(_Lexeme(_WORD, value[i:j], space, tuple(pending_comments)))
            pending_comments, space = [], False
            i = j
    return lexemes, pending_comments, False


def _split_segments(lexemes: list[_Lexeme]) -> list[tuple[list[_Lexeme], tuple[str, ...]]]:
    """Lexemes split at ";", each segment with the comments that close it."""
    segments: list[tuple[list[_Lexeme], tuple[str, ...]]] = []
    current: list[_Lexeme] = []
    for lexeme in lexemes:
        if lexeme.kind == _SEMI:
            segments.append((current, lexeme.comments))
            current = []
        else:
            current.append(lexeme)
    segments.append((current, ()))
    return segments


def _pairs(segment: list[_Lexeme]) -> tuple[list[tuple[str, str, tuple[str, ...]]], bool]:
    """``name=value`` pairs of a segment, with the comments seen around each.

    Lexemes that do not form a pair are skipped (tolerance). Returns whether the
    segment *started* with a pair, i.e. whether it is a result at all.
    """
    pairs: list[tuple[str, str, tuple[str, ...]]] = []
    starts_with_pair = False
    i, n = 0, len(segment)
    while i < n:
        lexeme = segment[i]
        if not (lexeme.kind == _WORD and i + 1 < n and segment[i + 1].kind == _EQ):
            i += 1
            continue
        if i == 0:
            starts_with_pair = True
        comments = list(lexeme.comments) + list(segment[i + 1].comments)
        j = i + 2
        parts: list[str] = []
        if (
            j < n
            and segment[j].kind in (_WORD, _QSTRING)
            # "key= next.key=value": the value is missing, not "next.key".
            and not (segment[j].space_before and j + 1 < n and segment[j + 1].kind == _EQ)
        ):
            parts.append(segment[j].text)
            comments.extend(segment[j].comments)
            j += 1
            # Adjacent pieces belong to the same value: "john doe"@example.com,
            # base64 padding in header.b=abc=.
            while (
                j < n
                and not segment[j].space_before
                and segment[j].kind in (_WORD, _QSTRING, _EQ)
                and not (segment[j].kind == _WORD and j + 1 < n and segment[j + 1].kind == _EQ)
            ):
                parts.append(segment[j].text)
                j += 1
        pairs.append((lexeme.text, "".join(parts), tuple(comments)))
        i = j
    return pairs, starts_with_pair


class _Builder:
    def __init__(self, method: str, result: str, comments: Iterable[str]) -> None:
        self.method, self.result = method, result
        self.properties: dict[str, str] = {}
        self.comments = list(comments)
        self.conflicting: set[str] = set()

    def add(self, key: str, value: str) -> None:
        if key in self.properties:
            if self.properties[key] != value:
                self.conflicting.add(key)
        else:
            self.properties[key] = value

    def build(self) -> _Entry:
        return _Entry(
            MethodResult(self.method, self.result, dict(self.properties)),
            tuple(self.comments),
            frozenset(self.conflicting),
        )


def _parse(value: Any) -> _Parsed:
    if not isinstance(value, str) or len(value) > MAX_HEADER_CHARS:
        return _GARBAGE
    lexemes, trailing_comments, malformed = _lex(value)
    segments = _split_segments(lexemes)
    head = segments[0][0]

    authserv_id = ""
    result_segments = segments[1:]
    if any(lexeme.kind == _EQ for lexeme in head):
        # Microsoft 365 style: no authserv-id, results straight away. Parsed for
        # diagnostics; an empty authserv-id is never trusted.
        result_segments = segments
    else:
        if not head or len(head) > 2:
            return _GARBAGE
        first = head[0]
        if first.kind == _WORD and _TOKEN.fullmatch(first.text):
            authserv_id = first.text.lower()
        elif first.kind == _QSTRING and first.text.strip() and not _CONTROL.search(first.text):
            authserv_id = first.text.strip().lower()
        else:
            return _GARBAGE
        if len(head) == 2 and not (head[1].kind == _WORD and _VERSION.fullmatch(head[1].text)):
            return _GARBAGE

    entries: list[_Entry] = []
    for index, (segment, closing_comments) in enumerate(result_segments):
        if not segment:
            continue
        if len(segment) == 1 and segment[0].kind == _WORD and segment[0].text.lower() == "none":
            continue
        pairs, is_result = _pairs(segment)
        if not is_result:
            continue
        current: _Builder | None = None
        for name, raw_value, comments in pairs:
            key = name.lower()
            method = key.split("/", 1)[0]
            if current is None or ("." not in key and method in _KNOWN_METHODS):
                if current is not None:
                    entries.append(current.build())
                    current = None
                result = raw_value.strip().lower()
                if not _KEYWORD.fullmatch(method):
                    break
                if not _KEYWORD.fullmatch(result):
                    malformed = True
                    break
                current = _Builder(method, result, comments)
                continue
            current.comments.extend(comments)
            if _PROPERTY_KEY.fullmatch(key):
                current.add(key, raw_value)
        if current is not None:
            current.comments.extend(closing_comments)
            if index == len(result_segments) - 1:
                current.comments.extend(trailing_comments)
            entries.append(current.build())
    return _Parsed(authserv_id, tuple(entries), malformed)


def parse_authentication_results(value: str) -> tuple[str, list[MethodResult]]:
    """The authserv-id (lower-case) and the results of one header value.

    Tolerates comments (nested, anywhere), folding (CRLF + whitespace), quoted
    strings, a missing or present version ("mx.example.com 1;"), the "none"
    result, and Microsoft 365's form without an authserv-id (returned with an
    authserv-id of ""). Segments that are not ``method=result`` are skipped.
    Never raises: garbage gives ``("", [])``.
    """
    try:
        parsed = _parse(value)
    except Exception:  # pragma: no cover - defensive: a parser bug must not raise
        log.exception("Authentication-Results parser failed")
        return "", []
    return parsed.authserv_id, [entry.result for entry in parsed.entries]


# --------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------


def evaluate(headers: Sequence[str], from_address: str | None, policy: AuthPolicy) -> Verdict:
    """Whether our receiving server authenticated the From: domain.

    ``headers``: every Authentication-Results header value of the mail, in the
    order they appear, topmost first. ``from_address``: the From: addr-spec
    (``ParsedMail.sender``).

    Only the **topmost** header whose authserv-id is trusted counts. Each hop
    prepends its headers, so the topmost one with our authserv-id is the one
    our server added last. RFC 8601 §5 has a receiving server remove or rename
    any earlier instances that claim its own authserv-id, because those came
    from outside; a server that fails to do so leaves a forgery *below* its
    own header. Reading anything below the topmost trusted header would let
    such a forgery count. The one header read is also trusted only while it
    parses: a malformed topmost trusted header rejects the mail and does not
    fall through to a lower one.

    Consequences for the MTA set-up: it must always add its header (when it
    adds none, a forged one with its authserv-id would be the topmost), and the
    results wanted must be in that one header. With several filters that each
    add their own header (OpenDKIM, then OpenDMARC), only the last one added
    (usually OpenDMARC's ``dmarc=``) is read; DKIM/SPF results in lower
    headers are ignored, which only ever rejects more.

    A ``dmarc=fail`` anywhere in that header rejects even when an aligned DKIM
    or SPF pass would be accepted by the policy: DMARC fail is authoritative.

    Never raises; an unexpected error rejects.
    """
    try:
        return _evaluate(headers, from_address, policy)
    except Exception:  # pragma: no cover - defensive: fail closed
        log.exception("Authentication-Results evaluation failed")
        return _verdict(False, "internal error while checking Authentication-Results", None)


def _evaluate(headers: Iterable[str], from_address: str | None, policy: AuthPolicy) -> Verdict:
    from_domain, problem = _from_domain(from_address)
    if from_domain is None:
        return _verdict(False, problem, None)
    from_org = organizational_domain(from_domain)

    if policy.allowed_domains and not (
        from_domain in policy.allowed_domains or from_org in policy.allowed_domains
    ):
        return _verdict(False, f"From domain {from_domain} is not an allowed sender domain", None)

    trusted = set(policy.trusted_authserv_ids)
    parsed: _Parsed | None = None
    for header in headers or ():
        candidate = _parse(header)
        if candidate.authserv_id and candidate.authserv_id in trusted:
            parsed = candidate
            break
    if parsed is None:
        ids = ", ".join(_printable(i, 100) for i in policy.trusted_authserv_ids)
        return _verdict(False, f"no Authentication-Results from {ids}", None)

    by = _printable(parsed.authserv_id, 100)
    if parsed.malformed:
        return _verdict(False, f"Authentication-Results from {by} could not be parsed", None)

    entries = parsed.entries
    for entry in entries:
        if entry.result.method == "dmarc" and entry.result.result == "fail":
            header_from = _domain_of_address(entry.result.properties.get("header.from"))
            policy_text = _dmarc_policy(entry)
            shown = f" ({policy_text})" if policy_text else ""
            return _verdict(
                False, f"dmarc=fail{shown} by {by} for {header_from or from_domain}", None
            )

    notes: list[str] = []
    for method in policy.accept:
        for entry in entries:
            if entry.result.method != method or entry.result.result != "pass":
                continue
            ok, detail = _check_pass(entry, from_domain, from_org)
            if ok:
                suffix = f" ({detail})" if detail else ""
                return _verdict(True, f"{method}=pass by {by} for {from_domain}{suffix}", method)

    for entry in entries:
        method, result = entry.result.method, entry.result.result
        if method not in ACCEPTABLE_METHODS:
            continue
        note = f"{method}={_printable(result, 20)}"
        if result == "pass":
            ok, detail = _check_pass(entry, from_domain, from_org)
            if ok:
                detail = f"{detail}, " if detail else ""
                detail += "not accepted by policy"
            note += f" ({detail})" if detail else ""
        if note not in notes:
            notes.append(note)
    seen = "; ".join(notes) if notes else "no dmarc, dkim or spf result"
    accepted = ",".join(policy.accept)
    return _verdict(False, f"no accepted pass ({accepted}) by {by} for {from_domain}: {seen}", None)


def _check_pass(entry: _Entry, from_domain: str, from_org: str) -> tuple[bool, str]:
    """(counts, one-line detail naming only domains) for a ``pass`` result."""
    props, conflicting = entry.result.properties, entry.conflicting
    method = entry.result.method
    if method == "dmarc":
        if "header.from" in conflicting:
            return False, "header.from given twice"
        if "header.from" not in props:
            return True, ""
        header_from = _domain_of_address(props["header.from"])
        if header_from == from_domain:
            return True, ""
        return False, f"header.from {header_from or 'unusable'} is not the From domain"
    if method == "dkim":
        if "header.d" in props:
            key, domain = "header.d", normalise_domain(props["header.d"])
        elif "header.i" in props:
            key, domain = "header.i", _domain_of_address(props["header.i"])
        else:
            return False, "no header.d"
        if key in conflicting:
            return False, f"{key} given twice"
        if _aligned(domain, from_org):
            return True, f"aligned {key} {domain}"
        return False, f"unaligned {key} {domain or 'unusable'}"
    if method == "spf":
        mailfrom = props.get("smtp.mailfrom", "").strip()
        if mailfrom and mailfrom != "<>":
            key, domain = "smtp.mailfrom", _domain_of_address(mailfrom)
        elif "smtp.helo" in props:
            key, domain = "smtp.helo", normalise_domain(props["smtp.helo"])
        else:
            return False, "no smtp.mailfrom"
        if key in conflicting:
            return False, f"{key} given twice"
        if _aligned(domain, from_org):
            return True, f"aligned {key} {domain}"
        return False, f"unaligned {key} {domain or 'unusable'}"
    return False, ""


def _dmarc_policy(entry: _Entry) -> str:
    """The DMARC policy as "p=reject" etc., from policy.dmarc or a "(p=REJECT ...)" comment."""
    declared = entry.result.properties.get("policy.dmarc", "").strip().lower()
    if declared in ("none", "quarantine", "reject"):
        return f"p={declared}"
    for comment in entry.comments:
        match = _DMARC_P.search(comment)
        if match:
            return f"p={match.group(1).lower()}"
    return ""


def _printable(text: str, limit: int) -> str:
    return _UNSAFE.sub("?", text.lower())[:limit]


def _verdict(accepted: bool, reason: str, method: str | None) -> Verdict:
    line = _CONTROL.sub(" ", reason)
    if len(line) > MAX_REASON:
        line = line[: MAX_REASON - 3] + "..."
    return Verdict(accepted, line, method)


def _strings(values: Any, what: str) -> tuple[str, ...]:
    if isinstance(values, str) or not isinstance(values, Iterable):
        raise ValueError(f"AuthPolicy: {what} values must be a tuple of strings, not {values!r}")
    items = tuple(values)
    if not all(isinstance(v, str) for v in items):
        raise ValueError(f"AuthPolicy: every {what} must be a string")
    return items
