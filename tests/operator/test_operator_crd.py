"""The MoTRun CRD: a structural schema with descriptions, defaults and bounds; examples valid
(check-jsonschema); invalid manifests refused by the schema, by its CEL rules and list keys
(crd_rules, on cel-python) and by parse_spec, each naming the field the API server names."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml
from support.invalid_motruns import DELETE, INVALID, TWO, minimal, with_change

from mot_operator import crd_rules
from mot_operator import spec as specmod
from mot_operator.planner import ObservedJob, RunRef, plan
from mot_operator.spec import SpecError, apply_defaults, check_update, parse_spec

REPO = Path(__file__).resolve().parents[2]
CRD_FILE = REPO / "crds" / "motruns.mot.dev.yaml"
EXAMPLES = sorted((REPO / "examples").glob("*.yaml"))
CHECK_JSONSCHEMA = str(Path(sys.executable).with_name("check-jsonschema"))
CRD = yaml.safe_load(CRD_FILE.read_text())
(VERSION,) = CRD["spec"]["versions"]
SCHEMA = VERSION["schema"]["openAPIV3Schema"]
SPEC_SCHEMA = SCHEMA["properties"]["spec"]


def schema_nodes(node, path="$"):
    yield path, node
    for name, sub in (node.get("properties") or {}).items():
        yield from schema_nodes(sub, f"{path}.{name}")
    if isinstance(node.get("items"), dict):
        yield from schema_nodes(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from schema_nodes(node["additionalProperties"], f"{path}{{}}")


def failing_rules(new: dict, old: dict | None = None) -> list[str]:
    """Messages of the CEL rules and list keys a (defaulted) spec breaks; transition rules only when
    `old` is given."""
    found = crd_rules.violations(SPEC_SCHEMA, new) if old is None else crd_rules.violations(SPEC_SCHEMA, new, old)
    return [v.detail for v in found]


def defaulted(spec: dict) -> dict:
    return apply_defaults(copy.deepcopy(spec), SPEC_SCHEMA)


# ---------------------------------------------------------------------------------------------


def test_crd_identity_columns_and_status_subresource():
    kubernetes_validate.validate(CRD, "1.30.0", strict=True)
    assert CRD["metadata"]["name"] == "motruns.mot.dev"
    names = CRD["spec"]["names"]
    assert (names["kind"], names["plural"], names["shortNames"]) == ("MoTRun", "motruns", ["mot"])
    assert CRD["spec"]["scope"] == "Namespaced"
    assert VERSION["name"] == "v1alpha1" and VERSION["served"] and VERSION["storage"]
    assert VERSION["subresources"] == {"status": {}}
    columns = {c["name"]: c for c in VERSION["additionalPrinterColumns"]}
    assert list(columns) == ["Phase", "Round", "Teachers", "Age", "Reason", "Progress", "Message"]
    assert columns["Round"]["jsonPath"] == ".status.roundDisplay"
    assert columns["Reason"]["jsonPath"] == ".status.reason"
    assert columns["Progress"]["jsonPath"] == ".status.progressDisplay"
    # -o wide only: the one-word reason, the progress and the message
    assert all(columns[name]["priority"] == 1 for name in ("Reason", "Progress", "Message"))
    assert "priority" not in columns["Phase"]


def test_schema_is_structural_with_descriptions_defaults_and_bounds():
    for path, node in schema_nodes(SCHEMA):
        assert "type" in node or node.get("x-kubernetes-int-or-string"), f"{path} has no type"
        assert not ({"$ref", "anyOf", "oneOf", "allOf"} & node.keys()), f"{path} is not structural"
        if path.startswith(("$.spec", "$.status")):
            assert node.get("description"), f"{path} has no description"
        if "default" in node:
            jsonschema.Draft4Validator(specmod.to_json_schema(node)).validate(node["default"])
        if node.get("type") == "integer" and path.startswith("$.spec"):
            assert "minimum" in node, f"{path} has no lower bound"
        if (node.get("type") == "string" or node.get("x-kubernetes-int-or-string")) and path.startswith("$.spec"):
            # Bounded strings keep the CEL rules' estimated cost within the API server's budget.
            assert "maxLength" in node or "enum" in node, f"{path} has no maxLength"
    spec_props = SPEC_SCHEMA["properties"]
    assert spec_props["merge"]["properties"]["method"]["enum"] == ["average", "task-arithmetic", "ties", "dare"]
    assert spec_props["training"]["properties"]["precision"]["enum"] == ["auto", "bf16", "fp16", "fp32"]
    assert SCHEMA["properties"]["status"]["properties"]["phase"]["enum"] == [
        "Pending", "Running", "Merging", "Evaluating", "Succeeded", "Failed", "Suspended"]


def test_examples_are_valid_for_check_jsonschema_parse_spec_and_cel(tmp_path):
    assert {p.name for p in EXAMPLES} >= {"minimal.yaml", "paper.yaml", "multinode.yaml", "kueue.yaml"}
    schema_file = tmp_path / "motrun.schema.json"
    schema_file.write_text(json.dumps(specmod.json_schema()))
    proc = subprocess.run([CHECK_JSONSCHEMA, "--schemafile", str(schema_file), *map(str, EXAMPLES)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for path in EXAMPLES:
        manifest = yaml.safe_load(path.read_text())
        assert manifest["apiVersion"] == "mot.dev/v1alpha1" and manifest["kind"] == "MoTRun"
        parse_spec(manifest["spec"])
        assert failing_rules(defaulted(manifest["spec"])) == [], path.name
    paper = parse_spec(yaml.safe_load((REPO / "examples" / "paper.yaml").read_text())["spec"])
    assert (len(paper.teachers), paper.rounds, paper.training.steps) == (4, 5, 50)


@pytest.mark.parametrize("case,manifest,field,by", INVALID, ids=[c[0] for c in INVALID])
def test_parse_spec_refuses_invalid_specs_naming_the_field(case, manifest, field, by):
    with pytest.raises(SpecError) as info:
        parse_spec(manifest["spec"])
    assert info.value.field == field, str(info.value)
    assert field in str(info.value)
    if by == "rule":  # the CRD's rules refuse it too (the API server's side of the same rule)
        assert failing_rules(defaulted(manifest["spec"])), case


def test_check_jsonschema_refuses_the_schema_level_invalid_manifests(tmp_path):
    schema_file = tmp_path / "motrun.schema.json"
    schema_file.write_text(json.dumps(specmod.json_schema()))
    files = []
    for case, manifest, _field, by in INVALID:
        if by == "schema":
            path = tmp_path / f"{case}.yaml"
            path.write_text(yaml.safe_dump(manifest))
            files.append(path)
    proc = subprocess.run([CHECK_JSONSCHEMA, "--schemafile", str(schema_file), *map(str, files)],
                          capture_output=True, text=True)
    assert proc.returncode == 1
    for path in files:
        assert str(path) in proc.stdout, f"{path.name} was accepted:\n{proc.stdout}"


def paper_spec() -> dict:
    return defaulted(yaml.safe_load((REPO / "examples" / "paper.yaml").read_text())["spec"])


# One edit per immutable spec field, each valid on its own (applied to paper.yaml's spec).
EDITS = {
    "student": "s3://other", "teachers": lambda old: old[:3], "training": lambda old: {**old, "steps": 9},
    "merge": lambda old: {**old, "method": "ties"}, "evaluation": DELETE,
    "storage": lambda old: {**old, "uri": "s3://x"},
    "preflight": lambda old: {**old, "maxTruncatedFraction": 0.2},
    "resources": lambda old: {**old, "merge": {**old["merge"], "gpus": 1}},
    "image": "other:1", "serviceAccountName": "sa", "maxRetries": 5, "retryBackoffSeconds": 1,
    "activeDeadlineSeconds": 1, "queueName": "q", "ttlSecondsAfterFinished": 5,
}


def edited(spec: dict, name: str) -> dict:
    changed = copy.deepcopy(spec)
    edit = EDITS[name]
    if edit is DELETE:
        del changed[name]
    else:
        changed[name] = edit(changed[name]) if callable(edit) else edit
    return changed


# Where the API server reports each rule: the rule's schema node plus its fieldPath. Written out,
# not derived, so that a rule moved or a fieldPath dropped fails here.
RULE_PATHS = {
    **{f"{name} {'are' if name in ('teachers', 'resources') else 'is'} immutable": f"spec.{name}" for name in EDITS},
    "at least one teacher needs a merge weight above 0": "spec.teachers",
    "multi-node branches need gpus >= 1 per node": "spec.resources.branch.nodes",
    "merge Jobs run on one node": "spec.resources.merge.nodes",
    "eval Jobs run on one node": "spec.resources.eval.nodes",
    "nesterov needs momentum > 0": "spec.merge.outer.nesterov",
    "backend applies to branches only; merge Jobs are plain Jobs": "spec.resources.merge.backend",
    "backend applies to branches only; eval Jobs are plain Jobs": "spec.resources.eval.backend",
}
# A spec breaking each rule that is checked on create.
BREAKS = {
    "at least one teacher needs a merge weight above 0": with_change("spec.teachers", [{**t, "weight": 0} for t in TWO]),
    "multi-node branches need gpus >= 1 per node": with_change("spec.resources", {"branch": {"nodes": 2}}),
    "merge Jobs run on one node": with_change("spec.resources", {"merge": {"nodes": 2}}),
    "eval Jobs run on one node": with_change("spec.resources", {"eval": {"nodes": 3}}),
    "nesterov needs momentum > 0": with_change("spec.merge", {"outer": {"nesterov": True}}),
    "backend applies to branches only; merge Jobs are plain Jobs": with_change(
        "spec.resources", {"merge": {"backend": "jobset"}}),
    "backend applies to branches only; eval Jobs are plain Jobs": with_change(
        "spec.resources", {"eval": {"backend": "job"}}),
}
FIELD_ERROR_REASONS = {"FieldValueInvalid", "FieldValueForbidden", "FieldValueRequired", "FieldValueDuplicate"}


def test_every_rule_names_its_field_as_the_api_server_does():
    """Each CEL rule has a fieldPath and a reason, and parse_spec (a new MoTRun) or check_update
    (an edited one) refuses what breaks it at that path, with the rule's message."""
    rules = list(crd_rules.rules(SPEC_SCHEMA))
    assert {rule.message: rule.reported_at for rule in rules} == RULE_PATHS
    for rule in rules:
        assert rule.field_path and rule.reason in FIELD_ERROR_REASONS, rule
        with pytest.raises(SpecError) as info:
            if rule.transition:
                check_update(paper_spec(), edited(paper_spec(), rule.field_path.lstrip(".")))
            else:
                parse_spec(BREAKS[rule.message]["spec"])
        assert info.value.field == RULE_PATHS[rule.message], (rule, str(info.value))
        assert str(info.value) == f'{RULE_PATHS[rule.message]}: Invalid value: {rule.message}'


