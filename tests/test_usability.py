"""What a new user trips over (issue #19): typos are errors, bprop returns what it promises,
non-scalar outputs are never summed silently, every engine error is a SymdiffError."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import sympy as sp

import symdiff
from symdiff import Autograd, XMan, f, grad_check
from symdiff.errors import SymdiffError

PASS_SETTINGS = [dict(passes=(), fuse=False), dict(passes=("crossent_softmax",), fuse=False),
                 dict(fuse=True), dict(fuse=True, native=False), dict(fuse=False)]


def _readme_model() -> XMan:
    """The README's example, with its own ops (declared once per session)."""
    x, y = sp.symbols("x y")
    if "usab_softplus" not in symdiff.OPS:
        symdiff.defop("usab_softplus", sp.log(1 + sp.exp(x)), args=[x])
        symdiff.defop("usab_gate", x * sp.tanh(y), args=[x, y])
    rng = np.random.default_rng(0)
    xm = XMan()
    xm.a = f.input(name="a", default=rng.random((3, 4)))
    xm.t = f.input(name="t", default=np.eye(4)[[0, 2, 3]])
    xm.W = f.param(name="W", default=rng.random((4, 4)))
    xm.b = f.param(name="b", default=rng.random(4))
    xm.h = f.usab_softplus(f.usab_gate(xm.a * xm.W + xm.b, xm.b))
    xm.outputs = f.softMax(xm.h)
    xm.loss = f.mean(f.crossEnt(xm.outputs, xm.t))
    return xm.setup()


# ---- 1: unknown input names -----------------------------------------------------------------
def test_input_dict_refuses_an_unknown_name_and_names_the_closest():
    xm = _readme_model()
    with pytest.raises(SymdiffError, match=r"unknown input 'W1'.*Did you mean 'W'\?"):
        xm.inputDict(W1=np.ones((4, 4)))
    with pytest.raises(SymdiffError, match=r"'h' is computed by the graph"):
        xm.inputDict(h=np.ones((3, 4)))


@pytest.mark.parametrize("settings", PASS_SETTINGS)
def test_eval_and_forward_refuse_an_unknown_name(settings):
    xm = _readme_model()
    w = xm.operationSequence(xm.loss)
    ad = Autograd(xm, **settings)
    inputs = {**xm.inputDict(), "aa": np.ones((3, 4))}
    with pytest.raises(SymdiffError, match=r"unknown input 'aa'.*Did you mean 'a'\?"):
        ad.eval(w, inputs)
    with pytest.raises(SymdiffError, match=r"unknown input 'aa'"):
        ad.compile(w).forward(inputs)
    with pytest.raises(SymdiffError, match=r"unknown input 'aa'"):
        grad_check(xm, w, inputs)


def test_a_register_of_the_model_outside_this_list_is_not_a_typo():
    xm = _readme_model()
    ad = Autograd(xm)
    values = ad.eval(xm.operationSequence(xm.h), xm.inputDict())  # `t` is not used by h: still fine
    assert "h" in values


# ---- 2: eval/bprop return every named register ----------------------------------------------
@pytest.mark.parametrize("settings", PASS_SETTINGS)
def test_eval_and_bprop_return_every_named_register_under_every_setting(settings):
    xm = _readme_model()
    w = xm.operationSequence(xm.loss)
    plain = Autograd(xm, passes=(), fuse=False)
    v0 = plain.eval(w, xm.inputDict())
    g0 = plain.bprop(w, v0, loss=np.float64(1.0))
    ad = Autograd(xm, **settings)
    values = ad.eval(w, xm.inputDict())
    grads = ad.bprop(w, values, loss=np.float64(1.0))
    assert xm.named() <= values.keys()
    assert {"W", "b", "h", "outputs", "loss"} <= grads.keys()
    for name in xm.named():
        np.testing.assert_allclose(values[name], v0[name], rtol=1e-12, err_msg=name)
    for name in ("W", "b", "h", "outputs", "loss"):
        np.testing.assert_allclose(grads[name], g0[name], rtol=1e-10, atol=1e-14, err_msg=name)


