"""An inbox's rules: which mail it takes, which attachments, and what follows (pure logic).

Rules are ``[[inboxes.rules]]`` tables of the TOML configuration, checked in order. A
rule *matches* a mail when every filter it has matches (a rule without filters matches
every mail); every matching rule *applies*, until one with ``stop = true`` has applied.
An inbox without rules takes every mail, as before rules existed; an inbox with rules
takes a mail only when at least one rule applies, and leaves any other mail in the
inbox as it is (recorded ``ignored``, never moved, never flagged).

Filters of a mail: ``from`` (the From: address), ``to`` (any recipient: To, Cc,
Delivered-To, X-Original-To), ``subject``, ``body`` (the text body), each a glob
(``*@bank.example``, case-insensitive, the whole value) or, written ``re:...``, a regular
expression searched anywhere in the value (case-insensitive); a list is any of them.
``max_age`` ("30d", "12h", "90m" or seconds): the mail arrived at most this long before
it was fetched. What the server can answer, it is asked (:func:`search_criteria`: IMAP
SEARCH narrows what is fetched); what it cannot (a regular expression, an exact glob)
is decided here, on the fetched mail.

Of the applied rules, for each document: ``filenames`` (globs the document's name must
match) and ``exclude_filenames`` (globs it must not) of every applied rule must let it
through; its type is the first applied rule's ``types`` entry whose glob its name
matches, else the first applied rule's ``type``, else what the keywords say. For the
mail: ``note``, ``agent_email`` and ``actions`` come from the first applied rule that
sets them, else the inbox's (``actions = ["move"]``).

Actions, done once the mail is decided (filed to Processed or Quarantine): ``move``
(the default) or ``copy`` (the mail stays in the inbox, a copy is filed), and any of
``mark_read`` (``\\Seen``), ``flag`` (``\\Flagged``) and ``keyword:NAME`` (an IMAP
keyword; a Gmail label where the server offers labels). Nothing ever deletes.
"""

from __future__ import annotations

import difflib
import fnmatch
import re
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta

from mailingest.config.table import EMAIL
from mailingest.core.documents import DOCUMENT_TYPES
from mailingest.core.mail import ParsedMail
from mailingest.core.screening import Document as ScreenedDocument
from mailingest.core.screening import Screened

FILTERS = ("from", "to", "subject", "body")
FLAG_ACTIONS = ("mark_read", "flag")
PLACE_ACTIONS = ("move", "copy")
DEFAULT_ACTIONS: tuple[str, ...] = ("move",)
KEYWORD = "keyword:"
_KEYS = frozenset(
    {
        "name",
        *FILTERS,
        "max_age",
        "filenames",
        "exclude_filenames",
        "actions",
        "type",
        "types",
        "note",
        "agent_email",
        "stop",
    }
)
# an IMAP keyword is an atom (RFC 3501): no space, no ()"{%*\] and no control character;
# at most 50 characters, Dovecot's default mail_max_keyword_length
_ATOM = re.compile(r"[!#$&'+\-./0-9:;<=>?@A-Z^_`a-z|}~]{1,50}")
_NAME = re.compile(r"[^\x00-\x1f\x7f]{1,64}")
_AGE = re.compile(r"(\d+)\s*([smhd]?)")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
_GLOB = re.compile(r"[*?]")
# What each filter asks the server (IMAP SEARCH), and what text it may not ask for:
# only ASCII (servers fold and decompose the rest each their own way, and some know no
# UTF-8: no CHARSET is ever needed, no BADCHARSET met). In free text (a subject, the
# recipients' headers as written), no i, s or k either: Python's case-insensitive match
# takes capital I with a dot and the dotless i for i, the long s for s and the Kelvin
# sign for k, and Dovecot does not. In the
# recipients' headers, no @ or space: an address there may have a comment or spaces
# around its @ that the parsed address has not. FROM is matched by the server on the
# parsed address, as the rule matches it. The body is never asked for: an HTML body
# writes é as &eacute;, which the server searches as written.
_NOT_ASCII = re.compile(r"[^\x20-\x7e]|\x00")
_NOT_FOLD_SAFE = re.compile(r"[^\x20-\x7e]|[iskISK]|\x00")
_SEARCHED: dict[str, tuple[str, re.Pattern[str]]] = {
    "from": ("FROM", _NOT_ASCII),
    "subject": ("SUBJECT", _NOT_FOLD_SAFE),
    "to": ("TEXT", re.compile(r"[^\x20-\x7e]|[iskISK@ ]|\x00")),
}
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
MAX_AGE = 10 * 366 * 86400  # what max_age may be: ten years
_BRACKETS = re.compile(r"\[!?\]?[^\]]*\]")  # a glob's [...] set


