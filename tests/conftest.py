"""Shared test setup: every test gets its own empty user cache (no raced HVP-method choice
leaks from one test, or from the user's own runs, into another)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def _private_user_cache(tmp_path_factory: pytest.TempPathFactory,
                        monkeypatch: pytest.MonkeyPatch) -> Path:
    directory = tmp_path_factory.mktemp("user-cache")
    monkeypatch.setenv("SUBSPACE_CACHE_DIR", str(directory))
    return directory
