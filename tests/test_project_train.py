"""`subspace project-train`: projections, optimizers, switching, resume after kill -9."""

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
from plugin_fixtures import (  # noqa: F401
    TOY_C,
    TOY_D,
    TOY_N,
    fake_plugin,
    quadratic_problem,
    run_cli,
)
from plugin_fixtures import linear_checkpoint as _linear_checkpoint

from subspace_cli import runlog
from subspace_cli.checkpoint import read_checkpoint
from subspace_cli.projected import EMA_FACTOR
from subspace_cli.projection import project, split

N, D, C = TOY_N, TOY_D, TOY_C
run = run_cli


def flat(tensors):
    return torch.cat([tensors["weight"].reshape(-1), tensors["bias"]]).double()


def final_params(run_dir):
    return flat(read_checkpoint(run_dir / "last.safetensors").tensors)


def linear_checkpoint(path, seed=0):
    return _linear_checkpoint(path, seed, step=100)


def train(tmp_path, name, *args):
    ckpt = tmp_path / "start.safetensors"
    if not ckpt.exists():
        linear_checkpoint(ckpt)
    out = tmp_path / name
    result = run(
        "project-train", str(ckpt), "--out", str(out), "--dtype", "float64", "--json", *args
    )
    assert result.exit_code == 0, result.stderr
    return out, json.loads(result.stdout)


def exact_problem(tensors):
    """Full-batch gradient and Hessian eigenvectors (rows) of the quadratic loss."""
    _, vectors, gradient = quadratic_problem(tensors)
    return gradient, vectors


def test_split_is_orthogonal_and_complete():
    basis = torch.linalg.qr(torch.randn(30, 4, dtype=torch.float64))[0].T
    v = torch.randn(30, dtype=torch.float64)
    dom, bulk = split(basis, v)
    assert float(dom @ bulk) == pytest.approx(0.0, abs=1e-12)
    torch.testing.assert_close(dom + bulk, v, rtol=0, atol=1e-14)
    torch.testing.assert_close(project(basis, v, "mix", 2.0, 0.5), 2 * dom + 0.5 * bulk)
    assert torch.equal(project(basis, v, "none"), v)


def test_dom_full_rank_and_bulk_k0_match_none(tmp_path, fake_plugin):  # noqa: F811
    common = ["--steps", "6", "--batch-size", "4", "--save-every", "3"]
    none, _ = train(tmp_path, "none", "--mode", "none", "-k", "2", *common)
    dom, summary = train(tmp_path, "dom", "--mode", "dom", "-k", str(C * D + C), *common)
    bulk, _ = train(tmp_path, "bulk", "--mode", "bulk", "-k", "0", *common)
    torch.testing.assert_close(final_params(dom), final_params(none), rtol=0, atol=1e-12)
    assert torch.equal(final_params(bulk), final_params(none))
    assert summary["switch_step"] == 0 and summary["logged_rows"] == 6


def test_quadratic_dom_and_bulk_updates_exact(tmp_path, fake_plugin):  # noqa: F811
    start = linear_checkpoint(tmp_path / "start.safetensors")
    gradient, vectors = exact_problem(start)
    P = vectors[:2].T @ vectors[:2]  # top eigenvalue has multiplicity C = 2: a unique subspace
    theta = flat(start).numpy()
    lr = 0.1
    for mode, keep in (("dom", P), ("bulk", np.eye(len(theta)) - P)):
        out, _ = train(
            tmp_path,
            mode,
            "--mode",
            mode,
            "-k",
            "2",
            "--steps",
            "1",
            "--batch-size",
            "full",
            "--lr",
            str(lr),
        )
        want = theta - lr * keep @ gradient
        np.testing.assert_allclose(final_params(out).numpy(), want, rtol=0, atol=1e-9)
        log = runlog.read(out / "run.h5")["log"]
        norms = (np.linalg.norm(P @ gradient) * lr, np.linalg.norm(gradient - P @ gradient) * lr)
        assert log["update_dom_norm"][0] == pytest.approx(norms[0], rel=1e-7)
        assert log["update_bulk_norm"][0] == pytest.approx(norms[1], rel=1e-7)
        assert log["eta_dom"][0] == pytest.approx(lr, rel=1e-7)  # plain GD: η_dom = η_bulk = η
        assert log["eta_bulk"][0] == pytest.approx(lr, rel=1e-7)
        assert log["two_over_lr"][0] == pytest.approx(2 / lr)


