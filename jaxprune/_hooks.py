"""How sparse inference gets inside a Flax model: per-layer hooks for Linen and NNX.

Flax gives ``Dense``/``DenseGeneral`` (``nnx.Linear``/``LinearGeneral``) and ``Conv`` layers a
hook for their product (``dot_general`` / ``conv_general_dilated``) and ``nnx.Einsum`` its
``einsum_op``. A Linen model runs under ``nn.intercept_methods``: the interceptor swaps the hook on
the bound clone of each layer holding a pruned kernel, and computes ``nn.Einsum`` (which calls
``jnp.einsum`` directly) and ``nn.Embed``'s ``__call__``/``attend`` itself. An NNX model is merged
into a copy whose layers get the hook as an attribute; NNX has no method interception, so each
pruned ``nnx.Embed`` of the copy gets a subclass whose ``__call__``/``attend`` run the sparse
table (swapping its class keeps every reference to it, a tied output head included). The user's
model is left untouched.

Scan-stacked kernels: inside a scan body a layer sees one slice and cannot know its index, so the
placeholder carries it. A Linen layer keeps its zeros kernel (Linen checks its shape) and gets a
leaf ``<name>@slice`` holding ``arange(L)`` beside it, which ``nn.scan`` slices with the params;
an NNX layer's kernel ``Param`` becomes ``arange(L)`` itself (in the kernel's dtype, so that
``promote_dtype`` promotes as before), which ``nnx.scan`` slices.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, traverse_util
from jax.experimental.sparse import BCOO

from jaxprune import _products
from jaxprune._tree import PyTree, path_str

SLICE = "@slice"  # suffix of the Linen leaf holding a stacked kernel's slice index


def is_bcoo(leaf: Any) -> bool:
    return isinstance(leaf, BCOO)


def bcoo_paths(tree: PyTree) -> list[tuple[str, Any]]:
    flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_bcoo)
    return [(path_str(p), leaf) for p, leaf in flat]


def split_path(path: str) -> tuple[str, str]:
    head, _, name = path.rpartition("/")
    return head, name


def _join(module_path: str, name: str) -> str:
    return f"{module_path}/{name}" if module_path else name


def _unsupported(module_path: str, module: Any, names: set[str]) -> ValueError:
    return ValueError(
        f"layer {module_path or '<root>'!r} ({type(module).__name__}) holds pruned weights "
        f"{sorted(names)} but the sparse path runs only the kernels of flax Dense/DenseGeneral "
        "(nnx.Linear/LinearGeneral), Einsum and Conv layers (without a `mask` field) and the "
        "tables of Embed layers. Export it dense: pass to_bcoo a `where` that excludes it."
    )


def hook_kind(module: Any, names: set[str]) -> str | None:
    """Which stand-in runs this module's pruned weight, or None when none can."""
    if isinstance(module, (nn.Embed, nnx.Embed)):
        return "embed" if names == {"embedding"} else None
    if names != {"kernel"}:
        return None
    if isinstance(module, (nn.Dense, nn.DenseGeneral, nnx.Linear, nnx.LinearGeneral)):
        return "dot_general"
    if isinstance(module, (nn.Conv, nnx.Conv)) and getattr(module, "mask", None) is None:
        return "conv_general_dilated"
    if isinstance(module, (nn.Einsum, nnx.Einsum)):
        return "einsum"
    return None


class Kernels(NamedTuple):
    """What the runners know of the pruned kernels: shapes, and which are stacked (axis 0)."""

    shapes: Mapping[str, tuple[int, ...]]
    stacked: frozenset[str]

    def seen_shape(self, path: str) -> tuple[int, ...]:
        """The kernel shape the layer multiplies: one slice of a stacked kernel."""
        shape = self.shapes[path]
        return shape[1:] if path in self.stacked else shape


