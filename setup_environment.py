"""Install what the notebooks need and is missing, within the project's constraints (the setup cell's plumbing).

    python setup_environment.py          # what each chapter's setup cell runs
    python setup_environment.py --dry-run  # only print what it would install

It uses only the standard library, so it runs before anything is installed (on Colab, right
after the clone). For each package of ``requirements.txt`` that the notebooks import, it installs
the version pinned in ``constraints.txt`` when the package is missing, or when the installed
version lies outside ``requirements.txt``'s range; a preinstalled torch/torchvision inside the
range (Colab's) is kept. Works on Python 3.11 and 3.12. Prints one line saying what it did.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parent
# pip name -> import name, for the packages the notebooks import (tools such as pytest are left out).
NOTEBOOK_PACKAGES = {
    "torch": "torch", "torchvision": "torchvision", "segmentation-models-pytorch": "segmentation_models_pytorch",
    "albumentations": "albumentations", "opencv-python-headless": "cv2", "pillow": "PIL",
    "huggingface-hub": "huggingface_hub", "safetensors": "safetensors", "numpy": "numpy", "pandas": "pandas",
    "scipy": "scipy", "scikit-learn": "sklearn", "matplotlib": "matplotlib", "tqdm": "tqdm",
    "ipywidgets": "ipywidgets", "kagglehub": "kagglehub", "pydicom": "pydicom",
}
KEEP_IF_IN_RANGE = ("torch", "torchvision")


def read_pins(path: Path) -> dict[str, str]:
    """``name -> requirement text`` from a requirements or constraints file (comments dropped)."""
    pins = {}
    for line in path.read_text().splitlines():
        text = line.split("#")[0].strip()
        if text:
            name = re.split(r"[<>=!~ ;\[]", text, maxsplit=1)[0].lower()
            pins[name] = text
    return pins


def version_in_range(version: str, requirement: str) -> bool:
    """True when ``version`` satisfies ``requirement`` (packaging, or the copy that pip vendors)."""
    try:
        from packaging.requirements import Requirement
    except ImportError:
        from pip._vendor.packaging.requirements import Requirement

    return Requirement(requirement).specifier.contains(version, prereleases=True)


def installed_version(pip_name: str) -> str | None:
    """The installed version of a distribution, or None."""
    try:
        return importlib.metadata.version(pip_name)
    except importlib.metadata.PackageNotFoundError:
        return None


def plan(
    requirements: dict[str, str],
    find_spec: Callable[[str], object] = importlib.util.find_spec,
    version_of: Callable[[str], str | None] = installed_version,
) -> tuple[list[str], list[str]]:
    """What to install and what to keep: ``(to_install, kept)`` as pip names."""
    to_install, kept = [], []
    for pip_name, import_name in NOTEBOOK_PACKAGES.items():
        version = version_of(pip_name)
        if find_spec(import_name) is None or version is None:
            to_install.append(pip_name)
        elif not version_in_range(version, requirements[pip_name]):
            to_install.append(pip_name)
        elif pip_name in KEEP_IF_IN_RANGE:
            kept.append(f"{pip_name} {version}")
    return to_install, kept


def pip_command(to_install: list[str], constraints: Path, requirements: dict[str, str]) -> list[str]:
    """``pip install`` of the requirement ranges, pinned by ``constraints``."""
    return [sys.executable, "-m", "pip", "install", "-q", "-c", str(constraints), *(requirements[n] for n in to_install)]


def main(argv: list[str] | None = None) -> None:
    """Install what is missing; with ``--dry-run`` only print the pip command it would run."""
    dry_run = "--dry-run" in (sys.argv[1:] if argv is None else argv)
    requirements = read_pins(REPO / "requirements.txt")
    to_install, kept = plan(requirements)
    if to_install and dry_run:
        print("would run:", " ".join(pip_command(to_install, REPO / "constraints.txt", requirements)))
        return
    if to_install:
        pins = read_pins(REPO / "constraints.txt")
        kept_names = {entry.split()[0] for entry in kept}
        with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as constraints:
            constraints.write("\n".join(pin for name, pin in pins.items() if name not in kept_names) + "\n")
        subprocess.run(pip_command(to_install, Path(constraints.name), requirements), check=True)
    kept_note = f"; kept the preinstalled {', '.join(kept)}" if kept and to_install else ""
    print(f"installed now: {', '.join(to_install) or 'nothing (all present)'}{kept_note}")


if __name__ == "__main__":
    main()
