"""One exception hierarchy for everything the tool reports to a user.

The command layer turns a :class:`SubspaceError` into one line on stderr and its ``exit_code``;
``--traceback`` re-raises instead. Library code raises these and never calls ``sys.exit``.
"""

from __future__ import annotations

#: Exit codes, documented in ``subspace --help`` and the README.
EXIT_OK = 0
EXIT_SOME_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


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
