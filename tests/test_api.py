"""The public surface: every exported name resolves, and ``import jaxprune`` does not load jax."""

import signal
import subprocess
import sys
import time

import pytest

import jaxprune


def test_every_exported_name_resolves_to_its_home():
    assert sorted(jaxprune.__all__) == sorted(jaxprune._HOME_OF)
    for name in jaxprune.__all__:
        value = getattr(jaxprune, name)
        assert getattr(sys.modules[jaxprune._HOME_OF[name]], name) is value
    assert set(jaxprune.__all__) <= set(dir(jaxprune))
    with pytest.raises(AttributeError, match="no attribute 'compute_mask'"):
        jaxprune.compute_mask  # noqa: B018


def test_import_is_lazy():
    # The command's Ctrl-C handler is in place before jax loads: `import jaxprune` loads nothing.
    code = "import sys, jaxprune, jaxprune.demo; print(sorted(m for m in ('jax', 'flax') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("delay", [0.5, 1.5])
def test_ctrl_c_while_the_command_starts_is_one_line(tmp_path, delay):
    # Early on, jax is loading; a KeyboardInterrupt raised there can be swallowed by one of its
    # garbage-collection callbacks, and the run would go on. The command exits 130 instead.
    proc = subprocess.Popen(
        [sys.executable, "-m", "jaxprune", "demo", "--out", str(tmp_path / "out")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        time.sleep(delay)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert err.strip().startswith("interrupted") and "Traceback" not in err, err
