"""A Kubernetes API server for tests: kmock's emulator as the object store, with the behaviour real
clients (kopf, the `kubernetes` client, kubectl) rely on filled in over real HTTP on 127.0.0.1.

kmock 0.8 stores objects and serves discovery, but misses what a real API server does (DESIGN.md §4):
201 on create, uid/resourceVersion/generation stamping, AlreadyExists/NotFound/Conflict Status
reasons, label and field selectors, PUT, the status subresource, watches resumed from a
resourceVersion, owner-reference garbage collection, schema validation of custom resources. This
module serves every resource request itself and keeps the objects in kmock's `objects` array.

Custom resources: creating a CustomResourceDefinition (apiextensions.k8s.io/v1) registers its
resource. Created/updated custom objects are defaulted from, and validated against, the CRD's
openAPIV3Schema with jsonschema; invalid ones get a 422 `Invalid` Status naming the field, as a real
API server answers. CEL rules (`x-kubernetes-validations`) are not evaluated here: the operator's
`parse_spec` mirrors them.

Not served: protobuf request bodies (kubectl's typed generators such as `kubectl create namespace`
send them; use manifests with `kubectl apply -f`), server-side apply field management (an apply
creates or merges), built-in types' printer columns (`kubectl get` tables show Name and Age; custom
resources get their CRD's printer columns), aggregated discovery, openapi v2 and schemas in v3.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import copy
import datetime as dt
import json
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp.web
import attrs
import jsonpatch
import jsonschema
import kmock
import pytest
import yaml

from mot_operator import crd_rules

REPO = Path(__file__).resolve().parents[2]
CRD_FILE = REPO / "crds" / "motruns.mot.dev.yaml"

FIXTURES = ("kube_api",)


@dataclass
class ResourceType:
    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool
    singular: str = ""
    short_names: tuple[str, ...] = ()
    status_subresource: bool = False
    schema: dict | None = None  # openAPIV3Schema of a custom resource
    printer_columns: tuple = ()  # additionalPrinterColumns of a custom resource

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def key(self) -> tuple[str, str]:
        return (self.group, self.plural)

    def kmock_resource(self) -> kmock.resource:
        return kmock.resource(group=self.group, version=self.version, plural=self.plural)


BUILTIN_TYPES = [
    ResourceType("", "v1", "namespaces", "Namespace", False, "namespace", ("ns",), True),
    ResourceType("", "v1", "pods", "Pod", True, "pod", ("po",), True),
    ResourceType("", "v1", "services", "Service", True, "service", ("svc",), True),
    ResourceType("", "v1", "secrets", "Secret", True, "secret"),
    ResourceType("", "v1", "configmaps", "ConfigMap", True, "configmap", ("cm",)),
    ResourceType("", "v1", "events", "Event", True, "event", ("ev",)),
    ResourceType("", "v1", "serviceaccounts", "ServiceAccount", True, "serviceaccount", ("sa",)),
    ResourceType("batch", "v1", "jobs", "Job", True, "job", (), True),
    ResourceType("events.k8s.io", "v1", "events", "Event", True, "event", ("ev",)),
    ResourceType("coordination.k8s.io", "v1", "leases", "Lease", True, "lease"),
    ResourceType("apiextensions.k8s.io", "v1", "customresourcedefinitions", "CustomResourceDefinition",
                 False, "customresourcedefinition", ("crd", "crds"), True),
    ResourceType("rbac.authorization.k8s.io", "v1", "roles", "Role", True, "role"),
    ResourceType("rbac.authorization.k8s.io", "v1", "rolebindings", "RoleBinding", True, "rolebinding"),
    ResourceType("rbac.authorization.k8s.io", "v1", "clusterroles", "ClusterRole", False, "clusterrole"),
    ResourceType("rbac.authorization.k8s.io", "v1", "clusterrolebindings", "ClusterRoleBinding", False,
                 "clusterrolebinding"),
    ResourceType("apps", "v1", "deployments", "Deployment", True, "deployment", ("deploy",), True),
]

VERBS = ["create", "delete", "get", "list", "patch", "update", "watch"]
EVENT_LOG_SIZE = 20000  # watch events kept per resource for resuming; older resourceVersions get 410


class ApiError(Exception):
    """A failure answered as a Kubernetes `Status` object."""

    def __init__(self, code: int, reason: str, message: str, details: dict | None = None):
        super().__init__(message)
        self.code, self.reason, self.message, self.details = code, reason, message, details or {}

    def status(self) -> dict:
        return {"apiVersion": "v1", "kind": "Status", "metadata": {}, "status": "Failure",
                "code": self.code, "reason": self.reason, "message": self.message, "details": self.details}


def now_iso() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# ---------------------------------------------------------------------------------------------------
# Selectors

_SET_EXPR = re.compile(r"^\s*(!?)([\w./-]+)\s*(?:(in|notin)\s*\(([^)]*)\))?\s*$")


def _split_selector(text: str) -> list[str]:
    """Split on commas that are not inside parentheses (set-based requirements)."""
    parts, depth, current = [], 0, ""
    for char in text:
        depth += char == "("
        depth -= char == ")"
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    parts.append(current)
    return [part.strip() for part in parts if part.strip()]


def label_selector(text: str) -> Callable[[dict], bool]:
    """Compile a label selector (equality- and set-based) into a predicate over a label dict."""
    checks: list[Callable[[dict], bool]] = []
    for requirement in _split_selector(text or ""):
        if "!=" in requirement:
            key, value = (s.strip() for s in requirement.split("!=", 1))
            checks.append(lambda labels, k=key, v=value: labels.get(k) != v)
        elif "=" in requirement:
            key, value = (s.strip() for s in requirement.replace("==", "=").split("=", 1))
            checks.append(lambda labels, k=key, v=value: labels.get(k) == v)
        else:
            match = _SET_EXPR.match(requirement)
            if not match:
                raise ApiError(400, "BadRequest", f"unable to parse requirement: {requirement!r}")
            negate, key, operator, values = match.groups()
            options = {v.strip() for v in (values or "").split(",") if v.strip()}
            if operator == "in":
                checks.append(lambda labels, k=key, o=options: labels.get(k) in o)
            elif operator == "notin":
                checks.append(lambda labels, k=key, o=options: labels.get(k) not in o)
            else:
                checks.append(lambda labels, k=key, n=bool(negate): (k in labels) != n)
    return lambda labels: all(check(labels) for check in checks)


def _dig(obj: Any, path: str) -> str | None:
    for part in path.split("."):
        if not isinstance(obj, dict) or part not in obj:
            return None
        obj = obj[part]
    return None if obj is None else str(obj)


def field_selector(text: str) -> Callable[[dict], bool]:
    """Compile a field selector (`a.b=x`, `a.b!=x`, comma-joined) into a predicate over an object."""
    checks: list[Callable[[dict], bool]] = []
    for requirement in _split_selector(text or ""):
        if "!=" in requirement:
            path, value = (s.strip() for s in requirement.split("!=", 1))
            checks.append(lambda obj, p=path, v=value: (_dig(obj, p) or "") != v)
        elif "=" in requirement:
            path, value = (s.strip() for s in requirement.replace("==", "=").split("=", 1))
            checks.append(lambda obj, p=path, v=value: (_dig(obj, p) or "") == v)
        else:
            raise ApiError(400, "BadRequest", f"invalid field selector: {requirement!r}")
    return lambda obj: all(check(obj) for check in checks)


# ---------------------------------------------------------------------------------------------------
# Patches

def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch (also used for strategic merge patches: lists are replaced).
    Untouched subtrees are shared with `target`, which is never modified."""
    if not isinstance(patch, dict):
        return patch
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


