"""A real JobSet (sigs.k8s.io/jobset) on the test control plane (tests/support/cluster.py): its CRD, its
controller-manager running as a local process against the apiserver, and its admission webhooks.

The binary, CRD and webhook manifests come from tests/cluster/jobset/build.sh (the Makefile's
`cluster-bins`, a prerequisite of `make test`), built at the version pinned in
tests/cluster/jobset/go.mod into `${MOT_CACHE:-~/.cache/mot-operator}/jobset/v<version>/`;
`MOT_JOBSET_DIR` points elsewhere. A test using JobSet fails with that instruction when they are missing.

The session fixture `jobset` (it depends on `kube_cluster`) starts JobSet once and yields a `JobSet`.
Setup, by support/webhook_controller.py as Kueue's (support/kueue.py):
- certificates made with openssl: a CA and a serving certificate for 127.0.0.1 / localhost, in a
  folder that is the webhook server's certDir and the metrics server's certDir (both set in JobSet's
  Configuration: no change to JobSet's source); internal cert management is off;
- the CRD jobsets.jobset.x-k8s.io (config/components/crd/bases of the module), with the conversion
  patch its kustomization enables pointed at `https://127.0.0.1:<port>/convert` (JobSet serves one
  version, v1alpha2, so the apiserver never calls it; its manager registers no /convert handler);
  the cert-manager CA-injection patch is left out (the caBundle is set directly);
- a config.jobset.x-k8s.io/v1alpha1 Configuration: the webhook server on 127.0.0.1:<free port>,
  health and metrics on free loopback ports, no leader election, internal cert management off;
- the Mutating/ValidatingWebhookConfigurations of config/components/webhook (manifests.yaml with the
  JSON patches its kustomization.yaml applies: the Pod webhooks only see Pods labelled
  `jobset.sigs.k8s.io/jobset-name`), named as the upstream install names them (`jobset-` prefix),
  with `clientConfig.service` rewritten to `url: https://127.0.0.1:<port><path>` and the CA bundle.
JobSet talks to the apiserver with the admin kubeconfig. Ready means: its /readyz answers 200 (its
certificates are loaded and the webhook server listens) and a server-side dry-run create of a
JobSet passes the mutating and validating webhooks.

JobSet then manages every JobSet in the cluster for the rest of the session; nothing else goes
through its webhooks. The `kueue` fixture (support/kueue.py) starts after it and also sees every
JobSet through its own webhooks (it suspends those labelled for a queue and admits them). At the
end of the session the webhook configurations are deleted (their failurePolicy is Fail) and JobSet
gets SIGTERM, then SIGKILL; it is started with a parent-death signal, so a killed pytest leaves
nothing behind.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from support.cluster import ROOT, KubeCluster, built_dir, pinned_version
from support.webhook_controller import Launch, WebhookController, dry_run_check, point_webhook

FIXTURES = ("jobset",)

GO_MOD = ROOT / "tests" / "cluster" / "jobset" / "go.mod"
START_TIMEOUT = 90.0
API_VERSION = "jobset.x-k8s.io/v1alpha2"
NAME_PREFIX = "jobset-"   # config/default/kustomization.yaml's namePrefix
# JobSet's labels (api/jobset/v1alpha2/jobset_types.go, pkg/constants).
JOBSET_NAME_LABEL = "jobset.sigs.k8s.io/jobset-name"
REPLICATED_JOB_LABEL = "jobset.sigs.k8s.io/replicatedjob-name"
JOB_INDEX_LABEL = "jobset.sigs.k8s.io/job-index"
RESTART_ATTEMPT_LABEL = "jobset.sigs.k8s.io/restart-attempt"


def jobset_version() -> str:
    """The JobSet version tests/cluster/jobset/go.mod pins."""
    return pinned_version(GO_MOD, "sigs.k8s.io/jobset")


def jobset_dir() -> Path:
    """Where tests/cluster/jobset/build.sh puts JobSet ($MOT_JOBSET_DIR elsewhere)."""
    return built_dir("MOT_JOBSET_DIR", "jobset", jobset_version())


@dataclass
class JobSet(WebhookController):
    def get(self, name: str, namespace: str) -> dict:
        return self.cluster.get_json(f"jobsets.{API_VERSION.split('/')[0]}", name, "-n", namespace)


def _json_patch(document: dict, operations: list[dict]) -> None:
    """The RFC 6902 operations kustomize's JSON patches here use: add / replace / remove."""
    for operation in operations:
        *parents, last = [part.replace("~1", "/").replace("~0", "~") for part in operation["path"].lstrip("/").split("/")]
        target = document
        for part in parents:
            target = target[int(part)] if isinstance(target, list) else target[part]
        if isinstance(target, list):
            index = len(target) if last == "-" else int(last)
            if operation["op"] == "add":
                target.insert(index, operation["value"])
            elif operation["op"] == "replace":
                target[index] = operation["value"]
            elif operation["op"] == "remove":
                del target[index]
            else:
                raise ValueError(f"unsupported JSON patch operation {operation!r}")
        elif operation["op"] in ("add", "replace"):
            target[last] = operation["value"]
        elif operation["op"] == "remove":
            del target[last]
        else:
            raise ValueError(f"unsupported JSON patch operation {operation!r}")


