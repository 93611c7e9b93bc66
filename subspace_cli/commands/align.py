"""``subspace align``: how much of each gradient lies in the dominant subspace."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from subspace_cli.analysis.alignment import HESSIANS
from subspace_cli.commands.common import (
    examples,
    for_each_input,
    is_quiet,
    output_options,
    overrides_from,
    plugin_options,
)
from subspace_cli.commands.spectrum import settings_from, spectrum_options


def parse_k_sweep(_ctx: click.Context, _param: click.Parameter, value: str | None) -> list[int]:
    if not value:
        return []
    try:
        ks = sorted({int(part) for part in value.split(",") if part.strip()})
    except ValueError as exc:
        raise click.BadParameter(f"expected comma-separated integers, got {value!r}") from exc
    if not ks or ks[0] < 1:
        raise click.BadParameter("every k must be a positive integer")
    return ks


@click.command(
    "align",
    epilog=examples("""
  subspace align sample_checkpoints/mlp_mnist1d.safetensors --eigenspace spectra.h5 --json
  subspace align ckpt.safetensors --batch-size 10 --batch-size 50 --batch-size 500 --batches 200
  subspace align ckpt.safetensors --eigenspace spectra.h5 --k-sweep 1,2,5,10 --per-eigenvector
  subspace align runs/sgd/ -o spectra.h5          # a trajectory: one row per checkpoint
  subspace align ckpt.safetensors --hessian minibatch --batch-size 50
"""),
)
@click.argument("checkpoints", nargs=-1, required=True)
@click.option(
    "--eigenspace",
    type=click.Path(dir_okay=False),
    default=None,
    help="Spectra file to read the dominant subspace from (its stored tensor SHA-256 "
    "must match the checkpoint); without it, or when it has no group for a "
    "checkpoint, the subspace is computed as `spectrum` would.",
)
@click.option(
    "--batch-size",
    "batch_sizes",
    type=click.IntRange(min=1),
    multiple=True,
    help="Mini-batch size (repeatable) [default: 50].",
)
@click.option(
    "--batches",
    type=click.IntRange(min=1),
    default=100,
    show_default=True,
    help="Random mini-batches per batch size (each drawn without replacement).",
)
@click.option("--per-eigenvector", is_flag=True, help="Also report cos(g, u_i) for i ≤ k.")
@click.option(
    "--k-sweep",
    callback=parse_k_sweep,
    metavar="K1,K2,...",
    help="Also report χ for these k, from one eigenspace of the largest k.",
)
@click.option(
    "--hessian",
    "hessian_kind",
    type=click.Choice(HESSIANS),
    default="full",
    show_default=True,
    help="full: the full-training-set Hessian; minibatch: the Hessian of one random "
    "mini-batch of the first --batch-size (for comparison).",
)
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False),
    default=None,
    help="Spectra file to store results in (under the checkpoint's group); computed "
    "eigenspaces are stored there too.",
)
@click.option("--overwrite", is_flag=True, help="Replace existing results in OUTPUT.")
@spectrum_options
@plugin_options
@output_options
@click.pass_context
def align_command(
    ctx: click.Context,
    checkpoints: tuple[str, ...],
    eigenspace: str | None,
    batch_sizes: tuple[int, ...],
    batches: int,
    per_eigenvector: bool,
    k_sweep: list[int],
    hessian_kind: str,
    output: str | None,
    overwrite: bool,
    model: str | None,
    model_config: str | None,
    data: str | None,
    data_config: str | None,
    loss: str | None,
    as_json: bool,
    **params: Any,
) -> None:
    """Alignment χ_k = ‖P_k g‖/‖g‖ of gradients with the dominant subspace.

    P_k projects onto the top-k Hessian eigenvectors. At each checkpoint,
    χ_k of the full-batch gradient, and of --batches random mini-batch
    gradients for each --batch-size (mean, std and 5/50/95% quantiles), with
    the split of squared norms between the dominant subspace and the bulk.
    """
    sizes = list(batch_sizes) or [50]
    settings = settings_from(params, batch_size=sizes[0])  # the gradient covariance's
    overrides = overrides_from(model, model_config, data, data_config, loss)
    from subspace_cli.analysis import AlignmentAnalysis

    analysis = AlignmentAnalysis(
        settings,
        overrides,
        eigenspace=eigenspace,
        output=output,
        overwrite=overwrite,
        quiet=is_quiet(ctx),
        batch_sizes=sizes,
        batches=batches,
        per_eigenvector=per_eigenvector,
        k_sweep=k_sweep,
        hessian=hessian_kind,
    )
    results: list[dict[str, Any]] = []

    def handle(path: Path) -> None:
        results.append(analysis.run(path))

    outcome = for_each_input(ctx, checkpoints, handle)
    from subspace_cli.output import emit_json

    if as_json:
        emit_json(results)
    elif results:
        render(results, sizes)
    outcome.exit(ctx)


def render(records: list[dict[str, Any]], sizes: list[int]) -> None:
    from subspace_cli.output import emit_table

    headers = ["checkpoint", "step", "k", "χ full"]
    headers += [f"χ B={b} mean±std" for b in sizes]
    headers += ["‖Pg‖²", "‖(I−P)g‖²"]
    headers += [f"E‖Pg_{b}‖²" for b in sizes] + [f"E‖(I−P)g_{b}‖²" for b in sizes]
    rows = []
    for r in records:
        row = [r["checkpoint"], r["step"], r["k"], f"{r['chi_full']:.4f}"]
        row += [
            f"{r['chi_minibatch'][str(b)]['mean']:.4f}±{r['chi_minibatch'][str(b)]['std']:.4f}"
            for b in sizes
        ]
        row += [f"{r['norms_full']['dominant_sq']:.4g}", f"{r['norms_full']['bulk_sq']:.4g}"]
        row += [f"{r['norms_minibatch'][str(b)]['dominant_sq_mean']:.4g}" for b in sizes]
        row += [f"{r['norms_minibatch'][str(b)]['bulk_sq_mean']:.4g}" for b in sizes]
        rows.append(row)
    first = records[0]
    emit_table(
        rows,
        headers=headers,
        title=f"alignment with the top-k eigenspace of the {first['hessian']} Hessian "
        f"({first['loss']} loss, {first['mode']} mode, {first['batches']} batches "
        "per size)",
    )
    for r in records:
        if "per_eigenvector" in r:
            click.echo()
            pe = r["per_eigenvector"]
            emit_table(
                [
                    [
                        i + 1,
                        f"{lam:.6g}",
                        f"{c:+.4f}",
                        *[f"{pe['minibatch_mean'][str(b)][i]:+.4f}" for b in sizes],
                    ]
                    for i, (lam, c) in enumerate(zip(r["eigenvalues"], pe["full"], strict=False))
                ],
                headers=["i", "λ_i", "cos(g, u_i)", *[f"E cos(g_{b}, u_i)" for b in sizes]],
                title=f"{r['checkpoint']}: per eigenvector",
            )
        if "k_sweep" in r:
            click.echo()
            emit_table(
                [
                    [
                        kk,
                        f"{v['chi_full']:.4f}",
                        *[f"{v['chi_minibatch_mean'][str(b)]:.4f}" for b in sizes],
                    ]
                    for kk, v in r["k_sweep"].items()
                ],
                headers=["k", "χ full", *[f"E χ B={b}" for b in sizes]],
                title=f"{r['checkpoint']}: k sweep",
            )
