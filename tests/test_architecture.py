"""The layering that docs/ARCHITECTURE.md promises, checked."""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import pkgutil

import click
import pytest
from plugin_fixtures import fake_plugin  # noqa: F401

import subspace_cli.commands
from subspace_cli.cli import COMMANDS, main


def command_modules() -> list[str]:
    return [f"subspace_cli.commands.{m.name}"
            for m in pkgutil.iter_modules(subspace_cli.commands.__path__)]


@pytest.mark.parametrize("module_name", command_modules())
def test_the_command_layer_defines_no_orchestration_class(module_name: str) -> None:
    """Commands parse options, make one library call and render: the only classes they may
    define are click parameter types and the exit-code tally."""
    module = importlib.import_module(module_name)
    own = [obj for _, obj in inspect.getmembers(module, inspect.isclass)
           if obj.__module__ == module_name]
    for cls in own:
        assert issubclass(cls, click.ParamType) or cls.__name__ == "Outcome", (
            f"{module_name} defines {cls.__name__}: move it into the library")


def options_of(name: str) -> dict[str, click.Parameter]:
    command = main.get_command(click.Context(main), name)
    assert command is not None
    return {p.name: p for p in command.params if p.name}


def choices(param: click.Parameter) -> tuple[str, ...]:
    assert isinstance(param.type, click.Choice)
    return tuple(param.type.choices)


def test_option_choices_are_the_library_lists() -> None:
    from subspace_cli.analysis.alignment import HESSIANS
    from subspace_cli.projected import OPTIMIZERS
    from subspace_cli.projection import MODES
    from subspace_cli.settings import DTYPES, HVP_METHODS, SOLVERS
    from subspace_cli.tracking import POLICIES

    for command in ("spectrum", "align"):
        opts = options_of(command)
        assert choices(opts["solver"]) == SOLVERS
        assert choices(opts["dtype"]) == DTYPES
        assert choices(opts["hvp_method"]) == HVP_METHODS
    assert choices(options_of("align")["hessian_kind"]) == HESSIANS
    opts = options_of("project-train")
    assert choices(opts["mode"]) == MODES
    assert choices(opts["optimizer"]) == OPTIMIZERS
    assert choices(opts["refresh"]) == POLICIES
    assert choices(opts["dtype"]) == DTYPES
    assert choices(opts["hvp_method"]) == HVP_METHODS


def test_every_project_train_option_has_a_config_field() -> None:
    """No option is silently dropped: each is a TrainConfig field, or one of the few the
    command itself handles (the run directory, plugin overrides, output format)."""
    from subspace_cli.projected import TrainConfig

    handled = {"checkpoint", "out", "resume", "model", "model_config", "data", "data_config",
               "loss", "as_json"}
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    passed = {name for name, p in options_of("project-train").items() if p.expose_value}
    missing = passed - fields - handled
    assert not missing, f"options without a TrainConfig field: {sorted(missing)}"


def test_start_refuses_an_option_without_a_field(tmp_path) -> None:
    from subspace_cli import rundir
    from subspace_cli.checkpoint import SpecOverrides

    with pytest.raises(TypeError, match="no_such_option"):
        rundir.start(tmp_path / "absent.safetensors", tmp_path / "run", SpecOverrides(),
                     steps=1, k=None, batch_size=None, options={"no_such_option": 1},
                     quiet=True)


def test_every_listed_command_loads() -> None:
    for name in COMMANDS:
        assert isinstance(main.get_command(click.Context(main), name), click.Command)


@pytest.mark.usefixtures("fake_plugin")
def test_project_train_summarises_with_reports_numbers(tmp_path) -> None:
    """One implementation of every summary number: project-train's JSON is report's row for
    the run plus the saved cost, never a second computation under other names."""
    import json

    from plugin_fixtures import linear_checkpoint, run_cli

    ckpt = tmp_path / "start.safetensors"
    linear_checkpoint(ckpt, 0, step=100)
    out = tmp_path / "run"
    result = run_cli("project-train", str(ckpt), "--out", str(out), "--mode", "bulk", "-k", "2",
                     "--steps", "6", "--log-every", "2", "--batch-size", "4", "--dtype", "float64", "--json")
    assert result.exit_code == 0, result.stderr
    mine = json.loads(result.stdout)
    report = run_cli("report", str(out), "--json")
    assert report.exit_code == 0, report.stderr
    [row] = json.loads(report.stdout)["runs"]
    saved_cost = {"steps_done", "hvps", "hvps_per_step", "refreshes", "wall_seconds",
                  "audit_hvps", "audit_seconds"}
    shared = set(mine) - saved_cost
    assert shared and shared <= set(row)
    assert {key: mine[key] for key in shared} == {key: row[key] for key in shared}
    assert mine["steps_done"] == 6 and mine["logged_rows"] == 3 and mine["last_logged_step"] == 4
