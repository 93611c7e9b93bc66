"""Hugging Face transformers as a model plugin (the ``hf`` extra: ``subspace-plugins[hf]``).

``hf`` builds an ``AutoModelFor…`` from a configuration, never from a download: a JSON object
(what ``config.json`` holds) or the path of a local directory or ``config.json`` file. The model
is built with freshly initialised weights; a checkpoint's weights are loaded afterwards, as for
every plugin. ``transformers`` is imported only when the factory runs.

Attention is computed so that every Hessian-vector product works: ``eager`` (the default)
spells it out with matmuls and a softmax; ``sdpa`` runs ``scaled_dot_product_attention`` pinned
to its math kernel. The fused SDPA kernels (flash, memory-efficient) have no double backward
and no forward-mode AD, so they are never used.

The model's output is its ``ModelOutput``; the tool reads its ``logits``. A configuration's
``auto_map`` (code shipped beside a model on the Hub) is dropped: only the architectures that
the installed ``transformers`` defines can be built, so a configuration cannot make the tool
import code.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from subspace_plugins import MissingDependencyError, _choice, _factory, _optional_integer

__all__ = ["hf", "TASKS", "task_of"]

HF_INSTALL = "install transformers to use the hf model (pip install 'subspace-plugins[hf]')"

#: Tasks and the Auto class that builds each.
TASKS = {
    "sequence-classification": "AutoModelForSequenceClassification",
    "token-classification": "AutoModelForTokenClassification",
    "causal-lm": "AutoModelForCausalLM",
}
#: How an ``architectures`` entry of a config names its task.
_ARCHITECTURE_SUFFIXES = (
    ("ForSequenceClassification", "sequence-classification"),
    ("ForTokenClassification", "token-classification"),
    ("ForCausalLM", "causal-lm"),
    ("LMHeadModel", "causal-lm"),
)
ATTENTION = ("eager", "sdpa")
#: Configuration keys that are never passed on.
_DROPPED = ("auto_map", "architectures", "transformers_version", "_name_or_path")


def task_of(config: dict[str, Any]) -> str | None:
    """The task a configuration's ``architectures`` entry names, if any."""
    for architecture in config.get("architectures") or []:
        for suffix, task in _ARCHITECTURE_SUFFIXES:
            if isinstance(architecture, str) and architecture.endswith(suffix):
                return task
    return None


def read_config(config: Any) -> dict[str, Any]:
    """The configuration as a dict: given as one, or read from a local directory's
    ``config.json`` (or that file itself)."""
    if isinstance(config, dict):
        return dict(config)
    if not isinstance(config, (str, os.PathLike)) or not str(config):
        raise ValueError(f"hf: config must be a JSON object or a local path, got {config!r}")
    path = Path(config).expanduser()
    file = path / "config.json" if path.is_dir() else path
    if not file.is_file():
        raise ValueError(f"hf: no config.json at {str(path)!r} (configs are never downloaded)")
    try:
        loaded = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"hf: cannot read {str(file)!r}: {error}") from None
    if not isinstance(loaded, dict):
        raise ValueError(f"hf: {str(file)!r} does not hold a JSON object")
    return loaded


_MATH_CLASSES: dict[type, type] = {}


def _math_attention(model: Any) -> Any:
    """``model`` with its forward run under SDPA's math kernel (its class swapped for a
    subclass, so names, state and copies are unchanged)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    base = type(model)
    if base not in _MATH_CLASSES:
        def forward(self: Any, *args: Any, **kwargs: Any) -> Any:
            with sdpa_kernel(SDPBackend.MATH):
                return super(cls, self).forward(*args, **kwargs)

        cls = type(base.__name__, (base,), {"forward": forward, "__module__": base.__module__,
                                            "__qualname__": f"{base.__qualname__}[math-sdpa]"})
        _MATH_CLASSES[base] = cls
    model.__class__ = _MATH_CLASSES[base]
    return model


@_factory
def hf(
    config: Any,
    task: str | None = None,
    num_classes: int | None = None,
    attn_implementation: str = "eager",
) -> Any:
    """A Hugging Face ``transformers`` model built from a configuration.

    Args:
        config: The configuration: a JSON object with ``model_type`` (as in ``config.json``),
            or the path of a local directory holding ``config.json``.
        task: ``sequence-classification``, ``token-classification`` or ``causal-lm``; default
            the one the configuration's ``architectures`` names.
        num_classes: Labels of a classification head (sets ``num_labels``); default the
            configuration's. A language model's classes are its vocabulary.
        attn_implementation: ``eager`` or ``sdpa`` (pinned to the math kernel).
    """
    settings = read_config(config)
    num_classes = _optional_integer("hf", "num_classes", num_classes, 1)
    attn_implementation = _choice("hf", "attn_implementation", attn_implementation, ATTENTION)
    if task is None:
        task = task_of(settings)
        if task is None:
            raise ValueError(
                "hf: say which head to build: set task to one of " + ", ".join(TASKS)
                + " (the config's architectures name none of them)"
            )
    task = _choice("hf", "task", task, tuple(TASKS))
    model_type = settings.get("model_type")
    if not isinstance(model_type, str) or not model_type:
        raise ValueError("hf: the config has no model_type (e.g. \"bert\", \"gpt2\")")
    try:
        import torch
        import transformers
    except ImportError as error:
        raise MissingDependencyError(f"{HF_INSTALL}: {error}") from None
    options = {k: v for k, v in settings.items() if k not in _DROPPED and k != "model_type"}
    if num_classes is not None and task != "causal-lm":
        options.pop("id2label", None)
        options.pop("label2id", None)
        options["num_labels"] = num_classes
    options["use_cache"] = False  # no key/value cache: only logits are wanted
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        try:
            hf_config = transformers.AutoConfig.for_model(model_type, **options)
        except (KeyError, ValueError) as error:
            raise ValueError(f"hf: config of model_type {model_type!r} rejected: {error}") from None
        auto = getattr(transformers, TASKS[task])
        try:
            model = auto.from_config(hf_config, attn_implementation=attn_implementation,
                                     dtype=torch.float32)
        except ValueError as error:
            raise ValueError(f"hf: cannot build a {task} model of type {model_type!r}: "
                             f"{error}") from None
    finally:
        transformers.logging.set_verbosity(verbosity)
    if task == "causal-lm" and num_classes is not None and num_classes != hf_config.vocab_size:
        raise ValueError(f"hf: a language model's classes are its vocabulary: num_classes is "
                         f"{num_classes} but vocab_size is {hf_config.vocab_size} (give the "
                         "data's num_classes as the vocabulary size)")
    return _math_attention(model) if attn_implementation == "sdpa" else model
