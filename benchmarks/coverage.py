"""Coverage sweep: every timm and torchvision model, analysed and retrofitted, with the results in a CSV.

For each model (random weights) it records: residual blocks found, the units edited by default (the
first kind the model has: residual blocks, joins or chain layers, with their count), stages, status
(``ok``, ``no-units`` where it has none of the three, ``skipped: <reason>``, ``error: <reason>``), the
identity max |Δ| (relative) for SE at ``standard`` and at ``post``, parameters, and the time taken.

How it fits 2 cores and 24 GiB:
* models are built on the ``meta`` device first: no memory, no init time, and shapes still
  propagate, so the analysis (blocks, stages, layouts) runs on meta tensors for every model;
* models up to ``--max-params`` are then built for real, with cheap random weights, to measure the
  identity on the whole model, on the smallest input it accepts (64 px; timm's fixed-size
  transformers built for 64 px); bigger models are checked edited block by edited block;
* chunks of models run in worker processes (``--workers``, one chunk per process; a pool that reuses
  processes with max_tasks_per_child > 1 hangs on Python 3.11), so a crash or a
  leak ends one chunk, not the sweep; each model has a time limit (``--model-seconds``).

    python benchmarks/coverage.py                      # everything (writes benchmarks/results/coverage.csv)
    python benchmarks/coverage.py --limit 40 --sample  # a spread-out sample
    python benchmarks/coverage.py --models resnet50 torchvision:fasterrcnn_resnet50_fpn
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import contextlib
import copy
import csv
import dataclasses
import inspect
import math
import multiprocessing
import signal
import sys
import time
import warnings
from collections import Counter, defaultdict
from pathlib import Path

FIELDS = ["source", "name", "status", "blocks", "units", "expected", "expected_from", "edited", "stages", "params_m",
          "identity_standard", "identity_post", "identity_scope", "config_changes", "seconds"]
LIBRARIES = ("timm", "torchvision", "transformers")
RESULTS = Path(__file__).resolve().parent / "results"


class ModelTimeout(Exception):
    pass


def all_models(libraries=("timm", "torchvision"), hf_tasks=("classification",)) -> list[tuple[str, str]]:
    """(source, name) of every model of ``libraries``: timm's and torchvision's registries, and for
    transformers every class of the mappings of ``hf_tasks`` (named by class; see :data:`HF_TASKS`)."""
    models = []
    if "timm" in libraries:
        import timm

        models += [("timm", n) for n in timm.list_models()]
    if "torchvision" in libraries:
        import torchvision

        models += [("torchvision", n) for n in torchvision.models.list_models()]
    if "transformers" in libraries:
        models += [("transformers", n) for n in hf_architectures(hf_tasks)]
    return models


#: transformers' auto mappings swept per task (``--hf-tasks``); ``classification`` is the original sweep.
HF_TASKS: dict[str, tuple[str, ...]] = {
    "classification": ("MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES", "MODEL_FOR_BACKBONE_MAPPING_NAMES"),
    "detection": ("MODEL_FOR_OBJECT_DETECTION_MAPPING_NAMES",),
    "segmentation": ("MODEL_FOR_UNIVERSAL_SEGMENTATION_MAPPING_NAMES", "MODEL_FOR_SEMANTIC_SEGMENTATION_MAPPING_NAMES"),
    "depth": ("MODEL_FOR_DEPTH_ESTIMATION_MAPPING_NAMES",),
    "audio": ("MODEL_FOR_AUDIO_CLASSIFICATION_MAPPING_NAMES",),
}


def hf_architectures(tasks=tuple(HF_TASKS)) -> dict[str, str]:
    """{class name: model type} for every class in transformers' mappings of ``tasks`` (:data:`HF_TASKS`:
    image classification and backbones, object detection, universal and semantic segmentation, depth
    estimation, audio classification); a model type can map to several classes."""
    from transformers.models.auto import modeling_auto

    classes: dict[str, str] = {}
    for task in tasks:
        for mapping_name in HF_TASKS[task]:
            for model_type, names in getattr(modeling_auto, mapping_name).items():
                for cls in (names,) if isinstance(names, str) else names:
                    classes.setdefault(cls, model_type)
    return classes


# Architectures a default config cannot build or run, with the precise reason (found by running them).
HF_SKIPS: dict[str, str] = {
    "DinatForImageClassification": "needs the natten library (compiled neighbourhood-attention kernels), "
                                   "not installed",
    "DinatBackbone": "needs the natten library (compiled neighbourhood-attention kernels), not installed",
    "ShieldGemma2ForImageClassification": "a vision-language classifier: it classifies a text prompt "
                                          "(input_ids with image tokens, from its processor), not pixel_values alone",
}
# PP-OCR text detectors' neck (kernel, stride, padding of each conv), as transformers' tests and the
# PaddlePaddle checkpoints have it; the default config leaves it None.
_PPOCR_INTRACLASS = {
    "reduce_channel": [1, 1, 0], "return_channel": [1, 1, 0],
    "vertical_long_to_small_conv_longratio": [[7, 1], [1, 1], [3, 0]],
    "vertical_long_to_small_conv_midratio": [[5, 1], [1, 1], [2, 0]],
    "vertical_long_to_small_conv_shortratio": [[3, 1], [1, 1], [1, 0]],
    "horizontal_small_to_long_conv_longratio": [[1, 7], [1, 1], [0, 3]],
    "horizontal_small_to_long_conv_midratio": [[1, 5], [1, 1], [0, 2]],
    "horizontal_small_to_long_conv_shortratio": [[1, 3], [1, 1], [0, 1]],
    "symmetric_conv_long_longratio": [[7, 7], [1, 1], [3, 3]],
    "symmetric_conv_long_midratio": [[5, 5], [1, 1], [2, 2]],
    "symmetric_conv_long_shortratio": [[3, 3], [1, 1], [1, 1]],
}
_PPOCR_NECK = {"intraclass_block_config": _PPOCR_INTRACLASS, "scale_factor_list": [1, 2, 4, 8], "kernel_list": [3, 2, 2]}
_PPLCNETV4_DET = {  # transformers' tests/models/pp_ocrv6_{small,medium}_det: a detection layout of PP-LCNetV4
    "out_features": ["stage1", "stage2", "stage3", "stage4"], "out_indices": [1, 2, 3, 4],
    "stem_channels": [3, 16, 16], "stem_type": "large",
    "block_configs": [[[3, 16, 16, 1, False]], [[3, 16, 16, 2, False], [3, 16, 16, 1, False]],
                      [[3, 16, 16, 2, False], [3, 16, 16, 1, False]],
                      [[3, 16, 16, 2, False]] + [[5, 16, 16, 1, False]] * 4],
}
# Defaults transformers 5.24 ships that its own classes reject or leave unset (None, empty), each set as the
# real checkpoint has it; recorded in config_changes. ``list``: the default tuple as a list. A dotted key sets
# an attribute of a sub-config; a function gives the value (a config object).
HF_CONFIG_FIXES: dict[str, dict[str, object]] = {
    # the default is a tuple; the backbone does `[h0] + hidden_sizes`
    **{name: {"hidden_sizes": list} for name in ("ConvNextBackbone", "ConvNextV2Backbone", "FocalNetBackbone")},
    "PPOCRV5ServerDetForObjectDetection": _PPOCR_NECK,
    # PP-OCRv6 detectors: the default backbone is PP-LCNetV4's text-recognition layout (late stages stride
    # (2, 1): 224 px gives 14x56 maps, and only its last stage out), which the detection neck cannot fuse; the
    # v6 checkpoints are unpublished ("weights have not been uploaded yet" in transformers' tests), so the
    # backbone of those tests (4 stages out, stride 2 each) and, for the small one, its neck widths
    "PPOCRV6MediumDetForObjectDetection": {**_PPOCR_NECK, "backbone_config": lambda: _config("pp_lcnet_v4",
                                                                                          **_PPLCNETV4_DET)},
    "PPOCRV6SmallDetForObjectDetection": {"backbone_config": lambda: _config("pp_lcnet_v4", **_PPLCNETV4_DET),
                                          "layer_list_out_channels": [16, 16, 16, 16], "neck_out_channels": 16},
    # facebook/sapiens2-seg-0.4b's decode head (4 transposed convs, 2 convs); the default head has none
    "Sapiens2ForSemanticSegmentation": {"head_config.upsample_out_channels": [512, 256, 128, 64],
                                        "head_config.upsample_kernel_sizes": [4, 4, 4, 4],
                                        "head_config.conv_out_channels": [64, 64],
                                        "head_config.conv_kernel_sizes": [1, 1]},
    # the class requires 4 out_indices and its error message names these (BEiT-base's 4 feature levels)
    "BeitForSemanticSegmentation": {"out_indices": [3, 5, 7, 11]},
    # LW-DETR tiny/small/medium project one level (P4, scale 1.0); the default () projects none
    "LwDetrForObjectDetection": {"projector_scale_factors": [1.0]},
    # the head filters its detections by a per-class threshold and orders them by a per-class reading-order
    # class, both None by default: one each for the default config's 2 labels (the 25-label checkpoint uses
    # 0.4-0.5)
    "PPDocLayoutV2ForObjectDetection": {"class_thresholds": [0.5, 0.5], "class_order": [0, 1]},
    # DepthPro runs only at patch_size / 0.25 px (1536): its blocks alone take minutes there; 112 px patches
    # (8x8 DINOv2 patches of 14 px) make it 448 px; the DINOv2 encoders given as dicts take image_size from it
    "DepthProForDepthEstimation": {"patch_size": 112, "image_model_config": {"model_type": "dinov2"},
                                   "patch_model_config": {"model_type": "dinov2"},
                                   "fov_model_config": {"model_type": "dinov2"}},
    # smaller than the default, whose forward alone outlasts --model-seconds on one core: EoMT-L at 640 px
    # takes 130 s a forward, 13 s at 224 px (the position embeddings and the mask grid are sized by image_size)
    **{name: {"image_size": 224} for name in ("EomtForUniversalSegmentation", "EomtDinov3ForUniversalSegmentation",
                                             "VideomtForUniversalSegmentation")},
    # the default config does not build (its 8 cross-attention heads do not divide the 261 / 322 channels of
    # the preprocessed pixels); deepmind's checkpoints, as transformers' convert_perceiver_to_pytorch.py builds
    # them: one cross-attention head, d_model the preprocessor's channels
    "PerceiverForImageClassificationFourier": {"num_cross_attention_heads": 1, "d_model": 261},
    "PerceiverForImageClassificationConvProcessing": {"num_cross_attention_heads": 1, "d_model": 322},
    # the default config names no timm model (backbone=None): it wraps one; resnet18, random weights
    "TimmBackbone": {"backbone": "resnet18"},
}


def _build_hf(name: str, **changes):
    """A transformers model of class ``name`` from its model type's default config, random weights;
    ``changes`` set config attributes the default config has (e.g. ``image_size``)."""
    import transformers
    from transformers import AutoConfig

    fixes = {k: v() if callable(v) and v is not list else copy.deepcopy(v)
             for k, v in HF_CONFIG_FIXES.get(name, {}).items()}
    given = {k: v for k, v in fixes.items() if "." not in k and v is not list}  # so __post_init__ sees them
    config = AutoConfig.for_model(hf_architectures()[name], **given)
    for key, value in ((k, v) for k, v in fixes.items() if k not in given):
        *parents, leaf = key.split(".")
        owner = config
        for parent in parents:
            owner = getattr(owner, parent)
        setattr(owner, leaf, list(getattr(owner, leaf)) if value is list else value)
    if getattr(config, "use_pretrained_backbone", False):  # DETR-style configs download a timm backbone
        config.use_pretrained_backbone = False
    for key, value in changes.items():
        if not hasattr(config, key):
            raise TypeError(f"{type(config).__name__} has no {key}")
        setattr(config, key, value)
    return getattr(transformers, name)(config)


def _config(model_type: str, **values):
    from transformers import AutoConfig

    return AutoConfig.for_model(model_type, **values)


def _build(source: str, name: str, device: str, **kwargs):
    import timm
    import torch
    import torchvision

    with torch.device(device):
        if source == "timm":
            return timm.create_model(name, pretrained=False, **kwargs)
        if source == "transformers":
            return _build_hf(name, **kwargs)
        builder = torchvision.models.get_model_builder(name)
        accepted = inspect.signature(builder).parameters
        kwargs.update({k: v for k, v in (("weights", None), ("weights_backbone", None), ("quantize", False))
                       if k in accepted})
        return builder(**kwargs)


@contextlib.contextmanager
def _parameters_on_meta():
    """Create parameters on the meta device (so initialisers cost nothing); buffers stay real."""
    from torch import nn

    register = nn.Module.register_parameter

    def register_on_meta(module, name, param):
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def _materialise(source: str, name: str, **kwargs):
    """A CPU model with cheap random weights: built with meta parameters, then each filled with one
    ``uniform_`` of fan-in variance (norm scales 0.5-1.5, biases small), far cheaper than the
    libraries' initialisers. Falls back to a normal build where a constructor needs real parameters."""
    import torch

    try:
        with _parameters_on_meta():
            model = _build(source, name, "cpu", **kwargs)
        _fill_parameters(model, torch.Generator().manual_seed(0))
        if any(t.device.type == "meta" for t in model.state_dict().values()):
            raise RuntimeError("a buffer was derived from a parameter")
        return model
    except Exception:
        return _build(source, name, "cpu", **kwargs)


