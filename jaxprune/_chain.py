"""The layer chain that ``shrink`` and ``neuron_masks`` walk: reading, checking, unit views.

Private to :mod:`jaxprune.structured`; the rules it checks are described in that module's docstring.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune._tree import PyTree, check_masks, is_array, leaves_with_paths, path_str

Activation = Callable[[Any], Any]


class _Layer(NamedTuple):
    """One listed layer: its name and the paths of its leaves."""

    name: str
    kernel: str
    bias: str | None
    is_conv: bool


# ---------------------------------------------------------------------------------------------
# Reading and checking the chain


def _check_layers_arg(layers: Any) -> tuple[str, ...]:
    if isinstance(layers, str) or not isinstance(layers, Sequence):
        raise TypeError(
            f"layers must be a sequence of layer paths such as ['fc1', 'fc2'], got "
            f"{type(layers).__name__} {layers!r}."
        )
    if not layers:
        raise ValueError("layers is empty; name the chain's layers in order, e.g. ['fc1', 'fc2'].")
    for i, name in enumerate(layers):
        if not isinstance(name, str):
            raise TypeError(f"layers[{i}] is {type(name).__name__} {name!r}, expected a str path.")
    dup = sorted({n for n in layers if list(layers).count(n) > 1})
    if dup:
        raise ValueError(f"layers names {dup} more than once; each layer may appear only once.")
    return tuple(layers)


def _owner(path: str, names: Sequence[str]) -> str | None:
    return next((n for n in names if path.startswith(n + "/")), None)


def _read_chain(params: PyTree, layers: Sequence[str], *, whole: bool) -> tuple[_Layer, ...]:
    """Finds the listed layers in ``params`` and checks that they form a chain.

    With ``whole``, every params leaf must belong to a listed layer (shrinking changes shapes,
    so an unlisted layer fed by a shrunk one would silently break).
    """
    names = _check_layers_arg(layers)
    leaves = dict(leaves_with_paths(params))
    found: dict[str, dict[str, Any]] = {n: {} for n in names}
    for path, leaf in leaves.items():
        owner = _owner(path, names)
        if owner is None:
            if whole:
                raise ValueError(
                    f"params leaf {path!r} belongs to no layer in layers={list(names)}. shrink "
                    "follows only a plain chain of Dense/Conv layers and must see every layer "
                    "whose shape it may change; list the layer in order, or shrink a model "
                    "without it (residual connections and norm layers are not supported)."
                )
            continue
        found[owner][path[len(owner) + 1 :]] = leaf
    chain = []
    for name in names:
        chain.append(_read_layer(name, found[name], sorted(leaves)))
    for prev, layer in itertools.pairwise(chain):
        _check_link(prev, layer, leaves)
    return tuple(chain)


def _read_layer(name: str, leaves: dict[str, Any], all_paths: list[str]) -> _Layer:
    if not leaves:
        raise ValueError(
            f"layers names {name!r}, but params has no leaf under {name + '/'!r}; "
            f"params leaves are {all_paths[:8]}{' ...' if len(all_paths) > 8 else ''}."
        )
    unknown = sorted(set(leaves) - {"kernel", "bias"})
    if unknown or "kernel" not in leaves:
        raise ValueError(
            f"layer {name!r} has leaves {sorted(leaves)}; shrink knows only Dense and Conv layers, "
            "whose leaves are 'kernel' and an optional 'bias'. A layer of another type cannot be "
            "followed: leave it out of the model you shrink."
        )
    kernel = leaves["kernel"]
    if not (is_array(kernel) and kernel.ndim >= 2 and jnp.issubdtype(kernel.dtype, jnp.floating)):
        got = (
            f"shape {tuple(kernel.shape)} dtype {kernel.dtype}"
            if is_array(kernel)
            else type(kernel)
        )
        raise ValueError(
            f"params[{name + '/kernel'!r}] is {got}; expected a floating-point Dense kernel "
            "(in, out) or Conv kernel (*window, in, out)."
        )
    bias = leaves.get("bias")
    if bias is not None and (not is_array(bias) or tuple(bias.shape) != (kernel.shape[-1],)):
        bias_got = tuple(bias.shape) if is_array(bias) else type(bias).__name__
        raise ValueError(
            f"params[{name + '/bias'!r}] has shape {bias_got}, expected ({kernel.shape[-1]},) to match "
            f"the {kernel.shape[-1]} outputs of {name + '/kernel'!r}."
        )
    return _Layer(
        name, f"{name}/kernel", None if bias is None else f"{name}/bias", is_conv=kernel.ndim > 2
    )


def _check_link(prev: _Layer, layer: _Layer, leaves: dict[str, Any]) -> None:
    out_shape, in_shape = leaves[prev.kernel].shape, leaves[layer.kernel].shape
    n_out = out_shape[-1]
    if layer.is_conv and not prev.is_conv:
        raise ValueError(
            f"layer {layer.name!r} (a Conv kernel {tuple(in_shape)}) follows the Dense layer "
            f"{prev.name!r}; shrink cannot follow a dense-to-conv link."
        )
    if prev.is_conv and not layer.is_conv:  # across a flatten of (H, W, C) features
        ok, what = in_shape[0] % n_out == 0, f"a multiple of {n_out} (H * W * {n_out})"
    else:
        ok, what = in_shape[-2] == n_out, f"{n_out}"
    if not ok:
        raise ValueError(
            f"layers {prev.name!r} and {layer.name!r} do not chain: {prev.name!r} has {n_out} "
            f"outputs (kernel {tuple(out_shape)}) but {layer.name!r} takes {in_shape[-2]} inputs "
            f"(kernel {tuple(in_shape)}), expected {what}. Check the order of layers; a residual "
            "connection or a reshape between them cannot be followed."
        )


def _activations(activation: Any, n_links: int) -> tuple[Activation, ...]:
    if callable(activation):
        return (activation,) * n_links
    if isinstance(activation, Sequence) and all(callable(a) for a in activation):
        if len(activation) != n_links:
            raise ValueError(
                f"activation has {len(activation)} entries, expected {n_links} (one per link "
                "between consecutive layers), or pass a single callable."
            )
        return tuple(activation)
    raise TypeError(
        f"activation must be a callable such as jax.nn.relu or a sequence of them, got "
        f"{type(activation).__name__}."
    )


def _check_masks(params: PyTree, masks: PyTree, chain: Sequence[_Layer], *, name: str) -> None:
    del chain  # every leaf's mask is checked, the chain's included
    check_masks(params, masks, name=name)


# ---------------------------------------------------------------------------------------------
# A link between layer i and i + 1, seen unit by unit


def _unit_major(kernel: np.ndarray, n: int, conv: bool) -> np.ndarray:
    """The next layer's kernel as ``(n, positions, out)``: each unit's outgoing weights.

    Dense: ``(n, out)``; conv: ``(*window, n, out)``; dense after a flatten of ``(H, W, n)``:
    ``(H * W * n, out)`` with the channel varying fastest (row-major).
    """
    if conv:
        return np.moveaxis(kernel, -2, 0).reshape(n, -1, kernel.shape[-1])
    return kernel.reshape(-1, n, kernel.shape[-1]).transpose(1, 0, 2)


def _take_inputs(kernel: np.ndarray, index: Any, n: int, conv: bool) -> np.ndarray:
    if conv:
        return kernel[..., index, :]
    out = kernel.reshape(-1, n, kernel.shape[-1])[:, index, :]
    return out.reshape(-1, kernel.shape[-1])


def _set_inputs(kernel: np.ndarray, index: Any, n: int, conv: bool, value: Any) -> np.ndarray:
    kernel = kernel.copy()
    if conv:
        kernel[..., index, :] = value
        return kernel
    view = kernel.reshape(-1, n, kernel.shape[-1])
    view[:, index, :] = value
    return view.reshape(kernel.shape)


class _Chain(NamedTuple):
    """The chain's arrays, as host NumPy copies (shapes change, so nothing here is traced)."""

    kernels: list[np.ndarray]
    biases: list[np.ndarray | None]
    kernel_masks: list[np.ndarray]
    bias_masks: list[np.ndarray | None]


