"""The ``jaxprune`` command: Han et al. 2015 on LeNet-300-100 and LeNet-5, end to end.

jaxprune demo                                     # built-in 8x8 digits, about a minute
jaxprune run --model lenet300 --data-dir DIR      # real MNIST, the paper's setting
jaxprune sensitivity --model lenet5 --data-dir DIR
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from jaxprune.analysis import accuracy, plot_history, plot_sensitivity, plot_weight_histogram
from jaxprune.analysis import sensitivity as sensitivity_scan
from jaxprune.demo import checkpoints, recipes, run
from jaxprune.demo.checkpoints import Checkpoints
from jaxprune.demo.data import DataError, load_dataset
from jaxprune.demo.models import count_params
from jaxprune.demo.recipes import Config, ConfigError
from jaxprune.masks import summarize
from jaxprune.storage import FileFormatError

# The 1,348 training digits give few steps per epoch: retrain longer, at half the dense rate.
DEMO = Config(
    model="lenet300",
    epochs=40,
    rounds=4,
    q=(1.0, 1.5, 1.9, 2.2),
    retrain_epochs=20,
    retrain_lr_scale=0.5,
    lr=0.1,
    batch_size=64,
)

# The scan costs (layers x grid) evaluations: a 2,000-image slice of the test set keeps it short.
SENSITIVITY_IMAGES = 2000


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers, got {text!r}"
        ) from None


def _scales(text: str) -> tuple[tuple[str, float], ...]:
    try:
        pairs = [item.split("=") for item in text.split(",")]
        return tuple((name.strip(), float(value)) for name, value in pairs)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected LAYER=FACTOR pairs such as conv1=0.3,conv2=0.8, got {text!r}"
        ) from None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jaxprune", description="Prune LeNets the way Han et al. 2015 did, with JAX."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    # Unset options (None) take their value from the command's base config: DEMO for `demo`, the
    # model's recipe (recipes.RECIPES) for `run` and `sensitivity`.
    def common(p: argparse.ArgumentParser, out: str) -> None:
        p.add_argument("--model", choices=["lenet300", "lenet5"], default="lenet300")
        p.add_argument("--epochs", type=int, help="dense epochs")
        p.add_argument("--lr", type=float, help="dense learning rate")
        p.add_argument("--weight-decay", type=float, help="L2 coefficient")
        p.add_argument("--batch-size", type=int)
        p.add_argument("--dropout", type=float, help="dropout on the later dense layers' inputs")
        p.add_argument("--seed", type=int)
        p.add_argument("--out", type=Path, default=Path(out), help="output folder")

    def pruning(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--rounds", type=int, help="default: the length of --q or --keep, else the recipe's"
        )
        group = p.add_mutually_exclusive_group()
        group.add_argument("--q", type=_floats, help="Han's q per round, e.g. 1.0,1.5,2.0")
        group.add_argument("--keep", type=_floats, help="kept fraction per round instead of q")
        p.add_argument(
            "--q-scale",
            type=_scales,
            metavar="LAYER=FACTOR,...",
            help="prune these layers with FACTOR * q (e.g. conv1=0.3 keeps more of conv1)",
        )
        p.add_argument("--retrain-epochs", type=int)
        p.add_argument("--retrain-lr-scale", type=float)
        p.add_argument("--resume", action="store_true", help="continue from --out's checkpoints")
        p.add_argument(
            "--structured",
            type=float,
            default=None,
            metavar="FRACTION",
            help="also prune this fraction of hidden neurons, retrain, and shrink the layers",
        )
        p.add_argument("--sensitivity", action="store_true", help="also run the layer scan")
        p.add_argument("--no-timing", action="store_true", help="skip inference timing")

    recipe = "unset options take the model's recipe (README, recipes.RECIPES)"
    demo = sub.add_parser("demo", help="the whole pipeline on the built-in 8x8 digits")
    common(demo, "jaxprune-out/demo")
    pruning(demo)

    run = sub.add_parser("run", help="the whole pipeline on MNIST files", description=recipe)
    common(run, "jaxprune-out/run")
    pruning(run)
    run.add_argument("--data-dir", required=True, help="folder with MNIST's IDX files or .npz")

    sens = sub.add_parser(
        "sensitivity", help="prune one layer at a time, without retraining", description=recipe
    )
    common(sens, "jaxprune-out/sensitivity")
    sens.add_argument("--data-dir", default=None, help="MNIST folder; default: 8x8 digits")
    sens.add_argument("--grid", type=_floats, default=None, help="q values to scan")
    return parser


def _config(args: argparse.Namespace) -> Config:
    """The options given on the command line over the command's base config.

    A schedule given without ``--rounds`` sets the number of rounds (``--q 2`` prunes once);
    ``--rounds`` without a schedule runs the first rounds of the base one. ``--keep`` drops the
    base's ``--q-scale``.
    """
    base = DEMO if args.command == "demo" else recipes.RECIPES[args.model]
    fields = {f.name for f in dataclasses.fields(Config)}
    given = {k: v for k, v in vars(args).items() if k in fields and v is not None}
    given["data_dir"] = None if args.command == "demo" else args.data_dir
    schedule = given.get("q", given.get("keep"))
    if schedule is not None and "rounds" not in given:
        given["rounds"] = len(schedule)
    if "keep" in given:
        given.setdefault("q_scale", ())
    elif "q" not in given and "rounds" in given:
        if given["rounds"] > base.rounds:
            raise ConfigError(
                f"--rounds {given['rounds']}: the {base.model} base schedule has {base.rounds} "
                "rounds; give --q (or --keep) with one value or one per round."
            )
        given["q"] = base.q[: given["rounds"]]
    return dataclasses.replace(base, **given).checked()


class _Bars:
    """A rich progress display with one bar per phase."""

    def __init__(self, console: Console):
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.fields[note]}"),
            console=console,
            transient=False,
        )

    def __enter__(self) -> _Bars:
        self.progress.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.progress.stop()

    def add(self, description: str, total: int) -> int:
        return self.progress.add_task(description, total=total, note="")

    def advance(self, task: int, note: str) -> None:
        self.progress.update(task, advance=1, note=note)


def _pct(x: float) -> str:
    return f"{100 * x:.2f}%"


def _dense(config: Config, data: Any, ckpt: Checkpoints, console: Console, resume: bool):
    """Trains the dense model, or takes it from the checkpoints when resuming."""
    found = ckpt.load_dense() if resume else None
    if found is not None:
        console.print(f"dense model taken from {ckpt.dir}")
        return found
    with _Bars(console) as bars:
        task = bars.add("dense training", config.epochs)
        params = run.train_dense(
            config,
            data,
            run.init_params(config, data),
            on_epoch=lambda e, loss: bars.advance(task, f"loss {loss:.4f}"),
        )
    error = 1.0 - accuracy(run.make_eval(config), params, data.x_test, data.y_test)
    ckpt.save_dense(params, error)
    return params, error


def _rounds(config: Config, data: Any, params: Any, ckpt: Checkpoints, console: Console, resume):
    """Runs the prune -> retrain rounds with a bar each, checkpointing after every round."""
    state = ckpt.load_round(config, data) if resume else None
    if state is not None:
        console.print(f"resuming after round {state.round} of {config.rounds}")
        if state.round >= config.rounds:
            return state
    with _Bars(console) as bars:
        tasks = {
            r: bars.add(f"round {r + 1}/{config.rounds}", config.retrain_epochs)
            for r in range(state.round if state else 0, config.rounds)
        }
        on_epoch = lambda r, e, loss: bars.advance(tasks[r], f"loss {loss:.4f}")  # noqa: E731
        for done in run.rounds(config, data, params, resume=state, on_epoch=on_epoch):
            ckpt.save_round(done)
            state, rec = done, done.history[-1]
            layers = "  ".join(f"{p.split('/')[0]} {_pct(k)}" for p, k in rec.kept.items())
            if rec.q is None:
                rule = f"keep={1 - rec.sparsity:g}"
            elif isinstance(rec.q, dict):
                rule = "q=" + ", ".join(f"{k} {v:g}" for k, v in rec.q.items())
            else:
                rule = f"q={rec.q:g}"
            bars.progress.console.print(
                f"round {rec.round + 1}: {rule}  kept {_pct(rec.kept_total)}  ({layers})  "
                f"error {_pct(1 - rec.metric)}"
            )
    return state


def _layer_table(config: Config, summary: Any, last: Any) -> Table:
    """Han et al. 2015, Table 2 style: per layer weights, kept %, the q used, and the paper's."""
    paper = recipes.PAPER[config.model]["kept"] if config.data_dir else {}
    table = Table(title="Per-layer pruning (Han et al. 2015, Table 2 style)")
    for col in ("layer", "weights", "kept", "kept %", "q (last round)", "paper kept %"):
        table.add_column(col, justify="left" if col == "layer" else "right")
    for row in summary.rows:
        layer = row.path.split("/")[0]
        table.add_row(
            row.path,
            f"{row.total:,}",
            f"{row.kept:,}",
            _pct(row.kept_fraction),
            f"{checkpoints.q_of(last, layer):g}" if last.q is not None else "-",
            f"{100 * paper[layer]:.0f}%" if layer in paper else "-",
        )
    table.add_row(
        "total", f"{summary.total:,}", f"{summary.kept:,}", _pct(summary.kept_fraction), "", ""
    )
    return table


