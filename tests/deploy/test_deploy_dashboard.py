"""The Grafana dashboard: valid dashboard JSON with the panels the product promises, every query valid
PromQL (checked by promtool) and using only metric names the operator and trainer really export."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest
import yaml
from support.deploy import CHART_DIR, exported_metric_names, promql_metric_names

DASHBOARD_FILE = CHART_DIR / "dashboards" / "mot-operator.json"

# What the dashboard must show (issues: Grafana dashboard; progress and stuck stages): a panel title
# pattern and the metric(s) it reads.
REQUIRED_PANELS = {
    r"runs by phase": "mot_runs",
    r"round progress": "mot_run_round",
    r"branch loss per teacher": "mot_branch_loss",
    r"eval score": "mot_eval_score",
    r"job duration by stage": "mot_stage_duration_seconds_bucket",
    r"failures and retries": "mot_job_retries_total",
    r"tokens/s": "mot_trainer_tokens_per_second",
    r"reconcile errors": "mot_reconcile_errors_total",
    r"branch progress": "mot_branch_progress_ratio",
    r"tokens/s per branch": "mot_branch_tokens_per_second",
    r"run progress and eta": ("mot_run_progress_ratio", "mot_run_eta_seconds"),
    r"stuck stages by reason": "mot_stage_pending_since_timestamp_seconds",
    r"disruptions and gang restarts": ("mot_stage_disruptions_total", "mot_stage_restarts_total"),
}

# Grafana's variables, replaced by something PromQL accepts for the syntax check.
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h"}


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD_FILE.read_text())


def panels(dashboard: dict) -> list[dict]:
    found = []
    for panel in dashboard["panels"]:
        found.append(panel)
        found.extend(panel.get("panels", []))
    return [p for p in found if p["type"] != "row"]


def queries(dashboard: dict) -> list[tuple[str, str]]:
    return [(panel["title"], target["expr"]) for panel in panels(dashboard) for target in panel["targets"]]


def variable_queries(dashboard: dict) -> list[str]:
    """The PromQL selectors inside `label_values(<selector>, label)` template variables."""
    found = []
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]["query"] if isinstance(variable["query"], dict) else variable["query"]
            match = re.fullmatch(r"label_values\((.+),\s*\w+\)", query)
            assert match, f"variable {variable['name']}: unexpected query {query!r}"
            found.append(match.group(1))
    return found


def test_dashboard_is_a_grafana_dashboard(dashboard):
    assert dashboard["uid"] == "mot-operator" and dashboard["title"]
    assert isinstance(dashboard["schemaVersion"], int) and dashboard["schemaVersion"] >= 36
    names = {v["name"] for v in dashboard["templating"]["list"]}
    assert {"datasource", "namespace", "motrun"} <= names
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in panels(dashboard):
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"], panel["title"]
        assert panel["description"], panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]


def test_panels_do_not_overlap(dashboard):
    taken: set[tuple[int, int]] = set()
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        cells = {(x, y) for x in range(grid["x"], grid["x"] + grid["w"])
                 for y in range(grid["y"], grid["y"] + grid["h"])}
        assert not cells & taken, f"panel {panel['title']!r} overlaps another"
        taken |= cells


def test_dashboard_has_every_promised_panel(dashboard):
    for title_pattern, metrics in REQUIRED_PANELS.items():
        matching = [p for p in panels(dashboard) if re.search(title_pattern, p["title"], re.IGNORECASE)]
        assert matching, f"no panel titled like {title_pattern!r}"
        used = set().union(*(promql_metric_names(t["expr"]) for p in matching for t in p["targets"]))
        for metric in (metrics,) if isinstance(metrics, str) else metrics:
            assert metric in used, f"panel {title_pattern!r} does not read {metric}"


def test_stuck_stages_table_shows_time_waiting_and_reason(dashboard):
    """The series' value is a Unix time: the table must show time() - value, and keep the reason."""
    (table,) = [p for p in panels(dashboard) if re.search("stuck stages", p["title"], re.IGNORECASE)]
    assert table["type"] == "table"
    (target,) = table["targets"]
    assert re.match(r"time\(\)\s*-\s*mot_stage_pending_since_timestamp_seconds\b", target["expr"])
    assert target.get("instant") and target.get("format") == "table"
    assert table["fieldConfig"]["defaults"]["unit"] == "s"
    for transformation in table.get("transformations", []):
        hidden = transformation.get("options", {}).get("excludeByName", {})
        assert not any(hidden.get(label) for label in ("namespace", "motrun", "stage", "teacher", "reason"))


def test_per_run_panels_follow_the_run_variables(dashboard):
    """Queries of series labelled by run honour the namespace/motrun dropdowns."""
    per_run = {"mot_branch_progress_ratio", "mot_branch_tokens_per_second", "mot_run_progress_ratio",
               "mot_run_eta_seconds", "mot_stage_pending_since_timestamp_seconds"}
    for title, expr in queries(dashboard):
        if promql_metric_names(expr) & per_run:
            assert 'namespace=~"$namespace"' in expr and 'motrun=~"$motrun"' in expr, title


def test_dashboard_queries_use_only_exported_metric_names(dashboard):
    exported = exported_metric_names()
    for title, expr in queries(dashboard):
        used = promql_metric_names(expr)
        assert used, f"{title}: no metric in {expr!r}"
        assert used <= exported, f"{title} uses metrics nobody exports: {sorted(used - exported)}"
    for selector in variable_queries(dashboard):
        assert promql_metric_names(selector) <= exported, selector


def test_dashboard_queries_are_valid_promql(dashboard, tmp_path):
    """promtool parses every query (Grafana variables substituted) as a recording rule."""
    binary = shutil.which("promtool")
    assert binary, "promtool not found: install the Debian package `prometheus` (make apt-deps)"
    exprs = [expr for _, expr in queries(dashboard)] + variable_queries(dashboard)
    recording = []
    for index, expr in enumerate(exprs):
        for variable, value in GRAFANA_VARIABLES.items():
            expr = expr.replace(variable, value)
        expr = re.sub(r"\$\w+", ".*", expr)  # $namespace, $motrun, $operator_job: regex matchers
        recording.append({"record": f"dashboard:query_{index}", "expr": expr})
    rules_file = tmp_path / "dashboard-queries.yaml"
    rules_file.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": recording}]}))
    result = subprocess.run([binary, "check", "rules", str(rules_file)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(exprs)} rules found" in result.stdout
