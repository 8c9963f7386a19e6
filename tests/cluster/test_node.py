"""The test kubelet (support/node.py) against the real control plane: it registers a Ready Node with
GPUs and keeps its Lease fresh; the real scheduler binds Pods to it (or leaves them Unschedulable);
it runs their container commands as processes with the container's env; and the real Job
controller decides each Job from the Pod status it reports: exit 0 -> Complete, exit 2 -> Failed
by the podFailurePolicy, exit 1 retried within backoffLimit then BackoffLimitExceeded; suspension
and activeDeadlineSeconds delete the running Pod, whose process the kubelet stops. Each Pod has its
own IP; an unresolvable image stays in ErrImagePull / ImagePullBackOff; a memory limit is enforced
(OOMKilled); `kubectl logs` reads the container's output through the apiserver."""

from __future__ import annotations

import base64
import json
import subprocess
import threading
import time
from pathlib import Path

import kubernetes
import pytest
import requests
from support.cluster import KUBECTL, free_port
from support.processes import wait_until

pytestmark = pytest.mark.e2e


def job(name: str, code: str, *, backoff_limit: int = 0, env=None, suspend: bool = False, gpus: int = 0,
        deadline: int | None = None, annotations=None, memory: str | None = None) -> dict:
    """A Job running `python -c code` the way the operator's Jobs are built (podFailurePolicy: exit 2
    fails the Job, a disruption is not counted; an emptyDir at /tmp; FallbackToLogsOnError)."""
    container = {"name": "main", "image": "python:3.11", "command": ["python", "-c", code], "env": env or [],
                 "terminationMessagePolicy": "FallbackToLogsOnError",
                 "volumeMounts": [{"name": "scratch", "mountPath": "/tmp"}]}
    limits = {**({"nvidia.com/gpu": str(gpus)} if gpus else {}), **({"memory": memory} if memory else {})}
    if limits:
        container["resources"] = {"limits": limits}
    spec = {"backoffLimit": backoff_limit, "suspend": suspend,
            "podFailurePolicy": {"rules": [
                {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
                {"action": "FailJob", "onExitCodes": {"containerName": "main", "operator": "In", "values": [2]}}]},
            "template": {"metadata": {"labels": {"app": name}, "annotations": annotations or {}},
                         "spec": {"restartPolicy": "Never", "volumes": [{"name": "scratch", "emptyDir": {}}],
                                  "containers": [container]}}}
    if deadline:
        spec["activeDeadlineSeconds"] = deadline
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": name}, "spec": spec}


def bare_pod(name: str, command: list[str], *, image: str = "python:3.11", env=None) -> dict:
    """A Pod of one container, no controller (restartPolicy Never, as the test kubelet runs)."""
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": {"app": name}},
            "spec": {"restartPolicy": "Never", "terminationGracePeriodSeconds": 5,
                     "containers": [{"name": "main", "image": image, "command": command, "env": env or []}]}}


def create(cluster, namespace: str, *objects: dict) -> None:
    cluster.kubectl("-n", namespace, "create", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List",
                                                                             "items": list(objects)}))


def conditions(cluster, namespace: str, name: str) -> dict:
    status = cluster.get_json("job", name, "-n", namespace).get("status") or {}
    return {c["type"]: c for c in status.get("conditions") or [] if c["status"] == "True"}


def pods(cluster, namespace: str, job_name: str) -> list[dict]:
    return cluster.get_json("pods", "-n", namespace, "-l", f"batch.kubernetes.io/job-name={job_name}")["items"]