def _plots(config: Config, out: Path, dense: Any, final: Any, history: list[dict]) -> list[Path]:
    layer = "fc1"
    return [
        plot_weight_histogram(
            np.asarray(dense[layer]["kernel"]),
            np.asarray(final[layer]["kernel"]),
            out / "weights_fc1.png",
            title=f"{config.model} {layer}: before pruning and after the last retraining",
        ),
        plot_history(history, out / "rounds.png", title=f"{config.model}: kept % and accuracy"),
    ]


def _sensitivity(config: Config, data: Any, params: Any, out: Path, grid, console) -> dict:
    qs = grid or (0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0)
    n = min(len(data.x_test), SENSITIVITY_IMAGES)
    with console.status(f"sensitivity scan on {n:,} test images (one compiled call)"):
        result = sensitivity_scan(
            run.make_eval(config), params, data.x_test[:n], data.y_test[:n], qs=qs
        )
    table = Table(title="Sensitivity: one layer pruned, no retraining (Han et al. 2015, Fig. 6)")
    table.add_column("q", justify="right")
    for layer in result.layers:
        table.add_column(f"{layer.split('/')[0]} kept / acc", justify="right")
    for j, q in enumerate(result.grid):
        cells = [
            f"{_pct(result.kept_fraction[i, j])} / {_pct(result.accuracy[i, j])}"
            for i in range(len(result.layers))
        ]
        table.add_row(f"{q:g}", *cells)
    console.print(table)
    plot_sensitivity(result, out / "sensitivity.png", title=f"{config.model} sensitivity")
    return {"baseline_accuracy": result.baseline, "rows": result.rows()}


