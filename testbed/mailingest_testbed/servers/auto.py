"""``start_imap_server``: Dovecot where it is installed and usable, else pymap."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from . import dovecot
from .common import ServerNotAvailable
from .dovecot import DovecotServer
from .imap import ImapServer
from .pymap import PymapServer

__all__ = ["start_imap_server"]

log = logging.getLogger(__name__)


def start_imap_server(workdir: Path, kind: str = "auto", **kw: Any) -> ImapServer:
    """Start an IMAP server: kind "dovecot", "pymap" or "auto" (dovecot if installed)."""
    if kind == "dovecot":
        return DovecotServer(workdir, **kw).start()
    if kind == "pymap":
        return PymapServer(workdir, **kw).start()
    if kind != "auto":
        raise ValueError(f"unknown IMAP server kind {kind!r} (dovecot, pymap or auto)")
    if dovecot._dovecot_binary() is not None:  # looked up at call time: tests replace it
        try:
            return DovecotServer(workdir, **kw).start()
        except ServerNotAvailable as exc:
            log.warning("dovecot unusable, falling back to pymap: %s", exc)
    return PymapServer(workdir, **kw).start()
