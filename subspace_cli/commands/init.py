"""``subspace init``: a freshly initialised checkpoint with full metadata."""

from __future__ import annotations

import click

from subspace_cli.commands.common import examples, output_options


@click.command(
    "init",
    epilog=examples("""  subspace init --model mlp --data mnist1d -o start.safetensors
  subspace init --model cnn --data digits --seed 1 -o cnn_start.safetensors
  subspace init --model mlp --model-config '{"widths": [100], "activation": "relu"}' --data digits --data-config '{"shape": "flat"}' --loss ce -o small.safetensors"""),
)
@click.option("--model", required=True, metavar="NAME|module:attr", help="Model plugin.")
@click.option(
    "--model-config",
    metavar="JSON",
    default="{}",
    help="Model factory arguments; data-dependent ones (num_classes, input_dim, "
    "input_shape, seq_len) are filled from the data when the factory takes them.",
)
@click.option("--data", required=True, metavar="NAME|module:attr", help="Data plugin.")
@click.option("--data-config", metavar="JSON", default="{}", help="Data factory arguments.")
@click.option(
    "--loss",
    type=click.Choice(["mse", "ce"]),
    default="mse",
    show_default=True,
    help="mse = mean over samples of 0.5*||f(x)-onehot(y)||^2; ce = mean cross-entropy.",
)
@click.option(
    "--seed", type=int, default=0, show_default=True, help="Seed for the initial weights."
)
@click.option(
    "-o",
    "--output",
    required=True,
    type=click.Path(dir_okay=False),
    help="Checkpoint to write (.safetensors).",
)
@click.option("--overwrite", is_flag=True, help="Replace OUTPUT if it exists.")
@output_options
def init_command(
    model: str,
    model_config: str,
    data: str,
    data_config: str,
    loss: str,
    seed: int,
    output: str,
    overwrite: bool,
    as_json: bool,
) -> None:
    """Write a freshly initialised checkpoint: the start of a from-scratch experiment.

    The checkpoint records model, data and loss plugins and their configs, so
    every later command needs only its path.
    """
    from pathlib import Path

    from subspace_cli.checkpoint import ExperimentSpec, parse_json_object, write_checkpoint
    from subspace_cli.errors import UsageError
    from subspace_cli.experiment import build_data, build_model, complete_model_config
    from subspace_cli.output import emit_json, emit_table
    from subspace_cli.training import evaluate

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
    if as_json:
        emit_json(summary)
    else:
        emit_table(
            [
                [k, f"{v:.6g}" if isinstance(v, float) else v]
                for k, v in summary.items()
                if not k.endswith("config")
            ],
            headers=["field", "value"],
        )