def _pipeline(args: argparse.Namespace, console: Console) -> int:
    config = _config(args)
    if args.structured is not None:
        run.check_structured(config, args.structured)
    out: Path = args.out
    started = time.perf_counter()
    data = load_dataset(config.data_dir)
    ckpt = Checkpoints(out)
    if args.resume:
        ckpt.check_config(config)
    ckpt.save_config(config)
    console.print(
        f"[bold]{config.model}[/] on {data.name}: {len(data.x_train):,} train / "
        f"{len(data.x_test):,} test images of {data.x_train.shape[1:]}; output in {out}"
    )

    dense, base_error = _dense(config, data, ckpt, console, args.resume)
    console.print(f"dense: {count_params(dense):,} parameters, test error {_pct(base_error)}")
    state = _rounds(config, data, dense, ckpt, console, args.resume)
    history = [checkpoints.record_dict(r) for r in state.history]
    final_error = 1.0 - state.history[-1].metric
    summary = summarize(state.params, state.masks)
    console.print(_layer_table(config, summary, state.history[-1]))

    sizes = run.export(state.params, state.masks, out / "model.jaxprune")
    results: dict[str, Any] = {
        "config": dataclasses.asdict(config),
        "data": {"name": data.name, "train": len(data.x_train), "test": len(data.x_test)},
        "dense_error": base_error,
        "pruned_error": final_error,
        "parameters": summary.total,
        "kept": summary.kept,
        "kept_fraction": summary.kept_fraction,
        "kept_per_layer": {r.path: r.kept_fraction for r in summary.rows},
        "compression": summary.total / max(summary.kept, 1),
        "history": history,
        **sizes,
        "file_ratio": sizes["dense_npz_bytes"] / sizes["file_bytes"],
    }
    if not args.no_timing:
        with console.status("timing sparse against dense inference"):
            results["inference"] = run.time_inference(
                config, state.params, state.masks, data.x_train.shape[1:]
            )
    results["dead_units"] = run.dead_units(config, state.params, state.masks)
    console.print(f"dead-neuron removal: {results['dead_units']['summary']}")
    if args.structured is not None:
        with console.status(f"structured: pruning {args.structured:.0%} of hidden neurons"):
            results["structured"] = run.structured(config, data, dense, args.structured)
        console.print(run.structured_line(results["structured"]))
    curve = [{"round": 0, "kept_fraction": 1.0, "accuracy": 1.0 - base_error}] + [
        {"round": h["round"] + 1, "kept_fraction": h["kept_total"], "accuracy": h["metric"]}
        for h in history
    ]
    plots = _plots(config, out, dense, state.params, curve)
    if args.sensitivity:
        results["sensitivity"] = _sensitivity(config, data, dense, out, None, console)
        plots.append(out / "sensitivity.png")
    results["wall_seconds"] = time.perf_counter() - started
    checkpoints.write_json(out / "results.json", results)
    console.print(_table1(results))
    console.print(
        f"wrote {out / 'results.json'}, {out / 'model.jaxprune'}, "
        + ", ".join(str(p) for p in plots)
    )
    return 0


