"""Issue 14: concurrent writers, interrupts and damaged run files; nothing the user had is lost.

The fault matrix of docs/RELIABILITY.md: each test provokes one fault for real (two processes,
a signal, a held lock, a truncated file) and checks the exit code, the message and what
survives.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from plugin_fixtures import fake_plugin, linear_checkpoint, run_cli  # noqa: F401
from test_store_layout import fill, small_disk  # noqa: F401

from subspace_cli import locking, runlog, store
from subspace_cli.checkpoint import read_checkpoint
from subspace_cli.projected import ProjectedTraining


@pytest.fixture
def start(tmp_path, fake_plugin):  # noqa: F811
    path = tmp_path / "start.safetensors"
    linear_checkpoint(path, 0, step=100)
    return path


def env_with(plugin_root, **extra):
    return {**os.environ, **extra, "PYTHONPATH": os.pathsep.join(
        [str(plugin_root), os.environ.get("PYTHONPATH", "")])}


def cli(args, env, **kwargs):
    return subprocess.Popen([sys.executable, "-m", "subspace_cli", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def wait_for(path, process, seconds=120):
    """Until ``path`` exists, or ``process`` ends, or ``seconds`` pass."""
    deadline = time.time() + seconds
    while not path.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.02)


TRAIN = ["--mode", "bulk", "-k", "2", "--batch-size", "4", "--lr", "0.02", "--dtype", "float64",
         "--optimizer", "momentum"]


# -- spectra files: one writer at a time, none lost --------------------------------------------

def test_two_concurrent_spectrum_writers_both_land(tmp_path, fake_plugin):  # noqa: F811
    """Item 1 at the CLI: both processes are started while the file's lock is held, so their
    writes are certain to meet; each waits, and both groups are in the file."""
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    linear_checkpoint(a, 1)
    linear_checkpoint(b, 2)
    out = tmp_path / "same.h5"
    first = run_cli("spectrum", str(a), "-k", "2", "-o", str(out), "-q")  # the file exists
    assert first.exit_code == 0, first.stderr
    env = env_with(fake_plugin)
    lock = store.sidecar(out) / ".lock"
    with locking.exclusive(lock, what="test"):
        writers = [cli(["spectrum", str(p), "-k", "2", "-o", str(out), "--overwrite", "-q"], env)
                   for p in (a, b)]
        time.sleep(1.5)  # both are loaded and waiting for the lock by now, or soon will be
        assert all(w.poll() is None for w in writers)
    for w in writers:
        _, err = w.communicate(timeout=120)
        assert w.returncode == 0, err
    keys = {s.checkpoint for s in store.iter_spectra(out)}
    assert keys == {str(a), str(b)}
    assert not [p for p in store.sidecar(out).iterdir() if p.name.endswith(".tmp")]


def test_a_writer_waits_a_bounded_time_and_names_the_holder(tmp_path, start, monkeypatch):
    out = tmp_path / "s.h5"
    assert run_cli("spectrum", str(start), "-k", "2", "-o", str(out), "-q").exit_code == 0
    before = out.read_bytes()
    monkeypatch.setenv(locking.WAIT_ENV, "0.3")
    with locking.exclusive(store.sidecar(out) / ".lock", what="test"):
        result = run_cli("spectrum", str(start), "-k", "2", "-o", str(out), "--overwrite")
    assert result.exit_code == 2
    assert f"is in use by PID {os.getpid()} (waited 0.3 s)" in result.stderr
    assert "Traceback" not in result.stderr
    assert out.read_bytes() == before


# -- run directories: one process at a time, Ctrl-C saves ------------------------------------

def test_a_second_resume_of_a_live_run_is_refused_and_rows_stay_unique(tmp_path, start,
                                                                        fake_plugin):  # noqa: F811
    run_dir = tmp_path / "run"
    env = env_with(fake_plugin)
    live = cli(["project-train", str(start), "--out", str(run_dir), "--steps", "100000",
                "--save-every", "2", *TRAIN], env)
    try:
        wait_for(run_dir / "step_0000002.state.safetensors", live)
        assert live.poll() is None, live.communicate()[1]
        second = run_cli("project-train", "--resume", str(run_dir))
        assert second.exit_code == 2
        assert f"run directory {run_dir} is in use by PID {live.pid}" in second.stderr
        again = run_cli("project-train", str(start), "--out", str(run_dir), *TRAIN)
        assert again.exit_code == 2 and "not empty" in again.stderr
        live.send_signal(signal.SIGINT)  # saves the step it is on, then stops
        _, err = live.communicate(timeout=120)
    finally:
        if live.poll() is None:
            live.kill()
            live.wait()
    assert live.returncode == 130, err
    stopped = int(read_checkpoint(run_dir / "last.safetensors").metadata["subspace.run_step"])
    assert f"interrupted at step {stopped}; saved at step {stopped}; continue with" in err
    assert (run_dir / f"step_{stopped:07d}.state.safetensors").exists()

    shorter = run_cli("project-train", "--resume", str(run_dir), "--steps", "1")
    assert shorter.exit_code == 2 and f"is at step {stopped}" in shorter.stderr
    until = stopped + 3
    resumed = run_cli("project-train", "--resume", str(run_dir), "--steps", str(until), "-q")
    assert resumed.exit_code == 0, resumed.stderr
    assert resumed.stderr == ""  # -q: no "resuming …" line
    assert list(runlog.read(run_dir / "run.h5")["log"]["step"]) == list(range(until))
    # --steps was stored: a plain --resume finds the run complete and does nothing
    assert json.loads((run_dir / "config.json").read_text())["config"]["steps"] == until
    done = run_cli("project-train", "--resume", str(run_dir))
    assert done.exit_code == 0 and f"complete at step {until} of {until}" in done.stderr


def interrupt_at(monkeypatch, step, signum=signal.SIGINT, times=1):
    """Deliver ``signum`` (``times`` over) to this process at the end of training step ``step``,
    as a Ctrl-C typed at that moment would."""
    original = ProjectedTraining.step

    def step_then_signal(self):
        row = original(self)
        if self.state.step == step:
            for _ in range(times):
                signal.raise_signal(signum)
        return row

    monkeypatch.setattr(ProjectedTraining, "step", step_then_signal)


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_before_the_first_checkpoint_saves_and_resume_is_bit_identical(
        tmp_path, start, monkeypatch, signum, code):
    args = ["project-train", str(start), *TRAIN, "--steps", "12", "--save-every", "1000"]
    whole = run_cli(*args, "--out", str(tmp_path / "whole"))
    assert whole.exit_code == 0, whole.stderr
    with monkeypatch.context() as patch:
        interrupt_at(patch, 5, signum)
        cut = run_cli(*args, "--out", str(tmp_path / "cut"))
    assert cut.exit_code == code
    assert "interrupted at step 5; saved at step 5; continue with" in cut.stderr
    resumed = run_cli("project-train", "--resume", str(tmp_path / "cut"))
    assert resumed.exit_code == 0, resumed.stderr
    a = read_checkpoint(tmp_path / "whole" / "last.safetensors").tensors
    b = read_checkpoint(tmp_path / "cut" / "last.safetensors").tensors
    assert all(torch.equal(a[name], b[name]) for name in a)
    log_a = runlog.read(tmp_path / "whole" / "run.h5")["log"]
    log_b = runlog.read(tmp_path / "cut" / "run.h5")["log"]
    np.testing.assert_array_equal(log_a["train_loss"], log_b["train_loss"])
    assert list(log_b["step"]) == list(range(12))


def test_a_second_interrupt_before_any_checkpoint_leaves_no_half_made_run(tmp_path, start,
                                                                          monkeypatch):
    out = tmp_path / "run"
    args = ["project-train", str(start), *TRAIN, "--steps", "12", "--save-every", "1000",
            "--out", str(out)]
    with monkeypatch.context() as patch:
        interrupt_at(patch, 3, times=2)
        cut = run_cli(*args)
    assert cut.exit_code == 130
    assert "before the first checkpoint: nothing to resume" in cut.stderr
    assert not out.exists()
    again = run_cli(*args)  # the same command then runs
    assert again.exit_code == 0, again.stderr


def test_interrupts_at_random_moments_always_stop_the_run(tmp_path, start,
                                                          fake_plugin):  # noqa: F811
    """None is swallowed: each of two runs, signalled at a random moment after its first
    checkpoint, stops with 130 and leaves a resumable directory (one at a time: a run left
    training would slow the other's start on two cores)."""
    rng = np.random.default_rng(14)
    env = env_with(fake_plugin)
    for i in range(2):
        run_dir = tmp_path / f"r{i}"
        process = cli(["project-train", str(start), "--out", str(run_dir), "--steps", "100000",
                       "--save-every", "3", "--log-every", "2", *TRAIN], env)
        try:
            wait_for(run_dir / "last.safetensors", process)
            time.sleep(float(rng.uniform(0, 0.4)))
            process.send_signal(signal.SIGINT)
            _, err = process.communicate(timeout=120)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
        assert process.returncode == 130, err
        step = int(read_checkpoint(run_dir / "last.safetensors").metadata["subspace.run_step"])
        assert f"saved at step {step}" in err
        assert list(runlog.read(run_dir / "run.h5")["log"]["step"]) == list(range(0, step, 2))


# -- damaged run files -----------------------------------------------------------------------

@pytest.fixture
def finished_run(tmp_path, start):
    out = tmp_path / "run"
    result = run_cli("project-train", str(start), *TRAIN, "--steps", "4", "--save-every", "2",
                     "--out", str(out))
    assert result.exit_code == 0, result.stderr
    return out


def test_a_truncated_config_json_is_named_not_a_bug(finished_run):
    config = finished_run / "config.json"
    config.write_text(config.read_text()[:40])
    result = run_cli("project-train", "--resume", str(finished_run), "--steps", "6")
    assert result.exit_code == 2
    assert f"{config} is damaged" in result.stderr and "internal error" not in result.stderr


def test_a_damaged_run_file_and_backup_are_refused_and_kept(finished_run):
    log, bak = finished_run / "run.h5", finished_run / "run.h5.bak"
    log.write_bytes(log.read_bytes()[:300])
    bak.write_bytes(b"\0" * 100)
    kept = log.read_bytes(), bak.read_bytes()
    result = run_cli("project-train", "--resume", str(finished_run), "--steps", "6")
    assert result.exit_code == 2
    assert "are both damaged" in result.stderr and "Traceback" not in result.stderr
    assert (log.read_bytes(), bak.read_bytes()) == kept  # nothing the user had is overwritten


def test_a_damaged_run_file_is_restored_from_its_backup(finished_run):
    log = finished_run / "run.h5"
    log.write_bytes(log.read_bytes()[:300])
    result = run_cli("project-train", "--resume", str(finished_run), "--steps", "6")
    assert result.exit_code == 0, result.stderr
    assert list(runlog.read(log)["log"]["step"]) == list(range(6))


# -- output files: symlinks written through, permissions kept -----------------------------------

def test_output_through_a_symlink_writes_its_target_and_keeps_its_mode(tmp_path, start):
    target = tmp_path / "data" / "spectra.h5"
    target.parent.mkdir()
    assert run_cli("spectrum", str(start), "-k", "2", "-o", str(target), "-q").exit_code == 0
    target.chmod(0o600)
    link = tmp_path / "link.h5"
    link.symlink_to(target)
    other = tmp_path / "other.safetensors"
    linear_checkpoint(other, 5)
    result = run_cli("spectrum", str(other), "-k", "2", "-o", str(link), "-q")
    assert result.exit_code == 0, result.stderr
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert (target.stat().st_mode & 0o777) == 0o600
    assert len(list(store.iter_spectra(target))) == 2

    from subspace_cli.checkpoint import write_checkpoint

    weights = tmp_path / "data" / "w.safetensors"
    write_checkpoint(weights, {"x": torch.zeros(2)}, {})
    weights.chmod(0o640)
    alias = tmp_path / "w.safetensors"
    alias.symlink_to(weights)
    write_checkpoint(alias, {"x": torch.ones(2)}, {}, overwrite=True)
    assert alias.is_symlink() and (weights.stat().st_mode & 0o777) == 0o640
    assert torch.equal(read_checkpoint(weights).tensors["x"], torch.ones(2))


# -- a full disk and a read-only file system: checked before computing, nothing lost ------------

def read_only(disk):
    subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)


