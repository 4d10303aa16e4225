"""Inbox rules (issue 13, part 4), the pure part: reading them from TOML, which apply to
a mail, what they assign, and what IMAP SEARCH they ask the server for. The rules on
the real IMAP server are in tests/test_rules_e2e.py."""

from __future__ import annotations

import tomllib
from datetime import UTC, date, datetime
from email.message import EmailMessage
from pathlib import Path

import pytest
from mailingest_testbed.samples import jpeg_bytes, pdf_bytes

from mailingest.config.settings import load_settings
from mailingest.core import rules
from mailingest.core.errors import ConfigError
from mailingest.core.rules import MailFacts, Pattern, RuleError, decide, parse_rules
from mailingest.core.screening import Limits, screen

NOW = datetime(2026, 12, 4, 12, 0, tzinfo=UTC)


def read(text: str) -> tuple[rules.Rule, ...]:
    return parse_rules(tomllib.loads(text)["rules"])


def facts(**changes: object) -> MailFacts:
    base: dict[str, object] = {
        "sender": "dana@example.com",
        "recipients": ("documents@support.example",),
        "subject": "My passport",
        "body": "Hello, attached is my passport.",
        "age": 3600.0,
    }
    return MailFacts(**(base | changes))  # type: ignore[arg-type]


# -- patterns ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "value", "matches"),
    [
        ("*@bank.example", "statements@bank.example", True),
        ("*@bank.example", "statements@bank.example.evil", False),  # the whole value
        ("*@BANK.example", "x@bank.EXAMPLE", True),  # case-insensitive
        ("*passport*", "Re: my PASSPORT scan", True),
        ("passport", "my passport", False),  # a glob without * is the whole value
        ("re:pass(port)?", "my passport", True),  # a regex is searched
        ("re:^invoice \\d+$", "Invoice 42", True),
        ("re:^invoice \\d+$", "Re: Invoice 42", False),
        ("*Führerschein*", "Mein führerschein", True),
        ("*Führerschein*", "Mein Fu\u0308hrerschein", True),  # ü as u + combining mark
        ("scan_?.pdf", "scan_1.pdf", True),
        ("[!x]*.pdf", "a.pdf", True),
    ],
)
def test_a_pattern_is_a_glob_of_the_whole_value_or_a_searched_regex(
    pattern: str, value: str, matches: bool
) -> None:
    assert Pattern.parse(pattern).matches(value) is matches


@pytest.mark.parametrize(
    ("filter_", "pattern", "asked"),
    [
        ("from", "*@bank.example", ["FROM", "@bank.example"]),  # the parsed address
        ("subject", "*invoice*2026*", ["SUBJECT", "2026"]),  # the longest safe run
        ("subject", "*passport*", ["SUBJECT", "port"]),
        ("subject", "*Führerschein*", ["SUBJECT", "hrer"]),  # ASCII alone: no CHARSET
        ("subject", "[ab]cde*", ["SUBJECT", "cde"]),
        ("to", "documents@*", ["TEXT", "document"]),  # no @: "documents (desk)@"
        ("subject", "re:invoice", None),  # a regex is decided on the mail alone
        ("subject", "*kimlik*", None),  # nothing safe is left to ask for
        ("subject", "*a*", None),  # too short to be worth a search
        ("to", "kyc@*", None),
        ("body", "*reference AB-*", None),  # an HTML body writes &eacute; for é
    ],
)
def test_the_server_is_asked_only_for_text_it_compares_as_the_rule_does(
    filter_: str, pattern: str, asked: list[str] | None
) -> None:
    """IMAP SEARCH must find every mail the rule takes (a superset): only ASCII is
    asked, in free text without i, s or k (Python folds the dotted capital I, the
    dotless i, the long s and the Kelvin sign into them, Dovecot does not), in the
    recipients' headers without @ or a space, never the body."""
    key = f"{filter_} = {pattern!r}".replace("'", '"')
    listed = read(f'[[rules]]\nname = "r"\n{key}')
    assert rules.search_criteria(listed, NOW) == asked


# -- reading rules -------------------------------------------------------------------

FULL = """
[[rules]]
name = "bank statements"
from = "*@bank.example"
subject = ["*statement*", "re:kontoauszug"]
max_age = "30d"
filenames = ["*.pdf"]
exclude_filenames = ["logo*"]
type = "utility"
note = "Bank statement from e-mail"
agent_email = "kyc-bank@support.example"
actions = ["copy", "mark_read", "keyword:Filed"]
stop = true

[[rules]]
name = "everything else"
[rules.types]
"*pass*" = "passport"
"*licen?e*" = "license"
"""


