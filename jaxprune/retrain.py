"""Retraining the surviving connections: a jitted step, the NNX loss adapter, Han's dropout rule.

The step is model-agnostic: it differentiates ``loss_fn(params, batch, rng)``. A Flax Linen model
plugs in through ``module.apply({'params': params}, ..., rngs={'dropout': rng})``; an NNX model
through :func:`nnx_loss`, which splits it with ``nnx.split`` and merges it back inside the loss.
Masks live in the optimizer state (:func:`jaxprune.transform.keep_pruned`), so new masks between
rounds do not recompile the step. The round driver built on it is :mod:`jaxprune.rounds`.

Dropout rates are static. Flax's ``Dropout`` (Linen and NNX) branches in Python on ``rate == 0``,
so a rate cannot be a traced value; a new rate means one new compilation per round, which costs
far less than the round's retraining. Masks, params, optimizer state and the RNG are traced.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxprune._settle import settled
from jaxprune._state import check_state_like
from jaxprune._tree import (
    WEIGHT_NAMES,
    PyTree,
    is_array,
    last_key,
    leaves_with_paths,
)
from jaxprune.batches import ArrayBatches, epoch_rows, take

Batch = Any
LossFn = Callable[..., Any]


class RetrainState(NamedTuple):
    """What the retrain step carries: params, optimizer state, base RNG key, step count and the
    model's non-param state (``None`` for a model without one)."""

    params: PyTree
    opt_state: optax.OptState
    rng: jax.Array
    step: jax.Array
    model_state: PyTree = None


def retrain_state(
    params: PyTree,
    tx: optax.GradientTransformation,
    *,
    rng: jax.Array,
    model_state: PyTree = None,
) -> RetrainState:
    """Builds the initial :class:`RetrainState` for :func:`make_retrain_step`.

    Args:
      params: the parameters to retrain (usually after :func:`jaxprune.masks.apply_masks`).
      tx: the optimizer, e.g. ``keep_pruned(optax.sgd(learning_rate, momentum=0.9), masks)``.
      rng: a JAX PRNG key; step ``i`` uses ``jax.random.fold_in(rng, i)`` (dropout).
      model_state: the model's state that is not trained by gradients but changes as it runs:
        Linen's other collections (``{'batch_stats': ...}``, whatever ``mutable=`` returns) or
        the third value of :func:`nnx_loss`. With it, the step calls
        ``loss_fn(params, batch, rng, model_state)`` and keeps the state that returns.

    Returns:
      A :class:`RetrainState` at step 0.

    >>> import jax, jax.numpy as jnp, optax
    >>> s = retrain_state({'w': jnp.ones(2)}, optax.sgd(0.1), rng=jax.random.key(0))
    >>> int(s.step), s.model_state is None
    (0, True)
    """
    return RetrainState(params, tx.init(params), rng, jnp.zeros((), jnp.int32), model_state)


def _split_result(result: Any, model_state: PyTree, has_aux: bool) -> tuple[Any, tuple]:
    """``loss_fn``'s result with a model state, as ``(loss, (new_model_state, aux))``."""
    expected = "(loss, (new_model_state, aux))" if has_aux else "(loss, new_model_state)"
    if not (isinstance(result, tuple) and len(result) == 2):
        got = (
            f"a tuple of {len(result)}"
            if isinstance(result, tuple)
            else "one array"
            if hasattr(result, "shape")
            else type(result).__name__
        )
        raise ValueError(
            f"loss_fn(params, batch, rng, model_state) returned {got}; with a model_state the "
            f"step expects {expected}."
        )
    loss, rest = result
    if has_aux:
        if not (isinstance(rest, tuple) and len(rest) == 2):
            raise ValueError(
                "with has_aux and a model_state, loss_fn must return "
                f"(loss, (new_model_state, aux)); its second value is {type(rest).__name__}."
            )
        new_state, aux = rest
    else:
        new_state, aux = rest, {}
    check_state_like(model_state, new_state)
    return loss, (new_state, aux)


