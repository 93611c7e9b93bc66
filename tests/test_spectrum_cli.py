"""`subspace spectrum` end to end: numbers against a dense float64 Hessian, JSON, HDF5, failures."""

from __future__ import annotations

import json
import os

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from subspace_cli import store
from subspace_cli.checkpoint import ExperimentSpec, write_checkpoint
from subspace_cli.cli import main
from subspace_cli.experiment import build_data, build_model

MODEL_CONFIG = {"input_dim": 64, "widths": [5], "num_classes": 10, "activation": "tanh"}
DATA_CONFIG = {"n_train": 60, "shape": "flat"}


def make_checkpoint(path, seed=0, loss="mse", step=0):
    torch.manual_seed(seed)
    model = build_model("mlp", MODEL_CONFIG, from_user=True)
    spec = ExperimentSpec("mlp", MODEL_CONFIG, "digits", DATA_CONFIG, loss)
    write_checkpoint(path, model.state_dict(), spec.to_metadata(step=step))
    return model


def dense_spectrum(model, loss):
    """Eigen-decomposition of the dense float64 Hessian of the full training loss."""
    from torch.func import functional_call, hessian

    from subspace_cli.losses import loss_sum

    data = build_data("digits", DATA_CONFIG, from_user=True)
    model = model.double().eval()
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    sizes = [p.numel() for _, p in model.named_parameters()]
    theta = torch.cat([p.detach().reshape(-1) for _, p in model.named_parameters()])
    x, y = data.x.double(), data.y

    def f(flat):
        params = {n: t.view(s) for n, t, s in zip(names, flat.split(sizes), shapes, strict=True)}
        return loss_sum(loss, functional_call(model, params, (x,)), y) / len(y)

    values, vectors = torch.linalg.eigh(hessian(f)(theta))
    return values.flip(0), vectors.flip(1).T


def run(*args):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


@pytest.mark.parametrize("loss", ["mse", "ce"])
def test_cli_matches_dense_float64_hessian(tmp_path, loss):
    path = tmp_path / "c.safetensors"
    model = make_checkpoint(path, loss=loss)
    result = run("spectrum", str(path), "-k", "6", "--dtype", "float64", "--json")
    assert result.exit_code == 0, result.stderr
    [record] = json.loads(result.stdout)
    values, vectors = dense_spectrum(model, loss)
    got = np.array(record["eigenvalues"])
    assert record["k"] == 6 and len(got) == 6
    np.testing.assert_allclose(got, values[:6].numpy(), rtol=1e-6)
    assert all(record["converged"]) and max(record["residuals"]) <= record["tol"] == 1e-8
    assert record["mode"] == "eval" and record["n_params"] == 64 * 5 + 5 + 5 * 10 + 10
    assert record["n_samples"] == 60 and record["hvp_count"] > 0


def test_default_k_is_number_of_classes_and_table(tmp_path):
    path = tmp_path / "c.safetensors"
    make_checkpoint(path)
    result = run("spectrum", str(path), "--extra", "2")
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "top 10 of the mse Hessian" in lines[0] and "eval mode" in lines[0]
    assert lines[1].split() == ["i", "λ_i", "residual", "converged"]
    assert [line.split()[0] for line in lines[3:15]] == [*map(str, range(1, 11)), "11*", "12*"]