def test_a_complete_rule_is_read_as_written() -> None:
    bank, rest = read(FULL)
    assert bank.name == "bank statements" and bank.stop
    assert [p.text for p in bank.filters["subject"]] == ["*statement*", "re:kontoauszug"]
    assert bank.max_age == 30 * 86400
    assert bank.actions == ("copy", "mark_read", "keyword:Filed")
    assert (bank.type, bank.note, bank.agent_email) == (
        "utility",
        "Bank statement from e-mail",
        "kyc-bank@support.example",
    )
    assert rest.filters == {} and not rest.stop and rest.actions is None
    assert [(p.text, kind) for p, kind in rest.types] == [
        ("*pass*", "passport"),
        ("*licen?e*", "license"),
    ]


@pytest.mark.parametrize(
    ("toml", "where", "problem"),
    [
        ('[[rules]]\nfrom = "x"', "rules[1].name", "is required"),
        ('[[rules]]\nname = "a"\nfrm = "x"', "rules[1].frm", "did you mean from?"),
        ('[[rules]]\nname = "a"\nsubject = "re:("', "subject", "not a regular expression"),
        ('[[rules]]\nname = "a"\nsubject = []', "subject", "is an empty list"),
        ('[[rules]]\nname = "a"\nmax_age = "soon"', "max_age", "must be a duration"),
        ('[[rules]]\nname = "a"\nmax_age = 0', "max_age", "must be a duration"),
        ('[[rules]]\nname = "a"\nactions = ["delete"]', "actions", "never deletes"),
        ('[[rules]]\nname = "a"\nactions = ["move", "copy"]', "actions", "one of move and"),
        ('[[rules]]\nname = "a"\nactions = ["keyword:a b"]', "actions", "no space"),
        ('[[rules]]\nname = "a"\nactions = ["archive"]', "actions", "is not an action"),
        ('[[rules]]\nname = "a"\ntype = "selfie"', "type", "must be one of contract"),
        ('[[rules]]\nname = "a"\ntypes = {"*x*" = "y"}', "types", "must be one of"),
        ('[[rules]]\nname = "a"\nagent_email = "bob"', "agent_email", "e-mail address"),
        ('[[rules]]\nname = "a"\nstop = "yes"', "stop", "true or false"),
        ('[[rules]]\nname = "a"\n[[rules]]\nname = "a"', "rules[2].name", "names two rules"),
    ],
)
def test_a_wrong_rule_is_refused_naming_the_key(toml: str, where: str, problem: str) -> None:
    with pytest.raises(RuleError) as caught:
        read(toml)
    assert where in caught.value.where and problem in caught.value.problem


def test_start_up_refuses_a_wrong_rule_naming_the_file_the_inbox_and_the_key(
    tmp_path: Path,
) -> None:
    config = tmp_path / "mailingest.toml"
    config.write_text(
        'redis_url = "redis://localhost:1/0"\n'
        '[[inboxes]]\nname = "eu"\nimap_host = "imap.example"\n'
        '[[inboxes.rules]]\nname = "bank"\nsubject = "re:(unclosed"\n',
        encoding="utf-8",
    )
    with pytest.raises(ConfigError) as caught:
        load_settings({"MAILINGEST_CONFIG": str(config)})
    text = str(caught.value)
    assert "mailingest.toml: inboxes[eu].rules[1] (bank).subject" in text, text
    assert "not a regular expression" in text


def test_rules_are_read_into_their_inbox_and_only_there(tmp_path: Path) -> None:
    config = tmp_path / "mailingest.toml"
    config.write_text(
        'redis_url = "redis://localhost:1/0"\n'
        '[[inboxes]]\nname = "eu"\nimap_host = "imap.example"\n'
        '[[inboxes.rules]]\nname = "bank"\nfrom = "*@bank.example"\n'
        '[[inboxes]]\nname = "us"\nimap_host = "imap.example"\nimap_folder = "US"\n',
        encoding="utf-8",
    )
    settings = load_settings({"MAILINGEST_CONFIG": str(config)})
    assert [r.name for r in settings.inbox("eu").rules] == ["bank"]
    assert settings.inbox("us").rules == ()
    config.write_text(
        'redis_url = "redis://localhost:1/0"\n[[rules]]\nname = "x"\n', encoding="utf-8"
    )
    with pytest.raises(ConfigError, match=r"rules belong to an inbox"):
        load_settings({"MAILINGEST_CONFIG": str(config)})


