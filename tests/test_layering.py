"""The package's modules import one another without cycles, and ``import se_retrofit`` stays light.

The graph is the one ``benchmarks/module_graph.py`` prints: module-level imports are edges; imports
inside functions are lazy (they run after every module has loaded) and are not edges.
"""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "module_graph.py"


@pytest.fixture(scope="module")
def module_graph():
    spec = importlib.util.spec_from_file_location("se_retrofit_module_graph", SCRIPT)  # not a name on sys.path
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_package_has_no_import_cycle(module_graph):
    eager, lazy = module_graph.graph()
    assert module_graph.cycles(eager) == []
    assert len(eager) >= 40 and "se_retrofit.core" in eager["se_retrofit.cli_run"]  # the graph is the package's
    assert not {"se_retrofit.core", "se_retrofit.cli_run"} & eager["se_retrofit.cli"]  # --help imports no torch
    assert "se_retrofit.finetune.cli" in lazy["se_retrofit.cli"]  # `se-retrofit finetune` imports it on use
    assert "se_retrofit.cli" not in eager["se_retrofit.finetune.cli"]  # they share _shell, not each other


def _package(root: Path, files: dict[str, str]) -> Path:
    package = root / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    for name, text in files.items():
        (package / name).write_text(text)
    return package


def test_a_cycle_is_found_and_a_lazy_import_is_not_one(module_graph, tmp_path):
    package = _package(tmp_path, {"a.py": "from . import b\n", "b.py": "from .c import x\n",
                                  "c.py": "from .a import y\n", "d.py": "def f():\n    from . import a\n",
                                  "e.py": "import pkg.d\n"})
    eager, lazy = module_graph.graph(package)
    assert module_graph.cycles(eager) == [["pkg.a", "pkg.b", "pkg.c"]]
    assert eager["pkg.d"] == set() and lazy["pkg.d"] == {"pkg.a"} and eager["pkg.e"] == {"pkg.d"}


def test_the_script_prints_the_graph_and_no_cycle():
    done = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "core -> analysis, config, copying, errors, hf, hub, masking, planning, surgery, tracing" in done.stdout
    assert done.stdout.rstrip().endswith("no import cycles")


HEAVY = ("se_retrofit.finetune", "yaml", "matplotlib", "torch.distributed", "torch.nn.parallel", "torch.utils.data",
         "PIL", "transformers")


@pytest.mark.slow
def test_import_se_retrofit_loads_neither_the_trainer_nor_yaml_nor_ddp():
    """Beyond what torch and timm load themselves (timm loads YAML and DDP), ``import se_retrofit`` and
    its public names (imported on first use) load no heavy module: the trainer comes on first use of ``se_retrofit.finetune``."""
    code = ("import json, sys, torch, timm; before = set(sys.modules); import se_retrofit; se_retrofit.retrofit; "
            "added = sorted(set(sys.modules) - before); se_retrofit.finetune; "
            "print(json.dumps([added, 'se_retrofit.finetune.trainer' in sys.modules]))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    added, trainer_after_use = json.loads(done.stdout)
    assert [m for m in added if m.startswith(HEAVY)] == [] and "se_retrofit.core" in added
    assert trainer_after_use
