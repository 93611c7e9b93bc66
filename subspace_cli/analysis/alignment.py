"""``align`` over a sequence of checkpoints: where the eigenspace comes from, the measurement,
and the stored ``alignment`` subgroup."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from subspace_cli import parallel
from subspace_cli.analysis.sequence import CheckpointSequence

if TYPE_CHECKING:
    import torch

    from subspace_cli.alignment import AlignmentResult
    from subspace_cli.checkpoint import SpecOverrides
    from subspace_cli.experiment import Experiment
    from subspace_cli.hessian import HessianOperator
    from subspace_cli.settings import SpectrumSettings

#: The subgroup of a checkpoint's spectrum group that holds each kind of result.
ALIGN_SUBGROUPS = {"full": "alignment", "minibatch": "alignment-minibatch-hessian"}
HESSIANS = tuple(ALIGN_SUBGROUPS)


@dataclass
class Alignment:
    """One checkpoint's measurement with what it was measured against."""

    result: AlignmentResult
    checkpoint: str
    step: int | None
    hessian: str  # "full" or "minibatch"
    minibatch_size: int
    eigenspace: str  # where the eigenvectors came from
    eigenvalues: list[float]
    batches: int
    seed: int
    n_params: int
    n_samples: int
    loss: str
    mode: str
    curvature: str = "hessian"  # the matrix whose top-k eigenspace the gradients meet

    @property
    def hessian_description(self) -> str:
        if self.hessian == "full":
            return "full training set"
        return f"one mini-batch of {self.minibatch_size} samples"

    def record(self) -> dict[str, Any]:
        """The JSON object of ``align`` (see the README)."""
        r = self.result
        record: dict[str, Any] = {
            "checkpoint": self.checkpoint,
            "step": self.step,
            "k": r.k,
            "hessian": self.hessian_description,
            "eigenspace": self.eigenspace,
            "eigenvalues": self.eigenvalues,
            "chi_full": r.chi_full,
            "chi_minibatch": {str(b): stats for b, stats in r.chi_minibatch.items()},
            "norms_full": {"dominant_sq": r.full_norms[0], "bulk_sq": r.full_norms[1]},
            "norms_minibatch": {
                str(b): {"dominant_sq_mean": d, "bulk_sq_mean": u}
                for b, (d, u) in r.minibatch_norms.items()
            },
            "train_loss": r.train_loss,
            "gradient_norm": r.gradient_norm,
            "batches": self.batches,
            "seed": self.seed,
            "n_params": self.n_params,
            "n_samples": self.n_samples,
            "loss": self.loss,
            "mode": self.mode,
            "curvature": self.curvature,
        }
        if r.per_eigenvector is not None:
            assert r.per_eigenvector_minibatch is not None
            record["per_eigenvector"] = {
                "full": r.per_eigenvector,
                "minibatch_mean": {str(b): v for b, v in r.per_eigenvector_minibatch.items()},
            }
        if r.k_sweep is not None:
            record["k_sweep"] = {
                str(kk): {
                    "chi_full": v["chi_full"],
                    "chi_minibatch_mean": {str(b): c for b, c in v["chi_minibatch_mean"].items()},
                }
                for kk, v in r.k_sweep.items()
            }
        return record

    def stored(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """Attributes and datasets of the ``alignment`` subgroup (docs/format.md)."""
        import datetime as dt
        import shlex
        import sys

        r = self.result
        sizes = sorted(r.chi_samples)
        attrs = {
            "encoding-type": "alignment",
            "encoding-version": "1.0",
            "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="microseconds"),
            "command": shlex.join(["subspace", *sys.argv[1:]]),
            "k": r.k,
            "hessian": self.hessian_description,
            "eigenspace": self.eigenspace,
            "chi_full": r.chi_full,
            "train_loss": r.train_loss,
            "gradient_norm": r.gradient_norm,
            "batches": self.batches,
            "seed": self.seed,
            "mode": self.mode,
            "curvature": self.curvature,
            "full_dominant_sq": r.full_norms[0],
            "full_bulk_sq": r.full_norms[1],
        }
        datasets: dict[str, Any] = {
            "batch_sizes": sizes,
            "chi_minibatch": [r.chi_samples[b] for b in sizes],
            "minibatch_dominant_sq_mean": [r.minibatch_norms[b][0] for b in sizes],
            "minibatch_bulk_sq_mean": [r.minibatch_norms[b][1] for b in sizes],
        }
        if r.per_eigenvector is not None:
            assert r.per_eigenvector_minibatch is not None
            datasets["per_eigenvector"] = r.per_eigenvector
            datasets["per_eigenvector_minibatch_mean"] = [
                r.per_eigenvector_minibatch[b] for b in sizes
            ]
        if r.k_sweep is not None:
            ks = sorted(r.k_sweep)
            datasets["k_sweep"] = ks
            datasets["k_sweep_chi_full"] = [r.k_sweep[kk]["chi_full"] for kk in ks]
            datasets["k_sweep_chi_minibatch_mean"] = [
                [r.k_sweep[kk]["chi_minibatch_mean"][b] for b in sizes] for kk in ks
            ]
        return attrs, datasets


class AlignmentAnalysis(CheckpointSequence):
    """χ_k of the full-batch and mini-batch gradients at each checkpoint.

    The eigenspace is read from ``eigenspace`` (a spectra file whose group for the checkpoint
    has the same tensor SHA-256 and parameters), else computed as ``spectrum`` would,
    warm-started from the previous checkpoint's, and stored in ``output`` when given.
    """

    def __init__(
        self,
        settings: SpectrumSettings,
        overrides: SpecOverrides,
        *,
        eigenspace: str | None = None,
        output: str | None = None,
        overwrite: bool = False,
        quiet: bool = False,
        batch_sizes: list[int],
        batches: int,
        per_eigenvector: bool = False,
        k_sweep: list[int] | None = None,
        hessian: str = "full",
    ) -> None:
        from subspace_cli.errors import UsageError

        super().__init__(settings, overrides, output=output, overwrite=overwrite, quiet=quiet)
        if hessian not in HESSIANS:
            raise UsageError(f"unknown Hessian {hessian!r}: choose one of {', '.join(HESSIANS)}")
        self.eigenspace = eigenspace
        self.batch_sizes = batch_sizes
        self.batches = batches
        self.per_eigenvector = per_eigenvector
        self.k_sweep = list(k_sweep or [])
        self.hessian = hessian

    @property
    def subgroup(self) -> str:
        return ALIGN_SUBGROUPS[self.hessian]

    def run(self, path: Path) -> dict[str, Any]:
        from subspace_cli import store
        from subspace_cli.alignment import measure
        from subspace_cli.errors import UsageError
        from subspace_cli.spectrum import curvature_operator, top_k

        if self.output and not self.overwrite and Path(self.output).exists() and (
            store.read_subgroup(self.output, path, self.subgroup) is not None
        ):
            raise UsageError(
                f"{self.output} already holds alignment results for {path}; "
                "pass --overwrite to replace them"
            )
        experiment = self.load(path)
        assert experiment.data is not None
        k = top_k(self.settings, experiment)
        need = max([k, *self.k_sweep])
        op = curvature_operator(experiment, self.settings)
        vectors, source, eigenvalues = self._eigenspace(experiment, op, need)
        total = self.batches * len(self.batch_sizes)
        with self.progress(f"{path.name} gradients", total) as bar:
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
        outcome = Alignment(
            result=result,
            checkpoint=str(experiment.checkpoint.path),
            step=experiment.spec.step,
            hessian=self.hessian,
            minibatch_size=self.batch_sizes[0],
            eigenspace=source,
            eigenvalues=eigenvalues[:need],
            batches=self.batches,
            seed=self.settings.seed,
            n_params=op.n_params,
            n_samples=op.n_samples,
            loss=experiment.loss,
            mode="train" if self.settings.train_mode else "eval",
            curvature=self.settings.curvature,
        )
        record = outcome.record()
        if self.output and parallel.is_main():  # rank 0 writes for a data-parallel run
            record["group"] = store.write_subgroup(
                self.output, path, self.subgroup, *outcome.stored(), overwrite=self.overwrite
            )
        return record

    def _eigenspace(
        self, experiment: Experiment, op: HessianOperator, need: int
    ) -> tuple[torch.Tensor, str, list[float]]:
        """Dominant eigenvectors (rows), where they came from, and their eigenvalues."""
        import torch

        from subspace_cli import store
        from subspace_cli.errors import InputError
        from subspace_cli.output import say

        path = experiment.checkpoint.path
        sha = experiment.checkpoint.sha256()
        names = op.layout.names
        init, warm = None, None
        if self.hessian == "full" and self.eigenspace:
            stored = store.read_spectrum(self.eigenspace, path, sha256=sha)
            if stored is None:
                say(f"note: {self.eigenspace} has no spectrum of {path}; computing it")
            else:
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
                stored_curvature = str(stored.attrs.get("curvature", "hessian"))
                if stored_curvature != self.settings.curvature:
                    raise InputError(
                        f"{self.eigenspace}: the spectrum of {path} is of the "
                        f"{stored_curvature}, not the {self.settings.curvature} asked for (pass "
                        f"--curvature {stored_curvature}, or another --eigenspace)"
                    )
                if int(stored.attrs.get("n_samples", op.n_samples)) != op.n_samples:
                    say(
                        f"warning: the stored spectrum of {path} averages over "
                        f"{stored.attrs['n_samples']} samples, the gradients here over "
                        f"{op.n_samples} (match --max-samples)", always=True
                    )
                if len(stored.eigenvalues) >= need:
                    source = f"{self.eigenspace}:{stored.group}"
                    vectors = torch.from_numpy(stored.eigenvectors[:need])
                    return vectors, source, [float(v) for v in stored.eigenvalues]
                say(
                    f"note: {self.eigenspace} holds {len(stored.eigenvalues)} eigenvectors of "
                    f"{path}, {need} are needed: computing them, warm-started from those"
                )
                init, warm = torch.from_numpy(stored.eigenvectors), self.eigenspace
        return self._compute(experiment, names, need, init, warm)

    def _compute(
        self, experiment: Experiment, names: tuple[str, ...], need: int, init: Any,
        warm: str | None,
    ) -> tuple[torch.Tensor, str, list[float]]:
        import torch

        from subspace_cli import store
        from subspace_cli.alignment import minibatch_indices
        from subspace_cli.output import say
        from subspace_cli.spectrum import compute_spectrum, to_stored

        settings = dataclasses.replace(self.settings, k=need, extra=0)
        target = experiment
        if self.hessian == "minibatch":
            assert experiment.data is not None
            generator = torch.Generator().manual_seed(self.settings.seed + 1_000_003)
            [idx] = minibatch_indices(len(experiment.data), self.batch_sizes[0], 1, generator)
            target = dataclasses.replace(experiment, data=experiment.data.subset(idx))
        elif init is None:
            previous = self.warm_start_for(names)
            if previous is not None:
                init, warm = previous.vectors, previous.source
        name = experiment.checkpoint.path.name
        with self.progress(f"{name} eigenspace", settings.max_hvps) as bar:
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
                f"within {run.result.hvp_count} HVPs; χ is measured against it anyway", always=True
            )
        vectors = run.result.eigenvectors
        values = [float(v) for v in run.result.eigenvalues]
        if self.hessian == "minibatch":
            return vectors, (
                f"computed from a mini-batch Hessian ({self.batch_sizes[0]} samples, "
                f"{run.result.hvp_count} HVPs)"
            ), values
        self.remember(run.layout.names, vectors, experiment.checkpoint.path)
        if self.output and parallel.is_main():
            exists = store.has_group(self.output, experiment.checkpoint.path)
            if not exists or self.overwrite:
                store.write_spectrum(
                    self.output, to_stored(run, experiment), overwrite=self.overwrite
                )
        return vectors, f"computed ({run.result.hvp_count} HVPs)", values
