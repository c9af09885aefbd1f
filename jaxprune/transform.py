"""Optax transformations that retrain only the surviving connections.

Masks are arrays, so they live in the optimizer state (not in a closure, unlike ``optax.masked``):
:func:`update_masks` swaps them between pruning rounds and a jitted step that takes the optimizer
state as an argument does not recompile.

How each kind of leaf is treated: floating-point updates are masked (``True`` = kept); integer,
boolean or ``float0`` updates and non-array leaves pass through unchanged; ``None`` subtrees stay
``None``. Masks are boolean arrays of the leaf's shape, or the Python value ``True`` for non-array
leaves, as :func:`jaxprune.masks.compute_masks` makes them. Masks built from an NNX
``nnx.state(model, nnx.Param)`` and from the plain arrays inside it are interchangeable: leaves are
matched by path (``'layers/0/kernel'``), not by the Variable wrappers. The masks are checked by
:func:`jaxprune._tree.check_masks` (one check for every function taking masks); on sharded params
``init`` keeps masks sharded like their leaves, moving uncommitted ones there and rejecting
committed ones placed otherwise.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxprune._options import check_scalar, is_traced
from jaxprune._placement import (
    as_mask_tree,
    check_pruned_finite,
    is_inexact_array,
    placed_like,
    placed_like_params,
    pure,
    regrown,
    reset_like,
)
from jaxprune._tree import (
    PyTree,
    check_like,
    check_masks,
    leaves_with_paths,
)


class PruneGradientsState(NamedTuple):
    """State of :func:`prune_gradients`: the current masks (``True`` = connection kept)."""

    masks: PyTree


class KeepPrunedState(NamedTuple):
    """State of :func:`keep_pruned`.

    Attributes:
      masks: the current masks (``True`` = connection kept).
      inner_state: the wrapped optimizer's state.
      countdown: an int32 scalar, the updates left until the check: 2 when masks were installed
        (``init``, :func:`update_masks`); the first update sends pruned weights to zero with
        ``-w``, the second checks that they are zero.
      misplaced: one bool per masked leaf, sticky: a pruned weight was still non-zero one update
        after its ``-w``, so a transformation after ``keep_pruned`` changed the update.
        :func:`update_masks` and :func:`jaxprune.prune_and_retrain` raise on it.
    """

    masks: PyTree
    inner_state: optax.OptState
    countdown: jax.Array
    misplaced: jax.Array


_MASKED_STATES = (PruneGradientsState, KeepPrunedState)


def _check_weight_decay(weight_decay: float) -> float:
    """``weight_decay`` as a Python float, checked by the shared scalar rule (``>= 0``, finite).

    Unlike ``q`` or ``sparsity`` it may not be traced: whether it is zero decides, before any
    tracing, whether ``update`` needs the params.
    """
    if is_traced(weight_decay):
        raise TypeError("weight_decay must be a concrete number, got a traced value.")
    check_scalar(weight_decay, name="weight_decay", low=0.0, high=math.inf, closed_high=False)
    return float(weight_decay)


def _map_masked(fn: Callable[..., Any], updates: PyTree, masks: PyTree, *others: PyTree) -> PyTree:
    """Applies ``fn(update, mask, *other)`` to each floating-point leaf of ``updates``.

    Leaves are paired in flattening order after checking their paths, so NNX Variable wrappers on
    either side do not matter; the result has the tree structure of ``updates``.
    """
    check_like(pure(updates), masks, name="masks")
    flat, treedef = jax.tree.flatten(updates)
    columns = [jax.tree.leaves(masks)] + [jax.tree.leaves(o) for o in others]
    out = [
        fn(u, *rest) if is_inexact_array(u) else u for u, *rest in zip(flat, *columns, strict=True)
    ]
    return jax.tree.unflatten(treedef, out)


def _masked_gradient(g: jax.Array, m: Any) -> jax.Array:
    return g if m is True else jnp.where(m, g, jnp.zeros((), g.dtype))


def _prune_grads(updates: PyTree, masks: PyTree, params: PyTree, weight_decay: float) -> PyTree:
    """``optax.add_decayed_weights(weight_decay)`` on the floating-point leaves, then the masks."""
    if weight_decay != 0.0:
        if params is None:
            raise ValueError(
                f"weight_decay={weight_decay} needs the params: call update(grads, state, params)."
            )
        # On the leaf lists: updates may hold NNX Variable wrappers where the params do not.
        flat, treedef = jax.tree.flatten(updates)
        weights = jax.tree.leaves(pure(params))
        floats = [i for i, u in enumerate(flat) if is_inexact_array(u)]
        decay = optax.add_decayed_weights(weight_decay)
        chosen = [weights[i] for i in floats]
        decayed, _ = decay.update([flat[i] for i in floats], decay.init(chosen), chosen)
        for i, u in zip(floats, decayed, strict=True):
            flat[i] = u
        updates = jax.tree.unflatten(treedef, flat)
    return _map_masked(_masked_gradient, updates, masks)


def prune_gradients(masks: PyTree, *, weight_decay: float = 0.0) -> optax.GradientTransformation:
    """Zeroes the gradients of pruned connections and adds L2 decay to the surviving ones.

    For each floating-point leaf the update becomes ``where(mask, g + weight_decay * w, 0)``:
    ``weight_decay=wd`` is a shortcut for ``optax.chain(optax.add_decayed_weights(wd),
    prune_gradients(masks))`` (on floating-point leaves), which is how it is computed. This
    is the coupled L2 penalty of Han et al. 2015 (Sec. 3.1), applied *before* the optimizer as a
    gradient term, so it goes through momentum or Adam's scaling like the loss gradient does. For
    AdamW's decoupled decay leave ``weight_decay=0`` and use the optimizer's own. The decay applies
    to every floating-point leaf (biases too); to exclude some, keep ``weight_decay=0`` and put
    ``optax.add_decayed_weights(wd, mask=...)`` before this transformation.

    Masking the gradients alone keeps pruned weights at zero only for optimizers whose update of a
    zero gradient is zero: plain SGD, or any optimizer started from a fresh state. An optimizer
    whose state carries momentum from before pruning moves pruned weights again. Use
    :func:`keep_pruned` for the guarantee.

    Args:
      masks: a mask tree matching the params (see :func:`jaxprune.masks.compute_masks`).
      weight_decay: the L2 coefficient, ``>= 0``.

    Returns:
      An ``optax.GradientTransformation`` whose state is a :class:`PruneGradientsState`.

    Raises:
      ValueError: on a negative or non-finite ``weight_decay``; from ``init``/``update``, when the
        masks do not match the params/updates or are sharded otherwise (naming the leaf path), or
        when ``weight_decay > 0`` and ``update`` gets no params.
      TypeError: if a mask leaf is not boolean, or ``weight_decay`` is not a real number.

    >>> import jax.numpy as jnp, optax
    >>> params = {'w': jnp.array([[1.0, 2.0]])}
    >>> tx = prune_gradients({'w': jnp.array([[True, False]])}, weight_decay=0.5)
    >>> updates, _ = tx.update({'w': jnp.array([[1.0, 1.0]])}, tx.init(params), params)
    >>> updates['w'].tolist()
    [[1.5, 0.0]]
    """
    weight_decay = _check_weight_decay(weight_decay)
    masks = as_mask_tree(masks, name="masks")

    def init_fn(params: optax.Params) -> PruneGradientsState:
        return PruneGradientsState(masks=placed_like_params(masks, pure(params)))

    def update_fn(
        updates: optax.Updates, state: PruneGradientsState, params: optax.Params | None = None
    ) -> tuple[optax.Updates, PruneGradientsState]:
        return _prune_grads(updates, state.masks, params, weight_decay), state

    return optax.GradientTransformation(init_fn, update_fn)


def _hold_pruned(u: jax.Array, m: Any, p: Any = None) -> jax.Array:
    if m is True:
        return u
    # -p turns a pruned weight that is not yet zero into exactly 0.0 (x + -x == +0.0 in IEEE).
    held = jnp.zeros((), u.dtype) if p is None else -p.astype(u.dtype)
    return jnp.where(m, u, held)


def _stray_flags(masks: PyTree, params: PyTree) -> list[tuple[str, Any]]:
    """``(path, any pruned weight != 0)`` for each array mask (False for non-float leaves)."""
    flags = []
    for (path, m), p in zip(leaves_with_paths(masks), jax.tree.leaves(params), strict=True):
        if m is not True:
            stray = jnp.any(~m & (p != 0)) if is_inexact_array(p) else jnp.zeros((), bool)
            flags.append((path, stray))
    return flags


def _position_error(paths: list[str]) -> ValueError:
    return ValueError(
        f"keep_pruned: pruned weights of {paths[:5]} are still non-zero one step after "
        "keep_pruned set their updates to -w. A transformation after keep_pruned (a learning-rate "
        "scale, clipping, a schedule) changed those updates, or a pruned weight was NaN or inf "
        "(inf - inf is NaN). When you change masks, zero the "
        "newly pruned weights yourself (params = jaxprune.apply_masks(params, masks), as "
        "prune_and_retrain does), or make keep_pruned the outermost "
        "transformation: keep_pruned(optax.chain(...), masks)."
    )


def _check_position(state: KeepPrunedState, params: PyTree) -> KeepPrunedState:
    """Counts down after a mask change; at 1, records pruned weights that are still non-zero.

    Only the update after the ``-w`` one looks at the weights (a ``lax.cond``), so steady steps
    pay for a scalar test. Concrete values (no jit) raise at once; under jit the flags stay in
    the state for :func:`update_masks` to raise on the host, since a host callback in the step
    would cost a round trip every step.
    """
    misplaced = state.misplaced
    if misplaced.shape[0]:

        def check(_):
            return jnp.stack([f for _, f in _stray_flags(state.masks, params)])

        due = state.countdown == 1
        stray = jax.lax.cond(due, check, lambda _: jnp.zeros_like(misplaced), None)
        if not isinstance(stray, jax.core.Tracer) and jax.device_get(stray).any():
            paths = [p for p, _ in _stray_flags(state.masks, params)]
            flags = jax.device_get(stray)
            raise _position_error([p for p, b in zip(paths, flags, strict=True) if b])
        misplaced = misplaced | stray
    countdown = jnp.maximum(state.countdown - 1, 0).astype(state.countdown.dtype)
    return state._replace(countdown=countdown, misplaced=misplaced)


def _raise_if_misplaced(state: KeepPrunedState) -> None:
    flags = jax.device_get(jax.tree.leaves(state.misplaced)[0])  # one bool per leaf
    if not flags.any():
        return
    paths = [p for p, m in leaves_with_paths(pure(state.masks)) if m is not True]
    raise _position_error([p for p, f in zip(paths, flags, strict=True) if f])


def keep_pruned(
    inner: optax.GradientTransformation, masks: PyTree, *, weight_decay: float = 0.0
) -> optax.GradientTransformationExtraArgs:
    """Wraps an optimizer so that pruned connections stay exactly zero. The documented way.

    It masks twice. Before ``inner``, like :func:`prune_gradients`: gradients of pruned connections
    are zeroed and ``weight_decay * w`` (Han et al. 2015's L2, Sec. 3.1) is added to the survivors
    (``weight_decay=wd`` is the same as ``optax.chain(optax.add_decayed_weights(wd),
    keep_pruned(inner, masks))``: a shortcut for the recipe's coupled L2). After ``inner``, the final updates of pruned connections are replaced by ``-w``, so that
    ``optax.apply_updates`` lands on exactly ``0.0``.

    Why the second mask: a zero gradient does not make a zero update once the optimizer has state.
    SGD with momentum or Nesterov keeps applying the velocity it built before pruning; Adam and
    RMSProp divide a decaying first moment by ``sqrt(v) + eps``; AdamW's decoupled decay and any
    transformation added after the gradient step see the weight, not the gradient. Each of these
    moves a pruned weight off zero ("regrowth"). Masking the final update removes every such path
    whatever ``inner`` is. Using ``-w`` rather than ``0`` also zeroes a pruned weight that was not
    zero yet (params not passed through :func:`jaxprune.masks.apply_masks`, or masks just tightened
    by :func:`update_masks`) on the next step. Surviving connections get exactly the update
    ``inner`` computes from their masked, decayed gradients.

    Pass params to ``update`` (as ``optax.apply_updates`` users do): without them pruned updates
    are ``0``, which keeps pruned weights where they are, so they must already be zero.

    Where it sits in a chain. Pruned weights that are zero get a zero update, and every
    transformation after ``keep_pruned`` that maps a zero update to zero (learning-rate scales,
    schedules, ``clip_by_global_norm``, ``MultiSteps``, ``inject_hyperparams``) keeps it so: they
    stay exactly ``+0.0`` wherever ``keep_pruned`` is. Only the ``-w`` of a pruned weight that is
    not zero yet needs ``keep_pruned`` to be outermost; elsewhere a later scale would shrink it
    to ``(1 - learning_rate) * w``. So when masks change, zero the newly pruned weights with
    :func:`jaxprune.apply_masks` (:func:`jaxprune.prune_and_retrain` does it for you). If a
    pruned weight is still non-zero one update after its ``-w``, the mistake is never silent:
    an eager ``update`` raises at once, and under ``jax.jit`` the state records it and
    :func:`update_masks` (the next round), :func:`raise_if_misplaced` and
    :func:`jaxprune.prune_and_retrain` raise an error naming the leaf. (A host callback raising
    inside the step would cost a round trip to the host every step.)

    Args:
      inner: the optimizer to wrap, e.g. ``optax.sgd(learning_rate, momentum=0.9)`` or ``optax.adamw(learning_rate)``.
      masks: a mask tree matching the params (see :func:`jaxprune.masks.compute_masks`).
      weight_decay: the L2 coefficient, ``>= 0``, added to the surviving gradients before
        ``inner``. Leave it at ``0`` for optimizers with their own decoupled decay (AdamW).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose state is a :class:`KeepPrunedState`; extra
      keyword arguments to ``update`` are passed on to ``inner``.

    Raises:
      ValueError: on a negative or non-finite ``weight_decay``; from ``init``/``update``, when the
        masks do not match the params/updates or are sharded otherwise (naming the leaf path),
        when ``init`` gets a NaN or inf pruned weight (``-w`` cannot zero it: apply the masks
        first), when ``weight_decay > 0`` and ``update`` gets no params, or when a pruned weight
        stays non-zero after its ``-w`` update (see above).
      TypeError: if a mask leaf is not boolean, or ``weight_decay`` is not a real number.

    >>> import jax.numpy as jnp, optax
    >>> params = {'w': jnp.array([[1.0, 0.0]])}
    >>> tx = keep_pruned(optax.sgd(0.1, momentum=0.9), {'w': jnp.array([[True, False]])})
    >>> state = tx.init(params)
    >>> for _ in range(3):
    ...     updates, state = tx.update({'w': jnp.array([[1.0, 1.0]])}, state, params)
    ...     params = optax.apply_updates(params, updates)
    >>> params['w'][0, 1].item()
    0.0
    """
    weight_decay = _check_weight_decay(weight_decay)
    masks = as_mask_tree(masks, name="masks")
    inner = optax.with_extra_args_support(inner)

    def init_fn(params: optax.Params) -> KeepPrunedState:
        placed = placed_like_params(masks, pure(params))
        check_pruned_finite(placed, pure(params))
        n = sum(m is not True for m in jax.tree.leaves(placed))  # one flag per array mask
        countdown = jnp.asarray(2, jnp.int32)
        return KeepPrunedState(placed, inner.init(params), countdown, jnp.zeros(n, bool))

    def update_fn(
        updates: optax.Updates,
        state: KeepPrunedState,
        params: optax.Params | None = None,
        **extra_args: Any,
    ) -> tuple[optax.Updates, KeepPrunedState]:
        grads = _prune_grads(updates, state.masks, params, weight_decay)
        updates, inner_state = inner.update(grads, state.inner_state, params, **extra_args)
        state = state._replace(inner_state=inner_state)
        if params is None:
            updates = _map_masked(_hold_pruned, updates, state.masks)
            return updates, state
        updates = _map_masked(_hold_pruned, updates, state.masks, pure(params))
        return updates, _check_position(state, pure(params))

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _swap_masks(state: Any, new_masks: PyTree, allow_regrow: bool) -> Any:
    old = state.masks
    check_masks(pure(old), pure(new_masks), name="new_masks", of="the current masks")
    new = as_mask_tree(new_masks, name="new_masks")
    if not allow_regrow:
        revived = regrown(pure(old), new)
        if revived:
            shown = ", ".join(f"{p!r} ({c} connections)" for p, c in revived[:5])
            raise ValueError(
                f"new_masks keeps connections that the current masks prune: {shown}. Pruning "
                "rounds only remove connections (pass previous= to compute_masks). To revive "
                "pruned weights on purpose, pass allow_regrow=True; they restart from 0.0."
            )
    flat_old, treedef = jax.tree.flatten(old)
    placed = [placed_like(n, o) for n, o in zip(jax.tree.leaves(new), flat_old, strict=True)]
    state = state._replace(masks=jax.tree.unflatten(treedef, placed))
    if isinstance(state, KeepPrunedState):  # the flags are about the weights of the old masks
        state = state._replace(
            countdown=reset_like(state.countdown, 2), misplaced=reset_like(state.misplaced, False)
        )
    return state


def raise_if_misplaced(opt_state: optax.OptState) -> None:
    """Raises if a :class:`KeepPrunedState` in ``opt_state`` saw a rescaled ``-w`` correction.

    :func:`update_masks` runs this check itself; call it after the last round of your own loop
    (:func:`jaxprune.prune_and_retrain` does after every round).

    Raises:
      ValueError: naming the leaves whose newly pruned weights stayed non-zero.
    """
    for node in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, KeepPrunedState)):
        if isinstance(node, KeepPrunedState):
            _raise_if_misplaced(node)


def update_masks(
    opt_state: optax.OptState, new_masks: PyTree, *, allow_regrow: bool = False
) -> optax.OptState:
    """Returns a copy of ``opt_state`` with the masks of every jaxprune state replaced.

    It finds each :class:`PruneGradientsState` and :class:`KeepPrunedState` wherever it sits (in an
    ``optax.chain``, inside wrappers such as ``optax.MultiSteps`` or ``inject_hyperparams``, or in
    an ``nnx.Optimizer``'s ``opt_state``, whose Variable wrappers are kept) and swaps in
    ``new_masks`` with the old masks' dtype, tree structure and device placement, so a jitted step
    taking the state as an argument does not recompile. Uncommitted new masks (NumPy, or on the
    default device) are put where the old ones are; committed ones must already be sharded like
    them (an error otherwise, never a silent re-shard), and the subset check runs as sharded
    reductions, so no mask is gathered onto one device. The rest of the state (momentum, step
    counts) is kept. By default the new masks must be a subset of the current ones: a pruning round
    only removes connections.

    Args:
      opt_state: an optimizer state built by a transformation containing :func:`keep_pruned` or
        :func:`prune_gradients`.
      new_masks: masks matching the params, e.g. ``compute_masks(params, q, previous=old)``.
      allow_regrow: allow ``new_masks`` to keep connections that are pruned now. Revived weights
        restart from ``0.0`` (they were held there) and get gradients again. Needs no concrete
        masks, so it also works under ``jax.jit``.

    Returns:
      The new optimizer state; ``opt_state`` is not modified.

    Raises:
      ValueError: if ``opt_state`` holds no jaxprune state, if ``new_masks`` does not match the
        current masks in structure or shapes, or is committed with another sharding (naming the
        leaf path), or if it revives pruned connections without ``allow_regrow``.
      TypeError: if a mask leaf is not boolean, or if masks are traced and ``allow_regrow`` is
        False (the subset check needs values).

    >>> import jax.numpy as jnp, optax
    >>> params = {'w': jnp.ones((1, 3))}
    >>> tx = optax.chain(prune_gradients({'w': jnp.ones((1, 3), bool)}), optax.sgd(0.5))
    >>> state = update_masks(tx.init(params), {'w': jnp.array([[True, False, True]])})
    >>> tx.update({'w': jnp.ones((1, 3))}, state, params)[0]['w'].tolist()
    [[-0.5, -0.0, -0.5]]
    """
    found = 0

    def swap(node: Any) -> Any:
        nonlocal found
        if isinstance(node, _MASKED_STATES):
            found += 1
            if isinstance(node, KeepPrunedState) and not isinstance(
                jax.tree.leaves(node.misplaced)[0], jax.core.Tracer
            ):
                _raise_if_misplaced(node)
            return _swap_masks(node, new_masks, allow_regrow)
        return node

    result = jax.tree.map(swap, opt_state, is_leaf=lambda x: isinstance(x, _MASKED_STATES))
    if not found:
        raise ValueError(
            f"opt_state ({type(opt_state).__name__}) holds no PruneGradientsState or "
            "KeepPrunedState: build the optimizer with jaxprune.keep_pruned(inner, masks) (or put "
            "jaxprune.prune_gradients(masks) in its chain) and pass the state its init returned."
        )
    return result
