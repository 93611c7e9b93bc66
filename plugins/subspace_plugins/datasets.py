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

from subspace_cli.data import IGNORE_INDEX, TrainingData
from subspace_plugins import (
    MissingDependencyError,
    _boolean,
    _choice,
    _factory,
    _integer,
    _optional_integer,
    _string,
)

__all__ = ["mnist1d", "digits", "tensors", "tokens", "mnist1d_num_samples"]

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
    num_classes = _optional_integer(where, "num_classes", num_classes, 1)
    x_key = _string(where, "x_key", x_key)
    y_key = _string(where, "y_key", y_key)
    file, suffix = _data_file(where, path)

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
    return TrainingData(num_classes=_classes("tensors", file, y, num_classes), x=x, y=y)


def _classes(where: str, file: Path, labels: torch.Tensor, num_classes: int | None) -> int:
    """``num_classes``, checked against the largest label, or ``max(label) + 1``."""
    largest = int(labels.max())
    if num_classes is None:
        return largest + 1
    if largest >= num_classes:
        raise ValueError(
            f"{where}: labels in {str(file)!r} go up to {largest} but num_classes is {num_classes}"
        )
    return num_classes


def _data_file(where: str, path: Any) -> tuple[Path, str]:
    """The file a config names, and its suffix, checked to be one that can be read."""
    file = Path(
        path if isinstance(path, os.PathLike) else _string(where, "path", path)
    ).expanduser()
    suffix = file.suffix.lower()
    if suffix not in _SUFFIXES:
        raise ValueError(
            f"{where}: {str(file)!r} has an unsupported extension; "
            f"use one of {', '.join(_SUFFIXES)}"
        )
    if not file.is_file():
        raise ValueError(f"{where}: no such file {str(file)!r}")
    return file, suffix


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
    arrays = _read_named(file, suffix, [x_key, y_key], "tensors", "set x_key / y_key")
    return arrays[x_key], arrays[y_key]


def _read_named(file: Path, suffix: str, required: list[str], where: str, hint: str,
                optional: tuple[str, ...] = ()) -> dict[str, Any]:
    """The ``required`` arrays and those of ``optional`` that exist, as NumPy arrays or torch
    tensors; a missing required one is a ``ValueError`` naming what the file holds."""

    def missing(available: list[str]) -> _TensorFileError:
        absent = [key for key in required if key not in available]
        return _TensorFileError(
            f"{where}: {str(file)!r} has no array {', '.join(map(repr, absent))}; "
            f"it holds: {', '.join(available) or 'nothing'} ({hint})"
        )

    wanted = [*required, *(key for key in optional if key not in required)]
    if suffix == ".safetensors":
        from safetensors.torch import load_file

        loaded = load_file(str(file), device="cpu")
        if any(key not in loaded for key in required):
            raise missing(sorted(loaded))
        return {key: loaded[key] for key in wanted if key in loaded}

    if suffix == ".npz":
        with np.load(file, allow_pickle=False) as archive:
            if any(key not in archive.files for key in required):
                raise missing(sorted(archive.files))
            try:
                return {key: archive[key] for key in wanted if key in archive.files}
            except ValueError:
                raise _TensorFileError(
                    f"{where}: {str(file)!r} holds pickled objects, which are not loaded; "
                    "save plain numeric arrays"
                ) from None

    import h5py

    with h5py.File(file, "r") as handle:
        found = [key for key in wanted if isinstance(handle.get(key), h5py.Dataset)]
        if any(key not in found for key in required):
            names: list[str] = []
            handle.visititems(
                lambda name, obj: names.append(name) if isinstance(obj, h5py.Dataset) else None
            )
            raise missing(sorted(names))
        return {key: handle[key][()] for key in found}


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


#: The named inputs of a token file that are passed to the model when present.
TOKEN_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


