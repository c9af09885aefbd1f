"""The round driver: prune, retrain, repeat (Han et al. 2015, Sec. 3.4), resumable.

:func:`prune_and_retrain` runs the rounds on the retrain step of :mod:`jaxprune.retrain`, with the
masks of :mod:`jaxprune.masks` swapped into one optimizer state (:mod:`jaxprune.transform`), and
yields a :class:`RoundsState` after each round.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxprune import batch_stats
from jaxprune._options import check_count
from jaxprune._tree import PyTree, Stacked, Where
from jaxprune.batches import ArrayBatches
from jaxprune.masks import apply_masks, compute_masks, masks_for_sparsity
from jaxprune.nm import AxisSpec, check_pattern, nm_masks
from jaxprune.retrain import (
    Batch,
    LossFn,
    RetrainState,
    make_retrain_step,
    retrain_dropout_rates,
)
from jaxprune.summary import summarize
from jaxprune.transform import keep_pruned, raise_if_misplaced, update_masks

# A value per round: one value for all rounds, a sequence with one per round, or a function of the
# round index. For ``q`` a value may also be a mapping from layer path (or pattern) to q.
Schedule = Any


class RoundRecord(NamedTuple):
    """One pruning round of :func:`prune_and_retrain`'s history."""

    round: int
    q: float | dict[str, float] | None
    sparsity: float | None
    kept_fraction_per_layer: dict[str, float]
    kept_fraction: float
    train_loss: float
    metric: Any
    dropout_rates: dict[str, float]
    pattern: tuple[int, int] | None = None


class RoundsState(NamedTuple):
    """What :func:`prune_and_retrain` yields after each round; pass it as ``resume`` to go on.

    ``opt_state`` has the structure of ``keep_pruned(optimizer, masks).init(params)`` for the
    driver's ``optimizer``: that is the template to restore a saved state's leaves into.
    """

    round: int
    params: PyTree
    masks: PyTree
    opt_state: optax.OptState
    history: tuple[RoundRecord, ...]
    model_state: PyTree = None


def _schedule_value(schedule: Schedule, r: int, rounds: int, *, name: str) -> Any:
    if schedule is None:
        return None
    if callable(schedule):
        value = schedule(r)
    elif isinstance(schedule, Sequence):
        if len(schedule) != rounds:
            raise ValueError(f"{name} has {len(schedule)} entries, expected rounds={rounds}.")
        value = schedule[r]
    else:
        value = schedule
    if isinstance(value, Mapping):  # per-layer q, as compute_masks takes it
        return {k: float(v) for k, v in value.items()}
    return float(value)


def _is_pair(value: Any) -> bool:
    return (
        isinstance(value, Sequence)
        and len(value) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    )


def _pattern_value(pattern: Schedule, r: int, rounds: int) -> tuple[int, int] | None:
    """The round's ``(n, m)``: ``pattern`` is one pair, one pair or None per round, or a function."""
    if pattern is None:
        return None
    if callable(pattern):
        value = pattern(r)
    elif _is_pair(pattern):
        value = pattern
    elif isinstance(pattern, Sequence):
        if len(pattern) != rounds:
            raise ValueError(
                f"pattern has {len(pattern)} entries, expected rounds={rounds} (one (n, m) or None "
                "per round), or one (n, m) pair for every round."
            )
        value = pattern[r]
    else:
        raise TypeError(f"pattern must be an (n, m) pair, got {type(pattern).__name__}.")
    if value is None:
        return None
    if not _is_pair(value):
        raise TypeError(f"pattern for round {r} must be an (n, m) pair of ints, got {value!r}.")
    return check_pattern(*value)


def _check_driver_args(
    q: Schedule, sparsity: Schedule, pattern: Schedule, rounds: int, epochs: int
) -> None:
    both = q is not None and sparsity is not None
    if both or (q is None and sparsity is None and pattern is None):
        raise ValueError(
            "pass exactly one of q (Han's q*std rule) or sparsity (a target), or neither with "
            "pattern= (an N:M target)."
        )
    check_count(rounds, name="rounds")
    check_count(epochs, name="epochs")


