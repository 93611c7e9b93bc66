"""Tiny models and data sets for numerical tests against dense Hessians.

Each model has at most a few hundred parameters so that ``torch.func.hessian`` of the full loss
is cheap. They use only ops with double backward and forward-mode AD.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
from torch import nn

from subspace_cli.data import TrainingData


class TinyMLP(nn.Module):
    def __init__(self, d_in: int = 3, width: int = 5, n_out: int = 3, act: str = "tanh") -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_in, width)
        self.fc2 = nn.Linear(width, width)
        self.head = nn.Linear(width, n_out)
        self.act = torch.tanh if act == "tanh" else torch.relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.act(self.fc2(self.act(self.fc1(x)))))


class TinyCNN1d(nn.Module):
    def __init__(self, length: int = 8, channels: int = 2, n_out: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv1d(1, channels, 3, padding=1)
        self.head = nn.Linear(channels * (length // 2), n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = nn.functional.max_pool1d(torch.relu(self.conv(x.unsqueeze(1))), 2)
        return self.head(h.flatten(1))


class TinyCNN2d(nn.Module):
    def __init__(self, side: int = 4, channels: int = 2, n_out: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, channels, 3, padding=1)
        self.head = nn.Linear(channels * (side // 2) ** 2, n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = nn.functional.max_pool2d(torch.relu(self.conv(x)), 2)
        return self.head(h.flatten(1))


class TinyTransformer(nn.Module):
    """One pre-LayerNorm attention block over integer tokens, mean-pooled, linear head."""

    def __init__(self, vocab: int = 5, seq_len: int = 3, d: int = 4, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.embed = nn.Embedding(vocab, d)
        self.position = nn.Parameter(0.1 * torch.randn(seq_len, d))
        self.norm = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)
        self.head = nn.Linear(d, 3)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        n, length = tokens.shape
        h = self.embed(tokens) + self.position[:length]
        d = h.shape[-1]
        q, k, v = self.qkv(self.norm(h)).split(d, dim=-1)

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(n, length, self.heads, d // self.heads).transpose(1, 2)

        q, k, v = split(q), split(k), split(v)
        weights = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(d // self.heads), dim=-1)
        mixed = (weights @ v).transpose(1, 2).reshape(n, length, d)
        h = h + self.out(mixed)
        return self.head(h.mean(dim=1))


class TinyBatchNormNet(nn.Module):
    def __init__(self, d_in: int = 3, width: int = 4, n_out: int = 3) -> None:
        super().__init__()
        self.fc = nn.Linear(d_in, width)
        self.bn = nn.BatchNorm1d(width)
        self.head = nn.Linear(width, n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.bn(self.fc(x))))


def make_data(
    input_shape: tuple[int, ...],
    n: int = 24,
    classes: int = 3,
    seed: int = 0,
    vocab: int | None = None,
) -> TrainingData:
    generator = torch.Generator().manual_seed(seed)
    if vocab is None:
        x = torch.randn((n, *input_shape), generator=generator)
    else:
        x = torch.randint(vocab, (n, *input_shape), generator=generator)
    y = torch.randint(classes, (n,), generator=generator)
    return TrainingData(num_classes=classes, x=x, y=y)


def _seeded(factory: Callable[[], nn.Module], seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return factory()


#: name -> (model factory, data factory); the factories are deterministic.
TINY_MODELS: dict[str, tuple[Callable[[], nn.Module], Callable[[], TrainingData]]] = {
    "mlp-tanh": (lambda: _seeded(lambda: TinyMLP(act="tanh"), 1), lambda: make_data((3,))),
    "mlp-relu": (lambda: _seeded(lambda: TinyMLP(act="relu"), 2), lambda: make_data((3,))),
    "cnn-1d": (lambda: _seeded(TinyCNN1d, 3), lambda: make_data((8,))),
    "cnn-2d": (lambda: _seeded(TinyCNN2d, 4), lambda: make_data((1, 4, 4))),
    "transformer": (lambda: _seeded(TinyTransformer, 5), lambda: make_data((3,), vocab=5)),
}


def _plugin_models() -> dict[str, tuple[Callable[[], nn.Module], Callable[[], TrainingData]]]:
    """Tiny configurations of the built-in model plugins, when they are importable."""
    try:
        from subspace_plugins.models import cnn, mlp, transformer
    except ImportError:
        return {}
    return {
        "plugin-mlp": (
            lambda: _seeded(lambda: mlp(input_dim=3, widths=[4, 4], num_classes=3), 6),
            lambda: make_data((3,)),
        ),
        "plugin-cnn-1d": (
            lambda: _seeded(lambda: cnn(input_shape=[1, 8], num_classes=3, channels=2), 7),
            lambda: make_data((8,)),
        ),
        "plugin-cnn-2d": (
            lambda: _seeded(lambda: cnn(input_shape=[1, 4, 4], num_classes=3, channels=2), 8),
            lambda: make_data((1, 4, 4)),
        ),
        "plugin-transformer": (
            lambda: _seeded(
                lambda: transformer(
                    num_classes=3,
                    seq_len=3,
                    vocab_size=5,
                    d_model=4,
                    num_heads=2,
                    num_layers=1,
                    dim_feedforward=4,
                ),
                9,
            ),
            lambda: make_data((3,), vocab=5),
        ),
    }


LOSSES = ("mse", "ce")

#: "model/loss" -> (model factory, data factory, loss): every model with every loss.
CASES: dict[str, tuple[Callable[[], nn.Module], Callable[[], TrainingData], str]] = {
    f"{name}/{loss}": (model, data, loss)
    for name, (model, data) in {**TINY_MODELS, **_plugin_models()}.items()
    for loss in LOSSES
}


def dense_hessian(
    model: nn.Module, data: TrainingData, loss: str, train_mode: bool = False
) -> torch.Tensor:
    """Full-data Hessian over all parameters in float64, one double-backward row at a time.

    Written independently of :mod:`subspace_cli.hessian`: its own flattening, no chunking, no
    vmap. ``torch.func.hessian`` is not used because in torch 2.13 it (like any
    ``jacrev``-based Hessian) is wrong when a LayerNorm's weight and its input both depend on
    θ (e.g. embedding -> LayerNorm): its vmapped double backward returns a non-symmetric matrix.
    ``torch.autograd.functional.hessian`` with its default ``vectorize=False`` does not vmap.
    """
    import copy

    from subspace_cli.losses import loss_sum

    model = copy.deepcopy(model).to(torch.float64)
    model.train(train_mode)
    names = [name for name, _ in model.named_parameters()]
    shapes = [param.shape for _, param in model.named_parameters()]
    flat = torch.cat([param.detach().reshape(-1) for _, param in model.named_parameters()])
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    assert data.x is not None and data.y is not None
    if isinstance(data.x, dict):  # named inputs, passed as keyword arguments
        args, kwargs = (), {k: v.double() if v.is_floating_point() else v
                            for k, v in data.x.items()}
    else:
        args, kwargs = (data.x.to(torch.float64) if data.x.is_floating_point() else data.x,), {}
    labelled = int((data.y != -100).sum())  # samples, or the tokens that carry a label

    def full_loss(theta: torch.Tensor) -> torch.Tensor:
        pieces = theta.split([math.prod(shape) for shape in shapes])
        params = {
            name: piece.view(shape)
            for name, piece, shape in zip(names, pieces, shapes, strict=True)
        }
        output = torch.func.functional_call(model, {**params, **buffers}, args, kwargs)
        if not isinstance(output, torch.Tensor):  # a Hugging Face ModelOutput
            output = output.logits
        return loss_sum(loss, output, data.y) / labelled

    return torch.autograd.functional.hessian(full_loss, flat)


@functools.cache
def case_hessian(case_id: str) -> torch.Tensor:
    """Dense Hessian of a case in :data:`CASES`, computed once per test session."""
    model_factory, data_factory, loss = CASES[case_id]
    return dense_hessian(model_factory(), data_factory(), loss)
