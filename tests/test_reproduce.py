"""benchmarks/reproduce_han2015.py: seeds, mean ± std rows and both baselines (--quick, digits)."""

import importlib.util
import json
from pathlib import Path

import pytest

# The demo trains with optax's cosine_decay_schedule, which compares a float with the int32
# step count: JAX's default promotion, not ours (conftest.py).
pytestmark = pytest.mark.standard_promotion

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "reproduce_han2015.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("reproduce_han2015", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow  # a benchmark's smoke run (2 seeds x 3 runs): CI runs it in its second step
def test_quick_two_seeds(bench, tmp_path, capsys):
    out = tmp_path / "summary.json"
    argv = ["--quick", "--seeds", "2", "--model", "lenet300", "--out", str(tmp_path)]
    summaries = bench.main([*argv, "--json", str(out), "--markdown"])
    summary = summaries["lenet300"]
    assert summary["seeds"] == [0, 1]
    assert summary["dense_error"]["n"] == 2 and summary["dense_error"]["std"] >= 0
    assert [r["round"] for r in summary["rounds"]] == [1, 2]
    for row in summary["rounds"]:
        kept = row["han"]["kept_fraction"]["mean"]
        for kind in ("han", "random", "global"):
            assert row[kind]["error"]["n"] == 2
            # the baselines prune to Han's kept fraction of the round, seed by seed
            assert row[kind]["kept_fraction"]["mean"] == pytest.approx(kept, abs=1e-6)
    for record in summary["per_seed"]:  # both baselines start from the Han run's dense model
        assert len(record["random"]) == len(record["global"]) == len(record["han"])
    printed = capsys.readouterr().out
    assert "mean ± std over 2 seeds" in printed
    assert "fewest weights whose MEAN error is within 0.1 pt of the mean dense error" in printed
    rows = [line for line in printed.splitlines() if line.startswith("| round")]
    assert len(rows) == 2 and all(line.count("±") == 4 for line in rows)
    assert json.loads(out.read_text())["lenet300"]["rounds"] == summary["rounds"]

    # each seed's time is its runs', kept beside them: a --resume pass adds its own to it
    first = [r["seconds"] for r in summary["per_seed"]]
    assert all(s > 0 for s in first) and summary["timed_seeds"] == 2
    resumed = bench.main([*argv, "--resume"])["lenet300"]
    assert resumed["rounds"] == summary["rounds"]
    assert all(r["seconds"] > s for r, s in zip(resumed["per_seed"], first, strict=True))
    capsys.readouterr()

    # --report reprints from the JSON without running anything
    again = bench.main(["--report", str(out), "--markdown"])
    assert again["lenet300"]["fewest_within"] == summary["fewest_within"]
    assert "| round 2 |" in capsys.readouterr().out


def test_random_baseline_keeps_hans_per_layer_fractions(bench):
    han = bench.Config(model="lenet300", rounds=2, q=(1.0, 1.5)).checked()
    history = [
        {"kept_fraction": 0.5, "kept_fraction_per_layer": {"fc1/kernel": 0.4, "fc2/kernel": 0.6}},
        {"kept_fraction": 0.3, "kept_fraction_per_layer": {"fc1/kernel": 0.2, "fc2/kernel": 0.5}},
    ]
    random = bench.baseline_config(han, history, "random")
    assert random.ranking == "random" and random.scope == "layer"
    # Targets are sparsities: the fractions Han's rounds pruned.
    assert [layer for layer, _ in random.sparsity[1]] == ["fc1/kernel", "fc2/kernel"]
    assert [s for _, s in random.sparsity[1]] == pytest.approx([0.8, 0.5])
    glob = bench.baseline_config(han, history, "global")
    assert glob.scope == "global" and glob.sparsity == pytest.approx((0.5, 0.7))
    assert (random.epochs, random.learning_rate, random.retrain_epochs) == (
        han.epochs,
        han.learning_rate,
        han.retrain_epochs,
    )


def test_random_masks_draw_survivors_of_the_asked_size(bench):
    import jax
    import numpy as np

    from jaxprune.demo import run

    config = bench.Config(
        rounds=2, sparsity=((("fc1/kernel", 0.5), ("fc2/kernel", 0.75)), 0.9), ranking="random"
    ).checked()
    params = {
        "fc1": {"kernel": np.ones((8, 4), np.float32), "bias": np.zeros(4, np.float32)},
        "fc2": {"kernel": np.ones((4, 4), np.float32), "bias": np.zeros(4, np.float32)},
    }
    first = run.random_masks(config, params, None, 0)
    assert int(first["fc1"]["kernel"].sum()) == 16 and int(first["fc2"]["kernel"].sum()) == 4
    second = run.random_masks(config, params, first, 1)
    for layer in ("fc1", "fc2"):  # pruned stays pruned
        assert not np.any(np.asarray(second[layer]["kernel"]) & ~np.asarray(first[layer]["kernel"]))
    assert int(second["fc1"]["kernel"].sum()) == 3  # 32 - round(0.9 * 32)
    again = run.random_masks(config, params, None, 0)  # seeded: the same draw again
    assert all(jax.tree.leaves(jax.tree.map(np.array_equal, first, again)))


def test_timing_log_says_when_earlier_runs_were_not_timed(bench, tmp_path):
    out = tmp_path / "seed0"
    assert bench.timing_log(out, resume=True) == {"untimed_before": False, "runs": []}
    out.mkdir()
    (out / "results.json").write_text("{}")  # a run made before timing.json was kept
    assert bench.timing_log(out, resume=True)["untimed_before"] is True
    assert bench.timing_log(out, resume=False)["untimed_before"] is False  # --overwrite redoes it
    log = bench.timing_log(out, resume=False)
    assert bench.timed(out, log, "han", lambda: 42) == 42
    again = bench.timing_log(out, resume=True)
    assert again["untimed_before"] is False and [r["kind"] for r in again["runs"]] == ["han"]
    record = {"seed": 0, "seconds": None, "other_busy_cores": None}
    assert bench.other_load([record]) is None
    assert bench.other_load(
        [{"seconds": 3.0, "other_busy_cores": 0.5}, {"seconds": 1.0, "other_busy_cores": 0.1}]
    ) == pytest.approx(0.4)