def test_teachers_are_a_list_keyed_by_name():
    """Duplicate names are refused at the duplicate, as the API server reports a list-type map."""
    teachers = SPEC_SCHEMA["properties"]["teachers"]
    assert (teachers["x-kubernetes-list-type"], teachers["x-kubernetes-list-map-keys"]) == ("map", ["name"])
    spec = with_change("spec.teachers", [TWO[0], TWO[1], dict(TWO[0])])["spec"]
    with pytest.raises(SpecError) as info:
        parse_spec(spec)
    assert str(info.value) == 'spec.teachers[2]: Duplicate value: {"name":"a"}'
    # The API server compares keyed lists without regard to order: reordering is no edit.
    old = paper_spec()
    check_update(old, {**old, "teachers": old["teachers"][::-1]})


def test_immutability_covers_everything_but_rounds_suspend_and_the_pending_timeout():
    """A run stuck waiting may be given a (different) pending timeout; nothing else of its work changes."""
    old = paper_spec()
    assert failing_rules(old, old) == []
    for name, value in (("rounds", 7), ("suspend", True), ("pendingTimeoutSeconds", 600)):
        check_update(old, {**old, name: value})
    mutable = {"rounds", "suspend", "pendingTimeoutSeconds"}
    assert set(EDITS) | mutable == set(SPEC_SCHEMA["properties"]), "a spec field lacks a rule"
    for name in EDITS:
        assert any("immutable" in m for m in failing_rules(edited(old, name), old)), f"{name} is not immutable"


