"""Top-10 Hessian eigenpairs with `subspace` and with its peers, on the same checkpoint and data.

Three cases, all under the paper's MSE convention (0.5·‖f(x) − onehot(y)‖² summed over the
outputs, averaged over the samples) and with the model in eval mode:

``mlp``  the shipped sample ``sample_checkpoints/mlp_mnist1d.safetensors``: fc-tanh
         40 → 200 → 200 → 10 (50,410 parameters), all 5,000 MNIST-1D training samples.
``cnn``  the built-in ``cnn`` plugin on scikit-learn's digits ``[1, 8, 8]`` with 340 channels
         (1,057,750 parameters), trained here for 300 SGD steps (seed 0) and saved as a checkpoint
         under the cache folder; the Hessian is that of the first 128 samples (``--max-samples``),
         for every tool alike.
``wide`` the built-in ``mlp`` plugin, fc-tanh 40 → 3100 → 3100 → 10 (9,771,210 parameters) on
         MNIST-1D, trained here for 300 SGD steps; the Hessian is that of the first 256
         samples. At this size the solver's own time and memory (the basis) start to matter.

Tools (``--tools``; a peer that is not installed is reported and skipped):

``ours``                  ``subspace_cli.spectrum.compute_spectrum`` with its defaults
                          (on a CPU single-vector Lanczos, on CUDA blocks of 2; float32,
                          tol 1e-4, HVP method ``auto``, kept gradient graphs)
``arpack``                the same HVPs, solved by SciPy ``eigsh(which="LA")``
                          (``subspace_cli.eigensolver.arpack_eigenpairs``, tol 1e-4)
``pyhessian``             PyHessian 0.1 ``hessian(...).eigenvalues(top_n=10)`` (its defaults
                          ``maxIter=100, tol=1e-3``), full-batch mode
``eigenthings``           hessian-eigenthings 1.0 ``lanczos(k=10, max_iter=60,
                          reorthogonalize=True, which="LA")``
``eigenthings-defaults``  hessian-eigenthings 1.0 ``lanczos(k=10)`` (``max_iter=20``,
                          ``which="LM"``)
``pyhessian-tight``       the same with ``maxIter=1000, tol=1e-6`` (only when named)
``curvlinops``            curvlinops 3.0 ``HessianLinearOperator(...).to_scipy()`` with
                          ``eigsh(which="LA", tol=1e-4)``, same start vector as ``arpack``

Every tool runs in its own spawned process (so that its peak RSS is its own), with the model
and data loaded through ``subspace_cli.experiment.load_experiment`` before the clock starts; the
wall time covers building the tool's operator and solving. HVPs are counted where they happen
(our chunk products, PyHessian's ``hessian_vector_product``, the peers' operators), as
full-data HVP equivalents. Accuracy is against a float64 ARPACK reference (tol 1e-12, 12 pairs)
over our HVPs, computed once and cached next to the CNN checkpoint.

    python benchmarks/spectrum_peers.py                       # both cases, every tool
    python benchmarks/spectrum_peers.py --only mlp --repeat 3
    python benchmarks/spectrum_peers.py --tools ours,arpack --only cnn --max-samples 64

The peers are not dependencies of the project. Install them without letting pip replace the
CPU build of torch (backpack's torchvision requirement would), e.g.:

    pip install einops opt_einsum tqdm unfoldNd einconv linear_operator
    pip install --no-deps pyhessian==0.1 hessian-eigenthings==1.0.0a5 \\
        curvlinops-for-pytorch==3.0.1 backpack-for-pytorch==1.7.1
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

K = 10
REFERENCE_EXTRA = 2  # λ11, λ12 show the gap below the wanted subspace
REFERENCE_TOL = 1e-12
TARGET = 1e-6  # the accuracy a result must reach to count as "accurate"
PEER_TOL = 1e-4  # eigsh tolerance for the ARPACK-based peers, as for ours in float32
ROOT = Path(__file__).resolve().parents[1]
MLP_CHECKPOINT = ROOT / "sample_checkpoints" / "mlp_mnist1d.safetensors"
DEFAULT_CACHE = Path(tempfile.gettempdir()) / "subspace_benchmarks"

TOOLS = ("ours", "arpack", "pyhessian", "eigenthings", "eigenthings-defaults", "curvlinops")
OPTIONAL_TOOLS = ("pyhessian-tight",)  # only when named in --tools: thousands of HVPs
PEER_MODULES = {
    "pyhessian": "pyhessian",
    "pyhessian-tight": "pyhessian",
    "eigenthings": "hessian_eigenthings",
    "eigenthings-defaults": "hessian_eigenthings",
    "curvlinops": "curvlinops",
}
SETTINGS = {
    "ours": "defaults: Lanczos (1 vector on a CPU), float32, tol 1e-4, auto HVP",
    "arpack": "eigsh LA, ncv 21, tol 1e-4, our HVPs",
    "pyhessian": "power iteration + deflation, maxIter 100, tol 1e-3 (defaults)",
    "pyhessian-tight": "power iteration + deflation, maxIter 1000, tol 1e-6",
    "eigenthings": "Lanczos max_iter 60, reorthogonalize, LA",
    "eigenthings-defaults": "Lanczos max_iter 20, LM (defaults)",
    "curvlinops": "eigsh LA, ncv 21, tol 1e-4, its HVPs",
}


@dataclass(frozen=True)
class Case:
    """One checkpoint and the number of its training samples every tool sees."""

    name: str
    checkpoint: str
    max_samples: int | None
    description: str


@dataclass(frozen=True)
class Task:
    """What a worker process does: one tool on one case (or the reference, tool "reference")."""

    tool: str
    case: Case
    reference: str
    threads: int
    seed: int
    device: str


@dataclass
class Outcome:
    tool: str
    hvps: float = float("nan")
    seconds: float = float("nan")
    peak_rss_mib: float = float("nan")
    solve_rss_mib: float = float("nan")
    cuda_peak_mib: float | None = None
    max_rel_error: float = float("nan")
    overlap: float = float("nan")
    claimed: str = ""
    notes: str = ""
    error: str | None = None
    eigenvalues: list[float] = field(default_factory=list)


# --------------------------------------------------------------------------- shared helpers


def mse(output: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The paper's MSE, mean over samples: what every peer is given as its criterion."""
    target = torch.nn.functional.one_hot(y.long(), output.shape[-1]).to(output.dtype)
    return 0.5 * ((output - target) ** 2).sum(dim=1).mean()


