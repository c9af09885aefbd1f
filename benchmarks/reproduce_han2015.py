"""Reproduce Han et al. 2015 on MNIST over seeds, beside the paper and two baselines.

For each seed 0..N-1 this runs ``jaxprune run`` with the model's recipe
(``jaxprune.demo.recipes.RECIPES``, documented in the README), then, from that run's own dense
checkpoint (the dense model is not trained again), two baselines with the same retraining
schedule (epochs, learning rate, cosine restarts, dropout rule, weight decay, seeds), pruned each
round to Han's kept fractions of that round (Blalock et al. 2020 ask for such controls):

* random: in every layer, Han's kept fraction of that layer, the survivors drawn uniformly at
  random among the weights still kept (pruned stays pruned);
* global magnitude: one magnitude threshold over all prunable layers, Han's total kept fraction.

It prints, per model, the mean +- standard deviation over seeds of the dense error, of each
round's error for the three and of the kept fraction, with the paper's figures, and the claim
the means support: the fewest weights whose mean error is within 0.1 pt of the mean dense error.

    python benchmarks/reproduce_han2015.py --model lenet300 --seeds 3   # ~3 min per run
    python benchmarks/reproduce_han2015.py --seeds 3 --resume           # go on after a stop
    python benchmarks/reproduce_han2015.py --quick --seeds 2            # 8x8 digits, seconds

Each Han run checkpoints in ``OUT/MODEL/seedS``; ``--resume`` continues it and reuses finished
baselines (``random.json``, ``global.json`` beside it), otherwise they are redone from scratch
(``--overwrite``). ``--json`` writes the aggregated figures, ``--markdown`` prints README rows.
Each seed's wall time and the others' load meanwhile are kept in ``timing.json`` beside its runs
and added up over invocations, so a ``--resume`` pass that only aggregates does not stand for
the runs it found finished.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from jaxprune.demo import checkpoints, run
from jaxprune.demo.cli import main as jaxprune_main
from jaxprune.demo.data import load_dataset
from jaxprune.demo.recipes import PAPER, Config

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure import Load

MNIST = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"

QUICK = ["--epochs", "2", "--rounds", "2", "--q", "1,1.5", "--retrain-epochs", "1"]

METHODS = ("han", "random", "global")
# Han: magnitude per layer (q * std); random: Han's per-layer kept; global: Han's total kept.
TITLES = {"han": "Han", "random": "random", "global": "global"}
WITHIN = 0.001  # 0.1 percentage point of error


def _tuples(value: Any) -> Any:
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def config_of(results: dict) -> Config:
    """The :class:`Config` a ``results.json`` was made with."""
    return Config(**{k: _tuples(v) for k, v in results["config"].items()}).checked()


def baseline_config(han: Config, history: list[dict], kind: str) -> Config:
    """Han's config with each round pruned to Han's kept fractions: ``kind`` random or global.

    The targets are sparsities, ``1 - kept_fraction`` of Han's rounds.
    """
    sparsity: tuple[Any, ...]
    if kind == "random":
        sparsity = tuple(
            tuple((path, 1.0 - k) for path, k in h["kept_fraction_per_layer"].items())
            for h in history
        )
        fields = {"ranking": "random", "scope": "layer"}
    else:
        sparsity = tuple(1.0 - h["kept_fraction"] for h in history)
        fields = {"ranking": "magnitude", "scope": "global"}
    return dataclasses.replace(han, sparsity=sparsity, q=(), q_scale=(), **fields).checked()


def han_run(model: str, seed: int, out: Path, args: argparse.Namespace) -> dict:
    """One ``jaxprune`` run (the recipe, or the tiny digits schedule); returns its results."""
    if args.quick:
        argv = ["demo", "--model", model, *QUICK]
    else:
        if not args.data_dir.is_dir():
            raise SystemExit(f"no MNIST at {args.data_dir}; pass --data-dir (or use --quick)")
        argv = ["run", "--model", model, "--data-dir", str(args.data_dir)]
    argv += ["--seed", str(seed), "--out", str(out), "--no-timing"]
    argv.append("--resume" if args.resume else "--overwrite")
    if jaxprune_main(argv) != 0:
        raise SystemExit(f"jaxprune {' '.join(argv)} failed")
    return json.loads((out / "results.json").read_text())


def baseline_run(han_out: Path, results: dict, kind: str, resume: bool) -> list[dict]:
    """Rounds of the ``kind`` baseline from the Han run's dense checkpoint, cached beside it."""
    config = baseline_config(config_of(results), results["history"], kind)
    cached = han_out / f"{kind}.json"
    wanted = json.loads(json.dumps(dataclasses.asdict(config)))
    if resume and cached.exists():
        saved = json.loads(cached.read_text())
        if saved.get("config") == wanted and saved.get("run_sha256") == results["run_sha256"]:
            return saved["history"]
    data = load_dataset(config.data_dir)
    ckpt = checkpoints.Checkpoints(han_out, checkpoints.run_identity(config, data))
    found = ckpt.load_dense(dense_only=True)  # refuses a dense model of other dense settings
    if found is None:
        raise SystemExit(f"no dense checkpoint in {ckpt.dir}")
    states = list(run.rounds(config, data, found[0]))
    history = [
        {
            "round": r.round + 1,
            "kept_fraction": r.kept_fraction,
            "kept_fraction_per_layer": r.kept_fraction_per_layer,
            "accuracy": r.metric,
        }
        for r in states[-1].history
    ]
    checkpoints.write_json(
        cached, {"config": wanted, "run_sha256": results["run_sha256"], "history": history}
    )
    return history


