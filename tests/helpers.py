"""Helpers shared by the tests: a jitted optax step, and counting XLA compilations by name.

JAX reports every backend compilation through ``jax.monitoring`` with the compiled function's
name; the counter listens for those events, so it sees recompilations that a trace counter misses
(a change in an argument's device commitment recompiles without retracing).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import jax
import optax

_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
_compiled: list[str] = []


def _listen(event: str, duration: float, **kwargs) -> None:
    del duration
    if event == _COMPILE_EVENT:
        _compiled.append(str(kwargs.get("fun_name", "")))


jax.monitoring.register_event_duration_secs_listener(_listen)


class Compiles:
    """The functions compiled since the counter was made; ``of(name)`` counts one of them."""

    def __init__(self) -> None:
        self._start = len(_compiled)

    @property
    def names(self) -> list[str]:
        return _compiled[self._start :]

    def of(self, name: str) -> int:
        return sum(1 for n in self.names if n in (name, f"jit({name})"))


@contextlib.contextmanager
def count_compiles() -> Iterator[Compiles]:
    """``with count_compiles() as c: ...`` then ``c.of('step')``: compilations inside the block."""
    yield Compiles()


def optax_step(tx):
    """A jitted ``optax_step(params, opt_state, grads) -> (params, opt_state)`` for ``tx``."""

    @jax.jit
    def optax_step(params, opt_state, grads):
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    return optax_step
