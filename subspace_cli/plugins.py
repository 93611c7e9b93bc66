"""Model and data plugins: discovery through entry points, and safe resolution.

Two entry-point groups name factories:

* ``subspace.models``: ``(**config) -> torch.nn.Module``
* ``subspace.data``: ``(**config) -> TrainingData`` (the full training set)

Discovery lists entry points without importing them; a factory is imported on first use, and any
failure becomes one :class:`PluginError` naming the distribution, the entry point and the cause,
so a broken plugin breaks only the commands that use it.

A plugin can also be named as ``package.module:factory`` (uvicorn style), but only by the user on
the command line. A checkpoint's metadata is data: a ``module:attr`` found there is refused unless
the user passed that same spec, so no checkpoint can make the tool import a module.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from typing import TYPE_CHECKING, Any, Protocol

from subspace_cli.errors import PluginError, SecurityError

if TYPE_CHECKING:
    import torch

    from subspace_cli.data import TrainingData

MODEL_GROUP = "subspace.models"
DATA_GROUP = "subspace.data"
GROUPS = {"model": MODEL_GROUP, "data": DATA_GROUP}

_SPEC = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*$")


class ModelFactory(Protocol):
    """Builds a freshly initialised model from JSON-compatible keyword arguments."""

    def __call__(self, **config: Any) -> torch.nn.Module: ...


class DataFactory(Protocol):
    """Builds the full training set from JSON-compatible keyword arguments."""

    def __call__(self, **config: Any) -> TrainingData: ...


@dataclass(frozen=True)
class PluginInfo:
    """One registered plugin, known without importing it."""

    name: str
    group: str
    value: str
    distribution: str
    version: str
    entry_point: EntryPoint

    @property
    def kind(self) -> str:
        return "model" if self.group == MODEL_GROUP else "data"


def discover(group: str) -> dict[str, PluginInfo]:
    """Registered plugins of ``group`` by name, without importing any of them."""
    found: dict[str, PluginInfo] = {}
    for ep in entry_points(group=group):
        dist = ep.dist
        found.setdefault(
            ep.name,
            PluginInfo(
                name=ep.name,
                group=group,
                value=ep.value,
                distribution=dist.name if dist is not None else "?",
                version=dist.version if dist is not None else "?",
                entry_point=ep,
            ),
        )
    return dict(sorted(found.items()))


def is_import_spec(name: str) -> bool:
    """Whether ``name`` is a ``module:attr`` spec rather than a registered plugin name."""
    return ":" in name


def load_plugin(info: PluginInfo) -> Callable[..., Any]:
    """Import a registered plugin's factory, turning any failure into one PluginError."""
    try:
        factory = info.entry_point.load()
    except (Exception, SystemExit) as exc:  # a broken plugin must not crash unrelated commands
        # (SystemExit: a module that calls sys.exit at import would end the whole tool)
        raise PluginError(
            f'failed to load plugin "{info.distribution}[{info.name}]" '
            f"({info.group} = {info.value}): {type(exc).__name__}: {exc}"
        ) from exc
    if not callable(factory):
        raise PluginError(
            f'plugin "{info.distribution}[{info.name}]" ({info.value}) is not callable'
        )
    return factory  # type: ignore[no-any-return]


def import_from_spec(spec: str) -> Callable[..., Any]:
    """Resolve a user-given ``package.module:attr`` to a callable.

    Three distinct failures: a malformed spec, a module that cannot be found, and an attribute
    that is missing. A module that exists but fails on a missing *nested* dependency is reported
    as that missing dependency.
    """
    if not _SPEC.match(spec):
        raise PluginError(f'plugin spec "{spec}" must be in the form "package.module:attribute"')
    module_name, _, attr_path = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if (
            exc.name is not None
            and module_name != exc.name
            and not module_name.startswith(exc.name + ".")
        ):
            raise PluginError(
                f'module "{module_name}" (from "{spec}") needs "{exc.name}", which is not '
                f"installed: {exc}"
            ) from exc
        raise PluginError(f'could not import module "{module_name}" (from "{spec}")') from exc
    except (Exception, SystemExit) as exc:
        raise PluginError(
            f'importing "{module_name}" (from "{spec}") failed: {type(exc).__name__}: {exc}'
        ) from exc
    obj: Any = module
    for part in attr_path.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError as exc:
            raise PluginError(
                f'attribute "{attr_path}" not found in module "{module_name}"'
            ) from exc
    if not callable(obj):
        raise PluginError(f'"{spec}" is not callable')
    return obj  # type: ignore[no-any-return]


def resolve_factory(kind: str, name: str, *, from_user: bool) -> Callable[..., Any]:
    """The factory for a model or data plugin named ``name``.

    Args:
        kind: ``"model"`` or ``"data"``.
        name: A registered plugin name or a ``module:attr`` spec.
        from_user: Whether the user typed ``name`` on the command line. Names that come from a
            checkpoint's metadata resolve only through registered entry points.
    """
    group = GROUPS[kind]
    if is_import_spec(name):
        if not from_user:
            raise SecurityError(
                f'checkpoint metadata names {kind} "{name}", a module:attr spec; refusing to import '
                f"code named by a checkpoint (pass --{kind} {name} yourself if you trust it)"
            )
        return import_from_spec(name)
    plugins = discover(group)
    if name not in plugins:
        known = ", ".join(plugins) or "none installed"
        raise PluginError(f'unknown {kind} plugin "{name}" (registered in {group}: {known})')
    return load_plugin(plugins[name])
