"""One-shot 70% magnitude pruning of the test zoo: the default rule against the old ndim >= 2 rule.

Each zoo model (tests/zoo.py) is trained briefly from several seeds: the CNNs on scikit-learn's
8x8 digits, the Transformers on a synthetic sequence task (the class is the sum of the first and
last tokens mod 4, so attention must mix positions). Then 70% of every prunable layer is removed
at once (``masks_for_sparsity(params, 0.7)``, no retraining) under two rules:

- ``default``: ``jaxprune.default_where`` (kernels and embeddings by name), with
  ``stacked={'layers': 0}`` for the scan-stacked models, so each stacked layer loses 70%;
- ``ndim>=2``: the rule jaxprune had before (every floating array with ndim >= 2, so attention
  and scan-stack biases and norm scales too), one layer per leaf.

It prints test accuracy (mean +- std over seeds) dense and after each prune, and which leaves
each rule prunes. Beside each model, the cores other processes kept busy while it trained and was
pruned (``measure.Load``; before, this column counted every busy core, ours included).

    python benchmarks/zoo_oneshot.py [--seeds N] [--steps N] [--quick]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from measure import Load, mean_std

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
import zoo

import jaxprune
from jaxprune._tree import leaves_with_paths


def _digits():
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32).reshape(-1, 8, 8, 1)
    rng = np.random.default_rng(0)
    order = rng.permutation(len(x))
    x, y = x[order], y[order]
    return (x[:1400], y[:1400]), (x[1400:], y[1400:])


def _sequences():
    rng = np.random.default_rng(0)
    t = rng.integers(0, zoo.VOCAB, size=(5000, zoo.SEQ))
    y = (t[:, 0] + t[:, -1]) % zoo.CLASSES
    return (t[:4000], y[:4000]), (t[4000:], y[4000:])


def _ndim_rule(path, leaf):
    del path
    return leaf.ndim >= 2 and jnp.issubdtype(leaf.dtype, jnp.floating)


def _batches(train, steps, seed, batch=128):
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        idx = rng.integers(0, len(train[0]), batch)
        yield jnp.asarray(train[0][idx]), jnp.asarray(train[1][idx])


def _xent(logits, y):
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def _train_linen(module, train, steps, seed, has_bn):
    variables = module.init(jax.random.key(seed), jnp.asarray(train[0][:2]))
    params, stats = variables["params"], variables.get("batch_stats")
    tx = optax.adam(3e-3)
    opt = tx.init(params)

    @jax.jit
    def step(params, stats, opt, x, y):
        def loss(p):
            if has_bn:
                logits, new = module.apply(
                    {"params": p, "batch_stats": stats}, x, train=True, mutable=["batch_stats"]
                )
                return _xent(logits, y), new["batch_stats"]
            return _xent(module.apply({"params": p}, x), y), stats

        (_, stats), grads = jax.value_and_grad(loss, has_aux=True)(params)
        updates, opt = tx.update(grads, opt, params)
        return optax.apply_updates(params, updates), stats, opt

    for x, y in _batches(train, steps, seed):
        params, stats, opt = step(params, stats, opt, x, y)
    rest = {"batch_stats": stats} if has_bn else {}
    return params, jax.jit(lambda p, x: module.apply({"params": p, **rest}, x))


def _train_nnx(make, train, steps, seed):
    model = make(nnx.Rngs(seed))
    model.train()
    optimizer = nnx.Optimizer(model, optax.adam(3e-3), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer, x, y):
        optimizer.update(model, nnx.grad(lambda m: _xent(m(x), y))(model))

    for x, y in _batches(train, steps, seed):
        step(model, optimizer, x, y)
    model.eval()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    return params, jax.jit(lambda p, x: nnx.merge(graphdef, p, rest)(x))


def _accuracy(apply, params, test):
    logits = apply(params, jnp.asarray(test[0]))
    return float(jnp.mean(jnp.argmax(logits, -1) == jnp.asarray(test[1])))


MODELS = {
    "linen_resnet": ("images", lambda: zoo.LinenResNet(), "linen_bn"),
    "nnx_cnn": ("images", lambda rngs: zoo.NNXCNN(rngs), "nnx"),
    "linen_transformer": ("tokens", lambda: zoo.LinenTransformer(), "linen"),
    "linen_transformer_scan": ("tokens", lambda: zoo.LinenTransformer(scan=True), "linen"),
    "nnx_transformer": ("tokens", lambda rngs: zoo.NNXTransformer(rngs), "nnx"),
    "nnx_transformer_scan": ("tokens", lambda rngs: zoo.NNXTransformer(rngs, scan=True), "nnx"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=600, help="training steps per model")
    parser.add_argument("--quick", action="store_true", help="1 seed, 20 steps: a smoke run")
    args = parser.parse_args()
    seeds, steps = (1, 20) if args.quick else (args.seeds, args.steps)
    data = {"images": _digits(), "tokens": _sequences()}
    print(f"{'model':<24} {'dense':>13} {'default 70%':>13} {'ndim>=2 70%':>13}  others' load")
    for name, (kind, make, style) in MODELS.items():
        train, test = data[kind]
        stacked = {"layers": 0} if name.endswith("_scan") else None
        scores = {"dense": [], "default": [], "ndim": []}
        with Load() as load:
            for seed in range(seeds):
                if style == "nnx":
                    params, apply = _train_nnx(make, train, steps, seed)
                else:
                    params, apply = _train_linen(make(), train, steps, seed, style == "linen_bn")
                scores["dense"].append(_accuracy(apply, params, test))
                default = jaxprune.masks_for_sparsity(params, 0.7, stacked=stacked)
                old = jaxprune.masks_for_sparsity(params, 0.7, where=_ndim_rule)
                for key, masks in (("default", default), ("ndim", old)):
                    scores[key].append(_accuracy(apply, jaxprune.apply_masks(params, masks), test))
        cells = [mean_std(v) for v in scores.values()]
        print(f"{name:<24} {cells[0]:>13} {cells[1]:>13} {cells[2]:>13}  {load.cores:.1f} cores")
        pruned = [p for p, x in leaves_with_paths(params) if jaxprune.default_where(p, x)]
        extra = [
            p for p, x in leaves_with_paths(params) if _ndim_rule(p, x) and p not in set(pruned)
        ]
        print(f"  default prunes {len(pruned)} leaves: {', '.join(pruned)}")
        print(f"  ndim>=2 also prunes {len(extra)}: {', '.join(extra) or '-'}")


if __name__ == "__main__":
    t0 = time.perf_counter()
    main()
    print(f"({time.perf_counter() - t0:.0f} s, {os.cpu_count()} cores)")
