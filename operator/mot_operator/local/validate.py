"""`mot validate FILE.yaml`: check a MoTRun manifest and every input it names, without training.

The manifest is read exactly as `mot run` reads it (relative paths against the file's folder, the
CRD's schema and rules); then the trainer's preflight runs in this process on the spec's student,
teachers, evaluation set, storage and maxSeqLength, and prints the per-teacher table (records, token
length p50/p95/max with the student's chat template, fraction longer than maxSeqLength).

Exit codes: 0 everything passes, 2 the manifest or an input is invalid (the message names the field,
file, line or teacher), 1 a transient failure (storage unreachable: try again).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mot_operator.local.cli import EXIT_FAILED, EXIT_INVALID, EXIT_OK, ManifestError, read_run, storage_env


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from mot_trainer.preflight import DEFAULT_MAX_TRUNCATED_FRACTION

    parser.add_argument("manifest", metavar="FILE.yaml", help="a MoTRun manifest (the same file kubectl applies)")
    parser.add_argument("--max-truncated-fraction", type=float, default=None,
                        help="largest fraction of a teacher's examples allowed over maxSeqLength (default: the "
                             f"manifest's spec.preflight.maxTruncatedFraction, {DEFAULT_MAX_TRUNCATED_FRACTION} "
                             "unless set)")
    parser.add_argument("--threads", type=int, default=None, help="teachers checked at once (default: up to 4)")


def preflight_spec(spec, spec_dict: dict, *, storage_set: bool, max_truncated_fraction: float, threads=None):
    """The trainer's preflight on a parsed MoTRunSpec; returns its Report, raises InvalidInput."""
    from mot_trainer.preflight import preflight

    storage_env(spec_dict)
    return preflight(
        spec.student,
        [(t.name, t.dataset) for t in spec.teachers],
        max_seq_length=spec.training.max_seq_length,
        max_truncated_fraction=max_truncated_fraction,
        eval_data=spec.evaluation.dataset if spec.evaluation else None,
        # Without spec.storage.uri, `mot run` keeps checkpoints in its workdir: nothing to check (and
        # validating must not create that folder).
        storage_uri=spec.storage.uri if storage_set else None,
        threads=threads,
    )


def run(args: argparse.Namespace) -> int:
    from mot_trainer.errors import InvalidInput
    from mot_trainer.preflight import PreflightFailed

    path = Path(args.manifest)
    try:
        manifest, _, spec_dict, spec = read_run(path)
    except ManifestError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_INVALID
    storage_set = bool((manifest["spec"].get("storage") or {}).get("uri"))
    name = manifest["metadata"]["name"]
    try:
        fraction = args.max_truncated_fraction
        if fraction is None:  # what `mot run` and the operator pass: the spec's
            fraction = spec.preflight.max_truncated_fraction
        report = preflight_spec(spec, spec_dict, storage_set=storage_set, max_truncated_fraction=fraction,
                                threads=args.threads)
    except PreflightFailed as exc:
        print(exc.report.table(), flush=True)
        print(f"error: {path}: {exc}", file=sys.stderr)
        return EXIT_INVALID
    except InvalidInput as exc:
        print(f"error: {path}: {exc}", file=sys.stderr)
        return EXIT_INVALID
    except Exception as exc:  # storage unreachable and the like: may pass on a retry
        print(f"error: {path}: {type(exc).__name__}: {exc} (a transient failure: try again)", file=sys.stderr)
        return EXIT_FAILED
    print(f"MoTRun {name}: {len(spec.teachers)} teachers, student {spec.student}")
    print(report.table())
    print(memory_line(spec, spec_dict))
    print(f"ok: {path} passes the preflight ({report.seconds:.1f}s)")
    return EXIT_OK


def memory_line(spec, spec_dict: dict) -> str:
    """One line of `mot estimate`'s figure: what a branch needs per GPU with the strategy it will use."""
    from mot_operator import estimate
    from mot_operator.local.estimate_cmd import ConfigUnavailable, gib, read_config

    try:
        found = estimate.estimate_spec(read_config(spec.student, spec_dict, None), spec)
    except (ConfigUnavailable, estimate.ConfigError, ValueError) as exc:
        return f"memory: not estimated ({exc})"
    return (f"memory: a branch needs about {gib(found.total + found.margin)} GiB per GPU ({found.strategy} over "
            f"{found.processes} process{'es' if found.processes != 1 else ''}, margin included; "
            f"`mot estimate` for the terms)")
