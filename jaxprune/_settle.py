"""Waiting on computations over several CPU devices, where XLA's collectives can deadlock."""

from __future__ import annotations

from typing import Any

import jax


def on_cpu_devices(x: Any) -> bool:
    """Whether ``x`` is a concrete array over more than one CPU device (see :func:`settled`)."""
    if not isinstance(x, jax.Array) or isinstance(x, jax.core.Tracer):
        return False
    devices = x.sharding.device_set
    device: Any = next(iter(devices))  # jaxlib's Device, untyped for mypy
    return len(devices) > 1 and device.platform == "cpu"


def settled(out: Any, like: Any) -> Any:
    """``out``, waited for when ``like`` lies over several CPU devices; else as it is.

    There XLA's collectives (the gradient all-reduce of a data-parallel step, the sums of a
    sharded kernel's std or counts) make each device's part wait for the others on a shared
    thread pool; with a second such computation queued behind the first, the parts of two can
    hold every thread and wait on each other for good (jax 0.10.2 on 2 cores: "Termination
    timeout for all reduce", within about 60 data-parallel steps, or among 96 sharded kernels'
    masks). Waiting for each before the next is queued avoids that, at the cost of dispatch
    overlap (tens of microseconds a call).
    """
    if on_cpu_devices(like):
        jax.block_until_ready(out)
    return out