def test_a_read_only_output_is_refused_before_the_solve(small_disk, start):  # noqa: F811
    read_only(small_disk)
    out = small_disk / "spectra.h5"
    result = run_cli("spectrum", str(start), str(start), "-k", "2", "-o", str(out))
    assert result.exit_code == 2
    [line] = result.stderr.strip().splitlines()
    assert line == f"error: cannot write {out}: read-only file system (EROFS)"
    report = run_cli("report", str(start), "-o", str(small_disk / "report"))
    assert report.exit_code == 2 and "read-only file system (EROFS)" in report.stderr
    train = run_cli("project-train", str(start), "--out", str(small_disk / "run"), *TRAIN)
    assert train.exit_code == 2 and "read-only file system (EROFS)" in train.stderr


def test_a_spectrum_that_cannot_fit_is_refused_before_the_solve(small_disk, start):  # noqa: F811
    """No room for the group's eigenvectors (2 × 8 float32 here): the solve is not started."""
    out = small_disk / "spectra.h5"
    fill(small_disk, 0)
    result = run_cli("spectrum", str(start), "-k", "2", "-o", str(out), "-q")
    assert result.exit_code == 2
    assert "no space left on device (ENOSPC): about 64 B needed, 0 B free" in result.stderr
    assert "was not solved" in result.stderr and not out.exists()


