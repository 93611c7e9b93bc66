"""Option bundles and the per-input loop shared by every command."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import click

from subspace_cli.errors import EXIT_SOME_FAILED, EXIT_USAGE, SubspaceError, UsageError

F = TypeVar("F", bound=Callable[..., Any])

#: ``--hvp-method`` choices; the same as ``hessian.HVP_METHODS``, kept here so that ``--help``
#: does not import torch (a test checks that the two agree).
HVP_METHOD_HELP = (
    "HVP: forward-over-reverse or reverse-over-reverse, batched over the vectors or one vector "
    "at a time (-loop), or auto (reverse-loop for one vector on a CPU; otherwise time all four "
    "once, keep the fastest, and remember the choice in the user cache)."
)

_SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


class Finite(click.FloatRange):
    """A float that must be finite (click's FloatRange lets NaN through every bound, since NaN
    compares false), within the optional range."""

    name = "float"

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> Any:
        import math

        number = super().convert(value, param, ctx)
        if number is not None and not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return number


class ByteSize(click.ParamType):
    """A memory size: bytes, or a number with K, M, G or T (powers of 1024), e.g. ``512M``;
    ``auto`` gives None (the default)."""

    name = "SIZE"

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> int | None:
        if value is None or isinstance(value, int):
            return value
        text = str(value).strip().upper().removesuffix("B").removesuffix("I")
        if text == "AUTO":
            return None
        unit = text[-1:] if text[-1:] in _SIZE_UNITS and text[-1:] else ""
        number = text[: len(text) - len(unit)]
        try:
            size = float(number)
        except ValueError:
            size = float("nan")
        if not size >= 0 or size == float("inf"):
            self.fail(f"{value!r} is not a size such as 0, 4096, 512M or 2G", param, ctx)
        return int(size * _SIZE_UNITS[unit])


def _set_root_value(name: str) -> Callable[[click.Context, click.Parameter, Any], Any]:
    """A callback keeping an option given after any subcommand on the root context (a flag
    only when set, a value only when given)."""
    def callback(ctx: click.Context, _param: click.Parameter, value: Any) -> Any:
        root = ctx.find_root()
        root.ensure_object(dict)
        if value is not None and value is not False:
            root.obj[name] = value
        return value

    return callback


def _root_values(ctx: click.Context | None = None) -> dict[str, Any]:
    """What :func:`_set_root_value` kept for the running command (empty outside one)."""
    ctx = ctx or click.get_current_context(silent=True)
    return (ctx.find_root().obj or {}) if ctx is not None else {}


def build_limits(ctx: click.Context | None = None) -> Any:
    """The :class:`~subspace_cli.limits.BuildLimits` of ``--max-params`` and
    ``--max-samples-build`` (defaults where not given)."""
    import dataclasses

    from subspace_cli.limits import BuildLimits

    given = _root_values(ctx)
    fields = {f.name: given[f.name] for f in dataclasses.fields(BuildLimits) if f.name in given}
    return BuildLimits(**fields)


def output_options(f: F) -> F:
    """``--json``, ``-q/--quiet`` and ``--traceback``, accepted after any subcommand too."""
    f = click.option("--json", "as_json", is_flag=True, help="Print results as JSON on stdout.")(f)
    f = click.option(
        "-q",
        "--quiet",
        is_flag=True,
        expose_value=False,
        is_eager=True,
        callback=_set_root_value("quiet"),
        help="No progress bars or informational messages.",
    )(f)
    f = click.option(
        "--traceback",
        is_flag=True,
        expose_value=False,
        is_eager=True,
        callback=_set_root_value("traceback"),
        help="Show the full traceback of an error.",
    )(f)
    return f


LIMIT_OPTIONS = (
    ("--max-params", "Refuse a model (built from a checkpoint's metadata) with more parameters "
                     "[default: what this machine's memory can analyse, memory / 16 bytes]."),
    ("--max-samples-build", "Refuse a data config asking for more samples (n_train, n_samples "
                            "or num_samples) [default: 10,000,000]."),
)


def plugin_options(f: F) -> F:
    """Flags that supply or override a checkpoint's model, data and loss metadata."""
    options = [
        click.option(
            "--model",
            metavar="NAME|module:attr",
            help="Model plugin (overrides the checkpoint's subspace.model).",
        ),
        click.option(
            "--model-config",
            metavar="JSON",
            help="Model factory arguments as a JSON object (merged over the checkpoint's).",
        ),
        click.option(
            "--data",
            metavar="NAME|module:attr",
            help="Data plugin (overrides the checkpoint's subspace.data).",
        ),
        click.option(
            "--data-config",
            metavar="JSON",
            help="Data factory arguments as a JSON object (merged over the checkpoint's).",
        ),
        click.option(
            "--loss",
            type=click.Choice(["mse", "ce"]),
            help="Loss: mse = mean over samples of 0.5*||f(x)-onehot(y)||^2; ce = mean cross-entropy.",
        ),
        *(click.option(flag, type=click.IntRange(min=1), expose_value=False,
                       callback=_set_root_value(flag[2:].replace("-", "_")), help=text)
          for flag, text in LIMIT_OPTIONS),
        click.option(
            "--strip-prefix",
            metavar="PREFIX",
            expose_value=False,
            callback=_set_root_value("strip_prefix"),
            help="Take the checkpoint's tensors whose names start with PREFIX, without it "
            "(a Lightning module's `model.`); by default a prefix is removed when exactly one "
            "makes the names the model's.",
        ),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def overrides_from(
    model: str | None,
    model_config: str | None,
    data: str | None,
    data_config: str | None,
    loss: str | None,
) -> Any:
    from subspace_cli.checkpoint import SpecOverrides, parse_json_object

    return SpecOverrides(
        limits=build_limits(),
        strip_prefix=_root_values().get("strip_prefix"),
        model=model,
        model_config=parse_json_object(model_config, "--model-config") if model_config else None,
        data=data,
        data_config=parse_json_object(data_config, "--data-config") if data_config else None,
        loss=loss,
    )


def is_quiet(ctx: click.Context) -> bool:
    from subspace_cli.output import quiet_requested

    return quiet_requested(ctx)


def wants_traceback(ctx: click.Context) -> bool:
    return bool((ctx.find_root().obj or {}).get("traceback"))


def for_each_input(
    ctx: click.Context,
    args: Sequence[str],
    handle: Callable[[Any], None],
    *,
    noun: str = "checkpoint",
    expand: Callable[[Sequence[str]], Sequence[Any]] | None = None,
) -> Outcome:
    """Call ``handle(path)`` for every input expanded from ``args``; a bad one does not stop the rest.

    ``expand`` turns the arguments into :class:`~subspace_cli.inputs.Input` items (default:
    checkpoint files, :func:`~subspace_cli.inputs.expand_inputs`). Each failure is one line on
    stderr. Render the collected results, then call :meth:`Outcome.exit` for the exit code.
    """
    from subspace_cli.inputs import expand_inputs

    inputs = (expand or expand_inputs)(args)
    if not inputs:
        raise UsageError(f"no {noun} given")
    failures = 0
    for item in inputs:
        try:
            if item.error is not None:
                raise UsageError(item.error)
            handle(item.path)
        except SubspaceError as exc:
            from subspace_cli import parallel

            if wants_traceback(ctx) or parallel.world().distributed:
                raise  # data-parallel: the ranks must not part ways, so a failure ends the run
            failures += 1
            message = str(exc)
            if item.path is not None and not message.startswith(str(item.path)):
                message = f"{item.path}: {message}"
            click.echo(f"error: {message}", err=True)
    return Outcome(len(inputs), failures, noun)


def run_each(ctx: click.Context, checkpoints: Sequence[str], run: Callable[[Any], dict[str, Any]],
             render: Callable[[dict[str, Any]], None], *, as_json: bool,
             jsonl: bool = False) -> None:
    """Run an analysis on every checkpoint in turn, rendering each record as it is made (or one
    JSON line each with ``jsonl``), or all of them as one JSON array at the end; then exit as
    :meth:`Outcome.exit` says."""
    from subspace_cli.output import emit_json

    results: list[dict[str, Any]] = []

    def handle(path: Any) -> None:
        record = run(path)
        results.append(record)
        if jsonl:
            emit_json(record, lines=True)
        elif not as_json:
            render(record)

    outcome = for_each_input(ctx, checkpoints, handle)
    if as_json:
        emit_json(results)
    outcome.exit(ctx)


class Outcome:
    """How many inputs a command processed and how many failed."""

    def __init__(self, total: int, failures: int, noun: str) -> None:
        self.total, self.failures, self.noun = total, failures, noun

    def exit(self, ctx: click.Context) -> None:
        """Exit 0 when all succeeded, 2 when the only input failed, 1 when some of several did."""
        if not self.failures:
            return
        if self.total == 1:
            ctx.exit(EXIT_USAGE)
        click.echo(f"{self.failures} of {self.total} {self.noun}s failed", err=True)
        ctx.exit(EXIT_SOME_FAILED)


def examples(text: str) -> str:
    """An "Examples" epilog, shown at the end of a command's help with its lines kept."""
    lines = "\n".join(line.rstrip() for line in text.strip("\n").splitlines())
    return f"\b\nExamples:\n{lines}"
