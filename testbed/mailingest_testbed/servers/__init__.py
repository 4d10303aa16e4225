"""The servers the demo and the tests start for themselves.

A private ``redis-server`` and an IMAP server (Dovecot when installed, else the
pip-installable pymap), each on a free 127.0.0.1 port, owned and stopped by the
caller, and Celery processes of mailingest.  Nothing here touches system services
or system configuration; servers still running at interpreter exit are stopped by
an ``atexit`` hook.  One module per server:

* ``redis``: :class:`RedisServer`, a ``redis-server`` subprocess;
* ``dovecot``: :class:`DovecotServer`, Dovecot 2.3 with a generated config;
* ``pymap``: :class:`PymapServer`, pymap in-process (mail in memory);
* ``imap``: what both IMAP servers share (:class:`ImapAccount`, :class:`ImapServer`);
* ``auto``: :func:`start_imap_server`, Dovecot if usable, else pymap;
* ``smtp``: :class:`SmtpServer`, aiosmtpd in-process, keeping the replies it receives;
* ``celery``: :class:`CeleryProcess`, a worker, beat or Flower;
* ``console``: :class:`ConsoleProcess`, ``mailingest console``;
* ``common``: the loopback host, free ports, child processes in their own process
  group (``stop()`` signals that group only), the ``atexit`` safety net.
"""

from __future__ import annotations

from . import dovecot
from .auto import start_imap_server
from .celery import CeleryProcess
from .common import DEFAULT_IMAP_PASSWORD, DEFAULT_IMAP_USER, ServerNotAvailable, free_port
from .console import ConsoleProcess
from .dovecot import DovecotServer, _dovecot_binary, _dovecot_version
from .imap import ImapAccount, ImapServer
from .pymap import PymapServer
from .redis import RedisServer
from .smtp import SmtpServer

__all__ = [
    "DEFAULT_IMAP_PASSWORD",
    "DEFAULT_IMAP_USER",
    "CeleryProcess",
    "ConsoleProcess",
    "DovecotServer",
    "ImapAccount",
    "ImapServer",
    "PymapServer",
    "RedisServer",
    "ServerNotAvailable",
    "SmtpServer",
    "_dovecot_binary",
    "_dovecot_version",
    "dovecot",
    "free_port",
    "start_imap_server",
]
