"""The whole product on real parts, for end-to-end tests: the real control plane (cluster.py: etcd,
kube-apiserver with RBAC, kube-controller-manager, kube-scheduler), the test kubelet running the
Jobs' Pods as local processes (node.py), a real SeaweedFS S3 (s3.py), the real operator process
(`mot operator`) and a real Prometheus scraping the operator's /metrics.

The MoTRun CRD is applied with kubectl; the chart's ServiceAccount, ClusterRole and
ClusterRoleBinding (rendered with the Helm SDK, default values) are applied too, and the operator
runs with a token of that ServiceAccount: the apiserver enforces the chart's RBAC on every request
it makes. One `mot_e2e` stack is shared by the session; each test works in its own namespace
(`mot_e2e.namespace()`), and the operator watches them all.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import requests
import yaml

from support.cluster import KubeCluster, _die_with_parent
from support.deploy import RELEASE_NAMESPACE, manifests
from support.node import LocalNode
from support.processes import stop_process, wait_until
from support.prometheus import PrometheusServer, free_port, start_prometheus

FIXTURES = ("mot_e2e",)

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[2]
CRD = ROOT / "crds" / "motruns.mot.dev.yaml"
BUCKET = "mot-e2e"
CREDENTIALS_SECRET = "mot-s3"
RBAC_KINDS = ("ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding")


@dataclass
class OperatorProcess:
    """`mot operator` as a real subprocess, KUBECONFIG holding the chart's ServiceAccount token."""

    kubeconfig: Path
    metrics_port: int
    log_dir: Path
    extra_args: list[str] = field(default_factory=list)
    process: subprocess.Popen | None = None
    starts: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}"

    def start(self, timeout: float = 90) -> OperatorProcess:
        self.starts += 1
        log = self.log_dir / f"operator-{self.starts}.log"
        env = dict(os.environ, KUBECONFIG=str(self.kubeconfig), PYTHONUNBUFFERED="1")
        with open(log, "wb") as out:
            self.process = subprocess.Popen(
                [str(BIN / "mot"), "operator", "--metrics-port", str(self.metrics_port), "--log-level", "debug",
                 *self.extra_args], env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                preexec_fn=_die_with_parent)
        wait_until(self._ready, timeout, f"the operator's /readyz (log {log})", interval=0.3)
        return self

    def _ready(self) -> bool:
        if self.process.poll() is not None:
            raise AssertionError(f"the operator exited with {self.process.returncode}:\n{self.log_tail()}")
        try:
            return requests.get(f"{self.url}/readyz", timeout=1).status_code == 200
        except requests.RequestException:
            return False

    def kill(self) -> None:
        """SIGKILL: no chance to clean up, as when a node dies."""
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=30)

    def stop(self) -> None:
        if self.process:
            stop_process(self.process, timeout=20)

    @property
    def log_path(self) -> Path:
        """The log of the current (latest) start."""
        return self.log_dir / f"operator-{self.starts}.log"

    def log_size(self) -> int:
        return self.log_path.stat().st_size if self.log_path.exists() else 0

    def log_since(self, offset: int) -> str:
        """What the current start logged after `offset` (a log_size() taken earlier)."""
        with open(self.log_path, "rb") as log:
            log.seek(offset)
            return log.read().decode(errors="replace")

    def log_tail(self, lines: int = 60) -> str:
        log = self.log_path
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:]) if log.exists() else ""

    def metrics(self) -> str:
        return requests.get(f"{self.url}/metrics", timeout=5).text


