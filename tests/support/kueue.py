"""A real Kueue on the test control plane (tests/support/cluster.py): its CRDs, its controller-manager
running as a local process against the apiserver, and its admission and conversion webhooks.

The binary, CRDs and webhook manifests come from tests/cluster/kueue/build.sh (the Makefile's
`cluster-bins`, a prerequisite of `make test`), built at the version pinned in
tests/cluster/kueue/go.mod into `${MOT_CACHE:-~/.cache/mot-operator}/kueue/v<version>/`;
`MOT_KUEUE_DIR` points elsewhere. A test using Kueue fails with that instruction when they are missing.

The session fixture `kueue` (it depends on `kube_cluster` and `jobset`) starts Kueue once, after
JobSet's controller (support/jobset.py), and yields a `Kueue`. Kueue v0.17 sets up an integration
whose CRD is missing only when it later finds the API, polling with a backoff of up to 2 minutes
(pkg/controller/jobframework/setup.go): with JobSet's CRD installed first its JobSet integration
is up at start. Setup, by support/webhook_controller.py as JobSet's:
- Kueue's CRDs (config/components/crd/bases of the module), with the conversion-webhook patches
  its kustomization enables (v1beta1 <-> v1beta2, path /convert);
- certificates made with openssl: a CA and a serving certificate for 127.0.0.1 / localhost (an IP
  SAN), in a folder that is the webhook server's certDir and the metrics server's certificate
  folder (KUEUE_METRICS_CERT_DIR, see the overlay in build.sh); internal cert management is off;
- a config.kueue.x-k8s.io/v1beta2 Configuration: `integrations.frameworks: [batch/job,
  jobset.x-k8s.io/jobset]`, `manageJobsWithoutQueueName: false`, the webhook server on
  127.0.0.1:<free port>, health and metrics on free loopback ports, no leader election,
  VisibilityOnDemand off (it would start an aggregated API server of its own);
- the Mutating/ValidatingWebhookConfigurations of config/components/webhook/manifests.yaml, with
  `clientConfig.service` rewritten to `url: https://127.0.0.1:<port><path>` and the CA bundle.
  Only the webhooks for what Kueue manages here are installed: kueue.x-k8s.io objects, batch/v1
  Jobs and jobset.x-k8s.io JobSets. Those for the other integrations (Pods, Deployments,
  StatefulSets, ...) are left out, so that the Pods and Deployments of the other tests on the
  shared cluster do not go through Kueue.
Kueue talks to the apiserver with the admin kubeconfig. Ready means: its /readyz answers 200 (the
webhook server is listening), a server-side dry-run create of a ResourceFlavor passes the webhook,
a dry-run JobSet labelled for a queue comes back suspended (Kueue's JobSet webhook), and the
garbage collector deletes an orphaned Workload (it watches a new CRD only after its next discovery
resync, up to 30 s after the CRDs are installed; until then a deleted Job's Workload stays and
holds its quota).

Kueue then manages every Job and JobSet labelled `kueue.x-k8s.io/queue-name` in the cluster, in
every test after the first that uses the fixture: one Workload per Job, one per JobSet (a PodSet per
replicated Job, counting all its Pods), admitted whole by unsuspending it. Jobs and JobSets without
the label are left alone; a JobSet's own Jobs are its JobSet's. At the end of the session the webhook
configurations are deleted (so Jobs and JobSets can still be created once Kueue is gone) and Kueue
gets SIGTERM, then SIGKILL; it is started with a parent-death signal, so a killed pytest leaves
nothing behind.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from support.cluster import ROOT, KubeCluster, built_dir, pinned_version
from support.jobset import JobSet, probe_jobset
from support.processes import wait_until
from support.webhook_controller import Launch, WebhookController, dry_run_check, point_webhook

FIXTURES = ("kueue",)

GO_MOD = ROOT / "tests" / "cluster" / "kueue" / "go.mod"
START_TIMEOUT = 90.0
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
JOB_FRAMEWORK, JOBSET_FRAMEWORK = "batch/job", "jobset.x-k8s.io/jobset"
# The API group of what each integration manages: its webhooks are those whose rules only name the
# groups of the enabled integrations (and kueue.x-k8s.io's own).
FRAMEWORK_GROUPS = {JOB_FRAMEWORK: "batch", JOBSET_FRAMEWORK: "jobset.x-k8s.io"}
WEBHOOK_CONFIGURATIONS = {"MutatingWebhookConfiguration": "kueue-mutating-webhook-configuration",
                          "ValidatingWebhookConfiguration": "kueue-validating-webhook-configuration"}


def kueue_version() -> str:
    """The Kueue version tests/cluster/kueue/go.mod pins."""
    return pinned_version(GO_MOD, "sigs.k8s.io/kueue")


def kueue_dir() -> Path:
    """Where tests/cluster/kueue/build.sh puts Kueue ($MOT_KUEUE_DIR elsewhere)."""
    return built_dir("MOT_KUEUE_DIR", "kueue", kueue_version())


@dataclass
class Kueue(WebhookController):
    frameworks: tuple[str, ...] = (JOB_FRAMEWORK,)

    def workloads(self, namespace: str) -> list[dict]:
        return self.cluster.get_json("workloads.v1beta2.kueue.x-k8s.io", "-n", namespace)["items"]

    def workload_for(self, namespace: str, job_uid: str) -> dict | None:
        """The Workload Kueue made for the Job (or JobSet) with this uid (its controller ownerReference)."""
        for workload in self.workloads(namespace):
            if any(ref.get("uid") == job_uid for ref in workload["metadata"].get("ownerReferences", [])):
                return workload
        return None

    @contextlib.contextmanager
    def gpu_queue(self, namespace: str, gpus: int, name: str = "gpus"):
        """A ResourceFlavor, a ClusterQueue for `namespace` only with `gpus` nvidia.com/gpu (cpu and
        memory plenty) and a LocalQueue `name` in it, Active; yields the ClusterQueue's name. Kueue's
        finalizers hold the queue objects until their Workloads are gone: deleted without waiting."""
        flavor, cluster_queue = f"{namespace}-flavor", f"{namespace}-cq"
        quota = {"cpu": "64", "memory": "256Gi", "nvidia.com/gpu": str(gpus)}
        objects = [
            {"apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "ResourceFlavor", "metadata": {"name": flavor}},
            {"apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "ClusterQueue", "metadata": {"name": cluster_queue},
             "spec": {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": namespace}},
                      "resourceGroups": [{"coveredResources": list(quota), "flavors": [{"name": flavor, "resources": [
                          {"name": resource, "nominalQuota": amount} for resource, amount in quota.items()]}]}]}},
            {"apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "LocalQueue",
             "metadata": {"name": name, "namespace": namespace}, "spec": {"clusterQueue": cluster_queue}},
        ]
        self.cluster.kubectl("apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List",
                                                                    "items": objects}))
        wait_until(lambda: (condition(self.cluster.get_json("clusterqueue", cluster_queue), "Active") or {}).get(
            "status") == "True", timeout=30, what=f"ClusterQueue {cluster_queue} Active", on_timeout=self.logs)
        try:
            yield cluster_queue
        finally:
            self.cluster.kubectl("delete", "clusterqueue", cluster_queue, "--wait=false", check=False)
            self.cluster.kubectl("delete", "resourceflavor", flavor, "--wait=false", check=False)


def condition(obj: dict, kind: str) -> dict | None:
    return next((c for c in obj.get("status", {}).get("conditions", []) if c["type"] == kind), None)


def webhook_manifests(source: Path, webhook_url: str, ca_bundle: str, frameworks: tuple[str, ...]) -> list[dict]:
    """Kueue's webhook configurations (named as its kustomize install names them), keeping the
    webhooks for kueue.x-k8s.io and the enabled `frameworks`, each pointed at `webhook_url` + its
    service path."""
    managed = {"kueue.x-k8s.io", *(FRAMEWORK_GROUPS[name] for name in frameworks)}
    configurations = []
    for document in yaml.safe_load_all(source.read_text()):
        if not document:
            continue
        document["metadata"]["name"] = WEBHOOK_CONFIGURATIONS[document["kind"]]
        document["webhooks"] = [point_webhook(webhook, webhook_url, ca_bundle) for webhook in document["webhooks"]
                                if {group for rule in webhook["rules"] for group in rule["apiGroups"]} <= managed]
        configurations.append(document)
    return configurations


GC_PROBE = "mot-test-gc-probe"


def orphan_workload(cluster: KubeCluster) -> None:
    """A Workload whose owner (a ConfigMap) is deleted: the garbage collector is to delete it.
    Kueue frees an admitted Job's quota when the Job's Workload is deleted, and deleting the Job
    only drops the Workload's finalizer: the garbage collector deletes it, through its
    ownerReference. It learns of new CRDs when it re-reads discovery (every 30 s), so for up to
    30 s after the CRDs are installed an orphaned Workload stays, and holds its quota."""
    probe = GC_PROBE
    owner = json.loads(cluster.kubectl("create", "configmap", probe, "-n", "kueue-system", "-o", "json").stdout)
    workload = {"apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "Workload",
                "metadata": {"name": probe, "namespace": "kueue-system", "ownerReferences": [
                    {"apiVersion": "v1", "kind": "ConfigMap", "name": probe, "uid": owner["metadata"]["uid"]}]},
                "spec": {"podSets": [{"name": "main", "count": 1, "template": {"spec": {
                    "restartPolicy": "Never", "containers": [{"name": "main", "image": "busybox"}]}}}]}}
    cluster.kubectl("create", "-f", "-", input=json.dumps(workload))
    cluster.kubectl("delete", "configmap", probe, "-n", "kueue-system")


def orphan_collected(cluster: KubeCluster) -> tuple[bool, str]:
    result = cluster.kubectl("get", "workloads.v1beta2.kueue.x-k8s.io", GC_PROBE, "-n", "kueue-system",
                             "--ignore-not-found", "-o", "name", check=False)
    return result.returncode == 0 and not result.stdout.strip(), (result.stdout + result.stderr).strip()


def start_kueue(cluster: KubeCluster, workdir: Path, source: Path | None = None,
                frameworks: tuple[str, ...] = (JOB_FRAMEWORK,), timeout: float = START_TIMEOUT) -> Kueue:
    """Install Kueue's CRDs and webhooks into `cluster`, start its controller-manager under `workdir`
    managing `frameworks` (JOBSET_FRAMEWORK needs JobSet's CRD installed first) and wait until it
    admits through its webhooks; on failure stop it and raise with its log."""
    source = source or kueue_dir()
    launch = Launch("kueue", cluster, workdir, timeout, source=source,
                    required=("kueue", "crd/kustomization.yaml", "webhooks.yaml"),
                    what="Kueue", build_hint="tests/cluster/kueue/build.sh, ~3.5 min cold")
    config = {
        "apiVersion": "config.kueue.x-k8s.io/v1beta2", "kind": "Configuration",
        "namespace": "kueue-system",
        "manageJobsWithoutQueueName": False,
        "integrations": {"frameworks": list(frameworks)},
        "internalCertManagement": {"enable": False},
        "leaderElection": {"leaderElect": False},
        "webhook": {"host": "127.0.0.1", "port": launch.webhook_port, "certDir": str(launch.certs)},
        "health": {"healthProbeBindAddress": f"127.0.0.1:{launch.health_port}"},
        "metrics": {"bindAddress": f"127.0.0.1:{launch.metrics_port}"},
        "clientConnection": {"qps": 100, "burst": 200},
        "featureGates": {"VisibilityOnDemand": False},
    }
    config_file = workdir / "kueue-config.yaml"
    config_file.write_text(yaml.safe_dump(config))

    cluster.kubectl("create", "namespace", "kueue-system", check=False)   # its own namespace (MultiKueue)
    launch.install_crds(source / "crd")
    orphan_workload(cluster)   # checked last: the garbage collector takes its time while Kueue starts
    launch.step("certs, CRDs")

    component = launch.start([str(source / "kueue"), f"--config={config_file}"],
                             env={"KUEUE_METRICS_CERT_DIR": str(launch.certs)})
    kueue = Kueue(version=kueue_version(), component=component, webhook_configurations=dict(WEBHOOK_CONFIGURATIONS),
                  frameworks=tuple(frameworks), **launch.endpoints())
    with launch.stopping_on_failure(kueue):
        launch.install_webhooks(webhook_manifests(source / "webhooks.yaml", launch.webhook_url, launch.ca_bundle,
                                                  frameworks))
        launch.wait_serving()
        flavor = {"apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "ResourceFlavor",
                  "metadata": {"name": "mot-test-kueue-probe"}}
        launch.wait("a dry-run ResourceFlavor through Kueue's webhook", dry_run_check(cluster, flavor))
        if JOBSET_FRAMEWORK in frameworks:
            # Kueue's JobSet webhook suspends a JobSet created for a queue (its integration is up).
            queued = probe_jobset("mot-test-kueue-probe")
            queued["metadata"]["labels"] = {QUEUE_LABEL: "mot-test-kueue-probe"}
            launch.wait("a dry-run queued JobSet suspended by Kueue's webhook", dry_run_check(
                cluster, queued, lambda stored: (stored["spec"].get("suspend") is True, stored["spec"].get("suspend"))))
        launch.step("webhook admits")
        launch.wait("the garbage collector to delete an orphaned Workload", lambda: orphan_collected(cluster))
        launch.step("garbage collector")
    return kueue


@pytest.fixture(scope="session")
def kueue(kube_cluster, jobset: JobSet, tmp_path_factory):
    """A real Kueue controller-manager with its CRDs and webhooks on the session's control plane,
    managing Jobs and JobSets (JobSet's controller started first); see the module docstring."""
    controller = start_kueue(kube_cluster, tmp_path_factory.mktemp("kueue"),
                             frameworks=(JOB_FRAMEWORK, JOBSET_FRAMEWORK))
    try:
        yield controller
    finally:
        controller.stop()
