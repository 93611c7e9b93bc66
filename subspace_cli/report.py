"""Summaries and figures of ``project-train`` runs and spectra files: the library behind
``subspace report``.

Inputs are read, never changed. A run directory is read from its ``run.h5`` without taking the
HDF5 file lock, so a report on a run that is still training never makes that run's next append
fail; if the file is caught mid-append, the last checkpoint's copy ``run.h5.bak`` is used and a
note says so.
"""

from __future__ import annotations

import functools
import json
import math
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from subspace_cli import store
from subspace_cli.errors import InputError, damage_reported
from subspace_cli.hdf5 import isolated, transferable
from subspace_cli.inputs import GLOB_CHARS, Input, find_files, glob_paths

MODE_ORDER = {"none": 0, "dom": 1, "bulk": 2, "mix": 3}
OPTIMIZER_NAMES = {"sgd": "SGD", "momentum": "SGD+M", "nesterov": "Nesterov", "adam": "Adam",
                   "sam": "SAM"}
PLOT_FORMATS = ("png", "svg")


# ---------------------------------------------------------------------------------- inputs


@dataclass
class Run:
    """One ``project-train`` run directory as read from disk."""

    path: Path
    config: dict[str, Any]
    log: dict[str, np.ndarray]
    start_checkpoint: str
    start_step: int | None
    start_key: str
    loss: str | None = None
    notes: list[str] = field(default_factory=list)
    label: str = ""
    audit: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def rows(self) -> int:
        return int(len(self.log.get("step", ())))

    @property
    def base_label(self) -> str:
        """The paper's name for the method: SGD, Dom-SGD, Bulk-SGD, Dom-GD, Mix(a,b)-Adam, …"""
        c = self.config
        opt = OPTIMIZER_NAMES.get(c["optimizer"], c["optimizer"])
        if c.get("batch_size") is None and c["optimizer"] == "sgd":
            opt = "GD"
        prefix = {"none": "", "dom": "Dom-", "bulk": "Bulk-"}.get(c["mode"])
        if prefix is None:
            prefix = f"Mix({c.get('dom_scale', 1.0):g},{c.get('bulk_scale', 1.0):g})-"
        return prefix + opt


@transferable
@dataclass
class SpectraEntry:
    """One checkpoint's spectrum in a spectra file, with its alignment results if stored."""

    file: Path
    checkpoint: str
    k: int
    eigenvalues: np.ndarray
    residuals: np.ndarray
    converged: np.ndarray
    attrs: dict[str, Any]
    alignment: tuple[dict[str, Any], dict[str, np.ndarray]] | None = None
    density: tuple[dict[str, Any], dict[str, np.ndarray]] | None = None


@isolated("HDF5 file")
def _h5_format(path: Path) -> str | None:
    import h5py

    try:
        with damage_reported(path, "HDF5 file"), h5py.File(path, "r", locking=False) as f:
            value = f.attrs.get("format")
    except InputError as exc:
        if not isinstance(exc.__cause__, OSError):
            raise
        raise InputError(f"{path} is not an HDF5 file ({exc.__cause__})") from None
    if isinstance(value, bytes):
        value = value.decode()
    return None if value is None else str(value)


def classify(path: Path) -> list[Path]:
    """What an input holds: a run directory, a spectra file, or for a directory of runs every
    run directory and spectra file below it (sorted). Directories returned are runs, files are
    spectra files."""
    if path.is_dir():
        if (path / "run.h5").exists():
            return [path]
        found: list[Path] = []
        for candidate in find_files(path, "*.h5"):
            if candidate.name == "run.h5":
                found.append(candidate.parent)
            elif _h5_format(candidate) == "subspace-spectra":
                found.append(candidate)
        if not found:
            raise InputError(f"{path}: no run directory (with run.h5) or spectra file below it")
        return found
    if not path.exists():
        raise InputError(f"{path}: no such file or directory")
    kind = _h5_format(path)
    if kind == "subspace-run":
        return [path.parent]
    if kind == "subspace-spectra":
        return [path]
    raise InputError(
        f"{path} is neither a project-train run nor a spectra file (HDF5 format attribute {kind!r})"
    )


