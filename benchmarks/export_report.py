"""Export report: every format's equality check, and timm-native round trips in a fresh process.

1. timm resnet18 + SE (trained-looking weights, SE moved off identity), input 1x3x64x64: each format of
   ``se_retrofit.export`` with the max |Δ| its own check measured, and the time.
2. timm resnet50 + SE at ``standard``, r=16: exported with ``format="timm"`` and loaded in a fresh Python
   process that never imports se_retrofit, with
   ``timm.create_model("seresnet50", pretrained=True, pretrained_cfg_overlay=dict(file=...))``:
   strict key match and max |Δ| against the edited model.

    python benchmarks/export_report.py --json benchmarks/results/export_report.json
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import timm
import torch

import se_retrofit
from se_retrofit.export import FORMATS

FILE_NAMES = {"safetensors": "model", "timm": "seresnet18.safetensors", "torchscript": "model.torchscript.pt",
              "export": "model.pt2", "onnx": "model.onnx"}

CHILD = """
import json, sys, torch, timm
from safetensors.torch import load_file
path, io_path = sys.argv[1], sys.argv[2]
native = timm.create_model("seresnet50", pretrained=True, pretrained_cfg_overlay=dict(file=path)).eval()
keys = str(timm.create_model("seresnet50").load_state_dict(load_file(path), strict=True))
io = torch.load(io_path, weights_only=True)
with torch.no_grad():
    diff = (native(io["x"]) - io["y"]).abs().max().item()
print(json.dumps({"se_retrofit_imported": "se_retrofit" in sys.modules, "strict_load": keys, "max_abs_diff": diff}))
"""


@torch.no_grad()
def trained_looking(model: torch.nn.Module, seed: int = 3) -> torch.nn.Module:
    """BN statistics of a trained network and SE weights away from their identity start."""
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.weight.copy_(torch.rand(module.weight.shape, generator=generator) + 0.5)
            module.running_var.copy_(torch.rand(module.running_var.shape, generator=generator) + 0.5)
    for name, param in model.named_parameters():
        if ".se." in name:
            param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    return model


def formats_report(out: Path) -> list[dict]:
    torch.manual_seed(0)
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(123))
    model = trained_looking(se_retrofit.retrofit(timm.create_model("resnet18"), example_input=x))
    rows = []
    for fmt in FORMATS:
        start = time.perf_counter()
        result = se_retrofit.export(model, out / FILE_NAMES[fmt], format=fmt, example_input=x)
        rows.append({"format": fmt, "max_abs_diff": result.max_abs_diff, "dynamic_batch": result.dynamic_batch,
                     "seconds": round(time.perf_counter() - start, 2)})
        print(f"{fmt:12s} max |Δ| = {result.max_abs_diff:.3g}  any batch size: {result.dynamic_batch}  "
              f"{rows[-1]['seconds']} s")
    return rows


def timm_round_trip(out: Path) -> dict:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(123))
    model = trained_looking(se_retrofit.retrofit(timm.create_model("resnet50"), position="standard", reduction=16))
    result = se_retrofit.export(model, out / "seresnet50.safetensors", format="timm", example_input=x)
    with torch.no_grad():
        torch.save({"x": x, "y": model.eval()(x)}, out / "io.pt")
    child = subprocess.run([sys.executable, "-c", CHILD, str(result.path), str(out / "io.pt")],
                           capture_output=True, text=True, check=True)
    report = {"timm_model": result.timm_model, "in_process_max_abs_diff": result.max_abs_diff,
              **json.loads(child.stdout.strip().splitlines()[-1])}
    print(f"resnet50 + SE standard -> {report['timm_model']}: in-process check max |Δ| = "
          f"{report['in_process_max_abs_diff']}; fresh process without se_retrofit "
          f"(imported: {report['se_retrofit_imported']}): {report['strict_load']}, max |Δ| = {report['max_abs_diff']}")
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        report = {"formats": formats_report(Path(tmp)), "timm_round_trip": timm_round_trip(Path(tmp))}
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
