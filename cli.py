"""The ``symdiff`` command line: argument parsing and rich presentation only, no math.

Heavy modules (SymPy, the engine, the models) are imported inside the command
that needs them, so ``symdiff --help`` answers at once.
"""
from __future__ import annotations

import argparse
import sys
from typing import Any, Sequence

from models.flags import add_train_arguments


# ---- presentation ---------------------------------------------------------------------------
class RichReporter:
    """Progress bars over epochs and batches with the live loss, a line per epoch, a final table."""

    def __init__(self, console: Any) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.console = console
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[status]}"), TimeElapsedColumn(),
                                 console=console, transient=True)
        self.epochs_task = self.batches_task = None
        self.rows: list[Any] = []

    def start(self, kind: str, epochs: int, batches: int) -> None:
        self.progress.start()
        self.epochs_task = self.progress.add_task(f"[bold]{kind}[/] epochs", total=epochs, status="")
        self.batches_task = self.progress.add_task("batches", total=batches, status="")

    def batch(self, epoch: int, k: int, loss: float) -> None:
        if k % 8 == 0 or k == 1:
            self.progress.update(self.batches_task, completed=k, status=f"loss {loss:.4f}")

    def epoch(self, r: Any) -> None:
        self.rows.append(r)
        self.progress.update(self.epochs_task, advance=1, status=f"best valid {min(x.valid_loss for x in self.rows):.4f}")
        self.progress.reset(self.batches_task, status="")
        mark = " [green]★ best[/]" if r.best else ""
        self.console.print(f"epoch {r.epoch:3d}  train loss {r.train_loss:.4f}  valid loss {r.valid_loss:.4f}  "
                           f"valid acc {r.valid_accuracy:.4f}  [dim]({r.train_seconds:.2f}s)[/]{mark}")

    def info(self, text: str) -> None:
        from rich.markup import escape  # messages quote data (titles, labels, paths): never markup

        self.console.print(f"[dim]{escape(text)}[/]", highlight=False)

    def warn(self, text: str) -> None:
        from rich.markup import escape

        self.console.print(f"[bold yellow]warning:[/] {escape(text)}", highlight=False)

    def finish(self, summary: dict[str, Any]) -> None:
        from rich.table import Table
        from rich.text import Text  # values such as paths are data, never markup

        self.progress.stop()
        table = Table(title="result")
        table.add_column("")
        table.add_column("value", justify="right")
        for k, v in summary.items():
            table.add_row(k.replace("_", " "), Text(f"{v:.4f}" if isinstance(v, float) else str(v)))
        self.console.print(table)

    def close(self) -> None:
        self.progress.stop()


def _console(stderr: bool = False) -> Any:
    from rich.console import Console

    return Console(stderr=stderr)


def _fail(prog: str, message: str, code: int = 2) -> int:
    print(f"{prog}: error: {message}", file=sys.stderr)
    return code


# ---- commands -------------------------------------------------------------------------------
def cmd_train(args: argparse.Namespace) -> int:
    try:
        from models.training import PlainReporter, UsageError, run

        params = vars(args).copy()
        kind = params.pop("command")
        params.pop("func", None)
        console = _console()
        reporter: Any = RichReporter(console) if console.is_terminal else PlainReporter()
        try:
            return run(kind, params, reporter)
        except UsageError as exc:
            return _fail(f"symdiff {kind}", str(exc))
        finally:
            if isinstance(reporter, RichReporter):
                reporter.close()
    except KeyboardInterrupt:  # a second Ctrl-C (the first one stops training cleanly), or one during start-up
        return _fail(f"symdiff {args.command}", "interrupted: stopped at once; every output file is either "
                     "complete or untouched (the writes are atomic)", code=130)


def cmd_gradcheck(args: argparse.Namespace) -> int:
    import numpy as np
    from rich.table import Table

    from models.training import build_model
    from symdiff import grad_check

    dims = dict(max_len=args.max_len, num_chars=args.num_chars, num_hid=args.num_hid, num_labels=args.num_labels)
    model = build_model(args.model, dims, seed=args.seed, dtype=np.float64)
    xm = model.xm
    report = grad_check(xm, xm.operationSequence(xm.register("loss")), eps=args.eps, max_elements=args.max_elements)
    table = Table(title=f"gradient check: {args.model} (central differences, eps={args.eps:g})")
    for col in ("param", "shape", "checked", "max abs diff", "max rel diff", "ok"):
        table.add_column(col, justify="left" if col in ("param", "shape") else "right")
    for p in report.params:
        table.add_row(p.name, str(p.shape), str(p.checked), f"{p.max_abs:.2e}", f"{p.max_rel:.2e}",
                      "[green]yes[/]" if p.ok else "[red]NO[/]")
    _console().print(table)
    return 0 if report.ok else 1


