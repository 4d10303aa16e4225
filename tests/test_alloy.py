"""The Alloy client over real HTTP against the sandbox, and its error mapping."""

from __future__ import annotations

import httpx
import pytest
import redis
from mailingest_testbed.alloy_sandbox import SandboxServer
from prometheus_client import REGISTRY

from mailingest.adapters.alloy import AlloyClient, error_from_response
from mailingest.adapters.rate_limit import PAUSE_REFRESH, AlloyPause
from mailingest.application.pipeline import RETRYABLE
from mailingest.config.settings import Secret
from mailingest.core.errors import AlloyRejected, AlloyUnavailable

from .conftest import ALLOY_SECRET, ALLOY_TOKEN

ENTITY = "P-x4vtIdFD20vv6jWshIYD"
AGENT = "kyc.agent@support.example"


def client(sandbox: SandboxServer, **kw: object) -> AlloyClient:
    return AlloyClient(sandbox.url, Secret(ALLOY_TOKEN), Secret(ALLOY_SECRET), **kw)  # type: ignore[arg-type]


@pytest.mark.servers
def test_describe_upload_list_download(sandbox: SandboxServer) -> None:
    with client(sandbox) as alloy:
        doc = alloy.describe(
            ENTITY,
            name="driver_license",
            extension="pdf",
            type="license",
            note="Uploaded from email customer sent",
            note_author_agent_email=AGENT,
        )
        assert doc.token.startswith("D-") and len(doc.token) == 22 and not doc.uploaded
        assert doc.notes[0]["note_author_agent_email"] == AGENT
        data = bytes(range(256)) * 100
        assert alloy.upload(ENTITY, doc.token, data).uploaded
        assert alloy.download(ENTITY, doc.token) == data
        assert [d.token for d in alloy.list(ENTITY)] == [doc.token]


@pytest.mark.servers
def test_rejections_carry_what_alloy_said(sandbox: SandboxServer) -> None:
    with client(sandbox) as alloy:
        with pytest.raises(AlloyRejected) as err:
            alloy.describe(
                ENTITY,
                name="x",
                extension="pdf",
                type="selfie",
                note=None,
                note_author_agent_email=None,
            )
        e = err.value
        assert (e.status, e.minor_code) == (400, 4002) and not isinstance(e, RETRYABLE)
        assert e.error_token and e.error_token in str(e)
        with pytest.raises(AlloyRejected) as err:
            alloy.upload(ENTITY, "D-00000000000000000000", b"x")
        assert (err.value.status, err.value.minor_code) == (404, 4041)
    bad = AlloyClient(sandbox.url, Secret("wrong"), Secret("creds"))
    with pytest.raises(AlloyUnavailable) as failed:  # our credentials: retried, not quarantined
        bad.list(ENTITY)
    assert (failed.value.status, failed.value.minor_code) == (401, 4011)
    assert "creds" not in str(failed.value) and "wrong" not in str(failed.value)


@pytest.mark.servers
def test_outages_are_retryable(sandbox: SandboxServer) -> None:
    with client(sandbox, read_timeout=1.0) as alloy:
        sandbox.set_faults(rate_429=1.0, retry_after_fraction=1.0, retry_after_seconds=7)
        with pytest.raises(AlloyUnavailable) as err:
            alloy.list(ENTITY)
        assert (err.value.status, err.value.minor_code, err.value.retry_after) == (429, 4033, 7.0)
        sandbox.set_faults(rate_429=0.0, error_500=1.0)
        with pytest.raises(AlloyUnavailable) as err:
            alloy.list(ENTITY)
        assert err.value.status == 500 and isinstance(err.value, RETRYABLE)
        sandbox.set_faults(error_500=0.0, slow_fraction=1.0, slow_ms=4000)
        with pytest.raises(AlloyUnavailable, match="timed out"):
            alloy.list(ENTITY)
        sandbox.set_faults(slow_fraction=0.0, drop_fraction=1.0)
        with pytest.raises(AlloyUnavailable, match="connection failed"):
            alloy.list(ENTITY)


