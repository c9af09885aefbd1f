"""Retraining across processes: the README's "Several hosts" script, run by 2 processes at once.

Each process has 2 emulated CPU devices, so the mesh spans 4 devices on 2 processes, joined by
``jax.distributed`` over 127.0.0.1 (gloo collectives, JAX's CPU default). The script is the
README's code block itself, so the documentation and the test cannot drift apart. A one-process
run of the same script is the reference.
"""

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

# Two and three JAX processes started and joined (about 30 s): in CI's slow step.
pytestmark = pytest.mark.slow

README = Path(__file__).resolve().parents[1] / "README.md"
TESTS = Path(__file__).resolve().parent

# Runs the README script in this process, then checks what only a test can see: how often the
# step compiled, and the pruned weights in this process's own shards. Writes the params and
# masks (replicated, so whole in every process) for the comparison across runs.
HARNESS = """
import runpy, sys
tests, script, out, *args = sys.argv[1:]
sys.path.insert(0, tests)
from helpers import count_compiles
import jax, numpy as np

sys.argv = [script, *args]
with count_compiles() as compiles:
    scope = runpy.run_path(script, run_name="__main__")
state, me = scope["state"], jax.process_index()
params = dict(jax.tree_util.tree_flatten_with_path(state.params)[0])
masks = dict(jax.tree_util.tree_flatten_with_path(state.opt_state.masks)[0])
shards = pruned = 0
for path, w in params.items():
    if w.ndim != 2:
        continue
    for ws, ms in zip(w.addressable_shards, masks[path].addressable_shards, strict=True):
        assert ws.device == ms.device and ws.device.process_index == me
        kept = np.asarray(ms.data, dtype=bool)
        assert np.all(np.asarray(ws.data)[~kept] == 0.0), jax.tree_util.keystr(path)
        shards, pruned = shards + 1, pruned + int((~kept).sum())
assert pruned > 0
np.savez(f"{out}/process{me}.npz",
         **{"p" + jax.tree_util.keystr(k): np.asarray(v) for k, v in params.items()},
         **{"m" + jax.tree_util.keystr(k): np.asarray(v) for k, v in masks.items()})
print(f"process {me}: {shards} shards, pruned weights 0.0, step compiled {compiles.of('step')}x",
      flush=True)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(args: list[str], devices: int, cwd: Path, name: str) -> subprocess.Popen:
    """Starts ``python -u *args`` with ``devices`` CPU devices; its output goes to ``cwd/name.*``."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    # Dozens of tiny programs (the script's eager ops) on 2 shared cores: compile them quickly.
    env["XLA_FLAGS"] = (
        f"--xla_force_host_platform_device_count={devices} --xla_backend_optimization_level=0"
    )
    with open(cwd / f"{name}.out", "w") as out, open(cwd / f"{name}.err", "w") as err:
        return subprocess.Popen(
            [sys.executable, "-u", *args], cwd=cwd, env=env, stdout=out, stderr=err
        )


def _finish(procs: list[subprocess.Popen], seconds: float) -> None:
    """Waits for every process; kills them all, by pid, if any runs past ``seconds`` (or fails)."""
    deadline = time.monotonic() + seconds
    try:
        for p in procs:
            p.wait(timeout=max(deadline - time.monotonic(), 0.1))
    finally:
        for p in procs:
            if p.poll() is None:
                os.kill(p.pid, signal.SIGKILL)
                p.wait()


def _readme_script() -> str:
    text = README.read_text()
    section = text[text.index("**Several hosts.**") :]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_two_processes_retrain_like_one(tmp_path):
    script = tmp_path / "retrain_on_hosts.py"
    script.write_text(_readme_script())
    run = ["-c", HARNESS, str(TESTS), str(script)]
    (tmp_path / "one").mkdir()
    two, one = f"127.0.0.1:{_free_port()}", f"127.0.0.1:{_free_port()}"
    names = ["process0", "process1", "one/process0"]
    procs = [_start([*run, str(tmp_path), two, "2", str(i)], 2, tmp_path, names[i]) for i in (0, 1)]
    procs.append(_start([*run, str(tmp_path / "one"), one, "1", "0"], 1, tmp_path, names[2]))

    _finish(procs, 90)  # about 25 CPU-seconds in all; the margin is for a busy machine

    out = {n: (tmp_path / f"{n}.out").read_text() for n in names}
    for n, p in zip(names, procs, strict=True):
        assert p.returncode == 0, (n, (tmp_path / f"{n}.err").read_text()[-4000:])
    assert "process 0: 4 shards, pruned weights 0.0, step compiled 1x" in out["process0"]
    assert "process 1: 4 shards, pruned weights 0.0, step compiled 1x" in out["process1"]
    assert "process 0: 2 shards, pruned weights 0.0, step compiled 1x" in out["one/process0"]
    want = np.load(tmp_path / "one" / "process0.npz")
    for me in (0, 1):
        got = np.load(tmp_path / f"process{me}.npz")
        assert sorted(got) == sorted(want)
        for name in want:
            if name.startswith("m"):  # masks: the same on every process and in the reference
                np.testing.assert_array_equal(got[name], want[name], err_msg=name)
            else:
                np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-6)


def test_a_process_that_never_joins_stops_the_others_in_bounded_time(tmp_path):
    # Process 0 declares 2 processes; process 1 never starts. JAX aborts the process (SIGABRT,
    # no Python exception) once initialization_timeout has passed, plus a few seconds of its own.
    code = (
        "import jax; jax.distributed.initialize("
        f"coordinator_address='127.0.0.1:{_free_port()}', num_processes=2, process_id=0,"
        " initialization_timeout=1); print('joined')"
    )
    start = time.monotonic()
    [p] = procs = [_start(["-c", code], 1, tmp_path, "alone")]
    _finish(procs, 40)
    err = (tmp_path / "alone.err").read_text()
    assert time.monotonic() - start < 40
    assert p.returncode == -signal.SIGABRT, (p.returncode, err[-2000:])
    assert "joined" not in (tmp_path / "alone.out").read_text()
    # JAX's words: they name the RPC that timed out, not the missing process 1.
    assert "DEADLINE_EXCEEDED" in err and "RegisterTask" in err, err[-2000:]
