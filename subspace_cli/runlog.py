"""The run file ``RUN_DIR/run.h5`` of ``project-train`` (specified in docs/format.md).

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
from subspace_cli.errors import InputError
from subspace_cli.projected import RefreshLog, StepLog

FORMAT_NAME = "subspace-run"
FORMAT_VERSION = "1.0"
LOG = "log"
REFRESH = "refresh"


def _vector_fields(cls: type) -> dict[str, str]:
    """Fields stored as 2-D datasets (one row of k values per entry)."""
    return {"eigenvalues": "k"} if cls is StepLog else {"residuals": "k"}


def create(path: Path, config: dict[str, Any], command: str) -> None:
    import h5py

    tmp = temporary_sibling(path)
    try:
        with h5py.File(tmp, "w") as f:
            f.attrs["format"] = FORMAT_NAME
            f.attrs["format_version"] = FORMAT_VERSION
            f.attrs["config"] = json.dumps(config, sort_keys=True)
            f.attrs["command"] = command
            k = int(config["k"])
            for group_name, cls in ((LOG, StepLog), (REFRESH, RefreshLog)):
                group = f.create_group(group_name)
                for field in fields(cls):
                    if field.name in _vector_fields(cls):
                        # k = 0 (no subspace) needs an unlimited width for a valid chunk shape
                        group.create_dataset(field.name, shape=(0, k),
                                             maxshape=(None, k if k else None),
                                             dtype="f8", chunks=(256, max(k, 1)))
                    else:
                        dtype = {"int": "i8", "bool": "?"}.get(str(field.type), "f8")
                        group.create_dataset(field.name, shape=(0,), maxshape=(None,),
                                             dtype=dtype, chunks=(1024,))
        publish(tmp, path)
    finally:
        if Path(tmp).exists():
            Path(tmp).unlink()


def append(path: Path, group_name: str, rows: list[StepLog] | list[RefreshLog]) -> None:
    """Append rows and close the file (flush)."""
    import h5py

    if not rows:
        return
    with h5py.File(path, "a") as f:
        group = f[group_name]
        n = group["step"].shape[0]
        for name, column in _columns(rows).items():
            dataset = group[name]
            dataset.resize(n + len(rows), axis=0)
            dataset[n:] = column


def _columns(rows: list[Any]) -> dict[str, np.ndarray]:
    records = [asdict(row) for row in rows]
    return {name: np.asarray([r[name] for r in records]) for name in records[0]}


def backup(path: Path) -> None:
    """Publish a copy of the run file as ``run.h5.bak`` (atomically)."""
    target = path.with_name(path.name + ".bak")
    tmp = temporary_sibling(target)
    try:
        shutil.copyfile(path, tmp)
        publish(tmp, target)
    finally:
        if Path(tmp).exists():
            Path(tmp).unlink()


def truncate_for_resume(path: Path, step: int) -> None:
    """Restore from the backup if the run file is damaged, then cut rows with step >= ``step``."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            _ = f[LOG]["step"][()]
    except Exception:  # a kill during an append can leave the file unreadable
        bak = path.with_name(path.name + ".bak")
        if not bak.exists():
            raise InputError(f"{path} is damaged and has no backup to restore") from None
        shutil.copyfile(bak, path)
    with h5py.File(path, "a") as f:
        for group_name in (LOG, REFRESH):
            group = f[group_name]
            steps = group["step"][()]
            keep = int(np.searchsorted(steps, step, side="left"))
            for name in group:
                group[name].resize(keep, axis=0)


def read(path: Path) -> dict[str, Any]:
    """Config, command and both tables of a run file as NumPy arrays."""
    import h5py

    if not path.exists():
        raise InputError(f"{path}: no such file")
    # No file lock: a reader (subspace report) must never make a running trainer's next append
    # fail. A file caught mid-append raises here and the caller falls back to run.h5.bak.
    with h5py.File(path, "r", locking=False) as f:
        if f.attrs.get("format") != FORMAT_NAME:
            raise InputError(f"{path} is not a {FORMAT_NAME} file")
        major = int(str(f.attrs.get("format_version", "0")).split(".")[0])
        if major > int(FORMAT_VERSION.split(".")[0]):
            raise InputError(f"{path} is a newer {FORMAT_NAME} format; upgrade subspace")
        return {
            "config": json.loads(f.attrs["config"]),
            "command": str(f.attrs["command"]),
            LOG: {name: f[LOG][name][()] for name in f[LOG]},
            REFRESH: {name: f[REFRESH][name][()] for name in f[REFRESH]},
        }
