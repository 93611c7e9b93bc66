"""HessianOperator against dense float64 Hessians, and its guarantees about the model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_models import (
    CASES,
    TinyBatchNormNet,
    case_hessian,
    dense_hessian,
    make_data,
)

from subspace_cli.data import TrainingData
from subspace_cli.errors import NumericalError, UsageError
from subspace_cli.functional import ParameterLayout, select_parameters
from subspace_cli.hessian import HessianOperator


def dense(case_id: str) -> torch.Tensor:
    return case_hessian(case_id)


def make_operator(case_id: str, **options: object) -> HessianOperator:
    model_factory, data_factory, loss = CASES[case_id]
    options.setdefault("dtype", torch.float64)
    return HessianOperator(model_factory(), data_factory(), loss, **options)  # type: ignore[arg-type]


def random_block(m: int, n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(m, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.fixture(params=sorted(CASES))
def case_id(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.mark.parametrize("method", ["forward", "reverse", "forward-loop", "reverse-loop"])
def test_matmat_matches_dense_hessian(case_id: str, method: str) -> None:
    hessian = dense(case_id)
    op = make_operator(case_id, method=method, chunk_size=7)
    vectors = random_block(3, op.n_params)
    products = op.matmat(vectors)
    assert products.dtype == torch.float64
    torch.testing.assert_close(products, vectors @ hessian, rtol=1e-9, atol=1e-11)
    assert op.method == method
    assert op.hvp_count == 3


def test_forward_over_reverse_equals_reverse_over_reverse(case_id: str) -> None:
    vectors = random_block(4, make_operator(case_id).n_params, seed=1)
    forward = make_operator(case_id, method="forward").matmat(vectors)
    reverse = make_operator(case_id, method="reverse").matmat(vectors)
    torch.testing.assert_close(forward, reverse, rtol=1e-10, atol=1e-12)


def test_chunked_equals_unchunked() -> None:
    vectors = random_block(2, make_operator("mlp-tanh/ce").n_params)
    whole = make_operator("mlp-tanh/ce", chunk_size=10_000).matmat(vectors)
    for chunk_size in (1, 5, 7):  # 24 samples: uneven last chunks too
        chunked = make_operator("mlp-tanh/ce", chunk_size=chunk_size).matmat(vectors)
        torch.testing.assert_close(chunked, whole, rtol=1e-11, atol=1e-13)


def test_matmat_equals_matvec() -> None:
    op = make_operator("cnn-2d/mse", method="reverse")
    vectors = random_block(3, op.n_params)
    block = op.matmat(vectors)
    for vector, product in zip(vectors, block, strict=True):
        torch.testing.assert_close(op.matvec(vector), product, rtol=1e-11, atol=1e-13)
    assert op.hvp_count == 6


def test_auto_measures_the_four_methods_and_keeps_one() -> None:
    op = make_operator("mlp-relu/mse", method="auto")
    assert op.method is None
    vectors = random_block(2, op.n_params)
    torch.testing.assert_close(op.matmat(vectors), vectors @ dense("mlp-relu/mse"))
    assert op.method in ("forward", "reverse", "forward-loop", "reverse-loop")
    assert set(op.method_seconds) == {"forward", "reverse", "forward-loop", "reverse-loop"}
    assert op.method_seconds[op.method] == min(op.method_seconds.values())
    assert op.hvp_count == 2  # the timing runs are not HVPs the caller asked for
    # ...but they are reported (24 samples < 32: each warm-up is a whole-chunk product here;
    # test_auto_probe_runs_and_counts_exactly_these_products pins the general case)
    assert op.probe_runs in (6, 7, 8)
    assert op.probe_hvps == pytest.approx(4 * 2 + (op.probe_runs - 1) * 2)
    assert make_operator("mlp-relu/mse", method="reverse").probe_hvps == 0.0


def _small_mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3))


def kernel_product(model: torch.nn.Module, fail: object = None) -> object:
    """A chunk-product function for :func:`subspace_cli.hvp.race` built from the public
    kernels, with the model's float64 θ; ``fail(method, x)`` may raise to simulate a failure."""
    from subspace_cli import hvp
    from subspace_cli.functional import FunctionalModel
    from subspace_cli.losses import loss_sum

    functional = FunctionalModel(model, select_parameters(model), device=torch.device("cpu"),
                                 dtype=torch.float64, train_mode=False)
    theta = functional.current_parameters()
    store, state = hvp.GraphStore(1 << 30), hvp.ReverseState()

    def product(method, x, y, vectors, index):  # type: ignore[no-untyped-def]
        if fail is not None:
            fail(method, x)  # type: ignore[operator]
        x = x.to(torch.float64)

        def loss(t: torch.Tensor) -> torch.Tensor:
            return loss_sum("mse", functional(t, x), y)

        batched = not method.endswith("-loop")
        if hvp.ad_mode(method) == "forward":
            return hvp.forward_hvp(loss, theta, vectors, batched=batched)
        leaf, grad = store.get(loss, theta, index)
        return hvp.reverse_hvp(leaf, grad, vectors, batched=batched, state=state)

    return product


