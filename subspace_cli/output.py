"""Rendering shared by all commands: tables and JSON on stdout, people-facing text on stderr."""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import click


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def json_text(obj: Any, *, lines: bool = False) -> str:
    """``obj`` as JSON text (one compact line with ``lines``); NaN becomes null, ±inf a string."""
    return json.dumps(
        _jsonable(obj), separators=(",", ":") if lines else None, indent=None if lines else 2
    )


def emit_json(obj: Any, *, lines: bool = False) -> None:
    """Write ``obj`` to stdout as JSON (one compact line with ``lines``), flushing at once."""
    click.echo(json_text(obj, lines=lines))
    sys.stdout.flush()


def emit_table(
    rows: Sequence[Sequence[Any]],
    headers: Sequence[str],
    *,
    floatfmt: str | Sequence[str] = "g",
    title: str | None = None,
) -> None:
    """Write a plain-text table to stdout (stable for shell pipelines, no terminal styling)."""
    from tabulate import tabulate

    if title:
        click.echo(title)
    click.echo(tabulate(rows, headers=headers, floatfmt=floatfmt, disable_numparse=False))


def say(message: str, *, always: bool = False) -> None:
    """A line for people, on stderr; ``-q`` silences it unless ``always`` (a line that explains
    an error or an interruption)."""
    if not always and quiet_requested():
        return
    click.echo(message, err=True)


def quiet_requested(ctx: click.Context | None = None) -> bool:
    """Whether the (running) command was given ``-q`` (false outside a command)."""
    ctx = ctx or click.get_current_context(silent=True)
    return ctx is not None and bool((ctx.find_root().obj or {}).get("quiet"))


def progress_enabled(quiet: bool) -> bool:
    return not quiet and sys.stderr.isatty()


@contextmanager
def progress_bar(description: str, total: float | None, *, enabled: bool) -> Iterator[Any]:
    """A rich progress bar on stderr, or a no-op stand-in when disabled.

    Yields an object with ``update(completed=..., description=..., info=...)``.
    """
    if not enabled:
        yield _NoProgress()
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
        console=Console(stderr=True),
        transient=True,
    )
    with progress:
        task = progress.add_task(description, total=total, info="")
        yield _RichProgress(progress, task)


class _NoProgress:
    def update(self, **_: Any) -> None:
        return None


class _RichProgress:
    def __init__(self, progress: Any, task: Any) -> None:
        self._progress = progress
        self._task = task

    def update(self, **fields: Any) -> None:
        self._progress.update(self._task, **fields)
