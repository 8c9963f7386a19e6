"""`mot-train sft`: supervised fine-tuning of one branch on one teacher's chain-of-thought data.

Built on accelerate, so the same command runs on CPU, one GPU, several GPUs and several nodes: start
it with `accelerate launch` or torchrun and every process takes its share of each step. With more
than one process the model is sharded with FSDP2 by default (--sharding, see sharding.py), or
replicated with DDP.
Defaults follow the MoT/s1 recipe (lr 1e-5 cosine, 5 % warmup, AdamW betas (0.9, 0.95), weight decay
1e-4, effective batch 16, 50 steps per branch, loss on the response only).

The output folder is written to a temporary directory, its manifest last, then uploaded (manifest
last again): OUT is never read as complete before it is.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import logging
import math
import shutil
import tempfile
import time
from pathlib import Path

from mot_trainer import data, progress, sharding, storage
from mot_trainer.errors import InvalidInput
from mot_trainer.loss import DEFAULT_CHUNK_TOKENS, patch_model
from mot_trainer.manifest import write_manifest
from mot_trainer.models import fetch_model
from mot_trainer.storage import read_checkpoint_manifest

log = logging.getLogger(__name__)

DEFAULT_STEPS = 50  # MoT: 50 SFT steps per branch per round
SCHEDULES = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}
# Hyperparameters recorded in the manifest; a finished OUT with the same inputs and these is reused.
PARAM_NAMES = (
    "steps", "epochs", "learning_rate", "lr_schedule", "warmup_ratio", "adam_beta1", "adam_beta2",
    "weight_decay", "micro_batch_size", "grad_accum", "max_seq_length", "seed", "precision",
    "gradient_checkpointing", "packing", "max_grad_norm",
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--init", required=True, help="starting model: local folder, s3:// URI or hub id")
    p.add_argument("--data", required=True, help="JSONL or Parquet file, local or s3://")
    p.add_argument("--out", required=True, help="output folder, local or s3://")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--steps", type=int, help=f"optimizer steps (default {DEFAULT_STEPS})")
    length.add_argument("--epochs", type=float, help="passes over the data instead of --steps")
    p.add_argument("--learning-rate", type=float, default=1e-5)
    p.add_argument("--lr-schedule", choices=sorted(SCHEDULES), default="cosine")
    p.add_argument("--warmup-ratio", type=float, default=0.05)
    p.add_argument("--adam-beta1", type=float, default=0.9)
    p.add_argument("--adam-beta2", type=float, default=0.95)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--micro-batch-size", type=int, default=1, help="sequences per forward pass per process")
    p.add_argument("--grad-accum", type=int, default=16, help="micro-batches per optimizer step per process")
    p.add_argument("--max-seq-length", type=int, default=4096)
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping; 0 disables it")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--precision", choices=["auto", "bf16", "fp16", "fp32"], default="auto",
                   help="auto: bf16 on a GPU that supports it, else fp32")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--sharding", choices=sharding.CHOICES, default="auto",
                   help="with several processes: fsdp shards weights, gradients and optimizer states "
                        "(FSDP2, 16/N bytes per parameter per process), ddp replicates them (16 bytes); "
                        "auto: fsdp when there is more than one process")
    p.add_argument("--packing", action="store_true", help="pack short examples into --max-seq-length rows")
    p.add_argument("--loss-chunk-tokens", type=int, default=DEFAULT_CHUNK_TOKENS,
                   help="tokens per chunk of the lm_head + cross-entropy, so the whole logits are never held "
                        f"(default {DEFAULT_CHUNK_TOKENS}; 0: transformers' own loss)")
    p.add_argument("--log-every", type=int, default=1)
    p.add_argument("--metrics-port", type=int,
                   help="serve mot_trainer_* Prometheus metrics (/metrics) and the latest progress record "
                        "(/progress) on this port, bound to env MOT_METRICS_ADDRESS (default 0.0.0.0)")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's own)")


def validate(args) -> None:
    positive = ["micro_batch_size", "grad_accum", "max_seq_length", "log_every"]
    if args.steps is not None:
        positive.append("steps")
    for name in positive:
        if getattr(args, name) < 1:
            raise InvalidInput(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    checks = [
        ("epochs", args.epochs is None or args.epochs > 0, "must be > 0"),
        ("learning_rate", args.learning_rate > 0, "must be > 0"),
        ("warmup_ratio", 0 <= args.warmup_ratio < 1, "must be in [0, 1)"),
        ("adam_beta1", 0 <= args.adam_beta1 < 1, "must be in [0, 1)"),
        ("adam_beta2", 0 <= args.adam_beta2 < 1, "must be in [0, 1)"),
        ("weight_decay", args.weight_decay >= 0, "must be >= 0"),
        ("max_grad_norm", args.max_grad_norm >= 0, "must be >= 0"),
        ("threads", args.threads is None or args.threads >= 1, "must be at least 1"),
        ("loss_chunk_tokens", args.loss_chunk_tokens >= 0, "must be >= 0"),
    ]
    for name, ok, why in checks:
        if not ok:
            raise InvalidInput(f"--{name.replace('_', '-')} {why}, got {getattr(args, name)}")


def resolve_precision(requested: str) -> str:
    """accelerate's mixed_precision value: bf16 where the GPU supports it; fp32 ("no") on CPU."""
    import torch

    cuda = torch.cuda.is_available()
    if requested == "auto":
        return "bf16" if cuda and torch.cuda.is_bf16_supported() else "no"
    if requested == "fp16" and not cuda:
        raise InvalidInput("--precision fp16 needs a GPU; use fp32 or bf16 on CPU")
    return {"fp32": "no"}.get(requested, requested)