class RuleError(ValueError):
    """A rule is malformed: ``where`` names the key (``rules[2].subject``)."""

    def __init__(self, where: str, problem: str) -> None:
        super().__init__(f"{where}: {problem}")
        self.where = where
        self.problem = problem


@dataclass(frozen=True)
class Pattern:
    """A glob (the whole value, case-insensitive) or ``re:<regular expression>``
    (searched, case-insensitive)."""

    text: str
    regex: re.Pattern[str] = field(compare=False)

    @classmethod
    def parse(cls, text: str) -> Pattern:
        text = unicodedata.normalize("NFC", text)
        if text.startswith("re:"):
            source = text[3:]
            if not source:
                raise ValueError("an empty regular expression")
            try:
                return cls(text, re.compile(source, re.IGNORECASE))
            except re.error as exc:
                raise ValueError(f"not a regular expression ({exc})") from None
        if not text:
            raise ValueError("an empty pattern")
        return cls(text, re.compile(fnmatch.translate(text), re.IGNORECASE | re.DOTALL))

    @property
    def is_regex(self) -> bool:
        return self.text.startswith("re:")

    def matches(self, value: str) -> bool:
        value = unicodedata.normalize("NFC", value)  # "ü" whether written as one or two
        if self.is_regex:
            return self.regex.search(value) is not None
        return self.regex.match(value) is not None

    def literal(self, unsafe: re.Pattern[str]) -> str:
        """Text every value this pattern matches contains, as any server compares it
        (what IMAP SEARCH, a substring search, may be asked for), or "" when there is
        none worth asking: the longest run of the pattern's plain text without a
        character ``unsafe`` finds (see the filters' own in ``_SEARCHED``)."""
        if self.is_regex:
            return ""
        plain = _GLOB.sub("\x00", _BRACKETS.sub("\x00", self.text))  # a wildcard splits
        runs = unsafe.split(plain)
        longest = max(runs, key=len, default="")
        return longest if len(longest.strip()) >= 3 else ""


@dataclass(frozen=True)
class Rule:
    name: str
    filters: Mapping[str, tuple[Pattern, ...]] = field(default_factory=dict)
    max_age: int | None = None  # seconds
    filenames: tuple[Pattern, ...] = ()
    exclude_filenames: tuple[Pattern, ...] = ()
    actions: tuple[str, ...] | None = None  # None: not set by this rule
    type: str | None = None
    types: tuple[tuple[Pattern, str], ...] = ()
    note: str | None = None
    agent_email: str | None = None
    stop: bool = False


@dataclass(frozen=True)
class MailFacts:
    """What the filters look at, taken from one mail."""

    sender: str
    recipients: tuple[str, ...]
    subject: str
    body: str
    age: float | None  # seconds between its arrival and its fetch; None when unknown


@dataclass(frozen=True)
class Verdict:
    """What an inbox's rules decide for one mail."""

    applied: tuple[Rule, ...]
    # for each rule that did not apply, why: (rule name, the filter that failed)
    passed_over: tuple[tuple[str, str], ...] = ()
    ruled: bool = True  # the inbox has rules

    @property
    def taken(self) -> bool:
        return not self.ruled or bool(self.applied)

    @property
    def names(self) -> str:
        return ", ".join(rule.name for rule in self.applied)

    def why_not(self) -> str:
        """The reason a mail no rule takes is left alone, naming each rule's failure."""
        return "no rule takes it (" + "; ".join(f"{n}: {w}" for n, w in self.passed_over) + ")"

    def _first(self, attribute: str) -> object:
        for rule in self.applied:
            value = getattr(rule, attribute)
            if value is not None:
                return value
        return None

    def note(self, default: str) -> str:
        found = self._first("note")
        return default if found is None else str(found)

    def agent_email(self, default: str | None) -> str | None:
        found = self._first("agent_email")
        return default if found is None else str(found)

    @property
    def actions(self) -> tuple[str, ...]:
        found = self._first("actions")
        return DEFAULT_ACTIONS if found is None else tuple(found)  # type: ignore[arg-type]

    def excluded(self, filename: str) -> str | None:
        """Why a rule leaves this document out, or None when every applied rule takes it."""
        for rule in self.applied:
            if rule.filenames and not any(p.matches(filename) for p in rule.filenames):
                return f"rule {rule.name}: not one of {', '.join(p.text for p in rule.filenames)}"
            for pattern in rule.exclude_filenames:
                if pattern.matches(filename):
                    return f"rule {rule.name}: excluded by {pattern.text}"
        return None

    def type_for(self, filename: str) -> str | None:
        """The type the rules assign this document, or None (the keywords decide)."""
        for rule in self.applied:
            for pattern, kind in rule.types:
                if pattern.matches(filename):
                    return kind
        found = self._first("type")
        return None if found is None else str(found)


