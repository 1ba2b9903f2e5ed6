"""``se-retrofit finetune RECIPE --import MODULE`` (issue 20): a recipe naming a user-registered attention
type runs once the user names the module that registers it, and only then; the saved model records the
module, so ``se_retrofit.load`` can say what to import. Each case runs in a fresh process: in this one the
type could already be registered by an earlier test."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULE = "i20_user_gate"
ATTENTION = "i20-user-gate"
REGISTERING = f'''
import torch
from torch import nn
import se_retrofit


@se_retrofit.register_attention("{ATTENTION}")
class Gate(nn.Module):
    """x * (1 + alpha): alpha starts at zero, so the edit starts at identity."""

    def __init__(self, channels, **_):
        super().__init__()
        self.alpha = nn.Parameter(torch.zeros(1, channels, 1, 1))

    def init_identity(self):
        nn.init.zeros_(self.alpha)

    def forward(self, x):
        return x * (1 + self.alpha)
'''
RECIPE = f"""name: user-gate
model: resnet18
weights: none
retrofit: {{attention: {ATTENTION}, attention_module: {MODULE}}}
data: {{image_size: 32}}
phases:
  - {{name: new-modules, trainable: new, epochs: 1, lr: 0.01}}
"""


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("import")
    (root / "code").mkdir()
    (root / "code" / f"{MODULE}.py").write_text(REGISTERING)
    (root / "recipe.yaml").write_text(RECIPE)
    return root


def se_retrofit_cli(workspace: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(workspace / "code")]),
           "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run([sys.executable, "-m", "se_retrofit", *args], capture_output=True, text=True, env=env,
                          cwd=workspace, timeout=300)


def export_args(workspace: Path, out: str) -> list[str]:
    return [str(workspace / "recipe.yaml"), "--export-only", "--num-classes", "3", "--out", str(workspace / out)]


@pytest.mark.slow
def test_without_import_the_recipe_is_refused_in_one_line_naming_the_option(workspace):
    result = se_retrofit_cli(workspace, "finetune", *export_args(workspace, "refused"))
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert f"--import {MODULE}" in result.stderr
    assert not (workspace / "refused").exists()


@pytest.mark.parametrize("where", ["after", "before"])
@pytest.mark.slow
def test_import_runs_the_recipe_and_the_saved_model_names_its_module(workspace, where):
    out = f"exported-{where}"
    args = ["finetune", *export_args(workspace, out), "--import", MODULE] if where == "after" else \
        ["--import", MODULE, "finetune", *export_args(workspace, out)]  # se-retrofit --import M finetune R
    result = se_retrofit_cli(workspace, *args)
    assert result.returncode == 0, result.stderr
    assert "identity check: max |Δ| = 0" in result.stdout
    config = json.loads((workspace / out / "model" / "retrofit_config.json").read_text())
    assert f'"attention_module": "{MODULE}"' in json.dumps(config)
    assert f'"attention": "{ATTENTION}"' in json.dumps(config)


@pytest.mark.slow
def test_load_of_the_saved_model_says_what_to_import_and_loads_when_trusted(workspace):
    out = workspace / "exported-after" / "model"
    if not out.exists():
        assert se_retrofit_cli(workspace, "finetune", *export_args(workspace, "exported-after"),
                               "--import", MODULE).returncode == 0
    code = ("import se_retrofit, sys\n"
            "try:\n"
            f"    se_retrofit.load({str(out)!r})\n"
            "except se_retrofit.RetrofitError as error:\n"
            "    print('refused:', error)\n"
            f"model = se_retrofit.load({str(out)!r}, trust_code=True)\n"
            "print('sites', len(se_retrofit.record_of(model).sites))\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(workspace / "code")]),
           "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    refused = [line for line in result.stdout.splitlines() if line.startswith("refused:")]
    assert refused and MODULE in refused[0] and "trust_code=True" in refused[0]
    assert "sites 8" in result.stdout


@pytest.mark.slow
def test_a_module_that_cannot_be_imported_is_one_line(workspace):
    result = se_retrofit_cli(workspace, "finetune", *export_args(workspace, "missing"), "--import", "no_such_i20_mod")
    assert result.returncode == 2
    assert "cannot import 'no_such_i20_mod'" in result.stderr and "Traceback" not in result.stderr
