"""Training data as plugins hand it to the tool, and chunked iteration over it.

A data plugin returns a :class:`TrainingData`: either in-memory tensors ``x`` and ``y``, or a
map-style :class:`torch.utils.data.Dataset` whose items are ``(x, y)`` pairs, for data that does
not fit in memory.  Everything that sums over the training set (losses, gradients, Hessian-vector
products) walks it in chunks through :func:`iter_chunks`, so memory is bounded by one chunk.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from torch.utils.data import Dataset


@dataclass(frozen=True)
class TrainingData:
    """The full training set of an experiment.

    Attributes:
        num_classes: Number of classes (the width of the one-hot targets under ``mse``).
        x: Inputs, first dimension the sample index (in-memory form).
        y: Integer class labels of shape ``(N,)`` (in-memory form).
        dataset: A map-style dataset of ``(x, y)`` pairs, for data too large for memory.
            Exactly one of ``(x, y)`` and ``dataset`` is given.
    """

    num_classes: int
    x: torch.Tensor | None = None
    y: torch.Tensor | None = None
    dataset: Dataset[Any] | None = None

    def __post_init__(self) -> None:
        in_memory = self.x is not None or self.y is not None
        if in_memory == (self.dataset is not None):
            raise ValueError("TrainingData takes either tensors x and y, or a dataset, not both")
        if in_memory:
            if self.x is None or self.y is None:
                raise ValueError("TrainingData needs both x and y")
            if len(self.x) != len(self.y):
                raise ValueError(f"x has {len(self.x)} samples but y has {len(self.y)}")
        if int(self.num_classes) < 1:
            raise ValueError(f"num_classes must be positive, got {self.num_classes}")

    def __len__(self) -> int:
        if self.x is not None:
            return len(self.x)
        assert self.dataset is not None
        return len(self.dataset)  # type: ignore[arg-type]

    def take(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Samples at ``indices`` as a stacked ``(x, y)`` batch (used for mini-batches)."""
        import torch

        if self.x is not None:
            assert self.y is not None
            return self.x[indices], self.y[indices]
        assert self.dataset is not None
        items = [self.dataset[int(i)] for i in indices]
        xs = torch.stack([torch.as_tensor(item[0]) for item in items])
        ys = torch.as_tensor([int(item[1]) for item in items])
        return xs, ys


def iter_chunks(
    data: TrainingData,
    chunk_size: int,
    max_samples: int | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(x, y)`` chunks covering the first ``max_samples`` samples in order.

    Floating-point inputs are cast to ``dtype`` (integer token inputs are left alone); both are
    moved to ``device``.
    """
    import torch

    if chunk_size < 1:
        raise ValueError(f"chunk size must be positive, got {chunk_size}")
    n = len(data) if max_samples is None else min(max_samples, len(data))
    for start in range(0, n, chunk_size):
        stop = min(start + chunk_size, n)
        if data.x is not None:
            assert data.y is not None
            x, y = data.x[start:stop], data.y[start:stop]
        else:
            x, y = data.take(torch.arange(start, stop))
        if dtype is not None and x.is_floating_point():
            x = x.to(dtype)
        yield x.to(device), y.to(device)


def sample_count(data: TrainingData, max_samples: int | None = None) -> int:
    """Number of samples that :func:`iter_chunks` covers."""
    return len(data) if max_samples is None else min(max_samples, len(data))
