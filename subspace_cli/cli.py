"""The ``subspace`` command group.

Subcommands are loaded lazily (Click's "lazily loading subcommands" pattern) so that
``subspace --help`` and every ``subspace CMD --help`` start without importing torch.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any

import click

from subspace_cli import __version__, parallel
from subspace_cli.commands.common import wants_traceback
from subspace_cli.errors import EXIT_INTERRUPTED, SubspaceError, storage_error

# name -> "module:attribute"; a command appears here only once it does real work.
COMMANDS: dict[str, str] = {
    "align": "subspace_cli.commands.align:align_command",
    "density": "subspace_cli.commands.density:density_command",
    "init": "subspace_cli.commands.init:init_command",
    "inspect": "subspace_cli.commands.inspect:inspect_command",
    "plugins": "subspace_cli.commands.plugins:plugins_command",
    "project-train": "subspace_cli.commands.project_train:project_train_command",
    "report": "subspace_cli.commands.report:report_command",
    "spectrum": "subspace_cli.commands.spectrum:spectrum_command",
}

#: The commands that run data-parallel under torchrun; any other runs on rank 0 alone.
DATA_PARALLEL = ("align", "density", "project-train", "spectrum")

EXIT_INTERNAL = 3

MAIN_HELP = """Analyse PyTorch checkpoints through the Hessian of the training loss.

\b
Results go to stdout (tables, or JSON with --json); progress and messages
go to stderr.

\b
Exit codes:
  0  success
  1  some of several inputs failed (each failure is reported on stderr)
  2  bad usage or bad input, or the environment refused a write
     (no space left on device, read-only file system, no permission,
     an output in use by another process; under torchrun, another rank
     failed)
  3  internal error (a bug: rerun with --traceback and report it)
  130  interrupted (Ctrl-C)
  143  terminated (SIGTERM)
"""

MAIN_EXAMPLES = """\b
Examples:
  subspace spectrum sample_checkpoints/mlp_mnist1d.safetensors -o spectra.h5
  subspace align sample_checkpoints/mlp_mnist1d.safetensors --eigenspace spectra.h5
  subspace inspect sample_checkpoints/mlp_mnist1d.safetensors
  subspace init --model mlp --data mnist1d -o start.safetensors
  subspace plugins --json
"""


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = COMMANDS.get(cmd_name)
        if target is None:
            return None
        module_name, _, attr = target.partition(":")
        command: click.Command = getattr(importlib.import_module(module_name), attr)
        return command

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except SubspaceError as exc:
            if wants_traceback(ctx):
                raise
            click.echo(f"{parallel.prefix()}error: {exc}", err=True)
            ctx.exit(exc.exit_code)
        except KeyboardInterrupt as exc:
            if wants_traceback(ctx):
                raise
            click.echo(f"{parallel.prefix()}interrupted", err=True)
            ctx.exit(getattr(exc, "exit_code", EXIT_INTERRUPTED))
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except Exception as exc:
            if wants_traceback(ctx):
                raise
            refused = storage_error(exc)  # disk full, read-only, no permission: not a bug
            if refused is not None:
                click.echo(f"{parallel.prefix()}error: {refused}", err=True)
                ctx.exit(refused.exit_code)
            click.echo(
                f"{parallel.prefix()}internal error: {type(exc).__name__}: {exc} (rerun with "
                "--traceback and report it)",
                err=True,
            )
            ctx.exit(EXIT_INTERNAL)
        finally:
            parallel.shutdown()


@click.group(
    cls=LazyGroup,
    help=MAIN_HELP,
    epilog=MAIN_EXAMPLES,
    context_settings={"help_option_names": ["-h", "--help"]},
)
@click.version_option(__version__, prog_name="subspace")
@click.option("--traceback", is_flag=True, help="Show the full traceback of an error.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars or informational messages.")
@click.pass_context
def main(ctx: click.Context, traceback: bool, quiet: bool) -> None:
    ctx.ensure_object(dict)
    ctx.obj["traceback"] = traceback
    ctx.obj["quiet"] = quiet
    if parallel.launched():  # started by torchrun
        if ctx.invoked_subcommand in DATA_PARALLEL:
            parallel.init()
        elif parallel.launch_rank() != 0:
            ctx.exit(0)  # a command that is not data-parallel runs once, on rank 0
        if not parallel.is_main():  # silent unless it fails: its errors still reach stderr
            ctx.obj["quiet"] = True
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (for the process's lifetime)


def run() -> None:
    main(prog_name="subspace")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(run())
