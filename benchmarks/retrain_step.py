"""Masked retrain step vs the same step with a plain optax chain, LeNet-300-100, batch 128.

Both steps come from ``jaxprune.retrain.make_retrain_step`` with the same loss, SGD with momentum
and L2; the masked one wraps the optimizer in ``jaxprune.transform.keep_pruned`` (90% pruned). The
two are timed alternately in one run (absolute times drift on a shared machine) and the ratio of
medians is printed, with the cores other processes kept busy meanwhile (``measure.Load``). Each
timed block threads the optimizer state through ``--steps`` steps, so this times blocks of steps
rather than single calls as ``measure.interleaved_medians`` does. The model is
``jaxprune.demo.models.LeNet300100`` (fed 28x28x1 images). Target: masked / plain <= 1.05.

    python benchmarks/retrain_step.py [--quick] [--repeats N] [--steps N]
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import numpy as np
import optax
from measure import Load

from jaxprune.demo.models import LeNet300100
from jaxprune.masks import apply_masks, masks_for_sparsity
from jaxprune.retrain import make_retrain_step, retrain_state
from jaxprune.transform import keep_pruned


def _time(step, state, batch, steps: int):
    """Seconds per step over ``steps`` steps from ``state``, and the state they end in."""
    start = time.perf_counter()
    for _ in range(steps):
        state, metrics = step(state, batch)
    jax.block_until_ready((state, metrics))
    return (time.perf_counter() - start) / steps, state


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few repeats, for smoke tests")
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--steps", type=int, default=20, help="steps per timed block")
    args = parser.parse_args()
    repeats, steps = (5, 5) if args.quick else (args.repeats, args.steps)

    module = LeNet300100()
    kx, ky, kp = jax.random.split(jax.random.key(0), 3)
    batch = (jax.random.normal(kx, (128, 28, 28, 1)), jax.random.randint(ky, (128,), 0, 10))
    params = module.init(kp, batch[0][:1])["params"]
    masks = masks_for_sparsity(params, 0.9)
    params = apply_masks(params, masks)

    def loss(p, b, rng):
        del rng
        logits = module.apply({"params": p}, b[0])
        return optax.softmax_cross_entropy_with_integer_labels(logits, b[1]).mean()

    lr, wd = 0.01, 1e-4
    masked_tx = keep_pruned(optax.sgd(lr, momentum=0.9), masks, weight_decay=wd)
    plain_tx = optax.chain(optax.add_decayed_weights(wd), optax.sgd(lr, momentum=0.9))
    masked = (make_retrain_step(loss, masked_tx), retrain_state(params, masked_tx, rng=kp))
    plain = (make_retrain_step(loss, plain_tx), retrain_state(params, plain_tx, rng=kp))

    states = {"masked": masked[1], "plain": plain[1]}
    steps_of = {"masked": masked[0], "plain": plain[0]}
    for name in states:  # compile and warm up
        _, states[name] = _time(steps_of[name], states[name], batch, 3)
    times: dict[str, list[float]] = {"masked": [], "plain": []}
    with Load() as load:
        for i in range(repeats):
            order = ("masked", "plain") if i % 2 == 0 else ("plain", "masked")
            for name in order:
                t, states[name] = _time(steps_of[name], states[name], batch, steps)
                times[name].append(t)

    kept = np.asarray(masks["fc1"]["kernel"])
    w = np.asarray(states["masked"].params["fc1"]["kernel"])
    assert np.all(w[~kept] == 0.0), "pruned weights moved"
    med = {name: statistics.median(ts) for name, ts in times.items()}
    ratios = [m / p for m, p in zip(times["masked"], times["plain"], strict=True)]
    print(f"LeNet-300-100, batch 128, 90% pruned, {repeats} x {steps} steps each, interleaved")
    print(f"  plain optax chain : {1e3 * med['plain']:.3f} ms/step (median)")
    print(f"  masked keep_pruned: {1e3 * med['masked']:.3f} ms/step (median)")
    print(
        f"  ratio masked/plain: {med['masked'] / med['plain']:.3f} "
        f"(median of paired ratios {statistics.median(ratios):.3f}; target <= 1.05; "
        f"others' load {load.cores:.2f} cores)"
    )
    print(f"  pruned weights after {int(states['masked'].step)} steps: all exactly 0.0")


if __name__ == "__main__":
    main()
