"""The servers the demo and the tests start for themselves.

A private ``redis-server`` and an IMAP server (Dovecot when installed, else the
pip-installable pymap), each on a free 127.0.0.1 port, owned and stopped by the
caller.  Nothing here touches system services or system configuration; servers
still running at interpreter exit are stopped by an ``atexit`` hook.

* Subprocess servers (redis-server, dovecot) lead their own process group;
  ``stop()`` signals that group only (dovecot: SIGTERM to every process of it,
  then SIGKILL for stragglers), so the whole tree goes and nothing else.
* Dovecot gets a complete generated 2.3 config (``/etc/dovecot`` is never read).
  Dovecot 2.4 changed the config syntax and is refused with
  :class:`ServerNotAvailable` (``kind="auto"`` then falls back to pymap).
  As root, Dovecot refuses mail processes with uid 0 and its auth process runs
  as ``dovecot``: the mailbox then belongs to the ``mail`` system user, the mail
  process is chrooted into ``<workdir>/mail`` and auth runs as root, so a 0700
  temp dir above workdir does not matter.  If ``<workdir>/run`` is too long for
  unix socket paths, ``base_dir`` is a short temp dir removed by ``stop()``.
* pymap runs **in-process**: its asyncio server runs on its own event loop in a
  daemon thread (``python -m pymap`` does not work: the package has no
  ``__main__``).  Its dict backend keeps mail in memory: ``restart()`` (and
  ``stop()``) lose all mail.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import contextlib
import grp
import imaplib
import logging
import os
import pwd
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self

__all__ = [
    "CeleryProcess",
    "DEFAULT_IMAP_PASSWORD",
    "DEFAULT_IMAP_USER",
    "DovecotServer",
    "ImapAccount",
    "ImapServer",
    "PymapServer",
    "RedisServer",
    "ServerNotAvailable",
    "free_port",
    "start_imap_server",
]

log = logging.getLogger(__name__)

HOST = "127.0.0.1"
DEFAULT_IMAP_USER = "customer-support"
DEFAULT_IMAP_PASSWORD = "s3cret-pw"

_STOP_TIMEOUT = 10.0
_PORT_ATTEMPTS = 3
# Unix socket paths are limited to 107 bytes; dovecot's longest socket name
# below base_dir is ~25 characters.
_MAX_BASE_DIR_LEN = 70
_UNSAFE_PATH = re.compile(r"[\s%\"'\\#{}$]")
_INTROSPECTION_URL = re.compile(r"^https?://[^\s%\"'\\#{}$<]+$")


# Servers started and not yet stopped; stopped at interpreter exit as a safety net.
_live: set[RedisServer | ImapServer] = set()


@atexit.register
def _stop_leftovers() -> None:
    for server in list(_live):
        log.warning("stopping %s still running at exit", type(server).__name__)
        with contextlib.suppress(Exception):
            server.stop()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass(frozen=True)
class ImapAccount:
    """Where and how to log in to an embedded IMAP server."""

    host: str
    port: int
    user: str
    password: str
    security: str = "plain"  # what MAILINGEST_IMAP_SECURITY should be for this server


class ServerNotAvailable(RuntimeError):
    """The server's binary or package is missing; the message says what to install."""


# --------------------------------------------------------------------------- helpers


def _log_tail(path: Path, lines: int = 25) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"(no log at {path}: {exc})"
    tail = text.splitlines()[-lines:]
    return "\n".join(tail) if tail else f"(log {path} is empty)"


def _port_accepts(port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=timeout):
            return True
    except OSError:
        return False


