"""The core on the models users bring: which leaves are pruned, and stacked layers per slice."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from zoo import zoo

import jaxprune
from jaxprune._tree import leaves_with_paths
from jaxprune.analysis import sensitivity

# The zoo's models are user-style Flax code: `x + pos_embedding` broadcasts over the batch.
pytestmark = pytest.mark.standard_promotion

NAMES = [  # listed, so that collecting the tests builds no model
    "linen_resnet",
    "linen_transformer",
    "linen_transformer_scan",
    "nnx_cnn",
    "nnx_transformer",
    "nnx_transformer_scan",
]


def _flat(tree):
    return dict(leaves_with_paths(tree))


def _axis_of(model, path):
    return 0 if model.stacked and path.startswith("layers/") else None


@pytest.mark.parametrize("name", NAMES)
def test_default_rule_prunes_exactly_the_kernels_and_embeddings(name):
    assert sorted(zoo()) == NAMES
    model = zoo()[name]
    chosen = {p for p, leaf in leaves_with_paths(model.params) if jaxprune.default_where(p, leaf)}
    assert chosen == model.weights
    masks = _flat(jaxprune.compute_masks(model.params, 1.0, stacked=model.stacked))
    pruned = {p for p, m in masks.items() if not np.all(np.asarray(m))}
    assert pruned == model.weights  # biases, norm scales, attention biases, positions untouched


@pytest.mark.parametrize("name", NAMES)
def test_each_layer_and_each_slice_gets_its_own_std(name):
    model = zoo()[name]
    q = 0.9
    masks = _flat(jaxprune.compute_masks(model.params, q, stacked=model.stacked))
    for path, leaf in leaves_with_paths(model.params):
        if path not in model.weights:
            continue
        w = np.asarray(leaf, np.float64)
        axis = _axis_of(model, path)
        slices = [w] if axis is None else list(w)  # by hand: one layer at a time
        want = np.stack([np.abs(s) >= q * s.std() for s in slices])
        thresholds = np.stack([np.full(s.shape, q * s.std()) for s in slices])
        got = np.asarray(masks[path]).reshape(want.shape)
        near = np.abs(np.abs(w.reshape(want.shape)) - thresholds) < 1e-5 * thresholds
        assert np.array_equal(got[~near], want[~near]), path


def test_one_std_over_a_stack_would_prune_the_layers_unevenly():
    # The defect stacked= fixes: give layer 1 ten times the scale of layer 0.
    w = np.random.default_rng(0).normal(size=(2, 32, 32)).astype(np.float32)
    w[1] *= 10.0
    params = {"layers": {"Dense_0": {"kernel": jnp.asarray(w)}}}
    whole = jaxprune.compute_masks(params, 1.0)["layers"]["Dense_0"]["kernel"]
    per = jaxprune.compute_masks(params, 1.0, stacked={"layers": 0})["layers"]["Dense_0"]["kernel"]
    whole_kept = np.asarray(whole).reshape(2, -1).mean(1)
    per_kept = np.asarray(per).reshape(2, -1).mean(1)
    assert whole_kept[0] < 0.05 and whole_kept[1] > 0.4
    np.testing.assert_allclose(per_kept, 0.32, atol=0.05)  # ~P(|z| >= 1) in every layer


@pytest.mark.parametrize("name", ["linen_transformer_scan", "nnx_transformer_scan"])
def test_summary_rows_and_layer_scope_counts_are_per_slice(name):
    model = zoo()[name]
    summary = jaxprune.summarize(
        model.params,
        jaxprune.masks_for_sparsity(model.params, 0.7, stacked=model.stacked),
        stacked=model.stacked,
    )
    stacked_weights = sorted(p for p in model.weights if p.startswith("layers/"))
    rows = {r.path: r for r in summary.rows}
    for path in stacked_weights:
        assert path not in rows
        for i in range(2):
            row = rows[f"{path}[{i}]"]
            assert row.total * 2 == math.prod(_flat(model.params)[path].shape)
            assert row.total - row.kept == math.floor(0.7 * row.total + 0.5)
    assert len(rows) == len(model.weights) + len(stacked_weights)  # one more row per stack


@pytest.mark.parametrize("name", ["linen_transformer_scan", "nnx_transformer_scan"])
def test_global_scope_counts_each_slice_once(name):
    model = zoo()[name]
    masks = jaxprune.masks_for_sparsity(model.params, 0.7, scope="global", stacked=model.stacked)
    total = sum(math.prod(_flat(model.params)[p].shape) for p in model.weights)
    kept = sum(int(np.asarray(_flat(masks)[p]).sum()) for p in model.weights)
    assert total - kept == math.floor(0.7 * total + 0.5)


def test_q_mapping_names_one_slice():
    model = zoo()["linen_transformer_scan"]
    path = "layers/Block_0/Dense_0/kernel"
    masks = jaxprune.compute_masks(model.params, {f"{path}[1]": 1.0}, stacked=model.stacked)
    kept = np.asarray(_flat(masks)[path])
    assert kept[0].all() and not kept[1].all()
    pruned = {p for p, m in _flat(masks).items() if not np.all(np.asarray(m))}
    assert pruned == {path}


def test_sensitivity_scans_each_slice_as_a_layer():
    model = zoo()["linen_transformer_scan"]
    labels = jnp.argmax(model.apply(model.params, model.inputs), axis=-1)
    table = sensitivity(
        jax.tree_util.Partial(model.apply),
        model.params,
        model.inputs,
        labels,
        qs=[0.0, 1.0],
        where=jaxprune.paths_matching("layers/Block_0/Dense_0/kernel"),
        stacked={"layers": 0},
    )
    path = "layers/Block_0/Dense_0/kernel"
    assert table.layers == (f"{path}[0]", f"{path}[1]")
    np.testing.assert_allclose(table.kept_fraction[:, 0], 1.0)
    w = np.asarray(_flat(model.params)[path])
    want = [(np.abs(s) >= s.std()).mean() for s in w]
    np.testing.assert_allclose(table.kept_fraction[:, 1], want, rtol=1e-5)


def test_stacked_errors_name_the_pattern_and_the_leaf():
    params = {
        "layers": {"a": {"kernel": jnp.ones((2, 3, 3))}, "b": {"kernel": jnp.ones((4, 3, 3))}},
        "fc": {"kernel": jnp.ones((3, 3))},
    }
    with pytest.raises(ValueError, match=r"stacked\['nothing'\] matches no prunable leaf"):
        jaxprune.compute_masks(params, 1.0, stacked={"nothing": 0})
    with pytest.raises(
        ValueError, match=r"stacked\['fc'\] = 2 is out of range for params\['fc/kernel'\]"
    ):
        jaxprune.compute_masks(params, 1.0, stacked={"fc": 2})
    with pytest.raises(ValueError, match=r"sizes along axis 0 disagree.*'layers/a/kernel': 2"):
        jaxprune.masks_for_sparsity(params, 0.5, stacked={"layers": 0})
    with pytest.raises(ValueError, match=r"'layers/b/kernel'\] is matched by two stacked"):
        jaxprune.compute_masks(params, 1.0, stacked={"layers/b": 0, "layers/*/kernel": 1})
    with pytest.raises(TypeError, match=r"stacked maps a path pattern to an int axis"):
        jaxprune.compute_masks(params, 1.0, stacked={"layers/a": "0"})


def test_raw_array_model_is_told_what_to_pass():
    params = {"w1": jnp.ones((4, 3)), "b1": jnp.ones(3)}
    with pytest.raises(ValueError, match=r"no prunable leaf.*'kernel' or 'embedding'.*where="):
        jaxprune.compute_masks(params, 1.0)
    masks = jaxprune.compute_masks(
        params * 1 if False else params, 0.0, where=jaxprune.paths_matching("w*")
    )
    assert set(_flat(masks)) == {"w1", "b1"}


def test_composable_rules():
    model = zoo()["linen_transformer"]
    kernels = {
        p for p, x in leaves_with_paths(model.params) if jaxprune.weights_named("kernel")(p, x)
    }
    assert kernels == model.weights - {"embed/embedding"}
    rule = jaxprune.excluding("embed", "head")
    chosen = {p for p, x in leaves_with_paths(model.params) if rule(p, x)}
    assert chosen == model.weights - {"embed/embedding", "head/kernel"}
    with pytest.raises(ValueError, match=r"weights_named needs one or more"):
        jaxprune.weights_named()


def test_prune_and_retrain_keeps_every_slice_at_its_target():
    # A stack of 3 layers of very different scales, as nn.scan lays them out: (layers, in, out).
    scales = jnp.array([0.1, 1.0, 10.0])[:, None, None]
    kernel = jax.random.normal(jax.random.key(0), (3, 6, 5)) * scales
    params = {"layers": {"Dense_0": {"kernel": kernel, "bias": jnp.zeros((3, 5))}}}
    x = jax.random.normal(jax.random.key(1), (16, 6))

    def loss(p, batch, rng):
        del rng
        layer = p["layers"]["Dense_0"]
        out = jnp.einsum("bi,lio->blo", batch, layer["kernel"]) + layer["bias"]
        return jnp.mean((out - 1.0) ** 2)

    *_, last = jaxprune.prune_and_retrain(
        params,
        loss,
        lambda epoch: [x] * 3,
        lambda p: 0.0,
        rounds=2,
        optimizer=optax.sgd(0.001, momentum=0.9),
        sparsity=[0.5, 0.8],
        stacked={"layers": 0},
    )
    path = "layers/Dense_0/kernel"
    assert [sorted(r.kept_fraction_per_layer) for r in last.history] == [
        [f"{path}[{i}]" for i in range(3)]
    ] * 2
    for i in range(3):
        assert last.history[0].kept_fraction_per_layer[f"{path}[{i}]"] == pytest.approx(0.5)
        assert last.history[1].kept_fraction_per_layer[f"{path}[{i}]"] == pytest.approx(0.2)
    w = np.asarray(last.params["layers"]["Dense_0"]["kernel"])
    assert np.all(w[~np.asarray(last.masks["layers"]["Dense_0"]["kernel"])] == 0.0)


@pytest.mark.parametrize("name", NAMES)
def test_export_and_files_round_trip_every_zoo_model(name, tmp_path):
    # Stacked kernels need no per-layer rule here: each leaf exports whole, exactly.
    model = zoo()[name]
    masks = jaxprune.masks_for_sparsity(model.params, 0.7, stacked=model.stacked)
    exported = jaxprune.to_bcoo(model.params, masks)
    jaxprune.save(tmp_path / "m.jaxprune", exported)
    back = jaxprune.to_dense(jaxprune.load(tmp_path / "m.jaxprune"))
    want = _flat(jaxprune.apply_masks(model.params, masks))
    got = _flat(back)
    assert got.keys() == want.keys()
    for path, leaf in want.items():
        np.testing.assert_array_equal(np.asarray(got[path]), np.asarray(leaf), err_msg=path)
