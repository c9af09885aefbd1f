"""Pytree paths and leaf checks shared by every jaxprune module.

Paths read the same for a Flax Linen ``variables['params']`` dict and an NNX
``nnx.state(model, nnx.Param)``: ``'Dense_0/kernel'`` and ``'layers/0/kernel'``. NNX wraps each
array in a ``Variable`` whose key path ends in ``.value``; that last step is dropped.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple, NoReturn

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune._keys import _count

PyTree = Any
Where = Callable[[str, Any], bool]


def _key_str(key: Any) -> str:
    if isinstance(key, jax.tree_util.DictKey):
        return str(key.key)
    if isinstance(key, jax.tree_util.SequenceKey):
        return str(key.idx)
    if isinstance(key, jax.tree_util.GetAttrKey):
        return key.name
    if isinstance(key, jax.tree_util.FlattenedIndexKey):
        return str(key.key)
    return str(key)


def path_str(keypath: tuple) -> str:
    """Renders a JAX key path as a slash-separated string.

    Args:
      keypath: a key path from ``jax.tree_util.tree_flatten_with_path``.

    Returns:
      The path, e.g. ``'Dense_0/kernel'``; an NNX Variable's trailing ``value`` is dropped.

    >>> import jax, numpy as np
    >>> [path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path({'a': [np.ones(2)]})[0]]
    ['a/0']
    """
    parts = [_key_str(k) for k in keypath]
    if (
        len(parts) > 1
        and isinstance(keypath[-1], jax.tree_util.GetAttrKey)
        and parts[-1] == "value"
    ):
        parts = parts[:-1]
    return "/".join(parts)


def leaves_with_paths(tree: PyTree) -> list[tuple[str, Any]]:
    """Lists ``(path, leaf)`` pairs of a pytree in flattening order.

    >>> leaves_with_paths({'Dense_0': {'bias': 0.0, 'kernel': 1.0}})
    [('Dense_0/bias', 0.0), ('Dense_0/kernel', 1.0)]
    """
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return [(path_str(p), leaf) for p, leaf in flat]


def is_array(leaf: Any) -> bool:
    """Whether a leaf is a JAX/NumPy array (tracers included)."""
    return isinstance(leaf, (jax.Array, np.ndarray, np.generic))


WEIGHT_NAMES = ("kernel", "embedding")
"""The last path keys that name a layer's weights in Flax (Linen and NNX alike)."""


def last_key(path: str) -> str:
    """The last segment of a slash-separated path: ``'Dense_0/kernel'`` -> ``'kernel'``."""
    return path.rsplit("/", 1)[-1]


def is_float_array(leaf: Any) -> bool:
    """Whether a leaf is an array of a real floating-point dtype (bfloat16 and float16 included)."""
    return is_array(leaf) and jnp.issubdtype(leaf.dtype, jnp.floating)


def _check_strings(values: tuple, *, name: str) -> None:
    if not values or not all(isinstance(v, str) and v for v in values):
        raise ValueError(f"{name} needs one or more non-empty strings, got {values!r}.")


def weights_named(*names: str) -> Where:
    """A prunability rule: floating-point arrays whose last path key is one of ``names``.

    >>> import numpy as np
    >>> kernels = weights_named('kernel')
    >>> kernels('Embed_0/embedding', np.ones((5, 2))), kernels('Dense_0/kernel', np.ones((2, 2)))
    (False, True)
    """
    _check_strings(names, name="weights_named")
    chosen = frozenset(names)

    def where(path: str, leaf: Any) -> bool:
        return last_key(path) in chosen and is_float_array(leaf)

    return where


_default_names = weights_named(*WEIGHT_NAMES)


def default_where(path: str, leaf: Any) -> bool:
    """The default prunability rule: Flax weights by name, ``kernel`` and ``embedding``.

    A leaf is prunable when it is a floating-point array whose last path key is ``kernel`` (Dense,
    DenseGeneral, Einsum, Conv, attention projections; Linen and NNX) or ``embedding`` (``Embed``).
    Everything else is never pruned, whatever its ndim: ``bias`` (also the ``(heads, head_dim)``
    biases of attention and the ``(layers, features)`` biases of a scan stack), LayerNorm and
    BatchNorm ``scale``, batch statistics, integer counters and non-array leaves.

    Embeddings are included because an embedding table is a weight matrix (the connections from a
    one-hot token to its features), often the largest one of a small Transformer, and Han et al.
    2015 prune every weight matrix. To leave them dense, pass ``where=weights_named('kernel')``.
    A model built from raw arrays (no Flax names) matches nothing: pass ``where=``, e.g.
    ``where=paths_matching('w*')`` or ``where=lambda path, leaf: leaf.ndim >= 2``.

    >>> import numpy as np
    >>> default_where('Dense_0/kernel', np.ones((3, 2))), default_where('attn/bias', np.ones((2, 4)))
    (True, False)
    """
    return _default_names(path, leaf)


