"""Shared test settings: hypothesis profiles sized for a 2-core CI machine, strict JAX numerics.

Every test runs with ``jax_numpy_dtype_promotion='strict'`` and ``jax_numpy_rank_promotion='raise'``
(silent casts and broadcasts inside the library fail loudly), except tests marked
``standard_promotion``: they run code that is not ours and relies on JAX's default promotion
(optax's Adam bias correction raises an int32 count to a float power; user-style Flax models add
a ``(seq, d)`` positional table to a ``(batch, seq, d)`` activation).
"""

import os

# Most of the suite's time was LLVM optimising XLA's CPU code: it compiles hundreds of small
# programs and runs each a few times (the default run took 425 s on 2 quiet cores at XLA's
# default level, 283 s at level 0). The level changes only how the code is compiled: XLA's HLO
# passes, which decide what each program computes, are the same. Set before JAX starts (below);
# a level the caller chose stays. Benchmarks run outside pytest, at the default level.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    flags = os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
    os.environ["XLA_FLAGS"] = flags.strip()

import jax
import pytest
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    derandomize=True,
)
settings.register_profile(
    "dev", max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile("ci" if os.environ.get("CI") else "dev")

# Start JAX here, on its default devices: the command line asks for 2 CPU devices before JAX's
# first operation (LeNet-5 trains data parallel), and a test calling it first would otherwise
# leave every later test in its process on 2 devices.
jax.devices()


@pytest.fixture(autouse=True)
def _strict_numerics(request):
    if request.node.get_closest_marker("standard_promotion"):
        yield
        return
    with jax.numpy_dtype_promotion("strict"), jax.numpy_rank_promotion("raise"):
        yield
