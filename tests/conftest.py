"""Shared test fixtures, and a test environment that does not depend on the user's.

The suite must give the same verdict whatever the shell exported: ``SYMDIFF_NATIVE=0``,
``SYMDIFF_NATIVE_MIN``, a ``SYMDIFF_CACHE`` or BLAS thread counts would otherwise change
what runs (and some tests start subprocesses, which inherit the environment). So this
module, which pytest imports before any test module (and so before symdiff or numpy
reads a variable), removes every ``SYMDIFF_*`` and BLAS thread variable from
``os.environ`` and points ``SYMDIFF_CACHE`` at a temporary folder for the whole session:
the suite never fills or reads ``~/.cache/symdiff``, and its subprocesses share that
folder. Under pytest-xdist the controller does this once and its workers inherit it.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest

#: variables that change how numpy's BLAS runs (``models`` sets one thread unless one is set)
BLAS_THREAD_VARS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "BLIS_NUM_THREADS",
                    "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS")
_OWNER = "SYMDIFF_TEST_CACHE_OWNER"  # the pid of the process that made the session's cache folder


def _clean_environment() -> None:
    if os.environ.get("PYTEST_XDIST_WORKER") and os.environ.get("SYMDIFF_CACHE") and os.environ.get(_OWNER):
        return  # an xdist worker: the controller cleaned the environment it inherited
    for name in [n for n in os.environ if n.startswith("SYMDIFF_")] + list(BLAS_THREAD_VARS):
        os.environ.pop(name, None)
    os.environ["SYMDIFF_CACHE"] = tempfile.mkdtemp(prefix="symdiff-test-cache-")
    os.environ[_OWNER] = str(os.getpid())


_clean_environment()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under mutmut, a mutant's tests run cheapest first, so a killed mutant costs its cheapest failing test.

    mutmut runs a mutant's tests with ``-x`` in the order it lists them (a set's order) and records each
    test's duration in ``mutants/mutmut-stats.json`` (this file's copy lives in ``mutants/tests/``).
    Outside mutation testing (no mutant under test, or no such file) the order is left to pytest.
    """
    if "__mutmut_" not in os.environ.get("MUTANT_UNDER_TEST", ""):
        return
    try:
        durations = json.loads((Path(__file__).resolve().parent.parent / "mutmut-stats.json").read_text("utf-8"))
        durations = durations["duration_by_test"]
    except (OSError, ValueError, KeyError):
        return
    items.sort(key=lambda item: durations.get(item.nodeid, 0.0))


def pytest_unconfigure(config: pytest.Config) -> None:
    """The process that made the session's kernel cache removes it."""
    if os.environ.get(_OWNER) == str(os.getpid()):
        shutil.rmtree(os.environ["SYMDIFF_CACHE"], ignore_errors=True)


@pytest.fixture(autouse=True)
def _restore_registry():
    """Ops declared by a test are removed (and replaced ones restored) afterwards: the registry is global."""
    import symdiff

    before = dict(symdiff.OPS)
    yield
    symdiff.OPS.clear()
    symdiff.OPS.update(before)
