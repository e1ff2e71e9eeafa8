"""Model files: find a model (a shipped name or a path), import it, check it, wrap it for training.

A model file defines ``build(dims, hp) -> XMan``. ``dims`` holds ``max_len``, ``num_chars`` and
``num_labels`` (from the data); ``hp`` holds the run's hyperparameters (``num_hid``, ``dtype``,
``seed`` and every other training flag). The returned graph has a ``loss`` register (what training
minimises) and an ``outputs`` register (class probabilities, ``N x num_labels``); a ``rowloss``
register (per-row cross-entropy) is optional. The training loop feeds inputs by name:

* ``y``: the labels, one-hot ``N x num_labels``;
* ``X``: the whole title, one-hot ``N x (max_len*num_chars)`` (position ``m``, character ``c`` is
  column ``m*num_chars + c``);
* ``x0`` ... ``x{max_len-1}``: the character at each position, one-hot ``N x num_chars`` (a padded
  position is an all-zero row);
* any other input whose default is all zeros is a zero state (an RNN's ``h0``): it is fed zeros with
  the batch's number of rows and the default's other dimensions; an input with any other default is a
  constant, fed its default unchanged.

The module may also define ``PRESETS = {"best": {...}}`` (hyperparameters by flag name).

A model file is Python: importing it runs it, with the user's rights, like any training script.
Only files the user names on the command line, and the shipped ``models/<name>.py``, are imported;
the name a saved ``.npz`` records is only ever looked up among the shipped models.
"""
from __future__ import annotations

import importlib
import importlib.util
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .flags import PRESET_KEYS

SHIPPED = ("mlp", "lstm", "gru", "bilstm", "attention", "lstm_max")  # models/<name>.py, trainable by name
_HERE = Path(__file__).resolve().parent
_STEP = re.compile(r"x(\d+)")


class ModelSourceError(ValueError):
    """A model that cannot be used: one line naming the file and what is wrong (exit code 2)."""


@dataclass
class ModelSource:
    """An imported model: where it came from, its ``build`` and its ``PRESETS``."""

    name: str                      # the shipped name, or the file's path as the user gave it
    path: Path
    build: Callable[[dict[str, int], dict[str, Any]], Any]
    presets: dict[str, dict[str, Any]] = field(default_factory=dict)
    shipped: bool = False

    @property
    def label(self) -> str:
        """How messages name it: ``gru`` or ``my_model.py``."""
        return self.name if self.shipped else str(self.path)


def is_shipped(spec: str) -> bool:
    return spec in SHIPPED


def load_source(spec: str) -> ModelSource:
    """Import the model ``spec`` names (a shipped name, else a path to a .py file) and check its API."""
    if is_shipped(spec):
        try:
            module = importlib.import_module(f"models.{spec}")
        except ImportError as exc:  # only a broken installation gets here
            raise ModelSourceError(f"models/{spec}.py: cannot import the shipped model: {exc}") from None
        return _source(module, spec, _HERE / f"{spec}.py", shipped=True)
    path = Path(spec)
    if not path.exists():
        hint = f"a shipped model name ({', '.join(SHIPPED)}) or the path to a Python file defining build(dims, hp)"
        raise ModelSourceError(f"{spec}: no such model file; give {hint}")
    if path.is_dir():
        raise ModelSourceError(f"{spec}: is a directory; give the path to a .py file defining build(dims, hp)")
    module = _import_file(path, spec)
    return _source(module, spec, path, shipped=False)


def _import_file(path: Path, shown: str) -> Any:
    """Run the file as a fresh module (not cached in ``sys.modules``): the user's code, the user's rights."""
    name = "symdiff_user_model_" + re.sub(r"\W", "_", path.stem)
    try:
        source = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelSourceError(f"{shown}: cannot read the model file ({exc})") from None
    try:
        code = compile(source, str(path), "exec")
    except SyntaxError as exc:
        raise ModelSourceError(f"{shown}:{exc.lineno}: syntax error: {exc.msg}; fix the file and run again") from None
    spec = importlib.util.spec_from_loader(name, loader=None, origin=str(path))
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    module.__file__ = str(path)
    try:
        exec(code, module.__dict__)
    except Exception as exc:  # noqa: BLE001  (any error of the user's module is reported as one line)
        raise ModelSourceError(f"{shown}: importing the model file raised {_what(exc, path)}") from None
    return module


