"""`subspace report`: tables in every format, plots, grouping, and numbers read back from run.h5."""

from __future__ import annotations

import csv
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from plugin_fixtures import fake_plugin, linear_checkpoint, run_cli  # noqa: F401

from subspace_cli import runlog

PLOTS = ["loss", "chi", "eigenvalues", "eta", "audit"]


def train(workdir: Path, start: Path, name: str, *args: str) -> Path:
    out = workdir / name
    result = run_cli("project-train", str(start), "--out", str(out), "--dtype", "float64",
                     "--steps", "8", "--batch-size", "4", "--seed", "0", "-k", "2", "-q", *args)
    assert result.exit_code == 0, result.stderr
    return out


@pytest.fixture(scope="module")
def made_runs(tmp_path_factory, module_plugin):
    """The four runs that the report tests read, trained once for the module."""
    workdir = tmp_path_factory.mktemp("report-runs")
    start = workdir / "start.safetensors"
    linear_checkpoint(start, 0, step=100)
    other = workdir / "other.safetensors"
    linear_checkpoint(other, 1, step=50)
    return {
        "none": train(workdir, start, "none", "--mode", "none"),
        "dom": train(workdir, start, "dom", "--mode", "dom", "--start-step", "3"),
        "bulk": train(workdir, start, "bulk", "--mode", "bulk", "--audit-every", "2"),
        "other": train(workdir, other, "other", "--mode", "bulk", "--lr", "0.05"),
    }


@pytest.fixture
def runs(made_runs, tmp_path):
    """A copy of the module's runs in the test's own directory: a test may change its runs
    (config.json, run.h5) without the others seeing it. The start checkpoints they name stay
    where the module's runs were trained."""
    return {name: shutil.copytree(path, tmp_path / name) for name, path in made_runs.items()}


def report(*args: str):
    return run_cli("report", *map(str, args))


def test_json_numbers_equal_the_run_file(runs):
    result = report(runs["none"], runs["dom"], runs["bulk"], "--json")
    assert result.exit_code == 0, result.stderr
    payload = json.loads(result.stdout)
    by_mode = {r["mode"]: r for r in payload["runs"]}
    assert [r["mode"] for r in payload["runs"]] == ["none", "dom", "bulk"]
    for mode, summary in by_mode.items():
        data = runlog.read(runs[mode] / "run.h5")
        log = data["log"]
        assert summary["start_train_loss"] == float(log["train_loss"][0])
        assert summary["final_train_loss"] == float(log["train_loss"][-1])
        assert summary["final_train_accuracy"] == float(log["train_accuracy"][-1])
        assert summary["last_logged_step"] == 7 and summary["logged_rows"] == 8
        after = log["projecting"].astype(bool) if mode != "none" else np.ones(8, dtype=bool)
        assert summary["mean_chi_after_switch"] == pytest.approx(float(log["chi"][after].mean()),
                                                                 rel=1e-15)
        assert summary["mean_eta_dom"] == pytest.approx(float(log["eta_dom"][after].mean()),
                                                        rel=1e-15)
        assert summary["mean_eta_bulk"] == pytest.approx(float(log["eta_bulk"][after].mean()),
                                                         rel=1e-15)
        assert summary["final_sharpness"] == float(log["eigenvalues"][-1, 0])
        assert summary["two_over_lr"] == pytest.approx(2 / 0.01)
    assert by_mode["dom"]["switch_step"] == 3 and by_mode["bulk"]["switch_step"] == 0
    assert by_mode["none"]["switch_step"] is None
    none_final = by_mode["none"]["final_train_loss"]
    assert by_mode["none"]["final_loss_vs_none"] == 1.0
    assert by_mode["bulk"]["final_loss_vs_none"] == pytest.approx(
        by_mode["bulk"]["final_train_loss"] / none_final, rel=1e-15)
    assert by_mode["bulk"]["compared_at_step"] == 7
    assert [r["label"] for r in payload["runs"]] == ["SGD", "Dom-SGD", "Bulk-SGD"]


def test_runs_are_grouped_by_start_checkpoint(runs):
    result = report(runs["other"], runs["none"], runs["bulk"])
    assert result.exit_code == 0, result.stderr
    text = result.stdout
    first, second = text.index("start: "), text.rindex("start: ")
    assert "other.safetensors (step 50)" in text[first:second]
    assert "start.safetensors (step 100)" in text[second:]
    payload = json.loads(report(runs["other"], runs["bulk"], "--json").stdout)
    # no unprojected run from other.safetensors: nothing to compare against
    other = next(r for r in payload["runs"] if r["run"].endswith("other"))
    assert other["final_loss_vs_none"] is None


