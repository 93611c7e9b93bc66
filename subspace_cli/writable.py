"""Checks that an output can be written, made before anything is computed.

A result found unwritable only after an hour's solve is a result lost. Each command checks its
outputs first: the directory that will hold the file is probed by creating (and removing) a
file in it, which catches what permission bits cannot show (a read-only mount, root on a
read-only file system), and where the size is known the free space is compared with it.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from pathlib import Path

from subspace_cli.errors import StorageError, UsageError, refusals_reported

#: The name prefix of the file :func:`check_writable` creates and removes while probing.
PROBE_PREFIX = ".subspace-probe."


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_writable(path: str | os.PathLike[str], *, directory: bool = False) -> None:
    """Refuse (exit 2) an output file, or with ``directory`` an output directory, that cannot
    be written: a parent that is a file, no permission, a read-only file system."""
    given = Path(path)
    real = Path(os.path.realpath(given))
    if directory and real.exists() and not real.is_dir():
        raise UsageError(f"{given} exists and is not a directory")
    if not directory and real.is_dir():
        raise UsageError(f"{given} is a directory; give a file name")
    holder = _nearest_existing(real if directory else real.parent)
    if not holder.is_dir():
        raise UsageError(f"cannot write {given}: {holder} is not a directory")
    if not directory and real.exists() and not os.access(real, os.W_OK):
        raise StorageError(f"cannot write {given}: the file is read-only (chmod u+w to allow it)")
    with refusals_reported(given, "write"):
        fd, probe = tempfile.mkstemp(prefix=PROBE_PREFIX, suffix=".tmp", dir=holder)
    os.close(fd)
    os.unlink(probe)


def check_space(path: str | os.PathLike[str], need_bytes: int, *, why: str = "") -> None:
    """Refuse (exit 2) when the file system of ``path`` has less than ``need_bytes`` free;
    ``why`` is appended to the message."""
    holder = _nearest_existing(Path(os.path.realpath(path)).parent)
    try:
        free = shutil.disk_usage(holder).free
    except OSError:
        return  # cannot tell: the write itself will say
    if free < need_bytes:
        raise StorageError(
            f"cannot write {path}: no space left on device "
            f"({errno.errorcode[errno.ENOSPC]}): about {_size(need_bytes)} needed, "
            f"{_size(free)} free{why}"
        )


def _size(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"
