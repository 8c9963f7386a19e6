"""kubectl-mot: a kubectl plugin for MoTRuns (`kubectl mot status|logs ...` once `kubectl-mot` is on PATH).

  kubectl mot status NAME [-o table|json|yaml] [-w]     the run's rounds, branches, merges and why it waits
  kubectl mot logs NAME --teacher T [--round R] [-f]    the log of a branch's Pod (or --stage merge|eval|preflight)

Cluster flags as kubectl's: --kubeconfig, --context, -n/--namespace (default: the context's namespace).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time

import yaml

from . import naming, status_table

# As in spec.py; not imported from there so the plugin starts without the CRD-schema machinery.
GROUP, VERSION, PLURAL = "mot.dev", "v1alpha1", "motruns"
COMPLETION_INDEX = "batch.kubernetes.io/job-completion-index"
INCLUSTER_NAMESPACE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"
STAGE_CHOICES = ("sft", "merge", "eval", "preflight")


class CommandError(Exception):
    """A one-line error for the user; exit status 1."""


# ---------------------------------------------------------------------------------------------
# Command line


def _cluster_flags(parser: argparse.ArgumentParser, default) -> None:
    # Accepted before and after the subcommand, as kubectl accepts them; SUPPRESS on the subcommand
    # keeps a flag given before it from being reset by the subcommand's default.
    parser.add_argument("-n", "--namespace", default=default, help="namespace of the MoTRun (default: the "
                        "kubeconfig context's namespace, else 'default')")
    parser.add_argument("--context", default=default, help="kubeconfig context to use")
    parser.add_argument("--kubeconfig", default=default, help="path to the kubeconfig file (default: $KUBECONFIG, "
                        "else ~/.kube/config)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kubectl mot", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    _cluster_flags(parser, None)
    sub = parser.add_subparsers(dest="command", required=True, metavar="{status,logs}")

    status = sub.add_parser("status", help="show a MoTRun's progress per round and branch",
                            description="Show a MoTRun's phase, progress, ETA, why a stage waits, and per "
                            "round each branch's state, step and loss and the merged model's eval score.")
    status.add_argument("name", help="the MoTRun")
    status.add_argument("-o", "--output", choices=("table", "json", "yaml"), default="table",
                        help="table (default), or the status as json or yaml")
    status.add_argument("-w", "--watch", action="store_true", help="print again whenever the run changes "
                        "(Ctrl-C ends)")
    _cluster_flags(status, argparse.SUPPRESS)

    logs = sub.add_parser("logs", help="print (or follow) the log of a stage's Pod",
                          description="Print the log of the Pod of one stage of a MoTRun: a branch (--teacher), "
                          "or --stage merge|eval|preflight. Round and attempt default to the current ones in "
                          "the run's status; a multi-node branch shows rank 0 unless --rank is given.")
    logs.add_argument("name", help="the MoTRun")
    logs.add_argument("-t", "--teacher", help="the branch's teacher (needed for --stage sft)")
    logs.add_argument("-r", "--round", type=int, help="round (default: the run's current round)")
    logs.add_argument("--stage", choices=STAGE_CHOICES,
                      help="sft (default with --teacher), merge, eval or preflight; without --teacher the "
                      "stage the run is in (merge while Merging, eval while Evaluating)")
    logs.add_argument("--attempt", type=int, help="attempt (default: the stage's current attempt in status, "
                      "else the newest Pod's)")
    logs.add_argument("--rank", type=int, help="node rank (Job completion index) of a multi-node branch "
                      "(default 0)")
    logs.add_argument("-c", "--container", help="container (default: the Pod's only container, or 'trainer')")
    logs.add_argument("-f", "--follow", action="store_true", help="stream the log as it grows (Ctrl-C ends)")
    logs.add_argument("--tail", type=int, help="only the last N lines")
    _cluster_flags(logs, argparse.SUPPRESS)
    return parser


# ---------------------------------------------------------------------------------------------
# Cluster access


def connect(args) -> tuple[object, str]:
    """(ApiClient, namespace) as kubectl picks them: --kubeconfig else $KUBECONFIG else ~/.kube/config,
    --context else the current context; -n else the context's namespace else 'default'. Inside a Pod
    with no kubeconfig, the ServiceAccount's credentials and namespace."""
    from kubernetes import config
    from kubernetes.config.config_exception import ConfigException

    try:
        api = config.new_client_from_config(config_file=args.kubeconfig, context=args.context)
        contexts, active = config.list_kube_config_contexts(config_file=args.kubeconfig)
        chosen = next((c for c in contexts if c.get("name") == args.context), active) if args.context else active
        namespace = ((chosen or {}).get("context") or {}).get("namespace") or "default"
    except (ConfigException, OSError) as error:
        if args.kubeconfig or args.context or not os.environ.get("KUBERNETES_SERVICE_HOST"):
            raise CommandError(f"no usable kubeconfig: {_one_line(str(error))}") from error
        from kubernetes import client

        config.load_incluster_config()
        api = client.ApiClient()
        try:
            with open(INCLUSTER_NAMESPACE) as f:
                namespace = f.read().strip() or "default"
        except OSError:
            namespace = "default"
    return api, args.namespace or namespace


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def api_error(error) -> str:
    """The apiserver's own message of an ApiException, on one line."""
    try:
        body = json.loads(error.body)
        return _one_line(body.get("message") or error.reason)
    except (TypeError, ValueError, AttributeError):
        return _one_line(f"{error.status} {error.reason}")