def cmd_ops(args: argparse.Namespace) -> int:
    from rich.table import Table

    from symdiff import OPS

    table = Table(title="symdiff primitives", show_lines=True)
    for col in ("op", "kind", "forward", "backward (as generated)"):
        table.add_column(col)
    for name, op in OPS.items():
        if op.symbolic is not None:
            s = op.symbolic
            fwd, backward = s.display()
            bwd = "\n".join(f"d/d{a}: {e}{'  [output form]' if of else ''}"
                            for a, e, of in zip(s.arg_names, backward, s.output_form))
            kind = "elementwise (SymPy)"
        else:
            fwd, kind = op.formula, "structural (hand-written)"
            bwd = "\n".join(f"input {j}: {d}" for j, d in enumerate(op.derivative_formulas))
        table.add_row(name, kind, fwd, bwd)
    _console().print(table)
    if args.wengert:
        from models.training import build_model

        model = build_model(args.wengert, dict(max_len=3, num_chars=5, num_hid=4, num_labels=3), seed=0)
        print(model.xm.operationSequence(model.xm.register("loss")))
    if args.fused:
        _print_fused(args.fused)
    return 0


def _print_fused(kind: str) -> None:
    """The compiled step list of a small model after the graph rewrites, and each fused kernel."""
    from models.training import build_model
    from rich.markup import escape

    from symdiff import Autograd, MULTI_OPS, WengertList

    model = build_model(kind, dict(max_len=3, num_chars=5, num_hid=4, num_labels=3), seed=0)
    xm = model.xm
    program = Autograd(xm).compile(xm.operationSequence(xm.register("loss")))
    program.backward_plan(["loss"])  # derives the fused gradients, so they can be shown
    console = _console()
    console.print(f"[bold]{kind}[/] after the passes (max_len 3), one step a line:", highlight=False)
    console.print(str(WengertList(program.steps)), highlight=False, markup=False)
    from symdiff import native

    console.print(f"\nnative kernels: {escape(native.status())}"
                  + ("; each fused kernel below runs as C compiled from its expressions" if program.native else ""),
                  highlight=False)
    for name in dict.fromkeys(s.op for s in program.steps if hasattr(MULTI_OPS.get(s.op), "describe")):
        console.print(f"\n[bold]{escape(name)}[/]  {escape(MULTI_OPS[name].describe())}", highlight=False)
    for name in dict.fromkeys(s.op for s in program.steps if s.op.startswith("fused")):
        fwd, bwd = MULTI_OPS[name].display()
        console.print(f"\n[bold]{escape(name)}[/]  (in_j: inputs, rK: results, deltaK: gradient arriving at result K)",
                      highlight=False)
        console.print("\n".join(["  " + line for line in fwd + bwd]), highlight=False, markup=False)


def cmd_predict(args: argparse.Namespace) -> int:
    from rich.table import Table

    from models.training import ModelFileError, load_model, predict_titles

    try:
        model, vocab = load_model(args.model)
    except ModelFileError as exc:
        return _fail("symdiff predict", str(exc))
    from rich.text import Text  # titles and labels are data, never rich markup ("[/]" would crash)

    probs = predict_titles(model, vocab, list(args.titles))
    table = Table(title=f"predictions ({model.kind})")
    table.add_column("title")
    for label in vocab.labels:
        table.add_column(Text(label), justify="right")
    for title, row in zip(args.titles, probs):
        best = int(row.argmax())
        table.add_row(Text(title), *[f"[bold]{p:.3f}[/]" if j == best else f"{p:.3f}" for j, p in enumerate(row)])
    _console().print(table)
    return 0


