"""The GGN of a sample checkpoint against an independent dense float64 one (issue 17).

Forms G = (1/N) Σₙ Jₙᵀ Hₙ Jₙ densely: the output Jacobian of every sample by
``torch.func.jacrev`` (chunks of samples, float64), Hₙ the loss's output Hessian by autograd
(the identity under mse), accumulated into an n × n matrix; its top-k eigenvalues by
``torch.linalg.eigvalsh`` against ``subspace spectrum --curvature ggn -k K --dtype float64``.

    OMP_NUM_THREADS=2 python benchmarks/ggn_dense_check.py                # the CNN sample, k 5
    python benchmarks/ggn_dense_check.py --checkpoint CKPT -k 10

Memory: n² float64 (0.94 GB for the CNN sample's 10,858 parameters) plus one chunk's Jacobian.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time

import torch

from subspace_cli.checkpoint import SpecOverrides
from subspace_cli.experiment import load_experiment


def dense_ggn(model, data, loss: str, chunk: int = 64) -> torch.Tensor:
    model = model.double().eval()
    names = [name for name, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    theta = torch.cat([p.detach().reshape(-1) for _, p in model.named_parameters()])
    buffers = dict(model.named_buffers())

    def output(flat, x):
        pieces = flat.split([math.prod(s) for s in shapes])
        params = {n: p.view(s) for n, p, s in zip(names, pieces, shapes, strict=True)}
        return torch.func.functional_call(model, {**params, **buffers}, (x[None],))[0]

    total = torch.zeros(len(theta), len(theta), dtype=torch.float64)
    x_all = data.x.double() if data.x.is_floating_point() else data.x
    for start in range(0, len(data), chunk):
        x, y = x_all[start:start + chunk], data.y[start:start + chunk]
        jac = torch.func.vmap(torch.func.jacrev(output), in_dims=(None, 0))(theta, x)
        out = torch.func.vmap(output, in_dims=(None, 0))(theta, x).detach()
        if loss == "mse":  # Hₙ = I: one product for the chunk
            flat = jac.reshape(-1, len(theta))
            total.addmm_(flat.T, flat)
            continue
        for n in range(len(x)):
            h = torch.autograd.functional.hessian(
                lambda f, t=y[n]: torch.nn.functional.cross_entropy(f[None], t[None]), out[n])
            total += jac[n].T @ h @ jac[n]
    return total / len(data)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default="sample_checkpoints/cnn_digits.safetensors")
    parser.add_argument("-k", type=int, default=5)
    args = parser.parse_args()
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "subspace_cli", "spectrum", args.checkpoint, "--curvature",
         "ggn", "-k", str(args.k), "--dtype", "float64", "--tol", "1e-10", "--json"],
        capture_output=True, text=True, check=True)
    ours = json.loads(result.stdout)[0]
    ours_seconds = time.perf_counter() - started
    experiment = load_experiment(args.checkpoint, SpecOverrides())
    started = time.perf_counter()
    g = dense_ggn(experiment.model, experiment.data, experiment.loss)
    want = torch.linalg.eigvalsh(g).flip(0)[: args.k]
    dense_seconds = time.perf_counter() - started
    print(f"{args.checkpoint}: {g.shape[0]:,} parameters, {len(experiment.data):,} samples, "
          f"{experiment.loss}; subspace {ours_seconds:.1f} s ({ours['hvp_count']} products), "
          f"dense GGN and eigvalsh {dense_seconds:.1f} s")
    print(" i  subspace --curvature ggn   dense float64 GGN   relative difference")
    for i, (a, b) in enumerate(zip(ours["eigenvalues"], want.tolist(), strict=True)):
        print(f"{i + 1:2d}  {a:24.12f}  {b:18.12f}  {abs(a - b) / abs(b):.1e}")


if __name__ == "__main__":
    main()
