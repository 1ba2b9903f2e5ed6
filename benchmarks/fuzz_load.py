"""Fuzz se_retrofit.load with thousands of mutated saved directories and count the outcomes.

The mutations and the outcome classes are those of tests/test_load_fuzz.py (tests/load_fuzzing.py):
JSON values of the config replaced by random JSON of any type, keys dropped, added or renamed,
values wrapped, raw bytes cut or overwritten, 200k-deep JSON; the safetensors header's length
prefix, JSON (dtypes, shapes, offsets), bytes and truncation; the weights file replaced by a FIFO,
a directory, /dev/zero, a dangling link or a link loop. Every outcome is classed as ``exact`` (loads
and computes exactly what was saved), ``refused`` (a one-line RetrofitError), ``differs`` (loads and
computes something else, or fails when run) or ``other`` (another exception, a multi-line message,
a hang past 30 s). Prints the count per class, the first examples of each class but ``exact`` and
``refused``, and the time; exits 1 when any example is ``other`` (or ``differs``, with ``--strict``).
Derandomized: the same N gives the same examples.

    PYTHONPATH=$PWD python benchmarks/fuzz_load.py --examples 3000
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from load_fuzzing import OUTCOMES, fuzz, make_saved  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=3000, help="number of examples (default 3000)")
    parser.add_argument("--show", type=int, default=5, help="examples shown per failing class")
    parser.add_argument("--strict", action="store_true", help="also fail on 'differs' (loads, computes another thing)")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    counts: Counter = Counter()
    shown: dict[str, list[str]] = {kind: [] for kind in OUTCOMES}
    refusals: Counter = Counter()

    def note(kind: str, detail: str) -> None:
        if kind == "refused":
            refusals[detail.split(":", 1)[0]] += 1
        elif kind != "exact" and len(shown[kind]) < args.show and detail not in shown[kind]:
            shown[kind].append(detail)

    with tempfile.TemporaryDirectory() as work:
        saved, x, expected = make_saved(Path(work))
        start = time.perf_counter()
        fuzz(saved, x, expected, Path(work), max_examples=args.examples, counts=counts, check=note)()
        seconds = time.perf_counter() - start
    total = sum(counts.values())
    print(f"{total} examples in {seconds:.0f} s ({1000 * seconds / max(total, 1):.0f} ms each)")
    for kind in OUTCOMES:
        print(f"  {kind:8s} {counts[kind]:6d}")
    print("refusals by class: " + ", ".join(f"{name} {n}" for name, n in refusals.most_common()))
    for kind in ("differs", "other"):
        for detail in shown[kind]:
            print(f"  {kind}: {detail[:300]}")
    return 1 if counts["other"] or (args.strict and counts["differs"]) else 0


if __name__ == "__main__":
    sys.exit(main())
