"""Re-estimating BatchNorm statistics after pruning.

Pruning shifts every activation downstream of a pruned layer, so the running means and variances
a BatchNorm collected on the dense network no longer describe the pruned one; inference with them
can cost far more accuracy than the pruning itself. :func:`reestimate_batch_stats` recomputes them
from a few batches, as an equal-weight average of each batch's statistics (what PyTorch's
``torch.optim.swa_utils.update_bn`` does).

It needs no knowledge of the layers: it runs the model's own train-mode update twice per batch,
from two different old states, and solves the running-average rule
``new = m * old + (1 - m) * batch_value`` for the batch value, checking that each leaf follows
that rule with one momentum ``m``. This works for Linen and NNX BatchNorm (and any layer keeping
such averages) and refuses state that is something else (a counter, a cache).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp

from jaxprune._state import check_state_like
from jaxprune._tree import PyTree, leaves_with_paths

Update = Callable[..., PyTree]  # update(model_state, batch, *args) -> new_model_state

_TOLERANCE = 1e-3  # on the momentum solved for, relative to the leaf's scale


@functools.lru_cache(maxsize=16)
def probe(update: Update) -> Callable:
    """A jitted ``probe(model_state, batch, *args) -> (batch_values, momenta, unchanged, bad)``.

    Runs ``update`` from a zero state and from a state of ``scale = 1 + max|leaf|`` per leaf, so
    ``momentum = (b - a) / scale`` and ``batch_value = a / (1 - momentum)``; ``bad`` counts the
    batch values per leaf that are NaN or inf.
    """

    def run(model_state: PyTree, batch: Any, *args: Any) -> tuple[PyTree, PyTree, PyTree, PyTree]:
        scale = jax.tree.map(lambda x: 1.0 + jnp.max(jnp.abs(x), initial=0.0), model_state)
        zeros = jax.tree.map(jnp.zeros_like, model_state)
        scaled = jax.tree.map(lambda x, k: jnp.full_like(x, k), model_state, scale)
        a, b = update(zeros, batch, *args), update(scaled, batch, *args)
        check_state_like(model_state, a)
        momenta = jax.tree.map(lambda a, b, k: (b - a) / k, a, b, scale)
        mean_m = jax.tree.map(jnp.mean, momenta)
        spread = jax.tree.map(lambda m, mm: jnp.max(jnp.abs(m - mm), initial=0.0), momenta, mean_m)
        unchanged = jax.tree.map(lambda a, b, s: jnp.all(a == 0) & jnp.all(b == s), a, b, scaled)
        values = jax.tree.map(lambda a, m: a / (1.0 - m), a, mean_m)
        bad = jax.tree.map(lambda v: jnp.sum(~jnp.isfinite(v), dtype=jnp.int32), values)
        return values, (mean_m, spread), unchanged, bad

    return jax.jit(run)


def running_average(
    run: Callable, model_state: PyTree, batches: Iterable[Any], *args: Any
) -> PyTree:
    """Averages the batch values that ``run`` (a :func:`probe`) solves for over ``batches``."""
    total, bad, n, frozen = None, None, 0, []
    for batch in batches:
        values, (mean_m, spread), unchanged, bad_now = run(model_state, batch, *args)
        if n == 0:
            frozen = [bool(u) for u in jax.tree.leaves(unchanged)]
            for (path, m), s, still in zip(
                leaves_with_paths(mean_m), jax.tree.leaves(spread), frozen, strict=True
            ):
                if not still and not math.isfinite(float(m)):
                    raise _nonfinite(path, "the first batch")
                if not still and not (
                    -_TOLERANCE <= float(m) < 1.0 - _TOLERANCE and float(s) <= _TOLERANCE
                ):
                    raise ValueError(
                        f"model_state[{path!r}] does not update as a running average "
                        f"(new = m * old + (1 - m) * batch_value with one m per leaf; solved m "
                        f"= {float(m):.4g}, varying by {float(s):.3g}), so its statistics cannot "
                        "be re-estimated. Pass only the BatchNorm statistics (e.g. "
                        "{'batch_stats': ...}) as model_state."
                    )
        total = values if total is None else jax.tree.map(jnp.add, total, values)
        bad = bad_now if bad is None else jax.tree.map(jnp.add, bad, bad_now)
        n += 1
    if n == 0:
        raise ValueError("batches yielded no batch; re-estimating statistics needs at least one.")
    # Checked once at the end, not per batch: a later batch's NaN would else average in silently.
    for (path, count), still in zip(leaves_with_paths(jax.device_get(bad)), frozen, strict=True):
        if count and not still:
            raise _nonfinite(path, f"{int(count)} value(s) over the {n} batches")
    leaves, treedef = jax.tree.flatten(model_state)
    new = [
        old if still else (acc / n).astype(old.dtype)
        for old, acc, still in zip(leaves, jax.tree.leaves(total), frozen, strict=True)
    ]
    return jax.tree.unflatten(treedef, new)


def _nonfinite(path: str, where: str) -> ValueError:
    return ValueError(
        f"model_state[{path!r}]: the batch statistics are NaN or inf ({where}): the model's "
        "train-mode outputs on the batches are not finite (check the params and the batches), "
        "so the re-estimated statistics would not be either."
    )


def reestimate_batch_stats(
    update: Update, model_state: PyTree, batches: Iterable[Any], *args: Any
) -> PyTree:
    """Recomputes running statistics (BatchNorm means and variances) from ``batches``.

    Each statistic becomes the equal-weight average of its per-batch values over ``batches``
    (the variance, as Flax keeps it, is each batch's own variance averaged, as in PyTorch's
    ``update_bn``). Leaves the train-mode update does not change (a BatchNorm that uses its
    running averages in train mode) are returned as they are. Run it after each pruning round,
    before retraining or evaluating; :func:`jaxprune.prune_and_retrain` does with
    ``reestimate=``.

    Args:
      update: ``update(model_state, batch, *args) -> new_model_state``: one train-mode forward
        pass. For Linen: ``lambda s, x, params: model.apply({'params': params, **s}, x,
        train=True, mutable=list(s))[1]``; for NNX, with ``loss`` from
        :func:`jaxprune.nnx_loss`: ``lambda s, b, params: loss(params, b, rng, s)[1]``. It is
        jitted and cached by identity: pass the same function (and the params through
        ``args``) to compile it once.
      model_state: the state to re-estimate, e.g. ``{'batch_stats': ...}``; it is not modified.
      batches: the batches to run (10-50 are usually enough).
      *args: further arguments of ``update``, traced (e.g. the pruned params).

    Returns:
      The re-estimated model state, with the structure and dtypes of ``model_state``.

    Raises:
      ValueError: if ``batches`` is empty, ``update`` returns a state of another structure, a
        leaf does not follow a running average, or a batch gives a leaf NaN or inf statistics
        (naming the leaf).

    >>> import jax, jax.numpy as jnp, flax.linen as nn
    >>> bn = nn.BatchNorm(use_running_average=False, momentum=0.9)
    >>> xs = [jnp.full((4, 1), v) + jnp.arange(4.0)[:, None] for v in (1.0, 3.0)]
    >>> variables = bn.init(jax.random.key(0), xs[0])
    >>> params, state = variables['params'], {'batch_stats': variables['batch_stats']}
    >>> update = lambda s, x: bn.apply({'params': params, **s}, x, mutable=['batch_stats'])[1]
    >>> new = reestimate_batch_stats(update, state, xs)
    >>> [round(float(new['batch_stats'][k][0]), 4) for k in ('mean', 'var')]
    [3.5, 1.25]
    """
    if not leaves_with_paths(model_state):
        raise ValueError("model_state has no leaves: there are no statistics to re-estimate.")
    return running_average(probe(update), model_state, batches, *args)
