"""The single-vector thick-restart Lanczos of a cold solve (subspace_cli.lanczos)."""

from __future__ import annotations

import pytest
import torch
from test_eigensolver import DenseOperator, spectrum_operator

from subspace_cli.eigensolver import arpack_eigenpairs, default_block_size, top_eigenpairs
from subspace_cli.lanczos import default_lanczos_basis


def true_residuals(op: DenseOperator, result) -> torch.Tensor:  # type: ignore[no-untyped-def]
    x = result.eigenvectors.to(torch.float64)
    images = x @ op.matrix.to(torch.float64)
    return (images - result.eigenvalues[:, None] * x).norm(dim=1) / result.eigenvalues.abs()


def test_cold_cpu_solves_use_one_vector_and_warm_ones_blocks() -> None:
    assert default_block_size(torch.device("cpu"), cold=True) == 1
    assert default_block_size(torch.device("cpu"), cold=False) == 2
    assert default_block_size(torch.device("cuda"), cold=True) == 2
    op = spectrum_operator([10, 9, 8, 7, 6], n=120)
    cold = top_eigenpairs(op, 4, tol=1e-10, block_size=1)
    assert cold.solver == "lanczos"
    warm = top_eigenpairs(op, 4, tol=1e-10, block_size=1, init=cold.eigenvectors)
    assert warm.solver == "block-lanczos" and warm.hvp_count == 4
    assert top_eigenpairs(op, 4, tol=1e-10).solver == "block-lanczos"  # the library default


def test_one_sequence_sees_one_copy_of_a_repeated_eigenvalue() -> None:
    # The known price of a single Krylov sequence (ARPACK's too), pinned so that it stays
    # documented: 5 is an eigenvalue twice, one vector finds it once.
    op = spectrum_operator([5.0, 5.0, 4.0, 3.0], n=60)
    single = top_eigenpairs(op, 3, tol=1e-10, block_size=1)
    assert single.all_converged
    torch.testing.assert_close(single.eigenvalues[:2], torch.tensor([5.0, 4.0],
                                                                    dtype=torch.float64))


@pytest.mark.parametrize("basis_size", [6, 9, 40])
def test_restarted_solve_matches_the_dense_spectrum(basis_size: int) -> None:
    op = spectrum_operator([10, 9, 8.5, 8.4, 8.3, 6], n=300, seed=3)
    result = top_eigenpairs(op, 5, tol=1e-10, basis_size=basis_size, block_size=1)
    expected = torch.linalg.eigvalsh(op.matrix).flip(0)[:5]
    assert result.all_converged
    torch.testing.assert_close(result.eigenvalues, expected, rtol=1e-12, atol=0)
    if basis_size < 40:
        assert result.restarts > 0
    # The reported residuals bound the true ones (they include what restarts dropped).
    assert torch.all(true_residuals(op, result) <= result.residuals * (1 + 1e-6) + 1e-15)
    assert result.hvp_count == op.hvp_count
    assert result.basis_bytes == (min(300, max(basis_size, 6)) + 1) * 300 * 8


def test_needs_no_more_products_than_arpack() -> None:
    # A spectrum like the MLP sample's: a cluster at the top, a 0.8% gap below λ_k.
    op = spectrum_operator([31.4, 25.4, 18.9, 17.6, 16.8, 15.7, 15.5, 14.1, 12.3, 11.09, 11.0],
                           n=400, seed=1)
    ours = top_eigenpairs(op, 10, tol=1e-6, block_size=1)
    before = op.hvp_count
    reference = arpack_eigenpairs(op, 10, tol=1e-6)
    arpack_hvps = op.hvp_count - before - 10  # without its 10 residual products
    assert ours.all_converged
    torch.testing.assert_close(ours.eigenvalues, reference.eigenvalues, rtol=1e-9, atol=0)
    assert ours.hvp_count <= arpack_hvps, (ours.hvp_count, arpack_hvps)


def test_budget_below_convergence_reports_true_residual_bounds() -> None:
    op = spectrum_operator([10, 9.99, 9.98, 9.97], n=200)
    result = top_eigenpairs(op, 3, tol=1e-12, max_hvps=15, block_size=1)
    assert result.hvp_count == op.hvp_count == 15
    assert not result.all_converged and result.stopped_on == "budget"
    for residual, converged in zip(result.residuals.tolist(), result.converged, strict=True):
        assert converged == (residual <= 1e-12)
    torch.testing.assert_close(result.residuals, true_residuals(op, result), rtol=1e-6, atol=0)


def test_float32_products_are_bounded_by_the_reported_residuals() -> None:
    op = DenseOperator(spectrum_operator([10, 9, 8, 7, 6, 5.9], n=500, seed=2).matrix.float())
    op64 = DenseOperator(op.matrix.double())  # the same matrix, products without rounding
    result = top_eigenpairs(op, 5, tol=1e-5, basis_size=10, block_size=1)
    assert result.all_converged and result.restarts > 0
    assert result.eigenvectors.dtype == torch.float32
    expected = torch.linalg.eigvalsh(op64.matrix).flip(0)[:5]
    torch.testing.assert_close(result.eigenvalues, expected, rtol=1e-7, atol=0)
    # float32 products: the rounding of the returned float32 vectors adds ~1e-7 on top
    assert torch.all(true_residuals(op64, result) <= result.residuals + 1e-6)


def test_progress_is_reported_after_every_product() -> None:
    calls: list[int] = []
    op = spectrum_operator([10, 9, 8, 7, 6])
    result = top_eigenpairs(op, 3, tol=1e-10, block_size=1,
                            progress=lambda hvps, _: calls.append(hvps))
    assert calls == list(range(1, result.hvp_count + 1))


def test_default_basis_is_arpacks_ncv() -> None:
    assert default_lanczos_basis(11) == 23
    assert default_lanczos_basis(3) == 20


def test_whole_space_is_exact_with_one_vector() -> None:
    op = spectrum_operator([3, 2, 1], n=6)
    result = top_eigenpairs(op, 6, tol=1e-10, block_size=1)
    assert result.solver == "lanczos" and result.all_converged and result.hvp_count == 6
    torch.testing.assert_close(result.eigenvalues, torch.linalg.eigvalsh(op.matrix).flip(0))
