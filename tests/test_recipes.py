"""Every recipe in recipes/ loads, validates, round-trips, and its retrofit fits its model.

Classification recipes are planned on their model (random weights, small probe input): the stages
and blocks they name must exist and every residual block asked for must be edited. The detection
recipe is planned on Faster R-CNN made small (its transform resizes to 64 px), and `finetune --data`
must refuse it in one line while `--export-only` is its way out.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import se_retrofit
from se_retrofit.analysis import analyze
from se_retrofit.finetune import Recipe, load_recipe
from se_retrofit.finetune.cli import main
from se_retrofit.hub import create, resolve
from se_retrofit.planning import plan_sites

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))
#: recipes that place the Non-local paper's blocks, and the blocks they must edit
PLACEMENTS = {"resnet50-nonlocal-1block": ["layer3.4"],
              "resnet50-nonlocal-5blocks": ["layer2.0", "layer2.2", "layer3.0", "layer3.2", "layer3.4"]}
SMALL = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))


def test_the_recipes_cover_the_common_jobs():
    recipes = {load_recipe(path).name: load_recipe(path) for path in RECIPES}
    jobs = {(r.model, r.retrofit.attention, r.retrofit.position) for r in recipes.values()}
    assert {("resnet50", "se", p) for p in ("standard", "pre", "post", "identity")} <= jobs
    assert {("resnet50", "cbam", "standard"), ("resnet50", "eca", "standard")} <= jobs
    assert set(PLACEMENTS) <= set(recipes)
    assert any(r.task == "detection" and r.model == "torchvision:fasterrcnn_resnet50_fpn" for r in recipes.values())
    for recipe in recipes.values():  # a two-phase schedule: new modules (and head) first, then all, slower
        first, last = recipe.phases[0], recipe.phases[-1]
        assert (first.trainable, last.trainable) == ("new", "all") and last.lr < first.lr
        assert last.new_lr_scale > 1
        if recipe.name not in PLACEMENTS:  # the others edit every stage
            assert recipe.retrofit.stages == [1, 2, 3, 4]


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipe_loads_validates_and_round_trips(path):
    recipe = load_recipe(path)
    assert recipe.name == path.stem  # the file is named after the recipe (and its default output directory)
    again = Recipe.from_yaml(recipe.to_yaml())
    assert again == recipe and again.fingerprint() == recipe.fingerprint()
    assert Recipe.from_dict(recipe.to_dict()) == recipe
    # a checkpoint belongs to a fingerprint: what the run computes, not how many loader processes it had
    assert recipe.with_overrides(workers=recipe.train.workers + 1).fingerprint() == recipe.fingerprint()
    assert recipe.with_overrides(epochs=[recipe.total_epochs + 1]).fingerprint() != recipe.fingerprint()
    assert recipe.weights == "pretrained" and recipe.description


@pytest.fixture(scope="module")
def analyses() -> dict:
    """One analysis per classification model named by a recipe (random weights, 64 px probe)."""
    out = {}
    for path in RECIPES:
        recipe = load_recipe(path)
        if recipe.task == "classification" and recipe.model not in out:
            model, _ = create(resolve(recipe.model), "none", **recipe.model_kwargs)
            out[recipe.model] = (model.eval(), analyze(model.eval(), SMALL))
    return out


@pytest.mark.parametrize("path", [p for p in RECIPES if load_recipe(p).task == "classification"],
                         ids=lambda p: p.stem)
def test_classification_recipe_retrofits_its_model(path, analyses):
    recipe = load_recipe(path)
    model, analysis = analyses[recipe.model]
    plan = plan_sites(model, analysis, recipe.retrofit)
    expected = PLACEMENTS.get(recipe.name, [b.path for b in analysis.blocks])
    assert [s.block for s in plan.sites] == expected and not plan.skipped


def test_detection_recipe_retrofits_the_backbone_of_a_small_detector():
    recipe = load_recipe(next(p for p in RECIPES if load_recipe(p).task == "detection"))
    model, _ = create(resolve(recipe.model), "none", **recipe.model_kwargs, min_size=64, max_size=64)
    model.eval()
    example = [torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(0))]
    edited = se_retrofit.retrofit_with(model, recipe.retrofit, example_input=example)
    sites = se_retrofit.record_of(edited).sites
    assert len(sites) == 16 and all(s.block.startswith("backbone.body.layer") for s in sites)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        features, again = model.backbone(x), edited.backbone(x)
    assert all(torch.equal(features[k], again[k]) for k in features)


def test_finetune_refuses_the_detection_recipe_in_one_line(tmp_path, capsys):
    path = next(p for p in RECIPES if load_recipe(p).task == "detection")
    code = main([str(path), "--data", str(tmp_path), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "ImageFolder fine-tuning needs a classifier" in err and "--export-only" in err
    assert not (tmp_path / "out").exists()


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path, capsys):
    from test_finetune import make_images

    data = make_images(tmp_path / "images", per_class=5)
    code = main([str(RECIPES[0].parent / "resnet50-se-standard.yaml"), "--data", str(data),
                 "--out", str(tmp_path / "out"), "--dry-run", "--epochs", "4"])
    out = capsys.readouterr().out
    assert code == 0
    assert "recipe resnet50-se-standard: timm:resnet50, se at standard, r=16, stages [1, 2, 3, 4]" in out
    assert "phase new-modules: new, 1 epoch, lr 0.01, attention ×1" in out
    assert "phase full: all, 3 epochs, lr 0.001, attention ×10" in out
    assert "data: 3 classes, 12 training and 3 validation images" in out
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
@pytest.mark.slow
def test_every_recipe_exports_a_directory_that_load_reads_back_exactly(path, tmp_path):
    """`finetune RECIPE --export-only` (random weights, no download) writes a model that load rebuilds
    from the config alone, verified (module tree and probe), with the exported weights."""
    import dataclasses

    from se_retrofit.finetune import run
    from se_retrofit.io import CONFIG_FILE

    recipe = load_recipe(path)
    if recipe.task == "detection":  # the detector's own resize, made small: the probe runs at 64 px
        recipe = dataclasses.replace(recipe, model_kwargs={**recipe.model_kwargs, "min_size": 64, "max_size": 64})
    result = run(recipe, out=tmp_path / "out", weights="none", export_only=True, progress=False)
    directory = tmp_path / "out" / "model"
    assert "skipped" not in json.loads((directory / CONFIG_FILE).read_text())["verify"]["probe"]
    again = se_retrofit.load(directory)
    exported = result.model.state_dict()
    assert again.state_dict().keys() == exported.keys()
    assert all(torch.equal(again.state_dict()[k], v.cpu()) for k, v in exported.items())


def test_each_schema_mistake_gets_one_line_naming_its_key():
    """benchmarks/schema_choice.py's case for keeping the hand-written checks over pydantic: the same
    mistakes, one line each, naming the key where it sits in the recipe (and the key meant)."""
    import importlib.util

    script = Path(__file__).resolve().parent.parent / "benchmarks" / "schema_choice.py"
    spec = importlib.util.spec_from_file_location("se_retrofit_schema_choice", script)
    schema_choice = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(schema_choice)
    for mistake in schema_choice.MISTAKES.values():
        message = schema_choice.hand_written_message(mistake)
        assert "\n" not in message and f"phases[1].{next(iter(mistake))}" in message, message
    assert schema_choice.hand_written_message({"learning_rate": 0.001}).endswith("did you mean 'lr'?")
