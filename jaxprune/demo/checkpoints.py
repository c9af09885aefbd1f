"""The demo's checkpoints: the dense params, then one file per round, each tied to its run.

Every checkpoint is a ``.jaxprune`` file and a JSON written after it (a round counts as done once
its JSON exists). The JSON carries the run's identity: the whole :class:`Config` and the data's
fingerprint, their hash, the checkpoint's index (0 for the dense model), the sha256 of its
``.jaxprune`` file and the sha256 of the checkpoint it continues from. ``--resume`` follows that
chain and refuses anything that does not belong to the run it is asked to continue.

One run at a time writes an output folder: :class:`OutLock` holds an ``fcntl.flock`` on
``.jaxprune.lock`` there (the file names the holder's pid). The kernel drops the lock when its
process dies, however it dies, so a killed run never blocks the next one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune._atomic import write_atomically
from jaxprune._tree import PyTree
from jaxprune.demo.data import Dataset
from jaxprune.demo.recipes import Config, ConfigError
from jaxprune.demo.run import retrain_optimizer
from jaxprune.rounds import RoundRecord, RoundsState
from jaxprune.storage import load, save
from jaxprune.transform import keep_pruned

# 2: the config names learning_rate, retrain_learning_rate_scale and sparsity (format 1 named
# them lr, retrain_lr_scale and keep, the kept fraction); format 1 files are refused, not read.
FORMAT = 2

# The fields that decide the dense model; the others only shape the rounds after it.
DENSE_FIELDS = (
    "model",
    "data_dir",
    "epochs",
    "learning_rate",
    "weight_decay",
    "batch_size",
    "dropout",
    "seed",
)

# What a run writes into its --out besides checkpoints/ (--overwrite removes exactly these).
OUTPUTS = (
    "results.json",
    "model.jaxprune",
    "weights_fc1.png",
    "rounds.png",
    "sensitivity.json",
    "sensitivity.png",
)
_CHECKPOINT_NAME = re.compile(r"(dense|round-[1-9][0-9]*)\.(json|jaxprune)|config\.json")
_ROUND_JSON = re.compile(r"round-([1-9][0-9]*)\.json")


class CheckpointError(ConfigError):
    """Checkpoints that do not belong to the run at hand, or cannot be read; exit status 2."""


def q_of(record: RoundRecord, layer: str, path: str | None = None) -> float | None:
    """The q a round used for a leaf ``path`` of ``layer`` (None for a kept-fraction round).

    The exact leaf path wins over its layer, and the layer over ``'*'``, as in ``compute_masks``.
    """
    if isinstance(record.q, dict):
        for key in (path, layer):
            if key is not None and key in record.q:
                return record.q[key]
        return record.q["*"]
    return record.q


def write_json(path: Path, obj: Any) -> None:
    """Writes JSON atomically, as the model files are (temp file, fsync, rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(str(path), json.dumps(obj, indent=2).encode())


def read_json(path: Path) -> Any:
    """Reads a checkpoint's JSON; a damaged one is a :class:`CheckpointError` naming the file."""
    try:
        return json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(
            f"{path} is damaged ({e}); delete it to resume from the checkpoint before it, or "
            "pass --overwrite to start over."
        ) from None


def record_dict(record: Any) -> dict[str, Any]:
    return dict(record._asdict())


def digest(obj: Any) -> str:
    """The sha256 of ``obj`` as canonical JSON (sorted keys, no spaces)."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def run_identity(config: Config, data: Dataset) -> dict[str, Any]:
    """What decides a run's result: the whole config and a fingerprint of its data."""
    h = hashlib.sha256()
    for array in (data.x_train, data.y_train, data.x_test, data.y_test):
        h.update(np.ascontiguousarray(array).tobytes())
    return {
        "config": json.loads(json.dumps(dataclasses.asdict(config))),
        "data": {
            "name": data.name,
            "train": len(data.x_train),
            "test": len(data.x_test),
            "sha256": h.hexdigest(),
        },
    }


def differences(saved: dict, now: dict, fields: tuple[str, ...] | None = None) -> str:
    """``'{seed} 0 there, 1 now; ...'`` for the config fields (and data) that differ."""
    old, new = saved["config"], now["config"]
    names = sorted(fields or set(old) | set(new))
    diffs = [
        f"{{{k}}} {json.dumps(old.get(k))} there, {json.dumps(new.get(k))} now"
        for k in names
        if old.get(k) != new.get(k)
    ]
    if saved["data"] != now["data"]:
        a, b = saved["data"], now["data"]
        diffs.append(
            f"the data ({a['name']}, {a['train']}/{a['test']} images, sha256 {a['sha256'][:8]} "
            f"there; {b['name']}, {b['train']}/{b['test']}, {b['sha256'][:8]} now)"
        )
    return "; ".join(diffs)


class Checkpoints:
    """The run's checkpoints in ``out/checkpoints``: the dense params, then one file per round.

    With ``identity`` (:func:`run_identity`), every file written carries it and loading refuses
    files of another run, a broken chain, and a ``.jaxprune`` file its JSON does not describe.
    Without it (scripts, tests) files are written and read unchecked.
    """

    def __init__(self, out: Path, identity: dict[str, Any] | None = None):
        self.out = Path(out)
        self.dir = self.out / "checkpoints"
        self.identity = identity
        self.run_hash = digest(identity) if identity is not None else None
        self._last_sha: str | None = None  # the sha256 of the newest checkpoint written or read

    # --- the folder ---------------------------------------------------------------------------

    def files(self) -> list[Path]:
        """The files of a run found in ``out`` (checkpoints and outputs; not stray files)."""
        found = [self.out / name for name in OUTPUTS if (self.out / name).exists()]
        if self.dir.is_dir():
            found += sorted(p for p in self.dir.iterdir() if _CHECKPOINT_NAME.fullmatch(p.name))
        return found

    def clear(self) -> None:
        """Removes a run's files (what :meth:`files` lists), for ``--overwrite``."""
        for path in self.files():
            path.unlink()
        self._last_sha = None

    def _meta(self, index: int, sha: str) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "run": self.identity,
            "run_sha256": self.run_hash,
            "index": index,
            "sha256": sha,
            "parent_sha256": self._last_sha,
        }

    def _check_run(self, path: Path, meta: dict, fields: tuple[str, ...] | None = None) -> None:
        if self.identity is None:
            return
        if isinstance(meta, dict) and meta.get("format") == 1:
            raise CheckpointError(
                f"{path} was written by an older jaxprune, whose options were named lr, "
                "retrain_lr_scale and keep (now --learning-rate, --retrain-learning-rate-scale and "
                "--sparsity, the fraction pruned: 1 - keep); resume it with that version, pass "
                "--overwrite to start over, or use another --out."
            )
        if not isinstance(meta, dict) or meta.get("format") != FORMAT or not meta.get("run"):
            raise CheckpointError(
                f"{path} carries no run identity (an older jaxprune wrote it); pass --overwrite "
                "to start over, or use another --out."
            )
        same = meta["run_sha256"] == self.run_hash
        if fields is not None:  # compare only what decides this checkpoint
            keep = lambda r: ({k: r["config"].get(k) for k in fields}, r["data"])  # noqa: E731
            same = keep(meta["run"]) == keep(self.identity)
        if not same:
            what = differences(meta["run"], self.identity, fields) or "its identity hash"
            raise CheckpointError(
                f"{path} belongs to another run: {what}; rerun with that run's options, "
                "use another --out, or pass --overwrite to start over."
            )

    def _check_file(self, path: Path, meta: dict) -> None:
        if self.identity is not None and file_sha256(path) != meta["sha256"]:
            raise CheckpointError(
                f"{path} is not the file {path.with_suffix('.json').name} describes (sha256 "
                "differs): it was changed or replaced; pass --overwrite to start over."
            )

    # --- dense ------------------------------------------------------------------------------------

    def save_dense(self, params: PyTree, error: float) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / "dense.jaxprune"
        save(path, {"params": params}, compress=False)
        self._last_sha = None
        meta = {**self._meta(0, file_sha256(path)), "error": error}
        write_json(self.dir / "dense.json", meta)
        self._last_sha = meta["sha256"]

    def load_dense(self, *, dense_only: bool = False) -> tuple[PyTree, float] | None:
        """The dense params and test error, or None if there are none yet.

        ``dense_only`` accepts a dense model of a run whose rounds differ (the sensitivity scan).
        """
        path = self.dir / "dense.json"
        if not path.exists():
            return None
        meta = read_json(path)
        self._check_run(path, meta, DENSE_FIELDS if dense_only else None)
        try:
            error = float(meta["error"])
            self._check_file(self.dir / "dense.jaxprune", meta)
        except (KeyError, TypeError) as e:
            raise CheckpointError(f"{path} is damaged (no {e}); pass --overwrite.") from None
        self._last_sha = meta.get("sha256")
        return load(self.dir / "dense.jaxprune")["params"], error

    # --- rounds -----------------------------------------------------------------------------------

    def save_round(self, state: RoundsState) -> None:
        k = state.round
        tree = {
            "params": state.params,
            "masks": state.masks,
            "opt": jax.tree.leaves(state.opt_state),
        }
        if state.model_state is not None:
            tree["model_state"] = state.model_state
        path = self.dir / f"round-{k}.jaxprune"
        save(path, tree, compress=False)
        meta = {
            **self._meta(k, file_sha256(path)),
            "history": [record_dict(r) for r in state.history],
        }
        write_json(self.dir / f"round-{k}.json", meta)
        self._last_sha = meta["sha256"]

    def _last_round(self, config: Config) -> tuple[int, dict] | None:
        """The newest finished round and its JSON, after checking the chain up to it."""
        names = os.listdir(self.dir) if self.dir.is_dir() else []
        done = sorted(int(m[1]) for m in map(_ROUND_JSON.fullmatch, names) if m)
        if not done:
            return None
        if done != list(range(1, len(done) + 1)):
            gap = min(set(range(1, done[-1] + 1)) - set(done))
            raise CheckpointError(
                f"{self.dir}/round-{gap}.json is missing but round-{done[-1]}.json exists; pass "
                "--overwrite to start over."
            )
        meta: dict = {}
        for k in done:
            path = self.dir / f"round-{k}.json"
            meta = read_json(path)
            self._check_run(path, meta)
            if self.identity is None:
                continue
            if meta.get("index") != k or meta.get("parent_sha256") != self._last_sha:
                raise CheckpointError(
                    f"{path} does not continue from the checkpoint before it (its index or parent "
                    "hash differs): the files come from different runs; pass --overwrite."
                )
            if k > config.rounds:
                raise CheckpointError(f"{path} is past the run's {config.rounds} rounds.")
            self._last_sha = meta["sha256"]
        k = done[-1]
        self._check_file(self.dir / f"round-{k}.jaxprune", meta)
        return k, meta

    def load_round(self, config: Config, data: Dataset) -> RoundsState | None:
        """The newest finished round as a :class:`RoundsState`, or None if none is done.

        With an identity, :meth:`load_dense` comes first: the chain starts at the dense model.
        """
        found = self._last_round(config)
        if found is None:
            return None
        k, meta = found
        tree = load(self.dir / f"round-{k}.jaxprune")
        history = meta["history"] if isinstance(meta, dict) else meta
        # The optimizer state is stored as its leaves; its structure comes from a fresh init of
        # what the driver retrains with (RoundsState.opt_state).
        template = keep_pruned(retrain_optimizer(config, data), tree["masks"]).init(tree["params"])
        opt_state = jax.tree.unflatten(
            jax.tree.structure(template), [jnp.asarray(x) for x in tree["opt"]]
        )
        records = tuple(RoundRecord(**r) for r in history)
        masks = jax.tree.map(jnp.asarray, tree["masks"])
        params = jax.tree.map(jnp.asarray, tree["params"])
        model_state = jax.tree.map(jnp.asarray, tree.get("model_state"))
        return RoundsState(k, params, masks, opt_state, records, model_state)


class OutLock:
    """Holds ``out/.jaxprune.lock`` (``fcntl.flock``) for one run; a second one is refused.

    The lock file stays after the run; only the lock on it is released (removing the file would
    let two later runs lock two different files of the same name).
    """

    def __init__(self, out: Path):
        self.path = Path(out) / ".jaxprune.lock"
        self.fd: int | None = None

    def __enter__(self) -> OutLock:
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise CheckpointError(
                f"another jaxprune run (pid {holder}) is writing to {self.path.parent}; wait for "
                "it to finish or choose another --out."
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the last descriptor releases the flock
            self.fd = None
