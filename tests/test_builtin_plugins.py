"""The built-in models and datasets of the ``subspace-plugins`` distribution.

Entry-point tests need the distribution installed (``pip install -e plugins --no-deps``).
"""

from __future__ import annotations

import random
from importlib.metadata import PackageNotFoundError, distribution, entry_points

import h5py
import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch.func import functional_call, grad, jvp

from subspace_cli.data import TrainingData
from subspace_plugins import MissingDependencyError, datasets, models
from subspace_plugins.datasets import digits, mnist1d, mnist1d_num_samples, tensors
from subspace_plugins.models import cnn, mlp, transformer

# torch 2.13 scripts its forward-AD decompositions on the first jvp and warns about its own use of
# torch.jit.script; nothing in this project calls it.
pytestmark = pytest.mark.filterwarnings(
    "ignore:`torch.jit.script` is deprecated:DeprecationWarning"
)


def parameter_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --- models: shapes and parameter counts -------------------------------------------------------


def test_mlp_fc_tanh_parameter_count_and_names() -> None:
    model = mlp(input_dim=40, widths=[200, 200], num_classes=10, activation="tanh")
    assert parameter_count(model) == 40 * 200 + 200 + 200 * 200 + 200 + 200 * 10 + 10 == 50410
    names = [name for name, _ in model.named_parameters()]
    assert names == [f"layers.{i}.{kind}" for i in range(3) for kind in ("weight", "bias")]
    assert model(torch.randn(5, 40)).shape == (5, 10)
    # Inputs are flattened: an (N, 1, 8, 8) image batch feeds a 64-input MLP.
    assert mlp(input_dim=64, widths=[], num_classes=10)(torch.randn(3, 1, 8, 8)).shape == (3, 10)


def test_mlp_without_bias_and_relu() -> None:
    model = mlp(input_dim=4, widths=[3], num_classes=2, activation="relu", bias=False)
    assert parameter_count(model) == 4 * 3 + 3 * 2


def test_cnn_1d_parameter_count_and_forward() -> None:
    model = cnn(input_shape=[1, 40], num_classes=10)
    conv1 = 32 * 1 * 3 + 32
    conv2 = 32 * 32 * 3 + 32
    head = 32 * 10 * 10 + 10  # length 40 -> 20 -> 10
    assert parameter_count(model) == conv1 + conv2 + head == 6442
    assert model(torch.randn(4, 40)).shape == (4, 10)  # MNIST-1D vectors, channel added
    assert model(torch.randn(4, 1, 40)).shape == (4, 10)


def test_cnn_2d_parameter_count_and_forward() -> None:
    model = cnn(input_shape=[3, 32, 32], num_classes=10)
    conv1 = 32 * 3 * 9 + 32
    conv2 = 32 * 32 * 9 + 32
    head = 32 * 8 * 8 * 10 + 10  # 32 -> 16 -> 8
    assert parameter_count(model) == conv1 + conv2 + head == 30634
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    digits_model = cnn(input_shape=[1, 8, 8], channels=4, kernel_size=5)
    assert parameter_count(digits_model) == (4 * 25 + 4) + (4 * 4 * 25 + 4) + (4 * 2 * 2 * 10 + 10)
    assert digits_model(torch.randn(2, 1, 8, 8)).shape == (2, 10)


def transformer_count(embed: int, seq_len: int, d: int, f: int, layers: int, classes: int) -> int:
    block = 2 * d + 4 * (d * d + d) + 2 * d + (d * f + f) + (f * d + d)
    return embed + seq_len * d + layers * block + 2 * d + d * classes + classes


def test_transformer_scalar_inputs() -> None:
    model = transformer(num_classes=2, seq_len=40)
    assert parameter_count(model) == transformer_count(2 * 64, 40, 64, 128, 2, 2) == 69890
    assert model(torch.randn(3, 40)).shape == (3, 2)
    assert model(torch.randn(3, 40, 1)).shape == (3, 2)
    assert model(torch.randn(3, 25)).shape == (3, 2)  # shorter than seq_len is fine
    with pytest.raises(ValueError, match="exceeds"):
        model(torch.randn(3, 41))


def test_transformer_token_inputs() -> None:
    model = transformer(num_classes=2, seq_len=66, vocab_size=1000)
    assert parameter_count(model) == transformer_count(1000 * 64, 66, 64, 128, 2, 2) == 135426
    assert model(torch.randint(0, 1000, (3, 66))).shape == (3, 2)
    with pytest.raises(ValueError, match="token ids"):
        model(torch.randn(3, 66))


