"""Budgets: the choice rule (monotone in the budget), budgets met and checked by counting the edited
model, impossible budgets (exit 2 and the cheapest plan's cost), identity of a plan chosen by
budget, the API, and ``se-retrofit plan``'s sweep."""
import json
import re

import pytest
import timm
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import se_retrofit
from se_retrofit.budget import (REDUCTIONS, BudgetError, ImpossibleBudgetError, choose, parse_budget, parse_budgets,
                                select)
from se_retrofit.cli import main
from se_retrofit.cost import count_flops, count_params
from se_retrofit.planning import plan_sites

from helpers import make_model

X = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def resnet():
    return make_model("timm", "resnet18").eval()


@pytest.fixture(scope="module")
def unit_costs(resnet):
    """(params, FLOPs) of every unit of resnet18 at each r, as choose() computes them."""
    from se_retrofit.budget import _unit_cost, _units
    from se_retrofit.cost import predict

    analysis = se_retrofit.analyze(resnet, X)
    costs = {}
    for r in REDUCTIONS:
        config = se_retrofit.RetrofitConfig(reduction=r)
        costs[r] = predict(resnet, config, analysis, plan_sites(resnet, analysis, config), X)
    units = _units(costs[REDUCTIONS[0]])
    return {r: [_unit_cost(c, u) for u in units] for r, c in costs.items()}, costs[4].base_params, costs[4].base_flops


@pytest.mark.parametrize("text, kind, limit, percent", [
    ("params=+2%", "params", 2.0, True), ("flops=+0.5%", "flops", 0.5, True), ("latency=+5%", "latency", 5.0, True),
    ("params=+500k", "params", 5e5, False), ("FLOPS: 1.5G", "flops", 1.5e9, False), ("params=3", "params", 3, False)])
def test_budgets_read(text, kind, limit, percent):
    assert parse_budget(text) == se_retrofit.budget.Budget(kind, limit, percent)


@pytest.mark.parametrize("text, words", [("speed=+5%", "KIND=+LIMIT"), ("params=-2%", "KIND=+LIMIT"),
                                         ("latency=+5k", "percentage"), ("params=+2k%", "suffix"),
                                         ("params", "KIND=+LIMIT"), ("params=+1e400%", "KIND=+LIMIT"),
                                         ("flops=+99999999%", "out of range")])
def test_unreadable_budgets_are_one_line_errors(text, words):
    with pytest.raises(BudgetError, match=re.escape(words)):
        parse_budget(text)


def test_one_budget_per_kind():
    with pytest.raises(BudgetError, match="given twice"):
        parse_budgets(["params=+1%", "params=+2%"])
    assert [b.kind for b in parse_budgets({"params": "+1%", "flops": "+2%"})] == ["params", "flops"]


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(a=st.floats(0, 12), b=st.floats(0, 12), fa=st.floats(0, 0.5), fb=st.floats(0, 0.5), with_flops=st.booleans())
@pytest.mark.slow
def test_a_larger_budget_never_edits_fewer_units(unit_costs, a, b, fa, fb, with_flops):
    costs, base_params, base_flops = unit_costs
    (a, fa), (b, fb) = sorted([(a, fa), (b, fb)])
    fb = max(fa, fb)

    def units(p, f):
        budgets = [parse_budget(f"params=+{p:.9f}%")] + ([parse_budget(f"flops=+{f:.9f}%")] if with_flops else [])
        picked = select(costs, budgets, base_params, base_flops)
        if picked is not None:  # what is chosen fits
            chosen, r = picked
            assert sum(costs[r][i][0] for i in chosen) <= p / 100 * base_params
            if with_flops:
                assert sum(costs[r][i][1] for i in chosen) <= f / 100 * base_flops
        return 0 if picked is None else len(picked[0])

    assert units(a, fa) <= units(b, fb)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 100), st.integers(0, 100)), min_size=1, max_size=8),
       st.integers(0, 400), st.integers(0, 400))
