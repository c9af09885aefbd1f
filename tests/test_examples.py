"""The examples run their whole flow (in a reduced setting) and report what they claim.

Marked slow (about a minute together): ``python -m pytest`` leaves them out, ``python -m pytest
-m slow`` runs them, and CI (``.ci/run``) runs both.
"""

import importlib.util
import sys
from pathlib import Path

import pytest

# The examples are user code: optax's Adam and a broadcast positional table need JAX's default
# promotion (conftest.py).
pytestmark = pytest.mark.standard_promotion

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _main(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # Flax modules are dataclasses, which look their module up
    spec.loader.exec_module(module)
    return module.main


def _check_export(result):
    assert result["max_abs_gap"] < 1e-4
    assert result["reloaded_equal"]
    assert result["file_bytes"] < result["dense_npz_bytes"]
    assert set(result["times"]) == {"1", "64"}
    assert all(t["ratio"] > 0 for t in result["times"].values())


@pytest.mark.slow
def test_resnet_batchnorm_example(capsys):
    pytest.importorskip("sklearn")
    result = _main("resnet_batchnorm")(["--quick"])
    _check_export(result)
    assert len(result["dense"]) == 1
    assert all(len(v) == 1 for row in result["rows"].values() for v in row.values())
    out = capsys.readouterr().out
    assert "Linen ResNet + BatchNorm" in out and "sparse / dense time" in out


@pytest.mark.slow
def test_transformer_example_scan_stacked(capsys):
    result = _main("transformer")(["--quick", "--models", "scan"])
    assert set(result) == {"nnx.scan"}
    scan = result["nnx.scan"]
    _check_export(scan)
    assert len(scan["driver"][0]) == len(scan["nnx.Optimizer"][0]) == 3
    assert "NNX Transformer (nnx.scan)" in capsys.readouterr().out
