"""How sparse inference gets inside a Flax model: per-layer hooks for Linen and NNX.

Flax gives ``Dense``/``Linear`` and ``Conv`` layers a hook for their product (``dot_general`` /
``conv_general_dilated``). A Linen model is run under ``nn.intercept_methods``, which swaps the
hook on the bound clone of each layer holding a pruned kernel; an NNX model is merged into a copy
whose layers get the hook as an attribute. Either way the user's model is left untouched, and each
hook hands the layer's input to ``step``, which runs the product in the layout chosen for it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental.sparse import BCOO

from jaxprune import _kernels
from jaxprune._tree import PyTree, path_str


def is_bcoo(leaf: Any) -> bool:
    return isinstance(leaf, BCOO)


def bcoo_paths(tree: PyTree) -> list[tuple[str, Any]]:
    flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_bcoo)
    return [(path_str(p), leaf) for p, leaf in flat]


class Call(NamedTuple):
    """What a layer's product was called with, as seen while tracing the model."""

    rows: int  # rows of the 2-D product (batch x spatial positions for a convolution)
    run: Callable[[str, Any, jax.Array], jax.Array]  # run(format, layout, lhs)
    lhs: jax.ShapeDtypeStruct


def _check_linear_dims(module_path: str, lhs: jax.Array, rhs: jax.Array, dims: Any) -> None:
    (lc, rc), (lb, rb) = dims
    if tuple(lc) != (lhs.ndim - 1,) or tuple(rc) != (0,) or lb or rb or rhs.ndim != 2:
        raise ValueError(
            f"layer {module_path!r} calls dot_general with dimension numbers {dims}; the sparse "
            "path runs only x @ kernel over the last axis of x (flax Dense / nnx.Linear)."
        )


def _linear_hook(module_path: str, step: Callable) -> Callable:
    """A ``dot_general`` stand-in that ignores the placeholder kernel and calls ``step``."""

    def dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, **_):
        del precision
        _check_linear_dims(module_path, lhs, rhs, dimension_numbers)

        def run(fmt: str, layout: Any, x: jax.Array) -> jax.Array:
            flat = x.reshape(-1, x.shape[-1]).astype(jnp.result_type(lhs, rhs))
            return _kernels.matmul(fmt, layout, flat).reshape(*x.shape[:-1], -1)

        rows = int(np.prod(lhs.shape[:-1]))
        out = step(Call(rows, run, jax.ShapeDtypeStruct(lhs.shape, lhs.dtype)), lhs)
        return out if preferred_element_type is None else out.astype(preferred_element_type)

    return dot_general


def _channel_last_dims(ndim: int) -> jax.lax.ConvDimensionNumbers:
    spatial = tuple(range(1, ndim - 1))
    return jax.lax.ConvDimensionNumbers(
        lhs_spec=(0, ndim - 1, *spatial),
        rhs_spec=(ndim - 1, ndim - 2, *range(ndim - 2)),
        out_spec=(0, ndim - 1, *spatial),
    )


def _conv_hook(module_path: str, step: Callable) -> Callable:
    """A ``conv_general_dilated`` stand-in: patches times the sparse kernel matrix."""

    def conv(
        lhs,
        rhs,
        window_strides,
        padding,
        lhs_dilation=None,
        rhs_dilation=None,
        dimension_numbers=None,
        feature_group_count=1,
        batch_group_count=1,
        precision=None,
        preferred_element_type=None,
        **_,
    ):
        del precision
        n_sp = lhs.ndim - 2
        dims = jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
        if (
            feature_group_count != 1
            or batch_group_count != 1
            or dims != _channel_last_dims(lhs.ndim)
        ):
            raise ValueError(
                f"layer {module_path!r} is a grouped or non-channel-last convolution "
                f"(feature_group_count={feature_group_count}, dimension numbers {dims}); the "
                "sparse path runs only ungrouped channel-last convolutions."
            )
        lhs_dilation = tuple(lhs_dilation or (1,) * n_sp)
        rhs_dilation = tuple(rhs_dilation or (1,) * n_sp)
        strides = tuple(window_strides)
        kernel_shape = tuple(rhs.shape)

        def run(fmt: str, layout: Any, x: jax.Array) -> jax.Array:
            x = x.astype(jnp.result_type(lhs, rhs))
            if fmt == "dense":  # XLA's own convolution beats any patches route for dense weights
                kernel = layout["w"].reshape(kernel_shape).astype(x.dtype)
                return jax.lax.conv_general_dilated(
                    x, kernel, strides, padding, lhs_dilation, rhs_dilation, dims
                )
            patches = _kernels.im2col(
                x, kernel_shape[:-2], strides, padding, lhs_dilation, rhs_dilation
            )
            flat = patches.reshape(-1, patches.shape[-1])
            return _kernels.matmul(fmt, layout, flat).reshape(*patches.shape[:-1], -1)

        out_shape = jax.eval_shape(
            lambda a, b: jax.lax.conv_general_dilated(
                a, b, strides, padding, lhs_dilation, rhs_dilation, dims
            ),
            lhs,
            rhs,
        ).shape
        rows = int(np.prod(out_shape[:-1]))
        out = step(Call(rows, run, jax.ShapeDtypeStruct(lhs.shape, lhs.dtype)), lhs)
        return out if preferred_element_type is None else out.astype(preferred_element_type)

    return conv


