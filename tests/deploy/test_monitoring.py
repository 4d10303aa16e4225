"""The Grafana dashboard and the Prometheus alert rules: promtool accepts the rules and
their unit tests pass; every metric they use is one mailingest exports, used as its kind
(counter, gauge, histogram) and labels allow."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from mailingest.application.metrics import METRICS

from ..conftest import require_or_skip
from .helpers import ALERTS, DASHBOARD

# -- metrics ------------------------------------------------------------------------

HISTOGRAMS = {"mailingest_alloy_request_seconds", "mailingest_imap_poll_seconds"}
METRIC_LABELS: dict[str, set[str]] = {
    "mailingest_mails_seen_total": {"inbox"},
    "mailingest_mails_processed_total": {"inbox"},
    "mailingest_mails_quarantined_total": {"inbox", "reason"},
    "mailingest_mails_failed_total": {"inbox"},
    "mailingest_documents_described_total": set(),
    "mailingest_documents_uploaded_total": set(),
    "mailingest_upload_bytes_total": set(),
    "mailingest_alloy_request_seconds": {"method", "endpoint"},
    "mailingest_alloy_responses_total": {"method", "endpoint", "status"},
    "mailingest_alloy_held_total": {"cause"},
    "mailingest_alloy_held_seconds_total": {"cause"},
    "mailingest_alloy_deferred_total": {"cause"},
    "mailingest_imap_poll_seconds": {"inbox"},
    "mailingest_oldest_unprocessed_seconds": {"inbox"},
    "mailingest_backlog_mails": {"inbox"},
}


# -- promtool ------------------------------------------------------------------------------


def promtool() -> str:
    """Prometheus' own checker (Debian: prometheus; ./dev test installs it)."""
    found = shutil.which("promtool")
    if found is None:
        require_or_skip("promtool not found (Debian/Ubuntu: apt-get install prometheus)")
    assert found is not None
    return found


def promtool_run(*args: str, cwd: Path | None = None) -> str:
    """Run promtool; its complaint (empty when it accepts)."""
    done = subprocess.run([promtool(), *args], capture_output=True, text=True, timeout=60, cwd=cwd)
    return "" if done.returncode == 0 else (done.stdout + done.stderr).strip()


def promtool_check(exprs: dict[str, str], tmp_path: Path) -> str:
    """Let promtool parse PromQL expressions: each becomes a recording rule of a scratch
    rule file that ``promtool check rules`` parses with Prometheus' own parser."""
    rules = [{"record": f"check:{name}", "expr": expr} for name, expr in exprs.items()]
    path = tmp_path / "exprs.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "check", "rules": rules}]}))
    return promtool_run("check", "rules", str(path))


# -- the dashboard and the alert rules ----------------------------------------------------


def check_promql(expr: str, where: str) -> set[str]:
    """Every metric is one mailingest exports, used as its kind allows; returns them.
    (That the expression is PromQL at all is promtool's to say: see promtool_check.)"""
    known = set(METRICS)
    assert set(METRIC_LABELS) <= known | HISTOGRAMS, "METRIC_LABELS names unknown metrics"
    used: set[str] = set()
    for name in re.findall(r"\bmailingest_[a-z0-9_]+", expr):
        base = re.sub(r"_(bucket|sum|count)$", "", name)
        if name in known:
            assert name not in HISTOGRAMS, f"{where}: histogram {name} without _bucket/_sum/_count"
            used.add(name)
        else:
            assert base in HISTOGRAMS and base in known, f"{where}: {name} is not a metric"
            used.add(base)
    for function, name in re.findall(r"\b(rate|irate|increase)\(\s*(mailingest_\w+)", expr):
        assert name.endswith(("_total", "_bucket", "_sum", "_count")), (
            f"{where}: {function}() of {name}, which is not a counter"
        )
    for name in re.findall(r"histogram_quantile\([^,]+,.*?\b(mailingest_\w+)", expr):
        assert name.endswith("_bucket"), f"{where}: histogram_quantile over {name}"
    for labels in re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", expr):
        for label in filter(None, (x.strip() for x in labels.split(","))):
            allowed = set().union(*(METRIC_LABELS.get(m, set()) for m in used)) | {"le"}
            assert label in allowed, f"{where}: no metric of {sorted(used)} has label {label}"
    for selector in re.findall(r"\{([^}]*)\}", expr):
        for label in re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", selector):
            allowed = set().union(*(METRIC_LABELS.get(m, set()) for m in used))
            assert label in allowed, f"{where}: no metric of {sorted(used)} has label {label}"
    assert used, f"{where}: {expr} uses no mailingest metric"
    return used