def paths_matching(*patterns: str) -> Where:
    """A prunability rule: floating-point arrays whose path a pattern names (:func:`path_matches`).

    >>> import numpy as np
    >>> rule = paths_matching('w*', 'layers/*/kernel')
    >>> rule('w1', np.ones((2, 2))), rule('b1', np.ones(2)), rule('layers/0/kernel', np.ones((2, 2)))
    (True, False, True)
    """
    _check_strings(patterns, name="paths_matching")

    def where(path: str, leaf: Any) -> bool:
        return is_float_array(leaf) and any(path_matches(path, p) for p in patterns)

    return where


def excluding(*patterns: str, where: Where | None = None) -> Where:
    """A prunability rule: ``where`` (default :func:`default_where`) minus paths matching a pattern.

    A pattern matches a leaf path (``fnmatch``) or any prefix of it ending at a ``/``, so
    ``'Embed_0'`` excludes everything under ``Embed_0``.

    >>> import numpy as np
    >>> rule = excluding('head', 'conv1/*')
    >>> rule('head/kernel', np.ones((2, 2))), rule('fc1/kernel', np.ones((2, 2)))
    (False, True)
    """
    _check_strings(patterns, name="excluding")
    base = default_where if where is None else where

    def rule(path: str, leaf: Any) -> bool:
        return base(path, leaf) and not any(path_matches(path, p) for p in patterns)

    return rule


def path_matches(path: str, pattern: str) -> bool:
    """Whether ``pattern`` names ``path``: the path itself, a prefix ending at ``/``, or a glob.

    >>> path_matches('layers/Block/Dense_0/kernel', 'layers'), path_matches('fc1/kernel', 'fc*')
    (True, True)
    """
    parts = path.split("/")
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    return any(fnmatch.fnmatchcase(p, pattern) for p in prefixes)


def prunable_paths(params: PyTree, where: Where | None) -> dict[str, bool]:
    """Maps each leaf path of ``params`` to whether ``where`` (default rule if None) prunes it.

    Raises:
      TypeError: if ``where`` selects a leaf that is not a floating-point array.
      ValueError: if nothing is selected; the message lists the leaves and says what to pass.
    """
    rule = default_where if where is None else where
    entries = leaves_with_paths(params)
    selected: dict[str, bool] = {}
    for path, leaf in entries:
        chosen = bool(rule(path, leaf))
        if chosen and not is_float_array(leaf):
            kind = f"dtype {leaf.dtype}" if is_array(leaf) else f"type {type(leaf).__name__}"
            raise TypeError(
                f"params[{path!r}] was selected for pruning by `where` but has {kind}; "
                "only floating-point arrays can be pruned. Make `where` return False for it."
            )
        selected[path] = chosen
    if not any(selected.values()):
        shown = [f"{p} {getattr(leaf, 'shape', type(leaf).__name__)}" for p, leaf in entries[:8]]
        if where is None:
            hint = (
                "the default rule prunes floating-point leaves named 'kernel' or 'embedding' "
                "(Flax's weight names). For other names pass where=, e.g. "
                "where=jaxprune.paths_matching('w*') or where=lambda path, leaf: leaf.ndim >= 2"
            )
        else:
            hint = "the `where` passed selects none of them"
        raise ValueError(f"params has no prunable leaf: {hint}. The leaves are {shown}.")
    return selected


Stacked = Mapping[str, int]
"""``{pattern: axis}``: leaves matching ``pattern`` hold one layer per index along ``axis``."""


def stacked_axes(params: PyTree, stacked: Stacked | None, prunable: Mapping[str, bool]) -> dict:
    """Resolves ``stacked={pattern: axis}`` to ``{leaf_path: axis}`` for the prunable leaves.

    A pattern matches like :func:`path_matches` (a leaf path, a prefix ending at ``/`` such as
    the scanned module's name, or a glob). Axes may be negative.

    Raises:
      TypeError: if ``stacked`` is not a mapping of strings to ints.
      ValueError: on a pattern matching no prunable leaf, two patterns matching one leaf, an axis
        out of range for a leaf, or leaves of one pattern whose sizes along the axis disagree.
    """
    if not stacked:
        return {}
    if not isinstance(stacked, Mapping):
        raise TypeError(
            f"stacked must be a mapping {{pattern: axis}}, e.g. {{'layers': 0}}, got "
            f"{type(stacked).__name__}."
        )
    shapes = {p: tuple(leaf.shape) for p, leaf in leaves_with_paths(params) if prunable.get(p)}
    axes: dict[str, int] = {}
    for pattern, axis in stacked.items():
        if not isinstance(pattern, str) or isinstance(axis, bool) or not isinstance(axis, int):
            raise TypeError(
                f"stacked maps a path pattern to an int axis, got {pattern!r}: {axis!r}."
            )
        matched = [p for p in shapes if path_matches(p, pattern)]
        if not matched:
            raise ValueError(
                f"stacked[{pattern!r}] matches no prunable leaf; prunable leaves are "
                f"{list(shapes)[:8]}."
            )
        sizes = {}
        for path in matched:
            ndim = len(shapes[path])
            if not -ndim <= axis < ndim:
                raise ValueError(
                    f"stacked[{pattern!r}] = {axis} is out of range for params[{path!r}] of "
                    f"shape {shapes[path]}."
                )
            if path in axes:
                raise ValueError(f"params[{path!r}] is matched by two stacked patterns.")
            axes[path] = axis % ndim
            sizes[path] = shapes[path][axis % ndim]
        if len(set(sizes.values())) > 1:
            raise ValueError(
                f"stacked[{pattern!r}] matches leaves whose sizes along axis {axis} disagree "
                f"({sizes}); every leaf of one stack holds the same number of layers."
            )
    return axes


