"""The attention family beyond SE: Non-local, DANet (PAM, CAM, both), GCNet, timm's modules through
the zero-initialised blend. Each starts at exact identity (train and eval), moves when its new
parameters move, gets a gradient for every new parameter within three SGD steps, and scripts."""
from __future__ import annotations

import warnings

import pytest
import timm
import torch
from torch import nn

import se_retrofit
from se_retrofit.attention import create_attention, get_attention
from se_retrofit.attention.blend import ZeroBlend
from se_retrofit.attention.timm_attention import TIMM_ATTENTIONS

from helpers import ResNet1d, as_if_pretrained, make_model, run

OWN = [("nonlocal", {}), ("nonlocal", {"mode": "dot"}), ("nonlocal", {"mode": "gaussian", "sub_sample": False}),
       ("pam", {}), ("cam", {}), ("danet", {}), ("gc", {}), ("gc", {"fusion": "mul", "reduction": 4})]
#: timm's ge only builds with use_mlp=False in timm 1.0.31 (see test_timm_ge_default_is_refused)
TIMM = [(f"timm:{n}", {"use_mlp": False} if n == "ge" else {}) for n in TIMM_ATTENTIONS]
#: parameters whose gradient is zero in exact arithmetic in timm's own modules (ours drop such parameters):
#: a bias under a softmax over positions, or a conv bias right before a BN (removed by the batch mean);
#: float rounding gives them 1e-12..1e-9, so the test does not count on them either way
INERT = {"timm:gc": {"attn.conv_attn.bias"}, "timm:gca": {"attn.conv_attn.bias"},
         "timm:nl": {"attn.p.bias", "attn.z.bias"}}
POSITIONS = ("standard", "pre", "post", "identity", "inner", "stage")


def _ids(cases):
    return [f"{n}-{'-'.join(f'{k}={v}' for k, v in o.items())}" if o else n for n, o in cases]


def _side(name: str) -> int:
    return 14 if name == "timm:bat" else 6  # bat needs multiples of its block size 7


@pytest.mark.parametrize("name,options", OWN + TIMM, ids=_ids(OWN + TIMM))
@pytest.mark.slow
def test_module_identity_liveness_and_script(name, options):
    for dims in get_attention(name).spatial_dims:
        module = create_attention(name, 64, spatial_dims=dims, **options)
        x = torch.randn(2, 64, *([_side(name)] * dims))
        for training in (True, False):
            module.train(training)
            assert torch.equal(module(x), x), (dims, training)
        with torch.no_grad():
            for p in module.parameters():
                p.add_(torch.randn_like(p) * 0.1)
        module.eval()
        y = module(x)
        assert (y - x).abs().max() > 1e-3, "perturbing the new parameters must move the output"
        if name == "timm:ge":
            continue  # timm's GatherExcite calls x.mean(dim=…, keepdim=…) with keywords TorchScript rejects
        scripted = torch.jit.script(module)
        assert torch.allclose(scripted(x), y, rtol=1e-5, atol=1e-6)


def test_blend_keeps_timm_names_under_attn_and_random_init_is_timm_alone():
    blended = create_attention("timm:se", 64)
    assert isinstance(blended, ZeroBlend) and blended.alpha.item() == 0
    assert {"alpha", "attn.fc1.weight", "attn.fc2.bias"} <= set(blended.state_dict())
    plain = create_attention("timm:se", 64, init="random")
    assert type(plain).__name__ == "SEModule" and "fc1.weight" in plain.state_dict()
    gca = create_attention("timm:gca", 64, init="random")
    assert gca.mlp_add is not None and gca.mlp_scale is None  # get_attn's partial keywords are kept


def _tiny_net(name: str, options: dict, dims: int = 2) -> tuple[nn.Module, nn.Module]:
    conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[dims - 1]
    attention = create_attention(name, 32, spatial_dims=dims, **options)
    net = nn.Sequential(conv(3, 32, 3, padding=1), nn.ReLU(), attention, nn.Flatten(2))
    return net, attention


@pytest.mark.parametrize("name,options", OWN + TIMM, ids=_ids(OWN + TIMM))
def test_every_new_parameter_gets_gradient_within_three_steps(name, options):
    torch.manual_seed(0)
    net, attention = _tiny_net(name, options)
    side = 14 if name == "timm:bat" else 8
    x, target = torch.randn(4, 3, side, side), torch.randn(4, 32, side * side)
    optimiser = torch.optim.SGD(attention.parameters(), lr=0.5)
    moved: dict[str, int] = {}
    for step in (1, 2, 3):
        optimiser.zero_grad()
        nn.functional.mse_loss(net(x), target).backward()
        for param_name, p in attention.named_parameters():
            if p.grad is not None and p.grad.abs().max() > 0:
                moved.setdefault(param_name, step)
        optimiser.step()
    expected = {n for n, _ in attention.named_parameters()} - INERT.get(name, set())
    assert expected <= set(moved), f"no gradient in 3 steps: {sorted(expected - set(moved))}"
    if isinstance(attention, ZeroBlend):  # α first: nothing else can move while α is 0
        assert [n for n, s in moved.items() if s == 1] == ["alpha"]


