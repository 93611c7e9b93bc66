"""P_k and χ: the one home of the projector onto the dominant subspace.

For an orthonormal basis U = (u_1 … u_k) of the dominant subspace (rows of ``basis``) and the
projector P_k = Σ_{i≤k} u_i u_iᵀ, the alignment of a vector v is

    χ_k(v) = ‖P_k v‖ / ‖v‖ ∈ [0, 1],

and ‖v‖² = ‖P_k v‖² + ‖(I − P_k) v‖² splits its squared norm between the dominant subspace
and the bulk. Everything here needs only the coefficients U v, so P_k is never formed.
``align`` measures with these functions and ``project-train`` projects with them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

MODES = ("none", "dom", "bulk", "mix")


def coefficients(basis: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
    """Coordinates U v of each row of ``vectors`` (m, n) in the orthonormal ``basis`` (k, n)."""
    return vectors @ basis.T


def alignment(basis: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
    """χ_k of each row of ``vectors`` (0 for a zero vector), in float64."""
    import torch

    c = coefficients(basis, vectors).to(torch.float64)
    norms = vectors.to(torch.float64).norm(dim=-1)
    chi = c.norm(dim=-1) / torch.where(norms > 0, norms, torch.ones_like(norms))
    return chi.clamp(0.0, 1.0)


def norm_split(basis: torch.Tensor, vectors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """‖P_k v‖² and ‖(I − P_k) v‖² of each row, in float64."""
    import torch

    dominant = coefficients(basis, vectors).to(torch.float64).pow(2).sum(-1)
    total = vectors.to(torch.float64).pow(2).sum(-1)
    return dominant, (total - dominant).clamp(min=0.0)


def split(basis: torch.Tensor, vector: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(P_k v, (I − P_k) v) for the orthonormal rows of ``basis``; they are orthogonal and sum
    to v."""
    if basis.shape[0] == 0:
        return vector * 0, vector.clone()
    dominant = (basis @ vector) @ basis
    return dominant, vector - dominant


def project(basis: torch.Tensor, vector: torch.Tensor, mode: str, a: float = 1.0,
            b: float = 1.0) -> torch.Tensor:
    """The update that ``mode`` keeps of ``vector``: v (none), P_k v (dom), (I − P_k) v (bulk)
    or a·P_k v + b·(I − P_k) v (mix)."""
    if mode == "none":
        return vector
    dominant, bulk = split(basis, vector)
    if mode == "dom":
        return dominant
    if mode == "bulk":
        return bulk
    return a * dominant + b * bulk
