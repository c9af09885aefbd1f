"""End-to-end tests of the ``jaxprune`` command (on the built-in digits, reduced settings)."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import jaxprune
from jaxprune.demo.cli import DEMO, _config, _parser, main
from jaxprune.demo.recipes import RECIPES, Config, ConfigError

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
    assert [h["q"] for h in results["history"]] == [0.8, 1.4]
    kept = [h["kept_total"] for h in results["history"]]
    assert 0 < kept[1] < kept[0] < 1
    assert results["kept_fraction"] == pytest.approx(kept[1])
    assert 0 <= results["pruned_error"] <= 1 and 0 <= results["dense_error"] <= 1
    assert set(results["inference"]) == {"1", "64", "1024"}
    assert results["structured"]["hidden_after"] < results["structured"]["hidden_before"]
    assert results["dead_units"]["hidden_after"] <= results["dead_units"]["hidden_before"]
    # The exported model holds exactly the kept weights, and is smaller than the dense .npz.
    exported = jaxprune.load(out / "model.jaxprune")
    assert exported["fc1"]["kernel"].nse == round(
        results["kept_per_layer"]["fc1/kernel"] * 64 * 300
    )
    assert results["file_bytes"] < results["dense_npz_bytes"]
    for name in ("weights_fc1.png", "rounds.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _final_masks(out: Path, rounds: int) -> dict:
    tree = jaxprune.load(out / "checkpoints" / f"round-{rounds}.jaxprune")
    return {k: np.asarray(v["kernel"]) for k, v in tree["masks"].items()}


def test_resume_after_a_kill_reaches_the_same_result(tmp_path, capsys):
    # Batch 8 makes each round last long enough to kill the run between rounds 1 and 3.
    args = [
        "demo",
        "--epochs",
        "1",
        "--rounds",
        "3",
        "--q",
        "0.8,1.2,1.6",
        "--retrain-epochs",
        "4",
        "--batch-size",
        "8",
        "--no-timing",
    ]
    whole = tmp_path / "whole"  # in-process runs share compiled code; only the killed one forks
    assert main([*args, "--out", str(whole)]) == 0

    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, "-m", "jaxprune", *args, "--out", str(killed)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    marker = killed / "checkpoints" / "round-1.json"
    deadline = time.monotonic() + 240
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert marker.exists(), "the run never finished its first round"
    assert not (killed / "results.json").exists(), "the run finished before it could be killed"
    assert not (killed / "checkpoints" / "round-3.json").exists()

    capsys.readouterr()
    assert main([*args, "--out", str(killed), "--resume"]) == 0
    assert "resuming after round" in capsys.readouterr().out
    a, b = _final_masks(whole, 3), _final_masks(killed, 3)
    assert a.keys() == b.keys()
    for layer in a:
        np.testing.assert_array_equal(a[layer], b[layer])
    ra = json.loads((whole / "results.json").read_text())
    rb = json.loads((killed / "results.json").read_text())
    assert ra["pruned_error"] == rb["pruned_error"] and ra["kept"] == rb["kept"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["run", "--data-dir", "/nonexistent/mnist"], "no such directory"),
        (["demo", "--rounds", "3", "--q", "1,2"], "--q has 2 values for 3 rounds"),
        (["demo", "--keep", "0.5,1.5", "--rounds", "2"], "--keep values must be fractions"),
        (["demo", "--epochs", "0"], "--epochs must be >= 1"),
        (
            [
                "demo",
                "--model",
                "lenet5",
                "--structured",
                "0.5",
            ],
            "--structured supports --model lenet300",
        ),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, args, message):
    proc = run_cli(*args, "--out", str(tmp_path / "o"))
    assert proc.returncode == 2
    lines = [line for line in proc.stdout.splitlines() if line.startswith("jaxprune: error:")]
    assert len(lines) == 1 and message in lines[0], proc.stdout
    assert "Traceback" not in proc.stdout + proc.stderr


def test_malformed_data_dir(tmp_path):
    data = tmp_path / "mnist"
    data.mkdir()
    for name in (
        "train-images-idx3-ubyte",
        "train-labels-idx1-ubyte",
        "t10k-images-idx3-ubyte",
        "t10k-labels-idx1-ubyte",
    ):
        (data / name).write_bytes(b"\x00\x00\x08\x03\x00\x00")  # a header cut short
    proc = run_cli("run", "--data-dir", str(data), "--out", str(tmp_path / "o"))
    assert proc.returncode == 2 and "jaxprune: error:" in proc.stdout
    assert "Traceback" not in proc.stderr


def test_unknown_model_is_a_usage_error(tmp_path):
    proc = run_cli("demo", "--model", "resnet", "--out", str(tmp_path))
    assert proc.returncode == 2 and "invalid choice: 'resnet'" in proc.stderr


def test_resume_with_other_options_is_refused(tmp_path):
    out = tmp_path / "o"
    (out / "checkpoints").mkdir(parents=True)
    saved = dataclasses.asdict(dataclasses.replace(DEMO, epochs=99).checked())
    (out / "checkpoints" / "config.json").write_text(json.dumps(saved))
    proc = run_cli("demo", "--epochs", "1", "--resume", "--out", str(out))
    assert proc.returncode == 2 and "made with other options (epochs" in proc.stdout


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
    # --keep drops the recipe's per-layer q factors, which apply to q only.
    keep = _parsed("run", "--model", "lenet5", "--data-dir", "d", "--keep", "0.5,0.2")
    assert (keep.keep, keep.rounds, keep.q_scale) == ((0.5, 0.2), 2, ())
    assert _parsed("demo", "--model", "lenet5") == dataclasses.replace(DEMO, model="lenet5")
    with pytest.raises(ConfigError, match="base schedule has 9 rounds"):
        _parsed("run", "--model", "lenet5", "--data-dir", "d", "--rounds", "10")
    with pytest.raises(ConfigError, match="--q-scale applies to --q"):
        _parsed("run", "--data-dir", "d", "--keep", "0.5", "--q-scale", "fc1=0.5")


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
