"""Training losses, written as sums over samples so chunks can be accumulated.

``mse`` follows the convention of Song, Ahn and Yun (2025) and Gur-Ari et al. (2018):

    L(θ) = (1/N) Σ_n 0.5 · ‖f(x_n; θ) − onehot(y_n)‖²

summed over the C outputs and averaged over the N samples. ``ce`` is the mean cross-entropy

    L(θ) = (1/N) Σ_n −log softmax(f(x_n; θ))_{y_n}.

Hessian eigenvalues scale with the convention, so it is stored wherever a result is.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from subspace_cli.errors import UsageError

if TYPE_CHECKING:
    import torch

LOSSES = ("mse", "ce")


def check_loss(name: str) -> str:
    if name not in LOSSES:
        raise UsageError(f"unknown loss {name!r}: choose one of {', '.join(LOSSES)}")
    return name


def loss_sum(name: str, output: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Sum over the samples of a chunk of the per-sample loss (divide by N for the mean)."""
    import torch.nn.functional as F

    if name == "mse":
        target = F.one_hot(y.long(), num_classes=output.shape[-1]).to(output.dtype)
        return 0.5 * ((output - target) ** 2).sum()
    if name == "ce":
        return F.cross_entropy(output, y.long(), reduction="sum")
    raise UsageError(f"unknown loss {name!r}: choose one of {', '.join(LOSSES)}")


def correct_count(output: torch.Tensor, y: torch.Tensor) -> int:
    """Number of samples whose arg-max output is the label."""
    return int((output.argmax(dim=-1) == y).sum())
