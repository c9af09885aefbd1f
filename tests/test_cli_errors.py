"""Every failure the command foresees: one line on stderr, exit status 2 (130 for Ctrl-C).

In-process calls of ``main`` where a subprocess is not the point; the Ctrl-C test needs one.
"""

import errno
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import jaxprune.demo
from jaxprune.demo import checkpoints
from jaxprune.demo.cli import _config, _parser
from jaxprune.demo.data import load_dataset
from jaxprune.demo.recipes import Config, ConfigError

# The demo trains with optax's cosine_decay_schedule, which compares a float with the int32
# step count: JAX's default promotion, not ours (conftest.py).
pytestmark = pytest.mark.standard_promotion

FAST = ["--epochs", "1", "--rounds", "2", "--q", "0.8,1.4", "--retrain-epochs", "1", "--no-timing"]


def one_line_error(capsys, argv: list[str]) -> str:
    capsys.readouterr()
    assert jaxprune.demo.main(argv) == 2
    captured = capsys.readouterr()
    err = captured.err.splitlines()
    assert len(err) == 1 and err[0].startswith("jaxprune: error: "), captured
    assert "Traceback" not in captured.out + captured.err
    return err[0]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["demo", "--learning-rate", "inf"], "--learning-rate must be finite and > 0, got inf."),
        (["demo", "--weight-decay", "inf"], "--weight-decay must be finite and >= 0, got inf."),
        (
            ["demo", "--retrain-learning-rate-scale", "inf"],
            "--retrain-learning-rate-scale must be finite and > 0",
        ),
        (["demo", "--q", "inf"], "argument --q: expected comma-separated finite numbers"),
        (["demo", "--q-scale", "fc1=inf"], "--q-scale factors must be finite and >= 0"),
        (["demo", "--seed", "-1"], "--seed must be in [0, 2**31), got -1."),
        (["demo", "--seed", str(2**70)], f"--seed must be in [0, 2**31), got {2**70}."),
        (["sensitivity", "--grid", "nan"], "argument --grid: expected comma-separated finite"),
        (["sensitivity", "--grid", "0,-1"], "--grid values must be >= 0, got (0.0, -1.0)."),
        (["demo", "--rounds", "3", "--q", "1,2"], "--q has 2 values for 3 rounds"),
        (["demo", "--sparsity", "0.5,1", "--rounds", "2"], "--sparsity values must be fractions"),
        (["demo", "--keep", "0.08"], "unrecognized arguments: --keep 0.08"),
        (["demo", "--epochs", "0"], "--epochs must be an integer >= 1, got 0."),
        (["demo", "--model", "lenet5", "--structured", "0.5"], "--structured supports"),
        (["demo", "--model", "resnet"], "argument --model: invalid choice: 'resnet'"),
        (["run", "--data-dir", "/nonexistent/mnist"], "no such directory"),
    ],
)
def test_bad_options_are_one_line_before_anything_is_written(tmp_path, capsys, args, message):
    out = tmp_path / "o"
    assert message in one_line_error(capsys, [*args, "--out", str(out)])
    assert not out.exists()


def test_config_errors_name_fields_and_the_command_its_flags(capsys):
    with pytest.raises(
        ConfigError, match=r"^retrain_learning_rate_scale must be finite and > 0, got inf"
    ):
        Config(retrain_learning_rate_scale=float("inf")).checked()
    with pytest.raises(ConfigError, match=r"^q_scale applies to q, not to sparsity\.$"):
        Config(sparsity=(0.5,), q_scale=(("fc1", 0.5),)).checked()


def test_an_unknown_q_scale_layer_is_refused_before_training(tmp_path, capsys):
    out = tmp_path / "o"
    line = one_line_error(capsys, ["demo", "--q-scale", "fc9=0.3", "--out", str(out)])
    assert "--q-scale {'fc9': 0.3}: " in line and "match no prunable leaf or layer" in line
    assert not out.exists()


def test_a_diverging_run_stops_before_saving_it(tmp_path, capsys):
    out = tmp_path / "o"
    line = one_line_error(capsys, ["demo", *FAST, "--learning-rate", "1e30", "--out", str(out)])
    assert "dense training diverged (mean loss nan in epoch 1); lower --learning-rate." in line
    assert not (out / "checkpoints" / "dense.json").exists()