def _what(exc: BaseException, path: Path) -> str:
    """``TypeError at line 12: msg`` — the innermost line of ``path`` in the traceback, if any."""
    line = None
    tb = exc.__traceback__
    while tb is not None:
        if Path(tb.tb_frame.f_code.co_filename) == path:
            line = tb.tb_lineno
        tb = tb.tb_next
    where = f" at line {line}" if line is not None else ""
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}{where}" + (f": {text}" if text else "")


def _source(module: Any, name: str, path: Path, shipped: bool) -> ModelSource:
    shown = f"models/{name}.py" if shipped else name
    build = getattr(module, "build", None)
    if build is None or not callable(build):
        raise ModelSourceError(f"{shown}: defines no function build(dims, hp) returning an XMan; add one "
                               f"(see README, 'Your own model')")
    presets = getattr(module, "PRESETS", {})
    if not isinstance(presets, dict) or not all(isinstance(k, str) and isinstance(v, dict)
                                                for k, v in presets.items()):
        raise ModelSourceError(f"{shown}: PRESETS must be a dict of name -> dict of flag values, "
                               f"e.g. {{'best': {{'num_hid': 64}}}}")
    for pname, table in presets.items():
        if pname == "seed":
            raise ModelSourceError(f"{shown}: PRESETS may not define 'seed': that name means the flags' defaults")
        unknown = sorted(set(table) - set(PRESET_KEYS))
        if unknown:
            raise ModelSourceError(f"{shown}: PRESETS[{pname!r}] sets {', '.join(unknown)}, which no preset can "
                                   f"set; a preset sets only {', '.join(PRESET_KEYS)}")
    return ModelSource(name, path, build, presets, shipped)


# ---- building -------------------------------------------------------------------------------
def build(source: ModelSource, dims: dict[str, int], hp: dict[str, Any]) -> Any:
    """``source.build(dims, hp)``, checked: an XMan with ``loss`` and ``outputs`` registers, set up."""
    from symdiff import Register, XMan

    shown = source.label
    try:
        xm = source.build(dict(dims), dict(hp))
    except Exception as exc:  # noqa: BLE001  (the user's build failing is one line, not a traceback)
        raise ModelSourceError(f"{shown}: build(dims, hp) raised {_what(exc, source.path)}") from None
    if not isinstance(xm, XMan):
        raise ModelSourceError(f"{shown}: build(dims, hp) returned {type(xm).__name__}, not an XMan; "
                               f"end it with `return xm.setup()`")
    missing = [r for r in ("loss", "outputs") if not isinstance(vars(xm).get(r), Register)]
    if missing:
        what = " and ".join(f"xm.{r}" for r in missing)
        raise ModelSourceError(f"{shown}: the graph has no {what} register; assign "
                               f"{'the class probabilities to xm.outputs' if 'outputs' in missing else ''}"
                               f"{' and ' if len(missing) == 2 else ''}"
                               f"{'the training loss to xm.loss' if 'loss' in missing else ''}")
    try:
        if any(r.name is None for r in xm.registers().values()) or not xm.registers():
            xm.setup()
        xm.register("loss"), xm.register("outputs")
    except Exception as exc:  # noqa: BLE001
        raise ModelSourceError(f"{shown}: xm.setup() failed: {_what(exc, source.path)}") from None
    return xm


