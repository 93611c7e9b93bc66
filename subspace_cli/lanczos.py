"""Single-vector thick-restart Lanczos for a cold top-k solve, holding the basis only.

This is the solver of a cold ``spectrum`` on a CPU, where products are not batched and one
Krylov sequence needs the fewest of them (``benchmarks/solver_choice.py``: 45 HVPs for the top
10 of the MLP sample at tol 1e-4, against 48 for ARPACK's implicit restarts and 58–60 for
blocks of 2). It is Wu and Simon's TRLan with full re-orthogonalisation:

* The basis V (rows, float64) and the next Lanczos vector q live in one preallocated
  ``(m + 1, n)`` buffer; no images H·V are stored, so the memory is (m + 1)·n doubles, as
  ARPACK's ``ncv`` vectors (``basis_bytes`` of the result).
* Every step applies H to q once. The product w = Hq is orthogonalised against V and q by
  classical Gram-Schmidt, with a second pass when the first removed all but 1% of its norm
  (Daniel, Gragg, Kaufman and Stewart's test, with a smaller threshold, see
  ``_REORTHOGONALISE_BELOW``). Its coefficients h and the norm β of
  what is left give the exact relation H·q = [V; q]ᵀ h + β q_next, so the columns of the
  matrix A (coefficients of every product, ``(d + 1) × d``) satisfy H Vᵀ = [V; q]ᵀ A up to the
  terms dropped at restarts, which are bounded (below).
* Rayleigh-Ritz uses S = sym(A[:d]) (symmetrised: float32 products are symmetric only to
  their rounding). For a Ritz pair (θ, y) the residual is, exactly,
  H x − θ x = Vᵀ (A[:d] − S) y + q (A[d]·y), so ‖r‖² = ‖(A[:d] − S) y‖² + (A[d]·y)²: the
  Lanczos estimate |β·y_last| plus the products' asymmetry, from real HVPs, without forming
  x. A restart keeps the top c Ritz vectors X = Y_cᵀ V and q; the part of (A[:d] − S) Y_c
  that leaves span(X) is dropped and its norm added to every later residual (``lost``), so
  the reported residuals are upper bounds. For float32 HVPs it is about 1e-7·‖H‖.
* The Ritz vectors are formed once, at the end.

A start vector is random (seeded); a warm start from several vectors needs the block solver
(:func:`subspace_cli.eigensolver.top_eigenpairs`), which keeps the images.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import torch

from subspace_cli.errors import NumericalError

if TYPE_CHECKING:
    from subspace_cli.eigensolver import EigenResult, HessianLike, ProgressCallback

__all__ = ["default_lanczos_basis", "lanczos_eigenpairs"]

#: Columns per slice when a restart rewrites the basis in place (bounds the temporary).
_SLICE = 1 << 18

#: A second Gram-Schmidt pass when the first left less than this fraction of the norm. After
#: one classical pass against an orthonormal basis the new vector is orthogonal to it up to
#: about eps·‖w_before‖ / ‖w_after‖, so with 1e-2 that is at most ~1e-14: far below the √eps
#: that Lanczos needs. DGKS's 1/√2 would take the second pass at almost every step (on the MLP
#: sample ‖w_after‖/‖w_before‖ was 0.32–1.0, median 0.42: 44 of 45 steps), doubling the basis
#: traffic that dominates the solver's own time at 10M parameters.
_REORTHOGONALISE_BELOW = 1e-2


def default_lanczos_basis(wanted: int) -> int:
    """Basis rows before a restart: ARPACK's default ``ncv`` = max(2·wanted + 1, 20).

    On the MLP sample every size from 21 to 60 needed the same 45 HVPs for the top 10; a larger
    basis only restarts less often and costs memory and orthogonalisation time.
    """
    return max(2 * wanted + 1, 20)


def basis_rows_for_memory(n: int, budget_bytes: int) -> int:
    """How many float64 rows of length n (plus the next vector) fit in ``budget_bytes``."""
    return max(int(budget_bytes) // (8 * n) - 1, 0)


def lanczos_eigenpairs(
    op: HessianLike,
    k: int,
    *,
    extra: int,
    tol: float,
    max_hvps: int,
    seed: int,
    basis_size: int | None = None,
    basis_memory: int | None = None,
    progress: ProgressCallback | None = None,
) -> EigenResult:
    """The k + extra algebraically largest eigenpairs from a random start (see the module).

    The caller (:func:`subspace_cli.eigensolver.top_eigenpairs`) has validated k, extra, tol
    and max_hvps. ``basis_size`` below k + extra + 1 is raised to it; ``basis_memory`` (bytes)
    shrinks it to fit.
    """
    from subspace_cli.eigensolver import (
        _check_basis_memory,
        _orthonormal_extension,
        _relative,
        make_result,
    )

    started = time.perf_counter()
    n, device, op_dtype = op.n_params, op.device, op.dtype
    wanted = k + extra
    m = default_lanczos_basis(wanted) if basis_size is None else int(basis_size)
    if basis_memory is not None:
        rows = basis_rows_for_memory(n, basis_memory)
        _check_basis_memory(rows, wanted + 1, 8 * n, basis_memory)
        m = min(m, rows)
    m = min(n, max(m, wanted + 1))
    keep = max(wanted, min(m - 1, m - (m - wanted) // 2))  # Ritz vectors kept by a restart

    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    rows = torch.empty((m + 1, n), device=device, dtype=torch.float64)
    start = torch.randn(n, generator=generator, device=device, dtype=torch.float64)
    rows[0] = start / start.norm()
    a = torch.zeros((m + 1, m), device=device, dtype=torch.float64)
    d = 0  # basis rows; rows[d] is the next vector q
    hvps = restarts = 0
    lost = 0.0  # bound on the residual norm dropped at restarts
    values = torch.zeros(0, dtype=torch.float64, device=device)
    ritz = torch.zeros((0, 0), dtype=torch.float64, device=device)
    relative = torch.zeros(0, dtype=torch.float64, device=device)

    # Reused buffers: a fresh n-vector per step costs page faults that, at 10M parameters,
    # took as long as the orthogonalisation itself.
    q_op = torch.empty((1, n), device=device, dtype=op_dtype)
    w = torch.empty(n, device=device, dtype=torch.float64)
    while hvps < max_hvps:
        q_op.copy_(rows[d])
        w.copy_(op.matmat(q_op)[0])
        hvps += 1
        basis = rows[: d + 1]
        h = torch.mv(basis, w)
        before = float(w.norm())
        w.addmv_(basis.T, h, alpha=-1)
        beta = float(w.norm())
        if beta < _REORTHOGONALISE_BELOW * before:
            correction = torch.mv(basis, w)
            w.addmv_(basis.T, correction, alpha=-1)
            h += correction
            beta = float(w.norm())
        a[: d + 1, d] = h
        d += 1
        breakdown = beta <= 1e3 * torch.finfo(torch.float64).eps * max(before, 1e-300)
        if not breakdown:
            torch.div(w, beta, out=rows[d])
            a[d, d - 1] = beta

        square = a[:d, :d]
        symmetric = 0.5 * (square + square.T)
        values, ritz = torch.linalg.eigh(symmetric)
        values, ritz = values.flip(0), ritz.flip(1)
        if not bool(torch.isfinite(values).all()):
            raise NumericalError("the projected Hessian has non-finite entries")
        count = min(d, wanted)
        norms = torch.sqrt(
            ((square - symmetric) @ ritz[:, :count]).pow(2).sum(dim=0)
            + (a[d, :d] @ ritz[:, :count]).pow(2)
        ) + lost
        relative = _relative(norms, values[:count], op_dtype)
        if progress is not None:
            progress(hvps, relative[:wanted].clone() if d >= wanted else None)
        if d >= wanted and bool((relative[:wanted] <= tol).all()):
            break
        if breakdown:
            # An invariant subspace: continue with a random vector orthogonal to the basis
            # (its coupling to the basis is exactly 0).
            fresh = _orthonormal_extension(rows[:d], rows[:0], 1, generator)
            if not fresh.shape[0]:
                break  # the whole space is spanned: the Ritz pairs are exact
            rows[d] = fresh[0]
            a[d, :d] = 0
        if d == m and hvps < max_hvps:
            lost += _restart(rows, a, ritz, d, keep)
            d = keep
            restarts += 1

    count = min(d, wanted)
    basis_bytes = rows.numel() * rows.element_size()
    # The Ritz vectors, slice by slice into the operator's dtype: no float64 copy of them
    # beside the basis (at 10M parameters that copy alone was 0.8 GB).
    vectors = torch.empty((count, n), device=device, dtype=op_dtype)
    coefficients = ritz[:, :count].T.contiguous()
    for start in range(0, n, _SLICE):
        columns = slice(start, start + _SLICE)
        vectors[:, columns] = coefficients @ rows[:d, columns]
    del rows
    return make_result(
        values[:count], vectors, relative[:count], tol, k, extra,
        hvp_count=hvps,
        solver="lanczos",
        iterations=hvps,
        restarts=restarts,
        seconds=time.perf_counter() - started,
        stopped_on="residual" if count == wanted and bool((relative <= tol).all()) else "budget",
        basis_bytes=basis_bytes,
    )


def _restart(rows: torch.Tensor, a: torch.Tensor, ritz: torch.Tensor, d: int, keep: int) -> float:
    """Keep the top ``keep`` Ritz vectors and the next vector; return the dropped residual norm.

    Rows are rewritten in place slice by slice, so the temporary is keep × ``_SLICE`` doubles.
    """
    kept = ritz[:, :keep]
    for start in range(0, rows.shape[1], _SLICE):
        columns = slice(start, start + _SLICE)
        rows[:keep, columns] = kept.T @ rows[:d, columns]
    rows[keep] = rows[d]
    square = a[:d, :d]
    asymmetry = (square - 0.5 * (square + square.T)) @ kept
    inside = kept.T @ (square @ kept)
    coupling = a[d, :d] @ kept
    # What (A − S)·Y_c puts on the discarded Ritz vectors leaves the relation: bound it.
    dropped = asymmetry - ritz[:, :keep] @ (kept.T @ asymmetry)
    a.zero_()
    a[:keep, :keep] = inside
    a[keep, :keep] = coupling
    return float(dropped.norm())
