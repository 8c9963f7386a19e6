"""A real Kueue on the test control plane (tests/support/cluster.py): its CRDs, its controller-manager
running as a local process against the apiserver, and its admission and conversion webhooks.

The binary, CRDs and webhook manifests come from tests/cluster/kueue/build.sh (the Makefile's
`cluster-bins`, a prerequisite of `make test`), built at the version pinned in
tests/cluster/kueue/go.mod into `${MOT_CACHE:-~/.cache/mot-operator}/kueue/v<version>/`;
`MOT_KUEUE_DIR` points elsewhere. A test using Kueue fails with that instruction when they are missing.

The session fixture `kueue` (it depends on `kube_cluster`) starts Kueue once and yields a `Kueue`.
Setup:
- Kueue's CRDs (config/components/crd/bases of the module), with the conversion-webhook patches
  its kustomization enables (v1beta1 <-> v1beta2, path /convert);
- certificates made with openssl: a CA and a serving certificate for 127.0.0.1 / localhost (an IP
  SAN), in a folder that is the webhook server's certDir and the metrics server's certificate
  folder (KUEUE_METRICS_CERT_DIR, see the overlay in build.sh); internal cert management is off;
- a config.kueue.x-k8s.io/v1beta2 Configuration: `integrations.frameworks: [batch/job]`,
  `manageJobsWithoutQueueName: false`, the webhook server on 127.0.0.1:<free port>, health and
  metrics on free loopback ports, no leader election, VisibilityOnDemand off (it would start an
  aggregated API server of its own);
- the Mutating/ValidatingWebhookConfigurations of config/components/webhook/manifests.yaml, with
  `clientConfig.service` rewritten to `url: https://127.0.0.1:<port><path>` and the CA bundle.
  Only the webhooks for what Kueue manages here are installed: kueue.x-k8s.io objects and
  batch/v1 Jobs. Those for the other integrations (Pods, Deployments, StatefulSets, JobSets, ...)
  are left out, so that the Pods and Deployments of the other tests on the shared cluster do not
  go through Kueue.
Kueue talks to the apiserver with the admin kubeconfig. Ready means: its /readyz answers 200 (the
webhook server is listening), a server-side dry-run create of a ResourceFlavor passes the webhook,
and the garbage collector deletes an orphaned Workload (it watches a new CRD only after its next
discovery resync, up to 30 s after the CRDs are installed; until then a deleted Job's Workload
stays and holds its quota).

Kueue then manages every Job labelled `kueue.x-k8s.io/queue-name` in the cluster, in every test
after the first that uses the fixture; Jobs without the label are left alone. At the end of the
session the webhook configurations are deleted (so Jobs can still be created once Kueue is gone)
and Kueue gets SIGTERM, then SIGKILL; it is started with a parent-death signal, so a killed pytest
leaves nothing behind.
"""

from __future__ import annotations

import base64
import contextlib
import copy
import json
import os
import shutil
import ssl
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from support.cluster import (
    ROOT,
    Component,
    KubeCluster,
    _die_with_parent,
    _get,
    built_dir,
    free_port,
    pinned_version,
)
from support.processes import stop_process, wait_until

FIXTURES = ("kueue",)

GO_MOD = ROOT / "tests" / "cluster" / "kueue" / "go.mod"
START_TIMEOUT = 90.0
# Webhooks kept from Kueue's manifests: those whose rules only name these API groups.
MANAGED_GROUPS = {"kueue.x-k8s.io", "batch"}
WEBHOOK_CONFIGURATIONS = {"MutatingWebhookConfiguration": "kueue-mutating-webhook-configuration",
                          "ValidatingWebhookConfiguration": "kueue-validating-webhook-configuration"}


def kueue_version() -> str:
    """The Kueue version tests/cluster/kueue/go.mod pins."""
    return pinned_version(GO_MOD, "sigs.k8s.io/kueue")


def kueue_dir() -> Path:
    """Where tests/cluster/kueue/build.sh puts Kueue ($MOT_KUEUE_DIR elsewhere)."""
    return built_dir("MOT_KUEUE_DIR", "kueue", kueue_version())


