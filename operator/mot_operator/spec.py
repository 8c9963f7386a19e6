"""MoTRun spec: typed view, defaults and validation, read from the CRD so there is one schema.

The Kubernetes API server applies the CRD's defaults and checks its schema and rules; the local
runner has no API server, so `parse_spec` does the same here: defaults, enums and bounds come from
the CRD's openAPIV3Schema (checked with jsonschema), its CEL rules and list keys are evaluated by
`crd_rules`, and `check_update` applies the rules the cluster applies to an edited MoTRun.
"""

from __future__ import annotations

import copy
import functools
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from . import crd_rules

CRD_FILENAME = "motruns.mot.dev.yaml"
GROUP = "mot.dev"
VERSION = "v1alpha1"
PLURAL = "motruns"
KIND = "MoTRun"
API_VERSION = f"{GROUP}/{VERSION}"
_NUMBER_TEXT = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?$")


class SpecError(ValueError):
    """An invalid MoTRun spec; `field` is the path the API server names, like "spec.teachers[1].weight"."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


@dataclass(frozen=True)
class Teacher:
    name: str
    dataset: str
    weight: float = 1.0


@dataclass(frozen=True)
class Training:
    steps: int = 50
    learning_rate: float = 1e-5
    lr_schedule: str = "cosine"
    warmup_ratio: float = 0.05
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    weight_decay: float = 1e-4
    micro_batch_size: int = 1
    grad_accum: int = 16
    max_seq_length: int = 4096
    precision: str = "auto"
    gradient_checkpointing: bool = False
    packing: bool = False
    seed: int = 0
    threads: int | None = None


@dataclass(frozen=True)
class MergeParameters:
    scale: float = 1.0
    density: float = 0.5
    seed: int = 0
    shard_size: str = "2GB"


@dataclass(frozen=True)
class Merge:
    method: str = "average"
    parameters: MergeParameters = field(default_factory=MergeParameters)


@dataclass(frozen=True)
class Evaluation:
    dataset: str
    samples: int = 1
    max_new_tokens: int = 256
    temperature: float = 0.0
    threads: int | None = None


@dataclass(frozen=True)
class Preflight:
    enabled: bool = True
    max_truncated_fraction: float = 0.05
    cpu: str = "1"
    memory: str = "4Gi"


@dataclass(frozen=True)
class Storage:
    uri: str | None = None
    endpoint: str | None = None
    credentials_secret: str | None = None
    path_style: bool = True
    cleanup: bool = False


@dataclass(frozen=True)
class RoleResources:
    """Compute for one kind of Job (branch, merge or eval)."""

    gpus: int = 0
    cpu: str | None = None
    memory: str | None = None
    nodes: int = 1
    node_selector: dict[str, str] = field(default_factory=dict)
    tolerations: tuple[dict, ...] = ()
    priority_class_name: str | None = None


@dataclass(frozen=True)
class Resources:
    branch: RoleResources = field(default_factory=RoleResources)
    merge: RoleResources = field(default_factory=RoleResources)
    eval: RoleResources = field(default_factory=RoleResources)


@dataclass(frozen=True)
class MoTRunSpec:
    student: str
    teachers: tuple[Teacher, ...]
    rounds: int = 5
    training: Training = field(default_factory=Training)
    merge: Merge = field(default_factory=Merge)
    evaluation: Evaluation | None = None
    preflight: Preflight = field(default_factory=Preflight)
    storage: Storage = field(default_factory=Storage)
    resources: Resources = field(default_factory=Resources)
    image: str | None = None
    service_account_name: str | None = None
    max_retries: int = 2
    retry_backoff_seconds: int = 10
    active_deadline_seconds: int | None = None
    pending_timeout_seconds: int = 0  # 0: a stage may wait for its Pods forever
    suspend: bool = False
    queue_name: str | None = None
    ttl_seconds_after_finished: int | None = None

    def teacher(self, name: str) -> Teacher | None:
        return next((t for t in self.teachers if t.name == name), None)


# ---------------------------------------------------------------------------------------------
# The CRD as the one source of the schema


def crd_path() -> Path:
    """The CRD file: $MOT_CRD_PATH, else the one beside this module: in a checkout a link to
    crds/motruns.mot.dev.yaml (the one source), in the wheel the file's content."""
    return Path(os.environ.get("MOT_CRD_PATH") or Path(__file__).with_name(CRD_FILENAME))