def expand(args: Sequence[str]) -> list[Input]:
    """Each argument (globs expanded) as run directories and spectra files, in order, without
    duplicates; an argument that yields nothing becomes an input carrying the reason."""
    out: list[Input] = []
    seen: set[Path] = set()
    for arg in args:
        paths = [Path(arg)]
        if not Path(arg).exists() and GLOB_CHARS & set(arg):
            paths = glob_paths(arg)
            if not paths:
                out.append(Input(arg, None, f"pattern {arg} matched nothing"))
                continue
        for path in paths:
            try:
                items = classify(path)
            except InputError as exc:
                out.append(Input(str(path), None, str(exc)))
                continue
            for item in items:
                if item.resolve() not in seen:
                    seen.add(item.resolve())
                    out.append(Input(str(path), item))
    return out


def load_run(run_dir: Path) -> Run:
    """Read a run directory (``run.h5`` and, when present, ``config.json``)."""
    from subspace_cli import runlog

    notes: list[str] = []
    file = run_dir / "run.h5"
    try:
        data = runlog.read(file)
    except InputError as exc:  # damaged, or caught in the middle of an append by the trainer
        backup = run_dir / "run.h5.bak"
        if not backup.exists():
            raise
        try:
            data = runlog.read(backup)
        except InputError:
            raise exc from None
        notes.append(f"{file} could not be read ({exc}); used run.h5.bak, which ends at the "
                     "last checkpoint")
    stored: dict[str, Any] = {}
    config_file = run_dir / "config.json"
    if config_file.exists():
        try:
            stored = json.loads(config_file.read_text())
        except (OSError, ValueError, RecursionError) as exc:
            notes.append(f"{config_file} is unreadable ({exc}); grouping by checkpoint path")
        if not isinstance(stored, dict):
            notes.append(f"{config_file} is not a JSON object; grouping by checkpoint path")
            stored = {}
    config = data["config"]
    start = str(config.get("checkpoint", "?"))
    start_step = stored.get("start_step")
    key = stored.get("start_sha256") or _checkpoint_sha256(Path(start)) or f"{start}@{start_step}"
    return Run(path=run_dir, config=config, log=data["log"], start_checkpoint=start,
               start_step=start_step, start_key=key,
               loss=spec.get("loss") if isinstance(spec := stored.get("spec"), dict) else None,
               notes=notes,
               audit=data.get("audit") or {})


@functools.cache
def _checkpoint_sha256(path: Path) -> str | None:
    """The tensors' SHA-256 of a start checkpoint that a run (from before ``start_sha256`` was
    recorded) names, if it is still there and readable; else None."""
    from subspace_cli.checkpoint import read_checkpoint
    from subspace_cli.errors import SubspaceError

    try:
        return read_checkpoint(path).sha256() if path.is_file() else None
    except (SubspaceError, OSError):
        return None


@store.spectra_reader  # one child for both reads; no eigenvectors travel
def load_spectra(path: Path) -> list[SpectraEntry]:
    """Every spectrum of a spectra file, with its full-Hessian alignment subgroup and its
    spectral density (``subspace density``) if any."""
    alignments = store.read_subgroups(path, "alignment")
    densities = store.read_subgroups(path, "density")
    return [SpectraEntry(
        file=path, checkpoint=s.checkpoint, k=s.k, eigenvalues=np.asarray(s.eigenvalues),
        residuals=np.asarray(s.residuals), converged=np.asarray(s.converged, dtype=bool),
        attrs=s.attrs, alignment=alignments.get(s.group), density=densities.get(s.group))
        for s in store.iter_spectra(path)]


# ------------------------------------------------------------------------------- summaries


def assign_labels(runs: Sequence[Run]) -> None:
    """Legend labels: the method's name, plus what tells apart runs that share it."""
    by_label: dict[str, list[Run]] = {}
    for run in runs:
        by_label.setdefault(run.base_label, []).append(run)
    for label, same in by_label.items():
        if len(same) == 1:
            same[0].label = label
            continue
        differing = [(key, fmt) for key, fmt in (
            ("lr", "η={:g}"), ("batch_size", "B={}"), ("k", "k={}"), ("optimizer", "{}"),
            ("rho", "ρ={:g}"), ("momentum", "μ={:g}"), ("curvature", "{}"),
        ) if len({json.dumps(r.config.get(key)) for r in same}) > 1]
        several_starts = len({r.start_key for r in same}) > 1
        for run in same:
            parts = []
            for key, fmt in differing:
                value = run.config.get(key)
                parts.append(fmt.format("full" if value is None else value))
            if not parts or several_starts:
                parts.append(run.name)
            run.label = f"{label} ({', '.join(parts)})"
        labels = [r.label for r in same]
        if len(set(labels)) < len(labels):  # still ambiguous: the directory name decides
            for run in same:
                run.label = f"{label} ({run.name})"


