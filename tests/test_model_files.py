"""``symdiff train MODEL``: model files (``build(dims, hp) -> XMan``), the shipped ones written the same
way, their errors (exit 2, one line naming the file, before training), saving and predicting, and the
three new architectures (gradients, the attention's pooling, public API only, the engine's rewrites).
"""
from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import numpy as np
import pytest

import cli
from models import loader
from models.training import build_model, load_model

REPO = Path(__file__).resolve().parents[1]
NEW = ("gru", "bilstm", "attention", "lstm_max")
SMALL = ["--epochs", "1", "--num_hid", "6", "--max_len", "6"]

# A small model file in the documented form (the README shows a longer one, checked below).
TINY = '''
import numpy as np
from symdiff import XMan, f
from symdiff.init import glorot

PRESETS = {"best": {"num_hid": 5, "optimizer": "adam", "init_lr": 0.01}}

def build(dims, hp):
    M, V, C, H = dims["max_len"], dims["num_chars"], dims["num_labels"], hp["num_hid"]
    rng = np.random.default_rng(hp["seed"])
    xm = XMan()
    xm.X = f.input(name="X")
    xm.y = f.input(name="y")
    xm.W1 = f.param(name="W1", default=glorot(rng, M * V, H, hp["dtype"]))
    xm.W2 = f.param(name="W2", default=glorot(rng, H, C, hp["dtype"]))
    xm.outputs = f.softMax(f.tanh(xm.X * xm.W1) * xm.W2)
    xm.loss = f.mean(f.crossEnt(xm.outputs, xm.y))
    return xm.setup()
'''


