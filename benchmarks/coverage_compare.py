"""Compare two coverage CSVs (e.g. before and after an analysis change): the models whose blocks found
disagree with the independent expectation in either run, and the models that regressed (fewer blocks
found, or a worse status: ``ok`` to anything else, anything to ``error``), as Markdown tables; with
``--rows``, every row that differs in anything but its time (a refactor must leave them all equal).

The expectation does not depend on the analysis, so the AFTER run's ``expected`` is used for both
columns (an older CSV may have been written by an older expectation rule).

    python benchmarks/coverage_compare.py /tmp/before.csv /tmp/after.csv --labels before after
    python benchmarks/coverage_compare.py benchmarks/results/coverage.csv /tmp/after.csv --rows
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


def regressed(old: dict | None, new: dict | None) -> bool:
    """Fewer blocks found than before, or a worse status."""
    if old is None or new is None:
        return False
    before, after = old["status"].split(":")[0], new["status"].split(":")[0]
    if (before == "ok" and after != "ok") or (after == "error" and before != "error"):
        return True
    return old.get("blocks", "") != "" and new.get("blocks", "") != "" and int(new["blocks"]) < int(old["blocks"])


def regressions(before: dict, after: dict, labels: tuple[str, str]) -> list[str]:
    lines = [f"| model | expected (from) | {labels[0]} | {labels[1]} |", "| --- | --- | ---: | ---: |"]
    for key, new in after.items():
        old = before.get(key)
        if regressed(old, new):
            lines.append(f"| {key[0]}:{key[1]} | {new.get('expected', '')} ({new.get('expected_from', '')}) | "
                         f"{cell(old)} | {cell(new)} |")
    return lines


#: what a run measured about a model (not how long it took)
MEASURED = ("status", "blocks", "units", "expected", "edited", "stages", "params_m", "identity_standard",
            "identity_post", "identity_scope", "config_changes")


def differing_rows(before: dict, after: dict, labels: tuple[str, str]) -> list[str]:
    """Every model missing from one run, or whose measured fields differ, with the fields that do."""
    lines = [f"| model | field | {labels[0]} | {labels[1]} |", "| --- | --- | --- | --- |"]
    for key in list(before) + [k for k in after if k not in before]:
        old, new = before.get(key), after.get(key)
        if old is None or new is None:
            lines.append(f"| {key[0]}:{key[1]} | (row) | {'-' if old is None else 'present'} | "
                         f"{'-' if new is None else 'present'} |")
            continue
        for field in MEASURED:
            if old.get(field, "") != new.get(field, ""):
                lines.append(f"| {key[0]}:{key[1]} | {field} | {old.get(field, '')[:80]} | {new.get(field, '')[:80]} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before", type=Path)
    parser.add_argument("after", type=Path)
    parser.add_argument("--labels", nargs=2, default=("before", "after"))
    parser.add_argument("--rows", action="store_true", help="list every row that differs in a measured field")
    args = parser.parse_args()
    before, after, labels = load(args.before), load(args.after), tuple(args.labels)
    if args.rows:
        lines = differing_rows(before, after, labels)
        print(f"{len(before)} and {len(after)} rows; {len({l.split(' | ')[0] for l in lines[2:]})} differ:\n")
        print("\n".join(lines))
        return
    print("Found != expected in either run:\n")
    print("\n".join(table(before, after, labels)))
    print("\nRegressed (fewer blocks found, or a worse status):\n")
    print("\n".join(regressions(before, after, labels)))


if __name__ == "__main__":
    main()
