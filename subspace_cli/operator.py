"""The chunked operator: what every curvature operator over the training set shares.

:class:`ChunkedOperator` holds the functional model (private copies, never the model's own
tensors), walks the training set in chunks so that memory is bounded by one chunk's
activations, accumulates per-sample *sums*, and turns them into means at the one reduction point
(:func:`subspace_cli.parallel.reduce`; in a data-parallel run each rank walks its shard). It also gives the full-data loss, gradient and accuracy
and a SciPy adapter. A subclass supplies only :meth:`ChunkedOperator._chunk_product`: the sum
over one chunk's samples of its matrix applied to a block of vectors (the Hessian in
:mod:`subspace_cli.hessian`; a GGN or Fisher would be another subclass).
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch

from subspace_cli import parallel
from subspace_cli.data import (
    Inputs,
    TrainingData,
    iter_chunks,
    require_units,
    sample_count,
    unit_count,
)
from subspace_cli.errors import NumericalError, UsageError
from subspace_cli.functional import FunctionalModel, ParameterLayout, select_parameters
from subspace_cli.losses import check_loss, correct_count, loss_sum

if TYPE_CHECKING:
    from scipy.sparse.linalg import LinearOperator


class ChunkedOperator(ABC):
    """A symmetric matrix over the selected parameters that is a mean over the training set.

    Args:
        model: The network; it is never modified (parameters, buffers and mode are restored).
        data: The training set.
        loss: ``"mse"`` or ``"ce"`` (see :mod:`subspace_cli.losses`).
        layout: Selected parameters (default: all, see
            :func:`~subspace_cli.functional.select_parameters`).
        chunk_size: Samples per forward/backward pass.
        max_samples: Use only the first ``max_samples`` samples.
        device: Where parameters, data chunks and products live.
        dtype: Floating dtype of parameters, floating inputs and products.
        train_mode: Evaluate the model in train mode. Buffers are never updated either way.
            BatchNorm then normalises with the statistics of each chunk, so the matrix depends
            on ``chunk_size``; dropout would make every product random.
        parameters: The flat θ (over ``layout``) at which to take the matrix; default the
            model's current values.

    Attributes:
        hvp_count: Single-vector products applied so far (a product with m vectors counts m).
    """

    #: What one product is called in messages.
    product_name = "matrix-vector product"

    def __init__(
        self,
        model: torch.nn.Module,
        data: TrainingData,
        loss: str,
        *,
        layout: ParameterLayout | None = None,
        chunk_size: int = 1000,
        max_samples: int | None = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        train_mode: bool = False,
        parameters: torch.Tensor | None = None,
    ) -> None:
        self.loss = check_loss(loss)
        if chunk_size < 1:
            raise UsageError(f"chunk size must be positive, got {chunk_size}")
        if max_samples is not None and max_samples < 1:
            raise UsageError(f"max_samples must be positive, got {max_samples}")
        if not dtype.is_floating_point:
            raise UsageError(f"dtype must be a floating-point type, got {dtype}")
        self.model = model
        self.data = data
        self.layout = layout if layout is not None else select_parameters(model)
        self.chunk_size = int(chunk_size)
        self.max_samples = max_samples
        self.device = torch.device(device)
        self.dtype = dtype
        self.train_mode = bool(train_mode)
        self.n_samples = sample_count(data, max_samples)
        if self.n_samples == 0:
            raise UsageError("the training set is empty")
        self.hvp_count = 0
        self.n_units: int | None = None  # labelled units (samples or tokens), after one pass
        self.functional = FunctionalModel(model, self.layout, device=self.device, dtype=dtype,
                                          train_mode=self.train_mode)
        self._theta = (self.functional.current_parameters() if parameters is None
                       else self.functional.own(parameters))

    # ------------------------------------------------------------------ public API

    @property
    def n_params(self) -> int:
        """Dimension of the operator (number of selected scalar parameters)."""
        return self.layout.n_params

    @property
    def parameters(self) -> torch.Tensor:
        """The flat vector θ at which the matrix is taken (a copy)."""
        return self._theta.clone()

    def at(self, parameters: torch.Tensor) -> ChunkedOperator:
        """The same operator (model, data, loss, mode and the subclass's settings) at another
        θ, with the model's current buffers; its counters start at zero."""
        other = copy.copy(self)
        other._theta = self.functional.own(parameters)
        other.functional = self.functional.refreshed()
        other.hvp_count = 0
        other._moved()
        return other

    def matmat(self, vectors: torch.Tensor) -> torch.Tensor:
        """The matrix applied to each row of ``vectors`` ``(m, n_params)``; rows in ``dtype``
        on ``device``."""
        if vectors.dim() != 2 or vectors.shape[1] != self.n_params:
            raise ValueError(
                f"expected a (m, {self.n_params}) block of vectors, got {tuple(vectors.shape)}"
            )
        vectors = vectors.to(self.device, self.dtype)
        m = vectors.shape[0]
        if m == 0:
            return torch.zeros_like(vectors)
        parallel.check_shards(self.n_samples)  # every rank runs the first product's choice
        sums = torch.zeros_like(vectors)
        units = 0
        with self.functional.mode():
            for index, (x, y) in enumerate(self._chunks()):
                sums += self._chunk_product(x, y, vectors, index)
                if self.n_units is None:
                    units += unit_count(y)
        result = self._mean(sums, units)
        if not bool(torch.isfinite(result).all()):
            raise NumericalError(
                f"a {self.product_name} is not finite (does the loss or the model overflow?"
                " try dtype float64)"
            )
        self.hvp_count += m
        return result

    def matvec(self, vector: torch.Tensor) -> torch.Tensor:
        """The matrix applied to one vector of shape ``(n_params,)``."""
        if vector.shape != (self.n_params,):
            raise ValueError(
                f"expected a vector of length {self.n_params}, got {tuple(vector.shape)}"
            )
        return self.matmat(vector.unsqueeze(0))[0]

    def loss_and_gradient(self) -> tuple[float, torch.Tensor, float]:
        """Mean loss, flat full-batch gradient ∇L(θ) and accuracy, in the operator's mode."""
        n = self.n_params
        # One vector [loss, correct, gradient...] so that a data-parallel reduction is one call.
        sums = torch.zeros(n + 2, device=self.device, dtype=self.dtype)
        theta = self._theta.detach().requires_grad_(True)
        units = 0
        with self.functional.mode(), torch.enable_grad():
            for x, y in self._chunks():
                output = self.functional(theta, x)
                chunk_loss = loss_sum(self.loss, output, y)
                (grad,) = torch.autograd.grad(chunk_loss, theta, allow_unused=True)
                sums[0] += chunk_loss.detach()
                sums[1] += correct_count(output.detach(), y)
                if self.n_units is None:
                    units += unit_count(y)
                if grad is not None:
                    sums[2:] += grad
        mean = self._mean(sums, units)
        if not bool(torch.isfinite(mean).all()):
            raise NumericalError("the loss or its gradient is not finite")
        return float(mean[0]), mean[2:].clone(), float(mean[1])

    def to_scipy(self) -> LinearOperator:
        """A SciPy ``LinearOperator`` (float64 NumPy in and out) over the same products."""
        import numpy as np
        from scipy.sparse.linalg import LinearOperator

        def matmat(block: np.ndarray) -> np.ndarray:
            columns = torch.as_tensor(np.ascontiguousarray(block.T), dtype=self.dtype)
            products = self.matmat(columns.to(self.device))
            return products.to("cpu", torch.float64).numpy().T

        def matvec(vector: np.ndarray) -> np.ndarray:
            return matmat(np.asarray(vector).reshape(-1, 1)).reshape(-1)

        n = self.n_params
        return LinearOperator(
            (n, n), matvec=matvec, rmatvec=matvec, matmat=matmat, dtype=np.float64
        )

    # ------------------------------------------------------------------ for subclasses

    def _chunks(self) -> Iterator[tuple[Inputs, torch.Tensor]]:
        """This rank's chunks (all of them in a single process)."""
        return iter_chunks(self.data, self.chunk_size, self.max_samples, self.device, self.dtype,
                           sharded=True)

    def _mean(self, sums: torch.Tensor, units: int) -> torch.Tensor:
        """A pass's sums over all ranks divided by the labelled units (samples, or tokens).
        The units are the same in every pass: counted on the first (``units``, this rank's),
        then known."""
        sums, units = parallel.reduce(sums, units)
        if self.n_units is None:
            self.n_units = require_units(units)
        return sums / self.n_units

    def _chunk_loss(self, theta: torch.Tensor, x: Inputs, y: torch.Tensor) -> torch.Tensor:
        """The *sum* of the per-unit losses of a chunk at ``theta``."""
        return loss_sum(self.loss, self.functional(theta, x), y)

    @abstractmethod
    def _chunk_product(self, x: Inputs, y: torch.Tensor, vectors: torch.Tensor,
                       index: int) -> torch.Tensor:
        """Sum over the chunk's labelled units of the per-sample matrix applied to each row."""

    @abstractmethod
    def _moved(self) -> None:
        """Called on the copy made by :meth:`at`: drop whatever depended on the old θ."""

    def _synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
