"""Data factories: MNIST-1D, scikit-learn's digits, and the user's own tensor files.

Each factory is ``(**config) -> TrainingData`` and returns the *full* training set as CPU
tensors: inputs ``x`` as float32 (int64 for token ids), labels ``y`` as int64 of shape ``(N,)``.
MNIST-1D and digits are generated or bundled offline; nothing here downloads anything.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from subspace_cli.data import TrainingData
from subspace_plugins import (
    MissingDependencyError,
    _boolean,
    _choice,
    _factory,
    _integer,
    _optional_integer,
    _string,
)

__all__ = ["mnist1d", "digits", "tensors", "mnist1d_num_samples"]

MNIST1D_INSTALL = (
    "install mnist1d to use the mnist1d dataset (pip install 'subspace-plugins[datasets]')"
)
DIGITS_INSTALL = (
    "install scikit-learn to use the digits dataset (pip install 'subspace-plugins[datasets]')"
)
DIGITS_SIZE = 1797
_MNIST1D_TRAIN_SPLIT = 0.8
_MNIST1D_CLASSES = 10


def mnist1d_num_samples(n_train: int) -> int:
    """Smallest ``num_samples`` (a multiple of 10) whose 80 % train split holds ``n_train``.

    ``make_dataset`` draws ``num_samples // 10`` samples per class and keeps the first
    ``int(num_samples * 0.8)`` as the training split, computed in floating point exactly as here.
    ``n_train = 5000`` gives 6250, the paper's MNIST-5k stand-in.
    """
    num_samples = _MNIST1D_CLASSES * -(-n_train // 8)
    while int(num_samples * _MNIST1D_TRAIN_SPLIT) < n_train:
        num_samples += _MNIST1D_CLASSES
    while (
        num_samples > _MNIST1D_CLASSES
        and int((num_samples - _MNIST1D_CLASSES) * _MNIST1D_TRAIN_SPLIT) >= n_train
    ):
        num_samples -= _MNIST1D_CLASSES
    return num_samples


@_factory
def mnist1d(n_train: int = 5000, seed: int = 42) -> TrainingData:
    """MNIST-1D (Greydanus 2020), generated procedurally: ``x`` of shape ``(n_train, 40)``.

    The generator is run with ``num_samples = mnist1d_num_samples(n_train)`` and the first
    ``n_train`` samples of its training split are returned. Because the generator shuffles all
    samples together, a smaller ``n_train`` is *not* a prefix of a larger one. The inputs are the
    generator's standardised signals; the MLP and CNN take them as ``(N, 40)`` vectors and the
    transformer as 40 scalar tokens (``seq_len = 40``).

    The generator reseeds Python's and NumPy's global RNGs; both states are restored afterwards.

    Args:
        n_train: Number of training samples.
        seed: The generator's seed.
    """
    n_train = _integer("mnist1d", "n_train", n_train, 1)
    seed = _integer("mnist1d", "seed", seed, 0)
    if seed >= 2**32:  # NumPy's legacy seeding limit
        raise ValueError(f"mnist1d: seed must be below 2**32, got {seed}")
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ModuleNotFoundError as error:
        if error.name != "mnist1d":
            raise  # a missing dependency of mnist1d itself: report it as it is
        raise MissingDependencyError(MNIST1D_INSTALL) from None

    args = get_dataset_args(as_dict=False)
    args.num_samples = mnist1d_num_samples(n_train)
    args.train_split = _MNIST1D_TRAIN_SPLIT
    args.seed = seed
    python_state, numpy_state = random.getstate(), np.random.get_state()
    try:
        generated = make_dataset(args)
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)
    x = torch.as_tensor(np.asarray(generated["x"][:n_train], dtype=np.float32))
    y = torch.as_tensor(np.asarray(generated["y"][:n_train], dtype=np.int64))
    return TrainingData(num_classes=_MNIST1D_CLASSES, x=x, y=y)


@_factory
def digits(
    n_train: int | None = None, shape: str = "image", normalize: bool = True
) -> TrainingData:
    """scikit-learn's bundled 8×8 digits (1,797 samples, 10 classes), offline.

    Args:
        n_train: Keep the first ``n_train`` samples (all of them when ``None``).
        shape: ``"image"`` for ``(N, 1, 8, 8)`` (CNN with ``input_shape [1, 8, 8]``) or
            ``"flat"`` for ``(N, 64)``.
        normalize: Divide the 0–16 pixel counts by 16, into ``[0, 1]``.
    """
    n_train = _optional_integer("digits", "n_train", n_train, 1)
    if n_train is not None and n_train > DIGITS_SIZE:
        raise ValueError(f"digits: n_train must be at most {DIGITS_SIZE}, got {n_train}")
    shape = _choice("digits", "shape", shape, ("image", "flat"))
    normalize = _boolean("digits", "normalize", normalize)
    try:
        from sklearn.datasets import load_digits
    except ModuleNotFoundError as error:
        if error.name not in ("sklearn", "sklearn.datasets"):
            raise
        raise MissingDependencyError(DIGITS_INSTALL) from None

    bunch = load_digits()
    x = np.asarray(bunch.data[:n_train], dtype=np.float32)
    if normalize:
        x = x / np.float32(16.0)
    if shape == "image":
        x = x.reshape(-1, 1, 8, 8)
    y = np.asarray(bunch.target[:n_train], dtype=np.int64)
    return TrainingData(num_classes=10, x=torch.as_tensor(x), y=torch.as_tensor(y))


_SUFFIXES = (".safetensors", ".npz", ".h5", ".hdf5")


@_factory
def tensors(
    path: str | os.PathLike[str], num_classes: int | None = None, x_key: str = "x", y_key: str = "y"
) -> TrainingData:
    """Inputs and labels from a user's file: ``.safetensors``, ``.npz`` or ``.h5``/``.hdf5``.

    Floating-point inputs become float32; integer inputs become int64 and are treated as token
    ids, so store images as floats (scaled as you want them). Labels must be integers ``≥ 0`` of
    shape ``(N,)``; float arrays holding whole numbers are accepted.

    Args:
        path: The file; a relative path is taken from the current directory.
        num_classes: Number of classes; ``max(y) + 1`` when ``None``.
        x_key: Name of the input array in the file (an HDF5 path such as ``"train/x"`` works).
        y_key: Name of the label array.
    """
    where = "tensors"
    file = Path(
        path if isinstance(path, os.PathLike) else _string(where, "path", path)
    ).expanduser()
    num_classes = _optional_integer(where, "num_classes", num_classes, 1)
    x_key = _string(where, "x_key", x_key)
    y_key = _string(where, "y_key", y_key)
    suffix = file.suffix.lower()
    if suffix not in _SUFFIXES:
        raise ValueError(
            f"tensors: {str(file)!r} has an unsupported extension; "
            f"use one of {', '.join(_SUFFIXES)}"
        )
    if not file.is_file():
        raise ValueError(f"tensors: no such file {str(file)!r}")

    try:
        x_array, y_array = _read_arrays(file, suffix, x_key, y_key)
    except _TensorFileError:
        raise
    except Exception as error:  # corrupt or unreadable files, from three different libraries
        raise ValueError(f"tensors: cannot read {str(file)!r}: {error}") from None

    x = _inputs(file, x_key, x_array)
    y = _labels(file, y_key, y_array)
    if len(x) != len(y):
        raise ValueError(
            f"tensors: {str(file)!r} has {len(x)} inputs ({x_key!r}) "
            f"but {len(y)} labels ({y_key!r})"
        )
    if len(y) == 0:
        raise ValueError(f"tensors: {str(file)!r} holds no samples")
    largest = int(y.max())
    if num_classes is None:
        num_classes = largest + 1
    elif largest >= num_classes:
        raise ValueError(
            f"tensors: labels in {str(file)!r} go up to {largest} but num_classes is {num_classes}"
        )
    return TrainingData(num_classes=num_classes, x=x, y=y)


class _TensorFileError(ValueError):
    """A readable file whose content is wrong (as opposed to a file that cannot be read)."""


def _as_tensor(file: Path, key: str, array: Any) -> torch.Tensor:
    if isinstance(array, torch.Tensor):
        return array
    try:
        return torch.as_tensor(np.asarray(array))
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(
            f"tensors: {key!r} in {str(file)!r} is not a numeric array "
            f"(dtype {getattr(array, 'dtype', type(array).__name__)})"
        ) from None


def _read_arrays(file: Path, suffix: str, x_key: str, y_key: str) -> tuple[Any, Any]:
    """The two arrays as NumPy arrays or torch tensors, or a ``ValueError`` naming what exists."""

    def missing(available: list[str]) -> _TensorFileError:
        absent = [key for key in (x_key, y_key) if key not in available]
        return _TensorFileError(
            f"tensors: {str(file)!r} has no array {', '.join(map(repr, absent))}; "
            f"it holds: {', '.join(available) or 'nothing'} (set x_key / y_key)"
        )

    if suffix == ".safetensors":
        from safetensors.torch import load_file

        loaded = load_file(str(file), device="cpu")
        if x_key not in loaded or y_key not in loaded:
            raise missing(sorted(loaded))
        return loaded[x_key], loaded[y_key]

    if suffix == ".npz":
        with np.load(file, allow_pickle=False) as archive:
            if x_key not in archive.files or y_key not in archive.files:
                raise missing(sorted(archive.files))
            try:
                return archive[x_key], archive[y_key]
            except ValueError:
                raise _TensorFileError(
                    f"tensors: {str(file)!r} holds pickled objects, which are not loaded; "
                    "save plain numeric arrays"
                ) from None

    import h5py

    with h5py.File(file, "r") as handle:
        found = [key for key in (x_key, y_key) if isinstance(handle.get(key), h5py.Dataset)]
        if len(found) < 2:
            names: list[str] = []
            handle.visititems(
                lambda name, obj: names.append(name) if isinstance(obj, h5py.Dataset) else None
            )
            raise missing(sorted(names))
        return handle[x_key][()], handle[y_key][()]


def _inputs(file: Path, key: str, array: Any) -> torch.Tensor:
    x = _as_tensor(file, key, array)
    if x.dim() == 0:
        raise ValueError(f"tensors: {key!r} in {str(file)!r} is a scalar, not one row per sample")
    if x.is_floating_point():
        return x.to(torch.float32).contiguous()
    if x.dtype == torch.bool or x.is_complex():
        raise ValueError(f"tensors: {key!r} in {str(file)!r} has unsupported dtype {x.dtype}")
    return x.to(torch.int64).contiguous()


def _labels(file: Path, key: str, array: Any) -> torch.Tensor:
    y = _as_tensor(file, key, array)
    if y.dim() != 1:
        raise ValueError(
            f"tensors: labels {key!r} in {str(file)!r} must have shape (N,), got {tuple(y.shape)}"
            " (store class indices, not one-hot rows)"
        )
    if y.is_floating_point():
        if not bool(torch.all(torch.isfinite(y) & (y == torch.round(y)))):
            raise ValueError(f"tensors: labels {key!r} in {str(file)!r} are not whole numbers")
    elif y.dtype == torch.bool or y.is_complex():
        raise ValueError(f"tensors: labels {key!r} in {str(file)!r} have dtype {y.dtype}")
    y = y.to(torch.int64)
    if len(y) and int(y.min()) < 0:
        raise ValueError(f"tensors: labels {key!r} in {str(file)!r} must be non-negative")
    return y.contiguous()
