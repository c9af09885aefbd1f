"""The compiled sparse forward pass: a layout per product and input shape, one jit per shape.

Built by :func:`jaxprune.sparse.sparse_apply`. The first call for an input shape traces the model
abstractly to see every product of a pruned kernel (:mod:`jaxprune._hooks`), picks a layout for
each (rule, calibration or forced), builds the layouts it lacks and compiles.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune import _layouts
from jaxprune._hooks import is_bcoo
from jaxprune._products import Call
from jaxprune._tree import PyTree

FormatSpec = str | Mapping[str, str]

# Weights up to this size are compiled into the executable as constants. Passed as arguments, each
# array costs the call about 0.7 us: 54 arrays made a small NNX Transformer 1.6x slower than its
# dense jit at batch 1 (98 vs 57 us, the same layouts), and as constants they ran in 58 us.
EMBED_BYTES = 1 << 24


def _nbytes(leaves: list) -> int:
    return sum(leaf.nbytes for leaf in jax.tree.leaves(leaves))


def _format_for(formats: FormatSpec, path: str) -> str | None:
    """The format forced by ``formats`` for kernel ``path``, or None for the automatic choice."""
    if isinstance(formats, str):
        return None if formats in ("auto", "calibrate") else formats
    return formats.get(path)


def _median_time(fn: Callable, *args: Any, repeats: int = 7) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return float(np.median(times))


class _Prepared(NamedTuple):
    """What one input shape runs with: its plan, its compiled pass and that pass's layouts."""

    plan: dict[tuple[str, str], str]  # (path, use) -> format
    layouts: list  # flat leaves of the layouts the plan uses
    fn: Callable[[jax.Array], jax.Array]
    keys: frozenset  # the layout cache keys it uses


def _labels(uses: list[tuple[str, str]]) -> dict[tuple[str, str], str]:
    """Plan keys: the kernel path, or ``'path (use)'`` for a kernel with several uses."""
    paths = [path for path, _ in uses]
    return {(p, u): p if paths.count(p) == 1 else f"{p} ({u})" for p, u in uses}