def test_runs_without_a_recorded_start_hash_are_grouped_by_the_checkpoint(runs):
    config = runs["dom"] / "config.json"
    stored = json.loads(config.read_text())
    del stored["start_sha256"]  # as written before it was recorded
    config.write_text(json.dumps(stored))
    payload = json.loads(report(runs["none"], runs["dom"], "--json").stdout)
    dom = next(r for r in payload["runs"] if r["mode"] == "dom")
    assert dom["final_loss_vs_none"] is not None  # same group as the none run


def test_table_markdown_and_csv_carry_the_same_numbers(runs):
    payload = json.loads(report(runs["none"], runs["bulk"], "--json").stdout)
    table = report(runs["none"], runs["bulk"]).stdout
    markdown = report(runs["none"], runs["bulk"], "--format", "markdown").stdout
    rows = list(csv.DictReader(io.StringIO(report(runs["none"], runs["bulk"],
                                                  "--format", "csv").stdout)))
    assert [r["mode"] for r in rows] == ["none", "bulk"]
    for summary, row in zip(payload["runs"], rows, strict=True):
        assert float(row["final_train_loss"]) == summary["final_train_loss"]
        assert float(row["mean_chi_after_switch"]) == summary["mean_chi_after_switch"]
        final = f"{summary['final_train_loss']:.6g}"
        assert final in table and final in markdown
    assert markdown.startswith("### start: ") and "| run " in markdown
    assert "Bulk-SGD" in table and "loss final" in table
    bulk = payload["runs"][1]
    assert bulk["audits"] == 4 and bulk["audit_overlap_min"] > 1 - 1e-9  # a constant Hessian
    assert payload["runs"][0]["audits"] == 0 and payload["runs"][0]["audit_overlap_min"] is None
    assert f"{bulk['audit_overlap_min']:.6f}" in table and "audit min" in table


@pytest.mark.slow
def test_plots_and_files_written(runs, tmp_path):
    out = tmp_path / "report"
    result = report(runs["none"], runs["dom"], runs["bulk"], runs["other"], "-o", out)
    assert result.exit_code == 0, result.stderr
    for stem in PLOTS:
        for ext in ("png", "svg"):
            path = out / f"{stem}.{ext}"
            assert path.stat().st_size > 1000, path
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert b"<svg" in (out / "loss.svg").read_bytes()[:2000]
    saved = json.loads((out / "summary.json").read_text())
    assert len(saved["runs"]) == 4 and len(saved["plots"]) == 10
    assert "![loss](loss.png)" in (out / "report.md").read_text()
    assert len(list(csv.DictReader(io.StringIO((out / "summary.csv").read_text())))) == 4
    assert not list(out.glob(".*.tmp")), "temporary files left behind"


def test_plot_format_option(runs, tmp_path):
    out = tmp_path / "png_only"
    assert report(runs["bulk"], "-o", out, "--plot-format", "png").exit_code == 0
    assert (out / "loss.png").exists() and not (out / "loss.svg").exists()


def test_k0_run_skips_subspace_plots_with_a_note(tmp_path, fake_plugin):  # noqa: F811
    start = tmp_path / "start.safetensors"
    linear_checkpoint(start, 0, step=10)
    run_dir = train(tmp_path, start, "plain", "--mode", "none", "-k", "0")
    out = tmp_path / "report"
    result = report(run_dir, "-o", out)
    assert result.exit_code == 0, result.stderr
    assert (out / "loss.png").exists()
    for stem in ("chi", "eigenvalues", "eta", "audit"):
        assert not (out / f"{stem}.png").exists()
        assert f"skipped {stem} plot" in result.stderr
    assert "Traceback" not in result.stderr


def test_spectra_file_plots(tmp_path, fake_plugin):  # noqa: F811
    ckpts = []
    for i in range(2):
        ckpt = tmp_path / f"c{i}.safetensors"
        linear_checkpoint(ckpt, i, step=i)
        ckpts.append(ckpt)
    spectra = tmp_path / "spectra.h5"
    result = run_cli("spectrum", *map(str, ckpts), "-k", "2", "--dtype", "float64", "-o",
                     str(spectra), "-q")
    assert result.exit_code == 0, result.stderr
    result = run_cli("align", str(ckpts[0]), "--eigenspace", str(spectra), "-k", "2",
                     "--dtype", "float64", "--batch-size", "2", "--batch-size", "6",
                     "--batches", "5", "-o", str(spectra), "-q")
    assert result.exit_code == 0, result.stderr
    out = tmp_path / "report"
    result = report(spectra, "-o", out, "--json")
    assert result.exit_code == 0, result.stderr
    payload = json.loads(result.stdout)
    assert [Path(s["checkpoint"]).name for s in payload["spectra"]] == ["c0.safetensors",
                                                                       "c1.safetensors"]
    with h5py.File(spectra) as f:
        group = next(f[name] for name in f if "c0" in name)
        stored = group["eigenvalues"][:2]
        chi_full = float(group["alignment"].attrs["chi_full"])
        minibatch = group["alignment"]["chi_minibatch"][()]
    assert payload["spectra"][0]["eigenvalues"] == [float(v) for v in stored]
    assert payload["spectra"][0]["chi_full"] == chi_full
    assert payload["spectra"][0]["chi_minibatch_mean"] == {
        "2": float(minibatch[0].mean()), "6": float(minibatch[1].mean())}
    assert payload["spectra"][1]["chi_full"] is None
    for stem in ("spectrum", "alignment"):
        assert (out / f"{stem}.png").stat().st_size > 1000


