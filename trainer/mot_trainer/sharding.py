"""How a multi-process SFT spreads the model over its processes: DDP (replicated) or FSDP2 (sharded).

DDP keeps on every process the fp32 weights, their gradients and AdamW's two moments: 16 bytes per
parameter per process, so an 8B student needs 128 GB on every GPU. FSDP2 full sharding
(`torch.distributed.fsdp.fully_shard`) splits each of those tensors across the N processes along
dim 0: each process holds (params + grads + Adam states) / N, still fp32 master weights (16/N bytes
per parameter), plus, transiently, the unsharded parameters of one decoder layer (two with
prefetch) that are all-gathered for its forward and again for its backward.

Why torch's `fully_shard` and not accelerate's FSDP plugin (fsdp_version=2): accelerate 1.x turns
its FSDP plugin on only for GPU-like devices (AcceleratorState switches to DistributedType.FSDP from
MULTI_GPU/NPU/XPU/...; with `cpu=True` it stays MULTI_CPU and ignores the plugin), so the same
command could not be tested on CPU with gloo. `fully_shard` runs on any device mesh, gloo included,
and leaves nothing hidden: accelerate still starts the process group and does the reductions.

Loading under FSDP (load_from_rank0): only global rank 0 reads the checkpoint into host memory; the
other processes build the model on the meta device, all shard it alike, and rank 0's weights (and
buffers, which no state dict holds: the rotary inv_freq) are broadcast into the others' shards. So a
node holds one whole fp32 copy (4 bytes/param) while loading, not one per process.

Saving under FSDP (save_streaming): the weights are gathered one tensor at a time, cast to the
checkpoint's dtype and streamed into save_pretrained's safetensors shards by the main process, so no
process holds the whole model (at most one gathered fp32 tensor and a few write buffers).
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)

CHOICES = ("auto", "ddp", "fsdp")


def resolve(requested: str, world: int) -> str:
    """The sharding a run uses: "fsdp", "ddp" or "none" (one process, nothing to share).

    auto: FSDP with more than one process. An explicit fsdp is honoured with one process too (a
    one-rank mesh: useful to try the FSDP path on one GPU); ddp with one process is plain training.
    """
    if requested == "fsdp":
        return "fsdp"
    if world <= 1:
        return "none"
    return "ddp" if requested == "ddp" else "fsdp"


def decoder_layers(model) -> list:
    """The model's decoder layers (transformers' `model.model.layers` for causal LMs); none found:
    the whole model is one unit (still sharded at rest, but all-gathered whole for each pass)."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        log.warning("%s: no model.layers; FSDP shards it as one unit", type(model).__name__)
        return []
    return list(layers)


def shard(model, device, mixed_precision: str):
    """FSDP2 full sharding in place: each decoder layer is its own unit (all-gathered for its forward
    and backward, then freed again), then the root, which holds the rest: embeddings, final norm and
    lm_head. The tied lm_head/embed_tokens weight is one Parameter of the root unit, so it is sharded
    once and stays tied; the root's parameters stay unsharded from its forward to the end of the
    backward (FSDP2 does not reshard the root after forward), so the chunked loss (loss.py), which
    uses `lm_head.weight` outside lm_head's own forward but inside the root's, sees the whole weight
    and its gradient goes to the root's reduce-scatter like any other.

    Master weights stay fp32 (sharded). With bf16, parameters are all-gathered and computed in bf16
    and gradients reduce-scattered in fp32 (MixedPrecisionPolicy), instead of DDP's autocast.
    """
    import torch
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if mixed_precision == "fp16":  # would need a sharded gradient scaler; bf16 is the recipe
        raise ValueError("--precision fp16 is not supported with FSDP sharding; use bf16 or fp32")
    policy = root_policy = MixedPrecisionPolicy()
    if mixed_precision == "bf16":
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        # The root's float inputs are not activations: num_items_in_batch (the step's token count
        # the loss is divided by) must not be rounded to bf16's 8 significant bits. The layers still
        # cast theirs; the hidden states reaching them are bf16 from the bf16 embedding anyway.
        root_policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32,
                                           cast_forward_inputs=False)
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    if not torch.distributed.is_initialized():  # one process: a one-rank group so a mesh can exist
        torch.distributed.init_process_group("gloo" if device.type == "cpu" else "nccl",
                                             store=torch.distributed.HashStore(), rank=0, world_size=1)
    mesh = init_device_mesh(device.type, (world,))
    # No model.to(device): each fully_shard call moves its own unit's parameters to the mesh's
    # device and shards them there, so the device never holds more than one whole layer at once.
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=root_policy)
    return model