def _fill_parameters(model, generator) -> None:
    """Replace every parameter of ``model`` (meta or not) by a CPU one filled by :func:`_filled`."""
    for module in model.modules():
        for key, param in module._parameters.items():
            if param is not None:
                module._parameters[key] = _filled(key, param, generator)


def _filled(key: str, param, generator):
    import torch

    value = torch.empty(param.shape, dtype=param.dtype)
    if value.is_floating_point():
        if param.ndim >= 2:
            bound = math.sqrt(3.0 / max(1, param[0].numel()))
            value.uniform_(-bound, bound, generator=generator)
        elif key in ("weight", "gamma") or "scale" in key:
            value.uniform_(0.5, 1.5, generator=generator)
        else:
            value.uniform_(-0.1, 0.1, generator=generator)
    else:
        value.zero_()
    return torch.nn.Parameter(value, requires_grad=param.requires_grad)


def _inputs(source: str, name: str, model, device: str, side: int | None = None):
    """An input for this model: its native size, or images ``side`` pixels square where given."""
    import torch
    import torchvision

    if source == "transformers":
        return _hf_inputs(model, device, side)
    family = torchvision.models.get_model_builder(name).__module__ if source == "torchvision" else "timm"
    if "optical_flow" in family:
        size = (1, 3, 128, 128)
        return (torch.randn(size, device=device), torch.randn(size, device=device))
    if "detection" in family:
        return ([torch.rand(3, 160 if side else 320, 160 if side else 320, device=device)],)
    if "video" in family:
        frames = 16 if "mvit" in family or "s3d" in family else 4
        side = 224 if "mvit" in family or "swin" in family or "s3d" in family else 64
        return torch.randn(1, 3, frames, side, side, device=device)
    cfg = getattr(model, "pretrained_cfg", None) or {}
    size = tuple(cfg.get("input_size") or (3, 224, 224))
    if side:
        size = (size[0], *(side for _ in size[1:]))
    if "inception" in family or "googlenet" in family:
        size = (3, 299, 299) if not side else (3, 96, 96)
    return torch.randn(1, *size, device=device)


