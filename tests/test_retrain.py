"""Tests for jaxprune.retrain: the jitted retrain step, Han's dropout rule and the round driver."""

import itertools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxprune.masks import apply_masks, compute_masks, masks_for_sparsity
from jaxprune.retrain import (
    RetrainState,
    connection_counts,
    dropout_rate,
    make_retrain_step,
    nnx_loss,
    retrain_dropout_rates,
    retrain_state,
)
from jaxprune.rounds import prune_and_retrain
from jaxprune.transform import keep_pruned, update_masks

# --- a small synthetic task: 4 classes from a random linear teacher on 8x8 "images" ------------


def _task(n=256, seed=0):
    rng = np.random.default_rng(seed)  # numpy: compiling threefry is slow on 2 cores
    x = rng.standard_normal((n, 8, 8, 1)).astype(np.float32)
    y = np.argmax(x.reshape(n, -1) @ rng.standard_normal((64, 4)), axis=-1)
    return jnp.asarray(x), jnp.asarray(y)


def _key(seed):
    # RBG keys compile in a fraction of threefry's time; the step works with either.
    return jax.random.key(seed, impl="rbg")


def _xent(logits, y):
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


class LinenMLP(nn.Module):
    rate: float = 0.2

    @nn.compact
    def __call__(self, x, *, train):
        x = nn.relu(nn.Dense(64)(x.reshape(x.shape[0], -1)))
        x = nn.Dropout(self.rate, deterministic=not train)(x)
        return nn.Dense(4)(x)


class LinenCNN(nn.Module):
    @nn.compact
    def __call__(self, x, *, train):
        del train
        x = nn.relu(nn.Conv(16, (3, 3))(x))
        x = nn.max_pool(x, (2, 2), (2, 2))
        return nn.Dense(4)(x.reshape(x.shape[0], -1))


class NnxMLP(nnx.Module):
    def __init__(self, rngs):
        self.fc1 = nnx.Linear(64, 64, rngs=rngs)
        self.drop = nnx.Dropout(0.2, rngs=rngs)
        self.fc2 = nnx.Linear(64, 4, rngs=rngs)

    def __call__(self, x):
        return self.fc2(self.drop(nnx.relu(self.fc1(x.reshape(x.shape[0], -1)))))


class NnxCNN(nnx.Module):
    def __init__(self, rngs):
        self.conv = nnx.Conv(1, 16, (3, 3), rngs=rngs)
        self.fc = nnx.Linear(4 * 4 * 16, 4, rngs=rngs)

    def __call__(self, x):
        x = nnx.max_pool(nnx.relu(self.conv(x)), (2, 2), (2, 2))
        return self.fc(x.reshape(x.shape[0], -1))


def _linen_setup(module):
    x, y = _task()
    params = module.init(_key(1), x[:1], train=False)["params"]

    def loss(p, batch, rng):
        logits = module.apply({"params": p}, batch[0], train=True, rngs={"dropout": rng})
        return _xent(logits, batch[1])

    return params, loss, (x, y)


def _nnx_setup(model):
    x, y = _task()
    loss, params, _ = nnx_loss(model, lambda m, batch: _xent(m(batch[0]), batch[1]))
    return params, loss, (x, y)


SETUPS = {
    "linen-mlp": lambda: _linen_setup(LinenMLP()),
    "linen-cnn": lambda: _linen_setup(LinenCNN()),
    "nnx-mlp": lambda: _nnx_setup(NnxMLP(nnx.Rngs(_key(1)))),
    "nnx-cnn": lambda: _nnx_setup(NnxCNN(nnx.Rngs(_key(1)))),
}


def _pruned_values(params, masks):
    return np.concatenate(
        [
            np.asarray(p)[~np.asarray(m)].ravel()
            for p, m in zip(jax.tree.leaves(params), jax.tree.leaves(masks), strict=True)
        ]
    )


