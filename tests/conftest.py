"""Shared test setup.

- Every module runs with one intra-op thread (``single_thread``), and so do the CLI processes
  the tests start; NumPy's and SciPy's OpenBLAS use one thread too.
- Every test gets its own empty user cache (no raced HVP-method choice leaks from one test, or
  from the user's own runs, into another).
- ``module_plugin``: the fake plugin distribution of ``plugin_fixtures`` for a whole module,
  for module-scoped fixtures that run the CLI once for many tests.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path

import pytest

# Read by OpenBLAS when NumPy or SciPy first loads, which is after this file; the tests'
# matrices are tiny, and idle BLAS threads spin on a busy machine.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Tiny tensors: one intra-op thread. OpenMP threads that spin-wait on a busy 2-core
    machine made these tests up to 100 times slower. ``OMP_NUM_THREADS`` carries the same to
    the subprocesses that tests start."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OMP_NUM_THREADS", "1")
        yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _private_user_cache(tmp_path_factory: pytest.TempPathFactory,
                        monkeypatch: pytest.MonkeyPatch) -> Path:
    directory = tmp_path_factory.mktemp("user-cache")
    monkeypatch.setenv("SUBSPACE_CACHE_DIR", str(directory))
    return directory


@pytest.fixture(scope="module")
def module_plugin(tmp_path_factory: pytest.TempPathFactory):
    """``plugin_fixtures.fake_plugin`` for a whole module: the distribution "fakeplug" (models
    tiny and broken, data toy) on ``sys.path`` until the module's last test is done.

    Module-scoped fixtures are set up before the per-test user cache above, so this also gives
    the module its own empty user cache for that setup (each test still gets a fresh one)."""
    from plugin_fixtures import forget_fake_plugin, write_fake_plugin

    root = write_fake_plugin(tmp_path_factory.mktemp("module-plugin") / "site")
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(root))
        patch.setenv("SUBSPACE_CACHE_DIR", str(tmp_path_factory.mktemp("module-user-cache")))
        importlib.invalidate_caches()
        yield root
    forget_fake_plugin()
