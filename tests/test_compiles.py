"""update_masks never recompiles: in jaxprune's step, its round driver and Flax's own loops."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from flax.training import train_state
from helpers import count_compiles

import jaxprune


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(4)(nn.relu(nn.Dense(16)(x)))


MODEL = MLP()
X = jax.random.normal(jax.random.key(0), (32, 8))
Y = jnp.arange(32) % 4


def _params():
    return MODEL.init(jax.random.key(1), X[:1])["params"]


def _loss(params, batch, rng):
    del rng
    logits = MODEL.apply({"params": params}, batch[0])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch[1]).mean()


def _tx(masks):
    return jaxprune.keep_pruned(optax.sgd(0.1, momentum=0.9), masks)


def test_make_retrain_step():
    params = _params()
    masks = jaxprune.compute_masks(params, 0.5)
    tx = _tx(masks)
    step = jaxprune.make_retrain_step(_loss, tx)
    state = jaxprune.retrain_state(jaxprune.apply_masks(params, masks), tx, rng=jax.random.key(0))
    with count_compiles() as compiles:
        state, _ = step(state, (X, Y))
        for q in (1.0, 1.5):
            masks = jaxprune.compute_masks(state.params, q, previous=masks)
            state = state._replace(
                params=jaxprune.apply_masks(state.params, masks),
                opt_state=jaxprune.update_masks(state.opt_state, masks),
            )
            state, _ = step(state, (X, Y))
    assert compiles.of("step") == 1


def test_prune_and_retrain_compiles_the_step_once():
    with count_compiles() as compiles:
        rounds = jaxprune.prune_and_retrain(
            _params(),
            _loss,
            lambda epoch: [(X, Y)] * 2,
            lambda p: 0.0,
            rounds=4,
            optimizer=optax.sgd(0.01, momentum=0.9),
            q=[0.5, 1.0, 1.5, 2.0],
        )
        *_, last = rounds
    assert len(last.history) == 4
    assert compiles.of("step") == 1


def test_own_jit_step_on_tx_init():
    params = _params()
    masks = jaxprune.compute_masks(params, 0.5)
    tx = _tx(masks)
    opt_state = tx.init(params)

    @jax.jit
    def own_step(params, opt_state):
        grads = jax.grad(_loss)(params, (X, Y), None)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    with count_compiles() as compiles:
        params, opt_state = own_step(params, opt_state)
        masks = jaxprune.compute_masks(params, 1.2, previous=masks)
        opt_state = jaxprune.update_masks(opt_state, masks)
        params, opt_state = own_step(jaxprune.apply_masks(params, masks), opt_state)
    assert compiles.of("own_step") == 1


def test_flax_train_state():
    params = _params()
    masks = jaxprune.compute_masks(params, 0.5)
    state = train_state.TrainState.create(apply_fn=MODEL.apply, params=params, tx=_tx(masks))

    @jax.jit
    def ts_step(state):
        grads = jax.grad(_loss)(state.params, (X, Y), None)
        return state.apply_gradients(grads=grads)

    with count_compiles() as compiles:
        state = ts_step(state)
        masks = jaxprune.compute_masks(state.params, 1.2, previous=masks)
        state = state.replace(
            params=jaxprune.apply_masks(state.params, masks),
            opt_state=jaxprune.update_masks(state.opt_state, masks),
        )
        state = ts_step(state)
        state = ts_step(state)
    assert compiles.of("ts_step") == 1
    pruned = ~np.asarray(masks["Dense_0"]["kernel"])
    assert np.all(np.asarray(state.params["Dense_0"]["kernel"])[pruned] == 0.0)


def test_nnx_optimizer():
    model = nnx.Sequential(
        nnx.Linear(8, 16, rngs=nnx.Rngs(0)), nnx.relu, nnx.Linear(16, 4, rngs=nnx.Rngs(1))
    )
    masks = jaxprune.compute_masks(nnx.state(model, nnx.Param), 0.5)
    optimizer = nnx.Optimizer(model, _tx(masks), wrt=nnx.Param)

    @nnx.jit
    def nnx_step(model, optimizer):
        def loss(m):
            return optax.softmax_cross_entropy_with_integer_labels(m(X), Y).mean()

        optimizer.update(model, nnx.grad(loss)(model))

    with count_compiles() as compiles:
        nnx_step(model, optimizer)
        masks = jaxprune.compute_masks(nnx.state(model, nnx.Param), 1.2, previous=masks)
        nnx.update(model, jaxprune.apply_masks(nnx.state(model, nnx.Param), masks))
        optimizer.opt_state = jaxprune.update_masks(optimizer.opt_state, masks)
        nnx_step(model, optimizer)
        nnx_step(model, optimizer)
    assert compiles.of("nnx_step") == 1
