"""Han et al. 2015 on a small NNX Transformer, plain and with its blocks stacked by nnx.scan.

The task is synthetic: a sequence of 8 tokens (vocabulary 16) belongs to class
``(first + last) % 4``, so attention must carry information across positions. For each model
(blocks in an ``nnx.List``, or built by ``nnx.vmap`` and run by ``nnx.scan``):

1. train it dense with Flax's own loop (``nnx.Optimizer``, Adam with L2 by
   ``optax.add_decayed_weights``), attention dropout on;
2. prune in rounds to 30%, 15% and 8% of the kernels and embeddings, retraining in between:
   once with ``jaxprune.prune_and_retrain`` (the loss from ``jaxprune.nnx_loss``, which gives
   every RNG stream fresh keys each step) and once with Flax's loop (``nnx.Optimizer`` over
   ``keep_pruned``, masks swapped by ``update_masks``); the scan model passes
   ``stacked={'layers': 0}`` so each block is a layer of its own;
3. export the kernels as BCOO, run the jitted sparse forward pass, check it against the masked
   dense model, save and load the file, and time sparse against dense at batch 1 and 64.

Accuracies are the mean +- std over ``--seeds`` runs.

    pip install -e ".[demo]"
    python examples/transformer.py [--seeds N] [--quick]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from rich.console import Console
from rich.table import Table

import jaxprune
from jaxprune.demo.run import compare_times, dense_npz_bytes

sys.path.insert(0, os.path.dirname(__file__))
from common import Load, mean_std

VOCAB, SEQ, D, HEADS, LAYERS, CLASSES = 16, 8, 32, 4, 2, 4
SPARSITY = (0.70, 0.85, 0.92)  # Han rounds to 30%, 15% and 8% of the weights kept


class Block(nnx.Module):
    """Pre-norm block: LayerNorm, self-attention (with dropout), LayerNorm, a two-layer MLP."""

    def __init__(self, rngs: nnx.Rngs):
        self.ln1 = nnx.LayerNorm(D, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(
            num_heads=HEADS, in_features=D, dropout_rate=0.1, decode=False, rngs=rngs
        )
        self.ln2 = nnx.LayerNorm(D, rngs=rngs)
        self.fc1 = nnx.Linear(D, 2 * D, rngs=rngs)
        self.fc2 = nnx.Linear(2 * D, D, rngs=rngs)

    def __call__(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.fc2(nnx.gelu(self.fc1(self.ln2(x))))


class Transformer(nnx.Module):
    """Embed + learned positions, LAYERS blocks (a list, or nnx.vmap + nnx.scan), pooled head."""

    def __init__(self, rngs: nnx.Rngs, *, scan: bool):
        self.scan = scan
        self.embed = nnx.Embed(VOCAB, D, rngs=rngs)
        self.pos = nnx.Param(jax.random.normal(rngs.params(), (SEQ, D)) * 0.02)
        if scan:

            @nnx.split_rngs(splits=LAYERS)
            @nnx.vmap(in_axes=(0,), out_axes=0)
            def make(rngs):
                return Block(rngs)

            self.layers = make(rngs)
        else:
            self.layers = nnx.List([Block(rngs) for _ in range(LAYERS)])
        self.norm = nnx.LayerNorm(D, rngs=rngs)
        self.head = nnx.Linear(D, CLASSES, rngs=rngs)

    def __call__(self, tokens):
        x = self.embed(tokens) + self.pos[...]
        if self.scan:

            @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
            def body(x, block):
                return block(x)

            x = body(x, self.layers)
        else:
            for block in self.layers:
                x = block(x)
        return self.head(self.norm(x).mean(axis=1))


def sequences(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    tokens = np.random.default_rng(seed).integers(0, VOCAB, size=(n, SEQ))
    return tokens.astype(np.int32), ((tokens[:, 0] + tokens[:, -1]) % CLASSES).astype(np.int32)


def epoch_batches(train, epoch: int, size: int = 128):
    order = np.random.default_rng(epoch).permutation(len(train[0]))
    for i in range(0, len(order) - size + 1, size):
        idx = order[i : i + size]
        yield jnp.asarray(train[0][idx]), jnp.asarray(train[1][idx])


def xent(model, batch):
    tokens, labels = batch
    return optax.softmax_cross_entropy_with_integer_labels(model(tokens), labels).mean()


@nnx.jit
def train_step(model, optimizer, batch):
    optimizer.update(model, nnx.grad(xent)(model, batch))


def accuracy(model, params, test) -> float:
    model.eval()
    nnx.update(model, params)
    out = float(jnp.mean(model(jnp.asarray(test[0])).argmax(-1) == test[1]))
    model.train()
    return out


def adam_l2(learning_rate: float, wd: float) -> optax.GradientTransformation:
    # Han et al.'s L2, coupled: the decay joins the gradient before Adam scales it.
    return optax.chain(optax.add_decayed_weights(wd), optax.adam(learning_rate))


def train_dense(scan: bool, seed: int, train, epochs: int, learning_rate: float, wd: float):
    model = Transformer(nnx.Rngs(seed), scan=scan)
    model.train()  # attention dropout on
    optimizer = nnx.Optimizer(model, adam_l2(learning_rate, wd), wrt=nnx.Param)
    for epoch in range(epochs):
        for batch in epoch_batches(train, 1000 * seed + epoch):
            train_step(model, optimizer, batch)
    return model


def with_driver(model, stacked, train, test, *, seed, epochs, learning_rate):
    """Han rounds through jaxprune.prune_and_retrain; returns (accuracies, last RoundsState)."""
    loss, params, _ = jaxprune.nnx_loss(model, xent)
    runs = jaxprune.prune_and_retrain(
        params,
        loss,
        lambda e: epoch_batches(train, 7919 * seed + e),
        lambda p: 0.0,
        rounds=len(SPARSITY),
        optimizer=optax.adam(learning_rate * 0.3),
        sparsity=list(SPARSITY),
        epochs=epochs,
        seed=seed,
        stacked=stacked,
    )
    states = list(runs)
    return [accuracy(model, s.params, test) for s in states], states[-1]


def with_nnx_optimizer(model, stacked, train, test, *, seed, epochs, learning_rate):
    """The same rounds in Flax's own loop: nnx.Optimizer over keep_pruned, update_masks."""
    accs, masks, optimizer = [], None, None
    for r, sparsity in enumerate(SPARSITY):
        params = nnx.state(model, nnx.Param)
        masks = jaxprune.masks_for_sparsity(params, sparsity, previous=masks, stacked=stacked)
        nnx.update(model, jaxprune.apply_masks(params, masks))
        if optimizer is None:
            tx = jaxprune.keep_pruned(optax.adam(learning_rate * 0.3), masks)
            optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
        else:
            optimizer.opt_state = jaxprune.update_masks(optimizer.opt_state, masks)
        for e in range(epochs):
            for batch in epoch_batches(train, 7919 * seed + r * epochs + e):
                train_step(model, optimizer, batch)
        jaxprune.raise_if_misplaced(optimizer.opt_state)
        accs.append(accuracy(model, nnx.state(model, nnx.Param), test))
    return accs, masks


