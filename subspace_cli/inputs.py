"""Positional inputs: files, directories (searched recursively) and glob patterns."""

from __future__ import annotations

import glob
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

GLOB_CHARS = set("*?[")


@dataclass(frozen=True)
class Input:
    """One input to process: a path, or the reason an argument gave none."""

    arg: str
    path: Path | None
    error: str | None = None


def expand_inputs(args: Sequence[str], pattern: str = "*.safetensors") -> list[Input]:
    """Expand command-line arguments into inputs, in order, without duplicates.

    A directory contributes every file matching ``pattern`` below it (sorted); a glob contributes
    its matches (sorted); an argument that yields nothing becomes an input carrying an error, so
    it is reported while the rest go on.
    """
    out: list[Input] = []
    seen: set[Path] = set()

    def add(arg: str, paths: Iterable[Path]) -> None:
        for p in paths:
            key = p.resolve()
            if key not in seen:
                seen.add(key)
                out.append(Input(arg, p))

    for arg in args:
        path = Path(arg)
        if path.is_dir():
            matches = sorted(p for p in path.rglob(pattern) if p.is_file())
            if not matches:
                out.append(Input(arg, None, f"no {pattern} files under directory {arg}"))
            add(arg, matches)
        elif path.exists():
            add(arg, [path])
        elif GLOB_CHARS & set(arg):
            matches = sorted(Path(m) for m in glob.glob(arg, recursive=True) if Path(m).is_file())
            if not matches:
                out.append(Input(arg, None, f"pattern {arg} matched no files"))
            add(arg, matches)
        else:
            out.append(Input(arg, None, f"no such file or directory: {arg}"))
    return out
