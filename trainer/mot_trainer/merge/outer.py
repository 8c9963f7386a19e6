"""The outer optimizer step of a merge (DiLoCo): the merge taken as a pseudo-gradient step from --base.

    Δ(t) = merged(t) − θ(t−1)            merged: the method's result; θ(t−1): --base
    v(t) = μ·v(t−1) + Δ(t)               v(0) = 0, kept in fp32 in the --outer-state-* folders
    θ(t) = θ(t−1) + η·v(t)               plain
    θ(t) = θ(t−1) + η·(Δ(t) + μ·v(t))    --outer-nesterov (as torch.optim.SGD's nesterov)

η = 1 and μ = 0 is the identity: the command then does no outer computation at all (its bytes are
a plain merge's). Everything is computed in fp32 per slice, as the merge itself; θ(t) is written in
each tensor's checkpoint dtype, non-float tensors are copied from the first input as a merge does.

Passes. With μ = 0 there is no state: one pass writes θ = base + η·(merged − base). With μ > 0, two
passes (one would have to stream two folders through the writer at once), so that nothing larger
than a few slices is held whatever the model size:
  1. merge slice by slice, read base (and v(t−1)), write v(t) (fp32, float tensors only, the model's
     names and shapes) to --outer-state-out as safetensors shards; once the inputs have verified, its
     manifest last (kind "outer-state"), then the upload of an s3:// one;
  2. write θ(t) from base and v(t) as read back from the state just written; nesterov also reads
     v(t−1) and takes Δ(t) = v(t) − μ·v(t−1), with μ·v(t−1) computed by the same fp32 operation as in
     pass 1, rather than merging the K inputs a second time: two fp32 reads instead of K reads plus
     the merge. That Δ differs from pass 1's by at most half an fp32 ulp of v(t) (the rounding of
     the addition), negligible beside the rounding of θ(t) to its dtype, and it is deterministic.
The merged model is published after the state; a rerun of the same command (immutable inputs)
rewrites the same bytes into both, so a run that died half way is simply run again. A state folder
is a checkpoint-like folder (shards, index, mot-manifest.json of kind "outer-state"), verified like
an input when read back. The outer passes merge on the calling thread
(the merger's slice merge, not its thread pool).
"""

from __future__ import annotations

import argparse
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from mot_trainer import storage
from mot_trainer.errors import InvalidInput
from mot_trainer.manifest import MANIFEST_NAME, write_manifest
from mot_trainer.merge import writer
from mot_trainer.merge.inputs import TIED_HEAD
from mot_trainer.merge.merger import SLICE_ELEMENTS
from mot_trainer.merge.reader import SAFETENSORS_DTYPES, Checkpoint, ReadBuffer, TensorInfo
from mot_trainer.merge.workspace import Workspace

log = logging.getLogger(__name__)

STATE_KIND = "outer-state"  # the manifest kind of a velocity folder
STATE_DTYPE = "F32"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--outer-learning-rate", type=float, default=1.0, metavar="ETA",
                        help="outer step size: theta = base + eta * v (default 1: the merge as it is)")
    parser.add_argument("--outer-momentum", type=float, default=0.0, metavar="MU",
                        help="outer momentum in [0, 1): v = mu * v_prev + (merged - base); needs "
                             "--outer-state-out (default 0: no state)")
    parser.add_argument("--outer-nesterov", action="store_true",
                        help="Nesterov momentum, as torch.optim.SGD's (needs --outer-momentum > 0)")
    parser.add_argument("--outer-state-in", metavar="URI",
                        help="the previous round's velocity (its --outer-state-out); absent: zero (first round)")
    parser.add_argument("--outer-state-out", metavar="URI",
                        help="where this round's velocity is written (local or s3://); required with momentum")


@dataclass(frozen=True)
class Options:
    learning_rate: float = 1.0
    momentum: float = 0.0
    nesterov: bool = False
    state_in: str | None = None
    state_out: str | None = None

    @property
    def identity(self) -> bool:
        """The outer step changes nothing: θ(t) = merged(t), no state."""
        return self.learning_rate == 1.0 and self.momentum == 0.0

    def params(self) -> dict:
        return {"learningRate": self.learning_rate, "momentum": self.momentum, "nesterov": self.nesterov}


