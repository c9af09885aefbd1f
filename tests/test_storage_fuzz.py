"""Structure-aware fuzzing of jaxprune.load: every mutated file loads bit-identical or is refused.

The mutations and the outcome oracle live in ``benchmarks/fuzz_storage.py``, which runs the long
version (``python benchmarks/fuzz_storage.py --loads 20000``); here a few hundred cases keep the
suite fast.
"""

import os
import random
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(
    0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
)
import fuzz_storage

ACCEPTED = ("identical", "reinterpreted", "FileFormatError")


@pytest.fixture(scope="module")
def files():
    return fuzz_storage.base_files()


def test_unmutated_files_load_identical(files):
    for blob, reference in files:
        assert fuzz_storage.classify(blob, reference)[0] == "identical"


@settings(
    max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(rng=st.randoms(use_true_random=False), which=st.integers(0, 5))
def test_mutated_files_load_bit_identical_or_raise_file_format_error(files, rng, which):
    blob, reference = files[which]
    outcome, detail = fuzz_storage.classify(fuzz_storage.mutate(blob, rng), reference)
    assert outcome in ACCEPTED, detail


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    which=st.integers(0, 5),
    position=st.floats(0.0, 1.0, exclude_max=True),
    flip=st.integers(1, 255),
)
def test_a_flipped_byte_without_a_new_crc_is_always_refused(files, which, position, flip):
    blob = bytearray(files[which][0])
    blob[int(position * len(blob))] ^= flip
    assert fuzz_storage.classify(bytes(blob), files[which][1])[0] == "FileFormatError"


def test_the_mutations_reach_every_accepted_outcome(files):
    # Refusals, no-op edits and reinterpretations all occur: the oracle is not vacuous.
    rng = random.Random(0)
    outcomes = {fuzz_storage.classify(fuzz_storage.mutate(b, rng), r)[0] for b, r in files * 200}
    assert {"FileFormatError", "identical", "reinterpreted"} <= outcomes
