"""Benchmark: epoch time of the shipped recurrent models against the LSTM, interleaved in one process.

    python -m benchmarks.rnn_epoch [--dataset PREFIX] [--models lstm gru] [--repeats 5] [--num_hid 64]
                                   [--max_len 30] [--dtype float32] [--json OUT]

Each model is built once (same hidden size, title length, batch size, dtype, optimizer: the LSTM
preset's settings by default), then one training epoch of each is timed in turn (lstm, gru, lstm,
gru, ...), so that both see the same machine load; the report gives each model's median epoch and
its ratio to the first model's median, plus the per-round ratios (their spread shows the noise).
The first round is a warm-up (kernels compile, caches fill) and is left out. The CPU model and
instruction-set level are printed with the numbers: a ratio only means something with them.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import models  # noqa: F401,I001  (first: one BLAS thread, see models/__init__)

from models import data as D
from models.training import QuietReporter, StopFlag, Trainer, TrainConfig, build_model

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data" / "smaller"


def cpu() -> dict[str, Any]:
    """CPU model, core count and the highest x86 vector extension the kernel reports."""
    name, flags, cores = platform.processor() or "unknown", set(), 0
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                name = value.strip()
                cores += 1
            elif key.strip() == "flags":
                flags = set(value.split())
    except OSError:
        pass
    isa = next((label for flag, label in (("avx512f", "AVX-512"), ("avx2", "AVX2"), ("avx", "AVX"),
                                          ("sse4_2", "SSE4.2")) if flag in flags), "unknown")
    return {"cpu": name, "isa": isa, "cores": cores}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default=str(SHARED))
    p.add_argument("--models", nargs="+", default=["lstm", "gru"])
    p.add_argument("--repeats", type=int, default=5, help="timed rounds after the warm-up (default 5)")
    p.add_argument("--num_hid", type=int, default=64)
    p.add_argument("--max_len", type=int, default=30)
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--optimizer", default="adam")
    p.add_argument("--json", default=None, help="also write the raw numbers here")
    args = p.parse_args(argv)
    ds = D.load_dataset(D.resolve_dataset(args.dataset))
    trainers = {}
    for kind in args.models:
        cfg = TrainConfig(epochs=1, init_lr=0.01, max_len=args.max_len, num_hid=args.num_hid,
                          batch_size=args.batch_size, dtype=args.dtype, optimizer=args.optimizer)
        dims = dict(max_len=cfg.max_len, num_chars=ds.vocab.num_chars, num_hid=cfg.num_hid,
                    num_labels=ds.vocab.num_labels)
        trainers[kind] = Trainer(build_model(kind, dims, seed=0, dtype=cfg.dtype, hp=cfg.record()), ds, cfg)
    times: dict[str, list[float]] = {k: [] for k in args.models}
    for round_ in range(args.repeats + 1):
        for kind, trainer in trainers.items():
            t0 = time.perf_counter()
            trainer.train(QuietReporter(), StopFlag())
            if round_:  # round 0 is the warm-up
                times[kind].append(time.perf_counter() - t0)
    base = args.models[0]
    machine = cpu()
    out = {"machine": machine, "settings": {k: v for k, v in vars(args).items() if k != "json"}, "seconds": times,
           "median": {k: statistics.median(v) for k, v in times.items()},
           "ratio_of_medians": {k: statistics.median(v) / statistics.median(times[base]) for k, v in times.items()},
           "ratio_per_round": {k: [a / b for a, b in zip(v, times[base])] for k, v in times.items()}}
    print(f"{machine['cpu']} ({machine['isa']}, {machine['cores']} cores); {args.repeats} timed rounds, "
          f"models interleaved; hidden {args.num_hid}, max_len {args.max_len}, batch {args.batch_size}, {args.dtype}")
    for kind in args.models:
        per = ", ".join(f"{r:.2f}" for r in out["ratio_per_round"][kind])
        print(f"{kind:10s} median epoch {out['median'][kind]:7.2f} s   x{out['ratio_of_medians'][kind]:.2f} of {base}"
              f"   (per round: {per})")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
