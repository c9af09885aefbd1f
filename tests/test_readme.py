"""The README's quick start runs as written."""

import re
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

import jaxprune
from jaxprune.demo.recipes import RECIPES

README = Path(__file__).resolve().parents[1] / "README.md"


def test_quick_start_runs(tmp_path, monkeypatch, capsys):
    text = README.read_text()
    section = text[text.index("## Quick start") :]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(code, str(README), "exec"), scope)
    masks, state = scope["masks"], scope["state"]
    kernel = np.asarray(state.params["layers_0"]["kernel"])
    assert np.all(kernel[~np.asarray(masks["layers_0"]["kernel"])] == 0)
    assert "layers_0/kernel" in capsys.readouterr().out
    x = np.asarray(scope["x"][:4])
    np.testing.assert_allclose(
        scope["apply"](x),
        scope["model"].apply({"params": jaxprune.apply_masks(state.params, masks)}, x),
        rtol=1e-5,
        atol=1e-5,
    )
    assert jaxprune.load(tmp_path / "model.jaxprune")["layers_2"]["kernel"].nse == int(
        np.asarray(masks["layers_2"]["kernel"]).sum()
    )
    # The orbax block right after it, on the quick start's state, into this test's folder.
    orbax = re.search(r"```python\n(.*?)```", section[section.index("with orbax") :], re.S).group(1)
    assert orbax.count('"/tmp/ckpt/state"') == 2
    saved = scope["state"]
    exec(orbax.replace('"/tmp/ckpt/state"', repr(str(tmp_path / "ckpt" / "state"))), scope)

    def raw(tree):  # key arrays compare by their data
        is_key = lambda a: jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key)  # noqa: E731
        return [
            np.asarray(jax.random.key_data(a) if is_key(a) else a) for a in jax.tree.leaves(tree)
        ]

    for a, b in zip(raw(saved), raw(scope["state"]), strict=True):
        np.testing.assert_array_equal(a, b)


def test_readme_states_the_recipes_the_command_runs():
    text = README.read_text()
    for recipe in RECIPES.values():
        assert f"{recipe.epochs} epochs, learning rate {recipe.learning_rate:g}" in text, (
            recipe.model
        )
        schedule = ", ".join(f"{q:.1f}" for q in recipe.q)
        assert f"| {recipe.rounds}, q = {schedule} |" in text, recipe.model
        rate = recipe.learning_rate * recipe.retrain_learning_rate_scale
        retrain = f"{recipe.retrain_epochs} epochs at learning rate {rate:g}"
        assert retrain in text, recipe.model


@pytest.mark.standard_promotion  # optax's Adam / a test model's broadcast bias
def test_your_own_model_runs():
    text = README.read_text()
    section = text[text.index("## Your own model") :]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    scope: dict = {}
    exec(compile(code, str(README), "exec"), scope)
    model, last, x = scope["model"], scope["last"], scope["x"]
    for path, w in jaxprune._tree.leaves_with_paths(nnx.state(model, nnx.Param)):
        mask = dict(jaxprune._tree.leaves_with_paths(last.masks))[path]
        assert np.all(np.asarray(w)[~np.asarray(mask)] == 0.0), path
    assert last.model_state is not None
    np.testing.assert_allclose(scope["apply"](x), model(x), rtol=1e-5, atol=1e-5)


def test_module_map_names_every_module_and_only_modules_that_exist():
    text = README.read_text()
    table = text[text.index("## What each piece does") :].split("\n\n")[1]
    rows = [line for line in table.splitlines() if line.startswith("| `jaxprune")]
    names = set(re.findall(r"`([A-Za-z_.]+)`", "\n".join(rows)))
    package = README.parent / "jaxprune"
    demo_row = next(row for row in rows if row.startswith("| `jaxprune.demo`"))
    for path in sorted(package.rglob("*.py")):
        module = path.relative_to(package).with_suffix("").parts
        if module[-1] in ("__init__", "__main__"):
            continue
        if module[0] == "demo":
            assert f"`{module[-1]}`" in demo_row, path
        else:
            assert module[-1] in names or f"jaxprune.{module[-1]}" in names, path
    for name in names:
        if name.startswith("jaxprune."):
            module = name.removeprefix("jaxprune.")
            assert (package / f"{module}.py").exists() or (package / module).is_dir(), name
