"""What keeping the dominant subspace costs in ``project-train``: the paper's recipe against the
tracker.

From the MLP sample (50,410 parameters, 5,000 MNIST-1D samples), runs three ways of keeping the
top-k subspace, interleaved step by step in one process so that machine noise hits them alike:

  (a) ``--refresh cold``: a solve from a random start at every step (the paper's recipe, the
      baseline of every ratio);
  (b) ``--refresh warm``: a solve warm-started from the previous subspace at every step (the
      tool's default before the tracker);
  (c) ``--refresh track``: the tracker with its defaults (``--subspace-tol 1e-3``).

each for three settings: Dom-SGD and Bulk-SGD (lr 0.01, batch 50) and Bulk-GD at the Edge of
Stability (full batch, lr 0.08: 2/η = 25 is below λ₁ ≈ 31.4), k = 10. Every ``--audit-every``
steps a cold solve at tol 1e-6 gives the exact top-k subspace and its overlap with the one in
use; audits are timed and counted apart. Each run logs every step (the CLI's default), so the
full-batch loss and gradient are part of every variant's time.

Prints, per setting and variant: HVPs per step (refreshes and drift checks; not audits), seconds
per step (without audits), both as ratios to (a), the min and median audited overlap, the loss
after the last step and its difference from (a)'s in units of the loss's step-to-step noise. The
noise is the standard deviation of (a)'s full-batch loss about a straight line fitted to its
last 50 logged steps.

    OMP_NUM_THREADS=1 python benchmarks/projected_cost.py                     # 200 steps, all
    OMP_NUM_THREADS=1 python benchmarks/projected_cost.py --jobs 2            # settings in parallel
    python benchmarks/projected_cost.py --settings bulk-gd-eos --steps 50 --json out.json

With ``--jobs N`` the settings run in N processes of one thread each; a setting's variants stay
interleaved in one process, so every ratio is still measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass

SAMPLE = "sample_checkpoints/mlp_mnist1d.safetensors"
SETTINGS = {
    "dom-sgd": {"mode": "dom", "lr": 0.01, "batch_size": 50},
    "bulk-sgd": {"mode": "bulk", "lr": 0.01, "batch_size": 50},
    "bulk-gd-eos": {"mode": "bulk", "lr": 0.08, "batch_size": None},
}
VARIANTS = {"a: cold every step": "cold", "b: warm every step": "warm", "c: track": "track"}


@dataclass
class Variant:
    name: str
    training: object
    seconds: float = 0.0
    losses: list[float] | None = None
    audits: list[float] | None = None


def run_setting(name: str, steps: int, audit_every: int, k: int, method: str) -> dict:
    import numpy as np
    import torch

    from subspace_cli.checkpoint import SpecOverrides
    from subspace_cli.experiment import DataCache, load_experiment
    from subspace_cli.projected import ProjectedTraining, TrainConfig

    torch.set_num_threads(1)
    cache = DataCache()
    variants: list[Variant] = []
    for label, policy in VARIANTS.items():
        config = TrainConfig(checkpoint=SAMPLE, k=k, steps=steps, refresh=policy,
                             audit_every=audit_every, hvp_method=method,
                             save_every=10**9, **SETTINGS[name])
        experiment = load_experiment(SAMPLE, SpecOverrides(), data_cache=cache)
        variant = Variant(label, None, losses=[], audits=[])
        variant.training = ProjectedTraining(
            config, experiment, on_log=lambda row, v=variant: v.losses.append(row.train_loss),
            on_refresh=lambda row: None, on_save=lambda training: None,
            on_audit=lambda row, v=variant: v.audits.append(row.overlap))
        variants.append(variant)
    for step in range(steps):
        for v in variants:  # interleaved: every variant takes step t before any takes t + 1
            t = v.training
            audit_before = t.state.audit_seconds
            started = time.perf_counter()
            row = t.step()
            v.seconds += time.perf_counter() - started - (t.state.audit_seconds - audit_before)
            if row is not None:
                t.on_log(row)
        if step % 10 == 9:
            print(f"  {name}: step {step + 1}/{steps}", file=sys.stderr, flush=True)
    rows = []
    base_losses = np.asarray(variants[0].losses)
    tail = base_losses[-50:]
    x = np.arange(len(tail))
    fit = np.polyval(np.polyfit(x, tail, 1), x) if len(tail) > 2 else tail
    noise = float(np.std(tail - fit)) if len(tail) > 2 else float("nan")
    finals = []
    for v in variants:
        final_loss, _, _ = v.training._gradient(None)  # the loss at θ_T, after the last step
        finals.append(final_loss)
    for v, final in zip(variants, finals, strict=True):
        t = v.training
        audits = np.asarray(v.audits)
        rows.append({
            "setting": name, "variant": v.name, "steps": steps,
            "hvps_per_step": t.hvps / steps, "seconds_per_step": v.seconds / steps,
            "audit_min": float(audits.min()) if len(audits) else None,
            "audit_median": float(np.median(audits)) if len(audits) else None,
            "audits": int(len(audits)), "refreshes": t.tracker.state.refreshes,
            "final_loss": final, "loss_noise": noise,
            "loss_diff_in_noise": abs(final - finals[0]) / noise if noise > 0 else None,
        })
    base = rows[0]
    for row in rows:
        row["hvp_ratio"] = base["hvps_per_step"] / row["hvps_per_step"]
        row["time_ratio"] = base["seconds_per_step"] / row["seconds_per_step"]
    return {"setting": name, "rows": rows, "load_end": os.getloadavg()[0]}


def print_table(results: list[dict], header: str) -> None:
    from tabulate import tabulate

    table = []
    for result in results:
        for r in result["rows"]:
            table.append([
                r["setting"], r["variant"], f"{r['hvps_per_step']:.2f}",
                f"{r['hvp_ratio']:.1f}×", f"{r['seconds_per_step']:.3f}", f"{r['time_ratio']:.1f}×",
                f"{r['audit_min']:.6f}" if r["audit_min"] is not None else "–",
                f"{r['audit_median']:.6f}" if r["audit_median"] is not None else "–",
                r["refreshes"], f"{r['final_loss']:.6f}",
                f"{r['loss_diff_in_noise']:.2f}" if r["loss_diff_in_noise"] is not None else "–",
            ])
    print(header)
    print(tabulate(table, headers=[
        "setting", "variant", "HVPs/step", "fewer HVPs than (a)", "s/step", "faster than (a)",
        "audit min", "audit median", "refreshes", "loss after", "|Δloss| vs (a) / noise",
    ], tablefmt="github"))
    for result in results:
        noise = result["rows"][0]["loss_noise"]
        print(f"# {result['setting']}: loss noise {noise:.2e}, load average at its end "
              f"{result['load_end']:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--settings", default=",".join(SETTINGS),
                        help=f"comma-separated subset of {', '.join(SETTINGS)}")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--audit-every", type=int, default=10)
    parser.add_argument("-k", type=int, default=10)
    parser.add_argument("--hvp-method", default="reverse-loop",
                        help="fixed for all runs so that no timing probe differs between them")
    parser.add_argument("--jobs", type=int, default=1, help="settings run in this many processes")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    names = [n for n in args.settings.split(",") if n]
    unknown = [n for n in names if n not in SETTINGS]
    if unknown:
        parser.error(f"unknown settings: {', '.join(unknown)}")
    if args.worker:
        print(json.dumps(run_setting(names[0], args.steps, args.audit_every, args.k,
                                     args.hvp_method)))
        return
    started = time.time()
    load_start = os.getloadavg()[0]
    if args.jobs > 1:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        pending = list(names)
        running: list[subprocess.Popen] = []
        results = []
        while pending or running:
            while pending and len(running) < args.jobs:
                name = pending.pop(0)
                running.append(subprocess.Popen(
                    [sys.executable, __file__, "--worker", "--settings", name,
                     "--steps", str(args.steps), "--audit-every", str(args.audit_every),
                     "-k", str(args.k), "--hvp-method", args.hvp_method],
                    stdout=subprocess.PIPE, env=env, text=True))
            time.sleep(1)
            for proc in list(running):
                if proc.poll() is not None:
                    running.remove(proc)
                    out, _ = proc.communicate()
                    if proc.returncode:  # keep what the other settings measured
                        print(f"# a worker failed (exit {proc.returncode}); settings done:",
                              file=sys.stderr)
                        print(json.dumps(results), file=sys.stderr)
                        sys.exit(1)
                    results.append(json.loads(out))
        results.sort(key=lambda r: names.index(r["setting"]))
    else:
        results = [run_setting(n, args.steps, args.audit_every, args.k, args.hvp_method)
                   for n in names]
    header = (f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
              f"{args.jobs} job(s) of 1 thread, load average at the start {load_start:.2f}, "
              f"{args.steps} steps, audits every {args.audit_every} (tol 1e-6), k {args.k}, "
              f"{args.hvp_method}, {time.time() - started:.0f} s in all")
    print_table(results, header)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"header": header, "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