# --- model input -------------------------------------------------------------------------------


def node_dir(args) -> Path:
    """The folder the processes of one node (one Pod: /tmp is its own) share their inputs in."""
    key = hashlib.sha256(f"{args.init}\n{args.data}\n{args.out}".encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"mot-sft-inputs-{key}"


def fetch_inputs(args, folder: Path, *, first: bool) -> tuple[bytes, tuple[str, dict | None]]:
    """The data's bytes and the init model (fetch_model) in `folder`. The node's first process starts
    it afresh and fetches from storage; the others then find its complete copy there (the model's
    manifest and hashes checked again) instead of downloading their own."""
    data_copy = folder / "data"
    if first:
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        data_bytes = storage.read_bytes(args.data)
        storage.write_bytes(data_copy, data_bytes)
    else:
        data_bytes = data_copy.read_bytes()
    return data_bytes, fetch_model(args.init, folder)


def load_model_and_tokenizer(source: str, uri: str, local: bool, *, on_meta: bool = False,
                             stats: dict | None = None):
    """The model (fp32), its tokenizer and the dtype to save it in.

    `on_meta`: the model is built from the config on the meta device, no weights read or allocated
    (FSDP's non-zero ranks: their shards are filled from rank 0's copy by sharding.load_from_rank0).
    `stats`: gets "weight_bytes", the bytes of weights the model holds (not on meta), and
    "peak_rss_before", this process's peak RSS just before the weights step. The model is then first
    built on meta either way, so that the modelling code's imports (~200 MB) are done before it.
    """
    import copy

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(source)
        tokenizer = AutoTokenizer.from_pretrained(source)
        saved_dtype = getattr(config, "dtype", None) or torch.float32
        model = None
        if on_meta or stats is not None:
            with torch.device("meta"):
                model = AutoModelForCausalLM.from_config(copy.deepcopy(config), dtype=torch.float32)
        if stats is not None:
            stats["peak_rss_before"] = peak_rss_bytes()
        if not on_meta:
            del model
            # Train with fp32 master weights (autocast does the bf16/fp16 math); save in the input's dtype.
            model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
        if stats is not None:
            stats["weight_bytes"] = sharding.materialised_bytes(model)
    except (OSError, ValueError, KeyError) as exc:
        if local:
            raise InvalidInput(f"--init {uri}: not a loadable causal LM folder ({exc})") from None
        raise
    if isinstance(saved_dtype, str):
        saved_dtype = getattr(torch, saved_dtype)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer, saved_dtype


def peak_rss_bytes() -> int:
    """This process's peak resident memory so far (Linux: ru_maxrss is in KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_gpu_peak(device) -> None:
    """Start this process's peak GPU memory count afresh (a no-op off CUDA)."""
    import torch

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def gpu_peak(device) -> list[int] | None:
    """[peak allocated, peak reserved] bytes of this process's GPU since reset_gpu_peak; None off CUDA.
    Allocated is what the tensors held (what `mot estimate` models); reserved adds the caching
    allocator's unused blocks (fragmentation: part of the estimate's margin, as the CUDA context is)."""
    import torch

    if device.type != "cuda":
        return None
    return [int(torch.cuda.max_memory_allocated(device)), int(torch.cuda.max_memory_reserved(device))]


def gpu_peak_metrics(table: list[list[int]]) -> dict:
    """The manifest's per-rank GPU figures from per_rank's table of gpu_peak values."""
    return {"peak_gpu_memory_bytes": [row[0] for row in table],
            "peak_gpu_reserved_bytes": [row[1] for row in table]}


def per_rank(accelerator, values: list[int]) -> list[list[int]]:
    """Every process's `values` (a collective), indexed by rank: [[v0, v1, ...] of rank 0, ...]."""
    import torch

    if accelerator.num_processes == 1:
        return [list(values)]
    table = torch.zeros(accelerator.num_processes, len(values), dtype=torch.float64, device=accelerator.device)
    table[accelerator.process_index] = torch.tensor(values, dtype=torch.float64)
    torch.distributed.all_reduce(table)
    return [[int(v) for v in row] for row in table.tolist()]


# --- training ----------------------------------------------------------------------------------


def micro_batches(n_rows: int, size: int, seed: int):
    """Endless stream of row-index lists: each epoch a fresh seeded permutation, cut into `size`."""
    import torch

    epoch = 0
    buffer: list[int] = []
    while True:
        gen = torch.Generator().manual_seed(seed + epoch)
        buffer += torch.randperm(n_rows, generator=gen).tolist()
        epoch += 1
        while len(buffer) >= size:
            yield buffer[:size]
            buffer = buffer[size:]


def plan_steps(args, n_rows: int, world: int) -> int:
    if args.steps is not None:
        return args.steps
    if args.epochs is not None:
        per_step = args.micro_batch_size * args.grad_accum * world
        return max(1, math.ceil(args.epochs * n_rows / per_step))
    return DEFAULT_STEPS


def build_optimizer(model, args):
    import torch

    # No weight decay on biases and norm weights (1-D parameters), as transformers' Trainer does.
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2))


