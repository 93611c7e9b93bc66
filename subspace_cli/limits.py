"""Bounds on what a checkpoint's metadata may make the tool build.

A checkpoint's model and data configs are untrusted input: a config with huge widths would
allocate tens of GB, one with ``n_train`` 1e12 would generate data for days. Before anything
is built, the model is built on PyTorch's ``meta`` device (shapes only, no memory) and its
parameter count is checked against ``--max-params``; a data config's sample count
(``n_train``, ``n_samples`` or ``num_samples``, or the keys a data factory names in its
``size_keys`` attribute) is checked against ``--max-samples-build``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

#: Keys of a data config that give the number of samples to build.
SIZE_KEYS = ("n_train", "n_samples", "num_samples")
#: Samples a data plugin may be asked to build by default (a few GB for typical inputs).
DEFAULT_MAX_SAMPLES_BUILD = 10_000_000
#: Bytes per parameter that an analysis holds at least: weights, gradient and two work vectors
#: in float32.
BYTES_PER_PARAMETER = 16


def physical_memory() -> int | None:
    try:
        return int(os.sysconf("SC_PHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):  # pragma: no cover - not POSIX
        return None


def default_max_params() -> int:
    """The most parameters this machine's memory can analyse (memory / 16 bytes)."""
    memory = physical_memory()
    return 2_000_000_000 if memory is None else max(1, memory // BYTES_PER_PARAMETER)


@dataclass(frozen=True)
class BuildLimits:
    """``--max-params`` and ``--max-samples-build``."""

    max_params: int = field(default_factory=default_max_params)
    max_samples_build: int = DEFAULT_MAX_SAMPLES_BUILD


def data_size(factory: Any, config: dict[str, Any]) -> tuple[str, int] | None:
    """The largest integer sample count that ``config`` asks ``factory`` for, with its key."""
    keys = tuple(getattr(factory, "size_keys", ())) + SIZE_KEYS
    sizes = [(key, config[key]) for key in keys
             if isinstance(config.get(key), (int, float)) and not isinstance(config[key], bool)]
    if not sizes:
        return None
    key, value = max(sizes, key=lambda item: item[1])
    return key, int(value) if value == value and abs(value) != float("inf") else 2**63
