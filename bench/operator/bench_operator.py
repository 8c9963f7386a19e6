"""Benchmark the operator: many MoTRuns on a real control plane, Jobs finishing at once.

    .venv/bin/python bench/operator/bench_operator.py --runs 100 --teachers 4 --rounds 2

Starts the real control plane of the tests (tests/support/cluster.py: etcd, kube-apiserver with an
audit log of the operator's requests, kube-controller-manager, kube-scheduler) and the test kubelet
(tests/support/node.py) in `instant` mode (every Pod succeeds as soon as it is bound, with a
trainer-like termination message; the real Job controller then completes its Job), then the real
operator process (`mot operator`, with a token of the chart's ServiceAccount, so RBAC applies),
creates all MoTRuns at once and waits until every one is Succeeded. Reports:
  merge latency   per run and round, from the moment the last branch Job of the round shows a
                  Complete/SuccessCriteriaMet condition to the moment its merge Job exists, both
                  seen by one watch of this script on the namespace's Jobs: p50, p99, max
  API requests    made by the operator (the apiserver's audit log, user = the chart's
                  ServiceAccount), per round
  operator CPU    user+system seconds of the operator process, total and per round
  operator RSS    peak resident memory (VmHWM) of the operator process
Targets: p99 < 1 s, peak RSS < 300 MB. Not part of the test suite (a few minutes).
"""

from __future__ import annotations

import argparse
import collections
import datetime as dt
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import requests

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))

from support.cluster import _die_with_parent, start_cluster  # noqa: E402
from support.mot_e2e import install_operator_access  # noqa: E402
from support.node import LocalNode  # noqa: E402
from support.prometheus import free_port  # noqa: E402

BIN = Path(sys.executable).parent
NAMESPACE = "bench"
OPERATOR_USER = "system:serviceaccount:mot-system:mot-operator"  # the chart's ServiceAccount
AUDIT_POLICY = {"apiVersion": "audit.k8s.io/v1", "kind": "Policy",
                "omitStages": ["RequestReceived", "ResponseStarted"],
                "rules": [{"level": "Metadata", "users": [OPERATOR_USER]}, {"level": "None"}]}


def trainer_message(pod: dict) -> str:
    """What `mot-train` writes to the termination log on success, per stage."""
    stage = pod["metadata"]["labels"].get("mot.dev/stage")
    if stage == "sft":
        return json.dumps({"final_loss": 1.25, "tokens_per_second": 1000.0, "examples_truncated": 0})
    if stage == "merge":
        return json.dumps({"inputs": 4, "tensors": 24})
    return json.dumps({"accuracy": 0.5, "heldout_loss": 1.0, "truncated": 0})


def motrun(name: str, teachers: int, rounds: int) -> dict:
    return {"apiVersion": "mot.dev/v1alpha1", "kind": "MoTRun", "metadata": {"name": name, "namespace": NAMESPACE},
            "spec": {"student": "s3://bench/models/student",
                     "teachers": [{"name": f"t{i}", "dataset": f"s3://bench/data/t{i}.jsonl"} for i in range(teachers)],
                     "rounds": rounds, "training": {"steps": 1},
                     "storage": {"uri": "s3://bench/runs", "endpoint": "http://127.0.0.1:1",
                                 "credentialsSecret": "bench-s3", "pathStyle": True},
                     "retryBackoffSeconds": 0}}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


def admin_session(cluster) -> requests.Session:
    session = requests.Session()
    session.headers["Authorization"] = f"Bearer {cluster.admin_token}"
    session.verify = str(cluster.ca_file)
    session.trust_env = False  # REQUESTS_CA_BUNDLE would replace `verify`
    return session


def probe_api(cluster, stop: threading.Event, samples: list[float]) -> None:
    """How responsive the apiserver itself is: GET a Job list of an empty namespace every 0.1 s."""
    session = admin_session(cluster)
    while not stop.wait(0.1):
        begin = time.monotonic()
        session.get(f"{cluster.server}/apis/batch/v1/namespaces/probe/jobs", timeout=30)
        samples.append(time.monotonic() - begin)


