"""Cost of each attention type at its default placement: parameters, FLOPs and CPU latency added.

For every built-in type on timm ``resnet50`` at 224×224 (and Non-local on torchvision ``r3d_18``
with an 8×112×112 clip), the script retrofits the model at identity and reports

- parameters added (exact count),
- FLOPs added, counted by ``torch.utils.flop_counter.FlopCounterMode`` at batch 1 (it counts
  convolutions and matrix products, as papers do; element-wise ops are not counted),
- the CPU latency ratio edited / plain at batch 1: both models timed interleaved (one forward of
  each per round, so drift hits both alike), the minimum over ``--repeats`` rounds, on one thread
  (the machine is shared: the minimum of single-threaded runs is the least noisy figure),

next to the paper's own figures where the paper gives them. Weights are random (the costs do not
depend on them). Writes ``benchmarks/results/attention_figures.md`` and ``.json``.

Run from the repository root::

    python benchmarks/attention_figures.py               # all rows (~10 min on a busy 2-core CPU)
    python benchmarks/attention_figures.py --repeats 3 --only nonlocal,gc
"""
from __future__ import annotations

import argparse
import json
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import timm
import torch
import torchvision
from torch.utils.flop_counter import FlopCounterMode

import se_retrofit

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass
class Row:
    label: str
    attention: str
    model: str = "resnet50"
    kwargs: dict = field(default_factory=dict)
    paper: str = "—"


ROWS = [
    Row("se (reference)", "se", paper="+~2.5M params, 3.86 → 3.87 GFLOPs (+0.26%); CPU 164 → 167 ms"),
    Row("nonlocal, default: every block, post", "nonlocal"),
    Row("nonlocal, 1 block (after layer3.4)", "nonlocal", kwargs={"blocks": ["layer3.4"]},
        paper="Kinetics R50 top-1 71.8 → 72.7; COCO R50 box/mask AP 38.0/34.6 → 39.0/35.5"),
    Row("nonlocal, 5 blocks (stages 2-3, every 2)", "nonlocal", kwargs={"stages": [2, 3], "every": 2},
        paper="Kinetics R50 top-1 71.8 → 73.8"),
    Row("nonlocal on r3d_18, 1 block (after layer3.0)", "nonlocal", model="r3d_18",
        kwargs={"blocks": ["layer3.0"]}),
    Row("nonlocal on r3d_18, stages 2-3 (4 blocks)", "nonlocal", model="r3d_18", kwargs={"stages": [2, 3]}),
    Row("pam (last block, post)", "pam"),
    Row("cam (last block, post)", "cam"),
    Row("danet (last block, post)", "danet", paper="on the dilated R50 output (stride 8); the paper gives no cost"),
    Row("gc r16, default: every block, standard", "gc"),
    Row("gc r16, stages 2-4 (c3-c5)", "gc", kwargs={"stages": [2, 3, 4]},
        paper="COCO Mask R-CNN R50 box/mask AP 37.2/33.8 → 39.4/35.7"),
    Row("gc r4, stages 2-4 (c3-c5)", "gc", kwargs={"stages": [2, 3, 4], "reduction": 4},
        paper="COCO Mask R-CNN R50 box/mask AP 37.2/33.8 → 39.9/36.2"),
] + [Row(f"timm:{n} (every block, standard)", f"timm:{n}", kwargs={"use_mlp": False} if n == "ge" else {})
     for n in ("se", "ese", "eca", "ecam", "ceca", "ge", "gc", "gca", "cbam", "lcbam", "nl", "bat",
               "coord", "scoord", "ela", "strip")]


def base_model(name: str) -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    if name == "r3d_18":
        return torchvision.models.video.r3d_18().eval(), torch.randn(1, 3, 8, 112, 112)
    return timm.create_model(name).eval(), torch.randn(1, 3, 224, 224)