@dataclass
class Kueue:
    cluster: KubeCluster
    version: str
    webhook_url: str            # https://127.0.0.1:<port>
    health_url: str             # http://127.0.0.1:<port>
    metrics_url: str            # https://127.0.0.1:<port>/metrics (authenticated)
    ca_file: Path               # verifies the webhook and metrics servers
    workdir: Path
    component: Component
    startup_seconds: float = 0.0
    timings: dict = field(default_factory=dict)   # seconds per start-up step

    def logs(self, lines: int = 60) -> str:
        return self.component.tail(lines)

    def workloads(self, namespace: str) -> list[dict]:
        return self.cluster.get_json("workloads.v1beta2.kueue.x-k8s.io", "-n", namespace)["items"]

    def workload_for(self, namespace: str, job_uid: str) -> dict | None:
        """The Workload Kueue made for the Job with this uid (its controller ownerReference)."""
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

    def stop(self) -> None:
        for kind, name in WEBHOOK_CONFIGURATIONS.items():
            self.cluster.kubectl("delete", kind, name, "--ignore-not-found", "--wait=false", check=False)
        stop_process(self.component.process, timeout=10)


def condition(obj: dict, kind: str) -> dict | None:
    return next((c for c in obj.get("status", {}).get("conditions", []) if c["type"] == kind), None)


def make_certs(pki: Path) -> Path:
    """A CA (ca.crt) and a serving certificate signed by it for 127.0.0.1 and localhost (tls.crt,
    tls.key: the file names controller-runtime's webhook server reads from its certDir)."""
    pki.mkdir(parents=True, exist_ok=True)

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=pki)

    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-days", "2",
            "-subj", "/CN=mot-test-kueue-ca", "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    openssl("req", *ec, "-keyout", "tls.key", "-out", "tls.csr", "-subj", "/CN=127.0.0.1")
    (pki / "serving.ext").write_text(
        "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n"
        "extendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1,DNS:localhost\n")
    openssl("x509", "-req", "-in", "tls.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", "tls.crt", "-days", "2", "-extfile", "serving.ext")
    return pki / "ca.crt"


def crd_manifests(source: Path, webhook_url: str, ca_bundle: str) -> list[dict]:
    """Kueue's CRDs as its config/components/crd/kustomization.yaml builds them: the resources it
    lists, with the conversion-webhook patches it enables pointed at `webhook_url`."""
    kustomization = yaml.safe_load((source / "kustomization.yaml").read_text())
    crds = {}
    for resource in kustomization["resources"]:
        crd = yaml.safe_load((source / resource).read_text())
        crds[crd["metadata"]["name"]] = crd
    for patch in kustomization.get("patches", []):
        spec = yaml.safe_load((source / patch["path"]).read_text())
        conversion = copy.deepcopy(spec["spec"]["conversion"])
        client = conversion["webhook"]["clientConfig"]
        client["url"] = webhook_url + client.pop("service")["path"]
        client["caBundle"] = ca_bundle
        crds[spec["metadata"]["name"]]["spec"]["conversion"] = conversion
    return list(crds.values())