def test_the_rule_on_any_costs_is_monotone_and_takes_the_most_units(costs, small, large):
    small, large = sorted((small, large))
    table = {16: costs, 32: [(p // 2, f // 2) for p, f in costs]}
    picks = [select(table, [parse_budget(f"params=+{limit}")], 10 ** 6, 10 ** 6) for limit in (small, large)]
    sizes = [0 if p is None else len(p[0]) for p in picks]
    assert sizes[0] <= sizes[1]
    if picks[1] is not None:  # no set of more units fits at any r
        cheapest = sorted(c[0] for c in table[32])
        assert sum(cheapest[:sizes[1]]) <= large
        assert sizes[1] == len(costs) or sum(cheapest[:sizes[1] + 1]) > large


@pytest.mark.filterwarnings("ignore::se_retrofit.StackedAttentionWarning")
@pytest.mark.parametrize("name, budget", [
    ("resnet18", ["params=+1%"]), ("resnet18", ["params=+0.2%", "flops=+0.01%"]),
    ("efficientnet_b0", ["params=+0.3%"]), ("vit_tiny_patch16_224", ["flops=+0.005%"])])
@pytest.mark.slow
def test_a_chosen_plan_meets_its_budget_when_counted_and_edits_at_identity(name, budget):
    kwargs = {"img_size": 64} if name.startswith("vit") else {}
    model = make_model("timm", name, **kwargs).eval()
    choice = choose(model, se_retrofit.RetrofitConfig(), budget, X)
    assert choice.fits and choice.plan.sites
    edited = se_retrofit.retrofit_with(model, choice.config, example_input=X)
    added_params = count_params(edited) - count_params(model)
    added_flops = count_flops(edited, X) - count_flops(model, X)
    assert (added_params, added_flops) == (choice.cost.params, choice.cost.flops)  # predicted == measured
    for b in choice.budgets:
        limit = b.allowed(count_params(model) if b.kind == "params" else count_flops(model, X))
        assert (added_params if b.kind == "params" else added_flops) <= limit
    assert [s.module_path for s in se_retrofit.record_of(edited).sites] == [s.module_path for s in choice.plan.sites]
    with torch.no_grad():
        assert torch.equal(edited(X), model(X))
    model.train(), edited.train()
    torch.manual_seed(0)
    expected = model(X)
    torch.manual_seed(0)
    assert torch.equal(edited(X), expected)


@pytest.mark.slow
def test_retrofit_with_a_budget_edits_the_chosen_plan_and_leaves_the_model_alone(resnet):
    before = {k: v.clone() for k, v in resnet.state_dict().items()}
    edited = se_retrofit.retrofit(resnet, budget="params=+0.2%", example_input=X)
    _, plan = se_retrofit.plan(resnet, example_input=X, budget="params=+0.2%")
    record = se_retrofit.record_of(edited)
    assert record.config == plan.choice.config and record.config.reduction == 32
    assert [s.block for s in record.sites] == [s.block for s in plan.sites] == plan.choice.units
    assert plan.choice.left_out and not set(plan.choice.left_out) & set(plan.choice.units)
    assert not hasattr(resnet, "se_retrofit")
    assert all(torch.equal(before[k], v) for k, v in resnet.state_dict().items())
    with torch.no_grad():
        assert torch.equal(edited(X), resnet(X))


def test_a_fixed_r_and_a_selection_bound_the_space(resnet):
    choice = choose(resnet, se_retrofit.RetrofitConfig(reduction=8, stages=[3, 4]), "params=+100%", X)
    assert choice.config.reduction == 8 and choice.reductions == (8,)
    assert {s.stage for s in choice.plan.sites} == {3, 4} and not choice.left_out


@pytest.mark.slow
def test_an_impossible_budget_names_the_cheapest_plan(resnet):
    with pytest.raises(ImpossibleBudgetError, match=r"no plan meets params=\+0.0001%: the cheapest plan, 1 site "
                                                    r"\(layer1\.\d, r=32\), adds \+[\d,]+ params"):
        choose(resnet, se_retrofit.RetrofitConfig(), "params=+0.0001%", X)
    with pytest.raises(ImpossibleBudgetError):
        se_retrofit.retrofit(resnet, budget="params=+1", example_input=X)


def test_an_impossible_budget_exits_2_on_the_command_line(capsys):
    code = main(["resnet18", "--weights", "none", "--dry-run", "--input-size", "3,64,64", "--budget", "params=+10"])
    err = capsys.readouterr().err
    assert code == 2 and "no plan meets params=+10" in err and "cheapest plan" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


@pytest.mark.slow
def test_a_latency_budget_is_measured_and_says_so(resnet):
    choice = choose(resnet, se_retrofit.RetrofitConfig(stages=[4]), ["latency=+1000%"], X, repeats=2)
    assert choice.fits and choice.latency["ratio_min"] > 0 and choice.measured >= 1
    row = choice.checks()[0]
    assert row["budget"] == "latency=+1000%" and row["how"].startswith("measured")
    assert len(choice.plan.sites) == 2 and choice.config.reduction == 4  # everything fits: the widest r


def test_budget_on_the_command_line_reports_the_choice(capsys):
    code = main(["resnet18", "--weights", "none", "--dry-run", "--json", "--input-size", "3,64,64",
                 "--budget", "params=+0.2%", "--budget", "flops=+0.5%"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0
    budget = report["budget"]
    assert budget["budgets"] == ["params=+0.2%", "flops=+0.5%"] and budget["fits"]
    assert all(row["holds"] and row["how"] == "counted" for row in budget["checks"])
    assert [s["block"] for s in report["sites"]] == budget["units_chosen"] and report["reduction"] == 32
    assert report["params_planned"] == budget["cost"]["params_added"] <= 0.002 * report["params_before"]


@pytest.mark.slow
def test_plan_sweep_table_json_and_pareto(capsys, tmp_path):
    code = main(["plan", "resnet18", "--sweep", "r=8,16", "stages=4/3-4", "--input-size", "3,64,64", "--json"])
    result = json.loads(capsys.readouterr().out)
    assert code == 0 and len(result["rows"]) == 4
    model = make_model("timm", "resnet18").eval()
    for row in result["rows"]:
        edited = se_retrofit.retrofit(model, reduction=row["r"], stages=row["stages"], example_input=X)
        assert row["params_added"] == count_params(edited) - count_params(model)
        assert row["flops_added"] == count_flops(edited, X) - count_flops(model, X)
    front = {(r["r"], tuple(r["stages"])) for r in result["rows"] if r["pareto"]}
    assert front == {(16, (4,)), (16, (3, 4))}  # at a given coverage the larger r is cheaper
    code = main(["plan", "resnet18", "--input-size", "3,64,64"])
    out = capsys.readouterr().out
    assert code == 0 and "Pareto front" in out and out.count("\n") > 16  # 4 r × 4 stage sets by default


@pytest.mark.slow
def test_plan_png_and_its_absence(capsys, tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    png = tmp_path / "plan.png"
    assert main(["plan", "resnet18", "--sweep", "r=16", "stages=4", "--input-size", "3,64,64", "--png", str(png)]) == 0
    assert png.read_bytes()[:4] == b"\x89PNG"
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    other = tmp_path / "other.png"
    assert main(["plan", "resnet18", "--sweep", "r=16", "stages=4", "--input-size", "3,64,64", "--png", str(other)]) == 0
    assert "matplotlib is not installed" in capsys.readouterr().err and not other.exists()


@pytest.mark.parametrize("sweep, words", [("r=0", "r takes"), ("stages=x", "stage sets"), ("depth=3", "sweep over"),
                                          ("stages=9", "out of range")])
def test_bad_sweeps_exit_2(capsys, sweep, words):
    code = main(["plan", "resnet18", "--sweep", sweep, "--input-size", "3,64,64"])
    err = capsys.readouterr().err
    assert code == 2 and words in err and "Traceback" not in err


def test_a_recipe_states_its_budget_and_records_it():
    from se_retrofit.finetune.recipe import Recipe, RecipeError

    base = "name: x\nmodel: resnet18\nretrofit: {}\nphases: [{name: a, epochs: 1, lr: 0.1}]\n"
    recipe = Recipe.from_yaml(base + "budget: [params=+2%, 'flops: 0.5%']")
    assert recipe.budget == ("params=+2%", "flops=+0.5%")
    assert Recipe.from_yaml(recipe.to_yaml()) == recipe and recipe.to_dict()["budget"] == ["params=+2%", "flops=+0.5%"]
    plain = Recipe.from_yaml(base)
    assert plain.budget == () and "budget" not in plain.to_dict()  # fingerprints of recipes without one unchanged
    assert plain.fingerprint() != recipe.fingerprint()
    with pytest.raises(RecipeError, match=r"r\.yaml: budget: cannot read budget 'speed=\+1%'"):
        Recipe.from_yaml(base + "budget: speed=+1%", source="r.yaml")


@pytest.mark.slow
def test_a_recipes_budget_chooses_the_sites_finetune_edits(tmp_path):
    """``budget:`` in a recipe is applied by ``finetune`` (the saved model has the sites the budget
    chose, within it), and a latency budget, measured and so different on a resume, is refused."""
    from se_retrofit import finetune
    from se_retrofit.finetune.recipe import Recipe, RecipeError

    base = "name: x\nmodel: resnet18\nweights: none\nretrofit: {attention: se}\nphases: [{name: a, epochs: 1, lr: 0.1}]\n"
    with pytest.raises(RecipeError, match="latency budget is measured"):
        Recipe.from_yaml(base + "budget: [latency=+5%]")
    recipe = Recipe.from_yaml(base + "budget: [params=+0.3%]\ndata: {image_size: 64}\n")
    finetune.run(recipe, tmp_path, out=tmp_path / "run", export_only=True, weights="none")
    model = se_retrofit.load(tmp_path / "run" / "model")
    plain = timm.create_model("resnet18")
    edited = sum(p.numel() for p in model.parameters()) - sum(p.numel() for p in plain.parameters())
    sites = se_retrofit.record_of(model).sites
    assert 0 < len(sites) < 8 and 0 < edited <= 0.003 * sum(p.numel() for p in plain.parameters())