@pytest.mark.parametrize("split", ["x_train", "x_test"])
def test_an_empty_split_is_refused(tmp_path, capsys, split):
    arrays = {
        "x_train": np.zeros((4, 28, 28), np.uint8),
        "y_train": np.zeros(4, np.uint8),
        "x_test": np.zeros((4, 28, 28), np.uint8),
        "y_test": np.zeros(4, np.uint8),
    }
    arrays[split] = arrays[split][:0]
    arrays["y" + split[1:]] = arrays["y" + split[1:]][:0]
    np.savez(tmp_path / "mnist.npz", **arrays)
    line = one_line_error(
        capsys, ["run", "--data-dir", str(tmp_path), "--out", str(tmp_path / "o")]
    )
    assert f"mnist.npz[{split}]: holds no images" in line


def test_an_out_under_a_file_is_one_line(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    line = one_line_error(capsys, ["demo", *FAST, "--out", str(tmp_path / "file" / "o")])
    assert "Not a directory" in line and "--out must be a folder" in line


def test_a_read_only_out_is_one_line(tmp_path, capsys, monkeypatch):
    out = tmp_path / "ro"
    out.mkdir(mode=0o555)
    if os.geteuid() == 0:  # root writes anywhere: refuse as the kernel would for anyone else
        real_open = os.open

        def read_only(path, *args, **kwargs):
            if str(path).startswith(str(out)):
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
            return real_open(path, *args, **kwargs)

        monkeypatch.setattr(os, "open", read_only)
    line = one_line_error(capsys, ["demo", *FAST, "--out", str(out)])
    assert f"{out / '.jaxprune.lock'}: Permission denied" in line


def test_a_full_disk_keeps_the_last_good_checkpoint(tmp_path, capsys, monkeypatch):
    real_save = checkpoints.save

    def full(path, tree, **kwargs):
        if path.name == "round-2.jaxprune":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real_save(path, tree, **kwargs)

    monkeypatch.setattr(checkpoints, "save", full)
    out = tmp_path / "o"
    line = one_line_error(capsys, ["demo", *FAST, "--out", str(out)])
    assert "round-2.jaxprune: No space left on device" in line
    assert (out / "checkpoints" / "round-1.json").exists()
    assert not (out / "checkpoints" / "round-2.json").exists()
    config = _config(_parser().parse_args(["demo", *FAST]))
    data = load_dataset(None)
    ckpt = checkpoints.Checkpoints(out, checkpoints.run_identity(config, data))
    assert ckpt.load_dense() is not None
    assert ckpt.load_round(config, data).round == 1  # what --resume continues from


def test_ctrl_c_while_importing_is_one_line(monkeypatch, capsys):
    def interrupt():
        raise KeyboardInterrupt

    monkeypatch.setattr(jaxprune.demo, "missing_dependencies", interrupt)
    assert jaxprune.demo.main(["demo"]) == 130
    assert capsys.readouterr().err == "interrupted\n"


def test_ctrl_c_in_a_round_exits_130_with_one_line(tmp_path):
    out = tmp_path / "o"
    proc = subprocess.Popen(
        [sys.executable, "-m", "jaxprune", "demo", *FAST, "--out", str(out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    marker = out / "checkpoints" / "dense.json"
    deadline = time.monotonic() + 240
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)  # the rounds are compiling or training now
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1:] == [
        "interrupted: finished rounds are checkpointed; rerun with --resume"
    ]
    assert "Traceback" not in err
    assert (out / "checkpoints" / "dense.json").exists()


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"scope": "net"}, r"^unknown scope 'net'; choose layer or global\.$"),
        ({"ranking": "lottery", "sparsity": (0.5,)}, r"^unknown ranking 'lottery'"),
        ({"ranking": "random"}, r"^scope and ranking apply to sparsity, not to Han's q rule\.$"),
        (
            {"sparsity": ((("fc1", 0.5),),), "scope": "global"},
            r"^sparsity per layer needs scope layer",
        ),
        ({"sparsity": ((("fc1", 1.0),),)}, r"^sparsity values must be fractions in \[0, 1\)"),
        ({"sparsity": (-0.1,)}, r"^sparsity values must be fractions in \[0, 1\)"),
    ],
)
def test_scope_ranking_and_per_layer_sparsity_are_checked(fields, message):
    with pytest.raises(ConfigError, match=message):
        Config(rounds=1, q=(1.0,), **fields).checked()
