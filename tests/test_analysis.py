"""Tests of accuracy, the per-layer sensitivity scan and the PNG plots."""

import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import count_compiles
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxprune.analysis import Sensitivity, accuracy, sensitivity
from jaxprune.masks import apply_masks, compute_masks, masks_for_sparsity
from jaxprune.plots import plot_history, plot_sensitivity, plot_weight_histogram
from jaxprune.summary import summarize

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def linear(w, x):
    return x @ w


class TinyMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = jnp.maximum(nn.Dense(16, name="fc1")(x), 0)
        return nn.Dense(4, name="fc2")(x)


class NNXTinyMLP(nnx.Module):
    def __init__(self, rngs):
        self.fc1 = nnx.Linear(6, 16, rngs=rngs)
        self.fc2 = nnx.Linear(16, 4, rngs=rngs)

    def __call__(self, x):
        return self.fc2(jnp.maximum(self.fc1(x), 0))


MLP = TinyMLP()


def mlp_apply(params, x):
    return MLP.apply({"params": params}, x)


@pytest.fixture(scope="module")
def problem():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(37, 6)).astype(np.float32)
    params = MLP.init(jax.random.key(0), x[:1])["params"]
    # Labels from the model itself, with some noise, so accuracy is high but not perfect.
    y = np.asarray(jnp.argmax(mlp_apply(params, x), -1)).astype(np.int32)
    y[:5] = (y[:5] + 1) % 4
    return params, x, y


def only(layer):
    return lambda path, leaf: path == layer


# --- accuracy -------------------------------------------------------------------------------


@settings(max_examples=15, deadline=None)
@given(n=st.integers(1, 30), batch_size=st.integers(1, 40), seed=st.integers(0, 100))
def test_accuracy_matches_numpy(n, batch_size, seed):
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(3, 5)).astype(np.float32)
    x = rng.normal(size=(n, 3)).astype(np.float32)
    y = rng.integers(0, 5, n).astype(np.int32)
    expected = np.mean(np.argmax(x @ w, -1) == y)
    assert accuracy(linear, w, x, y, batch_size=batch_size) == pytest.approx(expected)


def test_accuracy_reuses_its_compilation(problem):
    params, x, y = problem
    accuracy(mlp_apply, params, x, y, batch_size=8)
    shifted = jax.tree.map(lambda a: a + 1.0, params)
    with count_compiles() as compiles:
        accuracy(mlp_apply, shifted, x[::-1].copy(), y[::-1].copy(), batch_size=8)
    assert compiles.of("_count_correct") == 0, compiles.names


def test_accuracy_rejects_bad_data():
    w = np.eye(2, dtype=np.float32)
    with pytest.raises(ValueError, match=r"y has shape \(2,\) and x has 3 examples"):
        accuracy(linear, w, np.ones((3, 2)), np.zeros(2, int))
    with pytest.raises(TypeError, match=r"batch_size must be an int, got float: 8.0"):
        accuracy(linear, w, np.ones((3, 2)), np.zeros(3, int), batch_size=8.0)
    with pytest.raises(ValueError, match=r"batch_size must be an int >= 1, got 0"):
        accuracy(linear, w, np.ones((3, 2)), np.zeros(3, int), batch_size=0)
    with pytest.raises(ValueError, match=r"x is empty"):
        accuracy(linear, w, np.ones((0, 2)), np.zeros(0, int))


# --- sensitivity ----------------------------------------------------------------------------


def test_sensitivity_q_grid_matches_one_layer_at_a_time(problem):
    params, x, y = problem
    qs = [0.0, 0.5, 1.0, 2.5]
    table = sensitivity(mlp_apply, params, x, y, qs=qs, batch_size=10, grid_batch=3)
    assert table.layers == ("fc1/kernel", "fc2/kernel") and table.grid_kind == "q"
    assert table.baseline == pytest.approx(accuracy(mlp_apply, params, x, y))
    for i, layer in enumerate(table.layers):
        for j, q in enumerate(qs):
            masks = compute_masks(params, q, where=only(layer))
            pruned = apply_masks(params, masks)
            row = summarize(params, masks, where=only(layer)).rows[0]
            assert table.kept_fraction[i, j] == pytest.approx(row.kept_fraction, abs=1e-6)
            assert table.accuracy[i, j] == pytest.approx(accuracy(mlp_apply, pruned, x, y))
    assert np.all(table.kept_fraction[:, 0] == 1.0)  # q = 0 keeps everything
    assert np.all(np.diff(table.kept_fraction, axis=1) <= 0)  # larger q keeps less
    assert table.kept_fraction[:, -1].max() < 0.1


def test_sensitivity_sparsity_grid(problem):
    params, x, y = problem
    sparsities = [0.0, 0.5, 0.8]
    table = sensitivity(mlp_apply, params, x, y, sparsities=sparsities)
    assert table.grid_kind == "sparsity"
    for i, layer in enumerate(table.layers):
        for j, s in enumerate(sparsities):
            masks = masks_for_sparsity(params, s, where=only(layer))
            kept = summarize(params, masks, where=only(layer)).rows[0].kept_fraction
            assert table.kept_fraction[i, j] == pytest.approx(kept, abs=1e-6)
            assert kept == pytest.approx(1.0 - s, abs=0.02)
            pruned = apply_masks(params, masks)
            assert table.accuracy[i, j] == pytest.approx(accuracy(mlp_apply, pruned, x, y))
    assert all(r["q"] is None for r in table.rows())


