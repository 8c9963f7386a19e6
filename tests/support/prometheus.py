"""A real Prometheus server (the Debian `prometheus` binary) scraping one 127.0.0.1 target every 1 s.

`start_prometheus(workdir, target)` starts it on a free port with a temporary storage folder and
returns a `PrometheusServer` whose `.query(expr)` goes through the HTTP query API. The fixture
`prometheus_factory` starts servers on demand and stops them at the end of the session. The binary
comes from `apt-get install -y prometheus` (the Makefile's `apt-deps` target); a test using it
fails with that instruction when it is missing.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import requests
import yaml

from support.cluster import _die_with_parent
from support.processes import stop_process

FIXTURES = ("prometheus_factory",)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class PrometheusServer:
    url: str
    process: subprocess.Popen
    workdir: Path
    log: Path = field(repr=False, default=None)

    def query(self, expr: str) -> list[dict]:
        """Instant query; the `result` vector (each item has `metric` and `value`)."""
        response = requests.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=10)
        response.raise_for_status()
        body = response.json()
        if body.get("status") != "success":
            raise RuntimeError(f"query {expr!r} failed: {body}")
        return body["data"]["result"]

    def targets(self) -> list[dict]:
        response = requests.get(f"{self.url}/api/v1/targets", timeout=10)
        response.raise_for_status()
        return response.json()["data"]["activeTargets"]

    def wait_for(self, expr: str, predicate=lambda result: bool(result), timeout: float = 60) -> list[dict]:
        """Poll `expr` until `predicate(result)` holds; the last result, or an error saying what was seen."""
        deadline = time.monotonic() + timeout
        result: list[dict] = []
        while time.monotonic() < deadline:
            result = self.query(expr)
            if predicate(result):
                return result
            time.sleep(0.5)
        raise AssertionError(f"Prometheus query {expr!r} never matched within {timeout}s; last: {result}; "
                             f"targets: {[(t['scrapeUrl'], t['health'], t['lastError']) for t in self.targets()]}")

    def stop(self) -> None:
        stop_process(self.process, timeout=10)


def prometheus_binary() -> str | None:
    return shutil.which("prometheus")


def start_prometheus(workdir: Path, target: str, *, job: str = "mot-operator") -> PrometheusServer:
    """Start Prometheus scraping `target` ("127.0.0.1:PORT", path /metrics) every second."""
    binary = prometheus_binary()
    if binary is None:
        pytest.fail("the `prometheus` binary is missing: `apt-get install -y prometheus` (make apt-deps)")
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / "prometheus.yml"
    config.write_text(yaml.safe_dump({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [{"job_name": job, "scrape_interval": "1s", "scrape_timeout": "1s",
                            "static_configs": [{"targets": [target]}]}],
    }))
    port = free_port()
    log = workdir / "prometheus.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [binary, f"--config.file={config}", f"--storage.tsdb.path={workdir / 'data'}",
             f"--web.listen-address=127.0.0.1:{port}", "--storage.tsdb.retention.time=1h",
             f"--web.console.templates={workdir}", f"--web.console.libraries={workdir}"],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent)
    server = PrometheusServer(url=f"http://127.0.0.1:{port}", process=process, workdir=workdir, log=log)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"prometheus exited with {process.returncode}: {log.read_text()[-2000:]}")
        try:
            if requests.get(f"{server.url}/-/ready", timeout=1).status_code == 200:
                return server
        except requests.RequestException:
            pass
        time.sleep(0.2)
    server.stop()
    raise RuntimeError(f"prometheus did not become ready: {log.read_text()[-2000:]}")


@pytest.fixture(scope="session")
def prometheus_factory(tmp_path_factory):
    """`prometheus_factory(target)` -> a running PrometheusServer scraping that target."""
    servers: list[PrometheusServer] = []

    def make(target: str) -> PrometheusServer:
        server = start_prometheus(tmp_path_factory.mktemp("prometheus"), target)
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.stop()
