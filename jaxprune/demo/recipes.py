"""The demo's configuration: the options of a run, our per-model recipes and the paper's figures.

Everything that decides a run's result is a :class:`Config`; :data:`RECIPES` holds our
reproduction settings of Han et al. 2015 and :data:`PAPER` the paper's own figures.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable
from typing import Any

# Han et al. 2015, Tables 1 and 2: the fractions of weights kept (per layer and in total) and the
# errors on MNIST.
PAPER: dict[str, dict[str, Any]] = {
    "lenet300": {
        "error_dense": 0.0164,
        "error_pruned": 0.0159,
        "kept_fraction_per_layer": {"fc1": 0.08, "fc2": 0.09, "fc3": 0.26},
        "kept_fraction": 0.08,
    },
    "lenet5": {
        "error_dense": 0.0080,
        "error_pruned": 0.0077,
        "kept_fraction_per_layer": {"conv1": 0.66, "conv2": 0.12, "fc1": 0.08, "fc2": 0.19},
        "kept_fraction": 0.08,
    },
}


class ConfigError(ValueError):
    """An impossible combination of options; the CLI prints it as one line and exits 2.

    The message names options as ``{field}`` (a :class:`Config` field in braces): ``str(e)``
    shows the field names, :meth:`render` lets the command line show its flags instead.

    >>> str(ConfigError("{learning_rate} must be > 0"))
    'learning_rate must be > 0'
    >>> ConfigError("{learning_rate} must be > 0").render(lambda f: "--" + f.replace("_", "-"))
    '--learning-rate must be > 0'
    """

    def __init__(self, template: str):
        self.template = template
        super().__init__(self.render(lambda field: field))

    def render(self, name: Callable[[str], str]) -> str:
        """The message with each ``{field}`` replaced by ``name(field)``."""
        fields = {f.name for f in dataclasses.fields(Config)}
        return re.sub(
            r"\{(\w+)\}",
            lambda m: name(m[1]) if m[1] in fields else m[0],
            self.template,
        )


@dataclasses.dataclass(frozen=True)
class Config:
    """Everything that decides a run's result (the output folder and resume flag aside).

    Attributes:
      model: ``'lenet300'`` (LeNet-300-100) or ``'lenet5'``.
      data_dir: a folder (or ``.npz``) holding MNIST, or ``None`` for sklearn's 8x8 digits.
      epochs: dense training epochs.
      rounds: prune -> retrain rounds.
      q: Han's quality parameter per round (one value is used for every round).
      sparsity: instead of ``q``, the fraction pruned after each round, in ``[0, 1)``: one float
        per round (of each layer, or of all prunable weights together with ``scope='global'``),
        or per round a ``((layer, sparsity), ...)`` tuple naming each layer's own
        (``scope='layer'`` only).
      scope: ``'layer'`` or ``'global'``: how ``sparsity`` is counted (see
        :func:`jaxprune.masks_for_sparsity`); ``q`` is always per layer.
      ranking: ``'magnitude'`` (Han et al.) or ``'random'``: with ``sparsity``, prune survivors chosen
        uniformly at random instead of the smallest; the baseline of Blalock et al. 2020.
      q_scale: ``((layer, factor), ...)``: those layers are pruned with ``factor * q``; Han et al.
        prune sensitive layers (LeNet-5's conv1) far less than the fully connected ones.
      retrain_epochs: retraining epochs per round.
      learning_rate: dense learning rate (SGD, momentum 0.9, cosine decay); retraining uses
        ``learning_rate * retrain_learning_rate_scale`` with a cosine restart each round.
      retrain_learning_rate_scale: Han et al. retrain LeNets at 1/10 of the original rate.
      weight_decay: L2 coefficient, in training and retraining.
      batch_size: minibatch size.
      dropout: dropout rate on the inputs of the hidden dense layers after the first (0: none,
        as Caffe's LeNets); rescaled each round by Han's rule.
      seed: seeds initialisation, shuffling and dropout.
    """

    model: str = "lenet300"
    data_dir: str | None = None
    epochs: int = 30
    rounds: int = 6
    q: tuple[float, ...] = (1.0, 1.5, 1.9, 2.2, 2.4, 2.6)
    sparsity: tuple[float | tuple[tuple[str, float], ...], ...] | None = None
    scope: str = "layer"
    ranking: str = "magnitude"
    q_scale: tuple[tuple[str, float], ...] = ()
    retrain_epochs: int = 10
    learning_rate: float = 0.1
    retrain_learning_rate_scale: float = 0.1
    weight_decay: float = 5e-4
    batch_size: int = 128
    dropout: float = 0.0
    seed: int = 0

    def checked(self) -> Config:
        """Returns the config with a one-value ``q`` spread over the rounds, or raises.

        Raises:
          ConfigError: naming the field, the value received and what is expected.
        """
        if self.model not in ("lenet300", "lenet5"):
            raise ConfigError(f"unknown {{model}} {self.model!r}; choose lenet300 or lenet5.")
        for name in ("epochs", "rounds", "retrain_epochs", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{{{name}}} must be an integer >= 1, got {value!r}.")
        # Seeds seed+1..seed+3 are used too; JAX keys from seeds of 2**32 and more wrap around.
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ConfigError(f"{{seed}} must be an integer, got {self.seed!r}.")
        if not 0 <= self.seed < 2**31:
            raise ConfigError(f"{{seed}} must be in [0, 2**31), got {self.seed}.")
        for name, low in (
            ("learning_rate", "> 0"),
            ("retrain_learning_rate_scale", "> 0"),
            ("weight_decay", ">= 0"),
        ):
            value = getattr(self, name)
            if not (math.isfinite(value) and (value > 0 if low == "> 0" else value >= 0)):
                raise ConfigError(f"{{{name}}} must be finite and {low}, got {value}.")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"{{dropout}} must be in [0, 1), got {self.dropout}.")
        schedule: tuple[Any, ...] = self.sparsity if self.sparsity is not None else self.q
        flag = "{sparsity}" if self.sparsity is not None else "{q}"
        if len(schedule) == 1:
            schedule = schedule * self.rounds
        if len(schedule) != self.rounds:
            raise ConfigError(
                f"{flag} has {len(schedule)} values for {self.rounds} rounds; give one value "
                "or one per round."
            )
        if self.scope not in ("layer", "global"):
            raise ConfigError(f"unknown {{scope}} {self.scope!r}; choose layer or global.")
        if self.ranking not in ("magnitude", "random"):
            raise ConfigError(f"unknown {{ranking}} {self.ranking!r}; choose magnitude or random.")
        if self.sparsity is None and (self.scope != "layer" or self.ranking != "magnitude"):
            raise ConfigError("{scope} and {ranking} apply to {sparsity}, not to Han's {q} rule.")
        if self.sparsity is not None:
            schedule = tuple(_sparsity_value(s, self.scope) for s in schedule)
        if self.sparsity is None and not all(0 <= q < math.inf for q in schedule):
            raise ConfigError(f"{{q}} values must be finite and >= 0, got {schedule}.")
        if not all(0 <= f < math.inf for _, f in self.q_scale):
            raise ConfigError(
                f"{{q_scale}} factors must be finite and >= 0, got {dict(self.q_scale)}."
            )
        if self.q_scale and self.sparsity is not None:
            raise ConfigError("{q_scale} applies to {q}, not to {sparsity}.")
        if self.sparsity is not None:
            return dataclasses.replace(self, sparsity=schedule)
        return dataclasses.replace(self, q=tuple(float(v) for v in schedule))


def _sparsity_value(value, scope: str) -> float | tuple[tuple[str, float], ...]:
    """One round's ``sparsity``, checked: a fraction, or ``((layer, fraction), ...)`` per layer."""
    pairs: tuple[tuple[str, Any], ...]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        pairs, single = (("", value),), True
    else:
        try:
            pairs, single = tuple((str(k), v) for k, v in value), False
        except (TypeError, ValueError):
            raise ConfigError(
                f"{{sparsity}} values must be fractions or (layer, fraction) pairs, got {value!r}."
            ) from None
        if scope != "layer":
            raise ConfigError(
                "{sparsity} per layer needs {scope} layer; global prunes one fraction."
            )
    for _, s in pairs:
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not 0 <= s < 1:
            raise ConfigError(f"{{sparsity}} values must be fractions in [0, 1), got {value!r}.")
    return float(pairs[0][1]) if single else tuple((name, float(s)) for name, s in pairs)


# Our reproduction of Han et al. on real MNIST: what ``jaxprune run --model M`` does unless told
# otherwise. SGD with momentum 0.9, L2 5e-4 and cosine decay; q rises round by round because the
# std is taken over the whole layer (pruned entries as zeros), so a fixed q would stop pruning.
# LeNet-5 prunes its sensitive layers (conv1, conv2, the output layer) with a fraction of q, as
# the paper does, and trains with dropout on fc2's input, rescaled each round by Han's rule.
RECIPES = {
    "lenet300": Config(
        model="lenet300",
        epochs=20,
        learning_rate=0.1,
        rounds=12,
        q=(1.0, 1.5, 1.9, 2.2, 2.4, 2.6, 2.8, 3.0, 3.2, 3.4, 3.6, 3.8),
        retrain_epochs=10,
    ),
    "lenet5": Config(
        model="lenet5",
        epochs=10,
        learning_rate=0.05,
        dropout=0.5,
        rounds=9,
        q=(1.0, 1.6, 2.0, 2.3, 2.5, 2.6, 2.7, 2.9, 3.1),
        q_scale=(("conv1", 0.3), ("conv2", 0.6), ("fc2", 0.6)),
        retrain_epochs=4,
        retrain_learning_rate_scale=0.2,
    ),
}
