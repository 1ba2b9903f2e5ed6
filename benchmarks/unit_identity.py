"""Issue 12's models: units found, and for every position that applies, identity and liveness.

For each model (random weights given trained-like statistics, ``tests/helpers.as_if_pretrained``): the
units found by kind, then per position (``standard``, ``post``, ``stage``) the modules inserted, the max
|Δ| between the edited and the original model in eval and in train mode (same seed), and whether
perturbing the inserted modules' weights moves the output (live). Positions a kind has not (``pre``,
``identity``, ``inner`` on joins and chain layers) are listed with the refusal's reason.

    python benchmarks/unit_identity.py [--size 96] [--json results/unit_identity.json]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import timm
import torch
import torchvision

import se_retrofit

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from helpers import as_if_pretrained, run  # noqa: E402

tv = torchvision.models
MODELS = {
    "torchvision:vgg16_bn": lambda: tv.vgg16_bn(),
    "torchvision:googlenet": lambda: tv.googlenet(init_weights=False, aux_logits=False),
    "torchvision:inception_v3": lambda: tv.inception_v3(init_weights=False, aux_logits=False),
    "torchvision:densenet121": lambda: tv.densenet121(),
    "torchvision:shufflenet_v2_x1_0": lambda: tv.shufflenet_v2_x1_0(),
    "timm:mobilenetv1_100": lambda: timm.create_model("mobilenetv1_100"),
    "timm:inception_v3": lambda: timm.create_model("inception_v3"),
    "timm:densenet121": lambda: timm.create_model("densenet121"),
    "timm:vgg16": lambda: timm.create_model("vgg16"),
}
POSITIONS = ("standard", "post", "stage", "pre", "identity", "inner")


def measure(name: str, size: int) -> dict:
    torch.manual_seed(0)
    base = as_if_pretrained(MODELS[name]()).eval()
    x = torch.randn(2, 3, size, size)
    analysis = se_retrofit.analyze(base, x[:1])
    row = {"model": name, "units": {k: analysis.count(k) for k in ("residual", "join", "chain") if analysis.count(k)}}
    for position in POSITIONS:
        try:
            edited = se_retrofit.retrofit(base, position=position, example_input=x[:1])
        except se_retrofit.RetrofitError as error:
            row[position] = {"refused": str(error)}
            continue
        diffs = [(run(edited, x, t) - run(base, x, t)).abs().max().item() for t in (False, True)]
        reference = run(edited, x, False)
        new = [k for k in edited.state_dict() if k not in base.state_dict()]
        with torch.no_grad():
            for key, param in edited.named_parameters():
                if key in new:
                    param.add_(torch.randn_like(param))
        row[position] = {"modules": len(edited.se_retrofit.sites), "max_abs_diff_eval": diffs[0],
                         "max_abs_diff_train": diffs[1], "live": not torch.equal(run(edited, x, False), reference)}
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=96, help="input side (inception_v3 needs 75 or more)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    rows = []
    print("| model | units | standard | post | stage | pre / identity / inner |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name in MODELS:
        row = measure(name, args.size)
        rows.append(row)
        cells = []
        for position in ("standard", "post", "stage"):
            r = row[position]
            cells.append(f"refused: {r['refused']}" if "refused" in r else
                         f"{r['modules']} modules, max abs diff {max(r['max_abs_diff_eval'], r['max_abs_diff_train']):g}, "
                         f"{'live' if r['live'] else 'NOT live'}")
        refused = all("refused" in row[p] for p in ("pre", "identity", "inner"))
        units = ", ".join(f"{k} {v}" for k, v in row["units"].items())
        print(f"| {name} | {units} | " + " | ".join(cells) + f" | {'refused' if refused else 'NOT refused'} |",
              flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
