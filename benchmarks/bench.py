"""Benchmark: the engine against the hand-written numpy reference, in the same process.

    python -m benchmarks.bench [--dataset PREFIX] [--repeats 3] [--models mlp lstm] [--json]
                               [--isa native|avx2|both] [--clock wall|cpu]

For each model it draws one set of initial parameters, copies them into the
reference, checks that one epoch of SGD in both ends with the same parameters,
then times training epochs alternately (engine, reference, engine, ...) and
reports medians and the engine/reference ratio of the same run, then the cost of
second-order derivatives (one HVP, one JVP) relative to one gradient (for the LSTM
also a hand-fused numpy version, ``benchmarks/handfused.py``, as a yardstick
for what numpy allows): the machine is
shared, so only ratios measured side by side mean anything. Start-up time,
``--help`` time and the LSTM run's peak RSS are measured in subprocesses.

``--isa avx2`` times, on a machine with AVX-512, what an AVX2-only machine would run: the
benchmark re-runs itself in a child process with :data:`AVX2_ENV` (compiled kernels built with
``-march=x86-64-v3``, numpy's AVX-512 loops and OpenBLAS's AVX-512 kernels switched off);
``--isa both`` runs it both ways. Every report names the CPU model and the instruction-set level
each part ran at.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import models  # noqa: F401,I001  (first: one BLAS thread for engine and reference alike, see models/__init__)
import numpy as np

from benchmarks import handfused, reference as R
from symdiff import fusion, native
from models import data as D
from models.training import DEFAULT_LR, QuietReporter, StopFlag, Trainer, TrainConfig, build_model

REPO = Path(__file__).resolve().parents[1]
#: what makes this process run as an AVX2-only x86-64 machine would (all three are read at start-up)
AVX2_ENV = {"SYMDIFF_MARCH": "x86-64-v3",                           # compiled kernels: AVX2 + FMA
            "NPY_DISABLE_CPU_FEATURES": "X86_V4 AVX512_ICL AVX512_SPR",  # numpy's own SIMD loops
            "OPENBLAS_CORETYPE": "Haswell"}                             # the BLAS's product kernels
SHARED = REPO.parent / "shared" / "data" / "smaller"


def _engine(kind: str, ds: D.Dataset, dtype: str, dense: bool, fuse: bool = True, native: bool = True) -> Trainer:
    cfg = TrainConfig(epochs=1, init_lr=DEFAULT_LR[kind], dtype=dtype, dense=dense, fuse=fuse, native=native)
    dims = dict(max_len=cfg.max_len, num_chars=ds.vocab.num_chars, num_hid=cfg.num_hid,
                num_labels=ds.vocab.num_labels)
    model = build_model(kind, dims, seed=cfg.seed, dtype=dtype)
    return Trainer(model, ds, cfg)


#: how epochs are timed: "wall" (time.perf_counter) or "cpu" (this thread's CPU time, time.thread_time;
#: BLAS runs in this one thread). On a machine shared by other processes wall time charges an epoch
#: for the time slices others took; CPU time does not (it still sees their cache and memory traffic).
CLOCKS = {"wall": time.perf_counter, "cpu": time.thread_time}
clock = "wall"


def _engine_epoch(trainer: Trainer) -> float:
    """The training loop's time for one epoch (the trainer measures both clocks; validation excluded)."""
    epoch = trainer.train(QuietReporter(), StopFlag()).epochs[0]
    return epoch.train_cpu_seconds if clock == "cpu" else epoch.train_seconds


def _timed(fn: Any, *args: Any) -> float:
    tick = CLOCKS[clock]
    t0 = tick()
    fn(*args)
    return tick() - t0


def _reference_epoch(kind: str, params: dict[str, np.ndarray], codes: np.ndarray, y: np.ndarray,
                     batch_size: int, lr: float, seed: int) -> float:
    return _timed(R.train_epoch, kind, params, codes, y, batch_size, lr, np.random.default_rng(seed))


