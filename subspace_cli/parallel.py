"""Where sums over the training set become means: the one reduction point, and data parallelism.

Every quantity averaged over the training set (loss, accuracy, gradient, Hessian-vector
products) is accumulated as a sum over the labelled units of local chunks and divided by their
count once, after :func:`reduce`.

Launched by ``torchrun`` (``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` in the environment),
:func:`init` joins the process group (gloo for CPU tensors, NCCL for CUDA
tensors on ``cuda:LOCAL_RANK``). Each rank then walks its own contiguous shard of the samples
(:func:`shard`), and :func:`reduce` all-reduces the sums and the counts before they are
divided, so the mean is weighted by samples (or tokens), however unequal the shards.
Everything else is replicated: every rank runs the same eigensolver and optimizer on the same
reduced numbers from the same seeds, rank 0 makes the one timed choice (the HVP method) and
broadcasts it, and
:func:`agree` checks that the ranks hold the same result. Only rank 0 prints and writes.

A collective that fails because another rank died or was stopped raises :class:`PeerError`
(exit 2) instead of an internal error; ``SUBSPACE_DIST_TIMEOUT`` (seconds, default 1800) bounds
how long a rank waits for the others in one collective.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from subspace_cli.errors import SubspaceError, UsageError

if TYPE_CHECKING:
    import torch

#: The environment variables of a torchrun launch.
LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
DEFAULT_TIMEOUT_S = 1800.0


class PeerError(SubspaceError):
    """Another process of a data-parallel run failed or was stopped."""


@dataclass(frozen=True)
class World:
    """This process's place in a data-parallel run (rank 0 of 1 when not launched so)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    #: In a process group (launched by torchrun; with one process too, whose reductions are
    #: then trivial: the single-GPU NCCL path).
    grouped: bool = False

    @property
    def main(self) -> bool:
        """Whether this process prints and writes (rank 0)."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.grouped


_world = World()


def world() -> World:
    """This process's :class:`World`."""
    return _world


def is_main() -> bool:
    return _world.main


def prefix() -> str:
    """What a line this process prints starts with: ``rank N: `` on a rank other than 0."""
    return "" if _world.main else f"rank {_world.rank}: "


def launch_rank() -> int:
    """The rank torchrun gave this process (0 when not launched so), before :func:`init`."""
    return _integer_variable("RANK", 0) if launched() else 0


def launched(environ: Any = None) -> bool:
    """Whether the process was started by torchrun (or another launcher setting its
    variables)."""
    environ = os.environ if environ is None else environ
    return "RANK" in environ and "WORLD_SIZE" in environ


def _integer_variable(name: str, default: int | None = None) -> int:
    text = os.environ.get(name)
    if text is None and default is not None:
        return default
    try:
        return int(str(text))
    except ValueError:
        raise UsageError(f"environment variable {name}={text!r} is not an integer (set by "
                         "torchrun for a data-parallel run)") from None


def timeout_seconds() -> float:
    text = os.environ.get("SUBSPACE_DIST_TIMEOUT")
    if text is None:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise UsageError(f"SUBSPACE_DIST_TIMEOUT={text!r} must be a positive number of seconds")
    return value


def init() -> World:
    """Join the process group of a torchrun launch (once); without one, a single process."""
    global _world
    if not launched() or _world.distributed:
        return _world
    rank, size = _integer_variable("RANK"), _integer_variable("WORLD_SIZE")
    local_rank = _integer_variable("LOCAL_RANK", rank)
    if not 0 <= rank < size:
        raise UsageError(f"RANK {rank} is not below WORLD_SIZE {size}")
    import datetime

    import torch
    import torch.distributed as dist

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
    with _collective("joining the process group"):
        dist.init_process_group("cpu:gloo,cuda:nccl" if cuda else "gloo",
                                timeout=datetime.timedelta(seconds=timeout_seconds()))
    _world = World(rank, size, local_rank, grouped=True)
    return _world


