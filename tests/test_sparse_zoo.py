"""Sparse inference on the layers Transformers and CNNs use: the zoo, DenseGeneral, Einsum, Embed, scan."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import count_compiles
from jax.experimental.sparse import BCOO
from zoo import zoo

import jaxprune
from jaxprune import _native
from jaxprune.sparse import sparse_apply, to_bcoo

# The zoo's models are user-style Flax code: `x + pos_embedding` broadcasts over the batch.
pytestmark = pytest.mark.standard_promotion

NAMES = [
    # The ResNet's convolutions compile slowly: its run is in CI's second (slow) step.
    pytest.param("linen_resnet", marks=pytest.mark.slow),
    "linen_transformer",
    "linen_transformer_scan",
    "nnx_cnn",
    "nnx_transformer",
    "nnx_transformer_scan",
]
# Every layout, forced; 'csr' only where the native kernel could be built here.
FORCED = ("bcoo", "bcsr", "ell", *(("csr",) if _native.available() else ()))


def _assert_close(got, want):
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape and got.dtype == want.dtype
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def _pruned(model, sparsity=0.7):
    masks = jaxprune.masks_for_sparsity(model.params, sparsity, stacked=model.stacked)
    exported = to_bcoo(model.params, masks)
    return exported, model.apply(jaxprune.apply_masks(model.params, masks), model.inputs)


def _apply(model, exported, **kwargs):
    kwargs.setdefault("stacked", model.stacked)
    return sparse_apply(model.module, exported, variables=model.variables, **kwargs)


def _kernel_paths(exported):
    flat, _ = jax.tree_util.tree_flatten_with_path(exported, is_leaf=lambda v: isinstance(v, BCOO))
    return [jaxprune._tree.path_str(p) for p, leaf in flat if isinstance(leaf, BCOO)]


def _nnx_exported(layer):
    """An NNX layer's params with its zero kernel entries pruned."""
    state = nnx.state(layer, nnx.Param)
    masks = jax.tree_util.tree_map_with_path(
        lambda p, v: v != 0 if jaxprune._tree.path_str(p) == "kernel" else jnp.ones(v.shape, bool),
        state,
    )
    return to_bcoo(state, masks)


def _random(shape, seed=0, keep=0.3):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(shape) * (rng.random(shape) < keep)).astype(np.float32)


# --- the zoo --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_zoo_model_matches_masked_dense_auto_and_forced_formats(name):
    model = zoo()[name]
    exported, want = _pruned(model)
    _assert_close(_apply(model, exported)(model.inputs), want)
    # The layouts in turn over the kernels: every forced format in one compiled pass.
    formats = {p: FORCED[i % len(FORCED)] for i, p in enumerate(_kernel_paths(exported))}
    apply = _apply(model, exported, formats=formats)
    _assert_close(apply(model.inputs), want)
    assert apply.plan(model.inputs) == formats


def test_a_partly_pruned_transformer_keeps_the_unpruned_kernel_dense_and_runs():
    model = zoo()["linen_transformer_scan"]
    masks = jaxprune.masks_for_sparsity(model.params, 0.7, stacked=model.stacked)
    masks["head"]["kernel"] = jnp.ones_like(masks["head"]["kernel"])
    exported = to_bcoo(model.params, masks)
    assert not isinstance(exported["head"]["kernel"], BCOO)
    want = model.apply(jaxprune.apply_masks(model.params, masks), model.inputs)
    apply = _apply(model, exported, formats="bcsr")
    _assert_close(apply(model.inputs), want)
    assert "head/kernel" not in apply.plan(model.inputs)


def test_second_call_of_a_shape_does_not_retrace_a_scanned_model():
    model = zoo()["linen_transformer_scan"]
    exported, _ = _pruned(model)
    apply = _apply(model, exported, formats="ell")
    apply(model.inputs)
    other = (model.inputs + 1) % 16
    with count_compiles() as compiles:
        apply(other)
        apply(model.inputs)
    assert compiles.names == []


# --- DenseGeneral / LinearGeneral ----------------------------------------------------------------

# (input shape, contracted input axes, features): attention's query (features -> heads x head_dim),
# its out projection ((heads, head_dim) -> features), an inner axis, two axes apart (Flax sorts them).
GENERAL = [
    ((2, 3, 8), (-1,), (2, 4), "bcsr"),
    ((2, 3, 2, 4), (-2, -1), (8,), "ell"),
    ((2, 5, 3), (1,), (4,), "bcoo"),
    ((2, 4, 3, 5), (3, 1), (2, 3), "bcsr"),
]


