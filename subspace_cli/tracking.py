"""Keeping the dominant subspace current during training, at a fraction of a solve per step.

``project-train`` needs, at every projected (or logged) step t, the span of the top-k Hessian
eigenvectors at θ_t. Under SGD that subspace moves slowly (about 1e-5 in overlap per step on
the MLP sample), so a full solve per step is mostly wasted. :class:`SubspaceTracker` keeps a
subspace V and aims to hold 1 − ‖V Uₜᵀ‖²_F / k, its distance from the exact top-k subspace Uₜ,
under ``subspace_tol`` at a small fraction of the cost; audits (below) measure whether it did.
What it cannot see: an exact crossing of λ_k and λ_{k+1} is caught at the next check (up to
``max_check_gap`` steps late), and an eigenvalue rising from deep in the bulk past λ_k without
coupling to the tracked vectors is found by no warm method, only by a cold solve (an audit).
Three policies:

* ``track`` (the default). Three mechanisms work together:

  1. *Warm refreshes with guard vectors.* A refresh restarts the block Lanczos solver from the
     k tracked vectors plus ``guard`` more Ritz vectors kept from the previous refresh (so a
     λ_k that crosses λ_{k+1} is caught in the first block), reusing the drift check's
     products for three of them. It stops as soon as the estimated subspace error
     Σᵢ ‖rᵢ‖² / (k·(θᵢ − θ_{k+1})²) is below a tenth of ``subspace_tol``, or every residual is
     below ``tol``: the subspace, not each eigenvector, is what projection needs. Its next
     blocks go to the pairs that add most to that estimate. When the subspace barely moved a
     refresh costs k + guard − 3 HVPs plus a few blocks.
  2. *A drift check* (one product of 3 HVPs with [u₁, u_k, g₁], g₁ the first guard vector; see
     :func:`_drift_terms`). Right after a refresh every coupling uᵢᵀHgⱼ is zero; as θ moves,
     couplings appear, and each turns the exact subspace by coupling / gap. Where the gap is
     known (every coupling with g₁, above all the near-degenerate pair u_k, g₁, solved exactly
     as a 2×2 problem) that gives the staleness directly; the rest of what u₁ and u_k couple to
     (ρ²) is turned into staleness by a factor κ calibrated at every refresh. When the
     estimate exceeds half of ``subspace_tol``, a refresh is made. The Rayleigh quotient
     u₁ᵀHu₁ is the sharpness at θₜ. Checks are made at every step while the estimate is near
     the threshold, sparser (up to ``max_check_gap`` steps apart) while it is far below.
  3. *An adaptive interval as a backstop.* Each refresh measures exactly the staleness that
     accrued since the previous one, s = 1 − overlap(V_old, V_new), over a known number of
     steps. Where the drift estimate at the refresh accounted for s, the interval doubles;
     otherwise it is scaled so that the staleness predicted for it is half of
     ``subspace_tol`` (see :func:`_next_interval`), at most ``max_interval``.

* ``warm``: a warm-started solve to the residual ``tol`` every ``every`` steps (the behaviour
  before the tracker; ``every=1`` recomputes at every step).
* ``cold``: a solve from a random start every ``every`` steps (the paper's recipe).

:meth:`SubspaceTracker.audit` is the ground truth for all of them: a cold solve at a tight
tolerance whose overlap with the subspace in use is logged; its HVPs are counted apart.

Everything that decides what the tracker does next (the basis, the guard vectors, the interval,
the next check, κ) is in :meth:`SubspaceTracker.state_dict` and
:meth:`SubspaceTracker.tensors`, and the random starts of cold solves are seeded by (seed,
step), so a resumed run is bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from subspace_cli.errors import UsageError

if TYPE_CHECKING:
    import torch

    from subspace_cli.eigensolver import EigenResult, HessianLike

POLICIES = ("track", "warm", "cold")
#: The refresh stops when the subspace-error estimate is below this fraction of subspace_tol.
REFRESH_FRACTION = 0.1
#: The interval and the drift trigger aim at this fraction of subspace_tol.
SAFETY = 0.5
#: A refresh whose staleness is at most this multiple of the drift estimate confirms the check.
EXPLAINED = 2.0
#: κ is the largest of this many recent calibrations.
KAPPA_MEMORY = 4


def default_audit_tol(dtype: torch.dtype) -> float:
    """Tolerance of the audit's cold solve: 100× tighter than a refresh's default, and still
    10× above the float32 HVP floor of about 1e-7 (see ``eigensolver.default_tol``)."""
    import torch

    return 1e-10 if dtype == torch.float64 else 1e-6


@dataclass(frozen=True)
class TrackerSettings:
    """How the subspace is kept (see the module docstring)."""

    k: int
    policy: str = "track"
    every: int = 1  # warm and cold: refresh every this many steps
    subspace_tol: float = 1e-3
    guard: int = 2
    max_interval: int = 200
    max_check_gap: int = 8  # track: at most this many steps between drift checks
    tol: float | None = None  # residual tolerance of a refresh (None: the solver's default)
    max_hvps: int | None = None
    block_size: int | None = None
    seed: int = 0
    audit_tol: float | None = None

    def check(self) -> None:
        if self.policy not in POLICIES:
            raise UsageError(f"unknown refresh policy {self.policy!r}: "
                             f"choose one of {', '.join(POLICIES)}")
        if not 0 < self.subspace_tol < 1:
            raise UsageError(f"--subspace-tol must lie in (0, 1), got {self.subspace_tol}")
        if self.every < 1 or self.max_interval < 1 or self.max_check_gap < 1:
            raise UsageError("refresh intervals must be at least 1")
        if self.guard < 0:
            raise UsageError(f"--guard must be non-negative, got {self.guard}")
        if self.policy == "track" and self.guard < 1:
            raise UsageError("--refresh track needs --guard of at least 1 (its drift check "
                             "watches the first vector beyond the subspace)")


@dataclass
class TrackerState:
    """The tracker's saved scalars (JSON in the run state)."""

    basis_step: int = -1  # step of the last refresh
    interval: float = 1.0  # track: steps until the next scheduled refresh, from basis_step
    next_check: int = -1  # track: the next step with a drift check (unless a refresh is due)
    growth: float = 0.0  # staleness / age² measured by the last refresh
    kappas: list[float] = field(default_factory=list)  # recent calibrations of κ
    refreshes: int = 0
    refresh_hvps: int = 0
    check_hvps: int = 0
    audit_hvps: int = 0
    hvp_method: str = ""