def chunk_of(data: TrainingData, n: int) -> TrainingData:
    assert data.x is not None and data.y is not None
    return TrainingData(num_classes=data.num_classes, x=data.x[:n], y=data.y[:n])


def test_the_race_runs_and_counts_exactly_these_products() -> None:
    """A 40-sample chunk, 3 vectors, a fake clock with a fixed cost per method."""
    from subspace_cli import hvp

    cost = {"forward": 4.0, "reverse": 3.0, "forward-loop": 1.4, "reverse-loop": 1.0}
    clock = [0.0]
    calls: list[tuple[str, int, int]] = []
    model, data = _small_mlp(), make_data((3,), n=96)
    inner = kernel_product(model)

    def product(method, x, y, vectors, index):  # type: ignore[no-untyped-def]
        calls.append((method, x.shape[0], vectors.shape[0]))
        clock[0] += cost[method]
        return inner(method, x, y, vectors, index)  # type: ignore[operator]

    chunk = chunk_of(data, 40)
    vectors = random_block(3, select_parameters(model).n_params)
    result = hvp.race(product, chunk.x, chunk.y, vectors, 0, clock=lambda: clock[0])
    warm_ups = [(name, 32, 2) for name in ("forward", "reverse", "forward-loop", "reverse-loop")]
    timed = [(name, 40, 3) for name in ("forward", "reverse", "forward-loop", "reverse-loop")]
    # round 2, fastest first: the two fastest (reverse-loop, forward-loop, within 1.5x of the
    # best anyway), not the others
    retimed = [("reverse-loop", 40, 3), ("forward-loop", 40, 3)]
    assert calls == warm_ups + timed + retimed
    assert result.method == "reverse-loop" and result.runs == 6
    assert result.seconds == pytest.approx(cost)
    assert result.work == 4 * 2 * 32 + 5 * 3 * 40  # everything but the kept product
    # the kept product is the chunk's sum of per-sample HVPs
    expected = 40 * (vectors @ dense_hessian(model, chunk, "mse"))
    torch.testing.assert_close(result.product, expected)


def test_an_operator_that_races_reports_the_race() -> None:
    model, data = _small_mlp(), make_data((3,), n=96)
    op = HessianOperator(model, data, "mse", dtype=torch.float64, chunk_size=40)
    vectors = random_block(3, op.n_params)
    torch.testing.assert_close(op.matmat(vectors), vectors @ dense_hessian(model, data, "mse"))
    assert op.method_choice == "timed" and op.method in op.method_seconds
    assert 6 <= op.probe_runs <= 8
    # four warm-ups on 32 samples, four timed whole-chunk products and two to four retimed
    # ones, less the one kept, over 96 samples
    assert (4 * 2 * 32 + 5 * 3 * 40) / 96 <= op.probe_hvps <= (4 * 2 * 32 + 7 * 3 * 40) / 96
    assert op.hvp_count == 3


