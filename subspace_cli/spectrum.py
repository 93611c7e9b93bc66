"""Top-k Hessian eigenpairs of a checkpoint: the library layer behind ``subspace spectrum``.

:func:`compute_spectrum` turns an :class:`~subspace_cli.experiment.Experiment` and
:class:`SpectrumSettings` into a :class:`SpectrumRun` (eigenpairs, residuals, cost and
provenance); :func:`to_stored` makes the HDF5 record of it. ``align`` and ``project-train`` call
the same functions.
"""

from __future__ import annotations

import datetime as _dt
import shlex
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from subspace_cli import __version__, parallel
from subspace_cli.errors import UsageError
from subspace_cli.settings import SpectrumSettings

if TYPE_CHECKING:
    import torch

    from subspace_cli.eigensolver import EigenResult
    from subspace_cli.experiment import Experiment
    from subspace_cli.functional import ParameterLayout
    from subspace_cli.operator import ChunkedOperator
    from subspace_cli.store import Spectrum

@dataclass
class SpectrumRun:
    """A computed spectrum with what it cost and how it was made."""

    result: EigenResult
    layout: ParameterLayout
    device: str
    dtype: str
    n_samples: int
    hvp_method: str | None
    settings: SpectrumSettings
    warm_start: str | None = None
    overlap_with_previous: float | None = None
    probe_hvps: float = 0.0
    method_choice: str = ""
    graph_bytes: int = 0
    graphs_kept: int = 0
    n_chunks: int = 0


def curvature_operator(experiment: Experiment, settings: SpectrumSettings,
                       parameters: torch.Tensor | None = None) -> ChunkedOperator:
    """The full-training-set curvature operator of an experiment under ``settings`` (the
    Hessian, or the ``--curvature`` chosen), at ``parameters`` (a flat θ; default the
    model's own)."""
    from subspace_cli.functional import check_measurement_mode, select_parameters
    from subspace_cli.hessian import HessianOperator

    assert experiment.data is not None
    check_measurement_mode(experiment.model, settings.train_mode, settings.allow_dropout)
    layout = select_parameters(experiment.model, settings.include, settings.exclude)
    common: dict[str, Any] = {
        "layout": layout,
        "chunk_size": settings.chunk_size,
        "max_samples": settings.max_samples,
        "device": settings.resolved_device,
        "dtype": settings.resolved_dtype,
        "train_mode": settings.train_mode,
        "parameters": parameters,
    }
    args = (experiment.model, experiment.data, experiment.loss)
    if settings.curvature == "hessian":
        return HessianOperator(*args, method=settings.hvp_method,
                               graph_memory=settings.graph_memory, **common)
    from subspace_cli import curvature

    if settings.curvature == "ggn":
        return curvature.GGNOperator(*args, **common)
    if settings.curvature == "fisher":
        return curvature.FisherOperator(*args, **common)
    assert settings.batch_size is not None  # checked by SpectrumSettings
    return curvature.GradientCovarianceOperator(*args, batch_size=settings.batch_size, **common)


def canonical_signs(vectors: torch.Tensor) -> torch.Tensor:
    """Flip each row so that its largest-magnitude entry is positive (eigenvectors have no sign;
    this makes stored results reproducible and comparable)."""
    import torch

    if vectors.shape[0] == 0:
        return vectors
    index = vectors.abs().argmax(dim=1, keepdim=True)
    signs = torch.sign(vectors.gather(1, index))
    signs[signs == 0] = 1
    return vectors * signs