def test_directory_of_runs_is_searched(runs, tmp_path):
    parent = tmp_path / "all"
    parent.mkdir()
    for mode in ("none", "bulk"):
        shutil.copytree(runs[mode], parent / mode)
    payload = json.loads(report(parent, "--json").stdout)
    assert sorted(r["mode"] for r in payload["runs"]) == ["bulk", "none"]


def test_bad_inputs(runs, tmp_path):
    junk = tmp_path / "junk.h5"
    junk.write_text("not hdf5")
    result = report(junk)
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1 and "not an HDF5 file" in result.stderr
    result = report(runs["none"], tmp_path / "missing")
    assert result.exit_code == 1  # one of two inputs failed; the other is still reported
    assert "no such file or directory" in result.stderr and "SGD" in result.stdout
    file_target = tmp_path / "a_file"
    file_target.write_text("x")
    result = report(runs["none"], "-o", file_target)
    assert result.exit_code == 2 and "is a file" in result.stderr
    assert file_target.read_text() == "x"


def test_damaged_run_file_falls_back_to_backup(runs):
    run_dir = runs["bulk"]
    assert (run_dir / "run.h5.bak").exists()
    (run_dir / "run.h5").write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 100)  # torn write
    result = report(run_dir, "--json")
    assert result.exit_code == 0, result.stderr
    payload = json.loads(result.stdout)
    assert "used run.h5.bak" in payload["notes"][0]
    assert payload["runs"][0]["last_logged_step"] == 7


def _hold_open(path: Path, locking: bool) -> subprocess.Popen:
    """Another process that opens ``path`` for reading and keeps it open."""
    code = ("import sys, time, h5py\n"
            f"f = h5py.File(sys.argv[1], 'r', locking={locking})\n"
            "print('open', flush=True)\n"
            "time.sleep(60)\n")
    reader = subprocess.Popen([sys.executable, "-c", code, str(path)], stdout=subprocess.PIPE,
                              text=True)
    assert reader.stdout.readline().strip() == "open"
    return reader


def test_reading_does_not_lock_out_a_writer(runs, monkeypatch, tmp_path):
    """report reads run.h5 without the HDF5 lock, so a running trainer's append still works."""
    from subspace_cli.projected import RefreshLog
    from subspace_cli.report import load_run

    # runlog.read must open the way the second reader below does; it reads in a watchdog
    # child (subspace_cli.hdf5), so the opens are recorded in a file
    record = tmp_path / "opened"
    h5_file = h5py.File

    def recording_file(*args, **kwargs):
        with open(record, "a") as f:
            f.write(f"{kwargs.get('locking')}\n")
        return h5_file(*args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(h5py, "File", recording_file)
        load_run(runs["bulk"])
    opened = record.read_text().split()
    assert opened and all(locking == "False" for locking in opened)

    path = runs["bulk"] / "run.h5"
    row = RefreshLog(step=99, reason="interval", age=4, hvps=1, seconds=0.1, max_residual=0.0,
                     all_converged=True, stopped_on="subspace", subspace_error=0.0,
                     overlap_previous=1.0, drift_estimate=0.0, next_interval=8.0,
                     residuals=[0.0, 0.0])
    reader = _hold_open(path, locking=True)  # what a locking reader would do to the trainer
    try:
        with pytest.raises(OSError, match="lock"):
            runlog.append(path, runlog.REFRESH, [row])
    finally:
        reader.kill()
        reader.wait()
    reader = _hold_open(path, locking=False)  # how report (runlog.read) opens it
    try:
        runlog.append(path, runlog.REFRESH, [row])
    finally:
        reader.kill()
        reader.wait()
    assert runlog.read(path)["refresh"]["step"][-1] == 99