@dataclass
class Refresh:
    """What one refresh did (the ``refresh`` table of run.h5)."""

    step: int
    reason: str  # start, schedule, interval, drift
    age: int  # steps since the previous refresh (0 for the first)
    hvps: int
    seconds: float
    max_residual: float
    all_converged: bool
    stopped_on: str
    subspace_error: float
    overlap_previous: float
    drift_estimate: float  # crossing + κ·ρ² before the refresh (and before κ is updated)
    next_interval: float
    residuals: list[float]


@dataclass
class Check:
    """A drift check at one step (see ``_drift_terms``)."""

    crossing: float  # staleness from the couplings with g₁, gaps known
    rho2: float  # the rest of the couplings of u₁ and u_k, gaps unknown
    rayleigh: float  # u₁ᵀ H u₁, the sharpness at θₜ
    pair: float  # sin²φ of the mixing of u_k with g₁
    images: Any = None  # H [u₁, u_k, g₁], reused by a refresh at the same step


@dataclass
class Audit:
    """A cold tight solve at one step (the ``audit`` table of run.h5)."""

    step: int
    overlap: float  # ‖V_in_use Uᵀ‖²_F / k
    hvps: int
    seconds: float
    max_residual: float
    all_converged: bool
    eigenvalues: list[float]


@dataclass
class StepInfo:
    """What the tracker knows about step t after :meth:`SubspaceTracker.update`."""

    age: int
    drift_estimate: float
    sharpness: float
    sharpness_source: str  # refresh, rayleigh or stale
    audit_overlap: float = float("nan")


