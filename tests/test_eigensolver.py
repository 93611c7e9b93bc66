"""top_eigenpairs and arpack_eigenpairs against dense float64 eigendecompositions."""

from __future__ import annotations

import functools

import pytest
import torch
from tiny_models import CASES, case_hessian

from subspace_cli.eigensolver import (
    EigenResult,
    arpack_eigenpairs,
    default_tol,
    subspace_overlap,
    top_eigenpairs,
)
from subspace_cli.errors import UsageError
from subspace_cli.hessian import HessianOperator

K, EXTRA = 3, 1


class DenseOperator:
    """A symmetric matrix behind the solver's operator interface (fast algorithmic tests)."""

    def __init__(self, matrix: torch.Tensor) -> None:
        self.matrix = matrix
        self.n_params = matrix.shape[0]
        self.device = matrix.device
        self.dtype = matrix.dtype
        self.hvp_count = 0

    def matmat(self, vectors: torch.Tensor) -> torch.Tensor:
        self.hvp_count += vectors.shape[0]
        return vectors.to(self.dtype) @ self.matrix


def spectrum_operator(values: list[float], n: int = 60, seed: int = 0) -> DenseOperator:
    """Symmetric matrix with the given top eigenvalues and a bulk in [-1, 1]."""
    generator = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
    bulk = torch.rand(n - len(values), generator=generator, dtype=torch.float64) * 2 - 1
    spectrum = torch.cat([torch.tensor(values, dtype=torch.float64), bulk])
    return DenseOperator((q * spectrum) @ q.T)


@functools.cache
def dense_eigh(case_id: str) -> tuple[torch.Tensor, torch.Tensor]:
    values, vectors = torch.linalg.eigh(case_hessian(case_id))
    return values.flip(0), vectors.flip(1).T


def make_operator(case_id: str, **options: object) -> HessianOperator:
    model_factory, data_factory, loss = CASES[case_id]
    return HessianOperator(
        model_factory(),
        data_factory(),
        loss,
        dtype=torch.float64,
        method="reverse",
        **options,  # type: ignore[arg-type]
    )


def relative_errors(result: EigenResult, values: torch.Tensor) -> torch.Tensor:
    wanted = len(result.eigenvalues)
    return (result.eigenvalues - values[:wanted]).abs() / values[:wanted].abs()


def check_against_dense(result: EigenResult, values: torch.Tensor, vectors: torch.Tensor) -> None:
    assert result.all_converged, result.residuals
    assert torch.all(relative_errors(result, values) <= 1e-6), (result.eigenvalues, values[:5])
    assert subspace_overlap(result.eigenvectors[:K], vectors[:K]) >= 0.9999


@pytest.fixture(params=sorted(CASES))
def case_id(request: pytest.FixtureRequest) -> str:
    values, _ = dense_eigh(request.param)
    # The top-K subspace is only defined with a gap below λ_K.
    assert values[K - 1] - values[K] > 1e-3 * values[0], values[: K + 2]
    return request.param


@pytest.mark.parametrize("block_size, solver", [(1, "lanczos"), (None, "block-lanczos")])
def test_top_eigenpairs_match_dense_hessian(case_id: str, block_size: int | None,
                                            solver: str) -> None:
    values, vectors = dense_eigh(case_id)
    op = make_operator(case_id, chunk_size=10)
    result = top_eigenpairs(op, K, extra=EXTRA, tol=1e-10, block_size=block_size)
    check_against_dense(result, values, vectors)
    assert result.solver == solver
    assert result.hvp_count == op.hvp_count
    assert result.eigenvalues.shape == (K + EXTRA,)
    assert result.eigenvectors.shape == (K + EXTRA, op.n_params)


@pytest.mark.parametrize("case_id", ["mlp-tanh/ce", "transformer/mse"])
def test_arpack_agrees_with_top_eigenpairs(case_id: str) -> None:
    values, vectors = dense_eigh(case_id)
    op = make_operator(case_id)
    ours = top_eigenpairs(op, K, extra=EXTRA, tol=1e-10)
    before = op.hvp_count
    reference = arpack_eigenpairs(op, K, extra=EXTRA, tol=1e-10)
    assert reference.solver == "arpack"
    assert reference.hvp_count == op.hvp_count - before
    check_against_dense(reference, values, vectors)
    torch.testing.assert_close(ours.eigenvalues, reference.eigenvalues, rtol=1e-9, atol=0)
    assert subspace_overlap(ours.eigenvectors, reference.eigenvectors) >= 0.9999


