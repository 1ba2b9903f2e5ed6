"""Models from outside timm's residual families: transformers, torchvision video, a 1-D ResNet, user code.

Each row of issue 10's table: the residual count in the model's source, and where the blocks can be
rewritten, exact identity in train and eval and live inserted modules. transformers models are
built from their default config (random weights) with a small ``image_size`` where the count does
not depend on it; ViT also with a narrow width (its 12 layers, hence its 24 residuals, are kept).
"""
import pytest
import timm
import torch
import torchvision
from torch import nn

import se_retrofit

from helpers import ResNet1d, as_if_pretrained, run
from test_idioms import Net, OneLayer, TorchAddAlpha


def _logits(output):
    return output.logits if hasattr(output, "logits") else output


def check_identity_and_liveness(base: nn.Module, x: torch.Tensor, edited_blocks: int) -> None:
    edited = se_retrofit.retrofit(base, example_input=x[:1])
    for training in (True, False):
        assert torch.equal(_logits(run(edited, x, training)), _logits(run(base, x, training))), training
    new = [n for n in edited.state_dict() if n not in base.state_dict()]
    assert len({n.rsplit(".", 2)[0] for n in new}) == edited_blocks
    reference = _logits(run(edited, x, False))
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, param in edited.named_parameters():
            if name in new:
                param.add_(torch.randn(param.shape, generator=generator))
    assert not torch.equal(_logits(run(edited, x, False)), reference)


def _hf(model_class: str, config_class: str, **config):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = getattr(transformers, model_class)(getattr(transformers, config_class)(**config))
    return as_if_pretrained(model.eval())


# (model, config class, config overrides, residual adds in its source, blocks whose forward fx rewrites)
HF_ROWS = [
    ("MobileNetV2ForImageClassification", "MobileNetV2Config", {"image_size": 64}, 10, 10),
    ("PvtV2ForImageClassification", "PvtV2Config", {"image_size": 64}, 16, 16),
    ("EfficientNetForImageClassification", "EfficientNetConfig", {"image_size": 64}, 48, 48),
    ("FocalNetForImageClassification", "FocalNetConfig", {"image_size": 64}, 24, 24),
    ("ConvNextV2ForImageClassification", "ConvNextV2Config", {"image_size": 64}, 18, 18),
    ("ViTForImageClassification", "ViTConfig",
     {"image_size": 32, "patch_size": 8, "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2}, 24, 24),
    ("SegformerForImageClassification", "SegformerConfig", {"image_size": 64}, 16, 16),
]


@pytest.mark.parametrize("model_class,config_class,config,count,rewritable", HF_ROWS, ids=[r[0] for r in HF_ROWS])
@pytest.mark.slow
def test_transformers_models(model_class, config_class, config, count, rewritable):
    model = _hf(model_class, config_class, **config)
    analysis = se_retrofit.analyze(model)  # the probe from the config's image_size and num_channels
    assert analysis.probe_shape == (1, 3, config["image_size"], config["image_size"])
    assert len(analysis.blocks) == count
    assert sum(b.rewrite_error is None for b in analysis.blocks) == rewritable
    x = torch.randn(2, *analysis.probe_shape[1:], generator=torch.Generator().manual_seed(2))
    check_identity_and_liveness(model, x, rewritable)  # ViT and SegFormer layers take **kwargs: passed on


def test_hf_efficientnet_branch_runs_beside_the_adding_module():
    model = _hf("EfficientNetForImageClassification", "EfficientNetConfig", image_size=64)
    first = se_retrofit.analyze(model).blocks[0]
    assert first.path == "efficientnet.encoder.blocks.1.projection"
    assert first.container == "efficientnet.encoder.blocks.1"
    assert first.branch == "efficientnet.encoder.blocks.1.projection.dropout"  # after project_bn


def test_hf_convnextv2_global_response_norm_is_not_a_block():
    model = _hf("ConvNextV2ForImageClassification", "ConvNextV2Config", image_size=64)
    analysis = se_retrofit.analyze(model)
    assert (len(analysis.blocks), analysis.additions) == (18, 72)  # 18 residuals; 3 adds inside each GRN
    assert not any(".grn" in b.path for b in analysis.blocks)


def test_timm_pvt_v2_b0_all_blocks():
    model = as_if_pretrained(timm.create_model("pvt_v2_b0"))
    analysis = se_retrofit.analyze(model)
    assert len(analysis.blocks) == 16 and analysis.stages == [1, 2, 3, 4]
    check_identity_and_liveness(model, torch.randn(2, 3, 64, 64), 16)


@pytest.mark.parametrize("block,count", [(OneLayer, 2), (TorchAddAlpha, 2)], ids=["x+bn(conv(x))", "torch.add_alpha"])
def test_user_code(block, count):
    model = as_if_pretrained(Net(block(), block()))
    assert len(se_retrofit.find_blocks(model, torch.randn(1, 3, 16, 16))) == count
    check_identity_and_liveness(model, torch.randn(2, 3, 16, 16), count)


def test_video_resnet_without_example_input():
    torch.manual_seed(0)
    model = as_if_pretrained(torchvision.models.video.r3d_18())
    analysis = se_retrofit.analyze(model)
    assert analysis.probe_shape == (1, 3, 16, 112, 112) and len(analysis.blocks) == 8
    assert len(analysis.blocks[0].spatial) == 3
    edited = se_retrofit.retrofit(model)  # probed without example_input as well
    x = torch.randn(2, 3, 4, 32, 32)
    for training in (True, False):
        assert torch.equal(run(edited, x, training), run(model, x, training))


def test_audio_resnet_without_example_input():
    torch.manual_seed(0)
    model = as_if_pretrained(ResNet1d())
    analysis = se_retrofit.analyze(model)
    assert analysis.probe_shape == (1, 1, 4096) and len(analysis.blocks) == 6
    check_identity_and_liveness(model, torch.randn(2, 1, 400), 6)


def test_model_whose_input_cannot_be_told():
    model = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 8))
    with pytest.raises(se_retrofit.RetrofitError, match="pass example_input= \\(--input-size on the command line\\)"):
        se_retrofit.analyze(model)
