"""The ``symdiff`` command line: argument parsing and rich presentation only, no math.

Heavy modules (SymPy, the engine, the models) are imported inside the command
that needs them, so ``symdiff --help`` answers at once.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Sequence

from models.flags import add_train_arguments, add_tune_arguments, one_line_errors, positive_float, positive_int, seed_int
from models.loader import SHIPPED


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

    def error(self, text: str) -> None:
        from rich.markup import escape

        self.console.print(f"[bold red]error:[/] {escape(text)}", highlight=False, soft_wrap=True)  # one line

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
        if kind == "train":  # symdiff train MODEL: a shipped name or a model file's path
            kind = params.pop("model")
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
    except KeyboardInterrupt as exc:  # a second Ctrl-C or SIGTERM (the first stops training cleanly), or start-up
        from models.training import EXIT_INTERRUPTED, EXIT_TERMINATED, Terminated, stop_at_once_message

        return _fail(f"symdiff {args.command}", stop_at_once_message(exc),
                     code=EXIT_TERMINATED if isinstance(exc, Terminated) else EXIT_INTERRUPTED)


def cmd_gradcheck(args: argparse.Namespace) -> int:
    import numpy as np
    from rich.table import Table

    from models.training import build_model
    from symdiff import SymdiffError, grad_check

    dims = dict(max_len=args.max_len, num_chars=args.num_chars, num_hid=args.num_hid, num_labels=args.num_labels)
    model = build_model(args.model, dims, seed=args.seed, dtype=np.float64)
    xm = model.xm
    rng = np.random.default_rng(args.seed)  # a batch of 4 random titles, fed as training feeds them
    codes = rng.integers(-1, args.num_chars, size=(4, args.max_len))
    inputs = {**model.params, **model.feed(codes, dense=True),
              "y": np.eye(args.num_labels)[rng.integers(0, args.num_labels, 4)]}
    try:
        report = grad_check(xm, xm.operationSequence(xm.register("loss")), inputs=inputs, eps=args.eps,
                            max_elements=args.max_elements)
    except SymdiffError as exc:
        return _fail("symdiff gradcheck", str(exc))
    if not report.params or not all(p.checked for p in report.params):  # a check of nothing is no pass
        return _fail("symdiff gradcheck", "no element of some param was checked; raise --max_elements", code=1)
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
    _print_vocabulary()
    if args.order:
        _print_orders(args.order)
    if args.accuracy:
        _print_accuracy()
    if args.wengert:
        from models.training import build_model

        model = build_model(args.wengert, dict(max_len=3, num_chars=5, num_hid=4, num_labels=3), seed=0)
        print(model.xm.operationSequence(model.xm.register("loss")))
    if args.fused:
        _print_fused(args.fused)
    return 0


def _print_vocabulary() -> None:
    """Ops with static arguments (one op per set of arguments, made when the graph is built) and numbers."""
    from rich.markup import escape
    from rich.table import Table

    from symdiff.array_ops import SIGNATURES
    from symdiff.scalar_ops import KINDS

    table = Table(title="ops with static arguments (checked when the graph is built; NumPy semantics)")
    for col in ("call", "gradient"):
        table.add_column(col)
    for family, call in SIGNATURES.items():
        table.add_row(escape(call), escape(_FAMILY_GRADIENTS[family]))
    _console().print(table)
    numbers = Table(title="numbers with registers (the number is a constant folded into an elementwise op)")
    for col in ("written", "op made"):
        numbers.add_column(col)
    for kind, (prefix, _, written) in KINDS.items():
        numbers.add_row(written, f"{prefix}_<c>, e.g. {prefix}_2")
    _console().print(numbers)


_FAMILY_GRADIENTS = {
    "sum": "delta broadcast back over the summed axes",
    "mean": "delta / count, broadcast back over the averaged axes",
    "max": "delta to the maxima; tied maxima share it equally",
    "logsumexp": "delta * softmax(x) over the axes",
    "log_softmax": "delta - softmax(x) * sum(delta, axis)",
    "where": "delta where mask to a, elsewhere to b (summed to their shapes); none to the mask",
    "softMax": "out * (delta - sum(delta * out, axis))",
    "reshape": "delta reshaped to x's shape", "transpose": "delta transposed back (inverse permutation)",
    "concat": "each part gets its slice of delta", "stack": "each part gets delta taken at its index",
    "getitem": "delta scatter-added into zeros of x's shape (repeated indices add up)",
}
def _print_orders(order: int) -> None:
    """Each elementwise op's derivatives up to ``order``, as SymPy derived and symdiff stabilised them."""
    from rich.table import Table

    from symdiff.derivative_ops import derivative_table

    table = Table(title=f"elementwise derivatives to order {order} (each one an op, derived again for the next order)",
                  show_lines=True)
    for col in ("op", "derivative", "expression"):
        table.add_column(col)
    for name, lines in derivative_table(order):
        table.add_row(name, "\n".join(d for d, _ in lines), "\n".join(e for _, e in lines))
    _console().print(table)


