"""The demo's pipeline pieces: train a LeNet, prune and retrain in rounds, checkpoint, export, time.

The command line (:mod:`jaxprune.demo.cli`) strings these together and draws the progress bars and
tables; everything here is plain functions of a :class:`Config`, so a run can be scripted too.
"""

from __future__ import annotations

import functools
import io
import itertools
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxprune.analysis import accuracy
from jaxprune.demo import devices
from jaxprune.demo.data import Dataset, batches
from jaxprune.demo.models import LeNet5, LeNet300100, dense_layer_names
from jaxprune.demo.recipes import Config, ConfigError
from jaxprune.masks import apply_masks, compute_masks, masks_for_sparsity
from jaxprune.retrain import make_retrain_step, retrain_state
from jaxprune.rounds import RoundsState, prune_and_retrain
from jaxprune.sparse import sparse_apply, to_bcoo
from jaxprune.storage import save
from jaxprune.structured import neuron_masks, shrink
from jaxprune.transform import keep_pruned

PyTree = Any


def build_model(
    config: Config, rates: dict[str, float] | None = None, *, hidden: tuple[int, ...] | None = None
) -> nn.Module:
    """The Linen model of ``config``, with dropout ``rates`` (``{layer: rate}``) if given.

    LeNet-5 uses 'SAME' padding on the built-in 8x8 digits (5x5 'VALID' convolutions would leave
    nothing) and Caffe's 'VALID' on MNIST. ``hidden`` builds a LeNet-300-100 of other widths.
    """
    base: nn.Module
    if config.model == "lenet300":
        base = LeNet300100() if hidden is None else LeNet300100(hidden=hidden)
    else:
        base = LeNet5(padding="SAME" if config.data_dir is None else "VALID")
    names = dense_layer_names(base)
    if rates is None:
        rates = {name: config.dropout for name in names[1:]}
    if not any(rates.values()):
        return base
    return base.clone(dropout_rates=tuple(rates.get(name, 0.0) for name in names))


def dropout_layers(config: Config) -> dict[str, tuple[float, str]]:
    """Han's dropout bookkeeping: the dropout on ``fcK``'s input follows ``fc(K-1)``'s kernel."""
    if config.dropout == 0:
        return {}
    names = dense_layer_names(build_model(config))
    return {b: (config.dropout, f"{a}/kernel") for a, b in itertools.pairwise(names)}


def init_params(config: Config, data: Dataset) -> PyTree:
    """Initialises the model's params for the data's image shape."""
    x = jnp.zeros((1, *data.x_train.shape[1:]), jnp.float32)
    return build_model(config).init(jax.random.key(config.seed), x)["params"]


def make_loss(config: Config) -> Callable:
    """``loss(params, (x, y), rng, dropout_rates=None)``: softmax cross-entropy.

    ``dropout_rates`` maps dropout layers to rates; ``None`` keeps the model's own.
    """
    models: dict[tuple, nn.Module] = {}

    def loss(params, batch, rng, dropout_rates=None):
        key = tuple(sorted((dropout_rates or {}).items()))
        if key not in models:
            models[key] = build_model(config, dict(dropout_rates) if dropout_rates else None)
        x, y = batch
        logits = models[key].apply({"params": params}, x, train=True, rngs={"dropout": rng})
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    return loss


def make_eval(config: Config) -> Callable[[PyTree, np.ndarray], jax.Array]:
    """A hashable ``apply_fn(params, x)`` for :func:`jaxprune.analysis.accuracy` (no dropout).

    Cached per architecture (model and padding), not per config: ``accuracy`` compiles once per
    ``apply_fn`` object, and runs of other seeds or schedules evaluate the same network.
    """
    return _make_eval(config.model, config.data_dir is None)


@functools.lru_cache(maxsize=8)
def _make_eval(model_name: str, digits: bool) -> Callable[[PyTree, np.ndarray], jax.Array]:
    config = Config(model=model_name, data_dir=None if digits else "mnist", dropout=0.0)
    model = build_model(config, {})

    def apply_fn(params, x):
        return model.apply({"params": params}, x)

    return apply_fn


def epoch_batches(config: Config, data: Dataset, offset: int) -> Callable[[int], Iterator]:
    """``batches(epoch)`` with its own seed stream: dense training and rounds never share one.

    The batches are placed by :func:`devices.batch_sharding`: the same examples in the same order
    either way (and the same dropout draws), so a split step differs from one device's by
    rounding only.
    """
    sharding = devices.batch_sharding(config, data)

    def it(epoch: int) -> Iterator:
        stream = batches(
            data.x_train,
            data.y_train,
            batch_size=min(config.batch_size, len(data.x_train)),
            seed=config.seed,
            epoch=offset + epoch,
            drop_remainder=True,
        )
        return stream if sharding is None else (jax.device_put(b, sharding) for b in stream)

    return it