# The native input size (px) of classes whose config has no image_size for it and that do not run at 224 px.
HF_SIDES: dict[str, int] = {
    # the real models' resolutions: LW-DETR's windowed ViT needs a side that is a multiple of 64 (16 px patches,
    # 4x4 windows) with at least 300 patches (its 300 queries are a top-k of them), so 320 px or more
    "LwDetrForObjectDetection": 640,
    # RF-DETR-base: 14 px patches in 2x2 windows and a top-k of 300 patches (224 px has 256)
    "RfDetrForObjectDetection": 560,
    # patch_size (112 here, see HF_CONFIG_FIXES) at the smallest of scaled_images_ratios (0.25)
    "DepthProForDepthEstimation": 448,
}


def _hf_inputs(model, device: str, side: int | None):
    """``pixel_values`` of the config's size (``side`` where given), or ``input_ids`` for token models."""
    import torch

    config = model.config
    if type(model).__name__.startswith("Siglip2"):  # patchified pixels, a patch mask and the patch grid
        vision = config.vision_config
        grid = (side or int(vision.num_patches ** 0.5) * vision.patch_size) // vision.patch_size
        return (torch.randn(1, grid * grid, vision.num_channels * vision.patch_size ** 2, device=device),
                torch.ones(1, grid * grid, dtype=torch.long, device=device),
                torch.tensor([[grid, grid]], device=device))
    main_input = getattr(model, "main_input_name", "pixel_values")
    if type(model).__name__.startswith("OneFormer"):  # task_inputs: the task prompt's token ids (zeros here)
        return _pixels(config, device, side), torch.zeros(1, config.task_seq_len, dtype=torch.long, device=device)
    if main_input == "pixel_values_videos":  # (batch, frames, channels, height, width)
        return {main_input: _pixels(config, device, side).unsqueeze(1).expand(-1, 2, -1, -1, -1).contiguous()}
    if main_input == "input_features" and hasattr(config, "feature_projection_input_dim"):  # Wav2Vec2-BERT:
        # one second of 80 log-mel bins at 100 frames/s, stacked in pairs (its feature extractor's stride 2)
        return torch.randn(1, 50, config.feature_projection_input_dim, device=device)
    if main_input == "input_values" and hasattr(config, "max_length"):  # AST: (frames, mels) spectrogram
        return torch.randn(1, config.max_length, config.num_mel_bins, device=device)
    if main_input == "input_values":  # raw audio: one second at 16 kHz
        return torch.randn(1, 16000, device=device)
    if main_input == "input_features":  # log-mel frames: Whisper (mels, 2 x positions), AST (frames, mels)
        mels = getattr(config, "num_mel_bins", 80)
        if hasattr(config, "max_source_positions"):
            return torch.randn(1, mels, 2 * config.max_source_positions, device=device)
        return torch.randn(1, getattr(config, "max_length", 1024), mels, device=device)
    if main_input == "input_ids":
        length = min(getattr(config, "n_positions", 64) or 64, 64)
        return torch.zeros(1, length, dtype=torch.long, device=device)
    return _pixels(config, device, side or HF_SIDES.get(type(model).__name__))