def _whole_check(path: str, shape: tuple, seen: tuple) -> None:
    if seen == shape:
        return
    hint = (
        "its layer runs under nn.scan / nnx.scan: pass sparse_apply stacked={pattern: 0} "
        "naming it, as compute_masks got."
        if seen == shape[1:]
        else "export the params of this very model."
    )
    raise ValueError(
        f"the layer of exported[{path!r}] multiplies a kernel of shape {seen}, but the exported "
        f"kernel has shape {shape}; {hint}"
    )


def _slice_error(path: str, shape: tuple, seen: Any) -> ValueError:
    return ValueError(
        f"stacked= names exported[{path!r}] (shape {shape}, layers along axis 0), but its layer "
        f"multiplies {seen}, not one slice of shape {shape[1:]}: it does not run under nn.scan / "
        "nnx.scan over axis 0. Drop it from stacked."
    )


def _embed(kind: str, path: str, shape: tuple, step, table, promote, dtype, x) -> jax.Array:
    """``Embed.__call__`` (``kind='__call__'``) or ``Embed.attend`` on the pruned table."""
    if kind == "__call__":
        if not jnp.issubdtype(x.dtype, jnp.integer):
            raise ValueError("Input type must be an integer or unsigned integer.")
        (emb,) = promote(table, dtype=dtype, inexact=False)
        ids = jnp.zeros_like(x) if shape[0] == 1 else x  # Flax broadcasts a one-row table
        return _products.lookup(path, shape, ids, emb.dtype, step.fn, step.index(table))
    query, emb = promote(x, table, dtype=dtype)
    out_dtype = jnp.result_type(query, emb)
    axes = (query.ndim - 1,)
    return _products.product(path, shape, query, axes, (1,), out_dtype, step.fn, step.index(table))


class _Step(NamedTuple):
    """A layer's ``step`` and ``index(placeholder)``, which checks the placeholder it got."""

    fn: _products.Step
    index: Callable[[Any], Any]  # type: ignore[assignment]  # a field named like tuple.index


def _linen_index(module: nn.Module, path: str, name: str, kernels: Kernels) -> Callable:
    shape = kernels.shapes[path]

    def index(placeholder: Any) -> Any:
        seen = tuple(placeholder.shape)
        if path not in kernels.stacked:
            _whole_check(path, shape, seen)
            return None
        slice_index: Any = module.get_variable("params", name + SLICE)
        if np.ndim(slice_index) != 0 or seen != shape[1:]:
            raise _slice_error(path, shape, f"a kernel of shape {seen}")
        return slice_index

    return index


def _linen_with_slices(params: PyTree, kernels: Kernels) -> PyTree:
    """``params`` with an ``arange(L)`` leaf beside each stacked kernel (sliced by nn.scan)."""
    if not kernels.stacked:
        return params
    flat = traverse_util.flatten_dict(params, sep="/")
    for path in kernels.stacked:
        flat[path + SLICE] = jnp.arange(kernels.shapes[path][0])
    return traverse_util.unflatten_dict(flat, sep="/")


def _check_linen_stack(model, kernels: Kernels, x, apply_kwargs) -> None:
    """Compares the stacked kernels with the shapes ``model.init`` gives, naming a mismatch."""
    rngs = {"params": jax.random.key(0)}
    init = jax.eval_shape(functools.partial(model.init, **apply_kwargs), rngs, x)
    want = {p: tuple(v.shape) for p, v in bcoo_paths(init.get("params", {}))}
    for path in sorted(kernels.stacked):
        if want.get(path) != kernels.shapes[path]:
            raise ValueError(
                f"exported[{path!r}] has shape {kernels.shapes[path]} but the model's stacked "
                f"param there has shape {want.get(path)}; export the params of this very model "
                "(same number of scanned layers)."
            )


