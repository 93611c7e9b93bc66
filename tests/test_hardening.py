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


# -- item 4: resource limits from untrusted metadata --------------------------------------------

SAMPLE = Path(__file__).parents[1] / "sample_checkpoints" / "mlp_mnist1d.safetensors"


def with_metadata(source: Path, target: Path, **changes: str) -> Path:
    """A copy of ``source`` whose metadata has ``changes`` (keys with dots as double
    underscores: ``subspace__model_config``)."""
    from subspace_cli.checkpoint import read_checkpoint, write_checkpoint

    ckpt = read_checkpoint(source)
    meta = dict(ckpt.metadata)
    meta.update({key.replace("__", "."): value for key, value in changes.items()})
    write_checkpoint(target, ckpt.tensors, meta)
    return target


def test_a_model_config_with_huge_widths_is_refused_before_anything_is_built(tmp_path):
    import json

    from subspace_cli.checkpoint import read_checkpoint

    config = json.loads(read_checkpoint(SAMPLE).metadata["subspace.model_config"])
    config["widths"] = [1_000_000, 1_000_000]  # about 1e12 parameters: 4 TB in float32
    huge = with_metadata(SAMPLE, tmp_path / "huge.safetensors",
                         subspace__model_config=json.dumps(config))
    result = run_cli("spectrum", str(huge), "-o", str(tmp_path / "s.h5"))
    assert result.exit_code == 2, result.stderr
    assert "more than --max-params" in result.stderr and "raise --max-params" in result.stderr
    assert not (tmp_path / "s.h5").exists()
    # an explicit, smaller limit refuses the sample's own 50,410 parameters too, and a
    # larger one lets it through to the tensor check
    small = run_cli("inspect", str(SAMPLE), "--max-params", "50000")
    assert small.exit_code == 2 and "50,410 parameters, more than --max-params 50,000" in (
        small.stderr)
    assert run_cli("inspect", str(SAMPLE), "--max-params", "50410").exit_code == 0


def test_the_default_parameter_limit_is_what_the_memory_can_hold():
    from subspace_cli.limits import BYTES_PER_PARAMETER, BuildLimits, physical_memory

    memory = physical_memory()
    assert memory is not None and memory > 2**30
    assert BuildLimits().max_params == memory // BYTES_PER_PARAMETER


def test_a_data_config_asking_for_1e12_samples_is_refused_before_the_plugin_runs(tmp_path):
    import json

    from subspace_cli.checkpoint import read_checkpoint

    config = json.loads(read_checkpoint(SAMPLE).metadata["subspace.data_config"])
    config["n_train"] = 10**12
    many = with_metadata(SAMPLE, tmp_path / "many.safetensors",
                         subspace__data_config=json.dumps(config))
    result = _finishes(lambda: run_cli("spectrum", str(many), "--max-samples", "200",
                                       "-o", str(tmp_path / "s.h5")))
    assert result.exit_code == 2, result.stderr
    assert "n_train = 1,000,000,000,000 samples, more than --max-samples-build 10,000,000" in (
        result.stderr)
    raised = _finishes(lambda: run_cli("spectrum", str(many), "--max-samples-build", "100",
                                       "-o", str(tmp_path / "s.h5")))
    assert raised.exit_code == 2 and "--max-samples-build 100 " in raised.stderr


def test_a_big_tensor_under_a_wrong_name_is_refused_before_it_is_read(tmp_path):
    """The names are checked against the header: the 96 MiB tensor is never read (measured as
    the peak memory of a process that tries, against one given a matching checkpoint; Linux)."""
    import subprocess
    import sys

    import torch

    from subspace_cli.checkpoint import read_checkpoint, write_checkpoint

    ckpt = read_checkpoint(SAMPLE)
    tensors = dict(ckpt.tensors)
    tensors["net.0.weight_renamed"] = torch.ones(24 * 2**20)  # 96 MiB of float32
    wrong = tmp_path / "wrong.safetensors"
    write_checkpoint(wrong, tensors, ckpt.metadata)
    script = (  # inspect hashed every tensor before it checked a name
        "import sys\n"
        "from click.testing import CliRunner\n"
        "from subspace_cli.cli import main\n"
        "def peak():  # VmHWM: this process's own peak (ru_maxrss keeps the parent's)\n"
        "    return [int(line.split()[1]) * 1024 for line in open('/proc/self/status')\n"
        "            if line.startswith('VmHWM:')][0]\n"
        "for path in sys.argv[1:]:\n"
        "    result = CliRunner().invoke(main, ['inspect', path])\n"
        "    print(result.exit_code, result.stderr.strip())\n"
        "    print(peak())\n"
    )
    # the matching sample first: the peak that inspecting any checkpoint reaches
    lines = subprocess.run([sys.executable, "-c", script, str(SAMPLE), str(wrong)],
                           capture_output=True, text=True, check=True).stdout.splitlines()
    assert lines[0] == "0 "
    assert lines[2].startswith("2 ") and "unexpected net.0.weight_renamed" in lines[2]
    baseline, used = int(lines[1]), int(lines[3])
    assert used - baseline < 32 * 2**20, (used, baseline)  # far less than the 96 MiB tensor


def test_random_bytes_in_a_pt_file_are_not_said_to_hold_python_objects(tmp_path):
    import datetime

    import torch

    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"xyz, not a pickle at all" * 10)
    result = run_cli("inspect", str(junk))
    assert result.exit_code == 2
    assert "not a readable torch file" in result.stderr and "Python objects" not in result.stderr
    objects = tmp_path / "objects.pt"
    torch.save({"w": torch.zeros(2), "when": datetime.date(2020, 1, 1)}, objects)
    refused = run_cli("inspect", str(objects))
    assert refused.exit_code == 2
    assert "holds Python objects besides tensors (datetime.date)" in refused.stderr


@pytest.mark.parametrize("version", ["-1", "0", "1e3", " 1", "1.x", ""])
def test_a_malformed_format_version_is_refused(tmp_path, version):
    odd = with_metadata(SAMPLE, tmp_path / "odd.safetensors", subspace__format_version=version)
    result = run_cli("inspect", str(odd))
    assert result.exit_code == 2 and "malformed subspace.format_version" in result.stderr


def test_nan_weights_are_blamed_on_the_checkpoint_not_on_an_overflow(tmp_path):
    import torch

    from subspace_cli.checkpoint import read_checkpoint, write_checkpoint

    ckpt = read_checkpoint(SAMPLE)
    tensors = dict(ckpt.tensors)
    name = sorted(n for n, t in tensors.items() if t.is_floating_point())[0]
    broken = tensors[name].clone()
    broken.view(-1)[:3] = torch.tensor([float("nan"), float("inf"), float("nan")])
    tensors[name] = broken
    bad = tmp_path / "diverged.safetensors"
    write_checkpoint(bad, tensors, ckpt.metadata)
    result = run_cli("spectrum", str(bad), "-o", str(tmp_path / "s.h5"))
    assert result.exit_code == 2, result.stderr
    assert f"tensor {name} holds 3 non-finite values (NaN or ±inf)" in result.stderr
    assert "overflow" not in result.stderr