def check_options(args) -> Options:
    """The outer options of `args`; InvalidInput starting with the offending flag."""
    options = Options(float(getattr(args, "outer_learning_rate", 1.0)), float(getattr(args, "outer_momentum", 0.0)),
                      bool(getattr(args, "outer_nesterov", False)), getattr(args, "outer_state_in", None),
                      getattr(args, "outer_state_out", None))
    eta, mu = options.learning_rate, options.momentum
    if not (math.isfinite(eta) and eta > 0):
        raise InvalidInput(f"--outer-learning-rate: must be finite and > 0, got {eta}")
    if not 0 <= mu < 1:
        raise InvalidInput(f"--outer-momentum: must be in [0, 1), got {mu}")
    if options.nesterov and mu == 0:
        raise InvalidInput("--outer-nesterov: needs --outer-momentum > 0 (Nesterov without momentum is plain)")
    if options.state_in and mu == 0:
        raise InvalidInput("--outer-state-in: only used with --outer-momentum > 0 (there is no velocity without it)")
    if mu > 0 and not options.state_out:
        raise InvalidInput("--outer-state-out: required with --outer-momentum > 0 (the next round needs the velocity)")
    if options.state_out and mu == 0:
        raise InvalidInput("--outer-state-out: only written with --outer-momentum > 0 (no state is needed without it)")
    if not options.identity and not args.base:
        raise InvalidInput("--base: the outer step (--outer-learning-rate/--outer-momentum) moves from the "
                           "round's starting model; give --base")
    taken = {"--out": [args.out], "--base": [args.base] if args.base else [], "--inputs": list(args.inputs)}
    for flag, uri in (("--outer-state-in", options.state_in), ("--outer-state-out", options.state_out)):
        for other, uris in taken.items():
            if uri and uri in uris:
                raise InvalidInput(f"{flag} {uri}: is also {other}")
    if options.state_in and options.state_in == options.state_out:
        raise InvalidInput(f"--outer-state-out {options.state_out}: would overwrite --outer-state-in")
    return options


