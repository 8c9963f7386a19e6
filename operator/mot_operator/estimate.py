"""Per-GPU memory of one SFT branch of a MoTRun, before anything runs (`mot estimate`).

A pure function of the student's config.json and the spec's branch resources and training settings,
following what the trainer really does (trainer/mot_trainer/sft.py, sharding.py, loss.py) and how
the operator launches it (jobs.launcher: one process per GPU, P = gpus x nodes):

- strategy: P > 1 -> FSDP2 full sharding (the trainer's --sharding auto; the operator passes no
  --sharding), P = 1 -> nothing sharded. Master weights are fp32 either way.
- weights, gradients (fp32, 4 + 4 bytes/param) and AdamW's exp_avg/exp_avg_sq (8 bytes/param) plus
  its per-tensor `step` scalar (4 bytes): FSDP2 splits every tensor along dim 0 in torch.chunk
  pieces, so the largest process (rank 0) holds ceil(rows / P) rows of each. weights + optimizer is
  exactly what the trainer measures after step 1 as metrics.sharded_state_bytes (it does not count
  the gradients, which are counted here as their own term).
- FSDP transients: two decoder layers' full parameters all-gathered (the one computing and the one
  prefetched), in bf16 with bf16 precision else fp32; one layer's unsharded gradients in the compute
  dtype plus their fp32 reduce-scatter copy (MixedPrecisionPolicy reduce_dtype=float32); and the
  root unit (embeddings, final norm, untied lm_head), which FSDP2 keeps unsharded from its forward to
  the end of the backward. P = 1 with bf16: autocast's bf16 copies of the matmul weights, cached for
  the whole forward and saved for the backward (2 bytes/param).
- activations, for T = microBatchSize x maxSeqLength tokens per forward, bytes per token of what
  autograd saves in transformers' Qwen2/Qwen3/Qwen3-MoE decoder layer (an adaptation of Korthikanti
  et al. 2022, "Reducing Activation Recomputation in Large Transformer Models", sbh(34 + 5as/h), to
  RMSNorm, GQA, q/k-norm, SwiGLU and top-k experts; attention through SDPA/flash, so no S x S matrix,
  only a logsumexp per head):
    attention: 4H (RMSNorm's fp32 input) + aH (normed) + a(q + 2kv) (projections)
               [+ (4 + a)(q + kv) q/k-norm] + a(q + kv) (rotary) + a q (attention output) + 4 heads
    dense MLP: 4H + aH + 4a I (gate, silu(gate), up, their product)
    MoE MLP:   4H + aH + 8E (router logits and softmax, fp32) + k (2aH + 4a I_moe) per active expert
  (q = heads x head_dim, kv = kv_heads x head_dim, a = activation bytes). With gradient checkpointing
  (one checkpoint per decoder layer) only each layer's input is kept, L x T x H x r (r: residual
  stream bytes, fp32 under autocast with one process), plus one layer recomputed in full; without
  it, L layers in full.
- loss (loss.py, chunks of --loss-chunk-tokens C = 1024): one chunk's logits in the compute dtype,
  their fp32 copy and the bf16 gradient cast (C x V x (a + 4 + a) bytes), the fp32 lm_head gradient
  accumulator (V x H x 4) and the matmul result added into it (as much again), and the gradient of
  the hidden states (T x H x a).
- packed rows (spec.training.packing): the trainer passes per-document position ids and transformers
  turns them into a block-diagonal S x S mask for SDPA. Each layer then saves a float copy of it in
  the compute dtype (a S^2 bytes per row) and k, v repeated to every query head (2 (q - kv) a bytes
  per token): measured against autograd's saved tensors on CPU (tests/local/test_local_estimate.py),
  not yet on a GPU, whose SDPA kernels may save less. L layers hold them without checkpointing, the
  one recomputed layer with it; plus the boolean mask itself (S^2 bytes per row).

Not modelled, hence the margin: the CUDA context and cuBLAS/NCCL workspaces (MARGIN_FIXED_BYTES) and
the caching allocator's fragmentation (MARGIN_FRACTION of the estimate).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

GIB = 1024 ** 3
MARGIN_FIXED_BYTES = 2 * GIB  # CUDA context (~0.5-1 GiB with torch), cuBLAS + NCCL workspaces
MARGIN_FRACTION = 0.10  # caching-allocator fragmentation, kernels' temporary buffers
DEFAULT_LOSS_CHUNK_TOKENS = 1024  # mot_trainer.loss.DEFAULT_CHUNK_TOKENS (the operator passes no flag)
STRATEGIES = ("none", "fsdp")
# The spec fields that change the per-GPU memory, named when a branch does not fit.
FIELDS_TO_CHANGE = ("spec.resources.branch.gpus", "spec.resources.branch.nodes", "spec.training.maxSeqLength",
                    "spec.training.gradientCheckpointing", "spec.training.microBatchSize")


class ConfigError(ValueError):
    """The model config lacks a field the estimate needs (the message names it)."""


# --- the model, from its config.json --------------------------------------------------------------


def _field(config: dict, name: str):
    value = config.get(name)
    if value is None:
        raise ConfigError(f"config.json: {name}: required for the estimate")
    return value


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs of a decoder-only causal LM (Qwen2/Qwen3/Qwen3-MoE shaped)."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    intermediate: int  # dense MLP width (layers without experts)
    qkv_bias: bool
    qk_norm: bool
    experts: int = 0
    experts_per_token: int = 0
    moe_intermediate: int = 0
    moe_layers: tuple[int, ...] = ()

    @classmethod
    def from_config(cls, config: dict) -> ModelShape:
        model_type = str(config.get("model_type") or "")
        hidden = int(_field(config, "hidden_size"))
        heads = int(_field(config, "num_attention_heads"))
        layers = int(_field(config, "num_hidden_layers"))
        experts = int(config.get("num_experts") or 0)
        moe_layers: tuple[int, ...] = ()
        if experts:
            step = int(config.get("decoder_sparse_step") or 1)
            dense_only = set(config.get("mlp_only_layers") or ())
            moe_layers = tuple(i for i in range(layers) if i not in dense_only and (i + 1) % step == 0)
        intermediate = config.get("intermediate_size")
        if intermediate is None and len(moe_layers) < layers:
            raise ConfigError("config.json: intermediate_size: required for the estimate")
        return cls(
            hidden=hidden, layers=layers, heads=heads,
            kv_heads=int(config.get("num_key_value_heads") or heads),
            head_dim=int(config.get("head_dim") or hidden // heads),
            vocab=int(_field(config, "vocab_size")),
            tied=bool(config.get("tie_word_embeddings", False)),
            intermediate=int(intermediate or 0),
            # Qwen2 hard-codes biases on q/k/v; Qwen3 and others follow attention_bias.
            qkv_bias=model_type == "qwen2" or bool(config.get("attention_bias", False)),
            qk_norm=model_type.startswith("qwen3"),
            experts=experts,
            experts_per_token=int(_field(config, "num_experts_per_tok")) if experts else 0,
            moe_intermediate=int(_field(config, "moe_intermediate_size")) if experts else 0,
            moe_layers=moe_layers,
        )

    @property
    def q(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv(self) -> int:
        return self.kv_heads * self.head_dim

    def layer_shapes(self, index: int) -> list[tuple[int, ...]]:
        """Parameter shapes of decoder layer `index`, as transformers 5 builds them (the experts of a
        Qwen3-MoE layer are two fused 3-D tensors, experts first)."""
        h = self.hidden
        shapes = [(self.q, h), (self.kv, h), (self.kv, h), (h, self.q)]
        if self.qkv_bias:
            shapes += [(self.q,), (self.kv,), (self.kv,)]
        if self.qk_norm:
            shapes += [(self.head_dim,), (self.head_dim,)]
        if index in self.moe_layers:
            e, i = self.experts, self.moe_intermediate
            shapes += [(e, 2 * i, h), (e, h, i), (e, h)]  # gate_up_proj, down_proj, router
        else:
            shapes += [(self.intermediate, h)] * 2 + [(h, self.intermediate)]
        return shapes + [(h,), (h,)]  # input_layernorm, post_attention_layernorm

    def root_shapes(self) -> list[tuple[int, ...]]:
        """The parameters outside the decoder layers: embeddings, final norm, untied lm_head."""
        shapes = [(self.vocab, self.hidden), (self.hidden,)]
        return shapes if self.tied else shapes + [(self.vocab, self.hidden)]

    def shapes(self) -> list[tuple[int, ...]]:
        """Every parameter tensor (a tied lm_head is the embedding: counted once, as torch does)."""
        return [s for i in range(self.layers) for s in self.layer_shapes(i)] + self.root_shapes()

    def parameters(self) -> int:
        return sum(math.prod(s) for s in self.shapes())

    def layer_parameters(self, index: int) -> int:
        return sum(math.prod(s) for s in self.layer_shapes(index))

    def active_parameters(self) -> int:
        """Parameters one token goes through (MoE: only its top-k experts; the embedding counted once)."""
        total = self.parameters()
        if self.experts:
            per_expert = 3 * self.moe_intermediate * self.hidden
            total -= len(self.moe_layers) * (self.experts - self.experts_per_token) * per_expert
        return total


def shard_elements(shape: tuple[int, ...], processes: int) -> int:
    """Elements of the largest dim-0 shard of a tensor split over `processes` (torch.chunk, as FSDP2)."""
    rows = math.ceil(shape[0] / processes) if processes > 1 else shape[0]
    return rows * math.prod(shape[1:])


# --- the estimate ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Term:
    name: str
    bytes: int
    formula: str


@dataclass(frozen=True)
class Estimate:
    parameters: int
    active_parameters: int
    gpus_per_node: int
    nodes: int
    processes: int
    strategy: str  # "none" or "fsdp"
    precision: str  # "bf16" or "fp32": what the trainer computes in
    tokens_per_forward: int
    gradient_checkpointing: bool
    terms: tuple[Term, ...]
    packing: bool = False

    @property
    def total(self) -> int:
        return sum(t.bytes for t in self.terms)

    def term(self, name: str) -> int:
        return next(t.bytes for t in self.terms if t.name == name)

    @property
    def state_bytes(self) -> int:
        """Weights + optimizer states of the largest process: the trainer's metrics.sharded_state_bytes."""
        return self.term("weights") + self.term("optimizer")

    @property
    def margin(self) -> int:
        return margin_bytes(self.total)

    def fits(self, gpu_memory_bytes: int) -> bool:
        """The estimate plus the margin (CUDA context, fragmentation) within one GPU's memory."""
        return self.total + self.margin <= gpu_memory_bytes


