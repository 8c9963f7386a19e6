"""A real JobSet (sigs.k8s.io/jobset) on the test control plane (tests/support/cluster.py): its CRD, its
controller-manager running as a local process against the apiserver, and its admission webhooks.

The binary, CRD and webhook manifests come from tests/cluster/jobset/build.sh (the Makefile's
`cluster-bins`, a prerequisite of `make test`), built at the version pinned in
tests/cluster/jobset/go.mod into `${MOT_CACHE:-~/.cache/mot-operator}/jobset/v<version>/`;
`MOT_JOBSET_DIR` points elsewhere. A test using JobSet fails with that instruction when they are missing.

The session fixture `jobset` (it depends on `kube_cluster`) starts JobSet once and yields a `JobSet`.
Setup, as Kueue's (support/kueue.py):
- certificates made with openssl (support.kueue.make_certs): a CA and a serving certificate for
  127.0.0.1 / localhost, in a folder that is the webhook server's certDir and the metrics server's
  certDir (both set in JobSet's Configuration: no change to JobSet's source); internal cert
  management is off;
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
through its webhooks. At the end of the session the webhook configurations are deleted (their
failurePolicy is Fail) and JobSet gets SIGTERM, then SIGKILL; it is started with a parent-death
signal, so a killed pytest leaves nothing behind.
"""

from __future__ import annotations

import base64
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
from support.kueue import make_certs
from support.processes import stop_process, wait_until

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
class JobSet:
    cluster: KubeCluster
    version: str
    webhook_url: str            # https://127.0.0.1:<port>
    health_url: str             # http://127.0.0.1:<port>
    metrics_url: str            # https://127.0.0.1:<port>/metrics (authenticated)
    ca_file: Path               # verifies the webhook and metrics servers
    workdir: Path
    component: Component
    webhook_configurations: dict[str, str] = field(default_factory=dict)   # kind -> name
    startup_seconds: float = 0.0
    timings: dict = field(default_factory=dict)   # seconds per start-up step

    def logs(self, lines: int = 60) -> str:
        return self.component.tail(lines)

    def get(self, name: str, namespace: str) -> dict:
        return self.cluster.get_json(f"jobsets.{API_VERSION.split('/')[0]}", name, "-n", namespace)

    def stop(self) -> None:
        for kind, name in self.webhook_configurations.items():
            self.cluster.kubectl("delete", kind, name, "--ignore-not-found", "--wait=false", check=False)
        stop_process(self.component.process, timeout=10)


