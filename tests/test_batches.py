"""Tests for jaxprune.batches (ArrayBatches) and the compiled epoch it feeds (``step.epoch``)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given
from hypothesis import strategies as st
from zoo import zoo

import jaxprune
from jaxprune.batches import ArrayBatches, epoch_rows


def _key(seed):
    return jax.random.key(seed, impl="rbg")  # compiles in a fraction of threefry's time


def _data(n=50, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 6)).astype(np.float32)
    return {"x": x, "y": (x @ rng.standard_normal((6, 3))).astype(np.float32)}


def _loss(params, batch, rng):
    # Uses the step's key, so a step run with another key (or out of order) gives other values.
    keep = jax.random.bernoulli(rng, 0.8, batch["x"].shape)
    pred = jnp.where(keep, batch["x"], 0.0) @ params["kernel"]
    return jnp.mean((pred - batch["y"]) ** 2)


@given(epoch=st.integers(0, 2**31 - 1), seed=st.integers(0, 2**32 - 1))
def test_each_epoch_is_part_of_a_permutation_cut_into_full_batches(epoch, seed):
    rows = np.asarray(epoch_rows(_key(seed), jnp.int32(epoch), size=50, batch_size=8))
    assert rows.shape == (6, 8)  # the 50 % 8 = 2 examples left over are dropped
    assert len(set(rows.ravel().tolist())) == 48
    assert rows.min() >= 0 and rows.max() < 50


@pytest.mark.parametrize(("n", "batch_size", "steps"), [(1, 1, 1), (7, 7, 1), (10, 3, 3)])
def test_batches_hold_the_examples_at_their_rows(n, batch_size, steps):
    data = _data(n)
    batches = ArrayBatches(data, batch_size=batch_size, seed=_key(3))
    assert (batches.size, batches.steps) == (n, steps)
    rows = np.asarray(batches.rows(4))
    got = list(batches(4))
    assert len(got) == steps
    for row, batch in zip(rows, got, strict=True):
        assert set(batch) == {"x", "y"} and isinstance(batch["x"], jax.Array)
        np.testing.assert_array_equal(batch["x"], data["x"][row])
        np.testing.assert_array_equal(batch["y"], data["y"][row])


def test_epochs_are_reproducible_and_differ():
    batches = ArrayBatches(_data(), batch_size=5, seed=_key(0))
    again = ArrayBatches(_data(), batch_size=5, seed=_key(0))
    np.testing.assert_array_equal(batches.rows(2), again.rows(2))
    assert not np.array_equal(batches.rows(2), batches.rows(3))
    other_seed = ArrayBatches(_data(), batch_size=5, seed=_key(1))
    assert not np.array_equal(batches.rows(2), other_seed.rows(2))


def test_numpy_data_is_copied_to_the_device_and_left_as_it_was():
    data = _data()
    before = {k: v.copy() for k, v in data.items()}
    on_device = jnp.asarray(data["y"])
    batches = ArrayBatches({"x": data["x"], "y": on_device}, batch_size=5)
    assert isinstance(batches.data["x"], jax.Array)
    assert batches.data["y"] is on_device  # a JAX array stays where it is
    for k in data:
        np.testing.assert_array_equal(data[k], before[k])


@pytest.mark.parametrize(
    ("data", "batch_size", "error", "match"),
    [
        ({"x": np.zeros((4, 2))}, 0, ValueError, r"batch_size is 0, expected an int in \[1, 4\]"),
        ({"x": np.zeros((4, 2))}, 5, ValueError, r"batch_size is 5.*4 examples"),
        ({"x": np.zeros((4, 2))}, 2.0, ValueError, r"batch_size is 2\.0"),
        ({"x": np.zeros((4, 2))}, True, ValueError, r"batch_size is True"),
        ({"x": np.zeros((4, 2)), "y": np.zeros(3)}, 2, ValueError, r"data\['y'\] has 3 examples"),
        ({"x": np.zeros((4, 2)), "n": 4}, 2, TypeError, r"data\['n'\] is of type int"),
        ({"x": np.zeros((4, 2)), "s": np.float32(1)}, 2, ValueError, r"data\['s'\] is a scalar"),
        ({}, 1, ValueError, "holds no array"),
    ],
)
def test_bad_data_or_batch_size_is_refused(data, batch_size, error, match):
    with pytest.raises(error, match=match):
        ArrayBatches(data, batch_size=batch_size)


def _setup():
    params = {"kernel": jnp.asarray(np.random.default_rng(1).standard_normal((6, 3)), jnp.float32)}
    masks = jaxprune.compute_masks(params, 0.8)
    tx = jaxprune.keep_pruned(optax.sgd(0.05, momentum=0.9), masks, weight_decay=1e-3)
    state = jaxprune.retrain_state(jaxprune.apply_masks(params, masks), tx, rng=_key(7))
    return masks, tx, state


def test_step_epoch_runs_the_same_steps_as_iterating_the_batches():
    masks, tx, state = _setup()
    traces = []

    def loss(p, batch, rng):
        traces.append(1)
        return _loss(p, batch, rng)

    step = jaxprune.make_retrain_step(loss, tx)
    batches = ArrayBatches(_data(), batch_size=8, seed=_key(2))
    looped = state
    for epoch in range(3):
        losses = []
        for batch in batches(epoch):
            looped, metrics = step(looped, batch)
            losses.append(metrics["loss"])
        state, metrics = step.epoch(state, batches, epoch)
        assert metrics["loss"].shape == (batches.steps,)
        np.testing.assert_allclose(metrics["loss"], losses, rtol=1e-5)
        np.testing.assert_allclose(state.params["kernel"], looped.params["kernel"], rtol=1e-5)
        assert int(state.step) == int(looped.step) == (epoch + 1) * batches.steps
    assert np.all(np.asarray(state.params["kernel"])[~np.asarray(masks["kernel"])] == 0.0)
    assert len(traces) == 2  # once for the step, once for the epoch: epochs do not recompile


def test_step_epoch_takes_only_array_batches():
    _, tx, state = _setup()
    step = jaxprune.make_retrain_step(_loss, tx)
    with pytest.raises(TypeError, match=r"step\.epoch takes a jaxprune\.ArrayBatches, got list"):
        step.epoch(state, [_data()], 0)


def test_driver_runs_array_batches_as_it_iterates_them():
    data = ArrayBatches(_data(), batch_size=8, seed=_key(5))
    params = {"kernel": jnp.asarray(np.random.default_rng(1).standard_normal((6, 3)), jnp.float32)}

    def run(batches):
        return list(
            jaxprune.prune_and_retrain(
                params,
                _loss,
                batches,
                lambda p: 0.0,
                rounds=2,
                optimizer=optax.sgd(0.05, momentum=0.9),
                q=[0.5, 1.0],
                epochs=2,
                seed=_key(0),
            )
        )[-1]

    scanned, looped = run(data), run(lambda e: list(data(e)))
    np.testing.assert_allclose(scanned.params["kernel"], looped.params["kernel"], rtol=1e-5)
    for a, b in zip(scanned.history, looped.history, strict=True):
        assert a.kept_fraction == b.kept_fraction
        assert a.train_loss == pytest.approx(b.train_loss, rel=1e-5)


@pytest.mark.standard_promotion  # the zoo's Transformers add a (seq, d) table to (batch, seq, d)
@pytest.mark.slow  # 9-22 s each (a model's step compiled twice): CI's second step
@pytest.mark.parametrize("name", ["nnx_transformer_scan", "nnx_cnn"])
def test_step_epoch_on_zoo_models_equals_the_loop(name):
    # Integer tokens through Embed and scan-stacked NNX blocks; images through a BatchNorm CNN
    # (in eval mode: the statistics as they are).
    model = zoo()[name]
    x = jnp.concatenate([model.inputs] * 3)
    y = jnp.arange(x.shape[0]) % 4
    masks = jaxprune.compute_masks(model.params, 0.8, stacked=model.stacked)
    tx = jaxprune.keep_pruned(optax.sgd(0.05, momentum=0.9), masks)

    def loss(p, batch, rng):
        del rng
        logits = model.apply(p, batch[0])
        return optax.softmax_cross_entropy_with_integer_labels(logits[..., :4], batch[1]).mean()

    step = jaxprune.make_retrain_step(loss, tx)
    data = ArrayBatches((x, y), batch_size=x.shape[0] // 3, seed=_key(1))
    start = jaxprune.retrain_state(jaxprune.apply_masks(model.params, masks), tx, rng=_key(0))
    scanned, _ = step.epoch(start, data, 0)
    looped = start
    for batch in data(0):
        looped, _ = step(looped, batch)
    for a, b, m in zip(
        jax.tree.leaves(scanned.params),
        jax.tree.leaves(looped.params),
        jax.tree.leaves(masks),
        strict=True,
    ):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
        assert np.all(np.asarray(a)[~np.asarray(m)] == 0.0)