def steps_per_epoch(config: Config, data: Dataset) -> int:
    return len(data.x_train) // min(config.batch_size, len(data.x_train))


def train_dense(
    config: Config,
    data: Dataset,
    params: PyTree,
    *,
    on_epoch: Callable[[int, float], None] | None = None,
) -> PyTree:
    """Trains the dense model: SGD with momentum 0.9, cosine decay, L2 (Han et al.'s step 1)."""
    total = config.epochs * steps_per_epoch(config, data)
    tx = optax.chain(
        optax.add_decayed_weights(config.weight_decay),
        optax.sgd(optax.cosine_decay_schedule(config.learning_rate, total), momentum=0.9),
    )
    loss = make_loss(config)
    rates = {b: r for b, (r, _) in dropout_layers(config).items()}
    step = make_retrain_step(functools.partial(loss, dropout_rates=rates), tx)
    state = retrain_state(params, tx, rng=jax.random.key(config.seed + 1))
    it = epoch_batches(config, data, offset=0)
    for epoch in range(config.epochs):
        losses = []
        for batch in it(epoch):
            state, metrics = step(state, batch)
            losses.append(metrics["loss"])
        if on_epoch is not None:
            on_epoch(epoch, float(jnp.mean(jnp.stack(losses))))
    return devices.on_one_device(state.params)


def retrain_optimizer(config: Config, data: Dataset) -> optax.GradientTransformation:
    """The retraining optimizer of every round, and the template to restore its state from.

    SGD with momentum at ``learning_rate * retrain_learning_rate_scale`` and a cosine schedule that
    restarts every round, after Han et al.'s coupled L2 (``optax.add_decayed_weights``).
    """
    period = config.retrain_epochs * steps_per_epoch(config, data)
    rate = config.learning_rate * config.retrain_learning_rate_scale
    cosine = optax.cosine_decay_schedule(rate, period)
    return optax.chain(
        optax.add_decayed_weights(config.weight_decay),
        optax.sgd(lambda count: cosine(count % period), momentum=0.9),
    )


def rounds(
    config: Config,
    data: Dataset,
    params: PyTree,
    *,
    resume: RoundsState | None = None,
    on_epoch: Callable[[int, int, float], None] | None = None,
) -> Iterator[RoundsState]:
    """Han et al.'s steps 2-4: prune (``q * std`` or a target sparsity), retrain, repeat.

    With ``config.ranking == 'random'`` each round's masks are drawn by :func:`random_masks` and
    everything else (retraining, dropout rule, seeds, batches) is as for magnitude pruning.
    """
    apply_fn = make_eval(config)
    if config.sparsity is not None:
        schedule: dict[str, Any] = {
            "sparsity": [_sparsity(s) for s in config.sparsity],
            "scope": config.scope,
        }
    elif config.q_scale:
        # "*" matches every prunable leaf; an exact layer name wins over it (compute_masks).
        schedule = {"q": [{"*": q, **{k: q * f for k, f in config.q_scale}} for q in config.q]}
    else:
        schedule = {"q": config.q}
    run_rounds: Callable[..., Iterator[RoundsState]] = functools.partial(
        prune_and_retrain,
        loss_fn=make_loss(config),
        batches=epoch_batches(config, data, offset=config.epochs),
        evaluate=lambda p: accuracy(apply_fn, devices.on_one_device(p), data.x_test, data.y_test),
        rounds=config.rounds,
        optimizer=retrain_optimizer(config, data),
        epochs=config.retrain_epochs,
        dropout=dropout_layers(config),
        seed=config.seed + 2,
        on_epoch=on_epoch,
        **schedule,
    )

    def driver(params: PyTree, resume: RoundsState | None) -> Iterator[RoundsState]:
        return map(devices.on_one_device, run_rounds(params, resume=resume))

    if config.ranking == "magnitude":
        yield from driver(params, resume=resume)
        return
    # One round per call, resumed from the random masks: the driver's own cut at the same
    # sparsity then prunes nothing more, since those masks already prune exactly that many.
    state = resume or RoundsState(0, params, None, None, ())
    while state.round < config.rounds:
        masks = random_masks(config, state.params, state.masks, state.round)
        start = state._replace(params=apply_masks(state.params, masks), masks=masks)
        state = next(driver(start.params, resume=start))
        if not all(jax.tree.leaves(jax.tree.map(jnp.array_equal, state.masks, masks))):
            raise AssertionError("the random masks were changed by the magnitude cut")
        yield state


def _sparsity(value: float | tuple[tuple[str, float], ...]) -> float | dict[str, float]:
    """One round of ``config.sparsity`` as :func:`jaxprune.masks_for_sparsity` takes it."""
    return value if isinstance(value, float) else dict(value)