def crd_manifests(source: Path, webhook_url: str, ca_bundle: str) -> list[dict]:
    """JobSet's CRDs as config/components/crd/kustomization.yaml builds them: the resources it lists,
    with its conversion-webhook patches pointed at `webhook_url` (the cert-manager CA-injection
    patch, an annotation only, is left out: the caBundle is set here)."""
    kustomization = yaml.safe_load((source / "kustomization.yaml").read_text())
    crds = {}
    for resource in kustomization["resources"]:
        crd = yaml.safe_load((source / resource).read_text())
        crds[crd["metadata"]["name"]] = crd
    for patch in kustomization.get("patches", []):
        spec = yaml.safe_load((source / patch["path"]).read_text())
        if "conversion" not in (spec.get("spec") or {}):
            continue
        conversion = copy.deepcopy(spec["spec"]["conversion"])
        client = conversion["webhook"]["clientConfig"]
        client["url"] = webhook_url + client.pop("service")["path"]
        client["caBundle"] = ca_bundle
        crds[spec["metadata"]["name"]]["spec"]["conversion"] = conversion
    return list(crds.values())


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
            path = webhook["clientConfig"]["service"]["path"]
            webhook["clientConfig"] = {"url": webhook_url + path, "caBundle": ca_bundle}
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
    missing = [name for name in ("jobset", "crd/kustomization.yaml", "webhook/kustomization.yaml",
                                 "webhook/manifests.yaml") if not (source / name).exists()]
    if missing:
        pytest.fail(f"JobSet missing in {source}: {', '.join(missing)}; build it with `make cluster-bins` "
                    "(tests/cluster/jobset/build.sh, ~3 min cold)")
    if not shutil.which("openssl"):
        pytest.fail("no openssl on PATH (JobSet's webhook certificates are made with it)")

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
        "apiVersion": "config.jobset.x-k8s.io/v1alpha1", "kind": "Configuration",
        "internalCertManagement": {"enable": False},
        "leaderElection": {"leaderElect": False},
        "webhook": {"host": "127.0.0.1", "port": webhook_port, "certDir": str(certs)},
        "health": {"healthProbeBindAddress": f"127.0.0.1:{health_port}"},
        "metrics": {"bindAddress": f"127.0.0.1:{metrics_port}", "certDir": str(certs)},
        "clientConnection": {"qps": 100, "burst": 200},
    }
    config_file = workdir / "jobset-config.yaml"
    config_file.write_text(yaml.safe_dump(config))

    crds = crd_manifests(source / "crd", webhook_url, ca_bundle)
    # Server-side apply: the JobSet CRD (~800 kB) is too large for client-side apply's annotation.
    cluster.kubectl("apply", "--server-side", "--force-conflicts", "--field-manager=mot-test-jobset", "-f", "-",
                    input=json.dumps({"apiVersion": "v1", "kind": "List", "items": crds}), timeout=120)
    for crd in crds:
        # Polled: `kubectl wait --for=condition=Established` fails at once ("<nil> is of the type <nil>")
        # when it reads the CRD before the apiserver has written any condition.
        wait_until(lambda name=crd["metadata"]["name"]: any(
            c["type"] == "Established" and c["status"] == "True"
            for c in (cluster.get_json("crd", name).get("status") or {}).get("conditions") or []),
            timeout=60, what=f"CRD {crd['metadata']['name']} Established")
    step("certs, CRD")

    log = workdir / "jobset.log"
    argv = [str(source / "jobset"), f"--config={config_file}", "--zap-log-level=info"]
    with log.open("wb") as out:
        process = subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=workdir,
            preexec_fn=_die_with_parent,
            env={**os.environ, "KUBECONFIG": str(cluster.kubeconfig),
                 "GOMAXPROCS": os.environ.get("MOT_KUBE_GOMAXPROCS", "2")})
    webhooks = webhook_manifests(source / "webhook", webhook_url, ca_bundle)
    controller = JobSet(cluster=cluster, version=jobset_version(), webhook_url=webhook_url,
                        health_url=f"http://127.0.0.1:{health_port}",
                        metrics_url=f"https://127.0.0.1:{metrics_port}/metrics", ca_file=ca_file, workdir=workdir,
                        component=Component("jobset", process, log),
                        webhook_configurations={w["kind"]: w["metadata"]["name"] for w in webhooks}, timings=timings)

    deadline = time.monotonic() + timeout

    def wait(what: str, check) -> None:
        last = None
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"jobset exited with {process.returncode} while waiting for {what}")
            ok, last = check()
            if ok:
                return
            time.sleep(0.2)
        raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}; last: {last!r}")

    try:
        cluster.kubectl("apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": webhooks}))
        wait("jobset /readyz", lambda: (lambda r: (r[0] == 200, r))(_get(f"{controller.health_url}/readyz")))
        step("jobset ready")
        verify = ssl.create_default_context(cafile=str(ca_file))
        wait("jobset's webhook server with its certificate", lambda: (lambda r: (r[0] != 0, r))(
            _get(f"{webhook_url}/healthz", verify)))
        probe = json.dumps(probe_jobset())

        def dry_run():
            result = cluster.kubectl("create", "--dry-run=server", "-o", "json", "-f", "-", input=probe, check=False)
            if result.returncode != 0:
                return False, (result.stderr or result.stdout)[-500:]
            stored = json.loads(result.stdout)
            # The mutating webhook defaulted it (e.g. the Jobs' completionMode Indexed).
            job = stored["spec"]["replicatedJobs"][0]["template"]["spec"]
            return job.get("completionMode") == "Indexed", job
        wait("a dry-run JobSet through JobSet's webhooks", dry_run)
        step("webhooks admit")
    except BaseException as error:
        logs = controller.logs()
        controller.stop()
        if isinstance(error, (RuntimeError, TimeoutError, AssertionError)):
            raise RuntimeError(f"JobSet did not start: {error}\n{logs}") from error
        raise
    return controller


@pytest.fixture(scope="session")
def jobset(kube_cluster, tmp_path_factory):
    """A real JobSet controller-manager with its CRD and webhooks on the session's control plane;
    see the module docstring."""
    started = time.monotonic()
    controller = start_jobset(kube_cluster, tmp_path_factory.mktemp("jobset"))
    controller.startup_seconds = time.monotonic() - started
    try:
        yield controller
    finally:
        controller.stop()
