"""Mutation score of the engine core on a fixed random sample of mutmut's mutants.

Why a sample: mutmut 3.8.1 generates about 6,400 mutants for ``only_mutate`` (setup.cfg); on the
team's shared 2-core machine a mutant costs 5-30 s, so the whole set is a day of CPU. A uniform
random sample (fixed seed, stratified by module: the same fraction of every module) estimates the
score with a stated confidence interval in one to two hours. docs/testing.md reports the result.

Population ("the engine core"): every mutant of symdiff/{registry,graph,stable,declare,ops,autograd,
passes,fusion}.py plus the training loop (the methods of ``models.training.Trainer``); the rest of
models/training.py (model builders, data plumbing) is mutated but not in the population.

Usage, from the repository root, in the venv that has ``.[test]`` and ``mutmut==3.8.1``:

    python tools/mutation_sample.py list            # generate mutants, print the sample's names
    python tools/mutation_sample.py run             # ... and run them with mutmut (nice -n 10)
    python tools/mutation_sample.py score           # score of the last run, 95% Wilson interval
    python tools/mutation_sample.py survivors       # sampled mutants that survived (name per line)

``--size`` (default 300) and ``--seed`` (default 21) choose the sample; the same sources, size
and seed give the same names on any machine.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MUTANTS = ROOT / "mutants"
CORE_MODULES = ("registry", "graph", "stable", "declare", "ops", "autograd", "passes", "fusion")
TRAINING_LOOP = "models.training.xǁTrainerǁ"

# mutmut's verdicts (mutmut.stats.status_by_exit_code) as the score counts them: a mutant that fails
# a test, exceeds its CPU-time limit or crashes the process is detected
DETECTED = {"killed", "timeout", "segfault", "caught by type check"}


def status(code: int | None) -> str:
    """mutmut's verdict for an exit code ("killed", "survived", "no tests", "not checked", ...)."""
    from mutmut.stats import status_by_exit_code

    return status_by_exit_code[code]


def module_of(name: str) -> str:
    """The population stratum of a mutant name (``symdiff.graph``, ``models.training.Trainer``)."""
    if name.startswith(TRAINING_LOOP):
        return "models.training.Trainer"
    return name.split(".x", 1)[0]


def in_population(name: str) -> bool:
    """Whether a mutant belongs to the engine core or the training loop."""
    if name.startswith(TRAINING_LOOP):
        return True
    return any(name.startswith(f"symdiff.{m}.x") for m in CORE_MODULES)


def generate() -> None:
    """Have mutmut (3.8.1) write its mutants and their ``.meta`` files, without running any test."""
    import mutmut.__main__ as mm  # imported here: ``score`` works without generating again

    os.chdir(ROOT)
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)  # mutmut (and its worker processes) print every file: keep stdout for the names
    try:
        mm.set_mutant_under_test("mutant_generation")
        MUTANTS.mkdir(exist_ok=True)
        mm.copy_src_dir()
        mm.copy_also_copy_files()
        mm.setup_source_paths()
        mm.store_lines_covered_by_tests()
        mm.create_mutants(os.cpu_count() or 2)
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def all_results() -> dict[str, int | None]:
    """Every generated mutant's name and mutmut's exit code for it (None: not run yet)."""
    metas = sorted(MUTANTS.rglob("*.py.meta"))
    if not metas:
        sys.exit("tools/mutation_sample.py: no mutants/ here; run `python tools/mutation_sample.py list` first")
    results: dict[str, int | None] = {}
    for meta in metas:
        results.update(json.loads(meta.read_text("utf-8"))["exit_code_by_key"])
    return results


def draw(names: list[str], size: int, seed: int) -> list[str]:
    """``size`` names drawn uniformly, each module getting its share (largest remainders)."""
    by_module: dict[str, list[str]] = defaultdict(list)
    for name in sorted(n for n in names if in_population(n)):
        by_module[module_of(name)].append(name)
    total = sum(len(v) for v in by_module.values())
    if not 0 < size <= total:
        sys.exit(f"tools/mutation_sample.py: --size must be between 1 and {total} (the population)")
    quota = {m: size * len(v) / total for m, v in by_module.items()}
    take = {m: int(q) for m, q in quota.items()}
    for m in sorted(quota, key=lambda m: (int(quota[m]) - quota[m], m))[: size - sum(take.values())]:
        take[m] += 1
    rng = random.Random(seed)
    sample: list[str] = []
    for m in sorted(by_module):
        sample += rng.sample(by_module[m], take[m])
    return sample


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion k/n (sound near 0 and 1, unlike p ± z·se)."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def score(sample: list[str]) -> None:
    """Print the per-module table and the sample's score with its 95% interval."""
    results = all_results()
    rows: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0, 0, 0])  # n, killed, survived, no test, not run
    for name in sample:
        verdict = status(results.get(name))
        row = rows[module_of(name)]
        row[0] += 1
        if verdict == "not checked":
            row[4] += 1
        elif verdict in DETECTED:
            row[1] += 1
        elif verdict == "no tests":
            row[3] += 1
        else:  # survived (or mutmut's "suspicious": counted against the tests)
            row[2] += 1
    print("| module | sampled | killed | survived | no test reached it | not run |")
    print("|---|---|---|---|---|---|")
    total = [0, 0, 0, 0, 0]
    for m in sorted(rows):
        print(f"| `{m}` | " + " | ".join(map(str, rows[m])) + " |")
        total = [a + b for a, b in zip(total, rows[m])]
    print("| all | " + " | ".join(map(str, total)) + " |")
    run = total[0] - total[4]
    if run:
        lo, hi = wilson(total[1], run)
        print(f"\nkilled {total[1]} of {run} run = {100 * total[1] / run:.1f}% (95% CI {100 * lo:.1f}-{100 * hi:.1f}%)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("command", choices=("list", "run", "score", "survivors"))
    parser.add_argument("--size", type=int, default=300, help="mutants in the sample (default 300)")
    parser.add_argument("--seed", type=int, default=21, help="random seed of the draw (default 21)")
    args = parser.parse_args(argv)
    if args.command in ("list", "run"):
        generate()
    sample = draw(list(all_results()), args.size, args.seed)
    if args.command == "list":
        print("\n".join(sample))
    elif args.command == "run":
        env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")
        cmd = ["nice", "-n", "10", sys.executable, "-m", "mutmut", "run", *sample]
        code = subprocess.call(cmd, cwd=ROOT, env=env)
        score(sample)
        sys.exit(code)
    elif args.command == "score":
        score(sample)
    else:
        results = all_results()
        print("\n".join(n for n in sample if status(results.get(n)) not in DETECTED | {"not checked"}))


if __name__ == "__main__":
    main()