def test_defaults_come_from_the_crd_file(tmp_path, monkeypatch):
    crd = copy.deepcopy(CRD)
    crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]["training"][
        "properties"]["steps"]["default"] = 77
    alt = tmp_path / "crd.yaml"
    alt.write_text(yaml.safe_dump(crd))
    monkeypatch.setenv("MOT_CRD_PATH", str(alt))
    specmod.reload_schema()
    try:
        assert parse_spec(minimal()["spec"]).training.steps == 77
    finally:
        monkeypatch.delenv("MOT_CRD_PATH")
        specmod.reload_schema()
    spec = parse_spec(minimal()["spec"])
    assert spec.training.steps == 50 and spec.rounds == 5 and spec.merge.method == "average"
    assert spec.teachers[0].weight == 1.0 and spec.max_retries == 2


def test_numbers_written_as_text_are_read_as_numbers():
    # PyYAML reads `1e-5` as a string; kubectl reads a number: parse_spec accepts both.
    spec = parse_spec(with_change("spec.training", {"learningRate": "1e-5"})["spec"])
    assert spec.training.learning_rate == pytest.approx(1e-5)


def test_statuses_the_planner_writes_fit_the_crd_status_schema():
    # The API server validates writes to the status subresource against this schema.
    status_schema = copy.deepcopy(specmod.json_schema()["properties"]["status"])
    status_schema["$schema"] = "http://json-schema.org/draft-04/schema#"
    validator = jsonschema.Draft4Validator(status_schema, format_checker=jsonschema.FormatChecker())
    spec = parse_spec({**minimal()["spec"], "rounds": 2, "retryBackoffSeconds": 5,
                       "evaluation": {"dataset": "s3://d/e"}})
    preflight_report = {  # what mot-train preflight prints when every check passed
        "teachers": {"teacher-a": {"records": 1200, "p50": 1830, "p95": 3900, "max": 6120, "truncated": 0.015},
                     "teacher-b": {"records": 800, "p50": 950, "p95": 2100, "max": 3980, "truncated": 0.0}},
        "max_seq_length": 4096, "storage": "writable", "seconds": 41.27, "eval": {"records": 100}}
    run, now, status, jobs = RunRef("ns", "demo", "u"), datetime(2026, 1, 1, tzinfo=UTC), {}, {}
    seen_states = set()
    for step in range(40):
        now += timedelta(seconds=6)
        result = plan(run, spec, status, list(jobs.values()), now)
        status = result.status
        errors = sorted(validator.iter_errors(status), key=str)
        assert not errors, f"step {step}: {errors[0]}"
        seen_states |= {b.get("state") for r in status["rounds"] for b in r["branches"].values()}
        if status["phase"] in ("Succeeded", "Failed"):
            break
        for req in result.create:
            jobs[req.name] = ObservedJob(req.name, req.stage, req.round, req.teacher, req.attempt, "Running",
                                         started_at=now)
        for job in jobs.values():
            if job.state == "Running":
                fail = job.name.endswith("sft-teacher-a-a1")
                job.state, job.finished_at = ("Failed" if fail else "Succeeded"), now
                job.message = "boom"
                job.metrics = preflight_report if job.stage == "preflight" else {"final_loss": 1.0, "accuracy": 0.5}
    assert status["phase"] == "Succeeded" and "Retrying" in seen_states
    assert status["preflight"]["teachers"]["teacher-a"]["p95"] == 3900 and status["preflight"]["evalRecords"] == 100
    failed = plan(run, spec, {}, [], now)
    failed = plan(run, spec, failed.status, [ObservedJob(r.name, r.stage, 1, r.teacher, 1, "Failed", permanent=True,
                                                         message="bad") for r in failed.create], now)
    assert failed.status["phase"] == "Failed" and failed.status["failure"]["stage"] == "preflight"
    assert "round" not in failed.status["failure"]  # the preflight belongs to no round
    assert not list(validator.iter_errors(failed.status))


