"""benchmarks/transfer.py --quick (the CI run of the transfer benchmark, under 2 minutes): real
images (scikit-learn's digits as PNG files) through ``se-retrofit finetune`` from pretraining to
fine-tuning. It asserts only what one seed can show: the retrofit leaves the source model's outputs
exactly as they were, and every arm trains through the product's path (phases, checkpoints, resume)."""
import importlib.util
import json
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # the transfer benchmark's quick run (fine-tuning on real images)

pytest.importorskip("sklearn", reason="benchmarks/transfer.py needs scikit-learn (pip install '.[bench]')")

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "transfer.py"


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    spec = importlib.util.spec_from_file_location("transfer_benchmark", SCRIPT)
    transfer = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = transfer  # its dataclasses look their module up there
    spec.loader.exec_module(transfer)
    root = tmp_path_factory.mktemp("transfer")
    result = transfer.main(["--quick", "--work", str(root / "work"), "--out", str(root / "out")])
    return result, root


def test_retrofit_leaves_source_accuracy_and_logits_unchanged(quick):
    result, _ = quick
    rows = result["identity"]["resnet18"]
    for arm in ("plain", "se-post"):
        assert rows[arm]["max_abs_diff"] == [0.0], arm
        assert rows[arm]["after"] == [rows[arm]["before"]], arm
    assert rows["plain"]["new_params"] == 0 and rows["se-post"]["new_params"] > 0
    assert rows["se-random"]["max_abs_diff"][0] > 0  # timm's random-init SE, loaded non-strictly, moves them
    assert rows["plain"]["before"] > 0.5  # the source model learnt digits 0-4 (chance: 0.2)


@pytest.mark.parametrize("arm", ["plain", "se-post", "se-random"])
def test_every_arm_trains_through_both_phases(quick, arm):
    result, root = quick
    (run,) = [r for r in result["runs"] if r["arm"] == arm]
    assert run["phases"] == ["new-modules", "full"]
    assert len(run["curve"]) == 2 and all(0.0 <= acc <= 1.0 for acc in run["curve"])
    out = root / "work" / "runs" / "resnet18" / "few" / arm / "seed0"
    assert (out / "checkpoint.pt").is_file() and (out / "model" / "model.safetensors").is_file()


def test_source_run_was_stopped_resumed_and_reports_are_written(quick):
    result, root = quick
    assert len(result["source_curves"]["resnet18"]) == 3  # epoch 1, then epochs 2-3 after --resume
    for name in ("transfer.md", "transfer.png", "transfer.json"):
        assert (root / "out" / name).stat().st_size > 0
    assert json.loads((root / "out" / "transfer.json").read_text())["seeds"] == [0]
    assert "| resnet18 | se-post |" in (root / "out" / "transfer.md").read_text()