def linen_runner(
    model: nn.Module, exported: PyTree, kernels: Kernels, variables, apply_kwargs
) -> tuple[PyTree, Callable]:
    """The variables to pass, and ``run(variables, step_for, x)`` applying ``model`` with hooks."""
    owned: dict[str, set[str]] = {}
    for path in kernels.shapes:
        module_path, name = split_path(path)
        owned.setdefault(module_path, set()).add(name)

    def run(tree: PyTree, step_for: Callable, x: jax.Array) -> Any:
        def interceptor(next_fun, args, kwargs, context):
            module = context.module
            module_path = "/".join(module.path)
            if module_path not in owned or context.method_name == "setup":
                return next_fun(*args, **kwargs)
            names = owned[module_path]
            kind = hook_kind(module, names)
            methods = ("__call__", "attend") if kind == "embed" else ("__call__",)
            if kind is None or context.method_name not in methods:
                raise _unsupported(module_path, module, names)
            (name,) = names
            path = _join(module_path, name)
            step = _Step(step_for(path), _linen_index(module, path, name, kernels))
            shape = kernels.seen_shape(path)
            if kind == "embed":
                table = module.get_variable("params", "embedding")
                x = args[0] if args else next(iter(kwargs.values()))
                promote, dtype = module.promote_dtype, module.dtype
                return _embed(context.method_name, path, shape, step, table, promote, dtype, x)
            if kind == "einsum":
                return _linen_einsum(module, path, shape, step, *args, **kwargs)
            # The bound module is apply's private clone: swapping its hook leaves `model` alone.
            saved = {kind: getattr(module, kind), f"{kind}_cls": getattr(module, f"{kind}_cls")}
            object.__setattr__(module, kind, _hook(kind, path, shape, step, module))
            object.__setattr__(module, f"{kind}_cls", None)
            try:
                return next_fun(*args, **kwargs)
            finally:
                for attr, value in saved.items():
                    object.__setattr__(module, attr, value)

        if kernels.stacked:
            _check_linen_stack(model, kernels, x, apply_kwargs)
        params = _linen_with_slices(tree["params"], kernels)
        with nn.intercept_methods(interceptor):
            return model.apply({**tree, "params": params}, x, **apply_kwargs)

    return {**variables, "params": exported}, run


def _linen_einsum(module: nn.Einsum, path, shape, step: _Step, inputs, einsum_str=None):
    """``nn.Einsum.__call__`` with the sparse kernel (Linen's Einsum has no product hook)."""
    equation = nn.merge_param("einsum_str", module.einsum_str, einsum_str).replace(" ", "")
    kernel: Any = module.get_variable("params", "kernel")
    bias = module.get_variable("params", "bias") if module.use_bias else None
    inputs, kernel, bias = module.promote_dtype(inputs, kernel, bias, dtype=module.dtype)
    hook = _products.einsum(path, shape, step.fn, step.index)
    y = hook(equation, inputs, kernel, preferred_element_type=module.preferred_element_type)
    if bias is not None:
        y += jnp.reshape(bias, module._get_bias_shape(equation, inputs, kernel)[1])
    return y


@functools.cache
def _sparse_embed_class(cls: type) -> type:
    """A subclass of an ``nnx.Embed`` class whose lookups and ``attend`` run the sparse table."""

    def __call__(self, inputs, out_sharding=None):
        del out_sharding
        return self.jaxprune_embed(self, "__call__", inputs)

    def attend(self, query, out_sharding=None):
        del out_sharding
        return self.jaxprune_embed(self, "attend", query)

    return type(cls)(f"Sparse{cls.__name__}", (cls,), {"__call__": __call__, "attend": attend})


def _nnx_index(path: str, kernels: Kernels) -> Callable:
    shape = kernels.shapes[path]

    def index(placeholder: Any) -> Any:
        if path not in kernels.stacked:
            _whole_check(path, shape, tuple(placeholder.shape))
            return None
        if placeholder.ndim != 0:
            raise _slice_error(path, shape, f"the whole stack of {shape[0]} layers")
        return placeholder.astype(jnp.int32)  # arange(L) as the layer promoted it

    return index


