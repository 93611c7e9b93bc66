"""Training data as plugins hand it to the tool, and chunked iteration over it.

A data plugin returns a :class:`TrainingData`: either in-memory inputs ``x`` and labels ``y``,
or a map-style :class:`torch.utils.data.Dataset` whose items are ``(x, y)`` pairs, for data that
does not fit in memory. Inputs are one tensor, or a mapping of named tensors (``input_ids``,
``attention_mask``, …) that the model receives as keyword arguments; every entry is indexed by
sample, and chunks and mini-batches slice every entry alike.

Labels are class indices: one per sample, shape ``(N,)``, or one per token, shape ``(N, T)``,
for token-level tasks (language modelling, tagging). A label equal to :data:`IGNORE_INDEX`
(padding, a prompt) takes no part in the loss. Everything that sums over the training set
(losses, gradients, Hessian-vector products) walks it in chunks through :func:`iter_chunks`, so
memory is bounded by one chunk.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Union

if TYPE_CHECKING:
    import torch
    from torch.utils.data import Dataset

#: The label of a position that takes no part in the loss (PyTorch's and Hugging Face's).
IGNORE_INDEX = -100

#: A batch of inputs: one tensor, or named tensors passed to the model as keyword arguments.
Inputs = Union["torch.Tensor", Mapping[str, "torch.Tensor"]]


def batch_len(x: Inputs) -> int:
    """Number of samples in a batch of inputs."""
    if isinstance(x, Mapping):
        return len(next(iter(x.values())))
    return len(x)


def index_inputs(x: Inputs, index: Any) -> Inputs:
    """The samples of ``x`` at ``index`` (a slice or an index tensor), in every entry."""
    if isinstance(x, Mapping):
        return {name: value[index] for name, value in x.items()}
    return x[index]


def inputs_to(x: Inputs, device: torch.device | str | None,
              dtype: torch.dtype | None) -> Inputs:
    """``x`` on ``device``; floating-point entries cast to ``dtype`` (token ids and masks that
    are integers are left alone)."""
    def move(value: torch.Tensor) -> torch.Tensor:
        if dtype is not None and value.is_floating_point():
            value = value.to(dtype)
        return value.to(device)

    if isinstance(x, Mapping):
        return {name: move(value) for name, value in x.items()}
    return move(x)


def model_arguments(x: Inputs) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Positional and keyword arguments of the model's forward for the inputs ``x``."""
    if isinstance(x, Mapping):
        return (), dict(x)
    return (x,), {}


