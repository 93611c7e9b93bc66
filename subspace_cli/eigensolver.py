"""Top eigenpairs of a symmetric operator from batched Hessian-vector products.

The solver is a thick-restart block Lanczos method with full re-orthogonalisation (Wu and
Simon's TRLan generalised to blocks; for a symmetric operator this is block Krylov-Schur). It
keeps an orthonormal basis V (rows) together with its images W = H V, which are real
Hessian-vector products. Every block step

1. applies H to a new block of b orthonormal vectors (one ``op.matmat`` call, b HVPs),
2. forms the projected matrix T = V Wᵀ and its eigenpairs (θ_i, y_i) (Rayleigh-Ritz),
3. computes each Ritz pair's residual r_i = W y_i − θ_i V y_i, exactly ‖H x_i − θ_i x_i‖ for
   x_i = V y_i because W y_i = H (V y_i) is a combination of stored real HVPs,
4. extends the basis with the residuals of the top b unconverged Ritz pairs, orthogonalised
   twice against V. In exact arithmetic these span the next block of the block Krylov space,
   so the basis is a Krylov space (for a random start) and this is block Lanczos; for a warm
   start from arbitrary vectors it is the Krylov space over that subspace.

When the basis is full it is restarted with the top Ritz vectors and their images (thick
restart): no HVP is repeated. The pairs are accepted when every relative residual
‖H x_i − θ_i x_i‖ / |θ_i| is at most ``tol``; pairs that do not reach it within ``max_hvps`` are
returned with ``converged=False``.

The defaults were chosen by measurement (``benchmarks/solver_choice.py``, top-10 eigenpairs of
a 50k-parameter tanh MLP on 5,000 MNIST-1D samples, CPU): block size 1 needs the fewest HVPs
(as many as ARPACK), block size 2 about as many and the least wall time, since two vectors
per product are cheaper than two products; blocks of 4 and 10 need 1.4x and 2x the HVPs.
A block of 2 also sees both copies of a double eigenvalue, which one Krylov sequence cannot.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch

from subspace_cli.errors import NumericalError, UsageError

__all__ = [
    "EigenResult",
    "HessianLike",
    "arpack_eigenpairs",
    "default_max_hvps",
    "default_tol",
    "subspace_overlap",
    "top_eigenpairs",
]

#: Called after every block with (HVPs used so far, relative residuals of the wanted pairs or
#: ``None`` before there are enough Ritz pairs).
ProgressCallback = Callable[[int, "torch.Tensor | None"], None]

DEFAULT_BLOCK_SIZE = 2


class HessianLike(Protocol):
    """What the solvers need from an operator (see :class:`subspace_cli.hessian.HessianOperator`)."""

    @property
    def n_params(self) -> int: ...

    device: torch.device
    dtype: torch.dtype

    def matmat(self, vectors: torch.Tensor) -> torch.Tensor: ...


@dataclass
class EigenResult:
    """Top eigenpairs of a symmetric operator.

    Attributes:
        eigenvalues: ``(k + extra,)`` float64, in descending (algebraic) order.
        eigenvectors: ``(k + extra, n)`` in the operator's dtype, orthonormal rows.
        residuals: ``(k + extra,)`` float64 relative residuals ‖H v − λ v‖ / |λ| from real HVPs.
        converged: Per pair, whether its residual is at most ``tol``.
        hvp_count: HVPs this solve applied.
        solver: ``"block-lanczos"``, ``"lanczos"`` (single vector) or ``"arpack"``.
        iterations: Block steps (``arpack``: ARPACK restarts are not exposed, 0).
        restarts: Thick restarts.
        seconds: Wall time of the solve.
        tol: The residual tolerance that ``converged`` refers to.
        k: Number of requested pairs (the rest, ``extra``, show the gap).
        guard_values, guard_vectors: With ``guard=p``, up to p Ritz pairs after the wanted ones
            (fewer when the basis had fewer rows when the solve stopped; not held to ``tol``; a
            tracker keeps them as the next warm start's margin).
        stopped_on: ``"residual"`` (every pair reached ``tol``), ``"subspace"`` (the
            ``subspace_tol`` estimate was met first) or ``"budget"`` (``max_hvps`` spent, or the
            space exhausted).
        basis_bytes: Memory of the solver's basis (and images, for the block solver), in bytes.
        subspace_error: Estimate of 1 − overlap between the returned top-k subspace and the
            exact one, Σᵢ ‖rᵢ‖² / (k·(θᵢ − θ_{k+1})²) (see ``_subspace_terms``; NaN when no
            (k+1)-th Ritz value was available).
    """

    eigenvalues: torch.Tensor
    eigenvectors: torch.Tensor
    residuals: torch.Tensor
    converged: list[bool]
    hvp_count: int
    solver: str
    iterations: int
    restarts: int
    seconds: float
    tol: float
    k: int
    extra: int = field(default=0)
    guard_values: torch.Tensor | None = None
    guard_vectors: torch.Tensor | None = None
    stopped_on: str = "residual"
    subspace_error: float = float("nan")
    basis_bytes: int = 0

    @property
    def all_converged(self) -> bool:
        return all(self.converged)


def default_tol(dtype: torch.dtype) -> float:
    """Relative residual tolerance for HVPs computed in ``dtype``.

    Measured on the 50k-parameter tanh MLP (MSE and cross-entropy, benchmarks/
    solver_choice.py): float32 HVPs put a floor of about 1e-7 under the relative residual of
    the exact top-10 eigenvectors, so 1e-4 keeps a 1000x margin against never converging. As
    eigenvalue errors go with the residual squared, 1e-4 already gave eigenvalues within 1e-7
    (relative) of a float64 reference there. float64 HVPs reach 1e-12; 1e-8 costs a few HVPs.
    """
    if dtype == torch.float64:
        return 1e-8
    if dtype == torch.float32:
        return 1e-4
    return 1e-2


def default_block_size(device: torch.device, *, cold: bool) -> int:
    """``spectrum``'s block size: 1 for a cold solve on a CPU, else :data:`DEFAULT_BLOCK_SIZE`.

    On a CPU core products are not batched (``benchmarks/hvp_methods.py``: one vector at a time
    was as fast or faster per vector), so one Krylov sequence, which needs the fewest products
    (:mod:`subspace_cli.lanczos`), is also the fastest. A warm start keeps blocks of 2 (the
    tracker's refreshes were measured so, ``benchmarks/projected_cost.py``), and so does a GPU,
    where a block of vectors costs about one launch (unmeasured: no GPU has run this yet).
    The price of one sequence is ARPACK's: an eigenvalue repeated exactly (the last linear
    layer alone under MSE has every eigenvalue C times) is seen once; ``--block-size m`` sees
    up to m copies.
    """
    return 1 if cold and torch.device(device).type == "cpu" else DEFAULT_BLOCK_SIZE


def default_max_hvps(wanted: int) -> int:
    """HVP budget: 2000, or 100 per wanted pair when more than 20 are wanted."""
    return max(2000, 100 * wanted)


def default_basis_size(wanted: int, block_size: int) -> int:
    """Basis rows kept before a thick restart (V and W both hold this many vectors)."""
    return max(3 * wanted, wanted + 4 * block_size)


def subspace_overlap(va: torch.Tensor, vb: torch.Tensor) -> float:
    """‖V_a V_bᵀ‖_F² / k for orthonormal rows; 1 for identical subspaces.

    With different numbers of rows, k is the smaller one.
    """
    if va.dim() != 2 or vb.dim() != 2 or va.shape[1] != vb.shape[1]:
        raise ValueError(f"incompatible bases {tuple(va.shape)} and {tuple(vb.shape)}")
    k = min(va.shape[0], vb.shape[0])
    if k == 0:
        raise ValueError("empty basis")
    product = va.to(torch.float64) @ vb.to(device=va.device, dtype=torch.float64).T
    return float((product**2).sum()) / k


def _check_request(op: HessianLike, k: int, extra: int, max_hvps: int, tol: float) -> int:
    if not tol > 0:
        raise UsageError(f"tol must be positive, got {tol}")
    if k < 1:
        raise UsageError(f"k must be at least 1, got {k}")
    if extra < 0:
        raise UsageError(f"extra must be non-negative, got {extra}")
    wanted = k + extra
    if wanted > op.n_params:
        raise UsageError(f"k + extra = {wanted} exceeds the number of parameters {op.n_params}")
    if max_hvps < wanted:
        raise UsageError(f"max_hvps ({max_hvps}) must be at least k + extra ({wanted})")
    return wanted


def _check_basis_memory(rows: int, needed: int, row_bytes: int, budget: int) -> None:
    if rows < needed:
        raise UsageError(
            f"the basis needs at least {needed} rows of {row_bytes / 2**20:.1f} MiB"
            f" ({needed * row_bytes / 2**20:.0f} MiB); --basis-memory allows"
            f" {budget / 2**20:.0f} MiB"
        )


def _relative(
    residual_norms: torch.Tensor, values: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """‖r‖ / |θ|, with |θ| floored at eps·max|θ| so that a zero eigenvalue does not divide by 0."""
    scale = values.abs()
    floor = torch.finfo(dtype).eps * float(scale.max()) if scale.numel() else 0.0
    return residual_norms / scale.clamp_min(max(floor, torch.finfo(torch.float64).tiny))


def _orthonormal_extension(
    basis: torch.Tensor,
    candidates: torch.Tensor,
    count: int,
    generator: torch.Generator,
) -> torch.Tensor:
    """Up to ``count`` orthonormal rows orthogonal to ``basis``: candidates first, then random.

    Classical Gram-Schmidt applied twice ("twice is enough"), against the basis as a block and
    within the new rows one by one. A candidate that is (numerically) in the span already is
    dropped; random vectors fill the gap. Fewer rows come back only when the space is exhausted.
    """
    n = basis.shape[1]
    count = min(count, n - basis.shape[0])
    if count <= 0:
        return basis.new_zeros((0, n))
    drop = 1e3 * torch.finfo(basis.dtype).eps
    accepted: list[torch.Tensor] = []

    def project(rows: torch.Tensor) -> torch.Tensor:
        for _ in range(2):
            if basis.shape[0]:
                rows = rows - (rows @ basis.T) @ basis
        return rows

    def take(rows: torch.Tensor) -> None:
        norms = rows.norm(dim=1)
        rows = project(rows)
        for row, norm0 in zip(rows, norms, strict=True):
            if len(accepted) == count:
                return
            if float(norm0) == 0.0:
                continue
            for _ in range(2):
                if accepted:
                    done = torch.stack(accepted)
                    row = row - (done @ row) @ done
            norm = float(row.norm())
            if norm > drop * float(norm0):
                accepted.append(row / norm)

    if candidates.shape[0]:
        take(candidates)
    for _ in range(3):  # random fill; a second round only if a random vector was dependent
        missing = count - len(accepted)
        if missing <= 0:
            break
        take(torch.randn(missing, n, generator=generator, device=basis.device, dtype=basis.dtype))
    if not accepted:
        return basis.new_zeros((0, n))
    return torch.stack(accepted)


def _projection(basis: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """V Wᵀ = V H Vᵀ in float64, symmetrised."""
    projected = (basis @ images.T).to(torch.float64)
    return 0.5 * (projected + projected.T)


def _restore_orthonormality(
    basis: torch.Tensor, images: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Undo the slow loss of orthonormality that repeated restarts cause in low precision.

    With V = L C (Cholesky of V Vᵀ = L Lᵀ), C = L⁻¹ V is orthonormal and H C = L⁻¹ W, so the
    images stay exact combinations of real HVPs.
    """
    gram = (basis @ basis.T).to(torch.float64)
    identity = torch.eye(len(gram), device=gram.device, dtype=gram.dtype)
    if float((gram - identity).abs().max()) <= 100 * torch.finfo(basis.dtype).eps:
        return basis, images
    inverse = torch.linalg.inv(torch.linalg.cholesky(gram)).to(basis.dtype)
    return inverse @ basis, inverse @ images


def top_eigenpairs(
    op: HessianLike,
    k: int,
    *,
    extra: int = 0,
    tol: float | None = None,
    max_hvps: int | None = None,
    init: torch.Tensor | None = None,
    seed: int = 0,
    block_size: int | None = None,
    basis_size: int | None = None,
    progress: ProgressCallback | None = None,
    guard: int = 0,
    subspace_tol: float | None = None,
    init_images: torch.Tensor | None = None,
    basis_memory: int | None = None,
) -> EigenResult:
    """The k + extra algebraically largest eigenpairs, by thick-restart block Lanczos.

    Args:
        op: Symmetric operator with ``matmat`` over rows, ``n_params``, ``device``, ``dtype``.
        k: Number of wanted pairs.
        extra: Further pairs λ_{k+1..k+extra}, held to the same tolerance (they show the gap).
        tol: Relative residual ‖H v − λ v‖ / |λ| every pair must reach
            (default :func:`default_tol` of ``op.dtype``).
        max_hvps: HVP budget (default :func:`default_max_hvps`). Pairs that have not converged
            when it is spent are returned with ``converged=False``.
        init: ``(j, n)`` starting vectors, e.g. the previous checkpoint's eigenvectors; a warm
            start from the exact answer converges after one block of j HVPs.
        seed: Seed of the random start and fill vectors (a generator on ``op.device``).
        block_size: Vectors per ``op.matmat`` call (default 2). 1 with a cold start (no
            ``init``, ``guard`` or ``subspace_tol``) runs
            :func:`subspace_cli.lanczos.lanczos_eigenpairs`, a single-vector Lanczos that
            stores no images and needs the fewest products, but, like ARPACK, sees only one
            copy of an exactly repeated eigenvalue. ``spectrum`` picks it per device
            (:func:`default_block_size`); the tracker and its audits keep blocks.
        basis_size: Basis vectors held before a thick restart (default
            ``max(3·(k+extra), k+extra+4·block_size)``); memory is 2·basis_size vectors of n.
        progress: Called after every block as ``progress(hvps, residuals_or_None)``.
        guard: Also return up to this many further Ritz pairs (``guard_values``/
            ``guard_vectors``), unverified.
        subspace_tol: Also stop once the estimated subspace error (see
            :attr:`EigenResult.subspace_error`) of the k + extra wanted pairs is at most this,
            even if some residuals are above ``tol``. Meant for warm restarts that need the
            subspace, not each eigenvector, to a given accuracy.
        init_images: ``(m, n)``: H applied to the first m rows of ``init``, already computed
            (e.g. by a drift check). The first block reuses them instead of applying H again;
            they are not counted in ``hvp_count``.
        basis_memory: Bytes the basis (and, for the block solver, its images) may hold; the
            basis is shrunk to fit (``basis_bytes`` of the result says what it held).

    Returns:
        An :class:`EigenResult` with ``solver="block-lanczos"`` (``"lanczos"`` for the
        single-vector path).
    """
    started = time.perf_counter()
    n = op.n_params
    device, op_dtype = op.device, op.dtype
    tol = default_tol(op_dtype) if tol is None else float(tol)
    b = DEFAULT_BLOCK_SIZE if block_size is None else int(block_size)
    if b < 1:
        raise UsageError(f"block size must be positive, got {b}")
    max_hvps = default_max_hvps(k + extra) if max_hvps is None else int(max_hvps)
    wanted = _check_request(op, k, extra, max_hvps, tol)
    if guard < 0:
        raise UsageError(f"guard must be non-negative, got {guard}")
    cold = (init is None or not init.shape[0]) and init_images is None
    if b == 1 and cold and guard == 0 and subspace_tol is None:
        from subspace_cli.lanczos import lanczos_eigenpairs

        return lanczos_eigenpairs(op, k, extra=extra, tol=tol, max_hvps=max_hvps, seed=seed,
                                  basis_size=basis_size, basis_memory=basis_memory,
                                  progress=progress)
    # The basis, its images and the Rayleigh-Ritz step are kept in float64 whatever the HVP
    # precision: with a float32 basis, rounding in V Wᵀ capped the eigenvalue accuracy near
    # 5e-7 and cost extra HVPs (benchmarks/solver_choice.py). Memory: 2·basis_size·n doubles.
    dtype = torch.float64
    b = min(b, n)
    if init is not None:
        if init.dim() != 2 or init.shape[1] != n:
            raise UsageError(f"init must have shape (j, {n}), got {tuple(init.shape)}")
        init = init.to(device=device, dtype=dtype)
        first = min(max(b, init.shape[0]), n)
    else:
        init = torch.zeros((0, n), device=device, dtype=dtype)
        first = b
    max_dim = default_basis_size(wanted, b) if basis_size is None else int(basis_size)
    if basis_memory is not None:
        rows = int(basis_memory) // (16 * n)  # float64 basis and images
        _check_basis_memory(rows, wanted + b, 16 * n, basis_memory)
        max_dim = min(max_dim, rows)
    max_dim = min(n, max(max_dim, wanted + b, first + b))
    keep = max_dim - max(b, (max_dim - wanted) // 2)  # Ritz vectors kept by a restart
    keep = max(min(keep, max_dim - b), wanted)

    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    basis = torch.zeros((0, n), device=device, dtype=dtype)
    images = torch.zeros((0, n), device=device, dtype=dtype)
    projected = torch.zeros((0, 0), device=device, dtype=torch.float64)
    new = _orthonormal_extension(basis, init, first, generator)
    known = _known_images(init, init_images, new, dtype)
    hvps = iterations = restarts = 0
    values = torch.zeros(0, device=device, dtype=torch.float64)
    vectors = torch.zeros((0, 0), device=device, dtype=torch.float64)
    ritz_vectors = ritz_images = basis
    relative = torch.zeros(0, device=device, dtype=torch.float64)
    stopped_on, subspace_error = "budget", float("nan")

    while new.shape[0]:
        new = new[: max_hvps - hvps]
        if not new.shape[0]:
            break
        # H is applied to the basis rows rounded to op_dtype; the difference is at the HVPs'
        # own rounding level (relative eps of op_dtype), far below any sensible tol.
        reused = known.shape[0] if known is not None and iterations == 0 else 0
        computed = op.matmat(new[reused:].to(op_dtype)).to(dtype)
        new_images = torch.cat([known, computed]) if reused else computed
        hvps += new.shape[0] - reused
        iterations += 1
        # T = V Wᵀ grows by the new block; the two estimates of the off-diagonal block
        # (V_old · H V_new and H V_old · V_new) agree up to rounding and are averaged.
        cross = 0.5 * (basis @ new_images.T + images @ new.T).to(torch.float64)
        diagonal = (new @ new_images.T).to(torch.float64)
        diagonal = 0.5 * (diagonal + diagonal.T)
        projected = torch.cat(
            [torch.cat([projected, cross], dim=1), torch.cat([cross.T, diagonal], dim=1)]
        )
        basis = torch.cat([basis, new])
        images = torch.cat([images, new_images])

        values, vectors = torch.linalg.eigh(projected)
        values, vectors = values.flip(0), vectors.flip(1)
        if not bool(torch.isfinite(values).all()):
            raise NumericalError("the projected Hessian has non-finite entries")
        dim = basis.shape[0]
        # Residuals of the wanted pairs and of the next b, which may seed the next block.
        count = min(dim, wanted + max(b, guard))
        coefficients = vectors[:, :count].T.to(dtype)
        ritz_vectors = coefficients @ basis
        ritz_images = coefficients @ images  # = H x_i, combinations of stored real HVPs
        residual_norms = (ritz_images - values[:count, None].to(dtype) * ritz_vectors).norm(dim=1)
        relative = _relative(residual_norms, values[:count], op_dtype)
        done = relative <= tol
        if progress is not None:
            progress(hvps, relative[:wanted].clone() if dim >= wanted else None)
        terms = _subspace_terms(residual_norms, values, wanted) if dim > wanted else None
        if terms is not None:
            subspace_error = float(terms.sum()) / wanted
        if dim >= wanted and bool(done[:wanted].all()):
            stopped_on = "residual"
            break
        if subspace_tol is not None and subspace_error <= subspace_tol:
            stopped_on = "subspace"
            break
        if hvps >= max_hvps or dim == n:
            break

        # Next block: residuals of the top unconverged pairs (wanted first, then beyond). When
        # the subspace is the goal, the pairs that add most to its error estimate go first.
        order = [i for i in range(count) if i < wanted and not bool(done[i])]
        if subspace_tol is not None and terms is not None:
            order.sort(key=lambda i: -float(terms[i]))
        order += [i for i in range(wanted, count) if i not in order]
        residuals = ritz_images[order] - values[order, None].to(dtype) * ritz_vectors[order]
        if dim + b > max_dim and max_dim < n:
            kept = min(keep, dim)
            coefficients = vectors[:, :kept].T.to(dtype)
            basis, images = _restore_orthonormality(coefficients @ basis, coefficients @ images)
            projected = _projection(basis, images)
            restarts += 1
        new = _orthonormal_extension(basis, residuals[:b], b, generator)

    count = min(wanted, ritz_vectors.shape[0])
    extra_rows = min(guard, ritz_vectors.shape[0] - count)
    return make_result(
        values[:count], ritz_vectors[:count].to(op_dtype), relative[:count], tol, k, extra,
        hvp_count=hvps,
        solver="block-lanczos",
        iterations=iterations,
        restarts=restarts,
        seconds=time.perf_counter() - started,
        guard_values=values[count : count + extra_rows].clone() if guard else None,
        guard_vectors=ritz_vectors[count : count + extra_rows].to(op_dtype) if guard else None,
        stopped_on=stopped_on,
        subspace_error=subspace_error,
        basis_bytes=2 * max_dim * n * torch.finfo(dtype).bits // 8,
    )


def make_result(values: torch.Tensor, vectors: torch.Tensor, relative: torch.Tensor, tol: float,
                k: int, extra: int, **details: object) -> EigenResult:
    """An :class:`EigenResult` whose ``converged`` flags are ``relative <= tol``."""
    return EigenResult(
        eigenvalues=values.clone(), eigenvectors=vectors, residuals=relative.clone(),
        converged=[bool(r <= tol) for r in relative], tol=tol, k=k, extra=extra,
        **details,  # type: ignore[arg-type]
    )


def _known_images(init: torch.Tensor, init_images: torch.Tensor | None, new: torch.Tensor,
                  dtype: torch.dtype) -> torch.Tensor | None:
    """Images of the first rows of the first block, from H applied to the first rows of init.

    Gram-Schmidt makes row i of the block a combination of init rows 0..i, so while none of the
    first m rows was dropped, block[:m] = T·init[:m] and H·block[:m] = T·(H·init[:m]).
    """
    if init_images is None or not init_images.shape[0]:
        return None
    m = init_images.shape[0]
    if m > init.shape[0]:
        raise UsageError(f"init_images has {m} rows but init only {init.shape[0]}")
    if m > new.shape[0]:
        return None  # the first block is smaller than the known images (a tiny budget)
    head = init[:m]
    transform = new[:m] @ head.T @ torch.linalg.inv(head @ head.T)
    if float((new[:m] - transform @ head).norm()) > 1e3 * torch.finfo(dtype).eps * m:
        return None  # a row was dropped as dependent: apply H afresh
    return transform @ init_images.to(device=new.device, dtype=dtype)


def _subspace_terms(residual_norms: torch.Tensor, values: torch.Tensor,
                    wanted: int) -> torch.Tensor:
    """Per wanted pair, ‖rᵢ‖² / (θᵢ − θ_{k+1})²; their sum over k estimates 1 − ‖X Uᵀ‖²_F / k
    for the Ritz vectors X and the exact top-k subspace U.

    For a unit x with Rayleigh quotient θ > λ_{k+1} and residual r = Hx − θx, the part w of x
    outside U satisfies ‖(I − P_U) r‖ = ‖(H − θ) w‖ ≥ (θ − λ_{k+1}) ‖w‖, so ‖w‖ ≤ ‖r‖ / (θ −
    λ_{k+1}); and k − ‖X Uᵀ‖²_F = Σᵢ ‖wᵢ‖². The unknown λ_{k+1} is replaced by the Ritz value
    θ_{k+1} ≤ λ_{k+1} (so the estimate is optimistic until θ_{k+1} has converged, which guard
    vectors in a warm start make quick). A pair at or below θ_{k+1} gives infinity.
    """
    gaps = values[:wanted] - values[wanted]
    norms = residual_norms[:wanted].to(torch.float64)
    return torch.where(gaps > 0, (norms / gaps.clamp_min(torch.finfo(torch.float64).tiny)) ** 2,
                       torch.full_like(gaps, float("inf")))


def arpack_eigenpairs(
    op: HessianLike,
    k: int,
    *,
    extra: int = 0,
    tol: float | None = None,
    max_hvps: int | None = None,
    init: torch.Tensor | None = None,
    seed: int = 0,
) -> EigenResult:
    """Reference solver: SciPy's ``eigsh(which="LA")`` (ARPACK) over the same HVPs.

    ARPACK's ``tol`` is the same relative criterion ‖H v − λ v‖ ≤ tol·|λ|. The returned
    residuals are recomputed with k + extra real HVPs, included in ``hvp_count``; ``converged``
    refers to those recomputed residuals.

    Raises:
        NumericalError: If ARPACK stops (budget or iteration limit) before all pairs converge.
    """
    import numpy as np
    from scipy.sparse.linalg import ArpackNoConvergence, LinearOperator, eigsh

    started = time.perf_counter()
    n = op.n_params
    tol = default_tol(op.dtype) if tol is None else float(tol)
    max_hvps = default_max_hvps(k + extra) if max_hvps is None else int(max_hvps)
    wanted = _check_request(op, k, extra, max_hvps, tol)
    if wanted >= n:
        raise UsageError(f"ARPACK needs k + extra < n ({wanted} >= {n}); use top_eigenpairs")
    generator = torch.Generator(device=op.device)
    generator.manual_seed(seed)
    if init is not None and init.shape[0]:
        start = init.to(device=op.device, dtype=torch.float64).sum(dim=0)
    else:
        start = torch.randn(n, generator=generator, device=op.device, dtype=torch.float64)
    hvps = 0

    class _BudgetSpent(Exception):
        pass

    def matvec(vector: np.ndarray) -> np.ndarray:
        nonlocal hvps
        if hvps >= max_hvps:
            raise _BudgetSpent
        hvps += 1
        x = torch.as_tensor(np.asarray(vector, dtype=np.float64).reshape(-1))
        product = op.matmat(x.to(device=op.device, dtype=op.dtype).unsqueeze(0))[0]
        return product.to("cpu", torch.float64).numpy()

    linear = LinearOperator((n, n), matvec=matvec, dtype=np.float64)
    try:
        values, vectors = eigsh(
            linear,
            k=wanted,
            which="LA",
            tol=tol,
            v0=start.cpu().numpy(),
            ncv=min(n, max(2 * wanted + 1, 20)),
            maxiter=max_hvps,
        )
    except _BudgetSpent:
        raise NumericalError(
            f"ARPACK did not converge within {max_hvps} HVPs (k + extra = {wanted}, tol {tol:g})"
        ) from None
    except ArpackNoConvergence as error:
        raise NumericalError(
            f"ARPACK converged only {len(error.eigenvalues)} of {wanted} eigenpairs"
        ) from None
    order = np.argsort(values)[::-1]
    eigenvalues = torch.as_tensor(values[order].copy(), device=op.device)
    eigenvectors = torch.as_tensor(vectors[:, order].T.copy()).to(device=op.device, dtype=op.dtype)
    images = op.matmat(eigenvectors)
    hvps += wanted
    residual_norms = (
        images.to(torch.float64) - eigenvalues[:, None] * eigenvectors.to(torch.float64)
    ).norm(dim=1)
    relative = _relative(residual_norms, eigenvalues, op.dtype)
    return EigenResult(
        eigenvalues=eigenvalues,
        eigenvectors=eigenvectors,
        residuals=relative,
        converged=[bool(r <= tol) for r in relative],
        hvp_count=hvps,
        solver="arpack",
        iterations=0,
        restarts=0,
        seconds=time.perf_counter() - started,
        tol=tol,
        k=k,
        extra=extra,
    )
