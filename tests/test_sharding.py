"""Data-parallel retraining: the step on a batch sharded over 4 (emulated) devices.

Runs in a subprocess because the device count is fixed when JAX starts.
"""

import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, sys.argv[1])
    from helpers import count_compiles
    import jax, jax.numpy as jnp, numpy as np, optax
    import flax.linen as nn
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from jaxprune.masks import apply_masks, compute_masks
    from jaxprune.retrain import make_retrain_step, retrain_state
    from jaxprune.transform import keep_pruned, update_masks

    assert jax.device_count() == 4, jax.devices()

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x, *, train):
            x = nn.relu(nn.Dense(32)(x))
            x = nn.Dropout(0.3, deterministic=not train)(x)
            return nn.Dense(4)(x)

    module = MLP()
    kx, ky = jax.random.split(jax.random.key(0))
    x = jax.random.normal(kx, (64, 16))
    y = jax.random.randint(ky, (64,), 0, 4)
    params = module.init(jax.random.key(1), x[:1], train=False)["params"]
    masks = compute_masks(params, 0.8)
    params = apply_masks(params, masks)

    def loss(p, batch, rng):
        logits = module.apply({"params": p}, batch[0], train=True, rngs={"dropout": rng})
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch[1]).mean()

    def run(state, put_batch, step):
        for i in range(6):
            if i == 3:  # a new round: prune further, swap masks in place
                new = compute_masks(state.params, 1.2, previous=masks)
                state = state._replace(params=apply_masks(state.params, new),
                                       opt_state=update_masks(state.opt_state, new))
            sl = slice((i % 2) * 32, (i % 2 + 1) * 32)
            state, m = step(state, put_batch((x[sl], y[sl])))
        return state

    tx = keep_pruned(optax.sgd(0.1, momentum=0.9), masks, weight_decay=1e-3)
    single = run(retrain_state(params, tx, rng=jax.random.key(2)), lambda b: b,
                 make_retrain_step(loss, tx))

    def check(state, label):
        for a, b in zip(jax.tree.leaves(single.params), jax.tree.leaves(state.params)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
        kept = np.asarray(state.opt_state.masks["Dense_0"]["kernel"])
        w = np.asarray(state.params["Dense_0"]["kernel"])
        assert np.all(w[~kept] == 0.0), label
        print(label, "ok")

    # 1) batch sharded over 4 devices, params and masks replicated
    mesh = Mesh(np.array(jax.devices()), ("data",))
    replicated = NamedSharding(mesh, P())
    put = lambda b: jax.device_put(b, NamedSharding(mesh, P("data")))
    state = jax.device_put(retrain_state(params, tx, rng=jax.random.key(2)), replicated)
    with count_compiles() as compiles:
        state = run(state, put, make_retrain_step(loss, tx))
    assert compiles.of("step") == 1, compiles.names
    assert state.params["Dense_0"]["kernel"].sharding.is_fully_replicated
    check(state, "replicated")

    # 2) 2x2 mesh: batch over "data", the layers (their masks and momentum too) over "model"
    mesh = Mesh(np.array(jax.devices()).reshape(2, 2), ("data", "model"))
    def spec(path, leaf):  # Megatron-style: Dense_0 split by outputs, Dense_1 by inputs
        name = jax.tree_util.keystr(path)
        if "Dense_0" in name:
            return NamedSharding(mesh, P(None, "model") if leaf.ndim == 2 else P("model"))
        if "Dense_1" in name and leaf.ndim == 2:
            return NamedSharding(mesh, P("model", None))
        return NamedSharding(mesh, P())
    state = retrain_state(params, tx, rng=jax.random.key(2))
    state = jax.tree_util.tree_map_with_path(lambda p, l: jax.device_put(l, spec(p, l)), state)
    put = lambda b: jax.device_put(b, NamedSharding(mesh, P("data")))
    with count_compiles() as compiles:
        state = run(state, put, make_retrain_step(loss, tx))
    assert compiles.of("step") == 1, compiles.names
    assert not state.opt_state.masks["Dense_0"]["kernel"].sharding.is_fully_replicated
    check(state, "sharded")
    """
)


def test_sharded_step_equals_single_device_step():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4")
    env["JAX_PLATFORMS"] = "cpu"
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, os.path.dirname(__file__)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "replicated ok" in result.stdout and "sharded ok" in result.stdout


SPARSITY_SCRIPT = textwrap.dedent(
    """
    import jax, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from jaxprune.masks import masks_for_sparsity

    assert jax.device_count() == 4, jax.devices()
    rng = np.random.default_rng(0)
    params = {
        "Dense_0": {"kernel": rng.normal(size=(64, 32)).astype(np.float32),
                    "bias": np.zeros(32, np.float32)},
        "Dense_1": {"kernel": np.round(rng.normal(size=(32, 8)), 1).astype(np.float32)},  # ties
    }
    previous = jax.tree.map(lambda x: rng.random(x.shape) > 0.2, params)
    mesh = Mesh(np.array(jax.devices()), ("fsdp",))
    def spec(path, leaf):  # FSDP: every kernel split over its first axis
        return NamedSharding(mesh, P("fsdp", None) if leaf.ndim == 2 else P())
    sharded = jax.tree_util.tree_map_with_path(lambda p, x: jax.device_put(x, spec(p, x)), params)
    for scope in ("layer", "global"):
        want = masks_for_sparsity(params, 0.7, scope=scope, previous=previous)
        got = masks_for_sparsity(sharded, 0.7, scope=scope, previous=previous)
        for w, g, x in zip(jax.tree.leaves(want), jax.tree.leaves(got), jax.tree.leaves(sharded)):
            assert np.array_equal(np.asarray(w), np.asarray(g)), scope
            assert g.sharding.is_equivalent_to(x.sharding, x.ndim), (scope, g.sharding)
        print(scope, "ok")
    """
)


def test_sharded_kernels_give_the_same_sparsity_masks_and_stay_sharded():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4")
    env["JAX_PLATFORMS"] = "cpu"
    result = subprocess.run(
        [sys.executable, "-c", SPARSITY_SCRIPT],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "layer ok" in result.stdout and "global ok" in result.stdout
