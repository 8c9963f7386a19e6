"""Task arithmetic (Ilharco et al. 2023): base + scale * sum_i w_i * (x_i - base) / sum_i w_i.

The weights are normalised (as mergekit's default `normalize: true`), so with uniform weights and
scale 1 this equals the average; scale K gives the classic sum of the K task vectors.
"""

from __future__ import annotations

import torch

from mot_trainer.merge.workspace import Workspace

ELEMENTWISE = True
NEEDS_BASE = True


def merge(tensors, weights, *, base, scale=1.0, workspace: Workspace | None = None, **_) -> torch.Tensor:
    ws = workspace or Workspace()
    base32 = ws.take("base", base).copy_(base)
    acc = None
    for weight, tensor in zip(weights, tensors, strict=True):
        target = "acc" if acc is None else "term"
        term = ws.take(target, tensor).copy_(tensor).sub_(base32).mul_(weight)
        acc = term if acc is None else acc.add_(term)
    return acc.mul_(scale / sum(weights)).add_(base32)
