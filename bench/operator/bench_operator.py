"""Benchmark the operator: many MoTRuns on the test API server, Jobs finishing at once.

    .venv/bin/python bench/operator/bench_operator.py --runs 100 --teachers 4 --rounds 2

Starts the test API server (tests/support/kube.py, kmock underneath) and the test kubelet in
`instant` mode (every Job succeeds as soon as it is seen, with a trainer-like termination message),
then the real operator process (`mot operator`), creates all MoTRuns at once and waits until every
one is Succeeded. Reports:
  merge latency   per run and round, time from the last branch Job's completion (written by the
                  kubelet) to the merge Job's creation (stamped by the API server): p50, p99, max
  API requests    made by the operator (everything but the kubelet and this script), per round
  operator CPU    user+system seconds of the operator process, total and per round
  operator RSS    peak resident memory (VmHWM) of the operator process
Targets: p99 < 1 s, peak RSS < 300 MB. Not part of the test suite (about a minute or two).
"""

from __future__ import annotations

import argparse
import collections
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

from support.kube import start_kube_api  # noqa: E402
from support.kubelet import LocalKubelet  # noqa: E402
from support.prometheus import free_port  # noqa: E402

BIN = Path(sys.executable).parent
NAMESPACE = "bench"
KUBELET_AGENT = "python-requests"  # the kubelet's and this script's requests


def trainer_message(job: dict) -> str:
    """What `mot-train` writes to the termination log on success, per stage."""
    stage = job["metadata"]["labels"].get("mot.dev/stage")
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
                                 "credentialsSecret": "none", "pathStyle": True},
                     "retryBackoffSeconds": 0}}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


def probe_api(url: str, stop: threading.Event, samples: list[float]) -> None:
    """How responsive the test API server itself is: GET a Job list of an empty namespace every 0.1 s."""
    session = requests.Session()
    while not stop.wait(0.1):
        begin = time.monotonic()
        session.get(f"{url}/apis/batch/v1/namespaces/probe/jobs", timeout=30)
        samples.append(time.monotonic() - begin)


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--teachers", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--stagger", type=float, default=0.0,
                        help="spread the creation of the runs over this many seconds (default: all at once)")
    parser.add_argument("--kubelet-workers", type=int, default=4)
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--trace-slowest", action="store_true",
                        help="print the API requests about the slowest run around its merge")
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="mot-bench-operator-"))
    kube = start_kube_api(workdir)
    kubelet = LocalKubelet(kube.url, workdir / "kubelet", max_parallel=args.kubelet_workers, instant=True,
                           instant_message=trainer_message).start()
    session = requests.Session()
    session.post(f"{kube.url}/api/v1/namespaces", json={"metadata": {"name": NAMESPACE}}).raise_for_status()

    port = free_port()
    log = open(workdir / "operator.log", "wb")  # noqa: SIM115 - closed at the end
    env = dict(os.environ, KUBECONFIG=str(kube.kubeconfig))
    operator = subprocess.Popen([str(BIN / "mot"), "operator", "--metrics-port", str(port), "--log-level", "warning"],
                                env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
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
        kube.call(lambda: setattr(kube.server, "journal", []))
        process = psutil.Process(operator.pid)
        cpu_start = sum(process.cpu_times()[:2])
        requests_start = kube.requests()

        probe_stop, probe_samples = threading.Event(), []
        threading.Thread(target=probe_api, args=(kube.url, probe_stop, probe_samples), daemon=True).start()
        started = time.monotonic()
        for i in range(args.runs):
            if args.stagger:
                time.sleep(max(0.0, started + args.stagger * i / args.runs - time.monotonic()))
            session.post(f"{kube.url}/apis/mot.dev/v1alpha1/namespaces/{NAMESPACE}/motruns",
                         json=motrun(f"run-{i:03d}", args.teachers, args.rounds)).raise_for_status()
        phases: collections.Counter = collections.Counter()
        while time.monotonic() - started < args.timeout:
            items = session.get(f"{kube.url}/apis/mot.dev/v1alpha1/namespaces/{NAMESPACE}/motruns").json()["items"]
            phases = collections.Counter((item.get("status") or {}).get("phase") for item in items)
            if phases["Succeeded"] + phases["Failed"] == args.runs:
                break
            time.sleep(1)
        elapsed = time.monotonic() - started
        probe_stop.set()
        cpu = sum(process.cpu_times()[:2]) - cpu_start
        rss = peak_rss_mb(operator.pid)
        requests_end = kube.requests()
    finally:
        operator.terminate()
        operator.wait(timeout=30)
        kubelet.stop()
        log.close()

    # Merge latency: per run and round, last branch completion -> merge Job created.
    created = kube.call(lambda: dict(kube.server.created_at))
    jobs = kube.objects("batch/v1", "jobs", NAMESPACE)
    by_round: dict[tuple[str, str], dict] = collections.defaultdict(lambda: {"sft": [], "merge": []})
    for job in jobs:
        labels = job["metadata"]["labels"]
        by_round[(labels["mot.dev/run"], labels["mot.dev/round"])][labels["mot.dev/stage"]].append(
            job["metadata"]["name"])
    latencies, slowest = [], None
    for (run, _round), group in by_round.items():
        if not group["merge"] or len(group["sft"]) < args.teachers:
            continue
        last_branch = max(kubelet.completed_at[(NAMESPACE, name)] for name in group["sft"])
        merge_created = min(created[("jobs", NAMESPACE, name)] for name in group["merge"])
        latencies.append(merge_created - last_branch)
        if slowest is None or latencies[-1] > slowest[0]:
            slowest = (latencies[-1], run, last_branch, merge_created)
    if args.trace_slowest and slowest:
        # What the operator did for the slowest run between its last branch and its merge Job.
        _, run, begin, end = slowest
        journal = kube.call(lambda: list(kube.server.journal))
        print(f"slowest: {run}: {end - begin:.3f}s; operator requests in that window "
              f"({sum(1 for t, a, _, _ in journal if begin <= t <= end and a != KUBELET_AGENT)} in total):")
        for t, agent, verb, path in journal:
            if begin - 0.05 <= t <= end + 0.05 and (run in path or "pods?" in path and run in path.replace("%2F", "/")):
                print(f"  +{t - begin:7.3f}s {agent:18s} {verb:7s} {path}")

    operator_requests = collections.Counter()
    for (agent, verb, resource), count in requests_end.items():
        if agent != KUBELET_AGENT:
            operator_requests[(verb, resource)] += count - requests_start.get((agent, verb, resource), 0)
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
