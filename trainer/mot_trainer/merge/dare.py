"""DARE (Yu et al. 2024, "drop and rescale") with a linear combination, mergekit's `dare_linear`.

Each difference from the base keeps every entry with probability `density` and is rescaled by
1/density; then base + scale * sum_i w_i * dropped_i / sum_i w_i. The random mask of input i for a
tensor is seeded from (seed, tensor name, i), so a rerun gives the same bits whatever the order.
"""

from __future__ import annotations

import hashlib

import torch

ELEMENTWISE = False  # one random stream per whole tensor
NEEDS_BASE = True


def mask_seed(seed: int, name: str, index: int) -> int:
    digest = hashlib.sha256(f"{seed}:{name}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def merge(tensors, weights, *, base, scale=1.0, density=0.5, seed=0, name="", **_) -> torch.Tensor:
    base = base.float()
    acc = torch.zeros_like(base)
    for index, (weight, tensor) in enumerate(zip(weights, tensors, strict=True)):
        delta = tensor.float() - base
        generator = torch.Generator().manual_seed(mask_seed(seed, name, index))
        keep = torch.rand(delta.shape, generator=generator) < density
        acc += torch.where(keep, delta, 0.0) * (weight / density)
    return base + acc * (scale / sum(weights))
