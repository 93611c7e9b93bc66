"""The run file ``RUN_DIR/run.h5`` of ``project-train`` (specified in docs/format.md).

Three tables: ``log`` (one row per logged step), ``refresh`` (one row per recomputation of the
subspace) and ``audit`` (one row per audit against a cold tight solve).

Rows are appended to resizable datasets and the file is closed (flushed) after every append.
At each checkpoint a copy is published atomically as ``run.h5.bak``, so a run killed in the
middle of an append is resumed from an intact log. On resume, rows at or after the resumed
step are cut, so no row is ever duplicated.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import numpy as np

from subspace_cli.checkpoint import publish, temporary_sibling
from subspace_cli.errors import InputError, damage_reported
from subspace_cli.hdf5 import isolated, read_all, read_dataset
from subspace_cli.projected import AuditLog, RefreshLog, StepLog
from subspace_cli.writable import check_space

FORMAT_NAME = "subspace-run"
FORMAT_VERSION = "1.1"
#: Free bytes an append insists on (HDF5 grows a file by chunks of a few kB per table).
APPEND_RESERVE = 1 << 20
LOG = "log"
REFRESH = "refresh"
AUDIT = "audit"
TABLES = ((LOG, StepLog), (REFRESH, RefreshLog), (AUDIT, AuditLog))
#: What a column added in a later minor version holds for rows written before it existed.
_FILL = {"int": -1, "bool": False, "str": "", "float": np.nan}


def _kind(field: Any) -> str:
    """``vector`` (k values per row), ``int``, ``bool``, ``str`` or ``float``."""
    name = str(field.type)
    return "vector" if name.startswith("list") else name if name in _FILL else "float"


def _ensure_layout(f: Any, k: int) -> None:
    """Create every table and column that is missing (all of them in a new file; the columns
    of later minor versions in an older one, filled with NaN, -1, "" or False)."""
    import h5py

    for group_name, cls in TABLES:
        group = f.require_group(group_name)
        n = group["step"].shape[0] if "step" in group else 0
        for field in fields(cls):
            if field.name in group:
                continue
            kind = _kind(field)
            if kind == "vector":
                # k = 0 (no subspace) needs an unlimited width for a valid chunk shape
                group.create_dataset(field.name, shape=(n, k), maxshape=(None, k if k else None),
                                     dtype="f8", chunks=(256, max(k, 1)), fillvalue=np.nan)
                continue
            dtype = {"int": "i8", "bool": "?", "str": h5py.string_dtype()}.get(kind, "f8")
            dataset = group.create_dataset(field.name, shape=(n,), maxshape=(None,),
                                           dtype=dtype, chunks=(1024,))
            if n:
                dataset[:] = np.full(n, _FILL[kind], dtype=object if kind == "str" else None)


def create(path: Path, config: dict[str, Any], command: str,
           modes: dict[str, Any] | None = None) -> None:
    """A new run file; ``modes`` says which mode each logged quantity used
    (:func:`subspace_cli.projected.mode_record`)."""
    import h5py

    tmp = temporary_sibling(path)
    try:
        with h5py.File(tmp, "w") as f:
            f.attrs["format"] = FORMAT_NAME
            f.attrs["format_version"] = FORMAT_VERSION
            f.attrs["config"] = json.dumps(config, sort_keys=True)
            f.attrs["command"] = command
            if modes is not None:
                f.attrs["modes"] = json.dumps(modes, sort_keys=True)
            _ensure_layout(f, int(config["k"]))
        publish(tmp, path)
    finally:
        if Path(tmp).exists():
            Path(tmp).unlink()


def append(path: Path, group_name: str, rows: list[Any]) -> None:
    """Append rows and close the file (flush)."""
    import h5py

    if not rows:
        return
    # HDF5 that runs out of space mid-write can keep the file open and crash at exit: refuse
    # (one StorageError line) while a row's worth of room is still there.
    check_space(path, APPEND_RESERVE)
    with h5py.File(path, "a") as f:
        group = f[group_name]
        n = group["step"].shape[0]
        for name, column in _columns(rows).items():
            dataset = group[name]
            dataset.resize(n + len(rows), axis=0)
            dataset[n:] = column


def _columns(rows: list[Any]) -> dict[str, np.ndarray]:
    records = [asdict(row) for row in rows]
    return {name: np.asarray([r[name] for r in records],
                             dtype=object if isinstance(records[0][name], str) else None)
            for name in records[0]}


def backup(path: Path) -> None:
    """Publish a copy of the run file as ``run.h5.bak`` (atomically)."""
    _copy_atomically(path, path.with_name(path.name + ".bak"))


def _copy_atomically(source: Path, target: Path) -> None:
    tmp = temporary_sibling(target)
    try:
        shutil.copyfile(source, tmp)
        publish(tmp, target)
    finally:
        if Path(tmp).exists():
            Path(tmp).unlink()


def truncate_for_resume(path: Path, step: int) -> None:
    """Restore from the backup if the run file is damaged, cut rows with step >= ``step``, and
    add the columns of this minor version that an older run file lacks."""
    import h5py

    if not _usable(path):  # a kill during an append can leave the file unreadable
        bak = path.with_name(path.name + ".bak")
        if not bak.exists():
            raise InputError(f"{path} is damaged and has no backup to restore")
        if not _usable(bak):
            raise InputError(f"{path} and its backup {bak.name} are both damaged: the run's "
                             "checkpoints are intact, its log is not (start a new run from "
                             "its last checkpoint)")
        _copy_atomically(bak, path)
    with h5py.File(path, "a") as f:  # all of it was read by _usable, in the watchdog child
        _ensure_layout(f, int(json.loads(f.attrs["config"])["k"]))
        f.attrs["format_version"] = FORMAT_VERSION
        for group_name, _ in TABLES:
            group = f[group_name]
            steps = group["step"][()]
            keep = int(np.searchsorted(steps, step, side="left"))
            for name in group:
                group[name].resize(keep, axis=0)


def _usable(path: Path) -> bool:
    """Whether ``path`` opens as a run file whose config reads and whose every attribute and
    dataset reads (HDF5 rewrites some of them when a resume appends)."""
    try:
        return _readable(path)
    except InputError:  # it hung, crashed or took too much memory in the watchdog child
        return False


@isolated("run file")
def _readable(path: Path) -> bool:
    import h5py

    try:
        with h5py.File(path, "r", locking=False) as f:
            read_all(f)  # every dataset, the log's steps included
            _ = f[LOG]["step"]  # which must be there
            int(json.loads(f.attrs["config"])["k"])
    except Exception:  # any damage at all: the caller falls back or refuses
        return False
    return True


@isolated("run file")
def read(path: Path) -> dict[str, Any]:
    """Config, command and the three tables of a run file as NumPy arrays (a table that a 1.0
    file lacks is an empty dict)."""
    import h5py

    if not path.exists():
        raise InputError(f"{path}: no such file")
    # No file lock: a reader (subspace report) must never make a running trainer's next append
    # fail. A file caught mid-append raises here and the caller falls back to run.h5.bak.
    with damage_reported(path, "run file"), h5py.File(path, "r", locking=False) as f:
        if f.attrs.get("format") != FORMAT_NAME:
            raise InputError(f"{path} is not a {FORMAT_NAME} file")
        major = int(str(f.attrs.get("format_version", "0")).split(".")[0])
        if major > int(FORMAT_VERSION.split(".")[0]):
            raise InputError(f"{path} is a newer {FORMAT_NAME} format; upgrade subspace")
        config = json.loads(f.attrs["config"])
        if not isinstance(config, dict):
            raise InputError(f"{path}: a damaged run file (its config is not a JSON object)")
        modes = json.loads(f.attrs["modes"]) if "modes" in f.attrs else None
        return {
            "config": config,
            "command": str(f.attrs["command"]),
            "modes": modes if isinstance(modes, dict) else None,
            **{group: _read_table(f[group]) if group in f else {} for group, _ in TABLES},
        }


def _read_table(group: Any) -> dict[str, np.ndarray]:
    tables = {name: read_dataset(group[name]) for name in group}
    return {name: values.astype(str) if values.dtype == object else values
            for name, values in tables.items()}
