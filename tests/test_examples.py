"""The examples in docs/examples run, and check what they claim."""
from __future__ import annotations

import runpy
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "docs" / "examples"


def _load(name: str) -> dict:
    sys.path.insert(0, str(EXAMPLES.parent.parent))  # `models` from the checkout
    try:
        return runpy.run_path(str(EXAMPLES / f"{name}.py"), run_name="example")
    finally:
        sys.path.pop(0)


def test_rosenbrock_matches_scipy_and_is_minimised(capsys):
    _load("rosenbrock")["main"]()  # asserts value and gradient against rosen / rosen_der
    out = capsys.readouterr().out
    assert "Adam from (-1.2, 1)" in out


def test_stable_logsumexp_example(capsys):
    _load("logsumexp")["main"]()  # asserts exactness, softmax gradient, and the naive overflow
    assert "gradient of f.logsumexp = softmax(x): True" in capsys.readouterr().out


def test_gelu_mlp_learns_the_demo_data(capsys):
    accuracy = _load("gelu_mlp")["main"](epochs=10)
    assert accuracy > 0.3, accuracy  # five classes: chance is about 0.2
    assert "[add+gelu]" in capsys.readouterr().out
