"""Issue 15: named (dict) inputs passed as keyword arguments, token labels weighted by tokens,
padding left out, tied weights, and the ``tokens`` data plugin; no transformers needed."""

from __future__ import annotations

import importlib
import json
import sys

import numpy as np
import pytest
import torch
from plugin_fixtures import fake_plugin, run_cli  # noqa: F401
from safetensors.torch import save_file
from tiny_models import _seeded, dense_hessian

from subspace_cli.data import IGNORE_INDEX, TrainingData
from subspace_cli.hessian import HessianOperator

datasets = pytest.importorskip("subspace_plugins.datasets")

VOCAB, T, N = 12, 6, 14


def _sequences(n=N, t=T, seed=0, pad_to=None):
    """Right-padded token sequences of random lengths 2..t, padded to ``pad_to`` columns."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, t + 1, (n,), generator=g)
    ids = torch.randint(1, VOCAB, (n, t), generator=g)
    width = pad_to or t
    mask = (torch.arange(width)[None] < lengths[:, None]).long()
    ids = torch.cat([ids, torch.zeros(n, width - t, dtype=torch.long)], 1) * mask
    return ids, mask


def _data(token_level, pad_to=None, seed=0):
    ids, mask = _sequences(seed=seed, pad_to=pad_to)
    if token_level:
        y = ids.masked_fill(mask == 0, IGNORE_INDEX)
        classes = VOCAB
    else:
        y = ids[:, 0] % 3
        classes = 3
    return TrainingData(num_classes=classes, x={"input_ids": ids, "attention_mask": mask}, y=y)


def _model(token_level, tied=False, seed=1):
    masked = importlib.import_module("fakeplug_mod").masked
    classes = VOCAB if token_level else 3
    return _seeded(lambda: masked(vocab=VOCAB, num_classes=classes, width=4,
                                  token_level=token_level, tied=tied), seed).double()


def _operator(model, data, loss, chunk_size):
    return HessianOperator(model, data, loss, chunk_size=chunk_size, device=torch.device("cpu"),
                           dtype=torch.float64, method="reverse")


@pytest.mark.parametrize(("token_level", "loss"), [(False, "ce"), (True, "ce"), (True, "mse")])
def test_named_inputs_hessian_matches_the_dense_float64_one(fake_plugin, token_level, loss):  # noqa: F811
    """Chunks of 5 sequences hold different numbers of labelled tokens: the mean is over all
    tokens of the training set, not a mean of chunk means."""
    model, data = _model(token_level), _data(token_level)
    op = _operator(model, data, loss, chunk_size=5)
    got = op.matmat(torch.eye(op.n_params, dtype=torch.float64))
    want = dense_hessian(model, data, loss)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11)
    loss_value, gradient, _ = op.loss_and_gradient()
    whole = _operator(model, data, loss, chunk_size=N)
    assert loss_value == pytest.approx(whole.loss_and_gradient()[0], rel=1e-12)
    torch.testing.assert_close(gradient, whole.loss_and_gradient()[1], rtol=1e-10, atol=1e-13)
    assert op.n_units == (int((data.y != IGNORE_INDEX).sum()) if token_level else N)


def test_padding_and_ignored_labels_change_nothing(fake_plugin):  # noqa: F811
    """Three more padded columns (mask 0, label -100) leave the loss, gradient and Hessian as
    they were: padding takes no part in the loss or the count."""
    model = _model(True)
    short, long = _data(True), _data(True, pad_to=T + 3)
    assert long.x["input_ids"].shape == (N, T + 3)
    a, b = _operator(model, short, "ce", 4), _operator(model, long, "ce", 4)
    la, ga, acc_a = a.loss_and_gradient()
    lb, gb, acc_b = b.loss_and_gradient()
    assert la == pytest.approx(lb, rel=1e-12) and acc_a == acc_b
    torch.testing.assert_close(ga, gb, rtol=1e-10, atol=1e-13)
    v = torch.randn(2, a.n_params, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(a.matmat(v), b.matmat(v), rtol=1e-10, atol=1e-12)


def test_tied_weights_are_one_parameter_and_one_tensor_in_the_checkpoint(fake_plugin, tmp_path):  # noqa: F811
    """A head tied to the embedding: one block of θ, one tensor in the file (as
    save_pretrained writes it), and a file holding the other name loads the same."""
    from subspace_cli.checkpoint import Checkpoint, load_state_strict, model_state, tied_names

    model = _model(True, tied=True).float()
    assert tied_names(model) == {"head.weight": "embed.weight"}
    assert set(model_state(model)) == {"embed.weight", "mix.weight", "mix.bias", "head.bias"}
    op = _operator(model.double(), _data(True), "ce", 5)
    assert op.n_params == VOCAB * 4 + 4 * 4 + 4 + VOCAB
    torch.testing.assert_close(op.matmat(torch.eye(op.n_params, dtype=torch.float64)),
                               dense_hessian(model, _data(True), "ce"), rtol=1e-9, atol=1e-11)
    state = {k: v.clone() for k, v in model_state(model).items()}
    state["head.weight"] = state.pop("embed.weight")  # the alias's name instead
    fresh = _model(True, tied=True, seed=9)
    load_state_strict(fresh, Checkpoint(tmp_path / "x.safetensors", state))
    assert torch.equal(fresh.embed.weight, model.embed.weight)
    assert fresh.head.weight is fresh.embed.weight


def _token_file(path, **arrays):
    save_file({k: v.contiguous() for k, v in arrays.items()}, str(path))
    return str(path)


def test_tokens_plugin_masks_padding_and_shifts_for_language_modelling(tmp_path):
    ids, mask = _sequences()
    lm = datasets.tokens(path=_token_file(tmp_path / "lm.safetensors", input_ids=ids,
                                          attention_mask=mask), num_classes=VOCAB)
    assert set(lm.x) == {"input_ids", "attention_mask"} and lm.num_classes == VOCAB
    want = torch.cat([ids[:, 1:], torch.zeros(N, 1, dtype=torch.long)], 1)
    want_mask = torch.cat([mask[:, 1:], torch.zeros(N, 1, dtype=torch.long)], 1)
    assert torch.equal(lm.y, want.masked_fill(want_mask == 0, IGNORE_INDEX))
    tags = ids % 4
    tagged = datasets.tokens(path=_token_file(tmp_path / "tag.safetensors", input_ids=ids,
                                              attention_mask=mask, labels=tags))
    assert torch.equal(tagged.y, tags.masked_fill(mask == 0, IGNORE_INDEX))  # not shifted
    assert tagged.num_classes == int(tags[mask == 1].max()) + 1
    np.savez(tmp_path / "cls.npz", input_ids=ids.numpy(), labels=(ids[:, 0] % 3).numpy())
    cls = datasets.tokens(path=str(tmp_path / "cls.npz"))
    assert list(cls.x) == ["input_ids"] and cls.y.shape == (N,)


@pytest.mark.parametrize(("arrays", "config", "message"), [
    ({"input_ids": torch.ones(3, 4, dtype=torch.long),
      "attention_mask": torch.full((3, 4), 2)}, {}, "must hold only 0 and 1"),
    ({"input_ids": torch.ones(3, 4, dtype=torch.long), "labels": torch.ones(3, 2)}, {},
     "have shape (3, 2); use (3,) (one per sequence) or (3, 4)"),
    ({"ids": torch.ones(3, 4, dtype=torch.long)}, {}, "has no array 'input_ids'; it holds: ids"),
    ({"input_ids": -torch.ones(3, 4, dtype=torch.long)}, {}, "must be non-negative"),
    ({"input_ids": torch.ones(3, 4, dtype=torch.long), "labels": torch.ones(3)},
     {"shift_labels": True}, "shift_labels needs one label per token"),
    ({"input_ids": torch.ones(3, 4, dtype=torch.long)}, {"num_classes": 1},
     "labels in .* go up to 1 but num_classes is 1"),
])
def test_tokens_plugin_refuses_bad_files_in_one_line(tmp_path, arrays, config, message):
    import re

    path = _token_file(tmp_path / "t.safetensors", **arrays)
    with pytest.raises(ValueError, match=re.escape(message) if ".*" not in message else message):
        datasets.tokens(path=path, **config)


@pytest.fixture
def masked_checkpoint(tmp_path, fake_plugin):  # noqa: F811
    ids, mask = _sequences()
    data = _token_file(tmp_path / "lm.safetensors", input_ids=ids, attention_mask=mask)
    ckpt = tmp_path / "masked.safetensors"
    config = json.dumps({"vocab": VOCAB, "width": 4, "token_level": True, "tied": True})
    result = run_cli("init", "--model", "masked", "--model-config", config, "--data", "tokens",
                     "--data-config", json.dumps({"path": data, "num_classes": VOCAB}),
                     "--loss", "ce", "--seed", "4", "--output", str(ckpt))
    assert result.exit_code == 0, result.stderr
    return ckpt


def test_spectrum_align_and_bulk_training_on_named_inputs(tmp_path, masked_checkpoint):
    from subspace_cli.checkpoint import SpecOverrides
    from subspace_cli.experiment import load_experiment

    result = run_cli("spectrum", str(masked_checkpoint), "-k", "3", "--dtype", "float64",
                     "--chunk-size", "5", "--json", "--output", str(tmp_path / "s.h5"))
    assert result.exit_code == 0, result.stderr
    record = json.loads(result.stdout)[0]
    experiment = load_experiment(masked_checkpoint, SpecOverrides())
    want = torch.linalg.eigvalsh(dense_hessian(experiment.model, experiment.data, "ce"))
    np.testing.assert_allclose(record["eigenvalues"], want.flip(0)[:3].numpy(), rtol=1e-7)
    assert record["n_samples"] == N
    result = run_cli("align", str(masked_checkpoint), "-k", "3", "--eigenspace",
                     str(tmp_path / "s.h5"), "--batch-size", "4", "--batches", "3", "--json")
    assert result.exit_code == 0, result.stderr
    chi = json.loads(result.stdout)[0]["chi_full"]
    assert 0.0 <= chi <= 1.0
    out = tmp_path / "run"
    result = run_cli("project-train", str(masked_checkpoint), "--out", str(out), "--mode",
                     "bulk", "-k", "3", "--steps", "4", "--batch-size", "4", "--lr", "0.5",
                     "--dtype", "float64", "--log-every", "2")
    assert result.exit_code == 0, result.stderr
    trained = load_experiment(out / "last.safetensors", SpecOverrides())
    assert trained.spec.step == 4 and "head.weight" not in trained.checkpoint.tensors
    assert not torch.equal(trained.model.embed.weight, experiment.model.embed.weight.double())


def test_hf_plugin_without_transformers_says_what_to_install(monkeypatch):
    hf = pytest.importorskip("subspace_plugins.hf")
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers fails
    with pytest.raises(ImportError, match=r"pip install 'subspace-plugins\[hf\]'"):
        hf.hf(config={"model_type": "bert"}, task="sequence-classification")
