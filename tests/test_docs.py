"""The examples in the public docstrings run and print what they say."""
from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import se_retrofit


def _modules_with_examples() -> list[str]:
    names = ["se_retrofit"] + [m.name for m in pkgutil.walk_packages(se_retrofit.__path__, "se_retrofit.")]
    found = []
    for name in sorted(names):
        if name.endswith("__main__"):
            continue
        tests = doctest.DocTestFinder(exclude_empty=True).find(importlib.import_module(name))
        if any(t.examples for t in tests):
            found.append(name)
    return found


MODULES = _modules_with_examples()


def test_the_public_modules_have_examples():
    assert {"se_retrofit", "se_retrofit.core", "se_retrofit.io", "se_retrofit.training"} <= set(MODULES)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE,
                             verbose=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed in {name}"