def test_hdf5_output_round_trip_and_no_silent_overwrite(tmp_path):
    path = tmp_path / "c.safetensors"
    make_checkpoint(path, step=7)
    out = tmp_path / "spectra.h5"
    result = run("spectrum", str(path), "-k", "3", "-o", str(out), "--json")
    assert result.exit_code == 0, result.stderr
    [record] = json.loads(result.stdout)
    [stored] = list(store.iter_spectra(out))
    np.testing.assert_array_equal(stored.eigenvalues, record["eigenvalues"])
    np.testing.assert_array_equal(stored.residuals, record["residuals"])
    assert stored.eigenvectors.shape == (3, record["n_params"])
    assert np.allclose(stored.eigenvectors @ stored.eigenvectors.T, np.eye(3), atol=1e-5)
    assert stored.checkpoint_sha256 == record["checkpoint_sha256"]
    assert stored.param_names == [
        "layers.0.weight",
        "layers.0.bias",
        "layers.1.weight",
        "layers.1.bias",
    ]
    assert stored.param_offsets == [0, 320, 325, 375]
    assert stored.attrs["model"] == "mlp" and stored.attrs["loss"] == "mse"
    assert stored.attrs["step"] == 7 and stored.attrs["dtype"] == "float32"
    assert json.loads(stored.attrs["model_config"]) == MODEL_CONFIG
    assert stored.attrs["hvp_count"] == record["hvp_count"]
    assert stored.attrs["torch_version"] == torch.__version__
    with h5py.File(out) as f:
        assert f.attrs["format"] == "subspace-spectra"
        assert f[stored.group]["eigenvectors"].compression == "gzip"

    before = out.read_bytes()
    again = run("spectrum", str(path), "-k", "3", "-o", str(out))
    assert again.exit_code == 2 and "pass --overwrite" in again.stderr
    assert out.read_bytes() == before
    replaced = run("spectrum", str(path), "-k", "4", "-o", str(out), "--overwrite")
    assert replaced.exit_code == 0
    [stored] = list(store.iter_spectra(out))
    assert stored.k == 4


def test_interrupted_write_leaves_file_intact(tmp_path, monkeypatch):
    path = tmp_path / "c.safetensors"
    make_checkpoint(path)
    other = tmp_path / "d.safetensors"
    make_checkpoint(other, seed=1)
    out = tmp_path / "spectra.h5"
    assert run("spectrum", str(path), "-k", "2", "-o", str(out)).exit_code == 0
    before = out.read_bytes()

    def crash(group, spectrum):
        group.create_dataset("eigenvalues", data=np.zeros(2))
        raise KeyboardInterrupt

    monkeypatch.setattr(store, "_write_group", crash)
    result = run("spectrum", str(other), "-k", "2", "-o", str(out))
    assert result.exit_code == 130
    assert out.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["c.safetensors", "d.safetensors", "spectra.h5",
                                            "spectra.h5.d"]
    # the index's one group file and the writer lock; the interrupted group's temporary is gone
    [group_file] = [n for n in os.listdir(tmp_path / "spectra.h5.d") if n != ".lock"]
    assert group_file.endswith(".h5") and not group_file.startswith(".")
    assert [s.checkpoint for s in store.iter_spectra(out)] == [str(path)]


def test_several_checkpoints_warm_start_and_overlap(tmp_path):
    for i in range(3):
        make_checkpoint(tmp_path / f"step_{i}.safetensors", seed=0 if i < 2 else 5, step=i)
    (tmp_path / "broken.safetensors").write_bytes(b"garbage")
    # blocks of 2 (single vectors on a CPU take reverse-loop without timing)
    result = run("spectrum", str(tmp_path), "-k", "3", "--jsonl", "--block-size", "2")
    assert result.exit_code == 1
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [os.path.basename(r["checkpoint"]) for r in records] == [
        "step_0.safetensors",
        "step_1.safetensors",
        "step_2.safetensors",
    ]
    assert "broken.safetensors: not a readable safetensors file" in result.stderr
    assert "1 of 4 checkpoints failed" in result.stderr
    first, same, different = records
    assert first["warm_start"] is None and first["overlap_with_previous"] is None
    # identical weights: warm start from the exact answer converges in about one block
    assert same["warm_start"].endswith("step_0.safetensors")
    assert same["overlap_with_previous"] == pytest.approx(1.0, abs=1e-6)
    assert same["hvp_count"] <= 4 < first["hvp_count"]
    assert different["overlap_with_previous"] < 0.99
    # --hvp-method auto times the methods on the first checkpoint only: same model and data
    assert first["hvp_probe_extra"] > 0
    assert same["hvp_probe_extra"] == different["hvp_probe_extra"] == 0
    assert same["hvp_method"] == different["hvp_method"] == first["hvp_method"]


def test_budget_below_convergence_is_reported_not_converged(tmp_path):
    path = tmp_path / "c.safetensors"
    make_checkpoint(path)
    result = run("spectrum", str(path), "-k", "8", "--max-hvps", "8", "--json")
    assert result.exit_code == 0
    [record] = json.loads(result.stdout)
    assert record["hvp_count"] <= 8
    assert not all(record["converged"])
    assert all(
        ok == (r <= record["tol"])
        for ok, r in zip(record["converged"], record["residuals"], strict=True)
    )
    assert "did not reach tol" in result.stderr


