"""The ledger's transitions against the table of core/states.py, driven by hypothesis.

The model is the transition table: random moves (legal and illegal, with and without
from-states) are asked of a real Redis (the test bed's); every state a mail reaches must
be one the table allows from where it was, a move the table forbids must be refused with
:class:`IllegalTransition` before Redis is touched, and the state sets, the unfiled set
and the record a transition returns must agree with what Redis holds.
"""

from __future__ import annotations

import re
from pathlib import Path

import hypothesis.strategies as st
import pytest
import redis
from hypothesis import HealthCheck, settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test

from mailingest.adapters import keys
from mailingest.adapters.ledger import Ledger, MailRef
from mailingest.core import states
from mailingest.core.states import DECIDED, MAIL_STATES, IllegalTransition, MailState

pytestmark = pytest.mark.servers

MAILS = [MailRef("eu", "INBOX", 1, uid) for uid in (1, 2, 3)]


def test_the_table_names_every_state_and_only_states() -> None:
    assert set(states.TRANSITIONS) == set(MailState)
    for targets in states.TRANSITIONS.values():
        assert targets <= set(MailState)
    # every state but the first is reachable from the first
    seen, frontier = {states.INITIAL}, [states.INITIAL]
    while frontier:
        for target in states.TRANSITIONS[frontier.pop()]:
            if target not in seen:
                seen.add(target)
                frontier.append(target)
    assert seen == set(MailState)


def test_the_table_in_docs_is_the_codes() -> None:
    """docs/states.md's table lists, for each state, the states the code lets it go to."""
    text = (Path(__file__).parent.parent / "docs" / "states.md").read_text()
    documented: dict[str, set[str]] = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and re.fullmatch(r"`[a-z_]+`", cells[0]):
            documented[cells[0].strip("`")] = set(re.findall(r"`([a-z_]+)`", cells[2]))
    expected = {str(s): {str(t) for t in targets} for s, targets in states.TRANSITIONS.items()}
    assert documented == expected


@pytest.mark.parametrize(
    ("target", "froms"),
    [
        (MailState.DONE, (MailState.QUEUED,)),  # no document was ever planned
        (MailState.QUEUED, (MailState.DONE,)),  # done is final
        (MailState.REPLAYED, (MailState.FAILED,)),  # only a filed quarantined mail
        (MailState.QUARANTINED, (MailState.QUARANTINED,)),  # a second refusal adds a reason
        ("filed", ()),  # not a state
    ],
)
def test_check_refuses_what_the_table_forbids(target: str, froms: tuple[str, ...]) -> None:
    with pytest.raises(IllegalTransition):
        states.check(target, froms)


def test_check_defaults_to_every_allowed_source() -> None:
    assert states.check(MailState.QUARANTINED, ()) == (
        MailState.QUEUED,
        MailState.PARSING,
        MailState.DOCUMENTS_PENDING,
        MailState.FAILED,
    )
    assert states.check(MailState.DONE, ()) == (MailState.DOCUMENTS_PENDING,)


class LedgerTransitions(RuleBasedStateMachine):
    """Each mail's state in a dict (the model) next to the same mail in Redis."""

    client: redis.Redis

    def __init__(self) -> None:
        super().__init__()
        self.client.flushdb()
        self.ledger = Ledger(self.client)
        self.model: dict[str, MailState] = {}
        self.filed: set[str] = set()
        for ref in MAILS:
            assert self.ledger.record_new(ref, b"raw")
            self.model[ref.id] = states.INITIAL

    @rule(
        mail=st.sampled_from([ref.id for ref in MAILS]),
        to=st.sampled_from(MAIL_STATES),
        froms=st.lists(st.sampled_from(MAIL_STATES), max_size=3, unique=True),
    )
    def transition(self, mail: str, to: MailState, froms: list[MailState]) -> None:
        target = to
        before = self.model[mail]
        legal = all(states.allowed(source, target) for source in froms)
        if not legal:
            with pytest.raises(IllegalTransition):
                self.ledger.transition(mail, target, allowed=froms, reason="r")
            return
        written = self.ledger.transition(mail, target, allowed=froms, reason="r")
        effective = froms or states.sources(target)
        if before not in effective:
            assert written is None  # a refused compare-and-set: nothing changed
            return
        assert states.allowed(before, target), (before, target)
        assert written is not None and written.state == target and written.reason == "r"
        assert written == self.ledger.mail(mail)  # the record as written, not re-read
        self.model[mail] = target

    @rule(mail=st.sampled_from([ref.id for ref in MAILS]))
    def file(self, mail: str) -> None:
        if self.model[mail] in DECIDED:
            self.ledger.filed(mail, "Processed")
            self.filed.add(mail)

    @invariant()
    def redis_agrees_with_the_model(self) -> None:
        unfiled = {m.decode() for m in self.client.smembers(keys.UNFILED)}
        for mail, state in self.model.items():
            record = self.ledger.mail(mail)
            assert record is not None and record.state == state
            holders = [s for s in MAIL_STATES if mail in self.ledger.mail_ids(s)]
            assert holders == [state]
            assert (mail in unfiled) == (state in DECIDED and mail not in self.filed)
            # the console's index agrees: in its state's sorted sets, and no other's
            assert record is not None
            kind = record.kind
            assert kind == ("other" if record.reason else "")
            indexed = {
                keys.as_text(k)
                for k in self.client.scan_iter(match=keys.INDEX + "*")
                if self.client.zscore(k, mail) is not None
            }
            want = {keys.index(state), keys.index(state, "eu")}
            if kind:
                want.add(keys.index(state, "eu", kind))
            assert indexed == want
            assert self.client.zscore(keys.index(state), mail) == record.created_at
        # every move is in the mail's history, the last one its state now
        for mail, state in self.model.items():
            last = self.ledger.history(mail)[-1]
            assert last.to == state


@pytest.mark.slow  # seconds: left out of ./dev test --quick
def test_ledger_transitions_follow_the_table(redis_client: redis.Redis) -> None:
    LedgerTransitions.client = redis_client
    run_state_machine_as_test(
        LedgerTransitions,
        settings=settings(
            max_examples=60,
            stateful_step_count=25,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )


def test_state_names_are_spelled_in_states_py_only() -> None:
    """No other module writes a mail state as a literal: not Python, not the Lua scripts
    (which receive the names from Python as arguments)."""
    import ast
    from pathlib import Path

    package = Path(__file__).resolve().parent.parent / "mailingest"
    names = {state.value for state in MailState}
    # a verb in an error message, not a state ("the token request failed")
    allowed = {("adapters/oauth.py", "failed")}
    found = []
    for path in sorted(package.rglob("*.py")):
        where = path.relative_to(package).as_posix()
        if where == "core/states.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not (isinstance(node, ast.Constant) and isinstance(node.value, str)):
                continue
            if node.value in names and (where, node.value) not in allowed:
                found.append(f"{where}:{node.lineno}: {node.value!r}")
            found += [
                f"{where}:{node.lineno}: Lua names {name!r}"
                for name in names
                if f"'{name}'" in node.value or f'"{name}"' in node.value
            ]
    assert not found, "\n".join(found)