def group_runs(runs: Sequence[Run]) -> list[list[Run]]:
    """Runs that share a start checkpoint, in order of first appearance; modes none, dom, bulk,
    mix within a group."""
    groups: dict[str, list[Run]] = {}
    for run in runs:
        groups.setdefault(run.start_key, []).append(run)
    return [sorted(g, key=lambda r: (MODE_ORDER.get(r.config["mode"], 9), r.config["optimizer"],
                                     r.config["lr"])) for g in groups.values()]


def _mean(values: np.ndarray) -> float | None:
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if finite.size else None


def _last_finite(values: np.ndarray) -> float | None:
    finite = values[np.isfinite(values)]
    return float(finite[-1]) if finite.size else None


def summarize(run: Run) -> dict[str, Any]:
    """The numbers of the summary table for one run, read from its log."""
    c, log = run.config, run.log
    n = run.rows
    projecting = log["projecting"].astype(bool) if n else np.zeros(0, dtype=bool)
    after = projecting if projecting.any() else np.ones(n, dtype=bool)
    sharpness = _last_finite(log["sharpness"]) if n else None
    overlaps = np.asarray(run.audit.get("overlap", ()), dtype=float)
    return {
        "run": str(run.path),
        "label": run.label or run.base_label,
        "start_checkpoint": run.start_checkpoint,
        "start_step": run.start_step,
        "mode": c["mode"],
        "optimizer": c["optimizer"],
        "lr": c["lr"],
        "batch_size": c["batch_size"] if c.get("batch_size") is not None else "full",
        "k": c["k"],
        "curvature": c.get("curvature", "hessian"),  # runs from before --curvature: hessian
        "steps": c["steps"],
        "switch_step": int(log["step"][projecting][0]) if projecting.any() else None,
        "logged_rows": n,
        "last_logged_step": int(log["step"][-1]) if n else None,
        "start_train_loss": float(log["train_loss"][0]) if n else None,
        "final_train_loss": float(log["train_loss"][-1]) if n else None,
        "final_train_accuracy": float(log["train_accuracy"][-1]) if n else None,
        "mean_chi_after_switch": _mean(log["chi"][after]) if n else None,
        "mean_eta_dom": _mean(log["eta_dom"][after]) if n else None,
        "mean_eta_bulk": _mean(log["eta_bulk"][after]) if n else None,
        "final_sharpness": sharpness,
        "two_over_lr": 2.0 / float(c["lr"]),
        "final_loss_vs_none": None,
        "compared_at_step": None,
        "hvps": int(log["hvps"][-1]) if n else 0,
        "hvps_per_step": int(log["hvps"][-1]) / (int(log["step"][-1]) + 1) if n else None,
        "wall_seconds": float(log["wall_time"][-1]) if n else 0.0,
        "refresh": c.get("refresh", "warm"),
        "audits": len(overlaps),
        "audit_overlap_min": float(overlaps.min()) if len(overlaps) else None,
        "audit_overlap_median": float(np.median(overlaps)) if len(overlaps) else None,
        "notes": list(run.notes),
    }


def compare_within_groups(groups: Sequence[Sequence[Run]],
                          summaries: dict[Path, dict[str, Any]]) -> None:
    """Fill ``final_loss_vs_none``: the run's loss over that of the unprojected run of the same
    start, optimizer, learning rate and batch size, both taken at the last step logged by both
    (``compared_at_step``), so that runs still in progress or logged at other intervals are
    compared like for like."""
    for group in groups:
        for run in group:
            s = summaries[run.path]
            twins = [r for r in group if r.config["mode"] == "none" and r.rows
                     and all(r.config.get(key) == run.config.get(key)
                             for key in ("optimizer", "lr", "batch_size"))]
            if not twins or not run.rows:
                continue
            twin = twins[0]
            common = np.intersect1d(run.log["step"], twin.log["step"])
            if not common.size:
                continue
            step = int(common[-1])
            mine = float(run.log["train_loss"][run.log["step"] == step][0])
            theirs = float(twin.log["train_loss"][twin.log["step"] == step][0])
            if theirs > 0:
                s["final_loss_vs_none"] = mine / theirs
                s["compared_at_step"] = step