@pytest.fixture(scope="module")
def resnet18():
    return make_model("timm", "resnet18").eval()


#: every type at every position, on resnet18; all variants at every position on resnet50:
#: benchmarks/attention_identity.py
AT_POSITIONS = [(n, o, p) for n, o in OWN[:1] + OWN[3:7] for p in POSITIONS] + [
    ("gc", {"fusion": "mul", "reduction": 4}, "standard"), ("nonlocal", {"mode": "dot"}, "post"),
    ("nonlocal", {"mode": "gaussian", "sub_sample": False}, "post")]


@pytest.mark.parametrize("name,options,position", AT_POSITIONS,
                         ids=[f"{i}-{p}" for i, (_, _, p) in zip(_ids([c[:2] for c in AT_POSITIONS]), AT_POSITIONS)])
@pytest.mark.slow
def test_own_types_are_exact_identity_at_every_position_on_resnet18(resnet18, name, options, position):
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    edited = se_retrofit.retrofit(resnet18, attention=name, position=position, **options)
    for training in (True, False):
        assert torch.equal(run(edited, x, training), run(resnet18, x, training)), training
    resnet18.eval()


TIMM_ANY_SIZE = [c for c in TIMM if c[0] != "timm:bat"]


@pytest.mark.parametrize("name,options", TIMM_ANY_SIZE, ids=_ids(TIMM_ANY_SIZE))
@pytest.mark.slow
def test_timm_types_are_exact_identity_on_resnet18(resnet18, name, options):
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    edited = se_retrofit.retrofit(resnet18, attention=name, **options)
    assert "layer1.0.se.alpha" in edited.state_dict()
    for training in (True, False):
        assert torch.equal(run(edited, x, training), run(resnet18, x, training)), training
    resnet18.eval()


def test_timm_bat_needs_multiples_of_its_block_size(resnet18):
    with pytest.raises(se_retrofit.RetrofitError, match=r"multiples of its block_size 7.*\(16, 16\).*224"):
        se_retrofit.retrofit(resnet18, attention="timm:bat", example_input=torch.randn(1, 3, 64, 64))
    x = torch.randn(1, 3, 224, 224)
    edited = se_retrofit.retrofit(resnet18, attention="timm:bat", stages=[4], example_input=x)
    assert torch.equal(run(edited, x, False), run(resnet18, x, False))


@pytest.mark.parametrize("name", ["nonlocal", "danet", "gc", "timm:gca"])
@pytest.mark.slow
def test_whole_edited_model_scripts_with_the_same_output(resnet18, name):
    # TorchScript caches a compiled type per block class; edited forwards live on instances
    # (see tests/test_attention.py::test_two_edited_models_of_one_block_class_script_each_with_its_own_forward)
    torch.jit._recursive.concrete_type_store.type_store.clear()
    edited = se_retrofit.retrofit(resnet18, attention=name, stages=[3, 4]).eval()
    with torch.no_grad():
        for n, p in edited.named_parameters():
            if any(part in n for part in (".nl.", ".da.", ".gc.", ".se.")):
                p.add_(torch.randn_like(p) * 0.1)
    x = torch.randn(1, 3, 64, 64)
    scripted = torch.jit.script(edited)
    with torch.no_grad():
        assert torch.allclose(scripted(x), edited(x), rtol=1e-5, atol=1e-6)
        assert not torch.allclose(edited(x), resnet18(x))
    torch.jit._recursive.concrete_type_store.type_store.clear()


# --- the models the papers use -----------------------------------------------------------------

def test_nonlocal_on_video_r3d_18():
    base = make_model("torchvision", "r3d_18").eval()
    x = torch.randn(1, 3, 4, 32, 32)
    edited = se_retrofit.retrofit(base, attention="nonlocal", example_input=x)
    sites = se_retrofit.record_of(edited).sites
    assert len(sites) == 8 and {s.spatial_dims for s in sites} == {3}
    for training in (True, False):
        assert torch.equal(run(edited, x, training), run(base, x, training))
    _perturb(edited, ".nl.")
    assert not torch.allclose(run(edited, x, False), run(base, x, False))


