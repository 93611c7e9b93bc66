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
broken = fakeplug_broken:factory

[subspace.data]
toy = fakeplug_mod:toy
"""


@pytest.fixture
def fake_plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A distribution "fakeplug" registering models tiny and broken, and data toy."""
    root = tmp_path / "site"
    info = root / "fakeplug-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: fakeplug\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(textwrap.dedent(ENTRY_POINTS))
    (root / "fakeplug_mod.py").write_text(PLUGIN_MODULE)
    (root / "fakeplug_broken.py").write_text(BROKEN_MODULE)
    monkeypatch.syspath_prepend(str(root))
    importlib.invalidate_caches()
    yield root
    for name in ("fakeplug_mod", "fakeplug_broken"):
        sys.modules.pop(name, None)
