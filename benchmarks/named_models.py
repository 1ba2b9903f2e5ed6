"""The models issue 19 named, each measured as a user would meet it: the count its source gives, the
units found, the units edited at ``standard`` and ``post`` (with the first reason where some are left
out), identity (outputs ``torch.equal`` to the base's in train and eval mode) and liveness (moving the
new parameters moves the output). Small configurations of each architecture, built from the test
suite's builders (no download), with trained-looking norms.

    python benchmarks/named_models.py          # writes benchmarks/results/named_models.md
    python benchmarks/named_models.py detr     # only the rows whose name contains "detr"
"""
from __future__ import annotations

import contextlib
import re
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
import torchvision

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import se_retrofit  # noqa: E402
from se_retrofit.outputs import output_tensors  # noqa: E402

from helpers import as_if_pretrained  # noqa: E402

RESULT = ROOT / "benchmarks" / "results" / "named_models.md"


def _seeded(seed: int = 0):
    import numpy

    numpy.random.seed(seed)
    torch.manual_seed(seed)


def _call(model, inputs: Any):
    if isinstance(inputs, dict):
        return model(**inputs)
    return model(*inputs) if isinstance(inputs, tuple) else model(inputs)


def _outputs(model, inputs: Any, training: bool) -> list[torch.Tensor]:
    """The tensors ``model`` returns on ``inputs`` (or, where ``inputs`` is a function, what it
    returns for the model and mode: a detector's losses in training)."""
    model.train(training)
    try:
        _seeded()
        with torch.no_grad():
            return inputs(model, training) if callable(inputs) else output_tensors(_call(model, inputs))
    finally:
        model.eval()


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def _edit(base, position: str, probe: Any, options: dict):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            edited = se_retrofit.retrofit(base, position=position, example_input=probe, **options)
        except se_retrofit.RetrofitError as error:
            return None, _short_reason(str(error))
    said = [str(w.message) for w in caught if issubclass(w.category, se_retrofit.LeftOutWarning)]
    if not said:
        return edited, ""
    return edited, _short_reason(said[0])


def _short_reason(message: str) -> str:
    """'N left out (first UNIT: fx stops at FILE:LINE, and WHY NOT FROM OUTSIDE)' from a LeftOutWarning
    or a RetrofitError that lists the units it could not edit."""
    count = re.match(r"(\d+) of the", message)
    unit = re.search(r"(?:unedited|residual connections\)); ?:? ?([^:; ]+):", message.replace("): ", "); "))
    where = re.search(r"\((\w+\.py:\d+)", message) or re.search(r"rewritten \((?:torch\.fx: )?([^.(]{0,50})", message)
    outside = re.search(r"\), and ([^;(]+)", message)
    parts = [f"fx stops at {where[1].strip()}" if where else "", outside[1].strip() if outside else ""]
    return (f"{count[1] if count else 'all'} left out (first {unit[1] if unit else '?'}: "
            f"{', and '.join(p for p in parts if p)})")


def measure(base, probe: Any, inputs: Any, train: bool = True, **options) -> dict:
    """One row's figures: found, edited at standard/post, identity (each mode), liveness (some mode)."""
    analysis = se_retrofit.analyze(base, probe)
    row = {"found": len(analysis.blocks) or len(analysis.units), "identity": True, "live": True, "notes": []}
    for position in ("standard", "post"):
        edited, note = _edit(base, position, probe, options)
        if edited is None:
            row[position] = 0
            row["notes"].append(f"{position}: {note}")
            continue
        row[position] = len({s.unit or s.block for s in edited.se_retrofit.edits[-1][1]})
        if note:
            row["notes"].append(f"{position}: {note}")
        modes = (True, False) if train else (False,)
        row["identity"] &= all(_same(_outputs(edited, inputs, m), _outputs(base, inputs, m)) for m in modes)
        reference = [_outputs(edited, inputs, m) for m in modes]
        generator = torch.Generator().manual_seed(5)
        with torch.no_grad():
            for param in se_retrofit.attention_parameters(edited):
                param.add_(torch.randn(param.shape, generator=generator))
        row["live"] &= any(not _same(_outputs(edited, inputs, m), r) for m, r in zip(modes, reference))
    return row


# --- the rows: (name, expected from the source, why, build -> (model, probe, inputs, options)) -----------

def _frozen_resnet50():
    from test_norms_layout import _trained_frozen_norms
    model = _trained_frozen_norms(torchvision.models.resnet50(norm_layer=torchvision.ops.FrozenBatchNorm2d)).eval()
    x = torch.randn(2, 3, 64, 64)
    return model, x[:1], x, {}


def _detector(name: str, options: dict):
    def build():
        from test_norms_layout import _as_built_for_pretrained_weights, _targets
        with pytest.MonkeyPatch.context() as patch:
            model = _as_built_for_pretrained_weights(name, options, patch)
        images = [torch.rand(3, 64, 64)]

        def run(detector, training: bool) -> list[torch.Tensor]:  # training: the losses, on targets
            if not training:
                return output_tensors(detector(images))
            losses = detector(images, _targets(name))
            return [losses[k] for k in sorted(losses)]
        return model, (images,), run, {}
    return build


