"""How long ``import se_retrofit`` takes in a fresh process, and what it loads.

Each run starts a new interpreter and times ``import torch`` (the floor), then ``import se_retrofit``
(min and median over ``--repeats`` runs, interleaved). It also lists the heavy modules the import
loads that the core does not need (the trainer, YAML, plotting, torch.distributed's process groups)
and the ten slowest se_retrofit modules as ``python -X importtime`` reports them.

    python benchmarks/import_time.py                   # this checkout
    python benchmarks/import_time.py --before /tmp/before   # also an older checkout, interleaved
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

PROBE = r'''
import json, sys, time
start = time.perf_counter(); import torch; torch_s = time.perf_counter() - start
start = time.perf_counter(); import timm; timm_s = time.perf_counter() - start
before = set(sys.modules)
start = time.perf_counter(); import se_retrofit; own_s = time.perf_counter() - start
added = sorted(set(sys.modules) - before)
print(json.dumps({"torch_s": torch_s, "timm_s": timm_s, "se_retrofit_s": own_s, "added": added,
                  "file": se_retrofit.__file__}))
'''
#: what the core must not load: the trainer, YAML, plotting, data loading, DDP
HEAVY_PREFIXES = ("se_retrofit.finetune", "yaml", "matplotlib", "torch.distributed", "torch.nn.parallel",
                  "torch.utils.data", "PIL", "transformers")


def run_once(path: Path | None) -> dict:
    env = dict(os.environ)
    if path is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(path), env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, check=True)
    return json.loads(done.stdout)


def slowest(path: Path | None, count: int = 10) -> list[tuple[int, str]]:
    env = dict(os.environ)
    if path is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(path), env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, "-X", "importtime", "-c", "import se_retrofit"], capture_output=True,
                          text=True, env=env, check=True)
    rows = []
    for line in done.stderr.splitlines():
        parts = line.split("|")
        if len(parts) == 3 and parts[0].startswith("import time:") and "se_retrofit" in parts[2]:
            try:
                rows.append((int(parts[1]), parts[2].rstrip()))
            except ValueError:
                continue
    return sorted(rows, reverse=True)[:count]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", type=Path, help="an older checkout, timed alternately with this one")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)
    versions = {"before": args.before.resolve()} if args.before else {}
    versions["after" if args.before else "this"] = None
    samples = {label: [] for label in versions}
    for _ in range(args.repeats):
        for label, path in versions.items():
            samples[label].append(run_once(path))
    for label, runs in samples.items():
        own = [r["se_retrofit_s"] for r in runs]
        print(f"{label}: import se_retrofit after torch and timm: min {min(own):.3f} s, median "
              f"{statistics.median(own):.3f} s (import torch: min {min(r['torch_s'] for r in runs):.3f} s, then "
              f"timm: min {min(r['timm_s'] for r in runs):.3f} s); modules it adds: {len(runs[0]['added'])}")
        heavy = sorted({m.split(".")[0] if not m.startswith(("se_retrofit", "torch")) else ".".join(m.split(".")[:2])
                        for m in runs[0]["added"] if m.startswith(HEAVY_PREFIXES)})
        print(f"  heavy modules it adds (trainer, YAML, plots, data, DDP): {', '.join(heavy) or 'none'}")
        print("  slowest se_retrofit modules (cumulative us, -X importtime):")
        for micros, name in slowest(versions[label]):
            print(f"    {micros:>9,}  {name.strip()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
