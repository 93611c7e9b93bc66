"""Issue 15: modules whose behaviour depends on the mode (BatchNorm, dropout).

Training steps run as ordinary training does (train mode; BatchNorm normalises by the batch and
moves its running statistics once per step); every measurement runs in the analysis mode and
never changes a buffer, so what is trained does not depend on what was measured."""

from __future__ import annotations

import json

import pytest
import torch
from plugin_fixtures import TOY_C, TOY_D, TOY_N, bn_checkpoint, fake_plugin, run_cli  # noqa: F401

from subspace_cli import runlog
from subspace_cli.checkpoint import read_checkpoint
from subspace_cli.experiment import load_experiment
from subspace_cli.projected import BatchSampler

TRAIN = ["--steps", "6", "--batch-size", "4", "-k", "2", "--lr", "0.05", "--dtype", "float64",
         "--hvp-method", "reverse", "--save-every", "3", "--seed", "3"]


def _train(tmp_path, name, ckpt, *args):
    out = tmp_path / name
    result = run_cli("project-train", str(ckpt), "--out", str(out), *TRAIN, *args)
    assert result.exit_code == 0, result.stderr
    return out, result


def _tensors(out):
    return read_checkpoint(out / "last.safetensors").tensors


def _assert_identical(a, b, what):
    assert a.keys() == b.keys()
    different = [name for name in a if not torch.equal(a[name], b[name])]
    assert not different, f"{what}: {different} differ"


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_what_is_trained_does_not_depend_on_what_is_measured(tmp_path, fake_plugin, dropout):  # noqa: F811
    ckpt = tmp_path / "bn.safetensors"
    start = bn_checkpoint(ckpt, dropout=dropout)
    every, stats = _train(tmp_path, "every", ckpt, "--log-every", "1", "--audit-every", "1")
    sparse, _ = _train(tmp_path, "sparse", ckpt, "--log-every", "5")
    warm, _ = _train(tmp_path, "warm", ckpt, "--log-every", "2", "--refresh", "warm",
                     "--refresh-every", "2")
    a = _tensors(every)
    _assert_identical(a, _tensors(sparse), "--log-every 1 --audit-every 1 vs --log-every 5")
    _assert_identical(a, _tensors(warm), "the tracker vs warm refreshes every 2 steps")
    assert int(a["1.num_batches_tracked"]) == 7 + 6  # the running statistics moved once a step
    assert not torch.equal(a["1.running_mean"], start["1.running_mean"].double())
    assert "training steps in train mode (BatchNorm normalises each step's batch" in stats.stderr
    modes = runlog.read(every / "run.h5")["modes"]
    assert modes["measurements"] == "eval" and modes["training_step"] == "train"
    assert modes["batch_statistics"] == ["1"]
    assert modes["dropout"] == (["3"] if dropout else [])
    assert "train_loss" in modes["measured"] and "minibatch_loss" in modes["stepped"]


def test_projected_training_does_not_depend_on_logging_or_audits(tmp_path, fake_plugin):  # noqa: F811
    ckpt = tmp_path / "bn.safetensors"
    bn_checkpoint(ckpt)
    logged, _ = _train(tmp_path, "logged", ckpt, "--mode", "bulk", "--audit-every", "2")
    quiet, _ = _train(tmp_path, "quiet", ckpt, "--mode", "bulk", "--log-every", "4")
    _assert_identical(_tensors(logged), _tensors(quiet), "bulk with and without audits")


def test_a_training_step_is_the_ordinary_train_mode_step(tmp_path, fake_plugin):  # noqa: F811
    """Batches of 8 with --chunk-size 3: one forward pass per step over the whole batch, as
    torch training does, checked against a plain torch loop over the same batches."""
    ckpt = tmp_path / "bn.safetensors"
    tensors = bn_checkpoint(ckpt)
    out = tmp_path / "run"
    result = run_cli("project-train", str(ckpt), "--out", str(out), "--steps", "5",
                     "--batch-size", "8", "--chunk-size", "3", "-k", "0", "--lr", "0.1",
                     "--dtype", "float64", "--seed", "5")
    assert result.exit_code == 0, result.stderr
    got = _tensors(out)

    import fakeplug_mod

    model = fakeplug_mod.bn(input_dim=TOY_D, num_classes=TOY_C, width=4).double()
    model.load_state_dict(tensors)
    model.train()
    data = fakeplug_mod.toy(n=TOY_N, input_dim=TOY_D, num_classes=TOY_C)
    sampler = BatchSampler(TOY_N, 8, 5)
    for _ in range(5):
        index = sampler.next()
        loss = torch.nn.functional.cross_entropy(model(data.x[index].double()), data.y[index])
        grads = torch.autograd.grad(loss, list(model.parameters()))
        with torch.no_grad():
            for p, g in zip(model.parameters(), grads, strict=True):
                p -= 0.1 * g
    want = model.state_dict()
    assert int(got["1.num_batches_tracked"]) == 7 + 5
    for name, value in want.items():
        torch.testing.assert_close(got[name], value, rtol=1e-12, atol=1e-14, msg=name)


