"""`subspace align`: χ_k against exact values on a quadratic loss, and the command's contract."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from plugin_fixtures import (  # noqa: F401
    TOY_C,
    TOY_D,
    TOY_N,
    fake_plugin,
    linear_checkpoint,
    quadratic_problem,
    run_cli,
)

from subspace_cli import store
from subspace_cli.alignment import summarize
from subspace_cli.projection import alignment, norm_split

N, D, C = TOY_N, TOY_D, TOY_C
run = run_cli


def test_chi_of_eigenvector_and_orthogonal_vector():
    basis = torch.linalg.qr(torch.randn(20, 3, dtype=torch.float64))[0].T  # (3, 20) orthonormal
    assert alignment(basis, basis).tolist() == pytest.approx([1.0, 1.0, 1.0], abs=1e-12)
    orth = torch.randn(20, dtype=torch.float64)
    orth -= basis.T @ (basis @ orth)
    assert float(alignment(basis, orth[None])[0]) == pytest.approx(0.0, abs=1e-12)
    mixed = basis[0] + orth / orth.norm()
    assert float(alignment(basis, mixed[None])[0]) == pytest.approx(2**-0.5, rel=1e-12)
    dom, bulk = norm_split(basis, mixed[None])
    assert (float(dom[0]), float(bulk[0])) == pytest.approx((1.0, 1.0), rel=1e-12)
    chi = alignment(basis, torch.randn(50, 20, dtype=torch.float64))
    assert bool(((chi >= 0) & (chi <= 1)).all())


def test_summary_statistics():
    stats = summarize(torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0]))
    assert stats == pytest.approx(
        {"mean": 3.0, "std": 2.5**0.5, "q05": 1.2, "q50": 3.0, "q95": 4.8}
    )


def test_quadratic_loss_every_number_exact(tmp_path, fake_plugin):  # noqa: F811
    path = tmp_path / "lin.safetensors"
    tensors = linear_checkpoint(path)
    values, vectors, gradient = quadratic_problem(tensors)
    result = run(
        "align",
        str(path),
        "-k",
        "2",
        "--k-sweep",
        "2,4,6",
        "--per-eigenvector",
        "--dtype",
        "float64",
        "--batch-size",
        "4",
        "--batches",
        "30",
        "--json",
    )
    assert result.exit_code == 0, result.stderr
    [r] = json.loads(result.stdout)
    P2 = vectors[:2].T @ vectors[:2]
    assert r["k"] == 2 and r["hessian"] == "full training set"
    assert r["eigenvalues"][:2] == pytest.approx(values[:2], rel=1e-9)
    assert r["chi_full"] == pytest.approx(
        np.linalg.norm(P2 @ gradient) / np.linalg.norm(gradient), rel=1e-7
    )
    assert r["norms_full"]["dominant_sq"] == pytest.approx(np.sum((P2 @ gradient) ** 2), rel=1e-7)
    assert r["norms_full"]["bulk_sq"] == pytest.approx(
        np.sum((gradient - P2 @ gradient) ** 2), rel=1e-7
    )
    assert r["gradient_norm"] == pytest.approx(np.linalg.norm(gradient), rel=1e-10)
    for kk in (2, 4, 6):
        Pk = vectors[:kk].T @ vectors[:kk]
        want = np.linalg.norm(Pk @ gradient) / np.linalg.norm(gradient)
        assert r["k_sweep"][str(kk)]["chi_full"] == pytest.approx(want, rel=1e-7)
    # cos(g, u_i): eigenvectors of a repeated eigenvalue are any basis of its eigenspace, so
    # compare the sum of squares over that eigenspace
    cos = np.array(r["per_eigenvector"]["full"])
    assert np.sum(cos**2) == pytest.approx(r["chi_full"] ** 2, rel=1e-9)
    stats = r["chi_minibatch"]["4"]
    assert 0 <= stats["q05"] <= stats["q50"] <= stats["q95"] <= 1
    assert stats["std"] > 0


def test_whole_dataset_minibatch_equals_full(tmp_path, fake_plugin):  # noqa: F811
    path = tmp_path / "lin.safetensors"
    linear_checkpoint(path)
    result = run(
        "align",
        str(path),
        "-k",
        "2",
        "--dtype",
        "float64",
        "--batch-size",
        str(N),
        "--batches",
        "3",
        "--json",
    )
    assert result.exit_code == 0, result.stderr
    [r] = json.loads(result.stdout)
    stats = r["chi_minibatch"][str(N)]
    assert stats["mean"] == pytest.approx(r["chi_full"], rel=1e-10)
    assert stats["std"] == pytest.approx(0.0, abs=1e-10)


def test_eigenspace_file_hash_mismatch_is_exit_2(tmp_path, fake_plugin):  # noqa: F811
    path = tmp_path / "lin.safetensors"
    linear_checkpoint(path)
    spectra = tmp_path / "spectra.h5"
    assert run("spectrum", str(path), "-k", "2", "-o", str(spectra)).exit_code == 0
    from_file = run(
        "align", str(path), "--eigenspace", str(spectra), "-k", "2", "--batch-size", "4", "--json"
    )
    assert from_file.exit_code == 0, from_file.stderr
    assert json.loads(from_file.stdout)[0]["eigenspace"].startswith(str(spectra))

    path.unlink()
    linear_checkpoint(path, seed=1)  # same path, other weights
    stale = run("align", str(path), "--eigenspace", str(spectra), "-k", "2", "--batch-size", "4")
    assert stale.exit_code == 2
    [stored] = list(store.iter_spectra(spectra))
    assert stored.checkpoint_sha256 in stale.stderr
    assert "is not the one analysed" in stale.stderr and "Traceback" not in stale.stderr


def test_results_stored_and_trajectory_rows(tmp_path, fake_plugin):  # noqa: F811
    paths = []
    for step in range(3):
        paths.append(tmp_path / f"step_{step}.safetensors")
        linear_checkpoint(paths[-1], seed=step)
    out = tmp_path / "spectra.h5"
    result = run(
        "align", str(tmp_path), "-k", "2", "--batch-size", "4", "--batches", "5", "-o", str(out)
    )
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    rows = [line for line in lines if line.startswith(str(tmp_path))]
    assert [row.split()[1] for row in rows] == ["0", "1", "2"]  # the step column, in order
    for p in paths:
        attrs, datasets = store.read_subgroup(out, p, "alignment")
        assert attrs["k"] == 2 and 0 <= attrs["chi_full"] <= 1
        assert datasets["chi_minibatch"].shape == (1, 5)
        assert list(datasets["batch_sizes"]) == [4]
        [spectrum] = [s for s in store.iter_spectra(out) if s.checkpoint == str(p)]
        assert spectrum.k == 2  # the computed eigenspace is stored beside the alignment
    again = run("align", str(paths[0]), "-k", "2", "--batch-size", "4", "-o", str(out))
    assert again.exit_code == 2 and "pass --overwrite" in again.stderr


def test_minibatch_hessian_is_labelled(tmp_path, fake_plugin):  # noqa: F811
    path = tmp_path / "lin.safetensors"
    linear_checkpoint(path)
    result = run(
        "align",
        str(path),
        "-k",
        "2",
        "--hessian",
        "minibatch",
        "--batch-size",
        "6",
        "--batches",
        "4",
        "--json",
    )
    assert result.exit_code == 0, result.stderr
    [r] = json.loads(result.stdout)
    assert r["hessian"] == "one mini-batch of 6 samples"
    assert "mini-batch Hessian" in r["eigenspace"]


def test_batch_larger_than_dataset_is_usage_error(tmp_path, fake_plugin):  # noqa: F811
    path = tmp_path / "lin.safetensors"
    linear_checkpoint(path)
    result = run("align", str(path), "-k", "2", "--batch-size", "13")
    assert result.exit_code == 2 and "exceeds the 12 training samples" in result.stderr
