"""The Helm chart, rendered with Helm's own Go SDK (helm-python-sdk) for the default values and for the
non-default modes: lint clean in strict mode, every built-in manifest valid for each Kubernetes
version we claim (kubernetes-validate), Prometheus Operator objects of the right shape, the values
schema refusing bad values, and the Deployment/RBAC following docs/architecture.md."""

from __future__ import annotations

import re

import jsonschema
import kubernetes_validate
import pytest
import yaml
from support.deploy import (
    CHART_DIR,
    RELEASE_NAMESPACE,
    REPO,
    VALUES_CASES,
    by_kind,
    load_chart,
    manifests,
    one,
    render_notes,
)

# Chart.yaml claims kubeVersion >=1.28; kubernetes-validate ships schemas up to its own version.
KUBE_VERSIONS = [v for v in sorted(set(kubernetes_validate.utils.all_versions()),
                                   key=lambda v: tuple(map(int, v.split("."))))
                 if tuple(map(int, v.split(".")[:2])) >= (1, 28)]
BUILTIN_GROUPS = {"v1", "apps/v1", "rbac.authorization.k8s.io/v1"}

# The permissions `mot operator` needs (docs/architecture.md, "Operator process"), and no more.
CONTRACT_RULES = {
    ("mot.dev", "motruns"): {"get", "list", "watch", "patch"},
    ("mot.dev", "motruns/status"): {"get", "patch", "update"},
    ("batch", "jobs"): {"get", "list", "watch", "create", "patch", "delete"},
    ("", "pods"): {"get", "list", "watch"},  # watched: termination messages, why a stage waits, Pod IPs
    ("kueue.x-k8s.io", "workloads"): {"get", "list"},  # why Kueue has not admitted a queued Job
    ("", "services"): {"get", "create", "delete"},
    ("", "events"): {"create", "patch"},
}
# Cluster-scoped, so only in the ClusterRole: the GPUs' memory from the nodes' nvidia.com/gpu.memory
# labels (values gpuMemoryFromNodeLabels, default true).
NODE_RULES = {("", "nodes"): {"get", "list"}}
CONTRACT_ENV = {"MOT_WATCH_NAMESPACES", "MOT_DEFAULT_IMAGE", "MOT_DEFAULT_STORAGE_URI",
                "MOT_DEFAULT_STORAGE_ENDPOINT", "MOT_DEFAULT_CREDENTIALS_SECRET", "MOT_METRICS_PORT",
                "MOT_LOG_LEVEL", "MOT_LOG_FORMAT"}


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    return {case: manifests(values) for case, values in VALUES_CASES.items()}


def container(docs: list[dict]) -> dict:
    (operator,) = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"]
    return operator


def env_of(docs: list[dict]) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in container(docs)["env"]}


@pytest.mark.parametrize("case", VALUES_CASES)
def test_lint_strict_is_clean(case):
    import helm_python as helm

    for kube_version in (f"v{KUBE_VERSIONS[0]}", f"v{KUBE_VERSIONS[-1]}"):
        report = helm.lint(CHART_DIR, VALUES_CASES[case], strict=True, namespace=RELEASE_NAMESPACE,
                           kube_version=kube_version)
        assert report["errors"] == [] and report["messages"] == [], report


@pytest.mark.parametrize("case", VALUES_CASES)
def test_builtin_manifests_valid_for_every_supported_kubernetes_version(rendered, case):
    builtin = [doc for doc in rendered[case] if doc["apiVersion"] in BUILTIN_GROUPS]
    assert {doc["kind"] for doc in builtin} >= {"Deployment", "ServiceAccount", "Service"}
    for version in KUBE_VERSIONS:
        for doc in builtin:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as error:
                path = ".".join(map(str, error.path))
                pytest.fail(f"{case}: {doc['kind']}/{doc['metadata']['name']} invalid for Kubernetes "
                            f"{version} at {path}: {error.message}")
    assert all(doc["apiVersion"] in BUILTIN_GROUPS | {"monitoring.coreos.com/v1"} for doc in rendered[case])


def test_supported_versions_cover_the_charts_claim():
    chart = yaml.safe_load((CHART_DIR / "Chart.yaml").read_text())
    assert chart["kubeVersion"] == ">=1.28.0-0"
    assert KUBE_VERSIONS[0] == "1.28.0" and len(KUBE_VERSIONS) >= 6