def test_models_are_deterministic_under_a_seed() -> None:
    def build() -> dict[str, torch.Tensor]:
        torch.manual_seed(7)
        return transformer(num_classes=3, seq_len=5, d_model=8, num_heads=2).state_dict()

    first, second = build(), build()
    assert all(torch.equal(first[key], second[key]) for key in first)


@pytest.mark.parametrize(
    ("factory", "config", "message"),
    [
        (mlp, {"input_dim": 4, "widths": [3], "num_classes": 2, "depth": 3}, "allowed: input_dim"),
        (mlp, {"widths": [3], "num_classes": 2}, "missing required config key"),
        (mlp, {"input_dim": 4.5, "widths": [3], "num_classes": 2}, "input_dim must be an integer"),
        (mlp, {"input_dim": 4, "widths": 3, "num_classes": 2}, "widths must be a list"),
        (mlp, {"input_dim": 4, "widths": [0], "num_classes": 2}, r"widths\[0\] must be at least"),
        (mlp, {"input_dim": 4, "widths": [], "num_classes": 2, "activation": "elu"}, "tanh, relu"),
        (mlp, {"input_dim": 4, "widths": [], "num_classes": 2, "bias": 1}, "true or false"),
        (cnn, {"input_shape": [40]}, r"\[C, L\] or \[C, H, W\]"),
        (cnn, {"input_shape": [1, 3]}, "too small"),
        (transformer, {"num_classes": 2, "seq_len": 8, "d_model": 10}, "divisible"),
        (transformer, {"num_classes": 2, "seq_len": 8, "activation": "tanh"}, "gelu, relu"),
    ],
)
def test_bad_model_config_is_a_value_error(factory, config, message) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match=message):
        factory(**config)


# --- models: forward-mode AD against double backward -------------------------------------------


def mse_sum(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    target = torch.nn.functional.one_hot(y, out.shape[-1]).to(out.dtype)
    return 0.5 * ((out - target) ** 2).sum()


def hvp_forward_over_reverse(model, x, y, vector):  # type: ignore[no-untyped-def]
    params = {name: p.detach() for name, p in model.named_parameters()}

    def loss(p):  # type: ignore[no-untyped-def]
        return mse_sum(functional_call(model, p, (x,)), y)

    return jvp(grad(loss), (params,), (vector,))[1]


def hvp_double_backward(model, x, y, vector):  # type: ignore[no-untyped-def]
    params = dict(model.named_parameters())
    loss = mse_sum(model(x), y)
    grads = torch.autograd.grad(loss, list(params.values()), create_graph=True)
    dot = sum((g * vector[name]).sum() for g, (name, _) in zip(grads, params.items(), strict=True))
    hvp = torch.autograd.grad(dot, list(params.values()))
    return dict(zip(params, hvp, strict=True))


@pytest.mark.parametrize(
    ("name", "build", "make_x"),
    [
        ("mlp", lambda: mlp(input_dim=6, widths=[5, 4], num_classes=3), lambda: torch.randn(7, 6)),
        (
            "cnn1d",
            lambda: cnn(input_shape=[1, 12], num_classes=3, channels=3),
            lambda: torch.randn(7, 12),
        ),
        (
            "cnn2d",
            lambda: cnn(input_shape=[2, 8, 8], num_classes=3, channels=3),
            lambda: torch.randn(7, 2, 8, 8),
        ),
        (
            "transformer-scalar",
            lambda: transformer(
                num_classes=3, seq_len=6, d_model=8, num_heads=2, dim_feedforward=8
            ),
            lambda: torch.randn(7, 6),
        ),
        (
            "transformer-tokens",
            lambda: transformer(
                num_classes=3, seq_len=6, vocab_size=11, d_model=8, num_heads=2, activation="relu"
            ),
            lambda: torch.randint(0, 11, (7, 6)),
        ),
    ],
)
def test_forward_mode_hvp_matches_double_backward(name, build, make_x) -> None:  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    model = build().double()
    x = make_x()
    x = x.double() if x.is_floating_point() else x
    y = torch.randint(0, 3, (7,))
    vector = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    forward = hvp_forward_over_reverse(model, x, y, vector)
    reverse = hvp_double_backward(model, x, y, vector)
    assert forward.keys() == reverse.keys()
    for key in forward:
        torch.testing.assert_close(forward[key], reverse[key], rtol=1e-5, atol=1e-5, msg=key)


# --- datasets ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n_train", "num_samples"), [(5000, 6250), (1, 10), (8, 10), (9, 20), (100, 130), (4000, 5000)]
)
def test_mnist1d_num_samples(n_train: int, num_samples: int) -> None:
    assert mnist1d_num_samples(n_train) == num_samples
    assert int(num_samples * 0.8) >= n_train > int((num_samples - 10) * 0.8)


