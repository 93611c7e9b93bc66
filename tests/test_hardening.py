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


def _finishes(function, seconds=20.0):
    import threading

    result: list = []
    worker = threading.Thread(target=lambda: result.append(function()), daemon=True)
    worker.start()
    worker.join(seconds)
    assert not worker.is_alive(), "the search did not finish (a symlink loop?)"
    return result[0]


def test_a_recursive_glob_over_symlink_loops_finishes(tmp_path, monkeypatch):
    from subspace_cli.inputs import expand_inputs

    tree = tmp_path / "L"
    (tree / "a" / "b").mkdir(parents=True)
    for name in ("top.safetensors", "a/one.safetensors", "a/b/two.safetensors",
                 "a/b/other.txt", ".hidden.safetensors"):
        (tree / name).write_bytes(b"x")
    (tree / "a" / "b" / "back").symlink_to(tree, target_is_directory=True)  # a loop
    (tree / "self").symlink_to(".", target_is_directory=True)  # another
    monkeypatch.chdir(tmp_path)
    expected = ["L/a/b/two.safetensors", "L/a/one.safetensors", "L/top.safetensors"]
    # a glob skips hidden names, as glob does; a directory search takes them, as before
    for arg, want in (("L/**/*.safetensors", expected),
                      ("L", ["L/.hidden.safetensors", *expected]),
                      (str(tree), ["L/.hidden.safetensors", *expected])):
        inputs = _finishes(lambda arg=arg: expand_inputs([arg]))
        found = sorted(str(i.path.resolve().relative_to(tmp_path)) for i in inputs)
        assert found == want, arg
    inputs = _finishes(lambda: expand_inputs(["L/a/**/t*.safetensors"]))
    # L is reached once through the link (each directory is entered once), then never again
    assert [str(i.path) for i in inputs] == ["L/a/b/back/top.safetensors",
                                             "L/a/b/two.safetensors"]


def test_the_loop_safe_glob_agrees_with_glob_on_a_plain_tree(tmp_path, monkeypatch):
    import glob

    from subspace_cli.inputs import glob_paths

    for name in ("r/x.h5", "r/s/y.h5", "r/s/t/z.h5", "r/s/t/z.txt", "r/.d/w.h5"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    monkeypatch.chdir(tmp_path)
    for pattern in ("r/**/*.h5", "r/**", "**/*.h5", "r/s/**/z.*", "r/*/*.h5", "r/**/t"):
        ours = [str(p) for p in glob_paths(pattern)]
        theirs = sorted(str(p).rstrip("/") for p in glob.glob(pattern, recursive=True))
        assert ours == [p for p in theirs if p != pattern.partition("/**")[0]], pattern