@pytest.mark.parametrize("block_size", [1, 2])
def test_residuals_are_recomputable_from_real_hvps(block_size: int) -> None:
    op = make_operator("cnn-1d/ce")
    result = top_eigenpairs(op, K, extra=EXTRA, tol=1e-9, block_size=block_size)
    images = op.matmat(result.eigenvectors)
    recomputed = (images - result.eigenvalues[:, None] * result.eigenvectors).norm(dim=1)
    recomputed = recomputed / result.eigenvalues.abs()
    torch.testing.assert_close(result.residuals, recomputed, rtol=1e-3, atol=1e-13)
    assert torch.all(recomputed <= 1e-9 * 1.001)


def test_eigenvectors_are_orthonormal() -> None:
    result = top_eigenpairs(spectrum_operator([10, 9, 8, 7, 6]), 4, extra=1, tol=1e-10)
    gram = result.eigenvectors @ result.eigenvectors.T
    torch.testing.assert_close(gram, torch.eye(5, dtype=torch.float64), atol=1e-12, rtol=0)


def test_algebraic_order_on_an_indefinite_operator() -> None:
    # The largest-magnitude eigenvalues are negative; "top" means algebraically largest.
    op = spectrum_operator([3.0, 2.5, -50.0, -40.0])
    result = top_eigenpairs(op, 2, tol=1e-10)
    torch.testing.assert_close(result.eigenvalues, torch.tensor([3.0, 2.5], dtype=torch.float64))
    assert result.all_converged


def test_degenerate_top_eigenvalue_is_found_twice_by_blocks() -> None:
    # One Krylov sequence (block size 1, as ARPACK) sees one copy of an exactly repeated
    # eigenvalue; a block of 2 (the default) sees both.
    op = spectrum_operator([5.0, 5.0, 4.0, 3.0])
    result = top_eigenpairs(op, 3, tol=1e-10)
    expected = torch.tensor([5.0, 5.0, 4.0], dtype=torch.float64)
    torch.testing.assert_close(result.eigenvalues, expected)


def test_extra_pairs_converge_and_show_the_gap() -> None:
    op = spectrum_operator([10, 9, 8, 7, 6, 5.5, 5])
    result = top_eigenpairs(op, 3, extra=3, tol=1e-10)
    assert result.k == 3 and result.extra == 3 and len(result.converged) == 6
    assert result.all_converged
    expected = torch.tensor([10, 9, 8, 7, 6, 5.5], dtype=torch.float64)
    torch.testing.assert_close(result.eigenvalues, expected)


def test_budget_below_convergence_reports_unconverged_pairs() -> None:
    op = make_operator("transformer/ce")
    result = top_eigenpairs(op, K, extra=EXTRA, tol=1e-12, max_hvps=8, block_size=2)
    assert result.hvp_count == op.hvp_count <= 8
    assert not result.all_converged
    for residual, converged in zip(result.residuals.tolist(), result.converged, strict=True):
        assert converged == (residual <= 1e-12)
    # The reported residuals are the true ones: nothing unconverged is claimed converged.
    images = op.matmat(result.eigenvectors)
    true = (images - result.eigenvalues[:, None] * result.eigenvectors).norm(dim=1)
    torch.testing.assert_close(result.residuals, true / result.eigenvalues.abs(), rtol=1e-6, atol=0)


def test_budget_that_is_not_a_multiple_of_the_block_is_respected() -> None:
    op = spectrum_operator([10, 9.99, 9.98, 9.97])
    result = top_eigenpairs(op, 2, tol=1e-14, max_hvps=11, block_size=4)
    assert result.hvp_count == op.hvp_count == 11


def test_warm_start_from_the_answer_converges_in_one_block() -> None:
    case_id = "plugin-mlp/ce" if "plugin-mlp/ce" in CASES else "mlp-tanh/ce"
    op = make_operator(case_id)
    cold = top_eigenpairs(op, K, extra=EXTRA, tol=1e-9)
    assert cold.all_converged and cold.hvp_count > K + EXTRA
    warm = top_eigenpairs(op, K, extra=EXTRA, tol=1e-9, init=cold.eigenvectors)
    assert warm.all_converged
    assert warm.hvp_count == K + EXTRA  # one block: the init vectors themselves
    assert warm.iterations == 1
    torch.testing.assert_close(warm.eigenvalues, cold.eigenvalues, rtol=1e-12, atol=0)


