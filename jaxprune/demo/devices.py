"""Where the demo trains: each batch split over CPU devices (data parallel) for LeNet-5.

The step is :func:`jaxprune.make_retrain_step`'s, which follows the batch's sharding (XLA sums
the gradients) and waits for each step spread over CPU devices; these pieces decide the split,
ask JAX for the devices, and bring the params back to one device for everything after training.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxprune.demo.data import Dataset
from jaxprune.demo.recipes import Config

# Devices each model's training batches are split over (data parallel; XLA sums the gradients).
# XLA runs most of a step's ops on one thread, so on 2 CPU cores a dense LeNet-5 epoch split over
# 2 CPU devices took 0.77x its time on one (15.0 s against 19.5 s; ``benchmarks/train_step.py``
# times the step); LeNet-300-100's step is too small to gain (1.1-1.2x slower split, three
# runs). The command line asks JAX for the devices (:func:`cpu_devices`).
DATA_PARALLEL = {"lenet5": 2}


def batch_sharding(config: Config, data: Dataset) -> NamedSharding | None:
    """How ``run.epoch_batches`` places a batch: split over :data:`DATA_PARALLEL` devices.

    ``None`` (one device, JAX's default) for models not listed, off the CPU (the split was
    measured on CPU cores only), where JAX has fewer local devices than listed, or where they do
    not divide the batch.
    """
    n = DATA_PARALLEL.get(config.model, 1)
    devices = jax.local_devices()
    if n == 1 or devices[0].platform != "cpu" or len(devices) < n:
        return None
    if min(config.batch_size, len(data.x_train)) % n:
        return None
    return NamedSharding(Mesh(np.array(devices[:n]), ("batch",)), PartitionSpec("batch"))


def training_devices(config: Config, data: Dataset) -> int:
    """How many devices each training batch is split over (1: not split)."""
    sharding = batch_sharding(config, data)
    return 1 if sharding is None else sharding.num_devices


def cpu_devices(model: str) -> int:
    """The CPU devices to ask JAX for (``jax_num_cpu_devices``) before a run of ``model``.

    :data:`DATA_PARALLEL`'s count, capped at the cores this process may use.
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, min(DATA_PARALLEL.get(model, 1), cores))


def on_one_device(tree: Any) -> Any:
    """``tree`` with every array held by several devices (a data-parallel step's params and
    state, replicated) copied back to JAX's default device, uncommitted as before the split."""

    def one(x):
        if isinstance(x, jax.Array) and len(x.sharding.device_set) > 1:
            return jnp.asarray(np.asarray(x))
        return x

    return jax.tree.map(one, tree)
