"""Measure eigensolver variants on the paper's fc-tanh MLP (40 → 200 → 200 → 10, ~50k params).

Trains the MLP with a few hundred SGD steps on MNIST-1D (5,000 samples; random data when
``subspace_plugins`` or ``mnist1d`` is unavailable), computes a float64 ARPACK reference with
tol 1e-12 (a dense 50k × 50k Hessian is too large), then prints for k = 10 and each solver
variant: HVPs, wall time and max relative eigenvalue error. Every variant is run over a sweep of
tolerances, because a user picks a tolerance, not an HVP count; the cost "to 1e-6" is that of the
loosest tolerance whose answer is within 1e-6 of the reference.

It also prints the HVP timings of the four methods (forward- and reverse-over-reverse, batched
or one vector at a time) for the MLP and a small CNN, and the float32 residual floor that sets
the float32 default tolerance.

    python benchmarks/solver_choice.py            # full table (~15 min on one CPU core)
    python benchmarks/solver_choice.py --quick    # fewer variants
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from subspace_cli.data import TrainingData
from subspace_cli.eigensolver import (
    EigenResult,
    arpack_eigenpairs,
    top_eigenpairs,
)
from subspace_cli.hessian import HessianOperator


def load_data(n: int, seed: int) -> tuple[TrainingData, str]:
    try:
        from subspace_plugins.datasets import mnist1d

        return mnist1d(n_train=n, seed=seed), "mnist1d"
    except Exception as error:  # noqa: BLE001 - any failure: fall back to random data
        print(f"# mnist1d unavailable ({error}); using random data")
        generator = torch.Generator().manual_seed(seed)
        x = torch.randn(n, 40, generator=generator)
        y = torch.randint(10, (n,), generator=generator)
        return TrainingData(num_classes=10, x=x, y=y), "random"


def make_mlp() -> torch.nn.Module:
    try:
        from subspace_plugins.models import mlp

        return mlp(input_dim=40, widths=[200, 200], num_classes=10, activation="tanh")
    except ImportError:
        layers = [torch.nn.Linear(40, 200), torch.nn.Tanh(), torch.nn.Linear(200, 200)]
        return torch.nn.Sequential(*layers, torch.nn.Tanh(), torch.nn.Linear(200, 10))


def make_cnn() -> torch.nn.Module | None:
    try:
        from subspace_plugins.models import cnn

        return cnn(input_shape=[1, 40], num_classes=10, channels=16)
    except ImportError:
        return None


def train(model: torch.nn.Module, data: TrainingData, loss: str, steps: int, lr: float) -> float:
    from subspace_cli.losses import loss_sum

    assert data.x is not None and data.y is not None
    generator = torch.Generator().manual_seed(0)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    for _ in range(steps):
        batch = torch.randint(len(data), (50,), generator=generator)
        optimizer.zero_grad()
        (loss_sum(loss, model(data.x[batch]), data.y[batch]) / 50).backward()
        optimizer.step()
    with torch.no_grad():
        return float(loss_sum(loss, model(data.x), data.y)) / len(data)


def hvp_timings(model: torch.nn.Module, data: TrainingData, loss: str, label: str) -> None:
    print(f"\n## HVP timings, {label} (ms per HVP, min of 3 after a warm-up)")
    print("| dtype | method | m=1 | m=4 | m=10 | auto picks |")
    print("|---|---|---|---|---|---|")
    for dtype in (torch.float32, torch.float64):
        auto = HessianOperator(model, data, loss, dtype=dtype)
        auto.matmat(torch.randn(4, auto.n_params))
        for method in ("forward", "reverse", "forward-loop", "reverse-loop"):
            op = HessianOperator(model, data, loss, dtype=dtype, method=method)
            cells = []
            for m in (1, 4, 10):
                vectors = torch.randn(m, op.n_params)
                op.matmat(vectors)
                seconds = []
                for _ in range(3):
                    start = time.perf_counter()
                    op.matmat(vectors)
                    seconds.append(time.perf_counter() - start)
                cells.append(f"{1000 * min(seconds) / m:.0f}")
            print(f"| {str(dtype)[6:]} | {method} | {' | '.join(cells)} | {auto.method} |")


def lobpcg(
    op: HessianOperator, k: int, *, block: int, tol: float, max_hvps: int, seed: int, **_: object
) -> EigenResult:
    """Plain LOBPCG (Knyazev 2001) with soft locking, for comparison only."""
    started = time.perf_counter()
    n, dtype = op.n_params, op.dtype
    generator = torch.Generator().manual_seed(seed)
    x = torch.linalg.qr(torch.randn(n, block, generator=generator, dtype=dtype))[0].T
    hx = op.matmat(x)
    hvps, iterations = block, 0
    p = hp = x.new_zeros((0, n))

    def rayleigh_ritz(basis: torch.Tensor, images: torch.Tensor):
        gram = (basis @ images.T).double()
        values, vectors = torch.linalg.eigh(0.5 * (gram + gram.T))
        return values.flip(0), vectors.flip(1)

    values, vectors = rayleigh_ritz(x, hx)
    x, hx = vectors.T.to(dtype) @ x, vectors.T.to(dtype) @ hx
    while True:
        iterations += 1
        r = hx - values[:, None].to(dtype) * x
        relative = r.norm(dim=1).double() / values.abs()
        active = (relative > tol).nonzero().flatten()
        if not bool((relative[:k] > tol).any()) or hvps + len(active) > max_hvps:
            break
        # Orthonormalise [R_active, P] against X and each other, tracking the H-images of P.
        s = r[active]
        for _ in range(2):
            s = s - (s @ x.T) @ x
        s = torch.linalg.qr(s.T)[0].T
        hs = op.matmat(s)
        hvps += s.shape[0]
        if p.shape[0]:
            for _ in range(2):
                coefficients = torch.cat([p @ x.T, p @ s.T], dim=1)
                both = torch.cat([x, s])
                p = p - coefficients @ both
                hp = hp - coefficients @ torch.cat([hx, hs])
            q, rr = torch.linalg.qr(p.T)
            keep = rr.diagonal().abs() > 1e-10 * rr.diagonal().abs().max()
            solve = torch.linalg.solve_triangular(rr, torch.eye(len(rr), dtype=dtype), upper=True)
            p, hp = (q.T)[keep], (solve.T @ hp)[keep]
        basis = torch.cat([x, s, p])
        images = torch.cat([hx, hs, hp])
        values, vectors = rayleigh_ritz(basis, images)
        values, vectors = values[:block], vectors[:, :block].to(dtype)
        new_x, new_hx = vectors.T @ basis, vectors.T @ images
        tail = vectors[block:]
        p = tail.T @ basis[block:]
        hp = tail.T @ images[block:]
        x, hx = new_x, new_hx
    return EigenResult(
        values[:k],
        x[:k],
        relative[:k],
        [bool(v <= tol) for v in relative[:k]],
        hvps,
        f"lobpcg-{block}",
        iterations,
        0,
        time.perf_counter() - started,
        tol,
        k,
    )


def relative_error(result: EigenResult, reference: torch.Tensor, k: int) -> float:
    values = result.eigenvalues[:k].double().cpu()
    return float(((values - reference[:k]).abs() / reference[:k].abs()).max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer variants")
    parser.add_argument("--loss", default="mse", choices=("mse", "ce"))
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument(
        "--sections",
        default="timings,float64,float32",
        help="comma-separated subset of: timings, float64, float32",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (1: OpenMP spin-waiting distorts timings on a busy machine)",
    )
    args = parser.parse_args()
    k = args.k
    torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    data, source = load_data(5000, seed=42)
    model = make_mlp()
    final = train(model, data, args.loss, args.steps, args.lr)
    n = sum(p.numel() for p in model.parameters())
    print(
        f"# {source}, {len(data)} samples, MLP 40-200-200-10 tanh, {n} params, loss {args.loss},"
        f" {args.steps} SGD steps lr {args.lr} batch 50 -> train loss {final:.4f}"
    )
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} thread(s), CPU")

    sections = set(args.sections.split(","))
    if "timings" in sections:
        hvp_timings(model, data, args.loss, f"MLP {n} params")
        cnn = make_cnn()
        if cnn is not None:
            cnn_params = sum(p.numel() for p in cnn.parameters())
            hvp_timings(
                cnn, data, args.loss, f"CNN 2x(conv16+relu+pool)+linear, {cnn_params} params"
            )

    op64 = HessianOperator(model, data, args.loss, dtype=torch.float64, method="reverse")
    op32 = HessianOperator(model, data, args.loss, dtype=torch.float32, method="reverse")
    start = time.perf_counter()
    reference = arpack_eigenpairs(op64, k, extra=2, tol=1e-12, max_hvps=3000)
    ref_values = reference.eigenvalues.cpu()
    print(
        f"\n# reference: float64 ARPACK tol 1e-12, {reference.hvp_count} HVPs,"
        f" {time.perf_counter() - start:.0f} s, max residual {float(reference.residuals.max()):.1e}"
    )
    print("# top-12 eigenvalues:", " ".join(f"{v:.6g}" for v in ref_values.tolist()))

    # The float32 noise floor: relative residual of the reference eigenvectors under float32 HVPs.
    vectors32 = reference.eigenvectors[:k].to(torch.float32)
    images = op32.matmat(vectors32).double()
    floor = (images - ref_values[:k, None] * reference.eigenvectors[:k]).norm(dim=1) / ref_values[
        :k
    ].abs()
    print(
        "# float32 HVP residual floor at the exact eigenvectors (per pair):",
        " ".join(f"{v:.1e}" for v in floor.tolist()),
    )

    Solver = Callable[..., EigenResult]
    variants: list[tuple[str, Solver, dict[str, object]]] = [
        ("arpack (eigsh LA, ncv=21)", arpack_eigenpairs, {}),
    ]
    for b in (1, 2, 4, 10):
        sizes = (None,) if args.quick else (None, 5 * k)
        for size in sizes:
            name = f"block-lanczos b={b} basis={size or 'default'}"
            variants.append((name, top_eigenpairs, {"block_size": b, "basis_size": size}))
    variants.append(("lobpcg block 15", lobpcg, {"block": 15}))

    if "float64" in sections:
        # Tolerances are tried from loose to tight until the answer is within 1e-6 of the reference;
        # that run is repeated and the faster wall time kept (the machine may be shared).
        tols = (1e-3, 1e-4, 1e-5, 1e-6)
        print("\n## float64 HVPs, k = 10: cost to reach max relative eigenvalue error <= 1e-6")
        print(
            "| solver | tol needed | HVPs | seconds (min of 2) | max rel. eigenvalue error |"
            " max residual | HVPs at looser tols (error) |"
        )
        print("|---|---|---|---|---|---|---|")
        for name, solver, options in variants:
            budget = 800 if solver is lobpcg else 2000  # bounds the benchmark's run time
            looser = []
            for tol in tols:
                try:
                    result = solver(op64, k, tol=tol, max_hvps=budget, seed=0, **options)
                except Exception as error:  # noqa: BLE001 - report and go on
                    looser.append(f"tol {tol:g} failed: {error}")
                    continue
                error = relative_error(result, ref_values, k)
                hvps = result.hvp_count - (k if result.solver == "arpack" else 0)
                if error > 1e-6:
                    looser.append(f"{hvps} ({error:.1e})")
                    continue
                again = solver(op64, k, tol=tol, max_hvps=budget, seed=0, **options)
                seconds = min(result.seconds, again.seconds)
                print(
                    f"| {name} | {tol:g} | {hvps} | {seconds:.1f} | {error:.1e} |"
                    f" {float(result.residuals.max()):.1e} | {', '.join(looser) or '-'} |",
                    flush=True,
                )
                break
            else:
                print(f"| {name} | not reached | | | | | {', '.join(looser)} |", flush=True)

    if "float32" in sections:
        print("\n## float32 HVPs, k = 10, default tolerance (1e-4) and tighter ones")
        print(
            "| solver | tol | HVPs | seconds | max rel. eigenvalue error | max residual | converged |"
        )
        print("|---|---|---|---|---|---|---|")
        for name, solver, options in variants[:1] + [
            ("block-lanczos default", top_eigenpairs, {}),
            ("block-lanczos b=1", top_eigenpairs, {"block_size": 1}),
        ]:
            for tol in (1e-4, 1e-5, 1e-6):
                try:
                    result = solver(op32, k, tol=tol, max_hvps=2000, seed=0, **options)
                except Exception as error:  # noqa: BLE001
                    print(f"| {name} | {tol:g} | failed: {error} |||||")
                    continue
                hvps = result.hvp_count - (k if result.solver == "arpack" else 0)
                print(
                    f"| {name} | {tol:g} | {hvps} | {result.seconds:.1f} |"
                    f" {relative_error(result, ref_values, k):.1e} |"
                    f" {float(result.residuals.max()):.1e} | {sum(result.converged)}/{k} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
