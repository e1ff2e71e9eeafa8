"""Question 5: the scale ``a`` of ``w_i ~ U[0, a]`` that keeps ``Σ x_i w_i`` in tanh's responsive range.

Derived in closed form and checked by sampling.

Like every experiment module it provides ``NAME``, ``HELP``, ``TITLE``, ``FIGURES``,
``CSV_FIELDS``/``CSV_ROWS``, ``start(settings, progress)``, ``summary_table(data)``,
``draw(plt, data)`` and ``report_section(data, results, report_dir, out)``; the list
in :mod:`models.experiments` is all that names it.
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import numpy as np

from .common import NoProgress, Progress, Settings, check_positive, command_line, figure_link, fmt_f, fmt_g, md_table
from .machine import run_meta

NAME = "init"
HELP = "tanh initialisation scale"
TITLE = "## 4. Initialisation scale for tanh (question 5)"
FIGURES = ("init_preactivation.png",)
CSV_FIELDS = ("case", "label", "a", "mean_s", "std_s", "mean_s_exact", "std_s_exact", "q01", "q50", "q99",
              "saturated_fraction", "mean_dtanh")
CSV_ROWS = "results"
SATURATED = 0.99                             # |tanh(s)| above this counts as saturated
S_SATURATED = math.atanh(SATURATED)          # ≈ 2.647
INIT_CASES: dict[str, dict[str, Any]] = {
    "one-hot": {"title": "one-hot x (a single x_i = 1)", "low": None, "high": None},
    "uniform": {"title": "x_i ~ U[0, 1]", "low": 0.0, "high": 1.0},
    "shifted": {"title": "x_i ~ U[1000, 1001]", "low": 1000.0, "high": 1001.0},
}
BAD_SCALE = {"one-hot": 10.0, "uniform": 1.0, "shifted": 1.0}


def preactivation_moments(case: str, a: float, d: int = 1000) -> tuple[float, float]:
    """Exact mean and standard deviation of ``s = Σ_{i≤d} x_i w_i`` with ``w_i ~ U[0, a]`` independent.

    ``E[w] = a/2``, ``E[w²] = a²/3``. One-hot ``x``: ``s`` is one ``w_k``.
    Independent ``x_i`` with moments ``m1 = E[x]``, ``m2 = E[x²]``:
    ``E[s] = d m1 a/2`` and ``Var[s] = d (m2 a²/3 − m1² a²/4)``.
    """
    if case == "one-hot":
        return a / 2, a / math.sqrt(12)
    lo, hi = INIT_CASES[case]["low"], INIT_CASES[case]["high"]
    m1 = (lo + hi) / 2
    m2 = (lo * lo + lo * hi + hi * hi) / 3
    return d * m1 * a / 2, math.sqrt(d * (m2 / 3 - m1 * m1 / 4)) * a


def recommended_scale(case: str, d: int = 1000) -> float:
    """The ``a`` that makes the root mean square of the pre-activation 1: ``E[s²] = 1``.

    ``E[s²] = mean² + var`` is proportional to ``a²``, so ``a = 1/sqrt(E[s²] at a=1)``.
    Then ``|s|`` is typically about 1, where tanh is far from flat (tanh'(1) ≈ 0.42)
    and far from its saturation point ``atanh(0.99) ≈ 2.65``.
    """
    mean, std = preactivation_moments(case, 1.0, d)
    return 1.0 / math.sqrt(mean * mean + std * std)


def sample_preactivations(case: str, a: float, d: int, draws: int, rng: np.random.Generator,
                          chunk: int = 500) -> np.ndarray:
    """``draws`` independent samples of ``s = Σ x_i w_i`` (fresh ``x`` and ``w`` every draw)."""
    out = np.empty(draws)
    for start in range(0, draws, chunk):
        k = min(chunk, draws - start)
        w = rng.uniform(0.0, a, size=(k, d))
        if case == "one-hot":
            x = np.zeros((k, d))
            x[np.arange(k), rng.integers(0, d, size=k)] = 1.0
        else:
            x = rng.uniform(INIT_CASES[case]["low"], INIT_CASES[case]["high"], size=(k, d))
        out[start:start + k] = np.einsum("ij,ij->i", x, w)
    return out


def init_scales(case: str, d: int = 1000) -> list[tuple[str, float]]:
    """The scales tried for a case: the recommended one, ``a = 1``, and the case's bad one if different."""
    scales = [("recommended", recommended_scale(case, d)), ("a = 1", 1.0)]
    if BAD_SCALE[case] != 1.0:
        scales.append((f"a = {BAD_SCALE[case]:g}", BAD_SCALE[case]))
    return scales


def run_init(*, d: int = 1000, draws: int = 20000, seed: int = 0, bins: int = 60,
             progress: Progress | None = None) -> dict[str, Any]:
    """Sample ``s`` and ``f = tanh(s)`` for every case and scale; saturation fraction and histograms."""
    check_positive(d=d, draws=draws, bins=bins)
    progress = progress or NoProgress()
    rng = np.random.default_rng(seed)
    started, t0 = time.time(), time.perf_counter()
    total = sum(len(init_scales(c, d)) for c in INIT_CASES)
    progress.start("init", total)
    rows = []
    for case in INIT_CASES:
        samples = []
        for label, a in init_scales(case, d):
            s = sample_preactivations(case, a, d, draws, rng)
            fs = np.tanh(s)
            mean, std = preactivation_moments(case, a, d)
            samples.append(s)
            rows.append({"case": case, "title": INIT_CASES[case]["title"], "label": label, "a": a,
                         "bad": a == BAD_SCALE[case], "recommended": label == "recommended",
                         "mean_s": float(s.mean()), "std_s": float(s.std()),
                         "mean_s_exact": mean, "std_s_exact": std,
                         "q01": float(np.quantile(s, 0.01)), "q50": float(np.quantile(s, 0.5)),
                         "q99": float(np.quantile(s, 0.99)),
                         "saturated_fraction": float((np.abs(fs) > SATURATED).mean()),
                         "mean_dtanh": float((1 - fs * fs).mean())})
            progress.advance(1, f"{case} a={a:.3g}")
        # one set of log-spaced bins per case, covering every scale tried (s > 0 in all three cases)
        lo = min(max(float(np.quantile(x, 0.001)), 1e-12) for x in samples)
        hi = max(float(x.max()) for x in samples)
        edges = np.geomspace(lo, hi * 1.0001, bins + 1)
        for row, s in zip(rows[-len(samples):], samples):
            counts, _ = np.histogram(np.clip(s, edges[0], edges[-1]), bins=edges)
            row["hist_edges"] = edges.tolist()
            row["hist_counts"] = counts.tolist()
    progress.finish()
    settings = {"d": d, "draws": draws, "seed": seed, "saturation_threshold": SATURATED,
                "s_saturated": S_SATURATED, "bad_scale": BAD_SCALE}
    command = command_line("init", draws=draws, seed=seed)
    return {"meta": run_meta("init", command, started, time.perf_counter() - t0), "settings": settings,
            "results": rows}


def start(settings: Settings, progress: Progress | None = None) -> dict[str, Any]:
    """``symdiff experiment init``: :func:`run_init` with the command line's draws and seed."""
    return run_init(draws=settings.draws, seed=settings.seed, progress=progress)


def summary_table(data: dict[str, Any]) -> tuple[str, list[str], list[list[str]]]:
    """``(title, columns, rows)`` of strings for the CLI to show."""
    cols = ["case", "scale", "a", "mean s", "std s", "saturated", "mean tanh'"]
    rows = [[r["case"], r["label"], f"{r['a']:.4g}", f"{r['mean_s']:.4g}", f"{r['std_s']:.3g}",
             f"{100 * r['saturated_fraction']:.1f}%", f"{r['mean_dtanh']:.3f}"] for r in data["results"]]
    return f"pre-activation of tanh(Σ x_i w_i), d={data['settings']['d']}, w_i ~ U[0, a]", cols, rows


def draw(plt: Any, data: dict[str, Any]) -> list[Any]:
    """Histograms of the pre-activation per case and scale, the saturated range shaded."""
    fig, axes = plt.subplots(1, len(INIT_CASES), figsize=(11, 3.6))
    for ax, case in zip(axes, INIT_CASES):
        rows = [r for r in data["results"] if r["case"] == case]
        for r in rows:
            edges = np.array(r["hist_edges"])
            ax.stairs(r["hist_counts"], edges,
                      label=f"{'recommended ' if r['recommended'] else ''}a = {r['a']:.3g}: "
                            f"{100 * r['saturated_fraction']:.1f}% saturated")
        ax.set_xscale("log")
        ax.axvspan(S_SATURATED, max(r["hist_edges"][-1] for r in rows), color="red", alpha=0.08)
        ax.axvline(S_SATURATED, color="red", lw=0.8)
        ax.set_title(rows[0]["title"], fontsize=9)
        ax.set_xlabel("s = Σ x_i w_i (log scale; red: |tanh s| > 0.99)", fontsize=8)
        ax.legend(fontsize=7, loc="upper left")
    axes[0].set_ylabel(f"count of {data['settings']['draws']} draws")
    fig.tight_layout()
    return [fig]


def report_section(ini: dict[str, Any], results: dict[str, Any], report_dir: Path, out: Path) -> list[str]:
    """§4 of the report: the derivation, the sampled check, and what no scale can fix."""
    s = ini["settings"]
    d = s["d"]
    res = ini["results"]
    rec = {r["case"]: r for r in res if r["recommended"]}
    bad = {r["case"]: r for r in res if r["bad"]}
    one = [r for r in res if r["case"] == "one-hot" and r["a"] == 1.0]
    L = [TITLE, "",
         f"`f = tanh(s)`, `s = Σ_(i=1..{d}) x_i w_i`, `w_i ~ U[0, a]` independent of each other and of x, so "
         "`E[w] = a/2` and `E[w²] = a²/3`. tanh is responsive for |s| of order 1 (tanh′(1) = 0.42) and flat "
         f"once |s| > atanh({SATURATED}) = {S_SATURATED:.2f}, where |f| > {SATURATED} and the gradient "
         "1 − f² < 0.02. Because every x_i and w_i is non-negative, s is never negative and its **mean** is what "
         "must be controlled, not only its spread. The rule used: make the root mean square of s equal to 1, "
         "`E[s²] = E[s]² + Var[s] = 1`; both terms are proportional to a², so `a = 1 / sqrt(E[s²] at a = 1)`.", "",
         "* **(1) one-hot x** (exactly one x_k = 1): `s = w_k ~ U[0, a]`, `E[s²] = a²/3`, so **a = √3 ≈ 1.73**, "
         "independent of d. s then lies in [0, 1.73] and can never saturate; any a up to about 2.6 would do.",
         "* **(2) x_i ~ U[0, 1]** (`E[x] = 1/2`, `E[x²] = 1/3`): `E[s] = d·a/4`, "
         "`Var[s] = d·a²·(1/9 − 1/16) = 7·d·a²/144`, so `a = 1/sqrt(d²/16 + 7d/144)` ≈ 4/d "
         f"= **{fmt_g(rec['uniform']['a'], 4)}** for d = {d}.",
         "* **(3) x_i ~ U[1000, 1001]** (`E[x] = 1000.5`, `E[x²] = 1000.5² + 1/12`): `E[s] = d·1000.5·a/2`, "
         "`Var[s] = d·a²·(E[x²]/3 − E[x]²/4)`, so a ≈ 2/(1000.5·d) "
         f"= **{fmt_g(rec['shifted']['a'], 4)}**.", "",
         "In general, with non-negative inputs the mean dominates and `a ≈ 2/(d·E[x])`: the scale must shrink like "
         "1/d (and like 1/E[x]), not like 1/√d as for zero-mean weights.", "",
         f"**The experiment** (`{ini['meta']['command']}`) draws {s['draws']:,} independent (x, w) pairs per case "
         "and scale and measures s, the fraction of saturated units (|f| > "
         f"{SATURATED}) and the mean slope tanh′(s):", ""]
    body = [[r["title"], r["label"], fmt_g(r["a"], 4), f"{fmt_g(r['mean_s'], 4)} ({fmt_g(r['mean_s_exact'], 4)})",
             f"{fmt_g(r['std_s'], 3)} ({fmt_g(r['std_s_exact'], 3)})", f"{fmt_g(r['q01'], 3)} – {fmt_g(r['q99'], 3)}",
             f"{100 * r['saturated_fraction']:.1f}%", fmt_f(r["mean_dtanh"])] for r in res]
    L += [md_table(["x", "scale", "a", "mean s (exact)", "std s (exact)", "1%–99% of s", "saturated", "mean tanh′"],
                    body, "llrrrrrr"), "",
          figure_link(report_dir, out, FIGURES[0], "distribution of the pre-activation"), ""]
    text = (f"With the recommended scales no unit saturates and the mean slope is "
            f"{', '.join(fmt_f(rec[c]['mean_dtanh']) for c in INIT_CASES)} (cases 1–3). With a = 1, cases (2) and (3) "
            f"put s near {fmt_g(bad['uniform']['mean_s'], 3)} and {fmt_g(bad['shifted']['mean_s'], 3)}: "
            f"{100 * bad['uniform']['saturated_fraction']:.0f}% and {100 * bad['shifted']['saturated_fraction']:.0f}% "
            "of units saturated, tanh′ = 0 to double precision, so no gradient reaches the weights. ")
    if one:
        text += (f"For one-hot inputs a = 1 is harmless ({100 * one[0]['saturated_fraction']:.0f}% saturated, s ≤ 1); "
                 f"a badly chosen a = {fmt_g(bad['one-hot']['a'])} saturates "
                 f"{100 * bad['one-hot']['saturated_fraction']:.0f}% of them. ")
    ratio = rec["shifted"]["std_s"] / rec["shifted"]["mean_s"]
    text += (f"A caveat the numbers make plain: in case (3) the recommended a keeps s in range, but s varies by only "
             f"{100 * ratio:.1f}% of its mean from unit to unit — the inputs' information sits in their fractional "
             "parts, which weights that are all positive cannot pick out, and std/mean of s does not depend on a at "
             "all. Centring the inputs (x − 1000.5) or zero-mean weights would fix that; no choice of a can.")
    L += [text, ""]
    return L
