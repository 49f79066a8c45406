"""deploy/prometheus/alerts.yml and deploy/grafana/killmail-sync.json against the series /metrics exports:
every expression names only those series, the rules have what Alertmanager needs, and promtool (Debian's
prometheus package) checks the rules and runs their examples in alerts_test.yml where it is installed."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
from datetime import UTC, datetime

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from helpers import ROOT
from screenshot import fill_queues, seed_status_rows

PROMETHEUS = ROOT / "deploy" / "prometheus"
DASHBOARD = ROOT / "deploy" / "grafana" / "killmail-sync.json"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool is not installed (apt-get install prometheus)")

# PromQL words that are not series: binary operators, modifiers and literals.
KEYWORDS = {"and", "or", "unless", "bool", "by", "without", "on", "ignoring", "group_left", "group_right", "offset",
            "inf", "nan"}
ALERTS = {"KillmailSyncStalled", "KillmailStatusCannotReach", "KillmailDeadLetters", "KillmailEsiLimited",
          "KillmailPilotsNeedLogin", "KillmailDetailBacklogStuck", "KillmailJobsStalled", "KillmailClaimsStale"}


def series_names(expr: str) -> set[str]:
    """The series a PromQL expression reads: its identifiers less functions, aggregations, keywords, label
    names (in matchers and in by/without/on/ignoring lists), strings, ranges and offsets."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'', "", expr)
    expr = re.sub(r"\{[^}]*\}|\[[^\]]*\]", "", expr)
    expr = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    expr = re.sub(r"\boffset\s+-?\w+", "", expr)
    words = re.findall(r"(?<![\w:.])([A-Za-z_:][\w:]*)(?![\w:])(?!\s*\()", expr)
    return {word for word in words if word.lower() not in KEYWORDS}


@pytest.mark.parametrize("expr, names", [
    ("max by (status) (rate(killmail_sync_runs_total[$__rate_interval])) * 60", {"killmail_sync_runs_total"}),
    ('max(killmail_users{state="needs_relogin"}) > max(killmail_users{state="needs_relogin"} offset 1h)',
     {"killmail_users"}),
    ("a > 0 and on(instance) b_total", {"a", "b_total"}),
    ('sum without (group) (x_total{status=~"420|429"}) / ignoring(status) group_left y', {"x_total", "y"}),
    ("killmail_status_up == bool 0", {"killmail_status_up"}),
    ("histogram_quantile(0.95, sum by (le) (rate(foo_bucket[5m]))) > 1e3", {"foo_bucket"}),
    ("sum(rate(up[5m])) by (job)", {"up"}),
])
def test_series_names(expr, names):
    assert series_names(expr) == names


def alert_rules() -> list[dict]:
    return [rule for group in yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())["groups"]
            for rule in group["rules"]]


def dashboard_panels() -> list[dict]:
    return [panel for panel in json.loads(DASHBOARD.read_text())["panels"] if panel["type"] != "row"]


def dashboard_exprs() -> list[str]:
    return [target["expr"] for panel in dashboard_panels() for target in panel["targets"]]


def test_alert_rules_have_what_alertmanager_needs():
    rules = alert_rules()
    assert {rule["alert"] for rule in rules} == ALERTS
    for rule in rules:
        assert {"alert", "expr", "for", "labels", "annotations"} <= set(rule), rule["alert"]
        assert re.fullmatch(r"\d+[smh]", rule["for"]), rule["alert"]
        assert rule["labels"]["severity"] in ("critical", "warning"), rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule["alert"]


def test_alert_rules_cover_what_operators_asked_for():
    uses = {rule["alert"]: series_names(rule["expr"]) for rule in alert_rules()}
    assert uses["KillmailSyncStalled"] == {"killmail_last_sync_age_seconds"}
    assert uses["KillmailDeadLetters"] == {"killmail_dead_letters"}
    assert uses["KillmailEsiLimited"] == {"killmail_esi_limit_hits_total"}
    assert uses["KillmailPilotsNeedLogin"] == {"killmail_users"}
    assert uses["KillmailDetailBacklogStuck"] == {"killmail_detail_backlog"}


def test_every_alert_has_an_example_that_fires():
    examples = yaml.safe_load((PROMETHEUS / "alerts_test.yml").read_text())
    assert examples["rule_files"] == ["alerts.yml"]
    fired = {case["alertname"] for test in examples["tests"] for case in test["alert_rule_test"] if case["exp_alerts"]}
    quiet = {case["alertname"] for test in examples["tests"] for case in test["alert_rule_test"]
             if not case["exp_alerts"]}
    assert fired == ALERTS and quiet == ALERTS


def test_dashboard_is_importable():
    dashboard = json.loads(DASHBOARD.read_text())
    assert [i["name"] for i in dashboard["__inputs"]] == ["DS_PROMETHEUS"]
    assert (dashboard["uid"], dashboard["id"]) == ("killmail-sync", None)
    assert len({panel["id"] for panel in dashboard["panels"]}) == len(dashboard["panels"])
    cells = set()
    for panel in dashboard["panels"]:
        box = panel["gridPos"]
        assert box["x"] + box["w"] <= 24, panel["title"]
        area = {(box["x"] + dx, box["y"] + dy) for dx in range(box["w"]) for dy in range(box["h"])}
        assert not area & cells, f"{panel['title']} overlaps another panel"
        cells |= area
    for panel in dashboard_panels():
        assert panel["datasource"] == {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}, panel["title"]
        assert panel["targets"] and all(t["expr"] and t["datasource"] == panel["datasource"]
                                        for t in panel["targets"]), panel["title"]
        assert len({t["refId"] for t in panel["targets"]}) == len(panel["targets"]), panel["title"]


def test_expressions_name_only_series_that_metrics_exports(make_client, conn, queue_name):
    seed_status_rows(conn, datetime.now(UTC))
    fill_queues(queue_name, max_attempts=8, waiting=1, retrying=1, dead=1)
    response = make_client().get("/metrics")
    exported = {sample.name for family in text_string_to_metric_families(response.get_data(as_text=True))
                for sample in family.samples}
    for expr in [rule["expr"] for rule in alert_rules()] + dashboard_exprs():
        assert series_names(expr) <= exported, expr
    charted = set().union(*map(series_names, dashboard_exprs()))
    assert exported <= charted  # and the dashboard shows every series


@needs_promtool
def test_promtool_checks_the_rules_and_runs_their_examples():
    check = subprocess.run([PROMTOOL, "check", "rules", "alerts.yml"], cwd=PROMETHEUS, capture_output=True,
                           text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    assert f"SUCCESS: {len(ALERTS)} rules found" in check.stdout
    examples = subprocess.run([PROMTOOL, "test", "rules", "alerts_test.yml"], cwd=PROMETHEUS, capture_output=True,
                              text=True, timeout=60)
    assert examples.returncode == 0, examples.stdout + examples.stderr


@needs_promtool
def test_promtool_parses_the_dashboard_expressions(tmp_path):
    # Grafana fills $__rate_interval in at query time; promtool parses each expression as a recording rule.
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:expr_{n}", "expr": expr.replace("$__rate_interval", "5m")}
        for n, expr in enumerate(dashboard_exprs())]}]}
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump(rules))
    check = subprocess.run([PROMTOOL, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
