"""``subspace spectrum``: verified top-k Hessian eigenpairs of checkpoints, stored in HDF5."""

from __future__ import annotations

from typing import Any

import click

from subspace_cli.commands.common import (
    HVP_METHOD_HELP,
    ByteSize,
    Finite,
    examples,
    is_quiet,
    output_options,
    overrides_from,
    plugin_options,
    run_each,
)
from subspace_cli.settings import CURVATURES, DTYPES, HVP_METHODS, SOLVERS

#: How the eigensolver runs.
_SOLVER_OPTIONS = [
    click.option(
        "-k",
        "k",
        type=click.IntRange(min=1),
        default=None,
        help="Number of top eigenpairs [default: the number of classes].",
    ),
    click.option(
        "--extra",
        type=click.IntRange(min=0),
        default=0,
        show_default=True,
        help="Also compute λ_{k+1..k+m}, to show the spectral gap.",
    ),
    click.option(
        "--tol",
        type=Finite(min=0, min_open=True),
        default=None,
        help="Relative residual ‖Hv−λv‖/|λ| every pair must reach "
        "[default: 1e-4 for float32, 1e-8 for float64].",
    ),
    click.option(
        "--max-hvps",
        type=click.IntRange(min=1),
        default=None,
        help="HVP budget per checkpoint; pairs not converged by then are "
        "reported as not converged [default: max(2000, 100 per pair)].",
    ),
    click.option(
        "--solver",
        type=click.Choice(SOLVERS),
        default="lanczos",
        show_default=True,
        help="lanczos: thick-restart Lanczos in torch on the device (one vector at a "
        "time for a cold start on a CPU, else blocks, see --block-size); "
        "arpack: SciPy eigsh(which='LA') over the same HVPs (reference).",
    ),
    click.option(
        "--block-size",
        type=click.IntRange(min=1),
        default=None,
        help="HVPs per batched product in the Lanczos solver [default: 1 for a cold "
        "start on a CPU (single-vector Lanczos), else 2].",
    ),
    click.option(
        "--basis-memory",
        type=ByteSize(),
        default=None,
        help="Most memory the Lanczos basis may hold, e.g. 2G; the basis is shrunk to "
        "fit [default: no cap; the JSON's basis_bytes says what it held].",
    ),
]

#: What operator the products are of, and how they are computed.
_OPERATOR_OPTIONS = [
    click.option(
        "--graph-memory",
        type=ByteSize(),
        default=None,
        help="Memory for keeping each chunk's gradient graph between products (0: "
        "rebuild it every product) [default: a quarter of the available memory].",
    ),
    click.option(
        "--dtype",
        type=click.Choice(DTYPES),
        default="float32",
        show_default=True,
        help="Precision of parameters, data and HVPs.",
    ),
    click.option(
        "--device",
        default="auto",
        show_default=True,
        help="auto (CUDA when present), cpu, cuda or cuda:N.",
    ),
    click.option(
        "--chunk-size",
        type=click.IntRange(min=1),
        default=1000,
        show_default=True,
        help="Samples per forward/backward pass; bounds memory.",
    ),
    click.option(
        "--max-samples",
        type=click.IntRange(min=1),
        default=None,
        help="Use only the first N training samples [default: all].",
    ),
    click.option(
        "--params",
        "include",
        multiple=True,
        metavar="GLOB",
        help="Analyse only parameters whose names match (repeatable).",
    ),
    click.option(
        "--exclude",
        multiple=True,
        metavar="GLOB",
        help="Leave out parameters whose names match (repeatable).",
    ),
    click.option(
        "--train-mode",
        is_flag=True,
        help="Evaluate the model in train mode (default: eval mode). Buffers "
        "such as BatchNorm statistics are never changed either way; in train mode "
        "BatchNorm normalises each chunk by its own statistics, so the Hessian then "
        "depends on --chunk-size.",
    ),
    click.option(
        "--allow-dropout",
        is_flag=True,
        help="With --train-mode, measure a model with dropout anyway (each pass draws "
        "new masks; refused without this flag).",
    ),
    click.option(
        "--curvature",
        type=click.Choice(CURVATURES),
        default="hessian",
        show_default=True,
        help="The matrix whose top eigenpairs are computed: the Hessian; ggn, the "
        "Gauss–Newton matrix (1/N) Σ JᵀHJ with the loss's output-space Hessian H; "
        "fisher, the empirical Fisher (1/N) Σ g gᵀ of per-sample gradients; "
        "gradient-covariance, the covariance of the mini-batch gradient at --batch-size "
        "(batches drawn without replacement).",
    ),
    click.option(
        "--hvp-method",
        type=click.Choice(HVP_METHODS),
        default="auto",
        show_default=True,
        help=HVP_METHOD_HELP,
    ),
    click.option(
        "--seed",
        type=int,
        default=0,
        show_default=True,
        help="Seed of the solver's random start.",
    ),
]


def _apply(f: Any, options: list[Any]) -> Any:
    for option in reversed(options):
        f = option(f)
    return f


