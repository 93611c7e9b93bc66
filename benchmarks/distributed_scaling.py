"""Data-parallel scaling (issue 16): HVP throughput and a top-k solve, in one process and in
torchrun's data-parallel processes, reported as speed-ups over one single-threaded process
measured in the same run.

Each launch runs this script's ``--worker`` mode: it loads the checkpoint with its data, times
``--hvps`` single-vector Hessian-vector products over the full training set (after two
warm-ups, the method fixed so that no race is timed), then a top-``k`` solve
(``compute_spectrum``, the engine of ``subspace spectrum``), and rank 0 prints one JSON line.
Start-up (imports, loading, the launcher) is not timed. The launches, one at a time:

  plain x1    no torchrun, OMP_NUM_THREADS=1 (the baseline)
  plain x2    no torchrun, 2 threads (what one process does with both cores)
  torchrun 1  one process in a process group (the collectives are trivial: gloo on a CPU,
              NCCL on a GPU: the single-GPU NCCL path against ``plain``)
  torchrun 2  two processes, one thread each, each a shard of the data

    OMP_NUM_THREADS=1 python benchmarks/distributed_scaling.py               # the sample MLP
    python benchmarks/distributed_scaling.py --device cuda --launches plain-1,torchrun-1

A 2-core machine can show at most 2x; the eigenvalues of every launch are checked against the
baseline's (the reductions' order differs, so to rounding).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LAUNCHES = {
    "plain-1": (None, 1),
    "plain-2": (None, 2),
    "torchrun-1": (1, 1),
    "torchrun-2": (2, 1),
}


def worker(args: argparse.Namespace) -> None:
    import torch

    from subspace_cli import parallel
    from subspace_cli.checkpoint import SpecOverrides
    from subspace_cli.experiment import load_experiment
    from subspace_cli.settings import SpectrumSettings
    from subspace_cli.spectrum import compute_spectrum, curvature_operator

    world = parallel.init()
    experiment = load_experiment(args.checkpoint, SpecOverrides())
    settings = SpectrumSettings(k=args.k, dtype="float32", device=args.device,
                                chunk_size=args.chunk_size, hvp_method="reverse-loop",
                                seed=0)
    op = curvature_operator(experiment, settings)
    v = torch.randn(op.n_params, generator=torch.Generator().manual_seed(0)).to(op.device)
    for _ in range(2):
        op.matvec(v)
    sync = torch.cuda.synchronize if op.device.type == "cuda" else (lambda: None)
    sync()
    started = time.perf_counter()
    for _ in range(args.hvps):
        op.matvec(v)
    sync()
    hvp_seconds = time.perf_counter() - started
    started = time.perf_counter()
    run = compute_spectrum(experiment, settings)
    sync()
    solve_seconds = time.perf_counter() - started
    if world.main:
        print(json.dumps({
            "processes": world.size, "grouped": world.distributed,
            "threads": torch.get_num_threads(), "device": str(op.device),
            "hvps_per_second": args.hvps / hvp_seconds, "solve_seconds": solve_seconds,
            "solve_hvps": run.result.hvp_count,
            "eigenvalues": [float(x) for x in run.result.eigenvalues],
        }))
    parallel.shutdown()


def launch(name: str, args: argparse.Namespace) -> dict:
    processes, threads = LAUNCHES[name]
    command = [sys.executable]
    if processes is not None:
        command += ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                    str(processes)]
    command += [str(Path(__file__).resolve()), "--worker", "--checkpoint", args.checkpoint,
                "-k", str(args.k), "--hvps", str(args.hvps), "--chunk-size",
                str(args.chunk_size), "--device", args.device]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT)
    if result.returncode != 0:
        sys.exit(f"{name} failed (exit {result.returncode}):\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default="sample_checkpoints/mlp_mnist1d.safetensors")
    parser.add_argument("-k", type=int, default=10)
    parser.add_argument("--hvps", type=int, default=40)
    parser.add_argument("--chunk-size", type=int, default=1000)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--launches", default=",".join(LAUNCHES))
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    from tabulate import tabulate

    names = args.launches.split(",")
    results = {name: launch(name, args) for name in names}
    base = results[names[0]]
    rows = []
    for name, r in results.items():
        worst = max(abs(a - b) / abs(b) for a, b in zip(r["eigenvalues"], base["eigenvalues"],
                                                        strict=True))
        rows.append([name, r["processes"], r["threads"], r["device"],
                     f"{r['hvps_per_second']:.1f}",
                     f"{r['hvps_per_second'] / base['hvps_per_second']:.2f}x",
                     f"{r['solve_seconds']:.2f}", r["solve_hvps"],
                     f"{base['solve_seconds'] / r['solve_seconds']:.2f}x", f"{worst:.1e}"])
    print(f"{args.checkpoint}, top-{args.k} solve and {args.hvps} HVPs over the full training "
          f"set, chunk {args.chunk_size}; load average before: "
          f"{' '.join(f'{x:.2f}' for x in LOAD)}; after: "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(tabulate(rows, headers=["launch", "processes", "threads", "device", "HVP/s",
                                  f"÷ {names[0]}", "solve s", "solve HVPs",
                                  f"speed-up ÷ {names[0]}", "λ max rel. diff"]))


LOAD = os.getloadavg()

if __name__ == "__main__":
    main()