def set_checkpointing(model, enabled: bool) -> None:
    """Activation (gradient) checkpointing; transformers 5 renamed the methods."""
    if hasattr(model, "activation_checkpointing_enable"):
        if enabled:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.activation_checkpointing_disable()
    elif enabled:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_disable()


def train(args, accelerator, model, tokenizer, rows: list[data.Example], shard_mode: str = "ddp"):
    """The optimizer loop. Returns (metrics, prepared model); the loss is the mean per-token loss over
    each whole step (all micro-batches of all processes). `shard_mode` is sharding.resolve's answer:
    "fsdp" shards the model with FSDP2 (sharding.shard) instead of accelerate's DDP wrapping."""
    import torch
    from transformers import get_scheduler

    world, rank = accelerator.num_processes, accelerator.process_index
    fsdp = shard_mode == "fsdp"
    total_steps = plan_steps(args, len(rows), world)
    if args.gradient_checkpointing:
        set_checkpointing(model, True)
    model.config.use_cache = False
    if fsdp:  # the optimizer is built on the sharded (DTensor) parameters, so its states are sharded
        # Only rank 0 holds the weights (the others' model is on the meta device): its full state
        # dict, kept over the sharding, is broadcast into every rank's shards.
        full_state = model.state_dict() if rank == 0 and world > 1 else None
        model = sharding.shard(model, accelerator.device, accelerator.mixed_precision)
        sharding.load_from_rank0(model, full_state, accelerator.device)
        del full_state
    rss_loaded = peak_rss_bytes()  # the loading's peak (host) memory: whole weights or shards
    optimizer = build_optimizer(model, args)
    scheduler = get_scheduler(
        SCHEDULES[args.lr_schedule], optimizer,
        num_warmup_steps=math.ceil(args.warmup_ratio * total_steps), num_training_steps=total_steps,
    )
    if not fsdp:
        model, optimizer = accelerator.prepare(model, optimizer)
    # The GPU's peak is counted from here, the weights (or shards) on the device and loaded: over the
    # whole training it holds what `mot estimate` models per GPU (weights, gradients, optimizer states,
    # activations, a loss chunk, FSDP/autocast transients), not the loading's own transients (FSDP's
    # broadcast of rank 0's weights). Resetting keeps the weights already there in the count.
    reset_gpu_peak(accelerator.device)
    model.train()
    state_bytes = 0
    stream = micro_batches(len(rows), args.micro_batch_size, args.seed)
    meter = progress.Progress(total_steps, args.log_every) if accelerator.is_main_process else None
    history, loss_value, tokens_seen = [], float("nan"), 0
    start, start_cpu = time.monotonic(), time.process_time()
    for step in range(1, total_steps + 1):
        # Every process sees the same stream and takes every world-th micro-batch of the step.
        step_batches = [next(stream) for _ in range(args.grad_accum * world)]
        mine = step_batches[rank::world]
        # Normalise by the step's total response tokens (all processes), not per micro-batch.
        label_tokens = sum(sum(1 for lab in rows[i].labels[1:] if lab != data.IGNORE) for b in step_batches for i in b)
        num_items = torch.tensor(max(label_tokens, 1) / world, device=accelerator.device)
        step_loss = torch.zeros((), device=accelerator.device)
        step_tokens = torch.zeros((), device=accelerator.device, dtype=torch.long)
        for j, indices in enumerate(mine):
            batch = {k: v.to(accelerator.device) for k, v in data.collate([rows[i] for i in indices],
                                                                         tokenizer.pad_token_id).items()}
            step_tokens += sum(len(rows[i]) for i in indices)
            # DDP: gradients are all-reduced once per step, on the last micro-batch; the prepared
            # model runs its forward under autocast when --precision is bf16/fp16. FSDP:
            # reduce-scattered after every micro-batch, so only sharded gradients are ever
            # accumulated (skipping the sync would keep a whole unsharded gradient, 4 bytes/param).
            last = j == len(mine) - 1
            sync = contextlib.nullcontext() if last or fsdp else accelerator.no_sync(model)
            with sync:
                loss = model(**batch, use_cache=False, num_items_in_batch=num_items).loss
                accelerator.backward(loss)
            step_loss += loss.detach().float()
        if args.max_grad_norm > 0:
            if fsdp:
                sharding.clip_grad_norm_(model.parameters(), args.max_grad_norm)
            else:
                accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
        optimizer.step()
        if step == 1:  # AdamW's states exist from the first step on
            state_bytes = sharding.state_bytes(model, optimizer)
        learning_rate = scheduler.get_last_lr()[0]
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        loss_value = accelerator.reduce(step_loss, "sum").item() / world
        new_tokens = int(accelerator.reduce(step_tokens, "sum").item())
        tokens_seen += new_tokens
        if not math.isfinite(loss_value):
            raise RuntimeError(f"loss is {loss_value} at step {step}; lower --learning-rate or check the data")
        if step % args.log_every == 0 or step == total_steps:
            history.append([step, round(loss_value, 6)])
        if meter:
            meter.update(step, loss_value, learning_rate, new_tokens)
    wall = time.monotonic() - start
    if world > 1:  # the largest process's share: what each GPU must hold
        held = torch.tensor(state_bytes, dtype=torch.float64, device=accelerator.device)
        torch.distributed.all_reduce(held, op=torch.distributed.ReduceOp.MAX)
        state_bytes = int(held.item())
    return {
        "steps": total_steps,
        "final_loss": loss_value,
        "loss_history": history,
        "tokens_seen": tokens_seen,
        "tokens_per_second": tokens_seen / wall if wall > 0 else 0.0,
        "train_seconds": wall,
        "train_cpu_seconds": time.process_time() - start_cpu,  # this process, all its threads
        # Parameters + optimizer states held by the process holding most (shards under FSDP).
        "sharded_state_bytes": state_bytes,
        "peak_rss_after_load": rss_loaded,  # run() takes it out again
        "gpu_peak": gpu_peak(accelerator.device),  # run() takes it out again; None off CUDA
    }, model


