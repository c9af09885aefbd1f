"""benchmarks/pipeline_vs_torch.py runs its schedule end to end (--quick, the 8x8 digits)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "pipeline_vs_torch.py"


@pytest.mark.slow  # two fresh processes that train and prune: CI's second step
def test_quick_run_prints_both_phases_errors_and_kept_weights():
    out = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--repeats", "1", "--digits"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "COLUMNS": "160"},
    )
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [line for line in out.stdout.splitlines() if "│ jaxprune" in line]
    assert len(rows) == 1
    cells = [c.strip() for c in rows[0].split("│")[1:-1]]
    wall, dense_s, rounds_s = (float(c) for c in cells[2:5])
    assert 0 < dense_s < wall and 0 < rounds_s < wall
    kept = float(cells[7].rstrip("%"))
    assert 0 < kept < 100  # q 1.0 then 1.5 prunes, never everything
    if "torch: not installed" not in out.stdout:
        assert "jaxprune / torch wall time per pair" in out.stdout