def shutdown() -> None:
    """Leave the process group (at the end of a command)."""
    global _world
    if _world.distributed:
        import torch.distributed as dist

        if dist.is_initialized():
            with contextlib.suppress(Exception):
                dist.destroy_process_group()
    _world = World()


def default_cuda_device() -> str:
    """The CUDA device of this rank: ``cuda:LOCAL_RANK`` under torchrun, else ``cuda``."""
    if not _world.distributed:
        return "cuda"
    import torch

    return f"cuda:{_world.local_rank % max(torch.cuda.device_count(), 1)}"


@contextlib.contextmanager
def _collective(what: str) -> Iterator[None]:
    """A collective whose failure (a rank that died, was stopped or timed out) is a
    :class:`PeerError`, not an internal error."""
    try:
        yield
    except RuntimeError as exc:  # torch.distributed.DistError and the backends' errors
        import re

        text = re.sub(r"\[[^\]]*:\d+\]\s*", "", str(exc).strip())  # gloo's [file.cc:553]
        first = (text.splitlines() or [type(exc).__name__])[0].split(". ")[0][:160]
        raise PeerError(
            f"rank {_world.rank} lost contact with the other processes of this data-parallel run "
            f"while {what} ({first}): another rank failed or was stopped (see its error)"
        ) from exc


def shard(n: int) -> tuple[int, int]:
    """The samples ``[start, stop)`` of ``n`` that this rank owns: contiguous shards whose
    sizes differ by at most one."""
    return n * _world.rank // _world.size, n * (_world.rank + 1) // _world.size


def check_shards(n: int) -> None:
    """Refuse a training set smaller than the number of processes (a rank would own nothing)."""
    if _world.distributed and n < _world.size:
        raise UsageError(f"{n} samples cannot be shared by {_world.size} processes: use fewer "
                         "processes (--nproc-per-node)")


def reduce(sums: torch.Tensor, count: int) -> tuple[torch.Tensor, int]:
    """The sums (in place) and unit counts of all ranks, on every rank: one all-reduce each."""
    if not _world.distributed:
        return sums, count
    import torch
    import torch.distributed as dist

    counts = torch.tensor([count], dtype=torch.int64, device=sums.device)
    with _collective("summing over the ranks"):
        dist.all_reduce(sums)
        dist.all_reduce(counts)
    return sums, int(counts.item())


def total(count: int) -> int:
    """``count`` summed over the ranks."""
    if not _world.distributed:
        return count
    import torch
    import torch.distributed as dist

    value = torch.tensor([count], dtype=torch.int64)
    with _collective("summing a count over the ranks"):
        dist.all_reduce(value)
    return int(value.item())


def any_rank(flag: bool) -> bool:
    """Whether ``flag`` holds on some rank (every rank gets the same answer)."""
    if not _world.distributed:
        return flag
    return total(int(bool(flag))) > 0


def broadcast_object(value: Any) -> Any:
    """Rank 0's ``value`` on every rank."""
    if not _world.distributed:
        return value
    import torch.distributed as dist

    box = [value if _world.main else None]
    with _collective("receiving rank 0's choice"):
        dist.broadcast_object_list(box, src=0)
    return box[0]


def agree(tensor: torch.Tensor, what: str) -> None:
    """Check that every rank holds the same ``tensor`` bit for bit (the replicated solver and
    optimizer must never diverge); raise on every rank if one differs."""
    if not _world.distributed:
        return
    import torch
    import torch.distributed as dist

    reference = tensor.detach().clone()
    with _collective(f"comparing {what} across the ranks"):
        dist.broadcast(reference, src=0)
    differs = total(int(not torch.equal(reference, tensor.detach())))
    if differs:
        from subspace_cli.errors import NumericalError

        raise NumericalError(f"the processes of this data-parallel run disagree on {what} "
                             f"({differs} of {_world.size} differ from rank 0); this is a bug")


def barrier(what: str) -> None:
    """Wait until every rank is here."""
    if not _world.distributed:
        return
    import torch.distributed as dist

    with _collective(what):
        dist.barrier()