def save_model(accelerator, model, tokenizer, saved_dtype, folder: Path, shard_mode: str = "ddp",
               max_shard_bytes: int | None = None) -> dict[str, str]:
    """Write the HF folder (weights in `saved_dtype`, config, generation config, tokenizer) from the
    main process; every process must call this. Returns {file: sha256} of the files whose hash was
    computed while writing them (the streamed weights), for the manifest.

    FSDP: the weights are streamed entry by entry (sharding.save_streaming): no process ever holds
    the whole model. DDP or one process: save_pretrained of the state every process already holds.
    `max_shard_bytes`: save_pretrained's max_shard_size (default sharding.SAVE_MAX_SHARD_BYTES).
    """
    max_shard_bytes = max_shard_bytes or sharding.SAVE_MAX_SHARD_BYTES
    fsdp = shard_mode == "fsdp"
    entries = sharding.streamed_entries(model) if fsdp else None
    if entries is None:
        if fsdp:
            log.warning("%s: transformers converts its weights on save; gathering the whole model to the "
                        "main process to save it (4 bytes/param of host memory)", type(model).__name__)
        save_gathered(accelerator, model, tokenizer, saved_dtype, folder, shard_mode, max_shard_bytes)
        return {}
    hashes = sharding.save_streaming(model, folder, saved_dtype, is_main=accelerator.is_main_process,
                                     max_shard_bytes=max_shard_bytes, entries=entries)
    if not accelerator.is_main_process:
        return hashes
    # What save_pretrained writes besides the weights, with the config's dtype the checkpoint's.
    prepare_for_save(model)
    model.config.dtype = saved_dtype
    model.config.architectures = [sharding.plain_class(model).__name__]
    model.config.save_pretrained(folder)
    if model.can_generate():
        model.generation_config.save_pretrained(folder)
    save_side_files(model, tokenizer, folder)
    return hashes