NO_RULES = Verdict((), ruled=False)


def facts_of(mail: ParsedMail, *, arrived: datetime | None, fetched: datetime) -> MailFacts:
    """What the filters of a rule read of ``mail``: its age from its arrival (the
    server's INTERNALDATE, else its Date:) to its fetch."""
    arrived = arrived or mail.date
    age = (fetched - arrived).total_seconds() if arrived is not None else None
    return MailFacts(
        sender=mail.sender or "",
        recipients=mail.recipients,
        subject=mail.subject,
        body=mail.body,
        age=age,
    )


def applied_to(screened: Screened, verdict: Verdict) -> Screened:
    """The screened mail as the applied rules take it: each document their filename
    filters leave out is skipped (a note says which rule), each typed as they assign;
    a mail left with no document is refused for that."""
    if not verdict.applied or not screened.documents:
        return screened
    kept: list[ScreenedDocument] = []
    notes = list(screened.notes)
    for doc in screened.documents:
        filename = f"{doc.spec.name}.{doc.spec.extension}"
        why = verdict.excluded(filename)
        if why is not None:
            notes.append(f"skipped part {doc.spec.index} ({filename}): {why}")
            continue
        kind = verdict.type_for(filename)
        kept.append(doc if kind is None else replace(doc, spec=replace(doc.spec, type=kind)))
    if kept:
        return replace(screened, documents=tuple(kept), notes=tuple(notes))
    left_out = "; ".join(n for n in notes if n.startswith("skipped"))
    refusal = "; ".join([f"no documents attached ({left_out})", *screened.refused])
    return replace(screened, documents=(), notes=tuple(notes), refusal=refusal)


def decide(rules: Sequence[Rule], facts: MailFacts) -> Verdict:
    """Which rules apply to a mail, in order, up to the first applied ``stop``."""
    if not rules:
        return NO_RULES
    applied: list[Rule] = []
    passed_over: list[tuple[str, str]] = []
    for rule in rules:
        failed = _failed_filter(rule, facts)
        if failed is not None:
            passed_over.append((rule.name, failed))
            continue
        applied.append(rule)
        if rule.stop:
            break
    return Verdict(tuple(applied), tuple(passed_over))


def _failed_filter(rule: Rule, facts: MailFacts) -> str | None:
    values: dict[str, Iterable[str]] = {
        "from": [facts.sender],
        "to": facts.recipients,
        "subject": [facts.subject],
        "body": [facts.body],
    }
    for name, patterns in rule.filters.items():
        if not any(p.matches(v) for p in patterns for v in values[name]):
            return f"{name} is not {' or '.join(p.text for p in patterns)}"
    if rule.max_age is not None and facts.age is not None and facts.age > rule.max_age:
        return f"older than max_age ({int(facts.age)} s > {rule.max_age} s)"
    return None


@dataclass(frozen=True)
class ImapActions:
    """A mail's recorded actions as IMAP does them: flags and keywords set before it is
    filed, and whether it is copied (it stays in the inbox) rather than moved."""

    flags: tuple[str, ...] = ()
    keywords: tuple[str, ...] = ()
    copy: bool = False


_FLAGS = {"mark_read": "\\Seen", "flag": "\\Flagged"}


