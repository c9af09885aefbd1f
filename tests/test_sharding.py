"""Sharded params and batches over 4 (emulated) devices: the retrain step, and the mask functions
on FSDP and FSDP x tensor-parallel kernels (same answers, masks sharded like their params, no
whole-leaf gather in the compiled programs, clear errors for masks placed otherwise).

Runs in a subprocess because the device count is fixed when JAX starts.
"""

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

# One 4-device subprocess runs every script here (about a minute): in CI's slow step.
pytestmark = pytest.mark.slow

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


MASKS_SCRIPT = textwrap.dedent(
    """
    import re
    import jax, jax.numpy as jnp, numpy as np, optax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    import jaxprune
    from jaxprune.transform import keep_pruned, update_masks

    assert jax.device_count() == 4, jax.devices()
    rng = np.random.default_rng(0)
    params = {
        "Dense_0": {"kernel": rng.normal(size=(64, 32)).astype(np.float32),
                    "bias": np.zeros(32, np.float32)},
        "Dense_1": {"kernel": np.round(rng.normal(size=(32, 8)), 1).astype(np.float32)},  # ties
    }
    previous = jax.tree.map(lambda x: rng.random(x.shape) > 0.2, params)
    sizes = [x.size for x in jax.tree.leaves(params) if x.ndim == 2]

    def place(tree, spec):
        return jax.tree.map(lambda x: jax.device_put(x, NamedSharding(mesh, spec(x))), tree)

    def same(want, got, like, label):
        for w, g, x in zip(jax.tree.leaves(want), jax.tree.leaves(got), jax.tree.leaves(like)):
            assert np.array_equal(np.asarray(w), np.asarray(g)), label
            assert g.sharding.is_equivalent_to(x.sharding, x.ndim), (label, g.sharding, x.sharding)

    def no_gather(fn, *args, label):
        # Compiled for the sharded inputs: any all-gather must be smaller than a whole kernel.
        hlo = (fn if hasattr(fn, "lower") else jax.jit(fn)).lower(*args).compile().as_text()
        for dims in re.findall(r"\\[([\\d,]*)\\][^=\\n]*? all-gather\\(", hlo):
            n = int(np.prod([int(d) for d in dims.split(",") if d]))
            assert n < min(sizes), (label, "all-gather of", dims)

    # The unsharded answers, once.
    want_cm = jaxprune.compute_masks(params, 0.8, previous=previous)
    want_ms = {scope: jaxprune.masks_for_sparsity(params, 0.7, scope=scope, previous=previous)
               for scope in ("layer", "global")}
    want_pruned = jaxprune.apply_masks(params, want_ms["global"])
    tx = keep_pruned(optax.sgd(0.1, momentum=0.9), want_ms["global"], weight_decay=1e-3)
    grads = jax.tree.map(lambda x: rng.normal(size=x.shape).astype(np.float32), params)
    want_updates, _ = tx.update(grads, tx.init(want_pruned), want_pruned)
    want_new = jaxprune.compute_masks(want_pruned, 1.2, previous=want_ms["global"])
    want_summary = jaxprune.summarize(params, want_new)

    meshes = {
        "fsdp": (Mesh(np.array(jax.devices()), ("fsdp",)), P("fsdp", None)),
        "fsdp x tp": (Mesh(np.array(jax.devices()).reshape(2, 2), ("fsdp", "tp")), P("fsdp", "tp")),
    }
    for label, (mesh, kernel_spec) in meshes.items():
        spec = lambda x: kernel_spec if x.ndim == 2 else P()
        sharded, prev_s = place(params, spec), place(previous, spec)
        # No implicit device-to-host copy of an array: only explicit scalar fetches.
        with jax.transfer_guard_device_to_host("disallow"):
            got = jaxprune.compute_masks(sharded, 0.8, previous=prev_s)
            same(want_cm, got, sharded, label)
            no_gather(lambda p, q, m: jaxprune.compute_masks(p, q, previous=m),
                      sharded, 0.8, prev_s, label=label)
            for scope in ("layer", "global"):
                got = jaxprune.masks_for_sparsity(sharded, 0.7, scope=scope, previous=prev_s)
                same(want_ms[scope], got, sharded, (label, scope))
                no_gather(lambda p, s, m: jaxprune.masks_for_sparsity(p, s, scope=scope, previous=m),
                          sharded, 0.7, prev_s, label=(label, scope))
            masks = got
            pruned = jaxprune.apply_masks(sharded, masks)
            same(want_pruned, pruned, sharded, label)
            no_gather(jaxprune.apply_masks, sharded, masks, label=label)

            state = tx.init(pruned)  # the factory's NumPy masks are placed like their params
            same(want_ms["global"], state.masks, sharded, label)
            grads_s = place(grads, spec)
            updates, state = jax.jit(tx.update)(grads_s, state, pruned)
            for w, u, x in zip(jax.tree.leaves(want_updates), jax.tree.leaves(updates),
                               jax.tree.leaves(sharded)):
                np.testing.assert_allclose(np.asarray(w), np.asarray(u), rtol=1e-6)
                assert u.sharding.is_equivalent_to(x.sharding, x.ndim), label
            no_gather(tx.update, grads_s, state, pruned, label=label)

            new = jaxprune.compute_masks(pruned, 1.2, previous=masks)
            same(want_new, new, sharded, label)
            swapped = update_masks(state, new)
            same(want_new, swapped.masks, sharded, label)
        assert jaxprune.summarize(sharded, new) == want_summary, label

        # Masks placed otherwise than their params: an error naming the leaf, never a re-shard.
        other = NamedSharding(mesh, P(None, mesh.axis_names[0]))
        wrong = {**masks, "Dense_0": {**masks["Dense_0"], "kernel": jax.device_put(
            masks["Dense_0"]["kernel"], other)}}
        for fn in (lambda: jaxprune.apply_masks(sharded, wrong),
                   lambda: keep_pruned(optax.sgd(0.1), wrong).init(sharded),
                   lambda: update_masks(state, wrong),
                   lambda: jaxprune.masks_for_sparsity(sharded, 0.5, previous=wrong)):
            try:
                fn()
            except ValueError as e:
                assert "['Dense_0/kernel'] is placed as" in str(e) and "sharded like" in str(e), e
            else:
                raise AssertionError("a mask sharded otherwise was accepted")
        print(label, "ok")

    # A mesh that does not divide a leaf: JAX refuses to place it, before jaxprune sees it.
    try:
        jax.device_put(np.ones((5, 4), np.float32), NamedSharding(mesh, P("fsdp", None)))
    except ValueError as e:
        assert "should evenly divide the shape" in str(e), e
    else:
        raise AssertionError("an indivisible sharding was accepted")
    print("indivisible ok")

    # Per-layer rankings run on worker threads: the caller's default device holds there too.
    with jax.default_device(jax.devices()[2]):
        got = jaxprune.masks_for_sparsity(params, 0.7, previous=previous)
    for w, g in zip(jax.tree.leaves(want_ms["layer"]), jax.tree.leaves(got)):
        assert np.array_equal(np.asarray(w), np.asarray(g))
        assert g.devices() == {jax.devices()[2]}, g.devices()
    print("default device ok")

    # Kernels of 2**16 weights or more: each shard flags and gathers its blocks of the bracket,
    # and brings the few entries in it to every device; the answers equal the one-device ones
    # (a smooth kernel, and a cluster a few ulps wide that overflows into the full bisection).
    big = {"A": {"kernel": rng.normal(size=(512, 260)).astype(np.float32)},
           "B": {"kernel": rng.normal(size=(256, 512)).astype(np.float32)}}
    cluster = rng.random((256, 512)) < 0.4
    big["B"]["kernel"][cluster] = 1.0 + rng.integers(0, 64, size=cluster.sum()) * 2.0**-23
    # And 3072 ties, 2000 of them pruned: more than a shard's compacted candidates hold (global).
    big["C"] = {"kernel": rng.normal(size=(256, 512)).astype(np.float32)}
    big["C"]["kernel"][:6] = 0.5
    big_prev = jax.tree.map(lambda x: rng.random(x.shape) > 0.2, big)
    mags = np.concatenate([np.abs(x).ravel() for x in jax.tree.leaves(big)])
    alive = np.concatenate([x.ravel() for x in jax.tree.leaves(big_prev)])
    at_ties = ((~alive).sum() + (alive & (mags < 0.5)).sum() + 2000) / mags.size
    want_big = {(scope, s): jaxprune.masks_for_sparsity(big, s, scope=scope, previous=big_prev)
                for scope in ("layer", "global") for s in (0.5, 0.9)}
    want_big["global", at_ties] = jaxprune.masks_for_sparsity(
        big, at_ties, scope="global", previous=big_prev)
    sizes = [x.size for x in jax.tree.leaves(big)]
    for label, (mesh, kernel_spec) in meshes.items():
        sharded, prev_s = place(big, lambda x: kernel_spec), place(big_prev, lambda x: kernel_spec)
        placements = jaxprune._blocks.placements_of(jax.tree.leaves(sharded))
        assert all(isinstance(s, jaxprune._blocks.Split) for s in placements), placements
        for (scope, s), want in want_big.items():
            got = jaxprune.masks_for_sparsity(sharded, s, scope=scope, previous=prev_s)
            same(want, got, sharded, (label, scope, s))
        no_gather(lambda p, m: jaxprune.masks_for_sparsity(p, 0.9, scope="global", previous=m),
                  sharded, prev_s, label=(label, "big"))
        # Eagerly, a layer's split kernel sends each shard's candidate blocks to every device as
        # they are (an eighth of the kernel at most), global scope a compacted few: the ranking
        # compiled for the placed leaves gathers no whole kernel either way.
        leaves, prevs = tuple(jax.tree.leaves(sharded)), tuple(jax.tree.leaves(prev_s))
        for group, places in [((i,), (placements[i],)) for i in range(2)] + [((0, 1), placements[:2])]:
            args = (tuple(leaves[i] for i in group), tuple(prevs[i] for i in group),
                    (None,) * len(group), np.int32(1000), places, True)
            no_gather(jaxprune._ranking.compiled(places), *args, label=(label, "big", group))
        # A NaN in a split kernel (pruned there or not) is found by the first pass's counts.
        nan_b = big["B"]["kernel"].copy()
        nan_b[7, 9] = np.nan
        broken = place({**big, "B": {"kernel": nan_b}}, lambda x: kernel_spec)
        for scope in ("layer", "global"):
            try:
                jaxprune.masks_for_sparsity(broken, 0.9, scope=scope, previous=prev_s)
            except ValueError as e:
                assert "params['B/kernel'] contains NaN or inf" in str(e), e
            else:
                raise AssertionError("a NaN in a split kernel was accepted")
        print(label, "big ok")
    """
)


