"""Which pruner for `symdiff tune`? Replay candidate pruners on a study run without pruning.

    python -m benchmarks.pruners --storage docs/tune/smaller.journal --study lstm-smaller

A study run with ``--pruner none`` records every trial's validation loss after every epoch. Here
each candidate pruner sees those curves trial by trial, in trial order, epoch by epoch, exactly
as ``trial.report`` / ``trial.should_prune`` would have shown them, and we count what it would
have saved (epochs not trained) and what it would have cost (good trials stopped: the study's
best trial, and how many of the best five). The replay is sequential; with several workers the
real order interleaves, which only changes which trials have finished when a decision is made.
"""
from __future__ import annotations

import argparse
import sys
from typing import Any

import optuna

from models.tune import StorageSpec


def candidates() -> dict[str, Any]:
    P = optuna.pruners
    return {
        # n_warmup_steps=w: no pruning at epochs < w (epochs count from 1, so w=2 spares epoch 1 only)
        "median (4 startup, from epoch 1)": lambda: P.MedianPruner(n_startup_trials=4),
        "median (4 startup, from epoch 2)": lambda: P.MedianPruner(n_startup_trials=4, n_warmup_steps=2),
        "median (4 startup, from epoch 3)": lambda: P.MedianPruner(n_startup_trials=4, n_warmup_steps=3),
        "median (5 startup, from epoch 1; Optuna's defaults)": lambda: P.MedianPruner(),
        "percentile 25 (4 startup, from epoch 2)": lambda: P.PercentilePruner(25.0, n_startup_trials=4, n_warmup_steps=2),
        "successive halving": lambda: P.SuccessiveHalvingPruner(),
        "hyperband": lambda: P.HyperbandPruner(min_resource=1, max_resource=20),
        "patient(median from epoch 2, patience 2)": lambda: P.PatientPruner(P.MedianPruner(n_startup_trials=4, n_warmup_steps=2), patience=2),
    }


def replay(trials: list[Any], make: Any) -> dict[str, Any]:
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    study = optuna.create_study(study_name="replay", direction="minimize", pruner=make())  # fixed name: Hyperband's brackets hash it
    epochs_run, seconds, pruned = 0, 0.0, set()
    for t in trials:
        live = study.ask()
        per_epoch = (t.datetime_complete - t.datetime_start).total_seconds() / len(t.intermediate_values)
        for step in sorted(t.intermediate_values):
            epochs_run += 1
            seconds += per_epoch
            live.report(t.intermediate_values[step], step)
            if live.should_prune():
                study.tell(live, state=optuna.trial.TrialState.PRUNED)
                pruned.add(t.number)
                break
        else:
            study.tell(live, t.value)
    ranked = sorted(trials, key=lambda t: t.value)
    return {"epochs": epochs_run, "seconds": seconds, "pruned": len(pruned), "best_pruned": ranked[0].number in pruned,
            "top5_pruned": sum(t.number in pruned for t in ranked[:5])}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.pruners", description=__doc__.split("\n\n")[0])
    p.add_argument("--storage", required=True, help="journal path or database URL")
    p.add_argument("--study", required=True)
    args = p.parse_args(argv)
    study = optuna.load_study(study_name=args.study, storage=StorageSpec(args.storage).open())
    trials = sorted((t for t in study.get_trials() if t.state.name == "COMPLETE" and t.intermediate_values),
                    key=lambda t: t.number)
    full = sum(len(t.intermediate_values) for t in trials)
    full_s = sum((t.datetime_complete - t.datetime_start).total_seconds() for t in trials)
    print(f"{args.study}: {len(trials)} complete trials, {full} epochs trained without pruning "
          f"in {full_s:.0f} s of trial time (each trial already stops 2 epochs after its best: patience 2); "
          f"time saved counts a trial's seconds evenly over its epochs")
    print("| pruner | epochs trained | epochs saved | time saved | trials pruned | best trial pruned | of the best 5 pruned |")
    print("|---|---|---|---|---|---|---|")
    for name, make in candidates().items():
        r = replay(trials, make)
        print(f"| {name} | {r['epochs']} | {1 - r['epochs'] / full:.0%} | {max(0.0, 1 - r['seconds'] / full_s):.0%} | {r['pruned']} | "
              f"{'yes' if r['best_pruned'] else 'no'} | {r['top5_pruned']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
