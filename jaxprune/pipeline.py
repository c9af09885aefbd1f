"""The demo's pipeline pieces: train a LeNet, prune and retrain in rounds, checkpoint, export, time.

The command line (:mod:`jaxprune.cli`) strings these together and draws the progress bars and
tables; everything here is plain functions of a :class:`Config`, so a run can be scripted too.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import itertools
import json
import os
import statistics
import tempfile
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
from jaxprune.data import Dataset, batches
from jaxprune.masks import apply_masks
from jaxprune.models import LeNet5, LeNet300100, dense_layer_names
from jaxprune.retrain import make_retrain_step, retrain_state
from jaxprune.rounds import RoundRecord, RoundsState, prune_and_retrain
from jaxprune.sparse import sparse_apply, to_bcoo
from jaxprune.storage import load, save
from jaxprune.structured import neuron_masks, shrink
from jaxprune.transform import keep_pruned

PyTree = Any

# Han et al. 2015, Tables 1 and 2: per-layer kept fractions and errors on MNIST.
PAPER = {
    "lenet300": {
        "error_dense": 0.0164,
        "error_pruned": 0.0159,
        "kept": {"fc1": 0.08, "fc2": 0.09, "fc3": 0.26},
        "kept_total": 0.08,
    },
    "lenet5": {
        "error_dense": 0.0080,
        "error_pruned": 0.0077,
        "kept": {"conv1": 0.66, "conv2": 0.12, "fc1": 0.08, "fc2": 0.19},
        "kept_total": 0.08,
    },
}


class ConfigError(ValueError):
    """An impossible combination of options; the CLI prints it as one line and exits 2."""


@dataclasses.dataclass(frozen=True)
class Config:
    """Everything that decides a run's result (the output folder and resume flag aside).

    Attributes:
      model: ``'lenet300'`` (LeNet-300-100) or ``'lenet5'``.
      data_dir: a folder (or ``.npz``) holding MNIST, or ``None`` for sklearn's 8x8 digits.
      epochs: dense training epochs.
      rounds: prune -> retrain rounds.
      q: Han's quality parameter per round (one value is used for every round).
      keep: instead of ``q``, the fraction of each layer to keep after each round.
      q_scale: ``((layer, factor), ...)``: those layers are pruned with ``factor * q``; Han et al.
        prune sensitive layers (LeNet-5's conv1) far less than the fully connected ones.
      retrain_epochs: retraining epochs per round.
      lr: dense learning rate (SGD, momentum 0.9, cosine decay); retraining uses
        ``lr * retrain_lr_scale`` with a cosine restart each round.
      retrain_lr_scale: Han et al. retrain LeNets at 1/10 of the original rate.
      weight_decay: L2 coefficient, in training and retraining.
      batch_size: minibatch size.
      dropout: dropout rate on the inputs of the hidden dense layers after the first (0: none,
        as Caffe's LeNets); rescaled each round by Han's rule.
      seed: seeds initialisation, shuffling and dropout.
    """

    model: str = "lenet300"
    data_dir: str | None = None
    epochs: int = 30
    rounds: int = 6
    q: tuple[float, ...] = (1.0, 1.5, 1.9, 2.2, 2.4, 2.6)
    keep: tuple[float, ...] | None = None
    q_scale: tuple[tuple[str, float], ...] = ()
    retrain_epochs: int = 10
    lr: float = 0.1
    retrain_lr_scale: float = 0.1
    weight_decay: float = 5e-4
    batch_size: int = 128
    dropout: float = 0.0
    seed: int = 0

    def checked(self) -> Config:
        """Returns the config with a one-value ``q`` spread over the rounds, or raises."""
        if self.model not in ("lenet300", "lenet5"):
            raise ConfigError(f"unknown model {self.model!r}; choose lenet300 or lenet5.")
        for name in ("epochs", "rounds", "retrain_epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1.")
        if not (self.lr > 0 and self.retrain_lr_scale > 0 and self.weight_decay >= 0):
            raise ConfigError("--lr and --retrain-lr-scale must be > 0, --weight-decay >= 0.")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"--dropout must be in [0, 1), got {self.dropout}.")
        schedule = self.keep if self.keep is not None else self.q
        flag = "--keep" if self.keep is not None else "--q"
        if len(schedule) == 1:
            schedule = schedule * self.rounds
        if len(schedule) != self.rounds:
            raise ConfigError(
                f"{flag} has {len(schedule)} values for {self.rounds} rounds; give one value "
                "or one per round."
            )
        if self.keep is not None and not all(0 < k <= 1 for k in schedule):
            raise ConfigError(f"--keep values must be fractions in (0, 1], got {schedule}.")
        if self.keep is None and not all(q >= 0 for q in schedule):
            raise ConfigError(f"--q values must be >= 0, got {schedule}.")
        if any(f < 0 for _, f in self.q_scale):
            raise ConfigError(f"--q-scale factors must be >= 0, got {dict(self.q_scale)}.")
        if self.q_scale and self.keep is not None:
            raise ConfigError("--q-scale applies to --q, not to --keep.")
        field = "keep" if self.keep is not None else "q"
        return dataclasses.replace(self, **{field: tuple(float(v) for v in schedule)})


# Our reproduction of Han et al. on real MNIST: what ``jaxprune run --model M`` does unless told
# otherwise. SGD with momentum 0.9, L2 5e-4 and cosine decay; q rises round by round because the
# std is taken over the whole layer (pruned entries as zeros), so a fixed q would stop pruning.
# LeNet-5 prunes its sensitive layers (conv1, conv2, the output layer) with a fraction of q, as
# the paper does, and trains with dropout on fc2's input, rescaled each round by Han's rule.
RECIPES = {
    "lenet300": Config(
        model="lenet300",
        epochs=20,
        lr=0.1,
        rounds=12,
        q=(1.0, 1.5, 1.9, 2.2, 2.4, 2.6, 2.8, 3.0, 3.2, 3.4, 3.6, 3.8),
        retrain_epochs=10,
    ),
    "lenet5": Config(
        model="lenet5",
        epochs=10,
        lr=0.05,
        dropout=0.5,
        rounds=9,
        q=(1.0, 1.6, 2.0, 2.3, 2.5, 2.6, 2.7, 2.9, 3.1),
        q_scale=(("conv1", 0.3), ("conv2", 0.6), ("fc2", 0.6)),
        retrain_epochs=6,
        retrain_lr_scale=0.2,
    ),
}


def build_model(
    config: Config, rates: dict[str, float] | None = None, *, hidden: tuple[int, ...] | None = None
) -> nn.Module:
    """The Linen model of ``config``, with dropout ``rates`` (``{layer: rate}``) if given.

    LeNet-5 uses 'SAME' padding on the built-in 8x8 digits (5x5 'VALID' convolutions would leave
    nothing) and Caffe's 'VALID' on MNIST. ``hidden`` builds a LeNet-300-100 of other widths.
    """
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


@functools.lru_cache(maxsize=8)
def make_eval(config: Config) -> Callable[[PyTree, np.ndarray], jax.Array]:
    """A hashable ``apply_fn(params, x)`` for :func:`jaxprune.analysis.accuracy` (no dropout).

    Cached per config: ``accuracy`` compiles once per ``apply_fn`` object.
    """
    model = build_model(config, {})

    def apply_fn(params, x):
        return model.apply({"params": params}, x)

    return apply_fn


def epoch_batches(config: Config, data: Dataset, offset: int) -> Callable[[int], Iterator]:
    """``batches(epoch)`` with its own seed stream: dense training and rounds never share one."""

    def it(epoch: int) -> Iterator:
        return batches(
            data.x_train,
            data.y_train,
            batch_size=min(config.batch_size, len(data.x_train)),
            seed=config.seed,
            epoch=offset + epoch,
            drop_remainder=True,
        )

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
        optax.sgd(optax.cosine_decay_schedule(config.lr, total), momentum=0.9),
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
    return state.params


def retrain_optimizer(
    config: Config, data: Dataset
) -> Callable[[float], optax.GradientTransformation]:
    """SGD with momentum and a cosine schedule that restarts every round."""
    period = config.retrain_epochs * steps_per_epoch(config, data)

    def make(lr: float) -> optax.GradientTransformation:
        cosine = optax.cosine_decay_schedule(lr, period)
        return optax.sgd(lambda count: cosine(count % period), momentum=0.9)

    return make


def rounds(
    config: Config,
    data: Dataset,
    params: PyTree,
    *,
    resume: RoundsState | None = None,
    on_epoch: Callable[[int, int, float], None] | None = None,
) -> Iterator[RoundsState]:
    """Han et al.'s steps 2-4: prune (``q * std`` or a kept fraction), retrain, repeat."""
    apply_fn = make_eval(config)
    if config.keep is not None:
        schedule: dict[str, Any] = {"sparsity": [1.0 - k for k in config.keep]}
    elif config.q_scale:
        # "*" matches every prunable leaf; an exact layer name wins over it (compute_masks).
        schedule = {"q": [{"*": q, **{k: q * f for k, f in config.q_scale}} for q in config.q]}
    else:
        schedule = {"q": config.q}
    yield from prune_and_retrain(
        params,
        make_loss(config),
        epoch_batches(config, data, offset=config.epochs),
        lambda p: accuracy(apply_fn, p, data.x_test, data.y_test),
        rounds=config.rounds,
        learning_rate=config.lr,
        lr_scale=config.retrain_lr_scale,
        optimizer=retrain_optimizer(config, data),
        weight_decay=config.weight_decay,
        epochs=config.retrain_epochs,
        dropout=dropout_layers(config),
        seed=config.seed + 2,
        resume=resume,
        on_epoch=on_epoch,
        **schedule,
    )


# --- checkpoints --------------------------------------------------------------------------------


def q_of(record: RoundRecord, layer: str) -> float | None:
    """The q a round used for ``layer`` (None for a kept-fraction round)."""
    if isinstance(record.q, dict):
        return record.q.get(layer, record.q["*"])
    return record.q


def write_json(path: Path, obj: Any) -> None:
    """Writes JSON atomically: a temp file in the same folder, then a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def record_dict(record: Any) -> dict[str, Any]:
    return dict(record._asdict())


class Checkpoints:
    """The run's checkpoints in ``out/checkpoints``: the dense params, then one file per round.

    Each file is written atomically by :func:`jaxprune.save`; a round counts as done once its
    JSON (written last) exists, so a run killed mid-write resumes from the round before.
    """

    def __init__(self, out: Path):
        self.dir = Path(out) / "checkpoints"

    def save_config(self, config: Config) -> None:
        write_json(self.dir / "config.json", dataclasses.asdict(config))

    def check_config(self, config: Config) -> None:
        path = self.dir / "config.json"
        if not path.exists():
            return
        saved = json.loads(path.read_text())
        now = json.loads(json.dumps(dataclasses.asdict(config)))
        changed = sorted(k for k in now if saved.get(k) != now[k])
        if changed:
            raise ConfigError(
                f"--resume: the checkpoints in {self.dir} were made with other options "
                f"({', '.join(changed)}); rerun with the same options or another --out."
            )

    def save_dense(self, params: PyTree, error: float) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        save(self.dir / "dense.jaxprune", {"params": params}, compress=False)
        write_json(self.dir / "dense.json", {"error": error})

    def load_dense(self) -> tuple[PyTree, float] | None:
        if not (self.dir / "dense.json").exists():
            return None
        error = json.loads((self.dir / "dense.json").read_text())["error"]
        return load(self.dir / "dense.jaxprune")["params"], error

    def save_round(self, state: RoundsState) -> None:
        k = state.round
        tree = {
            "params": state.params,
            "masks": state.masks,
            "opt": jax.tree.leaves(state.opt_state),
        }
        if state.model_state is not None:
            tree["model_state"] = state.model_state
        save(self.dir / f"round-{k}.jaxprune", tree, compress=False)
        write_json(self.dir / f"round-{k}.json", [record_dict(r) for r in state.history])

    def load_round(self, config: Config, data: Dataset) -> RoundsState | None:
        done = sorted(int(p.stem.split("-")[1]) for p in self.dir.glob("round-*.json"))
        if not done:
            return None
        k = done[-1]
        tree = load(self.dir / f"round-{k}.jaxprune")
        history = json.loads((self.dir / f"round-{k}.json").read_text())
        # The optimizer state is stored as its leaves; its structure comes from a fresh init.
        lr = config.lr * config.retrain_lr_scale
        tx = keep_pruned(
            retrain_optimizer(config, data)(lr), tree["masks"], weight_decay=config.weight_decay
        )
        template = tx.init(tree["params"])
        opt_state = jax.tree.unflatten(
            jax.tree.structure(template), [jnp.asarray(x) for x in tree["opt"]]
        )
        records = tuple(RoundRecord(**r) for r in history)
        masks = jax.tree.map(jnp.asarray, tree["masks"])
        params = jax.tree.map(jnp.asarray, tree["params"])
        model_state = jax.tree.map(jnp.asarray, tree.get("model_state"))
        return RoundsState(k, params, masks, opt_state, records, model_state)


# --- export and timing ------------------------------------------------------------------------


def dense_npz_bytes(params: PyTree) -> int:
    """Bytes of the params as a plain float32 ``.npz`` (the size a user would otherwise ship)."""
    buf = io.BytesIO()
    arrays = {f"a{i}": np.asarray(leaf) for i, leaf in enumerate(jax.tree.leaves(params))}
    np.savez(buf, **arrays)
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
    """Removes units whose every input or output connection is pruned (Han et al. 2015, Sec. 3.4)."""
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


def check_structured(config: Config, fraction: float) -> None:
    """Raises :class:`ConfigError` unless ``structured(config, ..., fraction)`` can run."""
    if config.model != "lenet300":
        raise ConfigError("--structured supports --model lenet300 only.")
    if not 0 < fraction < 1:
        raise ConfigError(f"--structured must be a fraction in (0, 1), got {fraction}.")


def structured(config: Config, data: Dataset, dense: PyTree, fraction: float) -> dict[str, Any]:
    """Prunes whole hidden neurons of LeNet-300-100, retrains, shrinks, and times the result.

    Han et al. 2015 (Sec. 3.4) note the neuron count can be cut without retraining; this measures
    the accuracy cost before and after one round of retraining, and the dense speed-up of the
    physically smaller model.
    """
    check_structured(config, fraction)
    layers, activations = _chain(config)
    apply_fn = make_eval(config)
    masks = neuron_masks(dense, fraction, layers=layers)
    pruned = apply_masks(dense, masks)
    error_before = 1.0 - accuracy(apply_fn, pruned, data.x_test, data.y_test)

    tx = keep_pruned(
        retrain_optimizer(config, data)(config.lr * config.retrain_lr_scale),
        masks,
        weight_decay=config.weight_decay,
    )
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
        "fraction": fraction,
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
        f"structured: {result['fraction']:.0%} of hidden neurons pruned, "
        f"{result['hidden_before']} -> {result['hidden_after']} hidden units; error "
        f"{100 * result['error_without_retraining']:.2f}% without retraining, "
        f"{100 * result['error_after_retraining']:.2f}% after; shrunk/original dense time: {speed}"
    )