def _unsupported(module_path: str, module: Any, names: set[str]) -> ValueError:
    return ValueError(
        f"layer {module_path or '<root>'!r} ({type(module).__name__}) holds pruned weights "
        f"{sorted(names)} but the sparse path runs only the kernels of flax Dense/nnx.Linear and "
        "Conv layers (without a `mask` field). Export it dense: pass to_bcoo a `where` that "
        "excludes it."
    )


def _hook_name(module: Any, names: set[str]) -> str | None:
    """Which Flax hook runs this module's pruned kernel, or None when none can."""
    if names != {"kernel"}:
        return None
    if isinstance(module, (nn.Dense, nnx.Linear)):
        return "dot_general"
    if isinstance(module, (nn.Conv, nnx.Conv)) and getattr(module, "mask", None) is None:
        return "conv_general_dilated"
    return None


def _make_hook(hook: str, module_path: str, step: Callable) -> Callable:
    return (_linear_hook if hook == "dot_general" else _conv_hook)(module_path, step)


def split_path(path: str) -> tuple[str, str]:
    head, _, name = path.rpartition("/")
    return head, name


def linen_runner(
    model: nn.Module, exported: PyTree, owned: dict[str, set[str]], variables, apply_kwargs
) -> tuple[PyTree, Callable]:
    """The variables to pass, and ``run(variables, step_for, x)`` applying ``model`` with hooks."""

    def run(tree: PyTree, step_for: Callable, x: jax.Array) -> jax.Array:
        def interceptor(next_fun, args, kwargs, context):
            module = context.module
            module_path = "/".join(module.path)
            if module_path not in owned:
                return next_fun(*args, **kwargs)
            hook = _hook_name(module, owned[module_path])
            if hook is None or context.method_name != "__call__":
                raise _unsupported(module_path, module, owned[module_path])
            # The bound module is apply's private clone: swapping its hook leaves `model` alone.
            saved = {hook: getattr(module, hook), f"{hook}_cls": getattr(module, f"{hook}_cls")}
            object.__setattr__(module, hook, _make_hook(hook, module_path, step_for(module_path)))
            object.__setattr__(module, f"{hook}_cls", None)
            try:
                return next_fun(*args, **kwargs)
            finally:
                for name, value in saved.items():
                    object.__setattr__(module, name, value)

        with nn.intercept_methods(interceptor):
            return model.apply(tree, x, **apply_kwargs)

    return {**variables, "params": exported}, run


def nnx_runner(
    model: nnx.Module, exported: PyTree, owned: dict[str, set[str]], apply_kwargs
) -> tuple[PyTree, Callable]:
    """The states to pass, and ``run(states, step_for, x)`` calling a hooked copy of ``model``."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    want = {p: tuple(np.shape(v)) for p, v in bcoo_paths(params)}
    got = {p: tuple(v.shape) for p, v in bcoo_paths(exported)}
    for path in sorted(set(want) | set(got)):
        if want.get(path) != got.get(path):
            raise ValueError(
                f"exported[{path!r}] has shape {got.get(path)} but the model's param there has "
                f"shape {want.get(path)}; export nnx.state(model, nnx.Param) of this model."
            )
    modules = {"/".join(map(str, p)): m for p, m in nnx.iter_graph(model)}
    training = [
        f"{path or '<root>'} ({type(m).__name__})"
        for path, m in modules.items()
        if getattr(m, "deterministic", None) is False
        or getattr(m, "use_running_average", None) is False
    ]
    if training:
        raise ValueError(
            f"the NNX model is in train mode: {training[:5]} would drop units or use batch "
            "statistics at inference. Call model.eval() before sparse_apply."
        )
    hooks = {}
    for module_path, names in owned.items():
        hook = _hook_name(modules.get(module_path), names)
        if hook is None:
            raise _unsupported(module_path, modules.get(module_path), names)
        hooks[module_path] = hook

    def run(states: PyTree, step_for: Callable, x: jax.Array) -> jax.Array:
        merged = nnx.merge(graphdef, *states)
        found = {"/".join(map(str, p)): m for p, m in nnx.iter_graph(merged)}
        for module_path, hook in hooks.items():
            setattr(found[module_path], hook, _make_hook(hook, module_path, step_for(module_path)))
        return merged(x, **apply_kwargs)

    return (exported, rest), run