# -- which rules apply -------------------------------------------------------------


def test_without_rules_every_mail_is_taken_as_before() -> None:
    verdict = decide((), facts())
    assert verdict.taken and not verdict.ruled and verdict.actions == ("move",)
    assert verdict.note("inbox note") == "inbox note"


def test_every_matching_rule_applies_until_one_says_stop() -> None:
    listed = read(
        """
        [[rules]]
        name = "passport subject"
        subject = "*passport*"
        type = "passport"
        [[rules]]
        name = "from customers"
        from = "*@example.com"
        note = "From a customer"
        stop = true
        [[rules]]
        name = "never reached"
        note = "no"
        """
    )
    verdict = decide(listed, facts())
    assert [r.name for r in verdict.applied] == ["passport subject", "from customers"]
    assert verdict.note("inbox") == "From a customer"
    assert verdict.type_for("scan.pdf") == "passport"
    other = decide(listed, facts(subject="hello", sender="x@elsewhere.example"))
    assert [r.name for r in other.applied] == ["never reached"]


def test_a_mail_no_rule_takes_is_left_with_each_rules_reason() -> None:
    listed = read(
        """
        [[rules]]
        name = "bank"
        from = "*@bank.example"
        [[rules]]
        name = "recent"
        to = "documents@*"
        max_age = "1d"
        """
    )
    verdict = decide(listed, facts(age=3 * 86400.0))
    assert not verdict.taken
    assert verdict.why_not() == (
        "no rule takes it (bank: from is not *@bank.example; "
        "recent: older than max_age (259200 s > 86400 s))"
    )
    assert decide(listed, facts(age=None)).taken  # an unknown age is not too old


@pytest.mark.parametrize(
    ("field", "value", "taken"),
    [
        ("to", ("someone@else.example", "documents@support.example"), True),  # any recipient
        ("to", ("someone@else.example",), False),
        ("body", "Please find my PASSPORT attached", True),
        ("body", "Nothing here", False),
    ],
)
def test_to_matches_any_recipient_and_body_reads_the_text(
    field: str, value: object, taken: bool
) -> None:
    listed = read(
        '[[rules]]\nname = "r"\n'
        + ('to = "documents@*"' if field == "to" else 'body = "re:\\\\bpassport\\\\b"')
    )
    key = "recipients" if field == "to" else field
    assert decide(listed, facts(**{key: value})).taken is taken


def test_filename_filters_of_every_applied_rule_must_let_a_document_through() -> None:
    listed = read(
        """
        [[rules]]
        name = "pdf only"
        filenames = ["*.pdf", "*.jpg"]
        [[rules]]
        name = "no logos"
        exclude_filenames = ["logo*"]
        """
    )
    verdict = decide(listed, facts())
    assert verdict.excluded("passport.pdf") is None
    assert verdict.excluded("notes.txt") == "rule pdf only: not one of *.pdf, *.jpg"
    assert verdict.excluded("logo.jpg") == "rule no logos: excluded by logo*"


def test_rules_filter_and_type_the_screened_documents() -> None:
    msg = EmailMessage()
    msg["From"], msg["Subject"] = "dana@example.com", "documents"
    msg.set_content("see attached")
    msg.add_attachment(pdf_bytes("p", 2000), maintype="application", subtype="pdf",
                       filename="my-passport.pdf")  # fmt: skip
    msg.add_attachment(jpeg_bytes(6000), maintype="image", subtype="jpeg", filename="logo.jpg")
    listed = read(
        '[[rules]]\nname = "r"\nexclude_filenames = ["logo*"]\n'
        '[rules.types]\n"*passport*" = "contract"\n'
    )
    screened = screen(msg.as_bytes(), Limits(), None)
    verdict = decide(listed, facts())
    taken = rules.applied_to(screened, verdict)
    assert [(d.spec.name, d.spec.type) for d in taken.documents] == [("my-passport", "contract")]
    assert "skipped part 2 (logo.jpg): rule r: excluded by logo*" in taken.notes
    only_logo = read('[[rules]]\nname = "r"\nfilenames = ["*.png"]\n')
    refused = rules.applied_to(screened, decide(only_logo, facts()))
    assert refused.documents == () and refused.refusal is not None
    assert refused.refusal.startswith("no documents attached (skipped part 1")


