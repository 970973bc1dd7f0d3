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


def prose_of(chapter) -> str:
    """A chapter's markdown cells, joined."""
    cells = json.loads(chapter.read_text())["cells"]
    return "\n".join("".join(cell["source"]) for cell in cells if cell["cell_type"] == "markdown")


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_every_link_into_the_glossary_names_one_of_its_terms():
    glossary = (REPO / "GLOSSARY.md").read_text()
    anchors = {github_anchor(line.lstrip("#")) for line in glossary.splitlines() if line.startswith("#")}
    pages = {"README.md": (REPO / "README.md").read_text(), **{path.name: prose_of(path) for path in CHAPTERS}}
    links = {(name, anchor) for name, text in pages.items() for anchor in re.findall(r"GLOSSARY\.md#([\w-]+)", text)}
    assert links, "no chapter links to the glossary"
    assert not {(name, anchor) for name, anchor in links if anchor not in anchors}


QUESTIONNAIRE_CHAPTERS = CHAPTERS


@pytest.mark.parametrize("chapter", QUESTIONNAIRE_CHAPTERS, ids=lambda path: path.stem)
def test_a_chapter_asks_questions_with_answers_then_exercises_marked_by_difficulty_and_cost(chapter):
    prose = prose_of(chapter)
    assert "## Check your understanding" in prose and "## Exercises" in prose
    questions = prose.split("## Check your understanding", 1)[1].split("## Exercises", 1)[0]
    exercises = prose.split("## Exercises", 1)[1].split("## References", 1)[0]
    asked = re.findall(r"^\d+\. ", questions, re.MULTILINE)
    assert 10 <= len(asked) <= 15
    assert questions.count("<details><summary>Answer</summary>") == len(asked)
    marks = re.findall(r"^\d+\. \*\*(★{1,3}) · ([^*]+?)\.\*\*", exercises, re.MULTILINE)
    assert len(marks) == len(re.findall(r"^\d+\. ", exercises, re.MULTILINE)) >= 4
    cheap = [cost for _, cost in marks if cost.startswith("CPU") and re.search(r"second|minute|\bmin\b", cost) and " h" not in cost]
    assert len(cheap) >= 2, marks