def slice_name(path: str, index: int) -> str:
    """The name of one layer of a stacked leaf: ``'layers/Dense_0/kernel[3]'``."""
    return f"{path}[{index}]"


def _shape(leaf: Any) -> tuple[int, ...] | None:
    return tuple(leaf.shape) if is_array(leaf) else None


def _check_structure(params: PyTree, other: PyTree, *, name: str) -> dict[str, Any]:
    """Checks that ``other`` has the leaf paths and containers of ``params``; its leaves by path."""
    ref = dict(leaves_with_paths(params))
    got = dict(leaves_with_paths(other))
    missing = [p for p in ref if p not in got]
    extra = [p for p in got if p not in ref]
    if missing or extra:
        detail = []
        if missing:
            detail.append(f"missing leaves {missing[:5]}")
        if extra:
            detail.append(f"unexpected leaves {extra[:5]}")
        raise ValueError(
            f"{name} does not have the tree structure of params: {'; '.join(detail)}. "
            f"Build {name} from the same params tree (e.g. with jaxprune.compute_masks)."
        )
    if jax.tree.structure(params) != jax.tree.structure(other):  # type: ignore[operator]
        raise ValueError(
            f"{name} has the leaf paths of params but another container type "
            f"({type(other).__name__} vs {type(params).__name__}); build it with jax.tree.map "
            "over params."
        )
    return got


def check_like(params: PyTree, other: PyTree, *, name: str) -> None:
    """Checks that ``other`` has the tree structure and leaf shapes of ``params``.

    Args:
      params: the reference tree.
      other: a tree that must match it, e.g. masks.
      name: the argument name used in the error message.

    Raises:
      ValueError: naming the first path that is missing, extra or of another shape.

    >>> import numpy as np
    >>> check_like({'w': np.ones((2, 2))}, {'w': np.ones((2, 3), bool)}, name='masks')
    Traceback (most recent call last):
    ...
    ValueError: masks['w'] has shape (2, 3), expected (2, 2) (the shape of params['w']).
    """
    got = _check_structure(params, other, name=name)
    for path, leaf in leaves_with_paths(params):
        want, have = _shape(leaf), _shape(got[path])
        if want is not None and have != want:
            raise ValueError(
                f"{name}[{path!r}] has shape {have}, expected {want} (the shape of params[{path!r}])."
            )


_MASK_FIX = (
    "Pass the boolean masks that jaxprune.compute_masks or masks_for_sparsity return (True = "
    "kept); to turn 0/1 or float masks into them, use jax.tree.map(lambda m: m != 0, masks)."
)


def _check_mask_leaf(path: str, mask: Any, *, array: bool, name: str) -> None:
    if is_array(mask):
        if mask.dtype != np.bool_:
            raise TypeError(
                f"{name}[{path!r}] has dtype {mask.dtype}, expected bool: a float mask such as "
                f"0.3 would not say whether the connection is kept. {_MASK_FIX}"
            )
    elif array:
        raise TypeError(
            f"{name}[{path!r}] is {type(mask).__name__} {mask!r}, expected a bool array of the "
            f"leaf's shape (a non-array mask leaf is only for non-array params). {_MASK_FIX}"
        )
    elif mask is not True:
        raise TypeError(
            f"{name}[{path!r}] is {type(mask).__name__} {mask!r}; the mask of a non-array leaf "
            f"is the Python value True (such leaves are never pruned). {_MASK_FIX}"
        )


def check_mask_leaves(masks: PyTree, *, name: str = "masks") -> None:
    """The dtype half of :func:`check_masks`, for masks given before their params (``TypeError``)."""
    for path, mask in leaves_with_paths(masks):
        _check_mask_leaf(path, mask, array=is_array(mask), name=name)


