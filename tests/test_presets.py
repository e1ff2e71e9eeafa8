"""``--preset``: ``seed`` is exactly the seed's defaults, ``best`` fills every hyperparameter the user did
not give on the command line, and explicit flags win (also when they equal the seed's default).
One short end-to-end run of the CLI on the shipped demo set.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import cli
import importlib

from models.flags import DEFAULT_LR, PRESET_KEYS, apply_preset, parse_args
from models.training import TrainConfig
from symdiff.optim import USES_MOMENTUM

REPO = Path(__file__).resolve().parents[1]
KINDS = ("mlp", "lstm")
# The seed's hyperparameters, written out: --preset seed (and no --preset) must give exactly these.
SEED = dict(max_len=10, num_hid=50, batch_size=64, epochs=15, dtype="float64", optimizer="sgd", momentum=0.9,
            weight_decay=0.0, clip=None, schedule="constant", patience=None, average=None)
# --preset best, written out as README.md ("Better than the seed") and docs/tuning.md give it.
BEST = {
    "mlp": dict(optimizer="adamw", init_lr=0.006, weight_decay=0.3, num_hid=128, max_len=25, batch_size=128,
                epochs=30, schedule="plateau", patience=2, dtype="float32", momentum=0.9, clip=None,
                average=None),
    "lstm": dict(optimizer="adam", init_lr=0.01, weight_decay=0.0, num_hid=64, max_len=30, batch_size=64,
                 epochs=20, schedule="plateau", patience=2, dtype="float32", momentum=0.9, clip=None,
                 average=None),
}


def presets(kind: str) -> dict:
    """The model file's PRESETS (models/<kind>.py)."""
    return importlib.import_module(f"models.{kind}").PRESETS


def resolved(kind: str, argv: list[str]) -> dict:
    return apply_preset(presets(kind), parse_args(kind, argv))


@pytest.mark.parametrize("kind", KINDS)
def test_seed_preset_is_the_plain_defaults(kind: str) -> None:
    plain = resolved(kind, [])
    assert plain == resolved(kind, ["--preset", "seed"])
    assert {k: plain[k] for k in PRESET_KEYS} == {**SEED, "init_lr": DEFAULT_LR[kind]}
    assert TrainConfig.from_params(plain) == TrainConfig(init_lr=DEFAULT_LR[kind])


@pytest.mark.parametrize("kind", KINDS)
def test_best_fills_every_unset_hyperparameter(kind: str) -> None:
    table = presets(kind)["best"]
    assert set(table) == set(PRESET_KEYS)
    assert table == BEST[kind]
    best = resolved(kind, ["--preset", "best"])
    assert {k: best[k] for k in PRESET_KEYS} == BEST[kind]
    assert best["seed"] == 0 and best["dataset"] == "demo"  # not hyperparameters: untouched
    assert table != {**SEED, "init_lr": DEFAULT_LR[kind]}


@pytest.mark.parametrize("kind", KINDS)
def test_the_readme_describes_the_best_presets_as_they_are(kind: str) -> None:
    text = " ".join((REPO / "README.md").read_text().split())
    found = re.search(rf"`symdiff {kind} --preset best` \(([^)]*)\)", text)
    assert found, f"README.md no longer describes `symdiff {kind} --preset best`"
    words, table = found.group(1), BEST[kind]
    said = {"optimizer": {"adam": "Adam", "adamw": "AdamW"}[table["optimizer"]], "init_lr": f"lr {table['init_lr']:g}",
            "num_hid": f"hidden {table['num_hid']}", "max_len": f"max_len {table['max_len']}", "dtype": table["dtype"]}
    if table["weight_decay"]:
        said["weight_decay"] = f"decay {table['weight_decay']:g}"
    if table["batch_size"] != SEED["batch_size"]:
        said["batch_size"] = f"batch {table['batch_size']}"
    for key, phrase in said.items():
        assert re.search(rf"(^|[ ,(]){re.escape(phrase)}([ ,)]|$)", words), (key, phrase, words)
    assert ("early stopping" in words) == (table["patience"] is not None), words


@pytest.mark.parametrize("kind", KINDS)
def test_explicit_flags_win_even_when_equal_to_the_seed_default(kind: str) -> None:
    argv = ["--num_hid", "7", "--optimizer", "sgd", "--dtype", "float64", "--init_lr", str(DEFAULT_LR[kind])]
    for args in (["--preset", "best", *argv], [*argv, "--preset", "best"]):  # order does not matter
        best = resolved(kind, args)
        assert (best["num_hid"], best["optimizer"], best["dtype"]) == (7, "sgd", "float64")
        assert best["init_lr"] == DEFAULT_LR[kind]
        for k in set(PRESET_KEYS) - {"num_hid", "optimizer", "dtype", "init_lr"}:
            assert best[k] == presets(kind)["best"][k], k


@pytest.mark.parametrize("kind", KINDS)
def test_the_table_holds_values_the_flags_accept(kind: str) -> None:
    table = presets(kind)["best"]
    argv = [a for k, v in table.items() if v is not None for a in (f"--{k}", str(v))]
    parsed = parse_args(kind, argv)
    assert {k: parsed[k] for k in PRESET_KEYS} == table


def test_the_cli_parser_records_given_flags() -> None:
    args = vars(cli.build_parser().parse_args(["lstm", "--preset", "best", "--epochs", "3"]))
    best = apply_preset(presets("lstm"), args)
    assert best["epochs"] == 3
    assert best["max_len"] == presets("lstm")["best"]["max_len"]
    assert apply_preset(presets("mlp"), vars(cli.build_parser().parse_args(["mlp"])))["optimizer"] == "sgd"


def test_a_hand_made_dict_counts_its_keys_as_given() -> None:
    best = apply_preset(presets("mlp"), {"preset": "best", "num_hid": 7})
    assert best["num_hid"] == 7 and best["optimizer"] == presets("mlp")["best"]["optimizer"]
    assert apply_preset(presets("mlp"), {"num_hid": 7}) == {"num_hid": 7}
    with pytest.raises(ValueError, match="unknown preset"):
        apply_preset(presets("mlp"), {"preset": "fastest"})


def test_an_unknown_preset_is_a_usage_error() -> None:
    with pytest.raises(SystemExit) as exc:
        parse_args("mlp", ["--preset", "fastest"])
    assert exc.value.code == 2


@pytest.mark.subprocess
@pytest.mark.parametrize("kind", KINDS)
def test_preset_best_runs_end_to_end_on_the_demo_set(kind: str, tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "200"}
    proc = subprocess.run([sys.executable, str(REPO / "cli.py"), kind, "--preset", "best", "--epochs", "1",
                           "--num_hid", "16", "--metrics_file", "m.json", "--output_file", "p.npy"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    assert "preset best" in proc.stdout
    config = json.loads((tmp_path / "m.json").read_text())["config"]
    expected = {**presets(kind)["best"], "epochs": 1, "num_hid": 16}
    if expected["optimizer"] not in USES_MOMENTUM:  # the record says the optimizer has no momentum
        expected["momentum"] = None
    assert {k: config[k] for k in PRESET_KEYS} == expected
    assert (tmp_path / "p.npy").exists()
