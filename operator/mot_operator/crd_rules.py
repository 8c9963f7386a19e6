"""The CRD's own rules, evaluated as the API server evaluates them, so `mot run` refuses what the
cluster refuses, names the same field and words it the same way.

Two kinds of rule live in the schema besides types and bounds: `x-kubernetes-validations` (CEL,
run with cel-python) and `x-kubernetes-list-type: map` (items unique by their keys). The API server
checks them on the defaulted object at each schema node, and reports a broken CEL rule at the rule's
node plus its `fieldPath`, a duplicate at the duplicate item. Rules that read `oldSelf` are
transition rules: checked only on an update, against the old value at the same place.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterator
from dataclasses import dataclass

import celpy
from celpy import celtypes

_MISSING = object()
_ENV = celpy.Environment()


@dataclass(frozen=True)
class Violation:
    path: str  # e.g. spec.resources.branch.nodes
    detail: str  # what the API server says after the path, e.g. 'Invalid value: training is immutable'

    def __str__(self) -> str:
        return f"{self.path}: {self.detail}"


@dataclass(frozen=True)
class Rule:
    location: str  # the schema node the rule sits on, items as [], e.g. spec.resources.branch
    rule: str
    message: str
    field_path: str = ""
    reason: str = "FieldValueInvalid"

    @property
    def transition(self) -> bool:
        return "oldSelf" in self.rule

    @property
    def reported_at(self) -> str:
        """Where the API server reports a failure (the location, items as [i] once known)."""
        return self.location + self.field_path


def _own_rules(schema: dict, location: str) -> Iterator[Rule]:
    for raw in schema.get("x-kubernetes-validations") or []:
        yield Rule(location, raw["rule"], raw.get("message") or f"failed rule: {raw['rule']}",
                   raw.get("fieldPath", ""), raw.get("reason", "FieldValueInvalid"))


def rules(schema: dict, location: str = "spec") -> Iterator[Rule]:
    """Every CEL rule under a schema node, with the path it sits at."""
    yield from _own_rules(schema, location)
    for name, sub in (schema.get("properties") or {}).items():
        yield from rules(sub, f"{location}.{name}")
    if isinstance(schema.get("items"), dict):
        yield from rules(schema["items"], f"{location}[]")


def violations(schema: dict, value, old=_MISSING, path: str = "spec") -> list[Violation]:
    """What the API server's rule checks refuse in `value` (already defaulted and schema-valid);
    with `old`, an update from it, so transition rules run too."""
    found: list[Violation] = []
    _check(schema, value, old, path, found)
    return found


def _check(schema: dict, value, old, path: str, found: list[Violation]) -> None:
    for rule in _own_rules(schema, path):
        if rule.transition and old is _MISSING:
            continue
        activation = {"self": to_cel(value, schema)}
        if rule.transition:
            activation["oldSelf"] = to_cel(old, schema)
        try:
            ok = bool(_program(rule.rule).evaluate(activation))
        except celpy.CELEvalError as error:
            found.append(Violation(path, _detail("FieldValueInvalid", value, str(error))))
            continue
        if not ok:
            found.append(Violation(rule.reported_at, _detail(rule.reason, value, rule.message)))
    if isinstance(value, dict):
        props = schema.get("properties") or {}
        extra = schema.get("additionalProperties") if isinstance(schema.get("additionalProperties"), dict) else None
        for name, sub in value.items():
            sub_schema = props.get(name, extra)
            if sub_schema is not None:
                sub_old = old.get(name, _MISSING) if isinstance(old, dict) else _MISSING
                child = f"{path}.{name}" if name in props else f"{path}[{name}]"
                _check(sub_schema, sub, sub_old, child, found)
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        keys = schema.get("x-kubernetes-list-map-keys") or []
        is_map = schema.get("x-kubernetes-list-type") == "map" and keys
        if is_map:
            found.extend(_duplicates(value, keys, path))
        # Items of a list keyed by name are matched to the old items by their keys.
        olds = {_key(item, keys): item for item in old} if is_map and isinstance(old, list) else {}
        for i, item in enumerate(value):
            sub_old = olds.get(_key(item, keys), _MISSING) if is_map else _MISSING
            _check(schema["items"], item, sub_old, f"{path}[{i}]", found)


def _key(item, keys: list[str]) -> tuple:
    return tuple(json.dumps(item.get(k), sort_keys=True) if isinstance(item, dict) else None for k in keys)


def _duplicates(items: list, keys: list[str], path: str) -> Iterator[Violation]:
    """A list-type map's items must be unique by their keys; the second of each is reported."""
    seen: dict[tuple, int] = {}
    for i, item in enumerate(items):
        key = _key(item, keys)
        seen[key] = seen.get(key, 0) + 1
        if seen[key] == 2:
            shown = {k: item[k] for k in keys if isinstance(item, dict) and k in item}
            yield Violation(f"{path}[{i}]", f"Duplicate value: {_compact(shown)}")