@pytest.mark.standard_promotion  # optax's Adam / a test model's broadcast bias
@pytest.mark.parametrize("name", sorted(SETUPS))
def test_retrain_step_reduces_loss_with_90_percent_pruned(name):
    params, loss, (x, y) = SETUPS[name]()
    masks = masks_for_sparsity(params, 0.9)
    params = apply_masks(params, masks)
    tx = keep_pruned(optax.adam(3e-2), masks, weight_decay=1e-4)
    step = make_retrain_step(loss, tx)
    state = retrain_state(params, tx, rng=_key(0))
    full_loss = jax.jit(lambda p: loss(p, (x, y), _key(5)))
    before = float(full_loss(params))
    for i in range(60):
        sl = slice((i % 4) * 64, (i % 4 + 1) * 64)
        state, metrics = step(state, (x[sl], y[sl]))
    after = float(full_loss(state.params))
    assert after < 0.9 * before, (before, after)
    assert np.all(_pruned_values(state.params, masks) == 0.0)
    assert int(state.step) == 60 and set(metrics) == {"loss"}


def test_step_does_not_recompile_when_masks_change_and_returns_aux():
    params, _, (x, y) = SETUPS["linen-mlp"]()
    traces = []
    module = LinenMLP()

    def loss(p, batch, rng):
        traces.append(1)
        logits = module.apply({"params": p}, batch[0], train=True, rngs={"dropout": rng})
        return _xent(logits, batch[1]), {"accuracy": jnp.mean(logits.argmax(-1) == batch[1])}

    masks = compute_masks(params, 0.5)
    tx = keep_pruned(optax.sgd(0.05, momentum=0.9), masks)
    step = make_retrain_step(loss, tx, has_aux=True)
    state = retrain_state(apply_masks(params, masks), tx, rng=_key(0))
    state, metrics = step(state, (x[:32], y[:32]))
    for q in (1.0, 1.5):
        masks = compute_masks(state.params, q, previous=masks)
        state = state._replace(
            params=apply_masks(state.params, masks), opt_state=update_masks(state.opt_state, masks)
        )
        state, metrics = step(state, (x[:32], y[:32]))
        assert np.all(_pruned_values(state.params, masks) == 0.0)
    assert len(traces) == 1
    assert set(metrics) == {"loss", "accuracy"} and 0.0 <= float(metrics["accuracy"]) <= 1.0


def test_step_uses_a_fresh_dropout_key_each_step():
    seen = []
    tx = optax.sgd(0.0)
    step = make_retrain_step(lambda p, b, rng: jnp.sum(p["w"]) * 0.0 + jax.random.uniform(rng), tx)
    state = retrain_state({"w": jnp.ones(2)}, tx, rng=_key(3))
    for _ in range(3):
        state, m = step(state, None)
        seen.append(float(m["loss"]))
    assert len(set(seen)) == 3
    expected = float(jax.random.uniform(jax.random.fold_in(_key(3), 2)))
    assert seen[2] == expected


def test_nnx_loss_sets_dropout_rate_on_a_copy_only():
    model = NnxMLP(nnx.Rngs(_key(0)))
    x, y = _task(n=16)
    loss, params, _ = nnx_loss(model, lambda m, b: m(b[0]))
    no_drop = loss(params, (x, y), _key(0), dropout_rates={"drop": 0.0})
    model.eval()
    np.testing.assert_allclose(no_drop, model(x), rtol=1e-6)
    dropped = loss(params, (x, y), _key(0), dropout_rates={"drop": 0.9})
    assert not np.allclose(dropped, no_drop)
    assert model.drop.rate == 0.2  # the user's model is unchanged
    with pytest.raises(ValueError, match=r"names \['fc9'\], which are not nnx.Dropout"):
        loss(params, (x, y), _key(0), dropout_rates={"fc9": 0.1})


