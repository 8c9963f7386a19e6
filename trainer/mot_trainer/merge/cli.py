"""`mot-train merge`: merge checkpoints in weight space, streaming tensor by tensor.

The command line, its validation and the run: inputs are fetched and checked (merge.inputs), merged
slice by slice (merge.merger, on merge.cpus' threads, with one module per method) and written as
shards as it goes (merge.writer), then the manifest last. An s3:// output is staged under $TMPDIR
and uploaded at the end. With --outer-learning-rate/--outer-momentum the merge becomes a DiLoCo-style
outer optimizer step from --base (merge.outer; with momentum, its velocity is written to
--outer-state-out, and published, before the model); the defaults (1, 0) leave the merge as it is.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import math
import os
import re
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from mot_trainer import storage
from mot_trainer.errors import InvalidInput
from mot_trainer.manifest import MANIFEST_NAME, write_manifest
from mot_trainer.merge import outer, writer
from mot_trainer.merge.cpus import MAX_THREADS, default_threads
from mot_trainer.merge.inputs import (
    ALLOW_UNMANIFESTED,
    check_compatible,
    fetch_base,
    fetch_inputs,
    hash_entry,
)
from mot_trainer.merge.merger import TensorMerger
from mot_trainer.merge.reader import Checkpoint

log = logging.getLogger(__name__)

METHODS = {
    "average": "mot_trainer.merge.average",
    "task-arithmetic": "mot_trainer.merge.task_arithmetic",
    "ties": "mot_trainer.merge.ties",
    "dare": "mot_trainer.merge.dare",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--inputs", nargs="+", required=True, metavar="URI",
                        help="checkpoint folders (local or s3://), each with a valid mot-manifest.json "
                             f"(see {ALLOW_UNMANIFESTED})")
    parser.add_argument(ALLOW_UNMANIFESTED, action="store_true",
                        help="also merge inputs that have no mot-manifest.json (e.g. your own Hugging Face "
                             "model folders): they are used as they are, unverified, and the sha256 of every "
                             "file used from them is recorded in the output's manifest")
    parser.add_argument("--out", required=True, metavar="URI", help="output folder (local or s3://)")
    parser.add_argument("--weights", nargs="+", type=float, metavar="W",
                        help="one weight per input (default uniform); normalised to sum 1")
    parser.add_argument("--method", choices=sorted(METHODS), default="average",
                        help="average (MoT's merge, the default); task-arithmetic, ties and dare merge the "
                             "differences from --base")
    parser.add_argument("--base", metavar="URI",
                        help="the round's starting weights; required by task-arithmetic, ties and dare, "
                             "and by an outer step (--outer-*)")
    parser.add_argument("--scale", type=float, default=1.0, help="lambda: multiplies the merged difference")
    parser.add_argument("--density", type=float, default=0.5, help="ties/dare: fraction of each difference kept")
    parser.add_argument("--seed", type=int, default=0, help="dare: seed of the drop masks")
    parser.add_argument("--shard-size", type=shard_size, default="2GB", metavar="SIZE",
                        help="maximum output shard size, e.g. 2GB, 500MB, 1GiB or bytes (default 2GB)")
    parser.add_argument("--threads", type=int, metavar="N",
                        help="slices merged at once (default: one per available CPU beyond the first, at most "
                             f"{MAX_THREADS}; 1 merges on the main thread)")
    outer.add_arguments(parser)


def shard_size(text: str) -> int:
    """argparse type of --shard-size: the size in bytes; a bad one is an argparse error (exit 2)."""
    try:
        return parse_size(text)
    except InvalidInput as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix("--shard-size: ")) from None


def run(args: argparse.Namespace) -> dict:
    # Memory-bound elementwise work on small slices: one torch thread per merging thread; intra-op
    # threads only add synchronisation, and spin in busy OpenMP pools under load.
    torch.set_num_threads(1)
    started = time.monotonic()
    method = importlib.import_module(METHODS[args.method])
    weights = _check_options(args, method)
    options = outer.check_options(args)
    max_shard = args.shard_size if isinstance(args.shard_size, int) else parse_size(args.shard_size)
    allow_unmanifested = getattr(args, "allow_unmanifested_inputs", False)
    threads = args.threads if args.threads is not None else default_threads()
    with tempfile.TemporaryDirectory(prefix="mot-merge-") as workdir:
        work = Path(workdir)
        # Input hashes are checked on the other cores while this thread merges.
        hash_threads = max(1, min(4, (os.cpu_count() or 2) - 1))
        hashing = ThreadPoolExecutor(max_workers=hash_threads, thread_name_prefix="verify")
        try:
            folders, pending, unmanifested = fetch_inputs(args.inputs, work, hashing, allow_unmanifested)
            base_folder = fetch_base(args.base, work) if args.base else None
            checkpoints = [Checkpoint(f, label=uri) for f, uri in zip(folders, args.inputs, strict=True)]
            base = Checkpoint(base_folder, label=f"--base {args.base}") if base_folder else None
            # Inputs without a manifest: every file used from them is hashed (on the other cores) and
            # recorded in the output's manifest, so the merged model can be traced to them.
            recorded = {args.inputs[i]: [hashing.submit(hash_entry, checkpoints[i].folder, rel)
                                         for rel in checkpoints[i].used_files()]
                        for i in unmanifested}
            pending += [f for futures in recorded.values() for f in futures]
            step = None
            try:
                specs = check_compatible(checkpoints, base)
                if not options.identity:  # the outer step: --outer-state-in is fetched and checked first
                    step = outer.OuterStep(options, base=base, specs=specs, work=work,
                                           models=list(args.inputs), base_uri=args.base)
                out_dir = _prepare_output(args.out, work, folders)
                copied = writer.copy_side_files(checkpoints[0].folder, out_dir)
                with TensorMerger(method, checkpoints, base, weights, args, pending, threads) as merger:
                    if step is None:
                        hashes = writer.write_sharded(out_dir, specs, max_shard, merger.chunks_for,
                                                      in_flight=merger.in_flight)
                    else:
                        hashes = step.write(out_dir, max_shard, merger, pending, taken=[*folders, base_folder])
                files = list(hashes)
                writer.remove_stale_weights(out_dir, keep=files + copied)
            finally:
                for ckpt in checkpoints + ([base] if base else []):
                    ckpt.close()
                if step is not None:
                    step.close()
            for future in pending:  # inputs must verify before the output may be published
                future.result()
        finally:
            hashing.shutdown(cancel_futures=True)
        wall = time.monotonic() - started
        parameters = sum(spec.numel for spec in specs)
        inputs = {"models": list(args.inputs), "base": args.base}
        if step is not None:
            inputs.update(step.manifest_inputs())
        if recorded:
            inputs["unmanifested"] = {uri: [f.result() for f in futures] for uri, futures in recorded.items()}
        metrics = {"tensors": len(specs), "parameters": parameters, "bytes": sum(s.nbytes for s in specs),
                   "shards": sum(f.endswith(".safetensors") for f in files), "wall_seconds": round(wall, 3)}
        write_manifest(
            out_dir,
            kind="merge",
            inputs=inputs,
            params={"method": args.method, "weights": weights, "scale": args.scale, "density": args.density,
                    "seed": args.seed, "shard_size": max_shard, "outer": options.params()},
            metrics=metrics,
            hashes=hashes,  # computed while writing
        )
        if storage.is_s3(args.out):
            storage.upload_checkpoint(out_dir, args.out)
    log.info("merged %d inputs, %d tensors (%d parameters) into %s in %.1fs",
             len(checkpoints), len(specs), parameters, args.out, wall)
    return {"inputs": len(checkpoints), "tensors": len(specs), "method": args.method,
            "wall_seconds": round(time.monotonic() - started, 3)}


def _check_options(args, method) -> list[float]:
    n = len(args.inputs)
    if len(set(args.inputs)) != n:
        raise InvalidInput("--inputs: the same checkpoint is listed twice")
    weights = args.weights if args.weights is not None else [1.0] * n
    if len(weights) != n:
        raise InvalidInput(f"--weights: {len(weights)} weights for {n} inputs")
    if any(not math.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
        raise InvalidInput(f"--weights: need finite non-negative weights with a positive sum, got {weights}")
    if method.NEEDS_BASE and not args.base:
        raise InvalidInput(f"--base: method {args.method} merges differences from the base; give --base")
    if not 0 < args.density <= 1:
        raise InvalidInput(f"--density: must be in (0, 1], got {args.density}")
    if args.threads is not None and not 1 <= args.threads <= 64:
        raise InvalidInput(f"--threads: must be between 1 and 64, got {args.threads}")
    if not math.isfinite(args.scale):
        raise InvalidInput(f"--scale: must be finite, got {args.scale}")
    if args.out in args.inputs or args.out == args.base:
        raise InvalidInput(f"--out {args.out}: would overwrite an input")
    return [float(w) for w in weights]


def _prepare_output(out: str, work: Path, inputs: list[Path]) -> Path:
    """A local output is written in place (any old manifest removed first: it is incomplete until the
    new one exists); an s3:// output is staged in the work folder and uploaded at the end."""
    if storage.is_s3(out):
        staged = work / "out"
        staged.mkdir()
        return staged
    out_dir = Path(out)
    if any(out_dir.resolve() == folder.resolve() for folder in inputs):
        raise InvalidInput(f"--out {out}: would overwrite an input")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / MANIFEST_NAME).unlink(missing_ok=True)
    return out_dir


# A number, then optionally a prefix K/M/G/T (binary with "i": KiB), then optionally "B".
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(?:([KMGT])(I)?)?B?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """'2GB' -> 2_000_000_000, '500MiB' -> 524_288_000, '1000' -> 1000 bytes."""
    match = _SIZE.match(str(text))
    if not match:
        raise InvalidInput(f"--shard-size: cannot read {text!r} as a size (e.g. 2GB, 500MB, 1GiB)")
    number, prefix, binary = float(match.group(1)), (match.group(2) or "").upper(), match.group(3)
    power = "KMGT".index(prefix) + 1 if prefix else 0
    base = 1024 if binary else 1000
    size = int(number * base**power)
    if size <= 0:
        raise InvalidInput(f"--shard-size: must be positive, got {text!r}")
    return size