def make_retrain_step(
    loss_fn: LossFn, tx: optax.GradientTransformation, *, has_aux: bool = False
) -> Callable[[RetrainState, Batch], tuple[RetrainState, dict[str, jax.Array]]]:
    """Returns ``step(state, batch) -> (state, metrics)``, jitted, for any model's loss.

    One step: ``grads = grad(loss_fn)(params, batch, fold_in(rng, step))``, then
    ``tx.update(grads, opt_state, params)`` and ``optax.apply_updates``. Everything in the state
    is traced, so swapping masks with :func:`jaxprune.transform.update_masks` (same shapes) reuses
    the compiled step. Inputs sharded with ``jax.sharding`` are followed: a batch split over a
    ``Mesh`` axis gives data-parallel retraining with the gradient reduction inserted by XLA.

    When the state holds a ``model_state`` (BatchNorm statistics and the like, see
    :func:`retrain_state`), the step calls ``loss_fn(params, batch, rng, model_state)``, which
    returns ``(loss, new_model_state)`` (``(loss, (new_model_state, aux))`` with ``has_aux``),
    and stores the new state; gradients flow only to the params.

    Args:
      loss_fn: ``loss_fn(params, batch, rng) -> loss`` (a scalar), or ``-> (loss, aux)`` with
        ``has_aux``, where ``aux`` is a dict of scalar metrics. ``rng`` is a fresh key per step.
      tx: the optimizer; use :func:`jaxprune.transform.keep_pruned` to keep pruned weights at 0.
      has_aux: whether ``loss_fn`` returns ``(loss, aux)``.

    Returns:
      The step (the jitted function is its ``.jitted``); ``metrics`` holds ``'loss'`` and the
      entries of ``aux``. The input state is not donated or modified. A step whose
      state is spread over several CPU devices returns once it has run: XLA's CPU all-reduce
      can deadlock with two data-parallel steps in flight. Everywhere else it returns at once,
      as JAX's asynchronous dispatch does.

      ``step.epoch(state, batches, epoch) -> (state, metrics)`` runs epoch ``epoch`` of an
      :class:`jaxprune.ArrayBatches` as one compiled loop (``lax.scan``): the same steps on the
      same batches as ``for batch in batches(epoch): state, _ = step(state, batch)``, with no
      host work between them; each entry of ``metrics`` is stacked over the epoch's steps. It
      compiles once per data shape and batch size, not per epoch.

    Raises:
      ValueError: (at the first call) if, with a model state, ``loss_fn`` returns another shape
        of result, or a new state whose leaves, shapes or dtypes differ from the old one.

    >>> import jax, jax.numpy as jnp, optax
    >>> loss = lambda p, batch, rng: jnp.mean((batch @ p['w']) ** 2)
    >>> step = make_retrain_step(loss, optax.sgd(0.1))
    >>> state = retrain_state({'w': jnp.ones((2, 1))}, optax.sgd(0.1), rng=jax.random.key(0))
    >>> state, metrics = step(state, jnp.ones((4, 2)))
    >>> float(metrics['loss']), state.params['w'].ravel().tolist()
    (4.0, [0.6000000238418579, 0.6000000238418579])
    >>> data = ArrayBatches(jnp.ones((12, 2)), batch_size=4)
    >>> state, metrics = step.epoch(state, data, 0)  # three steps, one call
    >>> int(state.step), metrics['loss'].shape
    (4, (3,))
    """

    def step(state: RetrainState, batch: Batch) -> tuple[RetrainState, dict[str, jax.Array]]:
        rng = jax.random.fold_in(state.rng, state.step)
        if state.model_state is None:
            out, grads = jax.value_and_grad(loss_fn, has_aux=has_aux)(state.params, batch, rng)
            (loss, aux), model_state = (out if has_aux else (out, {})), None
        else:

            def with_state(params: PyTree) -> tuple[Any, tuple]:
                result = loss_fn(params, batch, rng, state.model_state)
                return _split_result(result, state.model_state, has_aux)

            (loss, (model_state, aux)), grads = jax.value_and_grad(with_state, has_aux=True)(
                state.params
            )
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        new = RetrainState(params, opt_state, state.rng, state.step + 1, model_state)
        return new, {"loss": loss, **aux}

    jitted = jax.jit(step)

    @functools.partial(jax.jit, static_argnames="batch_size")
    def scanned(state, data, key, epoch, batch_size):
        size = jax.tree.leaves(data)[0].shape[0]
        rows = epoch_rows(key, epoch, size=size, batch_size=batch_size)
        return jax.lax.scan(lambda s, row: step(s, take(data, row)), state, rows)

    def waited(out):
        return settled(out, out[0].step)

    @functools.wraps(step)
    def run(state: RetrainState, batch: Batch) -> tuple[RetrainState, dict[str, jax.Array]]:
        return waited(jitted(state, batch))

    def epoch(
        state: RetrainState, batches: ArrayBatches, epoch: int
    ) -> tuple[RetrainState, dict[str, jax.Array]]:
        if not isinstance(batches, ArrayBatches):
            raise TypeError(
                f"step.epoch takes a jaxprune.ArrayBatches, got {type(batches).__name__}; for "
                "other batches, call the step once per batch."
            )
        index = jnp.asarray(epoch, jnp.int32)
        return waited(scanned(state, batches.data, batches.key, index, batches.batch_size))

    run.jitted = jitted  # type: ignore[attr-defined]
    run.epoch = epoch  # type: ignore[attr-defined]
    return run


