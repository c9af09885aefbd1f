"""A small zoo of the models users bring, shared by the tests.

A Linen ResNet-style CNN with BatchNorm, an NNX CNN with BatchNorm and Dropout, a Linen and an NNX
Transformer (Embed, attention through DenseGeneral/LinearGeneral, LayerNorm, MLP), and each
Transformer again with its blocks stacked by ``nn.scan`` / ``nnx.vmap`` + ``nnx.scan``. Each entry
says, by hand, which leaves are weights (what the default rule must prune) and which subtree is
stacked along axis 0.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import flax.linen as nn
import jax
from flax import nnx

VOCAB, SEQ, D, HEADS, LAYERS, CLASSES = 16, 8, 16, 2, 2, 4
IMAGE = (8, 8, 1)


@dataclasses.dataclass(frozen=True)
class ZooModel:
    """A zoo entry: its params, how to run it and what the default rule must prune."""

    name: str
    params: Any  # a Linen params dict or an nnx.State of nnx.Param
    apply: Callable[[Any, jax.Array], jax.Array]  # (params, x) -> logits, in eval mode
    inputs: jax.Array  # a small batch of inputs
    weights: frozenset[str]  # the leaves that are weights (kernels and embeddings)
    stacked: dict[str, int] | None = None  # {pattern: axis} for scan-stacked layers
    module: Any = None  # the Linen module, or the NNX model (in eval mode)
    variables: Any = None  # Linen: the collections besides params (batch_stats)


# ----------------------------------------------------------------------------- CNNs


class ResBlock(nn.Module):
    features: int

    @nn.compact
    def __call__(self, x, train):
        y = nn.Conv(self.features, (3, 3), use_bias=False)(x)
        y = nn.relu(nn.BatchNorm(use_running_average=not train)(y))
        y = nn.Conv(self.features, (3, 3), use_bias=False)(y)
        y = nn.BatchNorm(use_running_average=not train)(y)
        return nn.relu(x + y)


class LinenResNet(nn.Module):
    """Conv stem, two residual blocks with BatchNorm, global average pool, Dense head."""

    features: int = 16

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Conv(self.features, (3, 3), use_bias=False, name="stem")(x)
        x = nn.relu(nn.BatchNorm(use_running_average=not train, name="stem_bn")(x))
        x = ResBlock(self.features, name="block1")(x, train)
        x = ResBlock(self.features, name="block2")(x, train)
        return nn.Dense(CLASSES * 2 + 2, name="head")(x.mean(axis=(1, 2)))


class NNXCNN(nnx.Module):
    """Two Conv + BatchNorm stages, global pool, Dropout, Linear head."""

    def __init__(self, rngs: nnx.Rngs, classes: int = CLASSES * 2 + 2):
        self.conv1 = nnx.Conv(1, 16, (3, 3), rngs=rngs)
        self.bn1 = nnx.BatchNorm(16, rngs=rngs)
        self.conv2 = nnx.Conv(16, 32, (3, 3), rngs=rngs)
        self.bn2 = nnx.BatchNorm(32, rngs=rngs)
        self.drop = nnx.Dropout(0.3, rngs=rngs)
        self.fc = nnx.Linear(32, classes, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.bn1(self.conv1(x)))
        x = nnx.relu(self.bn2(self.conv2(x)))
        return self.fc(self.drop(x.mean(axis=(1, 2))))


# ----------------------------------------------------------------------------- Transformers


class Block(nn.Module):
    """Pre-norm block: LayerNorm, self-attention, LayerNorm, a two-layer MLP."""

    @nn.compact
    def __call__(self, x):
        h = nn.LayerNorm()(x)
        x = x + nn.MultiHeadDotProductAttention(num_heads=HEADS)(h, h)
        h = nn.LayerNorm()(x)
        return x + nn.Dense(D)(nn.gelu(nn.Dense(2 * D)(h)))


class ScanBlock(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        return Block()(x), None


class LinenTransformer(nn.Module):
    """Embed + learned positions, ``LAYERS`` blocks (a loop, or one ``nn.scan``), pooled head."""

    scan: bool = False

    @nn.compact
    def __call__(self, tokens):
        x = nn.Embed(VOCAB, D, name="embed")(tokens)
        x = x + self.param("pos_embedding", nn.initializers.normal(0.02), (SEQ, D))
        if self.scan:
            stack = nn.scan(
                ScanBlock,
                variable_axes={"params": 0},
                split_rngs={"params": True},
                length=LAYERS,
            )
            x, _ = stack(name="layers")(x, None)
        else:
            for i in range(LAYERS):
                x = Block(name=f"block{i}")(x)
        return nn.Dense(CLASSES, name="head")(nn.LayerNorm(name="final_norm")(x).mean(axis=1))


class NNXBlock(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.ln1 = nnx.LayerNorm(D, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(num_heads=HEADS, in_features=D, decode=False, rngs=rngs)
        self.ln2 = nnx.LayerNorm(D, rngs=rngs)
        self.fc1 = nnx.Linear(D, 2 * D, rngs=rngs)
        self.fc2 = nnx.Linear(2 * D, D, rngs=rngs)

    def __call__(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.fc2(nnx.gelu(self.fc1(self.ln2(x))))


class NNXTransformer(nnx.Module):
    """The NNX twin of :class:`LinenTransformer`; ``scan=True`` stacks blocks with nnx.vmap."""

    def __init__(self, rngs: nnx.Rngs, *, scan: bool = False):
        self.scan = scan
        self.embed = nnx.Embed(VOCAB, D, rngs=rngs)
        self.pos_embedding = nnx.Param(jax.random.normal(rngs.params(), (SEQ, D)) * 0.02)
        if scan:

            @nnx.split_rngs(splits=LAYERS)
            @nnx.vmap(in_axes=(0,), out_axes=0)
            def make(rngs):
                return NNXBlock(rngs)

            self.layers = make(rngs)
        else:
            self.layers = nnx.List([NNXBlock(rngs) for _ in range(LAYERS)])
        self.final_norm = nnx.LayerNorm(D, rngs=rngs)
        self.head = nnx.Linear(D, CLASSES, rngs=rngs)

    def __call__(self, tokens):
        x = self.embed(tokens) + self.pos_embedding[...]
        if self.scan:

            @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
            def body(x, block):
                return block(x)

            x = body(x, self.layers)
        else:
            for block in self.layers:
                x = block(x)
        return self.head(self.final_norm(x).mean(axis=1))


# ----------------------------------------------------------------------------- the zoo


def _attention(prefix: str) -> set[str]:
    return {f"{prefix}/{p}/kernel" for p in ("query", "key", "value", "out")}


def _linen_block_weights(prefix: str) -> set[str]:
    att = _attention(f"{prefix}/MultiHeadDotProductAttention_0")
    return att | {f"{prefix}/Dense_0/kernel", f"{prefix}/Dense_1/kernel"}


def _nnx_block_weights(prefix: str) -> set[str]:
    return _attention(f"{prefix}/attn") | {f"{prefix}/fc1/kernel", f"{prefix}/fc2/kernel"}


def _built(cls, **kwargs) -> nnx.Module:
    """An NNX model constructed under one ``nnx.jit``: one compilation, not one per op."""
    return nnx.jit(lambda: cls(nnx.Rngs(0), **kwargs))()


def _nnx_entry(name, model, inputs, weights, stacked=None) -> ZooModel:
    model.eval()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    # Jitted: the reference outputs compile once instead of op by op.
    @jax.jit
    def apply(p, x):
        return nnx.merge(graphdef, p, rest)(x)

    return ZooModel(name, params, apply, inputs, frozenset(weights), stacked, model)


def _linen_entry(name, module, inputs, weights, stacked=None, **kwargs) -> ZooModel:
    # One compilation of the whole init is far quicker than running it op by op.
    variables = jax.jit(functools.partial(module.init, **kwargs))(jax.random.key(0), inputs)
    params = variables["params"]
    rest = {k: v for k, v in variables.items() if k != "params"}

    @jax.jit
    def apply(p, x):
        return module.apply({"params": p, **rest}, x)

    return ZooModel(name, params, apply, inputs, frozenset(weights), stacked, module, rest)


def _images() -> jax.Array:
    return jax.random.normal(jax.random.key(1), (4, *IMAGE))


def _tokens() -> jax.Array:
    return jax.random.randint(jax.random.key(2), (4, SEQ), 0, VOCAB)


def _linen_resnet() -> ZooModel:
    weights = {"stem/kernel", "head/kernel"} | {
        f"block{b}/Conv_{c}/kernel" for b in (1, 2) for c in (0, 1)
    }
    return _linen_entry("linen_resnet", LinenResNet(), _images(), weights)


def _nnx_cnn() -> ZooModel:
    weights = {"conv1/kernel", "conv2/kernel", "fc/kernel"}
    return _nnx_entry("nnx_cnn", _built(NNXCNN), _images(), weights)


def _linen_transformer() -> ZooModel:
    weights = {"embed/embedding", "head/kernel"} | {
        w for i in range(LAYERS) for w in _linen_block_weights(f"block{i}")
    }
    return _linen_entry("linen_transformer", LinenTransformer(), _tokens(), weights)


def _linen_transformer_scan() -> ZooModel:
    weights = {"embed/embedding", "head/kernel"} | _linen_block_weights("layers/Block_0")
    module = LinenTransformer(scan=True)
    return _linen_entry("linen_transformer_scan", module, _tokens(), weights, {"layers": 0})


def _nnx_transformer() -> ZooModel:
    weights = {"embed/embedding", "head/kernel"} | {
        w for i in range(LAYERS) for w in _nnx_block_weights(f"layers/{i}")
    }
    return _nnx_entry("nnx_transformer", _built(NNXTransformer), _tokens(), weights)


def _nnx_transformer_scan() -> ZooModel:
    weights = {"embed/embedding", "head/kernel"} | _nnx_block_weights("layers")
    model = _built(NNXTransformer, scan=True)
    return _nnx_entry("nnx_transformer_scan", model, _tokens(), weights, {"layers": 0})


_BUILDERS: dict[str, Callable[[], ZooModel]] = {
    "linen_resnet": _linen_resnet,
    "nnx_cnn": _nnx_cnn,
    "linen_transformer": _linen_transformer,
    "linen_transformer_scan": _linen_transformer_scan,
    "nnx_transformer": _nnx_transformer,
    "nnx_transformer_scan": _nnx_transformer_scan,
}


class _Zoo(Mapping[str, ZooModel]):
    """The zoo by name; each model is built on first access (2-4 s each), then kept."""

    def __iter__(self) -> Iterator[str]:
        return iter(_BUILDERS)

    def __len__(self) -> int:
        return len(_BUILDERS)

    def __getitem__(self, name: str) -> ZooModel:
        return _build(name)


@functools.cache
def _build(name: str) -> ZooModel:
    return _BUILDERS[name]()


def zoo() -> Mapping[str, ZooModel]:
    """Every zoo model by name, each built once on first use (deterministic initialisation)."""
    return _Zoo()