def _vit_b_16():
    model = as_if_pretrained(torchvision.models.vit_b_16(weights=None)).eval()
    with torch.no_grad():  # torchvision starts the head at zeros: every output 0, whatever the blocks do
        model.heads.head.weight.normal_(0, 0.02, generator=torch.Generator().manual_seed(0))
    x = torch.randn(1, 3, 224, 224)
    return model, x, x, {}


def _residual_mlp():
    from test_norms_layout import _ResidualMLP
    model = as_if_pretrained(torch.nn.Sequential(_ResidualMLP(), _ResidualMLP(), torch.nn.Linear(64, 2))).eval()
    x = torch.randn(4, 64)
    return model, x[:1], x, {}


def _zoo(builder: str, **options):
    def build():
        import test_zoo
        model, x, _ = test_zoo._built(getattr(test_zoo, builder))
        return model, x, x, options
    return build


def _clip_text():
    from open_clip import model as clip
    _seeded()
    text = dict(context_length=16, vocab_size=100, width=32, heads=2, layers=2)
    tower = as_if_pretrained(clip.CustomTextCLIP(
        32, dict(layers=1, width=32, patch_size=16, image_size=32, head_width=16), text).text.eval())
    tokens = torch.randint(1, 99, (2, 16), generator=torch.Generator().manual_seed(3))
    return tower, tokens[:1], tokens, {"allow_token_models": True}


def _decoder(builder: str, size: int = 64, **config):
    def build():
        import test_decoders
        if builder == "eomt":
            import transformers
            _seeded()
            model = transformers.EomtForUniversalSegmentation(transformers.EomtConfig(
                hidden_size=32, num_hidden_layers=6, num_attention_heads=2, image_size=32, patch_size=8, num_blocks=2,
                num_queries=4, num_labels=3)).eval()
        else:
            model = test_decoders._detr(builder, **config)
            if builder == "DetrForObjectDetection":
                model.config.backbone_config.out_features = ["stage4"]
        x = torch.randn(2, 3, size, size)
        return as_if_pretrained(model).eval(), x[:1], x, {}
    return build


def _mask2former():
    from test_decoders import mask2former
    x = torch.randn(2, 3, 64, 64)
    return mask2former(), x[:1], x, {}


def _conformer():
    from torchaudio import models
    _seeded()
    model = as_if_pretrained(models.Conformer(input_dim=32, num_heads=2, ffn_dim=64, num_layers=2,
                                              depthwise_conv_kernel_size=3).eval())
    x, lengths = torch.randn(3, 10, 32), torch.full((3,), 10)
    return model, (x[:1], lengths[:1]), (x, lengths), {"allow_token_models": True}


def _hook_case(name: str):
    def build():
        import test_hook_edits
        _seeded()
        model, x = getattr(test_hook_edits, name)()
        return as_if_pretrained(model).eval(), x, x, {}
    return build


def _bert():
    import transformers
    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, vocab_size=100)
    _seeded()
    model = as_if_pretrained(transformers.BertModel(config).eval())
    ids = torch.randint(1, 100, (2, 8), generator=torch.Generator().manual_seed(0))
    return model, ids[:1], ids, {"allow_token_models": True}


def _wav2vec2():
    import transformers
    _seeded()
    config = transformers.Wav2Vec2Config(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, conv_dim=(16, 16),
        conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2,
        feat_extract_norm="layer", do_stable_layer_norm=True, mask_time_prob=0.0, layerdrop=0.0)
    model = as_if_pretrained(transformers.Wav2Vec2Model(config)).eval()
    mask = torch.ones(2, 800, dtype=torch.long)
    mask[1, 600:] = 0
    given = {"input_values": torch.randn(2, 800), "attention_mask": mask}
    return model, given, given, {}


