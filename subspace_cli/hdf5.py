"""Reading HDF5 files that may be damaged or crafted, with libhdf5 kept on a leash.

A reader of ours checks everything it reads, but a few bytes changed in a B-tree, heap or
attribute record can make libhdf5 itself loop forever, take gigabytes, or crash the process,
inside one call into C where no check of ours runs (found by ``tests/test_fuzz.py``; on some
damaged files libhdf5 even reads uninitialised memory, so two reads of the same bytes can
differ). So a reader decorated with :func:`isolated` runs only in a forked child, with a
deadline and a bound on its address space, and its result comes back through a pipe:

- a result is sent as JSON with the bytes of its NumPy arrays beside it (never a pickle), and
  only plain values, arrays, and dataclasses registered with :func:`transferable` travel;
- an error of ours (:class:`~subspace_cli.errors.SubspaceError`) is raised here with its class
  and message;
- a child that hangs, crashes or runs out of memory is one :class:`InputError` line,
  ``PATH: a damaged run file (reading it crashed the HDF5 library: SIGSEGV)``;
- any other exception is a bug of ours: :class:`ReaderBug` (exit 3) with the child's traceback.

The cost is a ``fork`` (a few milliseconds) and a copy of the result through the pipe. Where
there is no ``fork`` (Windows), readers run directly.

Bounds, per call (``extent``: the bytes the reader may touch, e.g. a spectra file and its
group files):

- time: ``SUBSPACE_READ_TIMEOUT`` seconds (default 60) plus one second per 20 MB;
- memory: the child's address space may grow by 256 MiB plus 16 times the extent (the rule of
  :func:`read_dataset`: no dataset of a file can legitimately hold more).
"""

from __future__ import annotations

import dataclasses
import faulthandler
import functools
import json
import os
import resource
import select
import signal
import struct
import time
import traceback
from collections.abc import Callable
from pathlib import Path, PurePath
from typing import Any, TypeVar

import numpy as np

from subspace_cli.errors import InputError, SubspaceError, damage_reported

TIMEOUT_ENV = "SUBSPACE_READ_TIMEOUT"
DEFAULT_TIMEOUT = 60.0
BYTES_PER_SECOND = 20e6
MEMORY_BASE = 256 << 20
MEMORY_PER_BYTE = 16

#: Signals that mean the child crashed (rather than was stopped from outside).
_CRASHES = frozenset({signal.SIGSEGV, signal.SIGBUS, signal.SIGABRT, signal.SIGFPE,
                      signal.SIGILL})
_HEADER = struct.Struct("<Q")  # the length of the JSON part of an answer

F = TypeVar("F", bound=Callable[..., Any])
T = TypeVar("T", bound=type)

_in_child = False  # inside a watchdog child: nested readers run directly
_TRANSFERABLE: dict[str, type] = {}


class ReaderBug(RuntimeError):
    """A reader raised an exception that is not one of ours: a bug (exit 3), with the
    traceback it had in the watchdog child."""


def transferable(cls: T) -> T:
    """Register a dataclass as a result a reader may return from its watchdog child."""
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls.__name__} is not a dataclass")
    _TRANSFERABLE[cls.__name__] = cls
    return cls


def read_dataset(dataset: Any) -> Any:
    """All of an HDF5 dataset, refused (:class:`InputError`) when its header claims more bytes
    than its file could hold: a damaged size field would otherwise have HDF5 fill terabytes."""
    path = dataset.file.filename
    size = os.path.getsize(path)
    claimed = int(dataset.size) * max(1, int(dataset.dtype.itemsize))
    if claimed > MEMORY_PER_BYTE * size + (1 << 20):
        raise InputError(f"{path}: a damaged file (dataset {dataset.name} claims "
                         f"{claimed:,} bytes in a file of {size:,})")
    import h5py

    if h5py.check_string_dtype(dataset.dtype) is not None:
        return dataset.asstr()[()]  # an object array of str
    return dataset[()]


def file_size(path: Path) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


def timeout(extent: int) -> float:
    try:
        base = max(0.1, float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT)))
    except ValueError:
        base = DEFAULT_TIMEOUT
    return base + extent / BYTES_PER_SECOND


def memory_budget(extent: int) -> int:
    return MEMORY_BASE + MEMORY_PER_BYTE * extent


def isolated(what: str, extent: Callable[[Path], int] = file_size) -> Callable[[F], F]:
    """Decorate a reader whose first argument is the path of the ``what`` (e.g. "run file") it
    reads: it runs in a watchdog child (see the module's docstring)."""

    def decorate(reader: F) -> F:
        @functools.wraps(reader)
        def guarded(path: Any, *args: Any, **kwargs: Any) -> Any:
            p = Path(path)
            if _in_child or not hasattr(os, "fork") or not p.exists():
                return reader(path, *args, **kwargs)
            return _in_watchdog(p, what, extent(p), lambda: reader(path, *args, **kwargs))

        return guarded  # type: ignore[return-value]

    return decorate


