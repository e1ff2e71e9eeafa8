"""The command line as a new user meets it (issue #19): every flag checked in one line, checks
that check something, a closed pipe, predict/evaluate/plot, --version. Data rows are invented."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
TRAIN = ("Zorb_Fen\tPlace\nKl%C3%BCpfel_Moor\tPerson\nAlbo_Tusk\tWork\nQuill_%26_Sons\tOrganisation\n"
         "Ficus_quaxii\tSpecies\nVarn_River\tPlace\nOtto_Blemm\tPerson\nThe_Grey_Lantern\tWork\n")
VALID = "Nix_Varp\tPerson\nOrt_Ley\tPlace\nBlue_Oxen_Ltd\tOrganisation\n"
TEST = "Grob_Quen\tWork\nYelp_Dax\tPerson\nCarex_zembla\tSpecies\nHolm_Vik\tPlace\nTrix_Bo\tMineral\n"


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "200"}


def symdiff(cwd: Path, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cli", *args], cwd=cwd, env=env(), capture_output=True,
                          text=True, timeout=300, input=stdin)


def one_line(proc: subprocess.CompletedProcess[str], code: int, *words: str) -> str:
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny dataset and a model trained on it (2 epochs), with its metrics file."""
    d = tmp_path_factory.mktemp("trained")
    for split, text in (("train", TRAIN), ("valid", VALID), ("test", TEST)):
        (d / f"toy.{split}").write_text(text)
    proc = symdiff(d, "mlp", "--dataset", "toy", "--epochs", "2", "--max_len", "6", "--num_hid", "4",
                   "--output_file", "out.npy", "--save_model", "m.npz", "--metrics_file", "m.json")
    assert proc.returncode == 0, proc.stderr
    return d


# ---- 4, 5: every flag validated, a check of nothing fails ------------------------------------
@pytest.mark.subprocess
@pytest.mark.parametrize("args, flag", [
    (("gradcheck", "mlp", "--eps", "0"), "--eps"),
    (("gradcheck", "mlp", "--eps", "nan"), "--eps"),
    (("gradcheck", "mlp", "--seed", "-1"), "--seed"),
    (("gradcheck", "lstm", "--num_hid", "0"), "--num_hid"),
    (("gradcheck", "mlp", "--max_len", "0"), "--max_len"),
    (("gradcheck", "mlp", "--max_elements", "0"), "--max_elements"),
    (("gradcheck", "mlp", "--num_chars", "x"), "--num_chars"),
    (("experiment", "steps", "--seed", "-1"), "--seed"),
    (("predict", "--model", "m.npz", "--bogus"), "--bogus"),
    (("evaluate", "--model", "m.npz", "--dataset", "toy", "--split", "dev"), "--split"),
    (("nosuchcommand",), "nosuchcommand"),
])
def test_every_command_refuses_a_bad_flag_in_one_line(tmp_path: Path, args: tuple[str, ...], flag: str) -> None:
    one_line(symdiff(tmp_path, *args), 2, flag)


@pytest.mark.subprocess
def test_gradcheck_help_describes_every_flag_with_its_default(tmp_path: Path) -> None:
    out = symdiff(tmp_path, "gradcheck", "--help").stdout
    for flag in ("--max_len", "--num_chars", "--num_hid", "--num_labels", "--eps", "--max_elements", "--seed"):
        line = out[out.index(flag, out.index("options")):]
        assert "(default:" in line[:200], line[:200]


@pytest.mark.subprocess
def test_gradcheck_passes_and_checks_something(tmp_path: Path) -> None:
    proc = symdiff(tmp_path, "gradcheck", "mlp", "--max_elements", "3")
    assert proc.returncode == 0, proc.stderr
    assert " 3 " in proc.stdout


