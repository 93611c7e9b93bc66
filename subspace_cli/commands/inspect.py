"""``subspace inspect``: what a checkpoint holds and which plugins it resolves to."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from subspace_cli.commands.common import (
    examples,
    for_each_input,
    output_options,
    overrides_from,
    plugin_options,
)


@click.command(
    "inspect",
    epilog=examples("""  subspace inspect sample_checkpoints/mlp_mnist1d.safetensors
  subspace inspect sample_checkpoints/ --json --no-tensors
  subspace inspect weights.pt --model mlp --model-config '{"input_dim": 40, "widths": [200, 200], "num_classes": 10}' --data mnist1d --loss mse"""),
)
@click.argument("checkpoints", nargs=-1, required=True)
@plugin_options
@click.option(
    "--tensors/--no-tensors",
    default=True,
    show_default=True,
    help="List tensor names, shapes and dtypes.",
)
@output_options
@click.pass_context
def inspect_command(
    ctx: click.Context,
    checkpoints: tuple[str, ...],
    model: str | None,
    model_config: str | None,
    data: str | None,
    data_config: str | None,
    loss: str | None,
    tensors: bool,
    as_json: bool,
) -> None:
    """Show metadata, resolved plugins, parameter count and tensors of CHECKPOINTS.

    CHECKPOINTS are files (.safetensors, .pt, .pth, .ckpt), directories (searched
    recursively for *.safetensors) or glob patterns. The model is built and
    the weights are loaded strictly, so a checkpoint that inspects cleanly can
    be analysed. Plugins named in a checkpoint resolve only through
    registered entry points.
    """
    overrides = overrides_from(model, model_config, data, data_config, loss)
    results: list[dict[str, Any]] = []

    def handle(path: Path) -> None:
        from subspace_cli.experiment import describe_checkpoint

        report = describe_checkpoint(path, overrides)
        results.append(report)
        if not as_json:
            render(report, tensors)

    outcome = for_each_input(ctx, checkpoints, handle)
    if as_json:
        from subspace_cli.output import emit_json

        if not tensors:
            for r in results:
                r.pop("tensors", None)
        emit_json(results)
    outcome.exit(ctx)


#: Widest config shown in the table.
_CONFIG_WIDTH = 120


def render(report: dict[str, Any], tensors: bool) -> None:
    import json

    from subspace_cli.output import emit_table

    rows: list[list[Any]] = [
        ["checkpoint", report["checkpoint"]],
        ["format", report["format"]],
        ["sha256", report["sha256"]],
    ]
    if "model" in report:
        for kind in ("model", "data"):
            p = report["plugins"][kind]
            where = f"{p['distribution']} {p['version']}" if p["distribution"] else p["entry_point"]
            rows.append([kind, f"{p['name']} ({where}, from {p['source']})"])
            text = json.dumps(report[f"{kind}_config"], sort_keys=True)
            # a Hugging Face config.json has dozens of keys: --json shows them all
            rows.append([f"{kind} config", text if len(text) <= _CONFIG_WIDTH
                         else text[:_CONFIG_WIDTH - 20] + " ... (--json: all)"])
        rows += [
            ["loss", report["loss"]],
            ["step", report["step"]],
            ["parameters", f"{report['n_params']:,}"],
            ["weights load", "yes (strict)"],
        ]
        if report.get("prefix"):
            rows.append(["names", f"the {report['tensors_used']} tensors under "
                                  f"{report['prefix']!r}, without it"])
    else:
        rows.append(["note", report["note"]])
    rows.append(["tensors", f"{report['n_tensors']} ({report['n_elements']:,} elements)"])
    other = {k: v for k, v in report["metadata"].items() if not k.startswith("subspace.")}
    for k, v in other.items():
        rows.append([f"metadata {k}", v if len(v) < 80 else v[:77] + "..."])
    emit_table(rows, headers=["field", "value"], floatfmt="")
    if tensors:
        click.echo()
        emit_table(
            [
                [t["name"], "×".join(map(str, t["shape"])) or "scalar", t["dtype"]]
                for t in report["tensors"]
            ],
            headers=["tensor", "shape", "dtype"],
        )
    click.echo()
