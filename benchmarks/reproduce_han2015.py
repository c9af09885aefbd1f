"""Reproduce Han et al. 2015 on MNIST: both LeNets, our figures beside the paper's.

Runs ``jaxprune run`` for LeNet-300-100 and LeNet-5 with each model's recipe
(``jaxprune.demo.recipes.RECIPES``, documented in the README), then reads each ``results.json`` and
prints one table. Each run checkpoints, so an interrupted reproduction goes on
with ``--resume``.

    python benchmarks/reproduce_han2015.py                      # both models (tens of minutes)
    python benchmarks/reproduce_han2015.py --model lenet300     # one of them
    python benchmarks/reproduce_han2015.py --quick              # smoke run on the 8x8 digits
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from jaxprune.demo.cli import main as jaxprune_main
from jaxprune.demo.recipes import PAPER

MNIST = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"

QUICK = ["--epochs", "2", "--rounds", "2", "--q", "1,1.5", "--retrain-epochs", "1"]


def smallest_within(results: dict, points: float = 0.001) -> dict | None:
    """The round with the fewest weights whose error is within ``points`` of the dense baseline."""
    ok = [h for h in results["history"] if 1 - h["metric"] <= results["dense_error"] + points]
    return min(ok, key=lambda h: h["kept_total"]) if ok else None


def report(model: str, results: dict, seconds: float) -> Table:
    paper = PAPER[model]
    best = smallest_within(results)
    table = Table(title=f"{model}: Han et al. 2015 against jaxprune ({results['data']['name']})")
    for col in ("", "paper", "jaxprune"):
        table.add_column(col, justify="right" if col else "left")

    def pct(x):
        return f"{100 * x:.2f}%"

    table.add_row("dense error", pct(paper["error_dense"]), pct(results["dense_error"]))
    table.add_row("pruned error", pct(paper["error_pruned"]), pct(results["pruned_error"]))
    table.add_row("weights kept", pct(paper["kept_total"]), pct(results["kept_fraction"]))
    for layer, kept in results["kept_per_layer"].items():
        name = layer.split("/")[0]
        table.add_row(f"  {name}", pct(paper["kept"].get(name, float("nan"))), pct(kept))
    table.add_row(
        "compression", f"{1 / paper['kept_total']:.0f}x", f"{results['compression']:.1f}x"
    )
    if best is not None:
        table.add_row(
            "fewest weights within 0.1 pt",
            "-",
            f"{pct(best['kept_total'])} at {pct(1 - best['metric'])} (round {best['round'] + 1})",
        )
    table.add_row(
        "file vs dense .npz",
        "-",
        f"{results['file_ratio']:.1f}x smaller ({results['file_bytes']:,} B)",
    )
    for batch, t in results.get("inference", {}).items():
        table.add_row(f"sparse/dense time, batch {batch}", "-", f"{t['ratio']:.2f}x")
    table.add_row("wall time (2 cores)", "-", f"{seconds / 60:.1f} min")
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["lenet300", "lenet5", "both"], default="both")
    parser.add_argument("--data-dir", type=Path, default=MNIST)
    parser.add_argument("--out", type=Path, default=Path("runs/han2015"))
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--quick", action="store_true", help="a smoke run on the 8x8 digits")
    args = parser.parse_args()
    console = Console()
    models = ["lenet300", "lenet5"] if args.model == "both" else [args.model]
    tables = []
    for model in models:
        out = args.out / model
        if args.quick:
            argv = ["demo", "--model", model, *QUICK]
        else:
            if not args.data_dir.is_dir():
                raise SystemExit(f"no MNIST at {args.data_dir}; pass --data-dir (or use --quick)")
            argv = ["run", "--model", model, "--data-dir", str(args.data_dir)]
        argv += ["--out", str(out)] + (["--resume"] if args.resume else [])
        start = time.perf_counter()
        if jaxprune_main(argv) != 0:
            raise SystemExit(f"jaxprune {' '.join(argv)} failed")
        results = json.loads((out / "results.json").read_text())
        tables.append(report(model, results, time.perf_counter() - start))
    for table in tables:
        console.print(table)


if __name__ == "__main__":
    main()
