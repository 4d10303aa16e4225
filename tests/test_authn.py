"""Authentication-Results: does our receiving server vouch for the From: domain?

The headers below are written by hand after the formats of Gmail / Google
Workspace, Microsoft 365 (Exchange Online Protection) and Postfix with
OpenDKIM / OpenDMARC. Values are header *values* (no "Authentication-Results:"
name), folded as they appear on the wire.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailingest.core.sender_auth import (
    AuthPolicy,
    MethodResult,
    Verdict,
    evaluate,
    normalise_domain,
    organizational_domain,
    parse_authentication_results,
)

OURS = "mx.support.example"
POLICY = AuthPolicy(trusted_authserv_ids=(OURS,))
DKIM = AuthPolicy(trusted_authserv_ids=(OURS,), accept=("dkim",))
SPF = AuthPolicy(trusted_authserv_ids=(OURS,), accept=("spf",))

GMAIL_PASS = (
    "mx.google.com;\r\n"
    "       dkim=pass header.i=@example.com header.s=20230601 header.b=Kq3vZ+8x;\r\n"
    "       spf=pass (google.com: domain of alice@example.com designates 209.85.220.41 as"
    " permitted sender) smtp.mailfrom=alice@example.com;\r\n"
    "       dmarc=pass (p=REJECT sp=REJECT dis=NONE) header.from=example.com"
)

M365 = (
    "spf=pass (sender IP is 40.107.22.51)\r\n"
    " smtp.mailfrom=example.com; dkim=pass (signature was verified)\r\n"
    " header.d=example.com;dmarc=pass action=none\r\n"
    " header.from=example.com;compauth=pass reason=100"
)


def ours(results: str) -> str:
    """An OpenDMARC-style header by our server: "mx.support.example; <results>"."""
    return f"{OURS}; {results}"


def check_reason(verdict: Verdict) -> None:
    assert "\r" not in verdict.reason and "\n" not in verdict.reason
    assert 0 < len(verdict.reason) <= 300


# --------------------------------------------------------------------------
# Parsing
# --------------------------------------------------------------------------


def test_parse_gmail_header() -> None:
    authserv_id, results = parse_authentication_results(GMAIL_PASS)
    assert authserv_id == "mx.google.com"
    assert results == [
        MethodResult(
            "dkim",
            "pass",
            {"header.i": "@example.com", "header.s": "20230601", "header.b": "Kq3vZ+8x"},
        ),
        MethodResult("spf", "pass", {"smtp.mailfrom": "alice@example.com"}),
        MethodResult("dmarc", "pass", {"header.from": "example.com"}),
    ]


def test_parse_microsoft_365_header_has_no_authserv_id() -> None:
    authserv_id, results = parse_authentication_results(M365)
    assert authserv_id == ""
    assert [(r.method, r.result) for r in results] == [
        ("spf", "pass"),
        ("dkim", "pass"),
        ("dmarc", "pass"),
        ("compauth", "pass"),
    ]
    assert results[1].properties == {"header.d": "example.com"}
    assert results[2].properties == {"action": "none", "header.from": "example.com"}
    assert results[3].properties == {"reason": "100"}


def test_parse_opendkim_header_with_version_comments_and_tabs() -> None:
    value = (
        "mail.support.example 1;\r\n"
        "\tdkim=pass (2048-bit key; unprotected) header.d=example.com\r\n"
        "\theader.i=@example.com header.a=rsa-sha256 header.s=s1 header.b=AbCd1234;\r\n"
        "\tdkim-atps=neutral"
    )
    authserv_id, results = parse_authentication_results(value)
    assert authserv_id == "mail.support.example"
    assert results[0] == MethodResult(
        "dkim",
        "pass",
        {
            "header.d": "example.com",
            "header.i": "@example.com",
            "header.a": "rsa-sha256",
            "header.s": "s1",
            "header.b": "AbCd1234",
        },
    )
    assert results[1] == MethodResult("dkim-atps", "neutral", {})


def test_parse_none_and_version() -> None:
    assert parse_authentication_results("mx.support.example 1; none") == (OURS, [])
    assert parse_authentication_results("mx.support.example; none") == (OURS, [])
    assert parse_authentication_results("MX.Support.Example") == (OURS, [])


def test_parse_quoting_nested_comments_and_odd_spacing() -> None:
    value = (
        '(leading (nested) comment) "MX.support.example" (c) ;\r\n'
        '  (pre) DKIM / 1 (x) = (y) Pass (z) reason="good; really"\r\n'
        '    header . d=ignored header.D = "Example.COM" ;\r\n'
        '  spf=pass smtp.mailfrom="john doe"@bounce.example.com ;;'
    )
    authserv_id, results = parse_authentication_results(value)
    assert authserv_id == OURS
    # "DKIM / 1" splits into several words: that segment is not a result.
    assert [r.method for r in results] == ["spf"]
    assert results[0].properties["smtp.mailfrom"] == "john doe@bounce.example.com"

    value = ours('dkim/1=Pass (z) reason="good; really" header.D = "Example.COM" header.b=ab==')
    _, results = parse_authentication_results(value)
    assert results == [
        MethodResult(
            "dkim",
            "pass",
            {"reason": "good; really", "header.d": "Example.COM", "header.b": "ab=="},
        )
    ]


def test_parse_missing_semicolon_does_not_hide_a_result() -> None:
    _, results = parse_authentication_results(
        ours("dkim=pass header.d=example.com dmarc=fail header.from=example.com")
    )
    assert [(r.method, r.result) for r in results] == [("dkim", "pass"), ("dmarc", "fail")]


@pytest.mark.parametrize(
    "garbage",
    [
        "",
        " ",
        ";",
        "=",
        "((((",
        "))",
        '"',
        "a b c d; dmarc=pass",
        "mx.support.example 1 2; dmarc=pass",
        "mx.support.example; (unterminated dmarc=pass",
        'mx.support.example; dmarc=pass header.from="example.com',
        "mx@support; dmarc=pass",
        "\x00\x01\x02",
        "\udcff\ud800",
        "mx.support.example; " + "(" * 10_000,
        "mx.support.example; " + "dkim=pass " * 5_000,
        "x" * 200_000,
    ],
)
def test_parse_garbage_never_raises(garbage: str) -> None:
    authserv_id, results = parse_authentication_results(garbage)
    assert isinstance(authserv_id, str) and isinstance(results, list)
    verdict = evaluate([garbage], "alice@example.com", POLICY)
    assert not verdict.accepted
    check_reason(verdict)


def test_parse_non_string_is_garbage() -> None:
    assert parse_authentication_results(None) == ("", [])  # type: ignore[arg-type]
    assert parse_authentication_results(b"mx; dmarc=pass") == ("", [])  # type: ignore[arg-type]


# --------------------------------------------------------------------------
# Which header counts
# --------------------------------------------------------------------------


def test_gmail_dmarc_pass_is_accepted() -> None:
    verdict = evaluate([GMAIL_PASS], "alice@example.com", AuthPolicy(("MX.Google.COM",)))
    assert verdict == Verdict(True, "dmarc=pass by mx.google.com for example.com", "dmarc")


def test_no_trusted_header() -> None:
    verdict = evaluate([GMAIL_PASS], "alice@example.com", POLICY)
    assert verdict == Verdict(False, "no Authentication-Results from mx.support.example", None)
    assert not evaluate([], "alice@example.com", POLICY).accepted


def test_microsoft_365_header_without_authserv_id_is_never_trusted() -> None:
    assert not evaluate([M365], "alice@example.com", POLICY).accepted
    with pytest.raises(ValueError):
        AuthPolicy(trusted_authserv_ids=("",))


def test_forged_header_from_another_authserv_id_is_ignored() -> None:
    forged = (
        "mx.attacker.example; dmarc=pass header.from=example.com; dkim=pass header.d=example.com"
    )
    real = ours(
        "dkim=none; spf=softfail smtp.mailfrom=evil.example; dmarc=none header.from=example.com"
    )
    for headers in ([forged, real], [real, forged]):
        verdict = evaluate(headers, "alice@example.com", POLICY)
        assert not verdict.accepted
        assert verdict.reason.startswith("no accepted pass (dmarc) by mx.support.example")
        assert "dmarc=none" in verdict.reason
    assert not evaluate([forged], "alice@example.com", POLICY).accepted


def test_forged_header_with_our_id_below_the_real_one_loses() -> None:
    real = ours("dkim=none (no signatures); dmarc=none (p=none dis=none) header.from=example.com")
    forged = ours("dkim=pass header.d=example.com; dmarc=pass header.from=example.com")
    verdict = evaluate([real, forged], "alice@example.com", POLICY)
    assert not verdict.accepted
    assert "dmarc=none" in verdict.reason
    # ...and the other way round: a forged fail below a real pass does not spoil it.
    forged_fail = ours("dmarc=fail (p=reject) header.from=example.com")
    real_pass = ours("dmarc=pass (p=reject dis=none) header.from=example.com")
    assert evaluate([real_pass, forged_fail], "alice@example.com", POLICY).accepted


def test_malformed_topmost_trusted_header_does_not_fall_through() -> None:
    real = ours("dmarc=fail (p=reject header.from=example.com")  # unterminated comment
    forged = ours("dmarc=pass header.from=example.com")
    verdict = evaluate([real, forged], "alice@example.com", POLICY)
    assert verdict == Verdict(
        False, "Authentication-Results from mx.support.example could not be parsed", None
    )


def test_postfix_opendkim_opendmarc_only_the_topmost_counts() -> None:
    # OpenDMARC's header lands on top of OpenDKIM's: only the dmarc result is read.
    headers = [
        ours("dmarc=none (p=none dis=none) header.from=example.com"),
        ours("dkim=pass (2048-bit key) header.d=example.com header.i=@example.com"),
    ]
    assert not evaluate(headers, "alice@example.com", DKIM).accepted
    headers[0] = ours("dmarc=pass (p=quarantine dis=none) header.from=example.com")
    assert evaluate(headers, "alice@example.com", POLICY).accepted


def test_several_trusted_ids_and_other_hops_above() -> None:
    policy = AuthPolicy(trusted_authserv_ids=("edge.support.example", OURS))
    headers = [
        "filter.internal.example; spam=pass",
        "edge.support.example; dmarc=pass header.from=example.com",
        ours("dmarc=fail header.from=example.com"),
    ]
    assert evaluate(headers, "alice@example.com", policy).accepted


# --------------------------------------------------------------------------
# DMARC
# --------------------------------------------------------------------------


def test_dmarc_pass_with_mismatched_header_from_does_not_count() -> None:
    header = ours("dmarc=pass (p=reject dis=none) header.from=attacker.example")
    verdict = evaluate([header], "alice@example.com", POLICY)
    assert not verdict.accepted
    assert "header.from attacker.example is not the From domain" in verdict.reason


def test_dmarc_pass_for_subdomain_is_not_the_from_domain() -> None:
    header = ours("dmarc=pass header.from=mail.example.com")
    assert not evaluate([header], "alice@example.com", POLICY).accepted


def test_dmarc_pass_header_from_case_insensitive_and_absent() -> None:
    assert evaluate([ours("dmarc=pass header.from=EXAMPLE.com.")], "alice@Example.COM", POLICY)
    assert evaluate([ours("dmarc=pass")], "alice@example.com", POLICY).accepted


def test_dmarc_fail_is_authoritative_even_with_aligned_dkim() -> None:
    header = ours(
        "dkim=pass header.d=example.com; dmarc=fail (p=reject dis=reject) header.from=example.com"
    )
    policy = AuthPolicy(trusted_authserv_ids=(OURS,), accept=("dmarc", "dkim"))
    verdict = evaluate([header], "alice@example.com", policy)
    assert verdict == Verdict(
        False, "dmarc=fail (p=reject) by mx.support.example for example.com", None
    )
    # policy.dmarc property, no policy at all, and Gmail's upper case comment
    header = ours("dkim=pass header.d=example.com; dmarc=fail policy.dmarc=quarantine")
    assert evaluate([header], "alice@example.com", policy).reason.startswith("dmarc=fail (p=quar")
    verdict = evaluate([ours("dmarc=fail header.from=example.com")], "alice@example.com", policy)
    assert verdict.reason == "dmarc=fail by mx.support.example for example.com"
    gmail = GMAIL_PASS.replace("dmarc=pass", "dmarc=fail").replace("p=REJECT", "p=QUARANTINE")
    verdict = evaluate([gmail], "alice@example.com", AuthPolicy(("mx.google.com",), ("dkim",)))
    assert verdict.reason == "dmarc=fail (p=quarantine) by mx.google.com for example.com"


def test_other_dmarc_results_do_not_pass() -> None:
    for result in ("none", "temperror", "permerror", "bestguesspass", "policy", "neutral"):
        header = ours(f"dmarc={result} header.from=example.com")
        verdict = evaluate([header], "alice@example.com", POLICY)
        assert not verdict.accepted, result
        assert f"dmarc={result}" in verdict.reason


def test_arc_pass_alone_is_not_enough() -> None:
    header = ours('arc=pass ("google.com:s=arc-20160816:i=1"); dmarc=none header.from=example.com')
    policy = AuthPolicy(trusted_authserv_ids=(OURS,), accept=("dmarc", "dkim", "spf"))
    assert not evaluate([header], "alice@example.com", policy).accepted


def test_conflicting_duplicate_property_does_not_count() -> None:
    header = ours("dmarc=pass header.from=example.com header.from=attacker.example")
    assert not evaluate([header], "alice@attacker.example", POLICY).accepted
    assert not evaluate([header], "alice@example.com", POLICY).accepted


# --------------------------------------------------------------------------
# DKIM and SPF alignment
# --------------------------------------------------------------------------


def test_dkim_pass_aligned_via_subdomain() -> None:
    header = ours("dkim=pass header.d=mail.example.com header.s=sel1; dmarc=none")
    verdict = evaluate([header], "alice@example.com", DKIM)
    assert verdict == Verdict(
        True,
        "dkim=pass by mx.support.example for example.com (aligned header.d mail.example.com)",
        "dkim",
    )
    header = ours("dkim=pass header.d=example.com")
    assert evaluate([header], "alice@eu.mail.example.com", DKIM).accepted


def test_dkim_pass_for_third_party_domain_is_not_aligned() -> None:
    header = ours(
        "dkim=pass (2048-bit key) header.d=sendgrid.net header.i=@sendgrid.net; "
        "dkim=fail (signature did not verify) header.d=example.com; dmarc=none"
    )
    verdict = evaluate([header], "alice@example.com", DKIM)
    assert not verdict.accepted
    assert "dkim=pass (unaligned header.d sendgrid.net)" in verdict.reason
    assert "dkim=fail" in verdict.reason


def test_dkim_any_aligned_pass_counts_and_header_i_fallback() -> None:
    header = ours("dkim=pass header.d=sendgrid.net; dkim=pass header.i=newsletter@news.example.com")
    verdict = evaluate([header], "alice@example.com", DKIM)
    assert verdict.accepted and verdict.method == "dkim"
    assert "header.i news.example.com" in verdict.reason


def test_dkim_pass_not_counted_when_accept_is_dmarc_only() -> None:
    header = ours("dkim=pass header.d=example.com; dmarc=none header.from=example.com")
    verdict = evaluate([header], "alice@example.com", POLICY)
    assert not verdict.accepted
    assert "not accepted by policy" in verdict.reason


def test_spf_pass_aligned_and_not() -> None:
    aligned = ours("spf=pass (sender SPF authorized) smtp.mailfrom=bounce@bounces.example.com")
    verdict = evaluate([aligned], "alice@example.com", SPF)
    assert verdict.accepted and verdict.method == "spf"
    assert verdict.reason.endswith("(aligned smtp.mailfrom bounces.example.com)")

    ses = ours("spf=pass smtp.mailfrom=0100018c@eu-west-1.amazonses.com")
    verdict = evaluate([ses], "alice@example.com", SPF)
    assert not verdict.accepted
    assert "unaligned smtp.mailfrom eu-west-1.amazonses.com" in verdict.reason


def test_spf_helo_only_when_there_is_no_mailfrom() -> None:
    assert evaluate([ours("spf=pass smtp.helo=mx1.example.com")], "a@example.com", SPF).accepted
    bounce = ours("spf=pass smtp.mailfrom=<> smtp.helo=mx1.example.com")
    assert evaluate([bounce], "a@example.com", SPF).accepted
    other = ours("spf=pass smtp.mailfrom=evil.example smtp.helo=mx1.example.com")
    assert not evaluate([other], "a@example.com", SPF).accepted


def test_spf_softfail_and_neutral_do_not_pass() -> None:
    for result in ("softfail", "neutral", "none", "fail", "temperror"):
        header = ours(f"spf={result} smtp.mailfrom=example.com")
        assert not evaluate([header], "alice@example.com", SPF).accepted


def test_accept_order_reports_the_first_method_that_passes() -> None:
    header = ours(
        "spf=pass smtp.mailfrom=example.com; dkim=pass header.d=example.com; "
        "dmarc=pass header.from=example.com"
    )
    policy = AuthPolicy(trusted_authserv_ids=(OURS,), accept=("spf", "dmarc"))
    assert evaluate([header], "alice@example.com", policy).method == "spf"


# --------------------------------------------------------------------------
# Organizational domains (Public Suffix List)
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("domain", "org"),
    [
        ("example.com", "example.com"),
        ("a.b.Example.COM.", "example.com"),
        ("mail.example.co.uk", "example.co.uk"),
        ("example.co.uk", "example.co.uk"),
        ("co.uk", "co.uk"),
        ("alice.github.io", "alice.github.io"),
        ("x.y.kawasaki.jp", "x.y.kawasaki.jp"),
        ("www.bücher.example", "xn--bcher-kva.example"),
        ("foo.bar.internal-tld", "bar.internal-tld"),
        ("", ""),
        ("a..b", ""),
        ("exa mple.com", ""),
        ("[192.0.2.1]", ""),
    ],
)
def test_organizational_domain(domain: str, org: str) -> None:
    assert organizational_domain(domain) == org


def test_co_uk_alignment_needs_the_public_suffix_list() -> None:
    header = ours("dkim=pass header.d=mail.example.co.uk")
    assert evaluate([header], "alice@example.co.uk", DKIM).accepted
    # A naive "last two labels" rule would align these: both would be "co.uk".
    header = ours("dkim=pass header.d=attacker.co.uk")
    assert not evaluate([header], "alice@example.co.uk", DKIM).accepted
    header = ours("spf=pass smtp.mailfrom=attacker.github.io")
    assert not evaluate([header], "alice@victim.github.io", SPF).accepted


def test_idna_normalisation() -> None:
    assert normalise_domain("Bücher.Example.") == "xn--bcher-kva.example"
    header = ours("dmarc=pass header.from=xn--bcher-kva.example")
    assert evaluate([header], "anna@bücher.example", POLICY).accepted
    header = ours("dmarc=pass header.from=bücher.example")
    assert evaluate([header], "anna@xn--bcher-kva.example", POLICY).accepted
    # Characters IDNA 2003 would map onto another domain are refused.
    for odd in ("faß.de", "ｅｘａｍｐｌｅ.com", "exam\u00adple.com", "ex\u200dample.com"):
        assert normalise_domain(odd) is None, odd
    header = ours("dkim=pass header.d=fass.de")
    verdict = evaluate([header], "alice@faß.de", DKIM)
    assert verdict == Verdict(False, "From address has no usable domain", None)


# --------------------------------------------------------------------------
# From address, allowed domains, policy
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        (None, "no From address"),
        ("", "no From address"),
        ("alice", "From address is not a single plain address"),
        ("@example.com", "From address is not a single plain address"),
        ("alice@victim.example, bob@example.com", "From address is not a single plain address"),
        ("Alice <alice@victim.example>", "From address is not a single plain address"),
        ("a@victim.example<b@example.com>", "From address is not a single plain address"),
        ("alice@example.com\r\nX: y", "From address is not a single plain address"),
        ("alice@[192.0.2.1]", "From address has no usable domain"),
        ("alice@", "From address has no usable domain"),
        ("alice@exa_mple..com", "From address has no usable domain"),
    ],
)
def test_unusable_from_address(address: str | None, reason: str) -> None:
    header = ours("dmarc=pass")
    assert evaluate([header], address, POLICY) == Verdict(False, reason, None)


def test_angle_brackets_around_a_plain_address_are_fine() -> None:
    header = ours("dmarc=pass header.from=example.com")
    assert evaluate([header], "<alice@example.com>", POLICY).accepted


def test_allowed_domains() -> None:
    policy = AuthPolicy(trusted_authserv_ids=(OURS,), allowed_domains=("Example.com",))
    assert policy.allowed_domains == ("example.com",)
    header = ours("dmarc=pass header.from=mail.example.com")
    assert evaluate([header], "alice@mail.example.com", policy).accepted
    header = ours("dmarc=pass header.from=evil.example")
    verdict = evaluate([header], "mallory@evil.example", policy)
    assert verdict == Verdict(
        False, "From domain evil.example is not an allowed sender domain", None
    )
    exact = AuthPolicy(trusted_authserv_ids=(OURS,), allowed_domains=("mail.example.com",))
    header = ours("dmarc=pass header.from=example.com")
    assert not evaluate([header], "alice@example.com", exact).accepted


def test_policy_validation() -> None:
    with pytest.raises(ValueError):
        AuthPolicy(trusted_authserv_ids=())
    with pytest.raises(ValueError):
        AuthPolicy(trusted_authserv_ids=OURS)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        AuthPolicy(trusted_authserv_ids=(OURS,), accept=("arc",))
    with pytest.raises(ValueError):
        AuthPolicy(trusted_authserv_ids=(OURS,), accept=())
    with pytest.raises(ValueError):
        AuthPolicy(trusted_authserv_ids=(OURS,), allowed_domains=("not a domain",))
    policy = AuthPolicy(trusted_authserv_ids=(" MX.Support.Example ",), accept=("DKIM", "dkim"))
    assert policy.trusted_authserv_ids == (OURS,) and policy.accept == ("dkim",)


# --------------------------------------------------------------------------
# Reasons
# --------------------------------------------------------------------------


def test_reasons_carry_no_text_from_the_mail() -> None:
    header = ours(
        'dkim=pass (CALL +1-555-0100 NOW) header.d=evil\r\n.example reason="INJECTED";'
        ' spf=pass smtp.mailfrom="x\r\n injected"@evil.example;'
        " dmarc=none (INJECTED) header.from=example.com"
    )
    policy = AuthPolicy(trusted_authserv_ids=(OURS,), accept=("dmarc", "dkim", "spf"))
    verdict = evaluate([header], "alice@example.com", policy)
    assert not verdict.accepted
    check_reason(verdict)
    assert "INJECTED" not in verdict.reason.upper() and "555" not in verdict.reason


def test_reasons_are_bounded() -> None:
    long_domain = ".".join(["a" * 63] * 3) + ".example"
    header = ours(
        "; ".join(f"dkim=pass header.d=x{i}.{long_domain}" for i in range(10))
        + f"; spf=pass smtp.mailfrom={long_domain}"
    )
    verdict = evaluate([header], f"alice@{long_domain[:200]}", DKIM)
    check_reason(verdict)
    assert verdict.reason.endswith("...")


# --------------------------------------------------------------------------
# Property: evaluate never raises
# --------------------------------------------------------------------------

_FRAGMENTS = st.sampled_from(
    [
        OURS,
        "mx.google.com",
        ";",
        "=",
        " ",
        "\r\n ",
        "(",
        ")",
        '"',
        "\\",
        "dmarc",
        "dkim",
        "spf",
        "pass",
        "fail",
        "none",
        "header.from",
        "header.d",
        "header.i",
        "smtp.mailfrom",
        "smtp.helo",
        "policy.dmarc",
        "example.com",
        "@",
        "bücher.example",
        "co.uk",
        "p=reject",
        "1",
        ".",
        "/",
        "\x00",
    ]
)
_HEADER = st.one_of(
    st.text(max_size=300),
    st.lists(_FRAGMENTS, max_size=40).map("".join),
    st.lists(_FRAGMENTS, max_size=40).map(lambda parts: OURS + "; " + "".join(parts)),
)
_ADDRESS = st.one_of(
    st.none(),
    st.text(max_size=80),
    st.builds(
        lambda local, domain: f"{local}@{domain}", st.text(max_size=20), st.text(max_size=40)
    ),
    st.sampled_from(["alice@example.com", "a@mail.example.co.uk", "x@bücher.example"]),
)
_POLICIES = st.sampled_from(
    [
        POLICY,
        DKIM,
        SPF,
        AuthPolicy((OURS, "mx.google.com"), ("dmarc", "dkim", "spf"), ("example.com",)),
    ]
)


@pytest.mark.slow
@settings(max_examples=300, deadline=None)
@given(headers=st.lists(_HEADER, max_size=5), address=_ADDRESS, policy=_POLICIES)
def test_evaluate_never_raises(headers: list[str], address: str | None, policy: AuthPolicy) -> None:
    verdict = evaluate(headers, address, policy)
    assert isinstance(verdict, Verdict)
    check_reason(verdict)
    assert verdict.accepted == (verdict.method is not None)
    for header in headers:
        authserv_id, results = parse_authentication_results(header)
        assert isinstance(authserv_id, str)
        assert all(isinstance(r, MethodResult) for r in results)
