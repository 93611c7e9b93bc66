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
    from subspace_cli.output import emit_json, emit_table
    from subspace_cli.training import initialise_checkpoint

    summary = initialise_checkpoint(model, model_config, data, data_config, loss, seed=seed,
                                    output=output, overwrite=overwrite)
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
