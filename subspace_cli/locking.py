"""Advisory locks: one writer at a time for a spectra file or a run directory.

A lock is an ``flock`` on a small file that also holds the holder's PID, so that a refusal can
name it. The kernel drops the lock when its holder dies (kill -9 included): a lock file left
behind is never mistaken for a live writer. Readers take no lock and never block a writer.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from pathlib import Path

from subspace_cli.errors import StorageError

#: Seconds a writer to a spectra file waits for another one to finish its group. A group is
#: published in seconds; the environment variable serves tests and very slow disks.
WAIT_ENV = "SUBSPACE_LOCK_WAIT"
DEFAULT_WAIT = 120.0


class LockedError(StorageError):
    """Another live process holds the lock (exit 2, naming its PID)."""


def default_wait() -> float:
    try:
        return max(0.0, float(os.environ.get(WAIT_ENV, DEFAULT_WAIT)))
    except ValueError:
        return DEFAULT_WAIT


def holder(lock_file: Path) -> int | None:
    """The PID written by the process that holds (or last held) ``lock_file``."""
    try:
        return int(lock_file.read_text().strip() or "x")
    except (OSError, ValueError):
        return None


@contextlib.contextmanager
def exclusive(lock_file: Path, *, what: str, wait: float | None = None,
              hint: str = "") -> Iterator[None]:
    """Hold an exclusive lock on ``lock_file`` (created) for the block.

    Waits up to ``wait`` seconds (default :func:`default_wait`; 0 refuses at once) and then
    raises :class:`LockedError`: "``what`` is in use by PID N …" with ``hint`` appended. On a
    file system without ``flock`` (some network ones) the block runs unlocked, as before locks.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    wait = default_wait() if wait is None else wait
    fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        deadline = time.monotonic() + wait
        delay = 0.01
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    pid = holder(lock_file)
                    by = f"PID {pid}" if pid is not None else "another process"
                    waited = f" (waited {wait:g} s)" if wait else ""
                    raise LockedError(f"{what} is in use by {by}{waited}{hint}") from None
                time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
                delay = min(delay * 2, 0.5)
            except OSError:
                break  # no locks on this file system: go on unlocked
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)
