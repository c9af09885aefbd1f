"""Data-parallel training over 2 CPU devices: the retrain step, and the demo's LeNet-5.

XLA's CPU all-reduce deadlocked (the process aborted with "Termination timeout for all reduce")
once two data-parallel steps were in flight; ``make_retrain_step`` waits for each such step.
Runs in subprocesses because the device count is fixed when JAX starts.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from jaxprune.demo import devices

pytestmark = pytest.mark.slow

STEPS = textwrap.dedent(
    """
    import jax
    jax.config.update("jax_num_cpu_devices", 2)
    import jax.numpy as jnp, numpy as np, optax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from jaxprune.retrain import make_retrain_step, retrain_state

    def loss(p, batch, rng):
        x, y = batch
        return jnp.mean((jax.nn.relu(x @ p["w1"]) @ p["w2"] - y) ** 2)

    k = jax.random.split(jax.random.key(0), 4)
    params = {"w1": 0.05 * jax.random.normal(k[0], (256, 512)),
              "w2": 0.05 * jax.random.normal(k[1], (512, 1))}
    x, y = jax.random.normal(k[2], (256, 256)), jax.random.normal(k[3], (256, 1))
    split = NamedSharding(Mesh(np.array(jax.devices()), ("batch",)), P("batch"))
    tx = optax.sgd(0.01, momentum=0.9)
    step = make_retrain_step(loss, tx)
    ends = []
    for batch in ((x, y), jax.device_put((x, y), split)):
        state = retrain_state(params, tx, rng=jax.random.key(1))
        for _ in range(int(sys.argv[1])):  # queued back to back, as a training loop does
            state, _ = step(state, batch)
        ends.append(state.params)
    assert len(ends[1]["w1"].sharding.device_set) == 2
    for a, b in zip(jax.tree.leaves(ends[0]), jax.tree.leaves(ends[1])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
    print("steps done")
    """
)


def _python(code: str, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    return subprocess.run(
        [sys.executable, "-c", "import sys\n" + code, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_data_parallel_cpu_steps_queued_back_to_back_finish_and_match_one_device():
    # Without the wait in make_retrain_step this aborted within a few hundred steps (2 cores).
    proc = _python(STEPS, "1500")
    assert proc.returncode == 0 and "steps done" in proc.stdout, proc.stderr[-3000:]


DEMO = textwrap.dedent(
    """
    import dataclasses, json
    from jaxprune.demo.cli import main
    out = sys.argv[1]
    code = main(["demo", "--model", "lenet5", "--epochs", "1", "--rounds", "1", "--q", "1",
                 "--retrain-epochs", "1", "--no-timing", "--out", out])
    import jax, numpy as np
    from jaxprune.demo import devices, run
    from jaxprune.demo.cli import DEMO
    from jaxprune.demo.data import load_dataset
    config, data = dataclasses.replace(DEMO, model="lenet5"), load_dataset(None)
    # The split batches hold the same examples, in the same order, as unsplit ones.
    split = next(iter(run.epoch_batches(config, data, offset=0)(0)))
    plain = next(iter(run.epoch_batches(dataclasses.replace(config, model="lenet300"),
                                        data, offset=0)(0)))
    same = all(np.array_equal(np.asarray(a), b) for a, b in zip(split, plain))
    odd = devices.batch_sharding(dataclasses.replace(config, batch_size=63), data)
    print(json.dumps({"code": code, "devices": len(jax.devices()), "same": same,
                      "split": len(split[0].sharding.device_set), "odd": odd is None}))
    """
)


def test_the_demo_trains_lenet5_split_over_2_cpu_devices(tmp_path):
    proc = _python(DEMO, str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    want = devices.cpu_devices("lenet5")
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert seen["code"] == 0 and seen["devices"] == want and seen["split"] == want
    assert seen["same"] and seen["odd"]
    assert results["training_devices"] == want
    assert 0 < results["kept_fraction"] < 1  # pruned, exported and checked after the split


def test_one_device_leaves_batches_unsplit():
    import dataclasses

    from jaxprune.demo.cli import DEMO
    from jaxprune.demo.data import load_dataset

    data = load_dataset(None)
    for model in ("lenet300", "lenet5"):  # this process has JAX's one CPU device (conftest.py)
        config = dataclasses.replace(DEMO, model=model)
        assert devices.batch_sharding(config, data) is None
        assert devices.training_devices(config, data) == 1
    assert devices.cpu_devices("lenet300") == 1
    assert 1 <= devices.cpu_devices("lenet5") <= 2
