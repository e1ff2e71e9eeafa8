"""One training loop for both models: minibatch updates, per-epoch validation, best-parameter
keeping, test prediction, and the run driver shared by ``cli.py`` and ``python -m models.*``.

Presentation is not done here: a :class:`Reporter` receives events and the CLI
decides how to show them (rich, or plain lines).
"""
from __future__ import annotations

import json
import math
import signal
import sys
import time
import zipfile
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol
from urllib.parse import unquote

import numpy as np

from symdiff import Autograd, Program, native
from symdiff.init import bias, glorot  # noqa: F401  (their old home; model files import symdiff.init)
from symdiff.optim import Averaged, clip_grad_norm, make_optimizer, make_schedule

from . import data as D
from .checkpoint import Checkpoint, CheckpointError, TrainState, data_fingerprint, identity
from .storage import OutputPathError, OutputWriteError, check_output_path, save_json, save_npy, save_npz

from .loader import SHIPPED as MODELS  # noqa: E402  (the names `symdiff train NAME` knows)
EVAL_BATCH = 256  # rows per forward pass when evaluating: every register is kept, so this bounds memory


# ---- models -------------------------------------------------------------------------------
@dataclass
class CharModel:
    """A built model: its graph, how to feed it a batch of character codes, its sizes."""

    kind: str
    xm: Any
    feed: Callable[..., dict[str, Any]]
    dims: dict[str, int]
    dtype: np.dtype
    source: Any = None      # the loader.ModelSource it was built from
    hp: dict[str, Any] = field(default_factory=dict)  # the hyperparameters build() was given

    @property
    def params(self) -> dict[str, np.ndarray]:
        """The live parameter arrays (the registers' defaults; updated in place)."""
        return {n: self.xm.register(n).default for n in self.xm.params()}

    def set_params(self, values: dict[str, np.ndarray]) -> None:
        for name, arr in self.params.items():
            arr[...] = values[name]


def build_model(kind: str, dims: dict[str, int], *, seed: int, dtype: Any = np.float64,
                hp: dict[str, Any] | None = None, source: Any = None) -> CharModel:
    """Build model ``kind`` (a shipped name or a model file's path) for ``dims`` (with ``num_hid``).

    ``hp`` are the hyperparameters handed to the file's ``build`` (``num_hid``, ``dtype`` and
    ``seed`` are set from the arguments). Raises ``loader.ModelSourceError`` (one line) for a model
    that cannot be imported or built, or whose ``outputs``/``loss`` do not fit the data.
    """
    from . import loader

    source = source or loader.load_source(kind)
    dtype = np.dtype(dtype)
    hp = {**(hp or {}), "num_hid": int(dims["num_hid"]), "dtype": str(dtype), "seed": int(seed)}
    data_dims = {k: int(dims[k]) for k in ("max_len", "num_chars", "num_labels")}
    xm = loader.build(source, data_dims, hp)
    feed = loader.make_feed(xm, data_dims, dtype, source.label)
    model = CharModel(source.name, xm, feed, {**data_dims, "num_hid": int(dims["num_hid"])}, dtype, source, hp)
    loader.check_shapes(model, source.label)
    return model


# ---- configuration --------------------------------------------------------------------------
@dataclass
class TrainConfig:
    max_len: int = 10
    num_hid: int = 50
    batch_size: int = 64
    epochs: int = 15
    init_lr: float = 0.05
    seed: int = 0
    dtype: str = "float64"
    dense: bool = False
    fuse: bool = True
    native: bool = True  # compiled fused kernels where a C compiler works (symdiff.native)
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 0.0
    clip: float | None = None
    schedule: str = "constant"
    patience: int | None = None
    average: float | None = None  # decay of the parameters' moving average that is evaluated and kept

    def record(self) -> dict[str, Any]:
        """Every hyperparameter for the metrics file; ``momentum`` is ``None`` where the optimizer has none."""
        from symdiff.optim import USES_MOMENTUM

        out = asdict(self)
        if self.optimizer.lower() not in USES_MOMENTUM:
            out["momentum"] = None
        return out

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> "TrainConfig":
        known = {k: v for k, v in params.items() if k in cls.__dataclass_fields__ and v is not None}
        return cls(**known)


from .flags import DEFAULT_LR, PRESET_KEYS, apply_preset, default_lr, ignored_flag  # noqa: E402  (shared with the CLI)


# ---- events ---------------------------------------------------------------------------------
@dataclass
class EpochResult:
    epoch: int
    train_loss: float
    valid_loss: float
    valid_accuracy: float
    train_seconds: float
    lr: float
    best: bool = False
    #: this thread's CPU time in the training loop (BLAS runs in it): what benchmarks compare on a shared machine
    train_cpu_seconds: float = 0.0


