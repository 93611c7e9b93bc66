"""Issue 17: the Gauss–Newton matrix, the empirical Fisher and the gradient covariance, each
against a dense float64 reference formed from its definition, and --curvature in the CLI."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
import torch
from plugin_fixtures import fake_plugin, linear_checkpoint, run_cli  # noqa: F401
from tiny_models import TINY_MODELS, dense_hessian

from subspace_cli import curvature
from subspace_cli.data import TrainingData

CPU = torch.device("cpu")


def _model_and_data(name, n=10):
    model_factory, data_factory = TINY_MODELS[name]
    data = data_factory()
    data = TrainingData(num_classes=data.num_classes, x=data.x[:n], y=data.y[:n])
    return model_factory().double(), data


def _flat(model):
    names = [name for name, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    theta = torch.cat([p.detach().reshape(-1) for _, p in model.named_parameters()])

    def call(flat, x):
        params = dict(zip(names, (piece.view(shape) for piece, shape in zip(
            flat.split([math.prod(s) for s in shapes]), shapes, strict=True)), strict=True))
        return torch.func.functional_call(model, params, (x,))

    return theta, call


def _inputs(data):
    return data.x.double() if data.x.is_floating_point() else data.x


def dense_ggn(model, data, loss):
    """(1/N) Σ Jₙᵀ Hₙ Jₙ from the dense output Jacobian and the loss's Hessian in the output,
    both from autograd (not the operator's formulas)."""
    theta, call = _flat(model.eval())
    x = _inputs(data)
    jac = torch.autograd.functional.jacobian(lambda t: call(t, x), theta)  # (N, C, n)
    out = call(theta, x).detach()
    total = torch.zeros(len(theta), len(theta), dtype=torch.float64)
    for n in range(len(data)):
        def sample_loss(f, n=n):
            if loss == "mse":
                return 0.5 * ((f - torch.nn.functional.one_hot(data.y[n], f.shape[0])) ** 2).sum()
            return torch.nn.functional.cross_entropy(f[None], data.y[n][None])

        h = torch.autograd.functional.hessian(sample_loss, out[n])
        total += jac[n].T @ h @ jac[n]
    return total / len(data)


def per_sample_gradients(model, data, loss):
    """Rows gₙ = ∇ℓₙ, one backward pass per sample."""
    theta, call = _flat(model.eval())
    x = _inputs(data)
    rows = []
    for n in range(len(data)):
        t = theta.clone().requires_grad_(True)
        f = call(t, x[n:n + 1])
        if loss == "mse":
            value = 0.5 * ((f - torch.nn.functional.one_hot(data.y[n:n + 1], f.shape[1])) ** 2).sum()
        else:
            value = torch.nn.functional.cross_entropy(f, data.y[n:n + 1], reduction="sum")
        rows.append(torch.autograd.grad(value, t)[0])
    return torch.stack(rows)


def _operator(cls, model, data, loss, **kw):
    return cls(model, data, loss, chunk_size=3, device=CPU, dtype=torch.float64, **kw)


def _matrix(op):
    return op.matmat(torch.eye(op.n_params, dtype=torch.float64))


@pytest.mark.parametrize("loss", ["mse", "ce"])
@pytest.mark.parametrize("name", ["mlp-tanh", "cnn-1d"])
def test_ggn_matches_dense_jacobian_products(name, loss):
    model, data = _model_and_data(name)
    got = _matrix(_operator(curvature.GGNOperator, model, data, loss))
    torch.testing.assert_close(got, dense_ggn(model, data, loss), rtol=1e-9, atol=1e-12)
    if name == "mlp-tanh" and loss == "mse":  # not the Hessian away from a minimum
        assert not torch.allclose(got, dense_hessian(model, data, loss), atol=1e-6)


@pytest.mark.parametrize("loss", ["mse", "ce"])
def test_fisher_matches_the_stacked_per_sample_gradients(loss):
    model, data = _model_and_data("mlp-relu")
    g = per_sample_gradients(model, data, loss)
    got = _matrix(_operator(curvature.FisherOperator, model, data, loss))
    torch.testing.assert_close(got, g.T @ g / len(data), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("loss", ["mse", "ce"])
def test_gradient_covariance_is_the_covariance_over_every_mini_batch(loss):
    """N = 6, B = 2: the covariance of the mean gradient over all 15 batches drawn without
    replacement, enumerated, against the operator's closed form."""
    model, data = _model_and_data("mlp-tanh", n=6)
    g = per_sample_gradients(model, data, loss)
    means = torch.stack([g[list(batch)].mean(0) for batch in itertools.combinations(range(6), 2)])
    centred = means - means.mean(0)
    want = centred.T @ centred / len(means)
    got = _matrix(_operator(curvature.GradientCovarianceOperator, model, data, loss,
                            batch_size=2))
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    full = _operator(curvature.GradientCovarianceOperator, model, data, loss, batch_size=6)
    assert float(_matrix(full).abs().max()) == 0.0  # the full batch does not vary


def test_ggn_of_token_labels_with_padding_is_the_unpadded_one(fake_plugin):  # noqa: F811
    from test_dict_inputs import _data, _model

    model = _model(True)
    short, long = _data(True), _data(True, pad_to=9)
    v = torch.randn(2, sum(p.numel() for p in model.parameters()), dtype=torch.float64,
                    generator=torch.Generator().manual_seed(0))
    a = _operator(curvature.GGNOperator, model, short, "ce").matmat(v)
    b = _operator(curvature.GGNOperator, model, long, "ce").matmat(v)
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    with pytest.raises(Exception, match="needs one label per sample"):
        _operator(curvature.FisherOperator, model, short, "ce")


def _spectrum(path, *args):
    result = run_cli("spectrum", str(path), "-k", "3", "--dtype", "float64", "--json", *args)
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)[0]


def test_spectrum_curvature_option_matches_dense_and_is_recorded(tmp_path, fake_plugin):  # noqa: F811
    """The fake plugin's linear model under mse: the GGN is the Hessian exactly (the model is
    linear), the Fisher and the gradient covariance are their dense definitions."""
    from subspace_cli import store
    from subspace_cli.checkpoint import SpecOverrides
    from subspace_cli.experiment import load_experiment

    ckpt = tmp_path / "lin.safetensors"
    linear_checkpoint(ckpt)
    experiment = load_experiment(ckpt, SpecOverrides())
    model, data = experiment.model.double(), experiment.data
    hessian = _spectrum(ckpt)
    ggn = _spectrum(ckpt, "--curvature", "ggn", "-o", str(tmp_path / "s.h5"))
    np.testing.assert_allclose(ggn["eigenvalues"], hessian["eigenvalues"], rtol=1e-9)
    assert ggn["curvature"] == "ggn" and hessian["curvature"] == "hessian"
    [stored] = store.iter_spectra(tmp_path / "s.h5")
    assert stored.attrs["curvature"] == "ggn"
    g = per_sample_gradients(model, data, "mse")
    fisher = _spectrum(ckpt, "--curvature", "fisher")
    want = torch.linalg.eigvalsh(g.T @ g / len(data)).flip(0)[:3]
    np.testing.assert_allclose(fisher["eigenvalues"], want.numpy(), rtol=1e-8)
    cov = _spectrum(ckpt, "--curvature", "gradient-covariance", "--batch-size", "4")
    n, b = len(data), 4
    centred = g - g.mean(0)
    want = torch.linalg.eigvalsh((n - b) / (b * (n - 1)) * centred.T @ centred / n).flip(0)[:3]
    np.testing.assert_allclose(cov["eigenvalues"], want.numpy(), rtol=1e-7)
    assert cov["curvature_batch_size"] == 4
    table = run_cli("spectrum", str(ckpt), "-k", "2", "--curvature", "gradient-covariance",
                    "--batch-size", "4")
    assert "top 2 of the mse gradient covariance (batch 4)" in table.stdout
    refused = run_cli("spectrum", str(ckpt), "--curvature", "gradient-covariance")
    assert refused.exit_code == 2 and "needs --batch-size" in refused.stderr
    refused = run_cli("spectrum", str(ckpt), "--batch-size", "4")
    assert refused.exit_code == 2 and "the other curvatures take none" in refused.stderr


def test_align_and_project_train_take_the_curvature(tmp_path, fake_plugin):  # noqa: F811
    ckpt = tmp_path / "lin.safetensors"
    linear_checkpoint(ckpt)
    _spectrum(ckpt, "--curvature", "fisher", "-o", str(tmp_path / "s.h5"))
    mismatch = run_cli("align", str(ckpt), "-k", "2", "--eigenspace", str(tmp_path / "s.h5"))
    assert mismatch.exit_code == 2 and "is of the fisher, not the hessian" in mismatch.stderr
    align = run_cli("align", str(ckpt), "-k", "2", "--eigenspace", str(tmp_path / "s.h5"),
                    "--curvature", "fisher", "--batch-size", "4", "--json")
    assert align.exit_code == 0, align.stderr
    assert json.loads(align.stdout)[0]["curvature"] == "fisher"
    from subspace_cli import runlog

    out = tmp_path / "run"
    result = run_cli("project-train", str(ckpt), "--out", str(out), "--curvature",
                     "gradient-covariance", "--mode", "bulk", "-k", "2", "--steps", "3",
                     "--batch-size", "4", "--dtype", "float64", "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["curvature"] == "gradient-covariance"
    assert runlog.read(out / "run.h5")["config"]["curvature"] == "gradient-covariance"


def test_per_module_spectra_are_the_dense_hessians_diagonal_blocks(tmp_path, fake_plugin):  # noqa: F811
    """The fake plugin's BatchNorm MLP (modules 0: Linear, 1: BatchNorm, 3: Linear), eval mode:
    each block's eigenvalues are those of the dense Hessian's diagonal block, each block is its
    own group, and --group collects parameters by glob."""
    from plugin_fixtures import bn_checkpoint

    from subspace_cli import store
    from subspace_cli.checkpoint import SpecOverrides
    from subspace_cli.experiment import load_experiment

    ckpt = tmp_path / "bn.safetensors"
    bn_checkpoint(ckpt)
    out = str(tmp_path / "s.h5")
    result = run_cli("spectrum", str(ckpt), "--per-module", "-k", "2", "--dtype", "float64",
                     "--json", "-o", out)
    assert result.exit_code == 0, result.stderr
    [record] = json.loads(result.stdout)
    assert [b["block"] for b in record["blocks"]] == ["0", "1", "3"]
    experiment = load_experiment(ckpt, SpecOverrides())
    model = experiment.model.double()
    h = dense_hessian(model, experiment.data, "ce")
    sizes = [p.numel() for p in model.parameters()]
    offsets = np.cumsum([0, *sizes])
    names = [n for n, _ in model.named_parameters()]
    for block in record["blocks"]:
        index = [names.index(n) for n in block["block_parameters"]]
        rows = np.concatenate([np.arange(offsets[i], offsets[i + 1]) for i in index])
        want = torch.linalg.eigvalsh(h[rows][:, rows]).flip(0)[:2]
        np.testing.assert_allclose(block["eigenvalues"], want.numpy(), rtol=1e-7, atol=1e-10)
    groups = list(store.iter_spectra(out))
    assert sorted(g.attrs["block"] for g in groups) == ["0", "1", "3"]
    assert store.read_spectrum(out, ckpt) is None  # blocks are not the whole spectrum
    grouped = run_cli("spectrum", str(ckpt), "--group", "weights=*.weight", "--group",
                      "first=0.*", "--group", "first=1.*", "-k", "2", "--dtype", "float64",
                      "--json")
    assert grouped.exit_code == 0, grouped.stderr
    [record] = json.loads(grouped.stdout)
    assert record["blocks"][1]["block_parameters"] == ["0.weight", "0.bias", "1.weight",
                                                       "1.bias"]
    table = run_cli("spectrum", str(ckpt), "--per-module", "-k", "2")
    assert "top 2 of each diagonal block of the ce Hessian, 3 blocks" in table.stdout
    refused = run_cli("spectrum", str(ckpt), "--per-module", "--params", "0.*")
    assert refused.exit_code == 2 and "drop --params" in refused.stderr