def test_a_named_register_inside_a_fusable_chain_gets_its_whole_gradient():
    """m is read by both tanh(m) and the next step: fused, it would only get the outside part."""
    xm = XMan()
    xm.x = f.input(name="x", default=np.linspace(-1, 1, 6).reshape(2, 3))
    xm.p = f.param(name="p", default=np.full((2, 3), 0.3))
    xm.m = f.sigmoid(xm.x + xm.p)
    xm.out = f.hadamard(xm.m, f.tanh(xm.m))
    xm.loss = f.mean(xm.out)
    xm.setup()
    w = xm.operationSequence(xm.loss)
    ref = Autograd(xm, passes=(), fuse=False)
    g0 = ref.bprop(w, ref.eval(w, xm.inputDict()), loss=1.0)
    ad = Autograd(xm, fuse=True)
    g1 = ad.bprop(w, ad.eval(w, xm.inputDict()), loss=1.0)
    np.testing.assert_allclose(g1["m"], g0["m"], rtol=1e-12)
    np.testing.assert_allclose(g1["p"], g0["p"], rtol=1e-12)


# ---- 3: seeds and grad_check never sum a non-scalar silently -------------------------------
def test_a_seed_of_the_wrong_shape_is_an_error():
    xm = _readme_model()
    w = xm.operationSequence(xm.h)
    ad = Autograd(xm)
    values = ad.eval(w, xm.inputDict())
    with pytest.raises(symdiff.ShapeError, match=r"seed for 'h' has shape \(\) but the register has shape \(3, 4\)"):
        ad.bprop(w, values, h=1.0)
    grads = ad.bprop(w, values, h=np.ones((3, 4)))
    assert grads["W"].shape == (4, 4)


def test_grad_check_refuses_a_non_scalar_output_unless_projected():
    xm = _readme_model()
    w = xm.operationSequence(xm.h)
    with pytest.raises(symdiff.ShapeError, match=r"'h' has shape \(3, 4\), not a scalar; pass projection="):
        grad_check(xm, w)
    projection = np.random.default_rng(1).standard_normal((3, 4))
    report = grad_check(xm, w, projection=projection, max_elements=None)
    assert report.ok and [p.checked for p in report.params] == [16, 4]


# ---- 11: one base class ----------------------------------------------------------------------
def test_engine_errors_share_the_symdiff_error_base():
    with pytest.raises(SymdiffError, match="unknown op 'tahn'.*Did you mean tanh"):
        f.tahn
    xm = XMan()
    xm.a = f.input(name="a", default=np.ones(2))
    with pytest.raises(SymdiffError, match="no registers yet; call xm.setup"):
        xm.register("a")
    with pytest.raises(SymdiffError, match="setup"):
        xm.operationSequence(f.tanh(xm.a))
    with pytest.raises(SymdiffError, match="not a register"):
        f.tanh(1.0)
    with pytest.raises(SymdiffError, match="unknown pass 'crossent'.*Did you mean 'crossent_softmax'"):
        Autograd(xm.setup(), passes=("crossent",))


def test_a_matrix_product_of_the_wrong_shapes_says_hadamard_is_the_elementwise_one():
    xm = XMan()
    xm.a = f.input(name="a", default=np.ones((3, 4)))
    xm.b = f.input(name="b", default=np.ones((3, 4)))
    xm.p = f.param(name="p", default=np.ones((3, 4)))
    xm.c = xm.a * xm.b + xm.p
    xm.setup()
    with pytest.raises(symdiff.ShapeError, match=r"matrix product; for the elementwise product write f.hadamard"):
        Autograd(xm).eval(xm.operationSequence(xm.c), xm.inputDict())


def test_optimizer_and_one_hot_errors_are_symdiff_errors():
    from symdiff.optim import make_optimizer

    with pytest.raises(SymdiffError, match="unknown optimizer"):
        make_optimizer("adamm", {"w": np.zeros(2)}, 0.1)
    with pytest.raises(SymdiffError, match="OneHot indices"):
        symdiff.OneHot(np.array([[7]]), 3)