def test_nonlocal_on_vit_tokens():
    base = as_if_pretrained(timm.create_model("vit_tiny_patch16_224", img_size=64)).eval()
    x = torch.randn(2, 3, 64, 64)
    edited = se_retrofit.retrofit(base, attention="nonlocal", blocks=["blocks.0*", "blocks.11*"],
                                  example_input=x)
    sites = se_retrofit.record_of(edited).sites
    assert len(sites) == 4 and {(s.spatial_dims, s.channel_dim) for s in sites} == {(1, -1)}
    for training in (True, False):
        assert torch.equal(run(edited, x, training), run(base, x, training))
    _perturb(edited, ".nl.")
    assert not torch.allclose(run(edited, x, False), run(base, x, False))


@pytest.mark.slow
def test_danet_on_deeplabv3_backbone_output():
    import torchvision

    torch.manual_seed(0)
    base = as_if_pretrained(torchvision.models.segmentation.deeplabv3_resnet50(
        weights=None, weights_backbone=None, num_classes=3, aux_loss=False)).eval()
    x = torch.randn(2, 3, 64, 64)
    edited = se_retrofit.retrofit(base, attention="danet", example_input=x)
    sites = se_retrofit.record_of(edited).sites
    assert [(s.block, s.position, s.module_name) for s in sites] == [("backbone.layer4.2", "post", "da")]
    for training in (True, False):
        assert torch.equal(run(edited, x, training)["out"], run(base, x, training)["out"])
    _perturb(edited, ".da.")
    assert not torch.allclose(run(edited, x, False)["out"], run(base, x, False)["out"])


def _perturb(model: nn.Module, marker: str) -> None:
    with torch.no_grad():
        params = [p for n, p in model.named_parameters() if marker in n]
        assert params
        for p in params:
            p.add_(torch.randn_like(p) * 0.1)


# --- placement: every k-th block, the memory limit, ranks ---------------------------------------

def test_every_second_block_of_res3_res4_is_the_papers_five_block_placement():
    base = timm.create_model("resnet50").eval()
    _, plan = se_retrofit.plan(base, attention="nonlocal", stages=[2, 3], every=2,
                               example_input=torch.randn(1, 3, 224, 224))
    assert [s.block for s in plan.sites] == ["layer2.0", "layer2.2", "layer3.0", "layer3.2", "layer3.4"]
    assert all(s.position == "post" for s in plan.sites)
    # 28×28 positions against 14×14 after sub-sampling, 4 bytes each; 14×14 against 7×7
    assert [s.attention_bytes for s in plan.sites] == [4 * 784 * 196] * 2 + [4 * 196 * 49] * 3


def test_nonlocal_over_the_memory_limit_is_refused_with_what_to_do():
    base = timm.create_model("resnet18").eval()
    config = se_retrofit.RetrofitConfig(attention="nonlocal", options={"sub_sample": False})
    with pytest.raises(se_retrofit.RetrofitError, match=r"layer1\.0: nonlocal's attention map at \(112, 112\) "
                       r"would take 600 MiB at batch 1, over the limit of 64 MiB; use sub_sample=True"):
        se_retrofit.retrofit_with(base, config, example_input=torch.randn(1, 3, 448, 448))
    config = se_retrofit.RetrofitConfig(attention="nonlocal", stages=[4], max_attention_mib=1)
    _, plan = se_retrofit.plan(base, config, torch.randn(1, 3, 448, 448))
    assert [s.attention_bytes for s in plan.sites] == [4 * 196 * 49] * 2


def test_two_d_only_types_are_refused_on_other_ranks_at_planning():
    model = ResNet1d().eval()
    with pytest.raises(se_retrofit.RetrofitError, match=r"'timm:se' works on 2-D feature maps only, and this one "
                                                        r"is 1-D"):
        se_retrofit.plan(model, attention="timm:se", example_input=torch.randn(1, 1, 128))


def test_default_placement_of_danet_types_is_the_last_block():
    base = timm.create_model("resnet50").eval()
    for name in ("danet", "pam", "cam"):
        _, plan = se_retrofit.plan(base, attention=name, example_input=torch.randn(1, 3, 64, 64))
        assert [(s.block, s.position) for s in plan.sites] == [("layer4.2", "post")]
    _, plan = se_retrofit.plan(base, attention="danet", stages=[3], example_input=torch.randn(1, 3, 64, 64))
    assert len(plan.sites) == 6  # stages given: every block of them


# --- bad values end at config time -------------------------------------------------------------