def test_mnist1d_is_deterministic_and_leaks_no_global_rng_state() -> None:
    random.seed(123)
    np.random.seed(123)
    python_state, numpy_state = random.getstate(), np.random.get_state()
    first = mnist1d(n_train=50)
    assert random.getstate() == python_state
    after = np.random.get_state()
    assert after[0] == numpy_state[0] and np.array_equal(after[1], numpy_state[1])
    assert after[2:] == numpy_state[2:]
    second = mnist1d(n_train=50)
    assert isinstance(first, TrainingData) and first.num_classes == 10
    assert first.x is not None and first.y is not None and second.x is not None
    assert first.x.shape == (50, 40) and first.x.dtype == torch.float32
    assert first.y.shape == (50,) and first.y.dtype == torch.int64
    assert torch.equal(first.x, second.x) and torch.equal(first.y, second.y)  # type: ignore[arg-type]
    other_seed = mnist1d(n_train=50, seed=0)
    assert not torch.equal(first.x, other_seed.x)  # type: ignore[arg-type]


@pytest.mark.slow
def test_mnist1d_5k_uses_6250_generated_samples(monkeypatch: pytest.MonkeyPatch) -> None:
    import mnist1d.data as generator

    seen = []
    real = generator.make_dataset

    def spy(args, *rest):  # type: ignore[no-untyped-def]
        seen.append(args.num_samples)
        return real(args, *rest)

    monkeypatch.setattr(generator, "make_dataset", spy)
    monkeypatch.setattr(generator, "get_dataset", lambda *a, **k: pytest.fail("downloads"))
    data = mnist1d(n_train=5000)
    assert seen == [6250]
    assert len(data) == 5000 and data.y is not None
    assert set(data.y.tolist()) == set(range(10))


@pytest.mark.parametrize(
    ("factory", "package", "message"),
    [
        (lambda: mnist1d(n_train=10), "mnist1d", "install mnist1d to use the mnist1d dataset"),
        (lambda: digits(n_train=10), "sklearn", "install scikit-learn to use the digits dataset"),
    ],
)
def test_missing_optional_dependency_is_a_friendly_import_error(  # type: ignore[no-untyped-def]
    monkeypatch, factory, package, message
) -> None:
    import sys

    class NotInstalled:
        @staticmethod
        def find_spec(name, path=None, target=None):  # type: ignore[no-untyped-def]
            if name == package:
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)

    for module in [m for m in sys.modules if m == package or m.startswith(package + ".")]:
        monkeypatch.delitem(sys.modules, module)
    monkeypatch.setattr(sys, "meta_path", [NotInstalled(), *sys.meta_path])
    with pytest.raises(MissingDependencyError, match=message) as info:
        factory()
    assert isinstance(info.value, ImportError)
    assert "pip install 'subspace-plugins[datasets]'" in str(info.value)


def test_digits_shapes() -> None:
    image = digits()
    assert image.x is not None and image.y is not None
    assert image.x.shape == (1797, 1, 8, 8) and image.x.dtype == torch.float32
    assert image.y.shape == (1797,) and image.y.dtype == torch.int64 and image.num_classes == 10
    assert float(image.x.min()) == 0.0 and float(image.x.max()) == 1.0
    flat = digits(n_train=100, shape="flat", normalize=False)
    assert flat.x is not None and flat.x.shape == (100, 64) and float(flat.x.max()) == 16.0
    assert torch.equal(flat.x / 16, image.x[:100].reshape(100, 64))
    with pytest.raises(ValueError, match="at most 1797"):
        digits(n_train=2000)
    with pytest.raises(ValueError, match="image, flat"):
        digits(shape="sequence")


# --- tensors -------------------------------------------------------------------------------------


def write(path, arrays) -> str:  # type: ignore[no-untyped-def]
    suffix = path.suffix
    if suffix == ".safetensors":
        save_file({k: torch.as_tensor(v).contiguous() for k, v in arrays.items()}, str(path))
    elif suffix == ".npz":
        np.savez(path, **arrays)
    else:
        with h5py.File(path, "w") as handle:
            for key, value in arrays.items():
                handle[key] = value
    return str(path)


