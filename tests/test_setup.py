"""The project's set-up files agree with each other."""
from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import yaml  # PyYAML comes with jupyter's dependencies

import setup_environment as S
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
    repo_id, which build_model reads, and DiceLoss's smooth convention arrived in segmentation-models-pytorch 0.5;
    scipy.stats.bootstrap's rng argument arrived in scipy 1.15."""
    assert "2.4.4" not in requirement("pydicom").specifier and "3.0.0" in requirement("pydicom").specifier
    smp_range = requirement("segmentation-models-pytorch").specifier
    assert "0.4.0" not in smp_range and "0.5.0" in smp_range
    import pydicom.pixels

    assert hasattr(pydicom.pixels, "apply_voi_lut") and hasattr(pydicom.pixels, "apply_modality_lut"), "the API the decoder uses"
    import segmentation_models_pytorch as smp

    assert "repo_id" in smp.encoders.encoders["resnet34"]["pretrained_settings"]["imagenet"]
    assert "1.14.1" not in requirement("scipy").specifier and "1.15.0" in requirement("scipy").specifier
    import inspect

    from scipy import stats

    assert "rng" in inspect.signature(stats.bootstrap).parameters


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


# ---------------------------------------------------------------- the setup cell's installer


def fake_environment(versions: dict[str, str]):
    """find_spec and version lookups for an environment holding exactly ``versions`` (pip names)."""
    by_import = {S.NOTEBOOK_PACKAGES[name]: version for name, version in versions.items()}
    return (lambda import_name: object() if import_name in by_import else None), versions.get


def all_pinned() -> dict[str, str]:
    pins = S.read_pins(REPO / "constraints.txt")
    return {name: pins[name].split("==")[1] for name in S.NOTEBOOK_PACKAGES}


def test_nothing_to_install_when_everything_is_there():
    requirements = S.read_pins(REPO / "requirements.txt")
    assert S.plan(requirements, *fake_environment(all_pinned())) == ([], ["torch 2.14.1", "torchvision 0.29.1"])


def test_missing_and_out_of_range_packages_are_installed_within_the_constraints():
    requirements = S.read_pins(REPO / "requirements.txt")
    versions = all_pinned()
    del versions["segmentation-models-pytorch"]
    versions["albumentations"] = "1.4.0"  # outside >=2.0,<2.1
    to_install, kept = S.plan(requirements, *fake_environment(versions))
    assert sorted(to_install) == ["albumentations", "segmentation-models-pytorch"] and kept == ["torch 2.14.1", "torchvision 0.29.1"]
    command = S.pip_command(to_install, REPO / "constraints.txt", requirements)
    assert command[:6] == [sys.executable, "-m", "pip", "install", "-q", "-c"] and "albumentations>=2.0,<2.1" in command


def test_colab_torch_is_kept_inside_the_range_and_replaced_outside_it():
    requirements = S.read_pins(REPO / "requirements.txt")
    colab = {**all_pinned(), "torch": "2.9.0+cu126", "torchvision": "0.24.0+cu126"}
    to_install, kept = S.plan(requirements, *fake_environment(colab))
    assert to_install == [] and kept == ["torch 2.9.0+cu126", "torchvision 0.24.0+cu126"]
    old = {**all_pinned(), "torch": "2.3.1", "torchvision": "0.18.1"}
    assert S.plan(requirements, *fake_environment(old))[0] == ["torch", "torchvision"]


def test_every_pin_satisfies_the_requirements_and_covers_the_notebook_packages():
    requirements = S.read_pins(REPO / "requirements.txt")
    pins = S.read_pins(REPO / "constraints.txt")
    assert set(requirements) <= set(pins), f"unpinned: {set(requirements) - set(pins)}"
    for name, requirement in requirements.items():
        assert S.version_in_range(pins[name].split("==")[1], requirement), pins[name]
    assert set(S.NOTEBOOK_PACKAGES) <= set(requirements)


def python_3_12() -> str | None:
    """A working Python 3.12 (Colab's version) on this machine, or None."""
    import shutil
    import subprocess

    candidates = [shutil.which("python3.12"), "/root/.pyenv/versions/3.12.1/bin/python3.12"]
    return next((c for c in candidates if c and Path(c).exists() and subprocess.run([c, "-V"], capture_output=True).returncode == 0), None)


PYTHON_3_12 = python_3_12()