@pytest.mark.subprocess
def test_version(tmp_path: Path) -> None:
    import symdiff as engine

    proc = symdiff(tmp_path, "--version")
    assert proc.returncode == 0 and proc.stdout.strip() == f"symdiff {engine.__version__}"
    setup = (REPO / "setup.cfg").read_text()
    assert "version = attr: symdiff.__version__" in setup  # one place for the number


# ---- 6: a closed standard output ----------------------------------------------------------------
@pytest.mark.subprocess
def test_a_closed_stdout_never_stops_training(trained: Path, tmp_path: Path) -> None:
    for split in ("train", "valid", "test"):
        (tmp_path / f"toy.{split}").write_text((trained / f"toy.{split}").read_text())
    proc = subprocess.Popen([sys.executable, "-m", "cli", "mlp", "--dataset", "toy", "--epochs", "3",
                             "--max_len", "6", "--output_file", "o.npy", "--metrics_file", "m.json"],
                            cwd=tmp_path, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.readline()      # `| head -1`
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=300) == 0, err
    assert "Traceback" not in err and "BrokenPipe" not in err, err
    assert np.load(tmp_path / "o.npy").shape == (5, 5)
    assert len(json.loads((tmp_path / "m.json").read_text())["epochs"]) == 3


# ---- 9: predict -----------------------------------------------------------------------------
@pytest.mark.subprocess
def test_predict_writes_tsv_with_label_first_and_reports_what_it_could_not_read(trained: Path) -> None:
    labels = ["Organisation", "Person", "Place", "Species", "Work"]
    proc = symdiff(trained, "predict", "--model", "m.npz", "Zorb", "東京", "", "Abcdefghijkl")
    assert proc.returncode == 0, proc.stderr
    rows = [line.split("\t") for line in proc.stdout.splitlines()]
    assert rows[0] == ["title", "label", *labels]
    assert [r[0] for r in rows[1:]] == ["Zorb", "東京", "", "Abcdefghijkl"]
    for r in rows[1:]:
        probs = np.array(r[2:], dtype=float)
        assert r[1] == labels[int(probs.argmax())] and abs(probs.sum() - 1) < 1e-5
    err = proc.stderr
    assert "'東', '京' are not in the model's vocabulary" in err
    assert "title '' is empty" in err
    assert "only the first 6 of its 12 characters" in err
    assert "Zorb" not in err  # a title read in full draws no warning


@pytest.mark.subprocess
def test_predict_reads_titles_from_a_file_or_stdin(trained: Path) -> None:
    (trained / "titles.txt").write_text("Zorb_Fen\r\n\nOtto_Blemm\n")
    from_file = symdiff(trained, "predict", "--model", "m.npz", "--titles", "titles.txt")
    from_stdin = symdiff(trained, "predict", "--model", "m.npz", "--titles", "-", stdin="Zorb_Fen\nOtto_Blemm\n")
    from_args = symdiff(trained, "predict", "--model", "m.npz", "Zorb_Fen", "Otto_Blemm")
    assert from_file.returncode == from_stdin.returncode == 0, from_file.stderr + from_stdin.stderr
    assert from_file.stdout == from_stdin.stdout == from_args.stdout
    assert len(from_file.stdout.splitlines()) == 3
    one_line(symdiff(trained, "predict", "--model", "m.npz", "--titles", "nope.txt"), 2, "--titles", "nope.txt")
    one_line(symdiff(trained, "predict", "--model", "m.npz"), 2, "no titles")


# ---- 11: evaluate, plot ---------------------------------------------------------------------
@pytest.mark.subprocess
def test_evaluate_scores_a_saved_model_like_training_did(trained: Path) -> None:
    proc = symdiff(trained, "evaluate", "--model", "m.npz", "--dataset", "toy", "--metrics_file", "ev.json")
    assert proc.returncode == 0, proc.stderr
    ev = json.loads((trained / "ev.json").read_text())
    metrics = json.loads((trained / "m.json").read_text())
    assert ev["rows"] == 5 and ev["scored"] == 4   # 'Mineral' is not a label the model knows
    assert ev["unknown_labels"] == [{"line": 5, "label": "Mineral"}]
    assert ev["loss"] == pytest.approx(metrics["test_loss"], rel=1e-9)
    assert ev["accuracy"] == pytest.approx(metrics["test_accuracy"])
    confusion = np.array(ev["confusion"])
    assert confusion.shape == (5, 5) and confusion.sum() == 4
    assert np.trace(confusion) / 4 == pytest.approx(ev["accuracy"])
    assert "Mineral" in proc.stdout and "confusion" in proc.stdout


