"""Fuzzing se_retrofit.load (issue 18): every mutation of a valid saved directory loads exactly or is
refused with a one-line RetrofitError; never another exception, a hang or a silent difference.

The mutations (tests/load_fuzzing.py): config values replaced by random JSON of any type or nudged to
a plausible value, keys dropped/added/renamed, values wrapped, bytes cut or overwritten, 200k-deep
JSON; the safetensors length prefix, header JSON, header bytes and truncation; the weights file
replaced by a FIFO, a directory, /dev/zero or a broken link. Derandomized: CI runs the same examples.
benchmarks/fuzz_load.py runs thousands.
"""
from __future__ import annotations

import inspect
from collections import Counter

import pytest

import se_retrofit

from load_fuzzing import fuzz, make_saved, outcome

EXAMPLES = 300
#: a load that checks the rebuilt model's output against a recorded probe (issue 18, item 1) turns every
#: silent difference into a refusal; until it exists those are reported as an expected failure
VERIFIES = "verify" in inspect.signature(se_retrofit.load).parameters


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    return make_saved(tmp_path_factory.mktemp("fuzz"))


def test_the_unchanged_directory_loads_exactly(saved, tmp_path):
    directory, x, expected = saved
    assert outcome(directory, x, expected) == ("exact", "")


def test_every_mutation_loads_exactly_or_is_refused_on_one_line(saved, tmp_path):
    directory, x, expected = saved
    counts: Counter = Counter()
    differs: list[str] = []

    def check(kind: str, detail: str) -> None:
        assert kind != "other", detail
        if kind == "differs":
            assert not VERIFIES, detail
            differs.append(detail)

    fuzz(directory, x, expected, tmp_path, max_examples=EXAMPLES, counts=counts, check=check)()
    print(f"load fuzz: {dict(counts)}")
    assert counts["other"] == 0
    assert counts["refused"] > counts["exact"] > 0  # the mutations both break directories and keep some intact
    if differs:
        pytest.xfail(f"{len(differs)} of {sum(counts.values())} mutations load and compute something else; "
                     f"only the output probe of issue 18 item 1 can refuse them (first: {differs[0]})")
