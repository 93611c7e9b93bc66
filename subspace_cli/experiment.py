"""From a checkpoint to a ready model, its training data and its loss."""

from __future__ import annotations

import inspect
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from subspace_cli.checkpoint import (
    Checkpoint,
    ExperimentSpec,
    SpecOverrides,
    load_state_strict,
    match_names,
    model_state,
    read_checkpoint,
    read_header,
    resolve_spec,
    tied_names,
)
from subspace_cli.data import TrainingData
from subspace_cli.errors import CheckpointError, InputError, PluginError, SubspaceError
from subspace_cli.limits import BuildLimits, data_size
from subspace_cli.plugins import resolve_factory

if TYPE_CHECKING:
    from pathlib import Path

    import torch


@dataclass
class Experiment:
    """A checkpoint with its model (weights loaded), training data and loss."""

    checkpoint: Checkpoint
    spec: ExperimentSpec
    model: torch.nn.Module
    data: TrainingData | None

    @property
    def loss(self) -> str:
        return self.spec.loss


def _call_factory(kind: str, name: str, factory: Any, config: dict[str, Any]) -> Any:
    try:
        return factory(**config)
    except (TypeError, ValueError, KeyError) as exc:
        raise PluginError(
            f'{kind} plugin "{name}" rejected config {json.dumps(config, sort_keys=True)}: {exc}'
        ) from exc
    except ImportError as exc:
        raise PluginError(f'{kind} plugin "{name}": {exc}') from exc
    except SubspaceError:
        raise
    except (Exception, SystemExit) as exc:  # the plugin's failure, never an internal error of ours
        raise PluginError(
            f'{kind} plugin "{name}" failed with config {json.dumps(config, sort_keys=True)}: '
            f"{type(exc).__name__}: {exc}"
        ) from exc


class DataCache:
    """Training sets built once per (plugin, config), shared by many checkpoints of a run."""

    def __init__(self) -> None:
        self._cache: dict[tuple[str, str], TrainingData] = {}

    def get(self, spec: ExperimentSpec, limits: BuildLimits | None = None) -> TrainingData:
        key = (spec.data, json.dumps(spec.data_config, sort_keys=True))
        if key not in self._cache:
            self._cache[key] = build_data(
                spec.data, spec.data_config, from_user=spec.data_from_user, limits=limits
            )
        return self._cache[key]


def build_data(name: str, config: dict[str, Any], *, from_user: bool,
               limits: BuildLimits | None = None) -> TrainingData:
    """Build a training set; with ``limits``, a config asking for more samples than
    ``--max-samples-build`` is refused before the factory runs."""
    factory = resolve_factory("data", name, from_user=from_user)
    size = data_size(factory, config) if limits is not None else None
    if limits is not None and size is not None and size[1] > limits.max_samples_build:
        raise InputError(
            f'data plugin "{name}": its config asks for {size[0]} = {size[1]:,} samples, more '
            f"than --max-samples-build {limits.max_samples_build:,} (raise it to build them)"
        )
    data = _call_factory("data", name, factory, config)
    if not isinstance(data, TrainingData):
        raise PluginError(
            f'data plugin "{name}" returned {type(data).__name__}, expected subspace_cli.data.TrainingData'
        )
    return data


def build_model(name: str, config: dict[str, Any], *, from_user: bool,
                limits: BuildLimits | None = None,
                against: Checkpoint | None = None,
                strip_prefix: str | None = None) -> torch.nn.Module:
    """Build a model. With ``limits`` or ``against`` (a checkpoint, e.g. its header), the
    model is first built on the ``meta`` device, which allocates nothing, and refused when it
    has more than ``--max-params`` parameters or tensors that do not match the checkpoint's."""
    import torch

    factory = resolve_factory("model", name, from_user=from_user)
    if limits is not None or against is not None:
        _check_before_building(name, factory, config, limits, against, strip_prefix)
    model = _call_factory("model", name, factory, config)
    if not isinstance(model, torch.nn.Module):
        raise PluginError(
            f'model plugin "{name}" returned {type(model).__name__}, expected torch.nn.Module'
        )
    return model


def _check_before_building(name: str, factory: Any, config: dict[str, Any],
                           limits: BuildLimits | None, against: Checkpoint | None,
                           strip_prefix: str | None = None) -> None:
    import torch

    try:
        with torch.device("meta"):
            probe = factory(**config)
    except (Exception, SystemExit):  # e.g. a factory that computes on its tensors: the real
        return  # build below runs it (and reports its failure) as before
    if not isinstance(probe, torch.nn.Module):
        return
    n_params = sum(p.numel() for p in probe.parameters())
    if limits is not None and n_params > limits.max_params:
        where = f"{against.path}: " if against is not None else ""
        raise InputError(
            f'{where}model plugin "{name}" with config {json.dumps(config, sort_keys=True)} '
            f"has {n_params:,} parameters, more than --max-params {limits.max_params:,} (what "
            "this machine's memory can analyse; raise --max-params to build it)"
        )
    if against is not None:
        match_names(model_state(probe), against, strip_prefix, tied_names(probe))