# The README's "Data-parallel retraining" block, run as written on the 4 devices.
README_SCRIPT = textwrap.dedent(
    """
    import jax, jax.numpy as jnp, numpy as np, optax
    import flax.linen as nn
    from jax.sharding import NamedSharding, PartitionSpec as P
    import jaxprune

    model = nn.Sequential([nn.Dense(32), nn.relu, nn.Dense(4)])
    x, y = jax.random.normal(jax.random.key(1), (64, 16)), jnp.arange(64) % 4
    params = model.init(jax.random.key(0), x)["params"]
    masks = jaxprune.compute_masks(params, 1.0)
    params = jaxprune.apply_masks(params, masks)

    def loss(p, batch, rng):
        logits = model.apply({"params": p}, batch[0])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch[1]).mean()

    tx = jaxprune.keep_pruned(optax.sgd(0.1, momentum=0.9), masks)
    step, key, batches = jaxprune.make_retrain_step(loss, tx), jax.random.key(2), [(x, y)] * 3
    exec(README_BLOCK)
    assert state.params["layers_0"]["kernel"].sharding.is_fully_replicated
    kernel = np.asarray(state.params["layers_0"]["kernel"])
    assert np.all(kernel[~np.asarray(masks["layers_0"]["kernel"])] == 0.0)
    assert int(state.step) == 3
    print("readme ok")
    """
)


