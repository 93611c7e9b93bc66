"""Model factories: the paper's fc-tanh MLP, cnn-relu CNN, small transformer, ResNet and VGG.

Each factory is ``(**config) -> torch.nn.Module``. Weights are drawn from torch's global RNG, so
a caller that seeds torch gets the same model every time. The models are built only from ops
that support double backward *and* forward-mode AD (``torch.func.jvp`` over ``torch.func.grad``),
which is why the transformer spells attention out with matmuls and a softmax instead of using
``nn.MultiheadAttention`` or ``scaled_dot_product_attention``. The MLP, CNN and transformer have
no dropout and no batch normalisation, so train and eval mode compute the same function;
``resnet`` and ``vgg`` (with ``batch_norm``) have BatchNorm, whose train and eval modes differ
(see the README's "BatchNorm and dropout").
"""

from __future__ import annotations

import math

import torch
from torch import nn

from subspace_plugins import (
    _boolean,
    _choice,
    _factory,
    _integer,
    _integer_list,
    _optional_integer,
)

__all__ = ["MLP", "CNN", "Transformer", "ResNet", "VGG", "mlp", "cnn", "transformer", "resnet",
           "vgg"]

_ACTIVATIONS = {"tanh": torch.tanh, "relu": torch.relu}
_FEEDFORWARD_ACTIVATIONS = {"gelu": nn.functional.gelu, "relu": torch.relu}


class MLP(nn.Module):
    """Fully connected network: ``x.flatten(1)``, then Linear layers with an activation between.

    Parameters are named ``layers.<i>.weight`` / ``layers.<i>.bias``, the last layer being the
    classifier.
    """

    def __init__(
        self, input_dim: int, widths: list[int], num_classes: int, activation: str, bias: bool
    ) -> None:
        super().__init__()
        sizes = [input_dim, *widths, num_classes]
        pairs = zip(sizes[:-1], sizes[1:], strict=True)
        self.layers = nn.ModuleList(
            nn.Linear(fan_in, fan_out, bias=bias) for fan_in, fan_out in pairs
        )
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = _ACTIVATIONS[self.activation]
        h = x.flatten(1)
        for layer in self.layers[:-1]:
            h = act(layer(h))
        return self.layers[-1](h)


