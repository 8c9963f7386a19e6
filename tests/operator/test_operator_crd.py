"""The MoTRun CRD: a structural schema with descriptions, defaults and bounds; examples valid
(check-jsonschema); invalid manifests refused by the schema, by its CEL rules (evaluated with
cel-python) and by parse_spec, each naming the field."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import celpy
import jsonschema
import kubernetes_validate
import pytest
import yaml
from celpy import celtypes

from mot_operator import spec as specmod
from mot_operator.planner import ObservedJob, RunRef, plan
from mot_operator.spec import SpecError, apply_defaults, parse_spec

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


# ---------------------------------------------------------------------------------------------
# CEL, evaluated as the API server does: on defaulted objects, numbers typed by the schema


def to_cel(value, schema):
    kind = schema.get("type")
    if isinstance(value, dict):
        props = schema.get("properties") or {}
        extra = schema.get("additionalProperties") if isinstance(schema.get("additionalProperties"), dict) else {}
        return celtypes.MapType({celtypes.StringType(k): to_cel(v, props.get(k, extra)) for k, v in value.items()})
    if isinstance(value, list):
        return celtypes.ListType([to_cel(v, schema.get("items") or {}) for v in value])
    if isinstance(value, bool):
        return celtypes.BoolType(value)
    if kind == "number":
        return celtypes.DoubleType(value)
    if isinstance(value, int):
        return celtypes.IntType(value)
    return celpy.json_to_cel(value)


def cel_rules(node=SPEC_SCHEMA, path="spec"):
    """(path, schema node, rule) for every x-kubernetes-validations rule under spec."""
    for rule in node.get("x-kubernetes-validations") or []:
        yield path, node, rule
    for name, sub in (node.get("properties") or {}).items():
        yield from cel_rules(sub, f"{path}.{name}")
    if isinstance(node.get("items"), dict):
        yield from cel_rules(node["items"], f"{path}[]")


def _values_at(value, path):
    """Values at a rule path like spec.teachers[].name (one per list element)."""
    values = [value]
    for part in path.split(".")[1:]:
        many = part.endswith("[]")
        key = part[:-2] if many else part
        nxt = []
        for v in values:
            if isinstance(v, dict) and key in v:
                nxt += v[key] if many else [v[key]]
        values = nxt
    return values


ENV = celpy.Environment()


def failing_rules(new: dict, old: dict | None = None) -> list[str]:
    """Messages of the CEL rules a (defaulted) spec breaks; transition rules only when `old` is given."""
    failures = []
    for path, node, rule in cel_rules():
        transition = "oldSelf" in rule["rule"]
        if transition and old is None:
            continue
        program = ENV.program(ENV.compile(rule["rule"]))
        olds = _values_at(old, path) if transition else []
        for i, value in enumerate(_values_at(new, path)):
            activation = {"self": to_cel(value, node)}
            if transition:
                if i >= len(olds):
                    continue
                activation["oldSelf"] = to_cel(olds[i], node)
            if not bool(program.evaluate(activation)):
                failures.append(rule["message"])
    return failures


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
    assert list(columns) == ["Phase", "Round", "Teachers", "Age", "Message"]
    assert columns["Round"]["jsonPath"] == ".status.roundDisplay"
    assert columns["Message"]["priority"] == 1 and "priority" not in columns["Phase"]


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


def _base():
    return yaml.safe_load((REPO / "examples" / "minimal.yaml").read_text())


def _with(path: str, value):
    manifest = _base()
    node = manifest
    parts = path.split(".")
    for part in parts[:-1]:
        node = node[int(part)] if part.isdigit() else node.setdefault(part, {})
    last = parts[-1]
    if value is DELETE:
        del node[last]
    elif last.isdigit():
        node[int(last)] = value
    else:
        node[last] = value
    return manifest


DELETE = object()
TWO = [{"name": "a", "dataset": "d"}, {"name": "b", "dataset": "d"}]

# (case, manifest, field parse_spec names, refused by: "schema" | "cel")
INVALID = [
    ("no-student", _with("spec.student", DELETE), "spec.student", "schema"),
    ("no-teachers", _with("spec.teachers", []), "spec.teachers", "schema"),
    ("teacher-name-case", _with("spec.teachers.0.name", "Teacher_A"), "spec.teachers[0].name", "schema"),
    ("teacher-no-dataset", _with("spec.teachers.1", {"name": "x"}), "spec.teachers[1].dataset", "schema"),
    ("rounds-zero", _with("spec.rounds", 0), "spec.rounds", "schema"),
    ("steps-negative", _with("spec.training", {"steps": -5}), "spec.training.steps", "schema"),
    ("learning-rate-zero", _with("spec.training", {"learningRate": 0}), "spec.training.learningRate", "schema"),
    ("bad-merge-method", _with("spec.merge", {"method": "median"}), "spec.merge.method", "schema"),
    ("bad-precision", _with("spec.training", {"precision": "fp8"}), "spec.training.precision", "schema"),
    ("unknown-field", _with("spec.training", {"stpes": 50}), "spec.training.stpes", "schema"),
    ("weight-negative", _with("spec.teachers.0.weight", -1), "spec.teachers[0].weight", "schema"),
    ("eval-without-dataset", _with("spec.evaluation", {"samples": 2}), "spec.evaluation.dataset", "schema"),
    ("duplicate-teachers", _with("spec.teachers", [TWO[0], dict(TWO[0])]), "spec.teachers[1].name", "cel"),
    ("all-weights-zero", _with("spec.teachers", [{**t, "weight": 0} for t in TWO]), "spec.teachers", "cel"),
    ("multinode-without-gpus", _with("spec.resources", {"branch": {"nodes": 2}}),
     "spec.resources.branch.nodes", "cel"),
    ("multinode-merge", _with("spec.resources", {"merge": {"nodes": 2}}), "spec.resources.merge.nodes", "cel"),
]


@pytest.mark.parametrize("case,manifest,field,by", INVALID, ids=[c[0] for c in INVALID])
def test_parse_spec_refuses_invalid_specs_naming_the_field(case, manifest, field, by):
    with pytest.raises(SpecError) as info:
        parse_spec(manifest["spec"])
    assert info.value.field == field, str(info.value)
    assert field in str(info.value)
    if by == "cel":  # the CRD's CEL rules refuse it too (the API server's side of the same rule)
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


def test_cel_rules_compile_and_immutability_covers_everything_but_rounds_and_suspend():
    rules = list(cel_rules())
    for _path, _node, rule in rules:
        ENV.compile(rule["rule"])  # syntax
        assert rule.get("message")
    old = defaulted(yaml.safe_load((REPO / "examples" / "paper.yaml").read_text())["spec"])
    assert failing_rules(old, old) == []
    for name in ("rounds", "suspend"):
        changed = copy.deepcopy(old)
        changed[name] = 7 if name == "rounds" else True
        assert failing_rules(changed, old) == [], name
    edits = {
        "student": "s3://other", "teachers": old["teachers"][:3], "training": {**old["training"], "steps": 9},
        "merge": {**old["merge"], "method": "ties"}, "evaluation": DELETE, "storage": {**old["storage"], "uri": "s3://x"},
        "resources": {**old["resources"], "merge": {**old["resources"]["merge"], "gpus": 1}},
        "image": "other:1", "serviceAccountName": "sa", "maxRetries": 5, "retryBackoffSeconds": 1,
        "activeDeadlineSeconds": 1, "queueName": "q", "ttlSecondsAfterFinished": 5,
    }
    assert set(edits) | {"rounds", "suspend"} == set(SPEC_SCHEMA["properties"]), "a spec field lacks a rule"
    for name, value in edits.items():
        changed = copy.deepcopy(old)
        if value is DELETE:
            del changed[name]
        else:
            changed[name] = value
        assert any("immutable" in m for m in failing_rules(changed, old)), f"{name} is not immutable"


def test_defaults_come_from_the_crd_file(tmp_path, monkeypatch):
    crd = copy.deepcopy(CRD)
    crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]["training"][
        "properties"]["steps"]["default"] = 77
    alt = tmp_path / "crd.yaml"
    alt.write_text(yaml.safe_dump(crd))
    monkeypatch.setenv("MOT_CRD_PATH", str(alt))
    specmod.reload_schema()
    try:
        assert parse_spec(_base()["spec"]).training.steps == 77
    finally:
        monkeypatch.delenv("MOT_CRD_PATH")
        specmod.reload_schema()
    spec = parse_spec(_base()["spec"])
    assert spec.training.steps == 50 and spec.rounds == 5 and spec.merge.method == "average"
    assert spec.teachers[0].weight == 1.0 and spec.max_retries == 2


def test_numbers_written_as_text_are_read_as_numbers():
    # PyYAML reads `1e-5` as a string; kubectl reads a number: parse_spec accepts both.
    spec = parse_spec(_with("spec.training", {"learningRate": "1e-5"})["spec"])
    assert spec.training.learning_rate == pytest.approx(1e-5)


def test_statuses_the_planner_writes_fit_the_crd_status_schema():
    # The API server validates writes to the status subresource against this schema.
    status_schema = copy.deepcopy(specmod.json_schema()["properties"]["status"])
    status_schema["$schema"] = "http://json-schema.org/draft-04/schema#"
    validator = jsonschema.Draft4Validator(status_schema, format_checker=jsonschema.FormatChecker())
    spec = parse_spec({**_base()["spec"], "rounds": 2, "retryBackoffSeconds": 5,
                       "evaluation": {"dataset": "s3://d/e"}})
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
                job.message, job.metrics = "boom", {"final_loss": 1.0, "accuracy": 0.5}
    assert status["phase"] == "Succeeded" and "Retrying" in seen_states
    failed = plan(run, spec, {}, [], now)
    failed = plan(run, spec, failed.status, [ObservedJob(r.name, r.stage, 1, r.teacher, 1, "Failed", permanent=True,
                                                         message="bad") for r in failed.create], now)
    assert failed.status["phase"] == "Failed"
    assert not list(validator.iter_errors(failed.status))