# In the message of a branch refused for its GPU memory (the preflight's, `mot run`'s exit code reads it).
DOES_NOT_FIT = "does not fit the GPU memory"
FIT_HINT = ("more GPUs or nodes shard the weights, gradients and optimizer states; a shorter maxSeqLength, "
            "gradientCheckpointing: true or a smaller microBatchSize cut the activations")


def refusal(est: Estimate, gpu_memory_bytes: int) -> str | None:
    """None when the branch fits one GPU of `gpu_memory_bytes`; else the message that refuses it,
    naming the spec fields to change (FIELDS_TO_CHANGE) first."""
    if est.fits(gpu_memory_bytes):
        return None
    needed = est.total + est.margin
    return (f"spec.resources.branch: one SFT branch needs {needed / GIB:.2f} GiB per GPU ({est.gpus_per_node} "
            f"GPU(s) x {est.nodes} node(s), strategy {est.strategy}, precision {est.precision}, "
            f"{est.tokens_per_forward} tokens per forward, estimate {est.total / GIB:.2f} GiB + margin "
            f"{est.margin / GIB:.2f} GiB), which {DOES_NOT_FIT} of {_size(gpu_memory_bytes)} per GPU "
            f"where it can run; change {', '.join(FIELDS_TO_CHANGE)} ({FIT_HINT}); `mot estimate FILE.yaml` "
            "shows the terms")