def summarize_spectra(entry: SpectraEntry) -> dict[str, Any]:
    k = entry.k
    values = entry.eigenvalues[:k]
    out: dict[str, Any] = {
        "file": str(entry.file),
        "checkpoint": entry.checkpoint,
        "k": k,
        "eigenvalues": [float(v) for v in values],
        "lambda_1": float(values[0]) if k else None,
        "lambda_k": float(values[-1]) if k else None,
        "max_residual": float(entry.residuals[:k].max()) if k else None,
        "converged": int(entry.converged[:k].sum()),
        "chi_full": None,
        "chi_minibatch_mean": {},
    }
    if entry.alignment is not None:
        attrs, data = entry.alignment
        out["chi_full"] = float(attrs["chi_full"])
        out["chi_minibatch_mean"] = {
            int(b): float(np.mean(row)) for b, row in zip(data["batch_sizes"],
                                                          data["chi_minibatch"], strict=True)}
    return out


# ----------------------------------------------------------------------------------- tables

def _fmt(value: Any, spec: str = ".4g") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, float):
        return format(value, spec)
    return str(value)


RUN_HEADERS = ["run", "method", "lr", "B", "k", "steps", "switch", "loss start", "loss final",
               "÷ none (step)", "acc final", "χ after switch", "η_dom", "η_bulk", "λ1 final",
               "2/η", "HVPs/step", "audit min"]


def run_row(s: dict[str, Any]) -> list[str]:
    return [Path(s["run"]).name, s["label"], _fmt(s["lr"], "g"), _fmt(s["batch_size"]),
            _fmt(s["k"]), _fmt(s["steps"]), _fmt(s["switch_step"]),
            _fmt(s["start_train_loss"], ".6g"), _fmt(s["final_train_loss"], ".6g"),
            _vs_none(s), _fmt(s["final_train_accuracy"], ".4f"),
            _fmt(s["mean_chi_after_switch"], ".4f"), _fmt(s["mean_eta_dom"], ".4g"),
            _fmt(s["mean_eta_bulk"], ".4g"), _fmt(s["final_sharpness"], ".5g"),
            _fmt(s["two_over_lr"], "g"), _fmt(s["hvps_per_step"], ".3g"),
            _fmt(s["audit_overlap_min"], ".6f")]


def _vs_none(s: dict[str, Any]) -> str:
    if s["final_loss_vs_none"] is None:
        return "–"
    return f"{s['final_loss_vs_none']:.4f} ({s['compared_at_step']})"


SPECTRA_HEADERS = ["file", "checkpoint", "k", "λ1", "λk", "max residual", "converged",
                   "χ full", "mean χ mini-batch"]


def spectra_row(s: dict[str, Any]) -> list[str]:
    minibatch = ", ".join(f"{v:.4f} (B={b})" for b, v in s["chi_minibatch_mean"].items())
    return [Path(s["file"]).name, s["checkpoint"], str(s["k"]), _fmt(s["lambda_1"], ".6g"),
            _fmt(s["lambda_k"], ".6g"), _fmt(s["max_residual"], ".2e"),
            f"{s['converged']}/{s['k']}", _fmt(s["chi_full"], ".4f"), minibatch or "–"]


def group_title(group: Sequence[Run]) -> str:
    run = group[0]
    step = f" (step {run.start_step})" if run.start_step is not None else ""
    return f"start: {run.start_checkpoint}{step}"


def render_tables(fmt: str, groups: Sequence[Sequence[Run]], summaries: dict[Path, dict[str, Any]],
                  spectra: Sequence[dict[str, Any]]) -> str:
    """The summary tables as text in ``fmt`` (table, markdown or csv)."""
    import csv
    import io

    from tabulate import tabulate

    if fmt == "csv":
        buffer = io.StringIO()
        if groups:
            keys = [k for k in next(iter(summaries.values())) if k != "notes"]
            writer = csv.writer(buffer, lineterminator="\n")
            writer.writerow(keys)
            for group in groups:
                for run in group:
                    s = summaries[run.path]
                    writer.writerow(["" if s[k] is None else s[k] for k in keys])
        if spectra:
            if groups:
                buffer.write("\n")
            keys = [k for k in spectra[0] if k not in ("eigenvalues", "chi_minibatch_mean")]
            writer = csv.writer(buffer, lineterminator="\n")
            writer.writerow([*keys, "eigenvalues", "chi_minibatch_mean"])
            for s in spectra:
                writer.writerow([*("" if s[k] is None else s[k] for k in keys),
                                 " ".join(f"{v:.9g}" for v in s["eigenvalues"]),
                                 " ".join(f"{b}:{v:.6g}" for b, v in
                                          s["chi_minibatch_mean"].items())])
        return buffer.getvalue()
    tablefmt = "github" if fmt == "markdown" else "simple"
    parts = []
    for group in groups:
        title = group_title(group)
        rows = [run_row(summaries[run.path]) for run in group]
        table = tabulate(rows, headers=RUN_HEADERS, tablefmt=tablefmt, disable_numparse=True)
        parts.append(f"### {title}\n\n{table}" if fmt == "markdown" else f"{title}\n{table}")
    if spectra:
        table = tabulate([spectra_row(s) for s in spectra], headers=SPECTRA_HEADERS,
                         tablefmt=tablefmt, disable_numparse=True)
        parts.append(f"### spectra\n\n{table}" if fmt == "markdown" else f"spectra\n{table}")
    return "\n\n".join(parts) + "\n"