@isolated("HDF5 file")
def walk(path: Path) -> None:
    """Read every attribute and dataset of the HDF5 file ``path`` in a watchdog child: a check
    of a file before HDF5 copies from it or appends to it in this process."""
    import h5py

    with damage_reported(path, "HDF5 file"), h5py.File(path, "r", locking=False) as f:
        read_all(f)


def read_all(f: Any) -> None:
    """Read (and drop) every attribute and dataset of the open HDF5 file ``f``."""
    import h5py

    def visit(_name: str, item: Any) -> None:
        dict(item.attrs.items())
        if isinstance(item, h5py.Dataset):
            read_dataset(item)

    dict(f.attrs.items())
    f.visititems(visit)


# ------------------------------------------------------------------------------ the watchdog


def _in_watchdog(path: Path, what: str, extent: int, call: Callable[[], Any]) -> Any:
    """``call()`` run in a forked child: its result, or its error raised here; an
    :class:`InputError` if it hung, crashed or ran out of memory."""
    deadline_s = timeout(extent)
    budget = memory_budget(extent)
    read_end, write_end = os.pipe()
    try:
        pid = os.fork()
    except OSError as exc:  # no memory or no process slot left: the environment's refusal
        os.close(read_end)
        os.close(write_end)
        raise SubspaceError(f"cannot read {path}: no process could be started to read it "
                            f"({exc.strerror})") from exc
    if pid == 0:  # the child: never returns
        os.close(read_end)
        _child(write_end, call, budget)
    os.close(write_end)
    answer = bytearray()
    finished = reaped = False
    try:
        deadline = time.monotonic() + deadline_s
        while not finished and (left := deadline - time.monotonic()) > 0:
            ready, _, _ = select.select([read_end], [], [], left)
            if ready:
                chunk = os.read(read_end, 1 << 20)
                answer += chunk
                finished = not chunk  # end of file: the child wrote its answer or died
        if not finished:
            os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        reaped = True
    finally:
        os.close(read_end)
        if not reaped:  # interrupted while waiting: the child must not outlive us
            _kill_quietly(pid)
    damaged = f"{path}: a damaged {what}"
    if not finished:
        raise InputError(f"{damaged} (reading it did not finish in {deadline_s:.3g} s; set "
                         f"{TIMEOUT_ENV} to allow longer)")
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = f"signal {sig}"
        if sig in _CRASHES:
            raise InputError(f"{damaged} (reading it crashed the HDF5 library: {name})")
        if sig == signal.SIGKILL:  # the kernel's out-of-memory killer
            raise InputError(f"{damaged} (reading it was killed by SIGKILL, most likely for "
                             "using too much memory)")
        raise InputError(f"reading {path} was stopped by {name}")
    if len(answer) < _HEADER.size or os.WEXITSTATUS(status) != 0:
        raise InputError(f"{damaged} (its reader exited with status {os.WEXITSTATUS(status)} "
                         "and no answer)")
    try:
        return _answer(answer, budget, damaged, path)
    except (ValueError, KeyError, TypeError, IndexError, StopIteration) as exc:
        raise InputError(f"{damaged} (its reader's answer was unreadable: {exc})") from exc


def _answer(answer: bytearray, budget: int, damaged: str, path: Path) -> Any:
    """The result in a child's answer, or the error it reports, raised."""
    (length,) = _HEADER.unpack_from(answer)
    message = json.loads(bytes(answer[_HEADER.size:_HEADER.size + length]))
    outcome = message["outcome"]
    if outcome == "memory":
        raise InputError(f"{damaged} (reading it needs more than {budget >> 20} MiB of memory)")
    if outcome == "error":
        raise _error(message["type"], message["message"])
    if outcome == "bug":
        raise ReaderBug(f"reading {path} failed in the watchdog child:\n{message['traceback']}")
    body = memoryview(answer)[_HEADER.size + length:]
    buffers, start = [], 0
    for size in message["buffers"]:
        buffers.append(body[start:start + size])
        start += size + _padding(size)
    return _decode(message["result"], buffers)


def _padding(size: int) -> int:
    """Bytes after a part of an answer so that the next one starts 64-byte aligned (arrays are
    used in place, in the bytearray that received them)."""
    return -size % 64


def _child(write_end: int, call: Callable[[], Any], budget: int) -> None:
    global _in_child
    status = 0
    try:
        _in_child = True
        faulthandler.disable()  # a crash here is reported by the parent, as one line
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
        for sig in (signal.SIGTERM, signal.SIGALRM):
            signal.signal(sig, signal.SIG_DFL)
        _limit_address_space(budget)
        buffers: list[memoryview] = []
        try:
            message: dict[str, Any] = {"outcome": "ok", "result": _encode(call(), buffers)}
        except MemoryError:
            message, buffers = {"outcome": "memory"}, []
        except SubspaceError as exc:
            message, buffers = {"outcome": "error", "type": type(exc).__name__,
                                "message": str(exc)}, []
        except BaseException:  # a bug of ours: the parent raises ReaderBug with this traceback
            message, buffers = {"outcome": "bug", "traceback": traceback.format_exc()}, []
        message["buffers"] = [b.nbytes for b in buffers]
        text = json.dumps(message).encode()
        text += b" " * _padding(_HEADER.size + len(text))
        for part in (_HEADER.pack(len(text)) + text, *buffers):
            for view in (memoryview(part).cast("B"), memoryview(bytes(_padding(len(part))))):
                while view:
                    view = view[os.write(write_end, view):]
    except BaseException:
        status = 70
    finally:
        os._exit(status)  # no atexit handlers, no flushing of the parent's buffers or files