# Shapes of the Prometheus Operator objects we render (monitoring.coreos.com/v1, the fields we set):
# they are not built into Kubernetes, so kubernetes-validate has no schema for them.
_DURATION = {"type": "string", "pattern": r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?"
                                          r"(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"}
_LABELS = {"type": "object", "additionalProperties": {"type": "string"}}
_SELECTOR = {"type": "object", "additionalProperties": False, "minProperties": 1,
             "properties": {"matchLabels": _LABELS, "matchExpressions": {"type": "array"}}}
_NS_SELECTOR = {"type": "object", "additionalProperties": False,
                "properties": {"any": {"type": "boolean"},
                               "matchNames": {"type": "array", "items": {"type": "string"}, "minItems": 1}}}
_ENDPOINT = {"type": "object", "additionalProperties": False, "required": ["port"],
             "properties": {"port": {"type": "string", "minLength": 1}, "path": {"type": "string"},
                            "interval": _DURATION, "scrapeTimeout": _DURATION}}
_METADATA = {"type": "object", "required": ["name", "namespace", "labels"],
             "properties": {"name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$",
                                     "maxLength": 63},
                            "labels": _LABELS}}


def _object(kind: str, spec: dict) -> dict:
    return {"type": "object", "required": ["apiVersion", "kind", "metadata", "spec"],
            "properties": {"apiVersion": {"const": "monitoring.coreos.com/v1"}, "kind": {"const": kind},
                           "metadata": _METADATA, "spec": spec}}


MONITORING_SHAPES = {
    "ServiceMonitor": _object("ServiceMonitor", {
        "type": "object", "additionalProperties": False, "required": ["selector", "endpoints"],
        "properties": {"selector": _SELECTOR, "namespaceSelector": _NS_SELECTOR,
                       "endpoints": {"type": "array", "minItems": 1, "items": _ENDPOINT}}}),
    "PodMonitor": _object("PodMonitor", {
        "type": "object", "additionalProperties": False, "required": ["selector", "podMetricsEndpoints"],
        "properties": {"selector": _SELECTOR, "namespaceSelector": _NS_SELECTOR,
                       "podMetricsEndpoints": {"type": "array", "minItems": 1, "items": _ENDPOINT}}}),
    "PrometheusRule": _object("PrometheusRule", {
        "type": "object", "additionalProperties": False, "required": ["groups"],
        "properties": {"groups": {"type": "array", "minItems": 1, "items": {
            "type": "object", "additionalProperties": False, "required": ["name", "rules"],
            "properties": {"name": {"type": "string", "minLength": 1}, "rules": {"type": "array", "items": {
                "type": "object", "additionalProperties": False, "required": ["alert", "expr"],
                "properties": {"alert": {"type": "string", "pattern": "^[A-Za-z_][A-Za-z0-9_]*$"},
                               "expr": {"type": "string", "minLength": 1}, "for": _DURATION,
                               "labels": _LABELS, "annotations": _LABELS}}}}}}}}),
}