def agreement(kind: str, ds: D.Dataset) -> float:
    """Max |param difference| after one epoch of SGD from the same start and batch order."""
    trainer = _engine(kind, ds, "float64", dense=False)
    start = {n: a.copy() for n, a in trainer.model.params.items()}
    codes = trainer.codes["train"]
    y = np.eye(ds.vocab.num_labels)[ds.train.label_ids]
    trainer.train(QuietReporter(), StopFlag())
    R.train_epoch(kind, start, codes, y, trainer.cfg.batch_size, trainer.cfg.init_lr,
                  np.random.default_rng(trainer.cfg.seed))
    return max(float(np.max(np.abs(start[n] - a))) for n, a in trainer.model.params.items())


#: the engine with fused kernels differentiating σ and tanh exactly (see symdiff.fusion.FUSED_DERIVATIVES)
EXACT = "engine, exact σ'/tanh'"


def time_model(kind: str, ds: D.Dataset, repeats: int) -> list[dict[str, Any]]:
    rows = []
    y64 = np.eye(ds.vocab.num_labels)[ds.train.label_ids]
    for dtype in ("float64", "float32"):
        variants = {"engine": _engine(kind, ds, dtype, dense=False)}
        if dtype == "float64":
            variants["engine --dense"] = _engine(kind, ds, dtype, dense=True)
            variants["engine --no-fuse"] = _engine(kind, ds, dtype, dense=False, fuse=False)
            if native.enabled():  # the engine on a machine without a C compiler (numpy kernels only)
                variants["engine --no-native"] = _engine(kind, ds, dtype, dense=False, native=False)
            if kind == "lstm":  # fused kernels' σ', tanh' as the ops' exact forms (fusion.FUSED_DERIVATIVES)
                chosen, fusion.FUSED_DERIVATIVES = fusion.FUSED_DERIVATIVES, "exact"
                try:  # the program's fused kernels are made when it compiles, here
                    variants[EXACT] = _engine(kind, ds, dtype, dense=False)
                finally:
                    fusion.FUSED_DERIVATIVES = chosen
        ref_params = {n: a.copy() for n, a in variants["engine"].model.params.items()}
        codes = variants["engine"].codes["train"]
        y = y64.astype(dtype)
        times: dict[str, list[float]] = {name: [] for name in variants}
        times["reference"] = []
        fused_params = {n: a.copy() for n, a in ref_params.items()}
        if kind == "lstm":  # how far numpy itself gets (benchmarks/handfused.py), a yardstick
            times["hand-fused numpy"] = []
        for _ in range(repeats):
            for name, trainer in variants.items():
                native.set_enabled(False if name == "engine --no-native" else None)  # no compiled helpers either
                try:
                    times[name].append(_engine_epoch(trainer))
                finally:
                    native.set_enabled(None)
            times["reference"].append(_reference_epoch(kind, ref_params, codes, y, 64, DEFAULT_LR[kind], 0))
            if kind == "lstm":
                times["hand-fused numpy"].append(_timed(handfused.train_epoch, fused_params, codes, y, 64,
                                                        DEFAULT_LR[kind], np.random.default_rng(0)))
        ref = statistics.median(times["reference"])
        for name, ts in times.items():
            med = statistics.median(ts)
            rows.append({"model": kind, "dtype": dtype, "impl": name, "median_s": med,
                         "min_s": min(ts), "max_s": max(ts), "ratio_to_reference": med / ref})
    return rows


def _cli() -> list[str]:
    return [sys.executable, str(REPO / "cli.py")]


def startup_seconds(repeats: int) -> dict[str, float]:
    """Launch → first training batch (the first progress line), and ``symdiff --help``."""
    first, helps = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        proc = subprocess.Popen([*_cli(), "mlp", "--epochs", "1", "--output_file", os.devnull],
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=REPO)
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith("training "):
                first.append(time.perf_counter() - t0)
                break
        proc.kill()
        proc.wait()
        t0 = time.perf_counter()
        subprocess.run([*_cli(), "--help"], stdout=subprocess.DEVNULL, check=True)
        helps.append(time.perf_counter() - t0)
    return {"to_first_batch_s": statistics.median(first), "help_s": statistics.median(helps)}