def imap_actions(recorded: str) -> ImapActions:
    """``MailRecord.actions`` ("copy,mark_read,keyword:Filed"; "": move) for IMAP."""
    actions = [a for a in recorded.split(",") if a]
    return ImapActions(
        flags=tuple(_FLAGS[a] for a in actions if a in _FLAGS),
        keywords=tuple(a[len(KEYWORD) :] for a in actions if a.startswith(KEYWORD)),
        copy="copy" in actions,
    )


# -- IMAP SEARCH ------------------------------------------------------------------


def search_criteria(rules: Sequence[Rule], now: datetime) -> list[object] | None:
    """IMAP SEARCH criteria that every mail some rule could take matches (a superset:
    the rules decide on the mail itself), or None when the server cannot narrow it
    (no rules, or a rule whose filters it cannot express).

    A rule asks, per filter, for a substring its patterns share as every server
    compares it (``_SEARCHED``; any of a list: ``OR``) and ``SINCE`` for ``max_age``
    (a day before the day it reaches back to: SINCE counts whole days, in the server's
    time zone, which may be a day behind UTC); rules are ``OR``-ed. All of it ASCII.
    """
    if not rules:
        return None
    per_rule: list[list[object]] = []
    for rule in rules:
        terms: list[object] = []
        for name, patterns in rule.filters.items():
            if name not in _SEARCHED:
                continue  # the body: decided on the mail alone
            keyword, unsafe = _SEARCHED[name]
            literals = [p.literal(unsafe) for p in patterns]
            if not all(literals):
                continue  # the server cannot narrow this filter: it is decided here alone
            terms += _any([[keyword, literal] for literal in literals])
        if rule.max_age is not None:
            reach = (now - timedelta(seconds=rule.max_age)).astimezone(UTC).date()
            terms += ["SINCE", reach - timedelta(days=1)]
        if not terms:
            return None  # this rule could take any mail
        per_rule.append(terms)
    return _any(per_rule)


def _any(choices: list[list[object]]) -> list[object]:
    """Criteria matching any of ``choices``: ``OR (a) (OR (b) (c))``."""
    if len(choices) == 1:
        return choices[0]
    return ["OR", choices[0], _any(choices[1:])]


# -- reading the configuration ----------------------------------------------------


def parse_rules(tables: object, where: str = "rules") -> tuple[Rule, ...]:
    """The rules of one inbox from its ``rules`` list of tables; RuleError names the first
    key that is wrong."""
    if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
        raise RuleError(where, "must be a list of tables ([[inboxes.rules]])")
    rules = []
    names: set[str] = set()
    for number, table in enumerate(tables, 1):
        rule = parse_rule(table, f"{where}[{number}]")
        if rule.name in names:
            raise RuleError(f"{where}[{number}].name", f"{rule.name!r} names two rules")
        names.add(rule.name)
        rules.append(rule)
    return tuple(rules)


def parse_rule(table: Mapping[str, object], where: str) -> Rule:
    for key in table:
        if key not in _KEYS:
            guess = difflib.get_close_matches(key, sorted(_KEYS), n=1)
            hint = f"; did you mean {guess[0]}?" if guess else ""
            raise RuleError(f"{where}.{key}", "is not a rule key" + hint)
    name = table.get("name")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise RuleError(f"{where}.name", "is required: 1-64 printable characters")
    where = f"{where} ({name})"
    filters = {key: _patterns(table[key], f"{where}.{key}") for key in FILTERS if key in table}
    rule = Rule(
        name=name,
        filters=filters,
        max_age=_age(table["max_age"], f"{where}.max_age") if "max_age" in table else None,
        filenames=_patterns(table.get("filenames", []), f"{where}.filenames", empty=True),
        exclude_filenames=_patterns(
            table.get("exclude_filenames", []), f"{where}.exclude_filenames", empty=True
        ),
        actions=_actions(table["actions"], f"{where}.actions") if "actions" in table else None,
        type=_type(table["type"], f"{where}.type") if "type" in table else None,
        types=_types(table.get("types", {}), f"{where}.types"),
        note=_text(table, "note", where),
        agent_email=_email(table, where),
        stop=_bool(table.get("stop", False), f"{where}.stop"),
    )
    return rule