def count_flops(model: torch.nn.Module, x: torch.Tensor) -> int:
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(x)
    return counter.get_total_flops()


def latency_ratio(base, edited, x, repeats: int) -> tuple[float, float, float]:
    times = {"base": [], "edited": []}
    with torch.inference_mode():
        for model in (base, edited):
            model(x)  # warm-up
        for _ in range(repeats):
            for key, model in (("base", base), ("edited", edited)):
                start = time.perf_counter()
                model(x)
                times[key].append(time.perf_counter() - start)
    b, e = min(times["base"]), min(times["edited"])
    return b * 1e3, e * 1e3, e / b


def measure(row: Row, repeats: int, cache: dict) -> dict:
    if row.model not in cache:
        base, x = base_model(row.model)
        cache[row.model] = (base, x, count_flops(base, x), sum(p.numel() for p in base.parameters()))
    base, x, base_flops, base_params = cache[row.model]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        edited = se_retrofit.retrofit(base, attention=row.attention, example_input=x, **row.kwargs).eval()
    sites = se_retrofit.record_of(edited).sites
    with torch.no_grad():
        assert torch.equal(edited(x), base(x)), f"{row.label}: not identity"
    params = sum(p.numel() for p in edited.parameters()) - base_params
    flops = count_flops(edited, x) - base_flops
    base_ms, edited_ms, ratio = latency_ratio(base, edited, x, repeats)
    return {"label": row.label, "model": row.model, "attention": row.attention, "kwargs": row.kwargs,
            "sites": len(sites), "params_added": params, "params_added_pct": 100 * params / base_params,
            "base_gflops": base_flops / 1e9, "gflops_added": flops / 1e9, "flops_added_pct": 100 * flops / base_flops,
            "base_ms": base_ms, "edited_ms": edited_ms, "latency_ratio": ratio, "paper": row.paper,
            "max_attention_mib": None if all(s.attention_bytes is None for s in sites)
            else max(s.attention_bytes or 0 for s in sites) / 2 ** 20}


def _mib(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f} MiB"


def table(results: list[dict]) -> str:
    lines = ["| type and placement | model | sites | params added | GFLOPs added | CPU latency ratio "
             "| largest attention map | paper |", "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in results:
        lines.append(f"| {r['label']} | {r['model']} | {r['sites']} | {r['params_added']:,} "
                     f"(+{r['params_added_pct']:.1f}%) | {r['gflops_added']:.3f} (+{r['flops_added_pct']:.1f}%) "
                     f"| {r['latency_ratio']:.2f} | {_mib(r['max_attention_mib'])} | {r['paper']} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--only", help="comma-separated attention names to run")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = [r for r in ROWS if not args.only or r.attention in args.only.split(",")]
    cache: dict = {}
    results = []
    for row in rows:
        results.append(measure(row, args.repeats, cache))
        r = results[-1]
        print(f"{r['label']}: +{r['params_added']:,} params, +{r['gflops_added']:.3f} GFLOPs, "
              f"latency ×{r['latency_ratio']:.2f}", flush=True)
    bases = {m: f"{m}: {c[2] / 1e9:.2f} GFLOPs, {c[3]:,} params" for m, c in cache.items()}
    header = (f"# Attention types: cost at the default placement\n\nGenerated by benchmarks/attention_figures.py "
              f"(torch {torch.__version__}, timm {timm.__version__}, {args.threads} CPU thread(s), min of "
              f"{args.repeats} interleaved rounds, batch 1; resnet50 at 224×224, r3d_18 at 8×112×112). "
              f"Plain models: {'; '.join(bases.values())}.\n\n")
    RESULTS.mkdir(exist_ok=True)
    if not args.only:
        (RESULTS / "attention_figures.md").write_text(header + table(results) + "\n")
        (RESULTS / "attention_figures.json").write_text(json.dumps(results, indent=2) + "\n")
    print(header + table(results))


if __name__ == "__main__":
    main()
