"""Each fix of issue 10 (and those the simulation itself led to), switched off one at a
time: the simulation must report a violation for each, with a seed that reproduces it.

A mutation puts the product back the way it was before one fix, for the length of a
``with`` block, in this process (``python -m tests.sim --seed S --mutation NAME``
reproduces one). Fixes the simulation does not reach are named in ``ELSEWHERE`` with the
test that proves them instead.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from mailingest.adapters import keys
from mailingest.adapters import ledger as L
from mailingest.adapters.imap import Mailbox, Moved
from mailingest.adapters.ledger import scripts as ledger_scripts
from mailingest.application import pipeline
from mailingest.config.settings import Settings

from . import hooks


def _old_move(self: Mailbox, uid: int, destination: str, **_: Any) -> Moved:
    """The move before the fix: without MOVE, skip the COPY when the destination holds
    any mail with this one's Message-ID (then expunge it). It reads nothing from the
    answers: the mail moved, as finish then took it to be."""
    client = self.client
    self._folder_ready(destination)
    if client.has_capability("MOVE"):
        client.move([uid], destination)
        return Moved()
    source = self._selected
    header = client.fetch([uid], ["BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)]"])
    raw = next(iter(header.values()), {}).get(b"BODY[HEADER.FIELDS (MESSAGE-ID)]", b"")
    message_id = raw.split(b":", 1)[-1].strip().strip(b"<>").decode() if raw else ""
    copied = False
    if message_id and source:
        client.select_folder(destination, readonly=True)
        copied = bool(client.search(["HEADER", "Message-ID", f"<{message_id}>"]))
        client.select_folder(source)
    if not copied:
        client.copy([uid], destination)
    client.add_flags([uid], [b"\\Deleted"], silent=True)
    if client.has_capability("UIDPLUS"):
        client.uid_expunge([uid])
    return Moved()


# A mutation that crashes tests nothing: its step fails and is recovered like any error,
# so "no violation" would be read as "caught by nothing". Every replacement records such
# a crash here, and the mutation test fails on it.
BROKEN: list[str] = []


def _guarded(fn: Any) -> Any:
    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (AttributeError, NameError, TypeError, KeyError) as exc:
            BROKEN.append(f"{fn.__name__}: {type(exc).__name__}: {exc}")
            raise

    return run


@_guarded
def _unfenced_begin(
    self: L.Ledger, slot: L.Slot, mail_id: str, doubt: str, *, window_ms: int
) -> L.Attempt:
    """No compare-and-set: record the attempt and go, whatever the slot says."""
    attempt = "unfenced"
    self.redis.hset(
        f"{keys.slot(slot.entity, slot.fingerprint)}",
        mapping={"attempt": attempt, "attempt_at": self.now()},
    )
    return L.Attempt("go", attempt, 0, self.now())


@_guarded
def _fence_without_mail(
    self: L.Ledger, slot: L.Slot, mail_id: str, doubt: str, *, window_ms: int
) -> L.Attempt:
    """The fence without its check that the mail is still documents_pending: the script
    is given a stand-in mail record that is always pending."""
    always = "mailingest:mutation:always-pending"
    self.redis.hset(always, "state", L.DOCUMENTS_PENDING)
    now = self.now()
    verdict, value = self._begin(
        keys=[keys.slot(slot.entity, slot.fingerprint), always, doubt],
        args=[
            slot.attempt,
            now,
            window_ms,
            "mutant" + str(now),
            slot.fingerprint,
            L.DOCUMENTS_PENDING,
        ],
    )
    text = verdict.decode() if isinstance(verdict, bytes) else str(verdict)
    return L.Attempt(text, "mutant" + str(now) if text == "go" else "", int(value), now)


@_guarded
def _hset_anyway(self: L.Ledger, mail_id: str, fields: dict[str, object]) -> bool:
    self.redis.hset(keys.mail(mail_id), mapping={k: str(v) for k, v in fields.items()})
    return True


# name -> (what it switches off, how)
MUTATIONS: dict[str, str] = {
    "settle-before-move": "finish moves a quarantined mail with documents half-way at Alloy",
    "copy-never-skipped": "without MOVE, the COPY is skipped when the Message-ID is there",
    "in-doubt-window": "a describe whose answer was lost is sent again at once",
    "copies-share-slots": "each delivery of a mail has slots of its own",
    "fenced-attempt": "a POST is not fenced by a compare-and-set on the slot",
    "updates-need-a-record": "ledger updates may create a mail record without a state",
    "fence-on-pending-mail": "the fence does not check that the mail is still pending",
}

# fixes the simulation does not exercise, and the test that proves each
ELSEWHERE = {
    "bytes-by-hash (finding 6)": "tests/test_exactly_once.py::test_6*, settings change",
    "requeues-without-progress (finding 10)": "tests/test_exactly_once.py::test_10*",
    "no-time-comparison (finding 8)": "tests/test_exactly_once.py::test_8*, Alloy's clock",
    "uploaded-stays-uploaded": "ledger agreement; seen once outside 10,000 schedules",
    # a stall exactly after the attempt record: 2 in 10,000 schedules before the fix
    "send-guard": "tests/test_exactly_once.py::test_13",
    # caught after 52 schedules before the same-name fix; since then not within 1,600
    "look-before-describe (finding 9)": "tests/test_exactly_once.py::test_9, test_9b",
}


@contextmanager
def mutated(name: str) -> Iterator[None]:
    """The product with the fix ``name`` switched off, for this block."""
    if name not in MUTATIONS:
        raise KeyError(f"no mutation {name!r}; choose from {', '.join(MUTATIONS)}")
    patch = pytest.MonkeyPatch()
    try:
        if name == "settle-before-move":
            patch.setattr(pipeline, "unsettled", lambda *a, **k: [])
        elif name == "copy-never-skipped":
            patch.setattr(Mailbox, "move", _old_move)
            hooks._classes.clear()  # the checkpointed subclass wraps the patched move
        elif name == "in-doubt-window":
            patch.setattr(Settings, "in_doubt_ms", property(lambda self: 0))
        elif name == "copies-share-slots":
            patch.setattr(pipeline, "message_key", lambda raw, mid: hashlib.sha256(raw).hexdigest())
        elif name == "fenced-attempt":
            patch.setattr(L.Ledger, "begin_attempt", _unfenced_begin)
        elif name == "updates-need-a-record":
            patch.setattr(L.Ledger, "_set", _hset_anyway)
            # and record_new again takes any hash for a record, state or not
            old = ledger_scripts.RECORD.replace(
                "if redis.call('HEXISTS', KEYS[1], 'state') == 1 then return 0 end\n"
                "redis.call('DEL', KEYS[1])",
                "if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end",
            )
            assert old != ledger_scripts.RECORD
            patch.setattr(ledger_scripts, "RECORD", old)
        elif name == "fence-on-pending-mail":
            patch.setattr(L.Ledger, "begin_attempt", _fence_without_mail)
        yield
    finally:
        patch.undo()
        hooks._classes.clear()