@dataclass
class MoTE2E:
    cluster: KubeCluster
    s3: object
    kubelet: LocalNode
    operator: OperatorProcess
    prometheus: PrometheusServer
    student_uri: str
    storage_uri: str
    workdir: Path
    _session: requests.Session = field(init=False, repr=False)

    def __post_init__(self) -> None:
        session = requests.Session()
        session.headers["Authorization"] = f"Bearer {self.cluster.admin_token}"
        session.verify = str(self.cluster.ca_file)
        session.trust_env = False  # REQUESTS_CA_BUNDLE would replace `verify`
        self._session = session

    # -- clients (as the cluster's admin, as a user would) ------------------------------------
    def kubectl(self, *args: str, stdin: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
        done = self.cluster.kubectl(*args, input=stdin, check=False)
        if check and done.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed: {done.stderr}")
        return done

    def api_get(self, path: str, params: dict | None = None) -> dict:
        response = self._session.get(self.cluster.server + path, params=params, timeout=30)
        response.raise_for_status()
        return response.json()

    def namespace(self) -> str:
        """A fresh namespace holding the S3 credentials Secret the runs name."""
        name = f"e2e-{uuid.uuid4().hex[:6]}"
        secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": CREDENTIALS_SECRET, "namespace": name},
                  "type": "Opaque", "data": {key: base64.b64encode(value.encode()).decode() for key, value in (
                      ("AWS_ACCESS_KEY_ID", self.s3.access_key), ("AWS_SECRET_ACCESS_KEY", self.s3.secret_key),
                      ("AWS_REGION", "us-east-1"))}}
        namespace = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}
        self.kubectl("apply", "-f", "-", stdin=yaml.safe_dump_all([namespace, secret]))
        return name

    def upload_text(self, key: str, text: str) -> str:
        self.s3.client().put_object(Bucket=BUCKET, Key=key, Body=text.encode())
        return f"s3://{BUCKET}/{key}"

    def motrun(self, name: str, teachers: dict[str, str], *, rounds: int = 1, steps: int = 2,
               max_retries: int = 1, suspend: bool = False, **spec) -> dict:
        """A MoTRun manifest on the tiny model: `teachers` maps name -> dataset URI."""
        body = {
            "student": self.student_uri,
            "teachers": [{"name": t, "dataset": d} for t, d in teachers.items()],
            "rounds": rounds,
            "training": {"steps": steps, "learningRate": 1e-3, "microBatchSize": 4, "gradAccum": 1,
                         "maxSeqLength": 128, "precision": "fp32", "threads": 1, "warmupRatio": 0.0},
            "storage": {"uri": self.storage_uri, "endpoint": self.s3.endpoint,
                        "credentialsSecret": CREDENTIALS_SECRET, "pathStyle": True},
            "image": "mot-trainer:e2e",
            "maxRetries": max_retries,
            "retryBackoffSeconds": 0,
            "suspend": suspend,
        }
        body.update(spec)
        return {"apiVersion": "mot.dev/v1alpha1", "kind": "MoTRun", "metadata": {"name": name}, "spec": body}

    @contextlib.contextmanager
    def operator_with_jobset(self):
        """The shared operator restarted with `--jobset` and the chart's RBAC with jobset.enabled (a
        JobSet controller must run: fixture `jobset`), restored afterwards."""
        operator = self.operator
        operator.stop()
        try:
            install_operator_access(self.cluster, {"jobset": {"enabled": True}})
            operator.extra_args.append("--jobset")
            operator.start()
            yield operator
        finally:
            operator.stop()
            if "--jobset" in operator.extra_args:
                operator.extra_args.remove("--jobset")
            operator.start()

    def evict(self, namespace: str, pod: str) -> None:
        """Evict a Pod through the Eviction API (as `kubectl drain` does): the API server marks it
        DisruptionTarget (EvictionByEvictionAPI) and deletes it."""
        body = {"apiVersion": "policy/v1", "kind": "Eviction", "metadata": {"name": pod, "namespace": namespace}}
        self.kubectl("create", "--raw", f"/api/v1/namespaces/{namespace}/pods/{pod}/eviction", "-f", "-",
                     stdin=json.dumps(body))

    def apply(self, namespace: str, manifest: dict) -> subprocess.CompletedProcess:
        return self.kubectl("-n", namespace, "apply", "-f", "-", stdin=yaml.safe_dump(manifest))

    def get(self, namespace: str, name: str) -> dict:
        return self.api_get(f"/apis/mot.dev/v1alpha1/namespaces/{namespace}/motruns/{name}")

    def motruns(self, namespace: str) -> list[dict]:
        return self.api_get(f"/apis/mot.dev/v1alpha1/namespaces/{namespace}/motruns")["items"]

    def phase(self, namespace: str, name: str) -> str | None:
        return (self.get(namespace, name).get("status") or {}).get("phase")

    def wait_phase(self, namespace: str, name: str, phases: tuple[str, ...], timeout: float = 240) -> dict:
        def reached():
            run = self.get(namespace, name)
            return run if (run.get("status") or {}).get("phase") in phases else None
        try:
            return wait_until(reached, timeout, f"MoTRun {namespace}/{name} to reach {phases}", interval=0.5)
        except AssertionError as error:
            status = (self.get(namespace, name).get("status") or {})
            raise AssertionError(f"{error}\nstatus: {json.dumps(status, indent=1)[:3000]}\n"
                                 f"operator log:\n{self.operator.log_tail()}") from None

    def jobs(self, namespace: str, selector: str | None = None) -> list[dict]:
        """The Jobs in `namespace` (those matching the label selector `selector`, when given)."""
        params = {"labelSelector": selector} if selector else None
        return self.api_get(f"/apis/batch/v1/namespaces/{namespace}/jobs", params)["items"]

    @contextmanager
    def watch_jobs(self, namespace: str):
        """Every Job created in `namespace` while the block runs, as seen by a watch on the apiserver
        (a Job created and deleted again in between is there too): yields a list that fills with
        each new Job's metadata (name, labels...), complete once the block has exited."""
        path = f"{self.cluster.server}/apis/batch/v1/namespaces/{namespace}/jobs"
        version = self.api_get(f"/apis/batch/v1/namespaces/{namespace}/jobs")["metadata"]["resourceVersion"]
        created: list[dict] = []
        stop = threading.Event()
        errors: list[BaseException] = []
        session = requests.Session()  # its own connection: the watch streams in another thread
        session.headers.update(self._session.headers)
        session.verify, session.trust_env = self._session.verify, False

        def watch():
            nonlocal version
            try:
                while True:
                    last = stop.is_set()  # one more round after the block exits: what happened until then
                    with session.get(path, params={"watch": "1", "resourceVersion": version,
                                                   "allowWatchBookmarks": "true", "timeoutSeconds": "1"},
                                     stream=True, timeout=30) as response:
                        response.raise_for_status()
                        for line in response.iter_lines():
                            if not line:
                                continue
                            event = json.loads(line)
                            if event["type"] == "ERROR":
                                raise AssertionError(f"watching the Jobs of {namespace}: {event['object']}")
                            meta = event["object"]["metadata"]
                            version = meta["resourceVersion"]
                            if event["type"] == "ADDED":
                                created.append(meta)
                    if last:
                        return
            except BaseException as error:  # re-raised in the test's thread
                errors.append(error)

        thread = threading.Thread(target=watch, name=f"watch-jobs-{namespace}", daemon=True)
        thread.start()
        try:
            yield created
        finally:
            stop.set()
            thread.join(30)
            session.close()
        if errors:
            raise errors[0]
        assert not thread.is_alive(), f"the watch on the Jobs of {namespace} did not end"

    def pods(self, namespace: str) -> list[dict]:
        return self.api_get(f"/api/v1/namespaces/{namespace}/pods")["items"]

    def events(self, namespace: str, name: str) -> list[dict]:
        """Events about the MoTRun `name` (the core v1 API; events.k8s.io/v1 serves the same ones)."""
        return [{"reason": event.get("reason"), "type": event.get("type"), "message": event.get("message", "")}
                for event in self.api_get(f"/api/v1/namespaces/{namespace}/events")["items"]
                if (event.get("involvedObject") or {}).get("kind") == "MoTRun"
                and event["involvedObject"].get("name") == name]

    @contextmanager
    def no_job_quota(self, namespace: str):
        """A ResourceQuota of 0 Jobs in `namespace`: the apiserver refuses every new Job there (403
        "exceeded quota") until the block exits and the quota is deleted."""
        quota = {"apiVersion": "v1", "kind": "ResourceQuota", "metadata": {"name": "jobs", "namespace": namespace},
                 "spec": {"hard": {"count/jobs.batch": "0"}}}
        self.kubectl("apply", "-f", "-", stdin=json.dumps(quota))
        # The quota controller fills in what is used; until then the apiserver refuses with
        # "status unknown for quota" instead: wait, so the refusal is the real "exceeded quota".
        wait_until(lambda: "count/jobs.batch" in (self.api_get(
            f"/api/v1/namespaces/{namespace}/resourcequotas/jobs").get("status") or {}).get("used", {}),
            30, "the quota's usage to be counted")
        try:
            yield quota
        finally:
            self.kubectl("-n", namespace, "delete", "resourcequota", "jobs", "--ignore-not-found")

    def checkpoint_manifest(self, uri: str) -> dict | None:
        """The mot-manifest.json at a checkpoint URI, after checking every listed file is in S3."""
        bucket, _, prefix = uri[len("s3://"):].partition("/")
        client = self.s3.client()
        try:
            manifest = json.loads(client.get_object(Bucket=bucket, Key=f"{prefix}/mot-manifest.json")["Body"].read())
        except client.exceptions.NoSuchKey:
            return None
        for entry in manifest["files"]:
            size = client.head_object(Bucket=bucket, Key=f"{prefix}/{entry['path']}")["ContentLength"]
            assert size == entry["size"], f"{uri}/{entry['path']}: {size} bytes, manifest says {entry['size']}"
        return manifest


