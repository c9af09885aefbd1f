"""The ``jaxprune`` command: Han et al. 2015 on LeNet-300-100 and LeNet-5, end to end.

jaxprune demo                                     # built-in 8x8 digits, about a minute
jaxprune run --model lenet300 --data-dir DIR      # real MNIST, the paper's setting
jaxprune sensitivity --model lenet5 --data-dir DIR
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)

from jaxprune.analysis import accuracy
from jaxprune.demo import checkpoints, devices, recipes, report, run
from jaxprune.demo.checkpoints import CheckpointError, Checkpoints, OutLock
from jaxprune.demo.data import DataError, load_dataset
from jaxprune.demo.models import count_params
from jaxprune.demo.recipes import Config, ConfigError
from jaxprune.storage import FileFormatError
from jaxprune.summary import summarize

# The 1,348 training digits give few steps per epoch: retrain longer, at half the dense rate.
DEMO = Config(
    model="lenet300",
    epochs=40,
    rounds=4,
    q=(1.0, 1.5, 1.9, 2.2),
    retrain_epochs=20,
    retrain_learning_rate_scale=0.5,
    learning_rate=0.1,
    batch_size=64,
)


class _UsageError(Exception):
    """A command line argparse cannot parse; :func:`main` prints it as one line."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's own prints the whole usage first
        raise _UsageError(f"{message} ({self.prog} --help lists the options)")