_DETECTOR_COUNT = "ResNet-50: 3+4+6+3 bottlenecks (FrozenBatchNorm2d, as built for its weights)"
ROWS: list[tuple[str, int, str, Callable]] = [
    ("torchvision resnet50(norm_layer=FrozenBatchNorm2d)", 16, "3+4+6+3 bottlenecks", _frozen_resnet50),
    ("torchvision fasterrcnn_resnet50_fpn", 16, _DETECTOR_COUNT, _detector("fasterrcnn_resnet50_fpn", {"box_score_thresh": 0.0})),
    ("torchvision maskrcnn_resnet50_fpn", 16, _DETECTOR_COUNT, _detector("maskrcnn_resnet50_fpn", {"box_score_thresh": 0.0})),
    ("torchvision keypointrcnn_resnet50_fpn", 16, _DETECTOR_COUNT, _detector("keypointrcnn_resnet50_fpn", {"box_score_thresh": 0.0})),
    ("torchvision retinanet_resnet50_fpn", 16, _DETECTOR_COUNT, _detector("retinanet_resnet50_fpn", {"score_thresh": 0.0})),
    ("torchvision fcos_resnet50_fpn", 16, _DETECTOR_COUNT, _detector("fcos_resnet50_fpn", {"score_thresh": 0.0})),
    ("torchvision vit_b_16 (fixed 224 px)", 24, "12 layers x (attention, MLP)", _vit_b_16),
    ("residual MLP on (B, 64) tabular input", 2, "2 x (x + f(x))", _residual_mlp),
    ("open_clip ViT image tower", 4, "2 blocks x 2 adds", _zoo("clip_vit_visual")),
    ("open_clip ModifiedResNet image tower", 4, "4 stages x 1 bottleneck", _zoo("clip_resnet_visual")),
    ("open_clip text tower (token ids, allowed)", 4, "2 blocks x 2 adds", _clip_text),
    ("transformers DETR (ResNet backbone, frozen norms)", 12, "4 basic + encoder 1x2 + decoder 2x3",
     _decoder("DetrForObjectDetection", config="DetrConfig", use_timm_backbone=False, encoder_layers=1,
              encoder_ffn_dim=32, decoder_ffn_dim=32)),
    ("transformers RT-DETR", 12, "4 basic + AIFI 1x2 + decoder 2x3",
     _decoder("RTDetrForObjectDetection", config="RTDetrConfig", encoder_hidden_dim=32,
              encoder_in_channels=[32, 64, 128], encoder_ffn_dim=64, decoder_ffn_dim=64,
              decoder_in_channels=[32, 32, 32], num_feature_levels=3, decoder_n_points=2, hidden_expansion=0.5)),
    ("transformers Mask2Former", 12, "4 basic + pixel encoder 1x2 + decoder 2x3", _mask2former),
    ("transformers EoMT (masked last layers)", 12, "6 layers x 2", _decoder("eomt", size=32)),
    ("torchaudio Conformer", 8, "2 layers x (ffn, attention, conv, ffn)", _conformer),
    ("transformers Swin", 8, "4 layers x 2", _hook_case("_swin")),
    ("transformers Swinv2", 8, "4 layers x 2", _hook_case("_swinv2")),
    ("transformers DonutSwin", 8, "4 layers x 2", _hook_case("_donut_swin")),
    ("transformers MaskFormerSwin", 8, "4 layers x 2", _hook_case("_maskformer_swin")),
    ("transformers Whisper encoder", 4, "2 layers x 2", _hook_case("_whisper")),
    ("transformers DETR encoder", 4, "2 layers x 2 (post-norm)", _hook_case("_detr_encoder")),
    ("ultralytics YOLOv8n-seg", 6, "C2f Bottlenecks with shortcut: 1+2+2+1", _zoo("yolov8n_seg")),
    ("MONAI UNet (num_res_units=2)", 5, "5 ResidualUnits", _zoo("monai_unet")),
    ("MONAI UNETR", 32, "12 ViT blocks x 2 + 8 UnetResBlocks", _zoo("monai_unetr")),
    ("smp Unet(resnet18)", 8, "8 BasicBlocks", _zoo("smp_unet_resnet18")),
    ("MONAI SwinUNETR", 18, "8 Swin adds + 10 UnetResBlocks", _zoo("monai_swin_unetr")),
    ("smp Unet(efficientnet-b0)", 9, "MBConv blocks with a shortcut", _zoo("smp_unet_efficientnet_b0")),
    ("MONAI BasicUNet (chain layers)", 18, "9 TwoConv x 2 conv-norm-dropout-act", _zoo("monai_basic_unet", kinds=["chain"])),
    ("MONAI DynUNet (chain layers)", 14, "conv1 and conv2 of 7 blocks", _zoo("monai_dynunet_basic", kinds=["chain"])),
    ("transformers BertModel (token ids, allowed)", 4, "2 layers x 2", _bert),
    ("transformers Wav2Vec2 with attention_mask", 5, "pos-conv + 2 layers x 2", _wav2vec2),
]


def main(argv: list[str]) -> None:
    chosen = [row for row in ROWS if not argv or any(a.lower() in row[0].lower() for a in argv)]
    lines = ["| model | expected (source) | found | edited standard | edited post | identity (train, eval) | live | "
             "seconds | left out |", "|---|---|---|---|---|---|---|---|---|"]
    for name, expected, why, build in chosen:
        start = time.perf_counter()
        try:
            model, probe, inputs, options = build()
        except ImportError as error:
            line = f"| {name} | {expected} ({why}) | not run here: {error} | | | | | | |"
            print(line, flush=True)
            lines.append(line)
            continue
        row = measure(model, probe, inputs, **options)
        seconds = time.perf_counter() - start
        notes = "; ".join(row["notes"]) or "-"
        line = (f"| {name} | {expected} ({why}) | {row['found']} | {row['standard']} | {row['post']} | "
                f"{'exact' if row['identity'] else 'DIFFERS'} | {'yes' if row['live'] else 'NO'} | {seconds:.1f} | {notes} |")
        print(line, flush=True)
        lines.append(line)
    if not argv:
        RESULT.write_text("\n".join(lines) + "\n")
        print(f"wrote {RESULT}")


if __name__ == "__main__":
    warnings.filterwarnings("ignore", category=FutureWarning)
    with contextlib.suppress(KeyboardInterrupt):
        main(sys.argv[1:])
