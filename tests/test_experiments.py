"""`symdiff experiment` and models/experiments/: step counts, timing, initialisation, report, no-matplotlib."""
from __future__ import annotations

import csv
import json
import math
import sys

import numpy as np
import pytest

import cli
from models import experiments as X

MS, NS = (10, 15, 20), (16, 32, 64)


# ---- steps ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def steps():
    # num_hid does not change the graph; a small one keeps the test fast
    return X.run_steps("demo", models=("lstm", "mlp"), batch_sizes=NS, max_lens=MS, num_hid=8)


def _count(data, model, engine, n, m, key):
    (row,) = [r for r in data["counts"] if (r["model"], r["engine"], r["batch_size"], r["max_len"]) ==
              (model, engine, n, m)]
    return row[key]


def test_steps_counts_default_and_unfused_engines(steps):
    import inspect

    from symdiff import Autograd

    engines = steps["settings"]["engines"]
    assert set(engines) == {"default", X.CROSSENT_ONLY, "unfused"}
    assert engines["default"]["call"] == "Autograd(xm)"
    assert "passes=()" in engines["unfused"]["call"] and engines["unfused"]["passes"] == []
    if "fuse" in inspect.signature(Autograd).parameters:   # fusion is not a pass: switch it off too
        assert "fuse=False" in engines["unfused"]["call"]
    assert engines[X.CROSSENT_ONLY]["passes"] == ["crossent_softmax"]


@pytest.mark.parametrize("key", ["forward_steps", "backward_steps"])
def test_lstm_steps_grow_exactly_linearly_in_M(steps, key):
    for engine in steps["settings"]["engines"]:
        counts = [_count(steps, "lstm", engine, 64, m, key) for m in MS]
        d1, d2 = counts[1] - counts[0], counts[2] - counts[1]
        assert d1 == d2 > 0, (engine, counts)
        entry = next(e for e in steps["summary"] if e["model"] == "lstm" and e["engine"] == engine)
        assert entry[key]["linear_in_M"] and entry[key]["per_character"] == d1 / 5


@pytest.mark.parametrize("key", ["forward_steps", "backward_steps"])
def test_steps_do_not_depend_on_N(steps, key):
    for model in ("lstm", "mlp"):
        for engine in steps["settings"]["engines"]:
            counts = {_count(steps, model, engine, n, 10, key) for n in NS}
            assert len(counts) == 1, (model, engine, counts)


def test_mlp_steps_do_not_depend_on_M(steps):
    for engine in steps["settings"]["engines"]:
        assert len({_count(steps, "mlp", engine, 64, m, "forward_steps") for m in MS}) == 1


def test_unfused_counts_are_the_plain_wengert_list(steps):
    """Unfused, one forward step per Wengert-list entry; the default engine runs fewer, bigger steps."""
    for m in MS:
        assert _count(steps, "lstm", "unfused", 64, m, "forward_steps") == _count(steps, "lstm", "unfused", 64, m,
                                                                                 "wengert_steps")
        assert _count(steps, "lstm", "default", 64, m, "forward_steps") <= _count(steps, "lstm", "unfused", 64, m,
                                                                                 "forward_steps")
        # the crossEnt-softMax pass alone: one derivative where the plain list takes two, and one forward step
        # fewer: the loss no longer reads softMax's `outputs`, which an update (forward keeping the loss) skips
        ce, plain = X.CROSSENT_ONLY, "unfused"
        assert (_count(steps, "lstm", ce, 64, m, "forward_steps")
                == _count(steps, "lstm", plain, 64, m, "forward_steps") - 1)
        assert (_count(steps, "lstm", ce, 64, m, "backward_steps")
                == _count(steps, "lstm", plain, 64, m, "backward_steps") - 1)


def test_counts_come_from_the_engine_counters(monkeypatch):
    """Doubling what the program reports doubles the experiment's numbers: nothing is computed by formula."""
    from symdiff.autograd import Program

    real = Program.forward

    def twice(self, inputs, *args, **kwargs):
        real(self, inputs, *args, **kwargs)
        return real(self, inputs, *args, **kwargs)

    model = _tiny_model("lstm", 10)
    codes = np.zeros((4, 10), dtype=np.int32)
    y = np.eye(model.dims["num_labels"])[[0, 1, 2, 0]]
    plain = X.engines()["unfused"]
    once = X.count_update_steps(model, codes, y, plain)
    monkeypatch.setattr(Program, "forward", twice)
    assert X.count_update_steps(model, codes, y, plain)["forward_steps"] == 2 * once["forward_steps"]


