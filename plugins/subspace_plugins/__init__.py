"""Built-in models and datasets of ``subspace``, shipped as an ordinary plugin distribution.

They register through the ``subspace.models`` and ``subspace.data`` entry-point groups, exactly
as a third-party plugin would. Importing this package is cheap: torch and the optional dataset
libraries are imported by the factory modules, on first use.

Every factory takes JSON-style keyword arguments (the ``config`` of an experiment) and raises
:class:`ValueError` with a one-line message when the config is wrong.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

__version__ = "0.1.0"
__all__ = ["MissingDependencyError", "__version__"]

_F = TypeVar("_F", bound=Callable[..., Any])


class MissingDependencyError(ImportError):
    """An optional dependency that a factory needs is not installed."""


def _factory(func: _F) -> _F:
    """Turn bad keyword sets into a ``ValueError`` that names the allowed keys.

    Python's own ``TypeError`` ("unexpected keyword argument") does not say what *is* allowed,
    which is what someone editing a JSON config needs to know.
    """
    signature = inspect.signature(func)
    allowed = list(signature.parameters)
    required = [
        name for name, p in signature.parameters.items() if p.default is inspect.Parameter.empty
    ]

    @functools.wraps(func)
    def wrapper(*args: Any, **config: Any) -> Any:
        try:
            bound = signature.bind(*args, **config)
        except TypeError as error:
            unknown = sorted(set(config) - set(allowed))
            if unknown:
                raise ValueError(
                    f"{func.__name__}: unknown config key(s) {', '.join(unknown)}; "
                    f"allowed: {', '.join(allowed)}"
                ) from None
            given = set(config) | set(allowed[: len(args)])
            missing = [name for name in required if name not in given]
            if missing:
                raise ValueError(
                    f"{func.__name__}: missing required config key(s) {', '.join(missing)}"
                ) from None
            raise ValueError(f"{func.__name__}: {error}") from None
        return func(*bound.args, **bound.kwargs)

    return wrapper  # type: ignore[return-value]


def _integer(where: str, name: str, value: Any, minimum: int | None = None) -> int:
    # bool is an int subclass; `true` in a JSON config is a mistake, not 1.
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{where}: {name} must be an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{where}: {name} must be at least {minimum}, got {value}")
    return value


def _optional_integer(where: str, name: str, value: Any, minimum: int | None = None) -> int | None:
    return None if value is None else _integer(where, name, value, minimum)


def _integer_list(where: str, name: str, value: Any, minimum: int | None = None) -> list[int]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise ValueError(f"{where}: {name} must be a list of integers, got {value!r}")
    return [_integer(where, f"{name}[{i}]", item, minimum) for i, item in enumerate(value)]


def _choice(where: str, name: str, value: Any, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ValueError(f"{where}: {name} must be one of {', '.join(choices)}, got {value!r}")
    return str(value)


def _boolean(where: str, name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{where}: {name} must be true or false, got {value!r}")
    return value


def _string(where: str, name: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{where}: {name} must be a non-empty string, got {value!r}")
    return value
