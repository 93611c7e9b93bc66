"""``subspace align``: how much of each gradient lies in the dominant subspace."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from subspace_cli.commands.common import (
    examples,
    for_each_input,
    is_quiet,
    output_options,
    overrides_from,
    plugin_options,
)
from subspace_cli.commands.spectrum import settings_from, spectrum_options

SUBGROUP = {"full": "alignment", "minibatch": "alignment-minibatch-hessian"}


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
    type=click.Choice(["full", "minibatch"]),
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
    settings = settings_from(params)
    overrides = overrides_from(model, model_config, data, data_config, loss)
    sizes = list(batch_sizes) or [50]
    job = AlignJob(
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
        hessian_kind=hessian_kind,
    )
    results: list[dict[str, Any]] = []

    def handle(path: Path) -> None:
        results.append(job.run(path))

    outcome = for_each_input(ctx, checkpoints, handle)
    from subspace_cli.output import emit_json

    if as_json:
        emit_json(results)
    elif results:
        render(results, sizes)
    outcome.exit(ctx)


class AlignJob:
    def __init__(
        self,
        settings: Any,
        overrides: Any,
        *,
        eigenspace: str | None,
        output: str | None,
        overwrite: bool,
        quiet: bool,
        batch_sizes: list[int],
        batches: int,
        per_eigenvector: bool,
        k_sweep: list[int],
        hessian_kind: str,
    ) -> None:
        from subspace_cli.experiment import DataCache

        self.settings = settings
        self.overrides = overrides
        self.eigenspace = eigenspace
        self.output = output
        self.overwrite = overwrite
        self.quiet = quiet
        self.batch_sizes = batch_sizes
        self.batches = batches
        self.per_eigenvector = per_eigenvector
        self.k_sweep = k_sweep
        self.hessian_kind = hessian_kind
        self.data_cache = DataCache()
        self.previous: Any = None  # (names, vectors, path): warm start for the next checkpoint

    def run(self, path: Path) -> dict[str, Any]:
        from subspace_cli import store
        from subspace_cli.alignment import measure
        from subspace_cli.errors import UsageError
        from subspace_cli.experiment import load_experiment
        from subspace_cli.output import progress_bar, progress_enabled
        from subspace_cli.spectrum import hessian_operator

        if self.output and not self.overwrite:
            existing = (
                store.read_subgroup(self.output, path, SUBGROUP[self.hessian_kind])
                if Path(self.output).exists()
                else None
            )
            if existing is not None:
                raise UsageError(
                    f"{self.output} already holds alignment results for {path}; "
                    "pass --overwrite to replace them"
                )
        experiment = load_experiment(path, self.overrides, data_cache=self.data_cache)
        assert experiment.data is not None
        k = self.settings.k if self.settings.k is not None else experiment.data.num_classes
        need = max([k, *self.k_sweep])
        op = hessian_operator(experiment, self.settings)
        vectors, source, eigenvalues = self._eigenspace(experiment, op, need)
        enabled = progress_enabled(self.quiet)
        total = self.batches * len(self.batch_sizes)
        with progress_bar(f"{path.name} gradients", total, enabled=enabled) as bar:
            result = measure(
                op,
                vectors,
                k,
                batch_sizes=self.batch_sizes,
                batches=self.batches,
                seed=self.settings.seed,
                per_eigenvector=self.per_eigenvector,
                k_sweep=self.k_sweep,
                progress=lambda done, _total: bar.update(completed=done),
            )
        record = record_of(result, experiment, self, source, eigenvalues[:need], op)
        if self.output:
            record["group"] = store.write_subgroup(
                self.output,
                path,
                SUBGROUP[self.hessian_kind],
                *stored_form(record, result),
                overwrite=self.overwrite,
            )
        return record

    def _eigenspace(self, experiment: Any, op: Any, need: int) -> tuple[Any, str, list[float]]:
        """Dominant eigenvectors (rows), where they came from, and their eigenvalues."""
        import torch

        from subspace_cli import store
        from subspace_cli.errors import InputError

        path = experiment.checkpoint.path
        sha = experiment.checkpoint.sha256()
        names = op.layout.names
        init, warm = None, None
        if self.hessian_kind == "full" and self.eigenspace:
            stored = store.read_spectrum(self.eigenspace, path, sha256=sha)
            if stored is not None:
                if stored.checkpoint_sha256 != sha:
                    raise InputError(
                        f"{self.eigenspace} holds a spectrum of {stored.checkpoint} with tensor "
                        f"SHA-256 {stored.checkpoint_sha256}, but {path} has SHA-256 {sha}: the "
                        "checkpoint is not the one analysed (recompute with `subspace spectrum`)"
                    )
                if tuple(stored.param_names) != tuple(names):
                    raise InputError(
                        f"{self.eigenspace}: the spectrum of {path} covers parameters "
                        f"{', '.join(stored.param_names)}, not the selected "
                        f"{', '.join(names)} (match --params/--exclude)"
                    )
                if int(stored.attrs.get("n_samples", op.n_samples)) != op.n_samples:
                    from subspace_cli.output import say

                    say(
                        f"warning: the stored spectrum of {path} averages over "
                        f"{stored.attrs['n_samples']} samples, the gradients here over "
                        f"{op.n_samples} (match --max-samples)"
                    )
                if len(stored.eigenvalues) >= need:
                    source = f"{self.eigenspace}:{stored.group}"
                    vectors = torch.from_numpy(stored.eigenvectors[:need])
                    return vectors, source, [float(v) for v in stored.eigenvalues]
                from subspace_cli.output import say

                say(
                    f"note: {self.eigenspace} holds {len(stored.eigenvalues)} eigenvectors of "
                    f"{path}, {need} are needed: computing them, warm-started from those"
                )
                init, warm = torch.from_numpy(stored.eigenvectors), self.eigenspace
            else:
                from subspace_cli.output import say

                say(f"note: {self.eigenspace} has no spectrum of {path}; computing it")
        return self._compute(experiment, need, init, warm)

    def _compute(
        self, experiment: Any, need: int, init: Any, warm: str | None
    ) -> tuple[Any, str, list[float]]:
        import dataclasses

        import torch

        from subspace_cli import store
        from subspace_cli.alignment import minibatch_indices, subset
        from subspace_cli.output import progress_bar, progress_enabled, say
        from subspace_cli.spectrum import compute_spectrum, to_stored

        settings = dataclasses.replace(self.settings, k=need, extra=0)
        target = experiment
        if self.hessian_kind == "minibatch":
            assert experiment.data is not None
            generator = torch.Generator().manual_seed(self.settings.seed + 1_000_003)
            [idx] = minibatch_indices(len(experiment.data), self.batch_sizes[0], 1, generator)
            target = dataclasses.replace(experiment, data=subset(experiment.data, idx))
        elif self.previous is not None and init is None:
            names, vectors, prev_path = self.previous
            init, warm = vectors, prev_path
        enabled = progress_enabled(self.quiet)
        with progress_bar(
            f"{experiment.checkpoint.path.name} eigenspace", settings.max_hvps, enabled=enabled
        ) as bar:
            run = compute_spectrum(
                target,
                settings,
                init=init,
                warm_start=warm,
                progress=lambda h, _r: bar.update(completed=h),
            )
        if not run.result.all_converged:
            say(
                f"warning: {experiment.checkpoint.path}: the eigenspace did not converge "
                f"within {run.result.hvp_count} HVPs; χ is measured against it anyway"
            )
        vectors = run.result.eigenvectors
        if self.hessian_kind == "full":
            self.previous = (run.layout.names, vectors, str(experiment.checkpoint.path))
            if self.output:
                exists = store.has_group(self.output, experiment.checkpoint.path)
                if not exists or self.overwrite:
                    store.write_spectrum(
                        self.output, to_stored(run, experiment), overwrite=self.overwrite
                    )
            source = f"computed ({run.result.hvp_count} HVPs)"
        else:
            source = (
                f"computed from a mini-batch Hessian ({self.batch_sizes[0]} samples, "
                f"{run.result.hvp_count} HVPs)"
            )
        return vectors, source, [float(v) for v in run.result.eigenvalues]


def record_of(
    result: Any, experiment: Any, job: AlignJob, source: str, eigenvalues: list[float], op: Any
) -> dict[str, Any]:
    record: dict[str, Any] = {
        "checkpoint": str(experiment.checkpoint.path),
        "step": experiment.spec.step,
        "k": result.k,
        "hessian": (
            "full training set"
            if job.hessian_kind == "full"
            else f"one mini-batch of {job.batch_sizes[0]} samples"
        ),
        "eigenspace": source,
        "eigenvalues": eigenvalues,
        "chi_full": result.chi_full,
        "chi_minibatch": {str(b): stats for b, stats in result.chi_minibatch.items()},
        "norms_full": {"dominant_sq": result.full_norms[0], "bulk_sq": result.full_norms[1]},
        "norms_minibatch": {
            str(b): {"dominant_sq_mean": d, "bulk_sq_mean": u}
            for b, (d, u) in result.minibatch_norms.items()
        },
        "train_loss": result.train_loss,
        "gradient_norm": result.gradient_norm,
        "batches": job.batches,
        "seed": job.settings.seed,
        "n_params": op.n_params,
        "n_samples": op.n_samples,
        "loss": experiment.loss,
        "mode": "train" if job.settings.train_mode else "eval",
    }
    if result.per_eigenvector is not None:
        record["per_eigenvector"] = {
            "full": result.per_eigenvector,
            "minibatch_mean": {str(b): v for b, v in result.per_eigenvector_minibatch.items()},
        }
    if result.k_sweep is not None:
        record["k_sweep"] = {
            str(kk): {
                "chi_full": v["chi_full"],
                "chi_minibatch_mean": {str(b): c for b, c in v["chi_minibatch_mean"].items()},
            }
            for kk, v in result.k_sweep.items()
        }
    return record


def stored_form(record: dict[str, Any], result: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """Attributes and datasets of the ``alignment`` subgroup (docs/format.md)."""
    import datetime as dt
    import shlex
    import sys

    sizes = sorted(result.chi_samples)
    attrs = {
        "encoding-type": "alignment",
        "encoding-version": "1.0",
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="microseconds"),
        "command": shlex.join(["subspace", *sys.argv[1:]]),
        **{
            key: record[key]
            for key in (
                "k",
                "hessian",
                "eigenspace",
                "chi_full",
                "train_loss",
                "gradient_norm",
                "batches",
                "seed",
                "mode",
            )
        },
        "full_dominant_sq": result.full_norms[0],
        "full_bulk_sq": result.full_norms[1],
    }
    datasets: dict[str, Any] = {
        "batch_sizes": sizes,
        "chi_minibatch": [result.chi_samples[b] for b in sizes],
        "minibatch_dominant_sq_mean": [result.minibatch_norms[b][0] for b in sizes],
        "minibatch_bulk_sq_mean": [result.minibatch_norms[b][1] for b in sizes],
    }
    if result.per_eigenvector is not None:
        datasets["per_eigenvector"] = result.per_eigenvector
        datasets["per_eigenvector_minibatch_mean"] = [
            result.per_eigenvector_minibatch[b] for b in sizes
        ]
    if result.k_sweep is not None:
        ks = sorted(result.k_sweep)
        datasets["k_sweep"] = ks
        datasets["k_sweep_chi_full"] = [result.k_sweep[kk]["chi_full"] for kk in ks]
        datasets["k_sweep_chi_minibatch_mean"] = [
            [result.k_sweep[kk]["chi_minibatch_mean"][b] for b in sizes] for kk in ks
        ]
    return attrs, datasets


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