def run(tmp_path: Path, capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """``symdiff ARGV`` in-process, in ``tmp_path``: (exit code, stdout, stderr)."""
    import os

    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        code = cli.main(list(argv))
    finally:
        os.chdir(cwd)
    out, err = capsys.readouterr()
    return code, out, err


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# ---- the command and the shipped files --------------------------------------------------------
def test_train_mlp_is_symdiff_mlp(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Same flags, same defaults, same numbers: `symdiff mlp` is the mlp model file trained by name."""
    a = run(tmp_path, capsys, "mlp", *SMALL, "--metrics_file", "a.json", "--output_file", "a.npy")
    b = run(tmp_path, capsys, "train", "mlp", *SMALL, "--metrics_file", "b.json", "--output_file", "b.npy")
    assert a[0] == b[0] == 0, a[2] + b[2]
    ma, mb = (json.loads((tmp_path / n).read_text()) for n in ("a.json", "b.json"))
    assert ma["config"] == mb["config"] and ma["config"]["init_lr"] == 0.05
    assert ma["test_loss"] == mb["test_loss"] and ma["epochs"][0]["valid_loss"] == mb["epochs"][0]["valid_loss"]
    assert np.array_equal(np.load(tmp_path / "a.npy"), np.load(tmp_path / "b.npy"))


def test_train_has_every_flag_of_mlp_and_lstm_with_their_defaults() -> None:
    parser = cli.build_parser()
    train = vars(parser.parse_args(["train", "x.py"]))
    for kind, lr in (("mlp", 0.05), ("lstm", 0.5)):
        own = vars(parser.parse_args([kind]))
        assert set(own) - {"command"} == set(train) - {"command", "model"}
        assert {k: v for k, v in own.items() if k not in ("command", "init_lr")} == \
            {k: v for k, v in train.items() if k not in ("command", "init_lr", "model")}
        assert own["init_lr"] == lr and train["init_lr"] is None  # None: the model's default, decided on load


def test_shipped_models_are_model_files_using_only_the_public_api() -> None:
    """Every shipped model's module-level imports are numpy, typing and symdiff's public names."""
    public = {"symdiff", "symdiff.init", "symdiff.nn", "symdiff.optim"}
    for name in loader.SHIPPED:
        tree = ast.parse((REPO / "models" / f"{name}.py").read_text())
        body = [n for n in tree.body if not (isinstance(n, ast.If) and "__main__" in ast.unparse(n.test))]
        for node in ast.walk(ast.Module(body=body, type_ignores=[])):
            if isinstance(node, ast.ImportFrom):
                assert node.level == 0 and (node.module in public or node.module in ("__future__", "typing")), \
                    f"models/{name}.py imports from {'.' * node.level}{node.module}"
                if node.module in public:
                    import symdiff  # a private name (leading _) is no public API

                    assert not any(a.name.startswith("_") for a in node.names), name
            elif isinstance(node, ast.Import):
                assert all(a.name in ("numpy",) for a in node.names), f"models/{name}.py imports {node.names[0].name}"
        assert callable(loader.load_source(name).build)


@pytest.mark.parametrize("kind", NEW)
def test_new_models_gradients_match_central_differences(kind: str) -> None:
    from symdiff import grad_check

    dims = dict(max_len=4, num_chars=6, num_hid=5, num_labels=3)
    model = build_model(kind, dims, seed=1, dtype=np.float64)
    rng = np.random.default_rng(0)
    codes = rng.integers(-1, 6, size=(5, 4))
    inputs = {**model.params, **model.feed(codes, dense=True), "y": np.eye(3)[rng.integers(0, 3, 5)]}
    xm = model.xm
    report = grad_check(xm, xm.operationSequence(xm.register("loss")), inputs=inputs, max_elements=40)
    assert report.params and all(p.checked for p in report.params)
    assert report.ok, [(p.name, p.max_rel) for p in report.params if not p.ok]


def test_attention_pools_states_by_softmax_of_query_times_states() -> None:
    """Per title, alpha = softMax(q·Hᵀ) over its steps and pooled = alpha·H, as the docstring says."""
    from symdiff import Autograd

    dims = dict(max_len=5, num_chars=7, num_hid=4, num_labels=3)
    model = build_model("attention", dims, seed=2, dtype=np.float64)
    codes = np.random.default_rng(3).integers(-1, 7, size=(6, 5))
    xm = model.xm
    values = Autograd(xm).eval(xm.operationSequence(xm.register("loss")),
                               {**model.params, **model.feed(codes), "y": np.eye(3)[np.arange(6) % 3]})
    H = np.stack([values[f"h{t + 1}"] for t in range(5)], axis=1)       # N x M x h
    q = model.params["q"][:, 0]
    scores = H @ q
    alpha = np.exp(scores - scores.max(axis=1, keepdims=True))
    alpha /= alpha.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(values["alpha"], alpha, rtol=1e-12)
    np.testing.assert_allclose(values["pooled"], np.einsum("nm,nmh->nh", alpha, H), rtol=1e-12)


def test_lstm_max_pools_each_units_maximum_and_padding_changes_nothing() -> None:
    """pooled is each unit's maximum over the states; more padding after the titles (a longer
    max_len, same parameters) leaves the pooling and the outputs as they were."""
    from symdiff import Autograd

    rng = np.random.default_rng(4)
    codes = rng.integers(0, 7, size=(6, 5))
    codes[np.arange(5)[None, :] >= rng.integers(0, 5, size=6)[:, None]] = -1  # lengths 0-4, then pads
    outputs, pooled = [], []
    for M in (5, 8):
        model = build_model("lstm_max", dict(max_len=M, num_chars=7, num_hid=4, num_labels=3), seed=2,
                            dtype=np.float64)
        padded = np.pad(codes, ((0, 0), (0, M - 5)), constant_values=-1)
        xm = model.xm
        values = Autograd(xm).eval(xm.operationSequence(xm.register("loss")),
                                   {**model.params, **model.feed(padded), "y": np.eye(3)[np.arange(6) % 3]})
        states = np.stack([values[f"h{t + 1}"] for t in range(M)], axis=1)   # N x M x h
        np.testing.assert_array_equal(values["pooled"], states.max(axis=1))
        outputs.append(values["outputs"])
        pooled.append(values["pooled"])
    np.testing.assert_allclose(pooled[0], pooled[1], rtol=1e-12)
    np.testing.assert_allclose(outputs[0], outputs[1], rtol=1e-12)


@pytest.mark.parametrize("kind", NEW)
def test_the_engine_rewrites_find_their_patterns_in_the_new_models(kind: str) -> None:
    """Written with the public API only, the models still get merged products, gathers and fused kernels."""
    from symdiff import Autograd

    model = build_model(kind, dict(max_len=4, num_chars=6, num_hid=5, num_labels=3), seed=0)
    xm = model.xm
    ops = [s.op for s in Autograd(xm).compile(xm.operationSequence(xm.register("loss"))).steps]
    assert any(op.startswith("hconcat") for op in ops), ops    # h's gate products merged
    assert any(op.startswith("vconcat") for op in ops), ops    # every step's characters in one gather
    assert any(op.startswith("fused") for op in ops), ops
    assert "crossEnt-softMax" in ops


# ---- a user's file ----------------------------------------------------------------------------
def test_a_model_file_trains_saves_and_predicts_only_when_passed_again(tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    write(tmp_path, "tiny.py", TINY)
    code, out, err = run(tmp_path, capsys, "train", "tiny.py", *SMALL, "--preset", "best",
                         "--save_model", "m.npz", "--metrics_file", "m.json", "--output_file", "p.npy")
    assert code == 0, err
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["model"] == "tiny.py" and metrics["config"]["optimizer"] == "adam"   # the file's preset
    assert metrics["config"]["num_hid"] == 6  # a flag given wins over the preset
    code, out, err = run(tmp_path, capsys, "predict", "--model", "m.npz", "Barack_Obama")
    assert code == 2 and "tiny.py" in err and "--model_file" in err and len(err.strip().splitlines()) == 1
    code, out, err = run(tmp_path, capsys, "predict", "--model", "m.npz", "--model_file", "tiny.py", "Barack_Obama")
    assert code == 0, err
    assert out.splitlines()[1].startswith("Barack_Obama\t")
    probs = np.array([float(x) for x in out.splitlines()[1].split("\t")[2:]])
    assert abs(probs.sum() - 1) < 1e-5  # six decimals each
    code, _, err = run(tmp_path, capsys, "evaluate", "--model", "m.npz", "--model_file", "tiny.py",
                       "--dataset", "demo")
    assert code == 0, err


def test_a_path_inside_a_saved_model_is_never_imported(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """An archive naming a model file (or any kind) never makes predict import or run it."""
    marker = tmp_path / "ran"
    evil = write(tmp_path, "evil.py", TINY + f"\nopen({str(marker)!r}, 'w').write('x')\n")
    write(tmp_path, "tiny.py", TINY)
    assert run(tmp_path, capsys, "train", "tiny.py", *SMALL, "--save_model", "m.npz", "--output_file", "p.npy")[0] == 0
    with np.load(tmp_path / "m.npz") as z:
        arrays = {k: z[k] for k in z.files}
    for meta in ({"file": str(evil)}, {"kind": str(evil)}, {"kind": "evil"}):
        config = {**json.loads(str(arrays["meta/config"])), **meta}
        np.savez(tmp_path / "bad.npz", **{**arrays, "meta/config": np.array(json.dumps(config))})
        code, _, err = run(tmp_path, capsys, "predict", "--model", "bad.npz", "Barack_Obama")
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        assert not marker.exists()


def test_a_shipped_archive_refuses_a_model_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write(tmp_path, "tiny.py", TINY)
    assert run(tmp_path, capsys, "train", "gru", *SMALL, "--save_model", "g.npz", "--output_file", "p.npy")[0] == 0
    assert run(tmp_path, capsys, "predict", "--model", "g.npz", "Paris")[0] == 0
    code, _, err = run(tmp_path, capsys, "predict", "--model", "g.npz", "--model_file", "tiny.py", "Paris")
    assert code == 2 and "shipped model 'gru'" in err


BROKEN = {
    "syntax.py": ("def build(dims, hp)\n    return None\n", r"syntax.py:1: syntax error"),
    "nobuild.py": ("X = 1\n", r"nobuild.py: defines no function build"),
    "raises.py": ("def build(dims, hp):\n    return 1 / 0\n", r"raises.py: build\(dims, hp\) raised ZeroDivisionError at line 2"),
    "imports.py": ("import no_such_module_here\n", r"imports.py: importing the model file raised ModuleNotFoundError"),
    "notxman.py": ("def build(dims, hp):\n    return 3\n", r"returned int, not an XMan"),
    "noloss.py": (TINY.replace("xm.loss = ", "xm.lost = "), r"noloss.py: the graph has no xm.loss register"),
    "nooutputs.py": (TINY.replace("xm.outputs", "xm.probs"), r"nooutputs.py: the graph has no xm.outputs register"),
    "shape.py": (TINY.replace('glorot(rng, H, C, hp["dtype"])', 'glorot(rng, H, C + 1, hp["dtype"])')
                 .replace("f.crossEnt(xm.outputs, xm.y)", "xm.outputs"),
                 r"shape.py: outputs has shape \(2, 6\) for a batch of 2 titles; it must be \(batch, num_labels\) = \(2, 5\)"),
    "presets.py": (TINY.replace('"num_hid": 5', '"hidden": 5'), r"presets.py: PRESETS\['best'\] sets hidden"),
    "input.py": (TINY.replace('xm.y = f.input(name="y")', 'xm.y = f.input(name="labels")'),
                 r"input.py: input 'labels' is none the training loop feeds"),
}


@pytest.mark.parametrize("name", [*BROKEN, "missing.py"])
def test_a_broken_model_file_is_one_line_and_exit_2_before_training(name: str, tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    if name in BROKEN:
        write(tmp_path, name, BROKEN[name][0])
    pattern = BROKEN.get(name, ("", r"missing.py: no such model file"))[1]
    code, out, err = run(tmp_path, capsys, "train", name, *SMALL, "--output_file", "p.npy",
                         "--metrics_file", "m.json")
    assert code == 2
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"symdiff {name}: error: ") and re.search(pattern, err), err
    assert "epoch" not in out and not (tmp_path / "p.npy").exists() and not (tmp_path / "m.json").exists()


def test_an_unknown_preset_names_the_model_and_its_presets(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(tmp_path, capsys, "train", "gru", "--preset", "fastest")
    assert code == 2 and "unknown preset 'fastest' for gru; valid names are: seed, best" in err


@pytest.mark.parametrize("kind", NEW)
def test_new_presets_hold_values_the_flags_accept(kind: str) -> None:
    table = loader.load_source(kind).presets["best"]
    argv = [a for k, v in table.items() if v is not None for a in (f"--{k}", str(v))]
    parsed = vars(cli.build_parser().parse_args(["train", kind, *argv]))
    assert {k: parsed[k] for k in table} == table


def test_the_readme_model_file_trains(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The README's complete model file, as printed there, and the command beside it."""
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## Your own model"):]
    source = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert 20 <= len(source.strip().splitlines()) <= 45
    command = re.search(r"symdiff train (\S+\.py)", section).group(1)
    write(tmp_path, Path(command).name, source)
    code, out, err = run(tmp_path, capsys, "train", Path(command).name, *SMALL, "--output_file", "p.npy")
    assert code == 0, err
    assert "code" in section and "rights" in section  # the README says a model file runs as the user


@pytest.mark.parametrize("kind", NEW)
def test_symdiff_tune_has_a_search_space_holding_each_new_preset(kind: str) -> None:
    from models import tune

    space = tune.SEARCH_SPACES[kind]
    first = tune.baseline(kind)  # the study's first trial: the preset, missing keys at the flags' defaults
    assert set(first) == set(space)
    for name, spec in space.items():
        value = first[name]
        assert (spec[1] <= value <= spec[2]) if spec[0] in ("log", "float", "int") else value in spec[1], name
    assert kind in vars(cli.build_parser().parse_args(["tune", kind]))["model"]
