"""Question 4: soft attention as one matrix expression, gradient-checked while the report is written.

Not a run of its own (``NAME`` is ``None``): only a section of the report.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

NAME = None
TITLE = "## 3. Soft attention (question 4)"


def report_section(data: None, results: dict[str, Any], report_dir: Path, out: Path) -> list[str]:
    """§3 of the report, its gradient check run now (nothing stored, nothing to plot)."""
    from symdiff import XMan, f, grad_check
    from symdiff.nn import attention

    rng = np.random.default_rng(0)
    M, N, n = 3, 5, 4
    xm = XMan()
    xm.Q = f.param(name="Q", default=rng.normal(size=(M, n)))
    xm.D = f.param(name="D", default=rng.normal(size=(N, n)))
    xm.T = f.input(name="T", default=np.eye(N)[rng.integers(0, N, size=M)])
    xm.A = attention(xm.Q, xm.D)
    xm.loss = f.mean(f.crossEnt(xm.A, xm.T))
    xm.setup()
    w = xm.operationSequence(xm.register("loss"))
    rep = grad_check(xm, w, max_elements=None, passes=())
    worst = max(p.max_rel for p in rep.params)
    return [TITLE, "",
            "For queries `Q` (M × n, one query per row) and document vectors `D` (N × n), all the attention "
            "distributions `α_i = softmax_j(q_iᵀ d_j)` at once are the rows of", "",
            "    A = softMax(Q Dᵀ)        (M × N; softMax row-wise)", "",
            "one matrix product with a transpose and one row-wise softmax: `S = Q Dᵀ` holds every score "
            "`S_ij = q_iᵀ d_j`, and the softmax normalises each row over j. `symdiff/nn.py` builds it from "
            "engine ops, `f.softMax(f.mul(Q, f.transpose(D)))` (`attend` also returns the attended vectors "
            "`A D`). `tests/test_nn.py` compares `A` with a per-query numpy loop and gradient-checks "
            "`mean(crossEnt(A, T))` with `Q` and `D` as parameters. Checked again while writing this report: "
            f"{', '.join(f'{p.name} {p.shape}' for p in rep.params)}, every element, no graph rewrites (`passes=()`) — largest "
            f"relative difference between backprop and central differences {worst:.1e} "
            f"({'agree' if rep.ok else 'DISAGREE'}).", ""]
