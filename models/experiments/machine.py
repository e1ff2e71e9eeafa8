"""The machine and the code a run measured: CPU, cores, numpy/BLAS, load, git commit.

Every experiment's JSON carries this (``meta``), so a number in the report can be
traced to the hardware and the exact code that produced it.
"""
from __future__ import annotations

import os
import platform
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from .common import BLAS_THREAD_VARS, ROOT


def machine_info() -> dict[str, Any]:
    """CPU model and cores (from /proc/cpuinfo), numpy and BLAS, Python, load average."""
    cpu_model, physical = None, set()
    try:
        phys_id = None
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key, value = key.strip(), value.strip()
            if key == "model name" and cpu_model is None:
                cpu_model = value
            elif key == "physical id":
                phys_id = value
            elif key == "core id":
                physical.add((phys_id, value))
    except OSError:
        pass
    blas = None
    try:
        deps = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
        blas = f"{deps.get('name')} {deps.get('version')}".strip()
    except Exception:  # older numpy: no dict mode; not worth failing for
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = None
    threads = {k: os.environ[k] for k in BLAS_THREAD_VARS if k in os.environ}
    from symdiff import native

    return {"native": native.status(), "cpu_model": cpu_model or platform.processor() or "unknown",
            "logical_cpus": os.cpu_count(), "usable_cpus": usable,
            "physical_cores": len(physical) or None,
            "numpy": np.__version__, "blas": blas, "blas_thread_env": threads,
            "python": platform.python_version(), "platform": platform.platform(),
            "load_average": load}


def code_version() -> dict[str, Any] | None:
    """The checkout's commit and which engine/model files differ from it (the code that was measured)."""
    import subprocess

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10,
                              check=True).stdout

    try:
        commit = git("rev-parse", "--short", "HEAD").strip()
        status = git("status", "--porcelain", "--", "symdiff", "models").splitlines()
        changed = [line[3:] for line in status if line[3:] and not line[3:].startswith("models/experiments/")]
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit, "uncommitted": sorted(changed)}


def run_meta(experiment: str, command: str, started: float, wall: float,
             code: dict[str, Any] | None = None) -> dict[str, Any]:
    """The ``meta`` block of a run's JSON: what ran, when, for how long, where, on which code."""
    info = machine_info()
    return {"experiment": experiment, "command": command,
            "date": datetime.fromtimestamp(started, timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "wall_seconds": round(wall, 2), "machine": info, "code": code or code_version()}
