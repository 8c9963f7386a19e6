"""`mot estimate FILE.yaml`: the per-GPU memory of one SFT branch of a MoTRun, before anything runs.

The manifest is read as `mot run` reads it; the student's config.json comes from --config, the
student's local folder or its s3:// URI (a hub id needs --config: nothing is downloaded). The
estimate (mot_operator.estimate) follows the strategy the branch's Job really uses: FSDP2 with more
than one process (spec.resources.branch.gpus x nodes), nothing sharded with one.

Exit codes: 0 the estimate (and, with --gpu-memory, it fits), 2 the manifest or config is invalid, or
the branch does not fit --gpu-memory (the message names the fields to change), 1 storage unreachable.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mot_operator.local.cli import EXIT_FAILED, EXIT_INVALID, EXIT_OK, ManifestError, read_run, storage_env


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("manifest", metavar="FILE.yaml", help="a MoTRun manifest (the same file kubectl applies)")
    parser.add_argument("--gpu-memory", metavar="SIZE", default=None,
                        help="memory of one GPU (e.g. 80GiB, 141GB): say whether a branch fits, exit 2 if not")
    parser.add_argument("--tokens-per-second", type=float, default=None, metavar="N",
                        help="a branch's training throughput (all its GPUs; the trainer's "
                             "metrics.tokens_per_second): also estimate the SFT time per round")
    parser.add_argument("--config", type=Path, default=None, metavar="config.json",
                        help="the student's config.json (default: read from the spec's student folder or s3:// URI)")


class ConfigUnavailable(Exception):
    """No config.json for the student without --config (the message says why)."""


def read_config(student: str, spec_dict: dict, override: Path | None) -> dict:
    """The student's config.json as a dict: --config, else from a local folder or s3:// URI."""
    from mot_trainer import storage

    if override is not None:
        try:
            return json.loads(override.read_text())
        except OSError as exc:
            raise ConfigUnavailable(f"--config {override}: cannot read: {exc.strerror}") from exc
        except ValueError as exc:
            raise ConfigUnavailable(f"--config {override}: not JSON: {exc}") from exc
    if storage.is_s3(student):
        storage_env(spec_dict)
        raw = storage.read_bytes(storage.join(student, "config.json"))  # storage errors: EXIT_FAILED
        return json.loads(raw)
    path = Path(student)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ConfigUnavailable(f"spec.student {student}: no config.json in that folder")
        return json.loads((path / "config.json").read_text())
    raise ConfigUnavailable(f"spec.student {student}: a hub id or missing folder; the estimate needs the "
                            "student's config.json from a local folder or s3:// URI, or pass --config FILE")


def gib(value: int) -> str:
    return f"{value / 1024 ** 3:.2f}"


def table(est, name: str) -> str:
    moe = f" ({est.active_parameters / 1e9:.2f}B active per token)" if est.active_parameters != est.parameters else ""
    lines = [
        f"MoTRun {name}: one SFT branch, {est.parameters / 1e9:.2f}B parameters{moe}",
        f"  processes: {est.gpus_per_node} GPU(s) x {est.nodes} node(s) = {est.processes}; strategy {est.strategy}; "
        f"precision {est.precision}; {est.tokens_per_forward} tokens per forward; gradient checkpointing "
        f"{'on' if est.gradient_checkpointing else 'off'}; packing {'on' if est.packing else 'off'}",
        "",
        f"  {'term':<17} {'GiB':>8}  formula",
    ]
    lines += [f"  {t.name:<17} {gib(t.bytes):>8}  {t.formula}" for t in est.terms]
    lines += [f"  {'total':<17} {gib(est.total):>8}  per GPU",
              f"  {'+ margin':<17} {gib(est.margin):>8}  2 GiB CUDA context/workspaces + 10% fragmentation",
              f"  {'= needed':<17} {gib(est.total + est.margin):>8}"]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from mot_operator import estimate as est_mod

    path = Path(args.manifest)
    try:
        gpu_bytes = est_mod.parse_bytes(args.gpu_memory) if args.gpu_memory else None
    except ValueError as exc:
        print(f"error: --gpu-memory: {exc}", file=sys.stderr)
        return EXIT_INVALID
    if args.tokens_per_second is not None and args.tokens_per_second <= 0:
        print("error: --tokens-per-second must be > 0", file=sys.stderr)
        return EXIT_INVALID
    try:
        manifest, _, spec_dict, spec = read_run(path)
    except ManifestError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_INVALID
    try:
        config = read_config(spec.student, spec_dict, args.config)
        est = est_mod.estimate_spec(config, spec)
    except (ConfigUnavailable, est_mod.ConfigError, ValueError) as exc:
        print(f"error: {path}: {exc}", file=sys.stderr)
        return EXIT_INVALID
    except Exception as exc:  # storage unreachable and the like: may pass on a retry
        print(f"error: {path}: {type(exc).__name__}: {exc} (a transient failure: try again)", file=sys.stderr)
        return EXIT_FAILED
    print(table(est, manifest["metadata"]["name"]))
    if args.tokens_per_second:
        tokens = est_mod.tokens_per_round(spec, est.processes)
        seconds = est_mod.seconds_per_round(spec, est.processes, args.tokens_per_second)
        print(f"\n  time: {tokens} tokens per branch per round at most (steps x microBatchSize x gradAccum x "
              f"{est.processes} processes x maxSeqLength) / {args.tokens_per_second:g} tokens/s = "
              f"{seconds / 3600:.2f} h per branch per round; {len(spec.teachers)} branches per round, "
              f"{spec.rounds} rounds")
    if gpu_bytes is None:
        return EXIT_OK
    needed = est.total + est.margin
    if est.fits(gpu_bytes):
        print(f"\nfits: {gib(needed)} GiB needed per GPU <= {gib(gpu_bytes)} GiB "
              f"({gib(gpu_bytes - needed)} GiB to spare)")
        return EXIT_OK
    print(f"\ndoes not fit: {gib(needed)} GiB needed per GPU > {gib(gpu_bytes)} GiB", file=sys.stderr)
    print("error: change " + ", ".join(est_mod.FIELDS_TO_CHANGE) + " (more GPUs or nodes shard the "
          "weights, gradients and optimizer states; a shorter maxSeqLength, gradientCheckpointing: true or "
          "a smaller microBatchSize cut the activations)", file=sys.stderr)
    return EXIT_INVALID