# ------------------------------------------------------------------------------------ plots


def _figure(ncols: int = 1, nrows: int = 1, width: float = 6.4, height: float = 4.4) -> Any:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, height * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, axes


def _colors(runs: Sequence[Run]) -> dict[Path, Any]:
    """One colour per run, stable across plots: by method (SGD black, Dom red, Bulk blue, Mix
    green) when each mode occurs once, else a qualitative palette so that runs of one mode
    (optimizers, learning rates, k) stay apart."""
    from matplotlib import colormaps

    modes = [run.config["mode"] for run in runs]
    if len(set(modes)) == len(modes):
        fixed = {"none": "#222222", "dom": "#b2182b", "bulk": "#2166ac", "mix": "#1b7837"}
        return {run.path: fixed.get(run.config["mode"], "#762a83") for run in runs}
    palette = colormaps["tab10"]
    return {run.path: palette(i % 10) for i, run in enumerate(runs)}


def _rolling(values: np.ndarray, window: int) -> np.ndarray:
    if window <= 1 or values.size < window:
        return values
    finite = np.where(np.isfinite(values), values, 0.0)
    count = np.convolve(np.isfinite(values).astype(float), np.ones(window), mode="same")
    total = np.convolve(finite, np.ones(window), mode="same")
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / count, np.nan)


def _mark_switch(ax: Any, run: Run, color: Any) -> None:
    projecting = run.log["projecting"].astype(bool)
    if projecting.any():
        first = int(run.log["step"][projecting][0])
        if first > int(run.log["step"][0]):
            ax.axvline(first, color=color, linestyle=":", linewidth=1)


def _save(fig: Any, out_dir: Path, stem: str, formats: Sequence[str]) -> list[Path]:
    from subspace_cli.checkpoint import publish, temporary_sibling

    written = []
    for ext in formats:
        target = out_dir / f"{stem}.{ext}"
        tmp = temporary_sibling(target)
        try:
            fig.savefig(tmp, format=ext, dpi=150)
            publish(tmp, target)
        finally:
            if Path(tmp).exists():
                Path(tmp).unlink()
        written.append(target)
    return written


def _grid(panels: int, width: float = 6.4, height: float = 4.4) -> tuple[Any, list[Any]]:
    """A figure with ``panels`` axes, at most three to a row; unused axes hidden."""
    cols = min(panels, 3)
    fig, axes = _figure(cols, math.ceil(panels / cols), width, height)
    flat = list(axes.flat)
    for ax in flat[panels:]:
        ax.set_visible(False)
    return fig, flat


def _group_heading(group: Sequence[Run]) -> str:
    run = group[0]
    spec = Path(run.start_checkpoint).name
    step = f", step {run.start_step}" if run.start_step is not None else ""
    return f"from {spec}{step}"


def _log_axis(ax: Any) -> None:
    """A log-scale y axis labelled in plain numbers (0.292, not 2.92×10⁻¹), minor ticks too
    when the range is under a decade."""
    from matplotlib import ticker

    ax.set_yscale("log")
    low, high = ax.get_ylim()
    # enough significant digits that neighbouring ticks differ
    digits = max(3, math.ceil(-math.log10(max((high - low) / high, 1e-12))) + 2)
    plain = ticker.FuncFormatter(lambda value, _: f"{value:.{digits}g}")
    ax.yaxis.set_major_formatter(plain)
    if high / low < 10:
        ax.yaxis.set_minor_formatter(plain)
    else:
        ax.yaxis.set_minor_formatter(ticker.NullFormatter())


