"""Model state through retraining: BatchNorm statistics, every RNG stream, nnx.Optimizer."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxprune
from jaxprune.batch_stats import reestimate_batch_stats
from jaxprune.demo import run
from jaxprune.demo.checkpoints import Checkpoints
from jaxprune.demo.data import load_digits
from jaxprune.demo.recipes import Config
from jaxprune.retrain import make_retrain_step, nnx_loss, retrain_state
from jaxprune.rounds import RoundsState

X = jax.random.normal(jax.random.key(0), (16, 6, 6, 1)) * 2.0 + 1.0
Y = jax.random.randint(jax.random.key(1), (16,), 0, 3)


def _xent(logits, y):
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


class LinenBN(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Conv(4, (3, 3), use_bias=False)(x)
        x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.8)(x))
        return nn.Dense(3)(x.mean(axis=(1, 2)))


class NNXBN(nnx.Module):
    def __init__(self, rngs: nnx.Rngs, *, drop: float = 0.0):
        self.conv = nnx.Conv(1, 4, (3, 3), use_bias=False, rngs=rngs)
        self.bn = nnx.BatchNorm(4, momentum=0.8, rngs=rngs)
        self.drop = nnx.Dropout(drop, rngs=rngs)
        self.fc = nnx.Linear(4, 3, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.bn(self.conv(x)))
        return self.fc(self.drop(x.mean(axis=(1, 2))))


def _linen():
    model = LinenBN()
    variables = model.init(jax.random.key(2), X[:1])
    state = {"batch_stats": variables["batch_stats"]}

    def loss(p, batch, rng, model_state):
        del rng
        logits, new = model.apply(
            {"params": p, **model_state}, batch[0], train=True, mutable=list(model_state)
        )
        return _xent(logits, batch[1]), new

    return model, variables["params"], state, loss


def _tx(masks):
    return jaxprune.keep_pruned(optax.sgd(0.1, momentum=0.9), masks)


# --- Linen: the step keeps the statistics ------------------------------------------------------


def test_linen_step_updates_batch_stats_like_a_hand_written_loop():
    _, params, state, loss = _linen()
    masks = jaxprune.compute_masks(params, 0.5)
    tx = _tx(masks)
    step = make_retrain_step(loss, tx)
    s = retrain_state(
        jaxprune.apply_masks(params, masks), tx, rng=jax.random.key(0), model_state=state
    )
    p, opt, ms = s.params, tx.init(s.params), state

    @jax.jit
    def by_hand(p, opt, ms):
        (value, ms_new), grads = jax.value_and_grad(loss, has_aux=True)(p, (X, Y), None, ms)
        updates, opt = tx.update(grads, opt, p)
        return value, optax.apply_updates(p, updates), opt, ms_new

    for _ in range(3):
        s, metrics = step(s, (X, Y))
        value, p, opt, ms = by_hand(p, opt, ms)
        np.testing.assert_allclose(metrics["loss"], value, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(s.model_state), jax.tree.leaves(ms), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), s.model_state, state)
    assert min(jax.tree.leaves(moved)) > 1e-3  # the statistics did change
    kernel = np.asarray(s.params["Conv_0"]["kernel"])
    assert np.all(kernel[~np.asarray(masks["Conv_0"]["kernel"])] == 0.0)


def test_step_without_model_state_is_unchanged():
    tx = optax.sgd(0.1)
    step = make_retrain_step(lambda p, b, rng: jnp.sum(p["w"] * b), tx)
    s, _ = step(retrain_state({"w": jnp.ones(2)}, tx, rng=jax.random.key(0)), jnp.ones(2))
    assert s.model_state is None
    np.testing.assert_allclose(s.params["w"], [0.9, 0.9])


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        (
            lambda loss: lambda *a: loss(*a)[0],
            r"returned one array.*expects \(loss, new_model_state\)",
        ),
        (
            lambda loss: lambda *a: (loss(*a)[0], {}),
            r"missing \['batch_stats/BatchNorm_0/mean', 'batch_stats/BatchNorm_0/var'\]",
        ),
        (
            lambda loss: (
                lambda *a: (
                    loss(*a)[0],
                    jax.tree.map(lambda v: v[:2], loss(*a)[1]),
                )
            ),
            r"model_state\['batch_stats/BatchNorm_0/mean'\] has shape \(2,\).*expected \(4,\)",
        ),
    ],
)
def test_loss_with_a_wrong_result_for_the_state_is_refused(bad, match):
    _, params, state, loss = _linen()
    tx = optax.sgd(0.1)
    step = make_retrain_step(bad(loss), tx)
    with pytest.raises(ValueError, match=match):
        step(retrain_state(params, tx, rng=jax.random.key(0), model_state=state), (X, Y))


def test_has_aux_with_model_state():
    _, params, state, loss = _linen()

    def with_aux(p, b, rng, ms):
        value, new = loss(p, b, rng, ms)
        return value, (new, {"double": 2 * value})

    tx = optax.sgd(0.1)
    step = make_retrain_step(with_aux, tx, has_aux=True)
    _, metrics = step(retrain_state(params, tx, rng=jax.random.key(0), model_state=state), (X, Y))
    np.testing.assert_allclose(metrics["double"], 2 * metrics["loss"])
    with pytest.raises(ValueError, match=r"\(loss, \(new_model_state, aux\)\)"):
        make_retrain_step(loss, tx, has_aux=True)(
            retrain_state(params, tx, rng=jax.random.key(0), model_state=state), (X, Y)
        )


# --- NNX: BatchNorm, RNG streams, scan --------------------------------------------------------


def test_nnx_loss_returns_the_batch_stats_and_keeps_them_through_the_step():
    model = NNXBN(nnx.Rngs(0))
    model.train()
    loss, params, state = nnx_loss(model, lambda m, b: _xent(m(b[0]), b[1]))
    assert sorted(jaxprune._tree.leaves_with_paths(state)[i][0] for i in range(2)) == [
        "bn/mean",
        "bn/var",
    ]
    tx = optax.sgd(0.1)
    step = make_retrain_step(loss, tx)
    s = retrain_state(params, tx, rng=jax.random.key(0), model_state=state)
    s, _ = step(s, (X, Y))
    np.testing.assert_allclose(
        s.model_state["bn"]["mean"][...], 0.2 * _conv_means(model), rtol=1e-5
    )
    np.testing.assert_array_equal(model.bn.mean[...], 0.0)  # the user's model is untouched
    with pytest.raises(
        ValueError, match=r"changed its state \['bn/mean', 'bn/var'\].*model_state="
    ):
        make_retrain_step(loss, tx)(retrain_state(params, tx, rng=jax.random.key(0)), (X, Y))
    with pytest.raises(ValueError, match=r"model_state\['bn/mean'\] has shape \(3,\)"):
        loss(params, (X, Y), jax.random.key(0), jax.tree.map(lambda v: v[:3], state))


def _conv_means(model):
    return model.conv(X).mean(axis=(0, 1, 2))


def test_eval_mode_needs_no_model_state():
    model = NNXBN(nnx.Rngs(0))
    model.eval()
    loss, params, state = nnx_loss(model, lambda m, b: _xent(m(b[0]), b[1]))
    np.testing.assert_allclose(
        loss(params, (X, Y), jax.random.key(0)), _xent(model(X), Y), rtol=1e-6
    )
    _, new = loss(params, (X, Y), jax.random.key(0), state)
    np.testing.assert_array_equal(new["bn"]["mean"][...], state["bn"]["mean"][...])


class AttentionDropout(nnx.Module):
    """Dropout inside attention, and a module drawing from its own nnx.Rngs stream."""

    def __init__(self, rngs: nnx.Rngs):
        self.embed = nnx.Embed(8, 8, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(
            num_heads=2, in_features=8, dropout_rate=0.5, decode=False, rngs=rngs
        )
        self.noise = rngs.fork()

    def __call__(self, tokens):
        h = self.attn(self.embed(tokens))
        return h.mean() + 1e-3 * jax.random.normal(self.noise.default(), ()).sum()


@pytest.mark.standard_promotion  # optax's Adam / a test model's broadcast bias
def test_every_rng_stream_gets_fresh_keys_each_step():
    model = AttentionDropout(nnx.Rngs(0))
    model.train()
    tokens = jnp.arange(16).reshape(2, 8) % 8
    loss, params, _ = nnx_loss(model, lambda m, t: m(t))
    values = [float(loss(params, tokens, jax.random.key(k))) for k in (0, 1, 0)]
    assert values[0] != values[1] and values[0] == values[2]
    counts = [
        np.asarray(v) for p, v in jaxprune._tree.leaves_with_paths(nnx.state(model, nnx.RngCount))
    ]
    tx = optax.adam(1e-2)
    step = make_retrain_step(loss, tx)
    s = retrain_state(params, tx, rng=jax.random.key(3))
    seen = set()
    for _ in range(3):
        s, metrics = step(s, tokens)
        seen.add(float(metrics["loss"]))
    assert len(seen) == 3
    after = [
        np.asarray(v) for p, v in jaxprune._tree.leaves_with_paths(nnx.state(model, nnx.RngCount))
    ]
    assert [c.tolist() for c in counts] == [c.tolist() for c in after]  # the model's own RNG state


class ScanDropout(nnx.Module):
    """Blocks stacked with nnx.vmap and run with nnx.scan, each with dropout and BatchNorm."""

    def __init__(self, rngs: nnx.Rngs):
        @nnx.split_rngs(splits=3)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make(rngs):
            return _ScanBlock(rngs)

        self.blocks = make(rngs)

    def __call__(self, x):
        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
        def body(x, block):
            return block(x)

        return body(x, self.blocks)


class _ScanBlock(nnx.Module):
    def __init__(self, rngs):
        self.fc = nnx.Linear(4, 4, rngs=rngs)
        self.bn = nnx.BatchNorm(4, rngs=rngs)
        self.drop = nnx.Dropout(0.3, rngs=rngs)

    def __call__(self, x):
        return self.drop(nnx.relu(self.bn(self.fc(x))))


def test_scan_stacked_nnx_model_trains_with_dropout_and_batch_stats():
    model = ScanDropout(nnx.Rngs(0))
    model.train()
    x = jax.random.normal(jax.random.key(5), (8, 4))
    loss, params, state = nnx_loss(model, lambda m, b: jnp.mean((m(b) - 1.0) ** 2))
    masks = jaxprune.compute_masks(params, 0.5, stacked={"blocks": 0})
    tx = _tx(masks)
    step = make_retrain_step(loss, tx)
    s = retrain_state(
        jaxprune.apply_masks(params, masks), tx, rng=jax.random.key(0), model_state=state
    )
    losses = []
    for _ in range(20):
        s, metrics = step(s, x)
        losses.append(float(metrics["loss"]))
    assert np.mean(losses[-5:]) < np.mean(losses[:5])
    assert s.model_state["blocks"]["bn"]["mean"][...].shape == (3, 4)
    assert float(jnp.abs(s.model_state["blocks"]["bn"]["mean"][...]).min()) > 0.0
    kernel = np.asarray(s.params["blocks"]["fc"]["kernel"][...])
    assert np.all(kernel[~np.asarray(masks["blocks"]["fc"]["kernel"])] == 0.0)


# --- Flax's own loop: nnx.Optimizer + keep_pruned + update_masks -------------------------------


def test_nnx_optimizer_loop_matches_the_retrain_step():
    """The documented Flax-native path gives the params and statistics of make_retrain_step."""
    ours, theirs = NNXBN(nnx.Rngs(0)), NNXBN(nnx.Rngs(0))
    ours.train()
    theirs.train()
    params = nnx.state(theirs, nnx.Param)
    masks = jaxprune.compute_masks(params, 0.5)
    nnx.update(theirs, jaxprune.apply_masks(params, masks))
    nnx.update(ours, jaxprune.apply_masks(params, masks))

    optimizer = nnx.Optimizer(theirs, _tx(masks), wrt=nnx.Param)

    @nnx.jit
    def train_step(model, optimizer, batch):
        grads = nnx.grad(lambda m: _xent(m(batch[0]), batch[1]))(model)
        optimizer.update(model, grads)

    loss, p, state = nnx_loss(ours, lambda m, b: _xent(m(b[0]), b[1]))
    tx = _tx(masks)
    step = make_retrain_step(loss, tx)
    s = retrain_state(p, tx, rng=jax.random.key(0), model_state=state)
    for q in (0.5, 1.0):
        for _ in range(3):
            train_step(theirs, optimizer, (X, Y))
            s, _ = step(s, (X, Y))
        # A new round: prune further, zero the newly pruned weights, swap the masks in.
        masks = jaxprune.compute_masks(nnx.state(theirs, nnx.Param), q + 0.5, previous=masks)
        nnx.update(theirs, jaxprune.apply_masks(nnx.state(theirs, nnx.Param), masks))
        optimizer.opt_state = jaxprune.update_masks(optimizer.opt_state, masks)
        s = s._replace(
            params=jaxprune.apply_masks(s.params, masks),
            opt_state=jaxprune.update_masks(s.opt_state, masks),
        )
    train_step(theirs, optimizer, (X, Y))
    s, _ = step(s, (X, Y))
    for (path, a), (_, b) in zip(
        jaxprune._tree.leaves_with_paths(nnx.state(theirs, nnx.Param)),
        jaxprune._tree.leaves_with_paths(s.params),
        strict=True,
    ):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6, err_msg=path)
    np.testing.assert_allclose(theirs.bn.mean[...], s.model_state["bn"]["mean"][...], rtol=1e-5)
    kernel = np.asarray(theirs.conv.kernel[...])
    assert np.all(kernel[~np.asarray(masks["conv"]["kernel"])] == 0.0)


# --- re-estimating statistics ------------------------------------------------------------------


def test_reestimate_gives_the_mean_of_the_batch_statistics():
    model, params, state, _ = _linen()
    batches = [X[i : i + 4] for i in range(0, 16, 4)]

    def update(s, x):
        return model.apply({"params": params, **s}, x, train=True, mutable=["batch_stats"])[1]

    new = reestimate_batch_stats(update, state, batches)
    conv = lambda x: nn.Conv(4, (3, 3), use_bias=False).apply(  # noqa: E731
        {"params": params["Conv_0"]}, x
    )
    means = [conv(x).mean(axis=(0, 1, 2)) for x in batches]
    varis = [conv(x).var(axis=(0, 1, 2)) for x in batches]
    bn = new["batch_stats"]["BatchNorm_0"]
    np.testing.assert_allclose(bn["mean"], np.mean(means, axis=0), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(bn["var"], np.mean(varis, axis=0), rtol=1e-3, atol=1e-6)
    assert jax.tree.map(lambda a: a.dtype, new) == jax.tree.map(lambda a: a.dtype, state)


def test_reestimate_works_for_nnx_and_keeps_leaves_train_mode_leaves_alone():
    model = NNXBN(nnx.Rngs(0))
    model.train()
    loss, params, state = nnx_loss(model, lambda m, b: _xent(m(b[0]), b[1]))
    new = reestimate_batch_stats(
        lambda s, b: loss(params, b, jax.random.key(0), s)[1], state, [(X, Y)]
    )
    np.testing.assert_allclose(new["bn"]["mean"][...], _conv_means(model), rtol=1e-4, atol=1e-6)
    model.bn.use_running_average = True  # in train mode, this BatchNorm keeps its statistics
    loss, params, state = nnx_loss(model, lambda m, b: _xent(m(b[0]), b[1]))
    state["bn"]["mean"][...] = jnp.full(4, 7.0)
    same = reestimate_batch_stats(
        lambda s, b: loss(params, b, jax.random.key(0), s)[1], state, [(X, Y)]
    )
    np.testing.assert_array_equal(same["bn"]["mean"][...], 7.0)


def test_reestimate_refuses_state_that_is_no_running_average():
    def update(s, x):
        return {"count": s["count"] + 1, "mean": 0.5 * s["mean"] + 0.5 * x.mean()}

    state = {"count": jnp.zeros(()), "mean": jnp.zeros(())}
    with pytest.raises(ValueError, match=r"model_state\['count'\] does not update as a running"):
        reestimate_batch_stats(update, state, [jnp.ones(3)])
    with pytest.raises(ValueError, match="yielded no batch"):
        reestimate_batch_stats(update, {"mean": jnp.zeros(())}, [])
    new = reestimate_batch_stats(
        lambda s, x: {"mean": 0.5 * s["mean"] + 0.5 * x.mean()},
        {"mean": jnp.zeros(())},
        [jnp.ones(3), 3 * jnp.ones(3)],
    )
    np.testing.assert_allclose(new["mean"], 2.0, rtol=1e-6)


def test_reestimate_refuses_a_batch_that_gives_nan_statistics():
    model, params, state, _ = _linen()

    def update(s, x):
        return model.apply({"params": params, **s}, x, train=True, mutable=["batch_stats"])[1]

    good = [X[i : i + 4] for i in range(0, 16, 4)]
    broken = np.asarray(good[2]).copy()
    broken[0, 0, 0, 0] = np.nan
    path = r"model_state\['batch_stats/BatchNorm_0/mean'\]: the batch statistics are NaN or inf"
    # In a later batch (the first one is checked on its own): it must not average in silently.
    with pytest.raises(ValueError, match=path + r" \(\d+ value\(s\) over the 4 batches\)"):
        reestimate_batch_stats(update, state, [good[0], good[1], broken, good[3]])
    # In the first batch: named as such, not as a state that is no running average.
    with pytest.raises(ValueError, match=path + r" \(the first batch\)"):
        reestimate_batch_stats(update, state, [broken, good[0]])


# --- the round driver --------------------------------------------------------------------------


def test_driver_carries_model_state_reestimates_it_and_resumes():
    _, params, state, loss = _linen()

    def evaluate(p):
        return 0.0

    kwargs = dict(
        rounds=2,
        optimizer=optax.sgd(0.01, momentum=0.9),
        sparsity=[0.5, 0.8],
        model_state=state,
        reestimate=2,
    )
    batches = lambda e: [(X[i : i + 8], Y[i : i + 8]) for i in (0, 8)]  # noqa: E731
    runs = list(jaxprune.prune_and_retrain(params, loss, batches, evaluate, **kwargs))
    last = runs[-1]
    assert jax.tree.structure(last.model_state) == jax.tree.structure(state)
    assert not np.allclose(
        last.model_state["batch_stats"]["BatchNorm_0"]["mean"],
        state["batch_stats"]["BatchNorm_0"]["mean"],
    )
    resumed = list(
        jaxprune.prune_and_retrain(
            params, loss, batches, evaluate, resume=jax.device_get(runs[0]), **kwargs
        )
    )[-1]
    for a, b in zip(jax.tree.leaves(last), jax.tree.leaves(resumed), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"reestimate=2 needs the statistics.*model_state="):
        next(
            jaxprune.prune_and_retrain(
                params, loss, batches, evaluate, **{**kwargs, "model_state": None}
            )
        )


def test_driver_runs_array_batches_with_batch_stats_as_it_iterates_them():
    # BatchNorm statistics travel through the compiled epoch (lax.scan) as through the loop.
    _, params, state, loss = _linen()
    data = jaxprune.ArrayBatches((X, Y), batch_size=8, seed=3)
    kwargs = dict(rounds=2, optimizer=optax.sgd(0.01, momentum=0.9), sparsity=[0.5, 0.8], epochs=2)

    def run_with(batches):
        return list(
            jaxprune.prune_and_retrain(
                params, loss, batches, lambda p: 0.0, model_state=state, reestimate=2, **kwargs
            )
        )[-1]

    scanned, looped = run_with(data), run_with(lambda e: list(data(e)))
    for a, b in zip(jax.tree.leaves(scanned), jax.tree.leaves(looped), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    assert not np.allclose(
        scanned.model_state["batch_stats"]["BatchNorm_0"]["mean"],
        state["batch_stats"]["BatchNorm_0"]["mean"],
    )


def test_round_checkpoints_keep_the_model_state(tmp_path):
    config = Config(model="lenet300")
    data = load_digits()
    params = run.init_params(config, data)
    masks = jaxprune.compute_masks(params, 0.5)
    tx = jaxprune.keep_pruned(run.retrain_optimizer(config, data), masks)
    stats = {"batch_stats": {"bn": {"mean": jnp.arange(3.0)}}}
    checkpoints = Checkpoints(tmp_path)
    checkpoints.dir.mkdir(parents=True)
    checkpoints.save_round(RoundsState(1, params, masks, tx.init(params), (), stats))
    back = checkpoints.load_round(config, data)
    np.testing.assert_array_equal(back.model_state["batch_stats"]["bn"]["mean"], [0.0, 1.0, 2.0])