# ---------------------------------------------------------------------------------------------------
# Custom resource schemas: defaulting, pruning of unknown fields, validation

def _apply_defaults(obj: Any, schema: dict) -> None:
    if isinstance(obj, dict) and schema.get("type") == "object":
        for name, sub in (schema.get("properties") or {}).items():
            if name not in obj and "default" in sub:
                obj[name] = copy.deepcopy(sub["default"])
            if name in obj:
                _apply_defaults(obj[name], sub)
        extra = schema.get("additionalProperties")
        if isinstance(extra, dict):
            for name, value in obj.items():
                if name not in (schema.get("properties") or {}):
                    _apply_defaults(value, extra)
    elif isinstance(obj, list) and isinstance(schema.get("items"), dict):
        for item in obj:
            _apply_defaults(item, schema["items"])


def _unknown_fields(obj: Any, schema: dict, path: str) -> Iterator[str]:
    """Paths of fields the schema does not declare (a real server prunes or, if strict, refuses)."""
    if schema.get("x-kubernetes-preserve-unknown-fields") or schema.get("x-kubernetes-int-or-string"):
        return
    if isinstance(obj, dict) and schema.get("type") == "object":
        properties = schema.get("properties") or {}
        extra = schema.get("additionalProperties")
        for name, value in obj.items():
            child = f"{path}.{name}" if path else name
            if name in properties:
                yield from _unknown_fields(value, properties[name], child)
            elif isinstance(extra, dict):
                yield from _unknown_fields(value, extra, child)
            elif extra is not True:
                yield child
    elif isinstance(obj, list) and isinstance(schema.get("items"), dict):
        for index, item in enumerate(obj):
            yield from _unknown_fields(item, schema["items"], f"{path}[{index}]")


def _prune(obj: Any, unknown: list[str]) -> None:
    for path in unknown:
        parts = re.findall(r"[^.\[\]]+|\[\d+\]", path)
        target = obj
        for part in parts[:-1]:
            target = target[int(part[1:-1])] if part.startswith("[") else target[part]
        target.pop(parts[-1], None)