def _readme_block() -> str:
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = text[text.index("## Data-parallel retraining") :]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


# One subprocess for both scripts (starting one and importing JAX costs seconds); each script
# runs in its own namespace and reports its own failure.
RUNNER = textwrap.dedent(
    """
    import traceback
    for name, source in SCRIPTS.items():
        try:
            exec(source, {"__name__": name})
        except BaseException:
            print(f"{name} FAILED", flush=True)
            traceback.print_exc()
    """
)


@pytest.fixture(scope="module")
def sharded_run():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4")
    env["JAX_PLATFORMS"] = "cpu"
    readme = f"README_BLOCK = {_readme_block()!r}\n{README_SCRIPT}"
    scripts = {"step": SCRIPT, "masks": MASKS_SCRIPT, "readme": readme}
    return subprocess.run(
        [sys.executable, "-c", f"SCRIPTS = {scripts!r}\n{RUNNER}", os.path.dirname(__file__)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def check(run, name, labels):
    assert f"{name} FAILED" not in run.stdout, run.stderr[-4000:]
    for label in labels:
        assert label in run.stdout, (run.stdout, run.stderr[-4000:])


def test_sharded_step_equals_single_device_step(sharded_run):
    check(sharded_run, "step", ["replicated ok", "sharded ok"])


def test_sharded_kernels_give_the_same_masks_and_stay_sharded(sharded_run):
    """compute_masks, masks_for_sparsity, apply_masks, keep_pruned, update_masks, summarize."""
    check(
        sharded_run,
        "masks",
        [
            "fsdp ok",
            "fsdp x tp ok",
            "indivisible ok",
            "default device ok",
            "fsdp big ok",
            "fsdp x tp big ok",
        ],
    )


def test_the_readme_data_parallel_block_runs_on_4_devices(sharded_run):
    check(sharded_run, "readme", ["readme ok"])