class OuterStep:
    """One run's outer step: its state-in fetched and checked up front, `write` doing the passes."""

    def __init__(self, options: Options, *, base: Checkpoint, specs: list[TensorInfo], work: Path,
                 models: list[str], base_uri: str):
        self.options, self.base, self.specs, self.work = options, base, specs, work
        self.models, self.base_uri = models, base_uri
        self.model_specs = {spec.name: spec for spec in specs}
        self.state_in = self._open_state_in() if options.state_in else None

    def close(self) -> None:
        if self.state_in is not None:
            self.state_in.close()

    def manifest_inputs(self) -> dict:
        """The entries to add to the merged model's manifest inputs."""
        used = {"outer_state_in": self.options.state_in, "outer_state_out": self.options.state_out}
        return {key: uri for key, uri in used.items() if uri}

    def write(self, out_dir: Path, max_shard: int, merger, pending, taken: list[Path]) -> dict[str, str]:
        """Write θ(t) into out_dir (with momentum, v(t) first, published once `pending` verified);
        returns out_dir's {file: sha256} as writer.write_sharded does. `taken`: the local folders
        (inputs, base) a local --outer-state-out must not be."""
        if self.options.momentum == 0:
            return writer.write_sharded(out_dir, self.specs, max_shard, self._stepped(merger))
        state_dir = self._prepare_state([*taken, out_dir])
        state_specs = [_state_spec(spec) for spec in self.specs if spec.is_float]
        hashes = writer.write_sharded(state_dir, state_specs, max_shard, self._velocity(merger))
        writer.remove_stale_weights(state_dir, keep=list(hashes))
        for future in pending:  # the state derives from the inputs: they must verify first
            future.result()
        write_manifest(state_dir, kind=STATE_KIND,
                       inputs={"models": self.models, "base": self.base_uri, "state_in": self.options.state_in},
                       params=self.options.params(),
                       metrics={"tensors": len(state_specs), "parameters": sum(s.numel for s in state_specs)},
                       hashes=hashes)
        if storage.is_s3(self.options.state_out):
            storage.upload_checkpoint(state_dir, self.options.state_out)
        velocity = Checkpoint(state_dir, label=f"--outer-state-out {self.options.state_out}")
        try:
            return writer.write_sharded(out_dir, self.specs, max_shard, self._applied(merger, velocity))
        finally:
            velocity.close()

    # --- the passes: chunks_for(spec, take) generators for writer.write_sharded --------------------

    def _stepped(self, merger):
        """μ = 0: θ = base + η·(merged − base), one pass."""
        eta, base_buf = self.options.learning_rate, ReadBuffer()

        def chunks_for(spec, take):
            if not spec.is_float:
                yield from merger.chunks_for(spec, take)
                return
            out_dtype = SAFETENSORS_DTYPES[spec.dtype]
            for start, merged in merger.merged_slices(spec):
                base = self.base.read_into(self.base.tensors[spec.name], base_buf, start, merged.numel())
                theta = merged.sub_(base).mul_(eta).add_(base)
                yield _filled(take(), theta, out_dtype)

        return chunks_for

    def _velocity(self, merger):
        """Pass 1: v(t) = μ·v(t−1) + (merged − base), fp32."""
        mu, ws = self.options.momentum, Workspace()
        base_buf, prev_buf = ReadBuffer(), ReadBuffer()

        def chunks_for(spec, take):
            model_spec = self.model_specs[spec.name]
            for start, merged in merger.merged_slices(model_spec):
                n = merged.numel()
                base = self.base.read_into(self.base.tensors[spec.name], base_buf, start, n)
                velocity = merged.sub_(base)  # Δ(t)
                if self.state_in is not None:
                    prev = self.state_in.read_into(self.state_in.tensors[spec.name], prev_buf, start, n)
                    velocity.add_(torch.mul(prev, mu, out=ws.take("mu_prev", prev)))
                buffer = take()
                buffer.tensor(n, torch.float32).copy_(velocity)
                yield buffer

        return chunks_for

    def _applied(self, merger, velocity: Checkpoint):
        """Pass 2: θ(t) = base + η·v(t), or base + η·(Δ(t) + μ·v(t)) with Δ(t) = v(t) − μ·v(t−1)."""
        eta, mu, nesterov, ws = self.options.learning_rate, self.options.momentum, self.options.nesterov, Workspace()
        base_buf, v_buf, prev_buf = ReadBuffer(), ReadBuffer(), ReadBuffer()

        def chunks_for(spec, take):
            if not spec.is_float:
                yield from merger.chunks_for(spec, take)
                return
            out_dtype = SAFETENSORS_DTYPES[spec.dtype]
            for start, n in _slices(spec.numel, SLICE_ELEMENTS):
                base = self.base.read_into(self.base.tensors[spec.name], base_buf, start, n)
                v = velocity.read_into(velocity.tensors[spec.name], v_buf, start, n)
                step = ws.take("step", v)
                if nesterov:
                    torch.mul(v, mu, out=step)  # μ·v(t)
                    if self.state_in is not None:
                        prev = self.state_in.read_into(self.state_in.tensors[spec.name], prev_buf, start, n)
                        delta = torch.mul(prev, mu, out=ws.take("mu_prev", prev))
                        step.add_(torch.sub(v, delta, out=delta))  # + Δ(t)
                    else:
                        step.add_(v)  # v(t−1) = 0: Δ(t) = v(t)
                else:
                    step.copy_(v)
                theta = step.mul_(eta).add_(base)
                yield _filled(take(), theta, out_dtype)

        return chunks_for

    # --- the state folders --------------------------------------------------------------------------

    def _open_state_in(self) -> Checkpoint:
        """The previous velocity, verified against its manifest like an input, and matching the model."""
        uri = self.options.state_in
        if not storage.is_s3(uri) and not Path(uri).is_dir():
            raise InvalidInput(f"--outer-state-in {uri}: no such folder")
        manifest = storage.read_checkpoint_manifest(uri)
        if manifest is None:
            raise InvalidInput(f"--outer-state-in {uri}: no {MANIFEST_NAME}; the state is incomplete "
                               "(its round did not finish)")
        if manifest.get("kind") != STATE_KIND:
            raise InvalidInput(f"--outer-state-in {uri}: not an outer-optimizer state (written by --outer-state-out)")
        if (manifest.get("params") or {}).get("momentum") != self.options.momentum:
            log.warning("--outer-state-in %s was written with momentum %s, this step uses %s",
                        uri, manifest["params"].get("momentum"), self.options.momentum)
        folder = storage.download_dir(uri, self.work / "outer-state-in", verify=True)
        state = Checkpoint(folder, label=f"--outer-state-in {uri}")
        try:
            self._check_state(state)
        except BaseException:
            state.close()
            raise
        return state

    def _check_state(self, state: Checkpoint) -> None:
        wanted = {spec.name: spec for spec in self.specs if spec.is_float}
        for name, spec in wanted.items():
            info = state.tensors.get(name)
            if info is None:
                raise InvalidInput(f"{state.label}: lacks tensor {name!r} of the model")
            if info.shape != spec.shape or info.dtype != STATE_DTYPE:
                raise InvalidInput(f"{state.label}: tensor {name!r} is {info.dtype} {list(info.shape)}, "
                                   f"the model's velocity is {STATE_DTYPE} {list(spec.shape)}")
        extra = sorted(set(state.tensors) - set(wanted) - {TIED_HEAD})  # a tied head may come and go
        if extra:
            raise InvalidInput(f"{state.label}: has tensor {extra[0]!r} that the model lacks")

    def _prepare_state(self, taken: list[Path]) -> Path:
        """As the merge's --out: a local folder written in place, its old manifest removed first; an
        s3:// one staged in the work folder and uploaded once complete."""
        uri = self.options.state_out
        if storage.is_s3(uri):
            staged = self.work / "outer-state-out"
            staged.mkdir()
            return staged
        folder = Path(uri)
        reserved = taken + ([self.state_in.folder] if self.state_in is not None else [])
        if any(folder.resolve() == other.resolve() for other in reserved):
            raise InvalidInput(f"--outer-state-out {uri}: would overwrite an input or the output")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / MANIFEST_NAME).unlink(missing_ok=True)
        return folder


def _state_spec(spec: TensorInfo) -> TensorInfo:
    return TensorInfo(spec.name, STATE_DTYPE, spec.shape, spec.file, 0, spec.numel * 4)


def _filled(buffer: ReadBuffer, values: torch.Tensor, dtype: torch.dtype) -> ReadBuffer:
    buffer.tensor(values.numel(), dtype).copy_(values)
    return buffer


def _slices(numel: int, step: int):
    for start in range(0, numel, step):
        yield start, min(step, numel - start)