@pytest.mark.parametrize("optimizer", ["sgd", "momentum", "nesterov", "adam", "sam"])
def test_every_optimizer_runs(tmp_path, fake_plugin, optimizer):  # noqa: F811
    out, summary = train(
        tmp_path,
        optimizer,
        "--mode",
        "bulk",
        "-k",
        "2",
        "--steps",
        "4",
        "--batch-size",
        "4",
        "--optimizer",
        optimizer,
        "--lr",
        "0.05",
    )
    log = runlog.read(out / "run.h5")["log"]
    assert list(log["step"]) == [0, 1, 2, 3]
    assert np.isfinite(log["train_loss"]).all() and np.isfinite(log["chi"]).all()
    assert summary["optimizer"] == optimizer


def test_adam_first_step_is_sign_like(tmp_path, fake_plugin):  # noqa: F811
    start = linear_checkpoint(tmp_path / "start.safetensors")
    gradient, _ = exact_problem(start)
    out, _ = train(
        tmp_path,
        "adam",
        "--mode",
        "none",
        "-k",
        "0",
        "--steps",
        "1",
        "--batch-size",
        "full",
        "--optimizer",
        "adam",
        "--lr",
        "0.01",
    )
    want = flat(start).numpy() - 0.01 * gradient / (np.abs(gradient) + 1e-8)
    np.testing.assert_allclose(final_params(out).numpy(), want, rtol=0, atol=1e-12)


def test_start_when_aligned_switches_where_ema_crosses(tmp_path, fake_plugin):  # noqa: F811
    probe, _ = train(
        tmp_path,
        "probe",
        "--mode",
        "dom",
        "-k",
        "2",
        "--steps",
        "12",
        "--batch-size",
        "4",
        "--lr",
        "0.05",
        "--start-when-aligned",
        "0.9999",
    )
    chi = runlog.read(probe / "run.h5")["log"]["chi"]
    ema = [chi[0]]
    for c in chi[1:]:
        ema.append(EMA_FACTOR * ema[-1] + (1 - EMA_FACTOR) * c)
    cross = next(t for t in range(1, len(ema)) if ema[t] > max(ema[:t]))
    threshold = (max(ema[:cross]) + ema[cross]) / 2
    out, summary = train(
        tmp_path,
        "switch",
        "--mode",
        "dom",
        "-k",
        "2",
        "--steps",
        "12",
        "--batch-size",
        "4",
        "--lr",
        "0.05",
        "--start-when-aligned",
        repr(float(threshold)),
    )
    assert summary["switch_step"] == cross
    log = runlog.read(out / "run.h5")["log"]
    assert list(log["projecting"]) == [t >= cross for t in range(12)]
    np.testing.assert_allclose(log["chi_ema"][: cross + 1], ema[: cross + 1], rtol=1e-12)


def test_non_finite_loss_stops_with_last_good_checkpoint(tmp_path, fake_plugin):  # noqa: F811
    ckpt = tmp_path / "start.safetensors"
    linear_checkpoint(ckpt)
    out = tmp_path / "diverge"
    result = run(
        "project-train",
        str(ckpt),
        "--out",
        str(out),
        "--mode",
        "none",
        "-k",
        "0",
        "--lr",
        "1000",
        "--batch-size",
        "full",
        "--steps",
        "500",
        "--save-every",
        "2",
    )
    assert result.exit_code == 1
    assert "not finite" in result.stderr or "loss is" in result.stderr
    assert "last good checkpoint" in result.stderr
    assert torch.isfinite(final_params(out)).all()