def spectrum_options(f: Any) -> Any:
    """Options that decide how a spectrum is computed (shared with ``align``)."""
    return _apply(f, _SOLVER_OPTIONS + _OPERATOR_OPTIONS)


def operator_options(f: Any) -> Any:
    """Options that decide the curvature operator and its products (``density``)."""
    return _apply(f, _OPERATOR_OPTIONS)


#: The settings of ``_SOLVER_OPTIONS``; absent under ``operator_options`` (the defaults hold).
_SOLVER_SETTINGS = ("k", "extra", "tol", "max_hvps", "solver", "block_size", "basis_memory")


def settings_from(params: dict[str, Any], batch_size: int | None = None) -> Any:
    """The settings of the options; ``batch_size`` is the gradient covariance's."""
    from subspace_cli.settings import SpectrumSettings

    solver = {key: params[key] for key in _SOLVER_SETTINGS if key in params}
    return SpectrumSettings(
        curvature=params["curvature"],
        batch_size=batch_size,
        dtype=params["dtype"],
        device=params["device"],
        chunk_size=params["chunk_size"],
        max_samples=params["max_samples"],
        include=tuple(params["include"]),
        exclude=tuple(params["exclude"]),
        train_mode=params["train_mode"],
        allow_dropout=params["allow_dropout"],
        hvp_method=params["hvp_method"],
        seed=params["seed"],
        graph_memory=params["graph_memory"],
        **solver,
    )


@click.command(
    "spectrum",
    epilog=examples("""
  subspace spectrum sample_checkpoints/mlp_mnist1d.safetensors
  subspace spectrum sample_checkpoints/mlp_mnist1d.safetensors -o spectra.h5 --json
  subspace spectrum runs/sgd/ -k 10 --extra 5 -o spectra.h5 --jsonl
  subspace spectrum ckpt.safetensors --dtype float64 --tol 1e-10 --solver arpack
  subspace spectrum ckpt.safetensors --params 'layers.2.*' --max-samples 1000
"""),
)
@click.argument("checkpoints", nargs=-1, required=True)
@spectrum_options
@click.option(
    "--init-from",
    type=click.Path(dir_okay=False),
    default=None,
    help="Spectra file whose eigenvectors warm-start the solver (its group for the "
    "same checkpoint, else its latest group with the same parameter count).",
)
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False),
    default=None,
    help="HDF5 spectra file to add the results to (docs/format.md).",
)
@click.option("--overwrite", is_flag=True, help="Replace a checkpoint's existing group in OUTPUT.")
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=None,
    help="The mini-batch size of --curvature gradient-covariance (its covariance scales as "
    "1/batch size).",
)
@click.option(
    "--per-module",
    is_flag=True,
    help="One spectrum per module that owns parameters: the diagonal blocks of the "
    "curvature, each stored as its own group and shown in one table.",
)
@click.option(
    "--group",
    "groups",
    multiple=True,
    metavar="NAME=GLOB",
    help="One spectrum per named group of parameters (repeatable; a NAME given twice "
    "collects both globs), instead of --per-module's modules.",
)
@click.option(
    "--jsonl", is_flag=True, help="Print one JSON object per checkpoint as soon as it finishes."
)
@plugin_options
@output_options
@click.pass_context
def spectrum_command(
    ctx: click.Context,
    checkpoints: tuple[str, ...],
    init_from: str | None,
    output: str | None,
    overwrite: bool,
    batch_size: int | None,
    per_module: bool,
    groups: tuple[str, ...],
    jsonl: bool,
    model: str | None,
    model_config: str | None,
    data: str | None,
    data_config: str | None,
    loss: str | None,
    as_json: bool,
    **params: Any,
) -> None:
    """Top-k eigenpairs of the Hessian of the full training loss at CHECKPOINTS.

    The k algebraically largest eigenvalues (the Hessian is indefinite) and
    their eigenvectors span the dominant subspace. Every returned pair is
    verified: its relative residual ‖Hv−λv‖/|λ|, from real Hessian-vector
    products, must be at most --tol, and a pair that is not within --max-hvps
    is reported as not converged. The model is analysed in eval mode unless
    --train-mode is given.

    CHECKPOINTS are files, directories (searched recursively for
    *.safetensors) or glob patterns; each is computed on its own,
    warm-started from the previous one, and the overlap ‖V_a V_bᵀ‖_F²/k
    between consecutive subspaces is reported.
    """
    from subspace_cli.errors import UsageError

    if as_json and jsonl:
        raise UsageError("--json and --jsonl are alternatives: pick one")
    check_batch_size(params, batch_size)
    if per_module and groups:
        raise UsageError("--per-module and --group are alternatives: pick one")
    if (per_module or groups) and (params["include"] or params["exclude"]):
        raise UsageError("--per-module and --group choose the parameters themselves: drop "
                         "--params/--exclude")
    settings = settings_from(params, batch_size=batch_size)
    overrides = overrides_from(model, model_config, data, data_config, loss)
    from subspace_cli.analysis import SpectrumAnalysis

    analysis = SpectrumAnalysis(
        settings,
        overrides,
        init_from=init_from,
        output=output,
        overwrite=overwrite,
        quiet=is_quiet(ctx),
        per_module=per_module,
        groups=parse_groups(groups),
    )
    run_each(ctx, checkpoints, analysis.run, render, as_json=as_json, jsonl=jsonl)


