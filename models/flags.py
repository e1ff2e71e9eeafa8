"""The training flags: the seed's names and defaults, plus symdiff's own.

Kept free of the engine (no SymPy import) so ``symdiff --help`` stays fast.
"""
from __future__ import annotations

import argparse
import math
from typing import Any, Callable, NoReturn

from symdiff.optim import OPTIMIZERS, SCHEDULES, USES_MOMENTUM

from .data import DEFAULT_DATASET

DEFAULT_LR = {"mlp": 0.05, "lstm": 0.5}


def _checked(convert: Callable[[str], Any], ok: Callable[[Any], bool], rule: str) -> Callable[[str], Any]:
    """An argparse ``type=``: ``convert`` the text, then require ``ok(value)`` (``rule`` says what)."""
    what = "a whole number" if convert is int else "a number"

    def parse(text: str) -> Any:
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not ok(value):  # nan fails every comparison, so it is refused too
            raise argparse.ArgumentTypeError(f"must be {rule}, got {text}")
        return value

    return parse


# argparse ``type=`` checks shared by every command's flags (cli.py uses them too)
positive_int = _checked(int, lambda v: v >= 1, "at least 1")
positive_float = _checked(float, lambda v: math.isfinite(v) and v > 0, "a finite number > 0")
_non_negative_float = _checked(float, lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0")
_unit_float = _checked(float, lambda v: 0 <= v < 1, "in [0, 1)")
seed_int = _checked(int, lambda v: v >= 0, "0 or more")
_decay = _checked(float, lambda v: 0 < v < 1, "in (0, 1)")


def one_line_errors(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Make ``parser.error`` print one line (no multi-line usage block), then exit with code 2."""

    def error(message: str) -> NoReturn:
        parser.exit(2, f"{parser.prog}: error: {message} (see {parser.prog} --help)\n")

    parser.error = error  # type: ignore[method-assign]
    return parser


# ---- presets --------------------------------------------------------------------------------
# The hyperparameters a preset sets; each is also a flag, and a flag given on the command line wins.
PRESET_KEYS = ("max_len", "num_hid", "batch_size", "epochs", "init_lr", "dtype", "optimizer", "momentum",
               "weight_decay", "clip", "schedule", "patience", "average")
# The tables live in the model files (PRESETS in models/mlp.py, models/lstm.py, ...; docs/tuning.md).
# "seed" itself is no table: it is the parser's defaults.
PRESET_NAMES = ("seed", "best")  # what `symdiff mlp|lstm --preset` offers; a model file may define others
GIVEN = "given_flags"  # the parsed namespace's record of the PRESET_KEYS set on the command line


class _Given(argparse.Action):
    """argparse's plain ``store``, which also records that the flag was given on the command line.

    So ``--preset best --optimizer sgd`` keeps sgd even though sgd is also the default:
    comparing values against the parser's defaults could not tell the two apart.
    """

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        setattr(namespace, self.dest, values)
        setattr(namespace, GIVEN, tuple(sorted({*getattr(namespace, GIVEN, ()), self.dest})))


def apply_preset(presets: dict[str, dict[str, Any]], params: dict[str, Any], model: str = "this model") -> dict[str, Any]:
    """``params`` with ``params["preset"]``'s values (from the model file's ``presets``) filled in
    for every hyperparameter not given.

    "Given" means: listed in ``params["given_flags"]`` (what the CLI parser records); for a
    hand-made dict without that key, every PRESET_KEYS key present in it. ``preset`` missing or
    "seed" returns ``params`` unchanged (the seed's behaviour).
    """
    name = params.get("preset") or "seed"
    if name == "seed":
        return params
    if name not in presets:
        raise ValueError(f"unknown preset {name!r} for {model}; valid names are: {', '.join(['seed', *presets])}")
    given = set(params[GIVEN]) if GIVEN in params else {k for k in PRESET_KEYS if k in params}
    return {**params, **{k: v for k, v in presets[name].items() if k not in given}}


def default_lr(model: str) -> float:
    """The seed's learning rate for its two models; 0.05 (the MLP's) for every other model."""
    return DEFAULT_LR.get(model, DEFAULT_LR["mlp"])


def ignored_flag(params: dict[str, Any]) -> str | None:
    """Why a flag given on the command line would have no effect, or None (a silent no-op misleads)."""
    optimizer = str(params.get("optimizer") or "sgd").lower()
    if "momentum" in params.get(GIVEN, ()) and optimizer not in USES_MOMENTUM:
        return (f"--momentum has no effect with --optimizer {optimizer}; it is used by "
                f"--optimizer {' or '.join(USES_MOMENTUM)} (drop --momentum, or pick one of those)")
    return None


def add_train_arguments(p: argparse.ArgumentParser, kind: str | None) -> None:
    """The seed's flags (same names and defaults) plus symdiff's own.

    ``kind`` is ``mlp`` or ``lstm`` for their commands; None for ``symdiff train MODEL``, whose
    learning-rate default and preset names depend on the model (known once its file is read).
    """
    one_line_errors(p)
    p.set_defaults(**{GIVEN: ()})
    p.add_argument("--max_len", action=_Given, type=positive_int, default=10,
                   help="characters per title (default 10)")
    p.add_argument("--num_hid", action=_Given, type=positive_int, default=50, help="hidden units (default 50)")
    p.add_argument("--batch_size", action=_Given, type=positive_int, default=64,
                   help="minibatch size (default 64)")
    p.add_argument("--dataset", default=DEFAULT_DATASET,
                   help="path prefix of <prefix>.train/.valid/.test, or a shipped name (default: demo)")
    p.add_argument("--epochs", action=_Given, type=positive_int, default=15, help="training epochs (default 15)")
    if kind is None:
        p.add_argument("--init_lr", action=_Given, type=positive_float, default=None,
                       help=f"learning rate (default {DEFAULT_LR['lstm']} for lstm, {DEFAULT_LR['mlp']} for every "
                            f"other model)")
    else:
        p.add_argument("--init_lr", action=_Given, type=positive_float, default=DEFAULT_LR[kind],
                       help=f"learning rate (default {DEFAULT_LR[kind]})")
    p.add_argument("--output_file", default="output.npy", help="test-set probabilities, np.save (default output.npy)")
    p.add_argument("--seed", type=seed_int, default=0, help="seed for initialisation and shuffling (default 0)")
    p.add_argument("--metrics_file", default=None, help="write per-epoch metrics as JSON here")
    p.add_argument("--save_model", default=None, help="save the best parameters (.npz) for `symdiff predict`")
    p.add_argument("--checkpoint", default=None, metavar="PATH",
                   help="save everything needed to go on (.npz) here after every epoch; if PATH exists, "
                        "continue from it (same results, bit for bit, as a run never stopped)")
    p.add_argument("--dtype", action=_Given, choices=("float64", "float32"), default="float64",
                   help="float precision")
    p.add_argument("--dense", action="store_true",
                   help="feed dense one-hot matrices instead of the sparse gather path (same math, slower)")
    p.add_argument("--no-fuse", dest="fuse", action="store_false",
                   help="do not fuse chains of elementwise ops into one derived kernel (same math, slower)")
    p.add_argument("--no-native", dest="native", action="store_false",
                   help="run fused kernels with numpy instead of compiled C (same math, slower; "
                        "also SYMDIFF_NATIVE=0)")
    p.add_argument("--optimizer", action=_Given, choices=OPTIMIZERS, default="sgd",
                   help="update rule (default: the seed's sgd)")
    p.add_argument("--momentum", action=_Given, type=_unit_float, default=0.9,
                   help="momentum for --optimizer momentum or nesterov (default 0.9; an error with the others)")
    p.add_argument("--weight_decay", action=_Given, type=_non_negative_float, default=0.0,
                   help="weight decay (default 0)")
    p.add_argument("--clip", action=_Given, type=positive_float, default=None,
                   help="clip the global gradient norm to this")
    p.add_argument("--schedule", action=_Given, choices=SCHEDULES, default="constant",
                   help="learning-rate schedule")
    p.add_argument("--patience", action=_Given, type=positive_int, default=None,
                   help="stop when validation loss has not improved for this many epochs")
    p.add_argument("--average", action=_Given, type=_decay, default=None, metavar="DECAY",
                   help="validate, keep and save a moving average of the weights instead of the last step's "
                        "(Polyak averaging; DECAY caps how slowly it forgets, e.g. 0.998)")
    p.add_argument("--preset", choices=None if kind is None else PRESET_NAMES, default="seed",
                   help="seed (default): the seed's defaults above; best (or another name in the model file's "
                        "PRESETS): the tuned values for this model (docs/tuning.md) for every hyperparameter "
                        "not given on the command line")


def parse_args(kind: str, argv: list[str]) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog=f"python -m models.{kind}", description=f"Train the {kind} classifier.")
    add_train_arguments(p, kind)
    return vars(p.parse_args(argv))


TUNE_PRUNERS = ("median", "halving", "none")  # models/tune.py's make_pruner builds them


def add_tune_arguments(p: argparse.ArgumentParser) -> None:
    """``symdiff tune``'s flags (the study logic is in models/tune.py)."""
    one_line_errors(p)
    p.add_argument("model", choices=("mlp", "lstm", "gru", "bilstm", "attention", "lstm_max"))  # models/tune.py SEARCH_SPACES
    p.add_argument("--trials", type=positive_int, default=20,
                   help="trials this command runs, split over its workers (default 20)")
    p.add_argument("--storage", default=None, metavar="URL_OR_PATH",
                   help="a journal file (default runs/tune.journal; several processes on one machine) or a "
                        "SQLAlchemy URL such as postgresql+psycopg://USER:PASSWORD@HOST/DB (several machines)")
    p.add_argument("--study", default=None, metavar="NAME", help="study name (default: the model's name)")
    p.add_argument("--workers", type=positive_int, default=1, help="local worker processes (default 1)")
    p.add_argument("--timeout", type=positive_float, default=None, metavar="S",
                   help="each worker starts no new trial after S seconds")
    p.add_argument("--dataset", default=DEFAULT_DATASET,
                   help="path prefix or shipped name; trials read its train and valid splits only")
    p.add_argument("--epochs", type=positive_int, default=20, help="epochs per trial at most (default 20)")
    p.add_argument("--seed", type=seed_int, default=0, help="worker i samples with seed SEED+i (default 0)")
    p.add_argument("--checkpoints", default=None, metavar="DIR",
                   help="each trial's checkpoint (default runs/checkpoints); share it between machines so "
                        "that a retried trial continues where its dead worker stopped")
    p.add_argument("--heartbeat", type=positive_int, default=10, metavar="S",
                   help="with a database: workers beat every S seconds; a trial silent for 3*S is retried")
    p.add_argument("--pruner", choices=TUNE_PRUNERS, default="median",
                   help="stop hopeless trials early on their validation loss per epoch (default median; "
                        "docs/tuning.md says why)")
    p.add_argument("--show", action="store_true",
                   help="print the study's trials and write its figures (PNG) instead of running trials")
    p.add_argument("--out", default="runs", metavar="DIR", help="folder for --show's figures (default runs)")