def _graph_nodes(model: nnx.Module, kind: type) -> list[tuple[str, Any]]:
    """The nodes of one kind in ``model``'s graph, by path, in path order."""
    return sorted(
        (
            ("/".join(str(k) for k in path), node)
            for path, node in nnx.iter_graph(model)
            if isinstance(node, kind)
        ),
        key=lambda item: item[0],
    )


def _reseed(model: nnx.Module, rng: jax.Array) -> None:
    """Gives every RNG stream of ``model`` (a copy made inside the trace) keys derived from ``rng``.

    Each stream gets its own key, split to the stream's key shape (a stream of ``nnx.vmap``-stacked
    layers holds one key per layer), and its count restarts at 0; a Dropout that holds no stream
    gets one. So every module that draws randomness (Dropout anywhere, attention dropout, a custom
    ``nnx.Rngs`` user) sees fresh keys each step, and the model's own RNG state is left alone.
    """
    streams = _graph_nodes(model, nnx.RngStream)
    for i, (_, stream) in enumerate(streams):
        key = jax.random.fold_in(rng, i)
        shape = stream.key.shape
        stream.key.set_value(key if shape == () else jax.random.split(key, shape))
        stream.count.set_value(jnp.zeros_like(stream.count.get_value()))
    bare = [m for _, m in _graph_nodes(model, nnx.Dropout) if m.rngs is None]
    for j, module in enumerate(bare):
        module.rngs = nnx.Rngs(dropout=jax.random.fold_in(rng, len(streams) + j)).dropout


def _state_of(model: nnx.Module) -> nnx.State:
    """The state that is neither Param nor RNG: BatchNorm statistics, caches, custom Variables."""
    return nnx.split(model, nnx.Param, nnx.RngState, ...)[3]  # type: ignore[misc]  # nnx.split's stub types only two states