def compute_spectrum(
    experiment: Experiment,
    settings: SpectrumSettings,
    *,
    init: torch.Tensor | None = None,
    warm_start: str | None = None,
    progress: Callable[[int, Any], None] | None = None,
) -> SpectrumRun:
    """Top-k (+ extra) eigenpairs of the Hessian of the full training loss at a checkpoint."""
    from subspace_cli.eigensolver import arpack_eigenpairs, default_block_size, top_eigenpairs

    assert experiment.data is not None
    k = top_k(settings, experiment)
    op = curvature_operator(experiment, settings)
    if k + settings.extra > op.n_params:
        raise UsageError(
            f"k + extra = {k + settings.extra} exceeds the {op.n_params} selected parameters"
        )
    common = {
        "extra": settings.extra,
        "tol": settings.tol,
        "max_hvps": settings.max_hvps,
        "init": init,
        "seed": settings.seed,
    }
    if settings.solver == "arpack":
        result = arpack_eigenpairs(op, k, **common)
    else:
        block_size = settings.block_size or default_block_size(op.device, cold=init is None)
        result = top_eigenpairs(op, k, block_size=block_size, progress=progress,
                                basis_memory=settings.basis_memory, **common)
    result.eigenvectors = canonical_signs(result.eigenvectors)
    # data-parallel: every rank ran the same solver on the same reduced products
    parallel.agree(result.eigenvalues, "the eigenvalues")
    parallel.agree(result.eigenvectors, "the eigenvectors")
    return SpectrumRun(
        result=result,
        layout=op.layout,
        device=str(op.device),
        dtype=settings.dtype,
        n_samples=op.n_samples,
        hvp_method=op.method,
        settings=settings,
        warm_start=warm_start,
        probe_hvps=op.probe_hvps,
        method_choice=op.method_choice,
        graph_bytes=op.graph_bytes,
        graphs_kept=op.graphs_kept,
        n_chunks=-(-op.n_samples // op.chunk_size),
    )


def chunk_dependent(settings: SpectrumSettings, experiment: Experiment) -> bool:
    """Whether the Hessian depends on ``--chunk-size``: in train mode, BatchNorm normalises
    each chunk by that chunk's own statistics."""
    from subspace_cli.functional import mode_dependence

    return settings.train_mode and bool(mode_dependence(experiment.model).batch_statistics)


def top_k(settings: SpectrumSettings, experiment: Experiment) -> int:
    """How many top eigenpairs: ``settings.k``, by default the number of classes."""
    if settings.k is not None:
        return settings.k
    return experiment.data.num_classes if experiment.data is not None else 1


def curvature_batch_size(settings: SpectrumSettings) -> int | None:
    """The mini-batch size a curvature depends on (the gradient covariance's), else None."""
    return settings.batch_size if settings.curvature == "gradient-covariance" else None


def curvature_name(curvature: str, batch_size: int | None = None) -> str:
    """How a curvature is named in tables: ``Hessian``, ``GGN``, ``Fisher``, ``gradient
    covariance (batch 50)``."""
    name = {"hessian": "Hessian", "ggn": "GGN", "fisher": "Fisher"}.get(
        curvature, curvature.replace("-", " "))
    return f"{name} (batch {batch_size})" if batch_size else name


def summary(run: SpectrumRun, experiment: Experiment) -> dict[str, Any]:
    """The JSON object of one checkpoint's spectrum (see the README)."""
    r = run.result
    return {
        "checkpoint": str(experiment.checkpoint.path),
        "checkpoint_sha256": experiment.checkpoint.sha256(),
        "k": r.k,
        "extra": r.extra,
        "eigenvalues": [float(v) for v in r.eigenvalues],
        "residuals": [float(v) for v in r.residuals],
        "converged": list(r.converged),
        "tol": r.tol,
        "hvp_count": r.hvp_count,
        "hvp_probe_extra": round(run.probe_hvps, 3),
        "hvp_method_choice": run.method_choice,
        "seconds": round(r.seconds, 3),
        "basis_bytes": r.basis_bytes,
        "graph_bytes": run.graph_bytes,
        "graphs_kept": run.graphs_kept,
        "chunks": run.n_chunks,
        "n_params": run.layout.n_params,
        "n_samples": run.n_samples,
        "loss": experiment.loss,
        "curvature": run.settings.curvature,
        "curvature_batch_size": curvature_batch_size(run.settings),
        "mode": "train" if run.settings.train_mode else "eval",
        "chunk_dependent": chunk_dependent(run.settings, experiment),
        "solver": r.solver,
        "hvp_method": run.hvp_method,
        "device": run.device,
        "dtype": run.dtype,
        "warm_start": run.warm_start,
        "overlap_with_previous": run.overlap_with_previous,
    }


def to_stored(run: SpectrumRun, experiment: Experiment) -> Spectrum:
    """The HDF5 record of a run, with full provenance (``docs/format.md``)."""
    import numpy as np
    import torch

    from subspace_cli.store import Spectrum

    r, spec, s = run.result, experiment.spec, run.settings
    attrs: dict[str, Any] = {
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="microseconds"),
        "model": spec.model,
        "model_config": spec.model_config,
        "data": spec.data,
        "data_config": spec.data_config,
        "loss": spec.loss,
        "curvature": s.curvature,
        "curvature_batch_size": curvature_batch_size(s) or -1,
        "step": spec.step if spec.step is not None else -1,
        "extra": r.extra,
        "solver": r.solver,
        "tol": r.tol,
        "max_hvps": s.max_hvps if s.max_hvps is not None else -1,
        "hvp_count": r.hvp_count,
        "hvp_probe_extra": run.probe_hvps,
        "hvp_method_choice": run.method_choice,
        "basis_bytes": r.basis_bytes,
        "graph_bytes": run.graph_bytes,
        "iterations": r.iterations,
        "restarts": r.restarts,
        "seconds": r.seconds,
        "device": run.device,
        "dtype": run.dtype,
        "hvp_method": run.hvp_method or "",
        "mode": "train" if s.train_mode else "eval",
        "chunk_dependent": chunk_dependent(s, experiment),
        "n_samples": run.n_samples,
        "chunk_size": s.chunk_size,
        "max_samples": s.max_samples if s.max_samples is not None else -1,
        "params_include": list(s.include),
        "params_exclude": list(s.exclude),
        "seed": s.seed,
        "warm_start": run.warm_start or "",
        "torch_version": str(torch.__version__),
        "subspace_version": __version__,
        "command": shlex.join(["subspace", *sys.argv[1:]]),
    }
    return Spectrum(
        checkpoint=str(experiment.checkpoint.path),
        checkpoint_sha256=experiment.checkpoint.sha256(),
        k=r.k,
        eigenvalues=r.eigenvalues.detach().cpu().numpy().astype(np.float64),
        eigenvectors=r.eigenvectors.detach().cpu().numpy(),
        residuals=r.residuals.detach().cpu().numpy().astype(np.float64),
        converged=np.asarray(r.converged, dtype=bool),
        param_names=list(run.layout.names),
        param_shapes=[tuple(shape) for shape in run.layout.shapes],
        param_offsets=list(run.layout.offsets),
        attrs=attrs,
    )
