"""Time the four Hessian-vector-product methods on the shipped sample checkpoints.

For each sample (MLP / MNIST-1D, CNN / digits, transformer / MNIST-1D sequences) and each block
size m, applies the full-training-set Hessian to m random vectors with every method of
``HessianOperator``: ``forward`` and ``reverse`` (batched over the m vectors) and
``forward-loop`` and ``reverse-loop`` (one vector at a time). Prints seconds per vector, the
ratio to the faster batched method (the only choice before the loops existed, so the baseline
of ``--hvp-method auto``), the method ``auto`` now keeps, and the largest relative difference
between each method's products and ``reverse``'s (they compute the same thing).

    python benchmarks/hvp_methods.py                       # all samples, m = 2 and 10, 1 thread
    python benchmarks/hvp_methods.py --only transformer --threads 2 --block 10

Each timing is the best of ``--repeat`` runs after one warm-up run; runs of different methods
are interleaved so that a load spike hits them alike.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import torch

from subspace_cli.checkpoint import SpecOverrides
from subspace_cli.experiment import load_experiment
from subspace_cli.hessian import HessianOperator
from subspace_cli.settings import HVP_METHODS

SAMPLES = {
    "mlp": "sample_checkpoints/mlp_mnist1d.safetensors",
    "cnn": "sample_checkpoints/cnn_digits.safetensors",
    "transformer": "sample_checkpoints/transformer_mnist1d.safetensors",
}
METHODS = HVP_METHODS[1:]
BATCHED = ("forward", "reverse")


def measure(name: str, blocks: list[int], repeat: int) -> list[dict[str, object]]:
    experiment = load_experiment(SAMPLES[name], SpecOverrides())
    assert experiment.data is not None
    operators = {
        method: HessianOperator(experiment.model, experiment.data, experiment.loss, method=method)
        for method in METHODS
    }
    n_params = operators["reverse"].n_params
    rows: list[dict[str, object]] = []
    for m in blocks:
        vectors = torch.randn(m, n_params, generator=torch.Generator().manual_seed(m))
        products = {method: op.matmat(vectors) for method, op in operators.items()}  # warm-up
        seconds: dict[str, float] = {method: float("inf") for method in METHODS}
        for _ in range(repeat):
            for method, op in operators.items():
                start = time.perf_counter()
                op.matmat(vectors)
                seconds[method] = min(seconds[method], time.perf_counter() - start)
        auto = HessianOperator(experiment.model, experiment.data, experiment.loss)
        auto.matmat(vectors)
        baseline = min(seconds[method] for method in BATCHED)
        reference = products["reverse"]
        for method in METHODS:
            difference = (products[method] - reference).norm() / reference.norm()
            rows.append(
                {
                    "model": name,
                    "params": n_params,
                    "samples": auto.n_samples,
                    "m": m,
                    "method": method,
                    "s_per_vector": seconds[method] / m,
                    "ratio_to_batched": seconds[method] / baseline,
                    "auto_keeps": auto.method if method == METHODS[0] else "",
                    "rel_diff_vs_reverse": float(difference),
                }
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=sorted(SAMPLES), action="append")
    parser.add_argument("--block", type=int, action="append", help="block sizes (default 2, 10)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    blocks = args.block or [2, 10]
    print(
        f"# torch {torch.__version__}, {args.threads} thread(s), {platform.processor() or '?'}"
        f", load average {os.getloadavg()[0]:.2f}, best of {args.repeat} after a warm-up"
    )
    print(
        "| model | params | samples | m | method | s / vector | time ÷ best batched | auto keeps"
        " | rel. diff vs reverse |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name in args.only or list(SAMPLES):
        for row in measure(name, blocks, args.repeat):
            print(
                f"| {row['model']} | {row['params']:,} | {row['samples']:,} | {row['m']} "
                f"| {row['method']} | {row['s_per_vector']:.4f} | {row['ratio_to_batched']:.2f} "
                f"| {row['auto_keeps']} | {row['rel_diff_vs_reverse']:.1e} |",
                flush=True,
            )
    print(f"# load average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