def plot_loss(groups: Sequence[Sequence[Run]], colors: dict[Path, Any]) -> Any:
    """Full-batch training loss (log scale) against step: the paper's Figure 1."""
    fig, axes = _grid(len(groups))
    for ax, group in zip(axes, groups, strict=False):
        for run in group:
            loss = run.log["train_loss"]
            ok = np.isfinite(loss) & (loss > 0)
            ax.plot(run.log["step"][ok], loss[ok], color=colors[run.path], label=run.label,
                    linewidth=1.6)
            _mark_switch(ax, run, colors[run.path])
        _log_axis(ax)
        ax.set_xlabel("step (from the start checkpoint)")
        losses = {r.loss for r in group if r.loss}
        ax.set_ylabel("full-batch training loss"
                      + (f" ({', '.join(sorted(losses))})" if losses else ""))
        ax.set_title(f"Training loss\n{_group_heading(group)}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize="small")
    return fig


def plot_chi(groups: Sequence[Sequence[Run]], colors: dict[Path, Any]) -> Any | None:
    """χ_k of the full-batch gradient against step; None when no run logged χ."""
    if not any(np.isfinite(r.log["chi"]).any() for g in groups for r in g):
        return None
    fig, axes = _grid(len(groups))
    for ax, group in zip(axes, groups, strict=False):
        for run in group:
            chi = run.log["chi"]
            ok = np.isfinite(chi)
            if ok.any():
                ax.plot(run.log["step"][ok], chi[ok], color=colors[run.path],
                        label=f"{run.label}, k={run.config['k']}", linewidth=1.2)
                _mark_switch(ax, run, colors[run.path])
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("step")
        ax.set_ylabel("χ_k(∇L) = ‖P_k ∇L‖ / ‖∇L‖")
        ax.set_title(f"Alignment of the full-batch gradient with the top-k subspace\n"
                     f"{_group_heading(group)}")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
    return fig


def plot_eigenvalues(runs: Sequence[Run], colors: dict[Path, Any]) -> Any | None:
    """Top-k eigenvalues against step, one panel per run, with the 2/η line."""
    have = [r for r in runs if r.rows and np.isfinite(r.log["eigenvalues"]).any()]
    if not have:
        return None
    fig, axes = _grid(len(have), width=5.2, height=3.8)
    for ax, run in zip(axes, have, strict=False):
        steps, values = run.log["step"], run.log["eigenvalues"]
        for i in range(values.shape[1] - 1, -1, -1):
            ok = np.isfinite(values[:, i])
            ax.plot(steps[ok], values[ok, i], color=colors[run.path],
                    linewidth=1.8 if i == 0 else 0.7, alpha=1.0 if i == 0 else 0.45,
                    label="λ1 (sharpness)" if i == 0 else ("λ2…λk" if i == 1 else None))
        two_over_lr = 2.0 / run.config["lr"]
        if two_over_lr <= 2.0 * float(np.nanmax(values)):
            ax.axhline(two_over_lr, color="black", linestyle="--", linewidth=1,
                       label=f"2/η = {two_over_lr:g}")
        else:  # far above the spectrum: a line there would squash the curves flat
            ax.plot([], [], " ", label=f"2/η = {two_over_lr:g} (above the plot)")
        _mark_switch(ax, run, "gray")
        ax.set_xlabel("step")
        ax.set_ylabel("Hessian eigenvalue")
        ax.set_title(run.label, fontsize="medium")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="x-small")
    fig.suptitle("Top-k Hessian eigenvalues of the full training loss")
    return fig


