"""Native kernels: C source generated from the SymPy expressions, compiled once, cached on disk.

Why: a fused LSTM cell is ~20 numpy calls, each writing a temporary array, and numpy
has no fused loop. The same composite expression printed as C and compiled with the
system's compiler runs in one pass over memory, with glibc's vector math library
(``libmvec``) for ``exp``/``tanh``. Nothing here is required: with no compiler, with
``SYMDIFF_NATIVE=0``, or when a kernel fails to build, every kernel stays numpy, and
so does any call whose arrays do not fit the compiled loop (dtype other than float32
or float64, more than two dimensions, broadcasting other than along rows, tiny arrays).

What this module knows is compilers and files, not SymPy: :mod:`symdiff.cprint`
writes the C source; this module builds it into a shared library, loads it, and hands
back the kernel's address for the dispatcher (``native_dispatch.c``, a small CPython
extension built the same way, which reads array pointers for ~20 ns an array).

Builds go to ``$SYMDIFF_CACHE`` (default ``~/.cache/symdiff``), named by a hash of the
source, compiler, flags and CPU, written atomically: a second run loads in milliseconds.
A kernel that cannot be built (no space in the cache, a read-only cache, a compiler
error) stays numpy; :func:`kernel_builds` and :func:`on_kernel_failure` let a run say so
instead of claiming compiled kernels it does not run.
"""
from __future__ import annotations

import ctypes
import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

#: ``SYMDIFF_NATIVE=0`` turns native kernels off (numpy everywhere)
ENV_SWITCH = "SYMDIFF_NATIVE"
#: a kernel is compiled once a call's arrays reach this many elements, so tests on tiny random
#: graphs do not compile a kernel each; ``SYMDIFF_NATIVE_MIN`` overrides. Once built it runs at any
#: size: one C call beats the numpy kernel's several even on a classifier's (64, 5) head (its
#: add+relu backward 8-10 -> 2.3 us, AVX2), which the old 1024 left in numpy (issue #16)
MIN_ELEMENTS = int(os.environ.get("SYMDIFF_NATIVE_MIN", "256"))

#: ``SYMDIFF_MARCH=x86-64-v3`` builds for another instruction-set level than this CPU's (default
#: ``native``): e.g. to time on an AVX-512 machine what an AVX2-only one would run (see benchmarks/bench.py)
MARCH_SWITCH = "SYMDIFF_MARCH"
#: compiler flags besides ``-march``. ``-fno-trapping-math``: no kernel reads the floating-point
#: exception flags, and without it gcc does not if-convert a select such as ``u >= 0 ? r : e*r``
#: below AVX-512 (it may not compute ``e*r`` where the C code would not), so the loop stays scalar
BASE_FLAGS = ("-O3", "-fno-math-errno", "-fno-trapping-math", "-fopenmp-simd", "-fPIC", "-shared")
DISPATCH_SOURCE = Path(__file__).with_name("native_dispatch.c")

_lock = threading.Lock()
_state: dict[str, Any] = {"dispatch": None, "error": None, "compiler": None, "checked": False, "on": None}
_libraries: list[Any] = []  # loaded kernels stay loaded for the life of the process
_kernels: dict[str, Any] = {"built": 0, "failed": 0, "reason": None}  # what load_kernels really did
_failure_listeners: list[Callable[[str], None]] = []


def march() -> str:
    """The ``-march`` target kernels are built for: ``$SYMDIFF_MARCH``, else ``native``.

    Refused (ValueError, one line) when it is not a plain target name: it goes on a command line.
    """
    value = os.environ.get(MARCH_SWITCH, "").strip() or "native"
    if not all(ch.isalnum() or ch in "-_.+" for ch in value) or value.startswith("-"):
        raise ValueError(f"{MARCH_SWITCH}={value!r} is not a compiler target name; use e.g. "
                         f"{MARCH_SWITCH}=x86-64-v3 (AVX2), x86-64-v4 (AVX-512) or native")
    return value


