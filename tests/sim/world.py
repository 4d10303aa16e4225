"""The real servers a simulation runs against, started once and reused by every schedule.

One redis-server, the Alloy sandbox (in-process, real HTTP) and three Dovecots: one as
installed, one that does not advertise MOVE, one that advertises neither MOVE nor UIDPLUS
(Dovecot's ``imap_capability`` setting). Each schedule starts from an empty Redis, an
empty sandbox and fresh folders; the workers' contexts (and their IMAP logins) are kept.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis
from imapclient import IMAPClient
from mailingest_testbed.alloy_sandbox import SandboxServer
from mailingest_testbed.demo import local_environment
from mailingest_testbed.samples import AGENT_EMAIL
from mailingest_testbed.servers import DovecotServer, RedisServer

from mailingest.application.services import Context, build_context
from mailingest.config.settings import Settings, load_settings

from .hooks import Observer, SimRedis, SimTransport, hard_close, wrap_mailbox

ALLOY_TOKEN, ALLOY_SECRET = "sim-token", "sim-secret-value"
INBOX = "default"
FOLDER, PROCESSED, QUARANTINE = "SimIn", "SimProcessed", "SimQuarantine"
VARIANTS = ("full", "no-move", "no-move-no-uidplus")
DROPPED = {"full": (), "no-move": ("MOVE",), "no-move-no-uidplus": ("MOVE", "UIDPLUS")}

# the sender directory every schedule uses (the entity tokens are fixed: runs repeat)
SENDERS = {
    "alice.martin@example.com": "P-SimAliceMartin000001",
    "bob.okafor@example.org": "P-SimBobOkafor00000002",
    "carol.nguyen@example.net": "P-SimCarolNguyen000003",
}
STRANGER = "mallory@unknown.example"

# settings of every schedule: production defaults, except what makes retries generous
SETTINGS = {
    "imap_folder": FOLDER,
    "processed_folder": PROCESSED,
    "quarantine_folder": QUARANTINE,
    "alloy_rate": "0",  # the token bucket sleeps on real time; off
    "retry_base": "2",
    "retry_cap": "300",
    "max_attempts": "8",
    "failed_auto_retries": "20",
    "failed_retry_after": "600",
    # beat; a mail delivered mid-schedule is also polled at once half the time (as
    # `mailingest watch` does on IDLE), so the fault phase needs no beat every minute
    "poll_interval": "300",
    "log_level": "warning",
}


class Relay:
    """The observer every hook holds: forwards to the schedule running now."""

    def __init__(self) -> None:
        self.target: Observer | None = None

    def on_lock(self, key: bytes, token: bytes, ttl_ms: int) -> None:
        if self.target is not None:
            self.target.on_lock(key, token, ttl_ms)

    def network_fault(self, operation: str) -> str:
        return self.target.network_fault(operation) if self.target is not None else "none"

    def hold(self, held: Any) -> None:
        assert self.target is not None
        self.target.hold(held)

    def queue_since(self) -> int | None:
        return self.target.queue_since() if self.target is not None else None


@dataclass
class Server:
    """One Dovecot variant, its settings, and the harness's own connection to it."""

    name: str
    dovecot: DovecotServer
    settings: Settings
    admin: IMAPClient
    contexts: dict[int, Context] = field(default_factory=dict)
    known: set[str] = field(default_factory=set)  # destination folders that exist
    counts: dict[str, int] = field(default_factory=dict)  # mails seen by the last check


def _scratch() -> Path:
    base = Path("/dev/shm") if Path("/dev/shm").is_dir() else None  # tmpfs: no disk waits
    return Path(tempfile.mkdtemp(prefix="mailingest-sim-", dir=base))


def _admin(server: DovecotServer) -> IMAPClient:
    account = server.account
    client = IMAPClient(account.host, port=account.port, ssl=False, timeout=30)
    client.login(account.user, account.password)
    return client


