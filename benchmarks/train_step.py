"""One SGD training step of LeNet-5 at batch 128: plain XLA convolutions vs ``fast_conv``.

LeNet-5 is Caffe's (conv 5x5 20, max-pool, conv 5x5 50, max-pool, fc 500 ReLU, fc 10, 28x28x1
inputs), as ``jaxprune.demo.models.LeNet5`` builds it (same pooling), with its convolutions
``lax.conv_general_dilated`` ("plain"), :func:`jaxprune.conv.fast_conv` ("fast_conv": XLA's
forward, matmul gradients) or ``fast_conv`` with ``forward='patches'`` ("patches": the value as
one matmul too, what the demo model uses), and "patches x2": that step with the batch split over
2 CPU devices (``jax_num_cpu_devices=2``; params replicated, XLA sums the gradients), as the demo
trains LeNet-5. Each step is one jitted call (forward, backward, SGD
update) taking the batch as an argument, timed round by round in a shuffled order by
``measure.interleaved_medians``; the cores other processes kept busy meanwhile (``measure.Load``)
are printed beside each figure. Where ``import torch`` works, torch's step on the same
architecture (its own initialisation, inputs transposed to NCHW) is timed in the same rounds.

    python benchmarks/train_step.py [--quick] [--repeats N] [--budget SECONDS]

Measured on this project's 2 shared CPU cores (AMD EPYC) under ``flock /tmp/jaxprune-bench.lock``,
jax 0.10.2, torch 2.13.0+cpu (the CPU-only wheel), others' load 0.00 cores in both runs:

- plain 46.9 / 44.2 ms/step, fast_conv 47.8 / 46.2, patches 40.1 / 38.4, torch 37.6 / 36.9;
- patches / plain 0.855 / 0.869, patches / torch 1.067 / 1.040, fast_conv / torch 1.27 / 1.25.

So patches is the fastest one-device JAX step here and within 4-7% of torch's oneDNN step, not
yet faster. Two later quiet runs (others' load 0.00 cores): plain 45.6 / 46.6, patches 39.3 /
40.5, patches x2 35.0 / 35.9, torch 38.3 / 39.6 ms; patches x2 / patches 0.892 / 0.887 and
**patches x2 / torch 0.913 / 0.907**: split over the two cores, the step is faster than torch's.
The gain is small because the second core adds little here: two processes each running the
batch-64 step on one thread took 30.0 ms a step side by side against 17.7 ms alone.
Earlier sessions' steps closed over the batch, which let XLA fold the first layer's patches into
a constant: the batch is an argument now, as in training. Read the ratios, not the absolute
times: plain moved by 20% between two quiet runs on an earlier day.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from functools import partial

import jax

jax.config.update("jax_num_cpu_devices", 2)  # before JAX's first operation: "patches x2"
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import linen as nn  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec  # noqa: E402
from measure import Load, interleaved_medians  # noqa: E402

from jaxprune.conv import fast_conv  # noqa: E402
from jaxprune.demo.models import _max_pool_2x2  # noqa: E402

BATCH = 128


class _LeNet5(nn.Module):
    """``jaxprune.demo.models.LeNet5`` (same layers, same pooling) with a choice of convolution."""

    conv: Callable = jax.lax.conv_general_dilated

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for ch in (20, 50):
            conv = nn.Conv(ch, (5, 5), padding="VALID", conv_general_dilated=self.conv)
            x = _max_pool_2x2(conv(x))
        x = x.reshape((x.shape[0], -1))
        return nn.Dense(10)(nn.relu(nn.Dense(500)(x)))


def _jax_step(
    module: nn.Module, x: jax.Array, y: jax.Array, split: bool = False
) -> Callable[[], object]:
    params = module.init(jax.random.key(0), x[:1])["params"]
    tx = optax.sgd(0.01)
    if split:  # data parallel over 2 CPU devices, as the demo trains LeNet-5
        mesh = Mesh(np.array(jax.devices()[:2]), ("batch",))
        x, y = jax.device_put((x, y), NamedSharding(mesh, PartitionSpec("batch")))
        params = jax.device_put(params, NamedSharding(mesh, PartitionSpec()))

    @jax.jit
    def step(params, opt_state, x, y):  # the batch is an argument, as in training: not folded
        def loss(p):
            logits = module.apply({"params": p}, x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        grads = jax.grad(loss)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    opt_state = tx.init(params)
    return lambda: step(params, opt_state, x, y)


def _torch_step(x: np.ndarray, y: np.ndarray) -> Callable[[], object] | None:
    try:
        import torch
    except ImportError:
        return None
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 20, 5),
        torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(20, 50, 5),
        torch.nn.MaxPool2d(2),
        torch.nn.Flatten(),
        torch.nn.Linear(800, 500),
        torch.nn.ReLU(),
        torch.nn.Linear(500, 10),
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    tx, ty = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()), torch.from_numpy(y.astype(np.int64))

    def step():
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(tx), ty).backward()
        opt.step()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few rounds, for smoke tests")
    parser.add_argument("--repeats", type=int, default=30, help="rounds at least")
    parser.add_argument("--budget", type=float, default=30.0, help="seconds of timed rounds")
    args = parser.parse_args()
    repeats, budget = (3, 0.0) if args.quick else (args.repeats, args.budget)

    kx, ky = jax.random.split(jax.random.key(1))
    x = jax.random.normal(kx, (BATCH, 28, 28, 1))
    y = jax.random.randint(ky, (BATCH,), 0, 10)
    fns = {
        "plain": _jax_step(_LeNet5(), x, y),
        "fast_conv": _jax_step(_LeNet5(fast_conv), x, y),
        "patches": _jax_step(_LeNet5(partial(fast_conv, forward="patches")), x, y),
    }
    if len(jax.devices()) >= 2:
        fns["patches x2"] = _jax_step(_LeNet5(partial(fast_conv, forward="patches")), x, y, True)
    torch_step = _torch_step(np.asarray(x), np.asarray(y))
    if torch_step is None:
        print("torch: not installed, skipped")
    else:
        fns["torch"] = torch_step
    with Load() as load:
        med = interleaved_medians(fns, repeats, budget)
    print(f"LeNet-5 SGD train step, batch {BATCH}, jitted, interleaved medians")
    for name, seconds in med.items():
        print(f"  {name:9s}: {1e3 * seconds:7.2f} ms/step (others' load {load.cores:.2f} cores)")
    print(
        f"  ratios fast_conv/plain {med['fast_conv'] / med['plain']:.3f}, "
        f"patches/plain {med['patches'] / med['plain']:.3f} (others' load {load.cores:.2f} cores)"
    )
    if "patches x2" in med:
        print(f"  ratio patches x2/patches {med['patches x2'] / med['patches']:.3f}")
    if "torch" in med:
        print(
            f"  ratios fast_conv/torch {med['fast_conv'] / med['torch']:.3f}, "
            f"patches/torch {med['patches'] / med['torch']:.3f}"
            + (
                f", patches x2/torch {med['patches x2'] / med['torch']:.3f}"
                if "patches x2" in med
                else ""
            )
        )


if __name__ == "__main__":
    main()