def plot_eta(groups: Sequence[Sequence[Run]], colors: dict[Path, Any]) -> Any | None:
    """Effective learning rates η_dom and η_bulk against step (moving average of 1/50 of the
    run, the raw values faint)."""
    runs = [r for g in groups for r in g
            if np.isfinite(r.log["eta_dom"]).any() or np.isfinite(r.log["eta_bulk"]).any()]
    if not runs:
        return None
    fig, axes = _figure(2, 1, width=6.0)
    for ax, key, name in ((axes[0, 0], "eta_dom", "η_dom"), (axes[0, 1], "eta_bulk", "η_bulk")):
        for run in runs:
            values = run.log[key]
            steps = run.log["step"]
            window = max(1, len(values) // 50)
            ax.plot(steps, values, color=colors[run.path], alpha=0.2, linewidth=0.6)
            ax.plot(steps, _rolling(values, window), color=colors[run.path], linewidth=1.6,
                    label=f"{run.label} (η={run.config['lr']:g})")
        raw = np.concatenate([r.log[key][np.isfinite(r.log[key])] for r in runs])
        if raw.size:  # mini-batch noise makes single steps wild: frame the bulk of the values
            low, high = np.quantile(raw, [0.02, 0.98])
            pad = 0.1 * max(high - low, 1e-12)
            ax.set_ylim(min(low, 0.0) - pad, high + pad)
        ax.axhline(0.0, color="gray", linewidth=0.8)
        ax.set_xlabel("step")
        ax.set_ylabel(name)
        ax.set_title(f"Effective learning rate {name} of the base update")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
    return fig


def plot_audit(groups: Sequence[Sequence[Run]], colors: dict[Path, Any]) -> Any | None:
    """1 − audited overlap of the subspace in use with the exact top-k subspace against step
    (log scale), with each run's --subspace-tol; None when no run was audited."""
    if not any(len(r.audit.get("step", ())) for g in groups for r in g):
        return None
    fig, axes = _grid(len(groups))
    for ax, group in zip(axes, groups, strict=False):
        tols, drawn = set(), False
        for run in group:
            steps = run.audit.get("step", np.zeros(0))
            if not len(steps):
                continue
            drawn = True
            distance = np.clip(1.0 - run.audit["overlap"], 1e-12, None)
            ax.plot(steps, distance, marker="o", markersize=3, color=colors[run.path],
                    label=f"{run.label} ({run.config.get('refresh', 'warm')})", linewidth=1.2)
            if run.config.get("refresh") == "track":
                tols.add(float(run.config.get("subspace_tol", 1e-3)))
        for tol in sorted(tols):
            ax.axhline(tol, color="black", linestyle="--", linewidth=1,
                       label=f"--subspace-tol {tol:g}")
        ax.set_xlabel("step")
        ax.set_ylabel("1 − ‖V Uᵀ‖²_F / k")
        ax.set_title(f"Audited distance of the subspace in use from the exact top-k\n"
                     f"{_group_heading(group)}")
        if not drawn:
            ax.text(0.5, 0.5, "no audited run (--audit-every M)", ha="center",
                    transform=ax.transAxes)
            continue
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize="small")
    return fig


def plot_spectra(entries: Sequence[SpectraEntry]) -> Any | None:
    if not entries:
        return None
    from matplotlib import colormaps

    fig, axes = _figure()
    ax = axes[0, 0]
    cmap = colormaps["viridis"]
    many = len(entries) > 10
    for i, e in enumerate(entries):
        values = e.eigenvalues[: e.k]
        color = cmap(i / max(len(entries) - 1, 1))
        label = Path(e.checkpoint).name + (f" [{e.attrs['block']}]" if e.attrs.get("block")
                                           else "")  # a diagonal block (--per-module)
        if many and 0 < i < len(entries) - 1:
            label = None
        ax.plot(np.arange(1, len(values) + 1), values, marker="o", markersize=3.5, color=color,
                label=label)
    ax.set_xlabel("index i")
    ax.set_ylabel("λ_i")
    loss = entries[0].attrs.get("loss")
    curvatures = sorted({str(e.attrs.get("curvature", "hessian")) for e in entries})
    ax.set_title(f"Top eigenvalues per checkpoint ({', '.join(curvatures)}"
                 + (f", {loss} loss)" if loss else ")"))
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    return fig


def plot_density(entries: Sequence[SpectraEntry]) -> Any | None:
    """Each stored spectral density on a log scale, the checkpoint's top-k eigenvalues marked."""
    have = [e for e in entries if e.density is not None]
    if not have:
        return None
    from matplotlib import colormaps

    fig, axes = _figure()
    ax = axes[0, 0]
    cmap = colormaps["tab10"]
    for i, e in enumerate(have):
        attrs, data = e.density  # type: ignore[misc]
        color = cmap(i % 10)
        grid, density = np.asarray(data["grid"]), np.asarray(data["density"])
        positive = density > 0
        ax.plot(grid[positive], density[positive], color=color,
                label=f"{Path(e.checkpoint).name}: {attrs.get('curvature', 'hessian')} "
                      f"density (σ = {float(attrs['width']):.3g})")
        for j, value in enumerate(e.eigenvalues[: e.k]):
            ax.axvline(float(value), color=color, linestyle=":", linewidth=0.8,
                       label=f"top {e.k} eigenvalues" if j == 0 else None)
    ax.set_yscale("log")
    peak = max(float(np.max(e.density[1]["density"])) for e in have)  # type: ignore[index]
    ax.set_ylim(bottom=peak * 1e-10)  # below that, only the Gaussians' far tails
    ax.set_xlabel("eigenvalue λ")
    ax.set_ylabel("density")
    ax.set_title("Spectral density (stochastic Lanczos quadrature)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small")
    return fig


