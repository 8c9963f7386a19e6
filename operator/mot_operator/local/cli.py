"""`mot run FILE.yaml`: the MoTRun manifest that `kubectl apply` takes, run on this machine.

Exit codes: 0 the run succeeded (report written), 1 it failed (the failing stage and the trainer's
reason are printed), 2 the manifest is invalid (the message names the field), or a branch cannot fit
this machine's GPUs (nvidia-smi's memory: the preflight refuses it by `mot estimate`'s figure, naming
the fields to change), 130 interrupted (run the same command again to resume).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import signal
import sys
from pathlib import Path

import yaml

EXIT_OK, EXIT_FAILED, EXIT_INVALID, EXIT_INTERRUPTED = 0, 1, 2, 130


class ManifestError(Exception):
    """The manifest file cannot be used; the message names the file and field."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("manifest", metavar="FILE.yaml", help="a MoTRun manifest (the same file kubectl applies)")
    parser.add_argument("--parallel", type=int, default=None,
                        help="branches trained at once (default: number of GPUs, or 1 on CPU)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads per process (default: CPU cores / --parallel)")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="status, logs, report and (unless the manifest sets storage.uri) checkpoints; "
                             "default ./mot-runs/<name>")
    parser.add_argument("--compare", nargs="?", const="steps", default=None, choices=("steps", "compute", "both"),
                        help="also run the STD and MTD baselines and compare: at equal steps (bare --compare, or "
                             "'steps': rounds × steps, one MoT branch's, the paper's accounting), equal compute "
                             "('compute': K teachers × rounds × steps, all MoT branches'), or 'both' "
                             "(give it after FILE.yaml, or as --compare=VALUE)")
    parser.add_argument("--no-branch-eval", dest="eval_branches", action="store_false",
                        help="evaluate only the merged models, not every branch checkpoint")
    parser.add_argument("--quiet", action="store_true", help="no live progress, only the report")