def nnx_loss(
    model: nnx.Module, loss_fn: Callable[[nnx.Module, Batch], Any]
) -> tuple[LossFn, nnx.State, nnx.State | None]:
    """Turns an NNX model and ``loss_fn(model, batch)`` into a pure loss of the params.

    The model is split into its ``nnx.Param`` state, its RNG state and the rest (the model
    state: ``nnx.BatchStat`` statistics, caches, custom Variables). The returned
    ``loss(params, batch, rng, model_state=None, *, dropout_rates=None)`` merges a copy inside
    the trace and runs ``loss_fn`` on it:

    - every RNG stream of the copy is reseeded from ``rng`` (one key per stream), so Dropout,
      attention dropout and any module drawing from ``nnx.Rngs`` get fresh randomness each step,
      also inside ``nnx.scan`` / ``nnx.vmap``-stacked layers; the model's own RNG state is left
      alone;
    - with ``model_state`` (pass the third returned value to
      :func:`jaxprune.retrain.retrain_state`), the copy runs with that state and ``loss`` returns
      ``(loss, new_model_state)`` (``(loss, (new_model_state, aux))`` when ``loss_fn`` returns
      ``(loss, aux)``), so train-mode BatchNorm keeps its updated statistics;
    - without it, the model state is the model's own, held fixed; a loss that changes it (a
      BatchNorm in train mode) raises an error rather than dropping the update;
    - ``dropout_rates`` maps a Dropout's path (e.g. ``'drop1'`` or ``'layers/2'``) to the rate
      to set on the copy (Han's rule, see :func:`dropout_rate`).

    Write the retrained params and state back with ``nnx.update(model, params, model_state)``.

    Args:
      model: an NNX module, in train mode (``model.train()``) if dropout and batch statistics
        should be active.
      loss_fn: ``loss_fn(model, batch) -> loss`` or ``-> (loss, aux)``.

    Returns:
      ``(loss, params, model_state)``: the pure loss, ``nnx.state(model, nnx.Param)``, and the
      model state (``None`` when the model has none).

    Raises:
      ValueError: (from ``loss``) if ``dropout_rates`` names a path that is no ``nnx.Dropout``,
        if the model state changes while no ``model_state`` was given, or if ``model_state``
        does not match the model's.

    >>> import jax, jax.numpy as jnp
    >>> from flax import nnx
    >>> model = nnx.Linear(2, 1, rngs=nnx.Rngs(0))
    >>> loss, params, state = nnx_loss(model, lambda m, x: jnp.sum(m(x)))
    >>> bool(loss(params, jnp.ones((1, 2)), jax.random.key(0)) == jnp.sum(model(jnp.ones((1, 2))))), state
    (True, None)
    """
    graphdef, params, rngs, rest = nnx.split(model, nnx.Param, nnx.RngState, ...)  # type: ignore[misc]  # nnx.split's stub types only two states

    def loss(
        params: nnx.State,
        batch: Batch,
        rng: jax.Array,
        model_state: nnx.State | None = None,
        *,
        dropout_rates: Mapping | None = None,
    ) -> Any:
        if model_state is not None:
            check_state_like(rest, model_state)
        copy = nnx.merge(
            graphdef, params, rngs, rest if model_state is None else model_state, copy=True
        )
        modules = dict(_graph_nodes(copy, nnx.Dropout))
        unknown = sorted(set(dropout_rates or {}) - set(modules))
        if unknown:
            raise ValueError(
                f"dropout_rates names {unknown}, which are not nnx.Dropout modules of the model; "
                f"its Dropout paths are {sorted(modules)}."
            )
        for path, rate in (dropout_rates or {}).items():
            modules[path].rate = rate
        if not jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
            rng = jax.random.wrap_key_data(rng)
        _reseed(copy, rng)
        before = dict(leaves_with_paths(_state_of(copy)))
        result = loss_fn(copy, batch)
        after = _state_of(copy)
        if model_state is not None:
            if isinstance(result, tuple):
                return result[0], (after, result[1])
            return result, after
        changed = [p for p, leaf in leaves_with_paths(after) if before.get(p) is not leaf]
        if changed:
            raise ValueError(
                f"the model changed its state {changed[:5]} while the loss ran (a BatchNorm in "
                "train mode), but no model_state was given, so the update would be lost. Pass "
                "model_state= (the third value nnx_loss returns) to retrain_state, or call "
                "model.eval() on the layers whose statistics should stay fixed."
            )
        return result

    return loss, params, (rest if jax.tree.leaves(rest) else None)


