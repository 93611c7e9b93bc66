"""Training losses, written as sums over samples so chunks can be accumulated.

``mse`` follows the convention of Song, Ahn and Yun (2025) and Gur-Ari et al. (2018):

    L(θ) = (1/N) Σ_n 0.5 · ‖f(x_n; θ) − onehot(y_n)‖²

summed over the C outputs and averaged over the N samples. ``ce`` is the mean cross-entropy

    L(θ) = (1/N) Σ_n −log softmax(f(x_n; θ))_{y_n}.

Token-level tasks (labels of shape ``(N, T)``, logits ``(N, T, C)``) are weighted by tokens:
the sums run over every labelled token and N becomes the number of labelled tokens in the whole
training set, so a long sequence weighs more than a short one, as in Hugging Face's causal
language-model loss. A label equal to :data:`~subspace_cli.data.IGNORE_INDEX` (padding) is left
out of the sum and of the count, under either loss.

Hessian eigenvalues scale with the convention, so it is stored wherever a result is.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from subspace_cli.data import IGNORE_INDEX
from subspace_cli.errors import UsageError

if TYPE_CHECKING:
    import torch

LOSSES = ("mse", "ce")


def check_loss(name: str) -> str:
    if name not in LOSSES:
        raise UsageError(f"unknown loss {name!r}: choose one of {', '.join(LOSSES)}")
    return name


def loss_sum(name: str, output: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Sum over the labelled units (samples, or tokens) of a chunk of the per-unit loss
    (divide by their number over the training set for the mean)."""
    import torch.nn.functional as F

    if name not in LOSSES:
        raise UsageError(f"unknown loss {name!r}: choose one of {', '.join(LOSSES)}")
    if output.dim() > 2:  # one prediction per token: (N, T, C) with labels (N, T)
        output, y = output.reshape(-1, output.shape[-1]), y.reshape(-1)
    y = y.long()
    if name == "ce":  # cross_entropy leaves IGNORE_INDEX out by itself
        return F.cross_entropy(output, y, reduction="sum", ignore_index=IGNORE_INDEX)
    ignored = y == IGNORE_INDEX
    if bool(ignored.any()):
        target = F.one_hot(y.masked_fill(ignored, 0), num_classes=output.shape[-1])
        kept = (~ignored).unsqueeze(-1).to(output.dtype)
        return 0.5 * (((output - target.to(output.dtype)) * kept) ** 2).sum()
    target = F.one_hot(y, num_classes=output.shape[-1]).to(output.dtype)
    return 0.5 * ((output - target) ** 2).sum()


def correct_count(output: torch.Tensor, y: torch.Tensor) -> int:
    """Number of labelled units whose arg-max output is the label."""
    return int(((output.argmax(dim=-1) == y) & (y != IGNORE_INDEX)).sum())


def output_hessian_product(name: str, output: torch.Tensor, y: torch.Tensor,
                           u: torch.Tensor) -> torch.Tensor:
    """The loss's Hessian with respect to the model's output applied to ``u`` (shaped like
    ``output``), unit by unit: the identity for ``mse``, diag(p) − ppᵀ with p = softmax(f) for
    ``ce``; zero for a unit whose label is ignored. What the Gauss–Newton matrix puts between
    the Jacobians."""
    check_loss(name)
    kept = (y != IGNORE_INDEX).unsqueeze(-1).to(u.dtype)
    if name == "mse":
        return u * kept
    p = output.softmax(dim=-1)
    return (p * u - p * (p * u).sum(dim=-1, keepdim=True)) * kept


def per_sample_loss(name: str, output: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Each sample's loss (the sum over its labelled units): a vector of the chunk's length."""
    import torch.nn.functional as F

    check_loss(name)
    y = y.long()
    if name == "ce":
        losses = F.cross_entropy(output.reshape(-1, output.shape[-1]), y.reshape(-1),
                                 reduction="none", ignore_index=IGNORE_INDEX)
    else:
        ignored = y == IGNORE_INDEX
        target = F.one_hot(y.masked_fill(ignored, 0), num_classes=output.shape[-1])
        losses = (0.5 * ((output - target.to(output.dtype)) ** 2).sum(-1)
                  * (~ignored).to(output.dtype)).reshape(-1)
    return losses.reshape(y.shape[0], -1).sum(dim=1)
