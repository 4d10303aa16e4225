"""Settings: every public variable, defaults, *_FILE secrets, one-line errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from mailingest.config.settings import DEFAULT_NOTE, Secret, load_settings
from mailingest.core.errors import ConfigError

BASE = {
    "MAILINGEST_IMAP_HOST": "imap.example.com",
    "MAILINGEST_IMAP_USER": "support@example.com",
    "MAILINGEST_IMAP_PASSWORD": "pässwörd with spaces",
    "MAILINGEST_ALLOY_TOKEN": "tok",
    "MAILINGEST_ALLOY_SECRET": "sec",
    "MAILINGEST_AGENT_EMAIL": "Agent@Example.com",
    "MAILINGEST_REDIS_URL": "redis://127.0.0.1:6380/0",
    "MAILINGEST_TRUSTED_AUTHSERV_ID": "mx.example.com",
}


def test_defaults_follow_the_public_contract() -> None:
    s = load_settings(BASE).require("redis", "imap", "alloy")
    inbox = s.inboxes[0]
    assert (inbox.security, inbox.port, inbox.folder) == ("ssl", 993, "INBOX")
    assert (inbox.processed_folder, inbox.quarantine_folder) == ("Processed", "Quarantine")
    assert inbox.note == DEFAULT_NOTE == "Uploaded from email customer sent"
    assert inbox.poll_interval == 60
    assert inbox.agent_email == "agent@example.com"
    assert s.alloy_url == "https://sandbox.alloy.co/v1"
    assert s.broker_url == s.redis_url
    assert inbox.password == Secret("pässwörd with spaces")


def test_starttls_defaults_to_port_143_and_broker_may_differ() -> None:
    s = load_settings(
        BASE | {"MAILINGEST_IMAP_SECURITY": "STARTTLS", "MAILINGEST_BROKER_URL": "redis://b:1/2"}
    )
    assert s.inboxes[0].port == 143 and s.inboxes[0].security == "starttls"
    assert s.broker_url == "redis://b:1/2"


def test_secrets_never_show_in_repr() -> None:
    s = load_settings(BASE)
    text = repr(s)
    for secret in ("pässwörd", "sec'", "tok'"):
        assert secret not in text
    assert "********" in text


def test_secret_from_file(tmp_path: Path) -> None:
    path = tmp_path / "pw"
    path.write_text("from-a-file\n", encoding="utf-8")
    env = {k: v for k, v in BASE.items() if k != "MAILINGEST_IMAP_PASSWORD"}
    s = load_settings(env | {"MAILINGEST_IMAP_PASSWORD_FILE": str(path)})
    assert s.inboxes[0].password and s.inboxes[0].password.reveal() == "from-a-file"


@pytest.mark.parametrize(
    ("change", "variable", "words"),
    [
        ({"MAILINGEST_IMAP_PORT": "99999"}, "MAILINGEST_IMAP_PORT", "between 1 and 65535"),
        ({"MAILINGEST_IMAP_PORT": "imap"}, "MAILINGEST_IMAP_PORT", "integer"),
        ({"MAILINGEST_IMAP_SECURITY": "tls"}, "MAILINGEST_IMAP_SECURITY", "one of ssl"),
        ({"MAILINGEST_POLL_INTERVAL": "0"}, "MAILINGEST_POLL_INTERVAL", "between"),
        ({"MAILINGEST_POLL_INTERVAL": "soon"}, "MAILINGEST_POLL_INTERVAL", "number"),
        ({"MAILINGEST_AGENT_EMAIL": "john"}, "MAILINGEST_AGENT_EMAIL", "e-mail"),
        ({"MAILINGEST_REDIS_URL": "http://x"}, "MAILINGEST_REDIS_URL", "redis"),
        ({"MAILINGEST_BROKER_URL": "amqp://x"}, "MAILINGEST_BROKER_URL", "redis"),
        ({"MAILINGEST_ALLOY_URL": "http://api.alloy.co/v1"}, "MAILINGEST_ALLOY_URL", "https"),
        ({"MAILINGEST_ALLOY_URL": "ftp://x"}, "MAILINGEST_ALLOY_URL", "URL"),
        ({"MAILINGEST_SENDERS_FILE": "/nonexistent.csv"}, "MAILINGEST_SENDERS_FILE", "readable"),
        ({"MAILINGEST_PROCESSED_FOLDER": "INBOX"}, "MAILINGEST_PROCESSED_FOLDER", "different"),
        ({"MAILINGEST_IMAP_PASSWORD_FILE": "/nonexistent"}, "MAILINGEST_IMAP_PASSWORD", "both"),
    ],
)
def test_bad_values_name_the_variable(change: dict, variable: str, words: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_settings(BASE | change)
    assert err.value.variable.startswith(variable)
    assert words in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    "missing",
    [
        "MAILINGEST_IMAP_HOST",
        "MAILINGEST_ALLOY_SECRET",
        "MAILINGEST_AGENT_EMAIL",
        "MAILINGEST_REDIS_URL",
    ],
)
def test_missing_required_setting(missing: str) -> None:
    env = {k: v for k, v in BASE.items() if k != missing}
    with pytest.raises(ConfigError, match=f"^{missing} is required"):
        load_settings(env).require("redis", "imap", "alloy")


def test_plain_http_allowed_to_loopback_only() -> None:
    assert load_settings(
        BASE | {"MAILINGEST_ALLOY_URL": "http://127.0.0.1:8080/v1/"}
    ).alloy_url == ("http://127.0.0.1:8080/v1")
    assert load_settings(BASE | {"MAILINGEST_ALLOY_URL": "http://localhost:1/v1"})


def test_redis_password_is_not_echoed() -> None:
    with pytest.raises(ConfigError) as err:
        load_settings(BASE | {"MAILINGEST_REDIS_URL": "http://user:hunter2@host:1/0"})
    assert "hunter2" not in str(err.value)


@pytest.mark.parametrize("command", [["worker"], ["poll-once"], ["beat"]])
def test_cli_stops_with_one_line_and_no_traceback(command: list[str]) -> None:
    env = (
        {"PATH": "/usr/bin:/bin"}
        | {k: v for k, v in BASE.items()}
        | {"MAILINGEST_IMAP_PORT": "not-a-port"}
    )
    proc = subprocess.run(
        [sys.executable, "-m", "mailingest", *command],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines == [
        "mailingest: configuration error: MAILINGEST_IMAP_PORT must be an integer, got 'not-a-port'"
    ]
    assert "pässwörd" not in proc.stderr


def test_celery_app_import_stops_with_one_line_per_problem() -> None:
    env = {"PATH": "/usr/bin:/bin", "MAILINGEST_IMAP_HOST": "x"}
    proc = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "mailingest", "inspect", "ping"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.splitlines()
    assert lines[0] == (
        "mailingest: configuration error: MAILINGEST_REDIS_URL is required but not set"
    )
    assert len(lines) == 7  # the redis URL, user, password, authserv-id, token, secret, agent
    assert all(line.startswith("mailingest: configuration error: MAILINGEST_") for line in lines)


def test_visibility_timeout_must_outlast_a_task_and_its_retry() -> None:
    s = load_settings(BASE)
    assert s.visibility_timeout >= s.task_time_limit + s.retry_cap + 30
    with pytest.raises(ConfigError, match="VISIBILITY_TIMEOUT must be at least 630 s"):
        load_settings(BASE | {"MAILINGEST_VISIBILITY_TIMEOUT": "300"})
    fast = {
        "MAILINGEST_TASK_TIME_LIMIT": "20",
        "MAILINGEST_RETRY_CAP": "2",
        "MAILINGEST_VISIBILITY_TIMEOUT": "60",
    }
    assert load_settings(BASE | fast).visibility_timeout == 60


def test_malformed_senders_file_stops_start_up(tmp_path: Path) -> None:
    path = tmp_path / "senders.csv"
    path.write_text("email,entity_token\nalice@example.com\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"MAILINGEST_SENDERS_FILE .*senders.csv:2"):
        load_settings(BASE | {"MAILINGEST_SENDERS_FILE": str(path)})


def test_celery_config_matches_the_settings() -> None:
    from mailingest.application.celery_config import celery_config

    conf = celery_config(load_settings(BASE))
    assert conf["task_acks_late"] and conf["task_reject_on_worker_lost"]
    assert conf["worker_prefetch_multiplier"] == 1
    assert conf["task_time_limit"] == 300 and conf["task_soft_time_limit"] < 300
    assert conf["broker_transport_options"]["visibility_timeout"] >= 300 + 300
    assert conf["beat_scheduler"] == "mailingest.application.beat:Scheduler"
    assert conf["beat_schedule"]["poll-default"]["args"] == ("default",)
    # task events (Flower's food) only where asked for: elsewhere they are Redis traffic
    assert not conf["worker_send_task_events"] and not conf["task_send_sent_event"]
    on = celery_config(load_settings(BASE | {"MAILINGEST_TASK_EVENTS": "on"}))
    assert on["worker_send_task_events"] and on["task_send_sent_event"]
    with pytest.raises(ConfigError, match="MAILINGEST_TASK_EVENTS"):
        load_settings(BASE | {"MAILINGEST_TASK_EVENTS": "yes"})


def test_beat_sweeps_every_lease_where_polls_are_rarer() -> None:
    from mailingest.application.celery_config import celery_config

    rare = celery_config(load_settings(BASE | {"MAILINGEST_POLL_INTERVAL": "60"}))["beat_schedule"]
    assert rare["sweep-default"]["task"] == "mailingest.sweep_inbox"
    assert rare["sweep-default"]["schedule"] == 15.0  # MAILINGEST_LEASE's default
    often = celery_config(
        load_settings(BASE | {"MAILINGEST_POLL_INTERVAL": "2", "MAILINGEST_LEASE": "5"})
    )["beat_schedule"]
    assert "sweep-default" not in often  # every poll sweeps already
    with pytest.raises(ConfigError, match="MAILINGEST_LEASE"):
        load_settings(BASE | {"MAILINGEST_LEASE": "1"})


def test_sender_auth_on_by_default_and_opting_out_warns() -> None:
    env = {k: v for k, v in BASE.items() if k != "MAILINGEST_TRUSTED_AUTHSERV_ID"}
    with pytest.raises(ConfigError, match=r"^MAILINGEST_TRUSTED_AUTHSERV_ID is required while"):
        load_settings(env).require("imap")
    with pytest.raises(ConfigError, match="MAILINGEST_SENDER_AUTH must be 'off' or a list"):
        load_settings(BASE | {"MAILINGEST_SENDER_AUTH": "dmark"})
    on = load_settings(BASE)
    policy = on.inboxes[0].sender_auth
    assert policy is not None and policy.accept == ("dmarc",)
    off = load_settings(env | {"MAILINGEST_SENDER_AUTH": "off"}).require("imap")
    assert off.inboxes[0].sender_auth is None and not off.inboxes[0].sender_auth_on
    assert off.sender_auth_off == ("default",)
    proc = subprocess.run(
        [sys.executable, "-c", "import mailingest.application.celery_app"],
        env={"PATH": "/usr/bin:/bin"} | env | {"MAILINGEST_SENDER_AUTH": "off"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert "WARNING: inbox default: sender authentication is off" in proc.stderr


def test_allowed_types_and_staging_key_are_checked() -> None:
    with pytest.raises(ConfigError, match="MAILINGEST_ALLOWED_TYPES names unknown type"):
        load_settings(BASE | {"MAILINGEST_ALLOWED_TYPES": "pdf,exe-ish"})
    with pytest.raises(ConfigError, match="MAILINGEST_STAGING_KEY must be 32 bytes"):
        load_settings(BASE | {"MAILINGEST_STAGING_KEY": "c2hvcnQ="})


# -- several inboxes from a TOML file (MAILINGEST_CONFIG) ---------------------------

KEY = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="  # 32 bytes, URL-safe base64

TWO_INBOXES = """\
redis_url = "redis://127.0.0.1:6380/0"
alloy_token = "tok"
alloy_secret_file = "alloy-secret"
agent_email = "ops@example.com"
poll_interval = 120
trusted_authserv_id = "mx.example.com"

