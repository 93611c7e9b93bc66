"""The parameter layout and the functional model: private copies of a model's tensors.

A :class:`ParameterLayout` says where each selected parameter lives in the flat vector θ.
A :class:`FunctionalModel` evaluates the model at any θ with ``torch.func.functional_call`` over
private copies of the fixed parameters and buffers, so nothing an analysis does ever writes to
the model (its parameters, buffers and train/eval flags are left as they were).
"""

from __future__ import annotations

import copy
import fnmatch
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from subspace_cli.data import Inputs, model_arguments, output_tensor
from subspace_cli.errors import UsageError


@dataclass(frozen=True)
class ParameterLayout:
    """Where each selected parameter lives in the flat parameter vector.

    Parameter ``names[i]`` of shape ``shapes[i]`` occupies
    ``flat[offsets[i] : offsets[i] + sizes[i]]``, in row-major order.
    """

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]

    @property
    def n_params(self) -> int:
        """Length of the flat vector."""
        return sum(self.sizes)

    @classmethod
    def from_shapes(cls, named_shapes: Sequence[tuple[str, Sequence[int]]]) -> ParameterLayout:
        """Layout of parameters concatenated in the given order."""
        names, shapes, offsets, sizes = [], [], [], []
        offset = 0
        for name, shape in named_shapes:
            size = 1
            for dim in shape:
                size *= int(dim)
            names.append(name)
            shapes.append(tuple(int(dim) for dim in shape))
            offsets.append(offset)
            sizes.append(size)
            offset += size
        return cls(tuple(names), tuple(shapes), tuple(offsets), tuple(sizes))

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Views of ``flat`` (shape ``(n_params,)``) shaped like the parameters."""
        if flat.shape != (self.n_params,):
            raise ValueError(
                f"expected a vector of length {self.n_params}, got {tuple(flat.shape)}"
            )
        return {
            name: flat[offset : offset + size].view(shape)
            for name, shape, offset, size in zip(
                self.names, self.shapes, self.offsets, self.sizes, strict=True
            )
        }

    def flatten(self, tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Concatenate the selected entries of ``tensors`` (e.g. ``dict(named_parameters())``)."""
        missing = [name for name in self.names if name not in tensors]
        if missing:
            raise KeyError(f"missing parameters: {', '.join(missing)}")
        return torch.cat([tensors[name].reshape(-1) for name in self.names])


def select_parameters(
    model: torch.nn.Module,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
) -> ParameterLayout:
    """Select parameters by ``fnmatch`` globs on their ``named_parameters()`` names.

    A parameter is selected when it matches some ``include`` glob (all parameters if ``include``
    is ``None`` or empty) and no ``exclude`` glob. ``requires_grad`` is ignored: the analysis
    differentiates a private copy.

    Raises:
        UsageError: If nothing is selected.
    """
    include = list(include or [])
    exclude = list(exclude or [])
    selected = [
        (name, tuple(param.shape))
        for name, param in model.named_parameters()
        if (not include or any(fnmatch.fnmatchcase(name, glob) for glob in include))
        and not any(fnmatch.fnmatchcase(name, glob) for glob in exclude)
    ]
    if not selected:
        available = [name for name, _ in model.named_parameters()]
        shown = ", ".join(available[:8]) + (", ..." if len(available) > 8 else "")
        raise UsageError(
            f"no parameters selected by include {include or ['*']} and exclude {exclude}"
            f" (the model's parameters: {shown or 'none'})"
        )
    return ParameterLayout.from_shapes(selected)


@dataclass(frozen=True)
class ModeDependence:
    """The modules of a model whose output depends on train/eval mode.

    ``batch_statistics``: BatchNorm (and InstanceNorm with running statistics), which in train
    mode normalise by the statistics of the batch they see and update their running ones;
    ``dropout``: dropout modules with p > 0, which in train mode draw random masks. Modules that
    call ``torch.nn.functional.dropout`` or ``batch_norm`` themselves are not seen.
    """

    batch_statistics: tuple[str, ...] = ()
    dropout: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.batch_statistics or self.dropout)