def _limit_address_space(budget: int) -> None:
    try:
        with open("/proc/self/status") as f:
            size = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
    except (OSError, StopIteration, ValueError):
        return  # no /proc: time is still bounded
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = size + budget
    if soft != resource.RLIM_INFINITY:
        limit = min(limit, soft)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))


def _error(name: str, message: str) -> SubspaceError:
    """Our error class ``name`` (any subclass of SubspaceError) with ``message``."""
    classes: list[type[SubspaceError]] = [SubspaceError]
    found: type[SubspaceError] = InputError
    while classes:
        cls = classes.pop()
        if cls.__name__ == name:
            found = cls
            break
        classes.extend(cls.__subclasses__())
    exc = found.__new__(found, message)
    exc.args = (message,)
    return exc


def _kill_quietly(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    except OSError:
        pass


# ------------------------------------------------------------------------- results as data


def _encode(value: Any, buffers: list[memoryview]) -> Any:
    """``value`` as JSON-able data; the bytes of its arrays are appended to ``buffers``. Every
    JSON object in the result is one of these tagged forms, so no value can pose as one."""
    if value is None or isinstance(value, (bool, int, str)) and not isinstance(value, np.generic):
        return value
    if isinstance(value, float) and not isinstance(value, np.generic):
        return {"~": "float", "value": repr(value)}  # NaN and infinities included
    if isinstance(value, (np.generic, np.ndarray)):
        array = np.asarray(value)
        if array.dtype.kind == "O":
            items = array.ravel().tolist()
            if not all(isinstance(item, str) for item in items):
                raise TypeError("an object array that does not hold only strings")
            return {"~": "strings", "shape": list(array.shape), "items": items}
        if array.dtype.hasobject:
            raise TypeError(f"an array of dtype {array.dtype} cannot leave the watchdog child")
        buffers.append(memoryview(np.ascontiguousarray(array).reshape(-1).view(np.uint8)))
        return {"~": "array", "dtype": np.lib.format.dtype_to_descr(array.dtype),
                "shape": list(array.shape), "scalar": isinstance(value, np.generic)}
    if isinstance(value, bytes):
        buffers.append(memoryview(value))
        return {"~": "bytes"}
    if isinstance(value, (list, tuple)):
        items = [_encode(item, buffers) for item in value]
        return items if isinstance(value, list) else {"~": "tuple", "items": items}
    if isinstance(value, dict):
        return {"~": "dict", "items": [[_encode(k, buffers), _encode(v, buffers)]
                                        for k, v in value.items()]}
    if isinstance(value, PurePath):
        return {"~": "path", "value": str(value)}
    name = type(value).__name__
    if _TRANSFERABLE.get(name) is type(value):
        return {"~": "dataclass", "name": name,
                "fields": {f.name: _encode(getattr(value, f.name), buffers)
                           for f in dataclasses.fields(value)}}
    raise TypeError(f"a {name} cannot leave the watchdog child")


def _decode(data: Any, buffers: list[memoryview]) -> Any:
    """The inverse of :func:`_encode`; arrays are writable views of the received bytes."""
    position = iter(range(len(buffers)))

    def decode(item: Any) -> Any:
        if isinstance(item, list):
            return [decode(x) for x in item]
        if not isinstance(item, dict):
            return item
        tag = item["~"]
        if tag == "float":
            return float(item["value"])
        if tag == "strings":
            return np.array(item["items"], dtype=object).reshape(item["shape"])
        if tag == "array":
            raw = buffers[next(position)]
            dtype = np.lib.format.descr_to_dtype(_descr(item["dtype"]))
            array = np.frombuffer(raw, dtype=dtype).reshape(item["shape"])
            return array[()] if item["scalar"] else array
        if tag == "bytes":
            return bytes(buffers[next(position)])
        if tag == "tuple":
            return tuple(decode(x) for x in item["items"])
        if tag == "dict":
            return {decode(k): decode(v) for k, v in item["items"]}
        if tag == "path":
            return Path(item["value"])
        if tag == "dataclass":
            return _TRANSFERABLE[item["name"]](**{k: decode(v) for k, v in item["fields"].items()})
        raise ValueError(f"unknown tag {tag!r} in a watchdog answer")

    return decode(data)


def _descr(data: Any) -> Any:
    """A dtype description (``numpy.lib.format.dtype_to_descr``) back from JSON, which turned
    its tuples into lists: a string, or fields ``(name, description[, shape])``."""
    if isinstance(data, str):
        return data
    fields = []
    for name, description, *shape in data:
        fields.append((tuple(name) if isinstance(name, list) else name, _descr(description),
                       *(tuple(s) for s in shape)))
    return fields