def _tiny_model(kind, m):
    from models.training import build_model

    return build_model(kind, dict(max_len=m, num_chars=7, num_hid=4, num_labels=3), seed=0)


# ---- timing ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def timing():
    return X.run_timing("demo", batch_sizes=(32, 64), max_lens=(5, 10), epochs=1, repeats=1)


def test_timing_runs_end_to_end_and_writes_json_and_csv(timing, tmp_path):
    files = X.save("timing", timing, tmp_path)
    assert sorted(p.name for p in files) == ["timing.csv", "timing.json"]
    data = json.loads((tmp_path / "timing.json").read_text())
    assert set(data) >= {"meta", "settings", "measurements", "summary"}
    assert data["settings"]["epochs"] == 1 and data["settings"]["repeats"] == 1
    assert data["meta"]["machine"]["numpy"] == np.__version__
    assert data["meta"]["command"].startswith("symdiff experiment timing --dataset demo")
    # grid: N sweep at M=10 (32, 64), M sweep at N=64 (5, 10): three distinct settings per model
    settings = {(m["model"], m["batch_size"], m["max_len"]) for m in data["measurements"]}
    assert settings == {(k, n, m) for k in ("mlp", "lstm") for n, m in ((32, 10), (64, 10), (64, 5))}
    for m in data["measurements"]:
        assert m["train_seconds"] > 0 and m["epoch"] == 1 and m["repeat"] == 1
        assert m["batches"] == math.ceil(m["train_rows"] / m["batch_size"])
    for r in data["summary"]:
        assert r["min"] <= r["median"] <= r["max"]
        assert {"model", "sweep", "value", "batch_size", "max_len", "median", "min", "max"} <= set(r)
    assert {(r["model"], r["sweep"], r["value"]) for r in data["summary"]} == {
        (k, s, v) for k in ("mlp", "lstm") for s, vs in (("batch_size", (32, 64)), ("max_len", (5, 10))) for v in vs}
    with open(tmp_path / "timing.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == len(data["measurements"]) == 6
    assert {"model", "batch_size", "max_len", "repeat", "epoch", "train_seconds"} <= set(rows[0])
    assert float(rows[0]["train_seconds"]) > 0


def test_timing_plots(timing, tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib is not installed: pip install -e '.[plots]' (or '.[test]')")
    paths = X.save_plots("timing", timing, tmp_path)
    assert [p.name for p in paths] == ["timing_vs_batch_size.png", "timing_vs_max_len.png"]
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_timing_rejects_bad_settings():
    with pytest.raises(X.ExperimentError, match="dataset not found"):
        X.run_timing("no/such/prefix", epochs=1, repeats=1)
    with pytest.raises(X.ExperimentError, match="increasing"):
        X.run_timing("demo", batch_sizes=(64, 16), epochs=1, repeats=1)


# ---- init -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def init():
    return X.run_init(draws=3000, seed=1)


def test_recommended_scales():
    assert X.recommended_scale("one-hot") == pytest.approx(math.sqrt(3))
    assert X.recommended_scale("uniform") == pytest.approx(4 / 1000, rel=2e-3)
    assert X.recommended_scale("shifted") == pytest.approx(2 / (1000.5 * 1000), rel=1e-3)
    for case in X.INIT_CASES:   # E[s²] = 1 at the recommended scale, by a formula of the test's own
        assert _second_moment_of_s(case, X.recommended_scale(case)) == pytest.approx(1.0, rel=1e-12)


def _second_moment_of_s(case: str, a: float, d: int = 1000) -> float:
    """E[s²] for s = Σ_{i≤d} x_i w_i, w_i ~ U[0, a], all independent, written out term by term:
    E[s²] = Σ_i E[x_i²] E[w²] + Σ_{i≠j} E[x_i] E[x_j] E[w]², with E[w] = a/2 and E[w²] = a²/3.
    One-hot x (one x_i = 1, uniformly placed): s is a single w, E[s²] = a²/3."""
    if case == "one-hot":
        return a * a / 3
    lo, hi = {"uniform": (0.0, 1.0), "shifted": (1000.0, 1001.0)}[case]
    ex = (lo + hi) / 2
    ex2 = (hi ** 3 - lo ** 3) / (3 * (hi - lo))  # ∫ x² dx / (hi - lo)
    return d * ex2 * a * a / 3 + d * (d - 1) * (ex * a / 2) ** 2


def test_exact_moments_agree_with_the_tests_own_formula():
    for case in X.INIT_CASES:
        for a in (0.01, 1.0, 3.0):
            mean, std = X.preactivation_moments(case, a)
            assert mean ** 2 + std ** 2 == pytest.approx(_second_moment_of_s(case, a), rel=1e-12), (case, a)


def test_saturation_small_for_recommended_scale_and_large_for_bad(init):
    for case in X.INIT_CASES:
        rows = [r for r in init["results"] if r["case"] == case]
        (rec,) = [r for r in rows if r["recommended"]]
        (bad,) = [r for r in rows if r["bad"]]
        assert rec["saturated_fraction"] < 0.01, case
        assert bad["saturated_fraction"] > 0.5, case
        assert rec["mean_dtanh"] > 0.3 > bad["mean_dtanh"]
        # sampled moments agree with the exact ones
        assert rec["mean_s"] == pytest.approx(rec["mean_s_exact"], rel=0.05)
        assert rec["std_s"] == pytest.approx(rec["std_s_exact"], rel=0.1)
    uniform_a1 = next(r for r in init["results"] if r["case"] == "uniform" and r["a"] == 1.0)
    assert uniform_a1["saturated_fraction"] == 1.0


# ---- the command, the report, no matplotlib -------------------------------------------------
def _block_matplotlib(monkeypatch):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)   # `import matplotlib` now raises ImportError
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)


