"""`symdiff experiment curvature`: power iteration on HVPs against a full Hessian's eigenvalues."""
from __future__ import annotations

import numpy as np
import pytest

from models.experiments import curvature
from models.training import build_model
from symdiff import HVP


def _full_hessian(h: HVP, values: dict, shapes: dict) -> np.ndarray:
    names = list(shapes)
    sizes = [int(np.prod(s)) for s in shapes.values()]
    cols = []
    for i in range(sum(sizes)):
        e = np.zeros(sum(sizes))
        e[i] = 1.0
        parts, at = {}, 0
        for n, size in zip(names, sizes):
            parts[n] = e[at:at + size].reshape(shapes[n])
            at += size
        hv = h(parts, values)
        cols.append(np.concatenate([np.ravel(hv[n]) for n in names]))
    return np.stack(cols, axis=1)


@pytest.mark.parametrize("kind", ["mlp", "lstm"])
def test_power_iteration_finds_the_top_eigenvalue_of_the_full_hessian(kind):
    m = build_model(kind, dict(max_len=2, num_chars=3, num_hid=2, num_labels=3), seed=3)
    xm = m.xm
    params = xm.params()
    values = xm.inputDict()
    shapes = {p: np.shape(values[p]) for p in params}
    h = HVP(xm, "loss", params)
    H = _full_hessian(h, values, shapes)
    eig = np.linalg.eigvalsh((H + H.T) / 2)
    top = eig[np.argmax(np.abs(eig))]
    lam, its, ok = curvature.top_eigenvalue(lambda v: h(v, values), shapes, np.random.default_rng(0),
                                            max_iterations=5000, rtol=1e-13)
    assert ok, f"power iteration did not converge in {its} HVPs"
    assert abs(lam - top) <= 1e-6 * abs(top), (lam, top, eig[-3:])


def test_power_iteration_reports_when_it_did_not_converge():
    shapes = {"x": (3,)}
    flip = {"x": np.array([1.0, -1.0, 0.5])}  # eigenvalues 1 and -1 of equal size: no single top one
    lam, its, ok = curvature.top_eigenvalue(lambda v: {"x": flip["x"] * v["x"]}, shapes, np.random.default_rng(1),
                                            max_iterations=7, rtol=0.0)
    assert not ok and its == 7


def test_a_short_run_records_every_epoch_and_renders(tmp_path):
    data = curvature.run_curvature(dataset="demo", epochs=2, sample_rows=32, models=("mlp",))
    rows = data["results"]
    assert [r["epoch"] for r in rows] == [1, 2]
    for r in rows:
        assert np.isfinite(r["top_eigenvalue"]) and r["top_eigenvalue"] > 0
        assert r["two_over_lr"] == pytest.approx(2 / 0.05)
    title, cols, body = curvature.summary_table(data)
    assert len(body) == 2 and "λmax" in cols
    text = "\n".join(curvature.report_section(data, {}, tmp_path, tmp_path))
    assert "What the numbers show" in text and "MLP" in text
