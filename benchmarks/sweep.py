"""Hyperparameter sweep on the VALIDATION split only: train configurations in-process, record the
best validation loss/accuracy and the wall time of each, never touch the test split's labels.

    python -m benchmarks.sweep --model lstm --set optimizer=adam --set patience=3 \\
        --grid init_lr=0.003,0.01 --grid num_hid=64,128 --out docs/sweep/lstm.jsonl

Every ``--grid KEY=V1,V2,...`` multiplies the configurations (cartesian product); ``--set KEY=V``
fixes a value for all of them. KEY is any field of :class:`models.training.TrainConfig`
(``max_len num_hid batch_size epochs init_lr dtype optimizer momentum weight_decay clip schedule
patience seed``); anything not given keeps the seed's default (and the seed's learning rate for
the model). Results are appended to ``--out`` as JSON lines, one per configuration, as soon as
it finishes, and ``--csv`` (default: ``--out`` with ``.csv``) is rewritten from all lines so far.
A configuration already present in ``--out`` (same model, dataset and config) is skipped, so an
interrupted sweep resumes where it stopped. ``--list`` prints the table of ``--out`` sorted by
validation loss and exits.

The wall time of a configuration covers building and compiling the model and training
(data loading, shared by all configurations, and interpreter start-up are not included). The
machine may be shared: treat seconds as rough.
"""
from __future__ import annotations

import argparse
import csv
import itertools
import json
import math
import os
import sys
import time
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from models import data as D
from models.training import DEFAULT_LR, MODELS, StopFlag, Trainer, TrainConfig, build_model

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data" / "smaller"
KEYS = {f.name for f in fields(TrainConfig)} - {"dense", "fuse"}
CSV_COLUMNS = ("model", "optimizer", "init_lr", "num_hid", "max_len", "batch_size", "dtype", "schedule",
               "weight_decay", "clip", "patience", "epochs", "seed", "valid_loss", "valid_accuracy",
               "best_epoch", "epochs_run", "stopped", "seconds")


class _Quiet:
    """A reporter that shows one line per epoch only with ``--verbose``."""

    def __init__(self, verbose: bool) -> None:
        self.verbose = verbose

    def start(self, *a: Any) -> None: ...
    def batch(self, *a: Any) -> None: ...

    def epoch(self, r: Any) -> None:
        if self.verbose:
            print(f"    epoch {r.epoch:3d}  valid loss {r.valid_loss:.4f}  acc {r.valid_accuracy:.4f}  "
                  f"({r.train_seconds:.2f}s)", flush=True)

    def info(self, *a: Any) -> None: ...

    def warn(self, text: str) -> None:
        print(f"    warning: {text}", file=sys.stderr, flush=True)

    def finish(self, *a: Any) -> None: ...


def _value(text: str) -> Any:
    """``none`` -> None, then int, float, else the string (``adam``, ``float32``)."""
    if text.lower() == "none":
        return None
    for conv in (int, float):
        try:
            return conv(text)
        except ValueError:
            pass
    return text


def _pair(text: str, many: bool) -> tuple[str, list[Any]]:
    key, sep, rest = text.partition("=")
    key = key.strip().lstrip("-")
    if not sep or key not in KEYS:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE{',VALUE...' if many else ''} with KEY one of "
                                         f"{', '.join(sorted(KEYS))}; got {text!r}")
    values = [_value(v.strip()) for v in (rest.split(",") if many else [rest])]
    return key, values


def configs(kind: str, fixed: dict[str, Any], grid: dict[str, list[Any]]) -> Iterator[TrainConfig]:
    keys = list(grid)
    for combo in itertools.product(*(grid[k] for k in keys)):
        params = {"init_lr": DEFAULT_LR[kind], **fixed, **dict(zip(keys, combo))}
        yield TrainConfig(**params)


def train_one(kind: str, ds: D.Dataset, cfg: TrainConfig, verbose: bool = False) -> dict[str, Any]:
    """Train one configuration; validation numbers only (the test split is never evaluated)."""
    t0 = time.perf_counter()
    dims = dict(max_len=cfg.max_len, num_chars=ds.vocab.num_chars, num_hid=cfg.num_hid,
                num_labels=ds.vocab.num_labels)
    model = build_model(kind, dims, seed=cfg.seed, dtype=cfg.dtype)
    trainer = Trainer(model, ds, cfg)
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        result = trainer.train(_Quiet(verbose), StopFlag())
    seconds = time.perf_counter() - t0
    best = next((e for e in result.epochs if e.epoch == result.best_epoch), None)
    return {"model": kind, "config": asdict(cfg),
            "valid_loss": best.valid_loss if best else math.nan,
            "valid_accuracy": best.valid_accuracy if best else math.nan,
            "best_epoch": result.best_epoch, "epochs_run": len(result.epochs), "stopped": result.stopped,
            "seconds": round(seconds, 2),
            "curve": [round(e.valid_loss, 4) for e in result.epochs]}