def test_the_node_registers_ready_with_gpus_and_renews_its_lease(kube_cluster, kube_node):
    print(f"\nnode {kube_node.name} Ready and untainted {kube_node.startup_seconds:.1f}s after registering")
    node = kube_cluster.get_json("node", kube_node.name)
    assert node["status"]["allocatable"]["nvidia.com/gpu"] == "8"
    ready = next(c for c in node["status"]["conditions"] if c["type"] == "Ready")
    assert (ready["status"], ready["reason"]) == ("True", "KubeletReady")
    assert not [t for t in node["spec"].get("taints") or [] if t["effect"] in ("NoSchedule", "NoExecute")]

    def renew_time():
        return kube_cluster.get_json("lease", kube_node.name, "-n", "kube-node-lease")["spec"]["renewTime"]
    first = renew_time()
    wait_until(lambda: renew_time() != first, 3 * kube_node.heartbeat_seconds, "the node's Lease to be renewed")


def test_exit_codes_decided_by_the_real_job_controller(kube_cluster, kube_node, namespace, tmp_path):
    cluster = kube_cluster
    secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "creds"},
              "data": {"KEY": base64.b64encode(b"s3cr3t").decode()}}
    env = [{"name": "FROM_SECRET", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "KEY"}}},
           {"name": "OPTIONAL", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "NOPE", "optional": True}}},
           {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
           {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
           {"name": "APP", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['app']"}}},
           {"name": "NOTE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.annotations['note']"}}},
           {"name": "WORK", "value": "/tmp/work"}]
    report = ("import json, os, sys\n"
              "keys = ['FROM_SECRET', 'OPTIONAL', 'POD_NAME', 'POD_NAMESPACE', 'APP', 'NOTE', 'WORK']\n"
              "os.makedirs(os.environ['WORK'])\n"
              "open(os.environ['MOT_TERMINATION_LOG'], 'w').write(json.dumps({k: os.environ.get(k) for k in keys}))\n")
    marker = tmp_path / "flaky-ran-once"   # the processes run here: a host path is shared by both attempts
    flaky = (f"import os, sys, pathlib\nmarker = pathlib.Path({str(marker)!r})\n"
             "if not marker.exists():\n    marker.touch()\n    print('first attempt fails', file=sys.stderr)\n"
             "    sys.exit(1)\n")
    create(cluster, namespace, secret,
           job("ok", report, env=env, annotations={"note": "hello"}),
           job("invalid", "import sys\nprint('bad input: line 1 is not JSON')\nsys.exit(2)", backoff_limit=3),
           job("flaky", flaky, backoff_limit=1),
           job("doomed", "import sys; sys.exit(1)", backoff_limit=1))

    ok = wait_until(lambda: conditions(cluster, namespace, "ok").get("Complete"), 60, "ok to complete")
    assert ok["reason"] == "CompletionsReached"
    assert conditions(cluster, namespace, "ok")["SuccessCriteriaMet"]
    [pod] = pods(cluster, namespace, "ok")
    assert pod["spec"]["nodeName"] == kube_node.name and pod["status"]["phase"] == "Succeeded"
    terminated = pod["status"]["containerStatuses"][0]["state"]["terminated"]
    assert (terminated["exitCode"], terminated["reason"]) == (0, "Completed")
    seen = json.loads(terminated["message"])
    work = seen.pop("WORK")
    assert seen == {"FROM_SECRET": "s3cr3t", "OPTIONAL": None, "POD_NAME": pod["metadata"]["name"],
                    "POD_NAMESPACE": namespace, "APP": "ok", "NOTE": "hello"}
    assert work.startswith(str(kube_node.workdir)) and work.endswith("/scratch/work")  # the emptyDir
    assert {c["type"]: c["status"] for c in pod["status"]["conditions"]}["Ready"] == "False"

    # Exit code 2 matches the FailJob rule: Failed at once, backoffLimit 3 notwithstanding.
    invalid = wait_until(lambda: conditions(cluster, namespace, "invalid").get("Failed"), 60, "invalid to fail")
    print(f"\ninvalid: {invalid['reason']}: {invalid['message']}")
    assert invalid["reason"] == "PodFailurePolicy"
    assert "failed with exit code 2 matching FailJob rule at index 1" in invalid["message"]
    [pod] = pods(cluster, namespace, "invalid")
    terminated = pod["status"]["containerStatuses"][0]["state"]["terminated"]
    assert terminated["exitCode"] == 2 and terminated["message"] == "bad input: line 1 is not JSON"  # the log tail

    # Exit code 1 is retried (after the Job controller's pod backoff) within backoffLimit 1.
    wait_until(lambda: conditions(cluster, namespace, "flaky").get("Complete"), 90, "flaky to complete")
    status = cluster.get_json("job", "flaky", "-n", namespace)["status"]
    assert (status.get("failed"), status.get("succeeded")) == (1, 1)
    assert [r.exit_code for r in kube_node.runs_of("flaky", namespace)] == [1, 0]
    assert kube_node.runs_of("flaky", namespace)[0].message == "first attempt fails"
    doomed = wait_until(lambda: conditions(cluster, namespace, "doomed").get("Failed"), 90, "doomed to fail")
    print(f"doomed: {doomed['reason']}: {doomed['message']}")
    assert doomed["reason"] == "BackoffLimitExceeded"
    assert [r.exit_code for r in kube_node.runs_of("doomed", namespace)] == [1, 1]
    assert not kube_node.errors


