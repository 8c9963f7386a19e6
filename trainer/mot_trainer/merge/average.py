"""Weighted average, MoT's merge: sum_i w_i * x_i / sum_i w_i.

Accumulated in fp32 in input order and divided by the total weight last: the same operations in the
same order as mergekit's `linear` method (normalize: true), so the result is bit-identical to it.
"""

from __future__ import annotations

import torch

from mot_trainer.merge.workspace import Workspace

ELEMENTWISE = True  # may be applied to flat slices of a tensor independently
NEEDS_BASE = False


def merge(tensors, weights, *, workspace: Workspace | None = None, **_) -> torch.Tensor:
    ws = workspace or Workspace()
    acc = total = None
    for weight, tensor in zip(weights, tensors, strict=True):
        w = torch.tensor(weight, dtype=torch.float32)  # fp32 weights, as mergekit
        if acc is None:
            acc, total = ws.take("acc", tensor).copy_(tensor).mul_(w), w
        else:
            acc.add_(ws.take("term", tensor).copy_(tensor).mul_(w))
            total = total + w
    return acc.div_(total)