def dropout_rate(rate: float, connections_before: int, connections_after: int) -> float:
    """Han et al. 2015's dropout rule for retraining: ``rate * sqrt(C_after / C_before)``.

    Dropout acts on neurons while a layer's connection count grows with the square of its neurons,
    so a layer pruned to a fraction ``C_after / C_before`` of its connections gets its dropout
    rate scaled by the square root (Han et al. 2015, Sec. 3.2, Eq. 2): a smaller network needs
    less regularisation. ``C`` counts the connections of the layer whose outputs the dropout drops,
    i.e. the kernel that feeds the Dropout (for ``Dense_0 -> Dropout -> Dense_1`` it is
    ``Dense_0/kernel``). Counts come from :func:`connection_counts`; ``C_before`` is the dense
    count (the kernel's size).

    To apply the rate: for Linen, build a new module with it (``module.clone(rate=...)`` or the
    module's own rate field); for NNX, set ``model.drop.rate = new`` (or pass ``dropout_rates`` to
    the loss from :func:`nnx_loss`). A new rate recompiles the step once.

    Args:
      rate: the original dropout rate, in ``[0, 1)``.
      connections_before: ``C_o``, the layer's connections before pruning, ``> 0``.
      connections_after: ``C_r``, its connections now, in ``[0, C_o]``.

    Returns:
      The dropout rate for retraining.

    Raises:
      ValueError: on a rate outside ``[0, 1)`` or counts that are not ``0 <= C_r <= C_o``,
        ``C_o > 0``.

    >>> dropout_rate(0.5, 1000, 250)
    0.25
    """
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"rate must be in [0, 1), got {rate!r}.")
    if connections_before <= 0 or not 0 <= connections_after <= connections_before:
        raise ValueError(
            "need 0 <= connections_after <= connections_before and connections_before > 0, got "
            f"connections_before={connections_before!r}, connections_after={connections_after!r}."
        )
    return float(rate * math.sqrt(connections_after / connections_before))


def connection_counts(masks: PyTree) -> dict[str, tuple[int, int]]:
    """Counts kept and total connections of each layer kernel in a mask tree.

    A mask leaf counts as a layer's connections when its path ends in a Flax weight name
    (``kernel``, ``embedding``: the leaves :func:`jaxprune.default_where` prunes) or when it
    prunes something (a leaf chosen by another ``where``); biases and norm scales are not
    connections.

    Args:
      masks: a mask tree (see :func:`jaxprune.masks.compute_masks`).

    Returns:
      ``{path: (kept, total)}``, e.g. ``{'Dense_0/kernel': (12, 48)}``; feed ``total`` and
      ``kept`` to :func:`dropout_rate` as ``C_before`` and ``C_after``.

    >>> import numpy as np
    >>> connection_counts({'fc': {'kernel': np.eye(3, dtype=bool), 'bias': np.ones(3, bool)}})
    {'fc/kernel': (3, 9)}
    """
    return {
        path: (int(np.count_nonzero(np.asarray(m))), int(np.size(m)))
        for path, m in leaves_with_paths(masks)
        if is_array(m) and (last_key(path) in WEIGHT_NAMES or not np.all(np.asarray(m)))
    }


def retrain_dropout_rates(
    dropout: Mapping[str, tuple[float, str]], masks: PyTree
) -> dict[str, float]:
    """Applies :func:`dropout_rate` to each dropout layer, from the kernel that feeds it.

    Args:
      dropout: ``{dropout_name: (original_rate, kernel_path)}``, e.g.
        ``{'drop1': (0.5, 'fc1/kernel')}``: the Dropout after ``fc1`` drops ``fc1``'s outputs.
      masks: the current masks.

    Returns:
      ``{dropout_name: rate}``.

    Raises:
      ValueError: if a kernel path is not a kernel of ``masks`` (see :func:`connection_counts`).

    >>> import numpy as np
    >>> masks = {'fc1': {'kernel': np.array([[True, False], [False, False]])}}
    >>> retrain_dropout_rates({'drop1': (0.5, 'fc1/kernel')}, masks)
    {'drop1': 0.25}
    """
    counts = connection_counts(masks)
    rates = {}
    for name, (rate, path) in dropout.items():
        if path not in counts:
            raise ValueError(
                f"dropout[{name!r}] follows {path!r}, which is not a kernel of masks; "
                f"kernels are {sorted(counts)}."
            )
        kept, total = counts[path]
        rates[name] = dropout_rate(rate, total, kept)
    return rates