class World:
    """Redis, the sandbox and the Dovecots; workers' contexts built on demand."""

    def __init__(self, workdir: Path | None = None, variants: tuple[str, ...] = VARIANTS) -> None:
        self.workdir = workdir or _scratch()
        self._owns_workdir = workdir is None
        self.variants = variants
        self.relay = Relay()
        self.redis_server: RedisServer | None = None
        self.sandbox: SandboxServer | None = None
        self.servers: dict[str, Server] = {}
        self.raw: redis.Redis | None = None
        self.clock: Callable[[], int] = lambda: 0

    # -- lifecycle ---------------------------------------------------------------
    def start(self) -> World:
        self.redis_server = RedisServer(self.workdir / "redis").start()
        self.raw = redis.Redis.from_url(self.redis_server.url)
        self.sandbox = SandboxServer(
            token=ALLOY_TOKEN, secret=ALLOY_SECRET, agents=[AGENT_EMAIL]
        ).start()
        senders = self.workdir / "senders.csv"
        senders.write_text(
            "email,entity_token\n" + "".join(f"{e},{t}\n" for e, t in SENDERS.items()),
            encoding="utf-8",
        )
        probe = self._dovecot("full", "")
        admin = _admin(probe)
        capabilities = [c.decode() for c in admin.capabilities()]
        admin.logout()
        for name in self.variants:
            if name == "full":
                dovecot = probe
            else:
                kept = [c for c in capabilities if c not in DROPPED[name]]
                dovecot = self._dovecot(name, f"imap_capability = {' '.join(kept)}\n")
            env = local_environment(
                self.redis_server.url,
                dovecot.account,
                self.sandbox.url,
                senders,
                alloy_token=ALLOY_TOKEN,
                alloy_secret=ALLOY_SECRET,
                **SETTINGS,
            )
            self.servers[name] = Server(name, dovecot, load_settings(env), _admin(dovecot))
        if "full" not in self.variants:
            probe.stop()
        self._load_lock_scripts()
        return self

    def _dovecot(self, name: str, extra: str) -> DovecotServer:
        return DovecotServer(
            self.workdir / f"imap-{name}", extra_config=extra + "mail_fsync = never\n"
        ).start()

    def _load_lock_scripts(self) -> None:
        """redis-py registers the lock scripts on first use; load them before any schedule
        so no schedule sees the extra round trips of a first use."""
        assert self.raw is not None
        import redis.lock

        for script in (
            redis.lock.Lock.LUA_RELEASE_SCRIPT,
            redis.lock.Lock.LUA_EXTEND_SCRIPT,
            redis.lock.Lock.LUA_REACQUIRE_SCRIPT,
        ):
            self.raw.script_load(script)

    def stop(self) -> None:
        for server in self.servers.values():
            for ctx in server.contexts.values():
                self.discard(ctx)
            server.contexts.clear()
            with contextlib.suppress(Exception):  # going away either way
                server.admin.logout()
            server.dovecot.stop()
        if self.sandbox is not None:
            self.sandbox.stop()
        if self.raw is not None:
            self.raw.close()
        if self.redis_server is not None:
            self.redis_server.stop()
        if self._owns_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> World:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- workers -----------------------------------------------------------------
    def context(self, variant: str, slot: int) -> Context:
        """Worker ``slot``'s context on ``variant`` (one worker process), kept between runs."""
        server = self.servers[variant]
        ctx = server.contexts.get(slot)
        if ctx is None:
            ctx = server.contexts[slot] = self._build(server.settings)
        return ctx

    def replace_context(self, variant: str, slot: int) -> Context:
        """The worker died (kill -9): its connections drop, a new process starts."""
        server = self.servers[variant]
        old = server.contexts.pop(slot, None)
        if old is not None:
            self.discard(old)
        return self.context(variant, slot)

    def _build(self, settings: Settings) -> Context:
        assert self.redis_server is not None
        client = SimRedis(
            host="127.0.0.1",
            port=self.redis_server.port,
            db=0,
            socket_timeout=30,
            observer=self.relay,
        )
        ctx = build_context(
            settings,
            redis_client=client,
            alloy_transport=SimTransport(self.relay),
            clock=self.clock,
            heartbeat=False,  # the scheduler keeps a running thread's leases (it would renew)
            queue_since=self.relay.queue_since,
        )
        make = ctx.mailbox
        ctx.mailbox = lambda name: wrap_mailbox(make(name))  # type: ignore[method-assign]
        return ctx

    def discard(self, ctx: Context) -> None:
        """Close a context as a dying process would: sockets dropped, no goodbyes."""
        for kept in list(ctx.connections.values()):
            for box in kept:
                hard_close(box)
        ctx.connections.clear()
        try:
            ctx.alloy.close()
            ctx.redis.connection_pool.disconnect()
        except Exception:  # noqa: BLE001
            pass

    def log_tail(self, variant: str, lines: int = 8) -> str:
        """The end of a Dovecot's log (for a report of a server error)."""
        try:
            text = self.servers[variant].dovecot.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n  dovecot: " + "\n  dovecot: ".join(text.splitlines()[-lines:])

    # -- per schedule ------------------------------------------------------------
    def reset(self, variant: str) -> None:
        """An empty Redis and sandbox, a new ingest folder (UIDs from 1), empty
        destination folders; the kept connections of the workers unselect first."""
        assert self.raw is not None and self.sandbox is not None
        self.raw.flushdb()
        self.sandbox.reset()
        server = self.servers[variant]
        for ctx in server.contexts.values():  # what a kept worker knew of the old Redis
            if ctx.alloy.pause is not None:
                ctx.alloy.pause.forget()
        self.unselect_kept(variant)
        self.recreate_ingest_folder(variant)
        admin = server.admin
        for folder in (PROCESSED, QUARANTINE):
            if folder not in server.known:
                if not admin.folder_exists(folder):
                    admin.create_folder(folder)
                server.known.add(folder)
            if server.counts.get(folder, 1) and admin.select_folder(folder)[b"EXISTS"]:
                admin.add_flags("1:*", [b"\\Deleted"], silent=True)
                admin.expunge()
        server.counts.clear()

    def recreate_ingest_folder(self, variant: str) -> None:
        """DELETE and CREATE the ingest folder (a new UIDVALIDITY, UIDs from 1). Dovecot
        may refuse while another session still has the old one open ("deleted under
        us", "already exists"): then again, on a fresh login of the harness."""
        server = self.servers[variant]
        for attempt in range(6):
            try:
                if server.admin.folder_exists(FOLDER):
                    server.admin.delete_folder(FOLDER)
                server.admin.create_folder(FOLDER)
                server.admin.folder_status(FOLDER, [b"UIDVALIDITY"])
                return
            except Exception:
                if attempt == 5:
                    raise
                self.relogin(variant)
                time.sleep(0.01 * (attempt + 1))

    def relogin(self, variant: str) -> None:
        server = self.servers[variant]
        with contextlib.suppress(Exception):  # already broken
            server.admin.logout()
        server.admin = _admin(server.dovecot)

    def unselect_kept(self, variant: str) -> None:
        """Kept (idle) connections leave the selected folder, so deleting it cannot drop
        them; a connection that fails is closed (reconnecting is not a checkpoint)."""
        for ctx in self.servers[variant].contexts.values():
            for kept in ctx.connections.values():
                for box in list(kept):
                    client = box.__dict__.get("_client")
                    try:
                        if client is None:
                            raise OSError("closed")
                        client.select_folder("INBOX", readonly=True)
                    except Exception:  # noqa: BLE001
                        hard_close(box)
                        kept.remove(box)


