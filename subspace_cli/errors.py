"""One exception hierarchy for everything the tool reports to a user.

The command layer turns a :class:`SubspaceError` into one line on stderr and its ``exit_code``;
``--traceback`` re-raises instead. Library code raises these and never calls ``sys.exit``.
"""

from __future__ import annotations

import errno
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager

#: Exit codes, documented in ``subspace --help`` and the README.
EXIT_OK = 0
EXIT_SOME_FAILED = 1
EXIT_USAGE = 2  # also a refusal by the environment (StorageError): no space, no permission
EXIT_INTERRUPTED = 130


class Interrupted(KeyboardInterrupt):
    """Stopped by a signal (SIGINT: exit 130, SIGTERM: exit 143)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.exit_code = 128 + signum


class SubspaceError(Exception):
    """Base class: a problem the user can fix, reported as one line."""

    exit_code = EXIT_USAGE


class UsageError(SubspaceError):
    """Bad options or option values."""


class InputError(SubspaceError):
    """A bad input file: unreadable, malformed, or not matching the model."""


class CheckpointError(InputError):
    """A checkpoint that cannot be loaded (format, metadata, or tensor mismatch)."""


class PluginError(SubspaceError):
    """A model or data plugin that cannot be resolved, imported or called."""


class SecurityError(PluginError):
    """A request, usually from checkpoint metadata, that would import code the user did not name."""


class NumericalError(SubspaceError):
    """A computation that produced non-finite values or cannot be differentiated."""

    exit_code = EXIT_SOME_FAILED


class StorageError(SubspaceError):
    """The environment refused a write: no space left, quota exceeded, a read-only file system
    or no permission. Not a bug; reported as one line with exit code 2."""


#: errno values that mean "the environment refused", not "the tool is wrong".
STORAGE_ERRNOS = frozenset(
    {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG}
)


def storage_errno(exc: BaseException) -> int | None:
    """The errno of an environment refusal behind ``exc``, or ``None``.

    Plain ``OSError`` carries it in ``errno``; h5py's ``OSError`` usually does too, and otherwise
    names it in HDF5's message (``errno = 28``). Explicit causes (``raise ... from``) are searched
    too, never the exceptions merely being handled, so a bug during cleanup stays a bug.
    """
    current: BaseException | None = exc
    seen: set[int] = set()
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError):
            if current.errno in STORAGE_ERRNOS:
                return int(current.errno)
            found = re.search(r"errno = (\d+)", str(current))
            if found and int(found.group(1)) in STORAGE_ERRNOS:
                return int(found.group(1))
        current = current.__cause__
    return None


def storage_error(
    exc: BaseException, path: os.PathLike[str] | str | None = None, action: str | None = None
) -> StorageError | None:
    """A one-line :class:`StorageError` for an environment refusal behind ``exc``, else ``None``.

    The line names ``path`` (default: the exception's file name) and the cause, e.g. ``cannot
    write spectra.h5: no space left on device (ENOSPC)`` when ``action`` is ``"write"``.
    """
    code = storage_errno(exc)
    if code is None:
        return None
    if path is None:
        path = getattr(exc, "filename", None)
    cause = os.strerror(code)
    cause = f"{cause[:1].lower()}{cause[1:]} ({errno.errorcode.get(code, code)})"
    if path is None:
        return StorageError(cause if action is None else f"cannot {action}: {cause}")
    where = os.fspath(path)
    return StorageError(f"{where}: {cause}" if action is None else f"cannot {action} {where}: {cause}")


@contextmanager
def refusals_reported(path: os.PathLike[str] | str, action: str, after: str = "") -> Iterator[None]:
    """Turn an environment refusal inside the block into one :class:`StorageError` line,
    ``cannot ACTION PATH: CAUSE`` and ``after`` (what survived); other errors pass."""
    try:
        yield
    except OSError as exc:
        refused = storage_error(exc, path, action)
        if refused is None:
            raise
        refused.args = (f"{refused}{after}",)
        raise refused from exc


#: What a reader of an untrusted file can raise when the file is damaged: HDF5's errors come as
#: OSError, KeyError, RuntimeError, ValueError or TypeError; decoding adds UnicodeDecodeError;
#: a size field gone wild, MemoryError or OverflowError.
DAMAGE = (OSError, KeyError, RuntimeError, ValueError, TypeError, AttributeError, IndexError,
          MemoryError, OverflowError, UnicodeDecodeError)


@contextmanager
def damage_reported(path: os.PathLike[str] | str, what: str) -> Iterator[None]:
    """Turn a failure inside the block, while reading ``path``, into one :class:`InputError`
    (``PATH: a damaged WHAT (…)``); our own errors and environment refusals pass as they are."""
    try:
        yield
    except SubspaceError:
        raise
    except DAMAGE as exc:
        refused = storage_error(exc, path, "read")
        if refused is not None:
            raise refused from exc
        detail = (str(exc).strip().splitlines() or [""])[0][:200]
        raise InputError(f"{os.fspath(path)}: a damaged {what} ({type(exc).__name__}: "
                         f"{detail})") from exc