# --- Han's dropout rule ------------------------------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(
    rate=st.floats(0.0, 0.99),
    before=st.integers(1, 10**7),
    fraction=st.floats(0.0, 1.0),
)
def test_dropout_rate_follows_han_eq_2(rate, before, fraction):
    after = math.floor(before * fraction)
    new = dropout_rate(rate, before, after)
    assert new == pytest.approx(rate * math.sqrt(after / before), rel=1e-12, abs=1e-15)
    assert 0.0 <= new <= rate
    # pruning more never increases the rate
    assert dropout_rate(rate, before, max(after - 1, 0)) <= new


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((1.0, 10, 5), r"rate must be in \[0, 1\), got 1.0"),
        ((-0.1, 10, 5), r"rate must be in \[0, 1\), got -0.1"),
        ((0.5, 0, 0), r"connections_before=0, connections_after=0"),
        ((0.5, 10, 11), r"connections_before=10, connections_after=11"),
    ],
)
def test_dropout_rate_rejects_bad_input(args, match):
    with pytest.raises(ValueError, match=match):
        dropout_rate(*args)


def test_connection_counts_and_rates_follow_the_feeding_kernel():
    params, _, _ = SETUPS["nnx-mlp"]()
    masks = masks_for_sparsity(params, 0.75)
    counts = connection_counts(masks)
    assert counts == {"fc1/kernel": (1024, 4096), "fc2/kernel": (64, 256)}
    rates = retrain_dropout_rates({"drop": (0.5, "fc1/kernel")}, masks)
    assert rates == {"drop": pytest.approx(0.25)}
    with pytest.raises(ValueError, match=r"dropout\['drop'\] follows 'fc1/bias', which is not"):
        retrain_dropout_rates({"drop": (0.5, "fc1/bias")}, masks)


# --- the round driver ---------------------------------------------------------------------------


def _driver_args(model_kind="linen"):
    x, y = _task(n=128)
    if model_kind == "linen":
        params = LinenMLP().init(_key(1), x[:1], train=False)["params"]

        def loss(p, batch, rng, dropout_rates):
            module = LinenMLP(rate=dropout_rates["drop"])  # a new module with the rescaled rate
            logits = module.apply({"params": p}, batch[0], train=True, rngs={"dropout": rng})
            return _xent(logits, batch[1])

        @jax.jit
        def correct(p):
            return jnp.mean(LinenMLP().apply({"params": p}, x, train=False).argmax(-1) == y)

        def accuracy(p):
            return float(correct(p))

        dropout = {"drop": (0.5, "Dense_0/kernel")}
    else:
        model = NnxMLP(nnx.Rngs(_key(1)))
        loss, params, _ = nnx_loss(model, lambda m, batch: _xent(m(batch[0]), batch[1]))

        def accuracy(p):
            nnx.update(model, p)
            model.eval()
            return float(jnp.mean(model(x).argmax(-1) == y))

        dropout = {"drop": (0.5, "fc1/kernel")}

    def batches(epoch):
        order = np.random.default_rng(epoch).permutation(len(x))
        return [(x[order[i : i + 32]], y[order[i : i + 32]]) for i in range(0, len(x), 32)]

    return params, loss, batches, accuracy, dropout


@pytest.mark.parametrize(("kind", "qs"), [("linen", [0.5, 1.0, 1.5]), ("nnx", [0.5, 1.2])])
def test_driver_prunes_more_each_round_and_records_history(kind, qs):
    params, loss, batches, accuracy, dropout = _driver_args(kind)
    seen_epochs = []
    states = list(
        prune_and_retrain(
            params,
            loss,
            batches,
            accuracy,
            rounds=len(qs),
            q=qs,
            optimizer=optax.chain(optax.add_decayed_weights(1e-4), optax.sgd(0.05, momentum=0.9)),
            epochs=2,
            dropout=dropout,
            seed=_key(0),
            on_epoch=lambda r, e, mean: seen_epochs.append((r, e, mean)),
        )
    )
    assert [s.round for s in states] == list(range(1, len(qs) + 1))
    history = states[-1].history
    assert [h.q for h in history] == qs
    kept = [h.kept_fraction for h in history]
    assert all(a > b for a, b in itertools.pairwise(kept)) and kept[-1] > 0.0
    final = states[-1]
    counts = connection_counts(final.masks)
    total = sum(t for _, t in counts.values())
    assert kept[-1] == pytest.approx(sum(k for k, _ in counts.values()) / total)
    kernel = "Dense_0/kernel" if kind == "linen" else "fc1/kernel"
    k, t = counts[kernel]
    assert history[-1].dropout_rates["drop"] == pytest.approx(0.5 * math.sqrt(k / t))
    assert all(0.0 <= h.metric <= 1.0 and math.isfinite(h.train_loss) for h in history)
    assert [(r, e) for r, e, _ in seen_epochs] == [(r, e) for r in range(len(qs)) for e in range(2)]
    assert np.all(_pruned_values(final.params, final.masks) == 0.0)
    # masks only shrink from round to round
    for a, b in itertools.pairwise(states):
        for ma, mb in zip(jax.tree.leaves(a.masks), jax.tree.leaves(b.masks), strict=True):
            assert not np.any(np.asarray(mb) & ~np.asarray(ma))


