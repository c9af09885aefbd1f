"""Runs and their checkpoints: --resume continues only its own run, one run per --out at a time.

One tiny run is trained once per module (``finished``); each test copies its folder and changes
what it is about. Only the kill test starts a second process.
"""

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import jaxprune
from jaxprune.demo.checkpoints import Checkpoints, OutLock, run_identity
from jaxprune.demo.cli import _config, _parser, main
from jaxprune.demo.data import load_dataset

# The demo trains with optax's cosine_decay_schedule, which compares a float with the int32
# step count: JAX's default promotion, not ours (conftest.py).
pytestmark = pytest.mark.standard_promotion

# Batch 8 makes each round last long enough to kill the run between rounds 1 and 3.
ARGS = [
    "demo",
    "--epochs",
    "1",
    "--rounds",
    "3",
    "--q",
    "0.8,1.2,1.6",
    "--retrain-epochs",
    "3",
    "--batch-size",
    "8",
    "--no-timing",
]


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("finished") / "out"
    assert main([*ARGS, "--out", str(out)]) == 0
    return out


@pytest.fixture
def copy(finished, tmp_path) -> Path:
    out = tmp_path / "out"
    shutil.copytree(finished, out)
    return out


def refused(capsys, argv: list[str]) -> str:
    """Runs the command, asserts exit status 2 and one stderr line; returns that line."""
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("jaxprune: error: "), err
    return err[0]


def _masks(out: Path, rounds: int) -> dict:
    tree = jaxprune.load(out / "checkpoints" / f"round-{rounds}.jaxprune")
    return {k: np.asarray(v["kernel"]) for k, v in tree["masks"].items()}


@pytest.mark.slow  # SIGKILL mid-run, then resumes: CI runs it in its second step
def test_a_killed_run_resumes_only_as_itself(finished, tmp_path, capsys):
    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, "-m", "jaxprune", *ARGS, "--out", str(killed)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )

    def wait_for(name: str) -> None:
        marker = killed / "checkpoints" / name
        deadline = time.monotonic() + 240
        while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert marker.exists(), f"the run never wrote {name}"

    try:
        wait_for("dense.json")
        # While it runs, a second run on the same --out is refused.
        line = refused(capsys, [*ARGS, "--out", str(killed), "--resume"])
        assert f"another jaxprune run (pid {proc.pid}) is writing to {killed}" in line
        wait_for("round-1.json")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not (killed / "results.json").exists(), "the run finished before it could be killed"
    assert not (killed / "checkpoints" / "round-3.json").exists()

    # Its lock died with it. Another seed does not continue its rounds, nor does a fresh run.
    line = refused(capsys, [*ARGS, "--seed", "1", "--out", str(killed), "--resume"])
    assert "dense.json belongs to another run: --seed 0 there, 1 now;" in line
    line = refused(capsys, [*ARGS, "--out", str(killed)])
    assert "holds another run's files" in line and "--resume" in line and "--overwrite" in line

    assert main([*ARGS, "--out", str(killed), "--resume"]) == 0
    assert "resuming after round" in capsys.readouterr().out
    a, b = _masks(finished, 3), _masks(killed, 3)
    assert a.keys() == b.keys()
    for layer in a:
        np.testing.assert_array_equal(a[layer], b[layer])
    ra = json.loads((finished / "results.json").read_text())
    rb = json.loads((killed / "results.json").read_text())
    assert ra["pruned_error"] == rb["pruned_error"] and ra["weights_kept"] == rb["weights_kept"]
    assert ra["run_sha256"] == rb["run_sha256"]


def test_rounds_of_an_older_run_after_a_new_dense_model_are_refused(copy, capsys):
    # As a run with another seed killed after its dense checkpoint, over an older run's rounds.
    config = _config(_parser().parse_args([*ARGS, "--seed", "1"]))
    ckpt = Checkpoints(copy, run_identity(config, load_dataset(None)))
    ckpt.save_dense(jaxprune.load(copy / "checkpoints" / "dense.jaxprune")["params"], 0.5)
    line = refused(capsys, [*ARGS, "--seed", "1", "--out", str(copy), "--resume"])
    assert "round-1.json belongs to another run: --seed 0 there, 1 now;" in line


def test_resume_with_another_schedule_is_refused_without_config_json(copy, capsys):
    assert not (copy / "checkpoints" / "config.json").exists()  # each checkpoint has its own
    line = refused(capsys, [*ARGS[:6], "0.8,1.2,2.0", *ARGS[7:], "--out", str(copy), "--resume"])
    assert "belongs to another run: --q [0.8, 1.2, 1.6] there, [0.8, 1.2, 2.0] now;" in line


def test_a_swapped_round_file_is_refused(copy, capsys):
    ck = copy / "checkpoints"
    shutil.copy(ck / "round-2.jaxprune", ck / "round-3.jaxprune")
    line = refused(capsys, [*ARGS, "--out", str(copy), "--resume"])
    assert "round-3.jaxprune is not the file round-3.json describes (sha256 differs)" in line


