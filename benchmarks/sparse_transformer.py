"""Sparse against dense inference time for the test zoo's Transformers, with the machine's load.

Each zoo Transformer (Embed, attention through DenseGeneral/LinearGeneral, MLP; plain and
scan-stacked) is pruned to 70% and 90% per layer and run by ``jaxprune.sparse_apply`` (the
``auto`` rule and BCSR forced) and by the masked dense model under ``jax.jit``, at batch 1 and 64
sequences. Printed: time / dense time (lower is better), interleaved and the median taken
(``measure.interleaved_medians``), and the cores other processes kept busy during that
measurement (``measure.Load``; 2 cores here; load from other jobs moves small-model ratios by
+-20%). The zoo's models are tiny (width 16), so these ratios measure the
overhead of the sparse path more than its gains.

Run ``python benchmarks/sparse_transformer.py`` (about a minute) or ``--quick``. Two runs here
(jax 0.10.2, 2 cores; other processes 0.0-1.0 cores in the first, 0.0 in the second), auto / bcsr:
Linen plain 0.53-0.81 / 0.59-0.74, Linen scan 0.61-0.76 / 0.90-1.88, NNX plain 0.31-0.63 /
0.35-0.62, NNX scan 0.38-0.71 / 0.70-1.23. The rule keeps these small layers dense, so auto's
gain is not sparsity: its weights are compiled in as constants (``_apply.EMBED_BYTES``) where the
dense reference passes them as arguments, and the NNX reference pays nnx.State flattening per
call, which SparseApply does once.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys

import jax
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
import zoo
from measure import Load, interleaved_medians

import jaxprune

MODELS = ("linen_transformer", "linen_transformer_scan", "nnx_transformer", "nnx_transformer_scan")


def _tokens(batch: int) -> jax.Array:
    return jax.random.randint(jax.random.key(batch), (batch, zoo.SEQ), 0, zoo.VOCAB)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one model, one sparsity")
    args = parser.parse_args()
    names, sparsities = (MODELS[1:2], (0.9,)) if args.quick else (MODELS, (0.7, 0.9))
    print(f"jax {jax.__version__}, {os.cpu_count()} cores; time / dense jit")
    print(
        f"{'model':24} {'pruned':>6} {'batch':>5} {'dense us':>9} {'auto':>6} {'bcsr':>6} "
        "others' load"
    )
    for name in names:
        model = zoo.zoo()[name]
        for sparsity in sparsities:
            masks = jaxprune.masks_for_sparsity(model.params, sparsity, stacked=model.stacked)
            exported = jaxprune.to_bcoo(model.params, masks)
            masked = jaxprune.apply_masks(model.params, masks)
            dense = jax.jit(model.apply)
            sparse = {
                fmt: jaxprune.sparse_apply(
                    model.module, exported, formats=fmt, stacked=model.stacked
                )
                for fmt in ("auto", "bcsr")
            }
            for batch in (1, 64):
                x = _tokens(batch)
                fns = {"dense": functools.partial(dense, masked, x)}
                fns.update({fmt: functools.partial(fn, x) for fmt, fn in sparse.items()})
                with Load() as load:
                    t = interleaved_medians(fns, repeats=20, budget_s=1.0 if args.quick else 3.0)
                np.testing.assert_allclose(fns["auto"](), fns["dense"](), rtol=1e-4, atol=1e-4)
                print(
                    f"{name:24} {sparsity:6.0%} {batch:5d} {t['dense'] * 1e6:9.0f} "
                    f"{t['auto'] / t['dense']:6.2f} {t['bcsr'] / t['dense']:6.2f} "
                    f"{load.cores:4.1f} cores"
                )


if __name__ == "__main__":
    main()
