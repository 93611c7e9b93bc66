"""Issue 15: the built-in ResNet and VGG (BatchNorm) models, against dense float64 Hessians."""

from __future__ import annotations

import math

import pytest
import torch
from tiny_models import _seeded, dense_hessian, make_data

from subspace_cli.functional import select_parameters
from subspace_cli.hessian import HessianOperator

models = pytest.importorskip("subspace_plugins.models")


def _operator(model, data, loss, *, train_mode=False, include=(), chunk_size=1000):
    return HessianOperator(model, data, loss, layout=select_parameters(model, include),
                           chunk_size=chunk_size, device=torch.device("cpu"),
                           dtype=torch.float64, train_mode=train_mode, method="reverse")


def _randomize_statistics(model, seed):
    """Running statistics away from their defaults, so that eval mode differs from train."""
    g = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.copy_(0.2 * torch.randn(module.num_features, generator=g))
            module.running_var.copy_(0.5 + torch.rand(module.num_features, generator=g))


@pytest.mark.parametrize(("loss", "train_mode"), [("mse", False), ("ce", True)])
def test_resnet_hessian_matches_the_dense_float64_one(loss, train_mode):
    model = _seeded(lambda: models.resnet(input_shape=[1, 4, 4], num_classes=3, depth=8,
                                          width=1), 11)
    _randomize_statistics(model, 0)
    data = make_data((1, 4, 4), n=12)
    op = _operator(model, data, loss, train_mode=train_mode)
    got = op.matmat(torch.eye(op.n_params, dtype=torch.float64))
    want = dense_hessian(model, data, loss, train_mode=train_mode)
    torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-10)
    v = torch.randn(1, op.n_params, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    other = _operator(model, data, loss, train_mode=not train_mode).matmat(v)
    assert not torch.allclose(other, v @ want, atol=1e-6)  # the mode matters for BatchNorm


@pytest.mark.parametrize("batch_norm", [False, True])
def test_vgg_hessian_block_matches_the_dense_float64_one(batch_norm):
    """VGG-11 has eight convolutions, so the check is on the diagonal block of its first
    convolution and its head (the other parameters fixed), on 3-channel images."""
    model = _seeded(lambda: models.vgg(input_shape=[3, 4, 4], num_classes=3, width=1,
                                       batch_norm=batch_norm), 12)
    if batch_norm:
        _randomize_statistics(model, 1)
    data = make_data((3, 4, 4), n=10)
    include = ("features.0.*", "head.*")
    op = _operator(model, data, "ce", include=include)
    got = op.matmat(torch.eye(op.n_params, dtype=torch.float64))
    torch.testing.assert_close(got, _dense_block(model, data, ("features.0.", "head.")),
                               rtol=1e-8, atol=1e-10)


def _dense_block(model, data, prefixes):
    """The float64 Hessian of the mean cross-entropy (eval mode) over the parameters whose
    names start with ``prefixes``, the others fixed: torch.autograd.functional.hessian."""
    import copy

    model = copy.deepcopy(model).double().eval()
    chosen = [(n, p) for n, p in model.named_parameters() if n.startswith(prefixes)]
    fixed = {n: p.detach() for n, p in model.named_parameters() if not n.startswith(prefixes)}
    buffers = dict(model.named_buffers())
    flat = torch.cat([p.detach().reshape(-1) for _, p in chosen])

    def loss(theta):
        params, offset = {}, 0
        for name, p in chosen:
            params[name] = theta[offset:offset + p.numel()].view(p.shape)
            offset += p.numel()
        out = torch.func.functional_call(model, {**fixed, **params, **buffers},
                                         (data.x.double(),))
        return torch.nn.functional.cross_entropy(out, data.y)

    return torch.autograd.functional.hessian(loss, flat)


def test_resnet_depths_widths_and_inputs():
    resnet20 = models.resnet(input_shape=[3, 32, 32], num_classes=10, depth=20, width=16)
    assert sum(p.numel() for p in resnet20.parameters()) == 272_474  # He et al.'s 0.27M
    assert resnet20(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    tiny = models.resnet(input_shape=[1, 5, 7], num_classes=4, width=2)
    assert tiny(torch.zeros(3, 35)).shape == (3, 4)  # flat rows are reshaped; odd sizes work
    with pytest.raises(ValueError, match="depth must be 6n \\+ 2"):
        models.resnet(input_shape=[1, 8, 8], depth=10)
    with pytest.raises(ValueError, match=r"input_shape must be \[C, H, W\]"):
        models.resnet(input_shape=[1, 8])
    plain = models.resnet(input_shape=[1, 8, 8], batch_norm=False)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in plain.modules())


def test_vgg11_layers_and_small_images():
    big = models.vgg(input_shape=[3, 32, 32], num_classes=10)
    convs = [m for m in big.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [64, 128, 256, 256, 512, 512, 512, 512]
    assert sum(isinstance(m, torch.nn.MaxPool2d) for m in big.modules()) == 5
    assert big(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    small = models.vgg(input_shape=[1, 8, 8], num_classes=10, width=8, batch_norm=True)
    assert sum(isinstance(m, torch.nn.MaxPool2d) for m in small.modules()) == 3  # 8 → 4 → 2 → 1
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in small.modules()) == 8
    assert small(torch.zeros(2, 64)).shape == (2, 10)
    with torch.no_grad():
        assert math.isfinite(float(small(torch.randn(4, 1, 8, 8)).sum()))
