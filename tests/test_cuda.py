"""The CUDA path against the CPU one (run by benchmarks/gpu_check.sh; skipped without CUDA)."""

from __future__ import annotations

import pytest
import torch
from test_eigensolver import dense_eigh
from tiny_models import CASES

from subspace_cli.eigensolver import subspace_overlap, top_eigenpairs
from subspace_cli.hessian import HessianOperator
from subspace_cli.settings import HVP_METHODS

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def operator(case_id: str, device: str, **options: object) -> HessianOperator:
    model_factory, data_factory, loss = CASES[case_id]
    return HessianOperator(model_factory(), data_factory(), loss, dtype=torch.float64,
                           device=device, chunk_size=10, **options)  # type: ignore[arg-type]


@pytest.mark.parametrize("method", HVP_METHODS[1:])
@pytest.mark.parametrize("case_id", ["mlp-tanh/ce", "cnn-2d/mse", "transformer/ce"])
def test_products_on_cuda_equal_the_cpu_ones(case_id: str, method: str) -> None:
    cpu = operator(case_id, "cpu", method=method)
    gpu = operator(case_id, "cuda", method=method)
    vectors = torch.randn(3, cpu.n_params, dtype=torch.float64,
                          generator=torch.Generator().manual_seed(0))
    expected = cpu.matmat(vectors)
    for _ in range(2):  # the second product runs on kept graphs (reverse methods)
        got = gpu.matmat(vectors.cuda()).cpu()
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)
    if method.startswith("reverse"):
        assert gpu.graphs_kept == cpu.graphs_kept > 0


@pytest.mark.parametrize("block_size, solver", [(1, "lanczos"), (2, "block-lanczos")])
def test_solvers_on_cuda_match_the_dense_hessian(block_size: int, solver: str) -> None:
    values, vectors = dense_eigh("mlp-tanh/mse")
    op = operator("mlp-tanh/mse", "cuda", method="auto")
    result = top_eigenpairs(op, 3, tol=1e-10, block_size=block_size)
    assert result.solver == solver and result.all_converged
    assert result.eigenvectors.device.type == "cuda"
    torch.testing.assert_close(result.eigenvalues.cpu(), values[:3], rtol=1e-8, atol=0)
    assert subspace_overlap(result.eigenvectors.cpu(), vectors[:3]) >= 0.9999
    assert op.method_choice in ("timed", "cached")  # no shortcut off the CPU
