"""The project's set-up files agree with each other."""
from __future__ import annotations

import re

import yaml  # PyYAML comes with jupyter's dependencies

from conftest import REPO


def requirement_lines(lines):
    return sorted(line.split("#")[0].strip().replace(" ", "") for line in lines if line.split("#")[0].strip())


def test_environment_yml_matches_requirements():
    env = yaml.safe_load((REPO / "environment.yml").read_text())
    assert "python=3.11" in env["dependencies"]
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    assert requirement_lines(pip_section) == requirement_lines((REPO / "requirements.txt").read_text().splitlines())


def test_torch_range_admits_2_14_1():
    from packaging.specifiers import SpecifierSet

    line = next(l for l in (REPO / "requirements.txt").read_text().splitlines() if l.startswith("torch") and not l.startswith("torchvision"))
    assert "2.14.1" in SpecifierSet(line.removeprefix("torch"))


def test_ci_runs_the_readme_test_command():
    readme = (REPO / "README.md").read_text()
    ci = (REPO / ".ci" / "run").read_text()
    command = re.search(r"Run the tests:?\s*```(?:bash|sh)?\n(.+?)\n```", readme, re.S).group(1).strip()
    assert command == "make test"
    assert re.search(r"^make test$", ci, re.M)
    assert "LUNGSEG_DATA_DIR" in ci and "LUNGSEG_QUICK=1" in ci


def test_no_data_or_checkpoints_are_tracked():
    import subprocess

    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True).stdout.split()
    bad = [f for f in tracked if f.endswith((".npy", ".npz", ".pt", ".pth", ".zip", ".dcm")) or (f.endswith(".png") and not f.startswith("docs/"))]
    assert not bad, f"data or checkpoints tracked: {bad}"
