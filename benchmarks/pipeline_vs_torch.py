"""Han et al.'s whole pipeline on LeNet-300-100, jaxprune against torch, on one schedule.

Both sides train the same network (784-300-100-10, ReLU) on the same data with the same schedule:
dense SGD (momentum 0.9, coupled L2 ``WEIGHT_DECAY``, constant learning rate), then ``ROUNDS``
rounds of Han's rule (in each layer keep ``|w| >= q * std(w)``, the std over the whole layer with
pruned entries as zeros; pruned stays pruned) each followed by retraining at 1/10 of the rate.

- jaxprune: what a user writes with the public API: the demo's ``LeNet300100``, the training set
  as a :class:`jaxprune.ArrayBatches` (on the device, shuffled there), dense epochs with
  ``make_retrain_step(...).epoch`` (one compiled loop an epoch), then
  :func:`jaxprune.prune_and_retrain` (``compute_masks`` + ``keep_pruned`` each round).
- torch: ``torch.nn.utils.prune.custom_from_mask`` with the same rule (the peer a PyTorch user
  would pick), ``torch.optim.SGD(weight_decay=...)``.

Each side runs in its own fresh process, the two alternating, so the wall time includes starting
Python, the imports and loading the data, as a user sees it. The parent prints per run the wall
time, the phases, the errors and the weights kept, and the others' load on the cores during that
run (``measure.Load``); then the ratio jaxprune / torch of each pair. Torch is optional: without
it only jaxprune runs. Data: MNIST from ``--data-dir`` (default ``../shared/data/mnist`` beside
the checkout, when it exists), else the 8x8 digits that ship with scikit-learn.

    python benchmarks/pipeline_vs_torch.py [--repeats N] [--quick] [--data-dir DIR | --digits]

Torch's OpenMP threads slow down 10-40x when another process takes a core: compare on a quiet
machine (the load column says whether it was).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

from measure import Load

MNIST = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"
SCHEDULE = {
    "epochs": 12,
    "rounds": 5,
    "retrain_epochs": 12,
    "q": [1.0, 1.5, 1.9, 2.2, 2.4],
    "learning_rate": 0.05,
    "weight_decay": 1e-4,
    "batch_size": 128,
}
QUICK = {"epochs": 2, "rounds": 2, "retrain_epochs": 1, "q": [1.0, 1.5]}


def _data(data_dir: str | None):
    from jaxprune.demo.data import load_dataset

    return load_dataset(data_dir)


def _jaxprune_side(schedule: dict, data_dir: str | None) -> dict:
    import jax
    import optax

    import jaxprune
    from jaxprune.analysis import accuracy
    from jaxprune.demo.models import LeNet300100

    data = _data(data_dir)
    start = time.perf_counter()
    model = LeNet300100()
    params = jax.jit(model.init)(jax.random.key(0), data.x_train[:1])["params"]  # one compile
    # The training set on the device, each epoch's shuffled batches drawn there: one compiled
    # loop per epoch, as torch's side indexes its tensors in place.
    train = jaxprune.ArrayBatches(
        (data.x_train, data.y_train), batch_size=schedule["batch_size"], seed=0
    )

    def loss_fn(params, batch, rng):
        del rng  # no dropout
        x, y = batch
        logits = model.apply({"params": params}, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    def sgd(learning_rate):
        return optax.chain(
            optax.add_decayed_weights(schedule["weight_decay"]),
            optax.sgd(learning_rate, momentum=0.9),
        )

    tx = sgd(schedule["learning_rate"])
    step = jaxprune.make_retrain_step(loss_fn, tx)
    state = jaxprune.retrain_state(params, tx, rng=jax.random.key(0))
    for e in range(schedule["epochs"]):
        state, _ = step.epoch(state, train, e)
    params = jax.block_until_ready(state.params)
    dense_s = time.perf_counter() - start

    def logits(p, x):
        return model.apply({"params": p}, x)

    def error(p):
        return 1.0 - accuracy(logits, p, data.x_test, data.y_test)

    dense_error = error(params)
    start = time.perf_counter()
    *_, last = jaxprune.prune_and_retrain(
        params,
        loss_fn,
        dataclasses.replace(train, seed=1),  # its own shuffles
        error,
        rounds=schedule["rounds"],
        optimizer=sgd(schedule["learning_rate"] / 10),
        q=schedule["q"],
        epochs=schedule["retrain_epochs"],
    )
    rounds_s = time.perf_counter() - start
    record = last.history[-1]
    return {
        "dense_s": dense_s,
        "rounds_s": rounds_s,
        "dense_error": dense_error,
        "error": record.metric,
        "kept": record.kept_fraction,
    }


def _torch_side(schedule: dict, data_dir: str | None) -> dict:
    import torch
    from torch.nn.utils import prune

    data = _data(data_dir)
    start = time.perf_counter()
    torch.manual_seed(0)
    x = torch.from_numpy(data.x_train.reshape(len(data.x_train), -1))
    y = torch.from_numpy(data.y_train.astype("int64"))
    x_test = torch.from_numpy(data.x_test.reshape(len(data.x_test), -1))
    y_test = torch.from_numpy(data.y_test.astype("int64"))
    layers = [torch.nn.Linear(x.shape[1], 300), torch.nn.Linear(300, 100), torch.nn.Linear(100, 10)]
    model = torch.nn.Sequential(layers[0], torch.nn.ReLU(), layers[1], torch.nn.ReLU(), layers[2])
    bs = schedule["batch_size"]

    def train(opt, epochs):
        for _ in range(epochs):
            order = torch.randperm(len(x))
            for i in range(0, len(x) - len(x) % bs, bs):
                idx = order[i : i + bs]
                opt.zero_grad()
                torch.nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
                opt.step()

    def sgd(learning_rate):
        return torch.optim.SGD(
            model.parameters(),
            lr=learning_rate,
            momentum=0.9,
            weight_decay=schedule["weight_decay"],
        )

    def error():
        with torch.no_grad():
            return 1.0 - (model(x_test).argmax(1) == y_test).float().mean().item()

    train(sgd(schedule["learning_rate"]), schedule["epochs"])
    dense_s = time.perf_counter() - start
    dense_error = error()
    start = time.perf_counter()
    retrain = sgd(schedule["learning_rate"] / 10)  # holds weight_orig once pruning renames it
    for q in schedule["q"]:
        with torch.no_grad():
            for layer in layers:
                w = layer.weight  # the masked weight: pruned entries are zeros
                prune.custom_from_mask(layer, "weight", w.abs() >= q * w.std(correction=0))
        train(retrain, schedule["retrain_epochs"])
    rounds_s = time.perf_counter() - start
    kept = sum(int(layer.weight_mask.sum()) for layer in layers)
    total = sum(layer.weight_mask.numel() for layer in layers)
    return {
        "dense_s": dense_s,
        "rounds_s": rounds_s,
        "dense_error": dense_error,
        "error": error(),
        "kept": kept / total,
        "threads": torch.get_num_threads(),
    }


def _child(side: str, schedule: dict, data_dir: str | None) -> None:
    result = (_jaxprune_side if side == "jaxprune" else _torch_side)(schedule, data_dir)
    print(json.dumps(result))


def _run(side: str, schedule: dict, data_dir: str | None) -> dict:
    cmd = [sys.executable, __file__, "--side", side, "--schedule", json.dumps(schedule)]
    if data_dir is not None:
        cmd += ["--data-dir", data_dir]
    with Load() as load:
        start = time.perf_counter()
        out = subprocess.run(cmd, capture_output=True, text=True, check=False)
        wall = time.perf_counter() - start
    if out.returncode != 0:
        raise SystemExit(f"the {side} run failed:\n{out.stderr[-3000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    return {**result, "side": side, "wall_s": wall, "load": load.cores}


def _has_torch() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2, help="pairs of runs (default 2)")
    parser.add_argument("--quick", action="store_true", help="a short schedule, for a smoke run")
    parser.add_argument("--data-dir", default=str(MNIST) if MNIST.exists() else None)
    parser.add_argument("--digits", action="store_true", help="the 8x8 digits, even with MNIST")
    parser.add_argument("--side", choices=["jaxprune", "torch"], help=argparse.SUPPRESS)
    parser.add_argument("--schedule", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        _child(args.side, json.loads(args.schedule), args.data_dir)
        return
    from rich.console import Console
    from rich.table import Table

    if args.digits:
        args.data_dir = None
    schedule = {**SCHEDULE, **(QUICK if args.quick else {})}
    sides = ["jaxprune", "torch"] if _has_torch() else ["jaxprune"]
    if len(sides) == 1:
        print("torch: not installed, only jaxprune runs")
    print(f"data: {args.data_dir or 'scikit-learn 8x8 digits'}; schedule: {schedule}")
    runs = []
    for r in range(args.repeats):
        for side in sides if r % 2 == 0 else sides[::-1]:
            runs.append(_run(side, schedule, args.data_dir))
    table = Table("run", "side", "wall s", "dense s", "rounds s", "dense err", "final err",
                  "kept", "others' load")  # fmt: skip
    for i, run in enumerate(runs):
        table.add_row(
            str(i // len(sides) + 1),
            run["side"] + (f" ({run['threads']} threads)" if "threads" in run else ""),
            f"{run['wall_s']:.1f}",
            f"{run['dense_s']:.1f}",
            f"{run['rounds_s']:.1f}",
            f"{100 * run['dense_error']:.2f}%",
            f"{100 * run['error']:.2f}%",
            f"{100 * run['kept']:.2f}%",
            f"{run['load']:.2f} cores" if not math.isnan(run["load"]) else "n/a",
        )
    Console(width=120).print(table)
    if len(sides) == 2:
        walls = {s: [r["wall_s"] for r in runs if r["side"] == s] for s in sides}
        ratios = [j / t for j, t in zip(walls["jaxprune"], walls["torch"], strict=True)]
        print(
            "jaxprune / torch wall time per pair: "
            + ", ".join(f"{v:.2f}" for v in ratios)
            + f" (median {statistics.median(ratios):.2f}; goal <= 0.7)"
        )


if __name__ == "__main__":
    main()
