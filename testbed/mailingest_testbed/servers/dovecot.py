"""A private Dovecot 2.3 on a free loopback port (``DovecotServer``).

``dovecot -F -c <generated conf>`` as a child process leading its own process group;
``stop()`` sends SIGTERM to every process of that group, then SIGKILL for stragglers,
so the whole tree goes and nothing else.  Dovecot gets a complete generated 2.3
config (``/etc/dovecot`` is never read).  Dovecot 2.4 changed the config syntax and is
refused with ``ServerNotAvailable`` (``start_imap_server(kind="auto")`` then falls
back to pymap).  As root, Dovecot refuses mail processes with uid 0 and its auth
process runs as ``dovecot``: the mailbox then belongs to the ``mail`` system user,
the mail process is chrooted into ``<workdir>/mail`` and auth runs as root, so a 0700
temp dir above workdir does not matter.  If ``<workdir>/run`` is too long for unix
socket paths, ``base_dir`` is a short temp dir removed by ``stop()``.
"""

from __future__ import annotations

import contextlib
import grp
import logging
import os
import pwd
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Self

from .common import (
    DEFAULT_IMAP_PASSWORD,
    DEFAULT_IMAP_USER,
    HOST,
    PORT_ATTEMPTS,
    Child,
    ServerNotAvailable,
    check_path,
    find_binary,
    live,
    log_tail,
    wait_port_closed,
    wait_ready,
)
from .imap import ImapAccount, ImapServer, imap_login_works

__all__ = ["DovecotServer"]

log = logging.getLogger(__name__)

# Unix socket paths are limited to 107 bytes; dovecot's longest socket name
# below base_dir is ~25 characters.
_MAX_BASE_DIR_LEN = 70
_INTROSPECTION_URL = re.compile(r"^https?://[^\s%\"'\\#{}$<]+$")


def _dovecot_binary() -> str | None:
    return find_binary("dovecot", None, ["/usr/sbin", "/usr/local/sbin", "/opt/homebrew/sbin"])


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
        self._child: Child | None = None
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
        doveadm = find_binary("doveadm", None, ["/usr/bin", "/usr/sbin"])
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
        self.workdir = check_path(self.workdir)
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
        for attempt in range(PORT_ATTEMPTS):
            self._prepare(binary)
            offset = self.log_path.stat().st_size if self.log_path.exists() else 0
            # stop() sends SIGTERM to every dovecot process at once: each shuts down
            # cleanly, usually in ~20 ms; SIGTERM to the master alone takes ~1 s.
            child = Child(
                "dovecot",
                [binary, "-F", "-c", str(self.config_path)],
                self.log_path,
                self.workdir,
                term_group=True,
            )
            child.spawn()
            error = wait_ready(
                child,
                lambda: imap_login_works(self.account),
                15.0,
                f"dovecot on port {self.port}",
            )
            if error is None:
                self._child = child
                self._started_once = True
                live.add(self)
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
                and attempt + 1 < PORT_ATTEMPTS
            ):
                log.info("port %d was taken, retrying dovecot on another", self.port)
                self._new_port()
                continue
            raise RuntimeError(f"{error}; log tail:\n{log_tail(self.log_path)}")
        raise AssertionError("unreachable")

    def _drop_short_base_dir(self) -> None:
        if self._short_base_dir is not None:
            shutil.rmtree(self._short_base_dir, ignore_errors=True)
            self._short_base_dir = None

    def stop(self) -> None:
        """Stop the whole dovecot process tree; mail stays in workdir."""
        live.discard(self)
        if self._child is not None:
            self._child.stop()
            self._child = None
            wait_port_closed(self.port)
            log.info("dovecot on port %d stopped", self.port)
        self._drop_short_base_dir()