def test_sensitivity_compiles_once_for_a_new_grid(problem):
    params, x, y = problem
    sensitivity(mlp_apply, params, x, y, qs=[0.1, 0.2])
    with count_compiles() as compiles:
        again = sensitivity(mlp_apply, params, x, y, qs=[0.7, 1.4])
    assert compiles.of("_scan_layers") == 0, compiles.names
    assert again.grid.tolist() == pytest.approx([0.7, 1.4])


def test_sensitivity_on_an_nnx_state():
    model = NNXTinyMLP(nnx.Rngs(1))
    graphdef, state = nnx.split(model, nnx.Param)

    def apply_fn(s, x):
        return nnx.merge(graphdef, s)(x)

    x = np.random.default_rng(2).normal(size=(20, 6)).astype(np.float32)
    y = np.asarray(jnp.argmax(model(x), -1))
    table = sensitivity(apply_fn, state, x, y, qs=[0.0, 1.0])
    assert table.layers == ("fc1/kernel", "fc2/kernel")
    assert table.baseline == 1.0 and np.all(table.accuracy[:, 0] == 1.0)
    for i, layer in enumerate(table.layers):
        pruned = apply_masks(state, compute_masks(state, 1.0, where=only(layer)))
        assert table.accuracy[i, 1] == pytest.approx(accuracy(apply_fn, pruned, x, y))


def test_sensitivity_table_rows_and_text(problem):
    params, x, y = problem
    table = sensitivity(mlp_apply, params, x, y, qs=[0.0, 1.0])
    rows = table.rows()
    assert [(r["layer"], r["q"]) for r in rows] == [
        ("fc1/kernel", 0.0),
        ("fc1/kernel", 1.0),
        ("fc2/kernel", 0.0),
        ("fc2/kernel", 1.0),
    ]
    assert rows[1]["accuracy"] == table.accuracy[0, 1]
    text = str(table)
    assert text.startswith(f"baseline accuracy {100 * table.baseline:.2f}%")
    assert f"fc2/kernel  1  {100 * table.kept_fraction[1, 1]:.2f}" in text


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({}, r"exactly one of qs= .* or sparsities="),
        ({"qs": [1.0], "sparsities": [0.5]}, r"exactly one of qs="),
        ({"qs": [0.5, -1.0]}, r"qs must be finite and >= 0, got \[-1\.0\]"),
        ({"sparsities": [0.5, 1.0]}, r"sparsities must be in \[0, 1\), got \[1\.0\]"),
        ({"sparsities": [-0.1]}, r"sparsities must be in \[0, 1\), got \[-0\.1"),
        ({"qs": []}, r"q grid has shape \(0,\), expected a non-empty 1-D"),
        ({"qs": [1.0], "grid_batch": 0}, r"grid_batch must be an int >= 1, got 0"),
        ({"qs": [1.0], "where": lambda p, leaf: False}, r"params has no prunable leaf"),
    ],
)
def test_sensitivity_rejects_bad_options(problem, kwargs, match):
    params, x, y = problem
    with pytest.raises(ValueError, match=match):
        sensitivity(mlp_apply, params, x, y, **kwargs)


# --- plots ----------------------------------------------------------------------------------


def assert_png(path):
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    assert len(data) > 5_000  # axes, ticks and bars drawn, not an empty canvas


def test_weight_histogram_png(tmp_path):
    w = np.random.default_rng(0).normal(size=(40, 30))
    after = np.where(np.abs(w) > 1.0, w, 0.0)
    out = plot_weight_histogram(w, after, tmp_path / "sub" / "hist.png", title="fc1/kernel")
    assert out == tmp_path / "sub" / "hist.png"
    assert_png(out)
    with pytest.raises(ValueError, match="before is empty"):
        plot_weight_histogram(np.array([]), np.array([]), tmp_path / "x.png")


def test_history_png(tmp_path):
    history = [
        {"round": r, "kept_fraction": k, "accuracy": a, "note": "ignored"}
        for r, k, a in [(0, 1.0, 0.98), (1, 0.4, 0.975), (2, 0.12, 0.97)]
    ]
    assert_png(plot_history(history, tmp_path / "rounds.png", title="LeNet"))
    with pytest.raises(ValueError, match=r"history\[1\] lacks \['accuracy'\]"):
        plot_history([history[0], {"round": 1, "kept_fraction": 0.5}], tmp_path / "y.png")
    with pytest.raises(ValueError, match="history is empty"):
        plot_history([], tmp_path / "z.png")


def test_sensitivity_png(tmp_path, problem):
    params, x, y = problem
    table = sensitivity(mlp_apply, params, x, y, qs=[0.0, 0.5, 1.0])
    assert_png(plot_sensitivity(table, tmp_path / "sens.png"))
    with pytest.raises(TypeError, match="result is a dict, expected a Sensitivity"):
        plot_sensitivity({}, tmp_path / "w.png")
    assert isinstance(table, Sensitivity)


def test_importing_the_demo_modules_does_not_import_matplotlib():
    code = (
        "import sys, jaxprune.analysis, jaxprune.demo.models, jaxprune.demo.data; "
        "assert 'matplotlib' not in sys.modules, 'matplotlib imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
