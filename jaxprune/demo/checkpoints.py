"""The demo's checkpoints: the dense params, then one file per round, written atomically.

A round counts as done once its JSON (written last) exists; ``--resume`` continues from there.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from jaxprune._tree import PyTree
from jaxprune.demo.data import Dataset
from jaxprune.demo.recipes import Config, ConfigError
from jaxprune.demo.run import retrain_optimizer
from jaxprune.rounds import RoundRecord, RoundsState
from jaxprune.storage import load, save
from jaxprune.transform import keep_pruned


def q_of(record: RoundRecord, layer: str) -> float | None:
    """The q a round used for ``layer`` (None for a kept-fraction round)."""
    if isinstance(record.q, dict):
        return record.q.get(layer, record.q["*"])
    return record.q


def write_json(path: Path, obj: Any) -> None:
    """Writes JSON atomically: a temp file in the same folder, then a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def record_dict(record: Any) -> dict[str, Any]:
    return dict(record._asdict())


class Checkpoints:
    """The run's checkpoints in ``out/checkpoints``: the dense params, then one file per round.

    Each file is written atomically by :func:`jaxprune.save`; a round counts as done once its
    JSON (written last) exists, so a run killed mid-write resumes from the round before.
    """

    def __init__(self, out: Path):
        self.dir = Path(out) / "checkpoints"

    def save_config(self, config: Config) -> None:
        write_json(self.dir / "config.json", dataclasses.asdict(config))

    def check_config(self, config: Config) -> None:
        path = self.dir / "config.json"
        if not path.exists():
            return
        saved = json.loads(path.read_text())
        now = json.loads(json.dumps(dataclasses.asdict(config)))
        changed = sorted(k for k in now if saved.get(k) != now[k])
        if changed:
            raise ConfigError(
                f"--resume: the checkpoints in {self.dir} were made with other options "
                f"({', '.join(changed)}); rerun with the same options or another --out."
            )

    def save_dense(self, params: PyTree, error: float) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        save(self.dir / "dense.jaxprune", {"params": params}, compress=False)
        write_json(self.dir / "dense.json", {"error": error})

    def load_dense(self) -> tuple[PyTree, float] | None:
        if not (self.dir / "dense.json").exists():
            return None
        error = json.loads((self.dir / "dense.json").read_text())["error"]
        return load(self.dir / "dense.jaxprune")["params"], error

    def save_round(self, state: RoundsState) -> None:
        k = state.round
        tree = {
            "params": state.params,
            "masks": state.masks,
            "opt": jax.tree.leaves(state.opt_state),
        }
        if state.model_state is not None:
            tree["model_state"] = state.model_state
        save(self.dir / f"round-{k}.jaxprune", tree, compress=False)
        write_json(self.dir / f"round-{k}.json", [record_dict(r) for r in state.history])

    def load_round(self, config: Config, data: Dataset) -> RoundsState | None:
        done = sorted(int(p.stem.split("-")[1]) for p in self.dir.glob("round-*.json"))
        if not done:
            return None
        k = done[-1]
        tree = load(self.dir / f"round-{k}.jaxprune")
        history = json.loads((self.dir / f"round-{k}.json").read_text())
        # The optimizer state is stored as its leaves; its structure comes from a fresh init.
        lr = config.lr * config.retrain_lr_scale
        tx = keep_pruned(
            retrain_optimizer(config, data)(lr), tree["masks"], weight_decay=config.weight_decay
        )
        template = tx.init(tree["params"])
        opt_state = jax.tree.unflatten(
            jax.tree.structure(template), [jnp.asarray(x) for x in tree["opt"]]
        )
        records = tuple(RoundRecord(**r) for r in history)
        masks = jax.tree.map(jnp.asarray, tree["masks"])
        params = jax.tree.map(jnp.asarray, tree["params"])
        model_state = jax.tree.map(jnp.asarray, tree.get("model_state"))
        return RoundsState(k, params, masks, opt_state, records, model_state)