def _print_accuracy() -> None:
    """Per declared op and derivative: bits of error as written and as run, and the form chosen."""
    from rich.markup import escape
    from rich.table import Table

    from symdiff import OPS
    from symdiff.measure import measure_op

    console = _console()
    reports = []
    with console.status("measuring every declared op against mpmath ...") as status:
        for name, op in OPS.items():
            if op.symbolic is not None:
                status.update(f"measuring {escape(name)} against mpmath ...")
                reports.append(measure_op(op))
    table = Table(title="accuracy against mpmath: mean bits of error (Herbie's measure; 0 = correctly rounded), "
                        "worst relative error where the truth is a normal double, failures (NaN/inf/0 where the "
                        "truth is finite and nonzero)", show_lines=True)
    for col in ("op", "expression as run", "form chosen", "as written", "numpy kernel", "compiled kernel"):
        table.add_column(col)

    def cell(e: Any) -> str:
        if e is None:
            return "[dim]-[/]"
        colour = "green" if e.ok() else "red"
        fails = f", [red]{e.failures} failed[/]" if e.failures else ""
        return f"[{colour}]{e.mean_bits:.2f} bits[/] (max {e.max_bits:.0f}), rel {e.worst_rel:.1e}{fails}"

    statuses = set()
    for rep in reports:
        statuses.add(rep.compiled_status)
        for row in rep.rows:
            table.add_row(escape(rep.name) if row.what == "forward" else "", escape(f"{row.what}: {row.run}"),
                          escape(row.chosen or "-"), cell(row.as_written), cell(row.numpy), cell(row.compiled))
    console.print(table)
    points = reports[0].rows[0].numpy.points if reports else 0
    console.print(f"[dim]about {points} points per op (log-uniform over all doubles and over moderate values, "
                  f"zeros, points near cancellations; other points than the declaration chose on; ops with special "
                  f"functions: |x| <= 64, fewer points, a time budget per truth); form 'given': a derivative op of "
                  f"a gradient graph (with --order N, each order's op is listed), whose forward is its op's chosen "
                  f"derivative and whose own derivative was chosen by measurement; compiled kernels: "
                  f"{escape('; '.join(sorted(statuses)))}[/]", highlight=False)


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
        kernel = MULTI_OPS[name]
        fwd, bwd = kernel.display()
        users = [s for s in program.steps if s.op == name]
        console.print(f"\n[bold]{escape(name)}[/]  (in_j: inputs, rK: results, deltaK: gradient arriving at result K)"
                      f"\n  runs as: {escape(kernel.runs_as())}", highlight=False)
        # the kernel's own names, in the model's registers: the first step that runs it
        where = f"in the step computing {', '.join(users[0].outputs)}"
        if len(users) > 1:
            where += f" (the same kernel runs {len(users)} steps; the others bind their own registers alike)"
        inner_inputs = getattr(kernel, "inner_inputs", None)  # its gate cuts folded in (the fold_cuts pass)
        legend = [f"in{j} = {i}" for j, i in
                  enumerate(users[0].inputs if inner_inputs is None else inner_inputs(users[0].inputs))]
        legend += [f"r{r} = {o}" for r, o in zip(kernel.results, users[0].outputs)]
        console.print(f"  {where}: {', '.join(legend)}", highlight=False, markup=False)
        console.print("\n".join(["  " + line for line in fwd + bwd]), highlight=False, markup=False)


