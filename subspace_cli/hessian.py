"""The Hessian of the full training loss as a batched linear operator.

For parameters θ (the selected ones; all others stay fixed) and a training set of N samples,

    L(θ) = (1/N) Σ_n ℓ(f(x_n; θ), y_n),        H = ∇²L(θ),

with ℓ one of :mod:`subspace_cli.losses`. :class:`HessianOperator` applies H exactly to a block
of vectors, walking the training set in chunks so that memory is bounded by one chunk's
activations (times the number of vectors). Each chunk contributes the *sum* of its per-sample
Hessian-vector products; the sums and the sample count are reduced once at the end, so chunks
are weighted by their size and the result is the full-data Hessian, not a mini-batch one.

Two exact Hessian-vector products are implemented, each for a block of m vectors at once
(batched) or one vector at a time (``-loop``):

``forward`` (forward-over-reverse)
    ``vmap`` over ``jvp(grad(loss), (θ,), (v,))`` with ``functional_call``: one forward pass
    carrying m tangents. ``forward-loop`` calls the ``jvp`` once per vector.
``reverse`` (reverse-over-reverse)
    one double-backward graph per chunk, differentiated for all m vectors at once with
    ``autograd.grad(..., is_grads_batched=True)`` (a loop with ``retain_graph`` where an op
    cannot be vmapped). ``reverse-loop`` differentiates the same graph once per vector.

All four compute the same products; they differ in speed only. Batching is not always faster:
on a CPU core ``reverse-loop`` was up to 3.3x faster than the best batched form on the sample
checkpoints (``benchmarks/hvp_methods.py``); on a GPU the batched forms may win (unmeasured).
``method="auto"`` times all four on the first product and keeps the fastest (one vector on a
CPU goes to ``reverse-loop`` without timing, and a raced choice is cached per model, device and
sizes); an op without forward AD makes it fall back to the reverse forms.

The parameters never change within an operator, so the reverse methods keep each chunk's
first-order graph (θ → ∇ℓ) for later products while it fits ``graph_memory``: a product on a
kept graph is one backward pass per vector instead of a forward pass and two backward passes.
"""

from __future__ import annotations

import fnmatch
import re
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from subspace_cli.data import TrainingData, iter_chunks, sample_count
from subspace_cli.errors import NumericalError, UsageError
from subspace_cli.losses import check_loss, correct_count, loss_sum

if TYPE_CHECKING:
    from scipy.sparse.linalg import LinearOperator

__all__ = [
    "HVP_METHODS",
    "HessianOperator",
    "ParameterLayout",
    "select_parameters",
]

#: Samples of the first chunk that the ``method="auto"`` probe warms each method up on.
_PROBE_WARMUP_SAMPLES = 32

#: The user-cache file of raced HVP-method choices (:mod:`subspace_cli.usercache`).
_METHOD_CACHE = "hvp_methods.json"

#: Accepted values of ``HessianOperator(method=...)``.
HVP_METHODS = ("auto", "forward", "reverse", "forward-loop", "reverse-loop")


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


_MISSING_DERIVATIVE = re.compile(r"derivative for '?([\w.:]+)'? is not implemented")
_MISSING_FORWARD_AD = re.compile(r"forward AD with ([\w.:]+)")


def _failing_operation(error: BaseException) -> str | None:
    """The op named by torch's "not implemented" message, or a description, or ``None``."""
    message = str(error)
    for pattern in (_MISSING_DERIVATIVE, _MISSING_FORWARD_AD):
        match = pattern.search(message)
        if match:
            return match.group(1)
    if "once_differentiable" in message:
        return "a custom autograd.Function marked @once_differentiable"
    return None


def _ad_mode(method: str) -> str:
    """``"forward"`` or ``"reverse"``: the differentiation behind an HVP method's name."""
    return method.partition("-")[0]


#: Share of the available memory that kept gradient graphs may use by default.
GRAPH_MEMORY_FRACTION = 0.25


