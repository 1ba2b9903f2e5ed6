"""A fixed sample across families, checked the way benchmarks/coverage.py checks every model.

Each model must retrofit SE at ``standard`` and ``post`` with identity held (max relative |Δ| ≤ 1e-5),
or be reported as having no residual blocks, or be skipped with a stated reason; never an error.
The whole-registry sweep is ``python benchmarks/coverage.py``.
"""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from coverage import check  # noqa: E402

SAMPLE = [
    # timm, residual CNNs
    "resnet18", "resnet26d", "seresnet18", "resnext26ts", "res2net50_14w_8s", "regnetx_002", "regnety_002",
    "dla34", "hrnet_w18_small", "cspresnet50", "selecsls42b", "nf_resnet26", "repvgg_a0", "mobileone_s0",
    # timm, mobile / efficient
    "mobilenetv2_050", "mobilenetv3_small_050", "efficientnet_b0", "tf_efficientnet_b0", "mixnet_s",
    "mnasnet_small", "ghostnet_050", "rexnet_100", "lcnet_050", "tinynet_e", "hgnet_tiny",
    # timm, conv-transformer hybrids and transformers
    "convnext_atto", "convnextv2_atto", "edgenext_xx_small", "poolformer_s12", "fastvit_t8", "mobilevit_xxs",
    "levit_128s", "vit_tiny_patch16_224", "deit_tiny_patch16_224",
    # timm, no residual blocks
    "densenet121", "vgg11", "dpn68",
    # torchvision: classification, video, detection, segmentation, flow, quantizable
    "torchvision:resnet18", "torchvision:mobilenet_v2", "torchvision:shufflenet_v2_x0_5",
    "torchvision:regnet_x_400mf", "torchvision:squeezenet1_0", "torchvision:r3d_18",
    "torchvision:fasterrcnn_mobilenet_v3_large_320_fpn", "torchvision:lraspp_mobilenet_v3_large",
    "torchvision:raft_small", "torchvision:quantized_resnet18",
]


@pytest.mark.parametrize("model", SAMPLE)
def test_sample_model(model):
    source, name = model.split(":", 1) if ":" in model else ("timm", model)
    row = check(source, name, max_params=100.0, seconds=300)
    assert not row["status"].startswith("error"), row["status"]
    if row["status"] == "ok":
        assert row["blocks"] > 0
        assert row["identity_standard"] <= 1e-5 and row["identity_post"] <= 1e-5
