"""The BLAS gemm numpy's matmul calls, found at run time, for the compiled runs of steps.

Why: a run of steps in one native call (:class:`symdiff.autograd.Program`) computes its
matrix products in C, and they must give numpy's bits. numpy's wheels bundle OpenBLAS
with ``scipy_cblas_?gemm64_`` (64-bit ints); other builds link other names. This module
looks for those functions in the libraries this process already loaded, in a fixed order
of names, and hands their addresses to the dispatcher only after a check that its products
equal numpy's to the bit on a few shapes (a BLAS that is not the one numpy calls fails it).
Where nothing is found or the check fails, runs end at products: same results, slower.
"""
from __future__ import annotations

import ctypes
from pathlib import Path
from typing import Any

import numpy as np

#: (single, double, 64-bit ints) names, tried in this order in each loaded BLAS library
NAMES = (("scipy_cblas_sgemm64_", "scipy_cblas_dgemm64_", True),
         ("cblas_sgemm64_", "cblas_dgemm64_", True),
         ("scipy_cblas_sgemm", "scipy_cblas_dgemm", False),
         ("cblas_sgemm", "cblas_dgemm", False))

_found: dict[str, Any] = {}


def _loaded_libraries() -> list[str]:
    """Shared libraries with ``blas`` in their name that this process has mapped (Linux)."""
    try:
        lines = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return []
    paths = dict.fromkeys(line.split()[-1] for line in lines if "blas" in line.rsplit("/", 1)[-1].lower())
    return [p for p in paths if p.startswith("/")]


def find_gemm() -> tuple[int, int, bool] | None:
    """``(sgemm address, dgemm address, ilp64)`` of the first matching names, or None."""
    np.ones((2, 2)) @ np.ones((2, 2))  # numpy loads its BLAS lazily on some builds
    for path in _loaded_libraries():
        try:
            lib = ctypes.CDLL(path)  # already mapped: the same handle, nothing loaded anew
        except OSError:
            continue
        for single, double, ilp64 in NAMES:
            try:
                s, d = getattr(lib, single), getattr(lib, double)
            except AttributeError:
                continue
            return (ctypes.cast(s, ctypes.c_void_p).value or 0, ctypes.cast(d, ctypes.c_void_p).value or 0, ilp64)
    return None


def _agrees(dispatch: Any) -> bool:
    """Whether the dispatcher's products equal numpy's bit for bit (plain, transposed, sliced)."""
    rng = np.random.default_rng(0)
    for dtype in (np.float32, np.float64):
        for m, n, p in ((7, 5, 3), (64, 50, 200), (33, 129, 17)):
            a = rng.standard_normal((m, n)).astype(dtype)
            b = rng.standard_normal((n, p)).astype(dtype)
            bt = np.ascontiguousarray(b.T)
            wide = rng.standard_normal((n, p + 3)).astype(dtype)[:, 1:p + 1]
            for x, y in ((a, b), (a, bt.T), (np.asfortranarray(a), wide)):
                got = dispatch.gemm(x, y)
                if got is None or not np.array_equal(got, x @ y) or got.dtype != (x @ y).dtype:
                    return False
    return True


def install(dispatch: Any) -> bool:
    """Hand numpy's gemm to the compiled dispatcher (once); whether products can run in C."""
    if "ok" in _found:
        return _found["ok"]
    ok = False
    try:
        addresses = find_gemm()
        if addresses is not None and all(addresses[:2]):
            dispatch.set_blas(*addresses)
            ok = _agrees(dispatch)
            if not ok:
                dispatch.set_blas(0, 0, True)
    except Exception:  # noqa: BLE001 - anything odd about this BLAS: products stay numpy's
        ok = False
    _found["ok"] = ok
    return ok