def mode_dependence(model: torch.nn.Module) -> ModeDependence:
    """Which of ``model``'s modules behave differently in train and eval mode."""
    from torch.nn.modules.batchnorm import _BatchNorm
    from torch.nn.modules.dropout import _DropoutNd
    from torch.nn.modules.instancenorm import _InstanceNorm

    statistics, dropout = [], []
    for name, module in model.named_modules():
        if isinstance(module, _BatchNorm) or (
                isinstance(module, _InstanceNorm) and module.track_running_stats):
            statistics.append(name or type(module).__name__)
        elif isinstance(module, _DropoutNd) and module.p > 0:
            dropout.append(name or type(module).__name__)
    return ModeDependence(tuple(statistics), tuple(dropout))


def check_measurement_mode(model: torch.nn.Module, train_mode: bool, allow_dropout: bool) -> None:
    """Refuse a measurement in train mode of a model with dropout, unless asked for: each
    product would draw new masks, so the "Hessian" would not be one fixed symmetric matrix."""
    dropout = mode_dependence(model).dropout if train_mode else ()
    if dropout and not allow_dropout:
        shown = ", ".join(dropout[:4]) + (", ..." if len(dropout) > 4 else "")
        raise UsageError(
            f"the model has dropout ({shown}): measured in train mode, every pass would draw "
            "new random masks and the Hessian would not be a fixed matrix; measure in eval "
            "mode (leave out --train-mode) or pass --allow-dropout"
        )


@contextmanager
def module_mode(model: torch.nn.Module, train: bool) -> Iterator[None]:
    """Put every submodule in train or eval mode, restoring each one's own flag afterwards."""
    saved = [(module, module.training) for module in model.modules()]
    model.train(train)
    try:
        yield
    finally:
        for module, training in saved:
            module.training = training


class FunctionalModel:
    """A model evaluated at a flat θ over the selected parameters, from private copies.

    Args:
        model: The network; never written to.
        layout: The selected parameters (all others are held fixed at their current values).
        device, dtype: Where and in which floating dtype the copies live.
        train_mode: Evaluate in train mode (buffers are never updated either way).
    """

    def __init__(self, model: torch.nn.Module, layout: ParameterLayout, *,
                 device: torch.device, dtype: torch.dtype, train_mode: bool) -> None:
        params = dict(model.named_parameters())
        unknown = [name for name in layout.names if name not in params]
        if unknown:
            raise UsageError(f"the layout names parameters the model lacks: {', '.join(unknown)}")
        self.model = model
        self.layout = layout
        self.device = device
        self.dtype = dtype
        self.train_mode = train_mode
        selected = set(layout.names)
        self.fixed = {
            name: param.detach().to(device, dtype).clone()
            for name, param in params.items()
            if name not in selected
        }
        self.buffers = self.model_buffers()

    def current_parameters(self) -> torch.Tensor:
        """The model's own θ (a copy on the device, in the dtype)."""
        params = dict(self.model.named_parameters())
        return self.own(self.layout.flatten({n: params[n].detach() for n in self.layout.names}))

    def own(self, theta: torch.Tensor) -> torch.Tensor:
        """A private copy of a flat θ."""
        if theta.shape != (self.layout.n_params,):
            raise ValueError(
                f"expected θ of length {self.layout.n_params}, got {tuple(theta.shape)}"
            )
        return theta.detach().to(self.device, self.dtype).clone()

    def model_buffers(self) -> dict[str, torch.Tensor]:
        """Copies of the model's current buffers (floating ones in the dtype)."""
        return {
            name: buffer.detach()
            .to(self.device, self.dtype if buffer.is_floating_point() else None)
            .clone()
            for name, buffer in self.model.named_buffers()
        }

    def refreshed(self) -> FunctionalModel:
        """The same functional model with the model's current buffers."""
        other = copy.copy(self)
        other.buffers = self.model_buffers()
        return other

    def mode(self) -> Iterator[None]:
        """The model's modules in this model's train/eval mode, restored afterwards."""
        return module_mode(self.model, self.train_mode)

    def __call__(self, theta: torch.Tensor, x: Inputs) -> torch.Tensor:
        """The model's logits at the flat ``theta`` for the inputs ``x`` (a tensor, or named
        tensors passed as keyword arguments)."""
        tensors: dict[str, torch.Tensor] = dict(self.fixed)
        tensors.update(self.layout.unflatten(theta))
        # Fresh buffer clones for every call: train-mode BatchNorm updates running statistics in
        # place, and neither the model's buffers nor our copies may change.
        tensors.update({name: buffer.clone() for name, buffer in self.buffers.items()})
        args, kwargs = model_arguments(x)
        return output_tensor(torch.func.functional_call(self.model, tensors, args, kwargs))