def plot_alignment(entries: Sequence[SpectraEntry]) -> Any | None:
    have = [e for e in entries if e.alignment is not None]
    if not have:
        return None
    from matplotlib import colormaps

    fig, axes = _figure()
    ax = axes[0, 0]
    cmap = colormaps["tab10"]
    for i, e in enumerate(have):
        attrs, data = e.alignment  # type: ignore[misc]
        sizes = np.asarray(data["batch_sizes"], dtype=float)
        chi = np.asarray(data["chi_minibatch"])
        color = cmap(i % 10)
        name = Path(e.checkpoint).name
        ax.plot(sizes, chi.mean(axis=1), marker="o", color=color,
                label=f"{name}: mini-batch gradients (mean, q05–q95)")
        ax.fill_between(sizes, np.quantile(chi, 0.05, axis=1), np.quantile(chi, 0.95, axis=1),
                        color=color, alpha=0.2)
        ax.axhline(float(attrs["chi_full"]), color=color, linestyle="--",
                   label=f"{name}: full-batch gradient")
    ax.set_xscale("log")
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("mini-batch size B")
    ax.set_ylabel("χ_k")
    ax.set_title(f"Alignment with the top-{have[0].k} subspace against batch size")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small")
    return fig


def write_plots(out_dir: Path, groups: Sequence[Sequence[Run]], entries: Sequence[SpectraEntry],
                formats: Sequence[str], note: Callable[[str], None]) -> list[Path]:
    """Every plot the inputs allow; a plot whose quantities are missing is skipped with a note."""
    import matplotlib

    matplotlib.use("Agg")
    runs = [r for g in groups for r in g if r.rows]
    empty = [r for g in groups for r in g if not r.rows]
    for run in empty:
        note(f"{run.path} has no logged rows yet; left out of the plots")
    groups = [[r for r in g if r.rows] for g in groups]
    groups = [g for g in groups if g]
    colors = _colors(runs)
    written: list[Path] = []
    makers: list[tuple[str, Callable[[], Any], str]] = []
    if runs:
        makers += [
            ("loss", lambda: plot_loss(groups, colors), ""),
            ("chi", lambda: plot_chi(groups, colors), "no run logged χ_k (k = 0 everywhere)"),
            ("eigenvalues", lambda: plot_eigenvalues(runs, colors),
             "no run logged eigenvalues (k = 0)"),
            ("eta", lambda: plot_eta(groups, colors),
             "no run logged η_dom or η_bulk (they need a subspace)"),
            ("audit", lambda: plot_audit(groups, colors),
             "no run was audited (project-train --audit-every M)"),
        ]
    if entries:
        makers += [
            ("spectrum", lambda: plot_spectra(entries), ""),
            ("alignment", lambda: plot_alignment(entries),
             "no spectra file holds alignment results (subspace align -o FILE)"),
            ("density", lambda: plot_density(entries),
             "no spectra file holds a spectral density (subspace density -o FILE)"),
        ]
    for stem, make, why in makers:
        fig = make()
        if fig is None:
            note(f"skipped {stem} plot: {why}")
            continue
        written += _save(fig, out_dir, stem, formats)
    return written


@contextmanager
def staged_directory(out_dir: Path) -> Iterator[Path]:
    """A temporary directory beside ``out_dir`` to write a report into; when the block ends
    without an error, each file in it replaces its namesake in ``out_dir`` (renames on one file
    system), so a full disk or an error leaves ``out_dir`` as it was, never half-written."""
    import shutil
    import tempfile

    from subspace_cli.checkpoint import publish
    from subspace_cli.errors import refusals_reported

    real = Path(os.path.realpath(out_dir))
    real.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{real.name}.", suffix=".tmp", dir=real.parent))
    try:
        with refusals_reported(out_dir, "write the report to", f"; {out_dir} is unchanged"):
            yield stage
        real.mkdir(exist_ok=True)
        for file in sorted(stage.iterdir()):
            publish(str(file), real / file.name)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def write_text(path: Path, text: str) -> None:
    """Write a text file atomically."""
    from subspace_cli.checkpoint import publish, temporary_sibling

    tmp = temporary_sibling(path)
    try:
        Path(tmp).write_text(text)
        publish(tmp, path)
    finally:
        if Path(tmp).exists():
            Path(tmp).unlink()


def markdown_report(text_tables: str, plots: Iterable[Path], out_dir: Path,
                    notes: Sequence[str]) -> str:
    lines = ["# subspace report", "", text_tables.rstrip(), ""]
    pngs = [p for p in plots if p.suffix == ".png"]
    if pngs:
        lines += ["## Plots", ""]
        lines += [f"![{p.stem}]({p.relative_to(out_dir)})" for p in pngs]
        lines.append("")
    if notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    return "\n".join(lines)
