"""Orbax checkpoints of jaxprune's states: RetrainState, masks in any optax chain, RoundsState.

The states are NamedTuples of arrays, so orbax's StandardCheckpointer saves them as they are;
restored against an abstract copy of the state (shapes, dtypes, shardings), they come back with
the same tree, dtypes and shardings; the jitted step takes them, and swapping masks into a
restored state with ``update_masks`` does not recompile it.
"""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import count_compiles

import jaxprune

ocp = pytest.importorskip("orbax.checkpoint")

SCRIPT = textwrap.dedent(
    """
    import os, sys
    sys.path.insert(0, sys.argv[1])
    from helpers import count_compiles
    import jax, jax.numpy as jnp, numpy as np, optax
    import orbax.checkpoint as ocp
    from jax.sharding import NamedSharding, PartitionSpec as P
    import jaxprune

    mesh = jax.make_mesh((4,), ("model",))
    col = NamedSharding(mesh, P(None, "model"))
    params = {
        "fc": {
            "kernel": jax.device_put(jax.random.normal(jax.random.key(0), (8, 16)), col),
            "bias": jax.device_put(jnp.zeros(16), NamedSharding(mesh, P("model"))),
        }
    }
    masks = jaxprune.compute_masks(params, 1.0)
    tx = optax.chain(optax.clip_by_global_norm(1.0), jaxprune.keep_pruned(optax.adam(1e-2), masks))

    def loss(p, b, rng):
        return jnp.mean((b @ p["fc"]["kernel"] + p["fc"]["bias"]) ** 2)

    step = jaxprune.make_retrain_step(loss, tx)
    x = jnp.ones((4, 8))
    state, _ = step(jaxprune.retrain_state(jaxprune.apply_masks(params, masks), tx,
                                           rng=jax.random.key(1)), x)
    ckpt = ocp.StandardCheckpointer()
    path = os.path.join(sys.argv[2], "state")
    ckpt.save(path, state)
    ckpt.wait_until_finished()
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    back = ckpt.restore(path, abstract)
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(back), strict=True):
        assert a.sharding.is_equivalent_to(b.sharding, a.ndim), (a.sharding, b.sharding)
        np.testing.assert_array_equal(np.asarray(jax.random.key_data(a) if
            jnp.issubdtype(a.dtype, jax.dtypes.prng_key) else a), np.asarray(
            jax.random.key_data(b) if jnp.issubdtype(b.dtype, jax.dtypes.prng_key) else b))
    back, _ = step(back, x)  # committed arrays: this first step may compile once
    with count_compiles() as compiles:
        new = jaxprune.compute_masks(back.params, 1.5, previous=masks)
        back = back._replace(params=jaxprune.apply_masks(back.params, new),
                             opt_state=jaxprune.update_masks(back.opt_state, new))
        back, _ = step(back, x)
    assert compiles.of("step") == 0, compiles.names
    kernel = np.asarray(back.params["fc"]["kernel"])
    assert np.all(kernel[~np.asarray(new["fc"]["kernel"])] == 0.0)
    print("ok")
    """
)


def _loss(p, b, rng):
    del rng
    return jnp.mean((b @ p["fc"]["kernel"] + p["fc"]["bias"] - 1.0) ** 2)


def _params():
    return {"fc": {"kernel": jax.random.normal(jax.random.key(0), (8, 4)), "bias": jnp.zeros(4)}}


def _save_restore(tmp_path, tree, name="state"):
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(tmp_path / name, tree)
    ckpt.wait_until_finished()
    return ckpt.restore(tmp_path / name, jax.tree.map(ocp.utils.to_shape_dtype_struct, tree))