def random_masks(config: Config, params: PyTree, previous: PyTree | None, r: int) -> PyTree:
    """Round ``r``'s masks for ``ranking='random'``: ``config.sparsity[r]``, survivors drawn at random.

    Uniform scores in place of the weights, cut by :func:`jaxprune.masks_for_sparsity` with the
    same ``scope`` and ``previous``: each round keeps a uniformly random subset of the survivors
    of the size magnitude pruning would keep, and pruned stays pruned.
    """
    key = jax.random.fold_in(jax.random.key(config.seed + 4), r)
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(key, len(leaves))
    scores = [
        jax.random.uniform(k, jnp.shape(leaf), minval=0.5, maxval=1.0)
        for k, leaf in zip(keys, leaves, strict=True)
    ]
    scores = jax.tree.unflatten(treedef, scores)
    assert (
        config.sparsity is not None
    )  # random ranking applies to sparsity schedules (Config checks)
    sparsity = _sparsity(config.sparsity[r])
    return masks_for_sparsity(scores, sparsity, scope=config.scope, previous=previous)


# --- export and timing ------------------------------------------------------------------------


def dense_npz_bytes(params: PyTree) -> int:
    """Bytes of the params as a plain float32 ``.npz`` (the size a user would otherwise ship)."""
    buf = io.BytesIO()
    arrays = {f"a{i}": np.asarray(leaf) for i, leaf in enumerate(jax.tree.leaves(params))}
    np.savez(buf, **arrays)  # type: ignore[arg-type]  # numpy's stub reads **kwds as allow_pickle
    return buf.getbuffer().nbytes


def export(params: PyTree, masks: PyTree, path: Path) -> dict[str, int]:
    """Writes the pruned model as a compact file; returns its bytes beside the dense ``.npz``."""
    report = save(path, to_bcoo(params, masks))
    return {"file_bytes": report.nbytes, "dense_npz_bytes": dense_npz_bytes(params)}


def _calls_per_sample(fn: Callable, x: Any, seconds: float = 0.005) -> int:
    """How many calls of ``fn`` take at least ``seconds``: short calls are timed in groups."""
    start = time.perf_counter()
    jax.block_until_ready(fn(x))
    once = max(time.perf_counter() - start, 1e-7)
    return max(1, int(seconds / once))


def _sample(fn: Callable, x: Any, calls: int) -> list[float]:
    # Each call is waited for: this is latency, what one request sees, not pipelined throughput.
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        jax.block_until_ready(fn(x))
        times.append(time.perf_counter() - start)
    return times


def compare_times(
    first: Callable,
    second: Callable,
    image_shape: tuple[int, ...],
    batch_sizes,
    samples: int,
    *,
    make_input: Callable[[int], Any] | None = None,
) -> dict[str, dict[str, float]]:
    """Per-call times of two forward passes per batch size; ``ratio = second / first``.

    The two are sampled alternately, in groups of calls lasting a few milliseconds (so drift on a
    shared machine hits both alike); each call is timed to its result, and the medians of all
    calls are compared. Inputs are uniform images of ``image_shape``, or ``make_input(batch)``.
    """
    out = {}
    for b in batch_sizes:
        if make_input is not None:
            x = make_input(b)
        else:
            x = jax.random.uniform(jax.random.key(b), (b, *image_shape))
        jax.block_until_ready((first(x), second(x)))
        calls = min(_calls_per_sample(first, x), _calls_per_sample(second, x))
        t1, t2 = [], []
        for _ in range(samples):
            t1 += _sample(first, x, calls)
            t2 += _sample(second, x, calls)
        a, c = statistics.median(t1), statistics.median(t2)
        out[str(b)] = {"first_ms": 1e3 * a, "second_ms": 1e3 * c, "ratio": c / a}
    return out


def time_inference(
    config: Config,
    params: PyTree,
    masks: PyTree,
    image_shape: tuple[int, ...],
    *,
    batch_sizes: tuple[int, ...] = (1, 64, 1024),
    samples: int = 21,
) -> dict[str, dict[str, float]]:
    """Sparse inference against the masked dense model under jit; ``ratio`` = sparse / dense."""
    model = build_model(config, {})
    pruned = apply_masks(params, masks)
    dense = jax.jit(lambda x: model.apply({"params": pruned}, x))
    sparse = sparse_apply(model, to_bcoo(params, masks))
    times = compare_times(dense, sparse, image_shape, batch_sizes, samples)
    return {
        b: {"dense_ms": t["first_ms"], "sparse_ms": t["second_ms"], "ratio": t["ratio"]}
        for b, t in times.items()
    }


# --- whole neurons ------------------------------------------------------------------------------