@pytest.mark.subprocess
def test_evaluate_bad_inputs_are_one_line(trained: Path) -> None:
    one_line(symdiff(trained, "evaluate", "--model", "nope.npz", "--dataset", "toy"), 2, "nope.npz")
    one_line(symdiff(trained, "evaluate", "--model", "m.npz", "--dataset", "nothere"), 2, "nothere")


@pytest.mark.subprocess
def test_plot_draws_several_runs(trained: Path) -> None:
    pytest.importorskip("matplotlib")
    proc = symdiff(trained, "plot", "m.json", "m.json", "--out", "curves.png")
    assert proc.returncode == 0, proc.stderr
    assert (trained / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (trained / "bad.json").write_text("{}")
    one_line(symdiff(trained, "plot", "bad.json"), 2, "bad.json")


@pytest.mark.subprocess
def test_plot_without_matplotlib_is_one_line_naming_the_extra(trained: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "block"
    blocker.mkdir()
    (blocker / "matplotlib.py").write_text("raise ImportError('matplotlib is blocked by this test')\n")
    proc = subprocess.run([sys.executable, "-m", "cli", "plot", "m.json", "--out", str(tmp_path / "c.png")],
                          cwd=trained, env={**env(), "PYTHONPATH": f"{blocker}{os.pathsep}{REPO}"},
                          capture_output=True, text=True, timeout=300)
    one_line(proc, 1, "matplotlib", "symdiff[plots]")
    assert not (tmp_path / "c.png").exists()


# ---- 10: small untruths ---------------------------------------------------------------------
@pytest.mark.subprocess
def test_momentum_with_an_optimizer_that_ignores_it_is_refused(tmp_path: Path) -> None:
    proc = symdiff(tmp_path, "mlp", "--optimizer", "adam", "--momentum", "0.5", "--output_file", "o.npy")
    one_line(proc, 2, "--momentum", "adam", "nesterov")
    assert not (tmp_path / "o.npy").exists()


@pytest.mark.subprocess
def test_metrics_config_records_no_momentum_for_plain_sgd(trained: Path) -> None:
    config = json.loads((trained / "m.json").read_text())["config"]
    assert config["optimizer"] == "sgd" and config["momentum"] is None


@pytest.mark.subprocess
def test_ops_fused_names_the_kernel_results_by_the_models_registers(tmp_path: Path) -> None:
    proc = symdiff(tmp_path, "ops", "--fused", "lstm")
    assert proc.returncode == 0, proc.stderr
    text = " ".join(proc.stdout.split())  # rich wraps long lines
    import re

    assert re.search(r"in the step computing c1, h1\b[^:]*: in0 = \S+, .*?\br\d+ = c1, r\d+ = h1\b", text), text[:3000]
    assert "in the step computing O: in0 = " in text and "r1 = O" in text


@pytest.mark.subprocess
@pytest.mark.parametrize("flag, example", [("--metrics_file", "metrics.json"), ("--save_model", "model.npz"),
                                           ("--output_file", "out.npy")])
def test_a_directory_given_for_a_file_suggests_a_name_of_the_right_kind(tmp_path: Path, flag: str,
                                                                        example: str) -> None:
    (tmp_path / "runs").mkdir()
    line = one_line(symdiff(tmp_path, "mlp", flag, "runs"), 2, flag, "is a directory")
    assert line.rstrip().endswith(str(Path("runs") / example)), line