def test_existing_run_dir_is_refused(tmp_path, fake_plugin):  # noqa: F811
    train(tmp_path, "once", "--steps", "1", "-k", "0", "--batch-size", "4")
    again = run(
        "project-train", str(tmp_path / "start.safetensors"), "--out", str(tmp_path / "once")
    )
    assert again.exit_code == 2 and "not empty" in again.stderr


def _cli(args, env):
    return subprocess.Popen(
        [sys.executable, "-m", "subspace_cli", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


@pytest.mark.slow
def test_kill_and_resume_is_bit_identical(tmp_path, fake_plugin):  # noqa: F811
    ckpt = tmp_path / "start.safetensors"
    linear_checkpoint(ckpt)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(fake_plugin), os.environ.get("PYTHONPATH", "")]),
    }
    args = [
        "project-train",
        str(ckpt),
        "--mode",
        "bulk",
        "-k",
        "2",
        "--steps",
        "160",  # the tracker refreshes at steps 63 and 127, after the kill at 60
        "--batch-size",
        "4",
        "--save-every",
        "20",
        "--lr",
        "0.02",
        "--optimizer",
        "momentum",
        "--audit-every",
        "25",
    ]
    started = []
    try:
        victim = _cli([*args, "--out", str(tmp_path / "cut")], env)
        started.append(victim)
        marker = tmp_path / "cut" / "step_0000060.state.safetensors"
        deadline = time.time() + 300
        while not marker.exists() and victim.poll() is None and time.time() < deadline:
            time.sleep(0.01)
        assert victim.poll() is None, "the run finished before it could be killed"
        os.kill(victim.pid, signal.SIGKILL)
        victim.wait()
        assert not (tmp_path / "cut" / "step_0000160.safetensors").exists()

        # The uninterrupted run goes on in this process (one interpreter start fewer) while
        # the resumed one runs. It starts after the victim, so it reads the HVP method that the
        # victim raced and cached, as the resumed run does (two concurrent races could choose
        # differently).
        resumed = _cli(["project-train", "--resume", str(tmp_path / "cut")], env)
        started.append(resumed)
        whole = run(*args, "--out", str(tmp_path / "whole"))
        assert whole.exit_code == 0, whole.stderr
        assert resumed.wait(timeout=600) == 0, resumed.stderr.read().decode()
    finally:
        for process in started:
            if process.poll() is None:
                process.kill()
                process.wait()
    a = read_checkpoint(tmp_path / "whole" / "last.safetensors").tensors
    b = read_checkpoint(tmp_path / "cut" / "last.safetensors").tensors
    assert all(torch.equal(a[name], b[name]) for name in a)
    run_a = runlog.read(tmp_path / "whole" / "run.h5")
    run_b = runlog.read(tmp_path / "cut" / "run.h5")
    assert list(run_b["log"]["step"]) == list(range(160))  # no duplicated or missing rows
    assert list(run_b["audit"]["step"]) == list(range(0, 160, 25))
    assert [s for s in run_b["refresh"]["step"] if s > 60] == [63, 127]  # resumed tracker state
    for table in ("log", "refresh", "audit"):
        for name in run_a[table]:
            if name not in ("wall_time", "seconds"):
                np.testing.assert_array_equal(run_a[table][name], run_b[table][name],
                                              err_msg=f"{table}/{name}")


