"""``density`` over a sequence of checkpoints: the spectral density and trace of each, stored
beside its top-k spectrum."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from subspace_cli import parallel
from subspace_cli.analysis.sequence import CheckpointSequence

if TYPE_CHECKING:
    from subspace_cli.checkpoint import SpecOverrides
    from subspace_cli.settings import SpectrumSettings

#: The subgroup of a checkpoint's spectrum group that holds its density (docs/format.md).
SUBGROUP = "density"


class DensityAnalysis(CheckpointSequence):
    """The stochastic-Lanczos-quadrature density and Hutchinson trace of each checkpoint's
    curvature (:func:`subspace_cli.density.spectral_density`)."""

    def __init__(self, settings: SpectrumSettings, overrides: SpecOverrides, *, runs: int,
                 steps: int, trace_probes: int, grid_points: int, width: float | None,
                 output: str | None = None, overwrite: bool = False,
                 quiet: bool = False) -> None:
        super().__init__(settings, overrides, output=output, overwrite=overwrite, quiet=quiet)
        self.options = {"runs": runs, "steps": steps, "trace_probes": trace_probes,
                        "grid_points": grid_points, "width": width, "seed": settings.seed}

    def run(self, path: Path) -> dict[str, Any]:
        from subspace_cli import store
        from subspace_cli.density import spectral_density
        from subspace_cli.errors import UsageError
        from subspace_cli.spectrum import curvature_batch_size, curvature_operator

        if self.output:  # checked before anything is computed, from one read of attributes
            outline = store.group_outline(self.output, path)
            if outline is None:
                raise UsageError(
                    f"{self.output} holds no spectrum of {path}: the density is stored beside "
                    f"the top-k eigenpairs, so run `subspace spectrum {path} -o {self.output}` "
                    "first"
                )
            attrs, subgroups = outline
            curvature = str(attrs.get("curvature", "hessian"))
            if curvature != self.settings.curvature:
                raise UsageError(
                    f"{self.output}: the spectrum of {path} is of the {curvature}, this density "
                    f"of the {self.settings.curvature}: they would be stored (and plotted) "
                    "together; pass the same --curvature, or another -o"
                )
            if not self.overwrite and SUBGROUP in subgroups:
                raise UsageError(f"{self.output} already holds a density of {path}; pass "
                                 "--overwrite to replace it")
        experiment = self.load(path)
        op = curvature_operator(experiment, self.settings)
        result = spectral_density(op, **self.options)
        s = self.settings
        record = {"checkpoint": str(path), "checkpoint_sha256": experiment.checkpoint.sha256(),
                  "curvature": s.curvature, "curvature_batch_size": curvature_batch_size(s),
                  "loss": experiment.loss, "mode": "train" if s.train_mode else "eval",
                  "dtype": s.dtype, "seed": s.seed, "n_samples": op.n_samples,
                  **result.record()}
        if self.output and parallel.is_main():
            import numpy as np

            attrs = {key: value for key, value in record.items()
                     if key not in ("grid", "density", "nodes", "weights")}
            attrs = {"encoding-type": "density", "encoding-version": "1.0",
                     **{k: (-1 if v is None else v) for k, v in attrs.items()}}
            datasets = {"grid": result.grid, "density": result.density,
                        "nodes": result.nodes, "weights": result.weights}
            record["group"] = store.write_subgroup(
                self.output, path, SUBGROUP, attrs,
                {k: np.asarray(v, dtype=np.float64) for k, v in datasets.items()},
                overwrite=self.overwrite)
        return record