def _exact_limit(module: Any, dtype: Any) -> int:
    """The largest slice index the placeholder carries exactly through ``promote_dtype``."""
    dtypes = [jnp.dtype(d) for d in (dtype, getattr(module, "dtype", None)) if d is not None]
    return min(2 ** (jnp.finfo(d).nmant + 1) for d in dtypes if jnp.issubdtype(d, jnp.floating))


def _install(kind: str, module: Any, path: str, shape: tuple, step: _Step) -> None:
    """Puts the stand-in for ``kind`` on a module of the merged NNX copy."""
    if kind == "embed":
        module.__class__ = _sparse_embed_class(type(module))  # type: ignore[arg-type]
        # Takes the module as an argument: nnx.scan may rebuild it from the graph.
        module.jaxprune_embed = lambda mod, method, x: _embed(
            method, path, shape, step, mod.embedding[...], _nnx_promote(mod), mod.dtype, x
        )
        return
    if kind == "einsum":
        module.einsum_op = _products.einsum(path, shape, step.fn, step.index)
        return
    setattr(module, kind, _hook(kind, path, shape, step, module))
    if getattr(module, f"{kind}_cls", None) is not None:
        setattr(module, f"{kind}_cls", None)


def _hook(kind: str, path: str, shape: tuple, step: _Step, module: Any) -> Callable:
    """The stand-in for a Dense/Conv layer's product; a Conv keeps its own for dense plans."""
    if kind == "dot_general":
        return _products.dot_general(path, shape, step.fn, step.index)
    cls = getattr(module, "conv_general_dilated_cls", None)
    own = cls() if cls is not None else getattr(module, kind, None)
    return _products.conv(path, shape, step.fn, step.index, own or jax.lax.conv_general_dilated)


def _nnx_promote(module: Any) -> Callable:
    """NNX's ``promote_dtype(tuple, dtype=...)`` with Linen's ``promote_dtype(*arrays, ...)``."""
    return lambda *arrays, **kwargs: module.promote_dtype(arrays, **kwargs)


def _nnx_check(model: nnx.Module, params: PyTree, exported: PyTree) -> dict[str, Any]:
    """The model's modules by path, after checking shapes and eval mode."""
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
    return modules


def nnx_runner(
    model: nnx.Module, exported: PyTree, kernels: Kernels, dtypes: Mapping[str, Any], apply_kwargs
) -> tuple[PyTree, Callable]:
    """The states to pass, and ``run(states, step_for, x)`` calling a hooked copy of ``model``."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)  # type: ignore[misc]  # stub: 2 states
    modules = _nnx_check(model, params, exported)
    kinds: dict[str, str] = {}
    for path in kernels.shapes:
        module_path, name = split_path(path)
        module = modules.get(module_path)
        kind = hook_kind(module, {name})
        if kind is None:
            raise _unsupported(module_path, module, {name})
        kinds[path] = kind
        if path in kernels.stacked and kernels.shapes[path][0] > _exact_limit(module, dtypes[path]):
            raise ValueError(
                f"exported[{path!r}] stacks {kernels.shapes[path][0]} layers, more than the "
                f"{_exact_limit(module, dtypes[path])} whose index its dtype holds exactly."
            )

    def placeholder(keypath: tuple, leaf: Any) -> Any:
        path = path_str(keypath)
        if path in kernels.stacked:
            return jnp.arange(kernels.shapes[path][0]).astype(leaf.dtype)
        return leaf

    def run(states: PyTree, step_for: Callable, x: jax.Array) -> jax.Array:
        params, rest = states
        merged = nnx.merge(graphdef, jax.tree_util.tree_map_with_path(placeholder, params), rest)
        found = {"/".join(map(str, p)): m for p, m in nnx.iter_graph(merged)}
        for path, kind in kinds.items():
            step = _Step(step_for(path), _nnx_index(path, kernels))
            _install(kind, found[split_path(path)[0]], path, kernels.seen_shape(path), step)
        return merged(x, **apply_kwargs)

    return (exported, rest), run