def _patterns(value: object, where: str, *, empty: bool = False) -> tuple[Pattern, ...]:
    items = value if isinstance(value, list) else [value]
    if not items and not empty:
        raise RuleError(where, "is an empty list")
    out = []
    for item in items:
        if not isinstance(item, str):
            raise RuleError(where, f"must be a pattern (a string) or a list of them, got {item!r}")
        if _CONTROL.search(item):
            raise RuleError(where, f"{item!r} holds a control character (a line break?)")
        try:
            out.append(Pattern.parse(item))
        except ValueError as exc:
            raise RuleError(where, f"{item!r} is {exc}") from None
    return tuple(out)


def _age(value: object, where: str) -> int:
    seconds = 0
    if isinstance(value, int) and not isinstance(value, bool):
        seconds = value
    elif isinstance(value, str) and (match := _AGE.fullmatch(value.strip())):
        seconds = int(match[1]) * _UNITS[match[2]]
    if not 0 < seconds <= MAX_AGE:
        raise RuleError(
            where,
            f'must be a duration such as "30d", "12h" or 3600, at most 10 years, got {value!r}',
        )
    return seconds


def _actions(value: object, where: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise RuleError(where, "must be a list of actions")
    places = [v for v in value if v in PLACE_ACTIONS]
    if len(places) > 1:
        raise RuleError(where, "may hold one of move and copy")
    for action in value:
        if action in PLACE_ACTIONS or action in FLAG_ACTIONS:
            continue
        if action.startswith(KEYWORD):
            keyword = action[len(KEYWORD) :]
            if not _ATOM.fullmatch(keyword) or keyword.startswith("\\"):
                raise RuleError(
                    where, f"{action!r}: a keyword is 1-50 letters, digits or $-_.:/ and no space"
                )
            continue
        if action in ("delete", "expunge", "trash"):
            raise RuleError(where, f"{action!r}: mailingest never deletes mail")
        raise RuleError(
            where,
            f"{action!r} is not an action (move, copy, mark_read, flag, keyword:NAME)",
        )
    return tuple(value) if places else ("move", *value)


def _type(value: object, where: str) -> str:
    if value not in DOCUMENT_TYPES:
        raise RuleError(where, f"must be one of {', '.join(DOCUMENT_TYPES)}, got {value!r}")
    return str(value)


def _types(value: object, where: str) -> tuple[tuple[Pattern, str], ...]:
    if not isinstance(value, dict):
        raise RuleError(where, 'must be a table of filename glob = type ("*pass*" = "passport")')
    out = []
    for glob, kind in value.items():
        (pattern,) = _patterns(glob, f"{where}.{glob!r}")
        out.append((pattern, _type(kind, f"{where}.{glob!r}")))
    return tuple(out)


def _text(table: Mapping[str, object], key: str, where: str) -> str | None:
    value = table.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip() or len(value) > 1000:
        raise RuleError(f"{where}.{key}", "must be a text of 1-1000 characters")
    if key != "note" and _CONTROL.search(value):
        raise RuleError(f"{where}.{key}", "holds a control character")
    return value


def _email(table: Mapping[str, object], where: str) -> str | None:
    value = _text(table, "agent_email", where)
    if value is not None and not EMAIL.fullmatch(value):
        raise RuleError(f"{where}.agent_email", f"must be an e-mail address, got {value!r}")
    return value


def _bool(value: object, where: str) -> bool:
    if not isinstance(value, bool):
        raise RuleError(where, f"must be true or false, got {value!r}")
    return value


def describe(rule: Rule) -> str:
    """One line saying what a rule does, for ``check-config`` and ``explain``."""
    parts = [f"{name} {' | '.join(p.text for p in ps)}" for name, ps in rule.filters.items()]
    if rule.max_age is not None:
        parts.append(f"max_age {rule.max_age} s")
    if rule.filenames:
        parts.append(f"filenames {' | '.join(p.text for p in rule.filenames)}")
    if rule.exclude_filenames:
        parts.append(f"not {' | '.join(p.text for p in rule.exclude_filenames)}")
    then = []
    if rule.type:
        then.append(f"type {rule.type}")
    then += [f"type {kind} for {p.text}" for p, kind in rule.types]
    if rule.note is not None:
        then.append("its own note")
    if rule.agent_email:
        then.append(f"agent {rule.agent_email}")
    if rule.actions is not None:
        then.append(" + ".join(rule.actions))
    if rule.stop:
        then.append("stop")
    return (
        f"{rule.name}: "
        + (", ".join(parts) or "every mail")
        + (" -> " + ", ".join(then) if then else "")
    )
