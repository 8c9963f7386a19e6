"""Invalid MoTRuns, each breaking one rule of the CRD, with the field the API server names.

Shared by the CRD's unit tests (parse_spec must name the same field) and the test against a real
kube-apiserver (which must refuse each one naming it)."""

import copy
from pathlib import Path

import yaml

MINIMAL = Path(__file__).resolve().parents[2] / "examples" / "minimal.yaml"
DELETE = object()
TWO = [{"name": "a", "dataset": "d"}, {"name": "b", "dataset": "d"}]


def minimal() -> dict:
    return yaml.safe_load(MINIMAL.read_text())


def with_change(path: str, value) -> dict:
    """examples/minimal.yaml with one value set (or deleted) at a dotted path; digits index lists."""
    manifest = minimal()
    node = manifest
    parts = path.split(".")
    for part in parts[:-1]:
        node = node[int(part)] if part.isdigit() else node.setdefault(part, {})
    last = parts[-1]
    if value is DELETE:
        del node[last]
    elif last.isdigit():
        node[int(last)] = copy.deepcopy(value)
    else:
        node[last] = copy.deepcopy(value)
    return manifest


def _teachers(count: int) -> list[dict]:
    return [{"name": f"t{i}", "dataset": "d"} for i in range(count)]


# (case, manifest, field named, refused by: "schema" | "rule" (CEL or list keys))
INVALID = [
    ("no-student", with_change("spec.student", DELETE), "spec.student", "schema"),
    ("student-empty", with_change("spec.student", ""), "spec.student", "schema"),
    ("student-too-long", with_change("spec.student", "s3://" + "m" * 1020), "spec.student", "schema"),
    ("no-teachers", with_change("spec.teachers", []), "spec.teachers", "schema"),
    ("too-many-teachers", with_change("spec.teachers", _teachers(33)), "spec.teachers", "schema"),
    ("teacher-name-case", with_change("spec.teachers.0.name", "Teacher_A"), "spec.teachers[0].name", "schema"),
    ("teacher-name-dash", with_change("spec.teachers.1.name", "b-"), "spec.teachers[1].name", "schema"),
    ("teacher-name-too-long", with_change("spec.teachers.0.name", "t" * 41), "spec.teachers[0].name", "schema"),
    ("teacher-no-dataset", with_change("spec.teachers.1", {"name": "x"}), "spec.teachers[1].dataset", "schema"),
    ("teacher-dataset-empty", with_change("spec.teachers.0.dataset", ""), "spec.teachers[0].dataset", "schema"),
    ("weight-negative", with_change("spec.teachers.0.weight", -1), "spec.teachers[0].weight", "schema"),
    ("weight-too-big", with_change("spec.teachers.1.weight", 1001), "spec.teachers[1].weight", "schema"),
    ("rounds-zero", with_change("spec.rounds", 0), "spec.rounds", "schema"),
    ("rounds-too-many", with_change("spec.rounds", 101), "spec.rounds", "schema"),
    ("rounds-text", with_change("spec.rounds", "five"), "spec.rounds", "schema"),
    ("steps-negative", with_change("spec.training", {"steps": -5}), "spec.training.steps", "schema"),
    ("learning-rate-zero", with_change("spec.training", {"learningRate": 0}), "spec.training.learningRate",
     "schema"),
    ("learning-rate-two", with_change("spec.training", {"learningRate": 2}), "spec.training.learningRate",
     "schema"),
    ("bad-lr-schedule", with_change("spec.training", {"lrSchedule": "step"}), "spec.training.lrSchedule", "schema"),
    ("warmup-above-one", with_change("spec.training", {"warmupRatio": 1.5}), "spec.training.warmupRatio", "schema"),
    ("beta1-one", with_change("spec.training", {"adamBeta1": 1}), "spec.training.adamBeta1", "schema"),
    ("micro-batch-zero", with_change("spec.training", {"microBatchSize": 0}), "spec.training.microBatchSize",
     "schema"),
    ("grad-accum-too-big", with_change("spec.training", {"gradAccum": 5000}), "spec.training.gradAccum", "schema"),
    ("seq-length-tiny", with_change("spec.training", {"maxSeqLength": 8}), "spec.training.maxSeqLength", "schema"),
    ("bad-precision", with_change("spec.training", {"precision": "fp8"}), "spec.training.precision", "schema"),
    ("threads-zero", with_change("spec.training", {"threads": 0}), "spec.training.threads", "schema"),
    ("unknown-field", with_change("spec.training", {"stpes": 50}), "spec.training.stpes", "schema"),
    ("bad-merge-method", with_change("spec.merge", {"method": "median"}), "spec.merge.method", "schema"),
    ("density-zero", with_change("spec.merge", {"parameters": {"density": 0}}), "spec.merge.parameters.density",
     "schema"),
    ("scale-too-big", with_change("spec.merge", {"parameters": {"scale": 11}}), "spec.merge.parameters.scale",
     "schema"),
    ("shard-size-unit", with_change("spec.merge", {"parameters": {"shardSize": "2TB"}}),
     "spec.merge.parameters.shardSize", "schema"),
    ("outer-momentum-one", with_change("spec.merge", {"outer": {"momentum": 1}}), "spec.merge.outer.momentum",
     "schema"),
    ("outer-learning-rate-zero", with_change("spec.merge", {"outer": {"learningRate": 0}}),
     "spec.merge.outer.learningRate", "schema"),
    ("select-best-text", with_change("spec.evaluation", {"dataset": "d", "selectBest": "yes"}),
     "spec.evaluation.selectBest", "schema"),
    ("eval-without-dataset", with_change("spec.evaluation", {"samples": 2}), "spec.evaluation.dataset", "schema"),
    ("eval-samples-too-many", with_change("spec.evaluation", {"dataset": "d", "samples": 65}),
     "spec.evaluation.samples", "schema"),
    ("eval-temperature-negative", with_change("spec.evaluation", {"dataset": "d", "temperature": -1}),
     "spec.evaluation.temperature", "schema"),
    ("path-style-text", with_change("spec.storage.pathStyle", "yes"), "spec.storage.pathStyle", "schema"),
    ("gpus-too-many", with_change("spec.resources", {"branch": {"gpus": 65}}), "spec.resources.branch.gpus",
     "schema"),
    ("cpu-words", with_change("spec.resources", {"branch": {"cpu": "lots"}}), "spec.resources.branch.cpu", "schema"),
    ("memory-unit", with_change("spec.resources", {"merge": {"memory": "32GiB"}}), "spec.resources.merge.memory",
     "schema"),
    ("toleration-operator", with_change("spec.resources", {"branch": {"tolerations": [{"operator": "Maybe"}]}}),
     "spec.resources.branch.tolerations[0].operator", "schema"),
    ("max-retries-too-many", with_change("spec.maxRetries", 21), "spec.maxRetries", "schema"),
    ("backoff-negative", with_change("spec.retryBackoffSeconds", -1), "spec.retryBackoffSeconds", "schema"),
    ("deadline-zero", with_change("spec.activeDeadlineSeconds", 0), "spec.activeDeadlineSeconds", "schema"),
    ("queue-name-too-long", with_change("spec.queueName", "q" * 64), "spec.queueName", "schema"),
    ("ttl-negative", with_change("spec.ttlSecondsAfterFinished", -1), "spec.ttlSecondsAfterFinished", "schema"),
    ("suspend-text", with_change("spec.suspend", "no"), "spec.suspend", "schema"),
    ("duplicate-teachers", with_change("spec.teachers", [TWO[0], dict(TWO[0])]), "spec.teachers[1]", "rule"),
    ("all-weights-zero", with_change("spec.teachers", [{**t, "weight": 0} for t in TWO]), "spec.teachers", "rule"),
    ("multinode-without-gpus", with_change("spec.resources", {"branch": {"nodes": 2}}),
     "spec.resources.branch.nodes", "rule"),
    ("multinode-merge", with_change("spec.resources", {"merge": {"nodes": 2}}), "spec.resources.merge.nodes",
     "rule"),
    ("nesterov-without-momentum", with_change("spec.merge", {"outer": {"nesterov": True}}),
     "spec.merge.outer.nesterov", "rule"),
    ("multinode-eval", with_change("spec.resources", {"eval": {"nodes": 3}}), "spec.resources.eval.nodes", "rule"),
    ("backend-unknown", with_change("spec.resources", {"branch": {"backend": "mpi"}}),
     "spec.resources.branch.backend", "schema"),
    ("backend-on-merge", with_change("spec.resources", {"merge": {"backend": "jobset"}}),
     "spec.resources.merge.backend", "rule"),
]
