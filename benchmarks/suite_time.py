"""How long ``make test`` takes on a fresh clone: a baseline commit against main (issue 13).

Each round clones the repository three times, one after the other, and times ``make install``
and then the tests in each clone:

  (baseline)        the baseline commit's own ``make test`` (default 657e58c, the commit on
                    which issue 13 measured "today's 210 s");
  (head)            main's ``make test``: today's whole suite;
  (head, same tests) main's code and test command run on the baseline's tests only: the node
                    ids the baseline collects, each as it is named on main (a few were renamed
                    by later commits; see RENAMED). Tests added since the baseline are left out,
                    so this compares the same work.

Rounds alternate the three so that machine noise hits each alike. Prints one row per clone and
then the mean of each with its ratio to the baseline's mean, and the load average at the start
and the end. Run it alone (it needs both cores), with no other benchmark beside it:

    python benchmarks/suite_time.py                     # 2 rounds, about 10 minutes
    python benchmarks/suite_time.py --rounds 1 --baseline 657e58c

The clones are made from the repository's committed main (not the working tree), under a
temporary directory that is removed afterwards.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tabulate import tabulate

ROOT = Path(__file__).resolve().parents[1]

#: Baseline node ids that later commits renamed, and their names on main.
RENAMED = {
    "tests/test_builtin_plugins.py::test_entry_points_are_registered"
    "[subspace.data-subspace_plugins.datasets-names1]":
        "tests/test_builtin_plugins.py::test_entry_points_are_registered[subspace.data-modules1]",
    "tests/test_builtin_plugins.py::test_entry_points_are_registered"
    "[subspace.models-subspace_plugins.models-names0]":
        "tests/test_builtin_plugins.py::test_entry_points_are_registered"
        "[subspace.models-modules0]",
    "tests/test_hessian.py::test_auto_probe_runs_and_counts_exactly_these_products":
        "tests/test_hessian.py::test_the_race_runs_and_counts_exactly_these_products",
    "tests/test_hessian.py::test_cli_offers_exactly_the_operator_methods":
        "tests/test_architecture.py::test_option_choices_are_the_library_lists",
}

VARIANTS = ("baseline", "head", "head, same tests")


def run(command: list[str], cwd: Path, log: Path | None = None) -> tuple[float, str]:
    """Seconds the command took and the last line it printed; exits on failure."""
    started = time.monotonic()
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True)
    seconds = time.monotonic() - started
    output = result.stdout + result.stderr
    if log is not None:
        log.write_text(output)
    if result.returncode != 0:
        sys.exit(f"{' '.join(command)} in {cwd} failed ({result.returncode}):\n{output[-3000:]}")
    lines = [line for line in output.splitlines() if line.strip()]
    return seconds, lines[-1] if lines else ""


def collected_ids(clone: Path) -> list[str]:
    """The node ids this clone's suite collects (its own venv, no test run)."""
    result = subprocess.run(
        [str(clone / ".venv/bin/python"), "-m", "pytest", "-q", "--collect-only",
         "-p", "no:cacheprovider"], cwd=clone, capture_output=True, text=True, check=True)
    return [line for line in result.stdout.splitlines() if "::" in line]


def clone(revision: str | None, where: Path) -> Path:
    subprocess.run(["git", "clone", "-q", str(ROOT), str(where)], check=True)
    if revision is not None:
        subprocess.run(["git", "checkout", "-q", revision], cwd=where, check=True)
    return where


def load() -> str:
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", default="657e58c")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, check=True,
                          capture_output=True, text=True).stdout.strip()
    print(f"baseline {args.baseline}, head {head}; load average at the start: {load()}",
          flush=True)
    rows, totals = [], {variant: [] for variant in VARIANTS}
    with tempfile.TemporaryDirectory(prefix="suite-time-") as tmp:
        work = Path(tmp)
        same_ids: Path | None = None
        for round_ in range(1, args.rounds + 1):
            for variant in VARIANTS:
                where = clone(args.baseline if variant == "baseline" else None,
                              work / variant.replace(", ", "-").replace(" ", "-"))
                start_load = load()
                install, _ = run(["make", "install"], where)
                if variant == "baseline" and same_ids is None:
                    baseline_ids = collected_ids(where)
                if variant == "head, same tests":
                    if same_ids is None:
                        present = set(collected_ids(where))
                        mapped = [RENAMED.get(node, node) for node in baseline_ids]
                        missing = [node for node in mapped if node not in present]
                        if missing:
                            sys.exit(f"baseline tests not found on main: {missing[:5]} "
                                     "(add them to RENAMED)")
                        same_ids = work / "same_ids.txt"
                        same_ids.write_text("\n".join(mapped) + "\n")
                    tests, last = run([str(where / ".venv/bin/python"), "-m", "pytest", "-q",
                                       "-n", "auto", "--maxprocesses", "4", f"@{same_ids}"],
                                      where, work / "last.log")
                else:
                    tests, last = run(["make", "test"], where, work / "last.log")
                totals[variant].append(install + tests)
                rows.append([round_, variant, start_load.split()[0], f"{install:.1f}",
                             f"{tests:.1f}", f"{install + tests:.1f}", last.strip("= ")])
                print(tabulate([rows[-1]], tablefmt="plain"), flush=True)
                shutil.rmtree(where)
    print()
    print(tabulate(rows, headers=["round", "clone", "load", "install s", "tests s", "total s",
                                  "pytest's last line"]))
    base = sum(totals["baseline"]) / len(totals["baseline"])
    summary = [[variant, f"{sum(t) / len(t):.1f}", f"{sum(t) / len(t) / base:.2f}x"]
               for variant, t in totals.items()]
    print()
    print(tabulate(summary, headers=["clone", "mean total s", "of the baseline"]))
    print(f"\nload average at the end: {load()}")


if __name__ == "__main__":
    main()
