"""Issue 15: Hugging Face models (the ``hf`` plugin, the ``[hf]`` extra) and ``save_pretrained``
directories as checkpoints. Skipped without ``transformers``; CI installs the extra."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from plugin_fixtures import run_cli
from safetensors.torch import save_file
from tiny_models import dense_hessian

from subspace_cli.checkpoint import SpecOverrides
from subspace_cli.data import TrainingData
from subspace_cli.experiment import load_experiment
from subspace_cli.hessian import HessianOperator

pytest.importorskip("transformers")
hf = pytest.importorskip("subspace_plugins.hf")

VOCAB, T, N = 12, 6, 10
BERT = {"model_type": "bert", "vocab_size": VOCAB, "hidden_size": 4, "num_hidden_layers": 1,
        "num_attention_heads": 2, "intermediate_size": 8, "max_position_embeddings": 10,
        "type_vocab_size": 1, "architectures": ["BertForSequenceClassification"]}
GPT2 = {"model_type": "gpt2", "vocab_size": VOCAB, "n_embd": 4, "n_layer": 1, "n_head": 2,
        "n_positions": 10, "bos_token_id": 0, "eos_token_id": 0}


def _sequences(pad_to=T, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, T + 1, (N,), generator=g)
    ids = torch.randint(1, VOCAB, (N, T), generator=g)
    mask = (torch.arange(pad_to)[None] < lengths[:, None]).long()
    ids = torch.cat([ids, torch.zeros(N, pad_to - T, dtype=torch.long)], 1) * mask
    return ids, mask


def _classification(pad_to=T):
    ids, mask = _sequences(pad_to)
    return TrainingData(num_classes=3, x={"input_ids": ids, "attention_mask": mask},
                        y=ids[:, 0] % 3)


def _bert(**options):
    torch.manual_seed(0)
    return hf.hf(config=BERT, num_classes=3, **options).double()


def _operator(model, data, chunk_size=4):
    return HessianOperator(model, data, "ce", chunk_size=chunk_size, device=torch.device("cpu"),
                           dtype=torch.float64, method="reverse")


def test_bert_with_padded_sequences_matches_the_dense_float64_hessian():
    model, data = _bert(), _classification()
    assert model.training  # from_config leaves the model in train mode: dropout is active
    op = _operator(model, data)
    got = op.matmat(torch.eye(op.n_params, dtype=torch.float64))
    torch.testing.assert_close(got, dense_hessian(model, data, "ce"), rtol=1e-8, atol=1e-10)
    assert model.training  # measured in eval mode (the reference's), the model's mode kept


def test_more_padding_and_math_sdpa_change_nothing():
    """Two more padded columns leave the Hessian as it was (the attention mask reaches the
    model); SDPA pinned to its math kernel gives eager attention's products."""
    model = _bert()
    v = torch.randn(2, sum(p.numel() for p in model.parameters()), dtype=torch.float64,
                    generator=torch.Generator().manual_seed(1))
    eager = _operator(model, _classification()).matmat(v)
    torch.testing.assert_close(_operator(model, _classification(pad_to=T + 2)).matmat(v), eager,
                               rtol=1e-9, atol=1e-11)
    sdpa = _bert(attn_implementation="sdpa")
    assert type(sdpa).__qualname__.endswith("[math-sdpa]")
    torch.testing.assert_close(_operator(sdpa, _classification()).matmat(v), eager,
                               rtol=1e-9, atol=1e-11)