def test_actions_become_imap_flags_keywords_and_copy() -> None:
    assert rules.imap_actions("") == rules.ImapActions()
    acts = rules.imap_actions("copy,mark_read,flag,keyword:Filed,keyword:$KYC")
    assert acts.copy and acts.flags == ("\\Seen", "\\Flagged")
    assert acts.keywords == ("Filed", "$KYC")
    assert read('[[rules]]\nname = "r"\nactions = ["flag"]')[0].actions == ("move", "flag")


# -- IMAP SEARCH ----------------------------------------------------------------------


def test_the_server_is_asked_for_what_it_can_answer_rules_ored() -> None:
    listed = read(
        """
        [[rules]]
        name = "bank"
        from = "*@bank.example"
        subject = ["*statement*", "*Kontoauszug*"]
        max_age = "2d"
        [[rules]]
        name = "documents"
        to = "documents@*"
        """
    )
    assert rules.search_criteria(listed, NOW) == [
        "OR",
        [
            "FROM",
            "@bank.example",
            "OR",
            ["SUBJECT", "tatement"],
            ["SUBJECT", "ontoau"],
            "SINCE",
            date(2026, 12, 1),
        ],
        ["TEXT", "document"],
    ]


def test_since_reaches_a_day_before_even_for_hours() -> None:
    """SINCE is a day in the server's time zone, which may be behind UTC: at 03:00 UTC,
    max_age = 20h reaches back to 07:00 UTC the day before, which is the day before
    that in California."""
    listed = read('[[rules]]\nname = "r"\nmax_age = "20h"')
    at_three = datetime(2026, 12, 4, 3, 0, tzinfo=UTC)
    assert rules.search_criteria(listed, at_three) == ["SINCE", date(2026, 12, 2)]


def test_a_rule_the_server_cannot_narrow_means_no_narrowing() -> None:
    assert rules.search_criteria((), NOW) is None
    assert rules.search_criteria(read('[[rules]]\nname = "all"'), NOW) is None
    regex_only = read('[[rules]]\nname = "r"\nsubject = "re:^invoice"')
    assert rules.search_criteria(regex_only, NOW) is None
    either = read('[[rules]]\nname = "r"\nsubject = ["*passport*", "*kimlik*"]')
    assert rules.search_criteria(either, NOW) is None  # one of them cannot be asked


@pytest.mark.parametrize(
    ("toml", "problem"),
    [
        ('subject = "*invoice\\r\\nX1 UID MOVE 1:* Elsewhere*"', "control character"),
        ('max_age = "1000000d"', "at most 10 years"),
        ("max_age = 9223372036854775807", "at most 10 years"),
        ('actions = ["keyword:' + "x" * 51 + '"]', "1-50 letters"),
    ],
)
def test_what_a_server_would_take_as_a_command_or_refuse_is_refused_at_start_up(
    toml: str, problem: str
) -> None:
    with pytest.raises(RuleError, match=problem):
        read(f'[[rules]]\nname = "r"\n{toml}')


def test_describe_says_what_a_rule_does_in_one_line() -> None:
    bank, rest = read(FULL)
    line = rules.describe(bank)
    assert line.startswith("bank statements: from *@bank.example, subject *statement* |")
    assert "type utility" in line and "copy + mark_read + keyword:Filed" in line
    assert line.endswith("stop")
    assert rules.describe(rest).startswith("everything else: every mail -> type passport")


def test_the_readme_example_is_a_valid_configuration(tmp_path: Path) -> None:
    """The complete example of README.md's rules section loads as it is written."""
    readme = (Path(__file__).parent.parent / "README.md").read_text(encoding="utf-8")
    section = readme.split("### Which mail an inbox takes: rules", 1)[1]
    example = section.split("```toml\n", 1)[1].split("```", 1)[0]
    config = tmp_path / "mailingest.toml"
    config.write_text('redis_url = "redis://localhost:1/0"\n' + example, encoding="utf-8")
    settings = load_settings({"MAILINGEST_CONFIG": str(config)})
    bank, customers = settings.inbox("kyc").rules
    assert bank.stop and bank.actions == ("copy", "mark_read", "keyword:Filed")
    assert bank.filters["subject"][1].matches("Ihr Kontoauszug  12")
    assert customers.actions == ("move", "flag") and len(customers.types) == 3
