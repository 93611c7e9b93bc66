"""`spectrum`, `align` and a short `project-train` on one device against the same on another.

Run by ``benchmarks/gpu_check.sh`` on a CUDA machine (``--device cuda --against cpu``); it also
runs anywhere with ``--device cpu`` (a self-comparison, to check the script). Every command is
the CLI's own, on the shipped MLP sample, and prints one table row per check with the measured
number, the bound and PASS or FAIL; the exit code is 1 when any check fails.

Checks (the bounds are those of issue 12):

* ``spectrum -k 10``: max relative eigenvalue difference ≤ 1e-4; subspace overlap
  ‖V_a V_bᵀ‖²_F / 10 ≥ 0.999 (eigenvectors read back from the ``-o`` spectra files).
* ``align --batches 20``: the full-batch χ_10 within 1e-3; mean mini-batch χ within 1e-2 (the
  same batches are drawn: the seed is the CLI's).
* ``project-train --mode dom -k 10 --steps 20 --audit-every 10``: final full-batch loss within
  1e-4 relative, min audited overlap ≥ 0.999 on each device.

    python benchmarks/gpu_compare.py --device cuda --against cpu --out /tmp/gpu_check
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "sample_checkpoints" / "mlp_mnist1d.safetensors"


def subspace(*args: str) -> tuple[object, float]:
    """Run ``subspace ARGS --json -q``; its parsed JSON and wall time."""
    command = [sys.executable, "-m", "subspace_cli", *args, "--json", "-q"]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed ({done.returncode}): {done.stderr.strip()}")
    return json.loads(done.stdout), seconds


def stored_vectors(path: Path) -> np.ndarray:
    with h5py.File(path, "r") as handle:
        groups = [g for g in handle.values() if isinstance(g, h5py.Group) and "eigenvectors" in g]
        return np.asarray(groups[0]["eigenvectors"], dtype=np.float64)


def overlap(a: np.ndarray, b: np.ndarray) -> float:
    qa, _ = np.linalg.qr(a.T)
    qb, _ = np.linalg.qr(b.T)
    return float(((qa.T @ qb) ** 2).sum() / qa.shape[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--against", default="cpu")
    parser.add_argument("--out", type=Path, default=Path("/tmp/gpu_check"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rows: list[tuple[str, str, float, str, bool]] = []
    times: list[tuple[str, str, float]] = []

    def check(name: str, quantity: str, value: float, bound: str, ok: bool) -> None:
        rows.append((name, quantity, value, bound, ok))

    devices = (args.device, args.against)
    spectra = {}
    for device in devices:
        path = args.out / f"spectrum_{device.replace(':', '_')}.h5"
        path.unlink(missing_ok=True)
        record, seconds = subspace("spectrum", str(SAMPLE), "-k", "10", "--device", device,
                                   "-o", str(path))
        spectra[device] = (record[0], stored_vectors(path))  # type: ignore[index]
        times.append(("spectrum", device, seconds))
    (a, va), (b, vb) = spectra[args.device], spectra[args.against]
    values_a, values_b = np.array(a["eigenvalues"]), np.array(b["eigenvalues"])
    relative = float(np.max(np.abs(values_a - values_b) / np.abs(values_b)))
    check("spectrum", "max rel. eigenvalue diff", relative, "<= 1e-4", relative <= 1e-4)
    o = overlap(va, vb)
    check("spectrum", "subspace overlap", o, ">= 0.999", o >= 0.999)
    for device, (record, _) in spectra.items():
        check("spectrum", f"all converged ({device}, {record['solver']}, "
              f"{record['hvp_count']} HVPs, {record['hvp_method']})",
              float(all(record["converged"])), "== 1", all(record["converged"]))

    aligned = {}
    for device in devices:
        record, seconds = subspace("align", str(SAMPLE), "-k", "10", "--batches", "20",
                                   "--device", device)
        aligned[device] = record[0]  # type: ignore[index]
        times.append(("align", device, seconds))
    a, b = aligned[args.device], aligned[args.against]
    diff = abs(a["chi_full"] - b["chi_full"])
    check("align", f"|Δχ_full| (χ = {b['chi_full']:.6f})", diff, "<= 1e-3", diff <= 1e-3)
    diff = abs(a["chi_minibatch"]["50"]["mean"] - b["chi_minibatch"]["50"]["mean"])
    check("align", "|Δ mean χ_minibatch|", diff, "<= 1e-2", diff <= 1e-2)

    trained = {}
    for device in devices:
        out = args.out / f"train_{device.replace(':', '_')}"
        subprocess.run(["rm", "-rf", str(out)], check=True)
        record, seconds = subspace("project-train", str(SAMPLE), "--mode", "dom", "-k", "10",
                                   "--steps", "20", "--audit-every", "10", "--device", device,
                                   "--out", str(out))
        trained[device] = record
        times.append(("project-train", device, seconds))
    a, b = trained[args.device], trained[args.against]  # type: ignore[assignment]
    loss_a, loss_b = float(a["final_train_loss"]), float(b["final_train_loss"])
    relative = abs(loss_a - loss_b) / abs(loss_b)
    check("project-train", "final loss rel. diff", relative, "<= 1e-4", relative <= 1e-4)
    for device, record in trained.items():
        value = float(record["audit_overlap_min"])  # type: ignore[index]
        check("project-train", f"audit overlap min ({device})", value, ">= 0.999",
              value >= 0.999)

    print(f"# {args.device} against {args.against}; load average {os.getloadavg()[0]:.2f}")
    print("| command | check | value | bound | result |")
    print("|---|---|---|---|---|")
    for name, quantity, value, bound, ok in rows:
        print(f"| {name} | {quantity} | {value:.6g} | {bound} | {'PASS' if ok else 'FAIL'} |")
    print("\n| command | device | wall s (process, load and start included) |")
    print("|---|---|---|")
    for name, device, seconds in times:
        print(f"| {name} | {device} | {seconds:.1f} |")
    raise SystemExit(0 if all(ok for *_, ok in rows) else 1)


if __name__ == "__main__":
    main()
