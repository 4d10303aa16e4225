"""Count what an IMAP client in this process sends and receives (imaplib underneath imapclient)."""

from __future__ import annotations

import imaplib
import re
from typing import Any

_BODY = re.compile(rb"\bFETCH\b.*\b(BODY(\.PEEK)?\[|RFC822\b(?!\.SIZE)|RFC822\.TEXT|BINARY)", re.I)


class ImapCounter:
    """Patches ``imaplib.IMAP4`` while active: bytes both ways, command lines sent, and
    how many of them fetch a message body (``BODY[``, ``BODY.PEEK[``, ``RFC822``,
    ``BINARY``); ``RFC822.SIZE`` alone is not a body."""

    def __init__(self) -> None:
        self.sent = 0
        self.received = 0
        self.commands: list[str] = []
        self.body_fetches = 0
        self._saved: dict[str, Any] = {}

    def __enter__(self) -> ImapCounter:
        cls = imaplib.IMAP4
        self._saved = {name: getattr(cls, name) for name in ("send", "read", "readline")}
        send, read, readline = self._saved["send"], self._saved["read"], self._saved["readline"]
        counter = self

        def counted_send(imap: imaplib.IMAP4, data: bytes) -> None:
            counter.sent += len(data)
            line = bytes(data).split(b"\r\n", 1)[0]
            if line:
                # tag dropped; LOGIN arguments never kept
                words = line.split(b" ", 2)
                text = b" ".join(words[1:2]) if words[1:2] == [b"LOGIN"] else b" ".join(words[1:])
                counter.commands.append(text[:160].decode("ascii", "replace"))
                if _BODY.search(line):
                    counter.body_fetches += 1
            send(imap, data)

        def counted_read(imap: imaplib.IMAP4, size: int) -> bytes:
            data: bytes = read(imap, size)
            counter.received += len(data)
            return data

        def counted_readline(imap: imaplib.IMAP4) -> bytes:
            data: bytes = readline(imap)
            counter.received += len(data)
            return data

        cls.send = counted_send  # type: ignore[method-assign,assignment]
        cls.read = counted_read  # type: ignore[method-assign,assignment]
        cls.readline = counted_readline  # type: ignore[method-assign,assignment]
        return self

    def __exit__(self, *exc: object) -> None:
        for name, fn in self._saved.items():
            setattr(imaplib.IMAP4, name, fn)