def export_and_time(model, params, masks, stacked, test, *, samples):
    model.eval()
    nnx.update(model, params)
    exported = jaxprune.to_bcoo(params, masks)
    sparse = jaxprune.sparse_apply(model, exported, stacked=stacked)
    pruned = jaxprune.apply_masks(params, masks)
    nnx.update(model, pruned)
    graphdef, state = nnx.split(model)
    dense = jax.jit(lambda x: nnx.merge(graphdef, state, copy=True)(x))
    x = jnp.asarray(test[0][:64])
    gap = float(jnp.max(jnp.abs(sparse(x) - dense(x))))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "transformer.jaxprune"
        report = jaxprune.save(path, exported)
        same = bool(
            jnp.array_equal(
                jaxprune.sparse_apply(model, jaxprune.load(path), stacked=stacked)(x), sparse(x)
            )
        )
    with Load() as load:
        times = compare_times(
            dense,
            sparse,
            (SEQ,),
            (1, 64),
            samples,
            make_input=lambda b: jax.random.randint(jax.random.key(b), (b, SEQ), 0, VOCAB),
        )
    return {
        "max_abs_gap": gap,
        "reloaded_equal": same,
        "file_bytes": report.nbytes,
        "dense_npz_bytes": dense_npz_bytes(pruned),
        "times": times,
        "load": load.cores,
        "plan": sparse.plan(x),
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=12, help="dense training epochs")
    parser.add_argument("--retrain-epochs", type=int, default=3, help="per round")
    parser.add_argument(
        "--models", default="plain,scan", help="which of plain,scan to run (default: both)"
    )
    parser.add_argument("--quick", action="store_true", help="a tiny run, for the tests")
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.epochs, args.retrain_epochs = 1, 1, 1
    console = Console()
    start = time.perf_counter()
    train, test = sequences(512 if args.quick else 4096, 0), sequences(1024, 1)
    learning_rate, wd = 3e-3, 1e-4
    results = {}
    chosen = set(args.models.split(","))
    if not chosen <= {"plain", "scan"}:
        parser.error(f"--models takes plain and/or scan, got {args.models!r}")
    for scan in [s == "scan" for s in ("plain", "scan") if s in chosen]:
        name = "nnx.scan" if scan else "plain"
        stacked = {"layers": 0} if scan else None
        cells = {"dense": [], "driver": [], "nnx.Optimizer": []}
        for seed in range(args.seeds):
            kwargs = dict(seed=seed, epochs=args.retrain_epochs, learning_rate=learning_rate)
            model = train_dense(scan, seed, train, args.epochs, learning_rate, wd)
            # A copy: nnx.state returns the model's own Variables, which nnx.update changes.
            dense_params = jax.tree.map(jnp.copy, nnx.state(model, nnx.Param))
            cells["dense"].append(accuracy(model, dense_params, test))
            accs, final = with_driver(model, stacked, train, test, **kwargs)
            cells["driver"].append(accs)
            nnx.update(model, dense_params)
            accs, _ = with_nnx_optimizer(model, stacked, train, test, **kwargs)
            cells["nnx.Optimizer"].append(accs)
        table = Table(title=f"NNX Transformer ({name}): test accuracy, {args.seeds} seed(s)")
        for col in ("sparsity", "prune_and_retrain", "nnx.Optimizer + keep_pruned"):
            table.add_column(col, justify="right")
        table.add_row("0% (dense)", mean_std(cells["dense"]), "")
        for i, sparsity in enumerate(SPARSITY):
            table.add_row(
                f"{sparsity:.0%}",
                mean_std([a[i] for a in cells["driver"]]),
                mean_std([a[i] for a in cells["nnx.Optimizer"]]),
            )
        console.print(table)
        out = export_and_time(
            model, final.params, final.masks, stacked, test, samples=3 if args.quick else 15
        )
        t = out["times"]
        console.print(
            f"{name}: sparse matches the masked dense model (max |diff| {out['max_abs_gap']:.1e}); "
            f"file {out['file_bytes']:,} B vs dense .npz {out['dense_npz_bytes']:,} B "
            f"({out['file_bytes'] / out['dense_npz_bytes']:.2f}x); reloaded: same outputs "
            f"{out['reloaded_equal']}; sparse / dense time: batch 1 {t['1']['ratio']:.2f}x, "
            f"batch 64 {t['64']['ratio']:.2f}x (load from other processes {out['load']:.2f} "
            f"cores; layouts at batch 64: {sorted(set(out['plan'].values()))})"
        )
        results[name] = {**cells, **out}
    console.print(f"total {time.perf_counter() - start:.0f} s")
    return results


if __name__ == "__main__":
    main()
