"""The model state a retrain step carries (BatchNorm statistics, caches): the one shape check."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np

from jaxprune._tree import PyTree, leaves_with_paths


def _dtype(leaf: Any) -> np.dtype:
    return leaf.dtype if hasattr(leaf, "dtype") else jnp.result_type(leaf)


def check_state_like(model_state: PyTree, new_state: PyTree) -> None:
    """Checks that ``new_state`` has the paths, shapes and dtypes of ``model_state``.

    Raises:
      ValueError: naming the first leaf that is missing, extra, or of another shape or dtype.

    >>> import numpy as np
    >>> check_state_like({'bn': {'mean': np.zeros(3)}}, {'bn': {'mean': np.zeros(4)}})
    Traceback (most recent call last):
    ...
    ValueError: the new model_state['bn/mean'] has shape (4,) and dtype float64, expected (3,) and float64 as in the model_state it was given.
    """
    old, new = dict(leaves_with_paths(model_state)), dict(leaves_with_paths(new_state))
    if old.keys() != new.keys():
        missing, extra = sorted(old.keys() - new.keys()), sorted(new.keys() - old.keys())
        raise ValueError(
            "the new model_state does not have the leaves of the model_state it was given: "
            f"missing {missing[:5]}, unexpected {extra[:5]}. Return every collection the step "
            "was given (for Linen: mutable=list(model_state))."
        )
    for path, leaf in old.items():
        want = (tuple(jnp.shape(leaf)), _dtype(leaf))
        have = (tuple(jnp.shape(new[path])), _dtype(new[path]))
        if want != have:
            raise ValueError(
                f"the new model_state[{path!r}] has shape {have[0]} and dtype {have[1]}, "
                f"expected {want[0]} and {want[1]} as in the model_state it was given."
            )
