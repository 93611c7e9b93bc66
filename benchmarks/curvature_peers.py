"""The Gauss–Newton matrix's top eigenvalues: ``subspace spectrum --curvature ggn`` against
curvlinops' ``GGNLinearOperator`` with SciPy's ``eigsh``, both against a dense float64 GGN
(issue 17). Prints the time, the products and the worst relative eigenvalue error of each,
and the ratios to curvlinops measured in the same run.

    OMP_NUM_THREADS=1 python benchmarks/curvature_peers.py        # the CNN sample, k 5

Then the spectral density: ``subspace density --curvature ggn`` against curvlinops'
``lanczos_approximate_spectrum`` and hessian-eigenthings' ``spectral_density`` (on its
``GGNOperator``, the whole data as one batch), with the same probes count, Lanczos steps and Gaussian width
(curvlinops' σ from its ``kappa``), each scored by the L1 distance to the dense spectrum
smoothed by that width.

The dense reference (``benchmarks/ggn_dense_check.py``'s construction, on two threads, not
timed) takes minutes and is cached in ``--cache`` by the weights' hash. Timed tools run one
at a time, one thread each. curvlinops takes the loss as ``MSELoss(reduction="sum")``, whose
GGN is 2N times ours (the paper's ½‖f − y‖² averaged over N): its eigenvalues are divided by
2N. curvlinops is installed as in docs/BENCHMARKS.md ("Command and machine").
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import os
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent


def dense_reference(experiment, cache: Path) -> np.ndarray:
    """Every eigenvalue of the dense float64 GGN, descending (cached)."""
    sha = experiment.checkpoint.sha256()[:16]
    path = cache / f"ggn_dense_all_{sha}_{len(experiment.data)}.npy"
    if path.exists():
        return np.load(path)
    spec = importlib.util.spec_from_file_location("ggn_dense_check",
                                                  ROOT / "benchmarks" / "ggn_dense_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    torch.set_num_threads(2)
    g = module.dense_ggn(experiment.model, experiment.data, experiment.loss)
    values = torch.linalg.eigvalsh(g).flip(0).numpy()
    cache.mkdir(parents=True, exist_ok=True)
    np.save(path, values)
    return values


def run_ours(checkpoint: str, k: int, dtype: str) -> tuple[np.ndarray, float, int]:
    from subspace_cli.checkpoint import SpecOverrides
    from subspace_cli.experiment import load_experiment
    from subspace_cli.settings import SpectrumSettings
    from subspace_cli.spectrum import compute_spectrum

    experiment = load_experiment(checkpoint, SpecOverrides())
    started = time.perf_counter()
    run = compute_spectrum(experiment, SpectrumSettings(k=k, curvature="ggn", dtype=dtype,
                                                        device="cpu"))
    return run.result.eigenvalues.numpy(), time.perf_counter() - started, run.result.hvp_count


def run_curvlinops(checkpoint: str, k: int, tol: float) -> tuple[np.ndarray, float, int]:
    from curvlinops import GGNLinearOperator
    from scipy.sparse.linalg import eigsh

    from subspace_cli.checkpoint import SpecOverrides
    from subspace_cli.experiment import load_experiment

    experiment = load_experiment(checkpoint, SpecOverrides())
    model, data = experiment.model.eval(), experiment.data
    x, y = data.x, torch.nn.functional.one_hot(data.y, data.num_classes).float()
    params = [p for p in model.parameters() if p.requires_grad]
    count = [0]
    started = time.perf_counter()
    operator = GGNLinearOperator(model, torch.nn.MSELoss(reduction="sum"), params,
                                 [(x[i:i + 1000], y[i:i + 1000]) for i in range(0, len(x), 1000)],
                                 check_deterministic=False)
    scipy_op = operator.to_scipy()
    matvec = scipy_op.matvec

    def counted(v):  # one GGN-vector product over the full data
        count[0] += 1
        return matvec(v)

    from scipy.sparse.linalg import LinearOperator

    n = scipy_op.shape[0]
    start = np.random.default_rng(0).standard_normal(n)
    values, _ = eigsh(LinearOperator((n, n), matvec=counted, dtype=np.float64), k=k,
                      which="LA", tol=tol, v0=start)
    values = np.sort(values)[::-1] / (2 * len(x))
    return values, time.perf_counter() - started, count[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default="sample_checkpoints/cnn_digits.safetensors")
    parser.add_argument("-k", type=int, default=5)
    parser.add_argument("--cache", type=Path, default=Path("/tmp/subspace_curvature_bench"))
    parser.add_argument("--runs", type=int, default=5, help="density: probes")
    parser.add_argument("--steps", type=int, default=40, help="density: Lanczos steps")
    args = parser.parse_args()
    from tabulate import tabulate

    from subspace_cli.checkpoint import SpecOverrides
    from subspace_cli.experiment import load_experiment

    load = os.getloadavg()
    spectrum = dense_reference(load_experiment(args.checkpoint, SpecOverrides()), args.cache)
    reference = spectrum[: args.k]
    torch.set_num_threads(1)
    results = {
        "curvlinops GGN + eigsh (float32, tol 1e-6)": run_curvlinops(args.checkpoint, args.k, 1e-6),
        "subspace --curvature ggn (float32)": run_ours(args.checkpoint, args.k, "float32"),
        "subspace --curvature ggn (float64)": run_ours(args.checkpoint, args.k, "float64"),
    }
    base = results["curvlinops GGN + eigsh (float32, tol 1e-6)"]
    rows = []
    for name, (values, seconds, products) in results.items():
        error = float(np.max(np.abs(values[: args.k] - reference) / np.abs(reference)))
        rows.append([name, f"{seconds:.2f}", products, f"{seconds / base[1]:.2f}",
                     f"{products / base[2]:.2f}", f"{error:.1e}"])
    digest = hashlib.sha256((ROOT / "subspace_cli" / "curvature.py").read_bytes()).hexdigest()
    print(f"{args.checkpoint}: top {args.k} of the GGN; dense float64 reference λ "
          f"{', '.join(f'{v:.6f}' for v in reference)}; curvature.py {digest[:12]}; load "
          f"average {load[0]:.2f} before, {os.getloadavg()[0]:.2f} after")
    print(tabulate(rows, headers=["tool", "seconds", "products", "÷ curvlinops s",
                                  "÷ curvlinops products", "max rel. error"]))
    print()
    density_table(args.checkpoint, spectrum, args.runs, args.steps)


def _exact(grid: np.ndarray, spectrum: np.ndarray, width: float) -> np.ndarray:
    """The dense spectrum smoothed by N(0, width²): (1/n) Σᵢ N(t; λᵢ, width²)."""
    out = np.zeros_like(grid)
    for start in range(0, len(spectrum), 2000):
        z = (grid[:, None] - spectrum[None, start:start + 2000]) / width
        out += np.exp(-0.5 * z**2).sum(1)
    return out / (len(spectrum) * width * np.sqrt(2 * np.pi))


def density_table(checkpoint: str, spectrum: np.ndarray, runs: int, steps: int) -> None:
    """The GGN's density by SLQ: ours against curvlinops' lanczos_approximate_spectrum, each
    against the dense spectrum smoothed with the same Gaussian width, as the L1 distance
    ∫|ρ̂ − ρ| dt over the estimate's own grid (0: exact, 2: disjoint)."""
    from curvlinops import GGNLinearOperator, lanczos_approximate_spectrum
    from tabulate import tabulate

    from subspace_cli.checkpoint import SpecOverrides
    from subspace_cli.density import spectral_density
    from subspace_cli.experiment import load_experiment
    from subspace_cli.settings import SpectrumSettings
    from subspace_cli.spectrum import curvature_operator

    trapezoid = getattr(np, "trapezoid", None) or np.trapz
    lo, hi = float(spectrum.min()), float(spectrum.max())
    margin, kappa, points = 0.05, 3.0, 1024
    d = (hi - lo) * (1 + 2 * margin) / 2  # curvlinops' grid half-width
    width = d * 2 / (steps - 1) / np.sqrt(8 * np.log(kappa))  # its σ in eigenvalue units
    experiment = load_experiment(checkpoint, SpecOverrides())
    model, data = experiment.model.eval(), experiment.data
    x, y = data.x, torch.nn.functional.one_hot(data.y, data.num_classes).float()
    count = [0.0]
    original = GGNLinearOperator._matmat_batch

    def counted(self, X, y_batch, M):  # type: ignore[no-untyped-def]
        count[0] += M[0].shape[-1] * X.shape[0] / self._N_data
        return original(self, X, y_batch, M)

    GGNLinearOperator._matmat_batch = counted  # type: ignore[method-assign]
    started = time.perf_counter()
    operator = GGNLinearOperator(model, torch.nn.MSELoss(reduction="sum"),
                                 [p for p in model.parameters() if p.requires_grad],
                                 [(x[i:i + 1000], y[i:i + 1000]) for i in range(0, len(x), 1000)],
                                 check_deterministic=False)
    scale = 2 * len(x)  # their GGN is 2N times ours
    grid_t, density_t = lanczos_approximate_spectrum(
        operator, ncv=steps, num_points=points, num_repeats=runs, kappa=kappa,
        boundaries=(lo * scale, hi * scale), margin=margin)
    theirs_s = time.perf_counter() - started
    grid_c = grid_t.double().numpy() / scale
    density_c = density_t.double().numpy() * scale
    from hessian_eigenthings import GGNOperator
    from hessian_eigenthings import spectral_density as eigenthings_density
    from hessian_eigenthings.loss_fns.standard import supervised_forward

    def half_squared_error(output, batch):  # ours: (1/N) Σ ½‖f − y‖², one batch of all
        return 0.5 * ((output - batch[1]) ** 2).sum() / len(batch[1])

    eigen_op = GGNOperator(model, [(x, y)], supervised_forward, half_squared_error)
    eigen_count = [0]
    eigen_matvec = eigen_op.matvec

    def eigen_counted(v):  # type: ignore[no-untyped-def]
        eigen_count[0] += 1
        return eigen_matvec(v)

    eigen_op.matvec = eigen_counted  # type: ignore[method-assign]
    started = time.perf_counter()
    result = eigenthings_density(eigen_op, num_runs=runs, lanczos_steps=steps,
                                 num_grid_points=points, sigma=width, seed=0)
    eigen_s = time.perf_counter() - started
    op = curvature_operator(experiment, SpectrumSettings(curvature="ggn", device="cpu"))
    started = time.perf_counter()
    ours = spectral_density(op, runs=runs, steps=steps, trace_probes=0, width=width,
                            grid_points=points)
    ours_s = time.perf_counter() - started
    rows = []
    for name, grid, density, seconds, products in (
            ("curvlinops lanczos_approximate_spectrum", grid_c, density_c, theirs_s, count[0]),
            ("hessian-eigenthings spectral_density", result.grid.double().numpy(),
             result.density.double().numpy(), eigen_s, eigen_count[0]),
            ("subspace density --curvature ggn", ours.grid, ours.density, ours_s,
             ours.hvp_count)):
        error = float(trapezoid(np.abs(density - _exact(grid, spectrum, width)), grid))
        rows.append([name, f"{seconds:.2f}", f"{products:.0f}", f"{error:.4f}"])
    print(f"density: {runs} runs x {steps} Lanczos steps, Gaussian width {width:.4g} (curvlinops' "
          f"kappa {kappa}), against the dense spectrum of {len(spectrum):,} eigenvalues "
          "smoothed alike")
    print(tabulate(rows, headers=["tool", "seconds", "products", "L1 distance to exact"]))


if __name__ == "__main__":
    main()