def test_tracker_on_a_constant_hessian_refreshes_ever_less_often(tmp_path, fake_plugin):  # noqa: F811
    # The toy loss is quadratic: the subspace never moves, so the tracker's interval doubles
    # after every refresh and every audit finds the subspace exact.
    out, summary = train(tmp_path, "track", "--mode", "dom", "-k", "2", "--steps", "16",
                         "--batch-size", "4", "--audit-every", "4")
    data = runlog.read(out / "run.h5")
    refresh, audit, log = data["refresh"], data["audit"], data["log"]
    assert list(refresh["step"]) == [0, 1, 3, 7, 15]
    assert list(refresh["reason"]) == ["start"] + ["interval"] * 4
    assert list(log["subspace_age"]) == [0, 0, 1, 0, 1, 2, 3, 0, 1, 2, 3, 4, 5, 6, 7, 0]
    assert list(log["eigenvalues_step"]) == [0, 1, 1, 3, 3, 3, 3, 7, 7, 7, 7, 7, 7, 7, 7, 15]
    assert list(log["sharpness_source"][:3]) == ["refresh", "refresh", "rayleigh"]
    assert list(audit["step"]) == [0, 4, 8, 12]
    assert (audit["overlap"] > 1 - 1e-9).all()
    np.testing.assert_array_equal(log["audit_overlap"][[0, 4, 8, 12]], audit["overlap"])
    assert np.isnan(np.delete(log["audit_overlap"], [0, 4, 8, 12])).all()
    # A drift check (3 HVPs: u₁, u_k, g₁) leaves its estimate on the row; skipped steps NaN.
    checks = int(np.isfinite(log["drift_estimate"]).sum())
    assert 0 < checks < 15 and list(log["sharpness_source"]).count("rayleigh") == checks - 4
    assert summary["hvps"] == int(refresh["hvps"].sum()) + 3 * checks
    assert summary["hvps_per_step"] == pytest.approx(summary["hvps"] / 16)
    assert summary["audit_overlap_min"] == pytest.approx(float(audit["overlap"].min()))
    assert summary["audit_hvps"] == int(audit["hvps"].sum()) and summary["audits"] == 4
    assert summary["refresh"] == "track" and summary["refreshes"] == 5


def test_fixed_schedules_and_their_usage_errors(tmp_path, fake_plugin):  # noqa: F811
    common = ["--mode", "bulk", "-k", "2", "--steps", "5", "--batch-size", "4"]
    warm, s_warm = train(tmp_path, "warm", *common, "--refresh-every", "2")
    cold, s_cold = train(tmp_path, "cold", *common, "--refresh", "cold")
    assert s_warm["refresh"] == "warm" and s_cold["refresh"] == "cold"
    assert list(runlog.read(warm / "run.h5")["refresh"]["step"]) == [0, 2, 4]
    refresh = runlog.read(cold / "run.h5")["refresh"]
    assert list(refresh["step"]) == [0, 1, 2, 3, 4]
    assert list(refresh["reason"]) == ["start"] + ["schedule"] * 4
    assert s_cold["hvps"] == int(refresh["hvps"].sum())  # no drift checks on a schedule
    bad = run("project-train", str(tmp_path / "start.safetensors"), "--out",
              str(tmp_path / "bad"), "--refresh", "track", "--refresh-every", "3")
    assert bad.exit_code == 2 and "does not combine" in bad.stderr
    assert not (tmp_path / "bad").exists()


@pytest.mark.slow
def test_tracker_keeps_a_moving_subspace_within_tolerance(tmp_path):
    # A real network (tanh MLP on 60 digits, 385 parameters) at a large step: the subspace
    # moves, every step is audited against a cold float64 solve. Never refreshing it would
    # leave it 0.2 away by the end; recomputing it every step costs 4× the tracker's HVPs.
    from test_spectrum_cli import make_checkpoint

    ckpt = tmp_path / "mlp.safetensors"
    make_checkpoint(ckpt, seed=1)
    common = ["project-train", str(ckpt), "--mode", "bulk", "-k", "3", "--steps", "30",
              "--batch-size", "full", "--lr", "0.1", "--dtype", "float64", "--audit-every", "1",
              "--json"]
    tracked = run(*common, "--out", str(tmp_path / "track"))
    warm = run(*common, "--out", str(tmp_path / "warm"), "--refresh", "warm")
    stale = run(*common, "--out", str(tmp_path / "stale"), "--refresh-every", "30")
    assert tracked.exit_code == warm.exit_code == stale.exit_code == 0, tracked.stderr
    t, w = json.loads(tracked.stdout), json.loads(warm.stdout)
    assert t["audits"] == 30 and t["audit_overlap_min"] >= 1 - 1e-3
    assert w["audit_overlap_min"] > 1 - 1e-9  # a solve at every step is exact
    assert json.loads(stale.stdout)["audit_overlap_min"] < 0.9  # the subspace really moves
    assert t["hvps_per_step"] < w["hvps_per_step"] / 3, (t["hvps_per_step"], w["hvps_per_step"])
    data = runlog.read(tmp_path / "track" / "run.h5")
    assert (data["audit"]["overlap"] >= 1 - 1e-3).all()
    assert set(data["refresh"]["reason"][1:]) <= {"interval", "drift"}