def _to_jsonschema(schema: Any) -> Any:
    """OpenAPI v3 -> JSON Schema: `nullable` and int-or-string become type unions."""
    if isinstance(schema, list):
        return [_to_jsonschema(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: _to_jsonschema(value) for key, value in schema.items() if not key.startswith("x-kubernetes")}
    if schema.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    for bound in ("Minimum", "Maximum"):  # OpenAPI 3.0's boolean exclusive bounds -> numeric ones
        if out.get(f"exclusive{bound}") is True and bound.lower() in out:
            out[f"exclusive{bound}"] = out.pop(bound.lower())
        elif out.get(f"exclusive{bound}") is False:
            out.pop(f"exclusive{bound}")
    if out.pop("nullable", False) and "type" in out:
        out["type"] = [out["type"], "null"]
    return out


def _json_path(error: jsonschema.ValidationError) -> str:
    path = ""
    for part in error.absolute_path:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path or "<root>"


def _age(timestamp: str | None) -> str | None:
    if not timestamp:
        return None
    seconds = int((dt.datetime.now(dt.UTC) - dt.datetime.fromisoformat(timestamp.replace("Z", "+00:00")))
                  .total_seconds())
    for unit, size, limit in (("s", 1, 120), ("m", 60, 120 * 60), ("h", 3600, 48 * 3600)):
        if seconds < limit:
            return f"{max(seconds, 0) // size}{unit}"
    return f"{seconds // 86400}d"


def _table(rtype: ResourceType, objs: list[dict], query) -> dict:
    """The `Table` kubectl asks for (`Accept: ...;as=Table`): Name plus the CRD's printer columns."""
    printer = rtype.printer_columns or ({"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},)
    columns = [{"name": "Name", "type": "string", "format": "name", "priority": 0,
                "description": "Name must be unique within a namespace."}]
    columns += [{"name": c["name"], "type": c.get("type", "string"), "format": c.get("format", ""),
                 "description": c.get("description", ""), "priority": c.get("priority", 0)} for c in printer]
    rows = []
    for obj in objs:
        cells: list[Any] = [obj["metadata"]["name"]]
        for column in printer:
            value = _dig(obj, column["jsonPath"].lstrip("."))
            cells.append(_age(value) if column.get("type") == "date" else value)
        partial = obj if query.get("includeObject") == "Object" else {
            "kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1", "metadata": obj["metadata"]}
        rows.append({"cells": cells, "object": partial})
    return {"kind": "Table", "apiVersion": "meta.k8s.io/v1", "metadata": {"resourceVersion": ""},
            "columnDefinitions": columns, "rows": rows}


def _fold_string_data(rtype: ResourceType, obj: dict) -> None:
    """A Secret's `stringData` is write-only: the API server stores it base64-encoded in `data`."""
    if rtype.kind == "Secret" and obj.get("stringData"):
        obj["data"] = {**(obj.get("data") or {}), **{key: base64.b64encode(str(value).encode()).decode()
                                                     for key, value in obj.pop("stringData").items()}}


def _entries_after(log: collections.deque, position: int) -> list:
    """The log entries newer than `position` (resourceVersions grow along the log), oldest first."""
    newer = []
    for entry in reversed(log):
        if entry[0] <= position:
            break
        newer.append(entry)
    newer.reverse()
    return newer


# ---------------------------------------------------------------------------------------------------
# The server

@attrs.define(kw_only=True)
class ApiServer(kmock.KubernetesEmulator):
    """kmock's emulator answering like a Kubernetes API server (see the module docstring)."""

    types: dict[tuple[str, str], ResourceType] = attrs.field(factory=dict)
    request_counts: collections.Counter = attrs.field(factory=collections.Counter)
    created_at: dict = attrs.field(factory=dict)  # (plural, namespace, name) -> time.time() of create
    journal: list | None = attrs.field(default=None)  # set to [] to record (time, agent, verb, path) per request
    faults: list = attrs.field(factory=list)  # fail_next(): [verb, plural, match, error, times left]
    _rv: int = attrs.field(default=1)
    _event_log: dict = attrs.field(factory=lambda: collections.defaultdict(
        lambda: collections.deque(maxlen=EVENT_LOG_SIZE)))
    _signals: dict = attrs.field(factory=dict)  # resource key -> asyncio.Event set on its next change
    _index: dict = attrs.field(factory=lambda: collections.defaultdict(dict))  # resource -> {(ns, name): key}

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        for rtype in BUILTIN_TYPES:
            self.register(copy.copy(rtype))

    # -- registry ---------------------------------------------------------------------------------
    def register(self, rtype: ResourceType) -> None:
        self.types[rtype.key] = rtype
        self.resources[f"{rtype.api_version}/{rtype.plural}"] = kmock.ResourceInfo(
            kind=rtype.kind, namespaced=rtype.namespaced, singular=rtype.singular, verbs=VERBS,
            shortnames=rtype.short_names, subresources={"status"} if rtype.status_subresource else set())

    def _register_crd(self, crd: dict) -> None:
        spec = crd.get("spec", {})
        names = spec.get("names", {})
        versions = [v for v in spec.get("versions", []) if v.get("served", True)]
        version = next((v for v in versions if v.get("storage")), versions[0] if versions else None)
        if version is None:
            return
        self.register(ResourceType(
            group=spec.get("group", ""), version=version["name"], plural=names.get("plural", ""),
            kind=names.get("kind", ""), namespaced=spec.get("scope", "Namespaced") == "Namespaced",
            singular=names.get("singular", ""), short_names=tuple(names.get("shortNames", [])),
            status_subresource="status" in (version.get("subresources") or {}),
            schema=(version.get("schema") or {}).get("openAPIV3Schema"),
            printer_columns=tuple(version.get("additionalPrinterColumns") or ())))

    # -- fault injection (tests) ------------------------------------------------------------------
    def fail_next(self, verb: str, plural: str, error: ApiError, *, times: int = 1,
                  match: Callable[[dict], bool] | None = None) -> None:
        """Answer the next `times` `verb` requests on `plural` (whose JSON body satisfies `match`, if
        given) with `error` instead of serving them. Call it in the server's loop (KubeApi.call)."""
        self.faults.append([verb, plural, match, error, times])

    def _injected_fault(self, verb: str, plural: str, body: bytes) -> ApiError | None:
        for fault in self.faults:
            fault_verb, fault_plural, match, error, left = fault
            if left <= 0 or (fault_verb, fault_plural) != (verb, plural):
                continue
            if match is not None:
                try:
                    parsed = json.loads(body or b"null")
                except ValueError:
                    parsed = None
                if not isinstance(parsed, dict) or not match(parsed):
                    continue
            fault[4] = left - 1
            return error
        return None

    # -- store helpers ----------------------------------------------------------------------------
    def _key(self, rtype: ResourceType, namespace: str | None, name: str) -> tuple:
        return (rtype.kmock_resource(), namespace if rtype.namespaced else None, name)

    def _get(self, rtype: ResourceType, namespace: str | None, name: str) -> dict | None:
        key = self._key(rtype, namespace, name)
        if key not in self.objects or self.objects[key].deleted:
            return None
        return self.objects[key].raw  # a fresh top level; nested values are shared and never mutated

    def _iter(self, rtype: ResourceType, namespace: str | None) -> Iterator[dict]:
        for (ns, _name), key in list(self._index[rtype.key].items()):
            obj = self.objects[key]
            if not obj.deleted and (namespace is None or ns == namespace):
                yield obj.raw

    def _next_rv(self) -> str:
        self._rv += 1
        return str(self._rv)

    def _notify(self, rtype: ResourceType, kind: str, obj: dict) -> None:
        self._event_log[rtype.key].append((int(obj["metadata"]["resourceVersion"]), kind, obj))
        signal = self._signals.pop(rtype.key, None)
        if signal is not None:
            signal.set()

    def _store(self, rtype: ResourceType, obj: dict, event: str) -> dict:
        meta = obj["metadata"]
        meta["resourceVersion"] = self._next_rv()
        key = self._key(rtype, meta.get("namespace"), meta["name"])
        if key in self.objects:
            if self.objects[key].deleted:
                self.objects[key].create(obj)
            else:
                self.objects[key].history.append(obj)
        else:
            self.objects[key] = obj
        self._index[rtype.key][(key[1], key[2])] = key
        self._notify(rtype, event, obj)
        return obj

    def _remove(self, rtype: ResourceType, obj: dict) -> dict:
        meta = obj["metadata"]
        key = self._key(rtype, meta.get("namespace"), meta["name"])
        self.objects[key].delete()
        obj = {**obj, "metadata": {**obj["metadata"], "resourceVersion": self._next_rv()}}
        self._notify(rtype, "DELETED", obj)
        if rtype.plural == "customresourcedefinitions":
            self._unregister_crd(obj)
        self._collect_garbage(obj["metadata"].get("uid"))
        return obj

    def _unregister_crd(self, crd: dict) -> None:
        spec = crd.get("spec", {})
        self.types.pop((spec.get("group", ""), spec.get("names", {}).get("plural", "")), None)

    def _collect_garbage(self, owner_uid: str | None) -> None:
        """Delete every object owned by the deleted one (cascading, like background propagation)."""
        if not owner_uid:
            return
        for rtype in list(self.types.values()):
            for obj in list(self._iter(rtype, None)):
                owners = obj.get("metadata", {}).get("ownerReferences") or []
                if any(ref.get("uid") == owner_uid for ref in owners):
                    self._delete_object(rtype, obj)

    def _delete_object(self, rtype: ResourceType, obj: dict) -> dict:
        obj = {**obj, "metadata": dict(obj["metadata"])}
        meta = obj["metadata"]
        if meta.get("finalizers"):
            if not meta.get("deletionTimestamp"):
                meta["deletionTimestamp"] = now_iso()
                return self._store(rtype, obj, "MODIFIED")
            return obj
        return self._remove(rtype, obj)

    # -- validation -------------------------------------------------------------------------------
    def _admit(self, rtype: ResourceType, obj: dict, strict: bool, old: dict | None = None) -> None:
        """Default, prune and validate a custom object against its CRD schema, CEL rules and list
        keys (transition rules against `old` on an update), like the API server."""
        if rtype.plural == "customresourcedefinitions":
            return
        if not rtype.schema:
            return
        schema = rtype.schema
        body = copy.deepcopy({k: v for k, v in obj.items() if k not in ("apiVersion", "kind", "metadata")})
        _apply_defaults(body, schema)
        unknown = [path for path in _unknown_fields(body, schema, "")]
        name = obj.get("metadata", {}).get("name", "")
        title = f'{rtype.kind}.{rtype.group} "{name}" is invalid' if rtype.group else f'{rtype.kind} "{name}"'
        if unknown and strict:
            raise ApiError(422, "Invalid", f'{title}: unknown field "{unknown[0]}"',
                           {"name": name, "group": rtype.group, "kind": rtype.kind,
                            "causes": [{"reason": "FieldValueInvalid", "field": path,
                                        "message": f'unknown field "{path}"'} for path in unknown]})
        _prune(body, unknown)
        validator = jsonschema.Draft7Validator(_to_jsonschema(
            {**schema, "properties": {k: v for k, v in (schema.get("properties") or {}).items()
                                      if k not in ("apiVersion", "kind", "metadata")}}))
        errors = sorted(validator.iter_errors(body), key=lambda e: list(e.absolute_path))
        causes = [{"reason": "FieldValueInvalid", "field": _json_path(e),
                   "message": f"Invalid value: {json.dumps(e.instance)[:80]}: {e.message}"}
                  for e in errors]
        if not errors:
            old_body = {k: v for k, v in (old or {}).items() if k not in ("apiVersion", "kind", "metadata")}
            found = (crd_rules.violations(schema, body, path="") if old is None
                     else crd_rules.violations(schema, body, old_body, path=""))
            causes = [{"reason": "FieldValueInvalid", "field": v.path.lstrip("."), "message": v.detail}
                      for v in found]
        if causes:
            summary = "; ".join(f"{c['field']}: {c['message']}" for c in causes)
            raise ApiError(422, "Invalid", f"{title}: {summary}",
                           {"name": name, "group": rtype.group, "kind": rtype.kind, "causes": causes})
        for key in list(obj):
            if key not in ("apiVersion", "kind", "metadata"):
                del obj[key]
        obj.update(body)

    # -- HTTP -------------------------------------------------------------------------------------
    async def __call__(self, raw: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        # Replaces kmock's own request parsing, which fails on paths like /api/v1/namespaces.
        body = await raw.read()
        path = raw.path.rstrip("/") or "/"
        agent = raw.headers.get("User-Agent", "").split("/")[0].split(" ")[0] or "unknown"
        try:
            return await self._route(raw, body, path, agent)
        except ApiError as error:
            return aiohttp.web.json_response(error.status(), status=error.code)
        except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException) as error:
            # A failed JSON-patch `test` (Kopf's optimistic lock on resourceVersion) is a 422, as in k8s.
            return aiohttp.web.json_response(
                ApiError(422, "Invalid", f"the JSON patch could not be applied: {error}").status(), status=422)
        except ValueError as error:
            return aiohttp.web.json_response(
                ApiError(400, "BadRequest", f"invalid request body: {error}").status(), status=400)

    async def _route(self, raw, body: bytes, path: str, agent: str) -> aiohttp.web.StreamResponse:
        if path in ("/version", "/api", "/apis", "/") or path.startswith("/openapi"):
            self.request_counts[(agent, "discovery", path)] += 1
            return self._discovery(path)
        parsed = self._parse_path(path)
        if parsed is None:
            self.request_counts[(agent, "discovery", path)] += 1
            return self._discovery(path)
        rtype, namespace, name, subresource = parsed
        query = raw.query
        method = raw.method
        watch = query.get("watch", "").lower() in ("true", "1")
        verb = ("watch" if watch else "list" if name is None else "get") if method == "GET" else {
            "POST": "create", "PATCH": "patch", "PUT": "update", "DELETE": "delete"}.get(method, method)
        self.request_counts[(agent, verb, rtype.plural + (f"/{subresource}" if subresource else ""))] += 1
        if self.journal is not None:
            self.journal.append((time.time(), agent, verb, raw.path_qs))
        if self.faults and (fault := self._injected_fault(verb, rtype.plural, body)) is not None:
            raise fault
        if "protobuf" in raw.headers.get("Content-Type", "") and body:
            # kubectl's typed generators (`kubectl create namespace/secret ...`) send protobuf.
            raise ApiError(415, "UnsupportedMediaType", "the test API server reads JSON bodies only; "
                           "use `kubectl apply -f` / `kubectl create -f` with a manifest")
        if method == "GET" and watch:
            return await self._watch(raw, rtype, namespace, name, query)
        as_table = "as=Table" in raw.headers.get("Accept", "")
        if method == "GET" and name is None:
            listing = self._list(rtype, namespace, query)
            return aiohttp.web.json_response(_table(rtype, listing["items"], query) if as_table else listing)
        if method == "GET":
            obj = self._fetch(rtype, namespace, name)
            return aiohttp.web.json_response(_table(rtype, [obj], query) if as_table else obj)
        if method == "POST" and name is None:
            return aiohttp.web.json_response(
                self._create(rtype, namespace, json.loads(body or b'null'), strict=query.get("fieldValidation") == "Strict"),
                status=201)
        if method in ("PATCH", "PUT") and name is not None:
            content_type = raw.headers.get("Content-Type", "application/merge-patch+json").split(";")[0]
            if content_type == "application/apply-patch+yaml" and subresource is None \
                    and self._get(rtype, namespace, name) is None:
                # Server-side apply creates what does not exist yet (field management is not kept).
                applied = yaml.safe_load(body) or {}
                applied.setdefault("metadata", {})["name"] = name
                return aiohttp.web.json_response(
                    self._create(rtype, namespace, applied, strict=query.get("fieldValidation") == "Strict"),
                    status=201)
            return aiohttp.web.json_response(self._update(
                rtype, namespace, name, subresource, method, content_type, body,
                strict=query.get("fieldValidation") == "Strict"))
        if method == "DELETE" and name is not None:
            return aiohttp.web.json_response(self._delete(rtype, namespace, name))
        raise ApiError(405, "MethodNotAllowed", f"{method} is not supported on {path}")

    def _parse_path(self, path: str) -> tuple[ResourceType, str | None, str | None, str | None] | None:
        parts = path.strip("/").split("/")
        if parts[0] == "api" and len(parts) >= 2:
            group, version, rest = "", parts[1], parts[2:]
        elif parts[0] == "apis" and len(parts) >= 3:
            group, version, rest = parts[1], parts[2], parts[3:]
        else:
            return None
        if not rest:
            return None
        namespace = None
        if rest[0] == "namespaces" and len(rest) >= 3 and (group, rest[2]) in self.types \
                and self.types[(group, rest[2])].namespaced:
            namespace, rest = rest[1], rest[2:]
        rtype = self.types.get((group, rest[0]))
        if rtype is None or rtype.version != version:
            raise ApiError(404, "NotFound", f"the server could not find the requested resource ({path})")
        name = rest[1] if len(rest) > 1 else None
        subresource = "/".join(rest[2:]) or None
        return rtype, namespace, name, subresource

    def _not_found(self, rtype: ResourceType, name: str) -> ApiError:
        resource = f"{rtype.plural}.{rtype.group}" if rtype.group else rtype.plural
        return ApiError(404, "NotFound", f'{resource} "{name}" not found',
                        {"name": name, "group": rtype.group, "kind": rtype.plural})

    def _list(self, rtype: ResourceType, namespace: str | None, query) -> dict:
        labels = label_selector(query.get("labelSelector", ""))
        fields = field_selector(query.get("fieldSelector", ""))
        items = [obj for obj in self._iter(rtype, namespace)
                 if labels(obj.get("metadata", {}).get("labels") or {}) and fields(obj)]
        for item in items:
            item.setdefault("apiVersion", rtype.api_version)
            item.setdefault("kind", rtype.kind)
        return {"apiVersion": rtype.api_version, "kind": f"{rtype.kind}List",
                "metadata": {"resourceVersion": str(self._rv)}, "items": items}

    def _fetch(self, rtype: ResourceType, namespace: str | None, name: str) -> dict:
        obj = self._get(rtype, namespace, name)
        if obj is None:
            raise self._not_found(rtype, name)
        return obj

    def _create(self, rtype: ResourceType, namespace: str | None, body: Any, strict: bool) -> dict:
        if not isinstance(body, dict):
            raise ApiError(400, "BadRequest", "the body of the request is not a JSON object")
        obj = dict(body)  # parsed from this request's JSON: nothing else holds it
        meta = obj["metadata"] = dict(obj.get("metadata") or {})
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = meta["generateName"] + uuid.uuid4().hex[:5]
        if not meta.get("name"):
            raise ApiError(422, "Invalid", f"{rtype.kind} is invalid: metadata.name: Required value: "
                           "name or generateName is required",
                           {"kind": rtype.kind, "causes": [{"reason": "FieldValueRequired",
                                                            "field": "metadata.name"}]})
        if rtype.namespaced:
            meta["namespace"] = namespace or meta.get("namespace") or "default"
        else:
            meta.pop("namespace", None)
        if self._get(rtype, meta.get("namespace"), meta["name"]) is not None:
            resource = f"{rtype.plural}.{rtype.group}" if rtype.group else rtype.plural
            raise ApiError(409, "AlreadyExists", f'{resource} "{meta["name"]}" already exists',
                           {"name": meta["name"], "group": rtype.group, "kind": rtype.plural})
        obj["apiVersion"], obj["kind"] = rtype.api_version, rtype.kind
        _fold_string_data(rtype, obj)
        self._admit(rtype, obj, strict)
        meta.update(uid=str(uuid.uuid4()), creationTimestamp=now_iso(), generation=1)
        self.created_at[(rtype.plural, meta.get("namespace"), meta["name"])] = time.time()
        meta.pop("deletionTimestamp", None)
        if rtype.status_subresource and rtype.schema:
            obj.pop("status", None)  # the status subresource ignores status on create
        if rtype.plural == "customresourcedefinitions":
            self._register_crd(obj)
            obj["status"] = {"conditions": [{"type": "Established", "status": "True"}],
                             "acceptedNames": obj.get("spec", {}).get("names", {})}
        return self._store(rtype, obj, "ADDED")

    def _update(self, rtype, namespace, name, subresource, method, content_type, body: bytes,
                strict: bool) -> dict:
        current = self._get(rtype, namespace, name)
        if current is None:
            raise self._not_found(rtype, name)
        if subresource not in (None, "status"):
            raise ApiError(404, "NotFound", f"subresource {subresource!r} is not served")
        if method == "PUT":
            new = json.loads(body)
        elif content_type == "application/json-patch+json":
            new = jsonpatch.apply_patch(current, json.loads(body))
        elif content_type == "application/apply-patch+yaml":
            new = merge_patch(current, yaml.safe_load(body))
        else:  # merge-patch and strategic-merge-patch (lists replaced: enough for these tests)
            new = merge_patch(current, json.loads(body))
        if not isinstance(new, dict):
            raise ApiError(400, "BadRequest", "the patched object is not a JSON object")
        expected_rv = (new.get("metadata") or {}).get("resourceVersion")
        if method == "PUT" and expected_rv and expected_rv != current["metadata"]["resourceVersion"]:
            raise ApiError(409, "Conflict", f'Operation cannot be fulfilled on {rtype.plural} "{name}": '
                           "the object has been modified; please apply your changes to the latest "
                           "version and try again", {"name": name, "kind": rtype.plural})
        if rtype.status_subresource:
            if subresource == "status":  # only the status changes through /status
                new = {**current, "status": new.get("status")}
                if new["status"] is None:
                    new.pop("status")
            elif "status" in current:
                new["status"] = current["status"]
            else:
                new.pop("status", None)
        # Identity and server-owned metadata are kept whatever the client sent.
        meta = new["metadata"] = dict(new.get("metadata") or {})
        for key in ("uid", "creationTimestamp", "namespace", "name", "generation", "deletionTimestamp"):
            if key in current["metadata"]:
                meta[key] = current["metadata"][key]
            else:
                meta.pop(key, None)
        new["apiVersion"], new["kind"] = rtype.api_version, rtype.kind
        _fold_string_data(rtype, new)
        if subresource != "status":
            self._admit(rtype, new, strict, old=current)
        spec_changed = {k: v for k, v in new.items() if k not in ("metadata", "status")} != \
            {k: v for k, v in current.items() if k not in ("metadata", "status")}
        if spec_changed and rtype.plural not in ("events",):
            meta["generation"] = int(current["metadata"].get("generation", 1)) + 1
        new["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"]
        if new == current:
            return current  # no-op: no new resourceVersion, no watch event (like the real server)
        if meta.get("deletionTimestamp") and not meta.get("finalizers"):
            new["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"]
            return self._remove(rtype, new)
        if rtype.plural == "customresourcedefinitions":
            self._register_crd(new)
        return self._store(rtype, new, "MODIFIED")

    def _delete(self, rtype: ResourceType, namespace: str | None, name: str) -> dict:
        current = self._get(rtype, namespace, name)
        if current is None:
            raise self._not_found(rtype, name)
        return self._delete_object(rtype, current)

    async def _watch(self, raw, rtype: ResourceType, namespace, name, query) -> aiohttp.web.StreamResponse:
        labels = label_selector(query.get("labelSelector", ""))
        fields = field_selector(query.get("fieldSelector", "") + (f",metadata.name={name}" if name else ""))
        timeout = float(query.get("timeoutSeconds") or 1800)
        since = query.get("resourceVersion") or ""
        response = aiohttp.web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(raw)

        def visible(obj: dict) -> bool:
            meta = obj.get("metadata", {})
            return ((namespace is None or meta.get("namespace") == namespace)
                    and labels(meta.get("labels") or {}) and fields(obj))

        async def send(kind: str, obj: dict) -> None:
            await response.write(json.dumps({"type": kind, "object": obj}).encode() + b"\n")

        log = self._event_log[rtype.key]
        initial_events = query.get("sendInitialEvents", "").lower() == "true"
        if since in ("", "0") or initial_events:  # the current objects first, as ADDED
            position = self._rv
            for obj in list(self._iter(rtype, namespace)):
                if visible(obj):
                    await send("ADDED", obj)
            if initial_events:  # streaming lists (client-go's WatchList) wait for this bookmark
                await send("BOOKMARK", {"apiVersion": rtype.api_version, "kind": rtype.kind, "metadata": {
                    "resourceVersion": str(position), "annotations": {"k8s.io/initial-events-end": "true"}}})
        else:
            position = int(since) if since.isdigit() else 0
            if log and log[0][0] > position + 1 and len(log) == log.maxlen:
                await send("ERROR", ApiError(410, "Expired", f"too old resource version: {since}").status())
                return response
        deadline = asyncio.get_running_loop().time() + timeout
        try:
            while True:
                signal = self._signals.setdefault(rtype.key, asyncio.Event())
                for rv, kind, obj in _entries_after(log, position):
                    position = rv
                    if visible(obj):
                        await send(kind, obj)
                remaining = deadline - asyncio.get_running_loop().time()
                if remaining <= 0:
                    break
                if not signal.is_set():  # set if a change came while sending
                    try:
                        await asyncio.wait_for(signal.wait(), timeout=remaining)
                    except TimeoutError:
                        pass
        except (ConnectionResetError, ConnectionError, asyncio.CancelledError):
            return response
        return response

    def _discovery(self, path: str) -> aiohttp.web.StreamResponse:
        if path == "/version":
            body: dict = {"major": "1", "minor": "31", "gitVersion": "v1.31.0", "platform": "linux/amd64"}
        elif path == "/api":
            body = {"kind": "APIVersions", "versions": ["v1"],
                    "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": "127.0.0.1"}]}
        elif path == "/apis":
            groups: dict[str, list[str]] = {}
            for rtype in self.types.values():
                if rtype.group and rtype.version not in groups.setdefault(rtype.group, []):
                    groups[rtype.group].append(rtype.version)
            body = {"kind": "APIGroupList", "apiVersion": "v1", "groups": [
                {"name": group, "versions": [{"groupVersion": f"{group}/{v}", "version": v} for v in versions],
                 "preferredVersion": {"groupVersion": f"{group}/{versions[0]}", "version": versions[0]}}
                for group, versions in sorted(groups.items())]}
        elif path == "/":
            body = {"paths": sorted({"/api", "/api/v1", "/apis", "/version"}
                                    | {f"/apis/{t.group}/{t.version}" for t in self.types.values() if t.group})}
        elif re.fullmatch(r"/api/[^/]+|/apis/[^/]+/[^/]+", path):
            group_version = path.split("/", 2)[2]
            group, _, version = group_version.rpartition("/")
            types = [t for t in self.types.values() if t.group == group and t.version == version]
            if not types:
                return aiohttp.web.json_response(ApiError(404, "NotFound", f"{path} not found").status(),
                                                 status=404)
            resources = []
            for t in types:
                entry = {"name": t.plural, "singularName": t.singular, "namespaced": t.namespaced,
                         "kind": t.kind, "verbs": VERBS, "shortNames": list(t.short_names)}
                resources.append(entry)
                if t.status_subresource:
                    resources.append({"name": f"{t.plural}/status", "singularName": "", "namespaced": t.namespaced,
                                      "kind": t.kind, "verbs": ["get", "patch", "update"]})
            body = {"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": group_version,
                    "resources": resources}
        elif re.fullmatch(r"/apis/[^/]+", path):
            group = path.split("/")[2]
            versions = sorted({t.version for t in self.types.values() if t.group == group})
            if not versions:
                return aiohttp.web.json_response(ApiError(404, "NotFound", f"{path} not found").status(),
                                                 status=404)
            body = {"kind": "APIGroup", "apiVersion": "v1", "name": group,
                    "versions": [{"groupVersion": f"{group}/{v}", "version": v} for v in versions],
                    "preferredVersion": {"groupVersion": f"{group}/{versions[0]}", "version": versions[0]}}
        elif path == "/openapi/v3":
            body = {"paths": {gv.lstrip("/"): {"serverRelativeURL": f"/openapi/v3{gv}?hash={self._rv}"}
                              for gv in self._group_version_paths()}}
        elif path.startswith("/openapi/v3/") and path[len("/openapi/v3"):] in self._group_version_paths():
            body = self._openapi_group_version(path[len("/openapi/v3"):])
        else:  # /openapi/v2 and anything else: not served
            return aiohttp.web.json_response(ApiError(404, "NotFound", f"{path} not found").status(),
                                             status=404)
        return aiohttp.web.json_response(body)


    def _group_version_paths(self) -> set[str]:
        return {f"/apis/{t.group}/{t.version}" if t.group else f"/api/{t.version}" for t in self.types.values()}

    def _openapi_group_version(self, gv_path: str) -> dict:
        """A minimal OpenAPI v3 document: PATCH operations that accept `fieldValidation`, which is
        what kubectl looks for before it lets the server validate (instead of downloading schemas)."""
        paths = {}
        for t in self.types.values():
            if (f"/apis/{t.group}/{t.version}" if t.group else f"/api/{t.version}") != gv_path:
                continue
            scope = "/namespaces/{namespace}" if t.namespaced else ""
            operation = {"x-kubernetes-group-version-kind": {"group": t.group, "version": t.version, "kind": t.kind},
                         "parameters": [{"name": "fieldValidation", "in": "query", "schema": {"type": "string"}}],
                         "responses": {"200": {"description": "OK"}}}
            paths[f"{gv_path}{scope}/{t.plural}/{{name}}"] = {"patch": operation}
        return {"openapi": "3.0.0", "info": {"title": "Kubernetes", "version": "v1.31.0"}, "paths": paths,
                "components": {"schemas": {}}}


# ---------------------------------------------------------------------------------------------------
# Running it in a background thread

@dataclass
class KubeApi:
    """A running API server: its URL, a kubeconfig file, and clients."""

    server: ApiServer
    url: str
    kubeconfig: Path
    loop: asyncio.AbstractEventLoop
    _thread: threading.Thread | None = field(default=None, repr=False)
    _stop: Callable[[], None] | None = field(default=None, repr=False)

    def api_client(self):
        """A fresh `kubernetes.client.ApiClient` talking to this server."""
        import kubernetes

        config = kubernetes.client.Configuration()
        config.host = self.url
        return kubernetes.client.ApiClient(config)

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run `fn` inside the server's event loop (safe access to `server.objects`)."""
        async def wrapper():
            return fn()
        return asyncio.run_coroutine_threadsafe(wrapper(), self.loop).result(timeout=30)

    def objects(self, api_version: str, plural: str, namespace: str | None = None) -> list[dict]:
        group, _, version = api_version.rpartition("/")
        rtype = self.server.types[(group, plural)]
        return self.call(lambda: [copy.deepcopy(o) for o in self.server._iter(rtype, namespace)])

    def requests(self) -> collections.Counter:
        return self.call(lambda: collections.Counter(self.server.request_counts))

    def load_crd(self, path: Path = CRD_FILE) -> dict:
        """Create (or replace) a CustomResourceDefinition from a YAML file, registering its resource."""
        crd = yaml.safe_load(path.read_text())
        rtype = self.server.types[("apiextensions.k8s.io", "customresourcedefinitions")]

        def apply():
            existing = self.server._get(rtype, None, crd["metadata"]["name"])
            if existing is not None:
                self.server._remove(rtype, existing)
            return self.server._create(rtype, None, crd, strict=False)
        return self.call(apply)

    def stop(self) -> None:
        if self._stop:
            self._stop()


def start_kube_api(workdir: Path, *, load_crd: bool = True) -> KubeApi:
    """Start the API server on a free port in a daemon thread; write `workdir/kubeconfig`."""
    ready = threading.Event()
    state: dict[str, Any] = {}

    async def serve():
        server = ApiServer()
        async with server, kmock.Server(server) as http:
            stop = asyncio.Event()
            state.update(server=server, url=str(http.url).rstrip("/"), loop=asyncio.get_running_loop(),
                         stop=stop)
            rtype_ns = server.types[("", "namespaces")]
            for name in ("default", "kube-system"):
                server._create(rtype_ns, None, {"metadata": {"name": name}}, strict=False)
            ready.set()
            await stop.wait()

    def run():
        try:
            asyncio.run(serve())
        except BaseException as error:  # surfaced to the caller waiting on `ready`
            state["error"] = error
            ready.set()

    thread = threading.Thread(target=run, name="kube-api", daemon=True)
    thread.start()
    if not ready.wait(30) or "error" in state:
        raise RuntimeError(f"the test API server did not start: {state.get('error')!r}")
    kubeconfig = workdir / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "test",
        "clusters": [{"name": "test", "cluster": {"server": state["url"]}}],
        "users": [{"name": "test", "user": {"token": "test"}}],
        "contexts": [{"name": "test", "context": {"cluster": "test", "user": "test", "namespace": "default"}}],
    }))
    loop = state["loop"]
    api = KubeApi(server=state["server"], url=state["url"], kubeconfig=kubeconfig, loop=loop,
                  _thread=thread, _stop=lambda: loop.call_soon_threadsafe(state["stop"].set))
    if load_crd and CRD_FILE.exists():
        api.load_crd()
    return api


@pytest.fixture(scope="session")
def kube_api(tmp_path_factory):
    """The test Kubernetes API server (shared by the session), with the MoTRun CRD when present."""
    api = start_kube_api(tmp_path_factory.mktemp("kube"))
    yield api
    api.stop()
    api._thread.join(timeout=10)
