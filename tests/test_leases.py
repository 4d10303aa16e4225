"""Leases against a real Redis: taken once, renewed by the heartbeat, lapsing when the
holder dies (a real process killed with SIGKILL), and read back by the sweep and status."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import redis
from mailingest_testbed.samples import bulk_scenario
from mailingest_testbed.servers import ImapServer

from mailingest.adapters import keys
from mailingest.adapters.ledger.leases import Leases, MailLeases, step_lease_keys, worker_name
from mailingest.application import pipeline
from mailingest.application.services import build_context
from mailingest.config.settings import load_settings
from mailingest.core.decisions import Step

from .helpers import deliver, write_senders

pytestmark = pytest.mark.servers

MAIL = "default/INBOX/7/42"


def test_one_holder_at_a_time_and_the_token_names_it(redis_client: redis.Redis) -> None:
    leases = Leases(redis_client, lease_ms=5_000, heartbeat=False)
    key = keys.step_lock(Step("upload", MAIL, 1).lock_name)
    first = leases.acquire(key)
    assert first is not None
    assert leases.acquire(key) is None  # held: a second run stands back
    assert 0 < redis_client.pttl(key) <= 5_000
    assert leases.holders([key, key + ":other"]) == [worker_name(), None]
    assert leases.mail_holders([(MAIL, 2), ("default/INBOX/7/43", 2)]) == {MAIL: worker_name()}
    leases.release(first)
    assert not redis_client.exists(key)
    assert leases.acquire(key) is not None


def test_release_never_frees_a_lease_another_holder_took(redis_client: redis.Redis) -> None:
    leases = Leases(redis_client, lease_ms=5_000, heartbeat=False)
    key = keys.step_lock(Step("describe", MAIL, 0).lock_name)
    mine = leases.acquire(key)
    assert mine is not None
    redis_client.set(key, "other-host:1:abc", px=5_000)  # it lapsed and another run took it
    leases.release(mine)
    assert redis_client.get(key) == b"other-host:1:abc"


def test_the_heartbeat_keeps_a_lease_alive_past_its_length(redis_client: redis.Redis) -> None:
    beating = Leases(redis_client, lease_ms=1_200, heartbeat=True)
    silent = Leases(redis_client, lease_ms=1_200, heartbeat=False)
    kept = beating.acquire("mailingest:lock:step:test:kept")
    lapsing = silent.acquire("mailingest:lock:step:test:lapsing")
    assert kept is not None and lapsing is not None
    time.sleep(3.0)  # 2.5 leases
    assert redis_client.exists("mailingest:lock:step:test:kept")
    assert not redis_client.exists("mailingest:lock:step:test:lapsing")
    assert not kept.lost
    beating.release(kept)
    beating.close()


def test_a_renewal_says_when_a_lease_was_lost(redis_client: redis.Redis) -> None:
    leases = Leases(redis_client, lease_ms=5_000, heartbeat=False)
    kept = leases.acquire("mailingest:lock:step:test:a")
    taken = leases.acquire("mailingest:lock:step:test:b")
    assert kept is not None and taken is not None
    redis_client.set("mailingest:lock:step:test:b", "someone-else:1:x")
    assert leases.renew() == 2
    assert not kept.lost and taken.lost
    assert leases.renew() == 1  # the lost one is no longer renewed


def test_step_lease_keys_cover_every_step_of_a_mail() -> None:
    names = step_lease_keys(MAIL, 2)
    assert sorted(names) == sorted(
        keys.step_lock(step.lock_name)
        for step in (
            Step("ingest", MAIL),
            Step("finish", MAIL),
            Step("describe", MAIL, 0),
            Step("upload", MAIL, 0),
            Step("describe", MAIL, 1),
            Step("upload", MAIL, 1),
        )
    )


HOLDER = textwrap.dedent(
    """
    import sys, time, redis
    from mailingest.adapters.ledger.leases import Leases
    leases = Leases(redis.Redis.from_url(sys.argv[1]), lease_ms=int(sys.argv[2]))
    assert leases.acquire(sys.argv[3]) is not None
    print("held", flush=True)
    time.sleep(600)
    """
)


def test_a_holder_killed_with_sigkill_loses_its_lease_within_one_lease(
    redis_url: str, redis_client: redis.Redis
) -> None:
    key = "mailingest:lock:step:test:killed"
    lease_ms = 1_500
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, redis_url, str(lease_ms), key],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        time.sleep(2 * lease_ms / 1000)  # alive: its heartbeat renews it
        assert redis_client.exists(key), "a live holder's lease lapsed"
        os.kill(holder.pid, signal.SIGKILL)
        killed = time.monotonic()
        while redis_client.exists(key) and time.monotonic() - killed < 10:
            time.sleep(0.05)
        lapsed = time.monotonic() - killed
    finally:
        holder.kill()
        holder.wait()
    assert not redis_client.exists(key)
    assert lapsed <= lease_ms / 1000 + 0.5


def test_a_lease_held_past_its_maximum_is_let_lapse(redis_client: redis.Redis) -> None:
    """A thread pool enforces no task time limit: a step hung on a trickling answer
    would hold its lease for ever, and its mail would never be swept. Past the longest
    a step may run, the heartbeat stops renewing it."""
    leases = Leases(redis_client, lease_ms=5_000, heartbeat=False, max_hold_ms=1_000)
    hung = leases.acquire("mailingest:lock:step:test:hung")
    assert hung is not None
    assert leases.renew() == 1 and not hung.lost
    time.sleep(1.2)
    assert leases.renew() == 0 and hung.lost  # no longer renewed: it lapses in one lease


def test_a_renewal_never_drops_a_newer_lease_on_the_same_key(redis_client: redis.Redis) -> None:
    """The step released its lease and took the key again while a renewal was on its way:
    the renewal reports the old token lost, and must not forget the new lease."""
    leases = Leases(redis_client, lease_ms=5_000, heartbeat=False)
    key = "mailingest:lock:step:test:again"
    old = leases.acquire(key)
    assert old is not None
    real = leases._renew

    def release_and_retake_first(**kw: object) -> object:
        leases.release(old)
        again = leases.acquire(key)
        assert again is not None
        news.append(again)
        return real(**kw)

    news: list = []
    leases._renew = release_and_retake_first  # type: ignore[method-assign]
    leases.renew()
    leases._renew = real  # type: ignore[method-assign]
    (new,) = news
    assert not new.lost
    assert leases.renew() == 1  # still held, still renewed


def test_a_lease_given_back_leaves_no_trace_one_that_lapsed_does(
    redis_client: redis.Redis,
) -> None:
    """What the sweep reads to tell a step that died mid-way from one that ended: the
    upload's lease lapsed (its holder stopped renewing), the describe's was given back."""
    leases = Leases(redis_client, lease_ms=1_000, heartbeat=False)
    upload = keys.step_lock(Step("upload", MAIL, 0).lock_name)
    describe = keys.step_lock(Step("describe", MAIL, 1).lock_name)
    dying, ended = leases.acquire(upload), leases.acquire(describe)
    assert dying is not None and ended is not None
    seen = leases.mail_leases([(MAIL, 2)])[MAIL]
    assert seen.holder == worker_name() and seen.lapsed == []
    leases.release(ended)
    time.sleep(1.3)  # the upload's holder "died": not renewed, its lease is gone
    assert not redis_client.exists(upload)
    assert leases.mail_leases([(MAIL, 2), ("default/INBOX/7/43", 1)]) == {
        MAIL: MailLeases("", [upload])
    }
    # another run takes the same step again meanwhile: no longer lapsed, and kept
    again = Leases(redis_client, lease_ms=5_000, heartbeat=False).acquire(upload)
    assert again is not None
    leases.forget(step_lease_keys(MAIL, 2))
    assert leases.mail_leases([(MAIL, 2)])[MAIL].holder == worker_name()
    assert redis_client.get(keys.lease_note(upload)) == again.token.encode()
    # the late holder wakes and gives back the lease it lost: the new one's note stays
    leases.release(dying)
    assert redis_client.get(keys.lease_note(upload)) == again.token.encode()
    redis_client.delete(upload)  # the new holder dies too; then the sweep requeues
    leases.forget(step_lease_keys(MAIL, 2))
    assert leases.mail_leases([(MAIL, 2)]) == {}


def test_the_sweep_requeues_a_mail_whose_step_died_however_deep_the_queue(
    env: dict[str, str], imap: ImapServer, senders_file: Path
) -> None:
    """A worker died mid-upload (its lease lapsed) while the broker still holds tasks
    sent ten minutes ago: the sweep cannot tell whether a task of the mail waits among
    them, but the lapsed lease says its step died. It queues the mail again at once,
    where a mail merely idle waits for the queue or the backstop."""
    scenario = bulk_scenario(2, seed=7)
    write_senders(senders_file, scenario)
    deliver(imap, [mail.raw for mail in scenario.mails[:2]])  # two known senders'
    settings = load_settings(env | {"MAILINGEST_LEASE": "3"})
    old = [0]
    ctx = build_context(settings, queue_since=lambda: old[0])
    try:
        dead, idle = (step.mail_id for step in pipeline.poll(ctx, "default").steps)
        for mail_id in (dead, idle):
            pipeline.ingest(ctx, mail_id)
        # the dead worker's upload lease: taken, never renewed, never given back
        dying = Leases(ctx.redis, lease_ms=200, heartbeat=False)
        assert dying.acquire(keys.step_lock(Step("upload", dead, 0).lock_name)) is not None
        time.sleep(0.4)
        now = ctx.ledger.now()
        for mail_id in (dead, idle):  # both quiet for more than a lease
            ctx.redis.hset(keys.mail(mail_id), "updated_at", now - 4_000)
        old[0] = now - 600_000  # tasks sent ten minutes ago still wait in the broker
        ctx.redis.hset(keys.poll_status("default"), "swept_at", now - 4_000)  # not just now
        steps = pipeline.sweep(ctx, "default")
        assert steps == [Step("ingest", dead)]
        upload = keys.step_lock(Step("upload", dead, 0).lock_name)
        assert not ctx.redis.exists(keys.lease_note(upload))  # the lapsed lease is forgotten
    finally:
        ctx.close()


def test_a_live_holder_takes_back_a_lease_that_expired_while_redis_was_away(
    redis_client: redis.Redis,
) -> None:
    """The heartbeat could not reach Redis for longer than the lease: the key expired,
    though its holder lives and works on. Its next renewal takes it back (its note is
    still its own), so a second run cannot take the step meanwhile for long."""
    leases = Leases(redis_client, lease_ms=1_000, heartbeat=False)
    key = keys.step_lock(Step("upload", MAIL, 0).lock_name)
    held = leases.acquire(key)
    assert held is not None
    time.sleep(1.3)  # no renewal got through
    assert not redis_client.exists(key)
    assert leases.renew() == 1 and not held.lost
    assert redis_client.get(key) == held.token.encode()
    # but not one another holder took meanwhile and gave back
    other = Leases(redis_client, lease_ms=1_000, heartbeat=False)
    time.sleep(1.3)
    taken = other.acquire(key)
    assert taken is not None
    other.release(taken)
    assert leases.renew() == 1 and held.lost
    assert not redis_client.exists(key)
