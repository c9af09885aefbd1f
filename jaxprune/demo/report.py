"""What the ``jaxprune`` command shows and writes: round lines, tables, plots, results entries.

One name per quantity throughout: ``kept_fraction`` is the measured fraction of weights kept (in
total, or ``kept_fraction_per_layer``; shown as "kept %"), ``sparsity`` the target fraction pruned
that a ``--sparsity`` round asked for, ``weights`` / ``weights_kept`` count prunable weights,
``accuracy`` is test accuracy and ``retrain_learning_rate`` the retraining learning rate
(``learning_rate * retrain_learning_rate_scale``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from jaxprune._options import layer_of
from jaxprune.analysis import sensitivity as sensitivity_scan
from jaxprune.demo import recipes, run
from jaxprune.demo.checkpoints import q_of
from jaxprune.demo.recipes import Config
from jaxprune.plots import plot_history, plot_sensitivity, plot_weight_histogram
from jaxprune.rounds import RoundRecord

# The scan costs (layers x grid) evaluations: a 2,000-image slice of the test set keeps it short.
SENSITIVITY_IMAGES = 2000
SENSITIVITY_GRID = (0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0)


def pct(x: float) -> str:
    return f"{100 * x:.2f}%"


def history_entry(record: RoundRecord, config: Config) -> dict[str, Any]:
    """A round of ``results.json``'s history (rounds counted from 1, as printed)."""
    return {
        "round": record.round + 1,
        "q": record.q,
        "sparsity": config.sparsity[record.round] if config.sparsity is not None else None,
        "kept_fraction": record.kept_fraction,
        "kept_fraction_per_layer": record.kept_fraction_per_layer,
        "accuracy": record.metric,
        "train_loss": record.train_loss,
        "retrain_learning_rate": config.learning_rate * config.retrain_learning_rate_scale,
        "dropout_rates": record.dropout_rates,
    }


def round_line(record: RoundRecord, config: Config) -> str:
    """``round 2: q=1.4  kept 35.10%  (fc1 30.00%  fc2 ...)  error 3.10%``."""
    layers = "  ".join(f"{layer_of(p)} {pct(k)}" for p, k in record.kept_fraction_per_layer.items())
    if record.q is None:
        assert config.sparsity is not None  # a round without q ran a sparsity schedule
        target: Any = config.sparsity[record.round]
        rule = "sparsity=" + (
            f"{target:g}"
            if isinstance(target, float)
            else ", ".join(f"{k} {s:g}" for k, s in target)
        )
        if config.ranking != "magnitude" or config.scope != "layer":
            rule += f" ({config.ranking}, {config.scope})"
    elif isinstance(record.q, dict):
        rule = "q=" + ", ".join(f"{k} {v:g}" for k, v in record.q.items())
    else:
        rule = f"q={record.q:g}"
    return (
        f"round {record.round + 1}: {rule}  kept {pct(record.kept_fraction)}  ({layers})  "
        f"error {pct(1 - record.metric)}"
    )


def layer_table(config: Config, summary: Any, last: RoundRecord) -> Table:
    """Han et al. 2015, Table 2 style: per layer weights, kept %, the q used, and the paper's."""
    paper: dict[str, float] = (
        recipes.PAPER[config.model]["kept_fraction_per_layer"] if config.data_dir else {}
    )
    table = Table(title="Per-layer pruning (Han et al. 2015, Table 2 style)")
    for col in ("layer", "weights", "kept", "kept %", "q (last round)", "paper kept %"):
        table.add_column(col, justify="left" if col == "layer" else "right")
    for row in summary.rows:
        layer = layer_of(row.path)
        table.add_row(
            row.path,
            f"{row.total:,}",
            f"{row.kept:,}",
            pct(row.kept_fraction),
            f"{q_of(last, layer, row.path):g}" if last.q is not None else "-",
            f"{100 * paper[layer]:.0f}%" if layer in paper else "-",
        )
    table.add_row(
        "total", f"{summary.total:,}", f"{summary.kept:,}", pct(summary.kept_fraction), "", ""
    )
    return table


def plots(config: Config, out: Path, dense: Any, final: Any, curve: list[dict]) -> list[Path]:
    layer = "fc1"
    return [
        plot_weight_histogram(
            np.asarray(dense[layer]["kernel"]),
            np.asarray(final[layer]["kernel"]),
            out / "weights_fc1.png",
            title=f"{config.model} {layer}: before pruning and after the last retraining",
        ),
        plot_history(curve, out / "rounds.png", title=f"{config.model}: kept % and accuracy"),
    ]


def sensitivity(config: Config, data: Any, params: Any, out: Path, grid, console: Console) -> dict:
    """The layer-by-layer scan (Han et al. 2015, Fig. 6): a table, a plot and its JSON rows."""
    qs = grid or SENSITIVITY_GRID
    n = min(len(data.x_test), SENSITIVITY_IMAGES)
    with console.status(f"sensitivity scan on {n:,} test images (one compiled call)"):
        result = sensitivity_scan(
            run.make_eval(config), params, data.x_test[:n], data.y_test[:n], qs=qs
        )
    table = Table(title="Sensitivity: one layer pruned, no retraining (Han et al. 2015, Fig. 6)")
    table.add_column("q", justify="right")
    for layer in result.layers:
        table.add_column(f"{layer_of(layer)} kept / acc", justify="right")
    for j, q in enumerate(result.grid):
        cells = [
            f"{pct(result.kept_fraction[i, j])} / {pct(result.accuracy[i, j])}"
            for i in range(len(result.layers))
        ]
        table.add_row(f"{q:g}", *cells)
    console.print(table)
    plot_sensitivity(result, out / "sensitivity.png", title=f"{config.model} sensitivity")
    return {"baseline_accuracy": result.baseline, "rows": result.rows()}


def table1(results: dict) -> str:
    """Han et al. 2015, Table 1 style: one line of the whole result."""
    timing = results.get("inference", {})
    speed = ", ".join(f"batch {b} {t['ratio']:.2f}x" for b, t in timing.items()) or "not timed"
    return (
        f"[bold]error {pct(results['dense_error'])} -> {pct(results['pruned_error'])}[/]   "
        f"weights {results['weights']:,} -> {results['weights_kept']:,} "
        f"({results['compression']:.1f}x fewer)   file {results['file_bytes']:,} B vs dense .npz "
        f"{results['dense_npz_bytes']:,} B ({results['file_ratio']:.1f}x smaller)   "
        f"sparse/dense time: {speed}"
    )
