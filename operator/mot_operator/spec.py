"""MoTRun spec: typed view, defaults and validation, read from the CRD so there is one schema.

The Kubernetes API server applies the CRD's defaults and checks its schema and rules; the local
runner has no API server, so `parse_spec` does the same here: defaults, enums and bounds come from
the CRD's openAPIV3Schema (checked with jsonschema), its CEL rules and list keys are evaluated by
`crd_rules`, and `check_update` applies the rules the cluster applies to an edited MoTRun.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import os
import re
import types
import typing
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


# The typed spec. Its defaults are the CRD's (applied by `validated`, as the API server applies
# them); `_from_spec` builds each class from the defaulted spec, field `snake_case` from key
# `camelCase`, so the classes hold types only.


@dataclass(frozen=True)
class Teacher:
    name: str
    dataset: str
    weight: float


@dataclass(frozen=True)
class Training:
    steps: int
    learning_rate: float
    lr_schedule: str
    warmup_ratio: float
    adam_beta1: float
    adam_beta2: float
    weight_decay: float
    micro_batch_size: int
    grad_accum: int
    max_seq_length: int
    precision: str
    gradient_checkpointing: bool
    packing: bool
    seed: int
    threads: int | None


@dataclass(frozen=True)
class MergeParameters:
    scale: float
    density: float
    seed: int
    shard_size: str


@dataclass(frozen=True)
class Outer:
    learning_rate: float
    momentum: float
    nesterov: bool

    @property
    def identity(self) -> bool:
        """The plain merge: the outer step changes nothing (and keeps no state)."""
        return self.learning_rate == 1.0 and self.momentum == 0.0


@dataclass(frozen=True)
class Merge:
    method: str
    parameters: MergeParameters
    outer: Outer


@dataclass(frozen=True)
class Evaluation:
    dataset: str
    samples: int
    max_new_tokens: int
    temperature: float
    engine: str
    threads: int | None
    select_best: bool


@dataclass(frozen=True)
class Preflight:
    enabled: bool
    max_truncated_fraction: float
    cpu: str
    memory: str


@dataclass(frozen=True)
class Storage:
    uri: str | None
    endpoint: str | None
    credentials_secret: str | None
    path_style: bool
    cleanup: bool


@dataclass(frozen=True)
class RoleResources:
    """Compute for one kind of Job (branch, merge or eval). The defaults serve the small Pods the
    operator makes up itself (preflight, cleanup); a spec's roles get the CRD's."""

    gpus: int = 0
    cpu: str | None = None
    memory: str | None = None
    nodes: int = 1
    node_selector: dict[str, str] = field(default_factory=dict)
    tolerations: tuple[dict, ...] = ()
    priority_class_name: str | None = None
    # What runs a multi-node branch (spec.resources.branch.backend): "jobset", "job" or "auto"
    # (JobSet where the operator has it). Merges and evals are always one plain Job.
    backend: str = "auto"


@dataclass(frozen=True)
class Resources:
    branch: RoleResources
    merge: RoleResources
    eval: RoleResources


@dataclass(frozen=True)
class MoTRunSpec:
    student: str
    teachers: tuple[Teacher, ...]
    rounds: int
    training: Training
    merge: Merge
    evaluation: Evaluation | None
    preflight: Preflight
    storage: Storage
    resources: Resources
    image: str | None
    service_account_name: str | None
    max_retries: int
    retry_backoff_seconds: int
    active_deadline_seconds: int | None
    pending_timeout_seconds: int  # 0: a stage may wait for its Pods forever
    suspend: bool
    queue_name: str | None
    ttl_seconds_after_finished: int | None

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
    return _from_spec(MoTRunSpec, validated(spec), openapi_schema()["properties"]["spec"])


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


def _camel(name: str) -> str:
    first, *rest = name.split("_")
    return first + "".join(part.title() for part in rest)


@functools.cache
def _field_types(cls: type) -> tuple[tuple[str, Any], ...]:
    hints = typing.get_type_hints(cls)
    return tuple((f.name, hints[f.name]) for f in dataclasses.fields(cls))


def _from_spec(cls: type, data: dict, schema: dict):
    """An instance of dataclass `cls` from `data`, a CRD-defaulted object whose schema is `schema`."""
    props = schema.get("properties", {})
    return cls(**{name: _convert(kind, data.get(_camel(name)), props.get(_camel(name), {}))
                  for name, kind in _field_types(cls)})


def _convert(kind: Any, value: Any, schema: dict) -> Any:
    args = typing.get_args(kind)
    if typing.get_origin(kind) in (types.UnionType, typing.Union):  # `X | None`: None when absent
        (kind,) = [a for a in args if a is not type(None)]
        return None if value is None else _convert(kind, value, schema)
    if dataclasses.is_dataclass(kind):  # left out (spec.storage): the object with its own defaults
        return _from_spec(kind, apply_defaults({}, schema) if value is None else value, schema)
    if typing.get_origin(kind) is tuple:
        items = value or []
        if dataclasses.is_dataclass(args[0]):
            return tuple(_from_spec(args[0], item, schema.get("items", {})) for item in items)
        return tuple(copy.deepcopy(items))
    if typing.get_origin(kind) is dict:
        return dict(value or {})
    if kind in (float, str):  # numbers may be written as integers; quantities as int-or-string
        return kind(value)
    return value