def get_run(api, namespace: str, name: str) -> dict:
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    try:
        return client.CustomObjectsApi(api).get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
    except ApiException as error:
        if error.status == 404:
            details = {}
            try:
                details = json.loads(error.body).get("details") or {}
            except (TypeError, ValueError):
                pass
            if details.get("name") == name:
                raise CommandError(f'MoTRun "{name}" not found in namespace "{namespace}"') from error
            raise CommandError(f"the server does not serve {PLURAL}.{GROUP}/{VERSION} (is the MoTRun CRD "
                               f"installed?): {api_error(error)}") from error
        raise


# ---------------------------------------------------------------------------------------------
# status


def render(run: dict, output: str) -> str:
    status = run.get("status") or {}
    if output == "json":
        return json.dumps(status, indent=2, sort_keys=True) + "\n"
    if output == "yaml":
        return yaml.safe_dump(status, sort_keys=True, default_flow_style=False)
    meta = run.get("metadata") or {}
    return status_table.render(status, run.get("spec") or {}, name=meta.get("name"), namespace=meta.get("namespace"))


def cmd_status(args, api, namespace: str) -> int:
    run = get_run(api, namespace, args.name)
    _write(render(run, args.output))
    if args.watch:
        watch_run(api, namespace, args.name, args.output, run)
    return 0


def watch_run(api, namespace: str, name: str, output: str, run: dict) -> None:
    """Print the run again on every change of its spec or status, until Ctrl-C or its deletion."""
    from kubernetes import client, watch
    from kubernetes.client.exceptions import ApiException

    custom = client.CustomObjectsApi(api)
    shown = (run.get("spec"), run.get("status"))
    version = run["metadata"]["resourceVersion"]
    separator = "---\n" if output == "yaml" else "\n"
    while True:
        stream = watch.Watch().stream(custom.list_namespaced_custom_object, GROUP, VERSION, namespace, PLURAL,
                                      field_selector=f"metadata.name={name}", resource_version=version,
                                      timeout_seconds=300, allow_watch_bookmarks=True)
        try:
            for event in stream:
                obj = event["object"]
                version = obj.get("metadata", {}).get("resourceVersion", version)
                if event["type"] == "DELETED":
                    print(f'MoTRun "{name}" in namespace "{namespace}" was deleted', file=sys.stderr)
                    return
                if event["type"] not in ("ADDED", "MODIFIED"):
                    continue
                seen = (obj.get("spec"), obj.get("status"))
                if seen != shown:
                    shown = seen
                    _write(separator + render(obj, output))
        except ApiException as error:
            if error.status != 410:
                raise
            # The resource version left the watch cache: start again from the current object.
            run = get_run(api, namespace, name)
            version = run["metadata"]["resourceVersion"]
            if (run.get("spec"), run.get("status")) != shown:
                shown = (run.get("spec"), run.get("status"))
                _write(separator + render(run, output))


def _stop_streaming(_signum, _frame) -> None:
    try:
        sys.stdout.flush()
    except (BrokenPipeError, ValueError):
        pass
    os._exit(0)


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


# ---------------------------------------------------------------------------------------------
# logs