@pytest.mark.parametrize("python, expected", [
    pytest.param([sys.executable], "installed now: nothing (all present)", id="this-python"),
    pytest.param([sys.executable, "-S"], "would run:", id="bare-python-without-site-packages"),
    pytest.param([PYTHON_3_12], ("would run:", "installed now:"), id="python-3.12",
                 marks=pytest.mark.skipif(PYTHON_3_12 is None, reason="no Python 3.12 (Colab's version) on this machine")),
])
def test_installer_dry_run_plans_without_installing(python, expected):
    """The setup cell's installer plans on this Python (everything present), on a bare one (everything missing:
    it names the pip command and runs nothing) and on Colab's Python 3.12 where there is one; a dry run stays offline."""
    import os
    import subprocess

    env = {**os.environ, "PIP_NO_INDEX": "1"}  # should pip ever be run, it cannot reach the network
    result = subprocess.run([*python, str(REPO / "setup_environment.py"), "--dry-run"], capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 1 and lines[0].startswith(expected), result.stdout
    if expected == "would run:":
        requirements = S.read_pins(REPO / "requirements.txt")
        assert f"-c {REPO / 'constraints.txt'}" in lines[0]
        assert all(requirements[name] in lines[0] for name in S.NOTEBOOK_PACKAGES), "a bare Python lacks every package"


def test_repository_address_is_the_same_everywhere():
    """Badges, setup cells and the README name one repository; each badge opens its own notebook."""
    import json

    addresses = set(re.findall(r"https://github\.com/([\w.-]+/[\w.-]+?)\.git", (REPO / "README.md").read_text()))
    notebooks = sorted((REPO / "notebooks").glob("[0-9]*.ipynb"))
    for notebook in notebooks:
        cells = json.loads(notebook.read_text())["cells"]
        badge = re.search(r"colab\.research\.google\.com/github/([\w.-]+/[\w.-]+)/blob/main/notebooks/([\w.-]+\.ipynb)", "".join(cells[0]["source"]))
        setup = re.search(r'os\.environ\.get\("LUNGSEG_REPO_URL", "https://github\.com/([\w.-]+/[\w.-]+?)\.git"\)', "".join(cells[1]["source"]))
        assert badge and setup, notebook.name
        assert badge.group(2) == notebook.name, f"{notebook.name}'s badge opens {badge.group(2)}"
        addresses |= {badge.group(1), setup.group(1)}
    assert len(notebooks) >= 5 and len(addresses) == 1, addresses


def test_stored_notebooks_read_cleanly():
    """No progress bar frozen at 0% (a tqdm widget's text fallback), no folder of the computer that ran it, no bulky widget state."""
    import json

    notebooks = sorted((REPO / "notebooks").glob("[0-9]*.ipynb"))
    assert notebooks, "no chapters found: the check below would pass on nothing"
    for notebook in notebooks:
        nb = json.loads(notebook.read_text())
        outputs = json.dumps([cell.get("outputs", []) for cell in nb["cells"]])
        assert not re.search(r"\b0%\|", outputs), f"{notebook.name}: a progress bar stuck at 0% is stored"
        folder = re.search(r"(/work/|/home/|/root/|/Users/|/tmp/|/content/|[A-Z]:\\\\Users)[^\"]{0,60}", outputs)
        assert not folder, f"{notebook.name}: an output shows a folder of the computer that ran it: {folder.group(0)}"
        state = len(json.dumps(nb["metadata"].get("widgets", {})))
        assert state < 100_000, f"{notebook.name}: {state / 1e3:.0f} kB of widget state"


def test_stored_notebooks_are_complete_executed_runs():
    """Every code cell has run (an execution count), and no draft marker is left in any cell."""
    import json

    notebooks = sorted((REPO / "notebooks").glob("[0-9]*.ipynb"))
    assert notebooks, "no chapters found: the check below would pass on nothing"
    for notebook in notebooks:
        cells = json.loads(notebook.read_text())["cells"]
        text = "\n".join("".join(cell["source"]) for cell in cells)
        for marker in ("PLACEHOLDER", "REVIEW AFTER FULL RUN"):
            assert marker not in text, f"{notebook.name}: draft marker {marker!r} left"
        unexecuted = [i for i, cell in enumerate(cells) if cell["cell_type"] == "code" and cell.get("execution_count") is None]
        assert not unexecuted, f"{notebook.name}: code cells {unexecuted} were never executed"


def test_links_between_chapters_and_files_lead_somewhere():
    """Every relative link in the notebooks' markdown and in the README points to a file that exists."""
    import json

    sources = {REPO / "README.md": (REPO / "README.md").read_text()}
    for notebook in sorted((REPO / "notebooks").glob("[0-9]*.ipynb")):
        cells = json.loads(notebook.read_text())["cells"]
        sources[notebook] = "\n".join("".join(cell["source"]) for cell in cells if cell["cell_type"] == "markdown")
    for path, text in sources.items():
        for target in re.findall(r"\]\(([^)\s#]+)(?:#[^)]*)?\)", text):
            if re.match(r"[a-z]+:", target):
                continue  # a web address
            assert (path.parent / target).exists(), f"{path.name} links to {target}, which does not exist"