def peak_rss_mb(dataset: str, kind: str = "lstm") -> float:
    """Peak resident memory of a full-size training run (one epoch), in a child process."""
    code = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, check=True);"
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    out = subprocess.run([sys.executable, "-c", code, *_cli(), kind, "--epochs", "1", "--dataset", dataset,
                          "--output_file", os.devnull], capture_output=True, text=True, check=True, cwd=REPO)
    return int(out.stdout.strip()) / 1024


FIRST_BATCH = """
import time, numpy as np
t0 = time.perf_counter()
from models.training import build_model
from symdiff import Autograd
model = build_model("lstm", dict(max_len=10, num_chars=60, num_hid=50, num_labels=5), seed=0)
ad = Autograd(model.xm)
w = model.xm.operationSequence(model.xm.register("loss"))
codes = np.random.default_rng(0).integers(-1, 60, size=(64, 10))
inputs = {**model.params, **model.feed(codes), "y": np.eye(5)[np.arange(64) % 5]}
program = ad.compile(w)  # as the training loop runs a batch (eval/bprop keep every named register's gradient)
program.backward(program.forward(inputs, keep=("loss",)), {"loss": np.float64(1.0)}, params_only=True)
print(time.perf_counter() - t0)
"""


def native_build_seconds() -> dict[str, float]:
    """Import, build and one LSTM batch (forward and backward) in a fresh process: with an empty
    kernel cache (the first run on a machine compiles the dispatcher and the fused kernels) and
    again with the cache that run filled."""
    import tempfile

    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "SYMDIFF_CACHE": cache, "PYTHONPATH": str(REPO)}
        times = [float(subprocess.run([sys.executable, "-c", FIRST_BATCH], env=env, capture_output=True, text=True,
                                      check=True, cwd=REPO).stdout) for _ in range(2)]
    return {"cold_cache_s": times[0], "warm_cache_s": times[1]}


def _cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _x86_level(has: Any) -> str:
    if has("avx512f"):
        return "x86-64-v4 (AVX-512)"
    if has("avx2"):
        return "x86-64-v3 (AVX2)"
    return "x86-64-v2 or lower (no AVX2)"


def isa_levels() -> dict[str, str]:
    """The instruction-set level of the CPU, and the one each part of this process runs at.

    The CPU's from /proc/cpuinfo; numpy's from its runtime dispatch (``NPY_DISABLE_CPU_FEATURES``
    lowers it); the compiled kernels' from their ``-march`` (``SYMDIFF_MARCH``); the BLAS's kernel.
    """
    arch = platform.machine()
    flags = _cpu_flags()
    if arch not in ("x86_64", "AMD64"):
        return {"cpu": arch, "numpy": arch, "kernels": f"-march={native.march()}", "blas": _blas_core()}
    try:
        from numpy._core._multiarray_umath import __cpu_features__ as feats
    except ImportError:  # numpy < 2
        from numpy.core._multiarray_umath import __cpu_features__ as feats
    numpy_level = _x86_level(lambda f: feats.get("X86_V4" if f == "avx512f" else "X86_V3", False))
    return {"cpu": _x86_level(lambda f: f in flags), "numpy": numpy_level,
            "kernels": f"-march={native.march()}", "blas": _blas_core()}


def _blas_core() -> str:
    """OpenBLAS's kernel family (``Haswell``: AVX2, ``SkylakeX``/``SapphireRapids``: AVX-512)."""
    import ctypes
    import glob

    libs = glob.glob(str(Path(np.__file__).parent.parent / "numpy.libs" / "*openblas*"))
    for path in libs:
        lib = ctypes.CDLL(path)
        for name in ("scipy_openblas_get_corename64_", "scipy_openblas_get_corename", "openblas_get_corename"):
            fn = getattr(lib, name, None)
            if fn is not None:
                fn.restype = ctypes.c_char_p
                return fn().decode()
    return "unknown"