def test_hf_plugin_refuses_a_config_it_cannot_build_in_one_line():
    with pytest.raises(ValueError, match="say which head to build"):
        hf.hf(config={"model_type": "bert"})
    with pytest.raises(ValueError, match="no model_type"):
        hf.hf(config={"hidden_size": 4}, task="causal-lm")
    with pytest.raises(ValueError, match="model_type 'no-such-model' rejected"):
        hf.hf(config={"model_type": "no-such-model"}, task="causal-lm")
    with pytest.raises(ValueError, match="classes are its vocabulary: num_classes is 5"):
        hf.hf(config=GPT2, task="causal-lm", num_classes=5)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny GPT-2 (tied embedding and head) saved by save_pretrained, once whole and once
    in shards, and a padded token file for language modelling."""
    import transformers

    root = tmp_path_factory.mktemp("hf")
    torch.manual_seed(3)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**GPT2))
    model.save_pretrained(root / "gpt2")
    model.save_pretrained(root / "sharded", max_shard_size="1KB")
    (root / "bin").mkdir()  # the older layout: torch.save of the state_dict (both tied names)
    (root / "bin" / "config.json").write_text((root / "gpt2" / "config.json").read_text())
    torch.save(model.state_dict(), root / "bin" / "pytorch_model.bin")
    ids, mask = _sequences()
    save_file({"input_ids": ids, "attention_mask": mask}, str(root / "lm.safetensors"))
    return root


def _flags(root):
    return ["--data", "tokens", "--data-config",
            json.dumps({"path": str(root / "lm.safetensors"), "num_classes": VOCAB}),
            "--loss", "ce"]


def test_inspect_reads_a_save_pretrained_directory_whole_or_sharded(saved):
    whole = run_cli("inspect", str(saved / "gpt2"), *_flags(saved), "--json")
    assert whole.exit_code == 0, whole.stderr
    report = json.loads(whole.stdout)[0]
    assert report["format"] == "hugging face directory" and report["weights_load"]
    assert report["model"] == "hf" and report["model_config"]["config"]["model_type"] == "gpt2"
    assert report["plugins"]["model"]["source"] == "checkpoint"
    names = [t["name"] for t in report["tensors"]]
    assert "transformer.wte.weight" in names and "lm_head.weight" not in names  # tied
    assert report["n_params"] == sum(np.prod(t["shape"]) for t in report["tensors"]
                                     if not t["name"].endswith(".attn.bias"))
    assert len(list((saved / "sharded").glob("model-*.safetensors"))) > 1
    for layout in ("sharded", "bin"):
        other = run_cli("inspect", str(saved / layout), *_flags(saved), "--json")
        assert other.exit_code == 0, other.stderr
        assert json.loads(other.stdout)[0]["sha256"] == report["sha256"], layout


def test_a_broken_sharded_directory_is_one_line_with_exit_2(saved, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(saved / "sharded", broken)
    index = json.loads((broken / "model.safetensors.index.json").read_text())
    first = sorted(set(index["weight_map"].values()))[0]
    (broken / first).unlink()
    result = run_cli("inspect", str(broken), *_flags(saved))
    assert result.exit_code == 2
    assert result.stderr.strip().endswith(f"shard {first} named by "
                                          "model.safetensors.index.json is missing")
    index["weight_map"] = {name: "../elsewhere.safetensors" for name in index["weight_map"]}
    (broken / "model.safetensors.index.json").write_text(json.dumps(index))
    result = run_cli("inspect", str(broken), *_flags(saved))
    assert result.exit_code == 2 and "is not a .safetensors file of this directory" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_spectrum_and_bulk_training_on_a_saved_language_model(saved, tmp_path):
    """Next-token labels from a padded token file (the mask hides the padding): eigenvalues
    against the dense float64 Hessian, then project-train --mode bulk from the directory."""
    result = run_cli("spectrum", str(saved / "gpt2"), *_flags(saved), "-k", "2", "--dtype",
                     "float64", "--chunk-size", "4", "--json", "--output", str(tmp_path / "s.h5"))
    assert result.exit_code == 0, result.stderr
    record = json.loads(result.stdout)[0]
    experiment = load_experiment(saved / "gpt2", SpecOverrides(
        data="tokens", data_config={"path": str(saved / "lm.safetensors"), "num_classes": VOCAB},
        loss="ce"))
    want = torch.linalg.eigvalsh(dense_hessian(experiment.model, experiment.data, "ce"))
    np.testing.assert_allclose(record["eigenvalues"], want.flip(0)[:2].numpy(), rtol=1e-7)
    out = tmp_path / "run"
    result = run_cli("project-train", str(saved / "gpt2"), *_flags(saved), "--out", str(out),
                     "--mode", "bulk", "-k", "2", "--steps", "3", "--batch-size", "4",
                     "--lr", "0.5", "--dtype", "float64")
    assert result.exit_code == 0, result.stderr
    assert "dropout masks are drawn from --seed and the step" in result.stderr
    trained = run_cli("inspect", str(out / "last.safetensors"), "--json")
    assert trained.exit_code == 0, trained.stderr
    report = json.loads(trained.stdout)[0]
    assert report["step"] == 3 and report["model"] == "hf" and report["data"] == "tokens"