def _committed(x: Any) -> bool:
    return isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer) and x.committed


def check_masks(params: PyTree, masks: PyTree, *, name: str = "masks", of: str = "params") -> None:
    """The one check of a mask tree against its params, shared by every function taking masks.

    Each mistake raises one exception type wherever it is made:

    * ``ValueError``: ``masks`` misses or adds leaves, uses other containers, or a mask's shape
      is not its leaf's; a mask placed with another sharding than its leaf (both committed
      ``jax.Array`` s). Masks are never re-sharded behind your back: place them like the params
      (``compute_masks`` on sharded params does) or leave them uncommitted.
    * ``TypeError``: a mask of an array leaf that is not a bool array (float or 0/1 masks
      included: ``0.3`` is not read as ``True``), or a non-array leaf's mask other than ``True``.

    Messages name the first bad leaf path (as ``name[path]`` and ``of[path]``) and say the fix.
    Tracers are checked for dtype and shape only (they have no placement).

    >>> import numpy as np
    >>> check_masks({'w': np.ones(2)}, {'w': np.array([1.0, 0.3])})
    Traceback (most recent call last):
    ...
    TypeError: masks['w'] has dtype float64, expected bool: a float mask such as 0.3 would not say whether the connection is kept. Pass the boolean masks that jaxprune.compute_masks or masks_for_sparsity return (True = kept); to turn 0/1 or float masks into them, use jax.tree.map(lambda m: m != 0, masks).
    """
    got = _check_structure(params, masks, name=name)
    for path, leaf in leaves_with_paths(params):
        mask = got[path]
        _check_mask_leaf(path, mask, array=is_array(leaf), name=name)
        if not is_array(leaf):
            continue
        if tuple(mask.shape) != tuple(leaf.shape):
            raise ValueError(
                f"{name}[{path!r}] has shape {tuple(mask.shape)}, expected {tuple(leaf.shape)} "
                f"(the shape of {of}[{path!r}])."
            )
        if (
            _committed(mask)
            and _committed(leaf)
            and not mask.sharding.is_equivalent_to(leaf.sharding, leaf.ndim)
        ):
            raise ValueError(
                f"{name}[{path!r}] is placed as {mask.sharding}, but {of}[{path!r}] as "
                f"{leaf.sharding}: a mask must be sharded like its leaf. Compute the masks from "
                f"the sharded params, or jax.device_put(mask, {of}[{path!r}].sharding)."
            )


class Unit(NamedTuple):
    """One layer for the rules: a whole leaf (``index`` None) or one slice of a stacked leaf."""

    path: str
    index: int | None  # type: ignore[assignment]  # a field named like tuple.index

    @property
    def name(self) -> str:
        return self.path if self.index is None else slice_name(self.path, self.index)


@jax.jit
def _all_finite(leaves: tuple[jax.Array, ...]) -> jax.Array:
    # A count of the non-finite entries (integer sums, as _count makes them: 0.33 ms per 2**20
    # float32 on 2 cores, against 0.60 for all(isfinite)). Not a float max of |x|: XLA's
    # vectorised max on CPU drops NaN (a 64x64 leaf with one NaN read as finite).
    return jnp.stack([_count(~jnp.isfinite(x), None) == 0 for x in leaves])


def check_finite(leaves: Mapping[str, Any]) -> None:
    """Refuses concrete leaves (``{path: leaf}``) holding NaN or inf: magnitudes cannot rank them.

    One compiled reduction per leaf and one fetch of their bools for all: a sharded leaf is
    never gathered, and the leaves are not waited on one by one. Traced leaves pass.
    """
    concrete = {p: x for p, x in leaves.items() if not isinstance(x, jax.core.Tracer)}
    if not concrete:
        return
    finite = jax.device_get(_all_finite(tuple(concrete.values())))
    for path, ok in zip(concrete, finite, strict=True):
        if not ok:
            raise_nonfinite(path)


def raise_nonfinite(path: str) -> NoReturn:
    """The error for a prunable leaf holding NaN or inf (see :func:`check_finite`)."""
    raise ValueError(
        f"params[{path!r}] contains NaN or inf; magnitudes cannot rank or threshold it. "
        "Fix the weights (e.g. a diverged training run) before computing masks."
    )


def layer_units(params: PyTree, prunable: Mapping[str, bool], axes: Mapping[str, int]) -> list:
    """The layers of ``params`` in flattening order: one :class:`Unit` per leaf or slice."""
    units: list[Unit] = []
    for path, leaf in leaves_with_paths(params):
        if not prunable[path]:
            continue
        if path in axes:
            units.extend(Unit(path, i) for i in range(leaf.shape[axes[path]]))
        else:
            units.append(Unit(path, None))
    return units