def test_monitoring_objects_only_when_enabled_and_well_shaped(rendered):
    assert not [d for d in rendered["default"] if d["apiVersion"] == "monitoring.coreos.com/v1"]
    docs = rendered["monitoring"]
    for kind, shape in MONITORING_SHAPES.items():
        doc = one(docs, kind)
        jsonschema.validate(doc, shape)
        assert doc["metadata"]["namespace"] == RELEASE_NAMESPACE
        assert doc["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "Helm"
    service_monitor = one(docs, "ServiceMonitor")
    assert service_monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    service = one(docs, "Service")
    # The ServiceMonitor selects the metrics Service and scrapes its named port.
    assert service_monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert service_monitor["spec"]["endpoints"][0]["port"] == service["spec"]["ports"][0]["name"]


def test_pod_monitor_selects_the_trainer_pods_the_operator_labels():
    from mot_operator import naming

    docs = manifests(VALUES_CASES["monitoring"])
    pod_monitor = one(docs, "PodMonitor")
    selector = pod_monitor["spec"]["selector"]["matchLabels"]
    trainer_labels = naming.job_labels("demo", 1, "sft", 1, teacher="qwq")
    assert selector.items() <= trainer_labels.items(), (selector, trainer_labels)
    assert pod_monitor["spec"]["namespaceSelector"] == {"any": True}
    namespaced = one(manifests({**VALUES_CASES["namespaced"], "metrics": {"podMonitor": {"enabled": True}}}),
                     "PodMonitor")
    assert namespaced["spec"]["namespaceSelector"] == {"matchNames": ["team-a", "team-b"]}


def test_every_resource_carries_the_standard_labels(rendered):
    for case, docs in rendered.items():
        for doc in docs:
            labels = doc["metadata"]["labels"]
            assert labels["app.kubernetes.io/name"] == "mot-operator", (case, doc["kind"])
            assert labels["app.kubernetes.io/instance"] == "mot-operator"
            assert labels["app.kubernetes.io/managed-by"] == "Helm"
            assert labels["app.kubernetes.io/version"] == "0.1.0"
            assert re.fullmatch(r"mot-operator-\d+\.\d+\.\d+", labels["helm.sh/chart"])


def test_deployment_is_one_recreated_hardened_replica(rendered):
    deployment = one(rendered["default"], "Deployment")
    spec = deployment["spec"]
    assert spec["replicas"] == 1 and spec["strategy"] == {"type": "Recreate"}
    pod = spec["template"]["spec"]
    assert spec["selector"]["matchLabels"].items() <= spec["template"]["metadata"]["labels"].items()
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    operator = container(rendered["default"])
    security = operator["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert security["seccompProfile"] == {"type": "RuntimeDefault"}
    # The read-only root needs a writable /tmp.
    assert {"name": "tmp", "mountPath": "/tmp"} in operator["volumeMounts"]
    assert operator["resources"]["requests"] and operator["resources"]["limits"]["memory"]
    ports = {p["name"]: p["containerPort"] for p in operator["ports"]}
    assert ports == {"metrics": 8080}
    assert operator["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert operator["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    assert pod["serviceAccountName"] == one(rendered["default"], "ServiceAccount")["metadata"]["name"]


def test_operator_command_and_env_follow_the_contract(rendered):
    operator = container(rendered["default"])
    assert operator["command"] == ["mot", "operator"]
    assert "args" not in operator
    assert operator["image"] == "ghcr.io/mot-operator/mot-operator:0.1.0"
    env = env_of(rendered["default"])
    assert CONTRACT_ENV <= env.keys()
    assert env["MOT_WATCH_NAMESPACES"] == ""
    assert env["MOT_DEFAULT_IMAGE"] == "ghcr.io/mot-operator/mot-trainer:0.1.0"
    assert env["MOT_METRICS_PORT"] == "8080"
    assert (env["MOT_LOG_LEVEL"], env["MOT_LOG_FORMAT"]) == ("info", "json")
    # Every flag's env var is a plain value: the install test starts the operator with exactly these.
    assert all("valueFrom" not in e for e in operator["env"])


def test_custom_values_reach_the_operator(rendered):
    docs = rendered["custom-image"]
    operator = container(docs)
    assert operator["image"] == "registry.example.com/ml/mot-operator:1.2.3"
    assert operator["args"] == ["--log-level", "debug"]
    env = env_of(docs)
    assert env["MOT_DEFAULT_IMAGE"] == "registry.example.com/ml/mot-trainer@sha256:" + "ab" * 32
    assert env["MOT_DEFAULT_STORAGE_URI"] == "s3://mot-checkpoints/runs"
    assert env["MOT_DEFAULT_STORAGE_ENDPOINT"] == "http://minio.storage:9000"
    assert env["MOT_DEFAULT_CREDENTIALS_SECRET"] == "mot-s3"
    assert (env["MOT_LOG_LEVEL"], env["MOT_LOG_FORMAT"], env["MOT_METRICS_PORT"]) == ("debug", "text", "9090")
    assert env["HTTPS_PROXY"] == "http://proxy:3128"
    assert operator["ports"][0]["containerPort"] == 9090
    deployment = one(docs, "Deployment")
    assert deployment["spec"]["template"]["spec"]["imagePullSecrets"] == [{"name": "regcred"}]
    assert deployment["spec"]["template"]["spec"]["serviceAccountName"] == "mot-controller"
    assert one(docs, "ServiceAccount")["metadata"]["name"] == "mot-controller"
    binding = one(docs, "ClusterRoleBinding")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "mot-controller",
                                    "namespace": RELEASE_NAMESPACE}]


def rules_as_set(rules: list[dict]) -> dict[tuple[str, str], set[str]]:
    granted: dict[tuple[str, str], set[str]] = {}
    for rule in rules:
        assert "*" not in rule["verbs"] and "*" not in rule["resources"] and "*" not in rule["apiGroups"]
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                granted.setdefault((group, resource), set()).update(rule["verbs"])
    return granted


def test_cluster_rbac_grants_exactly_the_contract(rendered):
    docs = rendered["default"]
    assert not by_kind(docs, "Role") and not by_kind(docs, "RoleBinding")
    role = one(docs, "ClusterRole")
    assert rules_as_set(role["rules"]) == CONTRACT_RULES | NODE_RULES
    assert env_of(docs)["MOT_GPU_MEMORY_FROM_NODE_LABELS"] == "true"
    off = manifests({"gpuMemoryFromNodeLabels": False})
    assert rules_as_set(one(off, "ClusterRole")["rules"]) == CONTRACT_RULES
    assert env_of(off)["MOT_GPU_MEMORY_FROM_NODE_LABELS"] == "false"
    binding = one(docs, "ClusterRoleBinding")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                                  "name": role["metadata"]["name"]}
    account = one(docs, "ServiceAccount")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account["metadata"]["name"],
                                    "namespace": RELEASE_NAMESPACE}]


