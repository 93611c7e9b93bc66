"""The spectra file: top-k Hessian eigenpairs of checkpoints, with provenance, in HDF5.

The format is specified in ``docs/format.md``; this module is its reference reader and writer.
One group per checkpoint, named by the checkpoint's path (``/`` and ``%`` percent-encoded), holds
``eigenvalues``, ``eigenvectors``, ``residuals``, ``converged`` and the parameter layout, with
the provenance in attributes. Every write goes to a temporary copy that is renamed over the file
once complete, so the file is never left half-written.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from subspace_cli.checkpoint import publish, temporary_sibling
from subspace_cli.errors import InputError, UsageError

FORMAT_NAME = "subspace-spectra"
FORMAT_VERSION = "1.0"
GROUP_ENCODING = "spectrum"
GROUP_VERSION = "1.0"

#: Elements per eigenvector chunk: 1 MiB of float32 (h5py's advice is 10 KiB to 1 MiB).
_CHUNK_ELEMENTS = 262_144


def checkpoint_key(path: str | os.PathLike[str]) -> str:
    """The group name for a checkpoint: its path relative to the working directory when inside
    it (absolute otherwise), with ``%`` and ``/`` percent-encoded."""
    p = Path(path).resolve()
    try:
        text = str(p.relative_to(Path.cwd().resolve()))
    except ValueError:
        text = str(p)
    return text.replace("%", "%25").replace("/", "%2F")


@dataclass
class Spectrum:
    """One checkpoint's eigenpairs as stored (rows of ``eigenvectors`` are eigenvectors)."""

    checkpoint: str
    checkpoint_sha256: str
    k: int
    eigenvalues: np.ndarray
    eigenvectors: np.ndarray
    residuals: np.ndarray
    converged: np.ndarray
    param_names: list[str]
    param_shapes: list[tuple[int, ...]]
    param_offsets: list[int]
    attrs: dict[str, Any] = field(default_factory=dict)
    group: str = ""

    @property
    def n_params(self) -> int:
        return int(self.eigenvectors.shape[1])


def _check_root(f: Any, path: Path) -> None:
    name = f.attrs.get("format")
    if name != FORMAT_NAME:
        raise InputError(f"{path} is not a {FORMAT_NAME} file (format attribute {name!r})")
    version = str(f.attrs.get("format_version", "0"))
    if int(version.split(".")[0]) > int(FORMAT_VERSION.split(".")[0]):
        raise InputError(
            f"{path} has {FORMAT_NAME} format {version}, newer than this subspace reads "
            f"({FORMAT_VERSION}); upgrade subspace"
        )


def _attr(value: Any) -> Any:
    """Attributes are scalars or strings; anything structured is stored as JSON text."""
    if value is None:
        return "null"
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value, sort_keys=True)
    return value


def has_group(path: str | os.PathLike[str], checkpoint: str | os.PathLike[str]) -> bool:
    p = Path(path)
    if not p.exists():
        return False
    with _open(p, "r") as f:
        return checkpoint_key(checkpoint) in f


def _open(path: Path, mode: str) -> Any:
    import h5py

    try:
        f = h5py.File(path, mode)
    except OSError as exc:
        raise InputError(f"{path}: not a readable HDF5 file ({exc})") from exc
    if mode == "r" or "format" in f.attrs:
        try:
            _check_root(f, path)
        except InputError:
            f.close()
            raise
    return f


