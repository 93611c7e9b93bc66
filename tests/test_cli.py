from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from plugin_fixtures import fake_plugin  # noqa: F401

from subspace_cli.checkpoint import read_checkpoint, write_checkpoint
from subspace_cli.cli import COMMANDS, main

ROOT = Path(__file__).resolve().parents[1]


def invoke(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


@pytest.mark.parametrize("command", [[], *[[name] for name in COMMANDS]])
def test_help_ends_with_examples(command):
    result = invoke(*command, "--help")
    assert result.exit_code == 0
    tail = result.stdout.rstrip().split("Examples:")[-1]
    assert "Examples:" in result.stdout and "subspace " in tail
    assert result.stdout.rstrip().splitlines()[-1].strip().startswith("subspace ")


@pytest.mark.parametrize("command", [[], *[[name] for name in COMMANDS]])
def test_help_does_not_import_torch(command):
    code = (
        "import sys\nfrom subspace_cli.cli import main\n"
        f"try:\n    main({[*command, '--help']!r}, prog_name='subspace')\n"
        "except SystemExit:\n    pass\n"
        "print('TORCH' if 'torch' in sys.modules else 'NO_TORCH')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().endswith("NO_TORCH")


def test_every_command_is_documented_in_readme():
    readme = (ROOT / "README.md").read_text()
    for name in COMMANDS:
        assert f"subspace {name}" in readme, name


def test_module_entry_point_runs():
    out = subprocess.run(
        [sys.executable, "-m", "subspace_cli", "--version"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "subspace" in out.stdout


def test_init_then_inspect_round_trip(tmp_path, fake_plugin):  # noqa: F811
    out = tmp_path / "start.safetensors"
    result = invoke(
        "init",
        "--model",
        "tiny",
        "--data",
        "toy",
        "--data-config",
        '{"n": 10}',
        "--seed",
        "3",
        "-o",
        str(out),
        "--json",
    )
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["model_config"] == {"input_dim": 3, "num_classes": 2}  # filled from the data
    assert summary["n_params"] == 3 * 2 + 2
    assert summary["n_samples"] == 10
    ckpt = read_checkpoint(out)
    assert ckpt.metadata["subspace.model"] == "tiny"
    assert ckpt.metadata["subspace.step"] == "0"
    # same seed, same weights
    again = tmp_path / "again.safetensors"
    invoke(
        "init",
        "--model",
        "tiny",
        "--data",
        "toy",
        "--data-config",
        '{"n": 10}',
        "--seed",
        "3",
        "-o",
        str(again),
    )
    assert read_checkpoint(again).sha256() == ckpt.sha256()

    result = invoke("inspect", str(out), "--json")
    assert result.exit_code == 0, result.stderr
    [report] = json.loads(result.stdout)
    assert (report["model"], report["data"], report["loss"]) == ("tiny", "toy", "mse")
    assert report["plugins"]["model"]["distribution"] == "fakeplug"
    assert report["n_params"] == 8 and report["weights_load"] is True
    assert report["sha256"] == ckpt.sha256()


def test_init_refuses_to_overwrite(tmp_path, fake_plugin):  # noqa: F811
    out = tmp_path / "start.safetensors"
    out.write_bytes(b"precious")
    result = invoke("init", "--model", "tiny", "--data", "toy", "-o", str(out))
    assert result.exit_code == 2
    assert "exists" in result.stderr
    assert out.read_bytes() == b"precious"


def _write(path, metadata, tensors=None):
    tensors = tensors or {"weight": torch.zeros(2, 3), "bias": torch.zeros(2)}
    return write_checkpoint(path, tensors, metadata)


TINY_META = {
    "subspace.model": "tiny",
    "subspace.model_config": "{}",
    "subspace.data": "toy",
    "subspace.data_config": "{}",
    "subspace.loss": "mse",
    "subspace.format_version": "1",
}


def test_module_attr_in_metadata_is_refused(tmp_path, fake_plugin):  # noqa: F811
    path = _write(tmp_path / "evil.safetensors", {**TINY_META, "subspace.model": "os:system"})
    result = invoke("inspect", str(path))
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert "refusing to import code named by a checkpoint" in result.stderr
    # the user may name the same spec explicitly
    path = _write(
        tmp_path / "spec.safetensors", {**TINY_META, "subspace.model": "fakeplug_mod:tiny"}
    )
    assert invoke("inspect", str(path)).exit_code == 2
    ok = invoke("inspect", str(path), "--model", "fakeplug_mod:tiny", "--json")
    assert ok.exit_code == 0, ok.stderr
    assert json.loads(ok.stdout)[0]["plugins"]["model"]["source"] == "command line"


def test_several_inputs_one_bad_exit_1(tmp_path, fake_plugin):  # noqa: F811
    good = _write(tmp_path / "good.safetensors", TINY_META)
    bad = _write(tmp_path / "bad.safetensors", TINY_META, {"weight": torch.zeros(5, 3)})
    result = invoke("inspect", str(tmp_path), str(tmp_path / "missing.safetensors"), "--json")
    assert result.exit_code == 1
    reports = json.loads(result.stdout)
    assert [r["checkpoint"] for r in reports] == [str(good)]
    assert (
        f"{bad}: tensors do not match the model: missing bias; shape mismatch weight"
        in result.stderr
    )
    assert "no such file or directory" in result.stderr
    assert "2 of 3 checkpoints failed" in result.stderr


def test_traceback_flag_reraises(tmp_path, fake_plugin):  # noqa: F811
    path = _write(tmp_path / "evil.safetensors", {**TINY_META, "subspace.model": "os:system"})
    runner = CliRunner()
    result = runner.invoke(main, ["--traceback", "inspect", str(path)])
    assert result.exit_code != 0 and result.exception is not None
    assert type(result.exception).__name__ == "SecurityError"
    result = runner.invoke(main, ["inspect", str(path), "--traceback"])
    assert type(result.exception).__name__ == "SecurityError"


def test_pt_checkpoint_with_flags(tmp_path, fake_plugin):  # noqa: F811
    torch.save({"weight": torch.ones(2, 3), "bias": torch.zeros(2)}, tmp_path / "w.pt")
    bare = invoke("inspect", str(tmp_path / "w.pt"), "--json")
    assert bare.exit_code == 0
    assert "pass --model" in json.loads(bare.stdout)[0]["note"]
    flagged = invoke(
        "inspect",
        str(tmp_path / "w.pt"),
        "--model",
        "tiny",
        "--data",
        "toy",
        "--loss",
        "ce",
        "--json",
    )
    assert flagged.exit_code == 0, flagged.stderr
    assert json.loads(flagged.stdout)[0]["loss"] == "ce"


def test_plugins_lists_builtins_and_broken(fake_plugin):  # noqa: F811
    result = invoke("plugins", "--json")
    assert result.exit_code == 0
    rows = {(r["group"], r["name"]): r for r in json.loads(result.stdout)}
    for name in ("mlp", "cnn", "transformer"):
        assert rows[("subspace.models", name)]["loads"] is True
        assert rows[("subspace.models", name)]["distribution"] == "subspace-plugins"
    for name in ("mnist1d", "digits", "tensors"):
        assert rows[("subspace.data", name)]["loads"] is True
    broken = rows[("subspace.models", "broken")]
    assert broken["loads"] is False and "fakeplug_missing_dependency" in broken["error"]
    table = invoke("plugins")
    assert "broken" in table.stdout and "NO" in table.stdout
    assert 'failed to load plugin "fakeplug[broken]"' in table.stderr