@dataclass(frozen=True)
class Stored:
    """A mail as the IMAP server holds it."""

    uid: int
    digest: str
    deleted: bool


class Folders:
    """The harness's own view of the IMAP folders (its own connection, no checkpoints)."""

    def __init__(self, world: World, variant: str) -> None:
        self.world = world
        self.variant = variant

    @property
    def admin(self) -> IMAPClient:
        return self.world.servers[self.variant].admin

    def append(self, raw: bytes, flags: tuple[bytes, ...] = ()) -> tuple[int, int]:
        """APPEND to the ingest folder; (UIDVALIDITY, UID) it got."""
        for attempt in range(6):
            try:
                answer = self.admin.append(FOLDER, raw, flags=flags)
                break
            except Exception:
                if attempt == 5:
                    raise
                self.world.relogin(self.variant)
                time.sleep(0.01 * (attempt + 1))
        text = answer.decode() if isinstance(answer, bytes) else str(answer)
        if "APPENDUID" in text:
            validity, uid = text.split("APPENDUID", 1)[1].strip(" ]").split()[:2]
            return int(validity), int(uid.rstrip("]"))
        info = self.admin.folder_status(FOLDER, [b"UIDVALIDITY", b"UIDNEXT"])
        return int(info[b"UIDVALIDITY"]), int(info[b"UIDNEXT"]) - 1

    def contents(self, folder: str) -> tuple[int, list[Stored]]:
        """(UIDVALIDITY, every mail) of ``folder``, read-only."""
        for attempt in range(6):
            try:
                return self._contents(folder)
            except Exception:
                if attempt == 5:
                    raise
                self.world.relogin(self.variant)
                time.sleep(0.01 * (attempt + 1))
        raise AssertionError("unreachable")

    def _contents(self, folder: str) -> tuple[int, list[Stored]]:
        from .scenario import digest

        info = self.admin.select_folder(folder, readonly=True)
        validity, exists = int(info[b"UIDVALIDITY"]), int(info[b"EXISTS"])
        self.world.servers[self.variant].counts[folder] = exists
        stored = []
        if exists:
            uids = self.admin.search(["ALL"])
            for uid, item in sorted(self.admin.fetch(uids, ["BODY.PEEK[]", "FLAGS"]).items()):
                stored.append(
                    Stored(int(uid), digest(item[b"BODY[]"]), b"\\Deleted" in item[b"FLAGS"])
                )
        if folder == FOLDER:
            self.admin.close_folder()  # the ingest folder may be deleted next
        return validity, stored

    def renumber(self) -> list[tuple[str, int, int]]:
        """The server renumbers the ingest folder (a new UIDVALIDITY): the same mails
        (bytes and flags) under new UIDs. Returns (digest, validity, uid) of each."""
        from .scenario import digest

        self.world.unselect_kept(self.variant)
        self.admin.select_folder(FOLDER)
        uids = self.admin.search(["ALL"])
        kept = []
        if uids:
            for _, item in sorted(self.admin.fetch(uids, ["BODY.PEEK[]", "FLAGS"]).items()):
                flags = tuple(f for f in item[b"FLAGS"] if f in (b"\\Deleted", b"\\Seen"))
                kept.append((bytes(item[b"BODY[]"]), flags))
        self.admin.select_folder("INBOX")
        self.world.recreate_ingest_folder(self.variant)
        placed = []
        for raw, flags in kept:
            validity, uid = self.append(raw, flags)
            placed.append((digest(raw), validity, uid))
        return placed