def timing_log(out: Path, resume: bool) -> dict:
    """The seed's record of its runs' wall times and load, kept in ``OUT/timing.json``.

    Every invocation that runs (or resumes, or only finds finished) a seed's work adds its
    seconds, so a seed's time is what its runs took over all invocations, not the last pass.
    Runs made before the file existed were not timed: ``untimed_before`` says so. A run killed
    before it finished is not counted (its resumed rest is).
    """
    path = out / "timing.json"
    if resume and path.exists():
        return json.loads(path.read_text())
    earlier = resume and out.is_dir() and any(out.iterdir())
    return {"untimed_before": earlier, "runs": []}


def timed(out: Path, log: dict, kind: str, fn, *args):
    """``fn(*args)``, its wall time and the others' load appended to the seed's timing log."""
    start = time.perf_counter()
    with Load() as load:
        result = fn(*args)
    log["runs"].append(
        {"kind": kind, "seconds": time.perf_counter() - start, "other_busy_cores": load.cores}
    )
    checkpoints.write_json(out / "timing.json", log)
    return result


def seed_run(model: str, seed: int, args: argparse.Namespace, console: Console) -> dict:
    """Han's run and both baselines for one seed: errors, kept fractions, time and load."""
    out = args.out / model / f"seed{seed}"
    log = timing_log(out, args.resume)
    results = timed(out, log, "han", han_run, model, seed, out, args)
    record = {
        "seed": seed,
        "data": results["data"]["name"],
        "dense_error": results["dense_error"],
        "kept_fraction_per_layer": results["kept_fraction_per_layer"],
    }
    for kind in METHODS:
        if kind == "han":
            history = results["history"]
        else:
            with console.status(f"{model} seed {seed}: {kind} baseline"):
                history = timed(out, log, kind, baseline_run, out, results, kind, args.resume)
        record[kind] = [
            {"kept_fraction": h["kept_fraction"], "error": 1.0 - h["accuracy"]} for h in history
        ]
    timed_here = not log["untimed_before"]
    record["seconds"] = sum(r["seconds"] for r in log["runs"]) if timed_here else None
    record["other_busy_cores"] = other_load(log["runs"]) if timed_here else None
    return record


def mean_std(values: Sequence[float]) -> dict[str, float]:
    """Mean and sample standard deviation (0 for one value)."""
    values = [float(v) for v in values]
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": statistics.fmean(values), "std": std, "n": len(values)}