def test_auto_with_one_vector_on_a_cpu_takes_reverse_loop_without_a_race() -> None:
    model, data = _small_mlp(), make_data((3,), n=96)
    op = HessianOperator(model, data, "mse", dtype=torch.float64)
    vector = random_block(1, op.n_params)[0]
    torch.testing.assert_close(op.matvec(vector), dense_hessian(model, data, "mse") @ vector)
    assert op.method == "reverse-loop" and op.method_choice == "one vector on a CPU"
    assert op.method_seconds == {} and op.probe_runs == 0 and op.probe_hvps == 0.0


def test_a_one_vector_race_when_reverse_mode_fails_uses_the_loops() -> None:
    from subspace_cli import hvp

    def no_double_backward(method: str, x: torch.Tensor) -> None:
        if hvp.ad_mode(method) == "reverse":
            raise RuntimeError("the derivative for 'fake_op' is not implemented")

    model, data = _small_mlp(), make_data((3,), n=96)
    product = kernel_product(model, no_double_backward)
    vector = random_block(1, select_parameters(model).n_params)
    result = hvp.race(product, data.x, data.y, vector, 0)  # type: ignore[arg-type]
    assert result.method == "forward-loop" and set(result.seconds) == {"forward-loop"}
    torch.testing.assert_close(result.product, 96 * (vector @ dense_hessian(model, data, "mse")))


def test_a_race_where_nothing_differentiates_names_the_op() -> None:
    from subspace_cli import hvp

    def nothing(method: str, x: torch.Tensor) -> None:
        raise RuntimeError("the derivative for 'fake_op' is not implemented")

    model, data = _small_mlp(), make_data((3,), n=96)
    vectors = random_block(2, select_parameters(model).n_params)
    with pytest.raises(NumericalError, match="derivative for 'fake_op'"):
        hvp.race(kernel_product(model, nothing), data.x, data.y, vectors, 0)  # type: ignore[arg-type]


def test_a_raced_choice_is_cached_for_the_next_operator(tmp_path: Path) -> None:
    model, data = _small_mlp(), make_data((3,), n=96)
    vectors = random_block(2, select_parameters(model).n_params)
    first = HessianOperator(model, data, "mse", dtype=torch.float64)
    first.matmat(vectors)
    assert first.method_choice == "timed" and first.probe_runs > 0
    second = HessianOperator(model, data, "mse", dtype=torch.float64)
    torch.testing.assert_close(second.matmat(vectors), vectors @ dense_hessian(model, data, "mse"))
    assert second.method == first.method and second.method_choice == "cached"
    assert second.probe_runs == 0 and second.probe_hvps == 0.0
    # another block size is another key: raced again
    third = HessianOperator(model, data, "mse", dtype=torch.float64)
    third.matmat(random_block(3, third.n_params))
    assert third.method_choice == "timed"


def test_a_damaged_cache_is_ignored_and_replaced() -> None:
    from subspace_cli.usercache import cache_dir

    cache_dir().mkdir(parents=True, exist_ok=True)
    (cache_dir() / "hvp_methods.json").write_text("{not json")
    model, data = _small_mlp(), make_data((3,), n=96)
    op = HessianOperator(model, data, "mse", dtype=torch.float64)
    op.matmat(random_block(2, op.n_params))
    assert op.method_choice == "timed"
    assert op.method in json.loads((cache_dir() / "hvp_methods.json").read_text()).values()


@pytest.mark.parametrize("method", ["reverse", "reverse-loop"])
def test_kept_graphs_give_the_same_products(method: str) -> None:
    model, data = _small_mlp(), make_data((3,), n=96)
    vectors = random_block(3, select_parameters(model).n_params)
    expected = vectors @ dense_hessian(model, data, "mse")
    kept = HessianOperator(model, data, "mse", dtype=torch.float64, chunk_size=40, method=method)
    rebuilt = HessianOperator(model, data, "mse", dtype=torch.float64, chunk_size=40,
                              method=method, graph_memory=0)
    for _ in range(2):  # the second product runs on the kept graphs
        torch.testing.assert_close(kept.matmat(vectors), expected, rtol=1e-11, atol=1e-13)
        torch.testing.assert_close(rebuilt.matmat(vectors), expected, rtol=1e-11, atol=1e-13)
    assert kept.graphs_kept == 3 and kept.graph_bytes > 0
    assert rebuilt.graphs_kept == 0 and rebuilt.graph_bytes == 0