class CNN(nn.Module):
    """Two blocks of convolution + ReLU + max-pool 2, then one Linear layer.

    1-D convolutions for ``input_shape = [C, L]``, 2-D for ``[C, H, W]``. With 1-D and ``C = 1``,
    inputs of shape ``(N, L)`` are accepted and given a channel dimension.
    """

    def __init__(
        self, input_shape: list[int], num_classes: int, channels: int, kernel_size: int
    ) -> None:
        super().__init__()
        self.input_shape = list(input_shape)
        spatial = self.input_shape[1:]
        conv = nn.Conv1d if len(spatial) == 1 else nn.Conv2d
        padding = kernel_size // 2
        self.conv1 = conv(self.input_shape[0], channels, kernel_size, padding=padding)
        self.conv2 = conv(channels, channels, kernel_size, padding=padding)
        for _ in range(2):
            spatial = [(size + 2 * padding - kernel_size + 1) // 2 for size in spatial]
        self.head = nn.Linear(channels * math.prod(spatial), num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if len(self.input_shape) == 2 and self.input_shape[0] == 1 and x.dim() == 2:
            x = x.unsqueeze(1)
        pool = nn.functional.max_pool1d if len(self.input_shape) == 2 else nn.functional.max_pool2d
        h = pool(torch.relu(self.conv1(x)), 2)
        h = pool(torch.relu(self.conv2(h)), 2)
        return self.head(h.flatten(1))


def _image_input(x: torch.Tensor, input_shape: list[int]) -> torch.Tensor:
    """``x`` as a batch of ``input_shape`` images (flat rows are reshaped)."""
    return x.reshape(-1, *input_shape) if x.dim() != len(input_shape) + 1 else x


class BasicBlock(nn.Module):
    """ResNet's basic block: conv 3×3 (stride) + BN + ReLU, conv 3×3 + BN, plus the shortcut
    (a 1×1 convolution + BN where the shape changes), then ReLU."""

    def __init__(self, fan_in: int, fan_out: int, stride: int, batch_norm: bool) -> None:
        super().__init__()
        norm = nn.BatchNorm2d if batch_norm else (lambda c: nn.Identity())
        self.conv1 = nn.Conv2d(fan_in, fan_out, 3, stride=stride, padding=1, bias=not batch_norm)
        self.bn1 = norm(fan_out)
        self.conv2 = nn.Conv2d(fan_out, fan_out, 3, padding=1, bias=not batch_norm)
        self.bn2 = norm(fan_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or fan_in != fan_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(fan_in, fan_out, 1, stride=stride, bias=not batch_norm), norm(fan_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(h)) + self.shortcut(x))


class ResNet(nn.Module):
    """The CIFAR ResNet of He et al. (2016): a 3×3 stem, three stages of ``(depth - 2) / 6``
    basic blocks at widths w, 2w, 4w (the last two start with stride 2), global average
    pooling and a Linear head. ResNet-8: depth 8; ResNet-20: depth 20."""

    def __init__(self, input_shape: list[int], num_classes: int, depth: int, width: int,
                 batch_norm: bool) -> None:
        super().__init__()
        self.input_shape = list(input_shape)
        blocks = (depth - 2) // 6
        self.stem = nn.Conv2d(input_shape[0], width, 3, padding=1, bias=not batch_norm)
        self.bn = nn.BatchNorm2d(width) if batch_norm else nn.Identity()
        layers: list[nn.Module] = []
        fan_in = width
        for stage in range(3):
            fan_out = width * 2**stage
            for index in range(blocks):
                stride = 2 if stage and not index else 1
                layers.append(BasicBlock(fan_in, fan_out, stride, batch_norm))
                fan_in = fan_out
        self.blocks = nn.Sequential(*layers)
        self.head = nn.Linear(fan_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn(self.stem(_image_input(x, self.input_shape))))
        h = self.blocks(h)
        return self.head(h.mean(dim=(2, 3)))


#: VGG-11's convolution widths (at base width 64) and max-pools ("M").
_VGG11 = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")


class VGG(nn.Module):
    """VGG-11 (Simonyan & Zisserman, 2015, configuration A) for small images: 3×3
    convolutions (+ BatchNorm with ``batch_norm``) + ReLU, max-pool 2 where the image is still
    at least 2 pixels wide, global average pooling and a Linear head (the CIFAR variant's
    single classifier layer). Widths scale with ``width`` / 64."""

    def __init__(self, input_shape: list[int], num_classes: int, width: int,
                 batch_norm: bool) -> None:
        super().__init__()
        self.input_shape = list(input_shape)
        layers: list[nn.Module] = []
        fan_in, size = input_shape[0], min(input_shape[1:])
        for item in _VGG11:
            if item == "M":
                if size >= 2:
                    layers.append(nn.MaxPool2d(2))
                    size //= 2
                continue
            fan_out = max(1, int(item) * width // 64)
            layers.append(nn.Conv2d(fan_in, fan_out, 3, padding=1, bias=not batch_norm))
            if batch_norm:
                layers.append(nn.BatchNorm2d(fan_out))
            layers.append(nn.ReLU())
            fan_in = fan_out
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(fan_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.features(_image_input(x, self.input_shape))
        return self.head(h.mean(dim=(2, 3)))


class SelfAttention(nn.Module):
    """Multi-head self-attention written out as matmuls, so that forward-mode AD works."""

    def __init__(self, d_model: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(d_model, d_model)
        self.k = nn.Linear(d_model, d_model)
        self.v = nn.Linear(d_model, d_model)
        self.out = nn.Linear(d_model, d_model)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        n, length, d_model = h.shape
        head_dim = d_model // self.num_heads

        def split(t: torch.Tensor) -> torch.Tensor:  # (N, L, D) -> (N, heads, L, D / heads)
            return t.view(n, length, self.num_heads, head_dim).transpose(1, 2)

        q, k, v = split(self.q(h)), split(self.k(h)), split(self.v(h))
        weights = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(head_dim), dim=-1)
        mixed = (weights @ v).transpose(1, 2).reshape(n, length, d_model)
        return self.out(mixed)


class EncoderBlock(nn.Module):
    """Pre-LayerNorm block: ``h + attn(norm1(h))``, then ``h + ff(norm2(h))``."""

    def __init__(self, d_model: int, num_heads: int, dim_feedforward: int, activation: str):
        super().__init__()
        self.norm1 = nn.LayerNorm(d_model)
        self.attn = SelfAttention(d_model, num_heads)
        self.norm2 = nn.LayerNorm(d_model)
        self.ff1 = nn.Linear(d_model, dim_feedforward)
        self.ff2 = nn.Linear(dim_feedforward, d_model)
        self.activation = activation

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = h + self.attn(self.norm1(h))
        act = _FEEDFORWARD_ACTIVATIONS[self.activation]
        return h + self.ff2(act(self.ff1(self.norm2(h))))


class Transformer(nn.Module):
    """Encoder-only transformer classifier with mean pooling over the sequence.

    With a vocabulary, inputs are integer token ids of shape ``(N, L)``; without one, they are
    scalars of shape ``(N, L)`` or ``(N, L, 1)``, each lifted to ``d_model`` by ``Linear(1, d)``.
    ``L`` may be at most ``seq_len``. There is no padding mask: every position is attended to and
    pooled.
    """

    def __init__(
        self,
        num_classes: int,
        seq_len: int,
        vocab_size: int | None,
        d_model: int,
        num_heads: int,
        num_layers: int,
        dim_feedforward: int,
        activation: str,
    ) -> None:
        super().__init__()
        self.seq_len = seq_len
        self.vocab_size = vocab_size
        self.embed: nn.Module = (
            nn.Linear(1, d_model) if vocab_size is None else nn.Embedding(vocab_size, d_model)
        )
        self.position = nn.Embedding(seq_len, d_model)
        self.blocks = nn.ModuleList(
            EncoderBlock(d_model, num_heads, dim_feedforward, activation) for _ in range(num_layers)
        )
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.vocab_size is None:
            if x.dim() == 3 and x.shape[-1] == 1:
                x = x.squeeze(-1)
            if x.dim() != 2:
                raise ValueError(f"transformer expects scalar inputs (N, L), got {tuple(x.shape)}")
            h = self.embed(x.unsqueeze(-1))
        else:
            if x.dim() != 2 or x.is_floating_point():
                raise ValueError(
                    f"transformer expects integer token ids (N, L), got {x.dtype} {tuple(x.shape)}"
                )
            h = self.embed(x)
        length = x.shape[1]
        if length > self.seq_len:
            raise ValueError(f"sequence length {length} exceeds the model's seq_len {self.seq_len}")
        h = h + self.position.weight[:length]
        for block in self.blocks:
            h = block(h)
        return self.head(self.norm(h).mean(dim=1))


@_factory
def mlp(
    input_dim: int,
    num_classes: int,
    widths: list[int] | None = None,
    activation: str = "tanh",
    bias: bool = True,
) -> nn.Module:
    """Fully connected classifier (the paper's fc-tanh is ``40 → 200 → 200 → 10``, tanh).

    Args:
        input_dim: Number of input features after ``x.flatten(1)``.
        widths: Hidden-layer widths, default ``[200, 200]`` (fc-tanh); ``[]`` gives a linear
            classifier.
        num_classes: Number of outputs.
        activation: ``"tanh"`` or ``"relu"``, applied after every hidden layer.
        bias: Whether the Linear layers have biases.
    """
    where = "mlp"
    return MLP(
        _integer(where, "input_dim", input_dim, 1),
        _integer_list(where, "widths", [200, 200] if widths is None else widths, 1),
        _integer(where, "num_classes", num_classes, 1),
        _choice(where, "activation", activation, tuple(_ACTIVATIONS)),
        _boolean(where, "bias", bias),
    )


@_factory
def cnn(
    input_shape: list[int],
    num_classes: int = 10,
    channels: int = 32,
    kernel_size: int = 3,
) -> nn.Module:
    """The paper's cnn-relu: ``[conv + ReLU + max-pool 2] × 2``, flatten, Linear.

    Convolutions use ``padding = kernel_size // 2``.

    Args:
        input_shape: ``[C, L]`` for 1-D or ``[C, H, W]`` for 2-D convolutions (no batch size).
        num_classes: Number of outputs.
        channels: Channels of both convolutions.
        kernel_size: Kernel size of both convolutions.
    """
    where = "cnn"
    shape = _integer_list(where, "input_shape", input_shape, 1)
    if len(shape) not in (2, 3):
        raise ValueError(f"cnn: input_shape must be [C, L] or [C, H, W], got {input_shape!r}")
    kernel_size = _integer(where, "kernel_size", kernel_size, 1)
    spatial = shape[1:]
    for _ in range(2):
        spatial = [(size + 2 * (kernel_size // 2) - kernel_size + 1) // 2 for size in spatial]
    if min(spatial) < 1:
        raise ValueError(f"cnn: input_shape {shape} is too small for two conv + max-pool blocks")
    return CNN(
        shape,
        _integer(where, "num_classes", num_classes, 1),
        _integer(where, "channels", channels, 1),
        kernel_size,
    )


@_factory
def transformer(
    num_classes: int,
    seq_len: int,
    vocab_size: int | None = None,
    d_model: int = 64,
    num_heads: int = 8,
    num_layers: int = 2,
    dim_feedforward: int = 128,
    activation: str = "gelu",
) -> nn.Module:
    """Pre-LayerNorm encoder, final LayerNorm, mean-pool over positions, Linear head.

    Args:
        num_classes: Number of outputs.
        seq_len: Length of the learned positional embedding (the longest accepted input).
        vocab_size: Token vocabulary for integer inputs; ``None`` for scalar inputs.
        d_model: Model width; must be divisible by ``num_heads``.
        num_heads: Attention heads.
        num_layers: Encoder blocks.
        dim_feedforward: Hidden width of each block's MLP.
        activation: ``"gelu"`` or ``"relu"`` in the block MLPs.
    """
    where = "transformer"
    d_model = _integer(where, "d_model", d_model, 1)
    num_heads = _integer(where, "num_heads", num_heads, 1)
    if d_model % num_heads:
        raise ValueError(
            f"transformer: d_model ({d_model}) must be divisible by num_heads ({num_heads})"
        )
    return Transformer(
        num_classes=_integer(where, "num_classes", num_classes, 1),
        seq_len=_integer(where, "seq_len", seq_len, 1),
        vocab_size=_optional_integer(where, "vocab_size", vocab_size, 1),
        d_model=d_model,
        num_heads=num_heads,
        num_layers=_integer(where, "num_layers", num_layers, 0),
        dim_feedforward=_integer(where, "dim_feedforward", dim_feedforward, 1),
        activation=_choice(where, "activation", activation, tuple(_FEEDFORWARD_ACTIVATIONS)),
    )


def _image_shape(where: str, input_shape: list[int]) -> list[int]:
    shape = _integer_list(where, "input_shape", input_shape, 1)
    if len(shape) != 3:
        raise ValueError(f"{where}: input_shape must be [C, H, W], got {input_shape!r}")
    return shape


@_factory
def resnet(
    input_shape: list[int],
    num_classes: int = 10,
    depth: int = 8,
    width: int = 16,
    batch_norm: bool = True,
) -> nn.Module:
    """The CIFAR ResNet (ResNet-8 by default, ResNet-20 with ``depth`` 20), with BatchNorm.

    Args:
        input_shape: ``[C, H, W]`` of one image (1 or 3 channels, any size); flat inputs are
            reshaped to it.
        num_classes: Number of outputs.
        depth: 6n + 2 layers: n basic blocks in each of the three stages.
        width: Channels of the first stage (16 in He et al.); the others have 2× and 4×.
        batch_norm: BatchNorm after every convolution (without it, convolutions have biases).
    """
    where = "resnet"
    depth = _integer(where, "depth", depth, 8)
    if (depth - 2) % 6:
        raise ValueError(f"resnet: depth must be 6n + 2 (8, 14, 20, ...), got {depth}")
    return ResNet(_image_shape(where, input_shape), _integer(where, "num_classes", num_classes, 1),
                  depth, _integer(where, "width", width, 1), _boolean(where, "batch_norm",
                                                                      batch_norm))


@_factory
def vgg(
    input_shape: list[int],
    num_classes: int = 10,
    width: int = 64,
    batch_norm: bool = False,
) -> nn.Module:
    """VGG-11, with or without BatchNorm, for small images.

    Args:
        input_shape: ``[C, H, W]`` of one image (1 or 3 channels, any size); flat inputs are
            reshaped to it.
        num_classes: Number of outputs.
        width: Channels of the first convolution (64 in VGG-11; the others scale with it).
        batch_norm: BatchNorm after every convolution (VGG-11-BN).
    """
    where = "vgg"
    return VGG(_image_shape(where, input_shape), _integer(where, "num_classes", num_classes, 1),
               _integer(where, "width", width, 1), _boolean(where, "batch_norm", batch_norm))
