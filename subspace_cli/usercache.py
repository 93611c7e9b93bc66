"""A small JSON cache in the user's cache directory (measured choices, never results).

The directory is ``$SUBSPACE_CACHE_DIR``, else ``$XDG_CACHE_HOME/subspace``, else
``~/.cache/subspace``. Reading tolerates a missing or damaged file (the cache is then empty);
writing is atomic (a temporary sibling renamed over the file) and silently skipped when the
directory cannot be written: a cache must never fail a computation.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["cache_dir", "read_entry", "write_entry"]


def cache_dir() -> Path:
    """Where the cache files live (not created here)."""
    explicit = os.environ.get("SUBSPACE_CACHE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "subspace"


def _read(path: Path) -> dict[str, Any]:
    try:
        with path.open(encoding="utf-8") as handle:
            data = json.load(handle)
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def read_entry(name: str, key: str) -> Any:
    """The value stored under ``key`` in cache file ``name``, or None."""
    return _read(cache_dir() / name).get(key)


def write_entry(name: str, key: str, value: Any) -> bool:
    """Store ``value`` under ``key`` in cache file ``name``; False when it could not be written."""
    directory = cache_dir()
    try:
        directory.mkdir(parents=True, exist_ok=True)
        data = _read(directory / name)
        data[key] = value
        fd, temporary = tempfile.mkstemp(prefix=f".{name}.", dir=directory)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                json.dump(data, handle, indent=1, sort_keys=True)
            os.replace(temporary, directory / name)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
    except OSError:
        return False
    return True