def complete_model_config(
    name: str, config: dict[str, Any], data: TrainingData, *, from_user: bool
) -> dict[str, Any]:
    """Fill the model config's data-dependent keys that the user left out.

    Only keys the factory accepts by name are filled: ``num_classes``, ``input_dim`` (features
    per sample), ``input_shape`` (shape of one sample) and ``seq_len`` (first sample dimension;
    for named inputs, the length of the first entry's rows, e.g. of ``input_ids``).
    """
    import torch

    factory = resolve_factory("model", name, from_user=from_user)
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return dict(config)
    x0, _ = data.take(torch.arange(1))
    derived: dict[str, Any] = {"num_classes": int(data.num_classes)}
    if isinstance(x0, Mapping):  # named inputs: only a sequence length is meaningful
        first = next(iter(x0.values()))
        derived["seq_len"] = int(first.shape[1]) if first.dim() > 1 else 1
    else:
        shape = list(x0.shape[1:])
        derived.update({
            "input_dim": int(x0[0].numel()),
            "input_shape": shape,
            "seq_len": int(shape[0]) if shape else 1,
        })
    out = dict(config)
    for key, value in derived.items():
        if key in params and key not in out:
            out[key] = value
    return out


def load_experiment(
    path: str | Path,
    overrides: SpecOverrides,
    *,
    data_cache: DataCache | None = None,
    need_data: bool = True,
) -> Experiment:
    """Read a checkpoint, resolve its plugins, build the model and load its weights strictly."""
    header = read_header(path)  # names and shapes: checked before any tensor is read
    spec = resolve_spec(header, overrides)
    model = build_model(spec.model, spec.model_config, from_user=spec.model_from_user,
                        limits=overrides.limits, against=header,
                        strip_prefix=overrides.strip_prefix)
    ckpt = load_state_strict(model, read_checkpoint(path), overrides.strip_prefix)
    check_finite_weights(ckpt)
    data = None
    if need_data:
        data = (data_cache or DataCache()).get(spec, overrides.limits)
    return Experiment(ckpt, spec, model, data)


def check_finite_weights(ckpt: Checkpoint) -> None:
    """Refuse a checkpoint whose floating-point tensors hold NaN or ±inf: the file is bad
    input (its training diverged before it was saved), not an overflow of ours."""
    import torch

    for name, tensor in sorted(ckpt.tensors.items()):
        if tensor.is_floating_point():
            bad = int((~torch.isfinite(tensor)).sum())
            if bad:
                raise CheckpointError(
                    f"{ckpt.path}: tensor {name} holds {bad:,} non-finite value"
                    f"{'s' if bad > 1 else ''} (NaN or ±inf) of {tensor.numel():,}: the "
                    "weights were saved after training diverged, or the file is damaged"
                )


def checkpoint_format(path: Path) -> str:
    """What kind of checkpoint ``path`` is, as ``inspect`` names it."""
    if path.is_dir():
        return "hugging face directory"
    suffix = path.suffix.lower()
    return {".safetensors": "safetensors", ".ckpt": "lightning"}.get(suffix, "torch")


def describe_checkpoint(path: Path, overrides: SpecOverrides) -> dict[str, Any]:
    """What ``inspect`` reports: the file's metadata and tensors, the plugins its metadata
    resolves to, and the parameter count of the model built from them with the weights loaded
    strictly (so that a checkpoint that describes cleanly can be analysed)."""
    from subspace_cli.checkpoint import PREFIX
    from subspace_cli.errors import CheckpointError
    from subspace_cli.plugins import GROUPS, discover

    ckpt = read_header(path)  # tensors are read (and hashed) only once they match the model
    report: dict[str, Any] = {
        "checkpoint": str(path),
        "format": checkpoint_format(path),
        "sha256": None,
        "metadata": dict(sorted(ckpt.metadata.items())),
        "n_tensors": len(ckpt.tensors),
        "n_elements": ckpt.n_elements,
    }
    try:
        spec = resolve_spec(ckpt, overrides)
    except CheckpointError as exc:
        if any(k.startswith(PREFIX) for k in ckpt.metadata) or overrides.model or overrides.data:
            raise
        spec = None
        report["note"] = f"no subspace metadata ({exc}); pass --model/--data/--loss to analyse it"
    if spec is not None:
        plugins = {}
        for kind, name, from_user in (
            ("model", spec.model, spec.model_from_user),
            ("data", spec.data, spec.data_from_user),
        ):
            resolve_factory(kind, name, from_user=from_user)  # refuses metadata module:attr
            info = discover(GROUPS[kind]).get(name)
            plugins[kind] = {
                "name": name,
                "distribution": info.distribution if info else None,
                "version": info.version if info else None,
                "entry_point": info.value if info else name,
                "source": "command line" if from_user else "checkpoint",
            }
        built = build_model(spec.model, spec.model_config, from_user=spec.model_from_user,
                            limits=overrides.limits, against=ckpt,
                            strip_prefix=overrides.strip_prefix)
        full = load_state_strict(built, read_checkpoint(path), overrides.strip_prefix)
        report["sha256"] = full.sha256()
        if full.prefix:
            report["prefix"] = full.prefix
            report["tensors_used"] = len(full.tensors)
        report.update(
            {
                "model": spec.model,
                "model_config": spec.model_config,
                "data": spec.data,
                "data_config": spec.data_config,
                "loss": spec.loss,
                "step": spec.step,
                "plugins": plugins,
                "n_params": sum(p.numel() for p in built.parameters()),
                "weights_load": True,
            }
        )
    if report["sha256"] is None:
        report["sha256"] = read_checkpoint(path).sha256()
    report["tensors"] = [
        {"name": name, "shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
        for name, t in sorted(ckpt.tensors.items())
    ]
    return report
