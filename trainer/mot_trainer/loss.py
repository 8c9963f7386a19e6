"""Causal-LM loss without the whole logits tensor: the lm_head and cross-entropy, chunk by chunk.

A 32k-token row times a 152k vocabulary is ~20 GB of fp32 logits (and as much again for their
gradient); transformers' loss materialises both. Here the tokens go through the output projection
`chunk` at a time: each chunk's logits give its loss and, at once, its gradients with respect to
the hidden states and the projection weight (softmax minus one-hot), which are kept and returned by
backward. Peak extra memory is one chunk's logits, plus a hidden-state-sized and a weight-sized
gradient, which training holds anyway. No logits are recomputed (Liger's fused linear
cross-entropy does the same on GPU with Triton kernels; this is plain torch and runs anywhere).

`patch_model(model, chunk)` makes a transformers causal LM compute its training loss this way, so
the wrappers around it (DDP, FSDP, autocast) see an ordinary forward.
"""

from __future__ import annotations

import types

IGNORE = -100
DEFAULT_CHUNK_TOKENS = 1024  # 1024 x 152k vocab x 4 bytes: 0.6 GB of logits at a time


def _function():
    import torch

    class ChunkedLinearCrossEntropy(torch.autograd.Function):
        """sum over tokens of CE(hidden @ weight.T, labels), times `scale`; labels == IGNORE skipped."""

        @staticmethod
        def forward(ctx, hidden, weight, labels, chunk, scale):
            needs_h, needs_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
            compute = torch.promote_types(hidden.dtype, torch.float32)  # softmax and sums: fp32 at least
            grad_hidden = torch.zeros_like(hidden) if needs_h else None
            grad_weight = torch.zeros_like(weight, dtype=compute) if needs_w else None
            total = torch.zeros((), dtype=compute, device=hidden.device)
            for start in range(0, hidden.shape[0], chunk):
                h = hidden[start:start + chunk]
                y = labels[start:start + chunk]
                valid = y != IGNORE
                if not bool(valid.any()):
                    continue
                target = y.clamp(min=0)
                logits = (h @ weight.t()).to(compute)
                lse = torch.logsumexp(logits, dim=-1)
                picked = logits.gather(1, target[:, None]).squeeze(1)
                total += torch.where(valid, lse - picked, 0.0).sum()
                if needs_h or needs_w:
                    # d(sum CE)/d(logits) = softmax - onehot, zero on ignored tokens; logits reused in place.
                    grad = logits.sub_(lse[:, None]).exp_()
                    grad[torch.arange(grad.shape[0], device=grad.device), target] -= 1.0
                    grad *= valid[:, None]
                    if needs_h:
                        grad_hidden[start:start + chunk] = (grad.to(weight.dtype) @ weight).to(hidden.dtype)
                    if needs_w:
                        grad_weight += grad.t() @ h.to(compute)
                del logits
            ctx.save_for_backward(grad_hidden if needs_h else None, grad_weight if needs_w else None)
            ctx.scale = scale
            ctx.weight_dtype = weight.dtype
            return total * scale

        @staticmethod
        def backward(ctx, grad_output):
            grad_hidden, grad_weight = ctx.saved_tensors
            factor = grad_output * ctx.scale
            gh = None if grad_hidden is None else grad_hidden * factor.to(grad_hidden.dtype)
            gw = None if grad_weight is None else (grad_weight * factor).to(ctx.weight_dtype)
            return gh, gw, None, None, None

    return ChunkedLinearCrossEntropy


_FUNCTION = None


def linear_cross_entropy(hidden, weight, labels, *, chunk: int = DEFAULT_CHUNK_TOKENS, scale: float = 1.0):
    """sum of token cross-entropies of `hidden @ weight.T` against `labels` (IGNORE skipped), times
    `scale`. hidden: (tokens, d); weight: (vocab, d); labels: (tokens,)."""
    global _FUNCTION
    if chunk < 1:
        raise ValueError(f"chunk must be at least 1, got {chunk}")
    if _FUNCTION is None:
        _FUNCTION = _function()
    return _FUNCTION.apply(hidden, weight, labels, chunk, float(scale))


def causal_lm_loss(hidden_states, weight, labels, *, num_items_in_batch=None, chunk: int = DEFAULT_CHUNK_TOKENS):
    """transformers' causal-LM loss (labels shifted by one; mean over label tokens, or sum divided by
    num_items_in_batch when given) from the final hidden states, without the whole logits."""
    import torch

    hidden = hidden_states[:, :-1, :].reshape(-1, hidden_states.shape[-1])
    targets = labels[:, 1:].reshape(-1).to(hidden.device)
    if num_items_in_batch is None:
        count = (targets != IGNORE).sum().clamp(min=1)
        scale_tensor = 1.0 / count.float()
        return linear_cross_entropy(hidden, weight, targets, chunk=chunk) * scale_tensor
    if isinstance(num_items_in_batch, torch.Tensor):
        return linear_cross_entropy(hidden, weight, targets, chunk=chunk) / num_items_in_batch.to(hidden.device)
    return linear_cross_entropy(hidden, weight, targets, chunk=chunk, scale=1.0 / num_items_in_batch)


def supports(model) -> bool:
    """A plain causal LM: a decoder under `.model`, an unbiased `lm_head`, no logit soft-capping or
    scaling (those change the logits this module would compute)."""
    config = getattr(model, "config", None)
    head = getattr(model, "lm_head", None)
    if config is None or head is None or getattr(head, "bias", None) is not None:
        return False
    if getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", None):
        return False
    return hasattr(model, "model") and hasattr(head, "weight")


def patch_model(model, chunk: int = DEFAULT_CHUNK_TOKENS) -> bool:
    """Make `model(**batch, labels=..., num_items_in_batch=...)` return the chunked loss (and no
    logits) in training; other calls go to the original forward. False when the model is not one
    this applies to (it keeps transformers' loss)."""
    if not supports(model):
        return False
    original = model.forward

    def forward(self, input_ids=None, labels=None, num_items_in_batch=None, **kwargs):
        if labels is None or not self.training:
            return original(input_ids=input_ids, labels=labels, **kwargs)
        kwargs.pop("use_cache", None)
        outputs = self.model(input_ids=input_ids, use_cache=False, **kwargs)
        loss = causal_lm_loss(outputs.last_hidden_state, self.lm_head.weight, labels,
                              num_items_in_batch=num_items_in_batch, chunk=chunk)
        return types.SimpleNamespace(loss=loss, logits=None)

    model.forward = types.MethodType(forward, model)
    return True
