"""Full-batch evaluation and the training loop used to make checkpoints."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from subspace_cli.data import TrainingData, iter_chunks, require_units, run_model, unit_count
from subspace_cli.errors import InputError
from subspace_cli.losses import correct_count, loss_sum

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Evaluation:
    loss: float
    accuracy: float
    n_units: int  # labelled units averaged over: samples, or tokens for token labels


def check_output(output: torch.Tensor, y: torch.Tensor, data: TrainingData) -> None:
    """The model's output must be one row of C logits per label (``(batch, C)``, or
    ``(batch, T, C)`` for token labels), C the data's number of classes."""
    expected = (*y.shape, data.num_classes)
    if tuple(output.shape) != expected:
        shape = ", ".join(["batch", *map(str, expected[1:])])
        raise InputError(
            f"model output has shape {tuple(output.shape)}, but the data has "
            f"{data.num_classes} classes and labels of shape {tuple(y.shape)}: expected "
            f"({shape})"
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
                out = run_model(model, x)
                check_output(out, y, data)
                total += float(loss_sum(loss, out, y))
                correct += correct_count(out, y)
                count += unit_count(y)
    finally:
        model.train(was_training)
    require_units(count)
    return Evaluation(total / count, correct / count, count)


def initialise_checkpoint(model: str, model_config: str, data: str, data_config: str, loss: str,
                          *, seed: int, output: str, overwrite: bool) -> dict[str, Any]:
    """Write a freshly initialised checkpoint of the ``model`` plugin (configs as JSON text)
    with full metadata, so that every later command needs only its path; returns what
    ``subspace init`` prints."""
    from pathlib import Path

    from subspace_cli.checkpoint import (
        ExperimentSpec,
        model_state,
        parse_json_object,
        write_checkpoint,
    )
    from subspace_cli.errors import UsageError
    from subspace_cli.experiment import build_data, build_model, complete_model_config

    if Path(output).exists() and not overwrite:
        raise UsageError(f"{output} exists; pass --overwrite to replace it")
    import torch

    data_cfg = parse_json_object(data_config, "--data-config")
    dataset = build_data(data, data_cfg, from_user=True)
    model_cfg = complete_model_config(
        model, parse_json_object(model_config, "--model-config"), dataset, from_user=True
    )
    torch.manual_seed(seed)
    net = build_model(model, model_cfg, from_user=True)
    spec = ExperimentSpec(model, model_cfg, data, data_cfg, loss, 0, True, True)
    stats = evaluate(net, dataset, loss)
    metadata = spec.to_metadata(step=0)
    metadata["subspace.seed"] = str(seed)
    write_checkpoint(output, model_state(net), metadata, overwrite=overwrite)
    summary = {
        "checkpoint": output,
        "model": model,
        "model_config": model_cfg,
        "data": data,
        "data_config": data_cfg,
        "loss": loss,
        "seed": seed,
        "n_params": sum(p.numel() for p in net.parameters()),
        "n_samples": len(dataset),
        "train_loss": stats.loss,
        "train_accuracy": stats.accuracy,
    }
    return summary