def prepare_for_save(model) -> None:
    """The config a checkpoint is saved with: for inference (cache on, no activation checkpointing)."""
    if getattr(model, "supports_gradient_checkpointing", False):
        set_checkpointing(model, False)
    model.config.use_cache = True


def save_side_files(model, tokenizer, folder: Path) -> None:
    tokenizer.save_pretrained(folder)
    if not (folder / "generation_config.json").exists():
        from transformers import GenerationConfig

        GenerationConfig.from_model_config(model.config).save_pretrained(folder)


def save_gathered(accelerator, model, tokenizer, saved_dtype, folder: Path, shard_mode: str,
                  max_shard_bytes: int) -> None:
    """save_pretrained of the whole state on the main process. FSDP (only for models whose weights
    transformers converts on save): gathered there first, one full fp32 copy in its host memory."""
    fsdp = shard_mode == "fsdp"
    state = sharding.full_state_dict(model) if fsdp else accelerator.get_state_dict(model)
    if not accelerator.is_main_process:
        return
    unwrapped = model if fsdp else accelerator.unwrap_model(model)
    prepare_for_save(unwrapped)
    unwrapped.save_pretrained(folder, state_dict=cast_state(state, saved_dtype), max_shard_size=max_shard_bytes)
    unwrapped.config.dtype = saved_dtype  # save_pretrained wrote the fp32 training dtype
    if fsdp:  # save_pretrained names the class it was called on: FSDP<class>
        unwrapped.config.architectures = [sharding.plain_class(unwrapped).__name__]
    unwrapped.config.save_pretrained(folder)
    save_side_files(unwrapped, tokenizer, folder)


def cast_state(state: dict, dtype) -> dict:
    """Floating tensors cast to `dtype`; tensors that shared storage (tied embeddings) stay shared,
    so save_pretrained still writes them once."""
    cast, by_storage = {}, {}
    for name, tensor in state.items():
        if not tensor.is_floating_point():
            cast[name] = tensor
            continue
        key = (tensor.data_ptr(), tuple(tensor.shape))
        if key not in by_storage:
            by_storage[key] = tensor.to(dtype)
        cast[name] = by_storage[key]
    return cast


def sha256_bytes(raw: bytes) -> str:
    return hashlib.sha256(raw).hexdigest()


def finished_output(out: str) -> dict | None:
    """The manifest already at OUT, if any (a malformed one means incomplete: it is overwritten)."""
    try:
        return read_checkpoint_manifest(out)
    except storage.StorageAccessError:  # credentials or bucket: fail now, not after training
        raise
    except InvalidInput:
        return None


def same_run(manifest: dict, inputs: dict, params: dict) -> bool:
    return manifest.get("kind") == "sft" and manifest.get("inputs") == inputs and manifest.get("params") == params


def summary(metrics: dict, out: str) -> dict:
    keys = ("final_loss", "tokens_per_second", "tokens_seen", "steps", "examples_truncated",
            "examples_dropped", "wall_seconds")
    return {"out": out, **{k: metrics.get(k) for k in keys}}


