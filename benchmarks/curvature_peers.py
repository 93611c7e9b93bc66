"""The Gauss–Newton matrix's top eigenvalues: ``subspace spectrum --curvature ggn`` against
curvlinops' ``GGNLinearOperator`` with SciPy's ``eigsh``, both against a dense float64 GGN
(issue 17). Prints the time, the products and the worst relative eigenvalue error of each,
and the ratios to curvlinops measured in the same run.

    OMP_NUM_THREADS=1 python benchmarks/curvature_peers.py        # the CNN sample, k 5

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


def dense_reference(experiment, k: int, cache: Path) -> np.ndarray:
    sha = experiment.checkpoint.sha256()[:16]
    path = cache / f"ggn_dense_{sha}_{len(experiment.data)}.npy"
    if path.exists():
        return np.load(path)[:k]
    spec = importlib.util.spec_from_file_location("ggn_dense_check",
                                                  ROOT / "benchmarks" / "ggn_dense_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    torch.set_num_threads(2)
    g = module.dense_ggn(experiment.model, experiment.data, experiment.loss)
    values = torch.linalg.eigvalsh(g).flip(0)[:20].numpy()
    cache.mkdir(parents=True, exist_ok=True)
    np.save(path, values)
    return values[:k]


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
    args = parser.parse_args()
    from tabulate import tabulate

    from subspace_cli.checkpoint import SpecOverrides
    from subspace_cli.experiment import load_experiment

    load = os.getloadavg()
    reference = dense_reference(load_experiment(args.checkpoint, SpecOverrides()), args.k,
                                args.cache)
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


if __name__ == "__main__":
    main()
