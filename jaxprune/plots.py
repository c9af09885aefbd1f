"""Plots of pruning results: weight histograms, kept % and accuracy per round, sensitivity scans.

They need matplotlib (the ``demo`` extra); it is imported inside them, so the rest of jaxprune
never does. They draw on a bare ``matplotlib.figure.Figure`` and write a PNG, leaving pyplot's
global state and backend alone.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jaxprune.analysis import Sensitivity

__all__ = ["plot_history", "plot_sensitivity", "plot_weight_histogram"]


def _figure(width: float = 7.0, height: float = 4.0):
    try:
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError(
            "plots need matplotlib: pip install 'jaxprune[demo]' (or pip install matplotlib)."
        ) from e
    return Figure(figsize=(width, height), layout="constrained")


def _save(fig, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=100)
    return path


def plot_weight_histogram(
    before: Any,
    after: Any,
    path: str | os.PathLike,
    *,
    title: str = "",
    bins: int = 80,
) -> Path:
    """Writes a PNG of a layer's weight distribution before and after pruning.

    The picture of Han et al. 2015's weight-distribution figure: before, a bell around zero;
    after pruning and retraining, the middle is gone and the survivors form two lobes. Entries of
    ``after`` that are exactly zero are taken as pruned and left out of its histogram.

    Args:
      before: the layer's weights before pruning (any shape).
      after: the same layer after pruning (and retraining), pruned entries zero.
      path: the PNG file to write (parent folders are created).
      title: a figure title, e.g. the layer path.
      bins: histogram bins per panel.

    Returns:
      The path written.

    Raises:
      ValueError: if ``before`` is empty or ``bins < 1``.
      ImportError: if matplotlib is not installed.

    Example:
      >>> import numpy as np, tempfile, os
      >>> w = np.random.default_rng(0).normal(size=(50, 20))
      >>> out = plot_weight_histogram(w, np.where(abs(w) > 1, w, 0), tempfile.mkdtemp() + "/h.png")
      >>> os.path.getsize(out) > 1000
      True
    """
    before = np.asarray(before, np.float64).ravel()
    after = np.asarray(after, np.float64).ravel()
    if before.size == 0:
        raise ValueError("before is empty; pass the layer's weight array.")
    if bins < 1:
        raise ValueError(f"bins is {bins}, expected >= 1.")
    survivors = after[after != 0]
    fig = _figure(9.0, 3.5)
    left, right = fig.subplots(1, 2, sharex=True)
    left.hist(before, bins=bins, color="tab:blue")
    left.set_title(f"before pruning ({before.size:,} weights)")
    right.hist(survivors, bins=bins, color="tab:orange")
    kept = 100 * survivors.size / after.size if after.size else 0.0
    right.set_title(f"after pruning ({survivors.size:,} kept, {kept:.1f}%)")
    for ax in (left, right):
        ax.set_xlabel("weight value")
        ax.set_ylabel("count")
    if title:
        fig.suptitle(title)
    return _save(fig, path)


_HISTORY_KEYS = ("round", "kept_fraction", "accuracy")


def plot_history(
    history: Sequence[Mapping[str, float]], path: str | os.PathLike, *, title: str = ""
) -> Path:
    """Writes a PNG of kept % and accuracy % per pruning round.

    Args:
      history: one mapping per round with keys ``round``, ``kept_fraction`` (in ``[0, 1]``) and
        ``accuracy`` (in ``[0, 1]``); other keys are ignored.
      path: the PNG file to write.
      title: a figure title.

    Returns:
      The path written.

    Raises:
      ValueError: if ``history`` is empty or an entry lacks a key.
      ImportError: if matplotlib is not installed.

    Example:
      >>> import tempfile, os
      >>> h = [{"round": 0, "kept_fraction": 1.0, "accuracy": 0.98},
      ...      {"round": 1, "kept_fraction": 0.3, "accuracy": 0.97}]
      >>> os.path.getsize(plot_history(h, tempfile.mkdtemp() + "/r.png")) > 1000
      True
    """
    if not history:
        raise ValueError("history is empty; pass one dict per round.")
    for i, entry in enumerate(history):
        missing = [k for k in _HISTORY_KEYS if k not in entry]
        if missing:
            raise ValueError(
                f"history[{i}] lacks {missing}; each entry needs keys {list(_HISTORY_KEYS)}."
            )
    rounds = [entry["round"] for entry in history]
    kept = [100 * float(entry["kept_fraction"]) for entry in history]
    acc = [100 * float(entry["accuracy"]) for entry in history]
    fig = _figure()
    ax = fig.subplots()
    ax.plot(rounds, kept, "o-", color="tab:blue", label="kept %")
    ax.xaxis.get_major_locator().set_params(integer=True)  # rounds are whole numbers
    ax.set_xlabel("pruning round")
    ax.set_ylabel("weights kept (%)", color="tab:blue")
    ax.set_ylim(0, 105)
    twin = ax.twinx()
    twin.plot(rounds, acc, "s--", color="tab:red", label="accuracy %")
    twin.set_ylabel("test accuracy (%)", color="tab:red")
    if title:
        ax.set_title(title)
    return _save(fig, path)


def plot_sensitivity(result: Sensitivity, path: str | os.PathLike, *, title: str = "") -> Path:
    """Writes a PNG of accuracy against kept % for each layer (Han et al. 2015, Fig. 6 style).

    Args:
      result: a :class:`Sensitivity` from :func:`sensitivity`.
      path: the PNG file to write.
      title: a figure title.

    Returns:
      The path written.

    Raises:
      TypeError: if ``result`` is not a :class:`Sensitivity`.
      ImportError: if matplotlib is not installed.

    Example:
      >>> import numpy as np, tempfile, os
      >>> s = Sensitivity(("fc1/kernel",), "q", np.array([0.0, 1.0]), np.array([[1.0, 0.4]]),
      ...                 np.array([[0.9, 0.7]]), 0.9)
      >>> os.path.getsize(plot_sensitivity(s, tempfile.mkdtemp() + "/s.png")) > 1000
      True
    """
    if not isinstance(result, Sensitivity):
        raise TypeError(f"result is a {type(result).__name__}, expected a Sensitivity.")
    fig = _figure()
    ax = fig.subplots()
    for i, layer in enumerate(result.layers):
        order = np.argsort(-result.kept_fraction[i], kind="stable")
        ax.plot(
            100 * result.kept_fraction[i][order],
            100 * result.accuracy[i][order],
            "o-",
            label=layer,
        )
    ax.axhline(100 * result.baseline, color="gray", linestyle=":", label="unpruned")
    ax.set_xlabel("weights kept in the layer (%)")
    ax.set_ylabel("accuracy, no retraining (%)")
    # Fig. 6 reads left to right as more is pruned away.
    ax.set_xlim(105, -5)
    ax.legend(fontsize="small")
    if title:
        ax.set_title(title)
    return _save(fig, path)
