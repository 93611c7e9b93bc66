"""Issue 15: Lightning (and other torch.save) checkpoints: a .ckpt holding a prefixed
state_dict loads with weights_only=True, its prefix stripped (found, or --strip-prefix)."""

from __future__ import annotations

import argparse
import json

import torch
from plugin_fixtures import fake_plugin, linear_checkpoint, run_cli  # noqa: F401

FLAGS = ["--model", "tiny", "--data", "toy", "--loss", "mse"]


def lightning_ckpt(path, tensors, *, extra=None, hyper_parameters=None):
    """What Lightning's Trainer.save_checkpoint writes for a LightningModule whose network is
    ``self.model`` (plain values only, as weights_only=True can read)."""
    state = {f"model.{k}": v for k, v in tensors.items()}
    state.update(extra or {})
    torch.save({
        "epoch": 3, "global_step": 30, "pytorch-lightning_version": "2.4.0",
        "state_dict": state, "loops": {}, "callbacks": {}, "lr_schedulers": [],
        "optimizer_states": [{"state": {}, "param_groups": [{"lr": 0.1, "params": [0, 1]}]}],
        "hyper_parameters": hyper_parameters or {"lr": 0.1},
    }, path)


def test_a_lightning_checkpoint_is_inspected_and_analysed_like_its_weights(tmp_path,
                                                                           fake_plugin):  # noqa: F811
    tensors = linear_checkpoint(tmp_path / "plain.safetensors")
    lightning_ckpt(tmp_path / "epoch=3.ckpt", tensors)
    seen = run_cli("inspect", str(tmp_path / "epoch=3.ckpt"), *FLAGS, "--json")
    assert seen.exit_code == 0, seen.stderr
    (report,) = json.loads(seen.stdout)
    assert report["format"] == "lightning" and report["prefix"] == "model."
    assert report["weights_load"] is True and report["n_params"] == 8
    plain = run_cli("inspect", str(tmp_path / "plain.safetensors"), "--json")
    assert report["sha256"] == json.loads(plain.stdout)[0]["sha256"]  # the same tensors
    table = run_cli("inspect", str(tmp_path / "epoch=3.ckpt"), *FLAGS)
    assert "the 2 tensors under 'model.', without it" in table.stdout
    a = run_cli("spectrum", str(tmp_path / "epoch=3.ckpt"), *FLAGS, "-k", "2", "--dtype",
                "float64", "--json")
    b = run_cli("spectrum", str(tmp_path / "plain.safetensors"), "-k", "2", "--dtype",
                "float64", "--json")
    assert a.exit_code == 0, a.stderr
    assert json.loads(a.stdout)[0]["eigenvalues"] == json.loads(b.stdout)[0]["eigenvalues"]


def test_tensors_beside_the_model_are_left_out_and_a_wrong_prefix_is_named(tmp_path,
                                                                           fake_plugin):  # noqa: F811
    tensors = linear_checkpoint(tmp_path / "plain.safetensors")
    path = tmp_path / "last.ckpt"
    lightning_ckpt(path, tensors, extra={"criterion.weight": torch.ones(2)})
    for given in ([], ["--strip-prefix", "model."]):  # found, or named
        used = run_cli("inspect", str(path), *FLAGS, *given, "--json")
        assert used.exit_code == 0, used.stderr
        (report,) = json.loads(used.stdout)
        assert (report["prefix"], report["tensors_used"], report["n_tensors"]) == ("model.", 2, 3)
    wrong = run_cli("inspect", str(path), *FLAGS, "--strip-prefix", "net.")
    assert wrong.exit_code == 2
    assert "no tensor name starts with --strip-prefix 'net.'" in wrong.stderr
    bad = run_cli("inspect", str(path), *FLAGS, "--strip-prefix", "criterion.")
    assert bad.exit_code == 2
    assert "tensors (under the prefix 'criterion.') do not match the model" in bad.stderr
    lightning_ckpt(path, {"weight": tensors["weight"]})  # no prefix makes the names fit
    missing = run_cli("inspect", str(path), *FLAGS)
    assert missing.exit_code == 2
    assert "tensors do not match the model: missing bias, weight; unexpected model.weight" in (
        missing.stderr)


def test_a_checkpoint_that_needs_arbitrary_unpickling_is_still_refused(tmp_path,
                                                                       fake_plugin):  # noqa: F811
    tensors = linear_checkpoint(tmp_path / "plain.safetensors")
    path = tmp_path / "hparams.ckpt"
    lightning_ckpt(path, tensors, hyper_parameters=argparse.Namespace(lr=0.1))
    refused = run_cli("inspect", str(path), *FLAGS)
    assert refused.exit_code == 2
    assert "refused to unpickle: the file holds Python objects besides tensors" in refused.stderr
    assert "argparse.Namespace" in refused.stderr