def webhook_manifests(source: Path, webhook_url: str, ca_bundle: str) -> list[dict]:
    """JobSet's webhook configurations as config/components/webhook/kustomization.yaml builds them
    (manifests.yaml with its JSON patches), named with the upstream install's prefix, each webhook
    pointed at `webhook_url` + its service path."""
    kustomization = yaml.safe_load((source / "kustomization.yaml").read_text())
    documents = [d for d in yaml.safe_load_all((source / "manifests.yaml").read_text()) if d]
    by_kind_name = {(d["kind"], d["metadata"]["name"]): d for d in documents}
    for patch in kustomization.get("patches", []):
        target = patch.get("target") or {}
        document = by_kind_name.get((target.get("kind"), target.get("name")))
        if document is None:
            raise ValueError(f"JobSet's webhook kustomization patches an unknown object: {patch!r}")
        _json_patch(document, yaml.safe_load((source / patch["path"]).read_text()))
    for document in documents:
        document["metadata"]["name"] = NAME_PREFIX + document["metadata"]["name"]
        for webhook in document["webhooks"]:
            point_webhook(webhook, webhook_url, ca_bundle)
    return documents


def probe_jobset(name: str = "mot-test-jobset-probe") -> dict:
    return {"apiVersion": API_VERSION, "kind": "JobSet", "metadata": {"name": name, "namespace": "default"},
            "spec": {"replicatedJobs": [{"name": "probe", "replicas": 1, "template": {"spec": {"template": {"spec": {
                "restartPolicy": "Never", "containers": [{"name": "main", "image": "busybox", "command": ["true"]}]}}}}}]}}


def start_jobset(cluster: KubeCluster, workdir: Path, source: Path | None = None,
                 timeout: float = START_TIMEOUT) -> JobSet:
    """Install JobSet's CRD and webhooks into `cluster`, start its controller-manager under `workdir`
    and wait until its webhooks admit a JobSet; on failure stop it and raise with its log."""
    source = source or jobset_dir()
    launch = Launch("jobset", cluster, workdir, timeout, source=source,
                    required=("jobset", "crd/kustomization.yaml", "webhook/kustomization.yaml",
                              "webhook/manifests.yaml"),
                    what="JobSet", build_hint="tests/cluster/jobset/build.sh, ~3 min cold")
    config = {
        "apiVersion": "config.jobset.x-k8s.io/v1alpha1", "kind": "Configuration",
        "internalCertManagement": {"enable": False},
        "leaderElection": {"leaderElect": False},
        "webhook": {"host": "127.0.0.1", "port": launch.webhook_port, "certDir": str(launch.certs)},
        "health": {"healthProbeBindAddress": f"127.0.0.1:{launch.health_port}"},
        "metrics": {"bindAddress": f"127.0.0.1:{launch.metrics_port}", "certDir": str(launch.certs)},
        "clientConnection": {"qps": 100, "burst": 200},
    }
    config_file = workdir / "jobset-config.yaml"
    config_file.write_text(yaml.safe_dump(config))
    launch.install_crds(source / "crd")
    launch.step("certs, CRD")

    component = launch.start([str(source / "jobset"), f"--config={config_file}", "--zap-log-level=info"])
    webhooks = webhook_manifests(source / "webhook", launch.webhook_url, launch.ca_bundle)
    controller = JobSet(version=jobset_version(), component=component,
                        webhook_configurations={w["kind"]: w["metadata"]["name"] for w in webhooks},
                        **launch.endpoints())

    def defaulted(stored: dict) -> tuple[bool, object]:
        # The mutating webhook defaulted it (e.g. the Jobs' completionMode Indexed).
        job = stored["spec"]["replicatedJobs"][0]["template"]["spec"]
        return job.get("completionMode") == "Indexed", job

    with launch.stopping_on_failure(controller):
        launch.install_webhooks(webhooks)
        launch.wait_serving()
        launch.wait("a dry-run JobSet through JobSet's webhooks", dry_run_check(cluster, probe_jobset(), defaulted))
        launch.step("webhooks admit")
    return controller


@pytest.fixture(scope="session")
def jobset(kube_cluster, tmp_path_factory):
    """A real JobSet controller-manager with its CRD and webhooks on the session's control plane;
    see the module docstring."""
    controller = start_jobset(kube_cluster, tmp_path_factory.mktemp("jobset"))
    try:
        yield controller
    finally:
        controller.stop()
