"""Alert rules: the plain rules file passes `promtool check rules` and its unit tests (`promtool test
rules`), equals the chart's PrometheusRule rendered with default values, takes its thresholds from
values, and queries only metric names the operator and trainer really export."""

from __future__ import annotations

import shutil
import subprocess

import pytest
import yaml
from support.deploy import CHART_DIR, VALUES_CASES, exported_metric_names, manifests, one, promql_metric_names

ALERTS_DIR = CHART_DIR / "alerts"
RULES_FILE = ALERTS_DIR / "mot-operator-alerts.yaml"
RULES_TESTS = ALERTS_DIR / "mot-operator-alerts.test.yaml"
REQUIRED_ALERTS = {"MoTRunFailed", "MoTRunNoProgress", "MoTJobRetriesHigh", "MoTStagePendingTooLong",
                   "MoTOperatorDown"}


def promtool(*args: str, cwd=None) -> subprocess.CompletedProcess:
    binary = shutil.which("promtool")
    assert binary, "promtool not found: install the Debian package `prometheus` (make apt-deps)"
    return subprocess.run([binary, *args], cwd=cwd, capture_output=True, text=True, timeout=60)


def rules(groups: list[dict]) -> dict[str, dict]:
    return {rule["alert"]: rule for group in groups for rule in group["rules"]}


def test_rules_file_passes_promtool_check():
    result = promtool("check", "rules", str(RULES_FILE))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(REQUIRED_ALERTS)} rules found" in result.stdout


def test_alert_unit_tests_pass():
    result = promtool("test", "rules", RULES_TESTS.name, cwd=ALERTS_DIR)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout
    # Every alert has a case where it fires and one where it stays quiet.
    tested = yaml.safe_load(RULES_TESTS.read_text())["tests"]
    cases = [case for test in tested for case in test["alert_rule_test"]]
    for alert in REQUIRED_ALERTS:
        assert any(c["alertname"] == alert and c["exp_alerts"] for c in cases), f"{alert} never fires"
        assert any(c["alertname"] == alert and not c["exp_alerts"] for c in cases), f"{alert} never quiet"


def test_every_alert_has_severity_summary_and_description():
    alerts = rules(yaml.safe_load(RULES_FILE.read_text())["groups"])
    assert alerts.keys() == REQUIRED_ALERTS
    for name, rule in alerts.items():
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}, name
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], name


def test_rules_file_equals_the_chart_rendered_with_default_values():
    rendered = one(manifests({"alerts": {"enabled": True}}), "PrometheusRule")
    plain = yaml.safe_load(RULES_FILE.read_text())
    assert rendered["spec"] == plain, (
        "alerts/mot-operator-alerts.yaml and templates/_helpers.tpl (mot-operator.alertGroups) differ")


def test_thresholds_come_from_values_and_stay_valid(tmp_path):
    rendered = one(manifests(VALUES_CASES["monitoring"]), "PrometheusRule")
    alerts = rules(rendered["spec"]["groups"])
    assert "> 3600" in alerts["MoTRunNoProgress"]["expr"] and alerts["MoTRunNoProgress"]["for"] == "15m"
    assert "[2h]" in alerts["MoTJobRetriesHigh"]["expr"] and "> 5" in alerts["MoTJobRetriesHigh"]["expr"]
    custom_job = one(manifests({"alerts": {"enabled": True, "operatorDown": {"job": "kube-system/mot"}}}),
                     "PrometheusRule")
    assert 'up{job="kube-system/mot"}' in rules(custom_job["spec"]["groups"])["MoTOperatorDown"]["expr"]
    rules_file = tmp_path / "rendered.yaml"
    rules_file.write_text(yaml.safe_dump(rendered["spec"]))
    result = promtool("check", "rules", str(rules_file))
    assert result.returncode == 0, result.stdout + result.stderr


def test_stage_pending_threshold_and_ignored_reasons_come_from_values(tmp_path):
    default = rules(one(manifests({"alerts": {"enabled": True}}), "PrometheusRule")["spec"]["groups"])
    # Kueue queueing is waiting by design: ignored unless the values say otherwise.
    assert '{reason!~"WaitingForAdmission"}' in default["MoTStagePendingTooLong"]["expr"]
    assert default["MoTStagePendingTooLong"]["expr"].endswith("> 900")
    cases = {
        "none ignored": ({"thresholdSeconds": 1800, "ignoreReasons": [], "severity": "critical"},
                         "(time() - mot_stage_pending_since_timestamp_seconds) > 1800"),
        "two ignored": ({"ignoreReasons": ["WaitingForAdmission", "PodPending"]},
                        '{reason!~"WaitingForAdmission|PodPending"}'),
    }
    for name, (values, expected) in cases.items():
        rendered = one(manifests({"alerts": {"enabled": True, "stagePending": values}}), "PrometheusRule")
        rule = rules(rendered["spec"]["groups"])["MoTStagePendingTooLong"]
        assert expected in rule["expr"], name
        assert rule["labels"]["severity"] == values.get("severity", "warning"), name
        rules_file = tmp_path / "rendered.yaml"
        rules_file.write_text(yaml.safe_dump(rendered["spec"]))
        result = promtool("check", "rules", str(rules_file))
        assert result.returncode == 0, result.stdout + result.stderr


def test_operator_down_watches_the_job_a_service_monitor_creates():
    docs = manifests({"alerts": {"enabled": True}, "metrics": {"serviceMonitor": {"enabled": True}}})
    service = one(docs, "Service")["metadata"]["name"]
    expr = rules(one(docs, "PrometheusRule")["spec"]["groups"])["MoTOperatorDown"]["expr"]
    # The Prometheus Operator names a ServiceMonitor's job after the Service.
    assert f'up{{job="{service}"}}' in expr


def test_alert_queries_use_only_exported_metric_names():
    exported = exported_metric_names()
    for name, rule in rules(yaml.safe_load(RULES_FILE.read_text())["groups"]).items():
        used = promql_metric_names(rule["expr"])
        assert used, f"{name}: no metric in {rule['expr']!r}"
        assert used <= exported, f"{name} uses metrics nobody exports: {sorted(used - exported)}"


@pytest.mark.parametrize(("expr", "names"), [
    ('sum by (stage) (increase(mot_job_retries_total{stage="sft"}[1h])) > 3', {"mot_job_retries_total"}),
    ("(time() - mot_run_last_progress_timestamp_seconds) > 7200", {"mot_run_last_progress_timestamp_seconds"}),
    ('(time() - mot_stage_pending_since_timestamp_seconds{reason!~"A|B"}) > 900',
     {"mot_stage_pending_since_timestamp_seconds"}),
    ('up{job="x"} == 0 or absent(up{job="x"})', {"up"}),
    ("histogram_quantile(0.95, sum by (le, stage) (rate(mot_stage_duration_seconds_bucket[$__rate_interval])))",
     {"mot_stage_duration_seconds_bucket"}),
    ("a_total / on(ns) group_left(pod) b_info offset 5m > 1e3", {"a_total", "b_info"}),
])
def test_promql_metric_name_extraction(expr, names):
    assert promql_metric_names(expr) == names
