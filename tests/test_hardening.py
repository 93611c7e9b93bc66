"""Issue 14: bad input is refused before anything is computed or written."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from plugin_fixtures import fake_plugin, linear_checkpoint, run_cli  # noqa: F401


@pytest.fixture
def start(tmp_path, fake_plugin):  # noqa: F811
    path = tmp_path / "start.safetensors"
    linear_checkpoint(path, 0, step=100)
    return path


@pytest.mark.parametrize("flag", ["--lr", "--momentum", "--eps", "--rho", "--weight-decay",
                                  "--dom-scale", "--tol", "--audit-tol", "--subspace-tol"])
@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_non_finite_numbers_are_refused_before_a_run_directory_exists(start, tmp_path, flag,
                                                                       value):
    out = tmp_path / "run"
    result = run_cli("project-train", str(start), "--out", str(out), "--steps", "2",
                     "--batch-size", "4", flag, value)
    assert result.exit_code == 2
    assert "finite" in result.stderr or "range" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert not out.exists()


def test_k_beyond_the_parameter_count_leaves_nothing_on_disk(start, tmp_path):
    out = tmp_path / "run"
    result = run_cli("project-train", str(start), "--out", str(out), "--steps", "2",
                     "--batch-size", "4", "-k", "1000")
    assert result.exit_code == 2
    assert "exceeds the model's 8 parameters" in result.stderr
    assert not out.exists()
    # and the same directory then starts a run
    ok = run_cli("project-train", str(start), "--out", str(out), "--steps", "2",
                 "--batch-size", "4", "-k", "2", "--dtype", "float64")
    assert ok.exit_code == 0, ok.stderr


def test_the_library_config_refuses_non_finite_numbers():
    from subspace_cli.errors import UsageError
    from subspace_cli.projected import TrainConfig

    for field, value in (("lr", math.nan), ("beta2", math.inf), ("audit_tol", -math.inf)):
        with pytest.raises(UsageError, match=f"--{field.replace('_', '-')} must be a finite"):
            TrainConfig(checkpoint="x", **{field: value}).check()
    TrainConfig(checkpoint="x").check()


def test_spectrum_refuses_a_nan_tolerance(tmp_path):
    sample = Path(__file__).parents[1] / "sample_checkpoints" / "mlp_mnist1d.safetensors"
    result = run_cli("spectrum", str(sample), "--tol", "nan",
                     "-o", str(tmp_path / "s.h5"))
    assert result.exit_code == 2 and "finite" in result.stderr
    assert not (tmp_path / "s.h5").exists()


HOSTILE_MODULE = """
import sys
sys.exit(3)
"""

FAILING_MODULE = """
def model(input_dim=3, num_classes=2):
    raise RuntimeError("weights server unreachable")
"""


@pytest.fixture
def hostile_plugins(tmp_path, monkeypatch):
    """A distribution whose one model module calls sys.exit at import and whose other
    model's factory raises RuntimeError."""
    import importlib
    import sys

    root = tmp_path / "hostile-site"
    info = root / "hostileplug-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: hostileplug\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(
        "[subspace.models]\nexiting = hostile_exit:factory\nfailing = hostile_fail:model\n")
    (root / "hostile_exit.py").write_text(HOSTILE_MODULE)
    (root / "hostile_fail.py").write_text(FAILING_MODULE)
    monkeypatch.syspath_prepend(str(root))
    importlib.invalidate_caches()
    yield root
    for name in ("hostile_exit", "hostile_fail"):
        sys.modules.pop(name, None)


@pytest.mark.usefixtures("hostile_plugins")
def test_a_plugin_calling_sys_exit_at_import_is_named_and_the_rest_still_work():
    import json

    result = run_cli("plugins", "--json")
    assert result.exit_code == 0, result.stderr
    rows = {r["name"]: r for r in json.loads(result.stdout)}
    assert rows["exiting"]["loads"] is False
    assert "SystemExit" in rows["exiting"]["error"] and "hostileplug" in rows["exiting"]["error"]
    assert rows["failing"]["loads"] is True
    assert rows["mlp"]["loads"] is True  # the built-in plugins are still listed and load


@pytest.mark.usefixtures("hostile_plugins")
def test_a_plugin_factory_raising_is_the_plugins_failure_not_ours(tmp_path):
    sample = Path(__file__).parents[1] / "sample_checkpoints" / "mlp_mnist1d.safetensors"
    for model, words in (("failing", "RuntimeError: weights server unreachable"),
                         ("exiting", "SystemExit")):
        result = run_cli("inspect", str(sample), "--model", model, "--model-config", "{}")
        assert result.exit_code == 2, result.stderr
        assert words in result.stderr and model in result.stderr
        assert "internal error" not in result.stderr