def test_graphs_are_kept_only_within_the_budget() -> None:
    model, data = _small_mlp(), make_data((3,), n=96)
    probe = HessianOperator(model, data, "mse", dtype=torch.float64, chunk_size=32,
                            method="reverse-loop")
    vectors = random_block(2, probe.n_params)
    probe.matmat(vectors)
    per_chunk = probe.graph_bytes / 3
    op = HessianOperator(model, data, "mse", dtype=torch.float64, chunk_size=32,
                         method="reverse-loop", graph_memory=int(2.5 * per_chunk))
    for _ in range(2):
        torch.testing.assert_close(op.matmat(vectors), vectors @ dense_hessian(model, data, "mse"))
    assert op.graphs_kept == 2 and op.graph_bytes <= op.graph_budget
    with pytest.raises(UsageError, match="graph memory"):
        HessianOperator(model, data, "mse", graph_memory=-1)


def test_kept_graphs_are_freed_with_their_operator() -> None:
    """A kept graph must not outlive its operator: measuring it with a saved-tensor pack hook
    stored Python tensors in the graph, which then referred back to their own nodes, a cycle
    Python's collector cannot see (project-train grew by the graphs of every step)."""
    import gc

    model, data = _small_mlp(), make_data((3,), n=96)
    base = HessianOperator(model, data, "mse", dtype=torch.float64, chunk_size=40,
                           method="reverse-loop")
    vectors = random_block(2, base.n_params)
    theta = base.functional.current_parameters()

    def live_tensors() -> int:
        import warnings

        gc.collect()
        with warnings.catch_warnings():  # isinstance on torch's deprecated module proxies warns
            warnings.simplefilter("ignore", FutureWarning)
            return sum(isinstance(o, torch.Tensor) for o in gc.get_objects())

    before = live_tensors()
    for step in range(5):
        op = base.at(theta + 1e-3 * step)
        op.matmat(vectors)
        assert op.graphs_kept == 3
        del op
    assert live_tensors() - before < 10


def test_a_method_failing_only_on_the_whole_chunk_drops_out() -> None:
    from subspace_cli import hvp

    def out_of_memory(method: str, x: torch.Tensor) -> None:
        if hvp.ad_mode(method) == "forward" and x.shape[0] > 32:
            raise RuntimeError("out of memory (simulated)")

    model, data = _small_mlp(), make_data((3,), n=96)
    vectors = random_block(2, select_parameters(model).n_params)
    result = hvp.race(kernel_product(model, out_of_memory), data.x, data.y, vectors, 0)  # type: ignore[arg-type]
    assert result.method in ("reverse", "reverse-loop")
    assert set(result.seconds) == {"reverse", "reverse-loop"}
    torch.testing.assert_close(result.product, 96 * (vectors @ dense_hessian(model, data, "mse")))