def webhook_manifests(source: Path, webhook_url: str, ca_bundle: str) -> list[dict]:
    """Kueue's webhook configurations (named as its kustomize install names them), keeping the
    webhooks for MANAGED_GROUPS, each pointed at `webhook_url` + its service path."""
    configurations = []
    for document in yaml.safe_load_all(source.read_text()):
        if not document:
            continue
        document["metadata"]["name"] = WEBHOOK_CONFIGURATIONS[document["kind"]]
        kept = []
        for webhook in document["webhooks"]:
            groups = {group for rule in webhook["rules"] for group in rule["apiGroups"]}
            if not groups <= MANAGED_GROUPS:
                continue
            path = webhook["clientConfig"]["service"]["path"]
            webhook["clientConfig"] = {"url": webhook_url + path, "caBundle": ca_bundle}
            kept.append(webhook)
        document["webhooks"] = kept
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
                timeout: float = START_TIMEOUT) -> Kueue:
    """Install Kueue's CRDs and webhooks into `cluster`, start its controller-manager under `workdir`
    and wait until it admits through its webhook; on failure stop it and raise with its log."""
    source = source or kueue_dir()
    missing = [name for name in ("kueue", "crd/kustomization.yaml", "webhooks.yaml") if not (source / name).exists()]
    if missing:
        pytest.fail(f"Kueue missing in {source}: {', '.join(missing)}; build it with `make cluster-bins` "
                    "(tests/cluster/kueue/build.sh, ~3.5 min cold)")
    if not shutil.which("openssl"):
        pytest.fail("no openssl on PATH (Kueue's webhook certificates are made with it)")

    started = time.monotonic()
    timings = {}

    def step(name: str) -> None:
        timings[name] = round(time.monotonic() - started - sum(timings.values()), 2)

    workdir.mkdir(parents=True, exist_ok=True)
    certs = workdir / "certs"
    ca_file = make_certs(certs)
    ca_bundle = base64.b64encode(ca_file.read_bytes()).decode()
    webhook_port, health_port, metrics_port = (free_port() for _ in range(3))
    webhook_url = f"https://127.0.0.1:{webhook_port}"

    config = {
        "apiVersion": "config.kueue.x-k8s.io/v1beta2", "kind": "Configuration",
        "namespace": "kueue-system",
        "manageJobsWithoutQueueName": False,
        "integrations": {"frameworks": ["batch/job"]},
        "internalCertManagement": {"enable": False},
        "leaderElection": {"leaderElect": False},
        "webhook": {"host": "127.0.0.1", "port": webhook_port, "certDir": str(certs)},
        "health": {"healthProbeBindAddress": f"127.0.0.1:{health_port}"},
        "metrics": {"bindAddress": f"127.0.0.1:{metrics_port}"},
        "clientConnection": {"qps": 100, "burst": 200},
        "featureGates": {"VisibilityOnDemand": False},
    }
    config_file = workdir / "kueue-config.yaml"
    config_file.write_text(yaml.safe_dump(config))

    cluster.kubectl("create", "namespace", "kueue-system", check=False)   # its own namespace (MultiKueue)
    crds = crd_manifests(source / "crd", webhook_url, ca_bundle)
    # Server-side apply: the Workload CRD is too large for client-side apply's last-applied annotation.
    cluster.kubectl("apply", "--server-side", "--force-conflicts", "--field-manager=mot-test-kueue", "-f", "-",
                    input=json.dumps({"apiVersion": "v1", "kind": "List", "items": crds}), timeout=120)
    for crd in crds:
        cluster.kubectl("wait", "--for=condition=Established", f"crd/{crd['metadata']['name']}", "--timeout=60s")
    orphan_workload(cluster)   # checked last: the garbage collector takes its time while Kueue starts
    step("certs, CRDs")

    log = workdir / "kueue.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [str(source / "kueue"), f"--config={config_file}"], stdout=out, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, cwd=workdir, preexec_fn=_die_with_parent,
            env={**os.environ, "KUBECONFIG": str(cluster.kubeconfig), "KUEUE_METRICS_CERT_DIR": str(certs),
                 "GOMAXPROCS": os.environ.get("MOT_KUBE_GOMAXPROCS", "2")})
    kueue = Kueue(cluster=cluster, version=kueue_version(), webhook_url=webhook_url,
                  health_url=f"http://127.0.0.1:{health_port}", metrics_url=f"https://127.0.0.1:{metrics_port}/metrics",
                  ca_file=ca_file, workdir=workdir, component=Component("kueue", process, log), timings=timings)

    deadline = time.monotonic() + timeout

    def wait(what: str, check) -> None:
        last = None
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"kueue exited with {process.returncode} while waiting for {what}")
            ok, last = check()
            if ok:
                return
            time.sleep(0.2)
        raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}; last: {last!r}")

    try:
        cluster.kubectl("apply", "-f", "-", input=json.dumps(
            {"apiVersion": "v1", "kind": "List", "items": webhook_manifests(source / "webhooks.yaml", webhook_url, ca_bundle)}))
        wait("kueue /readyz", lambda: (lambda r: (r[0] == 200, r))(_get(f"{kueue.health_url}/readyz")))
        step("kueue ready")
        verify = ssl.create_default_context(cafile=str(ca_file))
        wait("kueue's webhook server with its certificate", lambda: (lambda r: (r[0] != 0, r))(
            _get(f"{webhook_url}/healthz", verify)))

        flavor = json.dumps({"apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "ResourceFlavor",
                             "metadata": {"name": "mot-test-kueue-probe"}})

        def dry_run():
            result = cluster.kubectl("create", "--dry-run=server", "-o", "json", "-f", "-", input=flavor, check=False)
            return result.returncode == 0, (result.stderr or result.stdout)[-500:]
        wait("a dry-run ResourceFlavor through Kueue's webhook", dry_run)
        step("webhook admits")
        wait("the garbage collector to delete an orphaned Workload", lambda: orphan_collected(cluster))
        step("garbage collector")
    except BaseException as error:
        logs = kueue.logs()
        kueue.stop()
        if isinstance(error, (RuntimeError, TimeoutError, AssertionError)):
            raise RuntimeError(f"Kueue did not start: {error}\n{logs}") from error
        raise
    return kueue


@pytest.fixture(scope="session")
def kueue(kube_cluster, tmp_path_factory):
    """A real Kueue controller-manager with its CRDs and webhooks on the session's control plane;
    see the module docstring."""
    started = time.monotonic()
    controller = start_kueue(kube_cluster, tmp_path_factory.mktemp("kueue"))
    controller.startup_seconds = time.monotonic() - started
    try:
        yield controller
    finally:
        controller.stop()