def check_batch_size(params: dict[str, Any], batch_size: int | None) -> None:
    """Refuse ``--batch-size`` for a curvature that has no mini-batch size."""
    from subspace_cli.errors import UsageError

    if batch_size is not None and params["curvature"] != "gradient-covariance":
        raise UsageError("--batch-size is the mini-batch size of --curvature "
                         "gradient-covariance; the other curvatures take none")


def parse_groups(values: tuple[str, ...]) -> list[tuple[str, tuple[str, ...]]] | None:
    """``NAME=GLOB`` values as (name, globs) in order of first appearance."""
    from subspace_cli.errors import UsageError

    groups: dict[str, list[str]] = {}
    for value in values:
        name, sep, pattern = value.partition("=")
        if not sep or not name or not pattern:
            raise UsageError(f"--group takes NAME=GLOB, got {value!r}")
        groups.setdefault(name, []).append(pattern)
    return [(name, tuple(globs)) for name, globs in groups.items()] or None


def render(record: dict[str, Any]) -> None:
    if "blocks" in record:
        render_blocks(record)
        return
    from subspace_cli.output import emit_table
    from subspace_cli.spectrum import curvature_name

    k = record["k"]
    rows = [
        [i + 1 if i < k else f"{i + 1}*", f"{value:.8g}", f"{res:.2e}", "yes" if ok else "NO"]
        for i, (value, res, ok) in enumerate(
            zip(record["eigenvalues"], record["residuals"], record["converged"], strict=True)
        )
    ]
    title = (
        f"{record['checkpoint']}: top {k} of the {record['loss']} "
        f"{curvature_name(record['curvature'], record['curvature_batch_size'])}, "
        f"{record['n_params']:,} parameters, {record['n_samples']:,} samples, "
        f"{record['mode']} mode, {record['dtype']} on {record['device']}"
    )
    emit_table(rows, headers=["i", "λ_i", "residual", "converged"], title=title)
    choice = record.get("hvp_method_choice")
    probe = (
        f"; timing it against the others cost {record['hvp_probe_extra']:.1f} more"
        if record["hvp_probe_extra"]
        else f", {choice}" if choice in ("cached", "one vector on a CPU") else ""
    )
    cost = (
        f"{record['hvp_count']} {'HVPs' if record['curvature'] == 'hessian' else 'products'} "
        f"({record['hvp_method']}{probe}), {record['seconds']:.2f} s, "
        f"tol {record['tol']:g}, {record['solver']}"
    )
    memory = f"; basis {record['basis_bytes'] / 2**20:.1f} MiB"
    if record["graphs_kept"]:
        memory += (f", graphs of {record['graphs_kept']}/{record['chunks']} chunks kept"
                   f" ({record['graph_bytes'] / 2**20:.1f} MiB)")
    cost += memory
    if record["warm_start"]:
        cost += f", warm start from {record['warm_start']}"
    if record["overlap_with_previous"] is not None:
        cost += f"; overlap with previous {record['overlap_with_previous']:.4f}"
    if record.get("output"):
        cost += f"; stored in {record['output']}"
    click.echo(cost)
    if record["extra"]:
        click.echo("* beyond k (--extra), to show the gap")
    click.echo()


def render_blocks(record: dict[str, Any]) -> None:
    """One table for the diagonal blocks of one checkpoint: a row per block."""
    from subspace_cli.output import emit_table
    from subspace_cli.spectrum import curvature_name

    blocks = record["blocks"]
    first = blocks[0]
    k = max(b["k"] for b in blocks)
    rows = [[b["block"], f"{b['n_params']:,}",
             *[f"{v:.6g}" for v in b["eigenvalues"][: b["k"]]], *[""] * (k - b["k"]),
             "yes" if all(b["converged"]) else "NO", b["hvp_count"]] for b in blocks]
    name = curvature_name(first["curvature"], first["curvature_batch_size"])
    click.echo(f"{record['checkpoint']}: top {k} of each diagonal block of the {first['loss']} "
               f"{name}, {len(blocks)} blocks, {first['n_samples']:,} samples, {first['mode']} "
               f"mode, {first['dtype']} on {first['device']}")
    emit_table(rows, headers=["block", "parameters", *[f"λ_{i + 1}" for i in range(k)],
                              "converged", "HVPs"], floatfmt="")
    stored = [b["group"] for b in blocks if b.get("group")]
    if stored:
        click.echo(f"stored as {len(stored)} groups in {blocks[0]['output']}")
    click.echo()