@pytest.mark.parametrize("attention,options,message", [
    ("cbam", {"kernel_size": 4}, "kernel_size must be an odd positive integer"),
    ("eca", {"kernel_size": 4}, "kernel_size must be an odd positive integer"),
    ("se", {"act": "bogus"}, "unknown activation 'bogus'; use a timm name such as relu"),
    ("nonlocal", {"mode": "cosine"}, "mode must be one of embedded_gaussian, dot, gaussian"),
    ("nonlocal", {"sub_sample": "yes"}, "sub_sample must be True or False"),
    ("gc", {"fusion": "concat"}, "fusion must be one of add, mul"),
    ("bam", {"dilation": 0}, "dilation must be a positive integer"),
    ("timm:se", {"act": "bogus"}, "timm's SEModule cannot be built"),
    ("timm:ge", {}, "passes device and dtype positionally"),
    ("timm:eca", {"use_mlp": True, "kernel_size": 4}, None),
])
def test_bad_option_values_are_refused_when_the_config_is_built(attention, options, message):
    if message is None:  # timm's ECA takes an even kernel: timm decides what its modules accept
        se_retrofit.RetrofitConfig(attention=attention, options=options)
        return
    with pytest.raises(se_retrofit.RetrofitError, match=message):
        se_retrofit.RetrofitConfig(attention=attention, options=options)


@pytest.mark.parametrize("name,reason", [("timm:sk", "replaces a convolution"),
                                          ("timm:halo", "replaces a convolution"),
                                          ("timm:nope", "unknown timm attention")])
def test_timm_names_that_do_not_insert_are_refused(name, reason):
    with pytest.raises(se_retrofit.RetrofitError, match=reason):
        se_retrofit.RetrofitConfig(attention=name)


def test_every_must_be_a_positive_integer_and_round_trips():
    config = se_retrofit.RetrofitConfig(attention="nonlocal", stages=[2, 3], every=2, max_attention_mib=16)
    assert se_retrofit.RetrofitConfig.from_json(config.to_json()) == config
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(se_retrofit.RetrofitError, match="every must be a positive integer"):
            se_retrofit.RetrofitConfig(every=bad)


def test_a_timm_type_saves_and_loads_without_importing_anything(tmp_path):
    base = make_model("timm", "resnet18").eval()
    edited = se_retrofit.retrofit(base, attention="timm:gca", stages=[4])
    assert se_retrofit.record_of(edited).config.attention_module is None
    with torch.no_grad():
        for n, p in edited.named_parameters():
            if ".se." in n:
                p.add_(0.1)
    se_retrofit.save(edited, tmp_path / "m")
    loaded = se_retrofit.load(tmp_path / "m")
    x = torch.randn(1, 3, 64, 64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert torch.equal(loaded.eval()(x), edited.eval()(x))


# --- command line -----------------------------------------------------------------------------

def test_list_attentions_shows_each_type_with_its_options(capsys):
    from se_retrofit.cli import main

    assert main(["--list-attentions"]) == 0
    out = capsys.readouterr().out
    assert "default position: post; options: reduction=2, divisor=1, mode='embedded_gaussian', sub_sample=True" in out
    assert "default position: post, last block only; options: reduction=8, divisor=1" in out
    assert "options: reduction=16, divisor=1, fusion='add'" in out
    assert all(f"timm:{n} " in out for n in TIMM_ATTENTIONS)


def test_cli_plans_the_five_block_placement(tmp_path, capsys):
    from se_retrofit.cli import main

    code = main(["resnet50", "--attention", "nonlocal", "--stages", "2,3", "--every", "2", "--no-sub-sample",
                 "--mode", "dot", "--weights", "none", "--input-size", "3,64,64", "--dry-run", "--json"])
    report = __import__("json").loads(capsys.readouterr().out)
    assert code == 0 and report["every"] == 2 and report["options"] == {"mode": "dot", "sub_sample": False}
    assert [s["block"] for s in report["sites"]] == ["layer2.0", "layer2.2", "layer3.0", "layer3.2", "layer3.4"]


@pytest.mark.parametrize("argv,message", [
    (["--attention", "cbam", "--kernel-size", "4"], "kernel_size must be an odd positive integer"),
    (["--attention", "eca", "--kernel-size", "4"], "kernel_size must be an odd positive integer"),
    (["--act", "bogus"], "unknown activation 'bogus'"),
    (["--attention", "gc", "--mode", "dot"], "option mode does not apply to attention 'gc'"),
    (["--attention", "gc", "--fusion", "mul", "--every", "0"], "--every: must be a positive integer"),
    (["--attention", "timm:sk"], "replaces a convolution"),
])
def test_bad_attention_options_end_in_one_line_before_any_model_work(tmp_path, capsys, argv, message):
    from se_retrofit.cli import main

    code = main(["no_such_model_is_built", *argv, "--weights", "none", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "out").exists()
