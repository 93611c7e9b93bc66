"""Curvatures other than the Hessian, as chunked operators the eigensolvers take unchanged.

* :class:`GGNOperator`: the Gauss–Newton matrix G = (1/N) Σₙ Jₙᵀ Hₙ Jₙ, with Jₙ the Jacobian of
  the model's output for sample n and Hₙ the loss's Hessian with respect to that output
  (:func:`subspace_cli.losses.output_hessian_product`: the identity for ``mse``, diag(p) − ppᵀ
  for ``ce``). Exact: per chunk one JVP (J v) and one VJP (Jᵀ H J v) per vector.
* :class:`FisherOperator`: the empirical Fisher F = (1/N) Σₙ gₙ gₙᵀ of the per-sample gradients
  gₙ = ∇ℓₙ. Per chunk the products gₙᵀ v of all its samples are one JVP of the vector of
  per-sample losses, and Σₙ gₙ (gₙᵀ v) one VJP: no per-sample gradient is ever stored.
* :class:`GradientCovarianceOperator`: the covariance of the mini-batch gradient at batch size
  B when batches are drawn without replacement (as ``project-train``'s sampler does),
  C_B = (N − B) / (B (N − 1)) · (F − ḡ ḡᵀ), ḡ the full-batch gradient: the DOME subspace.

The HVP method race of :class:`~subspace_cli.hessian.HessianOperator` does not apply: each
operator has one product. Fisher and gradient covariance need one label per sample.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from subspace_cli.data import Inputs
from subspace_cli.errors import UsageError
from subspace_cli.losses import output_hessian_product, per_sample_loss
from subspace_cli.operator import ChunkedOperator


class _JacobianProducts(ChunkedOperator):
    """Shared by the operators below: no method to choose, no graph kept, one product each."""

    method = "jvp-vjp"
    method_choice = "given"
    probe_hvps = 0.0
    graph_bytes = 0
    graphs_kept = 0
    graph_budget = 0
    #: The curvature's name as ``--curvature`` spells it.
    curvature = ""

    def _moved(self) -> None:
        pass

    def _one_label_per_sample(self, y: torch.Tensor | None) -> None:
        if y is not None and y.dim() > 1:
            raise UsageError(f"--curvature {self.curvature} needs one label per sample; these "
                             "labels are per token (use hessian or ggn)")

    def _pullbacks(self, f: Callable[[torch.Tensor], torch.Tensor], vectors: torch.Tensor,
                   between: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
                   ) -> torch.Tensor:
        """Jᵀ between(f(θ), J v) for each row v of ``vectors``, J the Jacobian of ``f`` at θ:
        one VJP graph for all rows, one JVP per row."""
        with torch.enable_grad():
            out, pullback = torch.func.vjp(f, self._theta)
            rows = []
            for v in vectors:
                _, jv = torch.func.jvp(f, (self._theta,), (v,))
                (row,) = pullback(between(out.detach(), jv))
                rows.append(row)
        return torch.stack(rows)


class GGNOperator(_JacobianProducts):
    """The Gauss–Newton matrix of the mean training loss (see the module docstring)."""

    product_name = "Gauss–Newton-vector product"
    curvature = "ggn"

    def _chunk_product(self, x: Inputs, y: torch.Tensor, vectors: torch.Tensor,
                       index: int) -> torch.Tensor:
        def output(theta: torch.Tensor) -> torch.Tensor:
            return self.functional(theta, x)

        return self._pullbacks(  # Jᵀ H J v
            output, vectors, lambda out, jv: output_hessian_product(self.loss, out, y, jv))


class FisherOperator(_JacobianProducts):
    """The empirical Fisher of the per-sample gradients (see the module docstring)."""

    product_name = "Fisher-vector product"
    curvature = "fisher"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._one_label_per_sample(self.data.y)

    def _chunk_product(self, x: Inputs, y: torch.Tensor, vectors: torch.Tensor,
                       index: int) -> torch.Tensor:
        self._one_label_per_sample(y)  # labels from a dataset are seen only here

        def losses(theta: torch.Tensor) -> torch.Tensor:
            return per_sample_loss(self.loss, self.functional(theta, x), y)

        # the JVP gives gₙᵀ v for every sample n, the pullback Σₙ gₙ (gₙᵀ v)
        return self._pullbacks(losses, vectors, lambda _, directional: directional)


class GradientCovarianceOperator(FisherOperator):
    """The covariance of the mini-batch gradient at ``batch_size`` (see the module
    docstring)."""

    product_name = "gradient-covariance-vector product"
    curvature = "gradient-covariance"

    def __init__(self, *args: Any, batch_size: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not 1 <= batch_size <= self.n_samples:
            raise UsageError(f"--batch-size {batch_size} for the gradient covariance must be "
                             f"between 1 and the {self.n_samples} samples")
        self.batch_size = int(batch_size)
        self._mean_gradient: torch.Tensor | None = None

    def _moved(self) -> None:
        self._mean_gradient = None

    def matmat(self, vectors: torch.Tensor) -> torch.Tensor:
        fisher = super().matmat(vectors)
        if self._mean_gradient is None:
            self._mean_gradient = self.loss_and_gradient()[1]
        g = self._mean_gradient
        n, b = self.n_units or self.n_samples, self.batch_size  # the labelled samples
        scale = (n - b) / (b * (n - 1)) if n > 1 else 0.0
        vectors = vectors.to(self.device, self.dtype)
        return scale * (fisher - (vectors @ g).unsqueeze(1) * g.unsqueeze(0))