def machine() -> dict[str, Any]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    emulated = {k: os.environ[k] for k in AVX2_ENV if os.environ.get(k)}
    return {"cpu": cpu, "isa": isa_levels(), "emulation": emulated, "cores": os.cpu_count(),
            "python": platform.python_version(), "numpy": np.__version__,
            "blas_threads": os.environ.get("OPENBLAS_NUM_THREADS", "default")}


def second_order_cost(kind: str, ds: D.Dataset, repeats: int, batch: int = 64) -> list[dict[str, Any]]:
    """Seconds for one gradient (the trainer's path), one HVP (both modes), one JVP and one gradient
    from the gradient graph, on one training batch; each ratio is to the gradient of the same run.

    Each is timed in blocks of 4 calls (the first warms caches), blocks alternating,
    and the median of the blocks' best is kept: on this shared machine a big HVP
    graph run just before otherwise makes the next small call pay its page faults.
    Times are the thread's CPU time (``time.thread_time``; BLAS runs in this one
    thread): on a machine shared by several processes, wall time charges a long
    call (an HVP) for the time slices others took, a short one (a gradient) rarely.
    """
    from symdiff import Autograd
    from symdiff.differential import HVP, JVP, grad, wengert_for

    trainer = _engine(kind, ds, "float64", dense=False)
    model, xm = trainer.model, trainer.model.xm
    rng = np.random.default_rng(0)
    rows = rng.choice(len(ds.train.label_ids), size=batch, replace=False)
    values = {**xm.inputDict(), **model.params, **model.feed(trainer.codes["train"][rows]),
              "y": np.eye(ds.vocab.num_labels)[ds.train.label_ids[rows]]}
    for name in ("h0", "c0"):
        if name in values:
            values[name] = np.zeros((batch, trainer.cfg.num_hid))
    params = xm.params()
    program = Autograd(xm).compile(xm.operationSequence(xm.loss))
    vectors = {p: rng.standard_normal(np.shape(values[p])) for p in params}
    gx = grad(xm, "loss", params)
    graph = Autograd(gx).compile(wengert_for(gx, [f"grad_{p}" for p in params]))
    hvp_f, hvp_r = HVP(xm, "loss", params, values=values), HVP(xm, "loss", params, mode="reverse", values=values)
    jvp_ = JVP(xm, "loss", params)

    def gradient() -> None:
        v = program.forward(values, keep=("loss",))
        program.backward(v, {"loss": np.float64(1.0)}, params_only=True)

    calls = {"one gradient (training path)": gradient,
             "one eval (forward only)": lambda: program.forward(values, keep=("loss",), backward=False),
             "one gradient from the gradient graph": lambda: graph.forward(values),
             "one HVP, forward-over-reverse (hvp's default)": lambda: hvp_f(vectors, values),
             "one HVP, reverse-over-reverse": lambda: hvp_r(vectors, values),
             "one JVP (forward mode)": lambda: jvp_(vectors, values)}
    best: dict[str, list[float]] = {k: [] for k in calls}
    for _ in range(max(repeats, 3)):
        for name, fn in calls.items():
            block = []
            for _ in range(4):
                t0 = time.thread_time()
                fn()
                block.append(time.thread_time() - t0)
            best[name].append(min(block[1:]))
    base = statistics.median(best["one gradient (training path)"])
    return [{"model": kind, "what": name, "median_s": statistics.median(ts), "ratio_to_gradient":
             statistics.median(ts) / base} for name, ts in best.items()]