def _pixels(config, device: str, side: int | None):
    """``pixel_values`` ``side`` px square, else of the config's ``image_size``, else 224 px."""
    import torch

    size = side or getattr(config, "image_size", None) or 224
    height, width = (size, size) if isinstance(size, int) else tuple(size)[-2:]
    return torch.randn(1, getattr(config, "num_channels", 3) or 3, height, width, device=device)


def _identity(base, example, plans: dict, reference: list | None = None) -> dict[str, float]:
    """Max relative |Δ| between ``base`` and ``base`` edited at each plan's sites (eval mode).

    The base output is computed once; every position but the last edits a copy, the last edits
    ``base`` itself (one deep copy fewer, which matters for the big models)."""
    import torch

    from se_retrofit.outputs import output_tensors

    if reference is None:
        with torch.no_grad():
            reference = output_tensors(_call(base, example))
    last = len(plans) - 1
    return {position: _edited_difference(base if i == last else copy.deepcopy(base), plan.sites, position,
                                         lambda model: _call(model, example), reference, plan.skipped)
            for i, (position, plan) in enumerate(plans.items())}


def _edited_difference(model, sites, position: str, run, reference: list, skipped: dict | None = None) -> float:
    """Max relative |Δ| between ``reference`` and ``run(model)`` once ``model`` is edited at ``sites``
    (in place) as ``retrofit`` edits: a site whose block turns out not to be editable is edited from
    outside instead, or left out with its reason in ``skipped`` and removed from ``sites``."""
    import torch

    import se_retrofit
    from se_retrofit.outputs import OutputMismatchError, output_difference, output_tensors

    skipped = {} if skipped is None else skipped
    edited = se_retrofit.surgery.apply_sites(model, list(sites), se_retrofit.RetrofitConfig(position=position),
                                             skipped=skipped)
    left_out = {s.unit or s.block for s in sites} - {s.unit or s.block for s in edited}
    sites[:] = [s for s in sites if (s.unit or s.block) not in left_out]
    with torch.no_grad():
        outputs = output_tensors(run(model))
    try:
        return output_difference(reference, outputs)[1]
    except OutputMismatchError:
        return math.inf


def check(source: str, name: str, max_params: float, seconds: int) -> dict:
    """One row of the sweep for one model."""
    import torch

    import se_retrofit

    row = {"source": source, "name": name, "blocks": "", "stages": "", "params_m": "",
           "identity_standard": "", "identity_post": ""}
    start = time.perf_counter()
    signal.signal(signal.SIGALRM, _raise_timeout)
    signal.alarm(seconds)
    try:
        row.update(_check(source, name, max_params, torch, se_retrofit))
    except ModelTimeout:
        row["status"] = f"error: timeout after {seconds} s"
    except Exception as error:  # the sweep records every failure as data
        row["status"] = f"error: {type(error).__name__}: {_first_line(error)}"
    finally:
        signal.alarm(0)
    row["seconds"] = round(time.perf_counter() - start, 2)
    return row