def flags() -> tuple[str, ...]:
    """The compiler flags of every build (part of the cache key)."""
    return (BASE_FLAGS[0], f"-march={march()}", *BASE_FLAGS[1:])


def _switched_on() -> bool:
    on = _state["on"]
    if on is None:  # read once: this is asked on every call of a compiled helper
        on = _state["on"] = os.environ.get(ENV_SWITCH, "1").strip().lower() not in ("0", "false", "no", "off")
    return on


def enabled() -> bool:
    """Whether native code may be used at all (the switch, then a working compiler)."""
    return _switched_on() and dispatcher() is not None


def active() -> Any | None:
    """The compiled dispatcher (kernels and helpers) when native code is on, else None."""
    return dispatcher() if _switched_on() else None


#: ``SYMDIFF_RUNS=0`` keeps every step a Python call (runs of steps in one native call off)
RUNS_SWITCH = "SYMDIFF_RUNS"


def runs() -> Any | None:
    """The dispatcher, when runs of steps may execute in one native call: native code on, the switch
    ``SYMDIFF_RUNS`` not 0, and numpy's gemm found and agreeing with numpy (:mod:`symdiff.blas`);
    else None (fused kernels still run compiled, one Python call a step)."""
    d = active()
    if d is None or os.environ.get(RUNS_SWITCH, "1").strip().lower() in ("0", "false", "no", "off"):
        return None
    from . import blas

    return d if blas.install(d) else None


def set_enabled(on: bool | None) -> None:
    """Switch native code off (``False``) or back on for this process; ``None``: as ``SYMDIFF_NATIVE`` says.

    Kernels already built stay built; what is switched off is their use where the
    switch is consulted: new :class:`~symdiff.Autograd` engines and the compiled
    helpers (scatter-add, joins). ``Autograd(native=False)`` affects one engine.
    """
    _state["on"] = on


def status() -> str:
    """One line for users: on, off (and why)."""
    if not _switched_on():
        return f"off ({ENV_SWITCH}=0 or switched off)"
    if dispatcher() is None:
        return f"off ({_state['error']})"
    return f"on ({_state['compiler']}, {' '.join(flags()[:3])})"


def _compiler() -> str | None:
    for cc in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if cc and shutil.which(cc):
            return cc
    return None


def cache_dir() -> Path:
    base = os.environ.get("SYMDIFF_CACHE")
    if base:
        return Path(base)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return Path(xdg) / "symdiff" if xdg else Path.home() / ".cache" / "symdiff"


