"""keep_pruned anywhere in an optax chain: pruned weights stay exactly +0.0 after update_masks."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import optax_step
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxprune import apply_masks, keep_pruned, prune_gradients, raise_if_misplaced, update_masks
from jaxprune._tree import leaves_with_paths

LR = 0.05
SHAPES = {"a": (3, 4), "b": (5, 2)}  # distinct shapes: optimizer-state leaves map to one kernel


def _params(seed):
    rng = np.random.default_rng(seed)
    tree = {k: {"kernel": jnp.asarray(rng.normal(size=s), jnp.float32)} for k, s in SHAPES.items()}
    tree["b"]["bias"] = jnp.asarray(rng.normal(size=2), jnp.float32)
    return tree


def _masks(seed, density, previous=None):
    rng = np.random.default_rng(seed)
    out = {k: {"kernel": jnp.asarray(rng.random(s) < density)} for k, s in SHAPES.items()}
    out["b"]["bias"] = jnp.ones(2, bool)
    if previous is not None:
        out = jax.tree.map(jnp.logical_and, out, previous)
    return out


def _core(name):
    return {
        "sgd": optax.identity(),
        "momentum": optax.trace(0.9),
        "adam": optax.scale_by_adam(),
        "adamw": optax.chain(optax.scale_by_adam(), optax.add_decayed_weights(1e-2)),
    }[name]


def _build(position, core, wrap):
    """The chain with ``wrap(inner)`` where keep_pruned sits."""
    lr = optax.scale_by_learning_rate(LR)
    return {
        "outermost": lambda: wrap(optax.chain(core, lr)),
        "before_lr": lambda: optax.chain(wrap(core), lr),
        "after_lr": lambda: optax.chain(lr, wrap(core)),
        "before_clip": lambda: optax.chain(wrap(core), optax.clip_by_global_norm(0.5), lr),
        "after_clip": lambda: optax.chain(
            optax.clip_by_global_norm(0.5), wrap(optax.chain(core, lr))
        ),
        "schedule": lambda: optax.chain(
            wrap(core), optax.scale_by_schedule(lambda c: -LR * 0.9**c)
        ),
        "multisteps": lambda: optax.MultiSteps(optax.chain(wrap(core), lr), every_k_schedule=2),
        "inject": lambda: optax.inject_hyperparams(
            lambda learning_rate: optax.chain(
                wrap(core), optax.scale_by_learning_rate(learning_rate)
            )
        )(learning_rate=LR),
    }[position]()


def _zero_pruned_state(state, masks):
    # The reference optimizer has no keep_pruned: forget what it had for the newly pruned weights,
    # so it computes the survivors' sub-problem (momentum of a pruned weight affects nothing else).
    by_shape = {m.shape: m for p, m in leaves_with_paths(masks) if p.endswith("kernel")}
    return jax.tree.map(
        lambda x: (
            jnp.where(by_shape[x.shape], x, 0).astype(x.dtype)
            if hasattr(x, "shape") and x.shape in by_shape
            else x
        ),
        state,
    )


POSITIONS = ["outermost", "before_lr", "after_lr", "before_clip", "after_clip", "schedule",
             "multisteps", "inject"]  # fmt: skip


@pytest.mark.standard_promotion  # optax's Adam / a test model's broadcast bias
@settings(max_examples=12)
@given(
    position=st.sampled_from(POSITIONS),
    core=st.sampled_from(["sgd", "momentum", "adam", "adamw"]),
    seed=st.integers(0, 2**16),
    warmup=st.integers(0, 4),
    steps=st.integers(1, 6),
    density=st.floats(0.2, 0.9),
)
def test_pruned_weights_stay_plus_zero_wherever_keep_pruned_sits(
    position, core, seed, warmup, steps, density
):
    params = _params(seed)
    first = _masks(seed + 1, 1.0 if warmup else density)
    tx = _build(position, _core(core), lambda inner: keep_pruned(inner, first))
    ref = _build(position, _core(core), lambda inner: optax.chain(prune_gradients(first), inner))
    step, ref_step = optax_step(tx), optax_step(ref)
    p, s = apply_masks(params, first), tx.init(params)
    rp, rs = p, ref.init(params)
    rng = np.random.default_rng(seed + 2)
    grads = [jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), x.dtype), params)
             for _ in range(warmup + steps)]  # fmt: skip
    for g in grads[:warmup]:
        p, s = step(p, s, g)
        rp, rs = ref_step(rp, rs, g)
    masks = _masks(seed + 3, density, previous=first)
    s, p = update_masks(s, masks), apply_masks(p, masks)  # the documented round change
    rs, rp = _zero_pruned_state(update_masks(rs, masks), masks), apply_masks(rp, masks)
    for g in grads[warmup:]:
        p, s = step(p, s, g)
        rp, rs = ref_step(rp, rs, g)
        rp = apply_masks(rp, masks)
    for path, m in leaves_with_paths(masks):
        got = np.asarray(dict(leaves_with_paths(p))[path])
        want = np.asarray(dict(leaves_with_paths(rp))[path])
        m = np.asarray(m)
        assert np.all(got[~m] == 0.0) and not np.any(np.signbit(got[~m])), path  # exactly +0.0
        np.testing.assert_allclose(got[m], want[m], rtol=1e-5, atol=1e-6, err_msg=path)


@pytest.mark.parametrize("jit", [True, False], ids=["jit", "eager"])
def test_a_scaled_correction_is_an_error_naming_the_leaf(jit):
    params = _params(0)
    masks = _masks(1, 1.0)
    tx = optax.chain(keep_pruned(optax.trace(0.9), masks), optax.scale_by_learning_rate(LR))
    state = tx.init(params)

    def step(p, s):
        updates, s = tx.update(jax.tree.map(jnp.ones_like, p), s, p)
        return optax.apply_updates(p, updates), s

    step = jax.jit(step) if jit else step
    params, state = step(params, state)
    new = _masks(2, 0.5)
    state = update_masks(state, new)  # forgot apply_masks: the -w gets scaled
    params, state = step(params, state)
    match = r"pruned weights of \['a/kernel', 'b/kernel'\] are still non-zero"
    if not jit:  # eager: the update itself raises
        with pytest.raises(ValueError, match=match):
            step(params, state)
        return
    params, state = step(params, state)  # jitted: recorded in the state, raised on the host
    with pytest.raises(ValueError, match=match):
        raise_if_misplaced(state)
    with pytest.raises(ValueError, match=match):
        update_masks(state, _masks(3, 0.5, previous=new))


def test_outermost_keep_pruned_zeroes_newly_pruned_weights_itself():
    params = _params(0)
    masks = _masks(1, 1.0)
    tx = keep_pruned(optax.chain(optax.trace(0.9), optax.scale_by_learning_rate(LR)), masks)
    step = optax_step(tx)
    state = tx.init(params)
    grads = jax.tree.map(jnp.ones_like, params)
    params, state = step(params, state, grads)
    new = _masks(2, 0.5)
    state = update_masks(state, new)
    for _ in range(3):
        params, state = step(params, state, grads)
    for (path, m), w in zip(leaves_with_paths(new), jax.tree.leaves(params), strict=True):
        assert np.all(np.asarray(w)[~np.asarray(m)] == 0.0), path


@pytest.mark.standard_promotion  # optax's Adam / a test model's broadcast bias
def test_integer_leaves_do_not_confuse_the_check():
    params = {"a": {"kernel": jnp.ones((3, 4))}, "count": jnp.zeros((2,), jnp.int32)}
    masks = {"a": {"kernel": jnp.ones((3, 4), bool)}, "count": jnp.ones((2,), bool)}
    tx = optax.chain(keep_pruned(optax.identity(), masks), optax.scale_by_learning_rate(LR))
    step = optax_step(tx)
    state = tx.init(params)
    grads = {"a": {"kernel": jnp.ones((3, 4))}, "count": jnp.zeros((2,), jnp.int32)}
    new = {"a": {"kernel": jnp.zeros((3, 4), bool)}, "count": jnp.ones((2,), bool)}
    state = update_masks(state, new)  # forgot apply_masks
    for _ in range(2):
        params, state = step(params, state, grads)
    with pytest.raises(ValueError, match=r"pruned weights of \['a/kernel'\] are still"):
        raise_if_misplaced(state)
