"""A fixed sample across families, checked the way benchmarks/coverage.py checks every model.

Each model's status and residual-block count are pinned, next to the independent expectation the
sweep records (drop-path calls, or the library's own block classes: see ``expectation`` in
benchmarks/coverage.py). A model that falls to ``no-residual-blocks``, finds fewer or more blocks,
or loses its expectation fails here. Retrofitted models must hold identity at ``standard`` and
``post`` (max relative |Δ| ≤ 1e-5). The whole-registry sweep is ``python benchmarks/coverage.py``.
"""
import importlib.util
import sys
from pathlib import Path

import pytest

SWEEP_FILE = Path(__file__).resolve().parents[1] / "benchmarks" / "coverage.py"


def _load_sweep():
    """benchmarks/coverage.py under a name of its own (``coverage`` is coverage.py's, used by pytest-cov)."""
    name = "se_retrofit_coverage_sweep"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, SWEEP_FILE)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


#: model -> (status, blocks found, expected blocks or "" where no independent figure exists).
SAMPLE = {
}

HF_SAMPLE = {
}


def _check(model: str) -> dict:
    source, name = model.split(":", 1) if ":" in model else ("timm", model)
    return _load_sweep().check(source, name, max_params=100.0, seconds=300)


def _assert_row(row: dict, pinned: tuple) -> None:
    status, blocks, expected = pinned
    assert (row["status"], row["blocks"], row["expected"]) == (status, blocks, expected), row
    if status == "ok":
        assert row["identity_standard"] <= 1e-5 and row["identity_post"] <= 1e-5, row


@pytest.mark.parametrize("model", sorted(SAMPLE))
def test_sample_model(model):
    _assert_row(_check(model), SAMPLE[model])


@pytest.mark.parametrize("model", sorted(HF_SAMPLE))
def test_sample_transformers_model(model):
    pytest.importorskip("transformers", reason="transformers is not installed (pip install .[coverage])")
    _assert_row(_check(model), HF_SAMPLE[model])


def test_sweep_module_does_not_shadow_coverage_py():
    """The sweep is loaded under its own name: ``import coverage`` still means coverage.py (pytest-cov)."""
    sweep = _load_sweep()
    assert sweep.__name__ == "se_retrofit_coverage_sweep"
    assert sys.modules.get("coverage") is not sweep