def test_command_works_without_matplotlib(monkeypatch, tmp_path, capsys):
    _block_matplotlib(monkeypatch)
    assert not X.plots_available()
    rc = cli.main(["experiment", "init", "--draws", "500", "--out", str(tmp_path)])
    out = " ".join(capsys.readouterr().out.split())
    assert rc == 0
    assert "plots skipped" in out and "pip install -e '.[plots]'" in out
    assert (tmp_path / "init.json").exists() and (tmp_path / "init.csv").exists()
    assert not list(tmp_path.glob("*.png"))
    report = tmp_path / "report.md"
    assert cli.main(["experiment", "report", "--out", str(tmp_path), "--report", str(report)]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "matplotlib is not installed" in out
    text = report.read_text()
    assert "pip install -e '.[plots]'" in text and "](" not in text.split("## 4.")[1]


def test_report_is_templated_from_the_json(steps, timing, init, tmp_path):
    X.save("steps", steps, tmp_path)
    X.save("timing", timing, tmp_path)
    X.save("init", init, tmp_path)
    report, _ = X.write_report(tmp_path, tmp_path / "docs" / "report.md", replot=False)
    text = report.read_text()
    for heading in ("## Reproduce", "## Machine", "## 1.", "## 2.", "## 3.", "## 4."):
        assert heading in text
    assert steps["meta"]["machine"]["cpu_model"] in text
    unfused = next(e for e in steps["summary"] if e["model"] == "lstm" and e["engine"] == "unfused")
    assert f"| LSTM | unfused | forward | {' | '.join(str(v) for v in unfused['forward_steps']['along_M'])} |" in text
    lstm64 = next(r for r in timing["summary"] if r["model"] == "lstm" and r["batch_size"] == 64 and r["max_len"] == 10)
    assert f"{lstm64['median']:.3f}" in text
    assert f"{X.recommended_scale('uniform'):.4g}" in text
    assert timing["meta"]["command"] in text and "symdiff experiment report" in text


def test_report_links_figures_relative_to_the_report(steps, tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib is not installed: pip install -e '.[plots]' (or '.[test]')")
    out = tmp_path / "docs" / "figures"
    X.save("steps", steps, out)
    report, notes = X.write_report(out, tmp_path / "docs" / "report.md")
    assert notes == []
    assert "![steps of one LSTM update against M and N](figures/steps_lstm.png)" in report.read_text()
    assert (out / "steps_lstm.png").exists()


def test_command_reports_errors_in_one_line(tmp_path, capsys):
    assert cli.main(["experiment", "report", "--out", str(tmp_path / "empty")]) == 2
    assert "no results" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["experiment", "timing", "--batch_sizes", "16,x"])
    assert "comma-separated" in capsys.readouterr().err


def test_the_readme_says_what_experiment_all_runs_and_how_long():
    """`symdiff experiment all` runs every experiment (curvature too, minutes of HVPs): the README's
    line for it names each one and gives its duration, so nobody starts it expecting seconds."""
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    start = readme.index("symdiff experiment all")
    lines = [readme[start:].splitlines()[0]]
    for line in readme[start:].splitlines()[1:]:  # the comment continues on the lines below
        if not line.lstrip().startswith("#"):
            break
        lines.append(line)
    said = " ".join(lines)
    missing = [name for name in X.EXPERIMENTS if name not in said]
    assert not missing, f"README's `symdiff experiment all` line does not name {missing}"
    assert re.search(r"\d(\.\d)? min", said), "README's `symdiff experiment all` line does not say how long it takes"