def test_a_run_from_before_the_tracker_resumes_on_its_warm_schedule(tmp_path, fake_plugin):  # noqa: F811
    import h5py

    from subspace_cli.checkpoint import write_checkpoint

    args = ["--mode", "bulk", "-k", "2", "--steps", "6", "--batch-size", "4",
            "--save-every", "3", "--refresh-every", "1", "--hvp-method", "reverse-loop"]
    whole, _ = train(tmp_path, "whole", *args)
    old, _ = train(tmp_path, "old", *args)
    # Turn `old` into a format-1.0 run directory stopped after step 3, as the tool wrote it.
    for name in ("step_0000006.safetensors", "step_0000006.state.safetensors"):
        (old / name).unlink()
    config = json.loads((old / "config.json").read_text())
    for key in ("refresh", "subspace_tol", "guard", "max_check_gap", "audit_every", "audit_tol"):
        del config["config"][key]
    (old / "config.json").write_text(json.dumps(config))
    state_file = old / "step_0000003.state.safetensors"
    state = read_checkpoint(state_file)
    new_state = json.loads(state.metadata["subspace.run_state"])
    tracker = new_state.pop("tracker")
    del new_state["audit_seconds"]
    new_state.update(basis_step=tracker["basis_step"], hvps=tracker["refresh_hvps"],
                     hvp_method=tracker["hvp_method"])
    tensors = {k: v for k, v in state.tensors.items() if not k.startswith("subspace.guard")}
    write_checkpoint(state_file, tensors, {**state.metadata,
                                           "subspace.run_state": json.dumps(new_state)},
                     overwrite=True)
    with h5py.File(old / "run.h5", "a") as f:
        f.attrs["format_version"] = "1.0"
        del f["audit"]
        for name in ("subspace_age", "drift_estimate", "audit_overlap", "eigenvalues_step",
                     "sharpness_source"):
            del f["log"][name]
        for name in ("reason", "age", "stopped_on", "subspace_error", "drift_estimate",
                     "next_interval"):
            del f["refresh"][name]
        old_config = json.loads(f.attrs["config"])
        for key in ("refresh", "subspace_tol", "guard", "max_check_gap", "audit_every",
                    "audit_tol"):
            del old_config[key]
        f.attrs["config"] = json.dumps(old_config)

    resumed = run("project-train", "--resume", str(old), "--json")
    assert resumed.exit_code == 0, resumed.stderr
    assert json.loads(resumed.stdout)["refresh"] == "warm"
    assert torch.equal(final_params(old), final_params(whole))
    data = runlog.read(old / "run.h5")
    log, refresh = data["log"], data["refresh"]
    assert list(log["step"]) == list(range(6)) and list(refresh["step"]) == list(range(6))
    assert list(log["subspace_age"]) == [-1, -1, -1, 0, 0, 0]  # old rows: filled with -1
    assert list(refresh["reason"]) == ["", "", "", "schedule", "schedule", "schedule"]
    assert np.isnan(log["drift_estimate"]).all() and len(data["audit"]["step"]) == 0
    with h5py.File(old / "run.h5", "r") as f:
        assert f.attrs["format_version"] == "1.1"
