"""Fuzzing se_retrofit.load (issue 18): every mutation of a valid saved directory loads exactly or is
refused with a one-line RetrofitError; never another exception, a hang or a silent difference.

The mutations (tests/load_fuzzing.py): config values replaced by random JSON of any type or nudged to
a plausible value, keys dropped/added/renamed, values wrapped, bytes cut or overwritten, 200k-deep
JSON; the safetensors length prefix, header JSON, header bytes and truncation; the weights file
replaced by a FIFO, a directory, /dev/zero or a broken link. Derandomized: CI runs the same examples.
benchmarks/fuzz_load.py runs thousands.
"""
from __future__ import annotations

from collections import Counter

import pytest


from load_fuzzing import fuzz, make_saved, outcome

EXAMPLES = 300


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    return make_saved(tmp_path_factory.mktemp("fuzz"))


def test_the_unchanged_directory_loads_exactly(saved, tmp_path):
    directory, x, expected = saved
    assert outcome(directory, x, expected) == ("exact", "")


@pytest.mark.slow
def test_every_mutation_loads_exactly_or_is_refused_on_one_line(saved, tmp_path):
    directory, x, expected = saved
    counts: Counter = Counter()

    def check(kind: str, detail: str) -> None:
        assert kind != "other", detail
        assert kind != "differs", detail  # the saved probe refuses a directory that loads as another model

    fuzz(directory, x, expected, tmp_path, max_examples=EXAMPLES, counts=counts, check=check)()
    print(f"load fuzz: {dict(counts)}")
    assert counts["other"] == 0
    assert counts["refused"] > counts["exact"] > 0  # the mutations both break directories and keep some intact