def _epoch(step, state: RetrainState, batches, index: int) -> tuple[RetrainState, Any]:
    """One epoch of steps: the state after it and the per-step losses (still on the device).

    An :class:`ArrayBatches` runs as one compiled loop; other batches one step per batch, the
    losses fetched once per epoch, so no step waits for the host.
    """
    if isinstance(batches, ArrayBatches):
        state, metrics = step.epoch(state, batches, index)
        return state, metrics["loss"]
    losses = []
    for batch in batches(index):
        state, metrics = step(state, batch)
        losses.append(metrics["loss"])
    if not losses:
        raise ValueError(f"batches({index}) yielded no batch.")
    return state, losses


def prune_and_retrain(
    params: PyTree,
    loss_fn: LossFn,
    batches: Callable[[int], Iterable[Batch]],
    evaluate: Callable[[PyTree], Any],
    *,
    rounds: int,
    optimizer: optax.GradientTransformation,
    q: Schedule = None,
    sparsity: Schedule = None,
    scope: str = "layer",
    pattern: Schedule = None,
    pattern_axis: AxisSpec = None,
    epochs: int = 1,
    dropout: Mapping[str, tuple[float, str]] | None = None,
    seed: int | jax.Array = 0,
    where: Where | None = None,
    stacked: Stacked | None = None,
    model_state: PyTree = None,
    reestimate: int = 0,
    resume: RoundsState | None = None,
    on_epoch: Callable[[int, int, float], None] | None = None,
) -> Iterator[RoundsState]:
    """Iterative pruning (Han et al. 2015, Sec. 3.4): each round prunes, then retrains.

    Round ``r``: masks = ``compute_masks(params, q_r, previous=masks)`` (or
    ``masks_for_sparsity(params, sparsity_r, ...)``), then, with a ``pattern``, projected onto N:M
    (``nm_masks(params, n, m, previous=masks)``), params are masked, dropout rates are rescaled
    by :func:`jaxprune.dropout_rate`, and the survivors are retrained for ``epochs`` epochs with
    ``keep_pruned(optimizer, masks)``. ``optimizer`` is any optax transformation and carries the
    retraining learning rate: Han et al. retrain at 1/10 of the original rate with a coupled L2
    term, ``optax.chain(optax.add_decayed_weights(wd), optax.sgd(learning_rate / 10,
    momentum=0.9))``. The optimizer state is carried across rounds with new masks swapped in by
    :func:`jaxprune.transform.update_masks`, so the step compiles once per distinct set of
    dropout rates, not once per round; carried momentum cannot regrow pruned weights.

    The loss is the one :func:`jaxprune.make_retrain_step` takes, ``loss_fn(params, batch, rng)``, or
    with a ``model_state`` (BatchNorm statistics) ``loss_fn(params, batch, rng, model_state) ->
    (loss, new_model_state)``; the state is carried through the rounds and returned. With
    ``dropout``, the loss also gets the round's rates as a keyword, ``dropout_rates=``.

    Everything random is derived from ``seed`` and the round number, and epoch ``e`` of round ``r``
    reads ``batches(r * epochs + e)``, so resuming from a yielded state reproduces an
    uninterrupted run (given a deterministic ``batches``).

    Args:
      params: trained dense (or already pruned) params: a Linen params dict or an NNX Param state.
      loss_fn: the loss, as above. ``dropout_rates`` is a dict of Python floats keyed like
        ``dropout``, to build the Linen module or set the NNX rates (the loss from
        :func:`jaxprune.nnx_loss` takes it as is).
      batches: ``batches(epoch) -> iterable of batches``; the driver loads no data itself. An
        :class:`jaxprune.ArrayBatches` (the data set on the device) runs each epoch as one
        compiled loop, with the same batches and steps as iterating it.
      evaluate: ``evaluate(params) -> metric`` (e.g. test accuracy), called after each round.
      rounds: the number of prune -> retrain rounds.
      optimizer: the retraining ``GradientTransformation`` (its own learning rate and schedule,
        weight decay included); the driver wraps it in :func:`jaxprune.keep_pruned`.
      q: Han's quality parameter per round: a float, a sequence of ``rounds`` floats or a function
        of the round index; any of these values may instead be a mapping from layer path or
        pattern to q (as :func:`jaxprune.masks.compute_masks` takes it), since layers differ in
        sensitivity. Exclusive with ``sparsity``.
      sparsity: the target pruned fraction per round, same forms as ``q``.
      scope: ``'layer'`` or ``'global'``, for ``sparsity``.
      pattern: an N:M target (:func:`jaxprune.nm_masks`): one ``(n, m)`` pair for every round, a
        sequence of ``rounds`` pairs or ``None`` (no projection that round), or a function of the
        round index. Alone, each round keeps the ``n`` largest of every ``m`` survivors: ``(2,
        4)`` with ``rounds=1`` is the usual one-shot N:M prune and retrain, and ``[(3, 4), (2,
        4)]`` a gradual one. With ``q`` or ``sparsity``, the round's magnitude masks are
        projected onto the pattern (which can only prune more), so ``sparsity=[0.3, 0.5],
        pattern=[None, (2, 4)]`` runs Han's unstructured schedule and ends exactly 2:4. Since
        pruned connections stay pruned, a round's masks satisfy its pattern exactly: at most
        ``n`` per group, exactly ``n`` where no more were pruned before.
      pattern_axis: the group axis (or ``{pattern: axis}``), as ``nm_masks``'s ``axis``.
      epochs: retraining epochs per round.
      dropout: ``{name: (original_rate, kernel_path)}``; the Dropout named ``name`` drops the
        outputs of the layer whose kernel is at ``kernel_path`` and follows its connection count.
      seed: an int seed, or a PRNG key (any ``impl``), for the dropout RNGs.
      where: the prunability rule passed to the mask functions.
      stacked: ``{pattern: axis}`` for scan-stacked layers, passed to the mask functions and the
        summary: each slice is a layer for the std, the sparsity target and ``kept``.
      model_state: the model's non-param state (e.g. ``{'batch_stats': ...}`` or the third value
        of :func:`jaxprune.nnx_loss`), updated by the loss while retraining.
      reestimate: recompute ``model_state``'s running statistics
        (:func:`jaxprune.reestimate_batch_stats`) from this many batches after each prune, since
        pruning shifts them, and again after the round's retraining, since running averages lag
        behind changing weights (from the round's first and last epoch's batches); 0 (default)
        leaves them to the retraining. Needs ``model_state``.
      resume: a state yielded by an earlier call with the same arguments; rounds before
        ``resume.round`` are skipped.
      on_epoch: ``on_epoch(round, epoch, mean_train_loss)`` after each epoch (progress bars).

    Yields:
      A :class:`RoundsState` after each round: ``round`` is the number of rounds done,
      ``model_state`` the retrained model state, and ``history`` holds one :class:`RoundRecord`
      per round so far (q or sparsity, kept fraction per prunable leaf and in total, mean train
      loss, metric, dropout rates and N:M pattern).

    Raises:
      ValueError: on both ``q`` and ``sparsity``, neither without a ``pattern``, a round with
        none of them, a schedule of the wrong length, an invalid pattern (see ``nm_masks``),
        ``rounds`` or ``epochs`` below 1, a ``dropout`` kernel path
        that is not in the masks, an epoch without batches, or ``reestimate`` without a
        ``model_state``.
      TypeError: if a round's pattern is not an ``(n, m)`` pair of ints.

    >>> import jax, jax.numpy as jnp, optax
    >>> params = {'kernel': jax.random.normal(jax.random.key(0), (4, 3))}
    >>> x = jax.random.normal(jax.random.key(1), (8, 4))
    >>> loss = lambda p, b, rng: jnp.mean((b @ p['kernel'] - 1.0) ** 2)
    >>> runs = prune_and_retrain(params, loss, lambda e: [x] * 5, lambda p: 0.0, rounds=2,
    ...                          optimizer=optax.sgd(0.01), sparsity=[0.5, 0.75])
    >>> [h.kept_fraction for h in list(runs)[-1].history]
    [0.5, 0.25]
    >>> runs = prune_and_retrain(params, loss, lambda e: [x] * 5, lambda p: 0.0, rounds=1,
    ...                          optimizer=optax.sgd(0.01), pattern=(1, 2))  # one-shot 1:2, retrained
    >>> record = list(runs)[-1].history[-1]
    >>> record.kept_fraction, record.pattern
    (0.5, (1, 2))
    """
    _check_driver_args(q, sparsity, pattern, rounds, epochs)
    if reestimate and model_state is None:
        raise ValueError(
            f"reestimate={reestimate} needs the statistics to re-estimate: pass model_state=."
        )
    if not isinstance(optimizer, optax.GradientTransformation):
        raise TypeError(
            f"optimizer must be an optax GradientTransformation (e.g. optax.sgd(0.01, "
            f"momentum=0.9)), got {type(optimizer).__name__}."
        )
    dropout = dict(dropout or {})
    start = resume or RoundsState(0, params, None, None, (), model_state)
    params, masks, opt_state, history = start.params, start.masks, start.opt_state, start.history
    model_state = start.model_state
    key = seed if isinstance(seed, jax.Array) else jax.random.key(seed)
    tx = None
    steps: dict[tuple, tuple[Callable, Callable | None]] = {}
    for r in range(start.round, rounds):
        q_r = _schedule_value(q, r, rounds, name="q")
        s_r = _schedule_value(sparsity, r, rounds, name="sparsity")
        p_r = _pattern_value(pattern, r, rounds)
        if q_r is not None:
            masks = compute_masks(params, q_r, previous=masks, where=where, stacked=stacked)
        elif s_r is not None:
            masks = masks_for_sparsity(
                params, s_r, scope=scope, previous=masks, where=where, stacked=stacked
            )
        elif p_r is None:
            raise ValueError(
                f"round {r} has no pattern and neither q nor sparsity is given, so it would prune "
                "nothing; give every round an (n, m) or pass q= or sparsity= as well."
            )
        if p_r is not None:  # projected onto N:M after the magnitude cut; pruned stays pruned
            masks = nm_masks(
                params, *p_r, axis=pattern_axis, previous=masks, where=where, stacked=stacked
            )
        params = apply_masks(params, masks)
        if tx is None:
            tx = keep_pruned(optimizer, masks)
        opt_state = tx.init(params) if opt_state is None else update_masks(opt_state, masks)
        rates = retrain_dropout_rates(dropout, masks)
        rates_key = tuple(sorted(rates.items()))
        if rates_key not in steps:
            loss_r = functools.partial(loss_fn, dropout_rates=rates) if dropout else loss_fn
            stats = (
                batch_stats.probe(lambda s, b, p, k, f=loss_r: f(p, b, k, s)[1])
                if reestimate
                else None
            )
            steps[rates_key] = (make_retrain_step(loss_r, tx), stats)
        step, stats = steps[rates_key]
        rng = jax.random.fold_in(key, r)
        if stats is not None:
            first = itertools.islice(batches(r * epochs), reestimate)
            model_state = batch_stats.running_average(stats, model_state, first, params, rng)
        state = RetrainState(params, opt_state, rng, jnp.int32(0), model_state)
        total_loss, total_steps = 0.0, 0
        for e in range(epochs):
            state, losses = _epoch(step, state, batches, r * epochs + e)
            epoch_loss = float(np.sum(jax.device_get(losses)))
            total_loss, total_steps = total_loss + epoch_loss, total_steps + len(losses)
            if on_epoch is not None:
                on_epoch(r, e, epoch_loss / len(losses))
        params, opt_state, model_state = state.params, state.opt_state, state.model_state
        raise_if_misplaced(opt_state)
        if stats is not None:  # the running averages lag behind the retrained weights
            last = itertools.islice(batches(r * epochs + epochs - 1), reestimate)
            model_state = batch_stats.running_average(stats, model_state, last, params, rng)
        summary = summarize(params, masks, where=where, stacked=stacked)
        record = RoundRecord(
            round=r,
            q=q_r,
            sparsity=s_r,
            kept_fraction_per_layer={row.path: row.kept_fraction for row in summary.rows},
            kept_fraction=summary.kept_fraction,
            train_loss=total_loss / total_steps,
            metric=evaluate(params),
            dropout_rates=rates,
            pattern=p_r,
        )
        history = (*history, record)
        yield RoundsState(r + 1, params, masks, opt_state, history, model_state)