def read_results(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(CSV_COLUMNS)
        for r in rows:
            flat = {**r["config"], **r}
            w.writerow([flat.get(c) if not isinstance(flat.get(c), float) else f"{flat[c]:.6g}"
                        for c in CSV_COLUMNS])
    os.replace(tmp, path)


def table(rows: list[dict[str, Any]]) -> str:
    head = ("| model | optimizer | lr | hid | len | batch | dtype | schedule | wd | clip | seed | valid loss | "
            "valid acc | best/run | s |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in sorted(rows, key=lambda r: (r["model"], r["valid_loss"])):
        c = r["config"]
        lines.append(f"| {r['model']} | {c['optimizer']} | {c['init_lr']:g} | {c['num_hid']} | {c['max_len']} | "
                     f"{c['batch_size']} | {c['dtype']} | {c['schedule']} | {c['weight_decay']:g} | "
                     f"{c['clip'] if c['clip'] is not None else '–'} | {c['seed']} | {r['valid_loss']:.4f} | "
                     f"{r['valid_accuracy']:.4f} | {r['best_epoch']}/{r['epochs_run']} | {r['seconds']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.sweep", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=MODELS, default="lstm")
    p.add_argument("--dataset", default=str(SHARED), help="path prefix (default ../shared/data/smaller)")
    p.add_argument("--set", dest="fixed", action="append", default=[], type=lambda t: _pair(t, False),
                   metavar="KEY=VALUE", help="fix a TrainConfig field for every configuration")
    p.add_argument("--grid", action="append", default=[], type=lambda t: _pair(t, True),
                   metavar="KEY=V1,V2", help="sweep a TrainConfig field over these values")
    p.add_argument("--out", default=None, help="JSON lines, appended (default docs/sweep/MODEL.jsonl)")
    p.add_argument("--csv", default=None, help="CSV of all results (default: --out with .csv)")
    p.add_argument("--list", action="store_true", help="print the results in --out as a table and exit")
    p.add_argument("--verbose", action="store_true", help="print every epoch")
    args = p.parse_args(argv)
    out = Path(args.out or f"docs/sweep/{args.model}.jsonl")
    done = read_results(out)
    if args.list:
        try:
            print(table(done))
        except BrokenPipeError:  # `--list | head`
            sys.stderr.close()
        return 0
    fixed = {k: v[0] for k, v in args.fixed}
    grid = {k: v for k, v in args.grid}
    prefix = D.resolve_dataset(args.dataset)
    ds = D.load_dataset(prefix)
    out.parent.mkdir(parents=True, exist_ok=True)
    seen = {(r["model"], r.get("dataset"), json.dumps(r["config"], sort_keys=True)) for r in done}
    todo = list(configs(args.model, fixed, grid))
    t_all = time.perf_counter()
    for n, cfg in enumerate(todo, 1):
        key = (args.model, str(prefix), json.dumps(asdict(cfg), sort_keys=True))
        if key in seen:
            print(f"[{n}/{len(todo)}] skip (already in {out}): {asdict(cfg)}", flush=True)
            continue
        changed = {k: v for k, v in asdict(cfg).items() if v != getattr(TrainConfig(init_lr=DEFAULT_LR[args.model]), k)}
        print(f"[{n}/{len(todo)}] {args.model} {changed}", flush=True)
        row = {**train_one(args.model, ds, cfg, args.verbose), "dataset": str(prefix)}
        print(f"    valid loss {row['valid_loss']:.4f}  acc {row['valid_accuracy']:.4f}  best epoch "
              f"{row['best_epoch']}/{row['epochs_run']}  {row['seconds']:.1f}s", flush=True)
        with out.open("a") as fh:
            fh.write(json.dumps(row) + "\n")
        done.append(row)
        seen.add(key)
        write_csv(Path(args.csv) if args.csv else out.with_suffix(".csv"), done)
    print(f"sweep: {len(todo)} configuration(s), {time.perf_counter() - t_all:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
