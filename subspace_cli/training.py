"""Full-batch evaluation and the training loop used to make checkpoints."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

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


def initialise_checkpoint(model: str, model_config: str, data: str, data_config: str, loss: str,
                          *, seed: int, output: str, overwrite: bool) -> dict[str, Any]:
    """Write a freshly initialised checkpoint of the ``model`` plugin (configs as JSON text)
    with full metadata, so that every later command needs only its path; returns what
    ``subspace init`` prints."""
    from pathlib import Path

    from subspace_cli.checkpoint import ExperimentSpec, parse_json_object, write_checkpoint
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
    write_checkpoint(output, net.state_dict(), metadata, overwrite=overwrite)
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
