"""Where sums over the training set become means: the one reduction point.

Every quantity averaged over the training set (loss, accuracy, gradient, Hessian-vector
products) is accumulated as a per-sample *sum* over local chunks and divided by the sample
count here, once. Today the sums are local; a data-parallel mode only has to all-reduce
``sums`` and ``count`` across ranks in :func:`mean` before dividing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def mean(sums: torch.Tensor, count: int) -> torch.Tensor:
    """Per-sample sums over ``count`` samples turned into means."""
    return sums / count