@pytest.mark.parametrize("shape, axis, features, forced", GENERAL)
def test_dense_general_and_linear_general_match_masked_dense(shape, axis, features, forced):
    x = jax.random.normal(jax.random.key(0), shape)
    kernel_shape = tuple(shape[a] for a in sorted(a % len(shape) for a in axis)) + features
    kernel = _random(kernel_shape)
    params = {"kernel": kernel, "bias": np.ones(features, np.float32)}
    masks = {"kernel": kernel != 0, "bias": np.ones(features, bool)}
    linen = nn.DenseGeneral(features, axis=axis)
    want = linen.apply({"params": params}, x)
    exported = to_bcoo(params, masks)
    layer = nnx.LinearGeneral(kernel_shape[: len(axis)], features, axis=axis, rngs=nnx.Rngs(0))
    layer.kernel[...], layer.bias[...] = kernel, params["bias"]
    for fmt in ("auto", forced):
        _assert_close(sparse_apply(linen, exported, formats=fmt)(x), want)
        _assert_close(sparse_apply(layer, _nnx_exported(layer), formats=fmt)(x), want)


def test_dense_general_batch_dims_are_refused():
    model = nn.DenseGeneral(3, axis=-1, batch_dims=0)
    x = jnp.ones((2, 4))
    params = {"kernel": _random((2, 4, 3)), "bias": np.ones((2, 3), np.float32)}
    masks = {"kernel": params["kernel"] != 0, "bias": np.ones((2, 3), bool)}
    with pytest.raises(ValueError, match=r"exported\['kernel'\] contracts with batch dimensions"):
        sparse_apply(model, to_bcoo(params, masks))(x)


# --- Einsum ---------------------------------------------------------------------------------------

EINSUMS = [  # (equation, input shape, kernel shape, a forced format)
    ("bd,dn->bn", (3, 8), (8, 5), "bcsr"),
    ("...d,dhk->...hk", (2, 3, 8), (8, 2, 4), "ell"),
    ("bthk,hkd->btd", (2, 3, 2, 4), (2, 4, 6), "bcoo"),
    ("abc,cd->dab", (2, 3, 8), (8, 5), "bcsr"),
    ("b...d,nd->bn...", (2, 3, 8), (5, 8), "ell"),
]


@pytest.mark.parametrize("equation, x_shape, kernel_shape, forced", EINSUMS)
def test_einsum_matrix_products_match_masked_dense(equation, x_shape, kernel_shape, forced):
    x = jax.random.normal(jax.random.key(1), x_shape)
    kernel = _random(kernel_shape, seed=1)
    linen = nn.Einsum(kernel_shape, equation, use_bias=False)
    want = jnp.einsum(equation, x, kernel)
    rhs, out = equation.split(",")[1].split("->")
    bias_shape = tuple(kernel_shape[rhs.index(c)] for c in out if c in rhs)
    layer = nnx.Einsum(
        equation, kernel_shape, bias_shape, bias_init=nnx.initializers.ones, rngs=nnx.Rngs(0)
    )
    layer.kernel[...] = kernel
    bias = np.asarray(layer.bias[...])
    nnx_want = layer(x)
    nnx_exported = _nnx_exported(layer)
    assert bias.any() and _kernel_paths(nnx_exported) == ["kernel"]
    for fmt in ("auto", forced):
        exported = to_bcoo({"kernel": kernel}, {"kernel": kernel != 0})
        _assert_close(sparse_apply(linen, exported, formats=fmt)(x), want)
        _assert_close(sparse_apply(layer, nnx_exported, formats=fmt)(x), nnx_want)


@pytest.mark.parametrize(
    "equation, x_shape, kernel_shape, message",
    [
        ("bhd,hdo->bho", (2, 3, 4), (3, 4, 5), r"batch dimensions \(einsum .*\['h'\]"),
        ("bd,de->b", (2, 4), (4, 3), r"letters \['e'\] are summed within one operand"),
        ("bd,dd->bd", (2, 4), (4, 4), r"repeats a letter"),
        ("...d,de->e", (2, 4), (4, 3), r"its ellipsis axes are summed"),
    ],
)
def test_einsums_that_are_not_matrix_products_are_refused(equation, x_shape, kernel_shape, message):
    kernel = _random(kernel_shape, seed=2)
    exported = to_bcoo({"kernel": kernel}, {"kernel": kernel != 0})
    apply = sparse_apply(nn.Einsum(kernel_shape, equation, use_bias=False), exported)
    with pytest.raises(ValueError, match=r"exported\['kernel'\]") as info:
        apply(jnp.ones(x_shape))
    assert info.match(message)


# --- Embed ----------------------------------------------------------------------------------------


