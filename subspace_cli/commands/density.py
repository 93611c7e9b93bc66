"""``subspace density``: the spectral density and trace of a curvature, by stochastic Lanczos
quadrature and Hutchinson's estimator."""

from __future__ import annotations

from typing import Any

import click

from subspace_cli.commands.common import (
    Finite,
    examples,
    is_quiet,
    output_options,
    overrides_from,
    plugin_options,
    run_each,
)
from subspace_cli.commands.spectrum import check_batch_size, operator_options, settings_from


@click.command(
    "density",
    epilog=examples("""
  subspace density sample_checkpoints/mlp_mnist1d.safetensors --json
  subspace density ckpt.safetensors --runs 20 --lanczos-steps 100 --trace-probes 100
  subspace density ckpt.safetensors --curvature ggn -o spectra.h5   # beside its top-k
"""),
)
@click.argument("checkpoints", nargs=-1, required=True)
@operator_options
@click.option("--runs", type=click.IntRange(min=1), default=10, show_default=True,
              help="Random probe vectors (one Lanczos run each).")
@click.option("--lanczos-steps", type=click.IntRange(min=1), default=80, show_default=True,
              help="Lanczos steps per run (full re-orthogonalisation); the quadrature is "
              "exact for the moments tr(Aʲ)/n, j ≤ 2·steps − 1, of each probe.")
@click.option("--trace-probes", type=click.IntRange(min=0), default=30, show_default=True,
              help="Rademacher probes of Hutchinson's trace estimate (0: no trace).")
@click.option("--grid-points", type=click.IntRange(min=2), default=1000, show_default=True,
              help="Points of the grid the density is given on.")
@click.option("--width", type=Finite(min=0, min_open=True), default=None,
              help="Standard deviation σ of the Gaussian each node is smoothed by [default: "
              "1% of the span of the nodes].")
@click.option("--batch-size", type=click.IntRange(min=1), default=None,
              help="The mini-batch size of --curvature gradient-covariance.")
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None,
              help="Spectra file holding the checkpoint's spectrum: the density is added "
              "beside it (docs/format.md).")
@click.option("--overwrite", is_flag=True, help="Replace a stored density.")
@plugin_options
@output_options
@click.pass_context
def density_command(ctx: click.Context, checkpoints: tuple[str, ...], runs: int,
                    lanczos_steps: int, trace_probes: int, grid_points: int,
                    width: float | None, batch_size: int | None, output: str | None,
                    overwrite: bool, model: str | None, model_config: str | None,
                    data: str | None, data_config: str | None, loss: str | None,
                    as_json: bool, **params: Any) -> None:
    """Spectral density of the curvature at CHECKPOINTS, and its trace.

    Stochastic Lanczos quadrature: --runs Rademacher probes, --lanczos-steps
    steps each, the nodes smoothed by a Gaussian of width --width on a grid
    (normalised to integrate to 1 over it); the trace by Hutchinson's
    estimate with its standard error. --json gives grid, density, width,
    nodes, weights, trace and trace_stderr.
    """
    check_batch_size(params, batch_size)
    settings = settings_from(params, batch_size=batch_size)
    overrides = overrides_from(model, model_config, data, data_config, loss)
    from subspace_cli.analysis.density import DensityAnalysis

    analysis = DensityAnalysis(settings, overrides, runs=runs, steps=lanczos_steps,
                               trace_probes=trace_probes, grid_points=grid_points, width=width,
                               output=output, overwrite=overwrite, quiet=is_quiet(ctx))
    run_each(ctx, checkpoints, analysis.run, render, as_json=as_json)


def render(record: dict[str, Any]) -> None:
    """The density's summary: where its mass is (quantiles of the quadrature) and the trace."""
    import numpy as np

    from subspace_cli.output import emit_table
    from subspace_cli.spectrum import curvature_name

    nodes = np.concatenate([np.asarray(n) for n in record["nodes"]])
    weights = np.concatenate([np.asarray(w) for w in record["weights"]]) / record["runs"]
    order = np.argsort(nodes)
    cumulative = np.cumsum(weights[order])
    rows = [[f"{q:g}", f"{nodes[order][min(np.searchsorted(cumulative, q), len(nodes) - 1)]:.6g}"]
            for q in (0.01, 0.1, 0.5, 0.9, 0.99)]
    name = curvature_name(record["curvature"], record["curvature_batch_size"])
    click.echo(f"{record['checkpoint']}: spectral density of the {record['loss']} {name}, "
               f"{record['n_params']:,} parameters, {record['runs']} runs × "
               f"{record['lanczos_steps']} Lanczos steps, width {record['width']:.3g}")
    emit_table(rows, headers=["mass below", "eigenvalue"], floatfmt="")
    trace = (f"trace {record['trace']:.6g} ± {record['trace_stderr']:.2g} (Hutchinson, "
             f"{record['trace_probes']} probes)" if record["trace_probes"] else "no trace")
    click.echo(f"{trace}; nodes from {nodes.min():.6g} to {nodes.max():.6g}; "
               f"{record['hvp_count']} products, {record['seconds']:.2f} s"
               + (f"; stored in {record['group']}" if record.get("group") else ""))
    click.echo()
