"""Checkpoints: safetensors with string metadata (primary), plain ``.pt`` state_dicts
(Lightning's ``.ckpt`` too), and Hugging Face ``save_pretrained`` directories.

A checkpoint is data, never code. safetensors files are read with ``safe_open``;
``.pt``/``.pth``/``.ckpt`` files only through ``torch.load(..., weights_only=True)``, which
refuses arbitrary pickled objects.

Metadata keys (all strings) of a checkpoint written by this tool:

========================  ==================================================
``subspace.model``        model plugin name (entry point in ``subspace.models``)
``subspace.model_config`` JSON object of keyword arguments for the model factory
``subspace.data``         data plugin name (entry point in ``subspace.data``)
``subspace.data_config``  JSON object of keyword arguments for the data factory
``subspace.loss``         ``mse`` or ``ce``
``subspace.step``         training step (integer)
``subspace.format_version``  checkpoint format version (this module's FORMAT_VERSION)
========================  ==================================================
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from subspace_cli.errors import CheckpointError, UsageError, storage_error
from subspace_cli.limits import BuildLimits
from subspace_cli.losses import check_loss

if TYPE_CHECKING:
    import torch

FORMAT_VERSION = "1"
PREFIX = "subspace."
KEY_MODEL = "subspace.model"
KEY_MODEL_CONFIG = "subspace.model_config"
KEY_DATA = "subspace.data"
KEY_DATA_CONFIG = "subspace.data_config"
KEY_LOSS = "subspace.loss"
KEY_STEP = "subspace.step"
KEY_FORMAT = "subspace.format_version"

SAFETENSORS_SUFFIXES = (".safetensors",)
TORCH_SUFFIXES = (".pt", ".pth", ".ckpt")  # .ckpt: Lightning's torch.save of a dict


@dataclass
class Checkpoint:
    """Tensors and string metadata read from one file."""

    path: Path
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str] = field(default_factory=dict)
    #: The prefix removed from the file's tensor names (``--strip-prefix``, or found), if any.
    prefix: str = ""

    @property
    def n_elements(self) -> int:
        return sum(int(t.numel()) for t in self.tensors.values())

    def sha256(self) -> str:
        return tensor_sha256(self.tensors)


def read_checkpoint(path: str | os.PathLike[str]) -> Checkpoint:
    """Read a checkpoint without building any model."""
    p = Path(path)
    if p.is_dir():
        return read_hf_directory(p, header=False)
    if not p.is_file():
        raise CheckpointError(f"{p}: no such file")
    suffix = p.suffix.lower()
    if suffix in TORCH_SUFFIXES:
        return Checkpoint(p, _read_torch_state_dict(p), {})
    if suffix not in SAFETENSORS_SUFFIXES:
        raise CheckpointError(
            f"{p}: unsupported checkpoint type {suffix or '(no suffix)'!r}; use .safetensors, "
            ".pt, .pth or .ckpt"
        )
    from safetensors import safe_open

    try:
        with safe_open(str(p), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except Exception as exc:  # safetensors raises its own error types for malformed headers
        raise CheckpointError(f"{p}: not a readable safetensors file ({exc})") from exc
    _check_format_version(p, metadata)
    return Checkpoint(p, tensors, metadata)


def read_header(path: str | os.PathLike[str]) -> Checkpoint:
    """A checkpoint's metadata, with its tensors' names and shapes but not their data.

    The tensors are empty stand-ins on the ``meta`` device (``.shape`` and ``.dtype`` are
    right): enough to check a model against the file before any tensor is read. ``.pt`` files
    are memory-mapped where their format allows, so that too reads no tensor data.
    """
    import torch

    p = Path(path)
    if p.is_dir():
        return read_hf_directory(p, header=True)
    if not p.is_file():
        raise CheckpointError(f"{p}: no such file")
    if p.suffix.lower() in TORCH_SUFFIXES:
        tensors = _read_torch_state_dict(p, mmap=True)
        return Checkpoint(p, {k: torch.empty(v.shape, dtype=v.dtype, device="meta")
                              for k, v in tensors.items()}, {})
    if p.suffix.lower() not in SAFETENSORS_SUFFIXES:
        return read_checkpoint(p)  # the unsupported-suffix error
    from safetensors import safe_open

    try:
        with safe_open(str(p), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            shapes = {name: (f.get_slice(name).get_shape(), f.get_slice(name).get_dtype())
                      for name in f.keys()}
    except Exception as exc:  # safetensors raises its own error types for malformed headers
        raise CheckpointError(f"{p}: not a readable safetensors file ({exc})") from exc
    _check_format_version(p, metadata)
    dtypes = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
              "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32,
              "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}
    return Checkpoint(p, {name: torch.empty(shape, dtype=dtypes.get(dtype, torch.uint8),
                                            device="meta")
                          for name, (shape, dtype) in shapes.items()}, metadata)


#: A Hugging Face save directory: its configuration and where its weights may be.
HF_CONFIG = "config.json"
HF_WEIGHTS = "model.safetensors"
HF_INDEX = "model.safetensors.index.json"
HF_TORCH_WEIGHTS = "pytorch_model.bin"
HF_MODEL_PLUGIN = "hf"


def is_hf_directory(path: Path) -> bool:
    """Whether ``path`` is a ``save_pretrained`` directory: ``config.json`` beside
    ``model.safetensors``, a sharded ``model.safetensors.index.json`` or ``pytorch_model.bin``."""
    return path.is_dir() and (path / HF_CONFIG).is_file() and any(
        (path / name).is_file() for name in (HF_WEIGHTS, HF_INDEX, HF_TORCH_WEIGHTS))


def _json_file(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot be read ({exc.strerror or exc})") from exc
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def _shards(p: Path) -> list[Path]:
    """The weight files of a save directory, and a check that a sharded index is whole."""
    if (p / HF_WEIGHTS).is_file():
        return [p / HF_WEIGHTS]
    if not (p / HF_INDEX).is_file():
        return [p / HF_TORCH_WEIGHTS]
    weight_map = _json_file(p / HF_INDEX).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{p / HF_INDEX}: no weight_map of tensor names to shard files")
    names = sorted({str(v) for v in weight_map.values()})
    for name in names:  # shards live in the directory itself: no path leads elsewhere
        if Path(name).name != name or name.startswith(".") or not name.endswith(".safetensors"):
            raise CheckpointError(f"{p / HF_INDEX}: shard {name!r} is not a .safetensors file "
                                  "of this directory")
        if not (p / name).is_file():
            raise CheckpointError(f"{p}: shard {name} named by {HF_INDEX} is missing")
    return [p / name for name in names]


def read_hf_directory(p: Path, *, header: bool) -> Checkpoint:
    """A ``save_pretrained`` directory as one checkpoint: its shards' tensors (with
    ``header``, stand-ins as :func:`read_header` gives), and metadata that names the
    ``hf`` model plugin with the directory's ``config.json`` as its config (data and loss come
    from the command line, as for a plain state_dict)."""
    if not is_hf_directory(p):
        raise CheckpointError(
            f"{p}: a directory, but not a Hugging Face save directory ({HF_CONFIG} beside "
            f"{HF_WEIGHTS}, a sharded {HF_INDEX} or {HF_TORCH_WEIGHTS})"
        )
    config = _json_file(p / HF_CONFIG)
    tensors: dict[str, torch.Tensor] = {}
    shards = _shards(p)
    for shard in shards:
        if shard.suffix == ".bin":
            part = _read_torch_shard(shard, header=header)
        else:
            part = (read_header if header else read_checkpoint)(shard).tensors
        twice = sorted(set(part) & set(tensors))
        if twice:
            raise CheckpointError(f"{p}: tensors in more than one shard: {_name_list(twice)}")
        tensors.update(part)
    if not (p / HF_WEIGHTS).is_file() and (p / HF_INDEX).is_file():  # sharded
        listed = set(_json_file(p / HF_INDEX)["weight_map"])
        if listed != set(tensors):
            gap = sorted(listed ^ set(tensors))
            raise CheckpointError(f"{p}: {HF_INDEX} and its shards disagree on "
                                  f"{_name_list(gap)}")
    metadata = {KEY_MODEL: HF_MODEL_PLUGIN,
                KEY_MODEL_CONFIG: json.dumps({"config": config}, sort_keys=True)}
    return Checkpoint(p, tensors, metadata)


def _read_torch_shard(p: Path, *, header: bool) -> dict[str, torch.Tensor]:
    """``pytorch_model.bin`` (``torch.save`` of a state_dict, read with ``weights_only``); for a
    header, stand-ins on the ``meta`` device."""
    import torch

    tensors = _read_torch_state_dict(p, mmap=header)
    if header:
        return {k: torch.empty(v.shape, dtype=v.dtype, device="meta") for k, v in tensors.items()}
    return tensors


def _read_torch_state_dict(p: Path, *, mmap: bool = False) -> dict[str, torch.Tensor]:
    import pickle

    import torch

    try:
        try:
            obj = torch.load(str(p), map_location="cpu", weights_only=True, mmap=mmap)
        except RuntimeError:
            if not mmap:
                raise
            # a file in the legacy (non-zip) format cannot be memory-mapped: read it whole
            obj = torch.load(str(p), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        with open(p, "rb") as fh:
            head = fh.read(4)
        if not (head.startswith(b"\x80") or head == b"PK\x03\x04"):
            # neither a pickle (PROTO opcode) nor torch's zip archive: random bytes, another
            # format; saying it "holds Python objects" would send the user the wrong way
            raise CheckpointError(
                f"{p}: not a readable torch file (neither a torch zip archive nor a pickle)"
            ) from exc
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
        raise CheckpointError(
            f"{p}: refused to unpickle: the file holds Python objects besides tensors"
            + (f" ({found.group(1)})" if found else "")
            + ", and subspace loads .pt files only with weights_only=True"
        ) from exc
    except Exception as exc:
        raise CheckpointError(
            f"{p}: not a readable torch file ({type(exc).__name__}: {exc})"
        ) from exc
    for key in ("state_dict", "model_state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    ):
        raise CheckpointError(f"{p}: expected a state_dict (a mapping of names to tensors)")
    return dict(obj)


def _check_format_version(p: Path, metadata: dict[str, str]) -> None:
    version = metadata.get(KEY_FORMAT)
    if version is None:
        return
    if not re.fullmatch(r"[1-9][0-9]{0,8}(\.[0-9]{1,9})*", version):
        raise CheckpointError(f"{p}: malformed {KEY_FORMAT} {version!r} (expected a version "
                              f"such as {FORMAT_VERSION!r})")
    major = int(version.split(".")[0])
    if major > int(FORMAT_VERSION):
        raise CheckpointError(
            f"{p}: checkpoint format {version} is newer than this subspace understands "
            f"({FORMAT_VERSION}); upgrade subspace"
        )


def tensor_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over tensor names, dtypes, shapes and bytes, in name order.

    Independent of the file's layout and metadata, so the same weights hash the same whether
    they come from safetensors or a ``.pt`` file.
    """
    import torch

    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        h.update(name.encode())
        h.update(b"\0" + str(t.dtype).encode() + b"\0" + repr(tuple(t.shape)).encode() + b"\0")
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def write_checkpoint(
    path: str | os.PathLike[str],
    tensors: dict[str, torch.Tensor],
    metadata: dict[str, str],
    *,
    overwrite: bool = False,
) -> Path:
    """Write a safetensors checkpoint atomically (temporary file in the same folder, then rename)."""
    from safetensors.torch import save_file

    p = Path(path)
    if p.suffix.lower() not in SAFETENSORS_SUFFIXES:
        raise UsageError(f"{p}: checkpoints are written as .safetensors")
    if p.exists() and not overwrite:
        raise UsageError(f"{p} exists; pass --overwrite to replace it")
    p.parent.mkdir(parents=True, exist_ok=True)
    payload = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    tmp = temporary_sibling(p)
    try:
        try:
            save_file(payload, tmp, metadata={k: str(v) for k, v in metadata.items()})
        except Exception as exc:  # safetensors' own error type, naming the OS error
            found = re.search(r"os error (\d+)", str(exc))
            if found is None:
                raise
            code = int(found.group(1))
            error = OSError(code, os.strerror(code), str(p))
            raise storage_error(error, p, "write") or error from exc
        publish(tmp, p)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return p