def _what(stage: str, round_: int, teacher: str | None, attempt: int | None, rank: int | None) -> str:
    if stage == "preflight":
        text = "the preflight"
    elif stage == "sft":
        text = f"branch '{teacher}' round {round_}"
    else:
        text = f"the {stage} of round {round_}"
    if attempt is not None:
        text += f" attempt {attempt}"
    if rank is not None:
        text += f" rank {rank}"
    return text


def stage_entry(status: dict, stage: str, round_: int, teacher: str | None) -> dict | None:
    if stage == "preflight":
        return status.get("preflight")
    rec = next((r for r in status.get("rounds") or [] if r.get("round") == round_), None)
    if rec is None:
        return None
    return (rec.get("branches") or {}).get(teacher) if stage == "sft" else rec.get(stage)


def default_stage(status: dict, teachers: list[str]) -> str:
    phase = status.get("phase")
    if phase == "Merging":
        return "merge"
    if phase == "Evaluating":
        return "eval"
    if status.get("preflight") and not status.get("rounds"):
        return "preflight"
    raise CommandError(f"--teacher is required for a branch's log (teachers: {', '.join(teachers) or '-'}); "
                       "or --stage merge|eval|preflight")


def _attempt_of(pod: dict) -> int:
    try:
        return int((pod["metadata"].get("labels") or {}).get(naming.LABEL_ATTEMPT, "0"))
    except ValueError:
        return 0


def _index_of(pod: dict) -> str | None:
    return (pod["metadata"].get("annotations") or {}).get(COMPLETION_INDEX)


def _job_state(entry: dict | None, name: str) -> str:
    if not entry:
        return f"MoTRun {name} has no such stage in its status yet"
    text = f"its Job is {entry.get('job') or '?'}: {entry.get('state') or 'unknown'}"
    waiting = entry.get("waiting") or {}
    if waiting.get("reason"):
        text += f" ({waiting['reason']}: {_one_line(waiting.get('message') or '-')})"
    elif entry.get("message"):
        text += f" ({_one_line(entry['message'])})"
    return text


def find_pod(api, namespace: str, run: dict, args) -> tuple[dict, str]:
    """The Pod to read and a description of it, or CommandError naming what is missing."""
    from kubernetes import client

    name = run["metadata"]["name"]
    status = run.get("status") or {}
    teachers = status_table.teacher_names(run.get("spec"))
    stage = args.stage or ("sft" if args.teacher else default_stage(status, teachers))
    if stage == "sft":
        if not args.teacher:
            raise CommandError(f"--teacher is required for --stage sft (teachers of MoTRun {name}: "
                               f"{', '.join(teachers) or '-'})")
        if teachers and args.teacher not in teachers:
            raise CommandError(f"MoTRun {name} has no teacher '{args.teacher}' (teachers: {', '.join(teachers)})")
    elif args.teacher:
        raise CommandError(f"--teacher names a branch; it does not apply to --stage {stage}")
    round_ = 0 if stage == "preflight" else (args.round or status.get("round") or 1)
    entry = stage_entry(status, stage, round_, args.teacher)
    attempt = args.attempt if args.attempt is not None else (entry or {}).get("attempt")

    labels = {naming.LABEL_RUN: naming.label_value(name), naming.LABEL_STAGE: stage, naming.LABEL_ROUND: str(round_)}
    if stage == "sft":
        labels[naming.LABEL_TEACHER] = args.teacher
    if attempt is not None:
        labels[naming.LABEL_ATTEMPT] = str(attempt)
    selector = ",".join(f"{k}={v}" for k, v in labels.items())
    listed = client.CoreV1Api(api).list_namespaced_pod(namespace, label_selector=selector)
    pods = api.sanitize_for_serialization(listed)["items"]  # the API's JSON shape (camelCase)
    if not pods:
        raise CommandError(f"no Pod of {_what(stage, round_, args.teacher, attempt, args.rank)} of MoTRun {name} "
                           f"in namespace {namespace}; {_job_state(entry, name)}")
    if attempt is None:
        newest = max(_attempt_of(p) for p in pods)
        pods = [p for p in pods if _attempt_of(p) == newest]
        attempt = newest
    indexed = [p for p in pods if _index_of(p) is not None]
    if indexed:
        rank = args.rank if args.rank is not None else 0
        ranked = [p for p in indexed if _index_of(p) == str(rank)]
        if not ranked:
            found = sorted({int(_index_of(p)) for p in indexed if (_index_of(p) or "").isdigit()})
            raise CommandError(f"no Pod of {_what(stage, round_, args.teacher, attempt, rank)} of MoTRun {name} in "
                               f"namespace {namespace} (ranks with a Pod: {', '.join(map(str, found))})")
        pods = ranked
    elif args.rank not in (None, 0):
        raise CommandError(f"{_what(stage, round_, args.teacher, attempt, None)} of MoTRun {name} runs on one "
                           f"node: there is no rank {args.rank}")
    # A disrupted Pod's replacement has the same labels and index: the newest is the one that runs.
    pod = max(pods, key=lambda p: p["metadata"].get("creationTimestamp") or "")
    return pod, _what(stage, round_, args.teacher, attempt, args.rank)