def available_memory(device: torch.device) -> int | None:
    """Free bytes on a CUDA device, or the host's MemAvailable; None when unknown."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def default_graph_memory(device: torch.device) -> int:
    """The default budget for kept graphs: a quarter of the available memory (1 GiB if that
    cannot be read)."""
    free = available_memory(device)
    return int(GRAPH_MEMORY_FRACTION * free) if free is not None else 1 << 30


@contextmanager
def _module_mode(model: torch.nn.Module, train: bool) -> Iterator[None]:
    """Put every submodule in train or eval mode, restoring each one's own flag afterwards."""
    saved = [(module, module.training) for module in model.modules()]
    model.train(train)
    try:
        yield
    finally:
        for module, training in saved:
            module.training = training


class HessianOperator:
    """Exact Hessian of the mean training loss over the selected parameters.

    Args:
        model: The network; it is never modified (parameters, buffers and mode are restored).
        data: The training set.
        loss: ``"mse"`` or ``"ce"`` (see :mod:`subspace_cli.losses`).
        layout: Selected parameters (default: all, see :func:`select_parameters`).
        chunk_size: Samples per forward/backward pass.
        max_samples: Use only the first ``max_samples`` samples.
        device: Where parameters, data chunks and products live.
        dtype: Floating dtype of parameters, floating inputs and products.
        train_mode: Evaluate the model in train mode. Buffers are never updated either way.
            BatchNorm then normalises with the statistics of each chunk, so the Hessian depends
            on ``chunk_size``; dropout would make every product random.
        method: ``"forward"`` (forward-over-reverse), ``"reverse"`` (reverse-over-reverse),
            each batched over the vectors or, with ``-loop``, one vector at a time; or
            ``"auto"`` (see :meth:`_choose_method`: ``reverse-loop`` for one vector on a CPU,
            else a choice raced before and cached, else a race of all four on the first
            product). A raced choice is timing dependent; pass the method explicitly when
            bitwise-reproducible products matter.
        graph_memory: Bytes that the reverse methods may spend keeping each chunk's
            first-order gradient graph for later products (default
            :func:`default_graph_memory`, a quarter of the available memory; 0 rebuilds the
            graph for every product, as before). Chunks that do not fit are rebuilt.

    Attributes:
        hvp_count: Single-vector products applied so far (a product with m vectors counts m).
        probe_hvps: Extra work of the ``method="auto"`` probe, in full-HVP equivalents (every
            chunk product of the probe but the one kept, see :meth:`_choose_method`).
        method_seconds: With ``method="auto"``, the measured seconds per method on the first
            chunk (empty until measured; a method that raised or was not tried has no entry).
        probe_runs: With ``method="auto"``, the timed whole-chunk products of the probe (0
            before it ran or when it did not race; 1 when only one method could run).
        method_choice: How the method was chosen: ``"given"``, ``"one vector on a CPU"``,
            ``"cached"`` or ``"timed"`` (empty before the first product).
        graph_budget, graph_bytes, graphs_kept: The budget for kept graphs, the bytes they
            hold (autograd's saved tensors, counted once per storage, and the gradients) and
            how many chunks are kept.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        data: TrainingData,
        loss: str,
        *,
        layout: ParameterLayout | None = None,
        chunk_size: int = 1000,
        max_samples: int | None = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        train_mode: bool = False,
        method: str = "auto",
        graph_memory: int | None = None,
    ) -> None:
        self.loss = check_loss(loss)
        if method not in HVP_METHODS:
            raise UsageError(
                f"unknown HVP method {method!r}: choose one of {', '.join(HVP_METHODS)}"
            )
        if chunk_size < 1:
            raise UsageError(f"chunk size must be positive, got {chunk_size}")
        if max_samples is not None and max_samples < 1:
            raise UsageError(f"max_samples must be positive, got {max_samples}")
        if not dtype.is_floating_point:
            raise UsageError(f"dtype must be a floating-point type, got {dtype}")
        if graph_memory is not None and graph_memory < 0:
            raise UsageError(f"graph memory must be non-negative, got {graph_memory}")
        self.model = model
        self.data = data
        self.layout = layout if layout is not None else select_parameters(model)
        self.chunk_size = int(chunk_size)
        self.max_samples = max_samples
        self.device = torch.device(device)
        self.dtype = dtype
        self.train_mode = bool(train_mode)
        self.n_samples = sample_count(data, max_samples)
        if self.n_samples == 0:
            raise UsageError("the training set is empty")
        self.hvp_count = 0
        self.probe_hvps = 0.0
        self.probe_runs = 0
        self.method_seconds: dict[str, float] = {}
        self._method: str | None = None if method == "auto" else method
        self.method_choice = "given" if method != "auto" else ""
        self._batched_reverse = True
        self.graph_budget = (
            default_graph_memory(self.device) if graph_memory is None else int(graph_memory)
        )
        self.graph_bytes = 0
        self._graphs: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}
        self._uncached: set[int] = set()

        # Private copies: the model's own tensors are never handed to functional_call.
        params = dict(model.named_parameters())
        unknown = [name for name in self.layout.names if name not in params]
        if unknown:
            raise UsageError(f"the layout names parameters the model lacks: {', '.join(unknown)}")
        self._theta = self.layout.flatten(
            {name: params[name].detach().to(self.device, dtype) for name in self.layout.names}
        ).clone()
        selected = set(self.layout.names)
        self._fixed = {
            name: param.detach().to(self.device, dtype).clone()
            for name, param in params.items()
            if name not in selected
        }
        self._buffers = {
            name: buffer.detach()
            .to(self.device, dtype if buffer.is_floating_point() else None)
            .clone()
            for name, buffer in model.named_buffers()
        }

    # ------------------------------------------------------------------ public API

    @property
    def n_params(self) -> int:
        """Dimension of the operator (number of selected scalar parameters)."""
        return self.layout.n_params

    @property
    def method(self) -> str | None:
        """The HVP method in use; ``None`` while ``"auto"`` has not measured yet."""
        return self._method

    @property
    def parameters(self) -> torch.Tensor:
        """The flat vector θ at which the Hessian is taken (a copy)."""
        return self._theta.clone()

    def matmat(self, vectors: torch.Tensor) -> torch.Tensor:
        """H applied to each row of ``vectors`` ``(m, n_params)``; rows in ``dtype`` on ``device``."""
        if vectors.dim() != 2 or vectors.shape[1] != self.n_params:
            raise ValueError(
                f"expected a (m, {self.n_params}) block of vectors, got {tuple(vectors.shape)}"
            )
        vectors = vectors.to(self.device, self.dtype)
        m = vectors.shape[0]
        if m == 0:
            return torch.zeros_like(vectors)
        sums = torch.zeros_like(vectors)
        with _module_mode(self.model, self.train_mode):
            for index, (x, y) in enumerate(self._chunks()):
                sums += self._chunk_hvp(x, y, vectors, index)
        result = self._reduce(sums, self.n_samples)
        if not bool(torch.isfinite(result).all()):
            raise NumericalError(
                "a Hessian-vector product is not finite (does the loss or the model overflow?"
                " try dtype float64)"
            )
        self.hvp_count += m
        return result

    def matvec(self, vector: torch.Tensor) -> torch.Tensor:
        """H applied to one vector of shape ``(n_params,)``."""
        if vector.shape != (self.n_params,):
            raise ValueError(
                f"expected a vector of length {self.n_params}, got {tuple(vector.shape)}"
            )
        return self.matmat(vector.unsqueeze(0))[0]

    def loss_and_gradient(self) -> tuple[float, torch.Tensor, float]:
        """Mean loss, flat full-batch gradient ∇L(θ) and accuracy, in the operator's mode."""
        n = self.n_params
        # One vector [loss, correct, gradient...] so that a data-parallel reduction is one call.
        sums = torch.zeros(n + 2, device=self.device, dtype=self.dtype)
        theta = self._theta.detach().requires_grad_(True)
        with _module_mode(self.model, self.train_mode), torch.enable_grad():
            for x, y in self._chunks():
                output = self._forward(theta, x)
                chunk_loss = loss_sum(self.loss, output, y)
                (grad,) = torch.autograd.grad(chunk_loss, theta, allow_unused=True)
                sums[0] += chunk_loss.detach()
                sums[1] += correct_count(output.detach(), y)
                if grad is not None:
                    sums[2:] += grad
        mean = self._reduce(sums, self.n_samples)
        if not bool(torch.isfinite(mean).all()):
            raise NumericalError("the loss or its gradient is not finite")
        return float(mean[0]), mean[2:].clone(), float(mean[1])

    def to_scipy(self) -> LinearOperator:
        """A SciPy ``LinearOperator`` (float64 NumPy in and out) over the same products."""
        import numpy as np
        from scipy.sparse.linalg import LinearOperator

        def matmat(block: np.ndarray) -> np.ndarray:
            columns = torch.as_tensor(np.ascontiguousarray(block.T), dtype=self.dtype)
            products = self.matmat(columns.to(self.device))
            return products.to("cpu", torch.float64).numpy().T

        def matvec(vector: np.ndarray) -> np.ndarray:
            return matmat(np.asarray(vector).reshape(-1, 1)).reshape(-1)

        n = self.n_params
        return LinearOperator(
            (n, n), matvec=matvec, rmatvec=matvec, matmat=matmat, dtype=np.float64
        )

    # ------------------------------------------------------------------ machinery

    def _chunks(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return iter_chunks(self.data, self.chunk_size, self.max_samples, self.device, self.dtype)

    @staticmethod
    def _reduce(sums: torch.Tensor, count: int) -> torch.Tensor:
        """Turn per-sample sums into means.

        Everything that averages over the training set goes through here: a data-parallel mode
        only has to all-reduce ``sums`` and ``count`` across ranks before dividing.
        """
        return sums / count

    def _forward(self, theta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Model output with the selected parameters taken from the flat vector ``theta``."""
        tensors: dict[str, torch.Tensor] = dict(self._fixed)
        tensors.update(self.layout.unflatten(theta))
        # Fresh buffer clones for every call: train-mode BatchNorm updates running statistics in
        # place, and neither the model's buffers nor our copies may change.
        tensors.update({name: buffer.clone() for name, buffer in self._buffers.items()})
        output: torch.Tensor = torch.func.functional_call(self.model, tensors, (x,))
        return output

    def _chunk_loss(self, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return loss_sum(self.loss, self._forward(theta, x), y)

    @property
    def graphs_kept(self) -> int:
        """Chunks whose first-order gradient graph is kept for later products."""
        return len(self._graphs)

    def _chunk_hvp(self, x: torch.Tensor, y: torch.Tensor, vectors: torch.Tensor,
                   index: int) -> torch.Tensor:
        """Sum over the chunk's samples of the per-sample Hessian applied to each row."""
        if self._method is None:
            return self._choose_method(x, y, vectors, index)
        try:
            return self._hvp(self._method, x, y, vectors, index)
        except (RuntimeError, NotImplementedError) as error:
            raise self._differentiation_error(error, self._method) from error

    def _hvp(
        self, method: str, x: torch.Tensor, y: torch.Tensor, vectors: torch.Tensor,
        index: int | None = None,
    ) -> torch.Tensor:
        batched = not method.endswith("-loop")
        if _ad_mode(method) == "forward":
            return self._forward_hvp(x, y, vectors, batched=batched)
        return self._reverse_hvp(x, y, vectors, batched=batched, index=index)

    def _gradient_graph(self, x: torch.Tensor, y: torch.Tensor,
                        index: int | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(θ leaf, ∇ of the chunk's loss with its graph), kept per chunk within the budget.

        The parameters never change within an operator, so a chunk's graph is valid for every
        later product. The first build of chunk ``index`` measures what the graph holds (the
        tensors autograd saves, counted once per storage, plus the gradient) and keeps it when
        that fits in what is left of ``graph_budget``; otherwise the chunk is rebuilt for every
        product. ``index=None`` (the probe's warm-ups on a slice) is never kept.
        """
        if index is not None and index in self._graphs:
            return self._graphs[index]
        measure = index is not None and index not in self._uncached and self.graph_budget > 0
        theta = self._theta.detach().requires_grad_(True)
        storages: dict[int, int] = {}

        def pack(tensor: torch.Tensor) -> torch.Tensor:
            try:
                storage = tensor.untyped_storage()
                storages[storage.data_ptr()] = storage.nbytes()
            except (RuntimeError, NotImplementedError):  # no plain storage (e.g. a subclass)
                storages[id(tensor)] = tensor.numel() * tensor.element_size()
            return tensor

        hooks = (torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor)
                 if measure else nullcontext())
        with torch.enable_grad(), hooks:
            (grad,) = torch.autograd.grad(
                self._chunk_loss(theta, x, y), theta, create_graph=True, allow_unused=True
            )
        if measure:
            assert index is not None
            size = sum(storages.values()) + (grad.nbytes if grad is not None else 0)
            if self.graph_bytes + size <= self.graph_budget:
                self._graphs[index] = (theta, grad)
                self.graph_bytes += size
            else:
                self._uncached.add(index)
        return theta, grad

    def _choose_method(
        self, x: torch.Tensor, y: torch.Tensor, vectors: torch.Tensor, index: int
    ) -> torch.Tensor:
        """Pick the HVP method on the first product: without timing where the answer is known
        or was measured before, else by a race (:meth:`_race`).

        * One vector on a CPU: ``reverse-loop``. Batched and looped forms then do the same work;
          ``reverse-loop`` was as fast as or faster than ``forward-loop`` for every sample
          model on a CPU core (``benchmarks/hvp_methods.py``), and with its first-order graph
          kept (see :meth:`_gradient_graph`) it does strictly less work per product.
        * Otherwise a choice raced before for the same model class, parameter count, device,
          dtype, torch version, threads, block and chunk sizes is read from the user's cache
          (:mod:`subspace_cli.usercache`), and a new race stores its winner there.

        ``method_choice`` says which happened; a method that fails falls back to the race.
        """
        m = vectors.shape[0]
        known = "reverse-loop" if self.device.type == "cpu" and m == 1 else None
        choice = "one vector on a CPU"
        if known is None:
            from subspace_cli.usercache import read_entry

            cached = read_entry(_METHOD_CACHE, self._method_cache_key(m, x.shape[0]))
            known = cached if cached in HVP_METHODS[1:] else None
            choice = "cached"
        if known is not None:
            try:
                product = self._hvp(known, x, y, vectors, index)
            except (RuntimeError, NotImplementedError):
                pass  # e.g. no double backward for some op: race the forms that work
            else:
                self._method, self.method_choice = known, choice
                return product
        product = self._race(x, y, vectors, index)
        self.method_choice = "timed"
        from subspace_cli.usercache import write_entry

        assert self._method is not None
        write_entry(_METHOD_CACHE, self._method_cache_key(m, x.shape[0]), self._method)
        return product

    def _method_cache_key(self, m: int, chunk: int) -> str:
        device = (torch.cuda.get_device_name(self.device) if self.device.type == "cuda"
                  else f"cpu x{torch.get_num_threads()} threads")
        model = type(self.model)
        return (f"{model.__module__}.{model.__qualname__} params={self.n_params} {device}"
                f" {self.dtype} torch={torch.__version__} block={m} chunk={chunk}"
                f" mode={'train' if self.train_mode else 'eval'}")

    def _race(
        self, x: torch.Tensor, y: torch.Tensor, vectors: torch.Tensor, index: int
    ) -> torch.Tensor:
        """Time the HVP methods on the first chunk and keep the fastest.

        1. Warm-up (kernels, the ``is_grads_batched`` probe) and failure check: each method runs
           on the chunk's first ``_PROBE_WARMUP_SAMPLES`` samples and at most two vectors. A
           method that raises is out of the race; when the error names a missing derivative,
           so is the other form of its AD mode (it uses the same ops).
        2. Each method left runs once, timed, on the whole chunk and all vectors (a method that
           raises now, e.g. out of memory with m vectors, is dropped too).
        3. The two fastest, and any other within 1.5x of the best, run once more, interleaved
           so that a load spike on a shared machine hits them alike; each keeps its faster run.

        The reverse forms keep the chunk's graph when it fits the budget, so their second run
        (and the first of whichever runs after the graph was built) times the product on a kept
        graph: the cost of every later product.

        With a single vector, batched and looped forms do the same work, so only the ``-loop``
        forms race. The kept method's last result is returned; every other product (counted in
        vectors x samples) is extra work, reported in full-HVP equivalents as ``probe_hvps``.
        """
        m, chunk = vectors.shape[0], x.shape[0]
        warm = min(chunk, _PROBE_WARMUP_SAMPLES)
        names = [name for name in HVP_METHODS[1:] if m > 1 or name.endswith("-loop")]
        errors: dict[str, BaseException] = {}
        skip: set[str] = set()
        candidates: list[str] = []
        work = 0  # vectors x samples computed by the probe
        for name in names:
            mode = _ad_mode(name)
            if mode in skip:
                continue
            work += min(m, 2) * warm
            try:
                self._hvp(name, x[:warm], y[:warm], vectors[:2])
            except (RuntimeError, NotImplementedError) as error:
                errors[mode] = error
                if _failing_operation(error) is not None:
                    skip.add(mode)
            else:
                candidates.append(name)
        seconds: dict[str, float] = {}
        kept: tuple[str, torch.Tensor] | None = None  # only the leader's product is kept
        runs = 0
        for round_ in range(2):
            if round_:  # at least two candidates are left (checked below)
                ranked = sorted(candidates, key=lambda name: seconds[name])
                cutoff = 1.5 * seconds[ranked[0]]
                candidates = [n for i, n in enumerate(ranked) if i < 2 or seconds[n] <= cutoff]
            for name in list(candidates):
                self._synchronize()
                start = time.perf_counter()
                work += m * chunk
                try:
                    product = self._hvp(name, x, y, vectors, index)
                except (RuntimeError, NotImplementedError) as error:
                    errors[_ad_mode(name)] = error
                    candidates.remove(name)
                    seconds.pop(name, None)
                    continue
                self._synchronize()
                elapsed = time.perf_counter() - start
                seconds[name] = min(seconds.get(name, elapsed), elapsed)
                runs += 1
                if name == min(seconds, key=seconds.__getitem__):
                    kept = (name, product)
                del product
            if len(candidates) < 2:
                break
        if not seconds:
            error = errors.get("reverse") or next(iter(errors.values()))
            raise self._differentiation_error(error, "reverse") from error
        fastest = min(seconds, key=seconds.__getitem__)
        if kept is None or kept[0] != fastest:  # the leader failed on its second run
            work += m * chunk
            kept = (fastest, self._hvp(fastest, x, y, vectors, index))
        self.method_seconds = seconds
        self._method = fastest
        self.probe_runs = runs
        self.probe_hvps = (work - m * chunk) / self.n_samples
        return kept[1]

    def _forward_hvp(
        self, x: torch.Tensor, y: torch.Tensor, vectors: torch.Tensor, *, batched: bool
    ) -> torch.Tensor:
        grad = torch.func.grad(lambda theta: self._chunk_loss(theta, x, y))

        def hvp(vector: torch.Tensor) -> torch.Tensor:
            product: torch.Tensor = torch.func.jvp(grad, (self._theta,), (vector,))[1]
            return product

        if not batched:
            return torch.stack([hvp(vector) for vector in vectors])
        products: torch.Tensor = torch.func.vmap(hvp)(vectors)
        return products

    def _reverse_hvp(
        self, x: torch.Tensor, y: torch.Tensor, vectors: torch.Tensor, *, batched: bool,
        index: int | None = None,
    ) -> torch.Tensor:
        theta, grad = self._gradient_graph(x, y, index)
        if grad is None or not grad.requires_grad:  # the loss is at most linear in θ
            return torch.zeros_like(vectors)
        if batched and self._batched_reverse and vectors.shape[0] > 1:
            try:
                (products,) = torch.autograd.grad(
                    grad,
                    theta,
                    vectors,
                    retain_graph=True,
                    is_grads_batched=True,
                    allow_unused=True,
                    materialize_grads=True,
                )
                return products.detach()
            except (RuntimeError, NotImplementedError) as error:
                if _failing_operation(error) is not None:
                    raise
                self._batched_reverse = False  # an op that vmap cannot batch: loop instead
        rows = [
            torch.autograd.grad(
                grad, theta, vector, retain_graph=True, allow_unused=True, materialize_grads=True
            )[0]
            for vector in vectors
        ]
        return torch.stack(rows).detach()

    def _differentiation_error(self, error: BaseException, method: str) -> BaseException:
        operation = _failing_operation(error)
        if operation is None:
            return error
        forward = _ad_mode(method) == "forward"
        kind = "forward-mode AD" if forward else "twice"
        advice = " (try method 'reverse-loop' or 'reverse')" if forward else ""
        return NumericalError(
            f"cannot differentiate the model's loss {kind}: the derivative for {operation!r}"
            f" is not implemented in torch{advice}"
        )

    def _synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
