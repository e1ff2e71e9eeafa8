"""Shared test fixtures."""
from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _restore_registry():
    """Ops declared by a test are removed (and replaced ones restored) afterwards: the registry is global."""
    import symdiff

    before = dict(symdiff.OPS)
    yield
    symdiff.OPS.clear()
    symdiff.OPS.update(before)