def dashboard_panels() -> list[dict[str, Any]]:
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    panels = []
    for panel in dashboard["panels"]:
        panels += [panel, *panel.get("panels", [])]
    return [p for p in panels if p.get("type") != "row"]


# What Grafana puts in place of its variables before a query reaches Prometheus.
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$inbox": ".*"}


def test_grafana_dashboard_queries_are_promql(tmp_path: Path) -> None:
    exprs = {}
    for number, panel in enumerate(dashboard_panels()):
        for letter, target in zip("abcdefgh", panel["targets"], strict=False):
            expr = target["expr"]
            for variable, value in GRAFANA_VARIABLES.items():
                expr = expr.replace(variable, value)
            assert "$" not in expr, f"panel {panel['title']!r}: a variable in {expr}"
            exprs[f"panel{number}{letter}"] = expr
    assert exprs
    problem = promtool_check(exprs, tmp_path)
    assert not problem, problem


def test_grafana_dashboard_uses_mailingest_metrics() -> None:
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    source = [v for v in variables.values() if v["type"] == "datasource"]
    assert source and source[0]["query"] == "prometheus", "a Prometheus data source variable"
    ids = [p["id"] for p in dashboard_panels()]
    assert len(ids) == len(set(ids)), "panel ids are unique"
    used: set[str] = set()
    for panel in dashboard_panels():
        where = f"panel {panel['title']!r}"
        assert panel["datasource"]["uid"] == "${" + source[0]["name"] + "}", where
        assert panel["targets"], f"{where} has no query"
        for target in panel["targets"]:
            used |= check_promql(target["expr"], where)
            for variable in re.findall(r"\$(\w+)", target["expr"]):
                assert variable in variables or variable.startswith("__"), (
                    f"{where}: ${variable} is not a dashboard variable"
                )
    wanted = {
        "mailingest_mails_processed_total",
        "mailingest_mails_quarantined_total",
        "mailingest_mails_failed_total",
        "mailingest_oldest_unprocessed_seconds",
        "mailingest_backlog_mails",
        "mailingest_alloy_request_seconds",
        "mailingest_alloy_responses_total",
        "mailingest_imap_poll_seconds",
        "mailingest_documents_uploaded_total",
        "mailingest_upload_bytes_total",
        "mailingest_alloy_held_total",
        "mailingest_alloy_held_seconds_total",
        "mailingest_alloy_deferred_total",
    }
    assert wanted <= used, f"no panel shows {sorted(wanted - used)}"
    quarantine = [
        t["expr"]
        for p in dashboard_panels()
        for t in p["targets"]
        if "mailingest_mails_quarantined_total" in t["expr"]
    ]
    assert any(re.search(r"by \([^)]*\breason\b", e) for e in quarantine), "quarantine by reason"
    latency = " ".join(
        t["expr"] for p in dashboard_panels() for t in p["targets"] if "alloy_request" in t["expr"]
    )
    assert "histogram_quantile(0.5," in latency and "histogram_quantile(0.95," in latency


def test_promtool_accepts_the_alert_rules() -> None:
    """Prometheus' own rule-file checks: the file's shape (only known keys), PromQL, the
    ``for`` durations and the annotation templates; what Prometheus would refuse to load."""
    problem = promtool_run("check", "rules", str(ALERTS))
    assert not problem, problem


def alert_rules() -> dict[str, dict[str, Any]]:
    rules_file = yaml.safe_load(ALERTS.read_text(encoding="utf-8"))
    alerts: dict[str, dict[str, Any]] = {}
    for group in rules_file["groups"]:
        assert group["name"] and group["rules"], group
        for rule in group["rules"]:
            assert rule["alert"] not in alerts, f"two alerts named {rule['alert']}"
            alerts[rule["alert"]] = rule
    return alerts