def cmd_experiment(args: argparse.Namespace) -> int:
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)
    from rich.table import Table
    from rich.text import Text

    from models import experiments as X

    console = _console()

    class Bar:
        """One rich progress bar per experiment, over the whole sweep (adapts ``X.Progress``)."""

        def __init__(self) -> None:
            self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                     TextColumn("{task.fields[status]}"), TimeElapsedColumn(),
                                     TimeRemainingColumn(), console=console, transient=True,
                                     disable=not console.is_terminal)
            self.task: Any = None

        def start(self, description: str, total: int) -> None:
            self.progress.start()
            self.task = self.progress.add_task(f"[bold]{description}[/]", total=total, status="")

        def advance(self, n: int = 1, status: str | None = None) -> None:
            if status is None:
                self.progress.advance(self.task, n)
            else:
                self.progress.update(self.task, advance=n, status=status)

        def finish(self) -> None:
            self.progress.stop()

    names = (*X.EXPERIMENTS, "report") if args.which == "all" else (args.which,)
    bar = Bar()
    try:
        for name in names:
            if name == "report":
                path, notes = X.write_report(args.out, args.report)
                for note in notes:
                    console.print(note, style="yellow", markup=False, highlight=False)
                console.print(f"report written to {path}", markup=False, highlight=False)
                continue
            data = X.run(name, dataset=args.dataset, epochs=args.epochs, repeats=args.repeats, seed=args.seed,
                         batch_sizes=args.batch_sizes, max_lens=args.max_lens, draws=args.draws, progress=bar)
            files = X.save(name, data, args.out)
            title, cols, rows = X.summary_table(name, data)
            table = Table(title=Text(title))  # text from data, never rich markup
            for k, col in enumerate(cols):
                table.add_column(Text(col), justify="left" if k < 2 else "right")
            for row in rows:
                table.add_row(*map(Text, row))
            console.print(table)
            for warning in data.get("warnings", []):
                console.print(f"warning: {warning}", style="yellow", markup=False, highlight=False)
            plots = X.save_plots(name, data, args.out)
            console.print(f"{name}: data written to {', '.join(str(p) for p in files)} "
                          f"({data['meta']['wall_seconds']:.1f} s)", markup=False, highlight=False)
            if plots is None:
                console.print(f"{name}: plots skipped, matplotlib is not installed; to get them run "
                              f"{X.PLOTS_HINT} and then `symdiff experiment report --out {args.out}`",
                              markup=False, highlight=False)
            else:
                console.print(f"{name}: plots written to {', '.join(str(p) for p in plots)}", markup=False,
                              highlight=False)
        if args.which in X.EXPERIMENTS:
            console.print(f"update the report with: symdiff experiment report --out {args.out} "
                          f"--report {args.report}", style="dim", markup=False, highlight=False)
    except X.ExperimentError as exc:
        return _fail("symdiff experiment", str(exc))
    except KeyboardInterrupt:
        console.print("[bold yellow]interrupted:[/] nothing written for the experiment in progress")
        return 130
    finally:
        bar.progress.stop()
    return 0


# ---- parsing --------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="symdiff", description=(
        "Reverse-mode autodiff over Wengert lists, every elementwise op declared once in SymPy; "
        "trains character-level entity classifiers (MLP, LSTM)."))
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for kind in ("mlp", "lstm"):
        t = sub.add_parser(kind, help=f"train the {kind.upper()} classifier (the seed's flags)")
        add_train_arguments(t, kind)
        t.set_defaults(func=cmd_train)
    g = sub.add_parser("gradcheck", help="check a model's gradients against central differences")
    g.add_argument("model", choices=("mlp", "lstm"))
    g.add_argument("--max_len", type=int, default=4)
    g.add_argument("--num_chars", type=int, default=12)
    g.add_argument("--num_hid", type=int, default=6)
    g.add_argument("--num_labels", type=int, default=5)
    g.add_argument("--eps", type=float, default=1e-4)
    g.add_argument("--max_elements", type=int, default=64, help="elements perturbed per param")
    g.add_argument("--seed", type=int, default=0)
    g.set_defaults(func=cmd_gradcheck)
    o = sub.add_parser("ops", help="list every primitive with its SymPy expression and generated derivatives")
    o.add_argument("--wengert", choices=("mlp", "lstm"), help="also print a small model's Wengert list")
    o.add_argument("--fused", choices=("mlp", "lstm"),
                   help="also print a small model's step list after the graph rewrites and its fused kernels")
    o.set_defaults(func=cmd_ops)
    pr = sub.add_parser("predict", help="classify titles with a model saved by --save_model")
    pr.add_argument("--model", required=True, help="a .npz written by `symdiff mlp|lstm --save_model PATH`")
    pr.add_argument("titles", nargs="+", metavar="TITLE")
    pr.set_defaults(func=cmd_predict)
    from models.experiments import EXPERIMENTS, HELP
    from models.experiments import parse_int_list as _experiment_ints, parse_positive_int as _experiment_int

    ex = sub.add_parser("experiment", help=f"run the assignment's experiments ({', '.join(EXPERIMENTS)}) and write "
                                           "the report")
    ex.add_argument("which", choices=(*EXPERIMENTS, "report", "all"),
                    help="; ".join(f"{name}: {HELP[name]}" for name in EXPERIMENTS)
                         + "; report: docs/report.md from the results; all: everything")
    ex.add_argument("--dataset", default=None, help="path prefix or shipped name (default: ../shared/data/smaller "
                    "beside the checkout if it exists, else demo)")
    ex.add_argument("--epochs", type=_experiment_int, default=2, help="epochs per timing run (default 2)")
    ex.add_argument("--repeats", type=_experiment_int, default=3, help="timing repeats per setting (default 3)")
    ex.add_argument("--batch_sizes", type=_experiment_ints, default=(16, 32, 64), help="N sweep (default 16,32,64)")
    ex.add_argument("--max_lens", type=_experiment_ints, default=(10, 15, 20), help="M sweep (default 10,15,20)")
    ex.add_argument("--draws", type=_experiment_int, default=20000, help="samples per init setting (default 20000)")
    ex.add_argument("--seed", type=int, default=0)
    ex.add_argument("--out", default="docs/figures", help="folder for JSON, CSV and PNG (default docs/figures)")
    ex.add_argument("--report", default="docs/report.md", help="report path for report/all (default docs/report.md)")
    ex.set_defaults(func=cmd_experiment)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