def _size(value: int) -> str:
    return f"{value / GIB:.2f} GiB" if value >= GIB // 100 else f"{value / 1024 ** 2:.0f} MiB"


def margin_bytes(total: int) -> int:
    return MARGIN_FIXED_BYTES + int(MARGIN_FRACTION * total)


def resolve_precision(precision: str, gpus: int) -> str:
    """The trainer's --precision: auto is bf16 on a GPU (assumed bf16-capable: Ampere or newer), fp32 on CPU."""
    if precision == "auto":
        return "bf16" if gpus > 0 else "fp32"
    if precision not in ("bf16", "fp16", "fp32"):
        raise ValueError(f"unknown precision {precision!r}")
    return precision


def activation_bytes_per_token(shape: ModelShape, index: int, a: int) -> int:
    """Bytes autograd saves per token in decoder layer `index` (see the module docstring)."""
    h, q, kv = shape.hidden, shape.q, shape.kv
    attn = 4 * h + a * h + a * (q + 2 * kv) + a * (q + kv) + a * q + 4 * shape.heads
    if shape.qk_norm:
        attn += (4 + a) * (q + kv)
    if index in shape.moe_layers:
        mlp = 4 * h + a * h + 8 * shape.experts + shape.experts_per_token * (2 * a * h + 4 * a * shape.moe_intermediate)
    else:
        mlp = 4 * h + a * h + 4 * a * shape.intermediate
    return attn + mlp