def aggregate(model: str, records: list[dict]) -> dict:
    """Mean +- std over seeds of the dense error, each round's errors and kept fractions."""
    rounds = len(records[0]["han"])
    timed = [r["seconds"] for r in records if r.get("seconds") is not None]
    summary: dict[str, Any] = {
        "model": model,
        "data": records[0]["data"],
        "seeds": [r["seed"] for r in records],
        "paper": PAPER[model],
        "dense_error": mean_std([r["dense_error"] for r in records]),
        "rounds": [],
        "kept_fraction_per_layer": {
            layer: mean_std([r["kept_fraction_per_layer"][layer] for r in records])
            for layer in records[0]["kept_fraction_per_layer"]
        },
        "seconds": mean_std(timed) if timed else None,
        "timed_seeds": len(timed),
        "other_busy_cores": other_load(records),
    }
    for k in range(rounds):
        row = {"round": k + 1}
        for kind in METHODS:
            row[kind] = {
                "error": mean_std([r[kind][k]["error"] for r in records]),
                "kept_fraction": mean_std([r[kind][k]["kept_fraction"] for r in records]),
            }
        summary["rounds"].append(row)
    summary["fewest_within"] = {kind: fewest_within(summary, kind) for kind in METHODS}
    return summary


def other_load(records: list[dict]) -> float | None:
    """Others' busy cores while the timed runs (or seeds) ran, weighted by their seconds."""
    timed = [r for r in records if r.get("other_busy_cores") is not None]
    seconds = sum(r["seconds"] for r in timed)
    if not seconds:
        return None
    return sum(r["seconds"] * r["other_busy_cores"] for r in timed) / seconds


def fewest_within(summary: dict, kind: str, points: float = WITHIN) -> dict | None:
    """The round of fewest mean kept weights whose MEAN error is within ``points`` of dense."""
    limit = summary["dense_error"]["mean"] + points
    ok = [r for r in summary["rounds"] if r[kind]["error"]["mean"] <= limit]
    if not ok:
        return None
    best = min(ok, key=lambda r: r[kind]["kept_fraction"]["mean"])
    return {
        "round": best["round"],
        "kept_fraction": best[kind]["kept_fraction"]["mean"],
        "error": best[kind]["error"]["mean"],
    }


def pm(stat: dict, scale: float = 100.0, digits: int = 2) -> str:
    """``'1.62 ± 0.04%'``."""
    return f"{scale * stat['mean']:.{digits}f} ± {scale * stat['std']:.{digits}f}%"


def claim(summary: dict, kind: str = "han") -> str:
    best = summary["fewest_within"][kind]
    head = "fewest weights whose MEAN error is within 0.1 pt of the mean dense error"
    if best is None:
        return f"{head}: none (no round's mean error is that close)"
    return (
        f"{head}: {100 * best['kept_fraction']:.2f}% (round {best['round']}, mean error "
        f"{100 * best['error']:.2f}%)"
    )


def table(summary: dict) -> Table:
    """One rich table: dense, every round (Han, random, global), per-layer kept, the paper."""
    paper, n = summary["paper"], len(summary["seeds"])
    table = Table(
        title=f"{summary['model']} on {summary['data']}: mean ± std over {n} seeds",
        caption=claim(summary)
        + "\n(Han: magnitude per layer; random: Han's kept per layer, drawn at random; "
        "global: one magnitude threshold, Han's total kept)",
    )
    table.add_column("")
    table.add_column("kept %")
    for kind in METHODS:
        table.add_column(f"{TITLES[kind]} error", justify="right")
    table.add_column("paper", justify="right")
    dense = pm(summary["dense_error"])
    table.add_row("dense", "100%", dense, dense, dense, f"{100 * paper['error_dense']:.2f}%")
    last = len(summary["rounds"])
    for row in summary["rounds"]:
        errors = [pm(row[kind]["error"]) for kind in METHODS]
        mark = ""
        if row["round"] == last:
            mark = f"{100 * paper['error_pruned']:.2f}% at {100 * paper['kept_fraction']:.0f}%"
        table.add_row(f"round {row['round']}", pm(row["han"]["kept_fraction"]), *errors, mark)
    for path, stat in summary["kept_fraction_per_layer"].items():
        layer = path.rsplit("/", 1)[0]  # the path minus its last key, as the demo names layers
        paper_kept = paper["kept_fraction_per_layer"].get(layer)
        table.add_row(
            f"  {layer} kept % (last round)",
            pm(stat),
            "",
            "",
            "",
            "-" if paper_kept is None else f"{100 * paper_kept:.0f}%",
        )
    table.add_row("wall time per seed", minutes(summary))
    return table