@dataclass
class TrainResult:
    epochs: list[EpochResult] = field(default_factory=list)
    best_epoch: int | None = None
    best_params: dict[str, np.ndarray] | None = None
    stopped: str | None = None     # "interrupted", "terminated", "diverged", "dead-relu", "early-stop"
    message: str | None = None
    checkpoint_failures: int = 0   # epochs whose checkpoint could not be written (the disk, not the run, failed)
    checkpoint_epoch: int | None = None  # the epoch the checkpoint file on disk holds, when one was written


class Reporter(Protocol):
    def start(self, kind: str, epochs: int, batches: int) -> None: ...
    def batch(self, epoch: int, k: int, loss: float) -> None: ...
    def epoch(self, result: EpochResult) -> None: ...
    def info(self, text: str) -> None: ...
    def warn(self, text: str) -> None: ...
    def error(self, text: str) -> None: ...
    def finish(self, summary: dict[str, Any]) -> None: ...


class QuietReporter:
    """A reporter that shows nothing: for benchmarks and sweeps, which read the returned results.
    Subclass it and override only what you need (``symdiff tune`` reports each epoch to its trial)."""

    def start(self, kind: str, epochs: int, batches: int) -> None: ...
    def batch(self, epoch: int, k: int, loss: float) -> None: ...
    def epoch(self, result: EpochResult) -> None: ...
    def info(self, text: str) -> None: ...
    def warn(self, text: str) -> None: ...
    def error(self, text: str) -> None: ...
    def finish(self, summary: dict[str, Any]) -> None: ...


class PlainReporter:
    """Readable lines for logs and pipes (the CLI uses rich on a terminal).

    A closed pipe (``symdiff mlp | head -1``) never stops training: the reporter
    goes quiet and the run finishes and writes its files as usual.
    """

    def __init__(self, stream: Any = None) -> None:
        self.stream = stream or sys.stdout

    def _print(self, text: str) -> None:
        if self.stream is None:
            return
        try:
            print(text, file=self.stream, flush=True)
        except BrokenPipeError:
            quiet_closed_stream(self.stream)
            self.stream = None

    def start(self, kind: str, epochs: int, batches: int) -> None:
        self._print(f"training {kind}: {epochs} epochs x {batches} batches")

    def batch(self, epoch: int, k: int, loss: float) -> None:
        pass

    def epoch(self, r: EpochResult) -> None:
        mark = "  *best" if r.best else ""
        self._print(f"epoch {r.epoch:3d}  train loss {r.train_loss:.4f}  valid loss {r.valid_loss:.4f}  "
                    f"valid acc {r.valid_accuracy:.4f}  ({r.train_seconds:.2f}s){mark}")

    def info(self, text: str) -> None:
        self._print(text)

    def warn(self, text: str) -> None:
        try:
            print(f"warning: {text}", file=sys.stderr, flush=True)
        except BrokenPipeError:
            quiet_closed_stream(sys.stderr)

    def error(self, text: str) -> None:
        print(f"error: {text}", file=sys.stderr, flush=True)

    def finish(self, summary: dict[str, Any]) -> None:
        for k, v in summary.items():
            self._print(f"{k}: {v}")


def quiet_closed_stream(stream: Any) -> None:
    """After a write to ``stream`` found its reader gone: point its file descriptor at /dev/null,
    so later writes (and Python's final flush at exit) neither fail nor print a traceback."""
    import os

    try:
        fd = stream.fileno()
    except (AttributeError, OSError, ValueError):
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, fd)
    finally:
        os.close(devnull)


# ---- interruption ---------------------------------------------------------------------------
class StopFlag:
    """Set by SIGINT (Ctrl-C) or SIGTERM (what schedulers and preemptible machines send before they
    kill a job); the loop checks it after every batch and stops cleanly. ``reason`` says which."""

    def __init__(self) -> None:
        self.requested = False
        self.reason = "interrupted"   # or "terminated" (SIGTERM)


class Terminated(KeyboardInterrupt):
    """A second SIGTERM: stop at once (exit code 143), as a second Ctrl-C does (130)."""


STOP_SIGNALS = {signal.SIGINT: "interrupted", signal.SIGTERM: "terminated"}


@contextmanager
def stop_on_signals(flag: StopFlag) -> Iterator[StopFlag]:
    """SIGINT and SIGTERM set ``flag`` (a second one stops at once); the previous handlers come back."""
    def handler(signum: int, frame: Any) -> None:
        if flag.requested:  # a second signal: the user (or the scheduler) really wants out
            raise Terminated if signum == signal.SIGTERM else KeyboardInterrupt
        flag.requested, flag.reason = True, STOP_SIGNALS[signum]

    previous = {}
    try:
        for sig in STOP_SIGNALS:
            previous[sig] = signal.signal(sig, handler)
    except ValueError:  # not the main thread: no handler, plain KeyboardInterrupt
        yield flag
        return
    try:
        yield flag
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