def _cpu() -> str:
    """What -march=native depends on: a build from another CPU must not be loaded here."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def _build(source: str, stem: str, extra: tuple[str, ...] = (), libs: tuple[str, ...] = ()) -> Path:
    """Compile ``source`` to a shared library in the cache (or find it there); its path."""
    cc = _state["compiler"] or _compiler()
    if cc is None:
        raise RuntimeError("no C compiler found (set CC, or install gcc)")
    _state["compiler"] = cc
    cflags = flags()
    key = hashlib.sha256("\0".join((source, cc, *cflags, *extra, *libs, _cpu(), sys.version)).encode()).hexdigest()[:20]
    directory = _private_dir(cache_dir())
    target = directory / f"{stem}-{key}.so"
    if target.exists():
        return target
    try:
        with tempfile.TemporaryDirectory(dir=directory) as tmp:
            src = Path(tmp) / f"{stem}.c"
            src.write_text(source)
            out = Path(tmp) / "out.so"
            cmd = [cc, *cflags, *extra, str(src), "-o", str(out), *libs]
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
            if done.returncode != 0:
                raise RuntimeError(f"{' '.join(cmd[:1])} failed: {done.stderr.strip()[:500]}")
            os.replace(out, target)  # atomic: another process sees the whole library or none
    except OSError as exc:  # a full, read-only or vanished cache folder: say which, and why
        raise RuntimeError(f"cannot write to the kernel cache {directory}: {exc.strerror or exc}") from None
    return target


def _private_dir(directory: Path) -> Path:
    """``directory`` (created 0700 if missing), or a private one in the temp folder if it cannot be.

    Libraries found here are loaded into the process, so a folder that someone else owns
    or may write to is refused: on a shared machine it could hold their code.
    """
    for candidate in (directory, Path(tempfile.gettempdir()) / f"symdiff-{os.getuid()}"):
        try:
            candidate.mkdir(mode=0o700, parents=True, exist_ok=True)
            st = candidate.stat()
        except OSError:
            continue
        if st.st_uid == os.getuid() and not st.st_mode & 0o022:
            return candidate
    raise RuntimeError(f"no private cache folder for compiled kernels ({directory} is not ours or is writable "
                       f"by others); set SYMDIFF_CACHE to a folder only you can write")


def dispatcher() -> Any | None:
    """The compiled dispatcher module, built on first use; ``None`` if it cannot be built."""
    if _state["checked"]:
        return _state["dispatch"]
    with _lock:
        if _state["checked"]:
            return _state["dispatch"]
        try:
            import numpy as np

            # numpy's version in the flags, so the build's name changes with numpy's ABI;
            # -ffp-contract=off: its helpers (rows_sub_scaled) round a product before a sum, as numpy does
            includes = (f"-I{sysconfig.get_paths()['include']}", f"-I{np.get_include()}",
                        f"-DSYMDIFF_NUMPY={np.__version__}", "-ffp-contract=off")
            path = _build(DISPATCH_SOURCE.read_text(), "dispatch", includes)
            spec = importlib.util.spec_from_file_location("_symdiff_native", path)
            assert spec is not None and spec.loader is not None
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            _state["dispatch"] = module
        except Exception as exc:  # noqa: BLE001 - any failure means: stay numpy
            _state["error"] = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
        _state["checked"] = True
    return _state["dispatch"]


def kernel_builds() -> tuple[int, int, str | None]:
    """Kernels built or loaded by :func:`load_kernels` in this process, kernels that could not be
    (each then runs with numpy for the rest of the process), and the first failure's reason."""
    return _kernels["built"], _kernels["failed"], _kernels["reason"]


@contextmanager
def on_kernel_failure(callback: Callable[[str], None]) -> Iterator[None]:
    """Call ``callback(reason)`` whenever a kernel fails to build while inside: the failure
    happens lazily, at the first call big enough, so only then can a run tell its user."""
    _failure_listeners.append(callback)
    try:
        yield
    finally:
        _failure_listeners.remove(callback)


def load_kernels(source: str, names: tuple[str, ...], stem: str = "kernel") -> tuple[int, ...]:
    """Build ``source`` (tried with libmvec's vector math first) and return the functions' addresses."""
    try:
        fns = _load_kernels(source, names, stem)
    except Exception as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        with _lock:
            _kernels["failed"] += 1
            _kernels["reason"] = _kernels["reason"] or reason
        for listener in tuple(_failure_listeners):
            listener(reason)
        raise
    with _lock:
        _kernels["built"] += 1
    return fns


def _load_kernels(source: str, names: tuple[str, ...], stem: str) -> tuple[int, ...]:
    errors = []
    for vector_math in (True, False):
        text = ("#define SYMDIFF_VECTOR_MATH 1\n" if vector_math else "") + source
        try:
            path = _build(text, stem, libs=("-lmvec", "-lm") if vector_math else ("-lm",))
            lib = ctypes.CDLL(str(path))
        except Exception as exc:  # noqa: BLE001
            errors.append(str(exc))
            continue
        _libraries.append(lib)
        return tuple(ctypes.cast(getattr(lib, n), ctypes.c_void_p).value or 0 for n in names)
    raise RuntimeError("; ".join(dict.fromkeys(errors)))  # the same reason twice (a full disk) said once