def _dense_hessian(model, data, train: bool, chunk: int):
    """The float64 Hessian of (1/N) Σ over chunks of the summed cross-entropy, the model in
    train or eval mode on a private copy of its buffers, by torch.autograd.functional."""
    import copy

    names = [name for name, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    theta = torch.cat([p.detach().double().reshape(-1) for p in model.parameters()])
    model = copy.deepcopy(model).double().train(train)

    def loss(flat):
        params, offset = {}, 0
        for name, shape in zip(names, shapes, strict=True):
            size = int(torch.tensor(shape).prod()) if len(shape) else 1
            params[name] = flat[offset:offset + size].view(shape)
            offset += size
        total = 0.0
        for start in range(0, len(data), chunk):
            buffers = {n: b.clone() for n, b in model.named_buffers()}
            x = data.x[start:start + chunk].double()
            out = torch.func.functional_call(model, {**params, **buffers}, (x,))
            total = total + torch.nn.functional.cross_entropy(
                out, data.y[start:start + chunk], reduction="sum")
        return total / len(data)

    return torch.autograd.functional.hessian(loss, theta)


@pytest.mark.parametrize(("train", "chunk"), [(False, 5), (True, 12), (True, 4)])
def test_batchnorm_hessian_matches_dense_float64_in_both_modes(tmp_path, fake_plugin,  # noqa: F811
                                                               train, chunk):
    from subspace_cli.checkpoint import SpecOverrides
    from subspace_cli.settings import SpectrumSettings
    from subspace_cli.spectrum import curvature_operator

    ckpt = tmp_path / "bn.safetensors"
    bn_checkpoint(ckpt)
    experiment = load_experiment(ckpt, SpecOverrides())
    before = {k: v.clone() for k, v in experiment.model.state_dict().items()}
    op = curvature_operator(experiment, SpectrumSettings(
        dtype="float64", device="cpu", chunk_size=chunk, train_mode=train, hvp_method="reverse"))
    got = op.matmat(torch.eye(op.n_params, dtype=torch.float64))
    want = _dense_hessian(experiment.model, experiment.data, train, chunk)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11)
    op.loss_and_gradient()
    _assert_identical(before, experiment.model.state_dict(), "buffers after the Hessian")
    if train:  # the chunk size changes a train-mode BatchNorm Hessian: it is said
        other = _dense_hessian(experiment.model, experiment.data, train, 12 if chunk != 12 else 4)
        assert not torch.allclose(want, other, atol=1e-6)


@pytest.mark.parametrize("train_mode", [False, True])
def test_spectrum_and_align_leave_every_buffer_as_it_was(tmp_path, fake_plugin, train_mode):  # noqa: F811
    from subspace_cli import alignment
    from subspace_cli.checkpoint import SpecOverrides
    from subspace_cli.settings import SpectrumSettings
    from subspace_cli.spectrum import compute_spectrum, curvature_operator

    ckpt = tmp_path / "bn.safetensors"
    bn_checkpoint(ckpt)
    experiment = load_experiment(ckpt, SpecOverrides())
    model = experiment.model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [m.training for m in model.modules()]
    settings = SpectrumSettings(k=2, dtype="float64", device="cpu", chunk_size=5,
                                train_mode=train_mode, hvp_method="reverse")
    run = compute_spectrum(experiment, settings)
    alignment.measure(curvature_operator(experiment, settings), run.result.eigenvectors, 2,
                      batch_sizes=[4], batches=3, seed=0)
    _assert_identical(before, model.state_dict(), "buffers after spectrum and align")
    assert [m.training for m in model.modules()] == flags


def test_train_mode_chunk_dependence_is_said(tmp_path, fake_plugin):  # noqa: F811
    ckpt = tmp_path / "bn.safetensors"
    bn_checkpoint(ckpt)
    result = run_cli("spectrum", str(ckpt), "-k", "2", "--train-mode", "--chunk-size", "5",
                     "--dtype", "float64", "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)[0]["chunk_dependent"] is True
    assert "BatchNorm normalises each chunk of 5 samples" in result.stderr
    result = run_cli("spectrum", str(ckpt), "-k", "2", "--dtype", "float64", "--json")
    assert json.loads(result.stdout)[0]["chunk_dependent"] is False


def test_dropout_in_a_train_mode_measurement_is_refused_unless_asked_for(
        tmp_path, fake_plugin):  # noqa: F811
    ckpt = tmp_path / "drop.safetensors"
    bn_checkpoint(ckpt, dropout=0.5)
    refused = run_cli("spectrum", str(ckpt), "-k", "2", "--train-mode")
    assert refused.exit_code == 2
    assert refused.stderr.startswith(f"error: {ckpt}: the model has dropout (3): measured in "
                                     "train mode")
    assert "pass --allow-dropout" in refused.stderr
    assert run_cli("spectrum", str(ckpt), "-k", "2", "--train-mode",
                   "--allow-dropout").exit_code == 0
    assert run_cli("spectrum", str(ckpt), "-k", "2").exit_code == 0  # eval: dropout is off
    out = tmp_path / "run"
    train = run_cli("project-train", str(ckpt), "--out", str(out), *TRAIN, "--train-mode")
    assert train.exit_code == 2 and "pass --allow-dropout" in train.stderr
    assert not out.exists()