@functools.lru_cache(maxsize=4)
def _load_crd(path: str) -> dict:
    return yaml.safe_load(Path(path).read_text())


def load_crd() -> dict:
    return _load_crd(str(crd_path()))


def openapi_schema() -> dict:
    """The MoTRun's openAPIV3Schema exactly as written in the CRD."""
    (version,) = [v for v in load_crd()["spec"]["versions"] if v["name"] == VERSION]
    return version["schema"]["openAPIV3Schema"]


def to_json_schema(node: Any) -> Any:
    """Convert Kubernetes' OpenAPI v3 dialect to a draft-04 JSON Schema that jsonschema checks.

    int-or-string becomes a two-type union, Kubernetes extensions are dropped, and objects with
    declared properties refuse unknown fields (as `kubectl apply` does with strict validation).
    """
    if isinstance(node, list):
        return [to_json_schema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: to_json_schema(v) for k, v in node.items() if not k.startswith("x-kubernetes-")}
    if node.get("x-kubernetes-int-or-string"):
        out["type"] = ["integer", "string"]
    if "properties" in node and "additionalProperties" not in node and not node.get(
        "x-kubernetes-preserve-unknown-fields"
    ):
        out["additionalProperties"] = False
    return out


@functools.lru_cache(maxsize=1)
def json_schema() -> dict:
    """The whole MoTRun object as draft-04 JSON Schema (what check-jsonschema is given)."""
    schema = to_json_schema(copy.deepcopy(openapi_schema()))
    schema["$schema"] = "http://json-schema.org/draft-04/schema#"
    return schema


@functools.lru_cache(maxsize=1)
def _spec_validator() -> jsonschema.Draft4Validator:
    schema = copy.deepcopy(json_schema()["properties"]["spec"])
    schema["$schema"] = "http://json-schema.org/draft-04/schema#"
    return jsonschema.Draft4Validator(schema)


def reload_schema() -> None:
    """Forget the cached schema (after $MOT_CRD_PATH or the file changed)."""
    for cached in (_load_crd, json_schema, _spec_validator):
        cached.cache_clear()


def apply_defaults(instance: Any, schema: dict) -> Any:
    """Fill in defaults the way the API server does (a defaulted object gets its own defaults).

    Numbers written as text (PyYAML reads `1e-5` as a string; kubectl reads a number) are read
    as numbers where the schema wants one."""
    kind = schema.get("type")
    if kind == "number" and isinstance(instance, str) and _NUMBER_TEXT.match(instance.strip()):
        return float(instance)
    if isinstance(instance, dict) and kind == "object":
        for name, sub in schema.get("properties", {}).items():
            if name not in instance and "default" in sub:
                instance[name] = copy.deepcopy(sub["default"])
            if name in instance:
                instance[name] = apply_defaults(instance[name], sub)
        extra = schema.get("additionalProperties")
        if isinstance(extra, dict):
            for name in [n for n in instance if n not in schema.get("properties", {})]:
                instance[name] = apply_defaults(instance[name], extra)
    elif isinstance(instance, list) and isinstance(schema.get("items"), dict):
        return [apply_defaults(item, schema["items"]) for item in instance]
    return instance


def field_path(parts, prefix: str = "spec") -> str:
    text = prefix
    for part in parts:
        text += f"[{part}]" if isinstance(part, int) else f".{part}"
    return text


def _schema_error(error: jsonschema.ValidationError) -> SpecError:
    """The first schema error, at the field the API server names, in its words."""
    path = list(error.absolute_path)
    value = error.instance
    if error.validator == "required" and isinstance(error.instance, dict):
        path += [n for n in error.validator_value if n not in error.instance][:1]
        value = None
    if error.validator == "additionalProperties" and isinstance(error.instance, dict):
        known = error.schema.get("properties", {})
        path += sorted(n for n in error.instance if n not in known)[:1]
        found = crd_rules.schema_violation(field_path(path), "additionalProperties", None, None, error.schema)
        return SpecError(found.path, f"{found.detail} (known fields: {', '.join(sorted(known))})")
    found = crd_rules.schema_violation(field_path(path), error.validator, error.validator_value, value, error.schema)
    return SpecError(found.path, found.detail)


# ---------------------------------------------------------------------------------------------
# Parsing


def parse_spec(spec: dict) -> MoTRunSpec:
    """Apply the CRD's defaults, check its schema and rules, and return the typed spec."""
    return _build(validated(spec))