def _wait_port_closed(port: int, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while _port_accepts(port, timeout=0.2) and time.monotonic() < deadline:
        time.sleep(0.05)


def _imap_login_works(account: ImapAccount, timeout: float = 3.0) -> bool:
    try:
        if account.security == "ssl":  # readiness only: the test's own client verifies
            context = ssl.create_default_context()
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
            conn: imaplib.IMAP4 = imaplib.IMAP4_SSL(
                account.host, account.port, ssl_context=context, timeout=timeout
            )
        else:
            conn = imaplib.IMAP4(account.host, account.port, timeout=timeout)
    except OSError:
        return False
    try:
        if (account.user + account.password).isascii():
            conn.login(account.user, account.password)
        else:  # LOGIN is ASCII-only; AUTHENTICATE PLAIN carries UTF-8
            plain = f"\0{account.user}\0{account.password}".encode()
            conn.authenticate("PLAIN", lambda _: plain)
        conn.logout()
        return True
    except (imaplib.IMAP4.error, OSError):
        with contextlib.suppress(Exception):
            conn.shutdown()
        return False


def _find_binary(name: str, given: str | None, extra_dirs: Sequence[str]) -> str | None:
    if given:
        return given if os.access(given, os.X_OK) else shutil.which(given)
    found = shutil.which(name)
    if found:
        return found
    for directory in extra_dirs:
        candidate = os.path.join(directory, name)
        if os.access(candidate, os.X_OK):
            return candidate
    return None


def _check_path(path: Path) -> Path:
    path = path.resolve()
    if _UNSAFE_PATH.search(str(path)):
        raise ValueError(f"workdir {path} contains characters unsafe for a server config")
    return path


class _Child:
    """A subprocess leading its own process group; stopping it kills that group only."""

    def __init__(
        self, name: str, argv: list[str], log_path: Path, cwd: Path, *, term_group: bool = False
    ) -> None:
        self.name = name
        self.term_group = term_group
        self.argv = argv
        self.log_path = log_path
        self.cwd = cwd
        self.proc: subprocess.Popen[bytes] | None = None

    def spawn(self) -> None:
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen(
                self.argv,
                cwd=self.cwd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        log.debug("%s started, pid %d: %s", self.name, self.proc.pid, " ".join(self.argv))

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def leader_exited(self) -> bool:
        """True once the leader has exited (it stays unreaped, so its pgid stays ours)."""
        if self.proc is None:
            return True
        if self.proc.returncode is not None:
            return True
        try:
            info = os.waitid(os.P_PID, self.proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return True
        return info is not None

    def _killpg(self, sig: signal.Signals) -> None:
        if self.proc is None or self.proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, sig)

    def _reap(self) -> None:
        # Leader is dead but unreaped: its pgid cannot have been recycled, so
        # SIGKILL to the group only hits stragglers of this tree.
        self._killpg(signal.SIGKILL)
        assert self.proc is not None
        self.proc.wait()
        log.debug("%s (pid %d) exited with %s", self.name, self.proc.pid, self.proc.returncode)

    def stop(self, timeout: float = _STOP_TIMEOUT) -> None:
        if self.proc is None or self.proc.returncode is not None:
            return
        if not self.leader_exited():
            if self.term_group:
                self._killpg(signal.SIGTERM)
            else:
                with contextlib.suppress(ProcessLookupError):
                    self.proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while not self.leader_exited() and time.monotonic() < deadline:
                time.sleep(0.02)
            if not self.leader_exited():
                log.warning("%s (pid %d) ignored SIGTERM, killing it", self.name, self.pid)
        self._reap()

    def kill(self) -> None:
        if self.proc is None or self.proc.returncode is not None:
            return
        self._killpg(signal.SIGKILL)
        self._reap()


def _wait_ready(
    child: _Child, is_ready: Callable[[], bool], timeout: float, what: str
) -> str | None:
    """Poll until ready (None) or the child died / timed out (an error message)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if child.leader_exited():
            return f"{what} exited during startup"
        try:
            if is_ready():
                return None
        except Exception as exc:  # noqa: BLE001 - the caller stops the child and reports
            return f"{what}: readiness check failed ({type(exc).__name__})"
        time.sleep(0.05)
    return f"{what} not ready after {timeout:.0f}s"


# --------------------------------------------------------------------------- redis


class RedisServer:
    """redis-server subprocess. persist=True turns on appendonly (appendfsync everysec)
    in workdir so restart() keeps data."""

    def __init__(
        self,
        workdir: Path,
        *,
        persist: bool = False,
        port: int | None = None,
        binary: str | None = None,
    ) -> None:
        self.workdir = Path(workdir).absolute()
        self.persist = persist
        self._auto_port = port is None
        self.port = port if port is not None else free_port()
        self._binary = binary
        self._child: _Child | None = None
        self._started_once = False

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    @property
    def log_path(self) -> Path:
        return self.workdir / "redis.log"

    @property
    def pid(self) -> int | None:
        return self._child.pid if self._child else None

    @property
    def running(self) -> bool:
        return self._child is not None and not self._child.leader_exited()

    def _write_config(self) -> Path:
        conf = self.workdir / "redis.conf"
        lines = [
            "# generated by mailingest_testbed.servers",
            f"bind {HOST}",
            f"port {self.port}",
            "protected-mode yes",
            "daemonize no",
            'logfile ""',
            f'dir "{self.workdir}"',
            'save ""',
            f"appendonly {'yes' if self.persist else 'no'}",
            "appendfsync everysec",
            "databases 16",
        ]
        conf.write_text("\n".join(lines) + "\n")
        return conf

    def _ping(self) -> bool:
        try:
            with socket.create_connection((HOST, self.port), timeout=0.5) as sock:
                sock.sendall(b"*1\r\n$4\r\nPING\r\n")
                return sock.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def start(self) -> RedisServer:
        """Start and wait until PING answers; idempotent."""
        if self.running:
            return self
        binary = _find_binary("redis-server", self._binary, ["/usr/bin", "/usr/local/bin"])
        if binary is None:
            where = f"{self._binary!r} is not an executable" if self._binary else "not found"
            raise ServerNotAvailable(
                f"redis-server {where}: install it (apt-get install redis-server, "
                "brew install redis) or pass binary="
            )
        self.workdir.mkdir(parents=True, exist_ok=True)
        for attempt in range(_PORT_ATTEMPTS):
            conf = self._write_config()
            offset = self.log_path.stat().st_size if self.log_path.exists() else 0
            child = _Child("redis-server", [binary, str(conf)], self.log_path, self.workdir)
            child.spawn()
            error = _wait_ready(child, self._ping, 10.0, f"redis-server on port {self.port}")
            if error is None:
                self._child = child
                self._started_once = True
                _live.add(self)
                log.info("redis-server pid %s ready at %s", child.pid, self.url)
                return self
            child.stop()
            text = self.log_path.read_bytes()[offset:].decode(errors="replace")
            if (
                self._auto_port
                and not self._started_once
                and "Address already in use" in text
                and attempt + 1 < _PORT_ATTEMPTS
            ):
                log.info("port %d was taken, retrying redis-server on another", self.port)
                self.port = free_port()
                continue
            raise RuntimeError(f"{error}; log tail:\n{_log_tail(self.log_path)}")
        raise AssertionError("unreachable")

    def stop(self) -> None:
        """SIGTERM, wait, SIGKILL fallback; idempotent."""
        _live.discard(self)
        if self._child is not None:
            self._child.stop()
            self._child = None
            _wait_port_closed(self.port)
            log.info("redis-server on port %d stopped", self.port)

    def restart(self) -> None:
        """Stop and start again on the same port with the same data dir."""
        self.stop()
        self.start()

    def kill(self) -> None:
        """SIGKILL, as in a crash (with persist, up to ~1 s of writes may be lost)."""
        _live.discard(self)
        if self._child is not None:
            self._child.kill()
            self._child = None
            log.info("redis-server on port %d killed", self.port)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


# --------------------------------------------------------------------------- IMAP


class ImapServer(ABC):
    """An IMAP server on 127.0.0.1 with a single account."""

    kind: str = ""

    def __init__(self, workdir: Path, *, user: str, password: str, port: int | None) -> None:
        if not user or re.search(r"[\s:/%\\]", user):
            raise ValueError(f"unsupported IMAP user name {user!r}")
        if not password or re.search(r"[:\x00-\x1f]", password):
            raise ValueError("IMAP password must be non-empty, without ':' or control chars")
        self.workdir = Path(workdir).absolute()
        self._auto_port = port is None
        self._started_once = False
        self.account = ImapAccount(
            HOST, port if port is not None else free_port(), user, password, "plain"
        )

    @property
    def port(self) -> int:
        return self.account.port

    def _new_port(self) -> None:
        self.account = ImapAccount(
            HOST, free_port(), self.account.user, self.account.password, self.account.security
        )

    @abstractmethod
    def start(self) -> Self:
        """Start and wait until LOGIN works; idempotent."""

    @abstractmethod
    def stop(self) -> None:
        """Stop the server; idempotent."""

    def restart(self) -> None:
        """Stop and start again on the same port."""
        self.stop()
        self.start()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def _dovecot_binary() -> str | None:
    return _find_binary("dovecot", None, ["/usr/sbin", "/usr/local/sbin", "/opt/homebrew/sbin"])


def _dovecot_version(binary: str) -> tuple[int, int]:
    out = subprocess.run(
        [binary, "--version"], capture_output=True, text=True, timeout=10, check=False
    ).stdout
    match = re.match(r"\s*(\d+)\.(\d+)", out)
    if not match:
        raise ServerNotAvailable(f"cannot tell the version of {binary} (said {out!r})")
    return int(match.group(1)), int(match.group(2))


class DovecotServer(ImapServer):
    """``dovecot -F -c <generated conf>`` as a child process, maildir under workdir.

    With ``oauth2_introspection_url`` it also takes XOAUTH2/OAUTHBEARER logins, each
    token checked at that RFC 7662 endpoint (``mailingest_testbed.oauth_sandbox`` in the tests).
    """

    kind = "dovecot"

    def __init__(
        self,
        workdir: Path,
        *,
        user: str = DEFAULT_IMAP_USER,
        password: str = DEFAULT_IMAP_PASSWORD,
        port: int | None = None,
        extra_config: str = "",
        tls: tuple[Path, Path] | None = None,
        oauth2_introspection_url: str | None = None,
    ) -> None:
        super().__init__(workdir, user=user, password=password, port=port)
        if oauth2_introspection_url is not None and not _INTROSPECTION_URL.match(
            oauth2_introspection_url
        ):
            raise ValueError("oauth2_introspection_url must be a plain http(s) URL")
        self._child: _Child | None = None
        self._short_base_dir: Path | None = None
        self.extra_config = extra_config  # appended to the generated config
        self.tls = tls  # (certificate, key): implicit TLS (imaps) on the port instead
        # RFC 7662 endpoint: XOAUTH2/OAUTHBEARER logins are checked there (token=... POSTed)
        self.oauth2_introspection_url = oauth2_introspection_url
        if tls is not None:
            self.account = ImapAccount(HOST, self.account.port, user, password, "ssl")

    @property
    def log_path(self) -> Path:
        return self.workdir / "dovecot.log"

    @property
    def config_path(self) -> Path:
        return self.workdir / "dovecot.conf"

    @property
    def oauth2_config_path(self) -> Path:
        return self.workdir / "dovecot-oauth2.conf.ext"

    @property
    def mail_root(self) -> Path:
        """Maildirs live in ``mail_root/<user>``."""
        return self.workdir / "mail"

    @property
    def pid(self) -> int | None:
        return self._child.pid if self._child else None

    @property
    def running(self) -> bool:
        return self._child is not None and not self._child.leader_exited()

    def _base_dir(self) -> Path:
        base = self.workdir / "run"
        if len(str(base)) <= _MAX_BASE_DIR_LEN:
            return base
        # Too long for unix socket paths: use a short private dir, removed by stop().
        root = "/tmp" if os.path.isdir("/tmp") else tempfile.gettempdir()
        self._short_base_dir = Path(tempfile.mkdtemp(prefix="mailingest-dc-", dir=root))
        return self._short_base_dir

    def _identity(self) -> dict[str, Any]:
        """Users and mail uid/gid: root and non-root need different settings."""
        if os.geteuid() == 0:
            try:
                login_user = pwd.getpwnam("dovenull").pw_name
                internal = pwd.getpwnam("dovecot")
                internal_group = grp.getgrgid(internal.pw_gid).gr_name
            except KeyError as exc:
                raise ServerNotAvailable(
                    f"dovecot system user missing ({exc}); reinstall dovecot-core"
                ) from exc
            mail = None
            for name in ("mail", "nobody"):
                with contextlib.suppress(KeyError):
                    mail = pwd.getpwnam(name)
                    break
            if mail is None:
                raise ServerNotAvailable("no 'mail' or 'nobody' user to own the mailbox as root")
            return {
                "root": True,
                "login_user": login_user,
                "internal_user": internal.pw_name,
                "internal_group": internal_group,
                "uid": mail.pw_uid,
                "gid": mail.pw_gid,
            }
        try:
            me = pwd.getpwuid(os.getuid()).pw_name
            my_group = grp.getgrgid(os.getgid()).gr_name
        except KeyError as exc:
            raise ServerNotAvailable(
                f"the current uid/gid has no passwd/group entry ({exc}); dovecot needs one"
            ) from exc
        return {
            "root": False,
            "login_user": me,
            "internal_user": me,
            "internal_group": my_group,
            "uid": os.getuid(),
            "gid": os.getgid(),
        }

    def _render_config(self, base_dir: Path, ident: dict[str, Any]) -> str:
        workdir = self.workdir
        mail_root = self.mail_root
        if ident["root"]:
            # Mail processes may not run as uid 0: run as the mail user, chrooted
            # into mail_root so the (often 0700) dirs above it need no permissions.
            home = f"{mail_root}/./%u"
            chroot = f"valid_chroot_dirs = {mail_root}"
            # The passwd-file sits in a private dir the dovecot user cannot read.
            services = "service auth {\n  user = root\n}\n"
        else:
            home = f"{mail_root}/%u"
            chroot = ""
            services = (
                "".join(
                    f"service {name} {{\n  chroot =\n}}\n"
                    for name in ("imap-login", "imap-urlauth-login", "anvil", "ipc", "old-stats")
                )
                + "service auth-worker {\n  user = $default_internal_user\n}\n"
            )
        tls_settings = "ssl = no"
        if self.tls is not None:
            cert, key = self.tls
            tls_settings = f"ssl = required\nssl_cert = <{cert}\nssl_key = <{key}"
        mechanisms, oauth2_passdb, password_only = "plain login", "", ""
        if self.oauth2_introspection_url is not None:
            # tokens go to the oauth2 passdb only, passwords to the passwd-file only
            mechanisms += " xoauth2 oauthbearer"
            oauth2_passdb = (
                "passdb {\n  driver = oauth2\n  mechanisms = xoauth2 oauthbearer\n"
                f"  args = {self.oauth2_config_path}\n}}\n"
            )
            password_only = "\n  mechanisms = plain login"
        return f"""\
# Generated by mailingest_testbed.servers for dovecot 2.3; standalone, do not include system config.
protocols = imap
listen = {HOST}
base_dir = {base_dir}
state_dir = {workdir}/state
instance_name = mailingest-{self.port}
log_path = {self.log_path}
info_log_path = {self.log_path}
{tls_settings}
disable_plaintext_auth = no
auth_mechanisms = {mechanisms}
auth_failure_delay = 0
login_greeting = mailingest embedded dovecot ready.
default_login_user = {ident["login_user"]}
default_internal_user = {ident["internal_user"]}
default_internal_group = {ident["internal_group"]}
first_valid_uid = {ident["uid"]}
last_valid_uid = 0
first_valid_gid = {min(ident["gid"], 1)}
{chroot}
mail_location = maildir:~:LAYOUT=fs
namespace inbox {{
  inbox = yes
  separator = /
}}
{oauth2_passdb}passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {workdir}/passwd{password_only}
}}
userdb {{
  driver = static
  args = uid={ident["uid"]} gid={ident["gid"]} home={home}
}}
service imap-login {{
  inet_listener imap {{
    address = {HOST}
    port = {0 if self.tls else self.port}
  }}
  inet_listener imaps {{
    address = {HOST}
    port = {self.port if self.tls else 0}
  }}
}}
{services}{self.extra_config}
"""

    def kick(self) -> None:
        """Drop every IMAP session of the account now (``doveadm kick``), server still up."""
        doveadm = _find_binary("doveadm", None, ["/usr/bin", "/usr/sbin"])
        if doveadm is None:
            raise ServerNotAvailable("doveadm not found (part of dovecot-core)")
        subprocess.run(
            [doveadm, "-c", str(self.config_path), "kick", self.account.user],
            check=False,
            capture_output=True,
            timeout=15,
        )

    def _prepare(self, binary: str) -> None:
        major, minor = _dovecot_version(binary)
        if (major, minor) != (2, 3):
            raise ServerNotAvailable(
                f"dovecot {major}.{minor} at {binary}: mailingest_testbed.servers only generates "
                "dovecot 2.3 config (2.4 changed the syntax); use kind='pymap' or dovecot 2.3"
            )
        self.workdir = _check_path(self.workdir)
        ident = self._identity()
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "state").mkdir(exist_ok=True)
        user_dir = self.mail_root / self.account.user
        user_dir.mkdir(parents=True, exist_ok=True)
        if ident["root"]:
            for path in (self.mail_root, user_dir):
                os.chown(path, ident["uid"], ident["gid"])
        passwd = self.workdir / "passwd"
        passwd.write_text(f"{self.account.user}:{{PLAIN}}{self.account.password}::::::\n")
        passwd.chmod(0o600)
        if self.oauth2_introspection_url is not None:
            # the token's "username" must be the login user; inactive tokens are refused
            self.oauth2_config_path.write_text(
                f"introspection_mode = post\n"
                f"introspection_url = {self.oauth2_introspection_url}\n"
                "username_attribute = username\n"
                "active_attribute = active\n"
                "active_value = true\n"
                "timeout_msecs = 5000\n"
            )
        base_dir = self._base_dir()
        base_dir.mkdir(parents=True, exist_ok=True)
        # We only start when our previous instance is gone, so a pid file is stale.
        with contextlib.suppress(FileNotFoundError):
            (base_dir / "master.pid").unlink()
        self.config_path.write_text(self._render_config(base_dir, ident))

    def start(self) -> Self:
        """Start dovecot and wait until LOGIN works (15 s)."""
        if self.running:
            return self
        binary = _dovecot_binary()
        if binary is None:
            raise ServerNotAvailable(
                "dovecot not found: install dovecot-imapd (Debian/Ubuntu) or "
                "dovecot (Fedora, Homebrew), or use kind='pymap'"
            )
        for attempt in range(_PORT_ATTEMPTS):
            self._prepare(binary)
            offset = self.log_path.stat().st_size if self.log_path.exists() else 0
            # stop() sends SIGTERM to every dovecot process at once: each shuts down
            # cleanly, usually in ~20 ms; SIGTERM to the master alone takes ~1 s.
            child = _Child(
                "dovecot",
                [binary, "-F", "-c", str(self.config_path)],
                self.log_path,
                self.workdir,
                term_group=True,
            )
            child.spawn()
            error = _wait_ready(
                child,
                lambda: _imap_login_works(self.account),
                15.0,
                f"dovecot on port {self.port}",
            )
            if error is None:
                self._child = child
                self._started_once = True
                _live.add(self)
                log.info("dovecot pid %s ready on %s:%d", child.pid, HOST, self.port)
                return self
            child.stop()
            self._drop_short_base_dir()
            text = self.log_path.read_bytes()[offset:].decode(errors="replace")
            if re.search(r"service\(imap\).*(No such file|not found)", text):
                raise ServerNotAvailable(
                    f"dovecot's IMAP server is missing (install dovecot-imapd):\n{text[-2000:]}"
                )
            if (
                self._auto_port
                and not self._started_once
                and "Address already in use" in text
                and attempt + 1 < _PORT_ATTEMPTS
            ):
                log.info("port %d was taken, retrying dovecot on another", self.port)
                self._new_port()
                continue
            raise RuntimeError(f"{error}; log tail:\n{_log_tail(self.log_path)}")
        raise AssertionError("unreachable")

    def _drop_short_base_dir(self) -> None:
        if self._short_base_dir is not None:
            shutil.rmtree(self._short_base_dir, ignore_errors=True)
            self._short_base_dir = None

    def stop(self) -> None:
        """Stop the whole dovecot process tree; mail stays in workdir."""
        _live.discard(self)
        if self._child is not None:
            self._child.stop()
            self._child = None
            _wait_port_closed(self.port)
            log.info("dovecot on port %d stopped", self.port)
        self._drop_short_base_dir()


class PymapServer(ImapServer):
    """pymap's in-memory dict backend served from a thread of this process, no TLS.

    Mail lives in memory: stop() and restart() lose it.
    """

    kind = "pymap"

    def __init__(
        self,
        workdir: Path,
        *,
        user: str = DEFAULT_IMAP_USER,
        password: str = DEFAULT_IMAP_PASSWORD,
        port: int | None = None,
    ) -> None:
        super().__init__(workdir, user=user, password=password, port=port)
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_event: asyncio.Event | None = None
        self._listening = threading.Event()
        self._stop_requested = threading.Event()
        self._error: BaseException | None = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _namespace(self) -> argparse.Namespace:
        from pymap.backend.dict import DictBackend
        from pymap.imap import IMAPService

        parser = argparse.ArgumentParser(prog="pymap", add_help=False)
        parser.add_argument("--debug", action="store_true")
        sub = parser.add_subparsers(dest="backend", required=True)
        DictBackend.add_subparser("dict", sub)
        IMAPService.add_arguments(parser)
        parser.set_defaults(passlib_cfg=None, skip_services=[])
        return parser.parse_args(
            ["--host", HOST, "--port", str(self.port), "--no-tls", "dict",
             "--demo-user", self.account.user, "--demo-password", self.account.password]
        )  # fmt: skip

    async def _serve(self, args: argparse.Namespace) -> None:
        from pymap.backend.dict import DictBackend
        from pymap.concurrent import Subsystem
        from pymap.imap import IMAPService
        from pysasl.hashing import Cleartext

        self._loop = asyncio.get_running_loop()
        self._stop_event = asyncio.Event()
        if self._stop_requested.is_set():  # stop() came before the loop existed
            self._stop_event.set()
        with ThreadPoolExecutor(1, thread_name_prefix=f"pymap-{self.port}-cpu") as executor:
            # Cleartext like dovecot's {PLAIN}: pymap's default pbkdf2 (500k rounds)
            # costs ~0.3 s per LOGIN; no delay for unknown users either.
            backend, config = await DictBackend.init(
                args,
                cpu_subsystem=Subsystem.for_threading(executor),
                hash_context=Cleartext(),
                invalid_user_sleep=0.0,
            )
            config.apply_context()
            async with contextlib.AsyncExitStack() as stack:
                await backend.start(stack)
                await IMAPService(backend, config).start(stack)
                self._listening.set()
                await self._stop_event.wait()
                # Cancel open connections first, else closing the server waits for them.
                me = asyncio.current_task()
                others = [t for t in asyncio.all_tasks() if t is not me]
                for task in others:
                    task.cancel()
                await asyncio.gather(*others, return_exceptions=True)

    def _run(self, args: argparse.Namespace) -> None:
        try:
            asyncio.run(self._serve(args))
        except BaseException as exc:  # reported to start() / logged
            self._error = exc
            log.debug("pymap server thread failed", exc_info=True)
        finally:
            self._listening.set()

    def start(self) -> Self:
        """Start serving in a daemon thread and wait until LOGIN works (15 s)."""
        if self.running:
            return self
        try:
            import pymap.backend.dict  # noqa: F401
            import pymap.imap  # noqa: F401
        except ImportError as exc:
            raise ServerNotAvailable(f"pymap is not installed: pip install pymap ({exc})") from exc
        for attempt in range(_PORT_ATTEMPTS):
            self._error = None
            self._listening.clear()
            self._stop_requested.clear()
            thread = threading.Thread(
                target=self._run, args=(self._namespace(),), name=f"pymap-{self.port}", daemon=True
            )
            self._thread = thread
            thread.start()
            self._listening.wait(15.0)
            if self._error is None and thread.is_alive():
                deadline = time.monotonic() + 15.0
                while time.monotonic() < deadline:
                    if _imap_login_works(self.account):
                        self._started_once = True
                        _live.add(self)
                        log.info("pymap ready on %s:%d (in-process)", HOST, self.port)
                        return self
                    time.sleep(0.05)
            error = self._error
            self.stop()
            if (
                isinstance(error, OSError)
                and self._auto_port
                and not self._started_once
                and attempt + 1 < _PORT_ATTEMPTS
            ):
                log.info("port %d unusable (%s), retrying pymap on another", self.port, error)
                self._new_port()
                continue
            raise RuntimeError(f"pymap on port {self.port} did not become ready: {error!r}")
        raise AssertionError("unreachable")

    def stop(self) -> None:
        """Stop serving and join the thread; all mail is lost."""
        _live.discard(self)
        if self._thread is None:
            return
        self._stop_requested.set()  # before reading _loop: see _serve()
        thread, loop, event = self._thread, self._loop, self._stop_event
        if loop is not None and event is not None and thread.is_alive():
            with contextlib.suppress(RuntimeError):  # loop already closed
                loop.call_soon_threadsafe(event.set)
        thread.join(_STOP_TIMEOUT)
        if thread.is_alive():
            log.warning("pymap thread on port %d did not stop within %ss", self.port, _STOP_TIMEOUT)
        self._thread = self._loop = self._stop_event = None
        log.info("pymap on port %d stopped", self.port)


def start_imap_server(workdir: Path, kind: str = "auto", **kw: Any) -> ImapServer:
    """Start an IMAP server: kind "dovecot", "pymap" or "auto" (dovecot if installed)."""
    if kind == "dovecot":
        return DovecotServer(workdir, **kw).start()
    if kind == "pymap":
        return PymapServer(workdir, **kw).start()
    if kind != "auto":
        raise ValueError(f"unknown IMAP server kind {kind!r} (dovecot, pymap or auto)")
    if _dovecot_binary() is not None:
        try:
            return DovecotServer(workdir, **kw).start()
        except ServerNotAvailable as exc:
            log.warning("dovecot unusable, falling back to pymap: %s", exc)
    return PymapServer(workdir, **kw).start()


# --------------------------------------------------------------------------- Celery


class CeleryProcess:
    """``python -m celery -A mailingest <kind>`` (worker, beat or flower) as a child process.

    Runs in its own process group: ``stop()`` sends SIGTERM to the main process
    (Celery's warm shutdown: in-flight tasks finish) and waits, then SIGKILLs the
    group; ``kill()`` is a SIGKILL of the group at once (a crash, for the fault tests).
    """

    def __init__(
        self,
        kind: str,
        env: dict[str, str],
        log_path: Path,
        extra: Sequence[str] = (),
        *,
        ready_timeout: float = 60.0,
        via_cli: bool = False,
    ) -> None:
        if kind not in ("worker", "beat", "flower"):
            raise ValueError(kind)
        self.via_cli = via_cli and kind != "flower"  # `mailingest worker|beat` wrappers
        self.kind = kind
        self.env = env
        self.log_path = Path(log_path)
        self.extra = list(extra)
        self.ready_timeout = ready_timeout
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_offset = 0

    def argv(self) -> list[str]:
        if self.via_cli:
            argv = [sys.executable, "-m", "mailingest", self.kind]
        else:
            argv = [sys.executable, "-m", "celery", "-A", "mailingest", self.kind]
        if self.kind == "worker":
            argv += [
                "--loglevel",
                "INFO",
                "--pool",
                "prefork",
                "--without-gossip",
                "--without-mingle",
                "--hostname",
                f"mailingest-{os.getpid()}-{id(self)}@%h",
            ]
        elif self.kind == "beat":
            argv += ["--loglevel", "INFO"]
        return argv + self.extra

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def start(self) -> CeleryProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        log_file = open(self.log_path, "ab")  # noqa: SIM115 - owned by the child
        self._proc = subprocess.Popen(
            self.argv(),
            env=self.env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        log_file.close()
        if self.kind == "worker":
            self._wait_for(b" ready.", self.ready_timeout)
        else:
            time.sleep(0.5)
            if self._proc.poll() is not None:
                raise RuntimeError(f"celery {self.kind} exited: {_log_tail(self.log_path)}")
        return self

    def _wait_for(self, marker: bytes, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self._proc is not None
            if self._proc.poll() is not None:
                raise RuntimeError(f"celery {self.kind} exited: {_log_tail(self.log_path)}")
            with open(self.log_path, "rb") as log:
                log.seek(self._log_offset)
                if marker in log.read():
                    return
            time.sleep(0.1)
        raise RuntimeError(
            f"celery {self.kind} not ready in {timeout}s: {_log_tail(self.log_path)}"
        )

    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def stop(self, timeout: float = 30.0) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            # SIGTERM to the main process only, as `docker stop` does: Celery's warm
            # shutdown lets the pool finish the tasks it runs before it exits.
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # stragglers of the group (pool children)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(5)

    def kill(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)

    def __enter__(self) -> CeleryProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
