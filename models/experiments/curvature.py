"""Curvature: the training loss's top Hessian eigenvalue after every epoch, against 2/lr.

Plain gradient descent with learning rate ``lr`` is stable on a quadratic only while
the Hessian's top eigenvalue stays below ``2/lr``; Cohen et al. (2021, "Gradient
Descent on Neural Networks Typically Occurs at the Edge of Stability") found that
full-batch training drives it up to that threshold and holds it there. Here the
seed-default SGD runs (batch 64) are measured: after each epoch, power iteration on
Hessian-vector products (:class:`symdiff.HVP`, forward-over-reverse) of the mean
loss over a fixed sample of training rows.

Like every experiment module it provides ``NAME``, ``HELP``, ``TITLE``, ``FIGURES``,
``CSV_FIELDS``/``CSV_ROWS``, ``start(settings, progress)``, ``summary_table(data)``,
``draw(plt, data)`` and ``report_section(data, results, report_dir, out)``; the list
in :mod:`models.experiments` is all that names it.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from .common import MODELS, NoProgress, Progress, Settings, command_line, default_dataset, figure_link, fmt_g, md_table
from .machine import run_meta

NAME = "curvature"
HELP = "top Hessian eigenvalue after each epoch of the seed-default runs, against 2/lr"
TITLE = "## 5. Curvature: the top Hessian eigenvalue against the edge of stability"
FIGURES = ("curvature.png",)
CSV_FIELDS = ("model", "epoch", "train_loss", "valid_loss", "sample_loss", "top_eigenvalue", "two_over_lr",
              "iterations", "converged", "seconds")
CSV_ROWS = "results"
EPOCHS = 15            # the seed default
SAMPLE_ROWS = 512      # training rows the Hessian is taken over (fixed per run)
MAX_ITERATIONS = 60
RTOL = 1e-4            # power iteration stops when the Rayleigh quotient moves less than this, relatively


def top_eigenvalue(hvp: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]], shapes: Mapping[str, tuple],
                   rng: np.random.Generator, *, max_iterations: int = MAX_ITERATIONS,
                   rtol: float = RTOL) -> tuple[float, int, bool]:
    """The Hessian eigenvalue of largest magnitude by power iteration on ``hvp`` (name → array maps).

    Returns the Rayleigh quotient ``vᵀHv`` of the last unit vector, the number of
    HVPs taken and whether it converged (quotient moved by at most ``rtol``
    relatively). Power iteration finds the largest ``|λ|``, which may be negative.
    """
    v = {n: rng.standard_normal(s) for n, s in shapes.items()}
    norm = np.sqrt(sum(float(np.sum(a * a)) for a in v.values()))
    v = {n: a / norm for n, a in v.items()}
    last = None
    for k in range(1, max_iterations + 1):
        hv = hvp(v)
        lam = sum(float(np.sum(v[n] * hv[n])) for n in v)
        norm = np.sqrt(sum(float(np.sum(a * a)) for a in hv.values()))
        if norm == 0:
            return 0.0, k, True
        v = {n: a / norm for n, a in hv.items()}
        if last is not None and abs(lam - last) <= rtol * abs(lam):
            return lam, k, True
        last = lam
    return float(last), max_iterations, False


def run_curvature(*, dataset: str | None = None, epochs: int = EPOCHS, seed: int = 0, sample_rows: int = SAMPLE_ROWS,
                  models: tuple[str, ...] = MODELS, progress: Progress | None = None) -> dict[str, Any]:
    """Train each model with the seed defaults; after every epoch, the top eigenvalue on the sample."""
    from symdiff import HVP
    from models import data as D
    from models.training import DEFAULT_LR, Reporter, StopFlag, Trainer, TrainConfig, build_model

    progress = progress or NoProgress()
    prefix = D.resolve_dataset(dataset or default_dataset())
    ds = D.load_dataset(prefix)
    started, t0 = time.time(), time.perf_counter()
    progress.start("curvature", epochs * len(models))
    rows: list[dict[str, Any]] = []
    for kind in models:
        cfg = TrainConfig(epochs=epochs, init_lr=DEFAULT_LR[kind], seed=seed)
        dims = dict(max_len=cfg.max_len, num_chars=ds.vocab.num_chars, num_hid=cfg.num_hid,
                    num_labels=ds.vocab.num_labels)
        model = build_model(kind, dims, seed=seed)
        trainer = Trainer(model, ds, cfg)
        rng = np.random.default_rng(seed)
        pick = np.sort(rng.choice(len(ds.train), size=min(sample_rows, len(ds.train)), replace=False))
        labels = ds.train.label_ids[pick]
        feed = {**model.feed(trainer.codes["train"][pick]), "y": np.eye(ds.vocab.num_labels)[labels]}
        if "h0" in model.xm.registers():
            feed.update(h0=np.zeros((len(pick), cfg.num_hid)), c0=np.zeros((len(pick), cfg.num_hid)))
        params = model.xm.params()
        hvp = HVP(model.xm, "loss", params, values={**model.params, **feed})  # built for these shapes
        shapes = {p: np.shape(model.params[p]) for p in params}

        class Measure(Reporter):
            def epoch(self, r: Any) -> None:
                t = time.perf_counter()
                values = {**model.params, **feed}
                lam, its, ok = top_eigenvalue(lambda v: hvp(v, values), shapes, np.random.default_rng(seed + r.epoch))
                loss = float(trainer.ad.eval(model.xm.operationSequence(model.xm.loss), values)["loss"])
                rows.append({"model": kind, "epoch": r.epoch, "train_loss": r.train_loss, "valid_loss": r.valid_loss,
                             "sample_loss": loss, "top_eigenvalue": lam, "two_over_lr": 2 / r.lr, "iterations": its,
                             "converged": ok, "seconds": time.perf_counter() - t})
                progress.advance(1, f"{kind} epoch {r.epoch}: λmax {lam:.3g} (2/lr {2 / r.lr:.3g})")

        trainer.train(Measure(), StopFlag())
    progress.finish()
    settings = {"dataset": str(prefix), "epochs": epochs, "seed": seed, "sample_rows": sample_rows,
                "max_iterations": MAX_ITERATIONS, "rtol": RTOL, "lr": {k: DEFAULT_LR[k] for k in models},
                "batch_size": 64}
    command = command_line("curvature", dataset=dataset, seed=seed)
    return {"meta": run_meta("curvature", command, started, time.perf_counter() - t0), "settings": settings,
            "results": rows}


def start(settings: Settings, progress: Progress | None = None) -> dict[str, Any]:
    """``symdiff experiment curvature``: the seed-default runs (15 epochs) on the dataset given."""
    return run_curvature(dataset=settings.dataset, seed=settings.seed, progress=progress)


def summary_table(data: dict[str, Any]) -> tuple[str, list[str], list[list[str]]]:
    """``(title, columns, rows)`` of strings for the CLI to show."""
    cols = ["model", "epoch", "train loss", "λmax", "2/lr", "λmax·lr/2", "HVPs"]
    rows = [[r["model"], str(r["epoch"]), f"{r['train_loss']:.4f}", fmt_g(r["top_eigenvalue"], 4),
             fmt_g(r["two_over_lr"], 3), f"{r['top_eigenvalue'] / r['two_over_lr']:.3f}",
             f"{r['iterations']}{'' if r['converged'] else '*'}"] for r in data["results"]]
    return (f"top Hessian eigenvalue of the mean loss over {data['settings']['sample_rows']} training rows "
            "(* not converged)", cols, rows)


def draw(plt: Any, data: dict[str, Any]) -> list[Any]:
    """λmax per epoch for each model, with its 2/lr line."""
    kinds = list(dict.fromkeys(r["model"] for r in data["results"]))
    fig, axes = plt.subplots(1, len(kinds), figsize=(5 * len(kinds), 3.4), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        rs = [r for r in data["results"] if r["model"] == kind]
        ax.plot([r["epoch"] for r in rs], [r["top_eigenvalue"] for r in rs], "o-", label="top eigenvalue λmax")
        ax.axhline(rs[0]["two_over_lr"], color="red", lw=1, ls="--", label=f"2/lr = {rs[0]['two_over_lr']:g}")
        ax.set_title(f"{kind.upper()}, SGD lr {2 / rs[0]['two_over_lr']:g}, batch 64", fontsize=9)
        ax.set_xlabel("epoch")
        ax.set_ylabel("λmax of the training loss's Hessian")
        ax.legend(fontsize=8)
    fig.tight_layout()
    return [fig]


def _reading(res: list[dict[str, Any]]) -> str:
    """What the numbers show, chosen by the numbers: far below, hovering at, or beyond the edge of stability."""
    parts = []
    for kind in dict.fromkeys(r["model"] for r in res):
        rs = [r for r in res if r["model"] == kind]
        ratios = [r["top_eigenvalue"] / r["two_over_lr"] for r in rs]
        third = max(len(ratios) // 3, 1)
        early, late = float(np.mean(ratios[:third])), float(np.median(ratios[third:] or ratios))
        peak = max(range(len(ratios)), key=ratios.__getitem__)
        trend = ("rises over training (progressive sharpening)" if late > early * 1.1 else
                 "falls over training" if late < early / 1.1 else "stays roughly level")
        over = [k for k, q in enumerate(ratios) if q > 1]
        fell = [k for k in over if k + 1 < len(ratios) and ratios[k + 1] < ratios[k]]
        if ratios[peak] < 0.5:
            where = (f"stays below half of 2/lr (at most {ratios[peak]:.2f} of it, epoch {rs[peak]['epoch']}): far "
                     "from the edge of stability; sharpness does not limit this step size")
        elif 0.5 <= late <= 1.2:
            rest = ratios[third:] or ratios
            where = (f"is within a factor 2 of 2/lr from epoch {rs[next(k for k, q in enumerate(ratios) if q >= 0.5)]['epoch']} "
                     f"on: over epochs {rs[third]['epoch']}–{rs[-1]['epoch']} it moves between {min(rest):.2f} and "
                     f"{max(rest):.2f} of 2/lr (median {late:.2f}), with a peak of {ratios[peak]:.2f} at epoch "
                     f"{rs[peak]['epoch']}")
            if over:
                where += (f"; of the {len(over)} epoch(s) that ended above 2/lr, {len(fell)} were followed by a "
                          "lower λmax. Training runs close to the edge of stability that Cohen et al. describe for "
                          "full-batch gradient descent, and crosses it without diverging")
        elif late > 1.2:
            where = f"stays above 2/lr (median {late:.2f} of it) without diverging: minibatch noise, not the bound, rules"
        else:
            where = (f"comes to {ratios[peak]:.2f} of 2/lr at its peak (epoch {rs[peak]['epoch']}) but mostly stays "
                     f"below half of it (median {late:.2f})")
        parts.append(f"For the {kind.upper()}, λmax {trend} and {where}.")
    return ("What the numbers show: " + " ".join(parts) + " These are minibatch (64) SGD runs and λmax is taken on "
            "a sample of training rows, so they differ from the paper's full-batch setting; single epochs are one "
            "sample each of a noisy process.")


def report_section(data: dict[str, Any], results: dict[str, Any], report_dir: Path, out: Path) -> list[str]:
    """§5: what the top eigenvalue does during the seed-default runs, against 2/lr."""
    s = data["settings"]
    res = data["results"]
    L = [TITLE, "",
         "Gradient descent with learning rate lr is stable on a quadratic only while the Hessian's top eigenvalue "
         "λmax stays below 2/lr; Cohen et al. (2021) found that full-batch gradient descent on neural networks "
         "raises λmax until it reaches 2/lr and then hovers there (the *edge of stability*). "
         f"`{data['meta']['command']}` trains both models with the seed defaults ({s['epochs']} epochs of SGD, "
         f"batch {s['batch_size']}) and after every epoch computes λmax of the mean loss over a fixed sample of "
         f"{s['sample_rows']} training rows by power iteration on Hessian-vector products (`symdiff.HVP`, "
         f"forward-over-reverse through the gradient graph; stopped when the Rayleigh quotient moves by less than "
         f"{s['rtol']:g} relatively, at most {s['max_iterations']} HVPs). The tests check the power iteration "
         "against `numpy.linalg.eigvalsh` of a full Hessian built from basis HVPs on a small model.", ""]
    body = [[r["model"], str(r["epoch"]), f"{r['train_loss']:.4f}", f"{r['valid_loss']:.4f}",
             fmt_g(r["top_eigenvalue"], 4), f"{r['top_eigenvalue'] / r['two_over_lr']:.3f}",
             f"{r['iterations']}{'' if r['converged'] else ' (not converged)'}"] for r in res]
    L += [md_table(["model", "epoch", "train loss", "valid loss", "λmax", "λmax / (2/lr)", "HVPs"], body, "lrrrrrr"),
          "", figure_link(report_dir, out, FIGURES[0], "top Hessian eigenvalue per epoch against 2/lr"), ""]
    text = []
    for kind in dict.fromkeys(r["model"] for r in res):
        rs = [r for r in res if r["model"] == kind]
        lams = [r["top_eigenvalue"] for r in rs]
        thr = rs[0]["two_over_lr"]
        peak = max(rs, key=lambda r: r["top_eigenvalue"])
        text.append(f"**{kind.upper()}** (lr {2 / thr:g}, 2/lr = {thr:g}): λmax goes from {fmt_g(lams[0], 3)} after "
                    f"epoch 1 to {fmt_g(lams[-1], 3)} after epoch {rs[-1]['epoch']}, peaking at "
                    f"{fmt_g(peak['top_eigenvalue'], 3)} (epoch {peak['epoch']}), that is "
                    f"{peak['top_eigenvalue'] / thr:.2f} of the threshold.")
    L += [" ".join(text), "", _reading(res), ""]
    return L