def test_namespaced_mode_has_one_role_per_watched_namespace_and_no_cluster_role(rendered):
    docs = rendered["namespaced"]
    assert not by_kind(docs, "ClusterRole") and not by_kind(docs, "ClusterRoleBinding")
    roles = {r["metadata"]["namespace"]: r for r in by_kind(docs, "Role")}
    bindings = {b["metadata"]["namespace"]: b for b in by_kind(docs, "RoleBinding")}
    assert roles.keys() == bindings.keys() == {"team-a", "team-b"}
    for namespace, role in roles.items():
        assert rules_as_set(role["rules"]) == CONTRACT_RULES
        assert bindings[namespace]["roleRef"]["kind"] == "Role"
        assert bindings[namespace]["subjects"][0]["namespace"] == RELEASE_NAMESPACE
    assert env_of(docs)["MOT_WATCH_NAMESPACES"] == "team-a,team-b"


# Only with jobset.enabled (default false): the JobSets of multi-node branches.
JOBSET_RULES = {("jobset.x-k8s.io", "jobsets"): {"get", "list", "watch", "create", "patch", "delete"}}


def test_jobset_backend_adds_its_rbac_and_turns_on_the_operator_flag(rendered):
    assert env_of(rendered["default"])["MOT_JOBSET"] == "false"
    on = manifests({"jobset": {"enabled": True}})
    assert rules_as_set(one(on, "ClusterRole")["rules"]) == CONTRACT_RULES | NODE_RULES | JOBSET_RULES
    assert env_of(on)["MOT_JOBSET"] == "true"
    namespaced = manifests({"jobset": {"enabled": True}, "watchNamespaces": ["team-a"]})
    assert rules_as_set(one(namespaced, "Role")["rules"]) == CONTRACT_RULES | JOBSET_RULES


def test_rbac_and_service_account_can_be_left_to_the_user():
    docs = manifests({"rbac": {"create": False}, "serviceAccount": {"create": False, "name": "existing"}})
    assert not [d for d in docs if d["apiVersion"].startswith("rbac.")]
    assert not by_kind(docs, "ServiceAccount")
    assert one(docs, "Deployment")["spec"]["template"]["spec"]["serviceAccountName"] == "existing"


