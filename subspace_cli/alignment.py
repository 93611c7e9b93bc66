"""How much of a gradient lies in the dominant subspace: the measurement behind ``align``.

χ_k and the norm split are defined in :mod:`subspace_cli.projection`; this module measures them
for the full-batch gradient and for random mini-batch gradients at one checkpoint.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from subspace_cli.data import TrainingData
from subspace_cli.errors import UsageError
from subspace_cli.projection import alignment, coefficients, norm_split

if TYPE_CHECKING:
    import torch

    from subspace_cli.hessian import HessianOperator
    from subspace_cli.operator import ChunkedOperator


def summarize(values: torch.Tensor) -> dict[str, float]:
    """Mean, standard deviation (n − 1) and the 5/50/95 % quantiles (linear interpolation)."""
    import torch

    v = values.to(torch.float64).flatten()
    q = torch.quantile(v, torch.tensor([0.05, 0.5, 0.95], dtype=torch.float64))
    return {
        "mean": float(v.mean()),
        "std": float(v.std()) if v.numel() > 1 else 0.0,
        "q05": float(q[0]),
        "q50": float(q[1]),
        "q95": float(q[2]),
    }


def operator_on(op: ChunkedOperator, data: TrainingData) -> HessianOperator:
    """A Hessian operator like ``op`` (model, parameters, loss, device, dtype, mode) on other
    data: what the mini-batch gradients are taken with, whatever ``op``'s curvature."""
    from subspace_cli.hessian import HessianOperator
    from subspace_cli.settings import HVP_METHODS

    return HessianOperator(
        op.model,
        data,
        op.loss,
        layout=op.layout,
        chunk_size=op.chunk_size,
        device=op.device,
        dtype=op.dtype,
        train_mode=op.train_mode,
        method=op.method if op.method in HVP_METHODS else "auto",
        graph_memory=op.graph_budget,
    )


def minibatch_indices(
    n: int, batch_size: int, batches: int, generator: torch.Generator
) -> list[torch.Tensor]:
    """``batches`` random mini-batches, each drawn without replacement from the n samples."""
    import torch

    if batch_size > n:
        raise UsageError(f"batch size {batch_size} exceeds the {n} training samples")
    return [torch.randperm(n, generator=generator)[:batch_size] for _ in range(batches)]


@dataclass
class AlignmentResult:
    """Alignment of the full-batch and mini-batch gradients at one checkpoint."""

    k: int
    chi_full: float
    full_norms: tuple[float, float]
    chi_minibatch: dict[int, dict[str, float]]
    minibatch_norms: dict[int, tuple[float, float]]
    chi_samples: dict[int, list[float]]
    train_loss: float
    gradient_norm: float
    per_eigenvector: list[float] | None = None
    per_eigenvector_minibatch: dict[int, list[float]] | None = None
    k_sweep: dict[int, dict[str, Any]] | None = None


def measure(
    op: ChunkedOperator,
    basis: torch.Tensor,
    k: int,
    *,
    batch_sizes: Sequence[int],
    batches: int,
    seed: int,
    per_eigenvector: bool = False,
    k_sweep: Sequence[int] = (),
    progress: Any = None,
) -> AlignmentResult:
    """χ_k of the full-batch gradient and of random mini-batch gradients.

    Args:
        op: Hessian operator of the full training set (its ``loss_and_gradient`` gives ∇L).
        basis: Orthonormal eigenvectors as rows, at least ``max(k, *k_sweep)`` of them, in
            descending eigenvalue order.
        k: Dimension of the dominant subspace.
        batch_sizes: Mini-batch sizes; each gets ``batches`` batches drawn with ``seed``.
        per_eigenvector: Also report cos(g, u_i) for i ≤ k.
        k_sweep: Also report χ for these k (from the same basis).
        progress: Optional callable ``progress(done, total)`` over mini-batch gradients.
    """
    import torch

    need = max([k, *k_sweep])
    if basis.shape[0] < need:
        raise UsageError(f"the eigenspace holds {basis.shape[0]} vectors but k = {need} is needed")
    basis = basis.to(op.device, op.dtype)
    dominant = basis[:k]
    loss, gradient, _ = op.loss_and_gradient()
    g = gradient.unsqueeze(0)
    dom_sq, bulk_sq = norm_split(dominant, g)
    gnorm = float(gradient.to(torch.float64).norm())

    generator = torch.Generator().manual_seed(seed)
    n = op.n_samples
    grads: dict[int, torch.Tensor] = {}
    total = batches * len(batch_sizes)
    done = 0
    for size in batch_sizes:
        rows = []
        for idx in minibatch_indices(n, size, batches, generator):
            rows.append(operator_on(op, op.data.subset(idx)).loss_and_gradient()[1])
            done += 1
            if progress is not None:
                progress(done, total)
        grads[size] = torch.stack(rows)

    chi_minibatch, minibatch_norms, chi_samples = {}, {}, {}
    for size, block in grads.items():
        chi = alignment(dominant, block)
        chi_minibatch[size] = summarize(chi)
        chi_samples[size] = [float(c) for c in chi]
        d, b = norm_split(dominant, block)
        minibatch_norms[size] = (float(d.mean()), float(b.mean()))

    result = AlignmentResult(
        k=k,
        chi_full=float(alignment(dominant, g)[0]),
        full_norms=(float(dom_sq[0]), float(bulk_sq[0])),
        chi_minibatch=chi_minibatch,
        minibatch_norms=minibatch_norms,
        chi_samples=chi_samples,
        train_loss=loss,
        gradient_norm=gnorm,
    )
    if per_eigenvector:
        denom = gnorm if gnorm > 0 else 1.0
        result.per_eigenvector = [float(c) / denom for c in coefficients(dominant, g)[0]]
        result.per_eigenvector_minibatch = {}
        for size, block in grads.items():
            norms = block.to(torch.float64).norm(dim=1, keepdim=True).clamp(min=1e-300)
            cos = coefficients(dominant, block).to(torch.float64) / norms
            result.per_eigenvector_minibatch[size] = [float(c) for c in cos.mean(0)]
    if k_sweep:
        result.k_sweep = {}
        for kk in sorted(set(k_sweep)):
            sub = basis[:kk]
            result.k_sweep[kk] = {
                "chi_full": float(alignment(sub, g)[0]),
                "chi_minibatch_mean": {
                    size: float(alignment(sub, block).mean()) for size, block in grads.items()
                },
            }
    return result