def minutes(summary: dict) -> str:
    """The mean wall time of the seeds whose runs were timed, or why there is none."""
    if not summary.get("seconds"):
        return "not recorded (runs made before timing.json was kept)"
    n, of = summary.get("timed_seeds", len(summary["seeds"])), len(summary["seeds"])
    return f"{summary['seconds']['mean'] / 60:.1f} min" + ("" if n == of else f" ({n} of {of})")


def markdown(summary: dict) -> str:
    """The README table for one model (mean ± std over seeds), with the claim under it."""
    paper, n = summary["paper"], len(summary["seeds"])
    lines = [
        f"**{summary['model']}** ({summary['data']}, mean ± std over {n} seeds)",
        "",
        "| | kept % | Han et al. (magnitude, per layer) | random (same per-layer kept) "
        "| global magnitude (same total kept) |",
        "| --- | ---: | ---: | ---: | ---: |",
        f"| dense | 100% | {pm(summary['dense_error'])} | | |",
    ]
    for row in summary["rounds"]:
        errors = " | ".join(pm(row[kind]["error"]) for kind in METHODS)
        lines.append(f"| round {row['round']} | {pm(row['han']['kept_fraction'])} | {errors} |")
    lines.append(
        f"| paper | {100 * paper['kept_fraction']:.0f}% | {100 * paper['error_pruned']:.2f}% "
        f"(dense {100 * paper['error_dense']:.2f}%) | | |"
    )
    lines += ["", claim(summary) + "."]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, dict]:
    """Runs the reproduction; returns ``{model: aggregated figures}`` (what ``--json`` writes)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["lenet300", "lenet5", "both"], default="both")
    parser.add_argument("--seeds", type=int, default=3, help="run seeds 0..N-1")
    parser.add_argument("--data-dir", type=Path, default=MNIST)
    parser.add_argument("--out", type=Path, default=Path("runs/han2015"))
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--quick", action="store_true", help="a smoke run on the 8x8 digits")
    parser.add_argument("--json", type=Path, default=None, help="default: OUT/summary.json")
    parser.add_argument("--markdown", action="store_true", help="also print the README rows")
    parser.add_argument(
        "--report", type=Path, default=None, help="print the tables of this --json; run nothing"
    )
    args = parser.parse_args(argv)
    if args.seeds < 1:
        parser.error("--seeds must be >= 1")
    console = Console()
    if args.report is not None:
        summaries = json.loads(args.report.read_text())
        show(summaries, console, markdown_rows=args.markdown)
        return summaries
    models = ["lenet300", "lenet5"] if args.model == "both" else [args.model]
    summaries = {}
    for model in models:
        records = [seed_run(model, s, args, console) for s in range(args.seeds)]
        summaries[model] = aggregate(model, records)
        summaries[model]["per_seed"] = records
    show(summaries, console, markdown_rows=args.markdown)
    path = args.json or args.out / "summary.json"
    checkpoints.write_json(path, summaries)
    console.print(f"wrote {path}")
    return summaries


def show(summaries: dict[str, dict], console: Console, *, markdown_rows: bool) -> None:
    """Prints each model's table, the load, the baselines' claims and, if asked, README rows."""
    for summary in summaries.values():
        console.print(table(summary))
        load = summary.get("other_busy_cores")
        console.print(
            "others' load while the runs ran: not recorded"
            if load is None
            else f"other processes kept {load:.2f} cores busy on average while the runs ran"
        )
        for kind in ("random", "global"):
            console.print(f"  {kind}: {claim(summary, kind)}")
    if markdown_rows:
        for summary in summaries.values():
            print(markdown(summary) + "\n")


if __name__ == "__main__":
    main()
