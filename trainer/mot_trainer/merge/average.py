"""Weighted average, MoT's merge: sum_i w_i * x_i / sum_i w_i.

Accumulated in fp32 in input order and divided by the total weight last: the same operations in the
same order as mergekit's `linear` method (normalize: true), so the result is bit-identical to it.
"""

from __future__ import annotations

import torch

ELEMENTWISE = True  # may be applied to flat slices of a tensor independently
NEEDS_BASE = False


def merge(tensors, weights, **_) -> torch.Tensor:
    total = None
    acc = None
    for weight, tensor in zip(weights, tensors, strict=True):
        w = torch.tensor(weight, dtype=torch.float32)  # fp32 weights, as mergekit
        term = tensor.float() * w
        acc = term if acc is None else acc.add_(term)
        total = w if total is None else total + w
    return acc.div_(total)