def test_warm_start_from_nearby_vectors_converges_to_the_answer() -> None:
    op = spectrum_operator([10, 9, 8, 7, 6], n=200)
    cold = top_eigenpairs(op, 4, tol=1e-8)
    generator = torch.Generator().manual_seed(1)
    noise = 1e-3 * torch.randn(cold.eigenvectors.shape, dtype=torch.float64, generator=generator)
    warm = top_eigenpairs(op, 4, tol=1e-8, init=cold.eigenvectors + noise)
    assert warm.all_converged
    torch.testing.assert_close(warm.eigenvalues, cold.eigenvalues, rtol=1e-12, atol=0)
    assert subspace_overlap(warm.eigenvectors, cold.eigenvectors) > 1 - 1e-12


def test_same_seed_gives_identical_results() -> None:
    op = make_operator("cnn-2d/mse")
    first = top_eigenpairs(op, K, tol=1e-9, seed=7)
    second = top_eigenpairs(op, K, tol=1e-9, seed=7)
    assert torch.equal(first.eigenvalues, second.eigenvalues)
    assert torch.equal(first.eigenvectors, second.eigenvectors)
    assert torch.equal(first.residuals, second.residuals)
    assert first.hvp_count == second.hvp_count
    other = top_eigenpairs(op, K, tol=1e-9, seed=8)
    torch.testing.assert_close(other.eigenvalues, first.eigenvalues, rtol=1e-8, atol=0)


def test_progress_is_reported_after_every_block() -> None:
    calls: list[tuple[int, torch.Tensor | None]] = []
    op = spectrum_operator([10, 9, 8, 7, 6])
    result = top_eigenpairs(
        op,
        3,
        extra=1,
        tol=1e-10,
        block_size=2,
        progress=lambda hvps, residuals: calls.append((hvps, residuals)),
    )
    assert len(calls) == result.iterations
    assert [hvps for hvps, _ in calls] == list(range(2, result.hvp_count + 1, 2))
    assert calls[0][1] is None  # fewer Ritz pairs than wanted after the first block
    last = calls[-1][1]
    assert last is not None and torch.equal(last, result.residuals)


def test_float32_default_tolerance_is_reached() -> None:
    model_factory, data_factory, loss = CASES["mlp-tanh/mse"]
    op = HessianOperator(model_factory(), data_factory(), loss, dtype=torch.float32)
    result = top_eigenpairs(op, K)
    assert result.tol == default_tol(torch.float32)
    assert result.all_converged
    assert result.eigenvectors.dtype == torch.float32
    values, _ = dense_eigh("mlp-tanh/mse")
    assert torch.all(relative_errors(result, values) <= 1e-5)


def test_whole_space_is_exact() -> None:
    op = spectrum_operator([3, 2, 1], n=6)
    result = top_eigenpairs(op, 6, tol=1e-10)
    assert result.all_converged and result.hvp_count <= 8
    torch.testing.assert_close(result.eigenvalues, torch.linalg.eigvalsh(op.matrix).flip(0))


@pytest.mark.parametrize(
    "options, message",
    [
        ({"k": 0}, "k must be"),
        ({"k": 61}, "exceeds the number of parameters"),
        ({"k": 3, "extra": -1}, "extra"),
        ({"k": 5, "max_hvps": 4}, "max_hvps"),
        ({"k": 2, "block_size": 0}, "block size"),
        ({"k": 2, "tol": 0.0}, "tol must be positive"),
        ({"k": 2, "max_hvps": 0}, "max_hvps"),
        ({"k": 2, "init": torch.zeros(2, 5)}, "init must have shape"),
    ],
)
def test_bad_requests_are_usage_errors(options: dict[str, object], message: str) -> None:
    op = spectrum_operator([3, 2])
    k = options.pop("k")
    with pytest.raises(UsageError, match=message):
        top_eigenpairs(op, k, **options)  # type: ignore[arg-type]


def test_arpack_budget_exhaustion_is_an_error() -> None:
    from subspace_cli.errors import NumericalError

    op = spectrum_operator([10, 9.99, 9.98, 9.97], n=200)
    with pytest.raises(NumericalError, match="did not converge"):
        arpack_eigenpairs(op, 3, tol=1e-14, max_hvps=10)


def test_subspace_overlap() -> None:
    basis = torch.linalg.qr(torch.randn(10, 3, dtype=torch.float64))[0].T
    assert subspace_overlap(basis, basis) == pytest.approx(1.0)
    rotation = torch.linalg.qr(torch.randn(3, 3, dtype=torch.float64))[0]
    assert subspace_overlap(basis, rotation @ basis) == pytest.approx(1.0)
    identity = torch.eye(4, dtype=torch.float64)
    assert subspace_overlap(identity[:2], identity[2:]) == pytest.approx(0.0)
    assert subspace_overlap(identity[:2], identity[1:3]) == pytest.approx(0.5)
