"""Training with every update projected onto the dominant subspace or the bulk.

The library layer behind ``subspace project-train``. The base optimizer (SGD, momentum,
Nesterov, Adam or SAM) computes its parameter update Δθ as usual; the update actually applied is

* ``none``: Δθ
* ``dom``:  P_k Δθ
* ``bulk``: (I − P_k) Δθ
* ``mix``:  a · P_k Δθ + b · (I − P_k) Δθ

where P_k projects onto the top-k eigenvectors of the Hessian of the full training loss at the
current parameters, kept current by :class:`~subspace_cli.tracking.SubspaceTracker` (by default
within ``subspace_tol`` of the exact subspace at every step; ``refresh="warm"`` or ``"cold"``
recompute it every ``refresh_every`` steps instead). Optimizer state stays unprojected unless
``project_state`` is set (then momentum buffers and Adam's first moment are projected too;
Adam's second moment is a per-coordinate scale, not a direction, and is left alone).

Everything that decides the trajectory (parameters, optimizer state, the data order, the
tracker's subspace and schedule) is saved with each checkpoint, so a resumed run is
bit-identical to an uninterrupted one on the CPU.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from subspace_cli import parallel
from subspace_cli.data import (
    TrainingData,
    iter_chunks,
    model_arguments,
    output_tensor,
    require_units,
    unit_count,
)
from subspace_cli.errors import NumericalError, UsageError
from subspace_cli.losses import correct_count, loss_sum
from subspace_cli.projection import MODES, alignment, project, split
from subspace_cli.settings import HVP_METHODS, check_curvature
from subspace_cli.tracking import Audit, Refresh, StepInfo, SubspaceTracker, TrackerSettings

if TYPE_CHECKING:
    import torch

    from subspace_cli.experiment import Experiment
    from subspace_cli.functional import ParameterLayout

OPTIMIZERS = ("sgd", "momentum", "nesterov", "adam", "sam")
EMA_FACTOR = 0.9


@dataclass
class TrainConfig:
    """Everything that defines a projected run (stored as ``config.json``)."""

    checkpoint: str
    mode: str = "none"
    optimizer: str = "sgd"
    lr: float = 0.01
    batch_size: int | None = 50  # None: full-batch gradient descent
    steps: int = 1000
    k: int = 10
    momentum: float = 0.9
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    rho: float = 0.05
    weight_decay: float = 0.0
    seed: int = 0
    dom_scale: float = 1.0
    bulk_scale: float = 1.0
    project_state: bool = False
    refresh: str = "track"
    refresh_every: int = 1
    subspace_tol: float = 1e-3
    guard: int = 2
    max_check_gap: int = 8
    audit_every: int = 0
    audit_tol: float | None = None
    start_step: int = 0
    start_when_aligned: float | None = None
    log_every: int = 1
    save_every: int = 100
    tol: float | None = None
    max_hvps: int | None = None
    block_size: int | None = None
    dtype: str = "float32"
    device: str = "auto"
    chunk_size: int = 1000
    hvp_method: str = "auto"
    train_mode: bool = False  # the mode of every measurement (training steps: train mode)
    allow_dropout: bool = False
    curvature: str = "hessian"  # the matrix whose top-k eigenspace is the dominant subspace

    def check(self) -> None:
        """Refuse what cannot start a run, before anything is built or written."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise UsageError(f"--{f.name.replace('_', '-')} must be a finite number, "
                                 f"got {value}")
        if self.mode not in MODES:
            raise UsageError(f"unknown mode {self.mode!r}: choose one of {', '.join(MODES)}")
        if self.optimizer not in OPTIMIZERS:
            raise UsageError(
                f"unknown optimizer {self.optimizer!r}: choose one of {', '.join(OPTIMIZERS)}"
            )
        if self.k < 0:
            raise UsageError(f"k must be non-negative, got {self.k}")
        if self.lr <= 0:
            raise UsageError(f"learning rate must be positive, got {self.lr}")
        if self.start_when_aligned is not None and not 0 < self.start_when_aligned < 1:
            raise UsageError("--start-when-aligned takes a threshold between 0 and 1")
        for name in ("steps", "refresh_every", "log_every", "save_every"):
            if getattr(self, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be at least 1")
        if self.refresh == "track" and self.refresh_every != 1:
            raise UsageError("--refresh-every sets a fixed schedule; it does not combine with "
                             "--refresh track (use --refresh warm or cold)")
        if self.audit_every < 0:
            raise UsageError("--audit-every must be non-negative (0: no audits)")
        check_curvature(self.curvature, self.batch_size)
        self.tracker_settings().check()

    def tracker_settings(self) -> TrackerSettings:
        return TrackerSettings(
            k=self.k, policy=self.refresh, every=self.refresh_every,
            subspace_tol=self.subspace_tol, guard=self.guard, max_check_gap=self.max_check_gap,
            tol=self.tol, max_hvps=self.max_hvps, block_size=self.block_size, seed=self.seed,
            audit_tol=self.audit_tol,
        )


#: The columns of a logged row measured in the analysis mode, and those of the training step.
MEASURED = ("train_loss", "train_accuracy", "chi", "sharpness", "eigenvalues", "eta_dom",
            "eta_bulk", "audit_overlap", "drift_estimate")
STEPPED = ("minibatch_loss", "chi_update", "update_dom_norm", "update_bulk_norm",
           "applied_update_norm")


def mode_record(config: TrainConfig, dependence: Any) -> dict[str, Any]:
    """Which mode each logged quantity used (stored in ``run.h5`` as ``modes``)."""
    measured = "train" if config.train_mode else "eval"
    chunked = config.train_mode and bool(dependence.batch_statistics)
    return {
        "measurements": measured, "measured": list(MEASURED),
        "training_step": "train", "stepped": list(STEPPED),
        "batch_statistics": list(dependence.batch_statistics),
        "dropout": list(dependence.dropout),
        "chunk_dependent": chunked, "chunk_size": config.chunk_size,
    }


def mode_note(config: TrainConfig, dependence: Any) -> str | None:
    """One line saying how a model whose behaviour depends on the mode is treated."""
    if not dependence:
        return None
    parts = []
    if dependence.batch_statistics:
        parts.append("BatchNorm normalises each step's batch by its statistics and moves its "
                     "running statistics once per step")
    if dependence.dropout:
        parts.append("dropout masks are drawn from --seed and the step")
    measured = "train" if config.train_mode else "eval"
    note = (f"note: training steps in train mode ({'; '.join(parts)}); the full-batch loss, "
            f"accuracy, gradient, χ and the Hessian in {measured} mode, never changing a "
            "buffer")
    if config.train_mode and dependence.batch_statistics:
        note += (f" (in train mode BatchNorm normalises each chunk of {config.chunk_size} "
                 "samples by its own statistics, so these depend on --chunk-size)")
    return note


# ---------------------------------------------------------------------------- optimizers


class FlatOptimizer:
    """The base optimizers on one flat parameter vector, returning the update Δθ.

    Conventions follow ``torch.optim``: weight decay is added to the gradient (L2); momentum
    keeps buf ← μ·buf + g and steps −η·buf (Nesterov: −η·(g + μ·buf)); Adam uses bias-corrected
    moments and −η·m̂/(√v̂ + ε). SAM's ascent step is taken by the training loop; its base
    update here is SGD's.
    """

    def __init__(self, config: TrainConfig, like: torch.Tensor) -> None:
        import torch

        self.config = config
        self.state: dict[str, torch.Tensor] = {}
        if config.optimizer in ("momentum", "nesterov"):
            self.state["momentum_buffer"] = torch.zeros_like(like)
        elif config.optimizer == "adam":
            self.state["exp_avg"] = torch.zeros_like(like)
            self.state["exp_avg_sq"] = torch.zeros_like(like)
        self.state["step"] = torch.zeros((), dtype=torch.int64)

    def update(self, theta: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        c = self.config
        if c.weight_decay:
            grad = grad + c.weight_decay * theta
        self.state["step"] += 1
        if c.optimizer in ("sgd", "sam"):
            return -c.lr * grad
        if c.optimizer in ("momentum", "nesterov"):
            buf = self.state["momentum_buffer"]
            buf.mul_(c.momentum).add_(grad)
            direction = grad + c.momentum * buf if c.optimizer == "nesterov" else buf
            return -c.lr * direction
        t = int(self.state["step"])
        m, v = self.state["exp_avg"], self.state["exp_avg_sq"]
        m.mul_(c.beta1).add_(grad, alpha=1 - c.beta1)
        v.mul_(c.beta2).addcmul_(grad, grad, value=1 - c.beta2)
        m_hat = m / (1 - c.beta1**t)
        v_hat = v / (1 - c.beta2**t)
        return -c.lr * m_hat / (v_hat.sqrt() + c.eps)

    def project_state(self, basis: torch.Tensor) -> None:
        """Project the direction-like state (momentum buffer, Adam's first moment)."""
        c = self.config
        for key in ("momentum_buffer", "exp_avg"):
            if key in self.state:
                self.state[key].copy_(
                    project(basis, self.state[key], c.mode, c.dom_scale, c.bulk_scale)
                )


# ---------------------------------------------------------------------------- gradients


def set_parameters(model: torch.nn.Module, layout: ParameterLayout, theta: torch.Tensor) -> None:
    import torch

    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in layout.unflatten(theta).items():
            params[name].copy_(value)


def loss_and_gradient(
    model: torch.nn.Module,
    layout: ParameterLayout,
    theta: torch.Tensor,
    data: TrainingData,
    loss: str,
    *,
    chunk_size: int | None,
    device: torch.device,
    dtype: torch.dtype,
    train: bool,
    update_buffers: bool = False,
    indices: torch.Tensor | None = None,
    sharded: bool = False,
) -> tuple[float, torch.Tensor, float]:
    """Mean loss, flat gradient and accuracy at ``theta`` over ``data`` (or the samples at
    ``indices``), in chunks of ``chunk_size`` (``None``: one pass over all of them); with
    ``sharded``, each rank of a data-parallel run takes its shard and the sums are reduced.

    The model runs in train mode when ``train`` (else eval), on ``theta`` through
    ``torch.func.functional_call``; its parameters are never written. Its buffers are updated
    only with ``update_buffers`` (a training step: BatchNorm's running statistics then move
    once per forward pass); otherwise every pass gets fresh copies, so a measurement never
    changes the model.
    """
    import torch

    from subspace_cli.functional import module_mode

    if indices is not None:
        data = data.subset(indices)
    selected = set(layout.names)
    fixed = {name: p.detach() for name, p in model.named_parameters() if name not in selected}
    buffers = dict(model.named_buffers())
    flat = theta.detach().requires_grad_(True)
    params = layout.unflatten(flat)
    total = torch.zeros(layout.n_params, device=device, dtype=dtype)
    loss_total, correct, count = 0.0, 0, 0
    n = len(data)
    with module_mode(model, train):
        for x, y in iter_chunks(data, chunk_size or max(n, 1), None, device, dtype,
                                sharded=sharded):
            state = {**fixed, **params, **(buffers if update_buffers else {
                name: b.clone() for name, b in buffers.items()})}
            args, kwargs = model_arguments(x)
            out = output_tensor(torch.func.functional_call(model, state, args, kwargs))
            chunk_loss = loss_sum(loss, out, y)
            (grad,) = torch.autograd.grad(chunk_loss, flat, allow_unused=True)
            if grad is not None:  # None: the loss does not depend on θ (a constant model)
                total += grad
            loss_total += float(chunk_loss.detach())
            correct += correct_count(out.detach(), y)
            count += unit_count(y)
    if sharded and parallel.world().distributed:
        stats = torch.tensor([loss_total, float(correct)], dtype=torch.float64, device=device)
        total, count = parallel.reduce(total, count)
        stats, _ = parallel.reduce(stats, 0)
        loss_total, correct = float(stats[0]), int(stats[1])
    require_units(count, "the batch")
    return loss_total / count, total / count, correct / count


# ---------------------------------------------------------------------------- data order


class BatchSampler:
    """Mini-batches in epochs: a fresh permutation from a seeded generator whenever the
    current one runs out. Its whole state is (generator state, order, cursor)."""

    def __init__(self, n: int, batch_size: int, seed: int) -> None:
        import torch

        if batch_size > n:
            raise UsageError(f"batch size {batch_size} exceeds the {n} training samples")
        self.n, self.batch_size = n, batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self.order = torch.randperm(n, generator=self.generator)
        self.cursor = 0

    def next(self) -> torch.Tensor:
        import torch

        if self.cursor + self.batch_size > self.n:
            self.order = torch.randperm(self.n, generator=self.generator)
            self.cursor = 0
        batch = self.order[self.cursor : self.cursor + self.batch_size]
        self.cursor += self.batch_size
        return batch

    def state(self) -> dict[str, torch.Tensor]:
        import torch

        return {
            "sampler.generator": self.generator.get_state(),
            "sampler.order": self.order.clone(),
            "sampler.cursor": torch.tensor(self.cursor, dtype=torch.int64),
        }

    def load(self, tensors: dict[str, torch.Tensor]) -> None:
        self.generator.set_state(tensors["sampler.generator"])
        self.order = tensors["sampler.order"].clone()
        self.cursor = int(tensors["sampler.cursor"])


# ---------------------------------------------------------------------------- the run


@dataclass
class StepLog:
    """One row of ``run.h5`` (see docs/format.md)."""

    step: int
    train_loss: float
    train_accuracy: float
    minibatch_loss: float
    chi: float
    chi_update: float
    sharpness: float
    two_over_lr: float
    update_dom_norm: float
    update_bulk_norm: float
    applied_update_norm: float
    eta_dom: float
    eta_bulk: float
    chi_ema: float
    projecting: bool
    wall_time: float
    hvps: int
    subspace_age: int
    drift_estimate: float
    audit_overlap: float
    eigenvalues_step: int
    sharpness_source: str
    eigenvalues: list[float]


RefreshLog = Refresh
AuditLog = Audit


@dataclass
class RunState:
    """Mutable state that is saved with every checkpoint."""

    step: int = 0
    projecting: bool = False
    switch_step: int = -1
    chi_ema: float = float("nan")
    wall_time: float = 0.0
    audit_seconds: float = 0.0
    tracker: dict[str, Any] = dataclasses.field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> RunState:
        data = json.loads(text)
        if "tracker" not in data:  # a run state from before the tracker (format 1.0)
            data["tracker"] = {"basis_step": data.get("basis_step", -1),
                               "hvp_method": data.get("hvp_method", ""),
                               "refresh_hvps": data.get("hvps", 0)}
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{key: value for key, value in data.items() if key in known})


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator > 0 else float("nan")


class ProjectedTraining:
    """Drives a run: steps, subspace tracking, audits, logging and checkpointing callbacks."""

    def __init__(self, config: TrainConfig, experiment: Experiment, *,
                 on_log: Callable[[StepLog], None], on_refresh: Callable[[RefreshLog], None],
                 on_save: Callable[[ProjectedTraining], None],
                 progress: Callable[[ProjectedTraining, StepLog | None], None] | None = None,
                 on_audit: Callable[[AuditLog], None] | None = None,
                 ) -> None:
        from subspace_cli.functional import (
            check_measurement_mode,
            mode_dependence,
            select_parameters,
        )
        from subspace_cli.settings import resolve_device, torch_dtype

        config.check()
        assert experiment.data is not None
        self.config = config
        self.experiment = experiment
        self.data = experiment.data
        self.device = resolve_device(config.device)
        self.dtype = torch_dtype(config.dtype)
        self.model = experiment.model.to(self.device, self.dtype)
        self.dependence = mode_dependence(self.model)
        check_measurement_mode(self.model, config.train_mode, config.allow_dropout)
        self.layout = select_parameters(self.model)
        n = self.layout.n_params
        if config.k > n:
            raise UsageError(f"k = {config.k} exceeds the model's {n} parameters")
        params = dict(self.model.named_parameters())
        self.theta = self.layout.flatten(
            {name: params[name].detach() for name in self.layout.names}).clone()
        self.optimizer = FlatOptimizer(config, self.theta)
        self.sampler = (BatchSampler(len(self.data), config.batch_size, config.seed)
                        if config.batch_size is not None else None)
        self.tracker = SubspaceTracker(
            config.tracker_settings(), self._operator, on_refresh=on_refresh, n_params=n,
            device=self.device, dtype=self.dtype, hvp_method=config.hvp_method)
        self.state = RunState()
        self.on_log, self.on_refresh, self.on_save = on_log, on_refresh, on_save
        self.on_audit = on_audit
        self.progress = progress
        self._started = time.perf_counter()
        self._base_operator: Any = None
        self._base_method = ""

    @property
    def basis(self) -> torch.Tensor:
        """The subspace in use (k orthonormal rows; none before the first refresh)."""
        return self.tracker.basis

    @property
    def eigenvalues(self) -> torch.Tensor:
        return self.tracker.eigenvalues

    @property
    def hvps(self) -> int:
        """HVPs of the run: refreshes and drift checks (audits are counted apart)."""
        return self.tracker.hvps

    # -- state -----------------------------------------------------------------------------

    def state_tensors(self) -> dict[str, torch.Tensor]:
        tensors = {f"optimizer.{k}": v.detach().cpu() for k, v in self.optimizer.state.items()}
        if self.sampler is not None:
            tensors.update(self.sampler.state())
        tensors.update(self.tracker.tensors())
        return tensors

    def run_state(self) -> RunState:
        """The run state to save, with the tracker's scalars."""
        self.state.tracker = self.tracker.state_dict()
        return self.state

    def load_state(self, tensors: dict[str, torch.Tensor], state: RunState) -> None:
        for key in list(self.optimizer.state):
            self.optimizer.state[key] = tensors[f"optimizer.{key}"].to(
                self.device, self.optimizer.state[key].dtype).clone()
        if self.sampler is not None:
            self.sampler.load(tensors)
        self.tracker.load(state.tracker, tensors)
        self.state = state
        self._started = time.perf_counter() - state.wall_time

    # -- pieces ----------------------------------------------------------------------------

    def _measure(self) -> tuple[float, torch.Tensor, float]:
        """Full-batch loss, gradient and accuracy in the analysis mode (eval, or train with
        --train-mode); buffers are never updated."""
        return loss_and_gradient(
            self.model, self.layout, self.theta, self.data, self.experiment.loss,
            chunk_size=self.config.chunk_size, device=self.device, dtype=self.dtype,
            train=self.config.train_mode, sharded=True,
        )

    def _step_gradient(self, indices: torch.Tensor | None, *, update_buffers: bool = True
                       ) -> tuple[float, torch.Tensor, float]:
        """The training step's loss and gradient on the mini-batch at ``indices`` (``None``:
        all samples), in train mode, as ordinary training computes it: a model with BatchNorm
        sees the whole batch in one pass and its running statistics move once per step;
        dropout draws masks from a generator seeded by (--seed, step), so they do not depend
        on what was measured before. In a data-parallel run the ranks share the batch, except
        for such a model: its step is the same on every rank (a shard of the batch would have
        other batch statistics, other dropout masks)."""
        import torch

        chunk = None if self.dependence.batch_statistics else self.config.chunk_size
        seeded = torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda"
                                       else [], enabled=bool(self.dependence.dropout))
        with seeded:
            if self.dependence.dropout:
                torch.manual_seed((self.config.seed * 1_000_003 + self.state.step) % 2**63)
            return loss_and_gradient(
                self.model, self.layout, self.theta, self.data, self.experiment.loss,
                chunk_size=chunk, device=self.device, dtype=self.dtype, train=True,
                update_buffers=update_buffers, indices=indices, sharded=not self.dependence,
            )

    def _operator(self, method: str) -> Any:
        """The full-data Hessian operator at the current θ (the model is not written to)."""
        from subspace_cli.settings import SpectrumSettings
        from subspace_cli.spectrum import curvature_operator

        if self._base_operator is None or self._base_method != method:
            c = self.config
            settings = SpectrumSettings(
                k=c.k, dtype=c.dtype, device=str(self.device), chunk_size=c.chunk_size,
                hvp_method=method if method in HVP_METHODS else "auto",  # other curvatures
                seed=c.seed, train_mode=c.train_mode,
                allow_dropout=c.allow_dropout, curvature=c.curvature,
                batch_size=c.batch_size,  # used by the gradient covariance alone
            )
            self._base_operator = curvature_operator(self.experiment, settings, self.theta)
            self._base_method = method
            return self._base_operator
        return self._base_operator.at(self.theta)

    def _needs_subspace(self, logging: bool) -> bool:
        c, s = self.config, self.state
        if c.k == 0 or (c.mode == "none" and not logging and c.start_when_aligned is None):
            return False
        return s.projecting or logging or c.start_when_aligned is not None or (
            c.mode != "none" and s.step >= c.start_step)

    def _update_subspace(self) -> StepInfo:
        info = self.tracker.update(self.state.step)
        c = self.config
        if c.audit_every and self.state.step % c.audit_every == 0:
            started = time.perf_counter()
            op = self._operator(self.tracker.state.hvp_method or c.hvp_method)
            audit = self.tracker.audit(self.state.step, op)
            self.state.audit_seconds += time.perf_counter() - started
            info.audit_overlap = audit.overlap
            if self.on_audit is not None:
                self.on_audit(audit)
        return info

    # -- one step --------------------------------------------------------------------------

    def step(self) -> StepLog | None:
        """θ_t → θ_{t+1}; returns the log row when step t is logged."""
        import torch

        c, s = self.config, self.state
        logging = s.step % c.log_every == 0
        info = self._update_subspace() if self._needs_subspace(logging) else None

        full_gradient = None
        full_loss = full_acc = chi = float("nan")
        if logging or c.start_when_aligned is not None or c.batch_size is None:
            full_loss, full_gradient, full_acc = self._measure()
            if not math.isfinite(full_loss):
                raise NumericalError(f"the full-batch training loss is {full_loss} at step {s.step}")
            if c.k > 0 and self.basis.shape[0]:

                chi = float(alignment(self.basis, full_gradient[None])[0])

        if c.start_when_aligned is not None and not s.projecting and math.isfinite(chi):
            s.chi_ema = chi if not math.isfinite(s.chi_ema) else (
                EMA_FACTOR * s.chi_ema + (1 - EMA_FACTOR) * chi)
            if s.chi_ema > c.start_when_aligned:
                s.projecting, s.switch_step = True, s.step
        elif c.start_when_aligned is None and not s.projecting and s.step >= c.start_step:
            s.projecting, s.switch_step = c.mode != "none", s.step if c.mode != "none" else -1
        if s.projecting and info is None and c.k > 0:
            info = self._update_subspace()

        indices = None if self.sampler is None else self.sampler.next()
        if indices is None and not self.dependence:  # the measured full-batch gradient is it
            batch_loss, grad = full_loss, full_gradient
        else:
            batch_loss, grad, _ = self._step_gradient(indices)
        assert grad is not None
        if not math.isfinite(batch_loss) or not bool(torch.isfinite(grad).all()):
            raise NumericalError(f"the training loss is {batch_loss} at step {s.step}")
        if c.optimizer == "sam":
            norm = grad.norm()
            if float(norm) > 0:
                saved = self.theta
                self.theta = saved + c.rho * grad / norm
                # the same batch and masks; the running statistics moved once already
                _, grad, _ = self._step_gradient(indices, update_buffers=False)
                self.theta = saved

        delta = self.optimizer.update(self.theta, grad)
        applied = project(self.basis, delta, c.mode, c.dom_scale, c.bulk_scale) if (
            s.projecting) else delta
        if s.projecting and c.project_state:
            self.optimizer.project_state(self.basis)

        row = None
        if logging:
            row = self._log_row(full_loss, full_acc, batch_loss, chi, full_gradient, delta,
                                applied, info)
        self.theta = self.theta + applied
        if not bool(torch.isfinite(self.theta).all()):
            raise NumericalError(f"the parameters are not finite after step {s.step}")
        s.step += 1
        s.wall_time = time.perf_counter() - self._started
        return row

    def _log_row(self, full_loss: float, full_acc: float, batch_loss: float, chi: float,
                 g: torch.Tensor | None, delta: torch.Tensor, applied: torch.Tensor,
                 info: StepInfo | None) -> StepLog:
        import torch


        c, s = self.config, self.state
        k = c.k
        values = [float(v) for v in self.eigenvalues[:k]]
        values += [float("nan")] * (k - len(values))
        have = self.basis.shape[0] > 0
        dom, bulk = split(self.basis, delta) if have else (delta * float("nan"), delta)
        eta_dom = eta_bulk = float("nan")
        if g is not None and have:
            g_dom, g_bulk = split(self.basis, g)
            d = torch.float64
            eta_dom = _ratio(-float(delta.to(d) @ g_dom.to(d)), float(g_dom.to(d).pow(2).sum()))
            eta_bulk = _ratio(-float(delta.to(d) @ g_bulk.to(d)),
                              float(g_bulk.to(d).pow(2).sum()))
        basis_step = self.tracker.state.basis_step
        if info is not None:
            sharpness, source = info.sharpness, info.sharpness_source
        else:
            sharpness, source = (values[0], "stale") if have else (float("nan"), "")
        return StepLog(
            step=s.step,
            train_loss=full_loss,
            train_accuracy=full_acc,
            minibatch_loss=batch_loss,
            chi=chi,
            chi_update=float(alignment(self.basis, delta[None])[0]) if have else float("nan"),
            sharpness=sharpness if k else float("nan"),
            two_over_lr=2.0 / c.lr,
            update_dom_norm=float(dom.norm()),
            update_bulk_norm=float(bulk.norm()),
            applied_update_norm=float(applied.norm()),
            eta_dom=eta_dom,
            eta_bulk=eta_bulk,
            chi_ema=s.chi_ema,
            projecting=s.projecting,
            wall_time=time.perf_counter() - self._started,
            hvps=self.hvps,
            subspace_age=s.step - basis_step if have else -1,
            drift_estimate=info.drift_estimate if info is not None else float("nan"),
            audit_overlap=info.audit_overlap if info is not None else float("nan"),
            eigenvalues_step=basis_step if have else -1,
            sharpness_source=source if k else "",
            eigenvalues=values,
        )

    def run(self, until: int, should_stop: Callable[[], bool] | None = None) -> None:
        """Train until ``state.step == until``, saving every ``save_every`` steps and at the end;
        when ``should_stop()`` turns true, save the step just done and return early."""
        c = self.config
        while self.state.step < until:
            row = self.step()
            if row is not None:
                self.on_log(row)
            if self.progress is not None:
                self.progress(self, row)
            stop = should_stop is not None and should_stop()
            if self.state.step % c.save_every == 0 or self.state.step == until or stop:
                set_parameters(self.model, self.layout, self.theta)
                self.on_save(self)
            if stop:
                return


def parameters_tensor_dict(training: ProjectedTraining) -> dict[str, Any]:
    """The model's state_dict at the current θ (what a checkpoint stores)."""
    set_parameters(training.model, training.layout, training.theta)
    from subspace_cli.checkpoint import model_state

    return {k: v.detach().cpu() for k, v in model_state(training.model).items()}
