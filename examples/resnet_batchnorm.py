"""Han et al. 2015 on a Linen ResNet-style CNN with BatchNorm: the whole flow, end to end.

Train the dense network (L2, SGD with momentum), prune it in rounds to 30%, 15% and 8% of its
kernels with retraining in between (``jaxprune.prune_and_retrain``, carrying the BatchNorm
statistics as ``model_state``), re-estimate the statistics after each prune, export the kernels
as BCOO, run the jitted sparse forward pass, save and load the file, and time it against the
dense model. Data: scikit-learn's built-in 8x8 digits, or MNIST with ``--data-dir``.

Pruning shifts every activation after a pruned layer, so the BatchNorm statistics of the dense
model are stale: the table shows the accuracy right after each one-shot prune with the stale
statistics and with re-estimated ones (``jaxprune.reestimate_batch_stats``), and after
retraining without and with re-estimation (``reestimate=`` in the driver). Each cell is the mean
+- std over ``--seeds`` runs.

    pip install -e ".[demo]"
    python examples/resnet_batchnorm.py [--data-dir DIR] [--seeds N] [--quick]
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import tempfile
import time
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from rich.console import Console
from rich.table import Table

import jaxprune
from jaxprune.demo.data import load_dataset
from jaxprune.demo.run import compare_times, dense_npz_bytes

sys.path.insert(0, os.path.dirname(__file__))
from common import Load, batches, mean_std

SPARSITY = (0.70, 0.85, 0.92)  # Han rounds to 30%, 15% and 8% of the kernels kept
REESTIMATE = 20  # batches of 64 to re-estimate the statistics on


class Block(nn.Module):
    features: int

    @nn.compact
    def __call__(self, x, train: bool):
        y = nn.Conv(self.features, (3, 3), use_bias=False)(x)
        y = nn.relu(nn.BatchNorm(use_running_average=not train)(y))
        y = nn.Conv(self.features, (3, 3), use_bias=False)(y)
        y = nn.BatchNorm(use_running_average=not train)(y)
        return nn.relu(x + y)


class ResNet(nn.Module):
    """A conv stem, two residual blocks with BatchNorm, global average pooling, a Dense head."""

    features: int = 32
    classes: int = 10

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Conv(self.features, (3, 3), use_bias=False, name="stem")(x)
        x = nn.relu(nn.BatchNorm(use_running_average=not train, name="stem_bn")(x))
        x = Block(self.features, name="block1")(x, train)
        x = Block(self.features, name="block2")(x, train)
        return nn.Dense(self.classes, name="head")(x.mean(axis=(1, 2)))


MODEL = ResNet()
# The stem (288 weights, under 1% of the kernels) stays dense: like Han et al.'s conv1, the first
# layer is the most sensitive, and on one input channel it has few weights to spare.
WHERE = jaxprune.excluding("stem")


def loss_fn(params, batch, rng, model_state):
    """Cross-entropy in train mode; returns the updated BatchNorm statistics."""
    del rng
    x, y = batch
    logits, new_state = MODEL.apply(
        {"params": params, **model_state}, x, train=True, mutable=list(model_state)
    )
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), new_state


@jax.jit
def _logits(params, model_state, x):
    return MODEL.apply({"params": params, **model_state}, x)


def accuracy(params, model_state, x, y) -> float:
    correct = sum(
        int(jnp.sum(_logits(params, model_state, x[i : i + 512]).argmax(-1) == y[i : i + 512]))
        for i in range(0, len(x), 512)
    )
    return correct / len(x)


def stats_update(model_state, batch, params):
    """One train-mode pass, for jaxprune.reestimate_batch_stats."""
    return loss_fn(params, batch, None, model_state)[1]


def _some(data, seed):
    return itertools.islice(batches(data, seed), REESTIMATE)


def train_dense(data, seed: int, epochs: int, learning_rate: float, wd: float):
    variables = MODEL.init(jax.random.key(seed), data.x_train[:1])
    params, state = variables["params"], {"batch_stats": variables["batch_stats"]}
    steps = epochs * (len(data.x_train) // 64)
    tx = optax.chain(
        optax.add_decayed_weights(wd),
        optax.sgd(optax.cosine_decay_schedule(learning_rate, steps), momentum=0.9),
    )
    step = jaxprune.make_retrain_step(loss_fn, tx)
    s = jaxprune.retrain_state(params, tx, rng=jax.random.key(seed), model_state=state)
    for epoch in range(epochs):
        for batch in batches(data, seed * 1000 + epoch):
            s, _ = step(s, batch)
    # The running averages lag behind the weights (momentum 0.99); measure them afresh, as
    # every pruned model below gets its statistics measured too.
    stats = jaxprune.reestimate_batch_stats(
        stats_update, s.model_state, _some(data, seed), s.params
    )
    return s.params, stats


def one_shot(data, params, state, sparsity: float, seed: int) -> tuple[float, float]:
    """Accuracy right after pruning to ``sparsity``: stale statistics, then re-estimated ones."""
    masks = jaxprune.masks_for_sparsity(params, sparsity, where=WHERE)
    pruned = jaxprune.apply_masks(params, masks)
    stale = accuracy(pruned, state, data.x_test, data.y_test)
    fresh_state = jaxprune.reestimate_batch_stats(stats_update, state, _some(data, seed), pruned)
    return stale, accuracy(pruned, fresh_state, data.x_test, data.y_test)


def han_rounds(data, params, state, *, seed, epochs, learning_rate, wd, reestimate):
    """prune -> retrain for each target in SPARSITY; yields (kept fraction, accuracy, state)."""
    runs = jaxprune.prune_and_retrain(
        params,
        loss_fn,
        lambda e: batches(data, 7919 * seed + e),
        lambda p: 0.0,
        rounds=len(SPARSITY),
        optimizer=optax.chain(
            optax.add_decayed_weights(wd), optax.sgd(learning_rate / 10, momentum=0.9)
        ),
        sparsity=list(SPARSITY),
        epochs=epochs,
        where=WHERE,
        seed=seed,
        model_state=state,
        reestimate=reestimate,
    )
    for rounds_state in runs:
        acc = accuracy(rounds_state.params, rounds_state.model_state, data.x_test, data.y_test)
        yield rounds_state.history[-1].kept_fraction, acc, rounds_state


def export_and_time(data, final, console, *, samples: int) -> dict:
    """BCOO export, sparse inference checked against the masked dense model, file, timings."""
    exported = jaxprune.to_bcoo(final.params, final.masks, where=WHERE)
    state = final.model_state
    sparse = jaxprune.sparse_apply(MODEL, exported, variables=state, apply_kwargs={"train": False})
    pruned = jaxprune.apply_masks(final.params, final.masks)
    x = jnp.asarray(data.x_test[:64])
    gap = float(jnp.max(jnp.abs(sparse(x) - _logits(pruned, state, x))))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "resnet.jaxprune"
        report = jaxprune.save(path, {"params": exported, **state})
        back = jaxprune.load(path)
        reloaded = jaxprune.sparse_apply(
            MODEL,
            back["params"],
            variables={"batch_stats": back["batch_stats"]},
            apply_kwargs={"train": False},
        )
        same = bool(jnp.array_equal(reloaded(x), sparse(x)))
    dense_bytes = dense_npz_bytes({"params": pruned, **state})
    dense = jax.jit(lambda x: _logits(pruned, state, x))
    with Load() as load:
        times = compare_times(dense, sparse, data.x_test.shape[1:], (1, 64), samples)
    return {
        "max_abs_gap": gap,
        "reloaded_equal": same,
        "file_bytes": report.nbytes,
        "dense_npz_bytes": dense_bytes,
        "times": times,
        "load": load.cores,
        "plan": sparse.plan(x),
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=None, help="MNIST folder (default: 8x8 digits)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=12, help="dense training epochs")
    parser.add_argument("--retrain-epochs", type=int, default=4, help="per round")
    parser.add_argument("--quick", action="store_true", help="a tiny run, for the tests")
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.epochs, args.retrain_epochs = 1, 1, 1
    console = Console()
    start = time.perf_counter()
    data = load_dataset(args.data_dir)
    learning_rate, wd = 0.05, 5e-4
    rows = {k: {"stale": [], "fresh": [], "plain": [], "reest": []} for k in SPARSITY}
    dense_acc, final = [], None
    for seed in range(args.seeds):
        params, state = train_dense(data, seed, args.epochs, learning_rate, wd)
        dense_acc.append(accuracy(params, state, data.x_test, data.y_test))
        for sparsity in SPARSITY:
            stale, fresh = one_shot(data, params, state, sparsity, seed)
            rows[sparsity]["stale"].append(stale)
            rows[sparsity]["fresh"].append(fresh)
        for reestimate, column in ((0, "plain"), (REESTIMATE, "reest")):
            rounds = han_rounds(
                data,
                params,
                state,
                seed=seed,
                epochs=args.retrain_epochs,
                learning_rate=learning_rate,
                wd=wd,
                reestimate=reestimate,
            )
            results = list(rounds)
            for sparsity, (_, acc, _) in zip(SPARSITY, results, strict=True):
                rows[sparsity][column].append(acc)
            final = results[-1][2]

    table = Table(
        title=f"Linen ResNet + BatchNorm on {data.name}: test accuracy, {args.seeds} seed(s)"
    )
    for col in (
        "kernel sparsity",
        "one-shot, stale BN",
        "one-shot, re-estimated BN",
        "Han rounds, no re-estimation",
        "Han rounds, re-estimated",
    ):
        table.add_column(col, justify="right")
    table.add_row("0% (dense)", mean_std(dense_acc), "", "", "")
    for sparsity, r in rows.items():
        table.add_row(
            f"{sparsity:.0%}", *(mean_std(r[c]) for c in ("stale", "fresh", "plain", "reest"))
        )
    console.print(table)

    result = export_and_time(data, final, console, samples=3 if args.quick else 15)
    t = result["times"]
    console.print(
        f"export: sparse matches the masked dense model (max |diff| {result['max_abs_gap']:.1e}); "
        f"file {result['file_bytes']:,} B vs dense .npz {result['dense_npz_bytes']:,} B "
        f"({result['file_bytes'] / result['dense_npz_bytes']:.2f}x); reloaded file gives the "
        f"same outputs: {result['reloaded_equal']}"
    )
    console.print(
        f"sparse / dense time: batch 1 {t['1']['ratio']:.2f}x, batch 64 {t['64']['ratio']:.2f}x "
        f"(load from other processes {result['load']:.2f} cores; layouts at batch 64: "
        f"{sorted(set(result['plan'].values()))}; XLA's convolution beats patches times a sparse "
        "matrix at these densities, so the rule keeps convolutions dense)"
    )
    console.print(f"total {time.perf_counter() - start:.0f} s")
    return {"dense": dense_acc, "rows": rows, **result}


if __name__ == "__main__":
    main()