def make_feed(xm: Any, dims: dict[str, int], dtype: np.dtype, shown: str) -> Callable[..., dict[str, Any]]:
    """``feed(codes, dense=False) -> {input name: value}`` for the inputs the graph declares (module doc)."""
    from symdiff import OneHot

    M, V = dims["max_len"], dims["num_chars"]
    whole = False
    steps: list[int] = []
    states: dict[str, tuple[int, ...]] = {}
    constants: dict[str, Any] = {}
    for name, reg in xm.registers().items():
        if reg.role != "input" or name == "y":
            continue
        m = _STEP.fullmatch(name)
        if name == "X":
            whole = True
        elif m:
            t = int(m.group(1))
            if t >= M:
                raise ModelSourceError(f"{shown}: input {name!r} reads position {t}, but titles have max_len={M} "
                                       f"positions (x0 ... x{M - 1}); build one input per position of dims['max_len']")
            steps.append(t)
        else:
            default = reg.default
            if default is None:
                raise ModelSourceError(
                    f"{shown}: input {name!r} is none the training loop feeds (y, X, x0 ... x{M - 1}) and has no "
                    f"default; give it a default of zeros (a state such as h0) or its constant value")
            arr = np.asarray(default)
            if arr.ndim >= 1 and not arr.any():
                states[name] = tuple(arr.shape[1:])
            else:
                constants[name] = default
    offsets = np.arange(M) * V
    step_names = [(t, f"x{t}") for t in steps]  # named once, not once a batch
    zeros: dict[tuple[str, int], np.ndarray] = {}
    eye = np.eye(V + 1, V, dtype=dtype)  # row V (index -1) is all zeros: a padded position

    def feed(codes: np.ndarray, dense: bool = False) -> dict[str, Any]:
        n = codes.shape[0]
        inputs: dict[str, Any] = dict(constants)
        for name, shape in states.items():
            key = (name, n)
            if key not in zeros:  # never written to: the engine does not mutate inputs
                zeros[key] = np.zeros((n, *shape), dtype)
            inputs[name] = zeros[key]
        if whole:
            if dense:
                inputs["X"] = eye[codes].reshape(n, M * V)
            else:
                inputs["X"] = OneHot(np.where(codes >= 0, codes + offsets, -1), M * V, dtype)
        if step_names and not dense:
            positions = OneHot.per_position(codes, V, dtype)  # checked once for all positions
            for t, name in step_names:
                inputs[name] = positions[t]
        for t, name in step_names if dense else ():
            inputs[name] = eye[codes[:, t]]
        return inputs

    if not whole and not steps:
        raise ModelSourceError(f"{shown}: the graph reads no characters: declare an input named X (the whole "
                               f"title) or x0 ... x{M - 1} (one per position)")
    return feed


def check_shapes(model: Any, shown: str) -> None:
    """One forward pass on two made-up rows: ``outputs`` must be ``2 x num_labels``, ``loss`` a number."""
    from symdiff import Autograd

    xm, dims = model.xm, model.dims
    rows = 2
    codes = np.zeros((rows, dims["max_len"]), dtype=np.int32)  # every position holds character 0
    y = np.eye(dims["num_labels"], dtype=model.dtype)[np.arange(rows) % dims["num_labels"]]
    try:
        # unfused: a trial pass needs no fused kernels (and registers none, so kernel numbers stay as before)
        program = Autograd(xm, fuse=False, native=False).compile(xm.operationSequence(xm.register("loss")))
        if "outputs" not in program.slot:
            raise ModelSourceError(f"{shown}: the loss is not computed from outputs; make xm.loss a function of "
                                   f"xm.outputs (e.g. f.mean(f.crossEnt(xm.outputs, xm.y)))")
        v = program.forward({**model.params, **model.feed(codes), "y": y}, keep=("loss", "outputs"), backward=False)
        loss, outputs = np.asarray(v[program.slot["loss"]]), np.asarray(v[program.slot["outputs"]])
    except ModelSourceError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise ModelSourceError(f"{shown}: a forward pass on a batch of {rows} titles failed: "
                               f"{_what(exc, Path(shown))}") from None
    want = (rows, dims["num_labels"])
    if outputs.shape != want:
        raise ModelSourceError(f"{shown}: outputs has shape {outputs.shape} for a batch of {rows} titles; it must "
                               f"be (batch, num_labels) = {want}: one row of class probabilities per title")
    if loss.size != 1:
        raise ModelSourceError(f"{shown}: loss has shape {loss.shape}; it must be one number (e.g. f.mean(...))")


def hyperparameters(hp: dict[str, Any]) -> dict[str, Any]:
    """The JSON-safe part of ``hp`` a saved model records to rebuild its graph.

    How long the run went (``epochs``, ``patience``) shapes no graph and is left out, so a run
    stopped at epoch k saves the same archive as a run of k epochs.
    """
    return {k: v for k, v in hp.items()
            if k not in ("epochs", "patience") and (isinstance(v, (str, int, float, bool)) or v is None)}