[[inboxes]]
name = "eu"
imap_host = "imap.eu.example.com"
imap_user = "support-eu@example.com"
imap_password_file = "eu-password"
senders_file = "senders.csv"
note = "Sent in by e-mail (EU desk)"

[[inboxes]]
name = "us"
imap_host = "imap.us.example.com"
imap_user = "support-us@example.com"
imap_auth = "xoauth2"
oauth_provider = "microsoft"
oauth_tenant = "contoso.onmicrosoft.com"
oauth_client_id = "client-1"
oauth_refresh_token_file = "/run/secrets/us-refresh"
agent_email = "us-ops@example.com"
poll_interval = 15
processed_folder = "Done"
sender_auth = ["dkim", "spf"]
trusted_authserv_id = "mx.microsoft.com"
"""


def write_config(tmp_path: Path, text: str = TWO_INBOXES) -> dict[str, str]:
    (tmp_path / "alloy-secret").write_text("s3cret\n", encoding="utf-8")
    (tmp_path / "eu-password").write_text("eu-pw\n", encoding="utf-8")
    (tmp_path / "senders.csv").write_text("email,entity_token\na@b.example,P-1\n")
    path = tmp_path / "mailingest.toml"
    path.write_text(text.replace("/run/secrets/us-refresh", str(tmp_path / "eu-password")))
    return {"MAILINGEST_CONFIG": str(path), "MAILINGEST_STAGING_KEY": KEY}


def test_two_inboxes_from_one_file_with_shared_defaults(tmp_path: Path) -> None:
    s = load_settings(write_config(tmp_path)).require("redis", "imap", "alloy")
    eu, us = s.inboxes
    assert (eu.name, eu.host, eu.user) == ("eu", "imap.eu.example.com", "support-eu@example.com")
    assert eu.password == Secret("eu-pw") and eu.auth == "password" and eu.oauth is None
    assert eu.senders_file == tmp_path / "senders.csv"  # relative to the file
    assert (eu.agent_email, eu.poll_interval, eu.note) == (
        "ops@example.com",
        120,
        "Sent in by e-mail (EU desk)",
    )
    assert us.agent_email == "us-ops@example.com" and us.poll_interval == 15
    assert (us.processed_folder, us.note) == ("Done", DEFAULT_NOTE)
    assert us.auth == "xoauth2" and us.password is None and us.oauth is not None
    assert us.oauth.token_url == (
        "https://login.microsoftonline.com/contoso.onmicrosoft.com/oauth2/v2.0/token"
    )
    assert us.oauth.scope and "IMAP.AccessAsUser.All" in us.oauth.scope
    assert eu.sender_auth and eu.sender_auth.accept == ("dmarc",)
    assert us.sender_auth and us.sender_auth.accept == ("dkim", "spf")
    assert us.sender_auth.trusted_authserv_ids == ("mx.microsoft.com",)
    assert s.alloy_secret == Secret("s3cret") and s.config_file == tmp_path / "mailingest.toml"


def test_environment_overrides_the_file(tmp_path: Path) -> None:
    env = write_config(tmp_path) | {
        "MAILINGEST_ALLOY_URL": "http://127.0.0.1:9/v1",
        "MAILINGEST_POLL_INTERVAL": "5",  # an inbox setting: every inbox of the file
        "MAILINGEST_ALLOY_SECRET": "from-env",  # replaces the file's alloy_secret_file
    }
    s = load_settings(env)
    assert s.alloy_url == "http://127.0.0.1:9/v1" and s.alloy_secret == Secret("from-env")
    assert [i.poll_interval for i in s.inboxes] == [5, 5]


def test_single_inbox_file_and_environment(tmp_path: Path) -> None:
    path = tmp_path / "one.toml"
    path.write_text('imap_host = "imap.example.com"\nimap_user = "file@example.com"\n')
    s = load_settings(BASE | {"MAILINGEST_CONFIG": str(path), "MAILINGEST_IMAP_HOST": ""})
    (inbox,) = s.inboxes
    assert inbox.host == "imap.example.com"  # an empty variable does not override
    assert inbox.user == "support@example.com"  # the environment wins


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (("poll_interval = 120", "poll_intervall = 120"), r"mailingest.toml.poll_intervall is not"),
        (
            ('note = "Sent', 'redis_url = "redis://x:1/0"\nnote = "Sent'),
            r"inboxes\[eu\].redis_url is not a per-inbox",
        ),
        (
            ("poll_interval = 15", "poll_interval = 0"),
            r"inboxes\[us\].poll_interval must be between",
        ),
        (('name = "us"', 'name = "eu"'), r"inboxes\[eu\].name 'eu' names two inboxes"),
        (
            ('imap_host = "imap.us.example.com"', 'imap_hots = "imap.us.example.com"'),
            r"inboxes\[us\].imap_hots is not a per-inbox setting",
        ),
        (
            ('oauth_client_id = "client-1"\n', ""),
            r"inboxes\[us\].oauth_client_id is required for imap_auth=xoauth2",
        ),
        (
            ('oauth_provider = "microsoft"', 'oauth_provider = "yahoo"'),
            r"oauth_provider must be one of",
        ),
        ((TWO_INBOXES, 'inboxes = ["eu"]\n'), r"inboxes must be a list of tables"),
        (
            ("poll_interval = 120", "poll_interval = [120"),
            r"MAILINGEST_CONFIG .* is not valid TOML",
        ),
        (("poll_interval = 120", "[alloy]\nurl = 1"), r"mailingest.toml.alloy must be a string"),
    ],
)
def test_a_bad_file_names_the_key(tmp_path: Path, edit: tuple[str, str], message: str) -> None:
    env = write_config(tmp_path, TWO_INBOXES.replace(*edit, 1))
    with pytest.raises(ConfigError, match=message):
        load_settings(env).require("redis", "imap", "alloy")


def test_missing_values_of_a_file_inbox_name_its_table(tmp_path: Path) -> None:
    env = write_config(tmp_path, TWO_INBOXES.replace('imap_host = "imap.us.example.com"\n', ""))
    with pytest.raises(ConfigError, match=r"^mailingest.toml: inboxes\[us\].imap_host is required"):
        load_settings(env).require("imap")


def test_two_inboxes_on_one_folder_are_refused(tmp_path: Path) -> None:
    text = TWO_INBOXES.replace("imap.us.example.com", "imap.eu.example.com").replace(
        "support-us@", "Support-EU@"
    )
    with pytest.raises(ConfigError, match="inboxes 'eu' and 'us' read the same folder"):
        load_settings(write_config(tmp_path, text))


def test_identity_variables_cannot_apply_to_several_inboxes(tmp_path: Path) -> None:
    env = write_config(tmp_path) | {"MAILINGEST_IMAP_PASSWORD": "one-for-all"}
    with pytest.raises(ConfigError, match=r"^MAILINGEST_IMAP_PASSWORD cannot apply to every"):
        load_settings(env)


def test_oauth_needs_the_staging_key_and_https(tmp_path: Path) -> None:
    env = write_config(tmp_path)
    del env["MAILINGEST_STAGING_KEY"]
    with pytest.raises(ConfigError, match=r"MAILINGEST_STAGING_KEY is required for inbox 'us'"):
        load_settings(env)
    text = TWO_INBOXES.replace(
        'oauth_provider = "microsoft"', 'oauth_token_url = "http://login.example.com/token"'
    )
    with pytest.raises(ConfigError, match=r"inboxes\[us\].oauth_token_url must use https"):
        load_settings(write_config(tmp_path, text))


# -- every problem at once; names that are not settings ------------------------------

ALL = ("redis", "imap", "alloy")
EMPTY_ENVIRONMENT_PROBLEMS = [
    ("MAILINGEST_REDIS_URL", "is required but not set"),
    ("MAILINGEST_IMAP_HOST", "is required but not set"),
    ("MAILINGEST_IMAP_USER", "is required but not set"),
    ("MAILINGEST_IMAP_PASSWORD", "is required but not set"),
    ("MAILINGEST_TRUSTED_AUTHSERV_ID", "is required while sender authentication is on"),
    ("MAILINGEST_ALLOY_TOKEN", "is required but not set"),
    ("MAILINGEST_ALLOY_SECRET", "is required but not set"),
    ("MAILINGEST_AGENT_EMAIL", "is required but not set"),
]


def test_every_missing_setting_is_reported_at_once_from_an_empty_environment() -> None:
    with pytest.raises(ConfigError) as err:
        load_settings({}, require=ALL)
    problems = err.value.problems
    assert [name for name, _ in problems] == [name for name, _ in EMPTY_ENVIRONMENT_PROBLEMS]
    for (_, problem), (_, words) in zip(problems, EMPTY_ENVIRONMENT_PROBLEMS, strict=True):
        assert problem.startswith(words)
    assert str(err.value).splitlines() == err.value.lines()
    with pytest.raises(ConfigError) as err:  # the same through Settings.require
        load_settings({}).require(*ALL)
    assert err.value.problems == problems


def test_check_config_lists_every_problem_in_one_run() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "mailingest", "check-config"],
        env={"PATH": "/usr/bin:/bin", "MAILINGEST_IMAP_PORT": "imap"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    named = [line.split()[3] for line in proc.stderr.splitlines()]
    assert named == ["MAILINGEST_IMAP_PORT"] + [name for name, _ in EMPTY_ENVIRONMENT_PROBLEMS]
    assert all(
        line.startswith("mailingest: configuration error: ") for line in proc.stderr.splitlines()
    )


def test_malformed_missing_and_unknown_settings_are_reported_together() -> None:
    env = {
        "MAILINGEST_ALLOY_TOKN": "tok",
        "MAILINGEST_IMAP_PORT": "99999",
        "MAILINGEST_POLL_INTERVAL": "soon",
        "MAILINGEST_REDIS_URL": "http://user:hunter2@x:1/0",
        "MAILINGEST_TASK_TIME_LIMIT": "5",
    }
    with pytest.raises(ConfigError) as err:
        load_settings(BASE | env, require=ALL)
    assert err.value.lines() == [
        "MAILINGEST_ALLOY_TOKN is not a setting; did you mean MAILINGEST_ALLOY_TOKEN?",
        "MAILINGEST_REDIS_URL must be a redis/rediss/unix URL, got 'http://user:***@x:1/0'",
        "MAILINGEST_TASK_TIME_LIMIT must be between 10 and 3600, got 5",
        "MAILINGEST_IMAP_PORT must be between 1 and 65535, got 99999",
        "MAILINGEST_POLL_INTERVAL must be a number, got 'soon'",
    ]  # the bad Redis URL is not also "required"; the bad limit not also a bad floor


@pytest.mark.parametrize(
    ("variable", "suggestion"),
    [
        ("MAILINGEST_ALLOY_TOKN", "MAILINGEST_ALLOY_TOKEN"),
        ("MAILINGEST_ALLOY_TOKN_FILE", "MAILINGEST_ALLOY_TOKEN_FILE"),
        ("MAILINGEST_STAGNG_KEY", "MAILINGEST_STAGING_KEY"),
        ("MAILINGEST_MAX_ATTACHMENT_BYTE", "MAILINGEST_MAX_ATTACHMENT_BYTES"),
        ("MAILINGEST_IMPA_PORT", "MAILINGEST_IMAP_PORT"),
        ("MAILINGEST_CONFIG_FILE", "MAILINGEST_CONFIG"),
    ],
)
def test_an_unknown_variable_names_the_nearest_setting(variable: str, suggestion: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_settings(BASE | {variable: "993"})
    assert err.value.lines() == [f"{variable} is not a setting; did you mean {suggestion}?"]


def test_an_unknown_variable_with_nothing_near_is_still_refused() -> None:
    with pytest.raises(ConfigError, match=r"^MAILINGEST_COLOUR is not a setting .see README"):
        load_settings(BASE | {"MAILINGEST_COLOUR": "blue"})


def test_file_forms_service_links_and_test_knobs_are_not_unknown(tmp_path: Path) -> None:
    (tmp_path / "token").write_text("tok\n", encoding="utf-8")
    env = {k: v for k, v in BASE.items() if k != "MAILINGEST_ALLOY_TOKEN"} | {
        "MAILINGEST_ALLOY_TOKEN_FILE": str(tmp_path / "token"),
        # what Kubernetes sets in every pod for the Service mailingest-flower
        "MAILINGEST_FLOWER_SERVICE_HOST": "10.0.0.5",
        "MAILINGEST_FLOWER_SERVICE_PORT": "5555",
        "MAILINGEST_FLOWER_SERVICE_PORT_HTTP": "5555",
        "MAILINGEST_FLOWER_PORT": "tcp://10.0.0.5:5555",
        "MAILINGEST_FLOWER_PORT_5555_TCP": "tcp://10.0.0.5:5555",
        "MAILINGEST_FLOWER_PORT_5555_TCP_PROTO": "tcp",
        "MAILINGEST_FLOWER_PORT_5555_TCP_PORT": "5555",
        "MAILINGEST_FLOWER_PORT_5555_TCP_ADDR": "10.0.0.5",
        "MAILINGEST_REQUIRE_SERVERS": "1",  # the test suite's own
    }
    s = load_settings(env, require=ALL)
    assert s.alloy_token == Secret("tok")
    # and for a Service named plain mailingest (found by review: it stopped every pod)
    plain = {
        "MAILINGEST_SERVICE_HOST": "10.0.0.7",
        "MAILINGEST_SERVICE_PORT": "9808",
        "MAILINGEST_SERVICE_PORT_METRICS": "9808",
        "MAILINGEST_PORT": "tcp://10.0.0.7:9808",
        "MAILINGEST_PORT_9808_TCP": "tcp://10.0.0.7:9808",
        "MAILINGEST_PORT_9808_TCP_PROTO": "tcp",
        "MAILINGEST_PORT_9808_TCP_PORT": "9808",
        "MAILINGEST_PORT_9808_TCP_ADDR": "10.0.0.7",
    }
    assert load_settings(env | plain, require=ALL).alloy_token == Secret("tok")
    with pytest.raises(ConfigError, match="MAILINGEST_PORT is not a setting"):
        load_settings(env | {"MAILINGEST_PORT": "9808"})
    # a *_PORT that is not a service link is a typo like any other
    with pytest.raises(ConfigError, match="MAILINGEST_FLOWER_PORT is not a setting"):
        load_settings(env | {"MAILINGEST_FLOWER_PORT": "5555"})


def test_a_misspelt_file_key_names_the_nearest_setting(tmp_path: Path) -> None:
    text = TWO_INBOXES.replace("poll_interval = 120", "poll_intervall = 120").replace(
        'imap_host = "imap.us.example.com"', 'imap_hots = "imap.us.example.com"'
    )
    with pytest.raises(ConfigError) as err:
        load_settings(write_config(tmp_path, text))
    assert err.value.lines() == [
        "mailingest.toml.poll_intervall is not a mailingest setting; did you mean poll_interval?",
        "mailingest.toml: inboxes[us].imap_hots is not a per-inbox setting; "
        "did you mean imap_host?",
    ]


# -- one table: the loader, the defaults elsewhere, README.md and .env.example ---------


def test_the_loader_reads_every_setting_of_the_table_and_no_other(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from mailingest.config import settings as S
    from mailingest.config.table import SETTINGS

    asked: set[str] = set()
    real_raw = S._Env.raw

    def recording(self: S._Env, name: str, *, strip: bool = True) -> str | None:
        asked.add(name)
        return real_raw(self, name, strip=strip)

    monkeypatch.setattr(S._Env, "raw", recording)
    load_settings(BASE)
    assert asked == {setting.name for setting in SETTINGS if not setting.env_only}


def test_defaults_outside_the_settings_are_the_tables() -> None:
    import inspect

    from mailingest.adapters.alloy import AlloyClient
    from mailingest.core.retry import RetryPolicy
    from mailingest.core.screening import Limits

    s = load_settings(BASE)
    assert Limits() == s.limits
    assert RetryPolicy() == RetryPolicy(s.max_attempts, s.retry_base, s.retry_cap)
    timeouts = inspect.signature(AlloyClient).parameters
    assert timeouts["connect_timeout"].default == s.alloy_connect_timeout
    assert timeouts["read_timeout"].default == s.alloy_read_timeout


def test_the_core_and_the_secret_import_no_io_and_no_settings() -> None:
    code = (
        "import sys, mailingest.core.screening, mailingest.core.retry, mailingest.config.secret;"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('redis', 'httpx', 'imapclient', 'celery', 'cryptography') "
        "or m in ('mailingest.config.settings', 'mailingest.adapters')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    code = (
        "import sys, mailingest.adapters.encryption;"
        "print('mailingest.config.settings' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"  # no import cycle through Secret


ROOT = Path(__file__).resolve().parents[1]


def test_readme_and_env_example_are_written_from_the_table() -> None:
    from mailingest.config import docs

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    hint = "differs from mailingest/config/table.py: run python -m mailingest.config.docs"
    assert docs.with_readme_table(readme) == readme, "README.md " + hint
    assert docs.env_example() == (ROOT / ".env.example").read_text(encoding="utf-8"), (
        ".env.example " + hint
    )


def test_the_documents_list_every_setting_once_and_only_settings() -> None:
    import re

    from mailingest.config.table import SETTINGS, is_setting

    names = [setting.var for setting in SETTINGS]
    listed = re.findall(r"^(?:# )?(MAILINGEST_\w+)=", (ROOT / ".env.example").read_text(), re.M)
    assert listed == names
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert re.findall(r"^\| `(MAILINGEST_\w+)` \|", readme, re.M) == names
    mentioned = set(re.findall(r"MAILINGEST_[A-Z_]*[A-Z](?![A-Z_*])", readme))  # not _IMAP_*
    examples = {"MAILINGEST_ALLOY_TOKN", "MAILINGEST_REQUIRE_SERVERS", "MAILINGEST_TEST_IMAP"}
    assert sorted(n for n in mentioned - examples if not is_setting(n[11:])) == []


def test_the_documents_script_checks_and_rewrites(tmp_path: Path) -> None:
    from mailingest.config import docs

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    (tmp_path / "README.md").write_text(readme.replace("| `MAILINGEST_NOTE` |", "| `NOTE` |"))
    (tmp_path / ".env.example").write_text(docs.env_example())
    assert docs.main(["--root", str(tmp_path), "--check"]) == 1
    assert docs.main(["--root", str(tmp_path)]) == 0
    assert (tmp_path / "README.md").read_text() == readme
    assert docs.main(["--root", str(tmp_path), "--check"]) == 0


def test_the_alloy_rate_limit_is_off_by_default_and_the_429_pause_is_not() -> None:
    """Alloy publishes no rate limit: none is assumed (a guessed one halved throughput on
    two cores); a 429 pauses every worker instead. A team that knows its contract sets one."""
    import redis

    from mailingest.application.services import Services

    s = load_settings(BASE)
    assert (s.alloy_rate, s.alloy_burst) == (0, 1)
    client = redis.Redis()  # never connected: building the client contacts nothing
    with Services(s, redis_client=client, clock=lambda: 0) as services:
        alloy = services.alloy()
        assert alloy.limiter is None and alloy.pause is not None
        assert alloy.pause.max_pause == s.retry_cap
        bare = services.alloy(rate_limited=False)  # check-config: Alloy without Redis
        assert bare.limiter is None and bare.pause is None
    limited = load_settings(BASE | {"MAILINGEST_ALLOY_RATE": "12.5"})
    assert (limited.alloy_rate, limited.alloy_burst) == (12.5, 25)
    with Services(limited, redis_client=redis.Redis(), clock=lambda: 0) as services:
        limiter = services.alloy().limiter
        assert limiter is not None and (limiter.rate, limiter.burst) == (12.5, 25)