def load_manifest(path: Path) -> dict:
    try:
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    except OSError as exc:
        raise ManifestError(f"{path}: cannot read: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise ManifestError(f"{path}: not valid YAML: {exc}") from exc
    runs = [d for d in docs if isinstance(d, dict) and d.get("kind") == "MoTRun"]
    if len(runs) != 1:
        raise ManifestError(f"{path}: kind: expected exactly one MoTRun document, found {len(runs)}")
    run = runs[0]
    name = (run.get("metadata") or {}).get("name")
    if not isinstance(name, str) or not name:
        raise ManifestError(f"{path}: metadata.name: required")
    if not isinstance(run.get("spec"), dict):
        raise ManifestError(f"{path}: spec: required, an object")
    return run


def localize_spec(spec: dict, base_dir: Path, default_storage: Path) -> dict:
    """Relative paths in the manifest are relative to the manifest's folder; storage defaults to a
    local folder. Hub ids and s3:// URIs are left alone."""
    spec = copy.deepcopy(spec)

    def local(value):
        if not isinstance(value, str) or "://" in value or os.path.isabs(value):
            return value
        candidate = base_dir / value
        return str(candidate.resolve()) if candidate.exists() or value.startswith(".") else value

    spec["student"] = local(spec.get("student"))
    for teacher in spec.get("teachers") or []:
        if isinstance(teacher, dict) and "dataset" in teacher:
            teacher["dataset"] = local(teacher["dataset"])
    if isinstance(spec.get("evaluation"), dict) and "dataset" in spec["evaluation"]:
        spec["evaluation"]["dataset"] = local(spec["evaluation"]["dataset"])
    store = spec.setdefault("storage", {})
    if isinstance(store, dict):
        uri = store.get("uri")
        if not uri:
            store["uri"] = str(default_storage.resolve())
        elif "://" not in uri and not os.path.isabs(uri):
            store["uri"] = str((base_dir / uri).resolve())
    return spec


def storage_env(spec: dict) -> None:
    """The manifest's S3 endpoint settings for the trainers (credentials come from the environment)."""
    store = spec.get("storage") or {}
    if store.get("endpoint"):
        os.environ["AWS_ENDPOINT_URL"] = store["endpoint"]
    if store.get("pathStyle", True):
        os.environ.setdefault("MOT_S3_PATH_STYLE", "true")


def _raise_interrupt(signum, frame):  # SIGTERM behaves like Ctrl-C: stop children, keep progress
    raise KeyboardInterrupt


def read_run(path: Path, workdir: Path | None = None):
    """The manifest at `path` read as `mot run` reads it: (manifest, workdir, localized spec dict,
    parsed spec). ManifestError (its text the whole message after "error: ") when it is invalid."""
    from mot_operator.spec import SpecError, parse_spec  # here: jsonschema and CEL load slowly (see run_spec)

    try:
        manifest = load_manifest(path)
    except ManifestError as exc:
        raise ManifestError(f"invalid MoTRun manifest: {exc}") from exc
    workdir = (workdir or Path("mot-runs") / manifest["metadata"]["name"]).resolve()
    spec_dict = localize_spec(manifest["spec"], path.resolve().parent, workdir / "storage")
    try:
        spec = parse_spec(spec_dict)
    except SpecError as exc:  # its text starts with the field
        raise ManifestError(f"invalid MoTRun manifest {path}: {exc}") from exc
    return manifest, workdir, spec_dict, spec


def run(args: argparse.Namespace) -> int:
    try:
        manifest, workdir, spec_dict, spec = read_run(Path(args.manifest), args.workdir)
    except ManifestError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_INVALID
    meta = manifest["metadata"]
    return run_spec(meta, spec, spec_dict, workdir, parallel=args.parallel, threads=args.threads,
                    compare=args.compare, quiet=args.quiet, eval_branches=args.eval_branches)


def run_spec(meta: dict, spec, spec_dict: dict, workdir: Path, *, parallel=None, threads=None,
             compare: str | None = None, quiet=False, eval_branches=True) -> int:
    """`compare`: None, or the baselines' budget, "steps" | "compute" | "both" (baselines.py)."""
    # Here, not at the top: every `mot` command imports this module for its arguments (mot_operator.cli),
    # `mot operator` too, whose image has no rich or matplotlib (the `local` extra).
    from mot_operator import status_table
    from mot_operator.local import report
    from mot_operator.local.processes import detect_gpu_memory, detect_gpus, split_threads
    from mot_operator.local.progress import LiveView
    from mot_operator.local.results import collect_results
    from mot_operator.local.runner import LocalRunner, Options
    from mot_operator.planner import RunRef
    from mot_operator.spec import SpecError

    workdir.mkdir(parents=True, exist_ok=True)
    storage_env(spec_dict)
    gpus = detect_gpus()
    gpu_memory, memory_note = local_gpu_memory(spec, gpus, detect_gpu_memory)
    parallel, threads = split_threads(parallel, threads, gpus, os.cpu_count() or 1)
    view = LiveView(stream=open(os.devnull, "w") if quiet else sys.stdout)
    ref = RunRef(namespace=meta.get("namespace") or "local", name=meta["name"])
    try:
        runner = LocalRunner(ref, spec, spec_dict, workdir, Options(
            parallel=parallel, threads=threads, compare=compare, eval_branches=eval_branches, gpus=gpus,
            gpu_memory=gpu_memory, progress=view))
    except SpecError as exc:
        print(f"error: cannot resume {workdir} with this manifest: {exc} (the run there started with "
              f"another spec; use another --workdir to start afresh)", file=sys.stderr)
        return EXIT_INVALID
    memory = f" ({gpu_memory / 1024 ** 3:.2f} GiB each)" if gpu_memory else ""
    print(f"mot run {ref.namespace}/{ref.name}: {parallel} at a time, {threads} thread(s) each, "
          f"{gpus} GPU(s){memory}; workdir {workdir}", flush=True)
    if memory_note:
        print(f"note: {memory_note}", flush=True)
    # Ctrl-C and SIGTERM stop cleanly, even where the shell started us with SIGINT ignored.
    previous = {sig: signal.signal(sig, _raise_interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        phase = runner.run()
    except KeyboardInterrupt:
        runner.stop_children()
        print("\n" + status_table.render(runner.status, spec_dict, name=ref.name, namespace=ref.namespace))
        print(f"interrupted: progress kept in {runner.state_path}; run the same command again to resume",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    # The per-round table `kubectl mot status` prints for a run in a cluster, from the same status.
    print("\n" + status_table.render(runner.status, spec_dict, name=ref.name, namespace=ref.namespace), end="")
    results = collect_results(runner)
    (workdir / "results.json").write_text(json.dumps(results, indent=1, default=str))
    if results["rounds"] or phase == "Succeeded":  # a run that failed before any result has no report
        print()
        print(report.render_text(results))
        md, png = report.write_report(results, workdir)
        print(f"\nreport: {md}\nplot:   {png}")
    if phase != "Succeeded":
        print(f"run {phase}: {_failure_reason(runner)}", file=sys.stderr)
        return EXIT_INVALID if _does_not_fit(runner.status) else EXIT_FAILED
    return EXIT_OK


def _does_not_fit(status: dict) -> bool:
    """The run failed at the preflight because a branch cannot fit the GPUs (estimate.refusal)."""
    from mot_operator.estimate import DOES_NOT_FIT

    failure = status.get("failure") or {}
    return failure.get("stage") == "preflight" and DOES_NOT_FIT in str(failure.get("reason") or "")


def local_gpu_memory(spec, gpus: int, detect) -> tuple[int | None, str]:
    """(bytes of one GPU, for the preflight to check a branch against; a note when not checked).
    `mot run` trains each branch as one process on one GPU: the estimate (from the spec's gpus x
    nodes) is this machine's truth only for a branch of 1 GPU on 1 node; otherwise nothing is refused."""
    branch = spec.resources.branch
    if not gpus or branch.gpus < 1:
        return None, ""
    if (branch.gpus, branch.nodes) != (1, 1):
        return None, (f"GPU memory not checked: spec.resources.branch asks for {branch.gpus} GPU(s) x "
                      f"{branch.nodes} node(s), and `mot run` trains each branch on one GPU (`mot estimate "
                      "FILE.yaml --gpu-memory SIZE` checks the cluster's layout)")
    found = detect()
    if found is None:
        return None, "GPU memory not checked: nvidia-smi did not give the GPUs' memory.total"
    return found, ""


def _failure_reason(runner) -> str:
    for cond in runner.status.get("conditions") or []:
        if cond.get("type") == "Failed" and cond.get("status") == "True":
            return f"{cond.get('reason')}: {cond.get('message')}"
    return runner.status.get("message") or "see the logs under " + str(runner.logs)
