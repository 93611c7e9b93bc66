from __future__ import annotations

import json
import os
import pickle

import pytest
import torch

from subspace_cli.checkpoint import (
    Checkpoint,
    SpecOverrides,
    load_state_strict,
    read_checkpoint,
    resolve_spec,
    tensor_sha256,
    write_checkpoint,
)
from subspace_cli.errors import CheckpointError, UsageError

META = {
    "subspace.model": "mlp",
    "subspace.model_config": json.dumps({"input_dim": 3, "widths": [4], "num_classes": 2}),
    "subspace.data": "digits",
    "subspace.data_config": "{}",
    "subspace.loss": "mse",
    "subspace.step": "7",
    "subspace.format_version": "1",
}


def _tensors():
    g = torch.Generator().manual_seed(0)
    return {"w": torch.randn(2, 3, generator=g), "b": torch.randn(2, generator=g)}


def test_round_trip_keeps_tensors_metadata_and_hash(tmp_path):
    tensors = _tensors()
    path = write_checkpoint(tmp_path / "c.safetensors", tensors, META)
    ckpt = read_checkpoint(path)
    assert ckpt.metadata == META
    assert set(ckpt.tensors) == {"w", "b"}
    assert torch.equal(ckpt.tensors["w"], tensors["w"])
    assert ckpt.sha256() == tensor_sha256(tensors)
    spec = resolve_spec(ckpt, SpecOverrides())
    assert (spec.model, spec.data, spec.loss, spec.step) == ("mlp", "digits", "mse", 7)
    assert spec.model_config == {"input_dim": 3, "widths": [4], "num_classes": 2}
    assert not spec.model_from_user


def test_hash_depends_on_values_names_and_dtype():
    t = _tensors()
    base = tensor_sha256(t)
    assert tensor_sha256({"w": t["w"].clone(), "b": t["b"].clone()}) == base
    assert tensor_sha256({"w": t["w"], "b": t["b"] + 1e-7}) != base
    assert tensor_sha256({"W": t["w"], "b": t["b"]}) != base
    assert tensor_sha256({"w": t["w"].double(), "b": t["b"]}) != base


def test_existing_file_is_not_replaced_and_failed_write_leaves_it_intact(tmp_path, monkeypatch):
    path = write_checkpoint(tmp_path / "c.safetensors", _tensors(), META)
    before = path.read_bytes()
    with pytest.raises(UsageError, match="exists"):
        write_checkpoint(path, {"x": torch.zeros(1)}, META)

    import safetensors.torch

    def broken_save(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", broken_save)
    with pytest.raises(OSError, match="disk full"):
        write_checkpoint(path, {"x": torch.zeros(1)}, META, overwrite=True)
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["c.safetensors"]  # no temporary left behind


def test_pt_state_dict_loads_with_weights_only(tmp_path):
    tensors = _tensors()
    torch.save(tensors, tmp_path / "w.pt")
    torch.save({"state_dict": tensors, "epoch": 3}, tmp_path / "nested.pth")
    for name in ("w.pt", "nested.pth"):
        ckpt = read_checkpoint(tmp_path / name)
        assert ckpt.metadata == {}
        assert ckpt.sha256() == tensor_sha256(tensors)


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch pwned_marker",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_pt_with_code_is_refused_and_never_executed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with open("evil.pt", "wb") as f:
        pickle.dump({"w": _Payload()}, f)
    with pytest.raises(CheckpointError, match="refused to unpickle"):
        read_checkpoint(tmp_path / "evil.pt")
    assert not (tmp_path / "pwned_marker").exists()


def test_malformed_and_unsupported_files(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        read_checkpoint(bad)
    other = tmp_path / "w.bin"
    other.write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"unsupported checkpoint type '\.bin'; use "
                                              r"\.safetensors, \.pt, \.pth or \.ckpt"):
        read_checkpoint(other)
    empty = tmp_path / "w.ckpt"  # a Lightning checkpoint's suffix: read as a torch file
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match="not a readable torch file"):
        read_checkpoint(empty)
    with pytest.raises(CheckpointError, match="no such file"):
        read_checkpoint(tmp_path / "missing.safetensors")


def test_newer_format_is_refused_with_upgrade_advice(tmp_path):
    path = write_checkpoint(
        tmp_path / "c.safetensors", _tensors(), {**META, "subspace.format_version": "2"}
    )
    with pytest.raises(CheckpointError, match="upgrade subspace"):
        read_checkpoint(path)


def test_strict_loading_names_every_problem(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state.pop("1.bias")
    state["0.weight"] = torch.zeros(5, 3)
    state["extra.weight"] = torch.zeros(1)
    ckpt = Checkpoint(tmp_path / "x.safetensors", state)
    with pytest.raises(CheckpointError) as info:
        load_state_strict(model, ckpt)
    msg = str(info.value)
    assert "missing 1.bias" in msg
    assert "unexpected extra.weight" in msg
    assert "shape mismatch 0.weight (checkpoint (5, 3), model (4, 3))" in msg


def test_overrides_merge_or_replace(tmp_path):
    ckpt = Checkpoint(tmp_path / "c.safetensors", {}, dict(META))
    merged = resolve_spec(ckpt, SpecOverrides(model_config={"widths": [8]}, loss="ce"))
    assert merged.model_config == {"input_dim": 3, "widths": [8], "num_classes": 2}
    assert merged.loss == "ce"
    replaced = resolve_spec(ckpt, SpecOverrides(model="cnn", model_config={"input_shape": [1, 8]}))
    assert replaced.model == "cnn" and replaced.model_from_user
    assert replaced.model_config == {"input_shape": [1, 8]}
    bare = Checkpoint(tmp_path / "w.pt", {}, {})
    with pytest.raises(CheckpointError, match="pass --model"):
        resolve_spec(bare, SpecOverrides())
    spec = resolve_spec(bare, SpecOverrides(model="mlp", data="digits", loss="mse"))
    assert spec.model_config == {} and spec.model_from_user and spec.data_from_user


def test_float64_weights_load_without_rounding(tmp_path):
    # A --dtype float64 run writes float64 checkpoints; the float32 model a plugin builds must
    # not round them on the way in (that broke bit-identical resumes of float64 runs).
    weights = {"weight": torch.randn(3, 4, dtype=torch.float64) / 3,
               "bias": torch.randn(3, dtype=torch.float64) / 3}
    write_checkpoint(tmp_path / "w.safetensors", weights, {})
    model = torch.nn.Linear(4, 3)
    load_state_strict(model, read_checkpoint(tmp_path / "w.safetensors"))
    assert model.weight.dtype == torch.float64
    assert torch.equal(model.weight, weights["weight"]) and torch.equal(model.bias, weights["bias"])
    plain = torch.nn.Linear(4, 3)
    write_checkpoint(tmp_path / "f.safetensors", {k: v.float() for k, v in weights.items()}, {})
    load_state_strict(plain, read_checkpoint(tmp_path / "f.safetensors"))
    assert plain.weight.dtype == torch.float32  # float32 weights leave the model as it is
