"""Physically smaller LeNet-300-100: accuracy and dense inference time after removing neurons.

Han et al. 2015 (Sec. 3.5) note that pruning leaves neurons that can be removed outright. This
script trains LeNet-300-100 briefly and compares, side by side in one run:

- ``neuron50``: half of each hidden layer's neurons pruned by :func:`jaxprune.structured.neuron_masks`
  (accuracy without retraining, then after a short masked retrain) and shrunk to 784-150-50-10;
- ``unstructured8``: unstructured magnitude pruning to about 8% of the weights (Han et al.'s
  per-layer densities for this net: fc1 and fc2 at 8%, fc3 at 26%), reached in three
  prune/retrain rounds, then :func:`jaxprune.structured.shrink` of whatever units died;

and times plain dense inference (jitted ``model.apply``) of each shrunk model against the original
at batch 1, 64 and 1024. Ratios are measured interleaved in one run since absolute times drift on a
shared machine (``measure.interleaved_medians``: the median of single calls over shuffled rounds),
each row with the cores other processes kept busy meanwhile (``measure.Load``). Data: real MNIST
from ``--data`` (default ``../shared/data/mnist`` beside the checkout, when it exists), else
scikit-learn's 8x8 digits. ``--quick`` trains on the digits for a few steps only.

Run: ``.venv/bin/python benchmarks/shrink.py [--quick] [--data DIR]``.
"""

from __future__ import annotations

import argparse
import functools
import os
import pathlib
import sys
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

if os.path.dirname(os.path.abspath(__file__)) not in sys.path:  # a test imports this file by path
    sys.path.append(os.path.dirname(os.path.abspath(__file__)))
from measure import Load, interleaved_medians

from jaxprune.demo.data import Dataset, batches, load_digits, load_mnist
from jaxprune.demo.models import LeNet300100
from jaxprune.masks import apply_masks, masks_for_sparsity
from jaxprune.structured import neuron_masks, shrink
from jaxprune.transform import keep_pruned, update_masks

LAYERS = ("fc1", "fc2", "fc3")
DEFAULT_MNIST = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"
BATCHES = (1, 64, 1024)


class _Trainer(NamedTuple):
    """One jitted Adam step for every phase: masks and learning rate live in the optimizer state,
    so changing them between phases does not recompile."""

    tx: optax.GradientTransformation
    step: Callable


