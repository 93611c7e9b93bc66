"""Issue 17: the spectral density by stochastic Lanczos quadrature, and the trace, against dense
matrices whose spectra are known."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from plugin_fixtures import fake_plugin, linear_checkpoint, run_cli  # noqa: F401
from tiny_models import dense_hessian

from subspace_cli.density import (
    _rademacher,
    lanczos_quadrature,
    smoothed,
    spectral_density,
)


class Dense:
    """A dense symmetric matrix with the operator interface the density needs."""

    def __init__(self, matrix):
        self.matrix = matrix.to(torch.float64)
        self.n_params = matrix.shape[0]
        self.device, self.dtype = torch.device("cpu"), torch.float64
        self.hvp_count = 0

    def matmat(self, vectors):
        self.hvp_count += vectors.shape[0]
        return vectors @ self.matrix

    def matvec(self, vector):
        return self.matmat(vector[None])[0]


def _random_symmetric(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    values = torch.cat([torch.tensor([40.0, 25.0, 10.0], dtype=torch.float64),
                        torch.randn(n - 3, generator=g, dtype=torch.float64) * 0.3])
    return (q * values) @ q.T, values


def test_quadrature_reproduces_the_probe_moments_up_to_degree_2m_minus_1():
    a, _ = _random_symmetric(40)
    v = torch.randn(40, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    v /= v.norm()
    m = 6
    nodes, weights = lanczos_quadrature(Dense(a), v, m)
    assert len(nodes) == m and weights.sum() == pytest.approx(1.0, abs=1e-13)
    power = v.clone()
    for p in range(2 * m):  # vᵀAᵖv for p = 0 … 2m − 1: exact
        want = float(v @ power)
        assert (weights * nodes**p).sum() == pytest.approx(want, rel=1e-9, abs=1e-12), p
        power = a @ power


def test_density_of_a_known_spectrum_is_its_smoothed_eigenvalues():
    """A diagonal matrix of distinct eigenvalues with as many steps as its size: every node is
    an eigenvalue and (Rademacher probes) every weight 1/n, so the density is exactly the
    eigenvalues smoothed by the Gaussian."""
    values = torch.tensor([-1.0, 0.0, 0.5, 1.0, 2.0, 3.5, 7.0, 30.0], dtype=torch.float64)
    result = spectral_density(Dense(torch.diag(values)), runs=3, steps=8, trace_probes=0,
                              width=0.2, grid_points=4001)
    np.testing.assert_allclose(np.sort(result.nodes, axis=1), np.tile(values.numpy(), (3, 1)),
                               atol=1e-10)
    np.testing.assert_allclose(result.weights, 1 / 8, atol=1e-12)
    z = (result.grid[:, None] - values.numpy()[None]) / 0.2
    want = np.exp(-0.5 * z**2).sum(1) / (8 * 0.2 * math.sqrt(2 * math.pi))
    np.testing.assert_allclose(result.density, want, rtol=1e-6, atol=1e-12)
    assert np.trapezoid(result.density, result.grid) == pytest.approx(1.0, abs=1e-12)
    assert math.isnan(result.trace)


def test_hutchinson_trace_is_within_three_standard_errors():
    a, values = _random_symmetric(60, seed=2)
    result = spectral_density(Dense(a), runs=2, steps=10, trace_probes=200, seed=5)
    assert abs(result.trace - float(values.sum())) < 3 * result.trace_stderr
    assert 0 < result.trace_stderr < 0.2 * abs(float(values.sum()))
    assert smoothed(result.nodes, result.weights, result.grid, result.width).shape == (1000,)


def test_density_command_matches_the_dense_hessian_and_is_stored(tmp_path, fake_plugin):  # noqa: F811
    """The fake plugin's linear model: each run's quadrature moments are the probe's exact
    vᵀHᵖv (the probes regenerated from the seed), the trace is the dense one within three
    standard errors, and the density lands beside the spectrum in the file."""
    from subspace_cli import store
    from subspace_cli.checkpoint import SpecOverrides
    from subspace_cli.experiment import load_experiment

    ckpt = tmp_path / "lin.safetensors"
    linear_checkpoint(ckpt)
    out = str(tmp_path / "s.h5")
    missing = run_cli("density", str(ckpt), "-o", out)
    assert missing.exit_code == 2 and "run `subspace spectrum" in missing.stderr
    unused = run_cli("density", str(ckpt), "--batch-size", "4")  # the Hessian has none
    assert unused.exit_code == 2 and "the other curvatures take none" in unused.stderr
    assert run_cli("spectrum", str(ckpt), "-k", "2", "-o", out).exit_code == 0
    result = run_cli("density", str(ckpt), "--dtype", "float64", "--runs", "3",
                     "--lanczos-steps", "3", "--trace-probes", "60", "--seed", "4", "--json",
                     "-o", out)
    assert result.exit_code == 0, result.stderr
    [record] = json.loads(result.stdout)
    experiment = load_experiment(ckpt, SpecOverrides())
    h = dense_hessian(experiment.model, experiment.data, "mse")
    n = h.shape[0]
    generator = torch.Generator().manual_seed(4)
    for nodes, weights in zip(record["nodes"], record["weights"], strict=True):
        v = _rademacher(n, 1, generator)[0] / math.sqrt(n)
        nodes, weights = np.asarray(nodes), np.asarray(weights)
        power = v.clone()
        for p in range(2 * len(nodes)):
            assert (weights * nodes**p).sum() == pytest.approx(float(v @ power), rel=1e-8)
            power = h @ power
    assert abs(record["trace"] - float(torch.trace(h))) < 3 * record["trace_stderr"]
    grid, density = np.asarray(record["grid"]), np.asarray(record["density"])
    assert np.trapezoid(density, grid) == pytest.approx(1.0, abs=1e-9)
    stored = store.read_subgroup(out, ckpt, "density")
    assert stored is not None
    attrs, datasets = stored
    assert attrs["curvature"] == "hessian" and attrs["runs"] == 3
    np.testing.assert_allclose(datasets["density"], density)
    again = run_cli("density", str(ckpt), "-o", out)
    assert again.exit_code == 2 and "already holds a density" in again.stderr
    report = run_cli("report", out, "-o", str(tmp_path / "report"), "--plot-format", "png")
    assert report.exit_code == 0, report.stderr
    assert (tmp_path / "report" / "density.png").stat().st_size > 0