def estimate(config: dict, *, gpus: int, nodes: int = 1, micro_batch_size: int = 1, max_seq_length: int = 4096,
             gradient_checkpointing: bool = False, precision: str = "auto", packing: bool = False,
             loss_chunk_tokens: int = DEFAULT_LOSS_CHUNK_TOKENS) -> Estimate:
    """The per-process (per-GPU) memory of one SFT branch: gpus per node x nodes processes."""
    shape = ModelShape.from_config(config)
    processes = max(gpus, 1) * max(nodes, 1)  # jobs._multinode_env: nproc per node is max(gpus, 1)
    strategy = "fsdp" if processes > 1 else "none"
    compute = resolve_precision(precision, gpus)
    if compute == "fp16" and strategy == "fsdp":
        raise ValueError("precision fp16 is not supported with FSDP sharding (more than one process); "
                         "use bf16 or fp32")
    a = 4 if compute == "fp32" else 2  # activations and gathered parameters
    # The residual stream: fp32 under autocast (one process: fp32 embedding output plus bf16 sums);
    # FSDP's bf16 parameters make it bf16 from the embedding on.
    r = 2 if compute != "fp32" and strategy == "fsdp" else 4
    tokens = micro_batch_size * max_seq_length

    shapes = shape.shapes()
    shard = sum(shard_elements(s, processes) for s in shapes)
    per = "/ P" if processes > 1 else ""
    terms = [
        Term("weights", 4 * shard, f"4 B x params {per} (fp32 master weights)".replace("  ", " ")),
        Term("gradients", 4 * shard, f"4 B x params {per} (fp32)".replace("  ", " ")),
        Term("optimizer", 8 * shard + 4 * len(shapes),
             f"8 B x params {per} (AdamW exp_avg, exp_avg_sq) + 4 B step per tensor".replace("  ", " ")),
    ]
    biggest = max(range(shape.layers), key=shape.layer_parameters)
    layer = shape.layer_parameters(biggest)
    root = sum(math.prod(s) for s in shape.root_shapes())
    if strategy == "fsdp":
        terms.append(Term("fsdp buffers", 2 * layer * a + layer * (a + 4) + root * a,
                          f"2 layers gathered ({a} B) + 1 layer's grads ({a} B + fp32 reduce) "
                          f"+ root (embeddings, norm, lm_head) unsharded"))
    elif compute != "fp32":
        embedding = 0 if shape.tied else shape.vocab * shape.hidden  # an embedding lookup is not cast
        terms.append(Term("autocast copies", 2 * (shape.parameters() - embedding),
                          "2 B x matmul params (autocast's bf16 weight cache)"))

    per_layer = [activation_bytes_per_token(shape, i, a) for i in range(shape.layers)]
    if gradient_checkpointing:
        act = shape.layers * tokens * shape.hidden * r + max(per_layer) * tokens
        formula = f"L x T x H x {r} B (layer inputs) + 1 layer recomputed"
    else:
        act = sum(per_layer) * tokens
        formula = "L layers x T x per-token saved tensors (no checkpointing)"
    act += 2 * tokens * shape.hidden * r  # embedding output and final norm input
    terms.append(Term("activations", act, f"T = {tokens} tokens; " + formula))
    if packing:
        held = 1 if gradient_checkpointing else shape.layers
        square = micro_batch_size * max_seq_length ** 2
        per_layer_mask = square * a + tokens * 2 * (shape.q - shape.kv) * a
        terms.append(Term("packed-rows mask", held * per_layer_mask + square,
                          f"{held} layer(s) x (B x S^2 x {a} B float mask + repeated k, v) + B x S^2 bool mask"))

    chunk = min(loss_chunk_tokens, max(tokens - 1, 1)) if loss_chunk_tokens else tokens
    loss = chunk * shape.vocab * (a + 4 + a) + 2 * shape.vocab * shape.hidden * 4 + tokens * shape.hidden * a
    terms.append(Term("loss", loss, f"{chunk}-token logits chunk x V x {2 * a + 4} B + 2 x fp32 lm_head grad "
                                    "(V x H x 4 B) + grad of hidden states"))
    return Estimate(
        parameters=shape.parameters(), active_parameters=shape.active_parameters(),
        gpus_per_node=gpus, nodes=nodes, processes=processes, strategy=strategy, precision=compute,
        tokens_per_forward=tokens, gradient_checkpointing=gradient_checkpointing, terms=tuple(terms),
        packing=packing,
    )


