"""What adding a checkpoint's spectrum to a spectra file costs: format 1.0's copy-and-rename
against format 1.1's group files (issue 13).

Appends N groups of random float32 eigenvectors (default 20 groups of 40 MB: k = 10 rows of 1M
parameters) to two files, alternating between them so that machine noise hits both alike:

  (old) the recipe of format 1.0's writer, reimplemented here: copy the whole file to a temporary
        sibling, add the group there with h5py, close, rename over the file;
  (new) ``subspace_cli.store.write_spectrum``: the group's own file, synced, then a new index.

Both write the group with the store's own ``_write_group`` (gzip and shuffle, the same chunks),
so they differ only in how the group is published. Prints, per append, the seconds and the bytes
written (``wchar`` of ``/proc/self/io``: what the process handed to the kernel, copies
included) of each and their ratios, then the totals and the final sizes on disk.

    OMP_NUM_THREADS=1 python benchmarks/store_append.py                  # 20 × 40 MB
    python benchmarks/store_append.py --groups 5 --mb 10 --dir /some/disk

The old recipe never synced its file; the new one syncs each group file and the index (fsync),
so on a real disk its seconds include waiting for the data to reach it.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def bytes_written() -> int:
    with open("/proc/self/io") as fh:
        return int(next(line for line in fh if line.startswith("wchar:")).split()[1])


def spectrum(i: int, k: int, n: int):
    from subspace_cli import store

    rng = np.random.default_rng(i)
    return store.Spectrum(
        checkpoint=f"step_{i:04d}.safetensors", checkpoint_sha256=f"{i:064x}", k=k,
        eigenvalues=np.sort(rng.random(k))[::-1], residuals=np.full(k, 1e-6),
        eigenvectors=rng.standard_normal((k, n), dtype=np.float32),
        converged=np.ones(k, dtype=bool), param_names=["w"], param_shapes=[(n,)],
        param_offsets=[0], attrs={"created": f"2026-01-01T00:{i // 60:02d}:{i % 60:02d}"})


def old_append(path: Path, s) -> None:
    """Format 1.0's writer: the whole file copied, the group added to the copy, renamed."""
    import h5py

    from subspace_cli import store
    from subspace_cli.checkpoint import publish, temporary_sibling

    tmp = temporary_sibling(path)
    try:
        if path.exists():
            shutil.copyfile(path, tmp)
        with h5py.File(tmp, "r+" if path.exists() else "w") as f:
            f.attrs["format"] = store.FORMAT_NAME
            f.attrs["format_version"] = "1.0"
            store._write_group(f.create_group(store.checkpoint_key(s.checkpoint)), s)
        publish(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def disk_size(path: Path) -> int:
    size = path.stat().st_size
    side = path.with_name(path.name + ".d")
    if side.is_dir():
        size += sum(p.stat().st_size for p in side.iterdir())
    return size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--groups", type=int, default=20, help="appends (default 20)")
    parser.add_argument("--mb", type=float, default=40.0,
                        help="eigenvector megabytes per group, float32 (default 40)")
    parser.add_argument("-k", type=int, default=10, help="eigenvectors per group (default 10)")
    parser.add_argument("--dir", default=None, help="where to write (default: a temporary "
                        "directory under $TMPDIR, removed at the end)")
    args = parser.parse_args()
    if not Path("/proc/self/io").exists():
        sys.exit("needs Linux (/proc/self/io counts the bytes written)")
    from subspace_cli import store

    n = int(args.mb * 1e6 / 4 / args.k)
    work = Path(tempfile.mkdtemp(prefix="store_append.", dir=args.dir))
    old_path, new_path = work / "old.h5", work / "new.h5"
    print(f"# {args.groups} appends of k = {args.k} × n = {n:,} float32 "
          f"({args.k * n * 4 / 1e6:.1f} MB raw) in {work}")
    print(f"# load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print("| append | old s | old MB written | new s | new MB written | time old/new "
          "| bytes old/new |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    totals = np.zeros(4)
    os.chdir(work)  # group names relative to it, as the CLI's would be
    try:
        for i in range(args.groups):
            s = spectrum(i, args.k, n)
            row = []
            for append, path in ((old_append, old_path), (store.write_spectrum, new_path)):
                b0, t0 = bytes_written(), time.perf_counter()
                append(path, s)
                row += [time.perf_counter() - t0, (bytes_written() - b0) / 1e6]
            totals += row
            print(f"| {i + 1} | {row[0]:.2f} | {row[1]:.1f} | {row[2]:.2f} | {row[3]:.1f} "
                  f"| {row[0] / row[2]:.2f}× | {row[1] / row[3]:.1f}× |", flush=True)
        print(f"| total | {totals[0]:.1f} | {totals[1]:.0f} | {totals[2]:.1f} | {totals[3]:.0f} "
              f"| {totals[0] / totals[2]:.2f}× | {totals[1] / totals[3]:.1f}× |")
        check = [x.checkpoint for x in store.iter_spectra(new_path)]
        assert check == [f"step_{i:04d}.safetensors" for i in range(args.groups)], check
        print(f"# on disk: old {disk_size(old_path) / 1e6:.0f} MB, new {disk_size(new_path) / 1e6:.0f}"
              f" MB (index {new_path.stat().st_size / 1e3:.1f} kB); the old recipe's last append "
              "needed about as much free space again, for its copy")
        print(f"# load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    finally:
        os.chdir("/")
        if args.dir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