def pick_container(pod: dict, wanted: str | None) -> str:
    containers = [c["name"] for c in pod["spec"]["containers"]]
    if wanted:
        if wanted not in containers:
            raise CommandError(f"Pod {pod['metadata']['name']} has no container {wanted!r} "
                               f"(containers: {', '.join(containers)})")
        return wanted
    if len(containers) == 1:
        return containers[0]
    if "trainer" in containers:
        return "trainer"
    raise CommandError(f"Pod {pod['metadata']['name']} has several containers ({', '.join(containers)}): "
                       "choose one with -c")


def cmd_logs(args, api, namespace: str) -> int:
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    run = get_run(api, namespace, args.name)
    pod, what = find_pod(api, namespace, run, args)
    pod_name = pod["metadata"]["name"]
    container = pick_container(pod, args.container)
    core = client.CoreV1Api(api)
    if args.follow:
        _wait_started(core, namespace, pod_name, what)
    try:
        response = core.read_namespaced_pod_log(pod_name, namespace, container=container, follow=args.follow,
                                                tail_lines=args.tail, _preload_content=False)
    except ApiException as error:
        raise CommandError(f"the log of Pod {pod_name} ({what}): {api_error(error)}") from error
    out = sys.stdout.buffer
    try:
        # A followed log arrives in chunks as the container writes: pass each on at once.
        for chunk in response.stream(64 * 1024, decode_content=True):
            out.write(chunk)
            out.flush()
    finally:
        response.release_conn()
    return 0


def _wait_started(core, namespace: str, pod_name: str, what: str, interval: float = 1.0) -> None:
    """-f on a Pod still Pending waits for its container to start instead of failing as the
    apiserver would ("waiting to start")."""
    told = False
    while True:
        pod = core.read_namespaced_pod(pod_name, namespace)
        if pod.status.phase != "Pending":
            return
        if not told:
            reason = next((s.state.waiting.reason for s in pod.status.container_statuses or []
                           if s.state and s.state.waiting and s.state.waiting.reason), None)
            print(f"waiting for Pod {pod_name} ({what}) to start{f': {reason}' if reason else ''}",
                  file=sys.stderr, flush=True)
            told = True
        time.sleep(interval)


# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from kubernetes.client.exceptions import ApiException
    from kubernetes.config.config_exception import ConfigException
    from urllib3.exceptions import HTTPError

    streaming = getattr(args, "watch", False) or getattr(args, "follow", False)
    if streaming:
        # Ctrl-C ends a watch or a follow at once, as kubectl's: what was printed is flushed (_write),
        # and nothing waits on the open watch connection (a KeyboardInterrupt raised inside the
        # client's read once left the process hanging).
        signal.signal(signal.SIGINT, _stop_streaming)
    try:
        api, namespace = connect(args)
        with api:
            command = cmd_status if args.command == "status" else cmd_logs
            return command(args, api, namespace)
    except CommandError as error:
        print(f"error: {error}", file=sys.stderr)
    except ApiException as error:
        print(f"error: {api_error(error)}", file=sys.stderr)
    except ConfigException as error:
        print(f"error: kubeconfig: {_one_line(str(error))}", file=sys.stderr)
    except HTTPError as error:
        print(f"error: cannot reach the Kubernetes API server: {_one_line(str(error))}", file=sys.stderr)
    except KeyboardInterrupt:
        return 0 if streaming else 130
    except BrokenPipeError:
        # `kubectl mot ... | head`: the reader left; say nothing more.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    return 1


if __name__ == "__main__":
    sys.exit(main())