stop_on_sigint = stop_on_signals  # the name it had when only Ctrl-C was handled


# ---- training -------------------------------------------------------------------------------
DEAD_RELU_HINT = (
    "every output ReLU is dead: all logits are 0 for every example, the loss is stuck at "
    "ln {c} = {lnc:.3f} and every gradient is exactly zero, so training cannot move. "
    "Try another --seed, a smaller --init_lr, or a different --optimizer.")


@dataclass
class Evaluation:
    probs: np.ndarray
    loss: float | None        # mean cross-entropy over rows with a known label
    accuracy: float | None
    known: int


def cross_entropy_rows(probs: np.ndarray, label_ids: np.ndarray) -> np.ndarray:
    """``-log p[label]`` per row (what ``crossEnt`` gives): the loss of a model without a ``rowloss`` register.

    Rows without a known label (id -1) get a number too; callers leave them out.
    """
    p = probs[np.arange(len(label_ids)), np.maximum(label_ids, 0)].astype(np.float64)
    with np.errstate(divide="ignore"):
        return -np.log(p)


class Trainer:
    """Runs one model's compiled program over a dataset."""

    def __init__(self, model: CharModel, dataset: D.Dataset, cfg: TrainConfig) -> None:
        self.model, self.ds, self.cfg = model, dataset, cfg
        self.ad = Autograd(model.xm, fuse=cfg.fuse, native=None if cfg.native else False)
        self.program: Program = self.ad.compile(model.xm.operationSequence(model.xm.register("loss")))
        slot = self.program.slot
        self.loss_slot, self.out_slot = slot["loss"], slot["outputs"]
        self.rowloss_slot = slot.get("rowloss")  # optional in a model file: else -log p[label] from outputs
        self.param_slots = [(n, slot[n]) for n in self.program.params]
        self.codes = {name: dataset.vocab.encode_titles(getattr(dataset, name).titles, cfg.max_len)
                      for name in D.SPLITS}

    def engine(self) -> str:
        """How the program runs, for the user: passes, and numpy or compiled fused kernels."""
        passes = ", ".join(self.ad.passes) or "none"
        if not self.cfg.fuse:
            return f"unfused, numpy kernels (passes: {passes})"
        if self.ad.native:
            built, failed, reason = native.kernel_builds()  # what really happened (see warm_up)
            if failed and not built:
                return f"fused, numpy kernels, compiled kernels could not be built: {reason} (passes: {passes})"
            if failed:
                return (f"fused, compiled C kernels except {failed} of {built + failed} that could not be built "
                        f"and run with numpy: {reason} (passes: {passes})")
            return f"fused, compiled C kernels (passes: {passes})"
        why = "--no-native" if native.enabled() else f"native code {native.status()}"
        return f"fused, numpy kernels, {why} (passes: {passes})"

    def evaluate(self, split: str) -> Evaluation:
        """Probabilities for every row (file order), loss and accuracy over rows with a known label."""
        s = getattr(self.ds, split)
        codes, labels = self.codes[split], s.label_ids
        C = self.model.dims["num_labels"]
        probs = np.empty((len(s), C), dtype=self.model.dtype)
        rowloss = np.empty(len(s), dtype=np.float64)
        params = self.model.params
        keep = ("outputs", "rowloss") if self.rowloss_slot is not None else ("outputs",)
        for b in D.minibatches(codes, labels, C, EVAL_BATCH, dtype=self.model.dtype):
            v = self.program.forward({**params, **self.model.feed(b.x, self.cfg.dense), "y": b.y},
                                     keep=keep, backward=False)
            probs[b.rows] = v[self.out_slot]
            if self.rowloss_slot is not None:
                rowloss[b.rows] = v[self.rowloss_slot]
            else:
                rowloss[b.rows] = cross_entropy_rows(v[self.out_slot], labels[b.rows])
        known = labels >= 0
        if not known.any():
            return Evaluation(probs, None, None, 0)
        loss = float(rowloss[known].mean())
        acc = float((probs[known].argmax(axis=1) == labels[known]).mean())
        return Evaluation(probs, loss, acc, int(known.sum()))

    def train(self, reporter: Reporter, stop: StopFlag, checkpoint: Checkpoint | None = None) -> TrainResult:
        """Train from scratch, or from ``checkpoint.resume``; save ``checkpoint`` after every epoch."""
        cfg, model = self.cfg, self.model
        params = model.params
        C = model.dims["num_labels"]
        rng = np.random.default_rng(cfg.seed)
        optimizer: Any = make_optimizer(cfg.optimizer, params, cfg.init_lr, momentum=cfg.momentum,
                                        weight_decay=cfg.weight_decay)
        if cfg.average is not None:  # validation, the kept best and so the saved model use the average
            optimizer = Averaged(optimizer, cfg.average)
        schedule = make_schedule(cfg.schedule, cfg.init_lr, cfg.epochs)
        n_train = len(self.ds.train)
        batches = -(-n_train // cfg.batch_size)
        result = TrainResult()
        best_loss = math.inf
        since_best = 0
        one = np.ones((), dtype=model.dtype)
        program, loss_slot, param_slots = self.program, self.loss_slot, self.param_slots
        reporter.start(model.kind, cfg.epochs, batches)
        first = 1
        state = checkpoint.resume if checkpoint is not None else None
        if state is not None:  # everything the uninterrupted run would have at this point
            model.set_params(state.params)
            optimizer.load_state_dict(state.optimizer)
            schedule.load_state_dict(state.schedule)
            rng.bit_generator.state = state.rng
            best_loss, since_best = state.best_loss, state.since_best
            result.best_epoch, result.best_params = state.best_epoch, state.best_params
            result.epochs = [EpochResult(**e) for e in state.epochs]
            first = state.epoch + 1
            result.checkpoint_epoch = state.epoch
            if not state.stopped and first <= cfg.epochs:  # more epochs to train
                self.warm_up()
            reporter.info(f"resuming from {checkpoint.path}: {state.epoch} of {cfg.epochs} epochs done")
            for er in result.epochs:
                reporter.epoch(er)
            if state.stopped:
                result.stopped, result.message = state.stopped, state.message
                return result
        elif self._dead_relu("train"):
            result.stopped = "dead-relu"
            result.message = self._dead_message() + " (at initialisation)"
            return result
        for epoch in range(first, cfg.epochs + 1):
            t0, c0 = time.perf_counter(), time.thread_time()
            total, seen = 0.0, 0
            for k, b in enumerate(D.minibatches(self.codes["train"], self.ds.train.label_ids, C,
                                                cfg.batch_size, rng, dtype=model.dtype)):
                v = program.forward({**params, **model.feed(b.x, cfg.dense), "y": b.y}, keep=("loss",))
                loss = float(v[loss_slot])
                if not math.isfinite(loss):
                    result.stopped = "diverged"
                    result.message = (f"the training loss became {loss} at epoch {epoch}, batch {k + 1} of "
                                      f"{batches}: training diverged. Try a smaller --init_lr "
                                      f"(now {optimizer.lr:g}) or --clip 5")
                    return result
                g = program.backward(v, {"loss": one}, params_only=True)
                grads = {n: g[s] for n, s in param_slots}
                if cfg.clip is not None:
                    clip_grad_norm(grads, cfg.clip)
                optimizer.step(grads)
                total += loss * len(b.rows)
                seen += len(b.rows)
                reporter.batch(epoch, k + 1, loss)
                if stop.requested:
                    break
            train_seconds, train_cpu = time.perf_counter() - t0, time.thread_time() - c0
            if stop.requested and seen < n_train:  # the checkpoint keeps the last finished epoch
                result.stopped = stop.reason
                result.message = f"{stop.reason} during epoch {epoch} (batch {k + 1} of {batches})"
                return result
            with optimizer.swapped() if cfg.average is not None else nullcontext():
                ev = self.evaluate("valid")
                vloss = ev.loss if ev.loss is not None else math.nan
                improved = vloss < best_loss
                if improved:
                    result.best_params = {n: a.copy() for n, a in params.items()}
            er = EpochResult(epoch, total / max(seen, 1), vloss, ev.accuracy or 0.0, train_seconds,
                             optimizer.lr, improved, train_cpu)
            result.epochs.append(er)
            if improved:
                best_loss, since_best = vloss, 0
                result.best_epoch = epoch
            else:
                since_best += 1
            reporter.epoch(er)
            if not math.isfinite(vloss):
                result.stopped = "diverged"
                result.message = f"the validation loss became {vloss} after epoch {epoch}: training diverged"
            elif np.ptp(ev.probs, axis=1).max(initial=0.0) == 0.0:
                result.stopped = "dead-relu"
                result.message = self._dead_message() + f" (after epoch {epoch})"
            elif cfg.patience is not None and since_best >= cfg.patience:
                result.stopped = "early-stop"
                result.message = (f"early stop after epoch {epoch}: validation loss has not improved for "
                                  f"{cfg.patience} epoch(s)")
            else:
                optimizer.lr = schedule.after_epoch(epoch, vloss)
            if checkpoint is not None:
                try:
                    checkpoint.save(TrainState(
                        epoch=epoch, params=params, best_params=result.best_params, best_epoch=result.best_epoch,
                        best_loss=best_loss, since_best=since_best, optimizer=optimizer.state_dict(),
                        schedule=schedule.state_dict(), rng=rng.bit_generator.state,
                        epochs=[asdict(e) for e in result.epochs], stopped=result.stopped, message=result.message))
                except OutputWriteError as exc:
                    # a full disk must not cost the training itself: say it once, go on, try again next epoch
                    result.checkpoint_failures += 1
                    if result.checkpoint_failures == 1:
                        reporter.error(f"checkpoint (--checkpoint) not written after epoch {epoch}: {exc}; "
                                       f"training goes on and tries again after every epoch")
                else:
                    result.checkpoint_epoch = epoch
            if result.stopped:
                return result
            if stop.requested:
                result.stopped = stop.reason
                result.message = f"{stop.reason} after epoch {epoch}"
                return result
        return result

    def warm_up(self) -> None:
        """Run what an epoch runs (a full training batch forward and backward, the validation pass)
        without changing anything.

        Why: the engine compiles a fused kernel to C the first time it sees arrays big enough to
        be worth it, so only now is it known which kernels really compiled and which could not
        be built (a full or read-only kernel cache): :meth:`engine` reports what happened. And the
        compiled kernels and numpy agree only up to rounding: a run resumed from a checkpoint must
        start with the kernels a finished epoch has built to go on bit for bit (``train`` calls
        this when it resumes, for callers such as ``symdiff tune`` that do not call it first).
        """
        b = next(D.minibatches(self.codes["train"], self.ds.train.label_ids, self.model.dims["num_labels"],
                               self.cfg.batch_size, dtype=self.model.dtype))
        v = self.program.forward({**self.model.params, **self.model.feed(b.x, self.cfg.dense), "y": b.y},
                                 keep=("loss",))
        self.program.backward(v, {"loss": np.ones((), dtype=self.model.dtype)}, params_only=True)
        self.evaluate("valid")

    def _dead_relu(self, split: str) -> bool:
        """All logits zero on the first batch of ``split``: no gradient can ever flow."""
        b = next(D.minibatches(self.codes[split], getattr(self.ds, split).label_ids,
                               self.model.dims["num_labels"], self.cfg.batch_size, dtype=self.model.dtype))
        v = self.program.forward({**self.model.params, **self.model.feed(b.x, self.cfg.dense), "y": b.y})
        return bool(np.ptp(v[self.out_slot], axis=1).max(initial=0.0) == 0.0)

    def _dead_message(self) -> str:
        c = self.model.dims["num_labels"]
        return DEAD_RELU_HINT.format(c=c, lnc=math.log(c))


# ---- saved models ---------------------------------------------------------------------------
def save_model(path: str | Path, model: CharModel, vocab: D.Vocab, params: dict[str, np.ndarray]) -> None:
    """Parameters plus everything needed to predict (sizes, characters, labels): no pickle."""
    from .loader import hyperparameters

    chars = sorted(vocab.chars, key=vocab.chars.__getitem__)
    shipped = model.source is None or model.source.shipped
    # A model file is named for the user's information only: predict never imports a path from here.
    kind = {"kind": model.kind} if shipped else {"kind": FILE_KIND, "file": Path(model.kind).name}
    meta = {**kind, **model.dims, "dtype": str(model.dtype), "hp": hyperparameters(model.hp)}
    arrays = {f"param/{n}": a for n, a in params.items()}
    arrays["meta/config"] = np.array(json.dumps(meta))
    arrays["meta/chars"] = np.array(chars)
    arrays["meta/labels"] = np.array(list(vocab.labels))
    save_npz(path, arrays)


FILE_KIND = "file"  # meta kind of a model trained from a user's model file


class ModelFileError(ValueError):
    pass


def load_model(path: str | Path, model_file: str | Path | None = None) -> tuple[CharModel, D.Vocab]:
    """Load a model saved by :func:`save_model`, checking every array against the model's shapes.

    The graph is rebuilt from the shipped model the archive names, or, for a model trained from a
    file, from ``model_file``: the file the user passes again. Nothing in the archive is ever run.
    """
    from .loader import SHIPPED, ModelSourceError

    path = Path(path)
    redo = f"give a file written by `symdiff train MODEL --save_model {path}`"
    if not path.exists():
        raise ModelFileError(f"{path}: no such model file; train with --save_model {path} first")
    if path.is_dir():
        raise ModelFileError(f"{path}: is a directory, not a model file; {redo}")
    if not zipfile.is_zipfile(path):
        raise ModelFileError(f"{path}: not a symdiff model file (not an .npz archive); {redo}")
    try:
        with np.load(path, allow_pickle=False) as z:
            files = {k: z[k] for k in z.files}
    except ValueError as exc:
        if "pickle" in str(exc) or "Object arrays" in str(exc):
            raise ModelFileError(f"{path}: holds pickled (object) arrays, which symdiff never loads; "
                                 f"{redo}") from None
        raise ModelFileError(f"{path}: unreadable .npz ({exc}); {redo}") from None
    except (OSError, EOFError, zipfile.BadZipFile) as exc:
        raise ModelFileError(f"{path}: unreadable .npz ({exc}); {redo}") from None
    for key in ("meta/config", "meta/chars", "meta/labels"):
        if key not in files:
            raise ModelFileError(f"{path}: missing array {key!r}; not a model saved by symdiff --save_model")
    try:
        meta = json.loads(str(files["meta/config"]))
        kind = str(meta["kind"])
        dims = {k: int(meta[k]) for k in ("max_len", "num_chars", "num_hid", "num_labels")}
        dtype = str(meta.get("dtype", "float64"))
        hp = dict(meta.get("hp", {}))
        trained_from = str(meta.get("file", "")) if kind == FILE_KIND else None
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ModelFileError(f"{path}: unreadable meta/config ({exc}); {redo}") from None
    if kind == FILE_KIND:
        if model_file is None:
            raise ModelFileError(f"{path}: was trained from the model file {trained_from!r}; pass that file again "
                                 f"(--model_file PATH): a path stored in a saved model is never imported")
        kind = str(model_file)
    elif kind not in SHIPPED:
        raise ModelFileError(f"{path}: unknown model kind {kind!r} (shipped models: {', '.join(SHIPPED)}); {redo}")
    elif model_file is not None:
        raise ModelFileError(f"{path}: holds the shipped model {kind!r}, which is rebuilt from models/{kind}.py; "
                             f"--model_file is only for models trained from a model file (drop it)")
    if min(dims.values()) < 1:
        raise ModelFileError(f"{path}: meta/config sizes must be at least 1, got {dims}; {redo}")
    if dtype not in ("float64", "float32"):
        raise ModelFileError(f"{path}: meta/config dtype must be float64 or float32, got {dtype!r}; {redo}")
    chars = [str(c) for c in files["meta/chars"].reshape(-1)]
    try:
        vocab = D.Vocab(chars={c: i for i, c in enumerate(chars)},
                        labels=tuple(str(l) for l in files["meta/labels"].reshape(-1)))
    except ValueError as exc:
        raise ModelFileError(f"{path}: bad meta/chars or meta/labels ({exc}); {redo}") from None
    if len(chars) != dims["num_chars"] or len(vocab.labels) != dims["num_labels"]:
        raise ModelFileError(f"{path}: meta/chars or meta/labels does not match meta/config sizes")
    try:
        model = build_model(kind, dims, seed=0, dtype=dtype, hp=hp)
    except ModelSourceError as exc:
        raise ModelFileError(f"{path}: cannot rebuild its graph: {exc}") from None
    expected = model.params
    extra = sorted(k[6:] for k in files if k.startswith("param/") and k[6:] not in expected)
    if extra:
        raise ModelFileError(f"{path}: unexpected array(s) {', '.join('param/' + e for e in extra)} for a {kind} model")
    for name, arr in expected.items():
        key = f"param/{name}"
        if key not in files:
            raise ModelFileError(f"{path}: missing array {key!r} for a {kind} model")
        if files[key].shape != arr.shape:
            raise ModelFileError(f"{path}: array {key!r} has shape {files[key].shape}, the {kind} model "
                                 f"needs {arr.shape}")
        if not np.issubdtype(files[key].dtype, np.floating) or not np.isfinite(files[key]).all():
            raise ModelFileError(f"{path}: array {key!r} must hold finite floating-point numbers")
        arr[...] = files[key]
    return model, vocab


def predict_titles(model: CharModel, vocab: D.Vocab, titles: list[str]) -> np.ndarray:
    """Probabilities for title strings (unknown characters count as padding).

    Titles are read as the data files write them: percent-escapes are decoded
    (``Mikl%C3%B3s_Horthy`` is ``Miklós_Horthy``, as in training), text without
    escapes is taken as it is, and a ``%`` that starts no valid escape stays a ``%``.
    """
    from .inference import probabilities  # the one place a saved model's forward pass runs

    return probabilities(model, vocab, [unquote(t).strip() for t in titles])


# ---- the run driver -------------------------------------------------------------------------
class UsageError(ValueError):
    """Bad flags or paths: reported as one line, exit code 2."""


EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED, EXIT_TERMINATED = 0, 1, 2, 130, 143
STOP_EXIT = {"interrupted": EXIT_INTERRUPTED, "terminated": EXIT_TERMINATED}
STOP_CAUSE = {"interrupted": "Ctrl-C", "terminated": "SIGTERM"}


def run(kind: str, params: dict[str, Any], reporter: Reporter) -> int:
    """Load the model and data, train, write predictions/metrics/model atomically; returns the exit code.

    ``kind`` is a shipped model's name or a model file's path (models/loader.py). Every problem with
    the model file is a UsageError (one line naming the file) raised before training starts.
    """
    from .loader import ModelSourceError, load_source

    try:
        source = load_source(kind)
    except ModelSourceError as exc:
        raise UsageError(str(exc)) from None
    try:  # --preset fills the hyperparameters not given on the command line (the model file's PRESETS)
        params = apply_preset(source.presets, params, source.label)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    problem = ignored_flag(params)
    if problem:
        raise UsageError(problem)
    cfg = TrainConfig.from_params({"init_lr": default_lr(source.name if source.shipped else ""),
                                   **{k: v for k, v in params.items() if v is not None}})
    if params.get("preset", "seed") != "seed":
        reporter.info(f"preset {params['preset']}: " + ", ".join(f"{k}={getattr(cfg, k)}" for k in PRESET_KEYS))
    try:  # combinations the flag parser cannot judge alone (e.g. nesterov needs momentum > 0)
        make_optimizer(cfg.optimizer, {"probe": np.zeros(1)}, cfg.init_lr, momentum=cfg.momentum,
                       weight_decay=cfg.weight_decay)
        make_schedule(cfg.schedule, cfg.init_lr, cfg.epochs)
    except ValueError as exc:
        raise UsageError(f"--optimizer {cfg.optimizer} --momentum {cfg.momentum:g} --schedule {cfg.schedule}: "
                         f"{exc}; change one of these flags") from None
    outputs = {}
    try:
        for flag in ("output_file", "metrics_file", "save_model"):
            if params.get(flag):
                outputs[flag] = check_output_path(params[flag], f"--{flag}")
        # the checkpoint is written during training (models/checkpoint.py), not with the outputs
        checkpoint_path = check_output_path(params["checkpoint"], "--checkpoint") if params.get("checkpoint") else None
        prefix = D.resolve_dataset(params.get("dataset") or D.DEFAULT_DATASET)
        ds = D.load_dataset(prefix)
    except (OutputPathError, D.DataError) as exc:
        raise UsageError(str(exc)) from None
    for lineno, label in ds.test.unknown_labels[:5]:
        reporter.warn(f"{ds.test.path}:{lineno}: label {label!r} does not occur in training; "
                      f"the row is predicted but left out of the test loss and accuracy")
    if len(ds.test.unknown_labels) > 5:
        reporter.warn(f"... {len(ds.test.unknown_labels) - 5} more test rows with unknown labels")
    dims = dict(max_len=cfg.max_len, num_chars=ds.vocab.num_chars, num_hid=cfg.num_hid,
                num_labels=ds.vocab.num_labels)
    try:
        model = build_model(kind, dims, seed=cfg.seed, dtype=cfg.dtype, hp=cfg.record(), source=source)
    except ModelSourceError as exc:
        raise UsageError(str(exc)) from None
    trainer = Trainer(model, ds, cfg)
    checkpoint = None
    if checkpoint_path is not None:  # read and checked before training: a wrong one is refused up front
        try:
            checkpoint = open_checkpoint(checkpoint_path, kind, cfg, model, ds)
        except CheckpointError as exc:
            raise UsageError(str(exc)) from None
    reporter.info(f"data {prefix}: {len(ds.train)} train / {len(ds.valid)} valid / {len(ds.test)} test rows, "
                  f"{ds.vocab.num_chars} characters, labels {', '.join(ds.vocab.labels)}")
    trainer.warm_up()
    reporter.info(f"engine: {trainer.engine()}")
    flag = StopFlag()
    fallback = _kernel_fallback_warning(reporter)  # a kernel first built (and failing) after that line
    # Overflow on the way to a non-finite loss is detected and reported by the loop itself;
    # numpy's RuntimeWarnings about it would only bury that one clear message.
    with stop_on_signals(flag), np.errstate(over="ignore", invalid="ignore", divide="ignore"), \
            native.on_kernel_failure(fallback):
        result = trainer.train(reporter, flag, checkpoint)
    if result.message:
        (reporter.warn if result.stopped != "early-stop" else reporter.info)(result.message)
    if result.best_params is None:
        why = "no epoch completed" if not result.epochs else "no epoch reached a finite validation loss"
        reporter.warn(f"{why}, so there are no parameters worth keeping: nothing was written")
        return STOP_EXIT.get(result.stopped or "", EXIT_FAILED)
    model.set_params(result.best_params)
    with native.on_kernel_failure(fallback):
        test = trainer.evaluate("test")
    summary: dict[str, Any] = {"best_epoch": result.best_epoch}
    if result.stopped in ("interrupted", "terminated", "diverged", "dead-relu"):
        reporter.info(f"using the parameters of the best epoch so far ({result.best_epoch})")
    if test.loss is not None:
        summary.update(test_loss=test.loss, test_accuracy=test.accuracy)
    metrics = {"model": source.label, "config": cfg.record(), "dataset": str(prefix),
               "epochs": [{"epoch": e.epoch, "train_loss": e.train_loss, "valid_loss": e.valid_loss,
                           "valid_accuracy": e.valid_accuracy, "train_seconds": e.train_seconds}
                          for e in result.epochs],
               "best_epoch": result.best_epoch, "stopped": result.stopped}
    if test.loss is not None:
        metrics.update(test_loss=test.loss, test_accuracy=test.accuracy)
    written, failures = write_outputs(outputs, {
        "output_file": lambda path: save_npy(path, test.probs),
        "metrics_file": lambda path: save_json(path, metrics),
        "save_model": lambda path: save_model(path, model, ds.vocab, result.best_params)})
    summary.update(written)
    reporter.finish(summary)
    for line in failures:
        reporter.error(line)
    if result.checkpoint_failures:
        holds = (f"{checkpoint.path} holds epoch {result.checkpoint_epoch}"
                 if checkpoint is not None and result.checkpoint_epoch is not None else "no checkpoint was written")
        failures.append(f"checkpoint (--checkpoint): {result.checkpoint_failures} epoch(s) could not be saved; "
                        f"{holds}")
        reporter.error(failures[-1])
    if result.stopped in STOP_EXIT:
        again = (f"; run the same command again to continue from {checkpoint.path}" if checkpoint is not None
                 else "")
        reporter.warn(f"stopped by {STOP_CAUSE[result.stopped]}: results above come from the best epoch so far "
                      f"(exit code {STOP_EXIT[result.stopped]}){again}")
        return STOP_EXIT[result.stopped]
    if failures:
        return EXIT_FAILED
    return EXIT_FAILED if result.stopped in ("diverged", "dead-relu") and not result.epochs else EXIT_OK


#: what each output flag holds, as the summary and the error lines name it
OUTPUT_NAMES = {"output_file": "predictions", "metrics_file": "metrics", "save_model": "model"}


def write_outputs(outputs: dict[str, Path], writers: dict[str, Callable[[Path], None]]
                  ) -> tuple[dict[str, str], list[str]]:
    """Write every requested output, each atomically, each tried even when another failed.

    Returns ``{name: path}`` of the outputs written and one line per output that was not
    (the file, the OS's reason, whether the previous file is unchanged). Why: a full disk
    or a vanished folder must not cost the results that could still be saved; when the
    predictions are the ones lost, their line says where the metrics and model went.
    """
    written: dict[str, str] = {}
    lines: dict[str, str] = {}
    for flag, path in outputs.items():
        name = OUTPUT_NAMES[flag]
        try:
            writers[flag](path)
        except OutputWriteError as exc:
            lines[flag] = f"{name} (--{flag}) not written: {exc}"
        else:
            written[name] = str(path)
    if "output_file" in lines:
        kept = [f"the {name} {'went ' if k == 0 else ''}to {path}" for k, (name, path) in enumerate(written.items())]
        lines["output_file"] += ("; " + " and ".join(kept) if kept else
                                 "; no other output was asked for or could be written")
    return written, list(lines.values())


def _kernel_fallback_warning(reporter: Reporter) -> Callable[[str], None]:
    """A listener for :func:`symdiff.native.on_kernel_failure` that says once, when it happens,
    that a compiled kernel fell back to numpy after the ``engine:`` line was printed."""
    said: list[str] = []

    def warn(reason: str) -> None:
        if not said:
            said.append(reason)
            reporter.warn(f"a compiled kernel could not be built ({reason}); it runs with numpy kernels "
                          f"from now on (same results, slower)")
    return warn


def run_main(kind: str, params: dict[str, Any], reporter: Reporter | None = None) -> int:
    """``main(params)`` of the model modules: run with plain output, errors as one line."""
    try:
        return run(kind, params, reporter or PlainReporter())
    except UsageError as exc:
        print(f"symdiff {kind}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt as exc:  # a second Ctrl-C or SIGTERM: the first one stops training cleanly
        print(f"symdiff {kind}: error: {stop_at_once_message(exc)}", file=sys.stderr)
        return EXIT_TERMINATED if isinstance(exc, Terminated) else EXIT_INTERRUPTED


def stop_at_once_message(exc: KeyboardInterrupt) -> str:
    """What a second Ctrl-C or SIGTERM did (the first one stops training cleanly)."""
    what = "terminated" if isinstance(exc, Terminated) else "interrupted"
    return f"{what}: stopped at once; every output file is either complete or untouched (the writes are atomic)"


def open_checkpoint(path: str | Path, kind: str, cfg: TrainConfig, model: CharModel, ds: D.Dataset) -> Checkpoint:
    """The run's checkpoint at ``path``: its state is read and checked against this run's settings now."""
    fingerprint = data_fingerprint([(ds.train.titles, ds.train.label_ids), (ds.valid.titles, ds.valid.label_ids)])
    ident = identity(kind, asdict(cfg), model.dims, fingerprint)
    return Checkpoint(path, ident, {n: a.shape for n, a in model.params.items()})