def test_error_mapping_without_a_json_body() -> None:
    response = httpx.Response(502, text="<html>bad gateway</html>", headers={"Retry-After": "12"})
    error = error_from_response(response, "upload")
    assert isinstance(error, AlloyUnavailable) and error.retry_after == 12.0
    assert str(error) == "Alloy upload answered 502: Bad Gateway"
    error = error_from_response(httpx.Response(413, text=""), "upload")
    assert isinstance(error, AlloyRejected) and not isinstance(error, RETRYABLE)
    for status in (408, 425):  # "not now", not "never": retried, and not applied
        error = error_from_response(httpx.Response(status, text=""), "download")
        assert isinstance(error, AlloyUnavailable) and isinstance(error, RETRYABLE), status
        assert not error.applied


@pytest.mark.servers
def test_a_429_holds_every_worker_for_retry_after(sandbox: SandboxServer, redis_url: str) -> None:
    """Two workers (two clients, each with its own Redis connection): the one Alloy answers
    429 shares the pause; the other holds its next request for Retry-After before it goes,
    and does not send at all while the pause is longer than a worker waits."""
    now = [1_750_000_000_000]
    slept: list[float] = []
    connections = [redis.Redis.from_url(redis_url) for _ in range(2)]

    def worker(connection: redis.Redis) -> AlloyClient:
        pause = AlloyPause(connection, clock=lambda: now[0], refresh=0, sleep=slept.append)
        return client(sandbox, pause=pause)

    def held(cause: str) -> float:
        return REGISTRY.get_sample_value("mailingest_alloy_held_total", {"cause": cause}) or 0

    first, second = worker(connections[0]), worker(connections[1])
    with first, second:
        first.list(ENTITY)
        second.list(ENTITY)
        assert slept == []  # no 429 yet: nobody holds
        sandbox.set_faults(rate_429=1.0, retry_after_fraction=1.0, retry_after_seconds=2)
        with pytest.raises(AlloyUnavailable) as err:
            first.list(ENTITY)
        assert (err.value.status, err.value.retry_after) == (429, 2.0)
        sandbox.set_faults(rate_429=0.0)
        holds = held("pause")
        requests = sandbox.state.stats()["requests_total"]
        second.list(ENTITY)  # held 2 s (the fake sleep), then sent
        assert slept == [2.0]
        assert held("pause") == holds + 1
        assert sandbox.state.stats()["requests_total"] == requests + 1

        now[0] += 2_000  # the pause is over: nobody holds
        second.list(ENTITY)
        assert slept == [2.0]

        sandbox.set_faults(rate_429=1.0, retry_after_seconds=30)
        with pytest.raises(AlloyUnavailable):
            second.list(ENTITY)
        sandbox.set_faults(rate_429=0.0)
        requests = sandbox.state.stats()["requests_total"]
        with pytest.raises(AlloyUnavailable) as deferred:  # 30 s: not waited in a worker
            first.list(ENTITY)
        assert deferred.value.applied is False and deferred.value.status is None
        assert deferred.value.retry_after == 30.0
        assert "429" in str(deferred.value)
        assert sandbox.state.stats()["requests_total"] == requests  # never sent
    for connection in connections:
        connection.close()


@pytest.mark.servers
def test_without_a_429_the_pause_costs_no_redis_round_trip_per_request(
    sandbox: SandboxServer, redis_client: redis.Redis
) -> None:
    def commands() -> int:
        stats = redis_client.info("commandstats")
        return sum(int(v["calls"]) for k, v in stats.items() if k != "cmdstat_info")

    pause = AlloyPause(redis_client, clock=lambda: 1_750_000_000_000)
    with client(sandbox, pause=pause) as alloy:
        before = commands()
        for _ in range(20):
            alloy.list(ENTITY)
        assert commands() - before <= 2  # one read per PAUSE_REFRESH, not one per request
    assert PAUSE_REFRESH <= 1.0  # and another worker's 429 is known within a second