def _check(source, name, max_params, torch, se_retrofit) -> dict:
    if source == "transformers" and name in HF_SKIPS:
        return {"status": f"skipped: {HF_SKIPS[name]}"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, analysis = _analyse(source, name, se_retrofit)
        params = sum(p.numel() for p in model.parameters()) / 1e6
        units = analysis.units_of()
        out = {"params_m": round(params, 1), "blocks": len(analysis.blocks), "stages": len(analysis.stages),
               "units": f"{units[0].kind} {len(units)}" if units else ""}
        try:
            out["expected"], out["expected_from"] = expectation(source, name, model)
        except Exception as error:  # the expectation is a measurement: its failure is recorded, not fatal
            out["expected"], out["expected_from"] = "", f"unavailable: {type(error).__name__}"
        if not units:
            return {**out, "status": "no-units"}
        plans = {position: se_retrofit.planning.plan_sites(model, analysis, se_retrofit.RetrofitConfig(
            position=position)) for position in ("standard", "post")}
        out["edited"] = len({site.unit or (site.block, site.add_index) for site in plans["standard"].sites})
        if not plans["standard"].sites:
            return {**out, "status": f"skipped: {next(iter(plans['standard'].skipped.values()))}"}
        if params > max_params:
            identity, out["identity_scope"] = _block_identity(source, name, model, plans)
            side = HF_SIDES.get(name) if source == "transformers" else None
            out["config_changes"] = f"input {side}px" if side else ""
        else:
            base, example, reference, out["config_changes"] = _identity_model(source, name, model)
            identity, out["identity_scope"] = _identity(base, example, plans, reference), "model"
        if source == "transformers" and name in HF_CONFIG_FIXES:
            out["config_changes"] = " ".join([_fix_text(k, v) for k, v in HF_CONFIG_FIXES[name].items()]
                                             + [out["config_changes"]]).strip()
        out.update({f"identity_{position}": value for position, value in identity.items()})
        out["edited"] = len({site.unit or (site.block, site.add_index) for site in plans["standard"].sites})
        worst = max(out["identity_standard"], out["identity_post"])
        out["status"] = "ok" if worst <= 1e-5 else f"error: identity broken (max rel Δ {worst:.2g})"
        return out


def _fix_text(key: str, value) -> str:
    """How config_changes names one of :data:`HF_CONFIG_FIXES`: the value where it is short."""
    if value is list:
        return f"{key} as a list"
    text = "(see HF_CONFIG_FIXES)" if callable(value) else repr(value).replace(" ", "")
    return f"{key}={text}" if len(text) <= 40 else f"{key}=(see HF_CONFIG_FIXES)"


def _analyse(source, name, se_retrofit):
    """Analyse on the meta device (free for any size); on the CPU where meta tensors do not run."""
    try:
        model = _meta_model(source, name)
        return model, se_retrofit.analyze(model, _inputs(source, name, model, "meta"))
    except Exception:
        model = _build(source, name, "cpu").eval()
        return model, se_retrofit.analyze(model, _inputs(source, name, model, "cpu"))


def _meta_model(source, name, **kwargs):
    """The model on the meta device; where the constructor itself computes with tensors (torchvision's
    RegNet widths), built on the CPU with meta parameters and then moved."""
    try:  # .to: a legacy torch.Tensor(...) parameter (Wav2Vec2's masked_spec_embed) ignores the device
        return _build(source, name, "meta", **kwargs).to("meta").eval()
    except Exception:
        with _parameters_on_meta():
            return _build(source, name, "cpu", **kwargs).to("meta").eval()


def _identity_model(source, name, analysed):
    """A real model, the smallest input it accepts and its output there (see :func:`_small_inputs`);
    the native size where nothing smaller runs."""
    import torch

    from se_retrofit.outputs import output_tensors

    for meta, kwargs, side in _small_inputs(source, name, analysed):
        base = _materialise(source, name, **kwargs).eval()
        example = _inputs(source, name, base, "cpu", side)
        try:
            with torch.no_grad():
                return base, example, output_tensors(_call(base, example)), _changes(kwargs, side)
        except Exception:
            continue
    base = analysed if next(analysed.parameters()).device.type == "cpu" else _build(source, name, "cpu").eval()
    side = HF_SIDES.get(name) if source == "transformers" else None
    return base, _inputs(source, name, base, "cpu"), None, f"input {side}px" if side else "native input"


def _changes(kwargs: dict, side: int) -> str:
    """What the identity run changed from the model's defaults: built with ``kwargs``, run at ``side`` px."""
    return " ".join([f"{k}={v}" for k, v in kwargs.items()] + [f"input {side}px"])


def _small_inputs(source, name, analysed):
    """(meta model, build kwargs, side) for each small input the model runs on the meta device, where a
    forward costs nothing: 64 px where the model takes any size, else built for 64 or 112 px
    (``img_size``: timm's fixed-size transformers)."""
    import torch

    if next(analysed.parameters()).device.type != "meta":
        return  # analysed on the CPU: meta tensors do not run this model
    size_key = {"timm": "img_size", "transformers": "image_size"}.get(source)
    candidates = [({}, 64), ({size_key: 64}, 64), ({size_key: 112}, 112)] if size_key else [({}, 64)]
    for kwargs, side in candidates:
        try:
            meta = analysed if not kwargs else _meta_model(source, name, **kwargs)
            with torch.no_grad():
                _call(meta, _inputs(source, name, meta, "meta", side))
        except Exception:
            continue
        yield meta, kwargs, side


def _block_identity(source, name, analysed, plans) -> tuple[dict[str, float], str]:
    """For models too big to run whole here: edited blocks run alone, before and after the edit.

    A meta forward (at the smallest input the model takes) records the shapes each edited block
    receives inside the model; one block of each
    kind (class, input shapes, sites) is then built on the CPU with cheap random weights and run on
    random inputs of those shapes. The rest of the model is untouched by the edit, so identity of
    every kind of edited block is identity of the model."""
    import torch

    from se_retrofit.outputs import output_tensors

    meta, inputs = _block_inputs(source, name, analysed, {s.block for plan in plans.values() for s in plan.sites})
    kinds: dict[tuple, str] = {}
    for path, (args, kwargs) in inputs.items():
        key = (type(meta.get_submodule(path)).__name__, _shapes((args, kwargs)),
               tuple((p, tuple(_site_key(s) for s in plan.sites if s.block == path)) for p, plan in plans.items()))
        kinds.setdefault(key, path)
    worst = dict.fromkeys(plans, 0.0)
    for path in kinds.values():
        block = _materialised_block(meta.get_submodule(path))
        args, kwargs = _real(inputs[path])
        with torch.no_grad():
            reference = output_tensors(block(*args, **kwargs))
        for position, plan in plans.items():
            sites = [dataclasses.replace(s, block="", wrap_module=_inside(s.wrap_module, path))
                     for s in plan.sites if s.block == path]
            difference = _edited_difference(copy.deepcopy(block), sites, position,
                                            lambda model: model(*args, **kwargs), reference, plan.skipped)
            kept = {s.unit for s in sites}
            plan.sites[:] = [s for s in plan.sites if s.block != path or s.unit in kept]
            worst[position] = max(worst[position], difference)
    return worst, f"blocks: {len(kinds)} kinds of {len(inputs)} edited"


def _inside(module: str | None, block: str) -> str | None:
    """``module``'s path relative to ``block`` (which is run alone), None where it is not inside it."""
    if module == block:
        return ""
    return module[len(block) + 1:] if module and module.startswith(f"{block}.") else None


def _site_key(site) -> tuple:
    return site.position, site.channels, site.module_name, site.add_index, site.anchor


def _block_inputs(source, name, analysed, paths: set[str]) -> tuple[object, dict[str, tuple]]:
    """The model run and the (args, kwargs) each block in ``paths`` receives in its forward on the meta
    device, at the smallest input the model takes there (else at its native size); on the CPU with
    cheap random weights where the forward does not run on meta (transformers' Perceiver builds a CPU
    mask mid-forward)."""
    meta, side = next(((m, side) for m, _, side in _small_inputs(source, name, analysed)), (analysed, None))
    try:
        return meta, _recorded_inputs(meta, _inputs(source, name, meta, "meta", side), paths)
    except Exception:
        model = _materialise(source, name).eval()
        return model, _recorded_inputs(model, _inputs(source, name, model, "cpu"), paths)


def _copied(value):
    """The containers of ``value`` copied (the tensors shared): a list a forward grows after passing it
    on (DenseNet's features) is recorded as it was at the call."""
    from torch.utils._pytree import tree_map

    return tree_map(lambda leaf: leaf, value)


def _recorded_inputs(model, example, paths: set[str]) -> dict[str, tuple]:
    import torch

    seen: dict[str, tuple] = {}
    hooks = [model.get_submodule(p).register_forward_pre_hook(
        lambda module, args, kwargs, path=p: seen.setdefault(path, _copied((args, kwargs))) and None,
        with_kwargs=True)
        for p in sorted(paths)]
    try:
        with torch.no_grad():
            _call(model, example)
    finally:
        for hook in hooks:
            hook.remove()
    return seen


def _shapes(value):
    import torch

    if isinstance(value, torch.Tensor):
        return tuple(value.shape), str(value.dtype)
    if isinstance(value, dict):
        return tuple((k, _shapes(v)) for k, v in sorted(value.items()))
    if isinstance(value, (list, tuple)):
        return tuple(_shapes(v) for v in value)
    return repr(value)


def _real(value):
    """Random CPU tensors in place of the meta tensors of ``value`` (indices 0, masks all True)."""
    import torch

    if isinstance(value, torch.Tensor):
        if value.is_floating_point():
            return torch.randn(value.shape, dtype=value.dtype, generator=torch.Generator().manual_seed(0))
        return torch.ones(value.shape, dtype=value.dtype) if value.dtype == torch.bool else \
            torch.zeros(value.shape, dtype=value.dtype)
    if isinstance(value, dict):
        return {k: _real(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_real(v) for v in value)
    return value


def _materialised_block(meta_block):
    """A CPU copy of a meta block with cheap random parameters and buffers (indices 0)."""
    import torch

    block = copy.deepcopy(meta_block).to_empty(device="cpu").eval()
    generator = torch.Generator().manual_seed(0)
    _fill_parameters(block, generator)
    for module in block.modules():
        for key, buffer in module._buffers.items():
            if buffer is not None:
                if buffer.is_floating_point():
                    buffer.uniform_(0.5, 1.5, generator=generator)
                else:
                    buffer.zero_()
    return block


# Independent expectations of the number of residual blocks, from what the libraries' own code
# says, never from the analysis: counted as *calls* during one forward (a module used on two
# branches counts twice; a block that skips its residual, e.g. efficientnet's first block of a
# stage, does not call its drop-path at all).
NO_RESIDUAL_FAMILIES = {  # module of the builder: its source has no residual addition
    "torchvision.models.alexnet", "torchvision.models.vgg", "torchvision.models.squeezenet",
    "torchvision.models.densenet", "torchvision.models.googlenet", "torchvision.models.inception",
    "torchvision.models.shufflenetv2", "torchvision.models.video.s3d", "torchvision.models.quantization.googlenet",
    "torchvision.models.quantization.inception", "torchvision.models.quantization.shufflenetv2",
    "timm.models.vgg", "timm.models.densenet", "transformers:mobilenet_v1", "transformers:pp_lcnet",
}


def _is_drop_path(path: str, module) -> bool:
    """A stochastic-depth module on a residual branch: timm's ``drop_path*`` attributes (DropPath, or
    Identity at rate 0), torchvision's StochasticDepth, transformers' ``drop_path`` attributes. By name,
    not by class alone: transformers' PoolFormer also uses its ``PoolFormerDropPath`` as the MLP's dropout."""
    leaf, kind = path.rsplit(".", 1)[-1], type(module).__name__
    return leaf.startswith(("drop_path", "stochastic_depth")) or kind in ("DropPath", "StochasticDepth")


def _drops_without_residual(block) -> bool:
    """timm's byobnet blocks call their drop-path whether or not they add a shortcut
    (``if self.shortcut is not None: x = x + self.shortcut(shortcut)``; RegNetZ's stage-first blocks have none)."""
    return type(block).__module__ == "timm.models.byobnet" and getattr(block, "shortcut", "") is None


def _residual_rule(module) -> tuple[int, str] | None:
    """(residual adds per call, rule) for a block class whose source adds exactly that many residuals,
    for the families that have no drop-path module at their default settings."""
    kind, where = type(module).__name__, type(module).__module__
    if (where, kind) in (("timm.models.res2net", "Bottle2neck"), ("timm.models.ghostnet", "GhostBottleneck"),
                         ("timm.models.ghostnet", "GhostBottleneckV3")):
        return 1, f"{kind}s"
    if where.startswith(("timm.models.resnet", "torchvision.models.resnet", "torchvision.models.video.resnet",
                         "torchvision.models.quantization.resnet")) and kind.endswith(("BasicBlock", "Bottleneck")):
        return 1, "ResNet blocks"
    if kind == "ResBottleneckBlock" or (where.startswith("torchvision.models.optical_flow")
                                        and kind in ("ResidualBlock", "BottleneckBlock")):
        return 1, f"{kind}s"
    if where == "torchvision.models.vision_transformer" and kind == "EncoderBlock":
        return 2, "ViT encoder blocks x2"
    for flag in ("use_res_connect", "apply_residual", "use_residual", "has_skip", "use_shortcut"):
        if getattr(module, flag, None) is True:
            return 1, f"blocks with {flag}"
    if kind.endswith(("ResNetBasicLayer", "ResNetBottleNeckLayer")) or kind in ("RegNetXLayer", "RegNetYLayer"):
        return 1, "ResNet/RegNet layers"
    if kind.endswith("PositionalConvEmbedding"):  # wav2vec2 family: hidden + conv(hidden) in the encoder
        return 1, "convolutional position embeddings"
    if kind in ("LevitResidualLayer", "UVDocResidualBlock"):
        return 1, f"{kind}s"
    if kind == "EfficientNetFinalBlockLayer" and getattr(module, "apply_dropout", False):
        return 1, "EfficientNet blocks with a skip"
    if kind.endswith("MultiheadAttentionPoolingHead") or kind == "AttentionPoolLatent":
        return 1, "attention-pooling heads"  # SigLIP's and timm's pooling heads: x + mlp(norm(x))
    norms = {n for n, _ in module.named_children()}
    if {"self_attn_layer_norm", "final_layer_norm"} <= norms or {"layer_norm", "final_layer_norm"} <= norms:
        if "encoder_attn_layer_norm" in norms or "cross_attn_layer_norm" in norms:
            return 3, "encoder-decoder layers x3 (self-attention, cross-attention, MLP)"
        return 2, "encoder layers x2 (attention, feed-forward)"
    if ({"layernorm_before", "layernorm_after"} <= norms or {"layer_norm1", "layer_norm2"} <= norms
            or {"ln_1", "ln_2"} <= norms):
        return 2, "pre-norm transformer layers x2"
    return None


def expectation(source: str, name: str, model) -> tuple[int | str, str]:
    """(expected residual blocks, where the figure comes from), or ("", "") where none can be had.

    Counted in one forward of ``model`` (meta where the model was analysed there): the calls of its
    drop-path modules, where a call of a block class of :func:`_residual_rule` counts its rule's figure
    or the drop-path calls inside it, whichever is more (transformers' Swin drops only its attention
    branch; timm's ViT-ResNet hybrids have drop-paths in the ViT part only); 0 for the families listed
    in :data:`NO_RESIDUAL_FAMILIES`."""
    import torch

    totals: Counter = Counter()
    stack: list[Counter] = []  # the drop-path calls inside each rule-matched block being run

    def on_drop_path(*_):
        (stack[-1] if stack else totals).update(["drop-path calls"])

    def enter(*_):
        stack.append(Counter())

    def leave(module, *_, rule):
        inner = stack.pop()
        drop_paths = inner.pop("drop-path calls", 0)
        inner.update({rule[1] if rule[0] > drop_paths else "drop-path calls": max(rule[0], drop_paths)})
        (stack[-1] if stack else totals).update(inner)

    hooks = []
    modules = dict(model.named_modules())
    for path, module in modules.items():
        if path and _is_drop_path(path, module):
            if not _drops_without_residual(modules.get(path.rpartition(".")[0])):
                hooks.append(module.register_forward_hook(on_drop_path))
        elif (rule := _residual_rule(module)) is not None:
            hooks += [module.register_forward_pre_hook(enter),
                      module.register_forward_hook(lambda *a, rule=rule: leave(*a, rule=rule))]
    if hooks:
        try:
            with torch.no_grad():
                _call(model, _inputs(source, name, model, next(model.parameters()).device.type))
        finally:
            for hook in hooks:
                hook.remove()
    if sum(totals.values()):
        return sum(totals.values()), " + ".join(sorted(k for k, v in totals.items() if v))
    family = _family(source, name)
    if family in NO_RESIDUAL_FAMILIES:
        return 0, f"no residual add in {family}"
    return "", ""


def _family(source: str, name: str) -> str:
    if source == "torchvision":
        import torchvision

        return torchvision.models.get_model_builder(name).__module__
    if source == "timm":
        import timm

        return timm.models.model_entrypoint(name).__module__
    return f"transformers:{hf_architectures()[name]}"


def _call(model, example):
    """``model`` on ``example``: a tuple is positional arguments, a dict keyword arguments (as ``analyze`` takes them)."""
    if isinstance(example, dict):
        return model(**example)
    return model(*(example if isinstance(example, tuple) else (example,)))


def _raise_timeout(signum, frame):
    raise ModelTimeout


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return (text[0] if text else "")[:160]


def run_chunk(chunk: list[tuple[str, str]], max_params: float, seconds: int) -> list[dict]:
    import torch

    torch.set_num_threads(1)
    return [check(source, name, max_params, seconds) for source, name in chunk]


def sweep(models: list[tuple[str, str]], workers: int, chunk_size: int, max_params: float,
          seconds: int) -> list[dict]:
    chunks = [models[i:i + chunk_size] for i in range(0, len(models), chunk_size)]
    rows: list[dict] = []
    context = multiprocessing.get_context("spawn")
    with cf.ProcessPoolExecutor(max_workers=workers, mp_context=context, max_tasks_per_child=1) as pool:
        futures = {pool.submit(run_chunk, chunk, max_params, seconds): chunk for chunk in chunks}
        for done, future in enumerate(cf.as_completed(futures), 1):
            chunk = futures[future]
            try:
                rows.extend(future.result())
            except Exception as error:  # the worker died: every model of the chunk is an error
                rows.extend({"source": s, "name": n, "status": f"error: worker died ({type(error).__name__})",
                             "seconds": ""} for s, n in chunk)
            print(f"\r{done}/{len(chunks)} chunks", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    order = {m: i for i, m in enumerate(models)}
    return sorted(rows, key=lambda r: order[(r["source"], r["name"])])


def write_csv(rows: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row.get(k, "") for k in FIELDS})


def disagreements(rows: list[dict]) -> list[dict]:
    """Rows whose blocks found differ from the independent expectation (where there is one)."""
    return [r for r in rows if str(r.get("expected", "")) != "" and str(r.get("blocks", "")) != ""
            and int(r["blocks"]) != int(r["expected"])]


def _found(row: dict) -> str:
    """How many units of the kind edited were found (a residual model's blocks, else its joins or layers)."""
    units = str(row.get("units", ""))
    return units.split(" ")[-1] if units else str(row["blocks"])


def summarise(rows: list[dict], wall: float, path: Path | None = None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=150, record=True)
    kinds = ["ok", "no-units", "skipped", "error"]
    table = Table(title=f"coverage: {len(rows)} models in {wall / 60:.1f} min")
    table.add_column("source")
    for kind in kinds:
        table.add_column(kind, justify="right")
    table.add_column("with expectation", justify="right")
    table.add_column("found != expected", justify="right")
    for source in LIBRARIES:
        mine = [r for r in rows if r["source"] == source]
        if not mine:
            continue
        counts = Counter(r["status"].split(":")[0] for r in mine)
        expected = sum(str(r.get("expected", "")) != "" for r in mine)
        table.add_row(source, *(str(counts.get(k, 0)) for k in kinds), str(expected),
                      str(len(disagreements(mine))))
    console.print(table)
    edited_kinds = Counter(str(r.get("units", "")).split(" ")[0] for r in rows if r["status"] == "ok")
    console.print("ok, by the kind of unit edited: " + ", ".join(f"{k} {edited_kinds.get(k, 0)}"
                                                                 for k in ("residual", "join", "chain")))
    nothing = [f"{r['source']}:{r['name']}" for r in rows if r["status"] == "no-units"]
    if nothing:
        console.print(f"no-units ({len(nothing)}): {', '.join(nothing)}", markup=False, highlight=False)
    slow = sorted((r for r in rows if r.get("seconds") != ""), key=lambda r: -float(r["seconds"]))[:10]
    console.print("slowest: " + ", ".join(f"{r['name']} {r['seconds']}s" for r in slow))
    groups: dict[str, list[str]] = defaultdict(list)
    for r in rows:
        if r["status"].startswith(("error", "skipped")):
            groups[r["status"][:110]].append(r["name"])
    for cause, names in sorted(groups.items(), key=lambda kv: -len(kv[1])):
        console.print(f"[{len(names)}] {cause}: {', '.join(names[:8])}{' …' if len(names) > 8 else ''}",
                      markup=False, highlight=False)
    partial = [r for r in rows if r["status"] == "ok" and str(r.get("edited", "")) not in ("", _found(r))]
    console.print(f"ok but not every unit found is edited: {len(partial)} models (edited/found)")
    for r in partial:
        console.print(f"  {r['source']}:{r['name']} {r['edited']}/{_found(r)}", markup=False, highlight=False)
    differ = disagreements(rows)
    console.print(f"found != expected: {len(differ)} models" + (" (found/expected, from)" if differ else ""))
    for r in differ:
        console.print(f"  {r['source']}:{r['name']} {r['blocks']}/{r['expected']} ({r['expected_from']}; "
                      f"{r['status']})", markup=False, highlight=False)
    if path is not None:
        path.write_text(console.export_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--library", nargs="+", choices=LIBRARIES, default=["timm", "torchvision"],
                        help="which libraries to sweep (default: timm torchvision)")
    parser.add_argument("--hf-tasks", nargs="+", choices=list(HF_TASKS), default=["classification"],
                        help="transformers mappings to sweep (default: classification, i.e. image "
                             "classification and backbones)")
    parser.add_argument("--models", nargs="*",
                        help="NAME (timm), torchvision:NAME or transformers:CLASS; default: all of --library")
    parser.add_argument("--limit", type=int, help="only this many models")
    parser.add_argument("--sample", action="store_true", help="with --limit: spread the sample over the list")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--chunk-size", type=int, default=40)
    parser.add_argument("--max-params", type=float, default=100.0,
                        help="millions; bigger models are checked block by block (see _block_identity)")
    parser.add_argument("--model-seconds", type=int, default=120)
    parser.add_argument("--csv", type=Path, help="default: results/coverage.csv for timm and torchvision, "
                                                   "results/coverage_<libraries>.csv otherwise")
    parser.add_argument("--summary", type=Path, help="also write the printed summary to this file")
    args = parser.parse_args()
    if args.csv is None:
        libraries = sorted(args.library)
        tasks = "" if args.hf_tasks == ["classification"] or "transformers" not in libraries \
            else "_" + "_".join(args.hf_tasks)
        args.csv = RESULTS / ("coverage.csv" if libraries == ["timm", "torchvision"]
                              else f"coverage_{'_'.join(libraries)}{tasks}.csv")
    models = all_models(args.library, tuple(args.hf_tasks))
    if args.models:
        models = [tuple(m.split(":", 1)) if ":" in m else ("timm", m) for m in args.models]
    if args.limit:
        step = max(1, len(models) // args.limit) if args.sample else 1
        models = models[::step][:args.limit]
    start = time.perf_counter()
    rows = sweep(models, args.workers, args.chunk_size, args.max_params, args.model_seconds)
    wall = time.perf_counter() - start
    write_csv(rows, args.csv)
    summarise(rows, wall, args.summary)
    print(f"wrote {args.csv}")


if __name__ == "__main__":
    main()
