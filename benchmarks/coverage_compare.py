"""Compare two coverage CSVs (e.g. before and after an analysis change): the models whose blocks found
disagree with the independent expectation in either run, as a Markdown table.

The expectation does not depend on the analysis, so the AFTER run's ``expected`` is used for both
columns (an older CSV may have been written by an older expectation rule).

    python benchmarks/coverage_compare.py results/coverage_named_main.csv results/coverage_named_analysis.csv
"""
from __future__ import annotations

import argparse
import csv
from pathlib import Path


def load(path: Path) -> dict[tuple[str, str], dict]:
    with path.open(newline="") as f:
        return {(row["source"], row["name"]): row for row in csv.DictReader(f)}


def disagrees(row: dict | None, expected: str) -> bool:
    return bool(row) and expected != "" and row.get("blocks", "") != "" and int(row["blocks"]) != int(expected)


def cell(row: dict | None) -> str:
    if row is None:
        return "-"
    status = row["status"]
    found = row.get("blocks") or "-"
    return found if status == "ok" else f"{found} ({status.split(' (')[0][:60]})"


def table(before: dict, after: dict, labels: tuple[str, str]) -> list[str]:
    lines = [f"| model | expected (from) | {labels[0]} | {labels[1]} |", "| --- | --- | ---: | ---: |"]
    for key in list(before) + [k for k in after if k not in before]:
        old, new = before.get(key), after.get(key)
        reference = new or old
        expected = reference.get("expected", "")
        if disagrees(old, expected) or disagrees(new, expected):
            lines.append(f"| {key[0]}:{key[1]} | {expected} ({reference.get('expected_from', '')}) | "
                         f"{cell(old)} | {cell(new)} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before", type=Path)
    parser.add_argument("after", type=Path)
    parser.add_argument("--labels", nargs=2, default=("before", "after"))
    args = parser.parse_args()
    print("\n".join(table(load(args.before), load(args.after), tuple(args.labels))))


if __name__ == "__main__":
    main()