def temporary_sibling(path: Path) -> str:
    """A new empty file beside ``path`` (beside its target when ``path`` is a symlink), to
    write and then :func:`publish`."""
    real = Path(os.path.realpath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{real.name}.", suffix=".tmp", dir=real.parent)
    os.close(fd)
    return tmp


def publish(tmp: str, path: Path) -> None:
    """Rename a finished temporary file over ``path``, atomically.

    A symlink at ``path`` is written through (its target is replaced, the link stays), and an
    existing file keeps its permission bits; a new one gets the usual ``0666 & ~umask``.
    """
    real = os.path.realpath(path)
    try:
        mode = os.stat(real).st_mode & 0o7777
    except FileNotFoundError:
        umask = os.umask(0)
        os.umask(umask)
        mode = 0o666 & ~umask
    os.chmod(tmp, mode)
    os.replace(tmp, real)


@dataclass
class SpecOverrides:
    """Values given on the command line; ``None`` means "take it from the checkpoint"."""

    model: str | None = None
    model_config: dict[str, Any] | None = None
    data: str | None = None
    data_config: dict[str, Any] | None = None
    loss: str | None = None
    #: ``--max-params`` and ``--max-samples-build``: what the metadata may make us build.
    limits: BuildLimits = field(default_factory=BuildLimits)
    #: ``--strip-prefix``: take the tensors whose names start with it, without it.
    strip_prefix: str | None = None


@dataclass
class ExperimentSpec:
    """Which model, data and loss a checkpoint belongs to, and who named the plugins."""

    model: str
    model_config: dict[str, Any]
    data: str
    data_config: dict[str, Any]
    loss: str
    step: int | None = None
    model_from_user: bool = False
    data_from_user: bool = False

    def to_metadata(self, step: int | None = None) -> dict[str, str]:
        step = self.step if step is None else step
        meta = {
            KEY_MODEL: self.model,
            KEY_MODEL_CONFIG: json.dumps(self.model_config, sort_keys=True),
            KEY_DATA: self.data,
            KEY_DATA_CONFIG: json.dumps(self.data_config, sort_keys=True),
            KEY_LOSS: self.loss,
            KEY_FORMAT: FORMAT_VERSION,
        }
        if step is not None:
            meta[KEY_STEP] = str(step)
        return meta


def parse_json_object(text: str, what: str) -> dict[str, Any]:
    """Parse a JSON object given for ``what`` (an option or metadata key)."""
    try:
        value = json.loads(text)
    except ValueError as exc:  # JSONDecodeError, or an integer of over 4300 digits
        raise UsageError(f"{what} is not valid JSON: {exc}") from exc
    except RecursionError:
        raise UsageError(f"{what} is nested too deeply to be a config") from None
    if not isinstance(value, dict):
        raise UsageError(f"{what} must be a JSON object, got {type(value).__name__}")
    return value


def resolve_spec(ckpt: Checkpoint, overrides: SpecOverrides) -> ExperimentSpec:
    """Combine a checkpoint's metadata with command-line overrides.

    A plugin given on the command line replaces the checkpoint's, and then so does its config
    (configs belong to plugins). A config given for the checkpoint's own plugin is merged over
    the stored config key by key.
    """
    meta = ckpt.metadata

    def pick(
        kind: str,
        key: str,
        key_config: str,
        override: str | None,
        override_config: dict[str, Any] | None,
    ) -> tuple[str, dict[str, Any], bool]:
        stored = meta.get(key)
        if override is not None and override != stored:
            return override, dict(override_config or {}), True
        if stored is None:
            raise CheckpointError(
                f"{ckpt.path}: no {key} in the checkpoint's metadata; pass --{kind} NAME"
            )
        try:
            config = parse_json_object(meta.get(key_config, "{}"), f"{ckpt.path}: {key_config}")
        except UsageError as exc:
            raise CheckpointError(str(exc)) from exc
        config.update(override_config or {})
        return stored, config, override is not None

    model, model_config, model_user = pick(
        "model", KEY_MODEL, KEY_MODEL_CONFIG, overrides.model, overrides.model_config
    )
    data, data_config, data_user = pick(
        "data", KEY_DATA, KEY_DATA_CONFIG, overrides.data, overrides.data_config
    )
    loss = overrides.loss or meta.get(KEY_LOSS)
    if loss is None:
        raise CheckpointError(
            f"{ckpt.path}: no {KEY_LOSS} in the checkpoint's metadata; pass --loss"
        )
    try:
        check_loss(loss)
    except UsageError as exc:
        raise CheckpointError(f"{ckpt.path}: {exc}") from exc
    step_text = meta.get(KEY_STEP)
    try:
        step = int(step_text) if step_text is not None else None
    except ValueError as exc:
        raise CheckpointError(f"{ckpt.path}: malformed {KEY_STEP} {step_text!r}") from exc
    return ExperimentSpec(model, model_config, data, data_config, loss, step, model_user, data_user)


def _name_list(names: list[str], limit: int = 10) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def tied_names(model: torch.nn.Module) -> dict[str, str]:
    """Tensor names that are another name's tensor (tied weights: a language model's output
    layer and its input embedding), each mapped to the first name of its tensor."""
    import itertools

    first: dict[int, str] = {}
    aliases: dict[str, str] = {}
    for name, tensor in itertools.chain(model.named_parameters(remove_duplicate=False),
                                        model.named_buffers(remove_duplicate=False)):
        if id(tensor) in first:
            aliases[name] = first[id(tensor)]
        else:
            first[id(tensor)] = name
    return aliases


def model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's state_dict without its tied aliases: what a checkpoint of it holds (as
    ``save_pretrained`` writes it; safetensors stores no tensor twice)."""
    aliases = tied_names(model)
    return {name: t for name, t in model.state_dict().items() if name not in aliases}


def _fold(tensors: dict[str, torch.Tensor], aliases: dict[str, str]) -> dict[str, torch.Tensor]:
    """``tensors`` with every tied alias under its first name (a file may hold either)."""
    folded = {name: t for name, t in tensors.items() if name not in aliases}
    for alias, source in aliases.items():
        if alias in tensors and source not in tensors:
            folded[source] = tensors[alias]
    return folded


def load_state_strict(model: torch.nn.Module, ckpt: Checkpoint,
                      strip_prefix: str | None = None) -> Checkpoint:
    """Load ``ckpt``'s tensors into ``model``, naming every missing, unexpected or misshapen
    tensor; names are matched by :func:`match_names`, whose checkpoint is returned. Tied
    weights are one tensor: the file holds it under either name."""
    aliases = tied_names(model)
    expected = model_state(model)
    ckpt = match_names(expected, ckpt, strip_prefix, aliases)
    given = ckpt.tensors
    import torch

    if any(given[name].dtype == torch.float64 and expected[name].is_floating_point()
           and expected[name].dtype != torch.float64 for name in expected):
        # Plugins build float32 models; loading float64 weights (a --dtype float64 run's
        # checkpoints) into them would round. Every consumer casts to its compute dtype.
        model.double()
    result = model.load_state_dict(given, strict=False)
    left = sorted(set(result.missing_keys) - set(aliases)) + sorted(result.unexpected_keys)
    if left:  # check_tensors has matched the names: nothing is left unless torch disagrees
        raise CheckpointError(f"{ckpt.path}: tensors do not load into the model: "
                              f"{_name_list(left)}")
    return ckpt


#: How deep a prefix of tensor names is looked for (``model.``, ``model.net.``, …).
_PREFIX_DEPTH = 3


def _under(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def match_names(expected: dict[str, torch.Tensor], ckpt: Checkpoint,
                strip_prefix: str | None = None,
                aliases: dict[str, str] | None = None) -> Checkpoint:
    """``ckpt`` with tensor names that are the model's (``expected``, :func:`model_state`),
    its shapes checked (:func:`check_tensors`); a tied alias (``aliases``, from
    :func:`tied_names`) is read under its first name.

    With ``strip_prefix`` the tensors under that prefix are taken, without it (a Lightning
    module saves its ``self.model`` as ``model.…``). Without it, names that do not match are
    matched by the one prefix, if exactly one, whose tensors are exactly the model's; the
    result says which (``prefix``).
    """
    aliases = aliases or {}
    given = ckpt.tensors
    if strip_prefix is None:
        folded = _fold(given, aliases)
        if set(folded) == set(expected):
            ckpt = Checkpoint(ckpt.path, folded, ckpt.metadata) if folded != given else ckpt
            check_tensors(expected, ckpt)
            return ckpt
        candidates = {name[:end + 1] for name in given
                      for end in [i for i, c in enumerate(name) if c == "."][:_PREFIX_DEPTH]}
        fits = sorted(p for p in candidates
                      if set(_fold(_under(given, p), aliases)) == set(expected))
        if len(fits) != 1:
            try:
                check_tensors(expected, Checkpoint(ckpt.path, folded, ckpt.metadata))
            except CheckpointError as exc:
                hint = (f"; the names fit under more than one prefix ({', '.join(fits)}): pass "
                        "--strip-prefix" if fits else "")
                raise CheckpointError(f"{exc}{hint}") from None
        strip_prefix = fits[0]
    renamed = Checkpoint(ckpt.path, _fold(_under(given, strip_prefix), aliases), ckpt.metadata,
                         strip_prefix)
    if not renamed.tensors:
        raise CheckpointError(f"{ckpt.path}: no tensor name starts with --strip-prefix "
                              f"{strip_prefix!r}")
    check_tensors(expected, renamed)
    return renamed


def check_tensors(expected: dict[str, torch.Tensor], ckpt: Checkpoint) -> None:
    """Refuse ``ckpt`` unless its tensors have exactly the names and shapes of ``expected``
    (a model's state_dict); works on :func:`read_header`'s stand-ins too."""
    given = ckpt.tensors
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    mismatched = [
        f"{name} (checkpoint {tuple(given[name].shape)}, model {tuple(expected[name].shape)})"
        for name in sorted(set(expected) & set(given))
        if tuple(given[name].shape) != tuple(expected[name].shape)
    ]
    problems = []
    if missing:
        problems.append(f"missing {_name_list(missing)}")
    if unexpected:
        problems.append(f"unexpected {_name_list(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatch {_name_list(mismatched)}")
    if problems:
        under = f" (under the prefix {ckpt.prefix!r})" if ckpt.prefix else ""
        raise CheckpointError(
            f"{ckpt.path}: tensors{under} do not match the model: " + "; ".join(problems)
        )
