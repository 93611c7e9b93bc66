"""Typed settings and the choices every command and library call shares.

The command layer passes these constants to click, so an option's choices and the library's
checks are one list. Device names are resolved to a ``torch.device`` once per settings object.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING

from subspace_cli.errors import UsageError

if TYPE_CHECKING:
    import torch

SOLVERS = ("lanczos", "arpack")
DTYPES = ("float32", "float64")
HVP_METHODS = ("auto", "forward", "reverse", "forward-loop", "reverse-loop")
#: ``--curvature``: the matrix whose top eigenspace is the dominant subspace
#: (:mod:`subspace_cli.hessian`, :mod:`subspace_cli.curvature`).
CURVATURES = ("hessian", "ggn", "fisher", "gradient-covariance")


def check_curvature(curvature: str, batch_size: int | None) -> None:
    """Refuse an unknown curvature, and the gradient covariance without a mini-batch size."""
    if curvature not in CURVATURES:
        raise UsageError(f"unknown curvature {curvature!r}: choose one of {', '.join(CURVATURES)}")
    if curvature == "gradient-covariance" and batch_size is None:
        raise UsageError("--curvature gradient-covariance is the covariance of the mini-batch "
                         "gradient: it needs --batch-size (and no full-batch GD)")


@dataclass(frozen=True)
class SpectrumSettings:
    """How to compute a spectrum; ``None`` means the solver's default."""

    k: int | None = None
    extra: int = 0
    tol: float | None = None
    max_hvps: int | None = None
    solver: str = "lanczos"
    block_size: int | None = None
    dtype: str = "float32"
    device: str = "auto"
    chunk_size: int = 1000
    max_samples: int | None = None
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    train_mode: bool = False
    allow_dropout: bool = False
    hvp_method: str = "auto"
    seed: int = 0
    graph_memory: int | None = None
    basis_memory: int | None = None
    curvature: str = "hessian"
    #: The mini-batch size of the gradient covariance (``--curvature gradient-covariance``).
    batch_size: int | None = None

    def __post_init__(self) -> None:
        check_curvature(self.curvature, self.batch_size)
        if self.solver not in SOLVERS:
            raise UsageError(f"unknown solver {self.solver!r}: choose one of {', '.join(SOLVERS)}")
        if self.dtype not in DTYPES:
            raise UsageError(f"unknown dtype {self.dtype!r}: choose one of {', '.join(DTYPES)}")
        if self.hvp_method not in HVP_METHODS:
            raise UsageError(f"unknown HVP method {self.hvp_method!r}: choose one of "
                             f"{', '.join(HVP_METHODS)}")

    @functools.cached_property
    def resolved_device(self) -> torch.device:
        """The device, resolved once (``auto``: CUDA when available)."""
        return resolve_device(self.device)

    @property
    def resolved_dtype(self) -> torch.dtype:
        return torch_dtype(self.dtype)


def resolve_device(name: str) -> torch.device:
    """``auto`` is CUDA when available, else CPU; an unavailable CUDA device is a usage error.
    In a data-parallel run ``auto`` and ``cuda`` mean this rank's ``cuda:LOCAL_RANK``."""
    import torch

    from subspace_cli import parallel

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        name = parallel.default_cuda_device()
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise UsageError(f"unknown device {name!r}: use auto, cpu, cuda or cuda:N") from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"device {name} requested but CUDA is not available")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(
                f"device {name} requested but only {torch.cuda.device_count()} CUDA devices exist"
            )
    elif device.type != "cpu":
        raise UsageError(f"unsupported device {name!r}: use auto, cpu, cuda or cuda:N")
    return device


def torch_dtype(name: str) -> torch.dtype:
    import torch

    if name not in DTYPES:
        raise UsageError(f"unknown dtype {name!r}: choose one of {', '.join(DTYPES)}")
    return torch.float64 if name == "float64" else torch.float32