def test_more_gpus_than_the_node_has_stay_unschedulable(kube_cluster, kube_node, namespace):
    cluster = kube_cluster
    create(cluster, namespace, job("greedy", "pass", gpus=kube_node.gpus + 1),
           job("fits", "pass", gpus=kube_node.gpus))

    def unschedulable():
        for pod in pods(cluster, namespace, "greedy"):
            for condition in pod["status"].get("conditions") or []:
                if condition["type"] == "PodScheduled" and condition.get("reason") == "Unschedulable":
                    return condition
        return None
    condition = wait_until(unschedulable, 60, "the greedy Pod to be Unschedulable")
    print(f"\ngreedy: {condition['message']}")
    assert "Insufficient nvidia.com/gpu" in condition["message"]
    wait_until(lambda: conditions(cluster, namespace, "fits").get("Complete"), 60, "fits to complete")
    assert kube_node.runs_of("greedy", namespace) == []
    [pod] = pods(cluster, namespace, "greedy")
    assert pod["status"]["phase"] == "Pending" and not pod["spec"].get("nodeName")


def test_suspension_and_deadline_stop_the_running_process(kube_cluster, kube_node, namespace):
    cluster = kube_cluster
    sleeper = "import time\nprint('started', flush=True)\ntime.sleep(300)"
    create(cluster, namespace, job("napper", sleeper), job("late", sleeper, deadline=3))

    def running(name):
        runs = kube_node.runs_of(name, namespace)
        return runs if runs and runs[-1].started and runs[-1].exit_code is None else None
    [first] = wait_until(lambda: running("napper"), 60, "napper's process to run")
    started = time.monotonic()
    cluster.kubectl("-n", namespace, "patch", "job", "napper", "--type=merge", "-p", '{"spec": {"suspend": true}}')
    wait_until(lambda: conditions(cluster, namespace, "napper").get("Suspended"), 60, "napper to be Suspended")
    wait_until(lambda: first.exit_code is not None, 30, "the suspended Job's process to stop")
    assert first.deleted and first.exit_code == 143  # SIGTERM, within the grace period
    wait_until(lambda: not pods(cluster, namespace, "napper"), 30, "the Pod to be deleted")
    print(f"\nsuspend -> process stopped and Pod gone in {time.monotonic() - started:.1f}s")
    status = cluster.get_json("job", "napper", "-n", namespace)["status"]
    assert not status.get("failed") and not status.get("active")  # a suspension is not a failure

    cluster.kubectl("-n", namespace, "patch", "job", "napper", "--type=merge", "-p", '{"spec": {"suspend": false}}')
    runs = wait_until(lambda: running("napper"), 60, "napper to run again after resuming")
    assert len(runs) == 2 and runs[1].pod != first.pod

    late = wait_until(lambda: conditions(cluster, namespace, "late").get("Failed"), 60, "late to hit its deadline")
    print(f"late: {late['reason']}: {late['message']}")
    assert late["reason"] == "DeadlineExceeded"
    wait_until(lambda: all(r.exit_code is not None for r in kube_node.runs_of("late", namespace)), 30,
               "late's process to be stopped")
    cluster.kubectl("-n", namespace, "delete", "job", "napper", "--cascade=foreground", "--timeout=60s")
    assert kube_node.runs_of("napper", namespace)[-1].exit_code == 143
    assert Path(kube_node.runs_of("late", namespace)[0].log).read_text().startswith("started")
    assert not kube_node.errors


