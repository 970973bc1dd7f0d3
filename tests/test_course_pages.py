"""The course pages (README, the chapters' prose, the modules' docstrings) say what is true now, in a learner's words.

The history of runs, the screens and their evidence belong to the lab log, benchmarks/README.md.
"""
from __future__ import annotations

import ast
import json
import re

import pytest

from conftest import REPO

PROCESS_WORDS = re.compile(
    r"\b(issues?|targets?|sessions?|lent|no internet|the machine that made this page|"
    r"previous (?:run|model|stored run)|earlier runs?)\b",
    re.IGNORECASE,
)
DOCSTRING_WORDS = re.compile(r"\b(issues?|sessions?|lent|no internet)\b|results/|benchmarks/", re.IGNORECASE)
CHAPTERS = sorted((REPO / "notebooks").glob("[0-9]*.ipynb"))


def offending(text: str, pattern: re.Pattern) -> list[str]:
    """Each match of ``pattern`` with a little context, for the failure message."""
    return [text[max(0, m.start() - 40): m.end() + 40].replace("\n", " ") for m in pattern.finditer(text)]


def test_the_readme_has_no_process_words_or_history():
    assert not offending((REPO / "README.md").read_text(), PROCESS_WORDS)


@pytest.mark.parametrize("chapter", CHAPTERS, ids=lambda path: path.stem)
def test_a_chapters_prose_has_no_process_words_or_history(chapter):
    cells = json.loads(chapter.read_text())["cells"]
    prose = "\n".join("".join(cell["source"]) for cell in cells if cell["cell_type"] == "markdown")
    assert not offending(prose, PROCESS_WORDS)


@pytest.mark.parametrize("chapter", CHAPTERS, ids=lambda path: path.stem)
def test_a_chapter_has_one_run_time_line(chapter):
    cells = json.loads(chapter.read_text())["cells"]
    prose = "\n".join("".join(cell["source"]) for cell in cells if cell["cell_type"] == "markdown")
    assert len(re.findall(r"\*\*Stored run\*\*:", prose)) == 1


@pytest.mark.parametrize("module", ["lungseg_utils.py", "lungseg_io.py"])
def test_docstrings_have_no_issue_numbers_result_folders_or_history(module):
    tree = ast.parse((REPO / module).read_text())
    nodes = [tree] + [node for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.ClassDef))]
    found = {getattr(node, "name", module): offending(ast.get_docstring(node) or "", DOCSTRING_WORDS) for node in nodes}
    assert not {name: hits for name, hits in found.items() if hits}


def test_the_lab_log_exists_and_the_readme_links_to_it():
    assert (REPO / "benchmarks" / "README.md").is_file()
    assert "benchmarks/README.md" in (REPO / "README.md").read_text()
