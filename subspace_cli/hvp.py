"""Exact Hessian-vector products of one chunk's loss, and the choice between their forms.

Four kernels compute the same products (they differ in speed only):

``forward`` / ``forward-loop``
    forward-over-reverse: ``jvp(grad(loss), (θ,), (v,))``, vmapped over the block of vectors
    or called once per vector.
``reverse`` / ``reverse-loop``
    reverse-over-reverse: one double-backward graph θ → ∇ℓ, differentiated for all vectors at
    once (``is_grads_batched``) or once per vector. :class:`GraphStore` keeps each chunk's
    graph for later products while it fits a memory budget.

:func:`race` times the forms on a chunk and keeps the fastest; :func:`explain` turns torch's
"derivative not implemented" errors into one clear message. Nothing here knows about chunks
of a training set or reductions: that is :mod:`subspace_cli.operator`'s job.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from subspace_cli.data import Inputs, batch_len, index_inputs
from subspace_cli.errors import NumericalError
from subspace_cli.settings import HVP_METHODS

#: Samples of the first chunk that :func:`race` warms each method up on.
PROBE_WARMUP_SAMPLES = 32

#: A chunk's loss as a function of the flat θ.
ChunkLoss = Callable[[torch.Tensor], torch.Tensor]

_MISSING_DERIVATIVE = re.compile(r"derivative for '?([\w.:]+)'? is not implemented")
_MISSING_FORWARD_AD = re.compile(r"forward AD with ([\w.:]+)")


def failing_operation(error: BaseException) -> str | None:
    """The op named by torch's "not implemented" message, or a description, or ``None``."""
    message = str(error)
    for pattern in (_MISSING_DERIVATIVE, _MISSING_FORWARD_AD):
        match = pattern.search(message)
        if match:
            return match.group(1)
    if "once_differentiable" in message:
        return "a custom autograd.Function marked @once_differentiable"
    return None


def ad_mode(method: str) -> str:
    """``"forward"`` or ``"reverse"``: the differentiation behind an HVP method's name."""
    return method.partition("-")[0]


def explain(error: BaseException, method: str) -> BaseException:
    """A :class:`NumericalError` naming the op that cannot be differentiated, else ``error``."""
    operation = failing_operation(error)
    if operation is None:
        return error
    forward = ad_mode(method) == "forward"
    kind = "forward-mode AD" if forward else "twice"
    advice = " (try method 'reverse-loop' or 'reverse')" if forward else ""
    return NumericalError(
        f"cannot differentiate the model's loss {kind}: the derivative for {operation!r}"
        f" is not implemented in torch{advice}"
    )


def forward_hvp(loss: ChunkLoss, theta: torch.Tensor, vectors: torch.Tensor, *,
                batched: bool) -> torch.Tensor:
    """H v for each row v of ``vectors`` by forward-over-reverse differentiation."""
    grad = torch.func.grad(loss)

    def hvp(vector: torch.Tensor) -> torch.Tensor:
        product: torch.Tensor = torch.func.jvp(grad, (theta,), (vector,))[1]
        return product

    if not batched:
        return torch.stack([hvp(vector) for vector in vectors])
    products: torch.Tensor = torch.func.vmap(hvp)(vectors)
    return products


@dataclass
class ReverseState:
    """Whether batched double backward works for this model (learned on first failure)."""

    batched: bool = True


def reverse_hvp(theta: torch.Tensor, grad: torch.Tensor | None, vectors: torch.Tensor, *,
                batched: bool, state: ReverseState) -> torch.Tensor:
    """H v for each row v of ``vectors`` by differentiating the gradient graph ``grad`` of
    the leaf ``theta`` again (the graph is retained for later products)."""
    if grad is None or not grad.requires_grad:  # the loss is at most linear in θ
        return torch.zeros_like(vectors)
    if batched and state.batched and vectors.shape[0] > 1:
        try:
            (products,) = torch.autograd.grad(
                grad, theta, vectors, retain_graph=True, is_grads_batched=True,
                allow_unused=True, materialize_grads=True,
            )
            return products.detach()
        except (RuntimeError, NotImplementedError) as error:
            if failing_operation(error) is not None:
                raise
            state.batched = False  # an op that vmap cannot batch: loop instead
    rows = [
        torch.autograd.grad(
            grad, theta, vector, retain_graph=True, allow_unused=True, materialize_grads=True
        )[0]
        for vector in vectors
    ]
    return torch.stack(rows).detach()


