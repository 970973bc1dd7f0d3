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


def requirement(name: str):
    from packaging.requirements import Requirement

    lines = (REPO / "requirements.txt").read_text().splitlines()
    return next(Requirement(l.split("#")[0]) for l in lines if l.split("#")[0].strip() and Requirement(l.split("#")[0]).name == name)


def test_lower_bounds_admit_no_version_without_the_apis_we_use():
    """pydicom.pixels (apply_voi_lut, apply_modality_lut) arrived in pydicom 3.0; the encoders' Hugging Face
    repo_id, which build_model reads, and DiceLoss's smooth convention arrived in segmentation-models-pytorch 0.5."""
    assert "2.4.4" not in requirement("pydicom").specifier and "3.0.0" in requirement("pydicom").specifier
    smp_range = requirement("segmentation-models-pytorch").specifier
    assert "0.4.0" not in smp_range and "0.5.0" in smp_range
    import pydicom.pixels  # noqa: F401  (the API the decoder uses)
    import segmentation_models_pytorch as smp

    assert "repo_id" in smp.encoders.encoders["resnet34"]["pretrained_settings"]["imagenet"]


def test_installed_versions_satisfy_the_requirements():
    from importlib.metadata import version

    lines = [l.split("#")[0].strip() for l in (REPO / "requirements.txt").read_text().splitlines()]
    for line in filter(None, lines):
        req = requirement(re.split(r"[<>=!~]", line)[0])
        assert version(req.name) in req.specifier, f"{req.name} {version(req.name)} is outside {req.specifier}"


def test_every_cell_has_a_time_limit():
    makefile = (REPO / "Makefile").read_text()
    assert "--nbval-cell-timeout=" in makefile and "timeout=-1" not in makefile
    assert re.search(r"ExecutePreprocessor\.timeout=\d+", makefile)


def test_data_folder_tracks_only_its_readme():
    import subprocess

    tracked = subprocess.run(["git", "ls-files", "data"], cwd=REPO, capture_output=True, text=True).stdout.split()
    assert tracked == ["data/README.md"]
    ignored = subprocess.run(["git", "check-ignore", "-q", "data/chest-xray-masks-and-labels/x.png"], cwd=REPO)
    assert ignored.returncode == 0, "files under data/ must be ignored"
