"""Positional inputs: files, directories (searched recursively) and glob patterns."""

from __future__ import annotations

import fnmatch
import glob
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

GLOB_CHARS = set("*?[")


def _walk(root: Path) -> Iterator[tuple[Path, list[str], list[str]]]:
    """``os.walk`` that follows symlinked directories but enters each directory (by device and
    inode) once, so a symlink loop cannot make a search endless; sorted, deterministic."""
    seen: set[tuple[int, int]] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        try:
            st = os.stat(dirpath)
        except OSError:
            dirnames[:] = []
            continue
        if (st.st_dev, st.st_ino) in seen:
            dirnames[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        dirnames.sort()
        yield Path(dirpath), dirnames, sorted(filenames)


def find_files(root: Path, pattern: str) -> list[Path]:
    """Files below ``root`` whose name matches ``pattern``, sorted (loop-safe)."""
    return sorted(directory / name for directory, _, names in _walk(root) for name in names
                  if fnmatch.fnmatchcase(name, pattern) and (directory / name).is_file())


def find_checkpoints(root: Path, pattern: str) -> list[Path]:
    """Checkpoints below ``root``: files matching ``pattern`` and Hugging Face save
    directories (each one checkpoint, not searched further), sorted (loop-safe)."""
    from subspace_cli.checkpoint import is_hf_directory

    found = []
    for directory, dirnames, names in _walk(root):
        if is_hf_directory(directory):
            found.append(directory)
            dirnames[:] = []  # its files are the checkpoint's, not checkpoints of their own
            continue
        found += [directory / name for name in names
                  if fnmatch.fnmatchcase(name, pattern) and (directory / name).is_file()]
    return sorted(found)


def _match(parts: Sequence[str], names: Sequence[str]) -> bool:
    """Glob semantics on path segments: ``**`` is zero or more directories; names starting
    with a dot match only a pattern that starts with one."""
    if not parts:
        return not names
    if parts[0] == "**":
        return any(_match(parts[1:], names[i:]) for i in range(len(names) + 1)
                   if not any(n.startswith(".") for n in names[:i]))
    if not names or (names[0].startswith(".") and not parts[0].startswith(".")):
        return False
    return fnmatch.fnmatchcase(names[0], parts[0]) and _match(parts[1:], names[1:])


def glob_paths(pattern: str) -> list[Path]:
    """``glob.glob(pattern, recursive=True)``, sorted, but a ``**`` pattern walks the tree
    loop-safely (``glob`` follows a symlink loop forever)."""
    if "**" not in pattern:
        return sorted(Path(m) for m in glob.glob(pattern, recursive=True))
    parts = Path(pattern).parts
    first = next(i for i, part in enumerate(parts) if GLOB_CHARS & set(part))
    base = Path(*parts[:first]) if first else Path(".")
    rest = parts[first:]
    if not base.is_dir():
        return []
    found = []
    for directory, dirnames, filenames in _walk(base):
        for name in [*dirnames, *filenames]:
            path = directory / name
            if _match(rest, path.relative_to(base).parts):
                found.append(path)
    return sorted(set(found))


@dataclass(frozen=True)
class Input:
    """One input to process: a path, or the reason an argument gave none."""

    arg: str
    path: Path | None
    error: str | None = None


def expand_inputs(args: Sequence[str], pattern: str = "*.safetensors") -> list[Input]:
    """Expand command-line arguments into inputs, in order, without duplicates.

    A directory contributes every file matching ``pattern`` below it (sorted), a Hugging Face
    save directory being one checkpoint; a glob contributes its matches (sorted); an argument
    that yields nothing becomes an input carrying an error, so it is reported while the rest go
    on.
    """
    from subspace_cli.checkpoint import is_hf_directory

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
            matches = find_checkpoints(path, pattern)
            if not matches:
                out.append(Input(arg, None, f"no {pattern} files under directory {arg}"))
            add(arg, matches)
        elif path.exists():
            add(arg, [path])
        elif GLOB_CHARS & set(arg):
            matches = [m for m in glob_paths(arg) if m.is_file() or is_hf_directory(m)]
            if not matches:
                out.append(Input(arg, None, f"pattern {arg} matched no files"))
            add(arg, matches)
        else:
            out.append(Input(arg, None, f"no such file or directory: {arg}"))
    return out