def test_alert_rules_use_mailingest_metrics_and_explain_themselves() -> None:
    alerts = alert_rules()
    for name, rule in alerts.items():
        check_promql(rule["expr"], name)
        annotations = rule.get("annotations", {})
        assert annotations.get("summary") and annotations.get("description"), name
        for text in annotations.values():
            for label in re.findall(r"\$labels\.(\w+)", text):
                by = re.findall(r"\bby\s*\(([^)]*)\)", rule["expr"])
                assert any(label in b for b in by), f"{name}: no label {label}"
    for name in ("MailingestOldestMailTooOld", "MailingestQuarantineRateHigh"):
        assert name in alerts and "for" in alerts[name], f"{name} with a `for`"
    assert "mailingest_oldest_unprocessed_seconds" in alerts["MailingestOldestMailTooOld"]["expr"]


# promtool test rules: series in, alerts out. The annotations are left out of the copy of
# the rules under test (promtool compares them word for word; their templates are checked
# above), so each case says only which alerts fire, with which labels.
ALERT_CASES: dict[str, dict[str, Any]] = {
    "half of 60 mails an hour quarantined": {
        "series": {
            'mailingest_mails_seen_total{inbox="default"}': "0+1x120",
            'mailingest_mails_quarantined_total{inbox="default",reason="unknown_sender"}': (
                "0+0.5x120"
            ),
        },
        "at": "100m",
        "fires": {"MailingestQuarantineRateHigh": [{"inbox": "default"}]},
    },
    "every mail quarantined but only 6 an hour: too few to page": {
        "series": {
            'mailingest_mails_seen_total{inbox="default"}': "0+0.1x120",
            'mailingest_mails_quarantined_total{inbox="default",reason="unknown_sender"}': (
                "0+0.1x120"
            ),
        },
        "at": "100m",
        "fires": {"MailingestQuarantineRateHigh": []},
    },
    "the oldest mail 20 minutes old for 10 minutes": {
        "series": {'mailingest_oldest_unprocessed_seconds{inbox="default"}': "1200x20"},
        "at": "10m",
        "fires": {"MailingestOldestMailTooOld": [{"inbox": "default"}]},
    },
    "two in three Alloy requests waited for a token of the rate limit": {
        "series": {
            'mailingest_alloy_held_total{cause="rate_limit"}': "0+60x80",
            'mailingest_alloy_held_total{cause="pause"}': "0+0x80",
            'mailingest_alloy_responses_total{method="POST",endpoint="/e",status="200"}': (
                "0+90x80"
            ),
        },
        "at": "60m",
        "fires": {"MailingestAlloyRateLimitSetsThePace": [{}]},
    },
    "one in fifteen waited: the workers set the pace": {
        "series": {
            'mailingest_alloy_held_total{cause="rate_limit"}': "0+6x80",
            'mailingest_alloy_responses_total{method="POST",endpoint="/e",status="200"}': (
                "0+90x80"
            ),
        },
        "at": "60m",
        "fires": {"MailingestAlloyRateLimitSetsThePace": []},
    },
    "the oldest mail 10 minutes old": {
        "series": {'mailingest_oldest_unprocessed_seconds{inbox="default"}': "600x20"},
        "at": "10m",
        "fires": {"MailingestOldestMailTooOld": []},
    },
}


@pytest.mark.parametrize("case", sorted(ALERT_CASES))
def test_alerts_fire_when_they_should(case: str, tmp_path: Path) -> None:
    spec = ALERT_CASES[case]
    rules = yaml.safe_load(ALERTS.read_text(encoding="utf-8"))
    for group in rules["groups"]:
        for rule in group["rules"]:
            rule.pop("annotations", None)
    (tmp_path / "rules.yml").write_text(yaml.safe_dump(rules), encoding="utf-8")
    labels = {name: rule.get("labels", {}) for name, rule in alert_rules().items()}
    test = {
        "interval": "1m",
        "input_series": [{"series": s, "values": v} for s, v in spec["series"].items()],
        "alert_rule_test": [
            {
                "eval_time": spec["at"],
                "alertname": name,
                "exp_alerts": [{"exp_labels": labels[name] | each} for each in expected],
            }
            for name, expected in spec["fires"].items()
        ],
    }
    (tmp_path / "test.yml").write_text(
        yaml.safe_dump({"rule_files": ["rules.yml"], "tests": [test]}), encoding="utf-8"
    )
    problem = promtool_run("test", "rules", "test.yml", cwd=tmp_path)
    assert not problem, f"{case}: {problem}"