def test_dashboard_configmap_carries_the_sidecar_label_and_the_dashboard_file(rendered):
    default = one(rendered["default"], "ConfigMap")
    assert default["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert default["metadata"]["namespace"] == RELEASE_NAMESPACE
    assert default["data"]["mot-operator.json"] == (CHART_DIR / "dashboards" / "mot-operator.json").read_text().rstrip("\n")
    custom = one(rendered["monitoring"], "ConfigMap")
    assert custom["metadata"]["labels"]["grafana_dashboard"] == "mot"
    assert custom["metadata"]["namespace"] == "monitoring"
    assert not by_kind(manifests({"dashboard": {"enabled": False}}), "ConfigMap")


def test_names_fit_kubernetes_limits_for_a_long_release_name():
    long_name = "a-very-long-release-name-for-the-merge-of-thought-op"  # 52 chars: Helm allows 53
    for doc in manifests(VALUES_CASES["monitoring"], name=long_name):
        assert len(doc["metadata"]["name"]) <= 63, doc["metadata"]["name"]
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", doc["metadata"]["name"])


BAD_VALUES = [
    ({"logLevel": "verbose"}, "/logLevel"),
    ({"logFormat": "xml"}, "/logFormat"),
    ({"watchNamespaces": ["Team_A"]}, "/watchNamespaces/0"),
    ({"watchNamespaces": "team-a"}, "/watchNamespaces"),
    ({"metrics": {"port": 70000}}, "/metrics/port"),
    ({"image": {"pullPolicy": "Sometimes"}}, "/image/pullPolicy"),
    ({"image": {"digest": "sha256:nothex"}}, "/image/digest"),
    ({"defaults": {"storage": {"uri": "gs://bucket"}}}, "/defaults/storage/uri"),
    ({"defaults": {"storage": {"endpoint": "minio:9000"}}}, "/defaults/storage/endpoint"),
    ({"alerts": {"noProgress": {"thresholdSeconds": "2h"}}}, "/alerts/noProgress/thresholdSeconds"),
    ({"alerts": {"jobRetries": {"window": "an hour"}}}, "/alerts/jobRetries/window"),
    ({"alerts": {"runFailed": {"severity": "page"}}}, "/alerts/runFailed/severity"),
    ({"replicas": 2}, "replicas"),
    ({"gpuMemoryFromNodeLabels": "yes"}, "/gpuMemoryFromNodeLabels"),
    ({"jobset": {"enabled": "yes"}}, "/jobset/enabled"),
    ({"metrics": {"serviceMonitor": {"enabled": "yes"}}}, "/metrics/serviceMonitor/enabled"),
]


@pytest.mark.parametrize(("values", "field"), BAD_VALUES, ids=[f for _, f in BAD_VALUES])
def test_values_schema_refuses_bad_values_naming_the_field(values, field):
    import helm_python as helm

    with load_chart() as chart, pytest.raises(helm.HelmValuesError) as refused:
        chart.render(values, name="mot-operator", namespace=RELEASE_NAMESPACE)
    assert field in str(refused.value)


def test_values_schema_accepts_every_tested_values_set_and_documents_every_key():
    with load_chart() as chart:
        schema = chart.schema
        for values in VALUES_CASES.values():
            chart.validate_schema(chart.merge_values(values))
        defaults = chart.values

    def check(value, node, path):
        assert "type" in node, f"values.schema.json: {path or '/'} has no type"
        if isinstance(value, dict) and node.get("additionalProperties") is False:
            for key, child in value.items():
                assert key in node["properties"], f"values.yaml key {path}/{key} is not in values.schema.json"
                check(child, node["properties"][key], f"{path}/{key}")

    check(defaults, schema, "")
    values_text = (CHART_DIR / "values.yaml").read_text()
    assert values_text.count("# ") >= 30, "values.yaml must stay commented"


def test_chart_crds_are_a_byte_copy_of_the_top_level_crds():
    top = sorted(p.name for p in (REPO / "crds").glob("*.yaml"))
    chart = sorted(p.name for p in (CHART_DIR / "crds").glob("*.yaml"))
    assert top and top == chart, "run the sync in charts/mot-operator/README.md"
    for name in top:
        assert (CHART_DIR / "crds" / name).read_bytes() == (REPO / "crds" / name).read_bytes(), name
    with load_chart() as loaded:
        # Helm installs these before the templates.
        assert sorted(crd["filename"].rsplit("/", 1)[-1] for crd in loaded.crds) == top


def test_notes_tell_how_to_start_a_run_and_where_to_look():
    notes = render_notes()
    assert "kubectl" in notes and "apply -f examples/" in notes
    example = re.search(r"apply -f (examples/\S+)", notes).group(1)
    assert (REPO / example).is_file(), f"NOTES.txt points at {example}, which does not exist"
    assert "kubectl get motruns" in notes and "kubectl describe motrun" in notes
    assert "spec.storage.uri" in notes  # no default storage: says what a run must set
    assert "spec.storage.uri" not in render_notes(VALUES_CASES["custom-image"])