def run(args) -> dict | None:
    import torch

    validate(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    mixed = resolve_precision(args.precision)
    accelerator = Accelerator(mixed_precision=mixed, cpu=not torch.cuda.is_available())
    shard_mode = sharding.resolve(args.sharding, accelerator.num_processes)
    if shard_mode == "fsdp" and mixed == "fp16":
        raise InvalidInput("--precision fp16 is not supported with --sharding fsdp (the default with "
                           "several processes); use bf16, fp32 or --sharding ddp")
    set_seed(args.seed)
    started = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="mot-sft-"))
    shared = node_dir(args) if accelerator.num_processes > 1 else None
    server = None
    try:
        with accelerator.local_main_process_first():  # one download per node: the others reuse it
            data_bytes, (source, init_manifest) = fetch_inputs(args, shared or workdir / "inputs",
                                                               first=accelerator.is_local_main_process)
        accelerator.wait_for_everyone()  # all have their inputs before any may return and clean up
        params = {name: getattr(args, name) for name in PARAM_NAMES}
        params.update(resolved_precision=mixed, processes=accelerator.num_processes, sharding=shard_mode)
        inputs = {"init": args.init, "data": args.data, "data_sha256": sha256_bytes(data_bytes)}
        if args.metrics_port and accelerator.is_main_process:
            server = progress.serve(args.metrics_port)
        if init_manifest:
            inputs["init_created"] = init_manifest.get("created")
        existing = finished_output(args.out)
        if existing and same_run(existing, inputs, params):
            log.info("%s already holds this SFT's finished output; nothing to do", args.out)
            return summary(existing.get("metrics", {}), args.out) if accelerator.is_main_process else None
        if existing:
            log.warning("%s holds a finished checkpoint of other inputs or parameters: replacing it", args.out)
        # FSDP: only global rank 0 reads the weights into host memory; the others build the model on
        # the meta device and get their shards from rank 0 (train -> sharding.load_from_rank0).
        fsdp_load = shard_mode == "fsdp" and accelerator.num_processes > 1
        load_stats = {} if fsdp_load else None
        model, tokenizer, saved_dtype = load_model_and_tokenizer(
            source, args.init, Path(source).is_dir(), on_meta=fsdp_load and not accelerator.is_main_process,
            stats=load_stats)
        if args.loss_chunk_tokens and not patch_model(model, chunk=args.loss_chunk_tokens):
            log.info("%s: no chunked loss for this architecture; using transformers' loss", type(model).__name__)
        records = data.read_records(args.data, raw=data_bytes)
        examples, stats = data.tokenize_records(records, tokenizer, args.max_seq_length)
        rows = data.pack(examples, args.max_seq_length) if args.packing else examples
        log.info("%d records -> %d examples -> %d rows (packing %s); %d truncated, %d dropped",
                 stats.records, stats.examples, len(rows), "on" if args.packing else "off",
                 stats.truncated, stats.dropped)
        metrics, model = train(args, accelerator, model, tokenizer, rows, shard_mode)
        rss_loaded = metrics.pop("peak_rss_after_load", 0)
        peak_gpu = metrics.pop("gpu_peak", None)
        if peak_gpu is not None:  # on CUDA, every rank: per_rank is a collective
            peak_gpu = per_rank(accelerator, peak_gpu)
        if fsdp_load:  # per rank: weight bytes the load materialised; peak-RSS growth until sharded
            loaded = per_rank(accelerator, [load_stats["weight_bytes"], rss_loaded - load_stats["peak_rss_before"]])
        out_dir = workdir / "out"
        weight_hashes = save_model(accelerator, model, tokenizer, saved_dtype, out_dir, shard_mode)
        accelerator.wait_for_everyone()
        if not accelerator.is_main_process:
            return None
        metrics.update(examples=stats.examples, examples_truncated=stats.truncated,
                       examples_dropped=stats.dropped, wall_seconds=time.monotonic() - started)
        if fsdp_load:
            metrics.update(loaded_weight_bytes=[row[0] for row in loaded],
                           load_peak_rss_growth_bytes=[row[1] for row in loaded])
        if peak_gpu is not None:  # absent on CPU
            metrics.update(gpu_peak_metrics(peak_gpu))
        write_manifest(out_dir, kind="sft", inputs=inputs, params=params, metrics=metrics, hashes=weight_hashes)
        storage.upload_checkpoint(out_dir, args.out)
        log.info("wrote %s: final loss %.4f, %.0f tokens/s", args.out, metrics["final_loss"],
                 metrics["tokens_per_second"])
        return summary(metrics, args.out)
    finally:
        if server is not None:
            server.shutdown()
        shutil.rmtree(workdir, ignore_errors=True)
        if shared is not None and accelerator.is_local_main_process:
            # Loaded by every process of the node by now (or the run failed and torchrun stops them).
            shutil.rmtree(shared, ignore_errors=True)
