"""An out-of-tree plugin distribution, installed into a temporary sys.path entry for tests."""

from __future__ import annotations

import importlib
import sys
import textwrap
from pathlib import Path

import pytest

PLUGIN_MODULE = """
import torch
from subspace_cli.data import TrainingData


def tiny(input_dim=3, num_classes=2):
    return torch.nn.Linear(input_dim, num_classes)


def bn(input_dim=3, num_classes=2, width=4, dropout=0.0):
    layers = [torch.nn.Linear(input_dim, width), torch.nn.BatchNorm1d(width), torch.nn.Tanh()]
    if dropout:
        layers.append(torch.nn.Dropout(dropout))
    layers.append(torch.nn.Linear(width, num_classes))
    return torch.nn.Sequential(*layers)


class Masked(torch.nn.Module):
    # Token sequences in, keyword arguments input_ids and attention_mask: an embedding, a
    # mixing layer and a running mean over the unmasked tokens so far; one output per sequence
    # (its mean), or one per token (token_level); tied: the head is the embedding.

    def __init__(self, vocab, num_classes, width, token_level, tied, poison=None):
        super().__init__()
        self.poison = poison  # a token id the model refuses (a bad sample, for fault tests)
        self.embed = torch.nn.Embedding(vocab, width)
        self.mix = torch.nn.Linear(width, width)
        self.head = torch.nn.Linear(width, num_classes)
        self.token_level = token_level
        if tied:
            self.head.weight = self.embed.weight

    def forward(self, input_ids, attention_mask=None):
        if self.poison is not None and bool((input_ids == self.poison).any()):
            raise ValueError(f"token {self.poison} is poisoned")
        h = torch.tanh(self.mix(self.embed(input_ids)))
        m = (torch.ones_like(input_ids) if attention_mask is None else attention_mask)
        m = m.unsqueeze(-1).to(h.dtype)
        if self.token_level:
            return self.head((h * m).cumsum(1) / m.cumsum(1).clamp(min=1))
        return self.head((h * m).sum(1) / m.sum(1).clamp(min=1))


def masked(vocab=12, num_classes=3, width=4, token_level=False, tied=False, poison=None):
    return Masked(vocab, num_classes, width, token_level, tied, poison)


def toy(n=12, input_dim=3, num_classes=2):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, input_dim, generator=g)
    y = torch.arange(n) % num_classes
    return TrainingData(num_classes=num_classes, x=x, y=y)


not_callable = 42
"""

BROKEN_MODULE = "import fakeplug_missing_dependency  # noqa: F401\n\ndef factory():\n    pass\n"

ENTRY_POINTS = """
[subspace.models]
tiny = fakeplug_mod:tiny
bn = fakeplug_mod:bn
masked = fakeplug_mod:masked
broken = fakeplug_broken:factory

[subspace.data]
toy = fakeplug_mod:toy
"""


def write_fake_plugin(root: Path) -> Path:
    """Write the distribution "fakeplug" (models tiny, bn, masked and broken, data toy)
    under ``root``."""
    info = root / "fakeplug-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: fakeplug\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(textwrap.dedent(ENTRY_POINTS))
    (root / "fakeplug_mod.py").write_text(PLUGIN_MODULE)
    (root / "fakeplug_broken.py").write_text(BROKEN_MODULE)
    return root


def forget_fake_plugin() -> None:
    for name in ("fakeplug_mod", "fakeplug_broken"):
        sys.modules.pop(name, None)


@pytest.fixture
def fake_plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A distribution "fakeplug" registering models tiny, bn, masked and broken, and data
    toy."""
    root = write_fake_plugin(tmp_path / "site")
    monkeypatch.syspath_prepend(str(root))
    importlib.invalidate_caches()
    yield root
    forget_fake_plugin()


# The fake plugin's linear model on its toy data: with the mse loss the training loss is
# quadratic, so its Hessian and gradient are known exactly.
TOY_N, TOY_D, TOY_C = 12, 3, 2


def run_cli(*args: str):
    from click.testing import CliRunner

    from subspace_cli.cli import main

    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def linear_checkpoint(path, seed=0, step=None):
    """A checkpoint of the fake plugin's linear model (float32 weights drawn with ``seed``)."""
    import torch

    from subspace_cli.checkpoint import ExperimentSpec, write_checkpoint

    g = torch.Generator().manual_seed(seed)
    tensors = {
        "weight": torch.randn(TOY_C, TOY_D, generator=g),
        "bias": torch.randn(TOY_C, generator=g),
    }
    spec = ExperimentSpec(
        "tiny", {"input_dim": TOY_D, "num_classes": TOY_C}, "toy", {"n": TOY_N}, "mse"
    )
    write_checkpoint(path, tensors, spec.to_metadata(step=seed if step is None else step))
    return tensors


def bn_checkpoint(path, seed=0, dropout=0.0, n=TOY_N):
    """A checkpoint of the fake plugin's BatchNorm MLP ``bn`` (with ``dropout`` before its last
    layer) on the toy data, cross-entropy loss; its running statistics are not the defaults."""
    import torch

    from subspace_cli.checkpoint import ExperimentSpec, write_checkpoint

    config = {"input_dim": TOY_D, "num_classes": TOY_C, "width": 4, "dropout": dropout}
    torch.manual_seed(seed)
    module = importlib.import_module("fakeplug_mod").bn(**config)
    g = torch.Generator().manual_seed(seed + 1)
    module[1].running_mean.copy_(0.1 * torch.randn(4, generator=g))
    module[1].running_var.copy_(1 + 0.5 * torch.rand(4, generator=g))
    module[1].num_batches_tracked.fill_(7)
    spec = ExperimentSpec("bn", config, "toy", {"n": n}, "ce")
    tensors = {k: v.detach().clone() for k, v in module.state_dict().items()}
    write_checkpoint(path, tensors, spec.to_metadata(step=0))
    return tensors


def quadratic_problem(tensors):
    """Eigenvalues (descending), eigenvectors (rows) and gradient of
    L = (1/N) Σ ½‖W x + b − onehot(y)‖², in float64, for θ = (W row-major, b).

    With x̃ = (x, 1), H = I_C ⊗ (1/N) Σ x̃ x̃ᵀ reordered to that layout.
    """
    import numpy as np
    import torch

    N, D, C = TOY_N, TOY_D, TOY_C
    gen = torch.Generator().manual_seed(0)  # as the toy data plugin draws x
    x = torch.randn(N, D, generator=gen).double().numpy()
    y = (torch.arange(N) % C).numpy()
    W, b = tensors["weight"].double().numpy(), tensors["bias"].double().numpy()
    residual = x @ W.T + b - np.eye(C)[y]
    gradient = np.concatenate([(residual.T @ x / N).reshape(-1), residual.mean(0)])
    n = C * D + C
    H = np.zeros((n, n))
    for c in range(C):
        w = slice(c * D, (c + 1) * D)
        H[w, w] = x.T @ x / N
        H[w, C * D + c] = H[C * D + c, w] = x.mean(0)
        H[C * D + c, C * D + c] = 1.0
    values, vectors = np.linalg.eigh(H)
    return values[::-1], vectors[:, ::-1].T, gradient
