"""Pytree paths and leaf checks shared by every jaxprune module.

Paths read the same for a Flax Linen ``variables['params']`` dict and an NNX
``nnx.state(model, nnx.Param)``: ``'Dense_0/kernel'`` and ``'layers/0/kernel'``. NNX wraps each
array in a ``Variable`` whose key path ends in ``.value``; that last step is dropped.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

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


def default_where(path: str, leaf: Any) -> bool:
    """The default prunability rule: floating-point arrays with ``ndim >= 2``.

    That covers Dense and Conv kernels and embeddings. Biases and norm scales (1-D), scalars,
    integer or boolean arrays and non-array leaves are never pruned.

    >>> import numpy as np
    >>> default_where('Dense_0/kernel', np.ones((3, 2))), default_where('Dense_0/bias', np.ones(2))
    (True, False)
    """
    del path
    return is_array(leaf) and leaf.ndim >= 2 and jnp.issubdtype(leaf.dtype, jnp.floating)


def _shape(leaf: Any) -> tuple[int, ...] | None:
    return tuple(leaf.shape) if is_array(leaf) else None


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
    if jax.tree.structure(params) != jax.tree.structure(other):
        raise ValueError(
            f"{name} has the leaf paths of params but another container type "
            f"({type(other).__name__} vs {type(params).__name__}); build it with jax.tree.map "
            "over params."
        )
    for path, leaf in ref.items():
        want, have = _shape(leaf), _shape(got[path])
        if want is not None and have != want:
            raise ValueError(
                f"{name}[{path!r}] has shape {have}, expected {want} (the shape of params[{path!r}])."
            )