class JobClock:
    """One watch on the namespace's Jobs: when each Job was first seen, and when it first showed a
    Complete or SuccessCriteriaMet condition (time.time(), this script's clock)."""

    def __init__(self, cluster):
        self.cluster = cluster
        self.first_seen: dict[str, float] = {}
        self.complete_at: dict[str, float] = {}
        self.labels: dict[str, dict] = {}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def start(self) -> JobClock:
        self.thread.start()
        return self

    def _loop(self) -> None:
        session = admin_session(self.cluster)
        url = f"{self.cluster.server}/apis/batch/v1/namespaces/{NAMESPACE}/jobs"
        version = None
        while not self.stop.is_set():
            try:
                version = version or session.get(url, timeout=30).json()["metadata"]["resourceVersion"]
                version = self._watch(session, url, version)
            except (requests.RequestException, ValueError) as error:
                print(f"job watch: {error!r}", file=sys.stderr)
                self.stop.wait(0.5)

    def _watch(self, session: requests.Session, url: str, version: str) -> str | None:
        params = {"watch": "true", "resourceVersion": version, "timeoutSeconds": "10", "allowWatchBookmarks": "true"}
        with session.get(url, params=params, stream=True, timeout=(10, 40)) as response:
            response.raise_for_status()
            for line in response.iter_lines():
                if not line:
                    continue
                now = time.time()
                event = json.loads(line)
                if event["type"] == "ERROR":
                    return None  # expired: list again
                job = event["object"]
                version = job["metadata"].get("resourceVersion", version)
                if event["type"] not in ("BOOKMARK", "DELETED"):
                    name = job["metadata"]["name"]
                    self.first_seen.setdefault(name, now)
                    self.labels[name] = job["metadata"].get("labels") or {}
                    if any(c.get("type") in ("Complete", "SuccessCriteriaMet") and c.get("status") == "True"
                           for c in (job.get("status") or {}).get("conditions") or []):
                        self.complete_at.setdefault(name, now)
        return version


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def audit_events(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def audit_time(event: dict) -> float:
    return dt.datetime.fromisoformat(event["requestReceivedTimestamp"].replace("Z", "+00:00")).timestamp()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--teachers", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--stagger", type=float, default=0.0,
                        help="spread the creation of the runs over this many seconds (default: all at once)")
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--trace-slowest", action="store_true",
                        help="print the operator's requests about the slowest run around its merge")
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="mot-bench-operator-"))
    policy, audit_log = workdir / "audit-policy.json", workdir / "audit.log"
    policy.write_text(json.dumps(AUDIT_POLICY))
    cluster = start_cluster(workdir / "cluster", apiserver_args=(
        f"--audit-policy-file={policy}", f"--audit-log-path={audit_log}", "--audit-log-format=json",
        "--audit-log-mode=batch", "--audit-log-maxsize=0"))
    node = None
    operator = None
    log = open(workdir / "operator.log", "wb")
    try:
        kubeconfig = install_operator_access(cluster)
        cluster.kubectl("create", "namespace", NAMESPACE)
        cluster.kubectl("-n", NAMESPACE, "create", "secret", "generic", "bench-s3",
                        "--from-literal=AWS_ACCESS_KEY_ID=bench", "--from-literal=AWS_SECRET_ACCESS_KEY=bench")
        node = LocalNode(cluster, workdir / "node", max_pods=5 * args.runs * (args.teachers + 1),
                         instant=trainer_message).start()
        clock = JobClock(cluster).start()
        session = admin_session(cluster)

        port = free_port()
        env = dict(os.environ, KUBECONFIG=str(kubeconfig))
        operator = subprocess.Popen([str(BIN / "mot"), "operator", "--metrics-port", str(port), "--log-level",
                                     "warning"], env=env, stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            try:
                if requests.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                    break
            except requests.RequestException:
                pass
            time.sleep(0.2)
        else:
            raise SystemExit(f"the operator did not become ready; log: {workdir / 'operator.log'}")
        process = psutil.Process(operator.pid)
        cpu_start = sum(process.cpu_times()[:2])
        started_wall = time.time()

        probe_stop, probe_samples = threading.Event(), []
        threading.Thread(target=probe_api, args=(cluster, probe_stop, probe_samples), daemon=True).start()
        started = time.monotonic()
        for i in range(args.runs):
            if args.stagger:
                time.sleep(max(0.0, started + args.stagger * i / args.runs - time.monotonic()))
            session.post(f"{cluster.server}/apis/mot.dev/v1alpha1/namespaces/{NAMESPACE}/motruns",
                         json=motrun(f"run-{i:03d}", args.teachers, args.rounds), timeout=30).raise_for_status()
        phases: collections.Counter = collections.Counter()
        while time.monotonic() - started < args.timeout:
            items = session.get(f"{cluster.server}/apis/mot.dev/v1alpha1/namespaces/{NAMESPACE}/motruns",
                                timeout=30).json()["items"]
            phases = collections.Counter((item.get("status") or {}).get("phase") for item in items)
            if phases["Succeeded"] + phases["Failed"] == args.runs:
                break
            time.sleep(1)
        elapsed = time.monotonic() - started
        probe_stop.set()
        clock.stop.set()
        cpu = sum(process.cpu_times()[:2]) - cpu_start
        rss = peak_rss_mb(operator.pid)
    finally:
        if operator is not None:
            operator.terminate()
            operator.wait(timeout=30)
        if node is not None:
            node.stop()
        cluster.stop()  # flushes the audit log
        log.close()

    # Merge latency: per run and round, last branch Job complete -> merge Job exists.
    by_round: dict[tuple[str, str], dict] = collections.defaultdict(lambda: {"sft": [], "merge": []})
    for name, labels in clock.labels.items():
        if labels["mot.dev/stage"] in ("sft", "merge"):  # (the preflight, round 0, starts no merge)
            by_round[(labels["mot.dev/run"], labels["mot.dev/round"])][labels["mot.dev/stage"]].append(name)
    latencies, slowest = [], None
    for (run, _round), group in by_round.items():
        if not group["merge"] or len(group["sft"]) < args.teachers or not all(
                name in clock.complete_at for name in group["sft"]):
            continue
        last_branch = max(clock.complete_at[name] for name in group["sft"])
        merge_created = min(clock.first_seen[name] for name in group["merge"])
        latencies.append(merge_created - last_branch)
        if slowest is None or latencies[-1] > slowest[0]:
            slowest = (latencies[-1], run, last_branch, merge_created)

    events = [e for e in audit_events(audit_log) if e.get("user", {}).get("username") == OPERATOR_USER
              and audit_time(e) >= started_wall]
    if args.trace_slowest and slowest:
        # What the operator did for the slowest run between its last branch and its merge Job.
        _, run, begin, end = slowest
        print(f"slowest: {run}: {end - begin:.3f}s; operator requests in that window "
              f"({sum(1 for e in events if begin <= audit_time(e) <= end)} in total):")
        for event in events:
            at = audit_time(event)
            if begin - 0.05 <= at <= end + 0.05 and run in event.get("requestURI", ""):
                print(f"  +{at - begin:7.3f}s {event['verb']:7s} {event['requestURI']}")

    operator_requests: collections.Counter = collections.Counter()
    for event in events:
        ref = event.get("objectRef") or {}
        resource = ref.get("resource", event.get("requestURI", "?"))
        if ref.get("subresource"):
            resource += "/" + ref["subresource"]
        operator_requests[(event["verb"], resource)] += 1
    total_rounds = args.runs * args.rounds
    results = {
        "runs": args.runs, "teachers": args.teachers, "rounds": args.rounds, "stagger_seconds": args.stagger,
        "succeeded": phases["Succeeded"], "failed": phases["Failed"],
        "wall_seconds": round(elapsed, 1),
        "merge_latency_seconds": {
            "samples": len(latencies),
            "p50": round(statistics.median(latencies), 3) if latencies else None,
            "p99": round(percentile(latencies, 99), 3) if latencies else None,
            "max": round(max(latencies), 3) if latencies else None},
        "api_server_probe_latency_seconds": {
            "samples": len(probe_samples), "p50": round(statistics.median(probe_samples), 3),
            "p99": round(percentile(probe_samples, 99), 3)},
        "operator_requests_total": sum(operator_requests.values()),
        "operator_requests_per_round": round(sum(operator_requests.values()) / total_rounds, 1),
        "operator_requests_by_verb": {f"{verb} {resource}": count for (verb, resource), count
                                      in sorted(operator_requests.items(), key=lambda kv: -kv[1]) if count},
        "operator_cpu_seconds": round(cpu, 1),
        "operator_cpu_seconds_per_round": round(cpu / total_rounds, 3),
        "operator_peak_rss_mb": round(rss, 1),
        "operator_log": str(workdir / "operator.log"),
    }
    print(json.dumps(results, indent=2))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    ok = (phases["Succeeded"] == args.runs and latencies and results["merge_latency_seconds"]["p99"] < 1.0
          and rss < 300)
    print("targets (all Succeeded, p99 < 1 s, peak RSS < 300 MB):", "met" if ok else "NOT met")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