def local_bytes(tensor) -> int:
    """Bytes this process holds of `tensor` (its shard, for a DTensor)."""
    local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
    return local.numel() * local.element_size()


def state_bytes(model, optimizer) -> int:
    """Bytes of parameters plus optimizer states held by this process (shards only under FSDP)."""
    import torch

    total = sum(local_bytes(p) for p in model.parameters())
    for state in optimizer.state.values():
        total += sum(local_bytes(v) for v in state.values() if isinstance(v, torch.Tensor))
    return total


def clip_grad_norm_(parameters, max_norm: float):
    """Gradient clipping over sharded gradients: the total norm of DTensor gradients is a DTensor
    whose full value is reduced across the processes before the gradients are scaled."""
    import torch

    parameters = [p for p in parameters if p.grad is not None]
    total = torch.nn.utils.get_total_norm([p.grad for p in parameters], 2.0)
    if hasattr(total, "full_tensor"):
        total = total.full_tensor()
    torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, total)
    return total


def full_state_dict(model) -> dict:
    """The whole model's weights, gathered to the main process's CPU memory (other processes get an
    empty dict; every process must call this). The tied lm_head/embed_tokens entry points at one
    tensor again, so save_pretrained writes it once.

    The main process holds one full fp32 copy (4 bytes/param of CPU RAM): only for the save of a model
    whose weights transformers converts on save (streamed_entries() is None); save_streaming otherwise.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not state:
        return state
    first_name = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        primary = first_name.setdefault(id(param), name)
        if primary != name and primary in state and name in state:
            state[name] = state[primary]
    return state


# save_pretrained's default max_shard_size in transformers 5 ("50GB"), so an FSDP checkpoint is laid
# out like a DDP or one-process one; tests set it small to get several shards.
SAVE_MAX_SHARD_BYTES = 50 * 10**9
# Bytes of the checkpoint dtype cast and handed to the writer thread at a time.
SAVE_CHUNK_BYTES = 64 << 20


def streamed_entries(model) -> dict | None:
    """The state-dict entries save_pretrained would write, {name: tensor (a DTensor shard for the
    sharded parameters)} in the order it writes them: the keys it ignores on save dropped, of each tied
    group only the name it keeps (transformers' own remove_tied_weights_from_state_dict, asked with
    meta stand-ins). None when transformers would convert or rename weights on save (its
    revert_weight_conversion changes the entries): those need the whole state at once.
    A collective under torch.distributed: every process gets the main process's answer."""
    import torch
    from transformers.core_model_loading import revert_weight_conversion
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    state = model.state_dict()
    for key in getattr(model, "_keys_to_ignore_on_save", None) or ():
        state.pop(key, None)
    meta = {name: torch.empty(t.shape, dtype=t.dtype, device="meta") for name, t in state.items()}
    kept = remove_tied_weights_from_state_dict(meta, model)
    reverted = revert_weight_conversion(model, dict(kept))
    same = {n: tuple(t.shape) for n, t in reverted.items()} == {n: tuple(t.shape) for n, t in kept.items()}
    names = [list(reverted) if same else None]  # its order: the one save_pretrained shards in
    # The order depends on how the model was built (from_pretrained attaches the conversions it applied,
    # which sorts the names; a model built on meta has none): every process follows the main one's.
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.broadcast_object_list(names, src=0)
    return None if names[0] is None else {name: state[name] for name in names[0]}