def _chain(config: Config) -> tuple[list[str], list[Callable]]:
    relu = lambda x: jnp.maximum(x, 0)  # noqa: E731
    if config.model == "lenet300":
        return ["fc1", "fc2", "fc3"], [relu, relu]
    # Caffe's LeNet-5 has no nonlinearity after its convolutions.
    return ["conv1", "conv2", "fc1", "fc2"], [lambda x: x, lambda x: x, relu]


def dead_units(config: Config, params: PyTree, masks: PyTree) -> dict[str, Any]:
    """Removes units whose every input or output connection is pruned (Han et al. 2015, Sec. 3.5)."""
    layers, activations = _chain(config)
    shrunk = shrink(params, layers=layers, activation=activations, masks=masks)
    report = shrunk.report
    return {
        "widths": list(shrunk.widths),
        "hidden_before": report.hidden_before,
        "hidden_after": report.hidden_after,
        "summary": f"hidden units {report.hidden_before:,} -> {report.hidden_after:,}, "
        f"dense weights {report.weights_before:,} -> {report.weights_after:,}",
    }


def check_q_scale(config: Config, data: Dataset) -> None:
    """Raises :class:`ConfigError` unless every ``q_scale`` layer is one the model prunes.

    Checked on the initial params, before any training, by the rule the rounds use.
    """
    if not config.q_scale:
        return
    try:
        compute_masks(init_params(config, data), {"*": 1.0, **dict(config.q_scale)})
    except ValueError as e:
        raise ConfigError(f"{{q_scale}} {dict(config.q_scale)}: {e}") from None


def check_structured(config: Config, sparsity: float) -> None:
    """Raises :class:`ConfigError` unless ``structured(config, ..., sparsity)`` can run."""
    if config.model != "lenet300":
        raise ConfigError("--structured supports --model lenet300 only.")
    if not 0 < sparsity < 1:
        raise ConfigError(f"--structured must be a fraction in (0, 1), got {sparsity}.")


def structured(config: Config, data: Dataset, dense: PyTree, sparsity: float) -> dict[str, Any]:
    """Prunes whole hidden neurons of LeNet-300-100, retrains, shrinks, and times the result.

    Han et al. 2015 (Sec. 3.5) note the neuron count can be cut without retraining; this measures
    the accuracy cost before and after one round of retraining, and the dense speed-up of the
    physically smaller model.
    """
    check_structured(config, sparsity)
    layers, activations = _chain(config)
    apply_fn = make_eval(config)
    masks = neuron_masks(dense, sparsity, layers=layers)
    pruned = apply_masks(dense, masks)
    error_before = 1.0 - accuracy(apply_fn, pruned, data.x_test, data.y_test)

    tx = keep_pruned(retrain_optimizer(config, data), masks)
    loss = make_loss(config)
    rates = {b: r for b, (r, _) in dropout_layers(config).items()}
    step = make_retrain_step(functools.partial(loss, dropout_rates=rates), tx)
    state = retrain_state(pruned, tx, rng=jax.random.key(config.seed + 3))
    it = epoch_batches(config, data, offset=config.epochs + config.rounds * config.retrain_epochs)
    for epoch in range(config.retrain_epochs):
        for batch in it(epoch):
            state, _ = step(state, batch)
    error_after = 1.0 - accuracy(apply_fn, state.params, data.x_test, data.y_test)

    shrunk = shrink(state.params, layers=layers, activation=activations, masks=masks)
    small = build_model(config, {}, hidden=tuple(shrunk.widths[:-1]))
    big = build_model(config, {})
    full_fn = jax.jit(lambda x: big.apply({"params": state.params}, x))
    small_fn = jax.jit(lambda x: small.apply({"params": shrunk.params}, x))
    times = compare_times(full_fn, small_fn, data.x_train.shape[1:], (1, 64, 1024), 21)
    return {
        "sparsity": sparsity,
        "hidden_before": shrunk.report.hidden_before,
        "hidden_after": shrunk.report.hidden_after,
        "widths": list(shrunk.widths),
        "error_without_retraining": error_before,
        "error_after_retraining": error_after,
        "dense_time_ratio": {b: t["ratio"] for b, t in times.items()},
    }


def structured_line(result: dict[str, Any]) -> str:
    """One line for the command's output."""
    speed = ", ".join(f"batch {b} {r:.2f}x" for b, r in result["dense_time_ratio"].items())
    return (
        f"structured: {result['sparsity']:.0%} of hidden neurons pruned, "
        f"{result['hidden_before']} -> {result['hidden_after']} hidden units; error "
        f"{100 * result['error_without_retraining']:.2f}% without retraining, "
        f"{100 * result['error_after_retraining']:.2f}% after; shrunk/original dense time: {speed}"
    )
