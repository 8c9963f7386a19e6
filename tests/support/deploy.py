"""Helpers for the deploy tests: render the Helm chart with the Helm SDK, and read metric names out
of PromQL queries and out of the code's Prometheus registries."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
CHART_DIR = REPO / "charts" / "mot-operator"
RELEASE = "mot-operator"
RELEASE_NAMESPACE = "mot-system"

FIXTURES = ()

# Values sets the chart is tested with: the defaults and the non-default modes users pick.
VALUES_CASES = {
    "default": {},
    "namespaced": {"watchNamespaces": ["team-a", "team-b"]},
    "monitoring": {
        "metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}},
                    "podMonitor": {"enabled": True}},
        "alerts": {"enabled": True, "noProgress": {"thresholdSeconds": 3600, "for": "15m"},
                   "jobRetries": {"threshold": 5, "window": "2h"}},
        "dashboard": {"namespace": "monitoring", "labels": {"grafana_dashboard": "mot"}},
    },
    "custom-image": {
        "image": {"repository": "registry.example.com/ml/mot-operator", "tag": "1.2.3"},
        "defaults": {
            "trainerImage": {"repository": "registry.example.com/ml/mot-trainer",
                             "digest": "sha256:" + "ab" * 32},
            "storage": {"uri": "s3://mot-checkpoints/runs", "endpoint": "http://minio.storage:9000",
                        "credentialsSecret": "mot-s3"},
        },
        "imagePullSecrets": [{"name": "regcred"}],
        "logLevel": "debug",
        "logFormat": "text",
        "metrics": {"port": 9090},
        "serviceAccount": {"name": "mot-controller"},
        "extraArgs": ["--log-level", "debug"],
        "extraEnv": [{"name": "HTTPS_PROXY", "value": "http://proxy:3128"}],
    },
}


def load_chart():
    import helm_python as helm  # imported here: loading the Go library is not free

    return helm.Chart.load(CHART_DIR)


def render(values: dict | None = None, *, name: str = RELEASE,
           namespace: str = RELEASE_NAMESPACE) -> dict[str, list[dict]]:
    """Render the chart offline: {template path: [manifest, ...]} (NOTES.txt kept as text in `notes`)."""
    with load_chart() as chart:
        rendered = chart.render(values or {}, name=name, namespace=namespace, is_install=True)
    out: dict[str, list[dict]] = {}
    for path, text in rendered.items():
        if path.endswith("NOTES.txt"):
            continue
        docs = [doc for doc in yaml.safe_load_all(text) if doc]
        if docs:
            out[path] = docs
    return out


def render_notes(values: dict | None = None) -> str:
    with load_chart() as chart:
        rendered = chart.render(values or {}, name=RELEASE, namespace=RELEASE_NAMESPACE, is_install=True)
    return next(text for path, text in rendered.items() if path.endswith("NOTES.txt"))


def manifests(values: dict | None = None, **kwargs) -> list[dict]:
    return [doc for docs in render(values, **kwargs).values() for doc in docs]


def by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [doc for doc in docs if doc["kind"] == kind]


def one(docs: list[dict], kind: str) -> dict:
    found = by_kind(docs, kind)
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


# ---------------------------------------------------------------------------------------------------
# Metric names

# Names Prometheus itself provides for every target.
PROMETHEUS_BUILTINS = {"up"}

_PROMQL_KEYWORDS = {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring",
                    "group_left", "group_right", "inf", "nan", "start", "end", "atan2"}


def promql_metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression selects (Grafana `$variables` allowed).

    Strings, label matchers, ranges and grouping clauses are removed first; what is left that looks
    like an identifier and is not a function call or keyword is a metric name."""
    text = re.sub(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|`[^`]*`', '""', expr)
    text = re.sub(r"\{[^{}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    names = set()
    for match in re.finditer(r"(?<![\w.$])[A-Za-z_:][A-Za-z0-9_:]*", text):
        if text[match.end():].lstrip().startswith("("):
            continue  # a function: rate(, sum(, histogram_quantile(
        if match.group().lower() in _PROMQL_KEYWORDS:
            continue
        names.add(match.group())
    return names


def registry_sample_names(registry) -> set[str]:
    """Every series name a prometheus_client registry can expose, labelled or not yet observed."""
    suffixes = {
        "counter": ("_total", "_created"),
        "histogram": ("_bucket", "_sum", "_count", "_created"),
        "gaugehistogram": ("_bucket", "_gsum", "_gcount"),
        "summary": ("", "_sum", "_count", "_created"),
        "info": ("_info",),
    }
    names: set[str] = set()
    for family in registry.collect():
        names.update(family.name + suffix for suffix in suffixes.get(family.type, ("",)))
        names.update(sample.name for sample in family.samples)
    return names


def exported_metric_names() -> set[str]:
    """What the operator and the trainer really export (their registries), plus Prometheus's `up`."""
    from mot_operator.metrics import REGISTRY as OPERATOR_REGISTRY
    from mot_trainer.progress import REGISTRY as TRAINER_REGISTRY

    return registry_sample_names(OPERATOR_REGISTRY) | registry_sample_names(TRAINER_REGISTRY) | PROMETHEUS_BUILTINS