def save_streaming(model, folder, dtype, *, is_main: bool, max_shard_bytes: int | None = None,
                   entries: dict | None = None) -> dict[str, str]:
    """Write the sharded model's weights as save_pretrained would (`model.safetensors`, or
    `model-0000i-of-0000N.safetensors` plus `model.safetensors.index.json`) without ever holding the
    whole model on one process. Every process must call this; only the main one writes.

    The shards are planned first from the known shapes (the merge's writer: N is known before the
    first byte, each file is written as `.partial` and renamed when complete). Then entry by entry, in
    that order, every process takes part in gathering the whole tensor (DTensor.full_tensor(),
    one all-gather), and the main process casts it to `dtype` chunk by chunk into the writer's buffers,
    which a background thread writes and hashes while the next tensor is gathered. Not
    torch.distributed.checkpoint: get_model_state_dict(full_state_dict=True) gathers every entry into
    one dict before returning, and DCP's own save writes its sharded format, not HF's. The main
    process's extra host memory is one gathered tensor in fp32 (none on a GPU, where it is cast before
    the copy to host) and a few SAVE_CHUNK_BYTES buffers. Returns {file name: sha256} (main process;
    empty on the others). `max_shard_bytes`: save_pretrained's max_shard_size (default
    SAVE_MAX_SHARD_BYTES). `entries`: streamed_entries(model), when the caller has it already.
    """
    import hashlib
    import json
    from pathlib import Path

    from mot_trainer.merge import writer
    from mot_trainer.merge.reader import INDEX_NAME, SAFETENSORS_DTYPES, TensorInfo

    if entries is None:
        entries = streamed_entries(model)
    if entries is None:
        raise ValueError(f"{type(model).__name__}: transformers converts its weights on save; "
                         "they cannot be streamed one by one")
    max_shard_bytes = max_shard_bytes or SAVE_MAX_SHARD_BYTES
    codes = {torch_dtype: code for code, torch_dtype in SAFETENSORS_DTYPES.items()}

    def saved_dtype(tensor):
        return dtype if tensor.is_floating_point() else tensor.dtype

    def gathered(tensor):
        return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor

    if not is_main:  # the same collectives in the same order, the results dropped
        for tensor in entries.values():
            gathered(tensor)
        return {}

    specs = []
    for name, tensor in entries.items():
        out = saved_dtype(tensor)
        # No file or offset yet: the writer only uses name, dtype, shape and nbytes.
        specs.append(TensorInfo(name, codes[out], tuple(tensor.shape), Path(name), 0, tensor.numel() * out.itemsize))

    def chunks_for(spec, take):
        out = SAFETENSORS_DTYPES[spec.dtype]
        full = gathered(entries[spec.name]).detach()
        if full.device.type != "cpu":  # cast where it was gathered: no fp32 copy on the host
            full = full.to(out)
        flat = full.reshape(-1)
        step = max(1, SAVE_CHUNK_BYTES // out.itemsize)
        for start in range(0, flat.numel(), step):
            piece = flat[start:start + step]
            buffer = take()
            buffer.tensor(piece.numel(), out).copy_(piece)
            yield buffer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    hashes = writer.write_sharded(folder, specs, max_shard_bytes, chunks_for)
    if INDEX_NAME in hashes:  # save_pretrained's index also counts the parameters (tied ones once)
        index_path = folder / INDEX_NAME
        index = json.loads(index_path.read_text())
        index["metadata"]["total_parameters"] = model.num_parameters()
        text = (json.dumps(index, indent=2, sort_keys=True) + "\n").encode()
        index_path.write_bytes(text)
        hashes[INDEX_NAME] = hashlib.sha256(text).hexdigest()
    return hashes


def plain_class(model) -> type:
    """The model's own class (fully_shard swaps in a subclass named FSDP<class>)."""
    from torch.distributed.fsdp import FSDPModule

    return next(c for c in type(model).__mro__ if not issubclass(c, FSDPModule))


def tied_groups(model) -> list[tuple[str, ...]]:
    """Names of the parameters that are one Parameter under several names (tied lm_head/embed_tokens)."""
    names: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(name)
    return sorted(tuple(group) for group in names.values() if len(group) > 1)


def load_from_rank0(model, full_state: dict | None, device) -> None:
    """Fill a sharded model (shard()) with the whole weights that only global rank 0 holds.

    Rank 0 built its model from the checkpoint (`full_state`: its state dict taken before sharding,
    so its shards already hold the values); the other ranks built theirs on the meta device and get
    their shards here: each one's sharded parameters are allocated (to_empty: only its shards, on the
    mesh's device), then set_model_state_dict broadcasts the full weights from rank 0 one tensor at
    a time and each rank keeps its slice. Buffers are not sharded and the non-persistent ones (the
    rotary embedding's inv_freq) are in no state dict: each buffer is broadcast from rank 0 whole.
    Every process must call this; a one-process run has nothing to load.
    """
    import torch
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return
    rank0 = torch.distributed.get_rank() == 0
    ties = tied_groups(model)
    if not rank0:
        model.to_empty(device=device)
    if tied_groups(model) != ties:  # to_empty must keep one Parameter under the tied names
        raise RuntimeError(f"tied parameters {ties} came apart while materialising the model")
    set_model_state_dict(model, full_state if rank0 else {},
                         options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    for buffer in model.buffers():
        torch.distributed.broadcast(buffer, src=0)


def materialised_bytes(model) -> int:
    """Bytes of the model's parameters and buffers that exist in memory (not on the meta device),
    each tied tensor once: the whole model after a normal load, none for a meta-device model."""
    seen, total = set(), 0
    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor.is_meta or id(tensor) in seen:
            continue
        seen.add(id(tensor))
        total += local_bytes(tensor)
    return total
