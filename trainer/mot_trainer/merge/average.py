"""Weighted average, MoT's merge: sum_i w_i * x_i / sum_i w_i.

Accumulated in fp32 in input order and divided by the total weight last: the same operations in the
same order as mergekit's `linear` method (normalize: true), so the result is bit-identical to it.
"""

from __future__ import annotations

import torch

from mot_trainer.merge.workspace import Workspace

ELEMENTWISE = True  # may be applied to flat slices of a tensor independently
NEEDS_BASE = False
# Added to an fp32 accumulator directly: the kernel converts them exactly (fp64 would be summed in fp64).
EXACT_IN_FP32 = (torch.bfloat16, torch.float16, torch.float32)


def merge(tensors, weights, *, workspace: Workspace | None = None, **_) -> torch.Tensor:
    ws = workspace or Workspace()
    acc = total = None
    for weight, tensor in zip(weights, tensors, strict=True):
        w = torch.tensor(weight, dtype=torch.float32)  # fp32 weights, as mergekit
        if acc is None:
            acc, total = ws.take("acc", tensor).copy_(tensor), w
            if weight != 1.0:  # x * 1.0 == x exactly: skipping it changes no bit
                acc.mul_(w)
            continue
        total = total + w
        if weight == 1.0 and tensor.dtype in EXACT_IN_FP32:
            acc.add_(tensor)  # converted to fp32 inside the kernel (exactly), no scratch pass
        else:
            acc.add_(ws.take("term", tensor).copy_(tensor).mul_(w))
    return acc.div_(total)