def _trainer(model: LeNet300100, params: Any) -> _Trainer:
    keep_all = jax.tree.map(lambda a: jnp.asarray(np.ones(a.shape, bool)), params)
    adam = optax.inject_hyperparams(optax.adam)(learning_rate=1e-3)
    tx = keep_pruned(adam, keep_all, weight_decay=1e-5)

    def loss(p, x, y):
        logits = model.apply({"params": p}, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    @jax.jit
    def step(p, s, x, y):
        updates, s = tx.update(jax.grad(loss)(p, x, y), s, p)
        return optax.apply_updates(p, updates), s

    return _Trainer(tx, step)


def _train(
    trainer: _Trainer,
    params: Any,
    masks: Any,
    data: Dataset,
    *,
    learning_rate: float,
    epochs: int,
    max_steps: int | None,
    seed: int,
) -> Any:
    state = update_masks(trainer.tx.init(params), masks)
    hyper = state.inner_state.hyperparams
    hyper = {**hyper, "learning_rate": jnp.full_like(hyper["learning_rate"], learning_rate)}
    state = state._replace(inner_state=state.inner_state._replace(hyperparams=hyper))
    params, state = _committed((apply_masks(params, masks), state))
    done = 0
    for epoch in range(epochs):
        for x, y in batches(
            data.x_train, data.y_train, batch_size=128, seed=seed, epoch=epoch, drop_remainder=True
        ):
            params, state = trainer.step(params, state, x, y)
            done += 1
            if max_steps is not None and done >= max_steps:
                return params
    return params


def _committed(tree: Any) -> Any:
    # jit keys its cache on whether inputs are committed to a device; fresh arrays are not, step
    # outputs are. Committing everything up front keeps one compilation per function and shape.
    return jax.device_put(tree, jax.devices()[0])


def _accuracy(apply: Callable, params: Any, data: Dataset) -> float:
    logits = apply(_committed({"params": params}), data.x_test)
    return float((jnp.argmax(logits, -1) == data.y_test).mean())


def _unstructured_masks(params: Any, sparsity: float, previous: Any) -> Any:
    """Magnitude masks pruning ``sparsity`` of fc1's and fc2's weights, fc3 keeping 3.25x what they
    keep (Han et al. 2015, Table 2: 8%, 9%, 26% kept); what ``previous`` pruned stays pruned."""
    fc3 = max(1.0 - 3.25 * (1.0 - sparsity), 0.0)
    return masks_for_sparsity(
        params, {"fc1": sparsity, "fc2": sparsity, "fc3": fc3}, previous=previous
    )


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Runs the benchmark, prints a report and returns the figures as a dict."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="digits, a few steps: seconds")
    parser.add_argument("--data", type=pathlib.Path, default=None, help="MNIST directory")
    parser.add_argument("--epochs", type=int, default=4, help="dense training epochs")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    if args.quick:
        data, max_steps, epochs, retrain_epochs = load_digits(), 6, 1, 1
        rounds, repeats, budget = (0.92,), 3, 0.05
    else:
        path = args.data or (DEFAULT_MNIST if DEFAULT_MNIST.exists() else None)
        data = load_mnist(path) if path is not None else load_digits()
        max_steps, epochs, retrain_epochs = None, args.epochs, 2
        rounds, repeats, budget = (0.5, 0.8, 0.92), 15, 1.5
    print(f"data: {data.name}, train {len(data.x_train)}, test {len(data.x_test)}")

    model = LeNet300100()
    apply = jax.jit(model.apply)
    params = model.init(jax.random.key(args.seed), data.x_train[:1])["params"]
    trainer = _trainer(model, params)
    train = dict(max_steps=max_steps, seed=args.seed)
    keep_all = jax.tree.map(lambda a: jnp.asarray(np.ones(a.shape, bool)), params)
    params = _train(trainer, params, keep_all, data, learning_rate=1e-3, epochs=epochs, **train)
    acc = {"dense": _accuracy(apply, params, data)}

    # Half the hidden neurons, without and with retraining (Han et al. 2015, Sec. 3.5).
    for score in ("incoming", "outgoing", "both"):
        m = neuron_masks(params, 0.5, layers=LAYERS, score=score)
        acc[f"neuron50 {score}, no retrain"] = _accuracy(apply, apply_masks(params, m), data)
    masks50 = neuron_masks(params, 0.5, layers=LAYERS)
    retrained = _train(
        trainer, params, masks50, data, learning_rate=3e-4, epochs=retrain_epochs, **train
    )
    acc["neuron50 incoming, retrained"] = _accuracy(apply, retrained, data)
    small50 = shrink(retrained, layers=LAYERS, masks=masks50)
    model50 = LeNet300100(hidden=small50.widths[:-1])
    apply50 = jax.jit(model50.apply)
    acc["neuron50 shrunk model"] = _accuracy(apply50, small50.params, data)

    # Han's unstructured pruning to ~8%, in rounds with retraining, then dead-unit removal.
    pruned, masks8 = params, keep_all
    for sparsity in rounds:
        masks8 = _unstructured_masks(pruned, sparsity, masks8)
        pruned = _train(
            trainer, pruned, masks8, data, learning_rate=3e-4, epochs=retrain_epochs, **train
        )
    acc["unstructured8 retrained"] = _accuracy(apply, pruned, data)
    small8 = shrink(pruned, layers=LAYERS, masks=masks8)
    model8 = LeNet300100(hidden=small8.widths[:-1])
    apply8 = jax.jit(model8.apply)
    acc["unstructured8 shrunk model"] = _accuracy(apply8, small8.params, data)
    kernel1 = np.asarray(masks8["fc1"]["kernel"])
    dead_inputs = int((~kernel1.any(axis=1)).sum())

    print("\naccuracy (test set)")
    for name, value in acc.items():
        print(f"  {name:32s} {100 * value:6.2f}%")
    print("\nneuron50 (50% of hidden neurons pruned, retrained), shrunk:")
    print(small50.report)
    print("\nunstructured8 (magnitude pruning to ~8% of weights), dead units removed:")
    print(small8.report)
    print(
        f"  ({dead_inputs} of {kernel1.shape[0]} input pixels lost every connection; inputs stay)"
    )
    for name, (mdl, small, ref, m) in {
        "neuron50": (model50, small50, retrained, masks50),
        "unstructured8": (model8, small8, pruned, masks8),
    }.items():
        got = jax.jit(mdl.apply)({"params": small.params}, data.x_test[:256])
        want = apply({"params": apply_masks(ref, m)}, data.x_test[:256])
        print(
            f"  {name}: max |logit difference| shrunk vs pruned = {jnp.abs(got - want).max():.2e}"
        )

    fns = {
        "original": (apply, _committed({"params": params})),
        "neuron50": (apply50, _committed({"params": small50.params})),
        "unstructured8": (apply8, _committed({"params": small8.params})),
    }
    shape = data.x_train.shape[1:]
    ratios: dict[str, dict[int, float]] = {"neuron50": {}, "unstructured8": {}}
    print("\ndense inference, median time per call (ratio = shrunk / original)")
    print(
        f"  {'batch':>5}  {'original':>10}  {'neuron50':>10} {'ratio':>6}  {'unstr8':>10} "
        f"{'ratio':>6}  others' load"
    )
    for b in BATCHES:
        x = jnp.asarray(np.random.default_rng(b).random((b, *shape), np.float32))
        calls = {name: functools.partial(fn, p, x) for name, (fn, p) in fns.items()}
        with Load() as load:
            t = interleaved_medians(calls, repeats=repeats, budget_s=budget)
        for name in ratios:
            ratios[name][b] = t[name] / t["original"]
        print(
            f"  {b:>5}  {1e6 * t['original']:>8.1f}us  {1e6 * t['neuron50']:>8.1f}us "
            f"{ratios['neuron50'][b]:>6.2f}  {1e6 * t['unstructured8']:>8.1f}us "
            f"{ratios['unstructured8'][b]:>6.2f}  {load.cores:.2f} cores"
        )
    target = "met" if ratios["neuron50"][1024] <= 0.6 else "NOT met"
    print(f"\ntarget neuron50 <= 0.6x original at batch 1024: {target}")
    return {
        "data": data.name,
        "accuracy": acc,
        "neuron50": {"widths": small50.widths, "time_ratio": ratios["neuron50"]},
        "unstructured8": {"widths": small8.widths, "time_ratio": ratios["unstructured8"]},
    }


if __name__ == "__main__":
    # Per-call dispatch overhead dominates batch 1 otherwise (see shared notes on this machine).
    jax.config.update("jax_cpu_enable_async_dispatch", False)
    main()