@pytest.mark.subprocess
def test_the_readme_python_examples_run_and_keep_their_promises():
    """The README's engine example, then its symdiff.optim example, in a fresh interpreter."""
    repo = Path(__file__).resolve().parents[1]
    blocks = re.findall(r"```python\n(.*?)```", (repo / "README.md").read_text(), flags=re.S)
    assert len(blocks) >= 2
    code = "\n".join(textwrap.dedent(b) for b in blocks) + (
        "\nassert {'W', 'b', 'h', 'outputs', 'loss'} <= grads.keys(), sorted(grads)\n"
        "assert {'a', 't', 'W', 'b', 'h', 'outputs', 'loss'} <= values.keys(), sorted(values)\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=repo, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(repo)})
    assert proc.returncode == 0, proc.stderr



# ---- 4: every defop failure is one line naming the op and the function ---------------------
@pytest.mark.parametrize("make, words", [
    (lambda x: sp.floor(x), ("usab_bad", "cannot differentiate floor(x)", "structural op")),
    (lambda x: x * sp.Integral(sp.exp(-x**2), (x, 0, 1)), ("usab_bad", "unevaluated integral", "closed form")),
    (lambda x: sp.sign(x), ("usab_bad", "derivative wrt x uses DiracDelta", "numpy or scipy.special supports")),
    (lambda x: sp.li(x), ("usab_bad", "forward expression uses li", "numpy or scipy.special supports")),
])
def test_defop_failures_are_one_line_symdiff_errors(make, words):
    x = sp.Symbol("x")
    with pytest.raises(symdiff.DefopError) as exc:
        symdiff.defop("usab_bad", make(x), args=[x])
    message = str(exc.value)
    assert "\n" not in message and isinstance(exc.value, SymdiffError)
    for w in words:
        assert w in message, message
    assert "usab_bad" not in symdiff.OPS


def test_defop_declaration_mistakes_are_symdiff_errors():
    x, z = sp.symbols("x z")
    with pytest.raises(SymdiffError, match="never parses"):
        symdiff.defop("usab_text", "x + 1", args=[x])
    with pytest.raises(SymdiffError, match="not in args"):
        symdiff.defop("usab_stray", x + z, args=[x])


# ---- 7: the timing experiment leaves the warm-up epoch out ----------------------------------
def test_timing_leaves_the_first_epoch_out_and_reports_it_apart():
    from models.experiments import timing

    settings = {"models": ["lstm"], "batch_sizes": [64], "max_lens": [10], "base_batch": 64, "base_len": 10,
                "epochs": 3, "repeats": 2, "rows": {"train": 640}}
    seconds = {1: 0.61, 2: 0.27, 3: 0.29}
    measurements = [{"model": "lstm", "batch_size": 64, "max_len": 10, "repeat": r, "epoch": e,
                     "train_seconds": t + 0.01 * r, "batches": 10} for r in (1, 2) for e, t in seconds.items()]
    row = timing.summarize_timing(measurements, settings)[0]
    assert row["median"] == pytest.approx(0.28 + 0.015)  # epochs 2 and 3 only, median of the two repeats
    assert row["warmup_median"] == pytest.approx(0.61 + 0.015) and not row["warmup_included"]
    title, cols, rows = timing.summary_table({"measurements": measurements, "settings": settings})
    assert "1st epoch (warm-up)" in cols and rows[0][-1] == "0.625" and "epochs 2-3" in title
    one = [m for m in measurements if m["epoch"] == 1]
    row = timing.summarize_timing(one, {**settings, "epochs": 1})[0]
    assert row["warmup_included"] and row["median"] == pytest.approx(0.625)


def test_the_readme_avx2_recipe_sets_what_the_benchmark_sets_and_takes_effect():
    """The README's one-line recipe for running as an AVX2-only machine sets every variable
    ``bench --isa avx2`` sets (OPENBLAS_CORETYPE too: without it the BLAS keeps AVX-512 kernels),
    and a process started with it really runs numpy, the kernels and the BLAS at x86-64-v3."""
    import shlex

    from benchmarks.bench import AVX2_ENV

    repo = Path(__file__).resolve().parents[1]
    bash = re.findall(r"```bash\n(.*?)```", (repo / "README.md").read_text(), flags=re.S)
    lines = [ln for block in bash for ln in block.splitlines() if "SYMDIFF_MARCH=" in ln]
    assert lines, "README: no shell line with the AVX2 emulation variables"
    env = dict(w.split("=", 1) for w in shlex.split(lines[0]) if "=" in w and w.split("=", 1)[0].isupper())
    assert env == AVX2_ENV
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    if " avx512f" not in flags:
        pytest.skip("the emulation is checked on an AVX-512 x86-64 machine (this one has no avx512f)")
    code = "from benchmarks.bench import isa_levels; import json; print(json.dumps(isa_levels()))"
    out = subprocess.run([sys.executable, "-c", code], cwd=repo, env={**os.environ, **env}, text=True,
                         capture_output=True, check=True).stdout
    import json

    levels = json.loads(out)
    assert levels["numpy"].startswith("x86-64-v3") and levels["kernels"] == "-march=x86-64-v3"
    assert levels["blas"] in ("Haswell", "unknown"), levels