def test_a_missing_secret_keeps_the_container_waiting_until_it_exists(kube_cluster, kube_node, namespace):
    cluster = kube_cluster
    env = [{"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "late", "key": "TOKEN"}}}]
    create(cluster, namespace, job("patient", "import os, sys; sys.exit(0 if os.environ['TOKEN'] == 't' else 1)",
                                   env=env))

    def waiting():
        for pod in pods(cluster, namespace, "patient"):
            for status in pod["status"].get("containerStatuses") or []:
                state = status["state"].get("waiting") or {}
                if state.get("reason") == "CreateContainerConfigError":
                    return pod, state
        return None
    pod, state = wait_until(waiting, 60, "the container to wait for its Secret")
    assert state["message"] == 'secret "late" not found' and pod["status"]["phase"] == "Pending"
    assert [r.started for r in kube_node.runs_of("patient", namespace)] == [0.0]  # not started

    cluster.kubectl("-n", namespace, "create", "secret", "generic", "late", "--from-literal=TOKEN=t")
    wait_until(lambda: conditions(cluster, namespace, "patient").get("Complete"), 60, "patient to complete")
    assert [r.exit_code for r in kube_node.runs_of("patient", namespace)] == [0]


def container_state(cluster, namespace: str, name: str) -> dict:
    statuses = (cluster.get_json("pod", name, "-n", namespace).get("status") or {}).get("containerStatuses") or [{}]
    return statuses[0].get("state") or {}


# A server on the Pod's address ($MOT_METRICS_ADDRESS) and the port given as --metrics-port (not rewritten).
SERVE = ("import http.server, os, sys\n"
         "port = int(sys.argv[sys.argv.index('--metrics-port') + 1])\n"
         "class Hello(http.server.BaseHTTPRequestHandler):\n"
         "    def do_GET(self):\n"
         "        body = f\"{os.environ['POD_NAME']} {os.environ['POD_IP']} {port}\".encode()\n"
         "        self.send_response(200)\n"
         "        self.send_header('Content-Length', str(len(body)))\n"
         "        self.end_headers()\n"
         "        self.wfile.write(body)\n"
         "http.server.HTTPServer((os.environ['MOT_METRICS_ADDRESS'], port), Hello).serve_forever()\n")


def test_each_pod_has_its_own_ip_and_serves_on_the_same_port(kube_cluster, kube_node, namespace):
    cluster = kube_cluster
    port = free_port()
    env = [{"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
           {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}]
    names = ("web-a", "web-b")
    create(cluster, namespace, *(bare_pod(name, ["python", "-c", SERVE, "--metrics-port", str(port)], env=env)
                                 for name in names))

    def answer(name):
        pod = cluster.get_json("pod", name, "-n", namespace)
        ip = pod["status"].get("podIP")
        if pod["status"].get("phase") != "Running" or not ip:
            return None
        try:
            return ip, pod["status"]["podIPs"], requests.get(f"http://{ip}:{port}/", timeout=2).text
        except requests.RequestException:
            return None  # not listening yet
    served = {name: wait_until(lambda name=name: answer(name), 60, f"{name} to serve on its podIP") for name in names}
    print(f"\n{served}")
    for name, (ip, ips, text) in served.items():
        assert ip.startswith("127.") and ip != "127.0.0.1" and ips == [{"ip": ip}]
        assert text == f"{name} {ip} {port}"   # both processes at once, each on its own address, same port
    assert served["web-a"][0] != served["web-b"][0]
    assert all(r.exit_code is None for r in kube_node.runs if r.namespace == namespace)  # neither collided
    host_ip = cluster.get_json("pod", "web-a", "-n", namespace)["status"]["hostIP"]
    assert host_ip == "127.0.0.1"
    cluster.kubectl("-n", namespace, "delete", "pod", *names, "--timeout=60s")
    assert sorted(r.exit_code for r in kube_node.runs if r.namespace == namespace) == [143, 143]  # SIGTERM
    assert not kube_node.errors


def test_an_unresolvable_image_backs_off_until_deleted(kube_cluster, kube_node, namespace):
    cluster = kube_cluster
    image = "registry.mot.invalid/trainer:v1"
    create(cluster, namespace, bare_pod("unpullable", ["python", "-c", "print('never')"], image=image))
    # Every waiting reason the Pod goes through, from a watch (each lasts a second or two).
    watch = subprocess.Popen(
        [str(KUBECTL), "get", "pod", "unpullable", "-n", namespace, "--watch", "-o",
         "jsonpath={.status.containerStatuses[0].state.waiting.reason}{'|'}"
         "{.status.containerStatuses[0].state.waiting.message}{'\\n'}"],
        stdout=subprocess.PIPE, text=True, env=cluster.env())
    seen: list[tuple[str, str]] = []
    reader = threading.Thread(target=lambda: seen.extend(tuple(line.rstrip("\n").split("|", 1))
                                                         for line in watch.stdout), daemon=True)
    reader.start()
    try:
        def alternated():
            reasons = [reason for reason, _ in seen if reason]
            changes = [r for i, r in enumerate(reasons) if i == 0 or reasons[i - 1] != r]
            return changes if changes[-3:] == ["ErrImagePull", "ImagePullBackOff", "ErrImagePull"] else None
        changes = wait_until(alternated, 60, "ErrImagePull, ImagePullBackOff, ErrImagePull again",
                             on_timeout=lambda: repr(seen))
    finally:
        watch.terminate()
        watch.wait(10)
    print(f"\nwaiting reasons: {changes}")
    messages = dict((reason, message) for reason, message in seen if reason)
    assert messages["ErrImagePull"] == (
        f'rpc error: code = Unknown desc = failed to pull and unpack image "{image}": failed to resolve reference '
        f'"{image}": failed to do request: Head "https://registry.mot.invalid/v2/trainer/manifests/v1": '
        "dial tcp: lookup registry.mot.invalid: no such host")
    assert messages["ImagePullBackOff"] == f'Back-off pulling image "{image}"'
    pod = cluster.get_json("pod", "unpullable", "-n", namespace)
    assert pod["status"]["phase"] == "Pending"
    assert {c["type"]: c["status"] for c in pod["status"]["conditions"]}["Ready"] == "False"
    [run] = [r for r in kube_node.runs if r.namespace == namespace]
    assert not run.started and run.exit_code is None
    logs = cluster.kubectl("-n", namespace, "logs", "unpullable", check=False)
    assert logs.returncode != 0
    assert 'container "main" in pod "unpullable" is waiting to start: trying and failing to pull image' \
        in logs.stderr, logs.stderr

    cluster.kubectl("-n", namespace, "delete", "pod", "unpullable", "--timeout=60s")
    assert run.exit_code == 137 and run.deleted and not run.started  # it never ran
    assert not kube_node.errors


def test_a_container_over_its_memory_limit_is_oom_killed(kube_cluster, kube_node, namespace):
    cluster = kube_cluster
    # bytes * n writes every page (a zeroed bytearray would be lazily mapped, not resident).
    hog = "import time\ndata = b'x' * (200 * 2**20)\nprint('allocated', flush=True)\ntime.sleep(120)"
    create(cluster, namespace, job("hog", hog, memory="64Mi"), job("frugal", "print('ok')", memory="64Mi"))
    failed = wait_until(lambda: conditions(cluster, namespace, "hog").get("Failed"), 60, "hog to fail")
    assert failed["reason"] == "BackoffLimitExceeded"
    [pod] = pods(cluster, namespace, "hog")
    terminated = pod["status"]["containerStatuses"][0]["state"]["terminated"]
    print(f"\nhog: {terminated}")
    assert pod["status"]["phase"] == "Failed"
    assert (terminated["reason"], terminated["exitCode"]) == ("OOMKilled", 137)
    [run] = kube_node.runs_of("hog", namespace)
    assert run.finished - run.started < 30  # killed, not slept out
    wait_until(lambda: conditions(cluster, namespace, "frugal").get("Complete"), 60, "frugal to complete")
    assert not kube_node.errors


def test_container_logs_through_the_apiserver(kube_cluster, kube_node, namespace):
    cluster = kube_cluster
    node = cluster.get_json("node", kube_node.name)
    assert node["status"]["daemonEndpoints"]["kubeletEndpoint"]["Port"] == kube_node.kubelet_port > 0
    assert {(a["type"], a["address"]) for a in node["status"]["addresses"]} == {
        ("InternalIP", "127.0.0.1"), ("Hostname", kube_node.name)}

    talk = ("import sys, time\n"
            "for i in range(8):\n"
            "    print(f'line {i}', flush=True)\n"
            "    time.sleep(0.4)\n"
            "print('to stderr', file=sys.stderr)\n")
    expected = "".join(f"line {i}\n" for i in range(8)) + "to stderr\n"
    # Held: Running, its command not started, so `kubectl logs -f` is attached before the first line.
    release = kube_node.hold(lambda pod: pod["metadata"]["namespace"] == namespace
                             and pod["metadata"]["name"] == "talker")
    create(cluster, namespace, bare_pod("talker", ["python", "-c", talk]))
    wait_until(lambda: container_state(cluster, namespace, "talker").get("running"), 60, "talker Running")
    follow = subprocess.Popen([str(KUBECTL), "logs", "-f", "-n", namespace, "talker"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=cluster.env())
    time.sleep(1)
    assert follow.poll() is None  # still following: the container runs and has printed nothing
    started = time.monotonic()
    release.set()
    out, err = follow.communicate(timeout=60)
    print(f"\nkubectl logs -f returned {time.monotonic() - started:.1f}s after the command started")
    assert (follow.returncode, out) == (0, expected), err
    wait_until(lambda: container_state(cluster, namespace, "talker").get("terminated"), 30, "talker to end")

    assert cluster.kubectl("logs", "-n", namespace, "talker").stdout == expected
    core = kubernetes.client.CoreV1Api(kubernetes.config.new_client_from_config(str(cluster.kubeconfig)))
    # Unpreloaded: the client's decoded form of a followed log is str(bytes) in this client version.
    response = core.read_namespaced_pod_log("talker", namespace, follow=True, tail_lines=3, _preload_content=False)
    assert response.read().decode() == "line 6\nline 7\nto stderr\n"
    assert cluster.kubectl("logs", "-n", namespace, "talker", "--tail=2").stdout == "line 7\nto stderr\n"
    assert cluster.kubectl("logs", "-n", namespace, "talker", "--limit-bytes=10").stdout == "line 0\nlin"
    assert cluster.kubectl("logs", "-n", namespace, "talker", "--tail=0").stdout == ""
    previous = cluster.kubectl("logs", "-n", namespace, "talker", "--previous", check=False)
    assert previous.returncode != 0 and 'previous terminated container "main" in pod "talker" not found' \
        in previous.stderr, previous.stderr
    assert not kube_node.errors