def test_preflight_is_on_by_default_with_its_documented_defaults():
    assert defaulted(minimal()["spec"])["preflight"] == {
        "enabled": True, "maxTruncatedFraction": 0.05, "cpu": "1", "memory": "4Gi"}
    assert parse_spec(minimal()["spec"]).preflight == specmod.Preflight(
        enabled=True, max_truncated_fraction=0.05, cpu="1", memory="4Gi")
    spec = parse_spec(with_change("spec.preflight", {"enabled": False, "maxTruncatedFraction": 0, "cpu": 2,
                                                      "memory": "512Mi"})["spec"])
    assert spec.preflight == specmod.Preflight(enabled=False, max_truncated_fraction=0.0, cpu="2", memory="512Mi")
    props = SPEC_SCHEMA["properties"]["preflight"]["properties"]
    assert (props["maxTruncatedFraction"]["minimum"], props["maxTruncatedFraction"]["maximum"]) == (0, 1)


PREFLIGHT_INVALID = [
    ("fraction-above-one", {"maxTruncatedFraction": 1.5}, "spec.preflight.maxTruncatedFraction",
     "should be less than or equal to 1"),
    ("fraction-negative", {"maxTruncatedFraction": -0.1}, "spec.preflight.maxTruncatedFraction",
     "should be greater than or equal to 0"),
    ("cpu-not-a-quantity", {"cpu": "lots"}, "spec.preflight.cpu", "should match"),
    ("memory-unit", {"memory": "4GB"}, "spec.preflight.memory", "should match"),
    ("enabled-text", {"enabled": "yes"}, "spec.preflight.enabled", "must be of type boolean"),
    ("unknown-field", {"maxTruncated": 0.1}, "spec.preflight.maxTruncated", "unknown field"),
]