def _table1(results: dict) -> str:
    """Han et al. 2015, Table 1 style: one line of the whole result."""
    timing = results.get("inference", {})
    speed = ", ".join(f"batch {b} {t['ratio']:.2f}x" for b, t in timing.items()) or "not timed"
    return (
        f"[bold]error {_pct(results['dense_error'])} -> {_pct(results['pruned_error'])}[/]   "
        f"parameters {results['parameters']:,} -> {results['kept']:,} "
        f"({results['compression']:.1f}x fewer)   file {results['file_bytes']:,} B vs dense .npz "
        f"{results['dense_npz_bytes']:,} B ({results['file_ratio']:.1f}x smaller)   "
        f"sparse/dense time: {speed}"
    )


def _sensitivity_command(args: argparse.Namespace, console: Console) -> int:
    config = _config(args)
    data = load_dataset(args.data_dir)
    ckpt = Checkpoints(args.out)
    dense, error = _dense(config, data, ckpt, console, resume=True)
    console.print(f"dense {config.model} on {data.name}: test error {_pct(error)}")
    result = _sensitivity(config, data, dense, args.out, args.grid, console)
    checkpoints.write_json(args.out / "sensitivity.json", result)
    console.print(f"wrote {args.out / 'sensitivity.json'}, {args.out / 'sensitivity.png'}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command line; returns the exit status (2 for bad input, 130 on Ctrl-C)."""
    args = _parser().parse_args(argv)
    console = Console()
    try:
        if args.command == "sensitivity":
            return _sensitivity_command(args, console)
        return _pipeline(args, console)
    except (DataError, ConfigError, FileFormatError) as e:
        console.print(f"jaxprune: error: {e}", markup=False, highlight=False)
        return 2
    except KeyboardInterrupt:
        console.print("interrupted: finished rounds are checkpointed; rerun with --resume")
        return 130


if __name__ == "__main__":
    sys.exit(main())