def estimate_spec(config: dict, spec) -> Estimate:
    """estimate() for a parsed MoTRunSpec (mot_operator.spec.MoTRunSpec)."""
    t, branch = spec.training, spec.resources.branch
    return estimate(config, gpus=branch.gpus, nodes=branch.nodes, micro_batch_size=t.micro_batch_size,
                    max_seq_length=t.max_seq_length, gradient_checkpointing=t.gradient_checkpointing,
                    precision=t.precision, packing=t.packing)


def tokens_per_round(spec, processes: int) -> int:
    """Tokens one branch trains on per round, at most (every row full: packing; without packing
    rows are shorter): steps x microBatchSize x gradAccum x P x maxSeqLength."""
    t = spec.training
    return t.steps * t.micro_batch_size * t.grad_accum * processes * t.max_seq_length


def seconds_per_round(spec, processes: int, tokens_per_second: float) -> float:
    """One branch's SFT time per round at `tokens_per_second` (the branch's total throughput, all
    its processes: the trainer's metrics.tokens_per_second)."""
    if tokens_per_second <= 0:
        raise ValueError("tokens per second must be > 0")
    return tokens_per_round(spec, processes) / tokens_per_second


_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000 ** 2, "mb": 1000 ** 2, "g": 1000 ** 3, "gb": 1000 ** 3,
          "t": 1000 ** 4, "tb": 1000 ** 4, "ki": 1024, "kib": 1024, "mi": 1024 ** 2, "mib": 1024 ** 2,
          "gi": GIB, "gib": GIB, "ti": 1024 ** 4, "tib": 1024 ** 4}


def parse_bytes(text: str) -> int:
    """'80GiB', '80Gi', '141GB', '85899345920' -> bytes (GB = 10^9, GiB/Gi = 2^30)."""
    raw = str(text).strip()
    number = raw.rstrip("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ ")
    unit = raw[len(number):].strip().lower()
    try:
        value = float(number)
    except ValueError:
        raise ValueError(f"not a memory size: {text!r} (e.g. 80GiB, 141GB)") from None
    if unit not in _UNITS or value <= 0:
        raise ValueError(f"not a memory size: {text!r} (e.g. 80GiB, 141GB)")
    return int(value * _UNITS[unit])
