"""Cost of a plan before the edit: predicted parameters and FLOPs equal the edited model's, exactly;
the caller's model is untouched; measurements and the command line's report."""
import json

import pytest
import timm
import torch

import se_retrofit
from se_retrofit.cli import main
from se_retrofit.cost import base_counts, count_flops, count_params, predict
from se_retrofit.measure import measure

from helpers import make_model

SMALL = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))


def _models():
    yield "resnet18", make_model("timm", "resnet18").eval(), SMALL
    yield "efficientnet_b0", make_model("timm", "efficientnet_b0").eval(), SMALL
    yield "vit", make_model("timm", "vit_tiny_patch16_224", img_size=64).eval(), SMALL


@pytest.mark.filterwarnings("ignore::se_retrofit.StackedAttentionWarning")
@pytest.mark.parametrize("attention", ["se", "gc", "cbam"])
@pytest.mark.slow
def test_predicted_params_and_flops_equal_the_edited_models(attention):
    for name, model, x in _models() if attention == "se" else list(_models())[:1]:
        config = se_retrofit.RetrofitConfig(attention=attention)
        analysis, site_plan = se_retrofit.plan(model, config, x)
        cost = predict(model, config, analysis, site_plan, x)
        edited = se_retrofit.retrofit_with(model, config, example_input=x)
        assert cost.base_params == count_params(model)
        assert cost.base_flops == count_flops(model, x)
        assert cost.base_params + cost.params == count_params(edited), (name, attention)
        assert cost.base_flops + cost.flops == count_flops(edited, x), (name, attention)
        assert len(cost.sites) == len(site_plan.sites) and all(s.params > 0 for s in cost.sites)
        assert cost.flops > 0


def test_prediction_leaves_the_callers_model_and_plan_alone():
    model = make_model("timm", "resnet18").train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modules = [n for n, _ in model.named_modules()]
    config = se_retrofit.RetrofitConfig()
    analysis, site_plan = se_retrofit.plan(model, config, SMALL)
    sites = list(site_plan.sites)
    predict(model, config, analysis, site_plan, SMALL)
    assert model.training and [n for n, _ in model.named_modules()] == modules
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert site_plan.sites == sites and not hasattr(model, "se_retrofit")


def test_cpu_attention_flops_are_counted_as_on_meta():
    """FlopCounterMode alone counts a ViT's scaled_dot_product_attention on meta, not on the CPU."""
    model = timm.create_model("vit_tiny_patch16_224", img_size=64).eval()
    params, meta_flops = base_counts(model, SMALL)
    assert count_flops(model, SMALL) == meta_flops
    from torch.utils.flop_counter import FlopCounterMode

    plain = FlopCounterMode(display=False)
    with plain, torch.no_grad():
        model(SMALL)
    assert plain.get_total_flops() < meta_flops  # what the extra mapping adds


@pytest.mark.slow
def test_measure_compares_edited_and_unedited_for_inference_and_training():
    base = make_model("timm", "resnet18").eval()
    edited = se_retrofit.retrofit(base, stages=[4], example_input=SMALL)
    state = {k: v.clone() for k, v in base.state_dict().items()}
    result = measure(base, edited, SMALL, repeats=3)
    for what in ("inference", "training"):
        m = result[what]
        assert m["ratio_min"] > 0 and m["ratio_median"] > 0
        low, high = m["ratio_spread"]
        assert low <= high
        assert m["base_peak_mib"] > 0 and m["edited_peak_mib"] > 0
    assert result["training"]["base_peak_mib"] > result["inference"]["base_peak_mib"]  # gradients
    assert all(torch.equal(state[k], v) for k, v in base.state_dict().items())  # norms did not move
    assert not base.training


def test_dry_run_json_reports_flops_per_site_and_in_total(capsys):
    code = main(["resnet18", "--weights", "none", "--dry-run", "--json", "--input-size", "3,64,64", "--stages", "3,4"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0
    assert report["flops_planned"] == sum(s["flops"] for s in report["sites"]) > 0
    assert report["params_planned"] == sum(s["params"] for s in report["sites"])
    model = timm.create_model("resnet18")
    x = torch.randn(1, 3, 64, 64)
    edited = se_retrofit.retrofit(model, stages=[3, 4], example_input=x)
    assert report["flops_before"] + report["flops_planned"] == count_flops(edited, x)


@pytest.mark.slow
def test_dry_run_text_and_measure(capsys):
    code = main(["resnet18", "--weights", "none", "--dry-run", "--input-size", "3,64,64", "--stages", "4",
                 "--measure", "--repeats", "2"])
    out = capsys.readouterr().out
    assert code == 0
    assert "FLOPs: " in out and "counted at the probe input" in out
    assert "measured on this machine" in out and "inference: latency" in out and "training: latency" in out
    assert "peak memory" in out


@pytest.mark.parametrize("args, words", [(["--repeats", "0"], "--repeats"), (["--budget", "speed=+5%"], "budget")])
def test_bad_cost_options_exit_2(capsys, args, words):
    code = main(["resnet18", "--weights", "none", "--dry-run", *args])
    err = capsys.readouterr().err
    assert code == 2 and words in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
