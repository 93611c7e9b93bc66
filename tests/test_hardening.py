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
