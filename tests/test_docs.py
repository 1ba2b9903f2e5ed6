"""The examples in the public docstrings run and print what they say, and every example of the README
and docs/ runs offline as written."""
from __future__ import annotations

import doctest
import importlib
import os
import pkgutil
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import se_retrofit

from helpers import same_threads_env


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
@pytest.mark.slow
def test_docstring_examples_run(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE,
                             verbose=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed in {name}"


# --- the README and docs/: every runnable block runs offline, as written --------------------------------

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
#: a fenced block: ```LANG [run|norun]; indented blocks (inside a list item) count too
FENCE = re.compile(r"^(?P<indent>[ \t]*)```(?P<info>[^\n`]*)\n(?P<body>.*?)^(?P=indent)```[ \t]*$", re.M | re.S)
CODE_LANGUAGES = {"python", "bash", "console", "sh", "shell"}


def _blocks(page: Path) -> list[tuple[str, str, str, int]]:
    """(language, marker, code, line) of every fenced block of ``page``."""
    text = page.read_text()
    found = []
    for match in FENCE.finditer(text):
        words = match["info"].split()
        code = textwrap.dedent("".join(line[len(match["indent"]):] if line.startswith(match["indent"]) else line
                                       for line in match["body"].splitlines(keepends=True)))
        found.append((words[0] if words else "", words[1] if len(words) > 1 else "", code,
                      text.count("\n", 0, match.start()) + 1))
    return found


def test_every_code_block_of_the_docs_says_whether_it_runs():
    """A block of code is marked ``run`` (the test below runs it) or ``norun`` (it needs data, GPUs or an
    install): no example escapes the test by being left unmarked."""
    unmarked = [f"{page.relative_to(ROOT)}:{line} ```{language}" for page in PAGES
                for language, marker, _, line in _blocks(page)
                if (language in CODE_LANGUAGES or not language) and marker not in ("run", "norun")]
    assert unmarked == []
    runnable = {page.name for page in PAGES if any(m == "run" for _, m, _, _ in _blocks(page))}
    assert {"README.md", "python-api.md", "command-line.md", "fine-tuning.md"} <= runnable


def test_the_readme_is_a_front_page_whose_links_resolve():
    text = (ROOT / "README.md").read_text()
    assert text.count("\n") <= 200
    for page in PAGES:
        for target in re.findall(r"\]\(([^)#\s]+)\)", page.read_text()):
            if "://" not in target:
                assert (page.parent / target).exists(), f"{page.name} links to {target}, which does not exist"
    assert {p.name for p in PAGES} - {"README.md"} <= set(re.findall(r"docs/([\w-]+\.md)", text))


def _images(root: Path) -> None:
    """``root/images``: 3 class folders of 16 random 32-px PNGs (for the fine-tuning example)."""
    from PIL import Image
    import numpy as np

    rng = np.random.default_rng(0)
    for name in ("a", "b", "c"):
        (root / "images" / name).mkdir(parents=True)
        for i in range(16):
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(root / "images" / name / f"{i}.png")


@pytest.mark.slow
@pytest.mark.parametrize("page", [p for p in PAGES if any(m == "run" for _, m, _, _ in _blocks(p))],
                         ids=lambda p: p.name)
def test_the_runnable_blocks_of_a_page_run_offline(page, tmp_path):
    """The page's ``python run`` blocks run in order in one process (a page reads like a session), then
    each ``$ command`` of its ``console run`` blocks, in a fresh directory with no network access to
    the model hubs (the commands fall back to random weights with a warning, as a user offline sees)."""
    (tmp_path / "recipes").symlink_to(ROOT / "recipes")
    _images(tmp_path)
    env = {**same_threads_env(), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "COLUMNS": "120",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
           "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}
    blocks = _blocks(page)
    script = "\n\n".join(code for language, marker, code, _ in blocks if language == "python" and marker == "run")
    if script:
        done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=900)
        assert done.returncode == 0, f"{page.name}: python blocks failed:\n{done.stderr[-3000:]}"
    commands = [line[2:] for language, marker, code, _ in blocks if language == "console" and marker == "run"
                for line in code.splitlines() if line.startswith("$ ")]
    for command in commands:
        done = subprocess.run(["bash", "-c", command], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=900)
        assert done.returncode == 0 and "Traceback" not in done.stderr, \
            f"{page.name}: `{command}` failed ({done.returncode}):\n{done.stderr[-3000:]}"
    assert script or commands
