"""Identity and liveness of every attention type at every position, on the models the papers use.

For each (model, type, position) the script retrofits a model with trained-looking random weights
(``tests/conftest.py`` ``as_if_pretrained``: fresh timm models output ~0 on every branch, which would
make an identity check vacuous) and reports

- identity: max |Δ| between the edited and the original output, in train mode (same seed) and in
  eval mode — the figure the closing note quotes; ``torch.equal`` is required;
- liveness: max |Δ| after adding N(0, 0.001²) noise to the new parameters only (eval): must be > 0
  and finite (larger noise overflows Non-local's unnormalised ``dot`` mode through 16 random blocks).

Models: timm ``resnet50`` (64×64; 224×224 for ``timm:bat``, whose blocks need multiples of 7) for
every type; torchvision ``deeplabv3_resnet50`` (64×64) for danet/pam/cam; torchvision ``r3d_18``
(1×3×4×32×32) and timm ``vit_tiny_patch16_224`` at 64×64 (tokens) for nonlocal. A position a model
cannot take (``inner`` on ViT blocks, ``stage`` on ViT's single stage) is listed as not applicable
with the reason. Writes ``benchmarks/results/attention_identity.md``.

    python benchmarks/attention_identity.py            # ~10 min on a busy 2-core CPU
"""
from __future__ import annotations

import sys
import time
import warnings
from pathlib import Path

import timm
import torch
import torchvision

import se_retrofit
from se_retrofit.attention.timm_attention import TIMM_ATTENTIONS

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import as_if_pretrained  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
POSITIONS = ("standard", "pre", "post", "identity", "inner", "stage")
OWN = [("nonlocal", {}), ("nonlocal", {"mode": "dot"}), ("nonlocal", {"mode": "gaussian"}), ("pam", {}),
       ("cam", {}), ("danet", {}), ("gc", {}), ("gc", {"fusion": "mul"})]
TIMM = [(f"timm:{n}", {"use_mlp": False} if n == "ge" else {}) for n in TIMM_ATTENTIONS]


def models():
    torch.manual_seed(0)
    yield "resnet50", as_if_pretrained(timm.create_model("resnet50")).eval(), torch.randn(2, 3, 64, 64), OWN + TIMM
    torch.manual_seed(0)
    yield ("deeplabv3_resnet50", as_if_pretrained(torchvision.models.segmentation.deeplabv3_resnet50(
        weights=None, weights_backbone=None, num_classes=3, aux_loss=False)).eval(), torch.randn(2, 3, 64, 64),
        [("danet", {}), ("pam", {}), ("cam", {})])
    torch.manual_seed(0)
    yield ("r3d_18", as_if_pretrained(torchvision.models.video.r3d_18()).eval(), torch.randn(2, 3, 4, 32, 32),
           [("nonlocal", {})])
    torch.manual_seed(0)
    yield ("vit_tiny_patch16_224@64", as_if_pretrained(timm.create_model("vit_tiny_patch16_224", img_size=64)).eval(),
           torch.randn(2, 3, 64, 64), [("nonlocal", {})])


def output(model, x, training: bool) -> torch.Tensor:
    model.train(training)
    torch.manual_seed(7)
    with torch.no_grad():
        out = model(x)
    return out["out"] if isinstance(out, dict) else out


def check(base, x, name, options, position) -> dict:
    if name == "timm:bat":
        x = torch.randn(1, 3, 224, 224)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        edited = se_retrofit.retrofit(base, attention=name, position=position, example_input=x[:1], **options)
    sites = se_retrofit.record_of(edited).sites
    diffs, equal = [], True
    for training in (True, False):
        a, b = output(edited, x, training), output(base, x, training)
        diffs.append((a - b).abs().max().item())
        equal &= torch.equal(a, b)
    new = {f"{s.module_path}." for s in sites}
    with torch.no_grad():
        for n, p in edited.named_parameters():
            if any(n.startswith(prefix) for prefix in new):
                p.add_(torch.randn_like(p) * 1e-3)
    moved = (output(edited, x, False) - output(base, x, False)).abs().max().item()
    base.eval()
    return {"sites": len(sites), "train": diffs[0], "eval": diffs[1], "equal": equal, "moved": moved}


def main() -> None:
    torch.set_num_threads(1)
    lines = ["| model | type | position | sites | max abs Δ train | max abs Δ eval | torch.equal | "
             "Δ after perturbing new params |", "| --- | --- | --- | ---: | ---: | ---: | --- | ---: |"]
    failures = 0
    start = time.time()
    for model_name, base, x, types in models():
        for name, options in types:
            label = name + "".join(f" {k}={v}" for k, v in options.items())
            for position in POSITIONS:
                try:
                    r = check(base, x, name, options, position)
                except se_retrofit.RetrofitError as error:
                    lines.append(f"| {model_name} | {label} | {position} | – | not applicable: {error} | | | |")
                    continue
                ok = r["equal"] and 0 < r["moved"] < float("inf")
                failures += not ok
                lines.append(f"| {model_name} | {label} | {position} | {r['sites']} | {r['train']:.3g} | "
                             f"{r['eval']:.3g} | {r['equal']} | {r['moved']:.3g} |")
                print(lines[-1], flush=True)
    text = (f"# Attention types: identity and liveness at every position\n\nGenerated by "
            f"benchmarks/attention_identity.py in {time.time() - start:.0f} s; {failures} failure(s).\n\n"
            + "\n".join(lines) + "\n")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "attention_identity.md").write_text(text)
    print(f"failures: {failures}")


if __name__ == "__main__":
    main()
