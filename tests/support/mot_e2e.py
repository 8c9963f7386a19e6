"""The whole product on real parts, for end-to-end tests: the test API server (kube.py), the test
kubelet running `mot-train` as local processes (kubelet.py), a real SeaweedFS S3 (s3.py), the real
operator process (`mot operator`, KUBECONFIG pointing at the test API server) and a real Prometheus
scraping the operator's /metrics. One `mot_e2e` stack is shared by the session; each test works in
its own namespace (`mot_e2e.namespace()`).
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import requests
import yaml

from support.kube import ApiError
from support.kubelet import LocalKubelet
from support.processes import stop_process, wait_until
from support.prometheus import PrometheusServer, free_port, start_prometheus

FIXTURES = ("mot_e2e",)

BIN = Path(sys.executable).parent
BUCKET = "mot-e2e"
CREDENTIALS_SECRET = "mot-s3"


@dataclass
class OperatorProcess:
    """`mot operator` as a real subprocess against the test API server."""

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
                 *self.extra_args], env=env, stdout=out, stderr=subprocess.STDOUT)
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
    kube_api: object
    s3: object
    kubelet: LocalKubelet
    operator: OperatorProcess
    prometheus: PrometheusServer
    student_uri: str
    storage_uri: str
    workdir: Path

    # -- clients -----------------------------------------------------------------------------
    def kubectl(self, *args: str, stdin: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
        env = dict(os.environ, KUBECONFIG=str(self.kube_api.kubeconfig))
        done = subprocess.run([str(BIN / "kubectl"), *args], env=env, input=stdin, capture_output=True,
                              text=True, timeout=60)
        if check and done.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed: {done.stderr}")
        return done

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

    def apply(self, namespace: str, manifest: dict) -> subprocess.CompletedProcess:
        return self.kubectl("-n", namespace, "apply", "-f", "-", stdin=yaml.safe_dump(manifest))

    def get(self, namespace: str, name: str) -> dict:
        return json.loads(self.kubectl("-n", namespace, "get", "motrun", name, "-o", "json").stdout)

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

    def fail_next(self, verb: str, plural: str, code: int = 500, *, times: int = 1, match=None) -> list:
        """Make the test API server answer the next `times` matching requests with an error; the
        returned fault's last item counts the failures still to come."""
        error = ApiError(code, "InternalError" if code >= 500 else "BadRequest", f"injected {code} for a test")
        server = self.kube_api.server
        self.kube_api.call(lambda: server.fail_next(verb, plural, error, times=times, match=match))
        return server.faults[-1]

    def jobs(self, namespace: str) -> list[dict]:
        return self.kube_api.objects("batch/v1", "jobs", namespace)

    def events(self, namespace: str, name: str) -> list[dict]:
        """Events about the MoTRun from both Event APIs (core v1 and events.k8s.io)."""
        found = []
        for event in self.kube_api.objects("v1", "events", namespace):
            if (event.get("involvedObject") or {}).get("name") == name:
                found.append({"reason": event.get("reason"), "type": event.get("type"),
                              "message": event.get("message", "")})
        for event in self.kube_api.objects("events.k8s.io/v1", "events", namespace):
            if (event.get("regarding") or {}).get("name") == name:
                found.append({"reason": event.get("reason"), "type": event.get("type"),
                              "message": event.get("note", "")})
        return found

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


@pytest.fixture(scope="session")
def mot_e2e(kube_api, s3_server, tiny_model, tmp_path_factory):
    """The shared end-to-end stack (see the module docstring)."""
    workdir = tmp_path_factory.mktemp("mot-e2e")
    s3_server.make_bucket(BUCKET)
    _upload_folder(s3_server, Path(tiny_model), BUCKET, "models/student")
    kubelet = LocalKubelet(kube_api.url, workdir / "kubelet", max_parallel=2).start()
    operator = OperatorProcess(kube_api.kubeconfig, free_port(), workdir)
    prometheus = None
    try:
        operator.start()
        prometheus = start_prometheus(workdir / "prometheus", f"127.0.0.1:{operator.metrics_port}")
        yield MoTE2E(kube_api=kube_api, s3=s3_server, kubelet=kubelet, operator=operator, prometheus=prometheus,
                     student_uri=f"s3://{BUCKET}/models/student", storage_uri=f"s3://{BUCKET}/runs",
                     workdir=workdir)
    finally:
        operator.stop()
        kubelet.stop()
        if prometheus is not None:
            prometheus.stop()