def test_driver_resume_reproduces_the_uninterrupted_run():
    params, loss, batches, accuracy, _ = _driver_args("linen")
    kwargs = dict(
        rounds=2, sparsity=[0.5, 0.8], optimizer=optax.sgd(0.05, momentum=0.9), seed=_key(7)
    )

    def loss_fn(p, b, rng):
        return loss(p, b, rng, {"drop": 0.3})  # no dropout schedule: one compilation

    full = list(prune_and_retrain(params, loss_fn, batches, accuracy, **kwargs))[-1]
    first = next(iter(prune_and_retrain(params, loss_fn, batches, accuracy, **kwargs)))
    # as if restored from a checkpoint: host numpy arrays
    first = first._replace(
        params=jax.device_get(first.params),
        masks=jax.device_get(first.masks),
        opt_state=jax.device_get(first.opt_state),
    )
    resumed = list(prune_and_retrain(params, loss_fn, batches, accuracy, resume=first, **kwargs))
    assert [s.round for s in resumed] == [2]
    for a, b in zip(jax.tree.leaves(full.masks), jax.tree.leaves(resumed[-1].masks), strict=True):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(jax.tree.leaves(full.params), jax.tree.leaves(resumed[-1].params), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    assert [h.kept_fraction_per_layer for h in full.history] == [
        h.kept_fraction_per_layer for h in resumed[-1].history
    ]


def test_driver_bad_arguments():
    params, loss, batches, accuracy, _ = _driver_args("linen")
    with pytest.raises(ValueError, match="exactly one of q"):
        next(
            prune_and_retrain(
                params, loss, batches, accuracy, rounds=1, optimizer=optax.sgd(0.01, momentum=0.9)
            )
        )
    for bad, error, match in (
        ({"rounds": 0}, ValueError, r"rounds must be an int >= 1, got 0"),
        ({"rounds": 2.0}, TypeError, r"rounds must be an int, got float"),
        ({"rounds": 1, "epochs": True}, TypeError, r"epochs must be an int, got bool"),
    ):
        with pytest.raises(error, match=match):
            next(
                prune_and_retrain(
                    params,
                    loss,
                    batches,
                    accuracy,
                    q=1.0,
                    optimizer=optax.sgd(0.01, momentum=0.9),
                    **bad,
                )
            )
    with pytest.raises(TypeError, match=r"optimizer must be an optax GradientTransformation"):
        next(
            prune_and_retrain(params, loss, batches, accuracy, rounds=1, q=1.0, optimizer=optax.sgd)
        )
    with pytest.raises(ValueError, match=r"q has 2 entries, expected rounds=3"):
        next(
            prune_and_retrain(
                params,
                loss,
                batches,
                accuracy,
                rounds=3,
                q=[0.5, 1.0],
                optimizer=optax.sgd(0.01, momentum=0.9),
            )
        )
    with pytest.raises(ValueError, match=r"batches\(0\) yielded no batch"):
        next(
            prune_and_retrain(
                params,
                loss,
                lambda e: [],
                accuracy,
                rounds=1,
                q=0.5,
                optimizer=optax.sgd(0.01, momentum=0.9),
                dropout={"drop": (0.5, "Dense_0/kernel")},
            )
        )


def test_retrain_state_is_a_named_tuple():
    s = retrain_state({"w": jnp.ones(2)}, optax.adam(0.1), rng=_key(0))
    assert isinstance(s, RetrainState) and s.step.dtype == jnp.int32