def output_tensor(output: Any) -> torch.Tensor:
    """The logits in a model's output: the tensor itself, the ``logits`` of a Hugging Face
    ``ModelOutput`` (or any object or mapping with that entry), or a tuple's first tensor."""
    import torch

    from subspace_cli.errors import InputError

    if isinstance(output, torch.Tensor):
        return output
    logits = output.get("logits") if isinstance(output, Mapping) else getattr(
        output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise InputError(
        f"the model returned {type(output).__name__}, expected a tensor of logits (or an "
        "output with a 'logits' entry)"
    )


def run_model(model: torch.nn.Module, x: Inputs) -> torch.Tensor:
    """The model's logits for the inputs ``x``."""
    args, kwargs = model_arguments(x)
    return output_tensor(model(*args, **kwargs))


def unit_count(y: torch.Tensor) -> int:
    """Number of labels in ``y`` that take part in the loss (samples, or tokens)."""
    return int((y != IGNORE_INDEX).sum())


def require_units(count: int, what: str = "the training set") -> int:
    """``count`` labelled units, refused when there are none (every label ignored)."""
    if count == 0:
        from subspace_cli.errors import UsageError

        raise UsageError(f"no label of {what} takes part in the loss (all are {IGNORE_INDEX},"
                         " the ignore index)")
    return count


@dataclass(frozen=True)
class TrainingData:
    """The full training set of an experiment.

    Attributes:
        num_classes: Number of classes (the width of the model's output, the vocabulary size
            of a language model).
        x: Inputs, first dimension the sample index: one tensor, or a mapping of named tensors
            passed to the model as keyword arguments (in-memory form).
        y: Integer class labels, shape ``(N,)`` or, one per token, ``(N, T)``; entries equal
            to :data:`IGNORE_INDEX` are left out of the loss (in-memory form).
        dataset: A map-style dataset of ``(x, y)`` pairs, for data too large for memory.
            Exactly one of ``(x, y)`` and ``dataset`` is given.
    """

    num_classes: int
    x: Inputs | None = None
    y: torch.Tensor | None = None
    dataset: Dataset[Any] | None = None

    def __post_init__(self) -> None:
        in_memory = self.x is not None or self.y is not None
        if in_memory == (self.dataset is not None):
            raise ValueError("TrainingData takes either tensors x and y, or a dataset, not both")
        if in_memory:
            if self.x is None or self.y is None:
                raise ValueError("TrainingData needs both x and y")
            if isinstance(self.x, Mapping):
                if not self.x:
                    raise ValueError("TrainingData's input mapping is empty")
                lengths = {name: len(value) for name, value in self.x.items()}
                if len(set(lengths.values())) > 1:
                    raise ValueError(
                        "the inputs' entries differ in length: "
                        + ", ".join(f"{name} {n}" for name, n in lengths.items())
                    )
            if self.y.dim() < 1:
                raise ValueError("the labels y must have one row per sample")
            if batch_len(self.x) != len(self.y):
                raise ValueError(f"x has {batch_len(self.x)} samples but y has {len(self.y)}")
        if int(self.num_classes) < 1:
            raise ValueError(f"num_classes must be positive, got {self.num_classes}")

    def __len__(self) -> int:
        if self.x is not None:
            return batch_len(self.x)
        assert self.dataset is not None
        return len(self.dataset)  # type: ignore[arg-type]

    def take(self, indices: torch.Tensor) -> tuple[Inputs, torch.Tensor]:
        """Samples at ``indices`` as a stacked ``(x, y)`` batch (used for mini-batches)."""
        import torch

        if self.x is not None:
            assert self.y is not None
            return index_inputs(self.x, indices), self.y[indices]
        assert self.dataset is not None
        items = [self.dataset[int(i)] for i in indices]
        labels = [torch.as_tensor(item[1]).long() for item in items]
        if all(label.numel() == 1 and label.dim() <= 1 for label in labels):
            labels = [label.reshape(()) for label in labels]  # one class per sample: (N,)
        ys = torch.stack(labels)
        if items and isinstance(items[0][0], Mapping):
            names = list(items[0][0])
            return {n: torch.stack([torch.as_tensor(it[0][n]) for it in items])
                    for n in names}, ys
        return torch.stack([torch.as_tensor(item[0]) for item in items]), ys

    def subset(self, indices: torch.Tensor) -> TrainingData:
        """The samples at ``indices`` as an in-memory training set."""
        x, y = self.take(indices)
        return TrainingData(num_classes=self.num_classes, x=x, y=y)


def iter_chunks(
    data: TrainingData,
    chunk_size: int,
    max_samples: int | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    *,
    sharded: bool = False,
) -> Iterator[tuple[Inputs, torch.Tensor]]:
    """Yield ``(x, y)`` chunks covering the first ``max_samples`` samples in order; with
    ``sharded``, only this rank's contiguous shard of them in a data-parallel run
    (:func:`subspace_cli.parallel.shard`).

    Floating-point inputs are cast to ``dtype`` (integer token inputs are left alone); both are
    moved to ``device``.
    """
    import torch

    from subspace_cli import parallel

    if chunk_size < 1:
        raise ValueError(f"chunk size must be positive, got {chunk_size}")
    n = len(data) if max_samples is None else min(max_samples, len(data))
    first, n = parallel.shard(n) if sharded else (0, n)
    for start in range(first, n, chunk_size):
        stop = min(start + chunk_size, n)
        if data.x is not None:
            assert data.y is not None
            x, y = index_inputs(data.x, slice(start, stop)), data.y[start:stop]
        else:
            x, y = data.take(torch.arange(start, stop))
        yield inputs_to(x, device, dtype), y.to(device)


def sample_count(data: TrainingData, max_samples: int | None = None) -> int:
    """Number of samples that :func:`iter_chunks` covers."""
    return len(data) if max_samples is None else min(max_samples, len(data))
