"""End-to-end tests of the ``jaxprune`` command (on the built-in digits, reduced settings)."""

import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import jaxprune
from jaxprune.demo import report
from jaxprune.demo.cli import DEMO, _config, _parser, main
from jaxprune.demo.recipes import RECIPES, Config, ConfigError
from jaxprune.rounds import RoundRecord

# The demo trains with optax's cosine_decay_schedule, which compares a float with the int32
# step count: JAX's default promotion, not ours (conftest.py).
pytestmark = pytest.mark.standard_promotion

FAST = ["--epochs", "2", "--rounds", "2", "--q", "0.8,1.4", "--retrain-epochs", "1"]


def run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "jaxprune", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "COLUMNS": "120"},
    )


def test_demo_runs_end_to_end_and_writes_its_outputs(tmp_path):
    out = tmp_path / "demo"
    assert main(["demo", *FAST, "--out", str(out), "--structured", "0.5"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert [(h["round"], h["q"], h["sparsity"]) for h in results["history"]] == [
        (1, 0.8, None),
        (2, 1.4, None),
    ]
    kept = [h["kept_fraction"] for h in results["history"]]
    assert 0 < kept[1] < kept[0] < 1
    assert results["kept_fraction"] == pytest.approx(kept[1])
    assert 0 <= results["pruned_error"] <= 1 and 0 <= results["dense_error"] <= 1
    assert set(results["inference"]) == {"1", "64", "1024"}
    assert results["structured"]["hidden_after"] < results["structured"]["hidden_before"]
    assert results["dead_units"]["hidden_after"] <= results["dead_units"]["hidden_before"]
    # The exported model holds exactly the kept weights, and is smaller than the dense .npz.
    exported = jaxprune.load(out / "model.jaxprune")
    assert exported["fc1"]["kernel"].nse == round(
        results["kept_fraction_per_layer"]["fc1/kernel"] * 64 * 300
    )
    assert results["weights_kept"] == sum(
        exported[layer]["kernel"].nse for layer in ("fc1", "fc2", "fc3")
    )
    assert results["file_bytes"] < results["dense_npz_bytes"]
    for name in ("weights_fc1.png", "rounds.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_malformed_data_dir(tmp_path, capsys):
    data = tmp_path / "mnist"
    data.mkdir()
    for name in (
        "train-images-idx3-ubyte",
        "train-labels-idx1-ubyte",
        "t10k-images-idx3-ubyte",
        "t10k-labels-idx1-ubyte",
    ):
        (data / name).write_bytes(b"\x00\x00\x08\x03\x00\x00")  # a header cut short
    assert main(["run", "--data-dir", str(data), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("jaxprune: error: ") and "truncated header" in err[0]


def test_sensitivity_command_writes_table_and_plot(tmp_path):
    out = tmp_path / "sens"
    assert main(["sensitivity", "--epochs", "1", "--grid", "0,1,2", "--out", str(out)]) == 0
    result = json.loads((out / "sensitivity.json").read_text())
    layers = {row["layer"] for row in result["rows"]}
    assert layers == {"fc1/kernel", "fc2/kernel", "fc3/kernel"}
    for layer in layers:
        kept = [r["kept_fraction"] for r in result["rows"] if r["layer"] == layer]
        assert kept[0] == 1.0 and kept[0] >= kept[1] >= kept[2]
    assert (out / "sensitivity.png").read_bytes()[:4] == b"\x89PNG"


def _parsed(*argv: str) -> Config:
    return _config(_parser().parse_args(list(argv)))


@pytest.mark.parametrize("model", ["lenet300", "lenet5"])
def test_run_defaults_to_the_models_recipe(model):
    config = _parsed("run", "--model", model, "--data-dir", "d")
    assert config == dataclasses.replace(RECIPES[model], data_dir="d").checked()
    assert _parsed("run", "--model", model, "--data-dir", "d", "--epochs", "3").epochs == 3


def test_schedule_options_fit_together():
    recipe = RECIPES["lenet5"]
    # A schedule without --rounds sets the rounds; --rounds alone runs the recipe's first rounds.
    assert _parsed("run", "--data-dir", "d", "--q", "1,2").rounds == 2
    assert _parsed("run", "--data-dir", "d", "--q", "2").rounds == 1
    assert _parsed("run", "--data-dir", "d", "--q", "2", "--rounds", "3").q == (2.0, 2.0, 2.0)
    assert _parsed("run", "--model", "lenet5", "--data-dir", "d", "--rounds", "2").q == recipe.q[:2]
    # --sparsity drops the recipe's per-layer q factors, which apply to q only.
    cut = _parsed("run", "--model", "lenet5", "--data-dir", "d", "--sparsity", "0.5,0.8")
    assert (cut.sparsity, cut.rounds, cut.q_scale) == ((0.5, 0.8), 2, ())
    assert _parsed("demo", "--model", "lenet5") == dataclasses.replace(DEMO, model="lenet5")
    with pytest.raises(ConfigError, match="base schedule has 9 rounds"):
        _parsed("run", "--model", "lenet5", "--data-dir", "d", "--rounds", "10")
    with pytest.raises(ConfigError, match="q_scale applies to q, not to sparsity"):
        _parsed("run", "--data-dir", "d", "--sparsity", "0.5", "--q-scale", "fc1=0.5")


def test_a_plain_install_says_to_install_the_demo_extra():
    # As without `pip install 'jaxprune[demo]'`: matplotlib cannot be imported (rich can: flax
    # itself depends on it).
    code = (
        "import sys; sys.modules['matplotlib'] = None; import runpy; runpy.run_module('jaxprune')"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, "demo"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        "jaxprune: the command needs matplotlib; install it with pip install 'jaxprune[demo]'"
    )


def test_round_lines_and_tables_name_nnx_layers_by_their_whole_path():
    # NNX paths: 'layers/0/kernel' is layer 'layers/0', not 'layers'.
    config = dataclasses.replace(DEMO, q=(1.0,), rounds=1).checked()
    record = RoundRecord(
        round=0,
        q={"*": 1.0, "layers/0": 0.5},
        sparsity=None,
        kept_fraction_per_layer={"layers/0/kernel": 0.5, "layers/1/kernel": 0.25},
        kept_fraction=0.4,
        train_loss=0.1,
        metric=0.9,
        dropout_rates={},
    )
    line = report.round_line(record, config)
    assert "(layers/0 50.00%  layers/1 25.00%)" in line
    params = {"layers": {0: {"kernel": np.ones((4, 4))}, 1: {"kernel": np.ones((4, 4))}}}
    masks = jaxprune.compute_masks(params, 0.0)
    table = report.layer_table(config, jaxprune.summarize(params, masks), record)
    q_column = list(table.columns[4].cells)
    assert q_column[:2] == ["0.5", "1"]
    assert report.layer_of("layers/0/kernel") == "layers/0"
    assert (
        report.history_entry(record, config)["kept_fraction_per_layer"]
        == record.kept_fraction_per_layer
    )


def test_sparsity_rounds_are_named_by_the_fraction_asked_for():
    config = dataclasses.replace(DEMO, sparsity=(0.7,), rounds=1, q_scale=()).checked()
    record = RoundRecord(
        round=0,
        q=None,
        sparsity=0.7,
        kept_fraction_per_layer={"fc1/kernel": 0.3},
        kept_fraction=0.3,
        train_loss=0.1,
        metric=0.9,
        dropout_rates={},
    )
    assert report.round_line(record, config).startswith("round 1: sparsity=0.7  kept 30.00%")
    entry = report.history_entry(record, config)
    assert (entry["sparsity"], entry["kept_fraction"]) == (0.7, 0.3)
    assert entry["retrain_learning_rate"] == 0.05  # the demo's 0.1, halved for retraining
