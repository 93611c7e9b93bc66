"""The spectra file: top-k Hessian eigenpairs of checkpoints, with provenance, in HDF5.

The format is specified in ``docs/format.md``; this module is its reference reader and writer.
One group per checkpoint, named by the checkpoint's path (``/`` and ``%`` percent-encoded), holds
``eigenvalues``, ``eigenvectors``, ``residuals``, ``converged`` and the parameter layout, with
the provenance in attributes.

Since format 1.1 the file itself is a small index: each group in it is an HDF5 external link to
a group of the same name in its own file (a *group file*) in the directory ``FILE.h5.d`` beside
it. Adding a checkpoint writes only its group file
(built in memory, written to a temporary name, synced, renamed) and then a new index (renamed
over the old one), so an append costs O(that group), and an interrupted or refused write leaves
every earlier group readable. Files of format 1.0, with the groups inline, are read as they
are; the first append hard-links such a file into the directory and publishes an index that
links to its groups, so it is not copied either.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import secrets
import shutil
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from subspace_cli import hdf5, locking
from subspace_cli.checkpoint import publish, temporary_sibling
from subspace_cli.errors import (
    InputError,
    UsageError,
    damage_reported,
    refusals_reported,
    storage_error,
)
from subspace_cli.hdf5 import read_dataset

FORMAT_NAME = "subspace-spectra"
FORMAT_VERSION = "1.1"
#: The root ``format`` of a group file: not a spectra file by itself, so that nothing that looks
#: for spectra files (``subspace report DIR``) counts a group twice.
GROUP_FILE_FORMAT = "subspace-spectra-group"
GROUP_ENCODING = "spectrum"
GROUP_VERSION = "1.0"
#: Encodings of result subgroups this module reads, and the newest version of each it knows.
SUBGROUP_VERSIONS = {"alignment": "1.0", "density": "1.0"}

#: Elements per eigenvector chunk: 1 MiB of float32 (h5py's advice is 10 KiB to 1 MiB).
_CHUNK_ELEMENTS = 262_144

#: The directory of group files beside ``FILE.h5`` is ``FILE.h5`` + this.
SIDECAR_SUFFIX = ".d"
_LOCK_NAME = ".lock"
#: errno values of ``link()`` where a file system has no hard links: the inline file is copied.
_NO_HARD_LINKS = frozenset(
    getattr(errno, name)
    for name in ("EPERM", "EXDEV", "EMLINK", "ENOTSUP", "EOPNOTSUPP", "ENOSYS")
    if hasattr(errno, name)
)


def checkpoint_key(path: str | os.PathLike[str], block: str | None = None) -> str:
    """The group name for a checkpoint: its path relative to the working directory when inside
    it (absolute otherwise), with ``%`` and ``/`` percent-encoded; for one diagonal block of
    its curvature (``spectrum --per-module``), followed by ``%23`` (an encoded ``#``) and the
    block's name, encoded alike."""
    p = Path(path).resolve()
    try:
        text = str(p.relative_to(Path.cwd().resolve()))
    except ValueError:
        text = str(p)
    key = text.replace("%", "%25").replace("/", "%2F")
    if block:
        key += "%23" + block.replace("%", "%25").replace("/", "%2F")
    return key


@hdf5.transferable
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


def sidecar(path: str | os.PathLike[str]) -> Path:
    """The directory that holds the group files of the spectra file ``path``."""
    p = Path(path)
    return p.with_name(p.name + SIDECAR_SUFFIX)


def extent(path: Path) -> int:
    """The bytes a reader of the spectra file ``path`` may touch: it and its group files."""
    total = hdf5.file_size(path)
    directory = sidecar(os.path.realpath(path))
    with contextlib.suppress(OSError), os.scandir(directory) as entries:
        total += sum(e.stat().st_size for e in entries if e.is_file(follow_symlinks=False))
    return total


#: Every reader of a spectra file runs in a watchdog child (:mod:`subspace_cli.hdf5`).
spectra_reader = hdf5.isolated("spectra file", extent)


def _major(version: str, what: str) -> int:
    try:
        return int(str(version).split(".")[0])
    except ValueError:
        raise InputError(f"{what} has an unreadable version {version!r}") from None


def _check_root(f: Any, path: Path) -> None:
    name = _decode(f.attrs.get("format"))
    if name != FORMAT_NAME:
        raise InputError(f"{path} is not a {FORMAT_NAME} file (format attribute {name!r})")
    version = str(_decode(f.attrs.get("format_version", "0")))
    if _major(version, str(path)) > _major(FORMAT_VERSION, FORMAT_NAME):
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


# ------------------------------------------------------------------------------------ reading


@contextlib.contextmanager
def _reading(path: Path) -> Iterator[Any]:
    """The spectra file ``path``, open for reading, its root checked; any failure while the
    block reads it is one :class:`InputError` (``damage_reported``).

    It is opened by its real path, so external links resolve beside the real file even when
    ``path`` is a symbolic link to it.
    """
    import h5py

    with damage_reported(path, "spectra file"):
        try:
            f = h5py.File(os.path.realpath(path), "r")
        except OSError as exc:
            refused = storage_error(exc, path, "open")  # the environment's refusal, not the file's
            if refused is not None:
                raise refused from exc
            raise InputError(f"{path}: not a readable HDF5 file ({exc})") from exc
        with f:
            _check_root(f, path)
            yield f


def _member(f: Any, path: Path, name: str) -> Any:
    """The object ``name`` of the open spectra file ``f``, following its external link.

    A group file that is missing is an error naming it: HDF5 would otherwise look for the link's
    target relative to the working directory too, and could open an unrelated file.
    """
    import h5py

    link = f.get(name, getlink=True)
    if isinstance(link, h5py.ExternalLink):
        target = _link_target(Path(f.filename), link.filename)
        if not target.is_file():
            raise InputError(
                f"{path}: the data of {name} is missing ({target} does not exist); a spectra "
                f"file must be moved or copied together with its directory {sidecar(path).name}"
            )
    try:
        return f[name]
    except KeyError as exc:
        raise InputError(f"{path}: cannot read {name} ({exc})") from exc


def _link_target(index: Path, filename: str) -> Path:
    """Where an external link's file is: relative names are relative to the index's directory."""
    target = Path(filename)
    return target if target.is_absolute() else index.parent / target


@spectra_reader
def has_group(path: str | os.PathLike[str], checkpoint: str | os.PathLike[str],
              block: str | None = None) -> bool:
    p = Path(path)
    if not p.exists():
        return False
    with _reading(p) as f:
        return checkpoint_key(checkpoint, block) in f


@spectra_reader
def group_outline(
    path: str | os.PathLike[str], checkpoint: str | os.PathLike[str]
) -> tuple[dict[str, Any], tuple[str, ...]] | None:
    """The attributes of a checkpoint's group and the names of the result subgroups it holds,
    without reading its datasets; ``None`` when the file or the group is absent."""
    import h5py

    p = Path(path)
    if not p.exists():
        return None
    key = checkpoint_key(checkpoint)
    with _reading(p) as f:
        if key not in f:
            return None
        group = _member(f, p, key)
        return ({k: _decode(v) for k, v in group.attrs.items()},
                tuple(name for name in group if isinstance(group[name], h5py.Group)))


@spectra_reader
def read_subgroup(
    path: str | os.PathLike[str], checkpoint: str | os.PathLike[str], name: str
) -> tuple[dict[str, Any], dict[str, np.ndarray]] | None:
    """Attributes and datasets of a result subgroup, or ``None`` when absent."""
    p = Path(path)
    key = checkpoint_key(checkpoint)
    with _reading(p) as f:
        if key not in f:
            return None
        group = _member(f, p, key)
        if name not in group:
            return None
        return _read_subgroup(group[name], f"{p}: {key}/{name}")


@spectra_reader
def read_subgroups(
    path: str | os.PathLike[str], name: str
) -> dict[str, tuple[dict[str, Any], dict[str, np.ndarray]]]:
    """The result subgroup ``name`` of every group that has one, keyed by group name (as
    :attr:`Spectrum.group`), read in one pass over the file."""
    import h5py

    p = Path(path)
    found = {}
    with _reading(p) as f:
        for key in f:
            group = _member(f, p, key)
            if isinstance(group, h5py.Group) and name in group:
                found[key] = _read_subgroup(group[name], f"{p}: {key}/{name}")
    return found


def _read_subgroup(sub: Any, where: str) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    attrs = {k: _decode(v) for k, v in sub.attrs.items()}
    kind = attrs.get("encoding-type")
    known = SUBGROUP_VERSIONS.get(str(kind))
    if known is not None:
        version = str(attrs.get("encoding-version", "0"))
        if _major(version, where) > _major(known, str(kind)):
            raise InputError(
                f"{where} has {kind} encoding {version}, newer than this subspace reads "
                f"({known}); upgrade subspace"
            )
    return attrs, {k: read_dataset(sub[k]) for k in sub}


def _decode(value: Any) -> Any:
    if isinstance(value, bytes):
        value = value.decode()
    if isinstance(value, np.generic):
        return value.item()
    return value


def _read_group(g: Any, name: str) -> Spectrum:
    attrs = {k: _decode(v) for k, v in g.attrs.items()}
    version = str(attrs.get("encoding-version", "0"))
    if _major(version, f"group {name}") > _major(GROUP_VERSION, GROUP_ENCODING):
        raise InputError(
            f"group {name} has spectrum encoding {version}, newer than this subspace reads; "
            "upgrade subspace"
        )
    offsets = [int(v) for v in read_dataset(g["param_offsets"])]
    return Spectrum(
        checkpoint=attrs.pop("checkpoint"),
        checkpoint_sha256=attrs.pop("checkpoint_sha256"),
        k=int(attrs.pop("k")),
        eigenvalues=read_dataset(g["eigenvalues"]),
        eigenvectors=read_dataset(g["eigenvectors"]),
        residuals=read_dataset(g["residuals"]),
        converged=read_dataset(g["converged"]),
        param_names=[_decode(v) for v in read_dataset(g["param_names"])],
        param_shapes=[tuple(json.loads(_decode(v))) for v in read_dataset(g["param_shapes"])],
        param_offsets=offsets[:-1],
        attrs=attrs,
        group=name,
    )


def iter_spectra(path: str | os.PathLike[str]) -> Iterator[Spectrum]:
    """Every spectrum in the file, in the order they were written."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"{p}: no such file")
    yield from _read_spectra(p)


@spectra_reader
def _read_spectra(p: Path) -> list[Spectrum]:
    with _reading(p) as f:
        groups = [(name, _member(f, p, name)) for name in f]
        groups = [(n, g) for n, g in groups if g.attrs.get("encoding-type") == GROUP_ENCODING]
        groups.sort(key=lambda item: str(_decode(item[1].attrs.get("created", ""))))
        return [_read_group(g, name) for name, g in groups]


@spectra_reader
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
    with _reading(p) as f:
        if key in f:
            return _read_group(_member(f, p, key), key)
        if sha256 is not None:
            for name in f:
                group = _member(f, p, name)
                if _decode(group.attrs.get("checkpoint_sha256")) == sha256 and not _decode(
                        group.attrs.get("block", "")):  # a block is not the whole spectrum
                    return _read_group(group, name)
    return None


# ------------------------------------------------------------------------------------ writing


def write_spectrum(
    path: str | os.PathLike[str],
    spectrum: Spectrum,
    *,
    overwrite: bool = False,
) -> str:
    """Add (or with ``overwrite`` replace) one checkpoint's group, atomically, in O(the group).

    Returns:
        The group name.
    """
    p = Path(path)
    block = str(spectrum.attrs.get("block") or "") or None
    key = checkpoint_key(spectrum.checkpoint, block)

    def change(update: _Update) -> None:
        if key in update.links:
            if not overwrite:
                raise UsageError(
                    f"{p} already holds a spectrum of {spectrum.checkpoint}"
                    + (f" block {block}" if block else "") + "; pass --overwrite to replace it"
                )
        update.write_group_file(key, lambda f: _write_group(f.create_group(key), spectrum))

    _update(p, change)
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

    The checkpoint's group is rewritten to a new group file with the subgroup added (O(that
    group)); the other groups are not touched.

    Returns:
        The subgroup's path in the file.
    """
    import h5py

    p = Path(path)
    key = checkpoint_key(checkpoint)

    def change(update: _Update) -> None:
        if key not in update.links:
            raise UsageError(f"{p} holds no spectrum of {checkpoint} to attach {name} to")
        filename, inner = update.links[key]
        hdf5.walk(_link_target(update.real, filename))  # HDF5 copies from it below
        with h5py.File(_link_target(update.real, filename), "r") as src:
            source = src[inner]
            if name in source and not overwrite:
                raise UsageError(
                    f"{p} already holds {name} results for {checkpoint}; "
                    "pass --overwrite to replace them"
                )

            def fill(f: Any) -> None:
                src.copy(source, f, name=key)  # HDF5 copies the chunks as stored
                group = f[key]
                if name in group:
                    del group[name]
                sub = group.create_group(name)
                for attr, value in sorted(attrs.items()):
                    sub.attrs[attr] = _attr(value)
                for dataset, value in datasets.items():
                    sub.create_dataset(dataset, data=np.asarray(value))

            update.write_group_file(key, fill)

    _update(p, change)
    return f"{key}/{name}"


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


def _update(path: Path, change: Callable[[_Update], None]) -> None:
    """Apply ``change`` to the spectra file ``path``: all of it, or nothing.

    A refusal by the environment (no space, quota, read-only, permission) becomes one
    :class:`~subspace_cli.errors.StorageError` line; the file is then as it was.
    """
    with refusals_reported(path, "write", f"; {path} is unchanged and every group in it readable"):
        _update_locked(path, change)


def _update_locked(path: Path, change: Callable[[_Update], None]) -> None:
    real = Path(os.path.realpath(path))
    if real.exists():
        _check_spectra_file(path)  # refuses other files before anything is written
    real.parent.mkdir(parents=True, exist_ok=True)
    directory = sidecar(real)
    directory.mkdir(exist_ok=True)
    with locking.exclusive(directory / _LOCK_NAME, what=str(path),
                           hint="; another subspace is writing to it"):
        _remove_stale_temporaries(real)
        update = _Update(path, real)
        try:
            with damage_reported(path, "spectra file"):
                update.load()
            change(update)
            update.commit()
        finally:
            update.clean_up()


@spectra_reader
def _check_spectra_file(path: Path) -> None:
    with _reading(path):
        pass


@spectra_reader
def _read_index(real: Path) -> tuple[dict[str, Any], dict[str, tuple[str, str]], list[str]]:
    """The root attributes of the spectra file ``real``, its external links (name: (file,
    path)) and the names of its inline groups (a 1.0 file's)."""
    import h5py

    links: dict[str, tuple[str, str]] = {}
    inline: list[str] = []
    with h5py.File(real, "r") as f:
        attrs = dict(f.attrs.items())
        for name in f:
            link = f.get(name, getlink=True)
            if isinstance(link, h5py.ExternalLink):
                links[name] = (link.filename, link.path)
            else:
                inline.append(name)
    return attrs, links, inline


def _group_file_name(key: str) -> str:
    """A new, unique name for a group file: the checkpoint's file name, made safe, and a token."""
    stem = re.sub(r"[^A-Za-z0-9._-]", "_", key.rsplit("%2F", 1)[-1]).lstrip(".")[:64]
    return f"{stem or 'group'}.{secrets.token_hex(8)}.h5"


class _Update:
    """One change to a spectra file, published at once by :meth:`commit`.

    Publishing order (docs/format.md): each new group file is written to a temporary name in
    the sidecar directory and synced; the new index is written to a temporary sibling of the
    file and synced; the group files are renamed to their final names and the directory synced;
    the index is renamed over the file and its directory synced; only then are files that the new
    index no longer references removed.
    """

    def __init__(self, path: Path, real: Path) -> None:
        self.path = path  # as the user named it, for messages
        self.real = real
        self.directory = sidecar(real)
        self.attrs: dict[str, Any] = {}
        self.links: dict[str, tuple[str, str]] = {}  # name -> (file, object path in it)
        self.old_files: set[str] = set()  # files the index referenced before
        self.temporaries: list[str] = []  # removed whatever happens
        self.pending: list[tuple[str, Path]] = []  # (temporary, final name) of new group files
        self.created: list[Path] = []  # new files under final names, removed unless published
        self.published = False

    def load(self) -> None:
        """Read the current index; a 1.0 file's inline groups become links into a hard link of it."""
        if not self.real.exists():
            return
        self.attrs, links, inline = _read_index(self.real)
        self.links.update(links)
        self.old_files = {filename for filename, _ in self.links.values()}
        if inline:
            legacy = self._adopt_inline_file()
            self.old_files.add(legacy)  # removed again if no group of it survives the change
            for name in inline:
                self.links[name] = (legacy, f"/{name}")

    def _adopt_inline_file(self) -> str:
        """Make the current file (groups inline) a file of the sidecar directory, without copying
        it where the file system allows a hard link. Returns its link file name."""
        # not named *.h5: it still says it is a spectra file, and must not be found as one
        final = self.directory / f"{self.real.name}.{secrets.token_hex(8)}.inline"
        try:
            os.link(self.real, final)
            self.created.append(final)
        except OSError as exc:
            if exc.errno not in _NO_HARD_LINKS:
                raise
            # no hard links here (e.g. FAT, some network and FUSE file systems): one copy, once
            tmp = self._temporary()
            shutil.copyfile(self.real, tmp)
            _fsync(tmp, required=True)
            self.pending.append((tmp, final))
        return self._link_name(final)

    def _temporary(self) -> str:
        tmp = temporary_sibling(self.directory / "group")  # ".group.*.tmp" in the directory
        self.temporaries.append(tmp)
        return tmp

    def _link_name(self, file: Path) -> str:
        return file.relative_to(self.real.parent).as_posix()

    def write_group_file(self, key: str, fill: Callable[[Any], None]) -> None:
        """Write a new group file, in which ``fill(file)`` creates group ``key``, and link it."""
        import h5py

        def build(f: Any) -> None:
            f.attrs["format"] = GROUP_FILE_FORMAT
            f.attrs["format_version"] = FORMAT_VERSION
            fill(f)

        tmp = self._temporary()
        _write_file(tmp, _hdf5_image(build))
        with h5py.File(tmp, "r") as f:  # what was written reads back (metadata only)
            if key not in f or "encoding-type" not in f[key].attrs:
                raise InputError(f"{self.path}: the new group {key} did not read back")
        final = self.directory / _group_file_name(key)
        self.pending.append((tmp, final))
        self.links[key] = (self._link_name(final), f"/{key}")

    def commit(self) -> None:
        import h5py

        def build(f: Any) -> None:
            for attr, value in self.attrs.items():
                f.attrs[attr] = value
            f.attrs["format"] = FORMAT_NAME
            f.attrs["format_version"] = FORMAT_VERSION
            for name, (filename, inner) in sorted(self.links.items()):
                f[name] = h5py.ExternalLink(filename, inner)

        index = temporary_sibling(self.real)
        self.temporaries.append(index)
        _write_file(index, _hdf5_image(build))
        for tmp, final in self.pending:
            publish(tmp, final)
            self.created.append(final)
        if self.created:
            _fsync(self.directory)
        publish(index, self.real)
        self.published = True
        _fsync(self.real.parent)
        self._remove_unreferenced()

    def _remove_unreferenced(self) -> None:
        """Remove the group files the new index no longer references (an overwritten group).

        Only files directly in a ``*.d`` directory beside the index are removed: a link the user
        made to some other file never costs them that file.
        """
        referenced = {filename for filename, _ in self.links.values()}
        for filename in self.old_files - referenced:
            parts = Path(filename).parts
            if len(parts) != 2 or not parts[0].endswith(SIDECAR_SUFFIX) or Path(filename).is_absolute():
                continue
            # already gone, or not ours to remove: the index no longer needs it either way
            _unlink_quietly(str(self.real.parent / filename))

    def clean_up(self) -> None:
        for tmp in self.temporaries:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
        if not self.published:
            for file in self.created:
                try:
                    os.unlink(file)
                except FileNotFoundError:
                    pass


def _remove_stale_temporaries(real: Path) -> None:
    """Remove what a killed writer left: temporaries in the sidecar directory and temporary
    siblings of the index. Readers never see them (they go through the index only); the writer
    lock makes sure no live writer owns them."""
    directory = sidecar(real)
    for entry in os.scandir(directory):
        if entry.name.startswith(".") and entry.name.endswith(".tmp") and entry.is_file():
            _unlink_quietly(entry.path)
    sibling = re.compile(rf"\.{re.escape(real.name)}\.[a-z0-9_]{{8}}\.tmp")
    for entry in os.scandir(real.parent):
        if sibling.fullmatch(entry.name) and entry.is_file():
            _unlink_quietly(entry.path)


def _unlink_quietly(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


def _hdf5_image(build: Callable[[Any], None]) -> memoryview:
    """The bytes of a new HDF5 file that ``build(file)`` fills, made in memory.

    HDF5 never writes to the disk itself: after a failed write (no space left) it can keep the
    file open, holding its space, and crash when it retries at exit. Python writes the image
    instead, and a refusal is a plain ``OSError`` with nothing left behind.
    """
    import io

    import h5py

    buffer = io.BytesIO()
    with h5py.File(buffer, "w") as f:
        build(f)
    return buffer.getbuffer()


def _write_file(path: str, data: memoryview) -> None:
    """Write ``data`` to the existing file ``path`` and sync it to the disk."""
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def _fsync(path: str | Path, *, required: bool = False) -> None:
    """Sync a file, or a directory so that renames in it are durable; unless ``required``, a
    no-op where that cannot be done (directories on some file systems)."""
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        if required:
            raise