def _atomic_update(path: Path, update: Callable[[Any], None]) -> None:
    """Apply ``update`` to the open file, all or nothing.

    The existing file is copied to a temporary sibling, ``update`` runs there, and the copy is
    renamed over the original once closed: an interrupted write leaves the old file intact.
    """
    if path.exists():
        with _open(path, "r"):
            pass  # refuses files that are not spectra files before anything is written
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(path)
    try:
        if path.exists():
            shutil.copyfile(path, tmp)
        with _open(Path(tmp), "r+" if path.exists() else "w") as f:
            f.attrs["format"] = FORMAT_NAME
            f.attrs["format_version"] = FORMAT_VERSION
            update(f)
        publish(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_spectrum(
    path: str | os.PathLike[str],
    spectrum: Spectrum,
    *,
    overwrite: bool = False,
) -> str:
    """Add (or with ``overwrite`` replace) one checkpoint's group, atomically.

    Returns:
        The group name.
    """
    p = Path(path)
    key = checkpoint_key(spectrum.checkpoint)

    def update(f: Any) -> None:
        if key in f:
            if not overwrite:
                raise UsageError(
                    f"{p} already holds a spectrum of {spectrum.checkpoint}; "
                    "pass --overwrite to replace it"
                )
            del f[key]
        _write_group(f.create_group(key), spectrum)

    _atomic_update(p, update)
    return key


def write_subgroup(
    path: str | os.PathLike[str],
    checkpoint: str | os.PathLike[str],
    name: str,
    attrs: Mapping[str, Any],
    datasets: Mapping[str, Any],
    *,
    overwrite: bool = False,
) -> str:
    """Add a result subgroup (e.g. ``alignment``) under a checkpoint's spectrum group, atomically.

    Returns:
        The subgroup's path in the file.
    """
    p = Path(path)
    key = checkpoint_key(checkpoint)

    def update(f: Any) -> None:
        if key not in f:
            raise UsageError(f"{p} holds no spectrum of {checkpoint} to attach {name} to")
        group = f[key]
        if name in group:
            if not overwrite:
                raise UsageError(
                    f"{p} already holds {name} results for {checkpoint}; "
                    "pass --overwrite to replace them"
                )
            del group[name]
        sub = group.create_group(name)
        for attr, value in sorted(attrs.items()):
            sub.attrs[attr] = _attr(value)
        for dataset, value in datasets.items():
            sub.create_dataset(dataset, data=np.asarray(value))

    _atomic_update(p, update)
    return f"{key}/{name}"


def read_subgroup(
    path: str | os.PathLike[str], checkpoint: str | os.PathLike[str], name: str
) -> tuple[dict[str, Any], dict[str, np.ndarray]] | None:
    """Attributes and datasets of a result subgroup, or ``None`` when absent."""
    p = Path(path)
    key = checkpoint_key(checkpoint)
    with _open(p, "r") as f:
        if key not in f or name not in f[key]:
            return None
        return _read_subgroup(f[key][name])


def read_subgroups(
    path: str | os.PathLike[str], name: str
) -> dict[str, tuple[dict[str, Any], dict[str, np.ndarray]]]:
    """The result subgroup ``name`` of every group that has one, keyed by group name (as
    :attr:`Spectrum.group`), read in one pass over the file."""
    import h5py

    with _open(Path(path), "r") as f:
        return {group: _read_subgroup(f[group][name]) for group in f
                if isinstance(f[group], h5py.Group) and name in f[group]}


def _read_subgroup(sub: Any) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    return ({k: _decode(v) for k, v in sub.attrs.items()}, {k: sub[k][()] for k in sub})


def _write_group(g: Any, s: Spectrum) -> None:
    import h5py

    n = s.eigenvectors.shape[1]
    g.attrs["encoding-type"] = GROUP_ENCODING
    g.attrs["encoding-version"] = GROUP_VERSION
    g.attrs["checkpoint"] = s.checkpoint
    g.attrs["checkpoint_sha256"] = s.checkpoint_sha256
    g.attrs["k"] = int(s.k)
    for name, value in sorted(s.attrs.items()):
        g.attrs[name] = _attr(value)
    g.create_dataset("eigenvalues", data=np.asarray(s.eigenvalues, dtype=np.float64))
    g.create_dataset("residuals", data=np.asarray(s.residuals, dtype=np.float64))
    g.create_dataset("converged", data=np.asarray(s.converged, dtype=bool))
    vectors = np.ascontiguousarray(s.eigenvectors)
    g.create_dataset(
        "eigenvectors",
        data=vectors,
        chunks=(1, min(n, _CHUNK_ELEMENTS)) if vectors.shape[0] else None,
        compression="gzip",
        shuffle=True,
    )
    text = h5py.string_dtype("utf-8")
    g.create_dataset("param_names", data=np.array(s.param_names, dtype=object), dtype=text)
    g.create_dataset(
        "param_shapes",
        data=np.array([json.dumps(list(shape)) for shape in s.param_shapes], dtype=object),
        dtype=text,
    )
    g.create_dataset("param_offsets", data=np.asarray([*s.param_offsets, n], dtype=np.int64))


def _decode(value: Any) -> Any:
    if isinstance(value, bytes):
        value = value.decode()
    if isinstance(value, np.generic):
        return value.item()
    return value


def _read_group(g: Any) -> Spectrum:
    attrs = {k: _decode(v) for k, v in g.attrs.items()}
    version = str(attrs.get("encoding-version", "0"))
    if int(version.split(".")[0]) > int(GROUP_VERSION.split(".")[0]):
        raise InputError(
            f"group {g.name} has spectrum encoding {version}, newer than this subspace reads; "
            "upgrade subspace"
        )
    offsets = [int(v) for v in g["param_offsets"][()]]
    return Spectrum(
        checkpoint=attrs.pop("checkpoint"),
        checkpoint_sha256=attrs.pop("checkpoint_sha256"),
        k=int(attrs.pop("k")),
        eigenvalues=g["eigenvalues"][()],
        eigenvectors=g["eigenvectors"][()],
        residuals=g["residuals"][()],
        converged=g["converged"][()],
        param_names=[_decode(v) for v in g["param_names"][()]],
        param_shapes=[tuple(json.loads(_decode(v))) for v in g["param_shapes"][()]],
        param_offsets=offsets[:-1],
        attrs=attrs,
        group=g.name.lstrip("/"),
    )


def iter_spectra(path: str | os.PathLike[str]) -> Iterator[Spectrum]:
    """Every spectrum in the file, in the order they were written."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"{p}: no such file")
    with _open(p, "r") as f:
        groups = [f[name] for name in f if f[name].attrs.get("encoding-type") == GROUP_ENCODING]
        groups.sort(key=lambda g: str(_decode(g.attrs.get("created", ""))))
        spectra = [_read_group(g) for g in groups]
    yield from spectra


def read_spectrum(
    path: str | os.PathLike[str], checkpoint: str | os.PathLike[str], sha256: str | None = None
) -> Spectrum | None:
    """The spectrum stored for ``checkpoint``, or ``None`` if the file has none.

    Looked up by path; with ``sha256``, a group of another path whose checkpoint has those exact
    tensors (a moved or copied file) is found too.
    """
    p = Path(path)
    if not p.exists():
        raise InputError(f"{p}: no such file")
    key = checkpoint_key(checkpoint)
    with _open(p, "r") as f:
        if key in f:
            return _read_group(f[key])
        if sha256 is not None:
            for name in f:
                if _decode(f[name].attrs.get("checkpoint_sha256")) == sha256:
                    return _read_group(f[name])
    return None