def _floats(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if not values or not all(math.isfinite(v) for v in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated finite numbers, got {text!r}")
    return values


def _scales(text: str) -> tuple[tuple[str, float], ...]:
    try:
        pairs = [item.split("=") for item in text.split(",")]
        return tuple((name.strip(), float(value)) for name, value in pairs)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected LAYER=FACTOR pairs such as conv1=0.3,conv2=0.8, got {text!r}"
        ) from None


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="jaxprune", description="Prune LeNets the way Han et al. 2015 did, with JAX."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    # Unset options (None) take their value from the command's base config: DEMO for `demo`, the
    # model's recipe (recipes.RECIPES) for `run` and `sensitivity`.
    def common(p: argparse.ArgumentParser, out: str) -> None:
        p.add_argument("--model", choices=["lenet300", "lenet5"], default="lenet300")
        p.add_argument("--epochs", type=int, help="dense training epochs")
        p.add_argument("--learning-rate", type=float, help="dense learning rate")
        p.add_argument("--weight-decay", type=float, help="L2 coefficient")
        p.add_argument("--batch-size", type=int)
        p.add_argument("--dropout", type=float, help="dropout on the later dense layers' inputs")
        p.add_argument("--seed", type=int)
        p.add_argument("--out", type=Path, default=Path(out), help="output folder")
        p.add_argument(
            "--overwrite", action="store_true", help="replace another run's files in --out"
        )

    def pruning(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--rounds", type=int, help="default: the length of --q or --sparsity, else the recipe's"
        )
        group = p.add_mutually_exclusive_group()
        group.add_argument("--q", type=_floats, help="Han's q per round, e.g. 1.0,1.5,2.0")
        group.add_argument(
            "--sparsity",
            type=_floats,
            help="fraction of each layer to prune per round (0.92 keeps 8%%), instead of --q",
        )
        p.add_argument(
            "--q-scale",
            type=_scales,
            metavar="LAYER=FACTOR,...",
            help="prune these layers with FACTOR * q (e.g. conv1=0.3 keeps more of conv1)",
        )
        p.add_argument("--retrain-epochs", type=int, help="retraining epochs per round")
        p.add_argument(
            "--retrain-learning-rate-scale",
            type=float,
            help="retraining learning rate = --learning-rate * this",
        )
        p.add_argument("--resume", action="store_true", help="continue from --out's checkpoints")
        p.add_argument(
            "--structured",
            type=float,
            default=None,
            metavar="SPARSITY",
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
    ``--rounds`` without a schedule runs the first rounds of the base one. ``--sparsity`` drops
    the base's ``--q-scale``.
    """
    base = DEMO if args.command == "demo" else recipes.RECIPES[args.model]
    fields = {f.name for f in dataclasses.fields(Config)}
    given = {k: v for k, v in vars(args).items() if k in fields and v is not None}
    given["data_dir"] = None if args.command == "demo" else args.data_dir
    schedule = given.get("q", given.get("sparsity"))
    if schedule is not None and "rounds" not in given:
        given["rounds"] = len(schedule)
    if "sparsity" in given:
        given.setdefault("q_scale", ())
    elif "q" not in given and "rounds" in given:
        if given["rounds"] > base.rounds:
            raise ConfigError(
                f"--rounds {given['rounds']}: the {base.model} base schedule has {base.rounds} "
                "rounds; give --q (or --sparsity) with one value or one per round."
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

    def add(self, description: str, total: int) -> TaskID:
        return self.progress.add_task(description, total=total, note="")

    def advance(self, task: TaskID, note: str) -> None:
        self.progress.update(task, advance=1, note=note)


def _diverged(phase: str, epoch: int, loss: float, fix: str) -> None:
    """Stops a run whose loss is no longer finite, before anything of it is saved."""
    if not math.isfinite(loss):
        raise ConfigError(f"{phase} diverged (mean loss {loss} in epoch {epoch + 1}); lower {fix}.")


def _dense(config: Config, data: Any, ckpt: Checkpoints, console: Console, resume: bool):
    """Trains the dense model, or takes it from the checkpoints when resuming."""
    found = ckpt.load_dense() if resume else None
    if found is not None:
        console.print(f"dense model taken from {ckpt.dir}")
        return found

    def on_epoch(epoch: int, loss: float) -> None:
        _diverged("dense training", epoch, loss, "{learning_rate}")
        bars.advance(task, f"loss {loss:.4f}")

    with _Bars(console) as bars:
        task = bars.add("dense training", config.epochs)
        params = run.train_dense(config, data, run.init_params(config, data), on_epoch=on_epoch)
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

    def on_epoch(r: int, epoch: int, loss: float) -> None:
        _diverged(
            f"round {r + 1}'s retraining",
            epoch,
            loss,
            "{retrain_learning_rate_scale} or {learning_rate}",
        )
        bars.advance(tasks[r], f"loss {loss:.4f}")

    with _Bars(console) as bars:
        tasks = {
            r: bars.add(f"round {r + 1}/{config.rounds}", config.retrain_epochs)
            for r in range(state.round if state else 0, config.rounds)
        }
        for done in run.rounds(config, data, params, resume=state, on_epoch=on_epoch):
            ckpt.save_round(done)
            state = done
            bars.progress.console.print(report.round_line(done.history[-1], config))
    return state


def _claim(ckpt: Checkpoints, *, resume: bool, overwrite: bool, console: Console) -> None:
    """Refuses an --out holding another run's files, unless resuming it or told to overwrite."""
    found = ckpt.files()
    if overwrite and found:
        ckpt.clear()
        console.print(f"--overwrite: removed {len(found)} files of the earlier run in {ckpt.out}")
    elif found and not resume:
        names = ", ".join(str(p.relative_to(ckpt.out)) for p in found[:3])
        more = f" and {len(found) - 3} more" if len(found) > 3 else ""
        raise CheckpointError(
            f"{ckpt.out} holds another run's files ({names}{more}); pass --resume to continue "
            "it, --overwrite to replace it, or choose another --out."
        )


def _pipeline(args: argparse.Namespace, console: Console) -> int:
    config = _config(args)
    if args.resume and args.overwrite:
        raise ConfigError("--resume continues the run in --out, --overwrite replaces it: pick one.")
    if args.structured is not None:
        run.check_structured(config, args.structured)
    out: Path = args.out
    started = time.perf_counter()
    data = load_dataset(config.data_dir)
    run.check_q_scale(config, data)
    with OutLock(out):
        ckpt = Checkpoints(out, checkpoints.run_identity(config, data))
        _claim(ckpt, resume=args.resume, overwrite=args.overwrite, console=console)
        return _stages(args, config, data, ckpt, console, started)


def _stages(args, config: Config, data: Any, ckpt: Checkpoints, console: Console, started) -> int:
    out = ckpt.out
    split_over = devices.training_devices(config, data)
    split = f"; each batch split over {split_over} devices" if split_over > 1 else ""
    console.print(
        f"[bold]{config.model}[/] on {data.name}: {len(data.x_train):,} train / "
        f"{len(data.x_test):,} test images of {data.x_train.shape[1:]}{split}; output in {out}"
    )
    dense, base_error = _dense(config, data, ckpt, console, args.resume)
    console.print(f"dense: {count_params(dense):,} parameters, test error {report.pct(base_error)}")
    state = _rounds(config, data, dense, ckpt, console, args.resume)
    history = [report.history_entry(r, config) for r in state.history]
    summary = summarize(state.params, state.masks)
    console.print(report.layer_table(config, summary, state.history[-1]))

    sizes = run.export(state.params, state.masks, out / "model.jaxprune")
    results: dict[str, Any] = {
        "config": dataclasses.asdict(config),
        "run_sha256": ckpt.run_hash,
        "data": {"name": data.name, "train": len(data.x_train), "test": len(data.x_test)},
        "training_devices": split_over,
        "dense_error": base_error,
        "pruned_error": 1.0 - state.history[-1].metric,
        "weights": summary.total,
        "weights_kept": summary.kept,
        "kept_fraction": summary.kept_fraction,
        "kept_fraction_per_layer": {r.path: r.kept_fraction for r in summary.rows},
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
    curve = [{"round": 0, "kept_fraction": 1.0, "accuracy": 1.0 - base_error}, *history]
    plots = report.plots(config, out, dense, state.params, curve)
    if args.sensitivity:
        results["sensitivity"] = report.sensitivity(config, data, dense, out, None, console)
        plots.append(out / "sensitivity.png")
    results["wall_seconds"] = time.perf_counter() - started
    checkpoints.write_json(out / "results.json", results)
    console.print(report.table1(results))
    console.print(
        f"wrote {out / 'results.json'}, {out / 'model.jaxprune'}, "
        + ", ".join(str(p) for p in plots)
    )
    return 0


def _sensitivity_command(args: argparse.Namespace, console: Console) -> int:
    config = _config(args)
    if args.grid is not None and not all(q >= 0 for q in args.grid):
        raise ConfigError(f"--grid values must be >= 0, got {args.grid}.")
    data = load_dataset(config.data_dir)
    out: Path = args.out
    with OutLock(out):
        ckpt = Checkpoints(out, checkpoints.run_identity(config, data))
        if args.overwrite:
            _claim(ckpt, resume=False, overwrite=True, console=console)
        found = ckpt.load_dense(dense_only=True)
        if found is None:
            _claim(ckpt, resume=False, overwrite=False, console=console)
            found = _dense(config, data, ckpt, console, resume=False)
        else:
            console.print(f"dense model taken from {ckpt.dir}")
        dense, error = found
        console.print(f"dense {config.model} on {data.name}: test error {report.pct(error)}")
        result = report.sensitivity(config, data, dense, out, args.grid, console)
        checkpoints.write_json(out / "sensitivity.json", result)
    console.print(f"wrote {out / 'sensitivity.json'}, {out / 'sensitivity.png'}")
    return 0


def _ask_for_devices(model: str) -> None:
    """Asks JAX for the CPU devices ``model``'s data-parallel steps use (``devices.cpu_devices``).

    Only before JAX's first operation in this process, and only where the user has not chosen a
    count (``jax_num_cpu_devices``, or ``--xla_force_host_platform_device_count`` in
    ``XLA_FLAGS``): later runs in one process keep the devices the first one had.
    """
    n = devices.cpu_devices(model)
    chosen = "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", "")
    if n == 1 or chosen or jax.config.values["jax_num_cpu_devices"] != -1:
        return
    with contextlib.suppress(RuntimeError):  # JAX has started: its devices stay as they are
        jax.config.update("jax_num_cpu_devices", n)


def _flag(field: str) -> str:
    return "--" + field.replace("_", "-")


def _fail(message: str) -> int:
    print(f"jaxprune: error: {message}", file=sys.stderr, flush=True)
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command line; returns the exit status (2 for bad input, 130 on Ctrl-C).

    Every failure it foresees is one line on stderr, ``jaxprune: error: ...``, and status 2; the
    checkpoints written before it stay as they were.
    """
    try:
        args = _parser().parse_args(argv)
        _ask_for_devices(args.model)
        console = Console()
        if args.command == "sensitivity":
            return _sensitivity_command(args, console)
        return _pipeline(args, console)
    except _UsageError as e:
        return _fail(str(e))
    except ConfigError as e:
        return _fail(e.render(_flag))
    except (DataError, FileFormatError) as e:
        return _fail(str(e))
    except OSError as e:  # a full disk, a read-only --out, an --out under a file, ...
        where = f"{e.filename}: " if e.filename else ""
        return _fail(f"{where}{e.strerror or e} (--out must be a folder with room to write in).")
    except KeyboardInterrupt:
        print(
            "interrupted: finished rounds are checkpointed; rerun with --resume",
            file=sys.stderr,
            flush=True,
        )
        return 130


if __name__ == "__main__":
    sys.exit(main())