def _assert_same(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.standard_promotion  # optax's Adam / a test model's broadcast bias
@pytest.mark.parametrize(
    "wrap",
    [
        lambda inner: inner,
        lambda inner: optax.chain(optax.clip_by_global_norm(1.0), inner),
        lambda inner: optax.MultiSteps(inner, every_k_schedule=2),
    ],
    ids=["keep_pruned", "in_a_chain", "in_multisteps"],
)
def test_retrain_state_round_trips_and_reuses_the_compiled_step(tmp_path, wrap):
    params = _params()
    masks = jaxprune.compute_masks(params, 1.0)
    tx = wrap(jaxprune.keep_pruned(optax.adam(1e-2), masks, weight_decay=1e-4))
    step = jaxprune.make_retrain_step(_loss, tx)
    x = jnp.ones((4, 8))
    state = jaxprune.retrain_state(jaxprune.apply_masks(params, masks), tx, rng=jax.random.key(1))
    state, _ = step(state, x)
    back = _save_restore(tmp_path, state)
    _assert_same(state, back)
    # Restored arrays are committed to their device, so the first step on them may compile once
    # (as it must in the fresh process that restores); swapping masks after that never does.
    expected, _ = step(state, x)
    got, _ = step(back, x)
    _assert_same(expected.params, got.params)
    with count_compiles() as compiles:
        new = jaxprune.compute_masks(got.params, 1.5, previous=masks)
        got = got._replace(
            params=jaxprune.apply_masks(got.params, new),
            opt_state=jaxprune.update_masks(got.opt_state, new),
        )
        got, _ = step(got, x)
    assert compiles.of("step") == 0, compiles.names
    kernel = np.asarray(got.params["fc"]["kernel"])
    assert np.all(kernel[~np.asarray(new["fc"]["kernel"])] == 0.0)


def test_prune_gradients_state_and_masks_round_trip(tmp_path):
    params = _params()
    masks = jaxprune.compute_masks(params, 1.0)
    tx = optax.chain(jaxprune.prune_gradients(masks), optax.sgd(0.1, momentum=0.9))
    opt_state = tx.init(params)
    _assert_same(opt_state, _save_restore(tmp_path, opt_state, "opt"))
    _assert_same(masks, _save_restore(tmp_path, masks, "masks"))


@pytest.mark.standard_promotion  # optax's Adam / a test model's broadcast bias
def test_rounds_state_round_trips_and_resumes(tmp_path):
    x = jax.random.normal(jax.random.key(2), (16, 8))
    kwargs = dict(rounds=2, optimizer=optax.sgd(0.01, momentum=0.9), q=[0.5, 1.0])
    runs = jaxprune.prune_and_retrain(_params(), _loss, lambda e: [x] * 3, lambda p: 0.0, **kwargs)
    first = next(runs)
    # The arrays go to orbax; the history (Python floats and dicts) is JSON a checkpoint keeps
    # beside them, as `orbax.checkpoint.args.Composite` of StandardSave and JsonSave does.
    ckpt = ocp.Checkpointer(ocp.CompositeCheckpointHandler())
    arrays = {"params": first.params, "masks": first.masks, "opt_state": first.opt_state}
    history = [record._asdict() for record in first.history]
    ckpt.save(
        tmp_path / "round",
        ocp.args.Composite(
            arrays=ocp.args.StandardSave(arrays), history=ocp.args.JsonSave(history)
        ),
    )
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, arrays)
    back = ckpt.restore(
        tmp_path / "round",
        ocp.args.Composite(
            arrays=ocp.args.StandardRestore(abstract), history=ocp.args.JsonRestore()
        ),
    )
    resume = jaxprune.RoundsState(
        first.round,
        back.arrays["params"],
        back.arrays["masks"],
        back.arrays["opt_state"],
        tuple(jaxprune.RoundRecord(**r) for r in back.history),
    )
    resumed = list(
        jaxprune.prune_and_retrain(
            _params(), _loss, lambda e: [x] * 3, lambda p: 0.0, resume=resume, **kwargs
        )
    )[-1]
    uninterrupted = next(runs)
    _assert_same(uninterrupted.masks, resumed.masks)
    for a, b in zip(
        jax.tree.leaves(uninterrupted.params), jax.tree.leaves(resumed.params), strict=True
    ):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    assert resumed.history == uninterrupted.history


def test_sharded_state_restores_with_its_shardings(tmp_path):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4")
    tests = os.path.dirname(__file__)
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, tests, str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("ok")
