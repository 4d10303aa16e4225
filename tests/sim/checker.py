"""The invariants, judged on the end state: Alloy (the sandbox's documents), the IMAP
folders and the ledger.

* ``document exactly once``: every document of a mail that was processed (``done``) is at
  its entity exactly once, ``uploaded: true``, with exactly its bytes; a quarantined or
  failed mail's document is there at most once; nothing else is there.
* ``no stray description``: no ``uploaded: false`` document is left at Alloy, unless the
  ledger names it as refused for good (Alloy cannot delete it).
* ``no mail lost``: every delivery (by its bytes) is in the inbox, Processed or Quarantine.
* ``ledger agrees``: every mail is decided (or ``failed``) and filed; filed to Processed
  means done and there, to Quarantine means quarantined and there; a done mail's
  documents are uploaded at Alloy with its bytes.
* ``inbox drained``: a mail still in the inbox (not flagged \\Deleted) is one the ledger
  records as ``failed``.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass
from typing import Any

import redis
from mailingest_testbed.alloy_sandbox import SandboxServer

from mailingest.adapters import ledger as L

from .scenario import Scenario
from .world import FOLDER, PROCESSED, QUARANTINE, Folders, Stored

NOT_FINAL = (L.QUEUED, L.PARSING, L.DOCUMENTS_PENDING)


@dataclass(frozen=True)
class Violation:
    invariant: str
    detail: str

    def __str__(self) -> str:
        return f"{self.invariant}: {self.detail}"


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def refused_tokens(raw: redis.Redis) -> set[str]:
    """Alloy documents the ledger records as refused for good (``refused`` on a slot)."""
    tokens = set()
    for key in raw.scan_iter(match="mailingest:slot:*", count=1000):
        h = {k.decode(): v.decode() for k, v in raw.hgetall(key).items()}
        if h.get("refused") and h.get("token"):
            tokens.add(h["token"])
    return tokens


def check(
    *,
    scenario: Scenario,
    delivered: list[int],
    placements: dict[tuple[int, int], str],
    sandbox: SandboxServer,
    folders: Folders,
    ledger: L.Ledger,
    raw: redis.Redis,
) -> list[Violation]:
    """``delivered``: indexes of the scenario's deliveries that were appended;
    ``placements``: (UIDVALIDITY, UID) of the ingest folder -> digest of the mail there."""
    out: list[Violation] = []
    contents = {f: folders.contents(f) for f in (FOLDER, PROCESSED, QUARANTINE)}
    stored: dict[str, list[Stored]] = {f: c[1] for f, c in contents.items()}
    inbox_validity = contents[FOLDER][0]
    digests_of = {d.digest: d.mail for d in scenario.deliveries}

    # -- no mail lost ------------------------------------------------------------------
    have = Counter(s.digest for f in stored for s in stored[f])
    need = Counter(scenario.deliveries[i].digest for i in delivered)
    for digest, count in need.items():
        if have[digest] < count:
            mail = digests_of[digest]
            where = {f: sum(1 for s in stored[f] if s.digest == digest) for f in stored}
            out.append(
                Violation(
                    "no mail lost",
                    f"{mail.key}: delivered {count}x, found {have[digest]}x ({where})",
                )
            )

    # -- the ledger --------------------------------------------------------------------
    records = ledger.mails(L.MAIL_STATES)
    by_place = {(r.ref.uidvalidity, r.ref.uid): r for r in records if r.ref.folder == FOLDER}
    mail_states: dict[str, set[str]] = {}
    for r in records:
        digest = placements.get((r.ref.uidvalidity, r.ref.uid))
        mail = digests_of.get(digest) if digest else None
        name = mail.key if mail else f"?{r.id}"
        if mail is not None:
            mail_states.setdefault(mail.key, set()).add(r.state)
        if r.state in NOT_FINAL:
            out.append(Violation("ledger agrees", f"{name} ({r.id}) left in state {r.state}"))
        if r.state in L.DECIDED and not r.filed_to:
            out.append(Violation("ledger agrees", f"{name} ({r.id}) {r.state} but never filed"))
        if r.filed_to in (PROCESSED, QUARANTINE):
            expected = PROCESSED if r.state == L.DONE else QUARANTINE
            if r.filed_to != expected:
                out.append(
                    Violation("ledger agrees", f"{name} is {r.state} but filed to {r.filed_to}")
                )
            if digest and not any(s.digest == digest for s in stored[r.filed_to]):
                out.append(
                    Violation(
                        "ledger agrees", f"{name} ({r.id}) filed to {r.filed_to} but not there"
                    )
                )
        if r.state == L.DONE:
            out += _done_documents(name, r, ledger, sandbox)

    # -- Alloy -------------------------------------------------------------------------
    planned: dict[tuple[str | None, str], tuple[str, str]] = {}
    for mail in scenario.mails:
        for doc in mail.documents:
            planned[(mail.entity, _sha(doc.payload))] = (mail.key, doc.filename)
    uploaded: Counter[tuple[str | None, str]] = Counter()
    refused = refused_tokens(raw)
    entities = sorted({m.entity for m in scenario.mails if m.entity})
    for entity in entities:
        for meta in sandbox.state.list(entity):
            token = meta["document_token"]
            label = f"{entity} {meta['name']}.{meta['extension']} ({token})"
            if not meta["uploaded"]:
                if token not in refused:
                    out.append(Violation("no stray description", f"uploaded: false left: {label}"))
                continue
            sha = _sha(sandbox.state.download(entity, token))
            if (entity, sha) not in planned:
                out.append(Violation("document exactly once", f"unexpected bytes: {label}"))
            uploaded[(entity, sha)] += 1
    for mail in scenario.mails:
        states = mail_states.get(mail.key, set())
        for doc in mail.documents:
            count = uploaded[(mail.entity, _sha(doc.payload))]
            if count > 1:
                out.append(
                    Violation(
                        "document exactly once",
                        f"{mail.key} {doc.filename} uploaded {count} times ({sorted(states)})",
                    )
                )
            if L.DONE in states and count == 0:
                out.append(
                    Violation(
                        "document exactly once",
                        f"{mail.key} {doc.filename} missing though the mail is done",
                    )
                )
            if mail.entity is None and count:
                out.append(
                    Violation("document exactly once", f"{mail.key}: unknown sender's document")
                )

    # -- inbox drained -----------------------------------------------------------------
    for s in stored[FOLDER]:
        if s.deleted:
            continue
        r = by_place.get((inbox_validity, s.uid))
        mail = digests_of.get(s.digest)
        name = mail.key if mail else "?"
        if r is None:
            out.append(Violation("inbox drained", f"{name} (UID {s.uid}) never recorded"))
        elif r.state != L.FAILED:
            out.append(
                Violation(
                    "inbox drained",
                    f"{name} ({r.id}) still in the inbox, ledger: {r.state} "
                    f"filed_to={r.filed_to!r} {r.reason[:120]}",
                )
            )
    return out


def _done_documents(name: str, r: L.MailRecord, ledger: L.Ledger, sandbox: Any) -> list[Violation]:
    out = []
    entity = r.entity
    for doc in ledger.documents(r.id, r.documents):
        if doc.state != L.UPLOADED or not doc.token:
            out.append(
                Violation("ledger agrees", f"{name} done but document {doc.index} is {doc.state}")
            )
            continue
        try:
            meta = sandbox.state.document(entity, doc.token)
            data = sandbox.state.download(entity, doc.token)
        except Exception:  # noqa: BLE001 - not at Alloy
            out.append(
                Violation("ledger agrees", f"{name} document {doc.index}: {doc.token} not at Alloy")
            )
            continue
        if not meta["uploaded"] or (doc.sha256 and _sha(data) != doc.sha256):
            out.append(
                Violation(
                    "ledger agrees",
                    f"{name} document {doc.index}: Alloy's {doc.token} lacks its bytes",
                )
            )
    return out
