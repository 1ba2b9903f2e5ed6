"""Bad inputs end cleanly: benchmarks/bad_inputs.py's checks on a fast subset of its cases (the whole
table: PYTHONPATH=$PWD python benchmarks/bad_inputs.py), and the Python API's own bad inputs."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import timm

import se_retrofit
from se_retrofit.planning import BlockPatternError

ROOT = Path(__file__).resolve().parents[1]
SUBSET = ("unknown model", "--exclude '*' (nothing left)", "--input-size 3,100000,100000 (out of memory)",
          "--out under a file", "--out under a read-only directory", "--out . --overwrite",
          "--overwrite of a plain file", "a directory as --weights",
          "registered type whose init_identity is not an identity",
          "finetune: model_kwargs.checkpoint_path (a pickle past the reader)")


def _script():
    spec = importlib.util.spec_from_file_location("bad_inputs_benchmark", ROOT / "benchmarks" / "bad_inputs.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_the_script_has_at_least_40_cases_and_the_subset_exists():
    cases = _script().cases()
    names = [c.name for c in cases]
    assert len(cases) >= 40 and len(set(names)) == len(names)
    assert set(SUBSET) <= set(names)


@pytest.mark.slow
def test_a_fast_subset_ends_cleanly(tmp_path):
    script = _script()
    chosen = [c for c in script.cases() if c.name in SUBSET]
    import concurrent.futures

    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        outcomes = list(pool.map(script.run_case, chosen))
    table = script.markdown(outcomes)
    print(table)
    assert [o.case.name for o in outcomes if not o.ok] == [], table
    assert all(o.codes == [2] and len(o.lines) == 1 for o in outcomes)


def test_the_checks_catch_a_leftover_file_and_a_traceback():
    script = _script()
    case = script.Case("x", ())
    outcome = script.Outcome(case, [1], [])
    script._check_one(outcome, (1, "", "Traceback (most recent call last):\n  boom\n"), {}, {"left.txt": ("file", 1, 1)})
    assert outcome.problems == ["exit code 1, expected 2", "2 lines on stderr", "'Traceback' on stderr",
                                "left left.txt"]


# --- the Python API ---------------------------------------------------------------------------------

def test_a_string_blocks_is_one_pattern_not_its_characters():
    base = timm.create_model("resnet18")
    one = se_retrofit.retrofit(base, blocks="layer3.*")
    listed = se_retrofit.retrofit(base, blocks=["layer3.*"])
    sites = [s.block for s in se_retrofit.record_of(one).sites]
    assert sites == ["layer3.0", "layer3.1"] == [s.block for s in se_retrofit.record_of(listed).sites]
    excluded = se_retrofit.retrofit(base, exclude="layer1.*")
    assert [s.block for s in se_retrofit.record_of(excluded).sites][0] == "layer2.0"


def test_a_selection_that_leaves_no_block_says_which_options():
    with pytest.raises(BlockPatternError, match=r"exclude=\['\*'\] leave none of the 8 residual blocks "
                                                r"\(layer1.0 … layer4.1\) to edit"):
        se_retrofit.plan(timm.create_model("resnet18"), exclude=["*"])