class HalfSquaredError(torch.nn.Module):
    """:func:`mse` as a module; curvlinops reads ``reduction`` to weight batches (N_b / N)."""

    reduction = "mean"

    def forward(self, output: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return mse(output, y)


def weights_sha256(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, param in model.named_parameters():
        h.update(name.encode())
        h.update(param.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def load_case(case: Case, device: str) -> tuple[Any, torch.Tensor, torch.Tensor]:
    """The experiment (model in eval mode) and the inputs/labels every tool uses."""
    from subspace_cli.checkpoint import SpecOverrides
    from subspace_cli.experiment import load_experiment

    experiment = load_experiment(case.checkpoint, SpecOverrides())
    assert experiment.data is not None and experiment.data.x is not None
    assert experiment.loss == "mse", "the peers are given the MSE convention"
    n = len(experiment.data) if case.max_samples is None else case.max_samples
    x = experiment.data.x[:n].to(device)
    y = experiment.data.y[:n].to(device)
    experiment.model.to(device).eval()
    return experiment, x, y


def start_vector(n: int, seed: int) -> np.ndarray:
    """The start vector of :func:`subspace_cli.eigensolver.arpack_eigenpairs` (CPU generator)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=generator, dtype=torch.float64).numpy()


# --------------------------------------------------------------------------- the tools
# Each returns (eigenvalues (k,), eigenvectors (k, n), HVPs, claimed convergence, notes).

ToolResult = tuple[np.ndarray, np.ndarray, float, str, str]


def _count_our_products() -> list[float]:
    """Count every chunk product of :class:`HessianOperator`, the ``auto`` probe included."""
    from subspace_cli.hessian import HessianOperator

    counter = [0.0]
    original = HessianOperator._hvp  # every chunk product, the race's included

    def counted(self, method, x, y, vectors, index=None):  # type: ignore[no-untyped-def]
        counter[0] += vectors.shape[0] * x.shape[0] / self.n_samples
        return original(self, method, x, y, vectors, index)

    HessianOperator._hvp = counted  # type: ignore[method-assign]
    return counter


def run_ours(experiment: Any, x: torch.Tensor, y: torch.Tensor, task: Task) -> ToolResult:
    from subspace_cli.settings import SpectrumSettings
    from subspace_cli.spectrum import compute_spectrum

    counter = _count_our_products()
    solver = "arpack" if task.tool == "arpack" else "lanczos"
    settings = SpectrumSettings(
        k=K, solver=solver, max_samples=len(x), device=task.device, seed=task.seed
    )
    run = compute_spectrum(experiment, settings)
    r = run.result
    claimed = f"{sum(r.converged)}/{K}"
    notes = f"{r.solver}, HVP {run.hvp_method} ({run.method_choice}), solver counts {r.hvp_count}"
    if r.solver != "arpack":
        notes += f", {r.restarts} restarts, basis {r.basis_bytes / 2**20:.0f} MiB"
    notes += f", graphs {run.graphs_kept}/{run.n_chunks} kept ({run.graph_bytes / 2**20:.0f} MiB)"
    return r.eigenvalues.cpu().numpy(), r.eigenvectors.cpu().numpy(), counter[0], claimed, notes


def run_pyhessian(experiment: Any, x: torch.Tensor, y: torch.Tensor, task: Task) -> ToolResult:
    import pyhessian  # noqa: F401 - binds the module below

    module = sys.modules["pyhessian.hessian"]
    counter = [0]
    original = module.hessian_vector_product

    def counted(grads, params, v):  # type: ignore[no-untyped-def]
        counter[0] += 1
        return original(grads, params, v)

    module.hessian_vector_product = counted
    torch.manual_seed(task.seed)  # PyHessian draws its start vectors from the global RNG
    # Full-batch mode (data=...): one graph over all samples, so the Hessian is the full-data
    # mean exactly. (Its dataloader mode weights batches by size too, but recomputes the graph.)
    hessian = module.hessian(experiment.model, mse, data=(x, y), cuda=task.device == "cuda")
    if task.tool == "pyhessian-tight":
        values, vectors = hessian.eigenvalues(maxIter=1000, tol=1e-6, top_n=K)
    else:
        values, vectors = hessian.eigenvalues(top_n=K)
    flat = torch.stack([torch.cat([t.reshape(-1) for t in v]) for v in vectors])
    for param in experiment.model.parameters():
        param.grad = None  # PyHessian leaves a create_graph gradient behind
    return np.asarray(values), flat.detach().cpu().numpy(), counter[0], "n/a", ""


def run_eigenthings(experiment: Any, x: torch.Tensor, y: torch.Tensor, task: Task) -> ToolResult:
    from hessian_eigenthings import HessianOperator, lanczos, supervised_loss

    # One batch holding all samples: its full_dataset mode averages batches unweighted, which
    # is the full-data mean only for equal batch sizes.
    operator = HessianOperator(experiment.model, [(x, y)], supervised_loss(mse))
    counter = [0]
    original = operator.matvec

    def counted(v: torch.Tensor) -> torch.Tensor:
        counter[0] += 1
        return original(v)

    operator.matvec = counted  # type: ignore[method-assign]
    if task.tool == "eigenthings-defaults":
        result = lanczos(operator, k=K, seed=task.seed)
    else:
        result = lanczos(
            operator, k=K, max_iter=60, reorthogonalize=True, which="LA", seed=task.seed
        )
    claimed = f"{int(result.converged.sum())}/{K}"
    notes = f"{result.iterations} Lanczos steps"
    return (
        result.eigenvalues.detach().cpu().numpy(),
        result.eigenvectors.detach().cpu().numpy(),
        counter[0],
        claimed,
        notes,
    )


def run_curvlinops(experiment: Any, x: torch.Tensor, y: torch.Tensor, task: Task) -> ToolResult:
    from curvlinops import HessianLinearOperator
    from scipy.sparse.linalg import eigsh

    counter = [0.0]
    original = HessianLinearOperator._matmat_batch

    def counted(self, X, y_batch, M):  # type: ignore[no-untyped-def]
        counter[0] += M[0].shape[-1] * X.shape[0] / self._N_data
        return original(self, X, y_batch, M)

    HessianLinearOperator._matmat_batch = counted  # type: ignore[method-assign]
    params = [p for p in experiment.model.parameters() if p.requires_grad]
    # Defaults kept, including check_deterministic=True (2 extra HVPs and 2 gradients).
    operator = HessianLinearOperator(experiment.model, HalfSquaredError(), params, [(x, y)])
    check = counter[0]
    n = sum(p.numel() for p in params)
    values, vectors = eigsh(
        operator.to_scipy(), k=K, which="LA", tol=PEER_TOL, v0=start_vector(n, task.seed)
    )
    return values, vectors.T, counter[0], f"{K}/{K}", f"{check:.0f} HVPs in its determinism check"


RUNNERS = {
    "ours": run_ours,
    "arpack": run_ours,
    "pyhessian": run_pyhessian,
    "pyhessian-tight": run_pyhessian,
    "eigenthings": run_eigenthings,
    "eigenthings-defaults": run_eigenthings,
    "curvlinops": run_curvlinops,
}


# --------------------------------------------------------------------------- worker processes


def compute_reference(experiment: Any, x: torch.Tensor, task: Task) -> dict[str, Any]:
    from subspace_cli.eigensolver import arpack_eigenpairs
    from subspace_cli.hessian import HessianOperator

    op = HessianOperator(
        experiment.model,
        experiment.data,
        experiment.loss,
        max_samples=len(x),
        device=task.device,
        dtype=torch.float64,
        method="forward",
    )
    started = time.perf_counter()
    result = arpack_eigenpairs(
        op, K, extra=REFERENCE_EXTRA, tol=REFERENCE_TOL, max_hvps=5000, seed=task.seed
    )
    return {
        "eigenvalues": result.eigenvalues.cpu().numpy(),
        "eigenvectors": result.eigenvectors[:K].cpu().numpy(),
        "residuals": result.residuals.cpu().numpy(),
        "hvps": np.asarray(result.hvp_count),
        "seconds": np.asarray(time.perf_counter() - started),
    }


def accuracy(values: np.ndarray, vectors: np.ndarray, reference: Any) -> tuple[float, float]:
    """Max relative error of the top-K eigenvalues, and subspace overlap ‖V_a V_bᵀ‖_F² / K.

    Each tool's pairs are sorted by eigenvalue first; its vectors are orthonormalised (QR) so
    that the overlap is that of the subspaces they span.
    """
    ref_values = reference["eigenvalues"][:K]
    order = np.argsort(values)[::-1][:K]
    values = np.asarray(values, dtype=np.float64)[order]
    errors = np.abs(values - ref_values[: len(values)]) / np.abs(ref_values[: len(values)])
    if len(values) < K:
        errors = np.append(errors, np.inf)
    basis, _ = np.linalg.qr(np.asarray(vectors, dtype=np.float64)[order].T)
    overlap = float(((reference["eigenvectors"] @ basis) ** 2).sum()) / K
    return float(errors.max()), overlap


def worker(connection: Any, task: Task) -> None:
    """Run one task in this (spawned) process and send back a dict."""
    try:
        torch.set_num_threads(task.threads)
        experiment, x, y = load_case(task.case, task.device)
        model = experiment.model
        sha = weights_sha256(model)
        if task.tool == "reference":
            arrays = compute_reference(experiment, x, task)
            path = Path(task.reference)
            tmp = path.with_suffix(".tmp.npz")
            np.savez(tmp, sha256=np.asarray(sha), n_samples=np.asarray(len(x)), **arrays)
            os.replace(tmp, path)
            connection.send({"ok": True})
            return
        reference = np.load(task.reference)
        if str(reference["sha256"]) != sha or int(reference["n_samples"]) != len(x):
            raise RuntimeError("the reference was computed for other weights or samples")
        reference_arrays = {key: reference[key] for key in ("eigenvalues", "eigenvectors")}
        del reference
        if task.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        rss_before = peak_rss_mib()
        started = time.perf_counter()
        values, vectors, hvps, claimed, notes = RUNNERS[task.tool](experiment, x, y, task)
        seconds = time.perf_counter() - started
        rss_after = peak_rss_mib()
        if model.training or any(module.training for module in model.modules()):
            notes += "; MODEL LEFT IN TRAIN MODE"
        if weights_sha256(model) != sha:
            notes += "; WEIGHTS CHANGED"
        error, overlap = accuracy(values, vectors, reference_arrays)
        outcome = Outcome(
            tool=task.tool,
            hvps=float(hvps),
            seconds=seconds,
            peak_rss_mib=rss_after,
            solve_rss_mib=rss_after - rss_before,
            cuda_peak_mib=(
                torch.cuda.max_memory_allocated() / 2**20 if task.device == "cuda" else None
            ),
            max_rel_error=error,
            overlap=overlap,
            claimed=claimed,
            notes=notes.strip("; "),
            eigenvalues=sorted((float(v) for v in values), reverse=True),
        )
        connection.send({"ok": True, "outcome": asdict(outcome)})
    except BaseException as error:  # noqa: BLE001 - reported by the parent, the run goes on
        connection.send(
            {
                "ok": False,
                "error": f"{type(error).__name__}: {error}",
                "traceback": traceback.format_exc(),
            }
        )
    finally:
        connection.close()


def spawn(task: Task, timeout: float) -> dict[str, Any]:
    context = multiprocessing.get_context("spawn")
    parent, child = context.Pipe(duplex=False)
    process = context.Process(target=worker, args=(child, task))
    process.start()
    child.close()
    try:
        if not parent.poll(timeout):
            process.kill()
            return {"ok": False, "error": f"timed out after {timeout:.0f} s"}
        message = parent.recv()
    except EOFError:
        message = {"ok": False, "error": f"worker died (exit code {process.exitcode})"}
    finally:
        process.join(30)
        if process.is_alive():
            process.kill()
    return message


# --------------------------------------------------------------------------- setup and report


def cnn_checkpoint(cache: Path, channels: int, steps: int) -> Path:
    """Train the ≥1M-parameter CNN briefly (fixed seed) and save it, once per configuration."""
    return trained_checkpoint(cache / f"cnn_digits_c{channels}_s{steps}.safetensors", "cnn",
                              {"channels": channels, "kernel_size": 3}, "digits",
                              {"shape": "image"}, steps)


def wide_checkpoint(cache: Path, width: int, steps: int) -> Path:
    """The ~10M-parameter case: fc-tanh 40 → width → width → 10 on MNIST-1D, trained briefly."""
    return trained_checkpoint(cache / f"wide_mnist1d_w{width}_s{steps}.safetensors", "mlp",
                              {"widths": [width, width], "activation": "tanh"}, "mnist1d",
                              {"n_train": 5000, "seed": 42}, steps)


def trained_checkpoint(path: Path, model_name: str, model_options: dict[str, Any],
                       data_name: str, data_config: dict[str, Any], steps: int) -> Path:
    """Train a built-in model for ``steps`` SGD steps (lr 0.01, batch 50, seed 0), save it."""
    from subspace_cli.checkpoint import ExperimentSpec, write_checkpoint
    from subspace_cli.experiment import build_data, build_model, complete_model_config
    from subspace_cli.losses import loss_sum
    from subspace_cli.training import evaluate

    if path.exists():
        return path
    data = build_data(data_name, data_config, from_user=True)
    model_config = complete_model_config(model_name, model_options, data, from_user=True)
    torch.manual_seed(0)
    model = build_model(model_name, model_config, from_user=True)
    assert data.x is not None and data.y is not None
    generator = torch.Generator().manual_seed(0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    started = time.perf_counter()
    before = evaluate(model, data, "mse")
    for _ in range(steps):
        batch = torch.randint(len(data), (50,), generator=generator)
        optimizer.zero_grad()
        (loss_sum("mse", model(data.x[batch]), data.y[batch]) / 50).backward()
        optimizer.step()
    after = evaluate(model, data, "mse")
    print(
        f"# trained {path.name} for {steps} SGD steps (lr 0.01, batch 50, seed 0) in"
        f" {time.perf_counter() - started:.0f} s: train loss {before.loss:.4f} -> {after.loss:.4f},"
        f" accuracy {before.accuracy:.3f} -> {after.accuracy:.3f}",
        flush=True,
    )
    spec = ExperimentSpec(model_name, model_config, data_name, data_config, "mse", step=steps)
    write_checkpoint(path, model.state_dict(), spec.to_metadata(), overwrite=True)
    return path


def reference_path(case: Case, cache: Path, seed: int) -> Path:
    from subspace_cli.checkpoint import read_checkpoint

    sha = read_checkpoint(case.checkpoint).sha256()[:16]
    return cache / f"reference_{case.name}_{sha}_n{case.max_samples or 'all'}_seed{seed}.npz"


def machine_summary(threads: int) -> list[str]:
    model = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = " ".join(f"{v:.2f}" for v in os.getloadavg())
    # The library is under development: name the exact sources that were measured.
    sources = ", ".join(
        f"{name} {hashlib.sha256((ROOT / 'subspace_cli' / name).read_bytes()).hexdigest()[:12]}"
        for name in ("eigensolver.py", "lanczos.py", "hessian.py", "hvp.py", "operator.py",
                     "functional.py", "spectrum.py")
    )
    return [
        f"# machine: {model}, {os.cpu_count()} logical cores, torch {torch.__version__},"
        f" {threads} torch threads per tool, Python {platform.python_version()}",
        f"# load average (1/5/15 min) at start: {load}",
        f"# subspace_cli sources (sha256): {sources}",
    ]


def report(case: Case, outcomes: dict[str, list[dict[str, Any]]], reference: Any) -> None:
    from tabulate import tabulate

    times = {
        tool: statistics.median(r["outcome"]["seconds"] for r in runs)
        for tool, runs in outcomes.items()
        if all(r.get("ok") for r in runs)
    }
    fastest = min(times.values()) if times else float("nan")
    ours = times.get("ours")
    ours_hvps = None
    rows = []
    for tool, runs in outcomes.items():
        failed = [r for r in runs if not r.get("ok")]
        if failed:
            rows.append([tool, SETTINGS[tool], f"failed: {failed[0]['error']}"] + [""] * 10)
            continue
        first = runs[0]["outcome"]
        seconds = [r["outcome"]["seconds"] for r in runs]
        if tool == "ours":
            ours_hvps = first["hvps"]
        spread = f" ({min(seconds):.1f}-{max(seconds):.1f})" if len(runs) > 1 else ""
        accurate = first["max_rel_error"] <= TARGET
        cuda = first["cuda_peak_mib"]
        rows.append(
            [
                tool,
                SETTINGS[tool],
                f"{first['hvps']:.1f}".removesuffix(".0"),
                f"{times[tool]:.1f}{spread}",
                f"{times[tool] / fastest:.2f}",
                f"{times[tool] / ours:.2f}" if ours else "",
                f"{max(r['outcome']['peak_rss_mib'] for r in runs):.0f}"
                + (f" / {cuda:.0f}" if cuda is not None else ""),
                f"{max(r['outcome']['solve_rss_mib'] for r in runs):.0f}",
                f"{first['max_rel_error']:.1e}",
                f"{first['overlap']:.6f}",
                "yes" if accurate else "no",
                first["claimed"],
                first["notes"],
            ]
        )
    if ours_hvps:
        for row in rows:
            if row[2] and not row[2].startswith("failed"):
                row[2] += f" ({float(row[2]) / ours_hvps:.2f}×)"
    headers = [
        "tool",
        "settings",
        "HVPs (× ours)",
        "seconds",
        "× fastest",
        "× ours",
        "peak RSS MiB"
        + (
            " / CUDA"
            if any(
                r.get("ok") and r["outcome"]["cuda_peak_mib"] is not None
                for runs in outcomes.values()
                for r in runs
            )
            else ""
        ),
        "solve +RSS MiB",
        "max rel. λ error",
        "overlap",
        f"≤ {TARGET:g}",
        "claims conv.",
        "notes",
    ]
    print(f"\n## {case.name}: {case.description}")
    values = reference["eigenvalues"]
    print(
        f"# reference: float64 ARPACK over our HVPs, tol {REFERENCE_TOL:g}, {int(reference['hvps'])}"
        f" HVPs, {float(reference['seconds']):.0f} s, max residual"
        f" {float(reference['residuals'].max()):.1e}"
    )
    print("# λ1..λ12: " + " ".join(f"{v:.6g}" for v in values))
    print(f"# gap λ10/λ11 = {values[K - 1] / values[K]:.4f}")
    print(tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True))
    accurate = [
        (row[0], float(row[2].split()[0]), times[row[0]]) for row in rows if row[10] == "yes"
    ]
    if accurate:
        fewest = min(accurate, key=lambda item: item[1])
        quickest = min(accurate, key=lambda item: item[2])
        print(
            f"# reaching max rel. error ≤ {TARGET:g}: fewest HVPs {fewest[0]} ({fewest[1]:g}),"
            f" least time {quickest[0]} ({quickest[2]:.1f} s)"
        )
        ours = [item for item in accurate if item[0] == "ours"]
        if ours:
            print(
                f"# ours: {ours[0][1] / fewest[1]:.2f}× the fewest HVPs,"
                f" {ours[0][2] / quickest[2]:.2f}× the least time"
            )
    else:
        print(f"# no tool reached max rel. error ≤ {TARGET:g}")
    for tool, runs in outcomes.items():
        for r in runs:
            if not r.get("ok") and r.get("traceback"):
                print(f"# {tool} traceback:\n{r['traceback']}", file=sys.stderr)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(__doc__.split("\n")[2:]),
    )
    parser.add_argument("--only", choices=("mlp", "cnn", "wide"), help="run one case only")
    parser.add_argument(
        "--max-samples",
        type=int,
        help="first N training samples, for every tool (default: MLP all 5,000, CNN 128)",
    )
    parser.add_argument("--tools", default=",".join(TOOLS), help="comma-separated subset")
    parser.add_argument("--repeat", type=int, default=1, help="runs per tool; median time shown")
    parser.add_argument(
        "--threads",
        type=int,
        default=torch.get_num_threads(),
        help="torch threads in every tool's process (default: torch's default)",
    )
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cnn-channels", type=int, default=340)
    parser.add_argument("--cnn-steps", type=int, default=300)
    parser.add_argument("--wide-width", type=int, default=3100,
                        help="hidden width of the wide MLP (3100: 9,771,210 params)")
    parser.add_argument("--wide-steps", type=int, default=300)
    parser.add_argument("--wide-samples", type=int, default=256)
    parser.add_argument("--timeout", type=float, default=900, help="seconds per tool run")
    parser.add_argument(
        "--cache",
        type=Path,
        default=DEFAULT_CACHE,
        help=f"CNN checkpoint and references (default {DEFAULT_CACHE})",
    )
    parser.add_argument("--json", type=Path, help="also write all outcomes to this file")
    args = parser.parse_args()

    tools = [t.strip() for t in args.tools.split(",") if t.strip()]
    unknown = [t for t in tools if t not in TOOLS + OPTIONAL_TOOLS]
    if unknown:
        parser.error(f"unknown tools {unknown}; choose from {', '.join(TOOLS + OPTIONAL_TOOLS)}")
    import importlib.util

    missing = [
        t for t in tools if t in PEER_MODULES and importlib.util.find_spec(PEER_MODULES[t]) is None
    ]
    for tool in missing:
        print(f"# {tool}: {PEER_MODULES[tool]} is not installed, skipped")
    tools = [t for t in tools if t not in missing]

    args.cache.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)  # for training the CNN here
    print("\n".join(machine_summary(args.threads)), flush=True)
    if os.getloadavg()[0] > 1 and args.threads > 1:
        print(
            "# warning: the machine is already loaded; OpenMP threads that compete for busy"
            " cores can make every tool many times slower (try --threads 1)",
            flush=True,
        )
    cases = []
    if args.only in (None, "mlp"):
        cases.append(
            Case(
                "mlp",
                str(MLP_CHECKPOINT),
                args.max_samples,
                "fc-tanh 40-200-200-10 (50,410 params), sample checkpoint, MNIST-1D, "
                f"{args.max_samples or 'all 5,000'} samples",
            )
        )
    if args.only in (None, "cnn"):
        path = cnn_checkpoint(args.cache, args.cnn_channels, args.cnn_steps)
        samples = args.max_samples or 128
        from subspace_cli.checkpoint import read_checkpoint

        n_params = read_checkpoint(path).n_elements
        cases.append(
            Case(
                "cnn",
                str(path),
                samples,
                f"cnn-relu, {args.cnn_channels} channels ({n_params:,} params), digits [1, 8, 8],"
                f" {args.cnn_steps} SGD steps, first {samples} samples",
            )
        )

    if args.only in (None, "wide"):
        path = wide_checkpoint(args.cache, args.wide_width, args.wide_steps)
        samples = args.max_samples or args.wide_samples
        from subspace_cli.checkpoint import read_checkpoint

        n_params = read_checkpoint(path).n_elements
        cases.append(
            Case(
                "wide",
                str(path),
                samples,
                f"fc-tanh 40-{args.wide_width}-{args.wide_width}-10 ({n_params:,} params),"
                f" MNIST-1D, {args.wide_steps} SGD steps, first {samples} samples",
            )
        )

    everything: dict[str, Any] = {}
    for case in cases:
        ref = reference_path(case, args.cache, args.seed)
        if not ref.exists():
            print(
                f"# computing the float64 reference for {case.name} (cached in {ref}) ...",
                flush=True,
            )
            started = time.perf_counter()
            message = spawn(
                Task("reference", case, str(ref), args.threads, args.seed, args.device),
                timeout=6 * 3600,
            )
            if not message.get("ok"):
                print(message.get("traceback", message["error"]), file=sys.stderr)
                raise SystemExit(f"reference for {case.name} failed: {message['error']}")
            print(f"# reference done in {time.perf_counter() - started:.0f} s", flush=True)
        reference = np.load(ref)
        outcomes: dict[str, list[dict[str, Any]]] = {tool: [] for tool in tools}
        for repeat in range(args.repeat):
            for tool in tools:
                message = spawn(
                    Task(tool, case, str(ref), args.threads, args.seed, args.device), args.timeout
                )
                outcomes[tool].append(message)
                status = (
                    f"{message['outcome']['seconds']:.1f} s, {message['outcome']['hvps']:.0f} HVPs"
                    if message.get("ok")
                    else message["error"]
                )
                print(
                    f"# {case.name} run {repeat + 1}/{args.repeat} {tool}: {status}",
                    file=sys.stderr,
                    flush=True,
                )
        report(case, outcomes, reference)
        everything[case.name] = {
            "case": asdict(case),
            "reference_eigenvalues": reference["eigenvalues"].tolist(),
            "outcomes": outcomes,
        }
    load = " ".join(f"{v:.2f}" for v in os.getloadavg())
    print(f"\n# load average (1/5/15 min) at the end: {load}")
    if args.json:
        args.json.write_text(json.dumps(everything, indent=1, default=str))


if __name__ == "__main__":
    main()
