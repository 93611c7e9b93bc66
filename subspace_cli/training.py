"""Full-batch evaluation and the training loop used to make checkpoints."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from subspace_cli.data import TrainingData, iter_chunks
from subspace_cli.errors import InputError
from subspace_cli.losses import correct_count, loss_sum

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Evaluation:
    loss: float
    accuracy: float
    n_samples: int


def check_output(output: torch.Tensor, data: TrainingData) -> None:
    """The model's output must be (batch, C) with C equal to the data's number of classes."""
    if output.ndim != 2 or output.shape[1] != data.num_classes:
        raise InputError(
            f"model output has shape {tuple(output.shape)}, but the data has "
            f"{data.num_classes} classes: expected (batch, {data.num_classes})"
        )


def evaluate(
    model: torch.nn.Module,
    data: TrainingData,
    loss: str,
    *,
    chunk_size: int = 1000,
    max_samples: int | None = None,
) -> Evaluation:
    """Mean loss and accuracy over the training set, in eval mode (the mode is restored)."""
    import torch

    was_training = model.training
    model.eval()
    total, correct, count = 0.0, 0, 0
    try:
        with torch.no_grad():
            for x, y in iter_chunks(data, chunk_size, max_samples):
                out = model(x)
                check_output(out, data)
                total += float(loss_sum(loss, out, y))
                correct += correct_count(out, y)
                count += len(y)
    finally:
        model.train(was_training)
    return Evaluation(total / count, correct / count, count)