def _gather(chain: Sequence[_Layer], params: PyTree, masks: PyTree | None) -> _Chain:
    p = dict(leaves_with_paths(params))
    m = dict(leaves_with_paths(masks)) if masks is not None else {}

    def mask(path: str) -> np.ndarray:
        return np.array(m[path], dtype=bool) if path in m else np.ones(p[path].shape, bool)

    kernels: list[np.ndarray] = []
    kmasks: list[np.ndarray] = []
    biases: list[np.ndarray | None] = []
    bmasks: list[np.ndarray | None] = []
    for layer in chain:
        km = mask(layer.kernel)
        kernels.append(np.where(km, np.asarray(p[layer.kernel]), 0).astype(p[layer.kernel].dtype))
        kmasks.append(km)
        if layer.bias is None:
            biases.append(None)
            bmasks.append(None)
        else:
            bm = mask(layer.bias)
            biases.append(np.where(bm, np.asarray(p[layer.bias]), 0).astype(p[layer.bias].dtype))
            bmasks.append(bm)
    return _Chain(kernels, biases, kmasks, bmasks)


def _rebuild(tree: PyTree, new_of: dict[str, Any]) -> PyTree:
    """``tree`` with the leaves named in ``new_of`` replaced (NNX Variable wrappers are kept)."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
    return jax.tree_util.tree_unflatten(
        treedef, [new_of.get(path_str(keypath), leaf) for keypath, leaf in flat]
    )


def _size(a: np.ndarray | None) -> int:
    return 0 if a is None else int(a.size)
