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

from typing import Any

import torch

from subspace_cli import hvp, parallel
from subspace_cli.data import Inputs, TrainingData, batch_len
from subspace_cli.errors import UsageError
from subspace_cli.operator import ChunkedOperator
from subspace_cli.settings import HVP_METHODS

__all__ = ["HessianOperator", "available_memory", "default_graph_memory"]

#: The user-cache file of raced HVP-method choices (:mod:`subspace_cli.usercache`).
_METHOD_CACHE = "hvp_methods.json"

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


class HessianOperator(ChunkedOperator):
    """Exact Hessian of the mean training loss over the selected parameters.

    Takes the arguments of :class:`~subspace_cli.operator.ChunkedOperator`, and:

    Args:
        method: ``"forward"`` (forward-over-reverse), ``"reverse"`` (reverse-over-reverse),
            each batched over the vectors or, with ``-loop``, one vector at a time; or
            ``"auto"`` (see :meth:`_choose_method`: ``reverse-loop`` for one vector on a CPU,
            else a choice raced before and cached, else a race of all four on the first
            product, :func:`subspace_cli.hvp.race`). A raced choice is timing dependent; pass
            the method explicitly when bitwise-reproducible products matter.
        graph_memory: Bytes that the reverse methods may spend keeping each chunk's
            first-order gradient graph for later products (default
            :func:`default_graph_memory`, a quarter of the available memory; 0 rebuilds the
            graph for every product). Chunks that do not fit are rebuilt.

    Attributes:
        probe_hvps: Extra work of the ``method="auto"`` race, in full-HVP equivalents (every
            chunk product of the race but the one kept).
        method_seconds: With ``method="auto"``, the measured seconds per method on the first
            chunk (empty until measured; a method that raised or was not tried has no entry).
        probe_runs: With ``method="auto"``, the timed whole-chunk products of the race (0
            before it ran or when it did not race; 1 when only one method could run).
        method_choice: How the method was chosen: ``"given"``, ``"one vector on a CPU"``,
            ``"cached"`` or ``"timed"`` (empty before the first product).
        graph_budget, graph_bytes, graphs_kept: The budget for kept graphs, the bytes they
            hold (autograd's saved tensors, counted once per storage, and the gradients) and
            how many chunks are kept.
    """

    product_name = "Hessian-vector product"

    def __init__(
        self,
        model: torch.nn.Module,
        data: TrainingData,
        loss: str,
        *,
        method: str = "auto",
        graph_memory: int | None = None,
        **options: Any,
    ) -> None:
        if method not in HVP_METHODS:
            raise UsageError(
                f"unknown HVP method {method!r}: choose one of {', '.join(HVP_METHODS)}"
            )
        if graph_memory is not None and graph_memory < 0:
            raise UsageError(f"graph memory must be non-negative, got {graph_memory}")
        super().__init__(model, data, loss, **options)
        self.probe_hvps = 0.0
        self.probe_runs = 0
        self.method_seconds: dict[str, float] = {}
        self._method: str | None = None if method == "auto" else method
        self.method_choice = "given" if method != "auto" else ""
        self._reverse = hvp.ReverseState()
        self._store = hvp.GraphStore(
            default_graph_memory(self.device) if graph_memory is None else int(graph_memory)
        )

    @property
    def method(self) -> str | None:
        """The HVP method in use; ``None`` while ``"auto"`` has not measured yet."""
        return self._method

    @property
    def graph_budget(self) -> int:
        return self._store.budget

    @property
    def graph_bytes(self) -> int:
        return self._store.bytes

    @property
    def graphs_kept(self) -> int:
        """Chunks whose first-order gradient graph is kept for later products."""
        return len(self._store.graphs)

    def _moved(self) -> None:
        self._store = hvp.GraphStore(self._store.budget)
        self.probe_hvps, self.probe_runs = 0.0, 0
        self.method_seconds = dict(self.method_seconds)

    def _chunk_product(self, x: Inputs, y: torch.Tensor, vectors: torch.Tensor,
                       index: int) -> torch.Tensor:
        if self._method is None:
            if parallel.world().distributed:
                return self._rank_zero_chooses(x, y, vectors, index)
            return self._choose_method(x, y, vectors, index)
        try:
            return self._hvp(self._method, x, y, vectors, index)
        except (RuntimeError, NotImplementedError) as error:
            raise hvp.explain(error, self._method) from error

    def _hvp(self, method: str, x: Inputs, y: torch.Tensor, vectors: torch.Tensor,
             index: int | None = None) -> torch.Tensor:
        """The chunk's HVPs by ``method`` (a :func:`subspace_cli.hvp.race` product)."""
        batched = not method.endswith("-loop")

        def loss(theta: torch.Tensor) -> torch.Tensor:
            return self._chunk_loss(theta, x, y)

        if hvp.ad_mode(method) == "forward":
            return hvp.forward_hvp(loss, self._theta, vectors, batched=batched)
        theta, grad = self._store.get(loss, self._theta, index)
        return hvp.reverse_hvp(theta, grad, vectors, batched=batched, state=self._reverse)

    def _rank_zero_chooses(self, x: Inputs, y: torch.Tensor, vectors: torch.Tensor,
                           index: int) -> torch.Tensor:
        """In a data-parallel run rank 0 chooses the method on its first chunk (a race, or the
        cache) and every other rank takes its choice, so that all run the same products."""
        if parallel.is_main():
            try:
                product = self._choose_method(x, y, vectors, index)
            except BaseException:
                parallel.broadcast_object(None)
                raise
            parallel.broadcast_object(self._method)
            return product
        method = parallel.broadcast_object(None)
        if method is None:
            raise parallel.PeerError("rank 0 found no HVP method that works (see its error)")
        self._method, self.method_choice = method, "chosen by rank 0"
        return self._hvp(method, x, y, vectors, index)

    def _choose_method(
        self, x: Inputs, y: torch.Tensor, vectors: torch.Tensor, index: int
    ) -> torch.Tensor:
        """Pick the HVP method on the first product: without timing where the answer is known
        or was measured before, else by a race.

        * One vector on a CPU: ``reverse-loop``. Batched and looped forms then do the same work;
          ``reverse-loop`` was as fast as or faster than ``forward-loop`` for every sample
          model on a CPU core (``benchmarks/hvp_methods.py``), and with its first-order graph
          kept it does strictly less work per product.
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

            cached = read_entry(_METHOD_CACHE, self._method_cache_key(m, batch_len(x)))
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
        result = hvp.race(self._hvp, x, y, vectors, index, synchronize=self._synchronize)
        self._method, self.method_choice = result.method, "timed"
        self.method_seconds = result.seconds
        self.probe_runs = result.runs
        self.probe_hvps = result.work / self.n_samples
        from subspace_cli.usercache import write_entry

        write_entry(_METHOD_CACHE, self._method_cache_key(m, batch_len(x)), result.method)
        return result.product

    def _method_cache_key(self, m: int, chunk: int) -> str:
        device = (torch.cuda.get_device_name(self.device) if self.device.type == "cuda"
                  else f"cpu x{torch.get_num_threads()} threads")
        model = type(self.model)
        return (f"{model.__module__}.{model.__qualname__} params={self.n_params} {device}"
                f" {self.dtype} torch={torch.__version__} block={m} chunk={chunk}"
                f" mode={'train' if self.train_mode else 'eval'}")