def _upload_folder(s3, folder: Path, bucket: str, prefix: str) -> None:
    client = s3.client()
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            client.upload_file(str(path), bucket, f"{prefix}/{path.relative_to(folder).as_posix()}")


def install_operator_access(cluster: KubeCluster, values: dict | None = None) -> Path:
    """Apply the MoTRun CRD and the chart's ServiceAccount and RBAC (rendered with the Helm SDK) as the
    admin; a kubeconfig with a token of that ServiceAccount, for the operator."""
    cluster.kubectl("apply", "-f", str(CRD))
    cluster.kubectl("wait", "--for=condition=Established", "crd/motruns.mot.dev", "--timeout=60s")
    access = [doc for doc in manifests(values or {}) if doc["kind"] in RBAC_KINDS]
    assert {doc["kind"] for doc in access} >= {"ServiceAccount"}, access
    namespace = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": RELEASE_NAMESPACE}}
    cluster.kubectl("apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List",
                                                           "items": [namespace, *access]}))
    [account] = [doc for doc in access if doc["kind"] == "ServiceAccount"]
    return cluster.service_account_kubeconfig(account["metadata"]["name"], RELEASE_NAMESPACE, create=False,
                                              duration="4h")


@pytest.fixture(scope="session")
def mot_e2e(kube_cluster, kube_node, s3_server, tiny_model, tmp_path_factory):
    """The shared end-to-end stack (see the module docstring)."""
    workdir = tmp_path_factory.mktemp("mot-e2e")
    s3_server.make_bucket(BUCKET)
    _upload_folder(s3_server, Path(tiny_model), BUCKET, "models/student")
    kubeconfig = install_operator_access(kube_cluster)
    # Progress read every second (not the default 15 s), so tests see it move within a short branch;
    # the nodes' GPU memory labels listed every second (not every minute), so a test that labels a
    # node sees the operator use it at once.
    operator = OperatorProcess(kubeconfig, free_port(), workdir,
                               extra_args=["--progress-interval", "1", "--gpu-memory-refresh", "1"])
    prometheus = None
    try:
        operator.start()
        prometheus = start_prometheus(workdir / "prometheus", f"127.0.0.1:{operator.metrics_port}")
        yield MoTE2E(cluster=kube_cluster, s3=s3_server, kubelet=kube_node, operator=operator,
                     prometheus=prometheus, student_uri=f"s3://{BUCKET}/models/student",
                     storage_uri=f"s3://{BUCKET}/runs", workdir=workdir)
    finally:
        operator.stop()
        if prometheus is not None:
            prometheus.stop()