def cmd_predict(args: argparse.Namespace) -> int:
    from models.inference import TitlesFileError, predict, read_titles, tsv_lines
    from models.training import ModelFileError, load_model

    titles = list(args.titles)
    try:
        if args.titles_file is not None:
            titles += read_titles(args.titles_file)
        if not titles:
            return _fail("symdiff predict", "no titles: give them as arguments, or --titles FILE "
                         "(one a line; - reads standard input)")
        model, vocab = load_model(args.model, args.model_file)
    except (ModelFileError, TitlesFileError) as exc:
        return _fail("symdiff predict", str(exc))
    predictions = predict(model, vocab, titles)
    for p in predictions:  # what the model could not read is never silent
        for note in p.warnings():
            print(f"symdiff predict: warning: {note}", file=sys.stderr)
    if not sys.stdout.isatty():  # a pipe or a file: TSV with a header, for other programs
        sys.stdout.write("".join(line + "\n" for line in tsv_lines(predictions, vocab.labels)))
        return 0
    from rich.table import Table
    from rich.text import Text  # titles and labels are data, never rich markup ("[/]" would crash)

    table = Table(title=f"predictions ({model.kind})")
    table.add_column("title")
    table.add_column("label")
    for label in vocab.labels:
        table.add_column(Text(label), justify="right")
    for p in predictions:
        best = vocab.labels.index(p.label)
        table.add_row(Text(p.title), Text(p.label, style="bold"),
                      *[Text(f"{x:.3f}", style="bold" if j == best else "") for j, x in enumerate(p.probs)])
    _console().print(table)
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Loss, accuracy and confusion matrix of a saved model on a labelled file."""
    from models.data import DataError
    from models.inference import score
    from models.storage import OutputPathError, OutputWriteError, check_output_path, save_json
    from models.training import ModelFileError, load_model

    try:
        metrics_path = check_output_path(args.metrics_file, "--metrics_file") if args.metrics_file else None
        model, vocab = load_model(args.model, args.model_file)
        result = score(model, vocab, args.dataset, args.split)
    except (ModelFileError, DataError, OutputPathError) as exc:
        return _fail("symdiff evaluate", str(exc))
    from rich.table import Table
    from rich.text import Text

    console = _console()
    for lineno, label in result.unknown_labels[:5]:
        console.print(Text(f"warning: {result.path}:{lineno}: label {label!r} is not one the model was "
                           f"trained on; the row is left out of the scores", style="yellow"))
    if len(result.unknown_labels) > 5:
        console.print(Text(f"warning: ... {len(result.unknown_labels) - 5} more rows with unknown labels",
                           style="yellow"))
    summary = Table(title=Text(f"{model.kind} on {result.path}"))
    summary.add_column("")
    summary.add_column("value", justify="right")
    summary.add_row("rows", str(result.rows))
    summary.add_row("rows scored", str(result.scored))
    summary.add_row("loss", "-" if result.loss is None else f"{result.loss:.4f}")
    summary.add_row("accuracy", "-" if result.accuracy is None else f"{result.accuracy:.4f}")
    console.print(summary)
    confusion = Table(title="confusion (rows: true label, columns: predicted)")
    confusion.add_column("true \\ predicted")
    for label in result.labels:
        confusion.add_column(Text(label), justify="right")
    for i, (label, row) in enumerate(zip(result.labels, result.confusion)):
        confusion.add_row(Text(label), *[Text(str(n), style="bold" if i == j else "") for j, n in enumerate(row)])
    console.print(confusion)
    if metrics_path is not None:
        try:
            save_json(metrics_path, result.as_json(args.model, model.kind))
        except OutputWriteError as exc:  # the scores are shown above; only the file is lost
            return _fail("symdiff evaluate", f"metrics (--metrics_file) not written: {exc}", code=1)
        console.print(Text(f"metrics written to {metrics_path}"))
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    """Training curves of one or more --metrics_file runs, on one figure."""
    from models.curves import CurvesError, load_run, plot_runs
    from models.storage import OutputPathError, OutputWriteError, check_output_path

    try:
        out = check_output_path(args.out, "--out")
        runs = [load_run(path) for path in args.metrics]
        plot_runs(runs, out)
    except CurvesError as exc:
        return _fail("symdiff plot", str(exc), code=1 if "matplotlib" in str(exc) else 2)
    except OutputPathError as exc:
        return _fail("symdiff plot", str(exc))
    except OutputWriteError as exc:
        return _fail("symdiff plot", f"figure (--out) not written: {exc}", code=1)
    print(f"curves of {len(runs)} run(s) written to {out}")
    return 0


def cmd_experiment(args: argparse.Namespace) -> int:
    from pathlib import Path

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
    failed: list[str] = []  # one line per file not written; every other file is still written
    try:
        if args.which != "report":
            X.output_dir(args.out)  # a bad --out is said before minutes of measuring, not after
        for name in names:
            if name == "report":
                try:
                    path, notes = X.write_report(args.out, args.report)
                except X.OutputsNotWritten as exc:
                    failed += exc.lines
                    report = Path(args.report)
                    path, notes = (report if report in exc.written else None), []
                for note in notes:
                    console.print(note, style="yellow", markup=False, highlight=False)
                if path is not None:
                    console.print(f"report written to {path}", markup=False, highlight=False)
                continue
            data = X.run(name, dataset=args.dataset, epochs=args.epochs, repeats=args.repeats, seed=args.seed,
                         batch_sizes=args.batch_sizes, max_lens=args.max_lens, draws=args.draws, progress=bar)
            try:
                files = X.save(name, data, args.out)
            except X.OutputsNotWritten as exc:
                files, failed = exc.written, failed + exc.lines
            title, cols, rows = X.summary_table(name, data)
            table = Table(title=Text(title))  # text from data, never rich markup
            for k, col in enumerate(cols):
                table.add_column(Text(col), justify="left" if k < 2 else "right")
            for row in rows:
                table.add_row(*map(Text, row))
            console.print(table)
            for warning in data.get("warnings", []):
                console.print(f"warning: {warning}", style="yellow", markup=False, highlight=False)
            try:
                plots = X.save_plots(name, data, args.out)
            except X.OutputsNotWritten as exc:
                plots, failed = exc.written, failed + exc.lines
            if files:
                console.print(f"{name}: data written to {', '.join(str(p) for p in files)} "
                              f"({data['meta']['wall_seconds']:.1f} s)", markup=False, highlight=False)
            if plots is None:
                console.print(f"{name}: plots skipped, matplotlib is not installed; to get them run "
                              f"{X.PLOTS_HINT} and then `symdiff experiment report --out {args.out}`",
                              markup=False, highlight=False)
            elif plots:
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
        for line in failed:  # also when a later step stopped the run: these files were not written
            print(f"symdiff experiment: error: {line}", file=sys.stderr)
    return 1 if failed else 0


def cmd_tune(args: argparse.Namespace) -> int:
    from rich.live import Live
    from rich.markup import escape
    from rich.table import Table
    from rich.text import Text

    from models import tune as TU

    prog = "symdiff tune"
    console = _console()
    spec = TU.TuneSpec(kind=args.model, storage=TU.StorageSpec(args.storage or str(TU.DEFAULT_JOURNAL),
                                                               heartbeat=args.heartbeat),
                       study=args.study or args.model, dataset=args.dataset, epochs=args.epochs,
                       trials=args.trials, workers=args.workers, seed=args.seed, timeout=args.timeout,
                       checkpoints=args.checkpoints or str(TU.DEFAULT_CHECKPOINTS), pruner=args.pruner)
    try:
        TU.require_optuna()
        if args.show:
            return _show_study(console, spec, Path(args.out))
        from models.data import DataError, load_dataset, resolve_dataset

        try:  # a bad dataset is one line now, not one failure per worker
            load_dataset(resolve_dataset(args.dataset))
        except DataError as exc:
            return _fail(prog, str(exc))
        if args.storage is None:
            TU.DEFAULT_JOURNAL.parent.mkdir(exist_ok=True)

        def view(snap: Any) -> Table:
            table = Table(title=Text(f"study {spec.study} ({spec.kind}) in {spec.storage.shown()}"), show_header=False)
            table.add_column("")
            table.add_column("", justify="right")
            for state in ("complete", "pruned", "fail", "running", "waiting"):
                table.add_row(state, str(snap.counts.get(state, 0)))
            table.add_row("workers alive", str(snap.workers_alive))
            if snap.best_value is not None:
                table.add_row("best valid loss", f"{snap.best_value:.4f} (trial {snap.best_number})")
                table.add_row("best params", Text(", ".join(f"{k}={_fmt(v)}" for k, v in snap.best_params.items())))
            return table

        last: list[Any] = []
        with Live(console=console, auto_refresh=False, transient=False) as live:
            def update(snap: Any) -> None:
                if console.is_terminal:
                    live.update(view(snap), refresh=True)
                elif not last or snap.counts != last[0].counts:
                    console.print(", ".join(f"{k} {v}" for k, v in sorted(snap.counts.items())), highlight=False)
                last[:] = [snap]

            code, final, warnings = TU.run_study(spec, update)
        if not console.is_terminal:
            console.print(view(final))
        for w in warnings:
            console.print(f"[bold yellow]warning:[/] {escape(w)}", highlight=False)
        if final.best_value is not None:
            console.print("train with the best parameters:", style="bold")
            console.print(TU.train_command(spec.kind, spec.dataset, spec.epochs, final.best_params),
                          markup=False, highlight=False, soft_wrap=True)
        if code:
            console.print(f"[bold yellow]stopped by {'SIGTERM' if code == 143 else 'Ctrl-C'}[/]: workers ended "
                          f"their trials (exit code {code})")
        return code
    except TU.TuneError as exc:
        return _fail(prog, str(exc))


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _show_study(console: Any, spec: Any, out: Path) -> int:
    from rich.table import Table
    from rich.text import Text

    from models import tune as TU

    study = TU.open_study(spec, create=False)
    rows = TU.trial_rows(study)
    if not console.is_terminal:  # a log or a pipe: wide enough for every column
        from rich.console import Console

        console = Console(width=220)
    keys = list(TU.SEARCH_SPACES[spec.kind])
    table = Table(title=Text(f"study {spec.study} ({study.user_attrs.get('model', '?')}, "
                             f"{study.user_attrs.get('dataset', '?')}) in {spec.storage.shown()}"))
    for col in ("#", "state", "valid loss", "epochs", "s", "pid", *keys, "note"):
        table.add_column(col, justify="left" if col in ("state", "note", "optimizer", "schedule") else "right")
    for r in rows:
        table.add_row(str(r["number"]), r["state"], "" if r["value"] is None else f"{r['value']:.4f}",
                      str(r["epochs"]), "" if r["seconds"] is None else f"{r['seconds']:.1f}", str(r["pid"] or ""),
                      *[_fmt(r["params"].get(k, "")) for k in keys], Text(r["note"]))
    console.print(table)
    done = [r for r in rows if r["state"] == "complete"]
    if done:
        best = min(done, key=lambda r: r["value"])
        console.print(f"best: trial {best['number']}, valid loss {best['value']:.4f}; train with:", style="bold")
        console.print(TU.train_command(spec.kind, study.user_attrs.get("dataset", spec.dataset),
                                       study.user_attrs.get("epochs", spec.epochs), best["params"]),
                      markup=False, highlight=False, soft_wrap=True)
    written, notes, failures = TU.write_figures(study, out)
    for note in notes:
        console.print(note, style="yellow", markup=False, highlight=False)
    if written:
        console.print("figures: " + ", ".join(str(p) for p in written), markup=False, highlight=False)
    for line in failures:
        _console(stderr=True).print(f"error: {line}", style="red", markup=False, highlight=False, soft_wrap=True)
    return 1 if failures else 0


# ---- parsing --------------------------------------------------------------------------------
def _version() -> str:
    import symdiff

    return f"symdiff {symdiff.__version__}"


MAX_ORDER = 6  # SymPy's expressions grow with the order; beyond this the table is not worth reading


def _order(text: str) -> int:
    """``--order``: a whole number from 1 to MAX_ORDER (an argparse ``type=``)."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--order must be a whole number from 1 to {MAX_ORDER}, got {text!r}") from None
    if not 1 <= n <= MAX_ORDER:
        raise argparse.ArgumentTypeError(f"--order must be a whole number from 1 to {MAX_ORDER}, got {n}")
    return n


