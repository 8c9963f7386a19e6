"""`mot-train merge`: merge checkpoints in weight space, streaming tensor by tensor.

Inputs must be complete checkpoints (a valid mot-manifest.json); a user's own model folders without
one are merged only with --allow-unmanifested-inputs, and then the sha256 of every file used from them
is recorded in the output's manifest. Inputs (and the base) must agree on tie_word_embeddings.
Tensors are read by header offset and merged in fp32 in slices of at most SLICE_ELEMENTS elements
(whole tensors for methods that need per-tensor statistics), so peak memory stays near a few slices
whatever the model size and the number of inputs. With more than 2 CPUs the slices are merged on a few threads (`--threads`). The
output is written as shards as it goes, then the manifest last.
s3:// inputs are downloaded (and verified) and an s3:// output is staged under $TMPDIR.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import logging
import math
import os
import tempfile
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

from mot_trainer import storage
from mot_trainer.errors import InvalidInput
from mot_trainer.manifest import (
    MANIFEST_NAME,
    read_checkpoint_manifest,
    sha256_file,
    stamped_sha256,
    verify_file,
    verify_folder,
    write_manifest,
)
from mot_trainer.merge import io
from mot_trainer.merge.io import ReadBuffer
from mot_trainer.merge.workspace import Workspace

log = logging.getLogger(__name__)

METHODS = {
    "average": "mot_trainer.merge.average",
    "task-arithmetic": "mot_trainer.merge.task_arithmetic",
    "ties": "mot_trainer.merge.ties",
    "dare": "mot_trainer.merge.dare",
}
SLICE_ELEMENTS = 1 << 18  # 1 MiB of fp32: slices stay in a core's L2 (measured fastest of 64Ki-1Mi; 8M: 2x CPU)
TIED_HEAD = "lm_head.weight"
TIE_KEY = "tie_word_embeddings"
ALLOW_UNMANIFESTED = "--allow-unmanifested-inputs"
# With several merging threads: bigger slices, fewer hand-offs (16-core bench: 1.68-1.84 s with 1 Mi
# for 3-8 threads, 2.13-2.37 s with 256 Ki); past ~4 threads the writer's sha256 of the output bounds it.
PARALLEL_SLICE_ELEMENTS = 1 << 20
MAX_THREADS = 4
CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")  # "QUOTA PERIOD" or "max PERIOD" (cgroup v2)


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
                        help="the round's starting weights; required by task-arithmetic, ties and dare")
    parser.add_argument("--scale", type=float, default=1.0, help="lambda: multiplies the merged difference")
    parser.add_argument("--density", type=float, default=0.5, help="ties/dare: fraction of each difference kept")
    parser.add_argument("--seed", type=int, default=0, help="dare: seed of the drop masks")
    parser.add_argument("--shard-size", type=shard_size, default="2GB", metavar="SIZE",
                        help="maximum output shard size, e.g. 2GB, 500MB, 1GiB or bytes (default 2GB)")
    parser.add_argument("--threads", type=int, metavar="N",
                        help="slices merged at once (default: one per available CPU beyond the first, at most "
                             f"{MAX_THREADS}; 1 merges on the main thread)")


def shard_size(text: str) -> int:
    """argparse type of --shard-size: the size in bytes; a bad one is an argparse error (exit 2)."""
    try:
        return io.parse_size(text)
    except InvalidInput as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix("--shard-size: ")) from None


def run(args: argparse.Namespace) -> dict:
    # Memory-bound elementwise work on small slices: one torch thread per merging thread; intra-op
    # threads only add synchronisation, and spin in busy OpenMP pools under load.
    torch.set_num_threads(1)
    started = time.monotonic()
    method = importlib.import_module(METHODS[args.method])
    weights = _check_options(args, method)
    max_shard = args.shard_size if isinstance(args.shard_size, int) else io.parse_size(args.shard_size)
    allow_unmanifested = getattr(args, "allow_unmanifested_inputs", False)
    threads = args.threads if args.threads is not None else default_threads()
    with tempfile.TemporaryDirectory(prefix="mot-merge-") as workdir:
        work = Path(workdir)
        # Input hashes are checked on the other cores while this thread merges.
        hash_threads = max(1, min(4, (os.cpu_count() or 2) - 1))
        hashing = ThreadPoolExecutor(max_workers=hash_threads, thread_name_prefix="verify")
        try:
            folders, pending, unmanifested = _fetch_inputs(args.inputs, work, hashing, allow_unmanifested)
            base_folder = _fetch_base(args.base, work) if args.base else None
            checkpoints = [io.Checkpoint(f, label=uri) for f, uri in zip(folders, args.inputs, strict=True)]
            base = io.Checkpoint(base_folder, label=f"--base {args.base}") if base_folder else None
            # Inputs without a manifest: every file used from them is hashed (on the other cores) and
            # recorded in the output's manifest, so the merged model can be traced to them.
            recorded = {args.inputs[i]: [hashing.submit(_hash_entry, checkpoints[i].folder, rel)
                                         for rel in checkpoints[i].used_files()]
                        for i in unmanifested}
            pending += [f for futures in recorded.values() for f in futures]
            try:
                specs = _check_compatible(checkpoints, base)
                out_dir = _prepare_output(args.out, work, folders)
                copied = io.copy_side_files(checkpoints[0].folder, out_dir)
                with _TensorMerger(method, checkpoints, base, weights, args, pending, threads) as merger:
                    hashes = io.write_sharded(out_dir, specs, max_shard, merger.chunks_for,
                                              in_flight=merger.in_flight)
                files = list(hashes)
                io.remove_stale_weights(out_dir, keep=files + copied)
            finally:
                for ckpt in checkpoints + ([base] if base else []):
                    ckpt.close()
            for future in pending:  # inputs must verify before the output may be published
                future.result()
        finally:
            hashing.shutdown(cancel_futures=True)
        wall = time.monotonic() - started
        parameters = sum(spec.numel for spec in specs)
        inputs = {"models": list(args.inputs), "base": args.base}
        if recorded:
            inputs["unmanifested"] = {uri: [f.result() for f in futures] for uri, futures in recorded.items()}
        metrics = {"tensors": len(specs), "parameters": parameters, "bytes": sum(s.nbytes for s in specs),
                   "shards": sum(f.endswith(".safetensors") for f in files), "wall_seconds": round(wall, 3)}
        write_manifest(
            out_dir,
            kind="merge",
            inputs=inputs,
            params={"method": args.method, "weights": weights, "scale": args.scale, "density": args.density,
                    "seed": args.seed, "shard_size": max_shard},
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


def _fetch_inputs(uris, work: Path, hashing: ThreadPoolExecutor,
                  allow_unmanifested: bool = False) -> tuple[list[Path], list[Future], list[int]]:
    """Local folders: sizes checked now, sha256 verified on a background thread while the merge reads
    (the output's manifest waits for it). s3:// inputs: downloaded and fully verified first.

    An input without a manifest is refused unless `allow_unmanifested`; then it is used as it is (an
    s3:// one: everything under its prefix is downloaded). Returns the local folders, the pending
    verifications and the indexes of the inputs without a manifest."""
    folders, pending, unmanifested = [], [], []
    for i, uri in enumerate(uris):
        if storage.is_s3(uri):
            has_manifest = read_checkpoint_manifest(uri) is not None
        else:
            if not Path(uri).is_dir():
                raise InvalidInput(f"--inputs {uri}: no such folder")
            has_manifest = (Path(uri) / MANIFEST_NAME).exists()
        if not has_manifest:
            if not allow_unmanifested:
                raise InvalidInput(f"--inputs {uri}: no {MANIFEST_NAME}; the checkpoint is incomplete (to merge "
                                   f"a model folder of your own that has none, pass {ALLOW_UNMANIFESTED})")
            log.warning("--inputs %s has no %s; using it unverified (%s)", uri, MANIFEST_NAME, ALLOW_UNMANIFESTED)
            unmanifested.append(i)
        if storage.is_s3(uri):
            folders.append(storage.download_dir(uri, work / f"input-{i}", verify=has_manifest))
            continue
        folder = Path(uri)
        if has_manifest:
            manifest = verify_folder(folder, check_hashes=False)
            pending += [hashing.submit(verify_file, folder / e["path"], e["sha256"]) for e in manifest["files"]]
        folders.append(folder)
    return folders, pending, unmanifested


def _hash_entry(folder: Path, rel: str) -> dict:
    """{"path", "size", "sha256"} of a file of an input without a manifest, as a manifest lists it."""
    path = folder / rel
    return {"path": rel, "size": path.stat().st_size, "sha256": stamped_sha256(path) or sha256_file(path)}


def _fetch_base(uri: str, work: Path) -> Path:
    """The base may be a user's model without a manifest; one that has a manifest must match it."""
    verify = read_checkpoint_manifest(uri) is not None
    if not verify:
        log.warning("--base %s has no %s; using it unverified", uri, MANIFEST_NAME)
    return storage.download_dir(uri, work / "base", verify=verify)


def _check_compatible(checkpoints, base) -> list:
    """The output's tensors (the first input's, in its file order); InvalidInput naming the input and
    tensor when names, shapes or dtypes differ."""
    first = checkpoints[0]
    names = set(first.tensors)
    others = checkpoints[1:] + ([base] if base else [])
    _check_tie_settings([first, *others])
    holders = [TIED_HEAD in c.tensors for c in [first, *others]]
    if any(holders) and not all(holders) and _effective_tie(_tie_setting(first.config())):
        # Tied embeddings: some writers save the shared head, others drop it. It is redundant.
        log.info("tie_word_embeddings: dropping %s (present in only some inputs)", TIED_HEAD)
        names.discard(TIED_HEAD)
    for other in others:
        other_names = set(other.tensors) - ({TIED_HEAD} if TIED_HEAD not in names else set())
        missing, extra = sorted(names - other_names), sorted(other_names - names)
        if missing:
            raise InvalidInput(f"{other.label}: lacks tensor {missing[0]!r} that {first.label} has")
        if extra and other is not base:
            raise InvalidInput(f"{other.label}: has tensor {extra[0]!r} that {first.label} lacks")
        for name in sorted(names):
            a, b = first.tensors[name], other.tensors[name]
            if a.shape != b.shape:
                raise InvalidInput(f"{other.label}: tensor {name!r} has shape {list(b.shape)}, "
                                   f"{first.label} has {list(a.shape)}")
            if a.dtype != b.dtype:
                raise InvalidInput(f"{other.label}: tensor {name!r} has dtype {b.dtype}, {first.label} has {a.dtype}")
    return [info for name, info in first.tensors.items() if name in names]


def _check_tie_settings(checkpoints) -> None:
    """InvalidInput naming two checkpoints whose effective tie_word_embeddings differ: a tied model
    has no head of its own, so merging it with untied ones would silently drop theirs."""
    settings = [_tie_setting(c.config()) for c in checkpoints]
    if len(set(settings)) == 1:
        return  # the same setting (or the same model type's default): no need to ask transformers
    values = [_effective_tie(s) for s in settings]
    for ckpt, value in zip(checkpoints[1:], values[1:], strict=True):
        if value != values[0]:
            raise InvalidInput(
                f"{TIE_KEY} differs: {ckpt.label} has {str(value).lower()}, {checkpoints[0].label} has "
                f"{str(values[0]).lower()}; merge only models with the same {TIE_KEY}")


def _tie_setting(config: dict) -> tuple:
    """("set", value) from the config (or its text_config, as pre-v5 composite models save it), else
    ("default", model_type): the config class's default applies."""
    for cfg in (config, config.get("text_config")):
        if isinstance(cfg, dict) and TIE_KEY in cfg:
            return ("set", bool(cfg[TIE_KEY]))
    model_type = config.get("model_type")
    return ("default", model_type if isinstance(model_type, str) else None)


def _effective_tie(setting: tuple) -> bool:
    kind, value = setting
    return value if kind == "set" else _default_tie(value)


@functools.cache
def _default_tie(model_type) -> bool:
    """transformers' tie_word_embeddings for a config that does not set it: its config class's default
    (True for gpt2, False for qwen2 ...); False, as transformers assumes, for an unknown model type."""
    if isinstance(model_type, str) and model_type:
        try:
            from transformers.models.auto.configuration_auto import CONFIG_MAPPING

            default = getattr(CONFIG_MAPPING[model_type], TIE_KEY, None)
        except (ImportError, KeyError):
            default = None
        if isinstance(default, bool):
            return default
    return False


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


def default_threads() -> int:
    """One merging thread per CPU this process may use beyond the first (that one writes and hashes
    the output), at most MAX_THREADS. On 2 CPUs: 1, the main thread alone (measured fastest there)."""
    return max(1, min(MAX_THREADS, available_cpus() - 1))


def available_cpus() -> int:
    """CPUs this process may use: its affinity mask, capped by a cgroup v2 CPU quota (a pod's limit)."""
    affinity = getattr(os, "sched_getaffinity", None)  # Linux only
    cpus = len(affinity(0)) if affinity else os.cpu_count() or 1
    try:
        quota, period = CGROUP_CPU_MAX.read_text().split()[:2]
        if quota != "max":
            cpus = min(cpus, max(1, int(quota) // int(period)))
    except (OSError, ValueError):
        pass
    return cpus


class _TensorMerger:
    """Yields the merged bytes of one output tensor at a time, in slices where the method allows.

    With threads > 1, the slices of an elementwise method are merged on a pool of threads (torch ops
    and preadv release the GIL), each with its own read buffers and scratch, and handed to the writer
    in order; every slice is computed exactly as on one thread, so the output bits do not change."""

    def __init__(self, method, checkpoints, base, weights, args, pending: list[Future], threads: int = 1):
        self.method, self.checkpoints, self.base, self.weights = method, checkpoints, base, weights
        self.params = {"scale": args.scale, "density": args.density, "seed": args.seed}
        self.pending = pending
        self.parallel = threads > 1 and method.ELEMENTWISE
        self.in_flight = threads if self.parallel else 1  # writer buffers held by merging slices
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="merge") if self.parallel else None
        self._local = threading.local()
        self.done_bytes = 0
        self.last_log = time.monotonic()

    def __enter__(self) -> _TensorMerger:
        return self

    def __exit__(self, *exc) -> None:
        if self.pool is not None:
            self.pool.shutdown(cancel_futures=True)

    def chunks_for(self, spec, take):
        """Fill writer buffers from `take()` with the merged bytes of one output tensor, slice by slice."""
        self._fail_fast()
        first = self.checkpoints[0]
        if not spec.is_float:  # integer buffers (e.g. position ids) are not averaged: first input's
            for start, count in _slices(spec.numel, SLICE_ELEMENTS):
                buffer = take()
                first.read_into(first.tensors[spec.name], buffer, start, count)
                yield buffer
            return
        out_dtype = _torch_dtype(spec.dtype)
        if self.parallel:
            yield from self._parallel_slices(spec, take, out_dtype)
        else:
            step = SLICE_ELEMENTS if self.method.ELEMENTWISE else max(spec.numel, 1)
            for start, count in _slices(spec.numel, step):
                merged = self._merge(spec, start, count)
                # Whole-tensor results too are handed to the writer in slices: its buffers stay small.
                for offset, n in _slices(count, SLICE_ELEMENTS):
                    buffer = take()
                    buffer.tensor(n, out_dtype).copy_(merged[offset:offset + n])
                    yield buffer
        self._progress(spec.nbytes)

    def _parallel_slices(self, spec, take, out_dtype):
        """At most `in_flight` slices merging at once; yielded in order as each finishes."""
        running: deque[Future] = deque()
        for start, count in _slices(spec.numel, PARALLEL_SLICE_ELEMENTS):
            if len(running) == self.in_flight:
                yield running.popleft().result()
            running.append(self.pool.submit(self._merge_into, take(), spec, start, count, out_dtype))
        while running:
            yield running.popleft().result()

    def _merge_into(self, buffer: ReadBuffer, spec, start: int, count: int, out_dtype) -> ReadBuffer:
        buffer.tensor(count, out_dtype).copy_(self._merge(spec, start, count))
        return buffer

    def _merge(self, spec, start: int, count: int):
        """Elements [start, start+count) of the merged tensor, flat (valid until this thread's next call)."""
        state = self._thread_state()
        tensors = (
            ckpt.read_into(ckpt.tensors[spec.name], buf, start, count)
            for ckpt, buf in zip(self.checkpoints, state.buffers, strict=True)
        )
        base = None
        if self.base is not None:
            base = self.base.read_into(self.base.tensors[spec.name], state.base_buffer, start, count)
        return self.method.merge(tensors, self.weights, base=base, name=spec.name,
                                 workspace=state.workspace, **self.params).reshape(-1)

    def _thread_state(self):
        """Read buffers and scratch of the calling thread, reused slice after slice."""
        state = self._local
        if not hasattr(state, "workspace"):
            state.buffers = [ReadBuffer() for _ in self.checkpoints]
            state.base_buffer = ReadBuffer()
            state.workspace = Workspace()
        return state

    def _fail_fast(self) -> None:
        """Stop early when a background hash already failed (the output will not be published)."""
        for future in self.pending:
            if future.done() and future.exception() is not None:
                raise future.exception()

    def _progress(self, nbytes: int) -> None:
        self.done_bytes += nbytes
        now = time.monotonic()
        if now - self.last_log >= 10:
            self.last_log = now
            log.info("merged %.2f GB of tensors", self.done_bytes / 1e9)


def _slices(numel: int, step: int):
    for start in range(0, numel, step):
        yield start, min(step, numel - start)


def _torch_dtype(code: str):
    return io.SAFETENSORS_DTYPES[code]