@_factory
def tokens(
    path: str | os.PathLike[str],
    num_classes: int | None = None,
    labels: str = "labels",
    shift_labels: bool | None = None,
    inputs: list[str] | None = None,
) -> TrainingData:
    """Token sequences for transformers: ``input_ids`` (``(N, T)`` integers), an optional
    ``attention_mask`` (``(N, T)``, 1 for a real token and 0 for padding) and
    ``token_type_ids``, and labels, from a ``.safetensors``, ``.npz`` or ``.h5`` file.

    The model receives the inputs as keyword arguments (``model(input_ids=…,
    attention_mask=…)``). Labels are one class per sequence (``(N,)``, sequence
    classification) or one per token (``(N, T)``, token classification or language
    modelling); a token label of -100, or any position the attention mask hides, takes no part
    in the loss, and the loss averages over labelled tokens. Without a ``labels`` array the
    labels are the tokens themselves (language modelling).

    Args:
        path: The file; a relative path is taken from the current directory.
        num_classes: Number of classes; for a language model its vocabulary size. Default
            ``max(label) + 1``.
        labels: Name of the label array.
        shift_labels: Predict the next position's label at each position (causal language
            modelling: the model's output at position t is scored against label t + 1), as
            Hugging Face's ``…ForCausalLM`` do inside their loss. Default: true when the file
            has no label array, else false.
        inputs: Names of the arrays passed to the model; default those of ``input_ids``,
            ``attention_mask`` and ``token_type_ids`` that the file holds.
    """
    where = "tokens"
    num_classes = _optional_integer(where, "num_classes", num_classes, 1)
    labels = _string(where, "labels", labels)
    if shift_labels is not None:
        shift_labels = _boolean(where, "shift_labels", shift_labels)
    if inputs is not None:
        if not isinstance(inputs, list) or not inputs:
            raise ValueError(f"tokens: inputs must be a non-empty list of names, got {inputs!r}")
        names = [_string(where, f"inputs[{i}]", name) for i, name in enumerate(inputs)]
    else:
        names = None
    file, suffix = _data_file(where, path)
    required = names if names is not None else ["input_ids"]
    optional = (*TOKEN_INPUTS, labels)
    try:
        arrays = _read_named(file, suffix, required, where, "set inputs / labels", optional)
    except _TensorFileError:
        raise
    except Exception as error:  # corrupt or unreadable files, from three different libraries
        raise ValueError(f"tokens: cannot read {str(file)!r}: {error}") from None
    if names is None:
        names = [name for name in TOKEN_INPUTS if name in arrays]
    x = {name: _token_array(file, name, arrays[name]) for name in names}
    ids = x.get("input_ids", next(iter(x.values())))
    if ids.dim() != 2 or len(ids) == 0:
        raise ValueError(f"tokens: {names[0]!r} in {str(file)!r} must have shape (N, T) with "
                         f"N ≥ 1, got {tuple(ids.shape)}")
    for name, value in x.items():
        if value.shape[:2] != ids.shape:
            raise ValueError(f"tokens: {name!r} in {str(file)!r} has shape {tuple(value.shape)}"
                             f", the sequences {tuple(ids.shape)}")
    mask = x.get("attention_mask")
    if mask is not None and not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError(f"tokens: attention_mask in {str(file)!r} must hold only 0 and 1")
    if labels in arrays:
        y = _token_array(file, labels, arrays[labels], allow_ignore=True)
        if y.shape not in (ids.shape[:1], ids.shape):
            raise ValueError(
                f"tokens: labels {labels!r} in {str(file)!r} have shape {tuple(y.shape)}; use "
                f"{tuple(ids.shape[:1])} (one per sequence) or {tuple(ids.shape)} (one per token)"
            )
        shift = bool(shift_labels)
    else:
        if "input_ids" not in x:
            raise ValueError(f"tokens: {str(file)!r} has no {labels!r} array and no input_ids "
                             "to predict")
        y = x["input_ids"].clone()
        shift = True if shift_labels is None else shift_labels
    if y.dim() == 2:
        if mask is not None:
            y = y.masked_fill(mask == 0, IGNORE_INDEX)
        if shift:
            y = torch.cat([y[:, 1:], torch.full_like(y[:, :1], IGNORE_INDEX)], dim=1)
            if mask is not None:  # nor is a hidden position's output scored (left padding)
                y = y.masked_fill(mask == 0, IGNORE_INDEX)
    elif shift:
        raise ValueError("tokens: shift_labels needs one label per token, not per sequence")
    kept = y[y != IGNORE_INDEX]
    if kept.numel() == 0:
        raise ValueError(f"tokens: no label in {str(file)!r} takes part in the loss")
    return TrainingData(num_classes=_classes(where, file, kept, num_classes), x=x,
                        y=y.contiguous())


def _token_array(file: Path, key: str, array: Any, allow_ignore: bool = False) -> torch.Tensor:
    """An integer array of ids, masks or labels (whole-number floats accepted) as int64."""
    value = _as_tensor(file, key, array)
    if value.is_floating_point():
        if not bool(torch.all(torch.isfinite(value) & (value == torch.round(value)))):
            raise ValueError(f"tokens: {key!r} in {str(file)!r} does not hold whole numbers")
    elif value.dtype == torch.bool:
        value = value.to(torch.int64)
    elif value.is_complex():
        raise ValueError(f"tokens: {key!r} in {str(file)!r} has dtype {value.dtype}")
    value = value.to(torch.int64).contiguous()
    bad = (value < 0) & ~((value == IGNORE_INDEX) if allow_ignore else torch.zeros_like(
        value, dtype=torch.bool))
    if bool(bad.any()):
        allowed = " (or -100, ignored)" if allow_ignore else ""
        raise ValueError(f"tokens: {key!r} in {str(file)!r} must be non-negative{allowed}")
    return value