def validated(spec: dict) -> dict:
    """The spec with the CRD's defaults applied, once its schema and rules hold (else SpecError)."""
    if not isinstance(spec, dict):
        raise SpecError("spec", f"must be an object, got {type(spec).__name__}")
    validator = _spec_validator()
    data = apply_defaults(copy.deepcopy(spec), validator.schema)
    error = jsonschema.exceptions.best_match(validator.iter_errors(data), key=_error_rank)
    if error is not None:
        raise _schema_error(error)
    _raise_first(crd_rules.violations(openapi_schema()["properties"]["spec"], data))
    return data


def check_update(old: dict, new: dict) -> None:
    """Refuse what the API server refuses when a MoTRun's spec goes from `old` to `new` (both
    valid): the CRD's transition rules, i.e. everything but `rounds` and `suspend` is immutable."""
    _raise_first(crd_rules.violations(openapi_schema()["properties"]["spec"], validated(new), validated(old)))


def _raise_first(violations: list[crd_rules.Violation]) -> None:
    if violations:
        raise SpecError(violations[0].path, violations[0].detail)


def _error_rank(error: jsonschema.ValidationError):
    # Prefer the deepest error (the one naming the exact field), then best_match's own order.
    return (-len(error.absolute_path), *jsonschema.exceptions.relevance(error))


def _quantity(value) -> str | None:
    return None if value is None else str(value)


def _role(data: dict) -> RoleResources:
    return RoleResources(
        gpus=data["gpus"],
        cpu=_quantity(data.get("cpu")),
        memory=_quantity(data.get("memory")),
        nodes=data["nodes"],
        node_selector=dict(data.get("nodeSelector") or {}),
        tolerations=tuple(copy.deepcopy(data.get("tolerations") or [])),
        priority_class_name=data.get("priorityClassName"),
    )


def _build(d: dict) -> MoTRunSpec:
    t = d["training"]
    m = d["merge"]
    p = m["parameters"]
    e = d.get("evaluation")
    s = d.get("storage") or {}
    r = d["resources"]
    pf = d["preflight"]
    return MoTRunSpec(
        student=d["student"],
        teachers=tuple(Teacher(x["name"], x["dataset"], float(x["weight"])) for x in d["teachers"]),
        rounds=d["rounds"],
        training=Training(
            steps=t["steps"],
            learning_rate=float(t["learningRate"]),
            lr_schedule=t["lrSchedule"],
            warmup_ratio=float(t["warmupRatio"]),
            adam_beta1=float(t["adamBeta1"]),
            adam_beta2=float(t["adamBeta2"]),
            weight_decay=float(t["weightDecay"]),
            micro_batch_size=t["microBatchSize"],
            grad_accum=t["gradAccum"],
            max_seq_length=t["maxSeqLength"],
            precision=t["precision"],
            gradient_checkpointing=t["gradientCheckpointing"],
            packing=t["packing"],
            seed=t["seed"],
            threads=t.get("threads"),
        ),
        merge=Merge(
            method=m["method"],
            parameters=MergeParameters(
                scale=float(p["scale"]), density=float(p["density"]), seed=p["seed"], shard_size=p["shardSize"]
            ),
        ),
        evaluation=None
        if e is None
        else Evaluation(
            dataset=e["dataset"],
            samples=e["samples"],
            max_new_tokens=e["maxNewTokens"],
            temperature=float(e["temperature"]),
            threads=e.get("threads"),
        ),
        preflight=Preflight(enabled=pf["enabled"], max_truncated_fraction=float(pf["maxTruncatedFraction"]),
                            cpu=str(pf["cpu"]), memory=str(pf["memory"])),
        storage=Storage(
            uri=s.get("uri"),
            endpoint=s.get("endpoint"),
            credentials_secret=s.get("credentialsSecret"),
            path_style=s.get("pathStyle", True),
            cleanup=s.get("cleanup", False),
        ),
        resources=Resources(branch=_role(r["branch"]), merge=_role(r["merge"]), eval=_role(r["eval"])),
        image=d.get("image"),
        service_account_name=d.get("serviceAccountName"),
        max_retries=d["maxRetries"],
        retry_backoff_seconds=d["retryBackoffSeconds"],
        active_deadline_seconds=d.get("activeDeadlineSeconds"),
        pending_timeout_seconds=d.get("pendingTimeoutSeconds", 0),
        suspend=d["suspend"],
        queue_name=d.get("queueName"),
        ttl_seconds_after_finished=d.get("ttlSecondsAfterFinished"),
    )