def build_parser() -> argparse.ArgumentParser:
    p = one_line_errors(argparse.ArgumentParser(prog="symdiff", description=(
        "Reverse-mode autodiff over Wengert lists, every elementwise op declared once in SymPy; "
        "trains character-level entity classifiers (MLP, LSTM, GRU, BiLSTM, attention, or your own model file).")))
    p.add_argument("--version", action="version", version=_version())
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, defaults_in_help: bool = True, **kwargs: Any) -> argparse.ArgumentParser:
        """A subcommand whose bad flags are one line and exit code 2, like `symdiff mlp`'s."""
        if defaults_in_help:
            kwargs["formatter_class"] = argparse.ArgumentDefaultsHelpFormatter
        return one_line_errors(sub.add_parser(name, **kwargs))

    for kind in ("mlp", "lstm"):
        t = sub.add_parser(kind, help=f"train the {kind.upper()} classifier (the seed's flags)")
        add_train_arguments(t, kind)
        t.set_defaults(func=cmd_train)
    t = sub.add_parser("train", help="train a shipped model by name or your own model file (build(dims, hp) -> XMan)",
                       description="Train MODEL: a shipped model (" + ", ".join(SHIPPED) + ") or the path of a "
                       "Python file defining build(dims, hp) -> XMan (README: 'Your own model'). A model file is "
                       "code: it runs with your rights, like any training script.")
    t.add_argument("model", metavar="MODEL", help=f"{', '.join(SHIPPED)}, or path/to/model.py")
    add_train_arguments(t, None)
    t.set_defaults(func=cmd_train)
    g = command("gradcheck", help="check a model's gradients against central differences",
                description="Compare a small model's backprop gradients with central differences "
                            "(L(w+eps) - L(w-eps)) / 2eps, per parameter; exit code 1 if any disagrees.")
    g.add_argument("model", choices=SHIPPED, help="which shipped model to build")
    g.add_argument("--max_len", type=positive_int, default=4, help="characters per title")
    g.add_argument("--num_chars", type=positive_int, default=12, help="input characters (one-hot width)")
    g.add_argument("--num_hid", type=positive_int, default=6, help="hidden units")
    g.add_argument("--num_labels", type=positive_int, default=5, help="classes")
    g.add_argument("--eps", type=positive_float, default=1e-4, help="central-difference step")
    g.add_argument("--max_elements", type=positive_int, default=64,
                   help="elements perturbed per param (chosen at random by --seed)")
    g.add_argument("--seed", type=seed_int, default=0, help="seed for the parameters, inputs and chosen elements")
    g.set_defaults(func=cmd_gradcheck)
    o = command("ops", defaults_in_help=False, help="list every primitive with its SymPy expression and generated derivatives")
    o.add_argument("--accuracy", action="store_true",
                   help="also measure every declared op and derivative against mpmath: bits of error as written "
                        "and as run (numpy and compiled kernels), and the form chosen (takes a few seconds); "
                        "with --order N also the derivative ops of every order up to N")
    o.add_argument("--wengert", choices=SHIPPED, help="also print a small model's Wengert list")
    o.add_argument("--fused", choices=SHIPPED,
                   help="also print a small model's step list after the graph rewrites and its fused kernels")
    o.add_argument("--order", type=_order, default=0, metavar="N",
                   help=f"also print each elementwise op's derivatives up to order N (1-{MAX_ORDER})")
    o.set_defaults(func=cmd_ops)
    pr = command("predict", help="classify titles with a model saved by --save_model",
                 description="Print each title's predicted label and class probabilities: a table on a "
                             "terminal, TSV with a header row (title, label, one column per class in sorted "
                             "label order) otherwise. Characters the model does not know and titles longer "
                             "than its max_len get a warning line on stderr.")
    pr.add_argument("--model", required=True, help="a .npz written by `symdiff train|mlp|lstm --save_model PATH`")
    pr.add_argument("--model_file", default=None, metavar="MODEL.py",
                    help="for a model trained from your own file: that file again (a saved model names it, "
                         "but never runs a path or code stored in it)")
    pr.add_argument("--titles", dest="titles_file", metavar="FILE", default=None,
                    help="also read titles from FILE, one a line (-: standard input)")
    pr.add_argument("titles", nargs="*", metavar="TITLE", help="titles, as the data files write them")
    pr.set_defaults(func=cmd_predict)
    ev = command("evaluate", help="score a saved model on a labelled file: loss, accuracy, confusion matrix",
                 description="Loss, accuracy and confusion matrix of a model saved by --save_model on "
                             "<dataset>.<split> (Title<TAB>Label lines, as for training).")
    ev.add_argument("--model", required=True, help="a .npz written by `symdiff train|mlp|lstm --save_model PATH`")
    ev.add_argument("--model_file", default=None, metavar="MODEL.py",
                    help="for a model trained from your own file: that file again")
    ev.add_argument("--dataset", required=True, help="path prefix or shipped name (e.g. demo)")
    ev.add_argument("--split", choices=("test", "valid", "train"), default="test", help="which file to score")
    ev.add_argument("--metrics_file", default=None, help="also write the scores and the matrix as JSON here")
    ev.set_defaults(func=cmd_evaluate)
    pl = command("plot", help="draw training curves from --metrics_file JSON (needs the plots extra)",
                 description="Train and valid loss and valid accuracy per epoch of one or more runs "
                             "(files written by `symdiff mlp|lstm --metrics_file`), on one figure.")
    pl.add_argument("metrics", nargs="+", metavar="METRICS.json", help="metrics files, one run each")
    pl.add_argument("--out", default="curves.png", help="image to write (format from its suffix)")
    pl.set_defaults(func=cmd_plot)
    tu = sub.add_parser("tune", help="search hyperparameters with Optuna (needs symdiff[tune]); "
                                     "several processes or machines can share one study")
    add_tune_arguments(tu)
    tu.set_defaults(func=cmd_tune)
    from models.experiments import EXPERIMENTS, HELP
    from models.experiments import parse_int_list as _experiment_ints, parse_positive_int as _experiment_int

    ex = command("experiment", defaults_in_help=False,
                 help=f"run the assignment's experiments ({', '.join(EXPERIMENTS)}) and write the report")
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
    ex.add_argument("--seed", type=seed_int, default=0, help="seed for parameters and shuffling (default 0)")
    ex.add_argument("--out", default="docs/figures", help="folder for JSON, CSV and PNG (default docs/figures)")
    ex.add_argument("--report", default="docs/report.md", help="report path for report/all (default docs/report.md)")
    ex.set_defaults(func=cmd_experiment)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except BrokenPipeError:  # the reader of our output went away (`| head`): nothing more to say
        from models.training import quiet_closed_stream

        quiet_closed_stream(sys.stdout)
        return 0


if __name__ == "__main__":
    sys.exit(main())