def test_a_report_on_a_full_disk_leaves_the_old_report_whole(small_disk, finished_run):  # noqa: F811
    out = small_disk / "report"
    first = run_cli("report", str(finished_run), "-o", str(out), "--plot-format", "png")
    assert first.exit_code == 0, first.stderr
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    fill(small_disk, 20_000)
    again = run_cli("report", str(finished_run), "-o", str(out))
    assert again.exit_code == 2, again.stderr
    assert "no space left on device (ENOSPC)" in again.stderr and f"{out} is unchanged" in (
        again.stderr)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in small_disk.iterdir() if p.name.endswith(".tmp")] == []


def test_project_train_on_a_full_disk_stops_with_one_line_and_resumes(small_disk, start):  # noqa: F811
    run_dir = small_disk / "run"
    fill(small_disk, 1_500_000)
    result = run_cli("project-train", str(start), "--out", str(run_dir), *TRAIN, "--steps",
                     "100000", "--save-every", "1", "-k", "0")
    assert result.exit_code == 2, result.stderr
    [line] = result.stderr.strip().splitlines()
    assert "no space left on device (ENOSPC)" in line and "internal error" not in line
    assert f"continue with `subspace project-train --resume {run_dir}`" in line
    os.unlink(small_disk / "filler")
    saved = int(read_checkpoint(run_dir / "last.safetensors").metadata["subspace.run_step"])
    resumed = run_cli("project-train", "--resume", str(run_dir), "--steps", str(saved + 2))
    assert resumed.exit_code == 0, resumed.stderr
    assert list(runlog.read(run_dir / "run.h5")["log"]["step"]) == list(range(saved + 2))