class TiedLM(nn.Module):
    """Embed, a Dense, and the embedding table again as the output head (``attend``)."""

    @nn.compact
    def __call__(self, tokens):
        embed = nn.Embed(64, 16, name="embed")
        return embed.attend(nn.relu(nn.Dense(16, name="mix")(embed(tokens))))


class NNXTiedLM(nnx.Module):
    def __init__(self, rngs):
        self.embed = nnx.Embed(64, 16, rngs=rngs)
        self.mix = nnx.Linear(16, 16, rngs=rngs)

    def __call__(self, tokens):
        return self.embed.attend(nnx.relu(self.mix(self.embed(tokens))))


def test_embed_lookup_and_tied_head_match_masked_dense():
    tokens = jax.random.randint(jax.random.key(3), (3, 5), 0, 64)
    linen = TiedLM()
    params = linen.init(jax.random.key(0), tokens)["params"]
    masks = jaxprune.masks_for_sparsity(params, 0.7)
    want = linen.apply({"params": jaxprune.apply_masks(params, masks)}, tokens)
    model = NNXTiedLM(nnx.Rngs(0))
    state = nnx.state(model, nnx.Param)
    nnx_masks = jaxprune.masks_for_sparsity(state, 0.7)
    reference = nnx.merge(nnx.graphdef(model), jaxprune.apply_masks(state, nnx_masks))
    for fmt in ("auto", *FORCED):
        apply = sparse_apply(linen, to_bcoo(params, masks), formats=fmt)
        _assert_close(apply(tokens), want)
        _assert_close(sparse_apply(model, to_bcoo(state, nnx_masks), formats=fmt)(tokens),
                      reference(tokens))  # fmt: skip
    plan = sparse_apply(linen, to_bcoo(params, masks)).plan(tokens)
    assert plan["embed/embedding (lookup)"] == "dense"  # the rule: a dense take is fastest
    assert set(plan) == {"embed/embedding (lookup)", "embed/embedding (axes 1)", "mix/kernel"}
    assert type(model.embed) is nnx.Embed  # the user's model keeps its class


def test_calibrate_times_lookups_and_products():
    tokens = jax.random.randint(jax.random.key(4), (2, 5), 0, 64)
    model = TiedLM()
    params = model.init(jax.random.key(0), tokens)["params"]
    masks = jaxprune.masks_for_sparsity(params, 0.7)
    apply = sparse_apply(model, to_bcoo(params, masks), formats="calibrate")
    _assert_close(
        apply(tokens), model.apply({"params": jaxprune.apply_masks(params, masks)}, tokens)
    )
    assert set(apply.plan(tokens).values()) <= {"dense", *FORCED}


# --- stacked layers: bad input ------------------------------------------------------------------


@pytest.mark.parametrize("name", ["linen_transformer_scan", "nnx_transformer_scan"])
def test_a_scanned_kernel_without_stacked_is_named(name):
    model = zoo()[name]
    exported, _ = _pruned(model)
    with pytest.raises(ValueError, match=r"exported\['layers/.*kernel'\] multiplies a kernel of "
                       r"shape \(.*pass sparse_apply stacked=\{pattern: 0\}"):  # fmt: skip
        _apply(model, exported, stacked=None)(model.inputs)


@pytest.mark.parametrize("name", ["linen_transformer_scan", "nnx_transformer_scan"])
def test_stacked_that_disagrees_with_the_model_is_named(name):
    model = zoo()[name]
    exported, _ = _pruned(model)
    with pytest.raises(ValueError, match=r"stacked\['nothing'\] matches no prunable leaf"):
        _apply(model, exported, stacked={"nothing": 0})
    mlp = "*/Dense_0" if name.startswith("linen") else "*/fc1"
    with pytest.raises(ValueError, match=r"exported\['layers/.*'\] to axis 1; .* axis 0 only"):
        _apply(model, exported, stacked={mlp: 1})
    with pytest.raises(ValueError, match=r"stacked= names exported\['head/kernel'\] .* Drop it"):
        _apply(model, exported, stacked={"layers": 0, "head": 0})(model.inputs)


def test_a_stack_of_another_length_is_named():
    model = zoo()["linen_transformer_scan"]
    longer = jax.tree.map(lambda a: jnp.concatenate([a, a[:1]]), model.params["layers"])
    params = {**model.params, "layers": longer}
    masks = jaxprune.masks_for_sparsity(params, 0.7, stacked=model.stacked)
    apply = _apply(model, to_bcoo(params, masks))
    path = "layers/Block_0/Dense_0/kernel"
    with pytest.raises(ValueError, match=rf"exported\['{path}'\] has shape \(3, 32, 16\) but .* "
                       r"stacked param there has shape \(2, 32, 16\)"):  # fmt: skip
        apply(model.inputs)