def _rerun(isa: str, argv: list[str]) -> int:
    """Run this benchmark again in a child process at instruction-set level ``isa``."""
    env = {**os.environ, **AVX2_ENV} if isa == "avx2" else {k: v for k, v in os.environ.items() if k not in AVX2_ENV}
    rest = [a for i, a in enumerate(argv) if a != "--isa" and (i == 0 or argv[i - 1] != "--isa")]
    return subprocess.run([sys.executable, "-m", "benchmarks.bench", *rest, "--isa", "here"], env=env,
                          cwd=REPO).returncode


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default=str(SHARED) if Path(f"{SHARED}.train").exists() else "demo")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--models", nargs="+", default=["mlp", "lstm"], choices=["mlp", "lstm"])
    p.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    p.add_argument("--skip_processes", action="store_true", help="skip start-up and memory measurements")
    p.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                   help="time epochs by wall clock (default) or by this thread's CPU time (steadier on a shared machine)")
    p.add_argument("--isa", choices=["native", "avx2", "both", "here"], default="here",
                   help="native: this CPU's own level; avx2: emulate an AVX2-only machine (see AVX2_ENV); "
                        "both: one after the other; here (default): as this process's environment says")
    args = p.parse_args(argv)
    global clock
    clock = args.clock
    if args.isa != "here":
        argv = sys.argv[1:] if argv is None else argv
        codes = [_rerun(isa, argv) for isa in (("native", "avx2") if args.isa == "both" else (args.isa,))]
        return max(codes)
    prefix = D.resolve_dataset(args.dataset)
    ds = D.load_dataset(prefix)
    report: dict[str, Any] = {"dataset": str(prefix), "machine": machine(), "repeats": args.repeats, "clock": clock,
                              "rows": [], "agreement": {}}
    report["second_order"] = []
    for kind in args.models:
        report["agreement"][kind] = agreement(kind, ds)
        report["rows"] += time_model(kind, ds, args.repeats)
        report["second_order"] += second_order_cost(kind, ds, args.repeats)
    if not args.skip_processes:
        report["startup"] = startup_seconds(args.repeats)
        report["peak_rss_mb_lstm"] = peak_rss_mb(str(prefix))
        report["first_lstm_batch"] = native_build_seconds()
        report["native"] = native.status()
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    console = Console()
    m = report["machine"]
    isa = m["isa"]
    console.print(f"CPU: {m['cpu']}, {isa['cpu']};  running at: numpy {isa['numpy']}, compiled kernels "
                  f"{isa['kernels']}, BLAS {isa['blas']}"
                  + (f"  [emulated: {' '.join(f'{k}={v}' for k, v in m['emulation'].items())}]" if m["emulation"] else ""))
    table = Table(title=f"seconds per training epoch on {prefix.name} ({'thread CPU time' if clock == 'cpu' else 'wall time'}, "
                        f"median of {args.repeats}; {m['cores']} cores, "
                        f"{m['cpu']}, numpy {m['numpy']}, BLAS threads {m['blas_threads']})")
    for col in ("model", "dtype", "implementation", "median s/epoch", "min", "max", "ratio to reference"):
        table.add_column(col, justify="left" if col in ("model", "dtype", "implementation") else "right")
    for r in report["rows"]:
        table.add_row(r["model"], r["dtype"], r["impl"], f"{r['median_s']:.3f}", f"{r['min_s']:.3f}",
                      f"{r['max_s']:.3f}", f"{r['ratio_to_reference']:.2f}")
    console.print(table)
    cost = Table(title="second order on one training batch of 64 (CPU time, median of the best of blocks of 4 calls)")
    for col in ("model", "what", "ms", "ratio to one gradient"):
        cost.add_column(col, justify="left" if col in ("model", "what") else "right")
    for r in report["second_order"]:
        cost.add_row(r["model"], r["what"], f"{1e3 * r['median_s']:.2f}", f"{r['ratio_to_gradient']:.2f}")
    console.print(cost)
    for kind, diff in report["agreement"].items():
        console.print(f"{kind}: max |param difference| engine vs reference after one epoch: {diff:.2e}")
    if "startup" in report:
        s = report["startup"]
        console.print(f"start-up to first batch: {s['to_first_batch_s']:.2f} s;  symdiff --help: {s['help_s']:.2f} s;  "
                      f"LSTM peak RSS: {report['peak_rss_mb_lstm']:.0f} MB")
        b = report["first_lstm_batch"]
        console.print(f"import + first LSTM batch in a new process: {b['cold_cache_s']:.2f} s with an empty kernel "
                      f"cache, {b['warm_cache_s']:.2f} s with it filled;  native kernels: {report['native']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