@pytest.mark.parametrize("suffix", [".safetensors", ".npz", ".h5", ".hdf5"])
def test_tensors_loads_every_format(tmp_path, suffix: str) -> None:  # type: ignore[no-untyped-def]
    x = np.random.default_rng(0).normal(size=(6, 3, 4)).astype(np.float64)
    y = np.array([0, 1, 2, 1, 0, 4], dtype=np.int32)
    path = write(tmp_path / f"data{suffix}", {"x": x, "y": y})
    data = tensors(path=path)
    assert data.x is not None and data.y is not None
    assert data.x.dtype == torch.float32 and data.x.shape == (6, 3, 4)
    assert data.y.dtype == torch.int64 and data.y.tolist() == y.tolist()
    assert data.num_classes == 5
    assert tensors(path=path, num_classes=7).num_classes == 7
    assert len(tensors(path=tmp_path / f"data{suffix}")) == 6  # a pathlib.Path from Python


def test_tensors_custom_keys_tokens_and_whole_float_labels(tmp_path) -> None:  # type: ignore[no-untyped-def]
    tokens = np.array([[1, 2, 3], [4, 5, 6]], dtype=np.int32)
    path = write(tmp_path / "d.npz", {"inputs": tokens, "labels": np.array([1.0, 0.0])})
    data = tensors(path=path, x_key="inputs", y_key="labels")
    assert data.x is not None and data.x.dtype == torch.int64
    assert data.y is not None and data.y.tolist() == [1, 0]


@pytest.mark.parametrize(
    ("arrays", "config", "message"),
    [
        ({"x": np.zeros((3, 2)), "y": np.zeros(3, dtype=int)}, {"y_key": "t"}, "no array 't'"),
        ({"x": np.zeros((3, 2)), "y": np.zeros(4, dtype=int)}, {}, "3 inputs .* 4 labels"),
        ({"x": np.zeros((2, 2)), "y": np.array([0.5, 1.0])}, {}, "not whole numbers"),
        ({"x": np.zeros((2, 2)), "y": np.array([-1, 1])}, {}, "non-negative"),
        ({"x": np.zeros((2, 2)), "y": np.eye(2)}, {}, r"shape \(N,\)"),
        ({"x": np.zeros((2, 2)), "y": np.array([0, 9])}, {"num_classes": 5}, "up to 9"),
    ],
)
@pytest.mark.parametrize("suffix", [".safetensors", ".npz", ".h5"])
def test_tensors_errors(tmp_path, suffix, arrays, config, message) -> None:  # type: ignore[no-untyped-def]
    path = write(tmp_path / f"bad{suffix}", arrays)
    with pytest.raises(ValueError, match=message):
        tensors(path=path, **config)


def test_tensors_file_errors(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match="no such file"):
        tensors(path=str(tmp_path / "absent.npz"))
    with pytest.raises(ValueError, match="unsupported extension"):
        tensors(path=str(tmp_path / "data.csv"))
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="cannot read"):
        tensors(path=str(corrupt))
    pickled = tmp_path / "objects.npz"
    np.savez(pickled, x=np.array([{"a": 1}], dtype=object), y=np.array([0]))
    with pytest.raises(ValueError, match="pickled"):
        tensors(path=str(pickled))


# --- entry points --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("group", "modules"),
    [
        ("subspace.models", {"cnn": models, "mlp": models, "resnet": models,
                             "transformer": models, "vgg": models, "hf": "subspace_plugins.hf"}),
        ("subspace.data", {"digits": datasets, "mnist1d": datasets, "tensors": datasets,
                           "tokens": datasets}),
    ],
)
def test_entry_points_are_registered(group: str, modules: dict[str, object]) -> None:
    import importlib

    try:
        distribution("subspace-plugins")
    except PackageNotFoundError:
        pytest.skip("subspace-plugins is not installed (pip install -e plugins --no-deps)")
    found = {ep.name: ep for ep in entry_points(group=group) if ep.dist.name == "subspace-plugins"}
    assert sorted(found) == sorted(modules)
    for name, ep in found.items():
        module = modules[name]
        module = importlib.import_module(module) if isinstance(module, str) else module
        assert ep.value == f"{module.__name__}:{name}"  # type: ignore[attr-defined]
        assert ep.load() is getattr(module, name)