def test_arpack_reference_agrees(tmp_path):
    path = tmp_path / "c.safetensors"
    make_checkpoint(path)
    ours = json.loads(run("spectrum", str(path), "-k", "4", "--dtype", "float64", "--json").stdout)[
        0
    ]
    ref = json.loads(
        run(
            "spectrum", str(path), "-k", "4", "--dtype", "float64", "--solver", "arpack", "--json"
        ).stdout
    )[0]
    assert ref["solver"] == "arpack"
    np.testing.assert_allclose(ours["eigenvalues"], ref["eigenvalues"], rtol=1e-8)


def test_parameter_selection_and_bad_options(tmp_path):
    path = tmp_path / "c.safetensors"
    make_checkpoint(path)
    result = run("spectrum", str(path), "-k", "2", "--params", "layers.1.*", "--json")
    assert result.exit_code == 0
    assert json.loads(result.stdout)[0]["n_params"] == 5 * 10 + 10
    none = run("spectrum", str(path), "--params", "nothing*")
    assert none.exit_code == 2 and "no parameters selected" in none.stderr
    gpu = run("spectrum", str(path), "--device", "cuda:7")
    assert gpu.exit_code == 2 and "cuda" in gpu.stderr.lower()
    both = run("spectrum", str(path), "--json", "--jsonl")
    assert both.exit_code == 2 and "pick one" in both.stderr


def test_memory_options_and_what_the_json_says_about_memory(tmp_path):
    path = tmp_path / "c.safetensors"
    make_checkpoint(path)
    n = 64 * 5 + 5 + 5 * 10 + 10
    base = ["spectrum", str(path), "-k", "3", "--dtype", "float64", "--json"]
    [record] = json.loads(run(*base).stdout)
    assert record["solver"] == "lanczos" and record["hvp_method"] == "reverse-loop"
    assert record["hvp_method_choice"] == "one vector on a CPU" and record["hvp_probe_extra"] == 0
    assert record["basis_bytes"] == (20 + 1) * n * 8  # ARPACK's ncv = 20 rows and q
    assert record["graphs_kept"] == record["chunks"] == 1 and record["graph_bytes"] > 0
    # A basis of 6 rows (plus q) and no kept graphs: the same eigenvalues.
    [small] = json.loads(run(*base, "--basis-memory", str(7 * n * 8), "--graph-memory", "0").stdout)
    assert small["basis_bytes"] == 7 * n * 8 and small["graphs_kept"] == 0
    assert small["graph_bytes"] == 0 and all(small["converged"])
    np.testing.assert_allclose(small["eigenvalues"], record["eigenvalues"], rtol=1e-10)
    too_small = run(*base, "--basis-memory", "1K")
    assert too_small.exit_code == 2 and "--basis-memory allows" in too_small.stderr
    bad = run(*base, "--graph-memory", "lots")
    assert bad.exit_code == 2 and "is not a size" in bad.stderr
    # Blocks: the block solver, its basis and images.
    [block] = json.loads(run(*base, "--block-size", "2").stdout)
    assert block["solver"] == "block-lanczos" and block["hvp_method_choice"] == "timed"
    np.testing.assert_allclose(block["eigenvalues"], record["eigenvalues"], rtol=1e-10)


@pytest.mark.parametrize("text, size", [("0", 0), ("4096", 4096), ("512M", 512 << 20),
                                        ("2G", 2 << 30), ("1.5KiB", 1536), ("auto", None)])
def test_byte_sizes(text, size):
    from subspace_cli.commands.common import ByteSize

    assert ByteSize().convert(text, None, None) == size


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu(tmp_path):
    path = tmp_path / "c.safetensors"
    make_checkpoint(path)
    cpu = json.loads(
        run(
            "spectrum", str(path), "-k", "4", "--dtype", "float64", "--device", "cpu", "--json"
        ).stdout
    )[0]
    gpu = json.loads(
        run(
            "spectrum", str(path), "-k", "4", "--dtype", "float64", "--device", "cuda", "--json"
        ).stdout
    )[0]
    assert gpu["device"].startswith("cuda")
    np.testing.assert_allclose(gpu["eigenvalues"], cpu["eigenvalues"], rtol=1e-8)