@pytest.mark.parametrize("case,preflight,field,detail", PREFLIGHT_INVALID, ids=[c[0] for c in PREFLIGHT_INVALID])
def test_preflight_out_of_bounds_is_refused_naming_the_field(case, preflight, field, detail):
    with pytest.raises(SpecError) as info:
        parse_spec(with_change("spec.preflight", preflight)["spec"])
    assert info.value.field == field and str(info.value).startswith(f"{field}: ")
    assert detail in str(info.value)


def test_check_jsonschema_refuses_a_truncated_fraction_above_one(tmp_path):
    schema_file = tmp_path / "motrun.schema.json"
    schema_file.write_text(json.dumps(specmod.json_schema()))
    bad = tmp_path / "fraction.yaml"
    bad.write_text(yaml.safe_dump(with_change("spec.preflight", {"maxTruncatedFraction": 1.5})))
    proc = subprocess.run([CHECK_JSONSCHEMA, "--schemafile", str(schema_file), str(bad)],
                          capture_output=True, text=True)
    assert proc.returncode == 1 and "maxTruncatedFraction" in proc.stdout, proc.stdout + proc.stderr


def test_preflight_cannot_be_switched_off_or_retuned_on_an_existing_run():
    old = paper_spec()
    for change in ({"enabled": False}, {"maxTruncatedFraction": 0.5}, {"memory": "16Gi"}):
        with pytest.raises(SpecError) as info:
            check_update(old, {**old, "preflight": {**old["preflight"], **change}})
        assert str(info.value) == "spec.preflight: Invalid value: preflight is immutable", change
    # Writing out the defaults an older manifest left implicit is no edit.
    implicit = {k: v for k, v in old.items() if k != "preflight"}
    check_update(implicit, {**implicit, "preflight": {"enabled": True, "maxTruncatedFraction": 0.05,
                                                      "cpu": "1", "memory": "4Gi"}})
