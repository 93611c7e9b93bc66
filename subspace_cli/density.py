"""The spectral density of a curvature by stochastic Lanczos quadrature, and its trace.

For each of ``runs`` probes v (Rademacher entries ±1/√n, from a seeded generator), ``steps``
Lanczos steps with full re-orthogonalisation give a tridiagonal T = QᵀAQ; its eigenvalues θⱼ
(the nodes) and the squared first components τⱼ of its eigenvectors (the weights, summing to 1)
are the Gauss quadrature of the measure μ_v = Σᵢ (uᵢᵀv)² δ(λᵢ): Σⱼ τⱼ θⱼᵖ = vᵀAᵖv exactly for
p ≤ 2·steps − 1, and E_v[vᵀAᵖv] = tr(Aᵖ)/n. The density is the mean over the probes of the
nodes smoothed by a Gaussian of width σ, on a grid, normalised to integrate to 1 over it.

The trace is Hutchinson's estimate: the mean of zᵀAz over ``trace_probes`` Rademacher vectors
z, with its standard error (the sample standard deviation over √probes).

Memory: one Lanczos basis of ``steps`` vectors of n float64 at a time (the runs are
sequential).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from subspace_cli.errors import UsageError

if TYPE_CHECKING:
    import torch

    from subspace_cli.operator import ChunkedOperator

#: Multiples of the width the grid reaches beyond the outermost nodes.
GRID_MARGIN = 5.0


@dataclass
class Density:
    """A spectral density with its quadrature and the trace."""

    grid: np.ndarray
    density: np.ndarray
    width: float
    nodes: np.ndarray  # (runs, steps): NaN where a run's Lanczos ended early
    weights: np.ndarray  # (runs, steps), each run's summing to 1
    trace: float
    trace_stderr: float
    trace_probes: int
    runs: int
    steps: int
    hvp_count: int
    seconds: float
    n_params: int

    def record(self) -> dict[str, Any]:
        return {
            "grid": self.grid.tolist(), "density": self.density.tolist(), "width": self.width,
            "nodes": [[float(x) for x in row if not math.isnan(x)] for row in self.nodes],
            "weights": [[float(w) for w, x in zip(wr, nr, strict=True) if not math.isnan(x)]
                        for wr, nr in zip(self.weights, self.nodes, strict=True)],
            "trace": self.trace, "trace_stderr": self.trace_stderr,
            "trace_probes": self.trace_probes, "runs": self.runs, "lanczos_steps": self.steps,
            "hvp_count": self.hvp_count, "seconds": round(self.seconds, 3),
            "n_params": self.n_params,
        }


def _rademacher(n: int, count: int, generator: torch.Generator) -> torch.Tensor:
    import torch

    signs = torch.randint(0, 2, (count, n), generator=generator, dtype=torch.int8)
    return (2 * signs - 1).to(torch.float64)


def lanczos_quadrature(op: ChunkedOperator, v: torch.Tensor, steps: int
                       ) -> tuple[np.ndarray, np.ndarray]:
    """Nodes and weights of the Gauss quadrature of vᵀ f(A) v (v of unit norm) from ``steps``
    Lanczos steps with full re-orthogonalisation; fewer when the Krylov space is exhausted."""
    import torch

    n = v.shape[0]
    steps = min(steps, n)
    basis = torch.zeros(steps, n, dtype=torch.float64, device=op.device)
    basis[0] = v.to(op.device, torch.float64)
    alpha, beta = [], []
    for j in range(steps):
        w = op.matvec(basis[j].to(op.dtype)).to(torch.float64)
        scale = float(w.norm())
        a = float(basis[j] @ w)
        alpha.append(a)
        for _ in range(2):  # full re-orthogonalisation, twice ("twice is enough")
            w -= basis[: j + 1].T @ (basis[: j + 1] @ w)
        b = float(w.norm())
        if j == steps - 1 or b <= 1e-10 * scale:
            break  # the last step, or an invariant subspace: the quadrature is exact
        beta.append(b)
        basis[j + 1] = w / b
    t = np.diag(alpha) + np.diag(beta, 1) + np.diag(beta, -1)
    nodes, vectors = np.linalg.eigh(t)
    return nodes, vectors[0] ** 2


def hutchinson_trace(op: ChunkedOperator, probes: int, generator: torch.Generator,
                     block: int = 8) -> tuple[float, float]:
    """Hutchinson's trace estimate over ``probes`` Rademacher vectors, with its standard
    error."""
    import torch

    values: list[float] = []
    for start in range(0, probes, block):
        z = _rademacher(op.n_params, min(block, probes - start), generator)
        products = op.matmat(z.to(op.device, op.dtype)).to("cpu", torch.float64)
        values += (z * products).sum(dim=1).tolist()
    estimate = float(np.mean(values))
    stderr = float(np.std(values, ddof=1) / math.sqrt(len(values))) if len(values) > 1 else \
        float("nan")
    return estimate, stderr


def smoothed(nodes: np.ndarray, weights: np.ndarray, grid: np.ndarray, width: float
             ) -> np.ndarray:
    """The mean over runs of Σⱼ τⱼ N(t; θⱼ, σ²) on ``grid``, normalised to integrate to 1 over
    it (trapezoid rule)."""
    kept = ~np.isnan(nodes)
    theta, tau = nodes[kept], weights[kept]
    z = (grid[:, None] - theta[None, :]) / width
    values = (np.exp(-0.5 * z**2) * tau[None, :]).sum(axis=1) / (width * math.sqrt(2 * math.pi))
    values /= nodes.shape[0]
    trapezoid = getattr(np, "trapezoid", None) or np.trapz  # NumPy < 2 calls it trapz
    area = float(trapezoid(values, grid))
    return values / area if area > 0 else values


def spectral_density(op: ChunkedOperator, *, runs: int = 10, steps: int = 80,
                     trace_probes: int = 30, grid_points: int = 1000,
                     width: float | None = None, seed: int = 0) -> Density:
    """The density of ``op``'s spectrum by stochastic Lanczos quadrature, and its trace.

    ``width`` (σ) defaults to 1% of the span of the nodes.
    """
    import torch

    for name, value, least in (("runs", runs, 1), ("lanczos steps", steps, 1),
                               ("grid points", grid_points, 2), ("trace probes", trace_probes, 0)):
        if value < least:
            raise UsageError(f"{name} must be at least {least}, got {value}")
    if width is not None and not width > 0:
        raise UsageError(f"the Gaussian width must be positive, got {width}")
    started = time.perf_counter()
    before = op.hvp_count
    generator = torch.Generator().manual_seed(seed)
    n = op.n_params
    m = min(steps, n)
    nodes = np.full((runs, m), np.nan)
    weights = np.zeros((runs, m))
    for r in range(runs):
        v = _rademacher(n, 1, generator)[0] / math.sqrt(n)
        theta, tau = lanczos_quadrature(op, v, m)
        nodes[r, : len(theta)], weights[r, : len(tau)] = theta, tau
    lo, hi = float(np.nanmin(nodes)), float(np.nanmax(nodes))
    if width is None:
        width = 0.01 * (hi - lo) if hi > lo else 1e-3 * max(abs(hi), 1.0)
    grid = np.linspace(lo - GRID_MARGIN * width, hi + GRID_MARGIN * width, grid_points)
    trace, stderr = (hutchinson_trace(op, trace_probes, generator) if trace_probes
                     else (float("nan"), float("nan")))
    return Density(grid=grid, density=smoothed(nodes, weights, grid, width), width=width,
                   nodes=nodes, weights=weights, trace=trace, trace_stderr=stderr,
                   trace_probes=trace_probes, runs=runs, steps=m,
                   hvp_count=op.hvp_count - before, seconds=time.perf_counter() - started,
                   n_params=n)