def test_loop_methods_do_not_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    model, data = _small_mlp(), make_data((3,), n=30)
    vectors = random_block(3, select_parameters(model).n_params)
    expected = vectors @ dense_hessian(model, data, "mse")
    batched_grads: list[bool] = []
    grad = torch.autograd.grad

    def recording_grad(*args, **kwargs):  # type: ignore[no-untyped-def]
        batched_grads.append(bool(kwargs.get("is_grads_batched", False)))
        return grad(*args, **kwargs)

    def no_vmap(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise AssertionError("forward-loop must not vmap")

    monkeypatch.setattr(torch.autograd, "grad", recording_grad)
    monkeypatch.setattr(torch.func, "vmap", no_vmap)
    for method in ("reverse-loop", "forward-loop"):
        op = HessianOperator(model, data, "mse", dtype=torch.float64, method=method)
        torch.testing.assert_close(op.matmat(vectors), expected)
    assert batched_grads and not any(batched_grads)
    reverse = HessianOperator(model, data, "mse", dtype=torch.float64, method="reverse")
    torch.testing.assert_close(reverse.matmat(vectors), expected)
    assert batched_grads[-1]  # ...while the batched reverse form does batch


def test_max_samples_uses_only_the_first_samples() -> None:
    model_factory, data_factory, loss = CASES["mlp-tanh/mse"]
    data = data_factory()
    assert data.x is not None and data.y is not None
    first = TrainingData(num_classes=data.num_classes, x=data.x[:10], y=data.y[:10])
    model = model_factory()
    vectors = random_block(2, make_operator("mlp-tanh/mse").n_params)
    capped = HessianOperator(model, data, loss, dtype=torch.float64, max_samples=10, chunk_size=4)
    expected = vectors @ dense_hessian(model, first, loss)
    torch.testing.assert_close(capped.matmat(vectors), expected)
    assert capped.n_samples == 10
    full = HessianOperator(model, data, loss, dtype=torch.float64).matmat(vectors)
    assert not torch.allclose(full, expected)


def test_float32_operator_works_in_float32() -> None:
    op32 = make_operator("transformer/ce", dtype=torch.float32)
    op64 = make_operator("transformer/ce")
    vectors = random_block(2, op64.n_params)
    products = op32.matmat(vectors)
    assert products.dtype == torch.float32
    torch.testing.assert_close(products.double(), op64.matmat(vectors), rtol=1e-4, atol=1e-5)


def test_loss_and_gradient_match_autograd() -> None:
    from subspace_cli.losses import loss_sum

    model_factory, data_factory, loss = CASES["cnn-1d/ce"]
    model, data = model_factory().double(), data_factory()
    assert data.x is not None and data.y is not None
    op = HessianOperator(model, data, loss, dtype=torch.float64, chunk_size=5)
    mean_loss, gradient, accuracy = op.loss_and_gradient()
    output = model(data.x.double())
    expected = loss_sum(loss, output, data.y) / len(data)
    expected.backward()
    flat_grad = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    assert mean_loss == pytest.approx(expected.item(), rel=1e-12)
    torch.testing.assert_close(gradient, flat_grad)
    assert accuracy == pytest.approx(float((output.argmax(-1) == data.y).double().mean()))


def test_to_scipy_is_a_float64_linear_operator() -> None:
    op = make_operator("mlp-tanh/mse", dtype=torch.float32)
    linear = op.to_scipy()
    assert linear.shape == (op.n_params, op.n_params) and linear.dtype == np.float64
    vector = np.random.default_rng(0).standard_normal(op.n_params)
    expected = dense("mlp-tanh/mse").numpy() @ vector
    result = linear.matvec(vector)
    assert result.dtype == np.float64
    np.testing.assert_allclose(result, expected, rtol=1e-4, atol=1e-5)
    block = linear.matmat(np.stack([vector, 2 * vector], axis=1))
    np.testing.assert_allclose(block[:, 1], 2 * result, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------- parameter selection


def test_select_parameters_with_include_and_exclude_globs() -> None:
    model = CASES["mlp-tanh/mse"][0]()
    everything = select_parameters(model)
    assert everything.names == tuple(name for name, _ in model.named_parameters())
    assert everything.n_params == sum(p.numel() for p in model.parameters())
    weights = select_parameters(model, include=["*.weight"])
    assert weights.names == ("fc1.weight", "fc2.weight", "head.weight")
    no_head = select_parameters(model, include=["*"], exclude=["head.*"])
    assert no_head.names == ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias")
    assert no_head.offsets == (0, 15, 20, 45)
    assert no_head.sizes == (15, 5, 25, 5)
    assert no_head.shapes[0] == (5, 3)


def test_empty_selection_names_the_globs() -> None:
    model = CASES["mlp-tanh/mse"][0]()
    with pytest.raises(UsageError, match=r"conv\*.*fc1\.\*"):
        select_parameters(model, include=["conv*"], exclude=["fc1.*"])
    with pytest.raises(UsageError, match="no parameters selected"):
        select_parameters(model, exclude=["*"])


def test_layout_round_trip() -> None:
    model = CASES["cnn-2d/mse"][0]()
    layout = select_parameters(model)
    params = dict(model.named_parameters())
    flat = layout.flatten(params)
    for name, tensor in layout.unflatten(flat).items():
        assert torch.equal(tensor, params[name])
    assert ParameterLayout.from_shapes([("a", (2, 3)), ("b", ())]).n_params == 7


def test_unselected_parameters_stay_fixed() -> None:
    model_factory, data_factory, loss = CASES["mlp-tanh/ce"]
    model = model_factory()
    layout = select_parameters(model, include=["fc2.*", "head.bias"])
    op = HessianOperator(model, data_factory(), loss, layout=layout, dtype=torch.float64)
    full = select_parameters(model)
    index = torch.cat(
        [
            torch.arange(full.offsets[i], full.offsets[i] + full.sizes[i])
            for i, name in enumerate(full.names)
            if name in layout.names
        ]
    )
    block = dense("mlp-tanh/ce")[index][:, index]
    identity = torch.eye(op.n_params, dtype=torch.float64)
    torch.testing.assert_close(op.matmat(identity), block, rtol=1e-9, atol=1e-11)


# ---------------------------------------------------------------------- the model is not changed


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: t.detach().clone() for name, t in model.state_dict().items()}


@pytest.mark.parametrize("train_mode", [False, True])
@pytest.mark.parametrize("method", ["forward", "reverse", "auto"])
def test_batchnorm_buffers_and_mode_are_untouched(train_mode: bool, method: str) -> None:
    torch.manual_seed(0)
    model = TinyBatchNormNet()
    with torch.no_grad():
        model.bn.running_mean.normal_()
        model.bn.running_var.uniform_(0.5, 2.0)
    model.train()
    model.head.eval()  # a mixed state must come back as it was
    before = snapshot(model)
    data = make_data((3,), n=16)
    op = HessianOperator(
        model, data, "ce", dtype=torch.float64, train_mode=train_mode, method=method, chunk_size=8
    )
    op.matmat(random_block(3, op.n_params))
    op.loss_and_gradient()
    after = snapshot(model)
    for name in before:
        assert torch.equal(before[name], after[name]), name
    assert model.training and model.fc.training and model.bn.training and not model.head.training


def test_batchnorm_train_mode_uses_batch_statistics() -> None:
    torch.manual_seed(0)
    model = TinyBatchNormNet()
    with torch.no_grad():
        model.bn.running_mean.normal_()
    data = make_data((3,), n=16)
    vectors = random_block(2, select_parameters(model).n_params)
    for train_mode in (False, True):
        op = HessianOperator(model, data, "mse", dtype=torch.float64, train_mode=train_mode)
        expected = vectors @ dense_hessian(model, data, "mse", train_mode=train_mode)
        torch.testing.assert_close(op.matmat(vectors), expected)
        torch.testing.assert_close(op.matmat(vectors), expected)  # stable across calls


def test_model_mode_is_restored_after_an_error() -> None:
    class Broken(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = torch.nn.Linear(3, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            raise ValueError("broken model")

    model = Broken().train()
    op = HessianOperator(model, make_data((3,)), "ce", method="reverse")
    with pytest.raises(ValueError, match="broken model"):
        op.matvec(torch.ones(op.n_params))
    assert model.training


# ---------------------------------------------------------------------- errors


class _Distances(torch.nn.Module):
    """Uses torch.cdist, whose backward cannot be differentiated again (nor forward-mode AD)."""

    def __init__(self) -> None:
        super().__init__()
        self.centres = torch.nn.Parameter(torch.randn(3, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return -torch.cdist(x, self.centres)


@pytest.mark.parametrize("method", ["auto", "reverse", "forward"])
def test_non_twice_differentiable_op_raises_numerical_error(method: str) -> None:
    op = HessianOperator(_Distances(), make_data((3,)), "ce", method=method)
    with pytest.raises(NumericalError, match="_cdist"):
        op.matmat(torch.ones(2, op.n_params))


class _NoForwardAD(torch.autograd.Function):
    """Old-style custom function: double backward works, torch.func transforms do not."""

    @staticmethod
    def forward(ctx, x):  # type: ignore[no-untyped-def]
        ctx.save_for_backward(x)
        return x**3

    @staticmethod
    def backward(ctx, grad):  # type: ignore[no-untyped-def]
        (x,) = ctx.saved_tensors
        return 3 * x**2 * grad


class _CubeNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _NoForwardAD.apply(self.fc(x))


def test_auto_falls_back_to_reverse_without_forward_ad() -> None:
    torch.manual_seed(0)
    model, data = _CubeNet(), make_data((3,))
    vectors = random_block(2, select_parameters(model).n_params)
    op = HessianOperator(model, data, "mse", dtype=torch.float64)
    products = op.matmat(vectors)
    assert op.method in ("reverse", "reverse-loop")
    assert set(op.method_seconds) == {"reverse", "reverse-loop"}
    # warm-ups on all 24 samples: forward and forward-loop both fail (torch's error is about
    # functorch transforms, not a missing derivative, so the loop form is tried too), the two
    # reverse forms run; then 2 timed runs and 2 retimed, one of which is kept
    assert op.probe_runs == 4
    assert op.probe_hvps == pytest.approx(4 * 2 + 3 * 2)
    reference = HessianOperator(model, data, "mse", dtype=torch.float64, method="reverse")
    torch.testing.assert_close(products, reference.matmat(vectors))


def test_non_finite_products_raise() -> None:
    class Exponential(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = torch.nn.Linear(3, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.exp(self.fc(x))

    model = Exponential()
    with torch.no_grad():
        model.fc.weight.fill_(100.0)  # exp(100 · Σx) overflows float32
    op = HessianOperator(model, make_data((3,)), "mse", method="reverse")
    with pytest.raises(NumericalError, match="not finite"):
        op.matmat(torch.ones(1, op.n_params))
    with pytest.raises(NumericalError, match="not finite"):
        op.loss_and_gradient()


@pytest.mark.parametrize(
    "options, message",
    [
        ({"loss": "hinge"}, "unknown loss"),
        ({"method": "magic"}, "unknown HVP method"),
        ({"chunk_size": 0}, "chunk size"),
        ({"max_samples": 0}, "max_samples"),
        ({"dtype": torch.int64}, "floating"),
    ],
)
def test_bad_options_are_usage_errors(options: dict[str, object], message: str) -> None:
    arguments: dict[str, object] = {"loss": "mse"}
    arguments.update(options)
    loss = arguments.pop("loss")
    with pytest.raises(UsageError, match=message):
        HessianOperator(torch.nn.Linear(3, 3), make_data((3,)), loss, **arguments)  # type: ignore[arg-type]


def test_operator_at_other_parameters_matches_a_model_holding_them() -> None:
    """``at(θ')`` and ``parameters=θ'`` take the Hessian at θ' without writing to the model;
    products match a dense Hessian of a model that holds θ'."""
    import copy

    model_factory, data_factory, loss = CASES["mlp-tanh/mse"]
    model, data = model_factory().to(torch.float64), data_factory()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    op = HessianOperator(model, data, loss, dtype=torch.float64, method="reverse-loop")
    shifted = op.parameters + 0.3 * random_block(1, op.n_params, seed=5)[0]
    moved = copy.deepcopy(model)
    with torch.no_grad():
        for name, value in op.layout.unflatten(shifted).items():
            dict(moved.named_parameters())[name].copy_(value)
    expected = dense_hessian(moved, data, loss)
    assert (expected - dense_hessian(model, data, loss)).abs().max() > 1e-3  # θ' matters
    vectors = random_block(2, op.n_params, seed=6)
    op.matmat(vectors)  # keeps graphs at θ, which at(θ') must not reuse
    for other in (op.at(shifted),
                  HessianOperator(model, data, loss, dtype=torch.float64, parameters=shifted)):
        torch.testing.assert_close(other.matmat(vectors), vectors @ expected, rtol=1e-9,
                                   atol=1e-11)
        torch.testing.assert_close(other.parameters, shifted)
    assert op.at(shifted).hvp_count == 0 and op.hvp_count == 2
    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), before[name])
    with pytest.raises(ValueError, match="length"):
        op.at(shifted[:-1])
