"""An MLP with GELU activations, trained on the shipped demo titles.

GELU(u) = u * Phi(u) = u/2 * (1 + erf(u / sqrt(2))): one ``defop`` line. numpy has no
``erf``; ``scipy.special`` computes it (``pip install 'symdiff[special]'``), SymPy derives
the derivative, and where the chain ``X W1 + b1 -> gelu`` is fused, it is compiled to C
(C99 has ``erf``). The loss is written with the new vocabulary: a log-softmax, a
per-row sum and a mean.

    python docs/examples/gelu_mlp.py
"""
from __future__ import annotations

import numpy as np
import sympy as sp

from models import data as D
from symdiff import OPS, Autograd, OneHot, XMan, defop, f
from symdiff.optim import Adam

u = sp.Symbol("u")
gelu = OPS.get("gelu") or defop("gelu", u / 2 * (1 + sp.erf(u / sp.sqrt(2))), args=[u],
                                 doc="Gaussian error linear unit, u * Phi(u)")


def build(max_len: int, num_chars: int, hidden: int, labels: int, rng: np.random.Generator) -> XMan:
    n_in = max_len * num_chars
    xm = XMan()
    xm.X = f.input(name="X")
    xm.y = f.input(name="y")
    xm.W1 = f.param(name="W1", default=rng.normal(0, np.sqrt(2 / n_in), (n_in, hidden)))
    xm.b1 = f.param(name="b1", default=np.zeros(hidden))
    xm.W2 = f.param(name="W2", default=rng.normal(0, np.sqrt(1 / hidden), (hidden, labels)))
    xm.b2 = f.param(name="b2", default=np.zeros(labels))
    xm.h = gelu(xm.X * xm.W1 + xm.b1)
    xm.logits = xm.h * xm.W2 + xm.b2
    xm.logp = f.log_softmax(xm.logits, axis=-1)
    xm.loss = -f.mean(f.sum(f.hadamard(xm.y, xm.logp), axis=1))
    return xm.setup()


def main(epochs: int = 15, seed: int = 0) -> float:
    ds = D.load_dataset(D.resolve_dataset("demo"))
    max_len, V, C = 12, ds.vocab.num_chars, ds.vocab.num_labels
    rng = np.random.default_rng(seed)
    xm = build(max_len, V, 64, C, rng)
    offsets = np.arange(max_len) * V

    def feed(codes: np.ndarray, label_ids: np.ndarray) -> dict[str, object]:
        """The one-hot titles as a gather (position m, character c is column m*V + c) and the targets."""
        return {"X": OneHot(np.where(codes >= 0, codes + offsets, -1), max_len * V, np.float64),
                "y": np.eye(C)[label_ids]}

    train_codes = ds.vocab.encode_titles(ds.train.titles, max_len)
    valid = feed(ds.vocab.encode_titles(ds.valid.titles, max_len), ds.valid.label_ids)
    params = {p: xm.inputDict()[p] for p in xm.params()}
    opt = Adam(params, lr=0.01)
    ad = Autograd(xm)
    loss_w, logp_w = xm.operationSequence(xm.loss), xm.operationSequence(xm.logp)
    n = len(ds.train.titles)
    for epoch in range(1, epochs + 1):
        order = rng.permutation(n)
        for start in range(0, n, 64):
            rows = order[start:start + 64]
            values = ad.eval(loss_w, {**params, **feed(train_codes[rows], ds.train.label_ids[rows])})
            opt.step(ad.bprop(loss_w, values, loss=np.float64(1.0)))
        if epoch % 5 == 0 or epoch == epochs:
            v = ad.eval(logp_w, {**params, **valid})
            accuracy = float(np.mean(v["logp"].argmax(axis=1) == ds.valid.label_ids))
            print(f"epoch {epoch:>2}: train loss {float(values['loss']):.3f}, valid accuracy {accuracy:.3f}")
    fused = [s.op for s in ad.compile(loss_w).steps if s.op.startswith("fused")]
    from symdiff import MULTI_OPS

    for name in fused:
        print(f"{name}: {MULTI_OPS[name].runs_as()}")
    return accuracy


if __name__ == "__main__":
    main()