class SubspaceTracker:
    """Keeps a k-dimensional approximation of the top-k eigenspace of a changing Hessian.

    Args:
        settings: The policy and its tolerances.
        make_operator: Returns the Hessian operator at the current parameters, using the HVP
            method it is given (``"auto"`` until one has been measured).
        on_refresh: Called with every :class:`Refresh`.
        n_params, device, dtype: Of the tracked vectors.
    """

    def __init__(self, settings: TrackerSettings, make_operator: Callable[[str], HessianLike],
                 *, on_refresh: Callable[[Refresh], None], n_params: int,
                 device: torch.device, dtype: torch.dtype, hvp_method: str = "auto") -> None:
        import torch

        settings.check()
        self.settings = settings
        self.make_operator = make_operator
        self.on_refresh = on_refresh
        self.requested_method = hvp_method
        self.state = TrackerState()
        self.basis = torch.zeros((0, n_params), device=device, dtype=dtype)
        self.eigenvalues = torch.zeros(0, dtype=torch.float64)
        self.guard = torch.zeros((0, n_params), device=device, dtype=dtype)
        self.guard_values = torch.zeros(0, dtype=torch.float64)
        self.device, self.dtype = device, dtype

    # -- saved state -------------------------------------------------------------------------

    @property
    def hvps(self) -> int:
        """HVPs of refreshes and drift checks (not audits, not the method probe)."""
        return self.state.refresh_hvps + self.state.check_hvps

    def state_dict(self) -> dict[str, Any]:
        return asdict(self.state)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {
            "subspace.basis": self.basis.detach().cpu(),
            "subspace.eigenvalues": self.eigenvalues.detach().cpu(),
            "subspace.guard": self.guard.detach().cpu(),
            "subspace.guard_values": self.guard_values.detach().cpu(),
        }

    def load(self, state: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        import torch

        self.state = TrackerState(**state)
        self.basis = tensors["subspace.basis"].to(self.device, self.dtype).clone()
        self.eigenvalues = tensors["subspace.eigenvalues"].clone()
        n = self.basis.shape[1]
        self.guard = tensors.get("subspace.guard", torch.zeros((0, n))).to(
            self.device, self.dtype).clone()
        self.guard_values = tensors.get(
            "subspace.guard_values", torch.zeros(0, dtype=torch.float64)).clone()

    # -- the step ----------------------------------------------------------------------------

    def _operator(self) -> HessianLike:
        return self.make_operator(self.state.hvp_method or self.requested_method)

    def _note_method(self, op: HessianLike) -> None:
        method = getattr(op, "method", None)
        if method and not self.state.hvp_method:
            self.state.hvp_method = method

    def update(self, step: int) -> StepInfo:
        """Make the subspace current for step ``step`` (refreshing when due)."""
        s, st = self.settings, self.state
        if self.basis.shape[0] == 0:
            self._refresh(step, "start", None)
            return self._info(step, float("nan"), None)
        age = step - st.basis_step
        if age == 0:
            return self._info(step, float("nan"), None)
        if s.policy != "track":
            if age >= s.every:
                self._refresh(step, "schedule", None)
            return self._info(step, float("nan"), None)
        interval_due = age >= math.floor(st.interval)
        if not interval_due and step < st.next_check:
            return self._info(step, float("nan"), None)
        check = self._drift_check()
        drift = self._estimate(check)
        threshold = SAFETY * s.subspace_tol
        reason = "interval" if interval_due else "drift" if drift > threshold else None
        if reason is None:
            calibrated = drift if st.kappas else self._upper_estimate(check)
            st.next_check = step + _check_gap(calibrated, age, threshold, s.max_check_gap)
            return self._info(step, drift, check)
        self._refresh(step, reason, check)
        return self._info(step, drift, None)

    def _info(self, step: int, drift: float, check: Check | None) -> StepInfo:
        age = step - self.state.basis_step
        if age == 0:
            sharpness, source = float(self.eigenvalues[0]), "refresh"
        elif check is not None:
            sharpness, source = check.rayleigh, "rayleigh"
        else:
            sharpness, source = float(self.eigenvalues[0]), "stale"
        return StepInfo(age=age, drift_estimate=drift, sharpness=sharpness,
                        sharpness_source=source)

    def _guarded_padding(self, step: int) -> torch.Tensor:
        """The guard vectors after the first, plus seeded random rows when fewer than ``guard``
        came back from the last refresh (a solve that stopped early returns fewer), so that
        every warm refresh starts from k + guard vectors (as far as the parameters allow)."""
        import torch

        n = self.basis.shape[1]
        missing = min(self.settings.guard, n - self.basis.shape[0]) - self.guard.shape[0]
        if missing <= 0:
            return self.guard[1:]
        generator = torch.Generator().manual_seed(_step_seed(self.settings.seed + 104729, step))
        fill = torch.randn(missing, n, generator=generator, dtype=torch.float64)
        return torch.cat([self.guard[1:], fill.to(self.device, self.dtype)])

    def _upper_estimate(self, check: Check) -> float:
        """crossing + κ_max·ρ²: the estimate with the largest κ there can be, for spacing the
        checks before κ is calibrated (NaN when no bound is known)."""
        ceiling = self._kappa_ceiling()
        if not math.isfinite(ceiling):
            return float("nan")
        return check.crossing + ceiling * check.rho2

    def _kappa_ceiling(self) -> float:
        """The most staleness per unit ρ² there can be: all of ρ² coupled to the nearest
        eigenvector beyond g₁, of eigenvalue at most μ₂ (μ₁ without a second guard vector)."""
        if not self.eigenvalues.numel() or not self.guard_values.numel():
            return math.inf
        nearest = float(self.guard_values[1 if self.guard_values.numel() > 1 else 0])
        gap = float(self.eigenvalues[-1]) - nearest
        return 1.0 / (self.basis.shape[0] * gap * gap) if gap > 0 else math.inf

    def _calibration(self, staleness: float, check: Check) -> float | None:
        """κ observed at a refresh, or None when the measurement says nothing: a staleness at
        the rounding level of the vectors (4 eps), an infinite crossing term or a ρ² of 0. It is
        capped at :meth:`_kappa_ceiling`."""
        import torch

        noise = 4 * torch.finfo(self.dtype).eps
        if staleness <= noise or not math.isfinite(check.crossing) or not check.rho2 > 0:
            return None
        observed = max(staleness - check.crossing, 0.0) / check.rho2
        return min(observed, self._kappa_ceiling())

    def _drift_check(self) -> Check:
        """One product with [u₁, u_k, g₁] (3 HVPs; 2 when k = 1) at the current θ."""
        import torch

        v = self.basis.to(torch.float64)
        g = self.guard.to(torch.float64)
        k, p = v.shape[0], g.shape[0]
        rows = [v[0]] if k == 1 else [v[0], v[k - 1]]
        if p:
            rows.append(g[0])
        x = torch.stack(rows)
        op = self._operator()
        images = op.matmat(x.to(self.dtype)).to(torch.float64)
        self._note_method(op)
        self.state.check_hvps += len(rows)
        check = _drift_terms(v, g, self.eigenvalues.to(torch.float64), images)
        check.images = images
        return check

    def _estimate(self, check: Check) -> float:
        """crossing + κ·ρ², κ the largest of the last calibrations and of a floor.

        The floor: if no eigenvalue lies below −λ₁ (true of Hessians near a minimum), a
        coupling r of u₁ or u_k with the bulk turns it by at least r / (2λ₁), so
        ρ² / (k·4λ₁²) is a lower bound on the staleness of the two watched vectors alone. It
        keeps a run whose subspace stood still (κ calibrated to 0) sensitive to a sudden move.
        """
        kappas = self.state.kappas
        top = float(self.eigenvalues[0]) if self.eigenvalues.numel() else 0.0
        floor = 1.0 / (self.basis.shape[0] * 4 * top * top) if top > 0 else 0.0
        return check.crossing + max([floor, *kappas]) * check.rho2

    def _solve(self, op: HessianLike, init: torch.Tensor | None, *, warm_track: bool,
               step: int, images: torch.Tensor | None = None) -> EigenResult:
        from subspace_cli.eigensolver import top_eigenpairs

        s = self.settings
        return top_eigenpairs(
            op, s.k, tol=s.tol, max_hvps=s.max_hvps, init=init, block_size=s.block_size,
            seed=_step_seed(s.seed, step) if init is None and step else s.seed,
            guard=s.guard if s.policy == "track" else 0,
            subspace_tol=REFRESH_FRACTION * s.subspace_tol if warm_track else None,
            init_images=images,
        )

    def _refresh(self, step: int, reason: str, check: Check | None) -> None:
        import torch

        from subspace_cli.eigensolver import subspace_overlap

        s, st = self.settings, self.state
        track = s.policy == "track"
        have = self.basis.shape[0] > 0
        if s.policy == "cold" or not have:
            init = None
        elif track:
            # [u₁, u_k, g₁] first, so that the drift check's products start the first block.
            k = self.basis.shape[0]
            order = [0, *([k - 1] if k > 1 else []), *range(1, k - 1)]
            init = torch.cat([self.basis[[order[0]]], self.basis[order[1:2]], self.guard[:1],
                              self.basis[order[2:]], self._guarded_padding(step)])
        else:
            init = self.basis
        op = self._operator()
        reuse = check.images if check is not None and track and have else None
        result = self._solve(op, init, warm_track=track and have, step=step, images=reuse)
        self._note_method(op)
        new = result.eigenvectors.to(self.device, self.dtype)
        overlap = subspace_overlap(self.basis, new) if have else float("nan")
        age = step - st.basis_step if have else 0
        drift = self._estimate(check) if check is not None else float("nan")
        if track and have:
            staleness = max(1.0 - overlap, 0.0)
            if check is not None:
                observed = self._calibration(staleness, check)
                if observed is not None:
                    st.kappas = [*st.kappas, observed][-KAPPA_MEMORY:]
            growth = staleness / age**2 if age else 0.0
            acceleration = growth / st.growth if st.growth > 0 and growth > 0 else 1.0
            if result.stopped_on == "budget":
                st.interval = 1.0
            else:
                st.interval = _next_interval(age, staleness, SAFETY * s.subspace_tol,
                                             s.max_interval, acceleration)
                if math.isfinite(drift) and drift > 0 and staleness <= EXPLAINED * drift:
                    # The drift check saw what accrued: it triggers the refreshes, and the
                    # interval is only a backstop for what it cannot see.
                    st.interval = float(min(s.max_interval, max(st.interval, 2 * age)))
            st.growth = growth
        self.basis = new
        self.eigenvalues = result.eigenvalues.detach().cpu().to(torch.float64)
        if result.guard_vectors is not None and result.guard_values is not None:
            self.guard = result.guard_vectors.to(self.device, self.dtype)
            self.guard_values = result.guard_values.detach().cpu().to(torch.float64)
        st.basis_step = step
        st.next_check = step + 1
        st.refreshes += 1
        st.refresh_hvps += result.hvp_count
        residuals = [float(r) for r in result.residuals]
        converged = result.all_converged or result.stopped_on == "subspace"
        self.on_refresh(Refresh(
            step=step, reason=reason, age=age, hvps=result.hvp_count, seconds=result.seconds,
            max_residual=max(residuals), all_converged=converged,
            stopped_on=result.stopped_on, subspace_error=result.subspace_error,
            overlap_previous=overlap, drift_estimate=drift,
            next_interval=st.interval if track else float(s.every), residuals=residuals,
        ))

    # -- ground truth ------------------------------------------------------------------------

    def audit(self, step: int, op: HessianLike) -> Audit:
        """Overlap of the subspace in use with the exact top-k at this step: a cold solve from
        a random start at ``audit_tol`` on ``op`` (whose HVPs are not the run's)."""
        from subspace_cli.eigensolver import subspace_overlap, top_eigenpairs

        s = self.settings
        tol = s.audit_tol if s.audit_tol is not None else default_audit_tol(op.dtype)
        result = top_eigenpairs(op, s.k, tol=tol, seed=_step_seed(s.seed + 7919, step),
                                block_size=s.block_size)
        self.state.audit_hvps += result.hvp_count
        return Audit(
            step=step, overlap=subspace_overlap(self.basis, result.eigenvectors),
            hvps=result.hvp_count, seconds=result.seconds,
            max_residual=float(result.residuals.max()), all_converged=result.all_converged,
            eigenvalues=[float(v) for v in result.eigenvalues],
        )


def _next_interval(age: int, staleness: float, target: float, cap: int,
                   acceleration: float = 1.0) -> float:
    """The interval whose predicted staleness is ``target``, given ``staleness`` over ``age``.

    Growing, staleness is taken to grow as age² (a steady rotation; a random walk grows more
    slowly), its coefficient multiplied once more by ``acceleration``, the ratio of the last
    two measured coefficients when it exceeds 1 (the drift is speeding up, as when two
    eigenvalues approach each other). Shrinking, it is taken to grow linearly. The interval
    at most doubles and stays within [1, cap].
    """
    if age <= 0:
        return 1.0
    predicted = staleness * max(1.0, acceleration)
    if not math.isfinite(predicted) or predicted <= 0:
        factor = 2.0
    elif predicted < target:
        factor = min(2.0, math.sqrt(target / predicted))
    else:
        factor = max(0.125, target / predicted)
    return float(min(max(age * factor, 1.0), cap))


def _drift_terms(v: torch.Tensor, g: torch.Tensor, values: torch.Tensor,
                 images: torch.Tensor) -> Check:
    """The two parts of the staleness estimate, from H applied to [u₁, u_k, g₁] (the rows of
    ``images``; [u₁, g₁] when k = 1).

    After a refresh the basis V and the guard vectors G are Ritz vectors of one Rayleigh-Ritz
    step, so every coupling uᵢᵀHgⱼ is zero (to rounding). As θ moves, H changes and couplings
    appear. To first order a coupling b between a basis vector of eigenvalue θ and an outside
    one of eigenvalue μ turns the exact subspace by the angle b / (θ − μ), and the overlap
    loses its square over k.

    ``crossing`` is that sum for the couplings with g₁, where the gap is known: for the pair
    (u_k, g₁), which carries most of the risk (λ_k and λ_{k+1} are often within a percent of
    each other), sin²φ of the exact mixing angle φ of the 2×2 Rayleigh-Ritz problem on
    span(u_k, g₁) (near 1 once the two eigenvalues have crossed); for the other basis vectors
    (uⱼᵀHg₁ / (θⱼ − μ₁))². θ₁, θ_k and μ₁ are current Rayleigh quotients, the other θⱼ come
    from the last refresh.

    ``rho2`` is the rest of what u₁ and u_k couple to: ‖(I − VVᵀ − g₁g₁ᵀ) H u‖² summed over
    both. Its gaps are unknown (the bulk below λ_{k+1} is dense), so the tracker turns it into
    staleness with a factor κ calibrated at each refresh.
    """

    k = v.shape[0]
    vk_row = 0 if k == 1 else 1
    rayleigh = float(v[0] @ images[0])
    theta_k = float(v[k - 1] @ images[vk_row])
    theta = values.clone()
    theta[0], theta[k - 1] = rayleigh, theta_k
    pair = others = 0.0
    if g.shape[0]:  # none only when k equals the number of parameters (see _guarded_init)
        hg = images[-1]
        mu = float(g[0] @ hg)
        b = 0.5 * (float(v[k - 1] @ hg) + float(g[0] @ images[vk_row]))
        pair = math.sin(0.5 * math.atan2(2 * b, theta_k - mu)) ** 2
        gaps = theta[: k - 1] - mu
        others = float(((v[: k - 1] @ hg / gaps) ** 2).sum()) if bool((gaps > 0).all()) else (
            float("inf"))
    rho2 = 0.0
    for row in (0, vk_row) if k > 1 else (0,):
        rest = images[row] - (v @ images[row]) @ v
        if g.shape[0]:
            rest = rest - (g[0] @ rest) * g[0]
        rho2 += float(rest.pow(2).sum())
    return Check(crossing=(pair + others) / k, rho2=rho2, rayleigh=rayleigh, pair=pair)


def _check_gap(drift: float, age: int, threshold: float, cap: int) -> int:
    """Steps to the next drift check: until the estimate, growing as age², would reach a
    quarter of the threshold; 1 while the estimate is not calibrated (NaN); at most ``cap``."""
    if not math.isfinite(drift) or age <= 0:
        return 1
    if drift <= 0:
        return cap
    reach = age * math.sqrt(threshold / (4 * drift))
    return int(min(max(math.floor(reach - age), 1), cap))


def _step_seed(seed: int, step: int) -> int:
    """A seed for (seed, step) that differs for every pair a run can reach."""
    return (int(seed) * 1_000_003 + int(step)) % (2**63 - 1)