@dataclass
class GraphStore:
    """First-order gradient graphs (θ leaf, ∇ℓ with its graph) kept per chunk within a budget.

    The parameters never change within an operator, so a chunk's graph is valid for every
    later product. The first build of chunk ``index`` measures what the graph holds (the
    tensors autograd saves, counted once per storage, plus the gradient) and keeps it when that
    fits in what is left of ``budget``; otherwise the chunk is rebuilt for every product.
    ``index=None`` (the race's warm-ups on a slice) is never kept.
    """

    budget: int
    bytes: int = 0
    graphs: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = field(default_factory=dict)
    uncached: set[int] = field(default_factory=set)

    def get(self, loss: ChunkLoss, theta: torch.Tensor,
            index: int | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        if index is not None and index in self.graphs:
            return self.graphs[index]
        measure = index is not None and index not in self.uncached and self.budget > 0
        leaf = theta.detach().requires_grad_(True)
        with torch.enable_grad():
            (grad,) = torch.autograd.grad(loss(leaf), leaf, create_graph=True,
                                          allow_unused=True)
        if measure:
            assert index is not None
            size = graph_bytes(grad) + (grad.nbytes if grad is not None else 0)
            if self.bytes + size <= self.budget:
                self.graphs[index] = (leaf, grad)
                self.bytes += size
            else:
                self.uncached.add(index)
        return leaf, grad


def graph_bytes(root: torch.Tensor | None) -> int:
    """Bytes of the tensors that the autograd graph behind ``root`` saves, each storage once.

    Read from the graph's nodes (their ``_saved_*`` attributes), not with
    ``saved_tensors_hooks``: a pack hook that keeps the tensor it is given stores the Python
    object in the graph, and a saved output then refers back to its own node through
    ``grad_fn``, a cycle through C++ that Python's collector cannot see. Every kept graph
    leaked that way (about 170 MB a step on the ResNet-8 sample under ``project-train``).
    """
    if root is None or root.grad_fn is None:
        return 0
    storages: dict[int, int] = {}
    seen: set[int] = set()
    stack = [root.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        for name in dir(node):
            if not name.startswith("_saved_"):
                continue
            try:
                value = getattr(node, name)
            except (RuntimeError, AttributeError):  # e.g. a saved tensor already freed
                continue
            for tensor in value if isinstance(value, (tuple, list)) else (value,):
                if isinstance(tensor, torch.Tensor):
                    try:
                        storage = tensor.untyped_storage()
                        storages[storage.data_ptr()] = storage.nbytes()
                    except (RuntimeError, NotImplementedError):  # no plain storage
                        storages[id(tensor)] = tensor.numel() * tensor.element_size()
        stack.extend(next_node for next_node, _ in node.next_functions)
    return sum(storages.values())


#: ``product(method, x, y, vectors, index)``: a chunk's HVPs by one method; ``index`` is the
#: chunk's position (for kept graphs), ``None`` for a slice that must not be kept.
ChunkProduct = Callable[[str, Inputs, torch.Tensor, torch.Tensor, "int | None"],
                        torch.Tensor]


@dataclass
class RaceResult:
    """The fastest method, its product on the whole chunk, and what the race cost."""

    method: str
    product: torch.Tensor
    seconds: dict[str, float]
    runs: int
    work: int  # vectors × samples computed beyond the kept product


def race(product: ChunkProduct, x: torch.Tensor, y: torch.Tensor, vectors: torch.Tensor,
         index: int, *, synchronize: Callable[[], None] = lambda: None,
         clock: Callable[[], float] = time.perf_counter) -> RaceResult:
    """Time the HVP methods on one chunk and keep the fastest.

    1. Warm-up (kernels, the ``is_grads_batched`` probe) and failure check: each method runs
       on the chunk's first :data:`PROBE_WARMUP_SAMPLES` samples and at most two vectors. A
       method that raises is out of the race; when the error names a missing derivative, so is
       the other form of its AD mode (it uses the same ops).
    2. Each method left runs once, timed, on the whole chunk and all vectors (a method that
       raises now, e.g. out of memory with m vectors, is dropped too).
    3. The two fastest, and any other within 1.5x of the best, run once more, interleaved so
       that a load spike on a shared machine hits them alike; each keeps its faster run.

    The reverse forms keep the chunk's graph when it fits the budget, so their second run (and
    the first of whichever runs after the graph was built) times the product on a kept graph:
    the cost of every later product. With a single vector, batched and looped forms do the
    same work, so only the ``-loop`` forms race.

    Raises:
        NumericalError: (via :func:`explain`) when no method can differentiate the loss.
    """
    m, chunk = vectors.shape[0], batch_len(x)
    warm = min(chunk, PROBE_WARMUP_SAMPLES)
    names = [name for name in HVP_METHODS[1:] if m > 1 or name.endswith("-loop")]
    errors: dict[str, BaseException] = {}
    skip: set[str] = set()
    candidates: list[str] = []
    work = 0
    for name in names:
        mode = ad_mode(name)
        if mode in skip:
            continue
        work += min(m, 2) * warm
        try:
            product(name, index_inputs(x, slice(0, warm)), y[:warm], vectors[:2], None)
        except (RuntimeError, NotImplementedError) as error:
            errors[mode] = error
            if failing_operation(error) is not None:
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
            synchronize()
            start = clock()
            work += m * chunk
            try:
                result = product(name, x, y, vectors, index)
            except (RuntimeError, NotImplementedError) as error:
                errors[ad_mode(name)] = error
                candidates.remove(name)
                seconds.pop(name, None)
                continue
            synchronize()
            elapsed = clock() - start
            seconds[name] = min(seconds.get(name, elapsed), elapsed)
            runs += 1
            if name == min(seconds, key=seconds.__getitem__):
                kept = (name, result)
            del result
        if len(candidates) < 2:
            break
    if not seconds:
        error = errors.get("reverse") or next(iter(errors.values()))
        raise explain(error, "reverse") from error
    fastest = min(seconds, key=seconds.__getitem__)
    if kept is None or kept[0] != fastest:  # the leader failed on its second run
        work += m * chunk
        kept = (fastest, product(fastest, x, y, vectors, index))
    return RaceResult(fastest, kept[1], seconds, runs, work - m * chunk)
