"""TIES-merging (Yadav et al. 2023) on the differences from the base.

1. Trim: keep the top `density` fraction of each difference by magnitude (per tensor), zero the rest.
2. Elect: per element, the sign of the weighted sum of the trimmed differences.
3. Disjoint merge: the weighted mean of the differences that agree with the elected sign.
Result: base + scale * merged difference. Holds the K differences of one tensor in memory.
"""

from __future__ import annotations

import torch

ELEMENTWISE = False  # the trim threshold is a statistic of the whole tensor
NEEDS_BASE = True


def trim(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Zero all but the int(density * n) largest-magnitude entries (mergekit's `magnitude`)."""
    n = delta.numel()
    k = int(density * n)
    if k >= n:
        return delta
    if k == 0:
        return torch.zeros_like(delta)
    keep = torch.topk(delta.abs().flatten(), k, sorted=False).indices
    out = torch.zeros_like(delta).flatten()
    out[keep] = delta.flatten()[keep]
    return out.view_as(delta)


def merge(tensors, weights, *, base, scale=1.0, density=0.5, **_) -> torch.Tensor:
    base = base.float()
    deltas = [trim(tensor.float() - base, density) for tensor in tensors]
    elected = torch.sign(sum(d * w for d, w in zip(deltas, weights, strict=True)))
    numerator = torch.zeros_like(base)
    divisor = torch.zeros_like(base)
    for delta, weight in zip(deltas, weights, strict=True):
        agrees = torch.sign(delta) == elected
        numerator += torch.where(agrees, delta * weight, 0.0)
        divisor += agrees * weight
    merged = numerator / torch.where(divisor == 0, 1.0, divisor)
    return base + scale * merged