def schema_violation(path: str, validator: str, bound, value, schema: dict) -> Violation:
    """A schema check that failed (jsonschema's validator name and bound, the value at `path`) in
    the API server's words (kube-openapi's validation errors, as a v1.36 apiserver reports them)."""
    shown = _go_value(value)
    if validator == "required":
        return Violation(path, "Required value")
    if validator == "additionalProperties":
        return Violation(path, f'unknown field "{path}"')  # the strict decoding error
    if validator == "enum":
        return Violation(path, f"Unsupported value: {shown}: supported values: "
                               + ", ".join(_go_value(v) for v in bound))
    if validator == "maxLength":
        return Violation(path, f"Too long: may not be more than {bound} bytes")
    if validator == "maxItems":
        return Violation(path, f"Too many: {len(value)}: must have at most {bound} items")
    if validator == "minItems":
        return Violation(path, f"Invalid value: {len(value)}: {path} in body should have at least {bound} items")
    if validator == "type":
        given = _go_value(_json_type(value))
        return Violation(path, f"Invalid value: {given}: {path} in body must be of type {bound}: {given}")
    words = {
        "minimum": "greater than" if schema.get("exclusiveMinimum") else "greater than or equal to",
        "maximum": "less than" if schema.get("exclusiveMaximum") else "less than or equal to",
    }
    if validator in words:
        return Violation(path, f"Invalid value: {shown}: {path} in body should be {words[validator]} {_go_value(bound)}")
    if validator == "minLength":
        return Violation(path, f"Invalid value: {shown}: {path} in body should be at least {bound} chars long")
    if validator == "pattern":
        return Violation(path, f"Invalid value: {shown}: {path} in body should match '{bound}'")
    return Violation(path, f"Invalid value: {shown}: {validator} {_go_value(bound)}")


def _go_value(value) -> str:
    """A value as Go's field errors print it: strings quoted, whole floats without a point."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, int | float):
        return repr(value)
    return _compact(value)


def _json_type(value) -> str:
    for kind, name in ((bool, "boolean"), (int, "integer"), (float, "number"), (str, "string"),
                       (dict, "object"), (list, "array")):
        if isinstance(value, kind):
            return name
    return "null"


def _detail(reason: str, value, message: str) -> str:
    """What the API server writes after the path, per reason (k8s.io/apimachinery field errors, as a
    v1.36 apiserver words them: an object's or a list's value is left out of 'Invalid value')."""
    if reason == "FieldValueForbidden":
        return f"Forbidden: {message}"
    if reason == "FieldValueRequired":
        return f"Required value: {message}"
    if reason == "FieldValueDuplicate":
        return f"Duplicate value: {_compact(value)}"
    if isinstance(value, dict | list):
        return f"Invalid value: {message}"
    return f"Invalid value: {_go_value(value)}: {message}"


def _compact(value) -> str:
    return json.dumps(value, separators=(",", ":"))


@functools.lru_cache(maxsize=128)
def _program(text: str):
    return _ENV.program(_ENV.compile(text))


class _UnorderedList(celtypes.ListType):
    """A list-type map or set: CEL equality on it ignores the order of the items."""

    def __eq__(self, other):
        return (isinstance(other, list) and len(self) == len(other)
                and all(x in other for x in self) and all(y in self for y in other))

    def __ne__(self, other):
        return not self == other

    __hash__ = None


def to_cel(value, schema: dict):
    """A JSON value as the CEL value the API server builds from it: typed by the schema (a
    `number` is a double even when written as 1)."""
    kind = schema.get("type")
    if isinstance(value, dict):
        props = schema.get("properties") or {}
        extra = schema.get("additionalProperties") if isinstance(schema.get("additionalProperties"), dict) else {}
        return celtypes.MapType({celtypes.StringType(k): to_cel(v, props.get(k, extra)) for k, v in value.items()})
    if isinstance(value, list):
        items = [to_cel(v, schema.get("items") or {}) for v in value]
        keyed = schema.get("x-kubernetes-list-type") in ("map", "set")
        return _UnorderedList(items) if keyed else celtypes.ListType(items)
    if isinstance(value, bool):
        return celtypes.BoolType(value)
    if kind == "number":
        return celtypes.DoubleType(value)
    if isinstance(value, int):
        return celtypes.IntType(value)
    return celpy.json_to_cel(value)