class SparseApply:
    """A jit-compiled forward pass of a pruned Flax model; built by :func:`sparse_apply`.

    Call it as ``apply(x)``. The first call for a new input shape and dtype traces the model once
    to see each pruned layer's product, picks a layout per product, builds the layouts it lacks
    and compiles; later calls with that shape reuse the executable.
    """

    def __init__(
        self,
        tree: PyTree,
        runner: Callable,
        kernels: dict[str, _layouts.Entries],
        stacked: frozenset[str],
        formats: FormatSpec,
    ):
        self._runner = runner
        self._kernels = kernels
        self._stacked = stacked
        self._formats = formats
        # Flatten once: NNX states and BCOO flatten in Python, which would cost every call.
        leaves, self._treedef = jax.tree_util.tree_flatten(tree, is_leaf=is_bcoo)
        self._leaves = [None if is_bcoo(leaf) else leaf for leaf in leaves]
        self._zeros = [
            jax.ShapeDtypeStruct(leaf.shape, leaf.dtype) if is_bcoo(leaf) else None
            for leaf in leaves
        ]
        self._layouts: dict[tuple[str, tuple, str], Any] = {}
        self._prepared: dict[tuple, _Prepared] = {}

    def _tree(self, leaves: list) -> PyTree:
        # Flax reads a kernel of the pruned shape; the hooks ignore it, so XLA drops these zeros.
        full = [
            leaf if spec is None else jnp.zeros(spec.shape, spec.dtype)
            for leaf, spec in zip(leaves, self._zeros, strict=True)
        ]
        return jax.tree_util.tree_unflatten(self._treedef, full)

    def _forward(self, plan, layout_def, leaves, layout_leaves, x):
        layouts = layout_def.unflatten(layout_leaves)

        def step_for(path: str) -> Callable:
            def step(call: Call, lhs: jax.Array, index: Any) -> jax.Array:
                layout = layouts[(path, call.use)]
                if index is not None:  # one slice of a scan-stacked kernel
                    layout = jax.tree.map(lambda a: a[index], layout)
                return call.run(plan[(path, call.use)], layout, lhs)

            return step

        return self._runner(self._tree(leaves), step_for, x)

    def _calls(self, x: jax.ShapeDtypeStruct) -> dict[tuple[str, str], Call]:
        """Traces the model abstractly, recording each pruned kernel's products by use."""
        calls: dict[tuple[str, str], Call] = {}

        def step_for(path: str) -> Callable:
            def step(call: Call, lhs: jax.Array, index: Any) -> jax.Array:
                del index
                key = (path, call.use)
                if key not in calls or call.rows > calls[key].rows:
                    calls[key] = call
                entries = self._kernels[path]
                shape = (
                    entries.slices()[0].matrix(call.contract)
                    if path in self._stacked
                    else (entries.matrix(call.contract))
                )
                return call.run("dense", {"w": jnp.zeros(shape, entries.vals.dtype)}, lhs)

            return step

        jax.eval_shape(lambda lv, a: self._runner(self._tree(lv), step_for, a), self._leaves, x)
        return calls

    def _layout(self, call: Call, fmt: str) -> Any:
        key = _layout_key(call, fmt)
        contract = key[1]
        if key not in self._layouts:
            entries = self._kernels[call.path]
            if call.path in self._stacked:
                parts = [part.view(contract)[:3] for part in entries.slices()]
                shape = entries.slices()[0].matrix(contract)
                self._layouts[key] = _layouts.build_stacked(fmt, parts, shape)
            else:
                self._layouts[key] = _layouts.build(fmt, *entries.view(contract))
        return self._layouts[key]

    def _calibrated(self, call: Call) -> str:
        """The format measured fastest for one product (``_layouts.calibrated``)."""
        entries = self._kernels[call.path]
        if jnp.issubdtype(call.lhs.dtype, jnp.integer):  # token ids of a lookup
            lhs = jax.random.randint(jax.random.key(0), call.lhs.shape, 0, entries.shape[-2])
        else:
            lhs = jax.random.normal(jax.random.key(0), call.lhs.shape, call.lhs.dtype)
        times = {}
        for fmt in _layouts.calibration_candidates(entries, call.rows, call.contract):
            layout = self._layout(call, fmt)
            if call.path in self._stacked:
                layout = jax.tree.map(lambda a: a[0], layout)
            times[fmt] = _median_time(jax.jit(functools.partial(call.run, fmt)), layout, lhs)
        return _layouts.calibrated(times)

    def _rule(self, calls: dict[tuple[str, str], Call]) -> dict[tuple[str, str], str]:
        """The automatic choice: ``_layouts.choose_plan`` on each product's 2-D view."""
        return _layouts.choose_plan(
            {
                key: _layouts.Product(
                    self._kernels[call.path].density,
                    call.rows,
                    self._kernels[call.path].matrix(call.contract),
                    call.use if call.use in ("conv", "lookup") else "matmul",
                    call.path in self._stacked,
                    _compute_dtype(call, self._kernels[call.path]),
                )
                for key, call in calls.items()
            }
        )

    def _compile(self, key: tuple) -> _Prepared:
        calls = self._calls(jax.ShapeDtypeStruct(*key))
        rule = self._rule(calls)
        plan = {}
        for use, call in sorted(calls.items()):
            forced = _format_for(self._formats, call.path)
            if forced is not None:
                plan[use] = forced
            elif self._formats == "calibrate":
                plan[use] = self._calibrated(call)
            else:
                plan[use] = rule[use]
        layouts = {use: self._layout(calls[use], fmt) for use, fmt in plan.items()}
        layout_leaves, layout_def = jax.tree_util.tree_flatten(layouts)
        forward = functools.partial(self._forward, plan, layout_def)
        if _nbytes(self._leaves) + _nbytes(layout_leaves) <= EMBED_BYTES:
            leaves = self._leaves
            fn = jax.jit(lambda x: forward(leaves, layout_leaves, x))
        else:
            jitted = jax.jit(forward)
            fn = lambda x: jitted(self._leaves, layout_leaves, x)  # type: ignore[assignment]  # noqa: E731
        keys = frozenset(_layout_key(calls[use], fmt) for use, fmt in plan.items())
        self._prepared[key] = _Prepared(plan, layout_leaves, fn, keys)
        used = set().union(*(prepared.keys for prepared in self._prepared.values()))
        self._layouts = {k: v for k, v in self._layouts.items() if k in used}  # calibration spares
        return self._prepared[key]

    def _get(self, x: Any) -> _Prepared:
        key = (tuple(x.shape), jnp.dtype(x.dtype))
        prepared = self._prepared.get(key)
        return self._compile(key) if prepared is None else prepared

    def plan(self, x: Any) -> dict[str, str]:
        """The layout each pruned kernel uses for inputs shaped like ``x``.

        Args:
          x: an input array (or anything with ``shape`` and ``dtype``).

        Returns:
          A dict from kernel path (e.g. ``'Dense_0/kernel'``) to one of ``'dense'``, ``'bcoo'``,
          ``'bcsr'``, ``'ell'``, ``'csr'``. A kernel with several uses (an embedding table looked up and
          attended to as a tied output head) has one entry per use: ``'embed/embedding
          (lookup)'``, ``'embed/embedding (axes 1)'`` (the kernel axes a product contracts).
        """
        plan = self._get(x).plan
        labels = _labels(list(plan))
        return {labels[use]: fmt for use, fmt in plan.items()}

    def nbytes(self, x: Any) -> int:
        """Bytes of the weight layouts the pruned kernels use for inputs shaped like ``x``."""
        return sum(leaf.nbytes for leaf in self._get(x).layouts)

    def __call__(self, x: Any) -> jax.Array:
        """Runs the model on ``x``; equal to the masked dense model's output up to rounding."""
        if not isinstance(x, jax.Array):
            x = jnp.asarray(x)
        prepared = self._prepared.get((x.shape, x.dtype)) or self._get(x)
        return prepared.fn(x)


def _layout_key(call: Call, fmt: str) -> tuple[str, tuple[int, ...], str]:
    """``(path, contracted axes, format)``: the layouts a kernel's products share."""
    # A lookup's gather layout is the one of the table's transpose: a padded row per token.
    contract = (1,) if call.use == "lookup" and fmt == "ell" else call.contract
    return (call.path, contract, fmt)


def _compute_dtype(call: Call, entries: _layouts.Entries) -> str:
    """The dtype a product computes in, as Flax's layers do by default: the input's and the
    kernel's promoted (a lookup's is the table's)."""
    if call.use == "lookup":
        return str(entries.vals.dtype)
    return str(jnp.result_type(call.lhs.dtype, entries.vals.dtype))