def test_a_round_json_out_of_its_chain_is_refused(copy, capsys):
    ck = copy / "checkpoints"
    shutil.copy(ck / "round-1.json", ck / "round-2.json")
    line = refused(capsys, [*ARGS, "--out", str(copy), "--resume"])
    assert "round-2.json does not continue from the checkpoint before it" in line


def test_a_damaged_checkpoint_json_is_refused_and_the_others_kept(copy, capsys):
    ck = copy / "checkpoints"
    before = {p.name: p.read_bytes() for p in ck.iterdir() if p.name != "round-3.json"}
    (ck / "round-3.json").write_text('{"format": 1, "run": ')
    line = refused(capsys, [*ARGS, "--out", str(copy), "--resume"])
    assert "round-3.json is damaged" in line and "delete it to resume" in line
    assert {p: (ck / p).read_bytes() for p in before} == before


def test_checkpoints_of_the_older_option_names_are_refused(copy, capsys):
    # Format 1 named the options lr, retrain_lr_scale and keep (a kept fraction).
    path = copy / "checkpoints" / "dense.json"
    meta = json.loads(path.read_text())
    config = meta["run"]["config"]
    for old, new in (("lr", "learning_rate"), ("retrain_lr_scale", "retrain_learning_rate_scale")):
        config[old] = config.pop(new)
    config["keep"] = config.pop("sparsity")
    path.write_text(json.dumps({**meta, "format": 1}))
    line = refused(capsys, [*ARGS, "--out", str(copy), "--resume"])
    assert "dense.json was written by an older jaxprune" in line
    assert "--sparsity, the fraction pruned: 1 - keep" in line and "--overwrite" in line


def test_a_stray_copy_of_a_round_file_is_ignored(copy):
    ck = copy / "checkpoints"
    shutil.copy(ck / "round-1.json", ck / "round-1 (copy).json")
    config = _config(_parser().parse_args(ARGS))
    data = load_dataset(None)
    checkpoints = Checkpoints(copy, run_identity(config, data))
    assert checkpoints.load_dense() is not None
    assert checkpoints.load_round(config, data).round == 3


def test_a_shorter_run_replaces_a_longer_one_only_when_told(copy, capsys):
    short = ["demo", "--epochs", "1", "--rounds", "2", "--q", "0.8,1.4", "--retrain-epochs", "1"]
    short += ["--no-timing", "--out", str(copy)]
    line = refused(capsys, [*short, "--resume"])
    assert "belongs to another run: --batch-size 8 there, 64 now; --q" in line
    assert "--rounds 3 there, 2 now" in line
    assert "holds another run's files" in refused(capsys, short)

    assert main([*short, "--overwrite"]) == 0
    assert not (copy / "checkpoints" / "round-3.json").exists()
    assert not (copy / "checkpoints" / "round-3.jaxprune").exists()
    capsys.readouterr()
    assert main([*short, "--resume"]) == 0  # the finished short run, not the stale 3-round one
    assert "resuming after round 2 of 2" in capsys.readouterr().out
    results = json.loads((copy / "results.json").read_text())
    assert [h["round"] for h in results["history"]] == [1, 2]
    exported = jaxprune.load(copy / "model.jaxprune")
    assert exported["fc1"]["kernel"].nse == round(
        results["kept_fraction_per_layer"]["fc1/kernel"] * 64 * 300
    )


def test_resume_and_overwrite_exclude_each_other(copy, capsys):
    line = refused(capsys, [*ARGS, "--out", str(copy), "--resume", "--overwrite"])
    assert "--resume continues the run in --out, --overwrite replaces it: pick one." in line


def test_sensitivity_takes_only_a_dense_model_of_its_own_options(copy, capsys):
    line = refused(capsys, ["sensitivity", "--grid", "0,1", "--out", str(copy)])
    assert "dense.json belongs to another run: --batch-size 8 there, 128 now; --epochs 1" in line
    assert not (copy / "sensitivity.json").exists()
    same = ["sensitivity", "--epochs", "1", "--batch-size", "8", "--grid", "0,1"]
    assert main([*same, "--out", str(copy)]) == 0
    assert "dense model taken from" in capsys.readouterr().out
    assert json.loads((copy / "sensitivity.json").read_text())["rows"]


def test_a_held_lock_refuses_and_a_dead_holders_lock_file_does_not(copy, capsys):
    with OutLock(copy):
        line = refused(capsys, [*ARGS, "--out", str(copy), "--resume"])
    assert "another jaxprune run (pid " in line and "choose another --out" in line
    (copy / ".jaxprune.lock").write_text("999999999\n")  # a pid no process has: no flock held
    with OutLock(copy) as lock:
        assert lock.fd is not None
