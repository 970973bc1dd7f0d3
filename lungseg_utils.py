"""lungseg_utils: every helper the lungseg notebooks share, in one module.

Each chapter of the tutorial introduces some of these helpers and shows their
source with ``inspect.getsource``; later chapters simply import them. The
module is also a small command-line tool::

    python lungseg_utils.py download            # fetch the public data sets
    python lungseg_utils.py train --out runs/x  # train a U-Net/ResNet34
    python lungseg_utils.py predict IMAGE... --checkpoint runs/x/best.pt --out masks/

Sections, in order:

1. Errors: ``LungsegError`` and its kinds; every message names the file and the fix.
2. Run mode and reproducibility: quick mode, seeding, device and mixed precision.
3. Data location and download: ``find_data_dir``, ``download_*``, ``safe_extract``.
4. Pairing images with masks: ``build_pairs_table``; ``anatomy_landmarks`` for chapter 01's figure.
5. Splits: ``three_way_split``, ``writeup_split``, ``quick_subset``.
6. Decoding images and masks: ``decode_image`` (the one decoder), ``read_mask``.
7. Cache: decode and resize once (``load_arrays``).
8. Dataset and augmentation: ``train_transforms`` (with ``SimulatedOpacity``), ``equalize_contrast``, ``LungDataset``.
9. Model: ``build_model`` with ImageNet, local or no weights.
10. Loss: ``DiceBCELoss``.
11. Metrics: Dice, IoU, HD95, the write-up's batch Dice.
12. Training and checkpoints: ``TrainConfig``, ``train``, ``save_checkpoint``, ``load_checkpoint``.
13. Inference and figures: ``predict``, plausibility warnings (``mask_warnings``), overlays and ``error_legend``, the upload app.
14. Evaluation: ``evaluate``, ``error_zones``, ``summarize_scores``, ``paired_difference`` (BCa bootstrap).
15. Robustness: acquisition shifts and simulated opacities (``apply_shift``, ``shift_benchmark``).
16. Command line.

Conventions used throughout:

* images are 8-bit grayscale ``uint8`` arrays of shape ``(H, W)``;
* masks are ``uint8`` arrays holding 0 (background) and 1 (lung);
* model inputs are ``float32`` tensors ``(B, 3, H, W)``: the grayscale image
  repeated on three channels and normalized with the ImageNet mean and std,
  because the ResNet encoder was designed (and, where weights can be had,
  pre-trained) for ImageNet's RGB statistics.
"""
from __future__ import annotations

import argparse
import atexit
import concurrent.futures
import contextlib
import hashlib
import io
import math
import os
import pickle
import platform
import random
import shutil
import socket
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import warnings
import zipfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import albumentations as A  # noqa: E402
import cv2  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import segmentation_models_pytorch as smp  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image, ImageOps, UnidentifiedImageError  # noqa: E402
from scipy import ndimage, stats  # noqa: E402
from sklearn.model_selection import train_test_split  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402

if os.environ.get("TQDM_DISABLE", "").strip().lower() in {"1", "true", "yes"}:
    # Stored runs (make run) and CI: no bars. The notebook bars of tqdm.auto ignore TQDM_DISABLE and would
    # leave a "0%" text line and their widget state in the saved notebook; plain tqdm honours it.
    from tqdm import tqdm  # noqa: E402
else:
    from tqdm.auto import tqdm  # noqa: E402

REPO_DIR = Path(__file__).resolve().parent
DATASET_FOLDER = "Lung Segmentation"
KAGGLE_DATASET = "nikhilpandey360/chest-xray-masks-and-labels"
# The NLM Montgomery County set, tried in this order (both addresses appear in public scripts).
MONTGOMERY_URLS = (
    "https://data.lhncbc.nlm.nih.gov/public/Tuberculosis-Chest-X-ray-Datasets/"
    "Montgomery-County-CXR-Set/MontgomerySet/MontgomerySet.zip",
    "https://data.lhncbc.nlm.nih.gov/public/Tuberculosis-Chest-X-ray-Datasets/"
    "Montgomery-County-CXR-Set/MontgomerySet.zip",
)
# Size and SHA-256 of MontgomerySet.zip: not recorded yet. NLM publishes no checksum that we
# could find, and the machine that wrote this has no internet access. Until they are filled in,
# the archive is checked by its content instead (138 X-rays, each with a left and a right mask);
# `python lungseg_utils.py download --montgomery` prints both values for recording here.
MONTGOMERY_ARCHIVE_SIZE: int | None = None
MONTGOMERY_ARCHIVE_SHA256: str | None = None
MONTGOMERY_IMAGES = 138
MAX_ARCHIVE_BYTES = 4 * 2**30  # refuse archives that would unpack to more than 4 GiB (zip bombs)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SEED = 42
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
DICOM_SUFFIXES = (".dcm", ".dicom")
DEFAULT_MAX_MEGAPIXELS = 60.0  # a Montgomery original is 19.7 megapixels; override with LUNGSEG_MAX_MEGAPIXELS
MIN_IMAGE_SIDE = 32

DATA_HELP = (
    "Get the data in one of these ways:\n"
    "  * run `python lungseg_utils.py download` (needs internet; uses kagglehub for the\n"
    "    Kaggle 'Chest X-Ray Masks and Labels' set, with your Kaggle API token: the file\n"
    "    ~/.kaggle/kaggle.json, or KAGGLE_USERNAME and KAGGLE_KEY in the environment, or on\n"
    "    Colab both names as secrets in the key panel), or\n"
    "  * run `python lungseg_utils.py download --montgomery` for the NLM Montgomery set alone\n"
    "    (138 X-rays, no credentials needed), or\n"
    "  * download https://www.kaggle.com/datasets/" + KAGGLE_DATASET + " by hand and unzip it, then\n"
    "  * point the environment variable LUNGSEG_DATA_DIR at the folder that holds\n"
    "    'Lung Segmentation/' (or at that folder itself), or put it under data/ in the repository."
)


# --------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------


class LungsegError(Exception):
    """A problem the user can fix; the message names the file and what to do."""


class LungsegDataError(LungsegError, ValueError):
    """Bad or missing input data: images, masks, data folders, archives."""


class LungsegCheckpointError(LungsegError, ValueError):
    """A checkpoint that is missing, damaged, unsafe or of another model."""


# --------------------------------------------------------------------------
# Run mode and reproducibility
# --------------------------------------------------------------------------


def is_quick_mode() -> bool:
    """True when ``LUNGSEG_QUICK`` is set to 1/true/yes (CI runs the notebooks this way)."""
    return os.environ.get("LUNGSEG_QUICK", "").strip().lower() in {"1", "true", "yes", "on"}


@dataclass
class RunConfig:
    """The settings that differ between a full run and the quick CI run."""

    image_size: int = 256
    epochs: int = 20
    max_images: int | None = None  # None: every labeled image
    batch_size: int = 8
    patience: int = 5

    @classmethod
    def for_mode(cls, quick: bool | None = None) -> "RunConfig":
        """Full settings, or a small subset at 128 px for 2 epochs in quick mode."""
        quick = is_quick_mode() if quick is None else quick
        return cls(image_size=128, epochs=2, max_images=80) if quick else cls()


def setup_notebook(seed: int = SEED) -> None:
    """Notebook defaults: seeded RNGs, short warnings (no file paths), readable figures."""
    import matplotlib.pyplot as plt

    seed_everything(seed)
    warnings.formatwarning = lambda message, category, *args, **kwargs: f"{category.__name__}: {message}\n"
    plt.rcParams.update({"figure.dpi": 90, "axes.grid": False, "image.cmap": "gray"})


def seed_everything(seed: int = SEED) -> None:
    """Seed Python, NumPy and torch (CPU and GPU) so that runs repeat.

    Albumentations keeps its own generator: :func:`train` seeds it each epoch
    with ``Compose.set_random_seed`` (and :func:`seed_worker` in DataLoader workers).
    On a GPU it also makes cuDNN choose deterministic convolution algorithms
    and stop benchmarking them: repeatable runs, at a cost of a few percent of
    speed (cuDNN's autotuner would otherwise pick the fastest kernel per shape,
    and the pick can differ between runs). A few CUDA kernels use atomic
    additions, so GPU runs can still differ in the last digits.
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True


def library_versions() -> dict[str, str]:
    """Python and the versions of the libraries a run depends on (printed by chapters, stored in checkpoints)."""
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "segmentation_models_pytorch": smp.__version__,
        "albumentations": A.__version__,
        "numpy": np.__version__,
    }


def print_config(device: torch.device | None = None) -> None:
    """Print the versions and the device a chapter runs with (in the spirit of MONAI's ``print_config``)."""
    device = device or pick_device()
    versions = library_versions()
    print(" | ".join(f"{name} {version}" for name, version in versions.items()))
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"{cpu_model_name()}, {torch.get_num_threads()} threads"
    print(f"device: {device} ({name}), mixed precision: {autocast_dtype(device) or 'none (fp32)'}")


def cpu_model_name(cpuinfo: str | os.PathLike = "/proc/cpuinfo") -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux, else what Python's platform module knows)."""
    try:
        for line in Path(cpuinfo).read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def pick_device(preferred: str | None = None) -> torch.device:
    """Return ``preferred`` if given, else the best available of cuda, mps and cpu."""
    if preferred:
        return torch.device(preferred)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The mixed-precision dtype for ``device``, or None for fp32.

    CUDA: bf16 from compute capability 8.0 (Ampere) on; below it (T4, V100) fp16,
    which :func:`train` pairs with a GradScaler. ``torch.cuda.is_bf16_supported()``
    is not used: it reports True on older GPUs, which only emulate bf16.
    CPU: bf16 only where it is native (:func:`cpu_has_native_bf16`), else fp32.
    Apple MPS: fp32 (its autocast covers fewer operations; not measured here).
    """
    if device.type == "cuda":
        major, _ = torch.cuda.get_device_capability(device)
        return torch.bfloat16 if major >= 8 else torch.float16
    if device.type == "cpu" and cpu_has_native_bf16():
        return torch.bfloat16
    return None


def cpu_has_native_bf16(cpuinfo: str | os.PathLike = "/proc/cpuinfo") -> bool:
    """True when the CPU executes bf16 natively: x86 AVX512-BF16 or AMX-BF16 (read from /proc/cpuinfo).

    Elsewhere bf16 is emulated and slow: on an AVX2-only 2-core EPYC a training
    step ran 12x slower in bf16 autocast than in fp32 (0.13 against 1.53 images/s,
    ``benchmarks/cpu_precision.py``, log in ``results/cpu-precision/``).
    Where /proc/cpuinfo does not exist (macOS, Windows) this says False: fp32.
    """
    try:
        flags = set(Path(cpuinfo).read_text().split())
    except OSError:
        return False
    return bool(flags & {"avx512_bf16", "amx_bf16"})


# --------------------------------------------------------------------------
# Data location and download
# --------------------------------------------------------------------------


def _dataset_candidates(root: Path) -> list[Path]:
    """Folders under ``root`` (one level down) that hold a non-empty ``CXR_png/``; hidden ones are skipped."""
    candidates = [root / DATASET_FOLDER, root / "MontgomerySet"]
    candidates += sorted(p / DATASET_FOLDER for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    found: dict[Path, Path] = {}
    for candidate in candidates:
        if _has_images(candidate):
            found.setdefault(candidate.resolve(), candidate)
    return list(found.values())


def _has_images(folder: Path) -> bool:
    """True when ``folder/CXR_png`` exists and holds at least one file."""
    images = folder / "CXR_png"
    return images.is_dir() and any(images.iterdir())


_announced_choices: set[Path] = set()


def find_data_dir(path: str | os.PathLike | None = None) -> Path:
    """Return the folder that holds ``CXR_png/`` (and ``masks/`` or ``ManualMask/``).

    ``path`` defaults to ``$LUNGSEG_DATA_DIR``, else ``data/`` in the repository.
    It may be the folder that holds ``Lung Segmentation/``, that folder itself,
    or a folder holding the NLM ``MontgomerySet/`` layout. When it holds both the
    Kaggle set and the NLM Montgomery set, the Kaggle set is used (it already
    contains the 138 Montgomery images) and the choice is printed once; two
    Kaggle-layout sets raise, naming both. A missing or empty folder raises
    :class:`LungsegDataError` explaining how to get the data.
    """
    if path is None:
        path = os.environ.get("LUNGSEG_DATA_DIR") or REPO_DIR / "data"
    root = Path(path).expanduser()
    if not root.is_dir():
        raise LungsegDataError(f"Data folder not found: {root}\n{DATA_HELP}")
    if _has_images(root):
        return root
    found = _dataset_candidates(root)
    kaggle = [folder for folder in found if (folder / "masks").is_dir()]
    others = [folder for folder in found if folder not in kaggle]
    if len(kaggle) > 1:
        raise LungsegDataError(
            f"{root} holds two Kaggle-layout data sets: {kaggle[0]} and {kaggle[1]}. Keep one, or set "
            "LUNGSEG_DATA_DIR to the one you want."
        )
    if kaggle:
        chosen = kaggle[0]
        if others and chosen not in _announced_choices:
            _announced_choices.add(chosen)
            print(f"Data: using the Kaggle set {chosen} (it includes the Montgomery images); "
                  f"not using {', '.join(str(o) for o in others)}. Set LUNGSEG_DATA_DIR to choose another.")
        return chosen
    if others:
        return others[0]
    raise LungsegDataError(
        f"No chest X-rays found in {root}: expected a 'CXR_png/' folder with images in it "
        f"or in '{DATASET_FOLDER}/' below it.\n{DATA_HELP}"
    )


def _check_archive_members(archive: Path, members: list[zipfile.ZipInfo], target: Path, max_bytes: int) -> None:
    """Refuse absolute paths, ``..``, links and archives that would unpack to more than ``max_bytes``.

    The declared sizes bound what is written: :mod:`zipfile` stops at a member's
    declared size and fails its CRC check if the data goes on.
    """
    for member in members:
        name = member.filename
        is_link = (member.external_attr >> 16) & 0o170000 == 0o120000
        destination = (target / name).resolve()
        if (
            name.startswith(("/", "\\"))
            or ":" in name.split("/")[0]
            or ".." in Path(name.replace("\\", "/")).parts
            or is_link
            or not destination.is_relative_to(target)
        ):
            raise LungsegDataError(
                f"Refusing to extract {archive}: member {name!r} would land outside "
                f"{target} or is a link. Download the archive again from its official source."
            )
    total = sum(member.file_size for member in members)
    if total > max_bytes:
        raise LungsegDataError(
            f"Refusing to extract {archive}: it would unpack to {total / 2**30:.1f} GiB, over the cap of "
            f"{max_bytes / 2**30:.1f} GiB (a zip bomb or the wrong file). Download it again from its official source."
        )


def safe_extract(archive: str | os.PathLike, target: str | os.PathLike, max_bytes: int = MAX_ARCHIVE_BYTES) -> list[Path]:
    """Extract a zip archive inside ``target`` only, all or nothing.

    Every member is checked first (no absolute paths, ``..`` or links; at most
    ``max_bytes`` in total). The archive is unpacked into a hidden temporary
    folder inside ``target`` and each top-level entry is renamed into place only
    when everything is written, so an interrupted extraction never looks
    complete; leftovers of a killed run are removed by the next call. An entry
    that already exists in ``target`` is never overwritten. Returns the files.
    """
    archive, target = Path(archive), Path(target).resolve()
    target.mkdir(parents=True, exist_ok=True)
    for stale in target.glob(".extracting-*"):
        shutil.rmtree(stale, ignore_errors=True)
    try:
        zf = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError) as error:
        raise LungsegDataError(f"{archive}: not a readable zip archive ({error}). Download it again.") from error
    staging = Path(tempfile.mkdtemp(prefix=".extracting-", dir=target))
    try:
        with zf:
            members = zf.infolist()
            _check_archive_members(archive, members, staging.resolve(), max_bytes)
            try:
                zf.extractall(staging, members)
            except (zipfile.BadZipFile, EOFError, zlib.error) as error:
                raise LungsegDataError(f"{archive}: the archive is damaged ({error}). Download it again.") from error
        tops = sorted({Path(m.filename).parts[0] for m in members})
        clashes = [name for name in tops if (target / name).exists()]
        if clashes:
            raise LungsegDataError(
                f"Not extracting {archive}: {target / clashes[0]} already exists and is never overwritten. "
                "Move it away first if you want a fresh copy."
            )
        for name in tops:
            os.replace(staging / name, target / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return [target / m.filename for m in members if not m.is_dir()]


def download_file(
    url: str,
    destination: str | os.PathLike,
    expected_size: int | None = None,
    sha256: str | None = None,
    timeout: float = 30.0,
) -> Path:
    """Download ``url`` to ``destination`` (skipped when already there and valid).

    The file is written to ``<destination>.part`` and renamed only when complete
    and, where known, of the expected size and SHA-256. A file that fails the
    check is deleted, so the next call downloads it again.
    """
    destination = Path(destination)
    if destination.is_file():
        if _file_matches(destination, expected_size, sha256):
            return destination
        destination.unlink()
    destination.parent.mkdir(parents=True, exist_ok=True)
    partial = destination.with_name(destination.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(partial, "wb") as out:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=destination.name) as bar:
                while chunk := response.read(1 << 20):
                    out.write(chunk)
                    bar.update(len(chunk))
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    if not _file_matches(partial, expected_size, sha256):
        actual = partial.stat().st_size
        partial.unlink()
        raise LungsegDataError(
            f"Download of {url} is incomplete or corrupt ({actual:,d} bytes; expected "
            f"{'%s bytes' % format(expected_size, ',d') if expected_size is not None else 'any size'}"
            f"{' and a known SHA-256' if sha256 else ''}). The file was deleted; run the download again."
        )
    os.replace(partial, destination)
    return destination


def sha256_of(path: str | os.PathLike) -> str:
    """The SHA-256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _file_matches(path: Path, expected_size: int | None, sha256: str | None) -> bool:
    """True when ``path`` has the expected size and SHA-256 (each checked only when given)."""
    if expected_size is not None and path.stat().st_size != expected_size:
        return False
    return sha256 is None or sha256_of(path) == sha256.lower()


def _check_montgomery_set(set_dir: Path, expected_images: int | None) -> None:
    """Raise unless ``set_dir`` holds X-rays, each with a left and a right mask (and, if given, that many)."""
    images = sorted(p.name for p in (set_dir / "CXR_png").glob("*.png")) if (set_dir / "CXR_png").is_dir() else []
    masks = [set_dir / "ManualMask" / side / name for name in images for side in ("leftMask", "rightMask")]
    missing = [m for m in masks if not m.is_file()]
    if not images or missing or (expected_images is not None and len(images) != expected_images):
        raise LungsegDataError(
            f"{set_dir}: the archive does not hold the Montgomery set as published ({len(images)} X-rays"
            f"{f', expected {expected_images}' if expected_images else ''}; {len(missing)} masks missing)."
        )


def download_montgomery(
    target: str | os.PathLike | None = None,
    urls: Sequence[str] = MONTGOMERY_URLS,
    expected_size: int | None = MONTGOMERY_ARCHIVE_SIZE,
    sha256: str | None = MONTGOMERY_ARCHIVE_SHA256,
    expected_images: int | None = MONTGOMERY_IMAGES,
    timeout: float = 30.0,
) -> Path:
    """Download, check and unpack the NLM Montgomery County set (public, no credentials).

    Returns the ``MontgomerySet`` folder; nothing is downloaded when it is present.
    The archive is checked against ``expected_size`` and ``sha256`` where recorded
    and always by its content; an archive that fails a check is deleted (the next
    call downloads it again) and the message says so. Its masks come as
    ``ManualMask/leftMask`` and ``rightMask``; :func:`build_pairs_table` combines them.
    """
    target = Path(target or REPO_DIR / "data")
    set_dir = target / "MontgomerySet"
    if _has_images(set_dir):
        return set_dir
    if set_dir.exists():
        raise LungsegDataError(f"{set_dir} exists but holds no X-rays in CXR_png/. Move it away, then download again.")
    archive, failures = None, []
    for url in urls:
        try:
            archive = download_file(url, target / "MontgomerySet.zip", expected_size, sha256, timeout)
            break
        except (urllib.error.URLError, OSError) as error:
            failures.append(f"{url}: {error}")
    if archive is None:
        raise LungsegDataError("Could not download the Montgomery set:\n  " + "\n  ".join(failures))
    print(f"{archive.name}: {archive.stat().st_size:,d} bytes, SHA-256 {sha256_of(archive)}")
    try:
        safe_extract(archive, target)
        _check_montgomery_set(set_dir, expected_images)
    except LungsegDataError as error:
        archive.unlink(missing_ok=True)
        if set_dir.exists():  # written just now by safe_extract, and incomplete
            shutil.rmtree(set_dir)
        raise LungsegDataError(f"{error}\nThe archive was deleted; run the download again.") from error
    archive.unlink()
    return set_dir


def download_kaggle(target: str | os.PathLike | None = None) -> Path:
    """Download the Kaggle 'Chest X-Ray Masks and Labels' set with ``kagglehub``.

    Skipped when ``target`` already holds the data. kagglehub keeps its own cache;
    ``target/chest-xray-masks-and-labels`` is made a link to it (a copy where links
    are not allowed). Returns the folder that holds ``CXR_png/``.
    """
    target = Path(target or REPO_DIR / "data")
    with contextlib.suppress(LungsegDataError):
        return find_data_dir(target)
    try:
        import kagglehub

        downloaded = Path(kagglehub.dataset_download(KAGGLE_DATASET))
    except Exception as error:  # no internet, no credentials, no kagglehub, ...
        raise LungsegDataError(f"Download from Kaggle failed ({type(error).__name__}: {error}).\n{DATA_HELP}") from error
    link = target / "chest-xray-masks-and-labels"
    target.mkdir(parents=True, exist_ok=True)
    if not link.exists():
        try:
            link.symlink_to(downloaded, target_is_directory=True)
        except OSError:
            shutil.copytree(downloaded, link)
    return find_data_dir(link)


def ensure_data(path: str | os.PathLike | None = None, **montgomery_options) -> Path:
    """Find the data (see :func:`find_data_dir`); if it is missing, download it.

    First the Kaggle set (it needs Kaggle credentials, see :data:`DATA_HELP`);
    if that fails, the NLM Montgomery set alone (138 X-rays of one hospital, no
    credentials; ``montgomery_options`` go to :func:`download_montgomery`). Each
    step is printed; :func:`describe_data` says which data a chapter ran on.
    """
    target = Path(path or os.environ.get("LUNGSEG_DATA_DIR") or REPO_DIR / "data").expanduser()
    try:
        return find_data_dir(target)
    except LungsegDataError:
        print(f"No data in {target}: downloading the Kaggle set ...")
    try:
        return download_kaggle(target)
    except LungsegDataError as kaggle_failure:
        reason = str(kaggle_failure).splitlines()[0]
        print(f"{reason}\nDownloading the NLM Montgomery set instead (138 X-rays, one hospital, no credentials) ...")
    try:
        return download_montgomery(target, **montgomery_options)
    except Exception as failure:  # no internet either
        raise LungsegDataError(f"No data could be downloaded ({reason}; Montgomery: {failure}).\n{DATA_HELP}") from failure


def describe_data(table: pd.DataFrame) -> str:
    """One line saying which data a chapter runs on, from :func:`build_pairs_table`'s table."""
    labeled = table[table["labeled"]]
    per_source = labeled.groupby("source").size()
    sources = ", ".join(f"{count} {source}" for source, count in per_source.items())
    unlabeled = int((~table["labeled"]).sum())
    kind = "the NLM Montgomery set only (one hospital)" if set(per_source.index) == {"Montgomery"} else "Chest X-Ray Masks and Labels"
    return f"data: {kind}: {len(table)} X-rays, {len(labeled)} with lung masks ({sources}), {unlabeled} unlabeled"


# --------------------------------------------------------------------------
# Pairing images with masks
# --------------------------------------------------------------------------


def source_of(name: str) -> str:
    """'Montgomery' for ``MCUCXR_*``, 'Shenzhen' for ``CHNCXR_*``, else 'unknown'."""
    upper = name.upper()
    if upper.startswith("MCUCXR"):
        return "Montgomery"
    if upper.startswith("CHNCXR"):
        return "Shenzhen"
    return "unknown"


def tb_label_of(name: str) -> int | None:
    """The tuberculosis label encoded as the last digit of the file name (``_0``/``_1``), or None."""
    stem = Path(name).stem.removesuffix("_mask")
    last = stem.rsplit("_", 1)[-1]
    return int(last) if last in {"0", "1"} else None


def image_size_of(path: str | os.PathLike) -> tuple[int, int]:
    """(height, width) of an image, read from its header only (fast), with :func:`decode_image`'s checks."""
    with _open_raster(path, str(path)) as im:
        width, height = im.size
    return height, width


def _mask_index(data_dir: Path) -> dict[str, tuple[Path, ...]]:
    """Map image stem -> mask path(s), for both naming conventions and the NLM layout."""
    index: dict[str, tuple[Path, ...]] = {}
    masks_dir = data_dir / "masks"
    if masks_dir.is_dir():
        for mask in sorted(masks_dir.iterdir()):
            if mask.suffix.lower() in IMAGE_SUFFIXES:
                index[mask.stem.removesuffix("_mask")] = (mask,)
    left_dir, right_dir = data_dir / "ManualMask" / "leftMask", data_dir / "ManualMask" / "rightMask"
    if left_dir.is_dir():
        for left in sorted(left_dir.iterdir()):
            if left.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            right = right_dir / left.name
            if not right.is_file():
                raise LungsegDataError(
                    f"{left} has no right-lung partner {right}. Download the Montgomery set again."
                )
            index[left.stem] = (left, right)
    return index


def build_pairs_table(data_dir: str | os.PathLike | None = None, read_sizes: bool = True) -> pd.DataFrame:
    """One row per X-ray: its mask(s), source, TB label and original size.

    Columns: ``name``, ``image_path``, ``mask_paths`` (tuple of one mask, or of the
    left and right masks of the NLM layout; empty for unlabeled images),
    ``labeled``, ``source``, ``tb_label``, ``height``, ``width``. A mask without
    an image raises :class:`LungsegDataError` naming the mask.
    """
    data_dir = find_data_dir(data_dir)
    images = sorted(p for p in (data_dir / "CXR_png").iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    masks = _mask_index(data_dir)
    image_stems = {p.stem for p in images}
    orphans = sorted(stem for stem in masks if stem not in image_stems)
    if orphans:
        raise LungsegDataError(
            f"Mask without an image: {masks[orphans[0]][0]} (and {len(orphans) - 1} more). "
            f"Expected an image named {orphans[0]}.png in {data_dir / 'CXR_png'}; "
            "restore the image or remove the mask."
        )
    rows = []
    for image in images:
        mask_paths = masks.get(image.stem, ())
        height, width = image_size_of(image) if read_sizes else (None, None)
        rows.append(
            dict(
                name=image.stem,
                image_path=str(image),
                mask_paths=tuple(str(m) for m in mask_paths),
                labeled=bool(mask_paths),
                source=source_of(image.name),
                tb_label=tb_label_of(image.name),
                height=height,
                width=width,
            )
        )
    return pd.DataFrame(rows)


def labeled_only(table: pd.DataFrame) -> pd.DataFrame:
    """The rows that have a mask, sorted by name (unlabeled images never enter metrics)."""
    return table[table["labeled"]].sort_values("name").reset_index(drop=True)


def lung_areas(mask: np.ndarray) -> dict[str, float]:
    """Connected components of a lung mask and the area of each lung in pixels.

    Radiological convention: the patient's right lung is on the image's left.
    Each component is assigned to a side by its centroid.
    """
    count, _, stats, centroids = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    areas, xs = stats[1:, cv2.CC_STAT_AREA], centroids[1:, 0]
    on_image_left = xs < mask.shape[1] / 2
    return dict(
        components=count - 1,
        right_lung_area=float(areas[on_image_left].sum()),
        left_lung_area=float(areas[~on_image_left].sum()),
    )


def anatomy_landmarks(mask: np.ndarray) -> dict[str, tuple[float, float]]:
    """Where the landmarks of a frontal chest X-ray lie, read off its lung mask: ``{name: (x, y)}``.

    The two largest regions are the lungs (the patient's right lung on the
    image's left). Apex: the top of a lung. Costophrenic angle: its lowest
    outer corner. Hemidiaphragm: the lowest lung pixel below the lung's centre.
    Heart border: the inner edge of the left lung two thirds of the way down.
    Retrocardiac region: the heart's shadow just inside the left lung's lower
    inner edge, where lung lies behind the heart. For the labelled figure of chapter 01; approximate by design.
    """
    count, labels, stats, centroids = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    if count < 3:
        raise LungsegDataError(f"anatomy_landmarks needs a mask with two lungs; this one has {count - 1} region(s).")
    largest = np.argsort(stats[1:, cv2.CC_STAT_AREA])[::-1][:2] + 1
    right, left = sorted(largest, key=lambda index: centroids[index, 0])  # patient's right lung = image left
    points: dict[str, tuple[float, float]] = {}
    for side, index, outward in (("right", right, -1), ("left", left, 1)):
        ys, xs = np.nonzero(labels == index)
        top = ys.min()
        points[f"{side} apex"] = (float(xs[ys == top].mean()), float(top))
        corner = np.argmax(ys + outward * xs)  # lowest and outermost
        points[f"{side} costophrenic angle"] = (float(xs[corner]), float(ys[corner]))
        centre_x = int(round(centroids[index, 0]))
        column = ys[xs == centre_x]
        points[f"{side} hemidiaphragm"] = (float(centre_x), float(column.max() if len(column) else ys.max()))
    ys, xs = np.nonzero(labels == left)
    heart_row = int(ys.min() + (ys.max() - ys.min()) * 2 / 3)
    points["heart border"] = (float(xs[ys == heart_row].min()), float(heart_row))
    low_row = int(ys.min() + (ys.max() - ys.min()) * 0.85)
    points["retrocardiac region"] = (float(xs[ys == low_row].min()) - 0.06 * mask.shape[1], float(low_row))
    return points


# --------------------------------------------------------------------------
# Splits
# --------------------------------------------------------------------------


def writeup_split(table: pd.DataFrame, val_fraction: float = 0.2, seed: int = SEED) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The split of the write-up this project started from: sorted pairs, 80/20, ``random_state=42``.

    Use it only to compare with that write-up's 96.34% validation Dice: it has no
    test part, so its validation score is also the score that chose the model.
    """
    pairs = labeled_only(table)
    train, val = train_test_split(pairs, test_size=val_fraction, random_state=seed)
    return train.reset_index(drop=True), val.reset_index(drop=True)


def three_way_split(
    table: pd.DataFrame, val_fraction: float = 0.1, test_fraction: float = 0.2, seed: int = SEED
) -> dict[str, pd.DataFrame]:
    """Train/validation/test split stratified by source and TB label.

    The test part is for the final scores only: early stopping and every choice
    of recipe use the validation part. Returns ``{"train", "val", "test"}``.
    """
    pairs = labeled_only(table)
    strata = pairs["source"] + "_" + pairs["tb_label"].astype(str)
    rest, test = train_test_split(pairs, test_size=test_fraction, random_state=seed, stratify=strata)
    rest_strata = rest["source"] + "_" + rest["tb_label"].astype(str)
    train, val = train_test_split(
        rest, test_size=val_fraction / (1 - test_fraction), random_state=seed, stratify=rest_strata
    )
    return {k: v.sort_values("name").reset_index(drop=True) for k, v in {"train": train, "val": val, "test": test}.items()}


def quick_subset(split: dict[str, pd.DataFrame], max_images: int | None) -> dict[str, pd.DataFrame]:
    """Keep about ``max_images`` in total (60/20/20), spread over hospitals and TB labels; all when None.

    Each part keeps at least one image of every (hospital, TB label) group it
    has, so that quick runs see both hospitals and both normal and TB films.
    """
    if max_images is None:
        return split
    shares = {"train": 0.6, "val": 0.2, "test": 0.2}
    out = {}
    for part, frame in split.items():
        n = max(4, int(max_images * shares.get(part, 0.2)))
        per_group = [
            group.head(max(1, round(n * len(group) / len(frame))))
            for _, group in frame.groupby(["source", "tb_label"], dropna=False)
        ]
        out[part] = pd.concat(per_group).sort_values("name").reset_index(drop=True)
    return out


def assert_disjoint(split: dict[str, pd.DataFrame]) -> None:
    """Raise :class:`LungsegDataError` if any image appears in two parts of ``split``."""
    parts = list(split.items())
    for i, (name_a, a) in enumerate(parts):
        for name_b, b in parts[i + 1 :]:
            shared = set(a["image_path"]) & set(b["image_path"])
            if shared:
                raise LungsegDataError(
                    f"{len(shared)} images are in both {name_a} and {name_b}, e.g. {sorted(shared)[0]}: "
                    "a split must not share images between its parts."
                )


# --------------------------------------------------------------------------
# Decoding images and masks
# --------------------------------------------------------------------------

_PIL_OPEN_LOCK = threading.Lock()


def max_image_pixels() -> int:
    """The largest image accepted, in pixels: ``$LUNGSEG_MAX_MEGAPIXELS`` million (default 60)."""
    megapixels = os.environ.get("LUNGSEG_MAX_MEGAPIXELS")
    try:
        return int(float(megapixels) * 1e6) if megapixels else int(DEFAULT_MAX_MEGAPIXELS * 1e6)
    except ValueError:
        raise LungsegDataError(f"LUNGSEG_MAX_MEGAPIXELS={megapixels!r} is not a number; use e.g. 60.") from None


def check_image_size(width: int, height: int, name: str, max_pixels: int | None = None) -> None:
    """Refuse images over ``max_pixels`` (default :func:`max_image_pixels`) or under 32 px per side."""
    max_pixels = max_pixels or max_image_pixels()
    if width * height > max_pixels:
        raise LungsegDataError(
            f"{name}: {width}x{height} px ({width * height / 1e6:.1f} megapixels) is over the limit of "
            f"{max_pixels / 1e6:g} megapixels. Downscale the image, or raise the limit with the environment "
            "variable LUNGSEG_MAX_MEGAPIXELS if it really is an X-ray that large."
        )
    if min(width, height) < MIN_IMAGE_SIDE:
        raise LungsegDataError(
            f"{name}: {width}x{height} px is too small: each side needs at least {MIN_IMAGE_SIDE} px "
            "(a chest X-ray has hundreds to thousands). Use the full-size image."
        )


def _describe_source(source: str | os.PathLike | bytes, name: str | None) -> str:
    """The name used in messages: ``name``, else the path, else 'uploaded data'."""
    if name:
        return name
    return str(source) if isinstance(source, (str, os.PathLike)) else "uploaded data"


def _check_file(source: str | os.PathLike | bytes, name: str) -> None:
    """Clear messages for a missing path, a folder and an empty file or upload."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) == 0:
            raise LungsegDataError(f"{name}: the upload is empty (0 bytes). Choose the X-ray file again.")
        return
    path = Path(source)
    if not path.exists():
        raise LungsegDataError(f"{name}: not found. Check the file name and its folder.")
    if path.is_dir():
        raise LungsegDataError(f"{name}: is a folder, not an image file. Give the image files inside it.")
    if path.stat().st_size == 0:
        raise LungsegDataError(f"{name}: the file is empty (0 bytes). Copy or download it again.")


def _looks_like_dicom(source: str | os.PathLike | bytes, name: str) -> bool:
    """True for a ``.dcm``/``.dicom`` name or the DICOM preamble (``DICM`` at byte 128)."""
    if name.lower().endswith(DICOM_SUFFIXES):
        return True
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source[128:132]) == b"DICM"
    with open(source, "rb") as f:
        f.seek(128)
        return f.read(4) == b"DICM"


def _open_raster(source: str | os.PathLike | bytes, name: str, max_pixels: int | None = None) -> Image.Image:
    """Open a PNG/JPEG/TIFF/BMP lazily (header only) and check its size before anything is decoded.

    Pillow's own decompression-bomb check is replaced by :func:`check_image_size`
    (stricter by default, and it names the file); the lock keeps that swap private.
    """
    _check_file(source, name)
    fileobj = io.BytesIO(source) if isinstance(source, (bytes, bytearray, memoryview)) else source
    with _PIL_OPEN_LOCK:
        pil_limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        try:
            im = Image.open(fileobj)
        except UnidentifiedImageError:
            raise LungsegDataError(
                f"{name}: cannot be read as an image: it is not PNG, JPEG, TIFF, BMP or DICOM, or it is corrupt. "
                "Replace it with a valid image file (for the data set, download it again)."
            ) from None
        except (OSError, SyntaxError, ValueError) as error:
            raise LungsegDataError(f"{name}: corrupt image header ({error}). Copy or download the file again.") from None
        finally:
            Image.MAX_IMAGE_PIXELS = pil_limit
    try:
        check_image_size(*im.size, name, max_pixels)
    except LungsegDataError:
        im.close()
        raise
    return im


def _raster_pixels(im: Image.Image, name: str, keep_channels: bool = False) -> np.ndarray:
    """Decode an opened image to an array in its own bit depth (first frame of a multi-page TIFF).

    Colour images become gray with ITU-R 601 luminance weights, unless
    ``keep_channels`` (masks are checked channel by channel).
    """
    try:
        im.seek(0)
        im.load()
        if not keep_channels and im.getexif().get(0x0112, 1) != 1:  # a photo's orientation tag
            im = ImageOps.exif_transpose(im)
    except (OSError, SyntaxError, ValueError, EOFError, zlib.error) as error:
        raise LungsegDataError(
            f"{name}: the image data is corrupt or truncated ({error}). Copy or download the file again."
        ) from None
    mode = im.mode
    if mode in ("1", "L", "I", "F") or mode.startswith("I;16"):
        return np.asarray(im)
    if mode == "LA":
        return np.asarray(im.getchannel("L"))
    if keep_channels:
        has_alpha = "A" in mode or "transparency" in im.info
        return np.asarray(im.convert("RGBA" if has_alpha else "RGB"))
    return np.asarray(im.convert("L"))


def _decode_dicom(source: str | os.PathLike | bytes, name: str, max_pixels: int | None) -> np.ndarray:
    """Decode a DICOM image: modality LUT, VOI LUT or window, MONOCHROME1 inverted, 8-bit gray."""
    try:
        import pydicom
        from pydicom.pixels import apply_modality_lut, apply_voi_lut
    except ImportError:
        raise LungsegDataError(f"{name}: reading DICOM needs pydicom 3 (pip install 'pydicom>=3').") from None
    fileobj = io.BytesIO(source) if isinstance(source, (bytes, bytearray, memoryview)) else source
    try:
        dataset = pydicom.dcmread(fileobj)
        rows, columns = int(dataset.Rows), int(dataset.Columns)
    except Exception as error:
        raise LungsegDataError(f"{name}: not a readable DICOM image ({type(error).__name__}: {error}).") from None
    frames = int(getattr(dataset, "NumberOfFrames", 1) or 1)
    check_image_size(columns, rows * frames, name, max_pixels)
    try:
        pixels = dataset.pixel_array
    except Exception as error:
        raise LungsegDataError(
            f"{name}: the DICOM pixel data cannot be decoded ({type(error).__name__}: {error}). "
            "Compressed DICOM may need pylibjpeg or gdcm; or export the image as PNG."
        ) from None
    if frames > 1:
        pixels = pixels[0]
    if pixels.ndim == 3:  # colour DICOM (rare for X-rays)
        return cv2.cvtColor(to_uint8_range(pixels), cv2.COLOR_RGB2GRAY)
    values = apply_voi_lut(apply_modality_lut(pixels, dataset), dataset).astype(np.float32)
    gray = to_uint8_range(values)
    return 255 - gray if str(getattr(dataset, "PhotometricInterpretation", "")) == "MONOCHROME1" else gray


def to_uint8_range(values: np.ndarray) -> np.ndarray:
    """Rescale any numeric array to 0..255 by its own minimum and maximum (in float32), as ``uint8``."""
    if values.dtype == np.uint8:
        return values
    values = values.astype(np.float32)
    finite = np.isfinite(values)
    if not finite.all():
        values = np.where(finite, values, np.nanmin(np.where(finite, values, np.nan)) if finite.any() else 0)
    low, high = float(values.min()), float(values.max())
    if high <= low:
        return np.zeros(values.shape, np.uint8)
    return np.round((values - low) * np.float32(255 / (high - low))).astype(np.uint8)


def to_gray_uint8(array: np.ndarray, source: str = "image") -> np.ndarray:
    """Convert an image array (8/16-bit, float, bool, gray, RGB or RGBA) to 8-bit gray.

    Images that are not 8-bit are rescaled by their own minimum and maximum;
    colour arrays are taken as OpenCV's BGR order (alpha is dropped).
    """
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim == 3:
        if array.shape[2] == 4:
            array = array[:, :, :3]
        if array.shape[2] != 3:
            raise LungsegDataError(f"{source}: {array.shape[2]} channels is not an image; use a gray or RGB X-ray.")
        array = cv2.cvtColor(np.ascontiguousarray(to_uint8_range(array)), cv2.COLOR_BGR2GRAY)
    if array.ndim != 2:
        raise LungsegDataError(f"{source}: shape {array.shape} is not a 2-D image.")
    if array.dtype == bool:
        return array.astype(np.uint8) * 255
    return to_uint8_range(array)


def decode_image(
    source: str | os.PathLike | bytes, name: str | None = None, max_pixels: int | None = None
) -> np.ndarray:
    """Decode an X-ray to 8-bit gray ``(H, W)``: the one decoder of the project.

    ``source`` is a path or the bytes of an upload (``name`` is then used in
    messages and to recognise DICOM). PNG, JPEG, TIFF and BMP are read with
    Pillow, 8 or 16 bit, gray, RGB or RGBA, JPEG orientation applied; DICOM with
    pydicom, its VOI LUT or window applied and MONOCHROME1 inverted. The size is
    checked from the header before decoding (see :func:`check_image_size`).
    Every problem raises :class:`LungsegDataError` naming the file.
    """
    name = _describe_source(source, name)
    _check_file(source, name)
    if _looks_like_dicom(source, name):
        return _decode_dicom(source, name, max_pixels)
    with _open_raster(source, name, max_pixels) as im:
        pixels = _raster_pixels(im, name)
    return to_gray_uint8(pixels, name)


def read_mask(paths: Sequence[str | os.PathLike]) -> np.ndarray:
    """Read a lung mask as a 0/1 ``uint8`` array; two paths (left, right lung) are combined.

    A mask must be an 8-bit or 1-bit single-channel image (or RGB with equal
    channels); 16-bit, RGBA or coloured masks raise :class:`LungsegDataError` naming the file.
    """
    if not paths:
        raise LungsegDataError("No mask given: this image is unlabeled; use it for inference only.")
    combined = None
    for path in paths:
        with _open_raster(path, str(path)) as im:
            raw = _raster_pixels(im, str(path), keep_channels=True)
        if raw.dtype == bool:
            raw = raw.astype(np.uint8)
        if raw.dtype != np.uint8:
            raise LungsegDataError(
                f"{path}: mask is {raw.dtype.name}, expected 8-bit (0 = background, 255 = lung). "
                "Save it as an 8-bit grayscale PNG."
            )
        if raw.ndim == 3:
            if raw.shape[2] == 4 or not (np.array_equal(raw[..., 0], raw[..., 1]) and np.array_equal(raw[..., 1], raw[..., 2])):
                raise LungsegDataError(
                    f"{path}: mask has {raw.shape[2]} channels with different content, expected a single-channel "
                    "binary image. Save it as an 8-bit grayscale PNG."
                )
            raw = raw[..., 0]
        binary = (raw > 127).astype(np.uint8) if raw.max() > 1 else raw.astype(np.uint8)
        if combined is not None and combined.shape != binary.shape:
            raise LungsegDataError(f"{path}: left and right masks differ in size ({combined.shape} vs {binary.shape}).")
        combined = binary if combined is None else np.maximum(combined, binary)
    return combined


def read_pair(image_path: str | os.PathLike, mask_paths: Sequence[str | os.PathLike]) -> tuple[np.ndarray, np.ndarray]:
    """Read an X-ray and its mask at full size; a size mismatch raises naming both files."""
    image = decode_image(image_path)
    mask = read_mask(mask_paths)
    if image.shape != mask.shape:
        raise LungsegDataError(
            f"Size mismatch: image {image_path} is {image.shape[1]}x{image.shape[0]} but mask "
            f"{mask_paths[0]} is {mask.shape[1]}x{mask.shape[0]}. The mask must be drawn on this image; "
            "download the data again or remove the pair."
        )
    return image, mask


def resize_image(image: np.ndarray, size: int) -> np.ndarray:
    """Resize an 8-bit image to ``size`` x ``size`` with area interpolation (no aliasing)."""
    return cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA)


def resize_mask(mask: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """Resize a 0/1 mask: area-average then threshold at 0.5, keeping it binary and unbiased.

    ``size`` is an int (square) or ``(height, width)``.
    """
    height, width = (size, size) if isinstance(size, int) else size
    averaged = cv2.resize(mask.astype(np.float32), (width, height), interpolation=cv2.INTER_AREA)
    return (averaged >= 0.5).astype(np.uint8)


# --------------------------------------------------------------------------
# Cache: decode and resize once
# --------------------------------------------------------------------------


def default_cache_dir() -> Path:
    """``$LUNGSEG_CACHE_DIR``, else the user's cache folder (``~/.cache/lungseg``); never the repository."""
    if os.environ.get("LUNGSEG_CACHE_DIR"):
        return Path(os.environ["LUNGSEG_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or (
        Path(os.environ["LOCALAPPDATA"]) if os.name == "nt" and os.environ.get("LOCALAPPDATA") else Path.home() / ".cache"
    )
    return Path(base) / "lungseg"


def _fingerprint(paths: Iterable[str], size: int) -> str:
    """A key that changes when any source file's path, size or modification time changes."""
    digest = hashlib.sha1(str(size).encode())
    for path in paths:
        stat = os.stat(path)
        digest.update(f"{os.path.abspath(path)}|{stat.st_size}|{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


def cached_sample(
    image_path: str, mask_paths: Sequence[str], size: int, cache_dir: str | os.PathLike | None = None
) -> tuple[np.ndarray, np.ndarray | None]:
    """The image (and mask, if any) resized to ``size``, decoded once and then read from the cache.

    Each sample is one ``.npy`` file of shape ``(1 or 2, size, size)`` named by a
    fingerprint of its source files, so an edited or replaced file is decoded again.
    """
    folder = Path(cache_dir or default_cache_dir()) / f"{size}px"
    key = _fingerprint([image_path, *mask_paths], size)
    cache_file = folder / f"{Path(image_path).stem}_{key}.npy"
    if cache_file.is_file():
        stacked = np.load(cache_file)
    else:
        if mask_paths:
            image, mask = read_pair(image_path, mask_paths)
            stacked = np.stack([resize_image(image, size), resize_mask(mask, size)])
        else:
            stacked = resize_image(decode_image(image_path), size)[None]
        folder.mkdir(parents=True, exist_ok=True)
        temporary = cache_file.with_name(f"{cache_file.stem}.{os.getpid()}.tmp.npy")
        np.save(temporary, stacked)
        os.replace(temporary, cache_file)
    return stacked[0], (stacked[1] if stacked.shape[0] > 1 else None)


def load_arrays(
    rows: pd.DataFrame, size: int, cache_dir: str | os.PathLike | None = None, workers: int | None = None
) -> tuple[np.ndarray, np.ndarray | None]:
    """Stack the cached images ``(N, size, size)`` and masks (None if any row is unlabeled).

    Decoding runs on a thread pool (OpenCV releases the GIL); cached samples load in milliseconds.
    """
    workers = workers or min(8, os.cpu_count() or 1)
    jobs = list(zip(rows["image_path"], rows["mask_paths"]))
    with ThreadPoolExecutor(workers) as pool:
        samples = list(
            tqdm(
                pool.map(lambda job: cached_sample(job[0], job[1], size, cache_dir), jobs),
                total=len(jobs),
                desc=f"images at {size}px",
                leave=False,
            )
        )
    images = np.stack([s[0] for s in samples]) if samples else np.zeros((0, size, size), np.uint8)
    if any(s[1] is None for s in samples):
        return images, None
    masks = np.stack([s[1] for s in samples]) if samples else np.zeros((0, size, size), np.uint8)
    return images, masks


# --------------------------------------------------------------------------
# Dataset and augmentation
# --------------------------------------------------------------------------


class SimulatedOpacity(A.ImageOnlyTransform):
    """Training augmentation: whiten a random part of one lung, as pneumonia or an effusion would; the mask stays.

    The lung is still lung when it is consolidated, but nearly all training
    lungs are dark, so a model learns "lung = dark" and leaves white parts out.
    With probability ``p`` this paints one to three soft blobs (or, one time in
    three, a basal whitening with a level top) over 10-50% of one lung at a
    random strength. Chapter 06's shift benchmark paints similar opacities, so
    it cannot by itself prove that this helps on real disease.
    """

    def __init__(self, p: float = 0.3):
        super().__init__(p=p)

    def get_params_dependent_on_data(self, params: dict, data: dict) -> dict:
        rng = self.random_generator
        mask = data.get("mask")
        if mask is None:
            return {"region": None, "strength": 0.0}
        lung = _one_lung(np.asarray(mask), rng)
        if not lung.any():
            return {"region": None, "strength": 0.0}
        share = rng.uniform(0.1, 0.5)
        if rng.random() < 1 / 3:
            region = _opacity_region("effusion", lung, share, rng)
        else:
            region = np.zeros_like(lung)
            for _ in range(int(rng.integers(1, 4))):
                region |= _opacity_region("consolidation", lung, share / 2, rng)
        return {"region": region, "strength": float(rng.uniform(0.25, 0.85))}

    def apply(self, img: np.ndarray, region: np.ndarray | None = None, strength: float = 0.0, **params) -> np.ndarray:
        if region is None:
            return img
        return _paint_opacity(img, region, strength)


def train_transforms(
    rotate_limit: float = 35,
    photometric: bool = True,
    horizontal_flip: bool = False,
    clahe: bool = True,
    strong_photometric: bool = True,
    opacity_p: float = 0.3,
    framing: bool = True,
) -> A.Compose:
    """Training augmentation: rotation (±35°), framing, exposure and acquisition changes, simulated opacities.

    The defaults are chapter 03's recipe, chosen by the recipe screen of issue 10
    (``benchmarks/recipe_screen.py``: same Dice on both hospitals' validation
    X-rays, smaller losses under acquisition shifts and opacities):

    * ``framing``: scale 0.75-1.2 and shifts of 10% (the patient smaller or larger
      and off-centre in the frame); ``framing=False`` keeps the first recipe's
      0.9-1.1 and 5%;
    * ``strong_photometric``: wide exposure and gamma changes, noise, blur or low
      resolution, JPEG compression (other machines, exposures and file
      formats); ``strong_photometric=False`` with ``photometric=True`` keeps the
      first recipe's mild brightness, contrast and gamma changes;
    * ``opacity_p``: how often :class:`SimulatedOpacity` whitens part of one lung
      while the mask stays lung (pneumonia, effusion);
    * ``clahe``: random local contrast equalisation (a processed look).

    No horizontal flip by default: the heart lies on the left, so a flipped chest
    is an anatomy (dextrocardia) that the model would almost never meet, and the
    two lungs differ in shape (chapter 02 shows how much). ``horizontal_flip=True``
    adds the write-up's flip, to measure that choice.
    """
    scale, shift = ((0.75, 1.2), 0.1) if framing else ((0.9, 1.1), 0.05)
    steps: list[A.BasicTransform] = [
        A.Affine(
            rotate=(-rotate_limit, rotate_limit),
            scale=scale,
            translate_percent=(-shift, shift),
            border_mode=cv2.BORDER_CONSTANT,
            fill=0,
            fill_mask=0,
            p=0.7,
        )
    ]
    if horizontal_flip:
        steps.append(A.HorizontalFlip(p=0.5))
    if opacity_p > 0:
        steps.append(SimulatedOpacity(p=opacity_p))
    if strong_photometric:
        steps += [
            A.RandomBrightnessContrast(brightness_limit=0.3, contrast_limit=0.3, p=0.6),
            A.RandomGamma(gamma_limit=(60, 160), p=0.5),
            A.GaussNoise(std_range=(0.01, 0.06), p=0.3),
            A.OneOf([
                A.GaussianBlur(sigma_limit=(0.5, 2.0), blur_limit=0),
                A.Downscale(scale_range=(0.35, 0.8), interpolation_pair={"downscale": cv2.INTER_AREA, "upscale": cv2.INTER_LINEAR}),
            ], p=0.3),
            A.ImageCompression(quality_range=(30, 95), p=0.3),
        ]
    elif photometric:
        steps += [
            A.RandomBrightnessContrast(brightness_limit=0.2, contrast_limit=0.2, p=0.5),
            A.RandomGamma(gamma_limit=(80, 120), p=0.3),
        ]
    if clahe:
        steps.append(A.CLAHE(clip_limit=(1, 4), p=0.3))
    return A.Compose(steps)


def equalize_contrast(image: np.ndarray) -> np.ndarray:
    """Contrast normalisation of an 8-bit gray image: CLAHE with OpenCV's usual clip limit 2 on 8x8 tiles.

    Unlike the random CLAHE of :func:`train_transforms`, a model trained with
    ``TrainConfig(equalize=True)`` sees every image through this, in training
    (after the augmentation, as an acquisition shift comes before any
    processing) and at prediction time (:func:`predict_arrays`).
    """
    return cv2.createCLAHE(clipLimit=2.0, tileGridSize=(8, 8)).apply(image)


def image_to_tensor(image: np.ndarray) -> torch.Tensor:
    """8-bit gray ``(H, W)`` -> float ``(3, H, W)``: scaled to [0, 1], repeated, ImageNet-normalized."""
    scaled = torch.from_numpy(np.ascontiguousarray(image)).float().div_(255.0)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (scaled.unsqueeze(0).expand(3, -1, -1) - mean) / std


class LungDataset(Dataset):
    """Cached images and masks as model-ready tensors, with optional Albumentations transforms.

    ``equalize``: pass every image, after its transforms, through :func:`equalize_contrast`.
    """

    def __init__(self, images: np.ndarray, masks: np.ndarray, transform: A.Compose | None = None, equalize: bool = False):
        if masks is None or len(images) != len(masks):
            raise LungsegDataError("LungDataset needs one mask per image; unlabeled images are for inference only.")
        self.images, self.masks, self.transform, self.equalize = images, masks, transform, equalize

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, mask = self.images[index], self.masks[index]
        if self.transform is not None:
            out = self.transform(image=image, mask=mask)
            image, mask = out["image"], out["mask"]
        if self.equalize:
            image = equalize_contrast(image)
        return image_to_tensor(image), torch.from_numpy(np.ascontiguousarray(mask)).float().unsqueeze(0)


def check_arrays(images: np.ndarray, masks: np.ndarray, image_size: int | None = None) -> None:
    """smp-style sanity checks before training; each failure raises :class:`LungsegDataError`.

    Images and masks have the same shape, sides divisible by 32 (equal to
    ``image_size`` when given), and masks hold only 0 and 1.
    """
    if masks is None or images.shape != masks.shape:
        raise LungsegDataError(f"images {images.shape} and masks {getattr(masks, 'shape', None)} differ: "
                               "give one mask per image, at the same size.")
    if images.ndim != 3 or images.shape[1] % 32 or images.shape[2] % 32:
        raise LungsegDataError(f"arrays of shape {images.shape}: a U-Net needs (N, H, W) with H and W divisible by 32.")
    if image_size is not None and images.shape[1:] != (image_size, image_size):
        raise LungsegDataError(
            f"arrays are {images.shape[2]}x{images.shape[1]} px but the config says image_size={image_size}: "
            "load them with load_arrays(rows, config.image_size)."
        )
    if not set(np.unique(masks)).issubset({0, 1}):
        raise LungsegDataError("masks must hold only 0 and 1 (read them with read_mask or load_arrays).")


# --------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------

_warned_offline = False


def _hub_reachable(host: str = "huggingface.co", timeout: float = 2.0) -> bool:
    """Fast check that ``host`` answers on port 443 (avoids long retry loops when offline).

    The name look-up runs in a helper thread with the same timeout: a resolver
    that never answers would otherwise block here far longer than ``timeout``.
    """
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true"}:
        return False
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    try:
        addresses = pool.submit(socket.getaddrinfo, host, 443, type=socket.SOCK_STREAM).result(timeout=timeout)
        with socket.create_connection(addresses[0][4][:2], timeout=timeout):
            return True
    except (OSError, concurrent.futures.TimeoutError, IndexError):
        return False
    finally:
        pool.shutdown(wait=False)


def _cached_imagenet_state(encoder: str) -> dict[str, torch.Tensor] | None:
    """The encoder's ImageNet weights from the Hugging Face cache (no network), or None."""
    from huggingface_hub import hf_hub_download
    from safetensors.torch import load_file

    settings = smp.encoders.encoders.get(encoder, {}).get("pretrained_settings", {}).get("imagenet")
    if not settings:
        return None
    try:
        path = hf_hub_download(
            settings["repo_id"], "model.safetensors", revision=settings["revision"], local_files_only=True
        )
    except Exception:
        return None
    return load_file(path, device="cpu")


def imagenet_weights_available(encoder: str = "resnet34") -> bool:
    """True when ``build_model(encoder, weights="imagenet")`` would get real ImageNet weights (cache or hub)."""
    return _cached_imagenet_state(encoder) is not None or _hub_reachable()


def _load_weights_file(model: smp.Unet, path: Path) -> None:
    """Load a local ``.safetensors``/``.pth`` file of encoder or whole-model weights (safely)."""
    if not path.is_file():
        raise FileNotFoundError(f"Weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path), device="cpu")
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("model_state", state) if isinstance(state, dict) else state
    encoder_keys = set(model.encoder.state_dict())
    target = model.encoder if encoder_keys >= set(state) - {"fc.weight", "fc.bias"} else model
    state = {k: v for k, v in state.items() if not k.startswith("fc.")} if target is model.encoder else state
    try:
        target.load_state_dict(state)
    except RuntimeError as error:
        raise LungsegDataError(f"{path}: these weights do not fit this architecture ({error}).") from error


def _zero_skips(module: nn.Module, inputs, features: list[torch.Tensor]) -> list[torch.Tensor]:
    """Encoder forward hook that zeroes every skip feature, keeping only the bottleneck."""
    return [torch.zeros_like(f) for f in features[:-1]] + [features[-1]]


def build_model(
    encoder: str = "resnet34",
    weights: str | os.PathLike | None = "imagenet",
    skip_connections: bool = True,
) -> smp.Unet:
    """A U-Net with the given encoder, 3 input channels and one output (lung logits).

    ``weights``: ``"imagenet"`` (from the Hugging Face cache or the internet; if
    neither can be reached, random initialization with one warning), ``None``
    (random) or a path to a local ``.safetensors``/``.pth`` file.
    ``skip_connections=False`` zeroes the encoder's skip features (same
    parameters, no shortcut), for the ablation in chapter 02.
    """
    global _warned_offline
    model = smp.Unet(encoder_name=encoder, encoder_weights=None, in_channels=3, classes=1)
    loaded = None
    if weights == "imagenet":
        state = _cached_imagenet_state(encoder)
        if state is not None:
            model.encoder.load_state_dict(state)
            loaded = "imagenet (Hugging Face cache)"
        elif _hub_reachable():
            model = smp.Unet(encoder_name=encoder, encoder_weights="imagenet", in_channels=3, classes=1)
            loaded = "imagenet (downloaded)"
        else:
            if not _warned_offline:
                warnings.warn(
                    f"ImageNet weights for {encoder} are not in the Hugging Face cache and the hub cannot be "
                    "reached: training from random initialization. To use them offline, pass "
                    "weights='path/to/model.safetensors' or pre-fill the cache (see README).",
                    stacklevel=2,
                )
                _warned_offline = True
            loaded = None
    elif weights is not None:
        _load_weights_file(model, Path(weights))
        loaded = str(weights)
    if not skip_connections:
        model.encoder.register_forward_hook(_zero_skips)
    model.lungseg_config = dict(encoder=encoder, skip_connections=skip_connections, weights=loaded)
    return model


def count_parameters(module: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


# --------------------------------------------------------------------------
# Loss
# --------------------------------------------------------------------------


class DiceBCELoss(nn.Module):
    """Binary cross-entropy plus soft Dice loss, on logits.

    BCE gives smooth per-pixel gradients from the first step; Dice measures the
    overlap of the whole lung region and so is not swamped by the background
    (about 70% of a chest X-ray). Dice is computed over the whole batch, as
    segmentation-models-pytorch's ``DiceLoss(mode="binary")`` does, and is 0 for
    a batch without any lung pixel. Dice here is the textbook
    ``(2 |P∩T| + smooth) / (|P| + |T| + smooth)``; smp >= 0.5 writes it as
    ``(|P∩T| + s) / ((|P| + |T|) / 2 + s)``, so its ``smooth=s`` is ours ``2 s``.
    """

    def __init__(self, smooth: float = 1.0, eps: float = 1e-7, bce_weight: float = 1.0, dice_weight: float = 1.0):
        super().__init__()
        self.smooth, self.eps, self.bce_weight, self.dice_weight = smooth, eps, bce_weight, dice_weight

    def dice_loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """1 - soft Dice of sigmoid(logits) against targets over the whole batch."""
        probs = torch.sigmoid(logits.float()).flatten()
        targets = targets.float().flatten()
        intersection = (probs * targets).sum()
        cardinality = (probs + targets).sum()
        dice = (2 * intersection + self.smooth) / (cardinality + self.smooth).clamp_min(self.eps)
        return (1 - dice) * (targets.sum() > 0)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        bce = F.binary_cross_entropy_with_logits(logits.float(), targets.float())
        return self.bce_weight * bce + self.dice_weight * self.dice_loss(logits, targets)


# --------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------


def _confusion_counts(pred: np.ndarray | torch.Tensor, target: np.ndarray | torch.Tensor):
    """Per-image true/false positive/negative pixel counts of binary masks ``(N, H, W)`` (smp.metrics)."""
    pred_t = torch.as_tensor(np.ascontiguousarray(np.asarray(pred))).long().unsqueeze(1)
    target_t = torch.as_tensor(np.ascontiguousarray(np.asarray(target))).long().unsqueeze(1)
    return smp.metrics.get_stats(pred_t, target_t, mode="binary")


def dice_iou_per_image(pred: np.ndarray | torch.Tensor, target: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Per-image Dice and IoU of binary masks ``(N, H, W)``, via ``smp.metrics`` (empty vs empty = 1)."""
    tp, fp, fn, tn = _confusion_counts(pred, target)
    dice = smp.metrics.f1_score(tp, fp, fn, tn, reduction="none", zero_division=1.0)
    iou = smp.metrics.iou_score(tp, fp, fn, tn, reduction="none", zero_division=1.0)
    return dice.flatten().numpy(), iou.flatten().numpy()


def dataset_dice(pred: np.ndarray, target: np.ndarray) -> float:
    """Dataset-wide ("micro") Dice: all pixels of all images pooled, so big lungs weigh more."""
    tp, fp, fn, tn = _confusion_counts(pred, target)
    return float(smp.metrics.f1_score(tp, fp, fn, tn, reduction="micro"))


def writeup_batch_dice(probs: np.ndarray, target: np.ndarray, batch_size: int = 8, smooth: float = 1.0) -> float:
    """The write-up's metric: Dice of masks thresholded at 0.5, pooled per batch of 8, averaged over batches.

    It depends on batch size and order, and large lungs dominate each batch,
    which is why this project reports per-image Dice as its main score.
    """
    scores = []
    for start in range(0, len(probs), batch_size):
        p = (np.asarray(probs[start : start + batch_size]) > 0.5).astype(np.float64)
        t = np.asarray(target[start : start + batch_size]).astype(np.float64)
        scores.append((2 * (p * t).sum() + smooth) / (p.sum() + t.sum() + smooth))
    return float(np.mean(scores))


def _surface(mask: np.ndarray) -> np.ndarray:
    """The boundary pixels of a binary mask."""
    mask = mask.astype(bool)
    return mask & ~ndimage.binary_erosion(mask, border_value=0)


def hausdorff95(pred: np.ndarray, target: np.ndarray) -> float:
    """95th-percentile symmetric Hausdorff distance in pixels (MONAI's definition).

    It is undefined (nan) when either mask is empty: a prediction that misses
    the lung entirely has no boundary to measure. :func:`evaluate` flags those
    images and :func:`summarize_scores` counts them, so that they are never
    silently dropped from a mean.
    """
    pred_surface, target_surface = _surface(pred), _surface(target)
    if not pred_surface.any() or not target_surface.any():
        return float("nan")
    to_target = ndimage.distance_transform_edt(~target_surface)[pred_surface]
    to_pred = ndimage.distance_transform_edt(~pred_surface)[target_surface]
    return float(max(np.percentile(to_target, 95), np.percentile(to_pred, 95)))


# --------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------


@dataclass
class TrainConfig:
    """Everything that defines a training run (stored in every checkpoint).

    The defaults are chapter 03's recipe, the one behind the stored results:
    trained from scratch (``weights=None``), Adam at 1e-3 with a one-cycle
    schedule, 20 epochs at 256 px, batch 8, early stopping after 5 epochs without
    a better validation loss, the augmentation of :func:`train_transforms`
    (framing, strong photometric changes, CLAHE and simulated opacities), and
    contrast normalisation of every image (``equalize``: :func:`equalize_contrast`,
    in training and at prediction time). ImageNet initialisation is an explicit
    choice (``weights="imagenet"``) that needs its own learning rate and gives
    other numbers.
    """

    encoder: str = "resnet34"
    weights: str | None = None
    image_size: int = 256
    epochs: int = 20
    batch_size: int = 8
    lr: float = 1e-3
    schedule: str = "onecycle"  # or "constant"
    patience: int = 5
    seed: int = SEED
    rotate_limit: float = 35
    photometric: bool = True
    horizontal_flip: bool = False  # the write-up's flip; see train_transforms
    clahe: bool = True  # random CLAHE as augmentation
    strong_photometric: bool = True  # the recipe that travels (issue 10): see train_transforms
    opacity_p: float = 0.3
    framing: bool = True
    equalize: bool = True  # CLAHE on every image, in training and at prediction time: see equalize_contrast
    bce_weight: float = 1.0  # loss = bce_weight * BCE + dice_weight * Dice loss
    dice_weight: float = 1.0
    skip_connections: bool = True
    device: str | None = None
    mixed_precision: bool = True
    num_workers: int = 0


@dataclass
class TrainResult:
    """What :func:`train` returns: the best model, the history and where things are."""

    model: nn.Module
    history: pd.DataFrame
    run_dir: Path
    best_epoch: int
    best_val_loss: float
    wall_seconds: float
    device: str
    extra: dict = field(default_factory=dict)


def augmentation_for(config: TrainConfig) -> A.Compose:
    """The training augmentation that ``config`` asks for (:func:`train_transforms`)."""
    return train_transforms(
        rotate_limit=config.rotate_limit, photometric=config.photometric, horizontal_flip=config.horizontal_flip,
        clahe=config.clahe, strong_photometric=config.strong_photometric, opacity_p=config.opacity_p, framing=config.framing,
    )


def _make_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig, steps_per_epoch: int):
    """A one-cycle schedule over all epochs, or None for a constant learning rate."""
    if config.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=config.lr, epochs=config.epochs, steps_per_epoch=steps_per_epoch
        )
    if config.schedule != "constant":
        raise ValueError(f"Unknown schedule {config.schedule!r}: use 'constant' or 'onecycle'.")
    return None


def _run_epoch(model, loader, loss_fn, device, amp_dtype, optimizer=None, scheduler=None, scaler=None, desc="") -> tuple[float, float]:
    """One pass over ``loader`` (training when an optimizer is given).

    Returns the mean loss and the mean per-image Dice of the thresholded outputs
    (computed without gradients, so validation needs no second pass).
    ``scaler`` (a GradScaler) is needed only for fp16 on a GPU; bf16 needs none.
    """
    training = optimizer is not None
    model.train(training)
    total, count, dice_sum = 0.0, 0, 0.0
    autocast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()
    with torch.set_grad_enabled(training), tqdm(loader, desc=desc, leave=False) as bar:
        for images, masks in bar:
            images = images.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
            masks = masks.to(device, non_blocking=True)
            with autocast:
                logits = model(images)
            loss = loss_fn(logits.float(), masks)
            if training:
                optimizer.zero_grad(set_to_none=True)
                if scaler is not None:
                    scaler.scale(loss).backward()
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    loss.backward()
                    optimizer.step()
                if scheduler is not None:
                    scheduler.step()
            total += loss.item() * len(images)
            count += len(images)
            with torch.no_grad():
                dice_sum += float(dice_iou_per_image((logits > 0).cpu().numpy()[:, 0], masks.cpu().numpy()[:, 0])[0].sum())
            bar.set_postfix(loss=f"{total / count:.4f}")
    return total / max(count, 1), dice_sum / max(count, 1)


def _plain(value):
    """``value`` in plain Python types (str, int, float, bool, None, list, dict; tensors kept).

    ``torch.load(weights_only=True)`` refuses anything else, so a ``Path`` or a
    NumPy number in a config would make a checkpoint unreadable.
    """
    if isinstance(value, dict):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if value is None or type(value) in (str, int, float, bool) or isinstance(value, torch.Tensor):
        return value
    for plain_type in (bool, int, float, str):  # subclasses, e.g. torch.__version__ or an IntEnum
        if isinstance(value, plain_type):
            return plain_type(value)
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return str(value)


def save_checkpoint(path: Path, model: nn.Module, config: TrainConfig, **extra) -> None:
    """Write a checkpoint atomically: model weights, the run's config, library versions and extra state.

    Everything except the ``*_state`` dicts is stored as plain Python types, so
    that :func:`load_checkpoint` can read it with ``weights_only=True``.
    """
    payload = {
        "model_state": model.state_dict(),
        "config": _plain(asdict(config)),
        "versions": _plain(library_versions()),
        **{key: value if key.endswith("_state") else _plain(value) for key, value in extra.items()},
    }
    temporary = path.with_name(path.name + ".tmp")
    torch.save(payload, temporary)
    os.replace(temporary, path)


def read_checkpoint(path: str | os.PathLike) -> dict:
    """The dict stored in a checkpoint file, read with ``weights_only=True`` (no code can run).

    Every failure raises :class:`LungsegCheckpointError` naming the file and what to do.
    """
    path = Path(path)
    if not path.exists():
        raise LungsegCheckpointError(
            f"Checkpoint not found: {path}. Train a model first (chapter 03 or `python lungseg_utils.py train`) "
            "or give the path of its best.pt."
        )
    if path.is_dir():
        raise LungsegCheckpointError(f"{path}: is a folder; give the checkpoint file inside it (e.g. {path / 'best.pt'}).")
    if path.stat().st_size == 0:
        raise LungsegCheckpointError(f"{path}: the file is empty (0 bytes). Copy it again or train again.")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if "weights only load failed" in str(error).lower():
            raise LungsegCheckpointError(
                f"{path}: refused. Besides tensors it holds Python objects whose loading could run code, "
                "and lungseg loads only tensors and plain values. Use a checkpoint written by lungseg's train(), "
                "from a source you trust."
            ) from None
        raise LungsegCheckpointError(f"{path}: not a PyTorch checkpoint ({error}). Give the best.pt written by train().") from None
    except Exception as error:
        with open(path, "rb") as f:
            is_zip = f.read(2) == b"PK"
        reason = str(error).split(". ")[0].splitlines()[0][:200]
        if is_zip:
            raise LungsegCheckpointError(
                f"{path}: the checkpoint is damaged or truncated ({reason}). Copy it again, or train again."
            ) from None
        raise LungsegCheckpointError(
            f"{path}: not a PyTorch checkpoint ({type(error).__name__}: {reason}). Give the best.pt written by train()."
        ) from None
    if not isinstance(payload, dict):
        raise LungsegCheckpointError(f"{path}: holds a {type(payload).__name__}, not a lungseg checkpoint. Use a file written by train().")
    return payload


CHECKPOINT_CONFIG_KEYS = ("encoder", "image_size")


def _checked_config(path: Path, payload: dict) -> dict:
    """The config of a checkpoint, after checking that it can rebuild a model."""
    if "model_state" not in payload or "config" not in payload:
        raise LungsegCheckpointError(f"{path}: not a lungseg checkpoint (no 'model_state'/'config'). Use a file written by train().")
    config = payload["config"]
    if not isinstance(config, dict):
        raise LungsegCheckpointError(
            f"{path}: its config is a {type(config).__name__}, not a dict. Use a checkpoint written by lungseg's train()."
        )
    missing = [key for key in CHECKPOINT_CONFIG_KEYS if key not in config]
    if missing:
        raise LungsegCheckpointError(f"{path}: its config lacks {', '.join(missing)}. Use a checkpoint written by lungseg's train().")
    if config["encoder"] not in smp.encoders.get_encoder_names():
        raise LungsegCheckpointError(
            f"{path}: unknown encoder {config['encoder']!r} (segmentation-models-pytorch {smp.__version__} does not "
            "have it). Use a checkpoint of a known encoder such as resnet34, or update segmentation-models-pytorch."
        )
    size = config["image_size"]
    if not isinstance(size, int) or size <= 0 or size % 32:
        raise LungsegCheckpointError(f"{path}: image_size {size!r} is not a positive multiple of 32. Use a checkpoint written by train().")
    return config


def load_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild the model stored in a checkpoint of :func:`train` (``weights_only=True``, no code runs).

    The returned model carries ``lungseg_config`` (its TrainConfig as a dict) and
    ``lungseg_checkpoint`` (the file it came from). A missing, damaged or unsafe
    file, a config that cannot rebuild the model and weights of another
    architecture each raise :class:`LungsegCheckpointError` naming the file.
    """
    path = Path(path)
    payload = read_checkpoint(path)
    config = _checked_config(path, payload)
    model = build_model(config["encoder"], weights=None, skip_connections=config.get("skip_connections", True))
    try:
        model.load_state_dict(payload["model_state"])
    except (RuntimeError, TypeError, AttributeError) as error:
        raise LungsegCheckpointError(
            f"{path}: weights do not fit a U-Net with encoder {config['encoder']!r} "
            f"(checkpoint of another architecture?): {str(error).splitlines()[0]}"
        ) from None
    model.lungseg_config = {**config, "weights_loaded": payload.get("weights_loaded", "unknown"), "epoch": payload.get("epoch"),
                            "lung_fraction_range": payload.get("lung_fraction_range")}
    model.lungseg_checkpoint = path
    return model.to(device).eval()


def learning_rate_schedule(config: TrainConfig, steps_per_epoch: int) -> np.ndarray:
    """The learning rate of every training step that ``config``'s schedule gives (for plotting it)."""
    weight = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.Adam([weight], lr=config.lr)
    scheduler = _make_scheduler(optimizer, config, steps_per_epoch)
    rates = []
    for _ in range(config.epochs * steps_per_epoch):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
    return np.array(rates)


def plot_history(history: pd.DataFrame, path: str | os.PathLike | None = None):
    """Loss and validation Dice per epoch; saved to ``path`` when given. Returns the figure."""
    import matplotlib

    if path is not None and "matplotlib.pyplot" not in sys.modules:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_dice) = plt.subplots(1, 2, figsize=(10, 3.5))
    ax_loss.plot(history["epoch"], history["train_loss"], "o-", label="train")
    ax_loss.plot(history["epoch"], history["val_loss"], "o-", label="validation")
    ax_loss.set(xlabel="epoch", ylabel="DiceBCE loss", title="Loss")
    ax_loss.legend()
    ax_dice.plot(history["epoch"], history["val_dice"], "o-", color="tab:green")
    ax_dice.set(xlabel="epoch", ylabel="per-image Dice", title="Validation Dice")
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=100)
    return fig


def train(
    train_arrays: tuple[np.ndarray, np.ndarray],
    val_arrays: tuple[np.ndarray, np.ndarray],
    run_dir: str | os.PathLike,
    config: TrainConfig | None = None,
    resume: bool = False,
    on_epoch_end: Callable[[dict], None] | None = None,
) -> TrainResult:
    """Train a U-Net with DiceBCE and Adam; early stopping on validation loss.

    Writes into ``run_dir``: ``best.pt`` (lowest validation loss), ``last.pt``
    (everything needed to resume), ``history.csv`` and ``curves.png``. An existing
    non-empty ``run_dir`` is never overwritten: pass ``resume=True`` to continue
    from its ``last.pt``, or choose a new folder. ``on_epoch_end`` receives each
    epoch's record (raise from it to stop, e.g. to simulate an interruption).
    """
    config = config or TrainConfig()
    run_dir = Path(run_dir)
    last_path, best_path = run_dir / "last.pt", run_dir / "best.pt"
    if run_dir.exists() and any(run_dir.iterdir()) and not resume:
        raise FileExistsError(
            f"{run_dir} already holds a run. Pass resume=True to continue it, or use a new folder "
            "(this code never overwrites a run)."
        )
    if resume and not last_path.is_file():
        raise FileNotFoundError(f"Nothing to resume: {last_path} does not exist.")
    check_arrays(*train_arrays, image_size=config.image_size)
    check_arrays(*val_arrays, image_size=config.image_size)
    state = read_checkpoint(last_path) if resume else None
    if state is not None:
        _check_same_config(last_path, state["config"], config)
    run_dir.mkdir(parents=True, exist_ok=True)

    device = pick_device(config.device)
    amp_dtype = autocast_dtype(device) if config.mixed_precision else None
    seed_everything(config.seed)
    model = build_model(config.encoder, config.weights, config.skip_connections)
    model = model.to(device).to(memory_format=torch.channels_last)
    train_loader = DataLoader(
        LungDataset(*train_arrays, augmentation_for(config), equalize=config.equalize),
        batch_size=config.batch_size, shuffle=True, drop_last=len(train_arrays[0]) > config.batch_size,
        num_workers=config.num_workers, pin_memory=device.type == "cuda", worker_init_fn=seed_worker,
    )
    val_loader = DataLoader(LungDataset(*val_arrays, equalize=config.equalize), batch_size=config.batch_size, num_workers=config.num_workers)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    scheduler = _make_scheduler(optimizer, config, len(train_loader))
    loss_fn = DiceBCELoss(bce_weight=config.bce_weight, dice_weight=config.dice_weight)
    scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None

    records: list[dict] = []
    start_epoch, best_val_loss, best_epoch, stale = 1, math.inf, 0, 0
    if state is not None:
        model.load_state_dict(state["model_state"])
        optimizer.load_state_dict(state["optimizer_state"])
        if scheduler is not None:
            scheduler.load_state_dict(state["scheduler_state"])
        if scaler is not None and state.get("scaler_state"):
            scaler.load_state_dict(state["scaler_state"])
        records = list(state.get("history") or pd.read_csv(run_dir / "history.csv").to_dict("records"))
        pd.DataFrame(records).to_csv(run_dir / "history.csv", index=False)  # last.pt is the reference
        start_epoch, best_val_loss = state["epoch"] + 1, state["best_val_loss"]
        best_epoch, stale = state["best_epoch"], state["stale_epochs"]
        print(f"Resuming {run_dir.name} after epoch {state['epoch']} (best so far: epoch {best_epoch}).")

    print(f"Training on {device} ({amp_dtype or 'fp32'}), {len(train_arrays[0])} train / "
          f"{len(val_arrays[0])} val images at {config.image_size}px, weights: {model.lungseg_config['weights']}")
    started = time.perf_counter()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for epoch in range(start_epoch, config.epochs + 1):
        if stale >= config.patience:
            break
        seed_everything(config.seed + epoch)
        train_loader.dataset.transform.set_random_seed(config.seed + epoch)
        epoch_start = time.perf_counter()
        train_loss, _ = _run_epoch(model, train_loader, loss_fn, device, amp_dtype, optimizer, scheduler, scaler, f"epoch {epoch} train")
        train_seconds = time.perf_counter() - epoch_start
        val_loss, val_dice = _run_epoch(model, val_loader, loss_fn, device, amp_dtype, desc=f"epoch {epoch} val")
        improved = val_loss < best_val_loss
        if improved:
            best_val_loss, best_epoch, stale = val_loss, epoch, 0
            save_checkpoint(best_path, model, config, epoch=epoch, val_loss=val_loss, weights_loaded=str(model.lungseg_config["weights"]),
                            lung_fraction_range=lung_fraction_range(train_arrays[1]))
        else:
            stale += 1
        record = dict(
            epoch=epoch, train_loss=train_loss, val_loss=val_loss, val_dice=val_dice,
            lr=optimizer.param_groups[0]["lr"], epoch_seconds=time.perf_counter() - epoch_start,
            train_images_per_s=len(train_loader.dataset) / train_seconds,
        )
        records.append(record)
        save_checkpoint(
            last_path, model, config, epoch=epoch, optimizer_state=optimizer.state_dict(),
            scheduler_state=scheduler.state_dict() if scheduler is not None else {},
            scaler_state=scaler.state_dict() if scaler is not None else {},
            best_val_loss=best_val_loss, best_epoch=best_epoch, stale_epochs=stale, history=records,
        )
        pd.DataFrame(records).to_csv(run_dir / "history.csv", index=False)
        print(f"epoch {epoch:2d}  train loss {train_loss:.4f}  val loss {val_loss:.4f}  val Dice {val_dice:.4f}  "
              f"{record['epoch_seconds']:.0f}s  {record['train_images_per_s']:.1f} img/s{'  *best*' if improved else ''}")
        if on_epoch_end is not None:
            on_epoch_end(record)
    else:
        epoch = config.epochs
    wall = time.perf_counter() - started
    history = pd.DataFrame(records)
    import matplotlib.pyplot as plt

    plt.close(plot_history(history, run_dir / "curves.png"))
    extra = {}
    if device.type == "cuda":
        extra["peak_gpu_memory_gb"] = torch.cuda.max_memory_allocated() / 1e9
    if stale >= config.patience:
        print(f"Early stopping: no better validation loss for {config.patience} epochs.")
    best_model = load_checkpoint(best_path, device)
    return TrainResult(best_model, history, run_dir, best_epoch, best_val_loss, wall, str(device), extra)


RESUME_MAY_DIFFER = ("device", "num_workers")
# The first recipe's augmentation, without contrast normalisation (before issue 10), and so what a run did
# before its config had these fields.
FIRST_RECIPE_AUGMENTATION = dict(clahe=False, strong_photometric=False, opacity_p=0.0, framing=False, equalize=False)


def _check_same_config(path: Path, stored: dict, config: TrainConfig) -> None:
    """Refuse to resume with a config that differs from the stored one (except device and workers).

    A field that the stored config lacks (saved before the field existed) counts
    as the value that older versions used (:data:`FIRST_RECIPE_AUGMENTATION`), else as its default.
    """
    current = _plain(asdict(config))
    defaults = _plain(asdict(TrainConfig())) | FIRST_RECIPE_AUGMENTATION
    differences = [
        f"{key} (stored {stored.get(key, defaults[key])!r}, now {value!r})"
        for key, value in current.items()
        if key not in RESUME_MAY_DIFFER and stored.get(key, defaults[key]) != value
    ]
    if differences:
        raise LungsegCheckpointError(
            f"Cannot resume {path}: the config differs in {'; '.join(differences)}. Resume with the stored "
            "config, or start a new run in a new folder."
        )


def seed_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: each worker gets its own, repeatable augmentation stream.

    PyTorch gives worker ``i`` the seed ``base_seed + i``, where ``base_seed`` is
    drawn from the (seeded) main process each epoch; without this, every worker
    would copy the same Albumentations generator and augment identically.
    """
    info = torch.utils.data.get_worker_info()
    seed = info.seed % 2**32
    random.seed(seed)
    np.random.seed(seed)
    transform = getattr(info.dataset, "transform", None)
    if transform is not None:
        transform.set_random_seed(seed)


def train_config_for_mode(quick: bool | None = None, **overrides) -> TrainConfig:
    """Chapter 03's recipe (the :class:`TrainConfig` defaults) for a full run, or for the quick CI run (small size, two epochs)."""
    run = RunConfig.for_mode(quick)
    values = dict(image_size=run.image_size, epochs=run.epochs, batch_size=run.batch_size, patience=run.patience)
    values.update(overrides)
    return TrainConfig(**values)


CHAPTER_RUN_DIR = REPO_DIR / "runs" / "dicebce-256px"
# Where a Colab learner may keep chapter 03's checkpoint between sessions (only if they mount Google Drive).
DRIVE_CHECKPOINT = Path("/content/drive/MyDrive/lungseg/dicebce-256px/best.pt")


def find_checkpoint(path: str | os.PathLike | None = None) -> Path | None:
    """The trained model the later chapters use, or None when there is none.

    ``path`` if given, else ``$LUNGSEG_CHECKPOINT``, else ``runs/dicebce-256px/best.pt``
    (written by chapter 03), else the Google Drive copy on Colab (:data:`DRIVE_CHECKPOINT`).
    """
    if path or os.environ.get("LUNGSEG_CHECKPOINT"):
        candidates = [Path(path or os.environ["LUNGSEG_CHECKPOINT"])]
    else:
        candidates = [CHAPTER_RUN_DIR / "best.pt", DRIVE_CHECKPOINT]
    return next((candidate for candidate in candidates if candidate.is_file()), None)


QUICK_MODEL_BANNER = """
+------------------------------------------------------------------------------------------+
| NO TRAINED MODEL FOUND: training a QUICK model instead ({details}).
| Its scores are NOT the stored ones and its masks are rough; it only lets the code run.
| To get the real model: run chapter 03 (minutes on a GPU; on a 2-core CPU half an hour with
| native bf16, about two hours without), or
| set LUNGSEG_CHECKPOINT to its best.pt, or on Colab keep it in Google Drive at
| MyDrive/lungseg/dicebce-256px/best.pt (mount Drive first).
+------------------------------------------------------------------------------------------+
"""


def describe_augmentation(config: dict) -> str:
    """The augmentation a stored config trained with, in words (older checkpoints: :data:`FIRST_RECIPE_AUGMENTATION`)."""
    values = FIRST_RECIPE_AUGMENTATION | {key: config[key] for key in FIRST_RECIPE_AUGMENTATION if key in config}
    parts = [label for key, label in (("framing", "framing"), ("strong_photometric", "strong photometric"), ("clahe", "CLAHE"))
             if values[key]]
    if values["opacity_p"]:
        parts.append(f"simulated opacities (p {values['opacity_p']})")
    return "augmentation: " + (" + ".join(parts) if parts else "the first, mild recipe")


def describe_model(model: nn.Module, checkpoint: Path) -> str:
    """One line saying which checkpoint a model comes from and how it was trained."""
    c = model.lungseg_config
    initial = "random init" if c["weights_loaded"] in ("None", None) else c["weights_loaded"]
    return (f"checkpoint {checkpoint.parent.name}/{checkpoint.name}: {c['encoder']} U-Net, {c['image_size']}px, "
            f"Adam lr {c['lr']} ({c['schedule']}), best epoch {c['epoch']} of up to {c['epochs']}, "
            f"initial encoder weights: {initial}, {describe_augmentation(c)}"
            + (", every input equalised with CLAHE" if c.get("equalize") else ""))


def load_chapter_model(
    data_dir: str | os.PathLike | None = None, checkpoint: str | os.PathLike | None = None
) -> tuple[nn.Module, str]:
    """Chapter 03's model for the chapters that use it, never silently replaced by another.

    Loads the checkpoint of :func:`find_checkpoint`. Without one: on a CUDA GPU
    it trains chapter 03's recipe into ``runs/dicebce-256px`` (a few minutes) and
    says so; elsewhere it prints a banner and trains the quick-mode model, whose
    scores are not the stored ones. Returns the model and one line saying where
    it comes from.
    """
    found = find_checkpoint(checkpoint)
    if found is not None:
        model = load_checkpoint(found, pick_device())
        return model, describe_model(model, found)
    device = pick_device()
    split = three_way_split(build_pairs_table(data_dir))
    if device.type == "cuda":
        config = train_config_for_mode(quick=False)
        print(f"No trained checkpoint found: training chapter 03's recipe on this GPU now ({config.epochs} epochs "
              f"at {config.image_size}px, a few minutes) into runs/{CHAPTER_RUN_DIR.name}/.")
        result = train(load_arrays(split["train"], config.image_size), load_arrays(split["val"], config.image_size),
                       CHAPTER_RUN_DIR, config, resume=(CHAPTER_RUN_DIR / "last.pt").is_file())
        best = CHAPTER_RUN_DIR / "best.pt"
        return result.model, describe_model(result.model, best) + " (trained just now by this chapter)"
    run = RunConfig.for_mode(quick=True)
    split = quick_subset(split, run.max_images)
    config = train_config_for_mode(quick=True)
    details = f"{len(split['train'])} images, {config.image_size}px, {config.epochs} epochs, on the {device.type.upper()}"
    print(QUICK_MODEL_BANNER.format(details=details))
    result = train(load_arrays(split["train"], config.image_size), load_arrays(split["val"], config.image_size),
                   temporary_run_dir(), config)
    return result.model, f"quick-mode model trained just now ({details}): for trying the code, not for its scores"


def temporary_run_dir(prefix: str = "lungseg-quick-") -> Path:
    """A new run folder in the system's temporary folder, removed when Python exits (for quick runs).

    It lives as long as the process, so that a model's ``best.pt`` stays usable
    (e.g. by the command line) until the notebook or script ends.
    """
    folder = Path(tempfile.mkdtemp(prefix=prefix))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder / "run"


def unique_run_dir(base: str | os.PathLike = REPO_DIR / "runs", prefix: str = "run") -> Path:
    """A new folder name under ``base`` (``prefix-YYYYmmdd-HHMMSS``), never an existing one."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    candidate = Path(base) / f"{prefix}-{stamp}"
    n = 1
    while candidate.exists():
        n += 1
        candidate = Path(base) / f"{prefix}-{stamp}-{n}"
    return candidate


# --------------------------------------------------------------------------
# Inference and figures
# --------------------------------------------------------------------------


@torch.no_grad()
def predict_arrays(
    model: nn.Module, images: np.ndarray, device: str | torch.device | None = None, batch_size: int = 16, tta_flip: bool = False
) -> np.ndarray:
    """Lung probabilities ``(N, H, W)`` for 8-bit images already at the model's size.

    ``tta_flip`` averages with the prediction on the horizontally flipped image.
    A model trained with ``equalize`` (its checkpoint says so) gets every image
    through :func:`equalize_contrast` first, as in its training.
    """
    prepare = equalize_contrast if getattr(model, "lungseg_config", {}).get("equalize") else np.asarray
    if device is not None:
        device = torch.device(device)
        model.to(device)
    else:
        device = next(model.parameters()).device
    amp_dtype = autocast_dtype(device)
    model.eval()
    outputs = []
    for start in range(0, len(images), batch_size):
        batch = torch.stack([image_to_tensor(prepare(im)) for im in images[start : start + batch_size]])
        batch = batch.to(device).contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext():
            probs = torch.sigmoid(model(batch).float())
            if tta_flip:
                probs = (probs + torch.sigmoid(model(batch.flip(-1)).float()).flip(-1)) / 2
        outputs.append(probs[:, 0].float().cpu().numpy())
    return np.concatenate(outputs) if outputs else np.zeros((0, *images.shape[1:]), np.float32)


def postprocess_mask(mask: np.ndarray, keep_components: int = 2, fill_holes: bool = True) -> np.ndarray:
    """Keep the ``keep_components`` largest connected regions (the two lungs) and fill holes."""
    mask = mask.astype(np.uint8)
    count, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    if count - 1 > keep_components:
        areas = stats[1:, cv2.CC_STAT_AREA]
        keep = 1 + np.argsort(areas)[::-1][:keep_components]
        mask = np.isin(labels, keep).astype(np.uint8)
    if fill_holes:
        mask = ndimage.binary_fill_holes(mask).astype(np.uint8)
    return mask


def model_image_size(model: nn.Module, default: int = 256) -> int:
    """The input size a model was trained at (from its checkpoint config), else ``default``."""
    return int(getattr(model, "lungseg_config", {}).get("image_size", default))


class LungsegWarning(UserWarning):
    """A mask that looks implausible: check the image and the result before using it."""


# Lung fraction (share of the image) of the 704 manual masks at 256 px: min 0.085, max 0.435, here
# rounded outwards. Used for models whose checkpoint does not record the range of their training masks.
# With it, 1 of the 704 manual masks draws a warning (CHNCXR_0361_1: three lung-sized regions);
# benchmarks/plausibility_on_data.py measures both, log in results/plausibility/.
DEFAULT_LUNG_FRACTION_RANGE = (0.08, 0.44)
LARGE_REGION_SHARE = 0.01  # a region covering at least 1% of the image counts as a lung-sized region


def lung_fraction_range(masks: np.ndarray) -> tuple[float, float]:
    """Smallest and largest lung fraction among masks ``(N, H, W)``, rounded outwards to 0.01."""
    fractions = masks.reshape(len(masks), -1).mean(axis=1)
    return math.floor(fractions.min() * 100) / 100, math.ceil(fractions.max() * 100) / 100


def inversion_margin(image: np.ndarray) -> float:
    """Mean grey level of the mediastinum minus that of the lung fields, at 256 px (negative: looks inverted).

    In a chest X-ray the spine and heart (central strip) are brighter than the
    air-filled lung fields on either side.
    """
    small = resize_image(to_gray_uint8(image), 256).astype(np.float32)
    mediastinum = small[64:192, 115:141].mean()
    fields = np.concatenate([small[64:154, 38:90].ravel(), small[64:154, 166:218].ravel()]).mean()
    return float(mediastinum - fields)


def looks_inverted(image: np.ndarray) -> bool:
    """True when the lung fields are brighter than the mediastinum: a MONOCHROME1 film read as MONOCHROME2.

    On the 800 X-rays of the data set this flags none of them and all of their
    inverted copies, with a smallest margin of 9.5 grey levels
    (``benchmarks/plausibility_on_data.py``, log in ``results/plausibility/``).
    """
    return inversion_margin(image) < 0


def mask_warnings(
    mask: np.ndarray, image: np.ndarray, fraction_range: tuple[float, float] = DEFAULT_LUNG_FRACTION_RANGE
) -> list[str]:
    """Reasons to distrust a predicted lung mask (empty list when it looks plausible).

    Checks: the lung fraction lies within ``fraction_range`` (the range of the
    training masks); at most two lung-sized regions; a lung-sized region on each
    side of the image; an image that does not look inverted (:func:`looks_inverted`).
    """
    reasons = []
    fraction = float(mask.mean())
    low, high = fraction_range
    if not low <= fraction <= high:
        reasons.append(f"lungs cover {fraction:.1%} of the image, outside the {low:.1%}-{high:.1%} of the training masks")
    count, _, stats, centroids = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    large = stats[1:, cv2.CC_STAT_AREA] >= LARGE_REGION_SHARE * mask.size
    if large.sum() > 2:
        reasons.append(f"{int(large.sum())} lung-sized regions, where a chest has two lungs")
    xs = centroids[1:, 0][large]
    for present, side, lung in ((xs < mask.shape[1] / 2, "left", "right"), (xs >= mask.shape[1] / 2, "right", "left")):
        if not present.any():
            reasons.append(f"no lung found on the image's {side} side (the patient's {lung} lung)")
    if looks_inverted(image):
        reasons.append("the image looks inverted (lung fields brighter than the spine): "
                       "a MONOCHROME1 X-ray shown as MONOCHROME2? Invert it and try again")
    return reasons


def model_lung_fraction_range(model: nn.Module) -> tuple[float, float]:
    """The lung fraction range of a model's training masks (from its checkpoint), else the data set's."""
    stored = getattr(model, "lungseg_config", {}).get("lung_fraction_range")
    return tuple(stored) if stored else DEFAULT_LUNG_FRACTION_RANGE


def _as_gray(image: str | os.PathLike | bytes | np.ndarray) -> np.ndarray:
    """A file, its bytes or an array of any kind as a size-checked 8-bit gray image."""
    if isinstance(image, (str, os.PathLike, bytes)):
        return decode_image(image)
    gray = to_gray_uint8(np.asarray(image), "array")
    check_image_size(gray.shape[1], gray.shape[0], "array")
    return gray


def predict_proba(model: nn.Module, image: str | os.PathLike | bytes | np.ndarray, size: int | None = None) -> np.ndarray:
    """Lung probability map at the image's original size, for a file, its bytes or an array of any kind."""
    gray = _as_gray(image)
    size = size or model_image_size(model)
    probs = predict_arrays(model, resize_image(gray, size)[None])[0]
    return cv2.resize(probs, (gray.shape[1], gray.shape[0]), interpolation=cv2.INTER_LINEAR)


def predict(
    model: nn.Module,
    image: str | os.PathLike | bytes | np.ndarray,
    threshold: float = 0.5,
    postprocess: bool = False,
    size: int | None = None,
    warn: bool = True,
) -> np.ndarray:
    """Binary lung mask (0/1 ``uint8``) at the image's original size.

    ``image`` is a path, a file's bytes or an array: any size up to the limit of
    :func:`check_image_size`, 8 or 16 bit, gray or RGB(A), or DICOM.
    ``postprocess`` keeps the two largest regions and fills holes. With ``warn``,
    an implausible mask (:func:`mask_warnings`) raises a :class:`LungsegWarning`.
    """
    gray = _as_gray(image)
    mask = (predict_proba(model, gray, size) > threshold).astype(np.uint8)
    if postprocess:
        mask = postprocess_mask(mask)
    if warn:
        label = Path(image).name if isinstance(image, (str, os.PathLike)) else "image"
        for reason in mask_warnings(mask, gray, model_lung_fraction_range(model)):
            warnings.warn(f"{label}: {reason}", LungsegWarning, stacklevel=2)
    return mask


def overlay(image: np.ndarray, mask: np.ndarray, color: tuple[int, int, int] = (0, 200, 0), alpha: float = 0.4) -> np.ndarray:
    """RGB picture of an X-ray with ``mask`` tinted in ``color`` and its outline drawn."""
    gray = to_gray_uint8(np.asarray(image))
    rgb = np.repeat(gray[:, :, None], 3, axis=2).astype(np.float32)
    tint = mask.astype(bool)
    rgb[tint] = (1 - alpha) * rgb[tint] + alpha * np.array(color, np.float32)
    out = rgb.astype(np.uint8)
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    cv2.drawContours(out, contours, -1, color, max(1, gray.shape[0] // 256))
    return out


ERROR_COLOURS = {
    "true positive: lung found": (0, 180, 0),
    "false positive: marked, not lung": (230, 30, 30),
    "false negative: lung missed": (40, 90, 255),
}


def error_overlay(image: np.ndarray, pred: np.ndarray, truth: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """RGB picture: true positives green, false positives red, false negatives blue (:data:`ERROR_COLOURS`)."""
    gray = to_gray_uint8(np.asarray(image))
    rgb = np.repeat(gray[:, :, None], 3, axis=2).astype(np.float32)
    pred, truth = pred.astype(bool), truth.astype(bool)
    regions = (pred & truth, pred & ~truth, ~pred & truth)
    for region, color in zip(regions, ERROR_COLOURS.values()):
        rgb[region] = (1 - alpha) * rgb[region] + alpha * np.array(color, np.float32)
    return rgb.astype(np.uint8)


def error_legend(figure, **legend_options) -> None:
    """Add the legend of :func:`error_overlay`'s colours below a matplotlib figure."""
    from matplotlib.patches import Patch

    handles = [Patch(color=np.array(color) / 255, label=label) for label, color in ERROR_COLOURS.items()]
    options = dict(loc="lower center", ncol=3, frameon=False, bbox_to_anchor=(0.5, -0.02))
    figure.legend(handles=handles, **{**options, **legend_options})


def overlay_png_bytes(image: np.ndarray, mask: np.ndarray, max_side: int = 512) -> bytes:
    """The :func:`overlay` picture as PNG bytes, scaled down to at most ``max_side`` pixels per side."""
    scale = min(1.0, max_side / max(image.shape[:2]))
    picture = overlay(image, mask)
    if scale < 1:
        picture = cv2.resize(picture, (round(picture.shape[1] * scale), round(picture.shape[0] * scale)), interpolation=cv2.INTER_AREA)
    return cv2.imencode(".png", cv2.cvtColor(picture, cv2.COLOR_RGB2BGR))[1].tobytes()


def mask_png_bytes(mask: np.ndarray) -> bytes:
    """A 0/1 mask encoded as an 8-bit PNG (0 = background, 255 = lung)."""
    return cv2.imencode(".png", mask.astype(np.uint8) * 255)[1].tobytes()


class SegmentationApp:
    """An ipywidgets interface: upload an X-ray, see the lung mask, its area, and download it.

    ``process(data, name)`` is the upload callback; it returns the result dict, or
    None after writing a message into the widget when the file is bad.
    """

    def __init__(self, model: nn.Module, postprocess: bool = True):
        import ipywidgets as widgets

        self.model, self.postprocess = model, postprocess
        self.upload = widgets.FileUpload(accept=".png,.jpg,.jpeg,.tif,.tiff,.bmp,.dcm,.dicom", multiple=False, description="X-ray")
        self.message = widgets.HTML("Upload a chest X-ray (PNG, JPEG, TIFF, BMP, 8 or 16 bit, or DICOM).")
        # An Image widget, not an Output widget: nbclient imitates a front end for Output widgets by
        # sending on the kernel's shell channel while it waits on it, which can hang a notebook run
        # (jupyter/nbclient#312); an Image widget only carries the PNG bytes.
        self.picture = widgets.Image(format="png", layout=widgets.Layout(max_width="512px"))
        self.download = widgets.HTML()
        self.upload.observe(self._on_upload, names="value")
        self.widget = widgets.VBox([self.upload, self.message, self.picture, self.download])

    def _on_upload(self, change: dict) -> None:
        for item in change["new"]:
            self.process(bytes(item["content"]), item["name"])

    def process(self, data: bytes, name: str) -> dict | None:
        """Segment one uploaded file and show the result; bad files give a message, not a traceback."""
        import base64
        import html

        self.picture.value = b""
        self.download.value = ""
        try:
            gray = decode_image(data, name)
            mask = predict(self.model, gray, postprocess=self.postprocess, warn=False)
        except LungsegDataError as error:
            self.message.value = f"<span style='color:#b00020'>Could not segment this file: {html.escape(str(error))}</span>"
            return None
        area = int(mask.sum())
        reasons = mask_warnings(mask, gray, model_lung_fraction_range(self.model))
        self.message.value = (f"<b>{html.escape(name)}</b>: {gray.shape[1]}x{gray.shape[0]} px, lung area "
                              f"{area:,d} px = {area / mask.size:.1%} of the image"
                              + "".join(f"<br><span style='color:#b36b00'>Check this mask: {html.escape(r)}</span>" for r in reasons))
        encoded = base64.b64encode(mask_png_bytes(mask)).decode()
        stem = html.escape(Path(name).stem)
        self.download.value = f"<a download='{stem}_mask.png' href='data:image/png;base64,{encoded}'>Download the mask (PNG)</a>"
        self.picture.value = overlay_png_bytes(gray, mask)
        return dict(name=name, gray=gray, mask=mask, lung_pixels=area, lung_fraction=area / mask.size, warnings=reasons)


# --------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------


def evaluate(
    model: nn.Module,
    rows: pd.DataFrame,
    size: int | None = None,
    original_resolution: bool = True,
    threshold: float = 0.5,
    postprocess: bool = False,
    tta_flip: bool = False,
    cache_dir: str | os.PathLike | None = None,
) -> pd.DataFrame:
    """Per-image Dice, IoU and HD95 at the model's size and (optionally) at the original size.

    Returns one row per image with the table's columns plus ``dice``, ``iou``,
    ``hd95`` (nan where nothing was predicted), ``empty_prediction`` and, at the original resolution, ``dice_orig``, ``iou_orig``,
    ``hd95_orig``. The model-size probabilities are kept in ``.attrs["probs"]``.
    """
    size = size or model_image_size(model)
    images, masks = load_arrays(rows, size, cache_dir)
    probs = predict_arrays(model, images, tta_flip=tta_flip)
    preds = (probs > threshold).astype(np.uint8)
    if postprocess:
        preds = np.stack([postprocess_mask(p) for p in preds])
    result = rows.reset_index(drop=True).copy()
    result["dice"], result["iou"] = dice_iou_per_image(preds, masks)
    result["hd95"] = [hausdorff95(p, m) for p, m in zip(preds, masks)]
    result["empty_prediction"] = preds.reshape(len(preds), -1).max(axis=1) == 0 if len(preds) else []
    if original_resolution:
        scores = []
        for prob, (_, row) in zip(probs, result.iterrows()):
            _, full_mask = read_pair(row["image_path"], row["mask_paths"])
            full_prob = cv2.resize(prob, (full_mask.shape[1], full_mask.shape[0]), interpolation=cv2.INTER_LINEAR)
            full_pred = (full_prob > threshold).astype(np.uint8)
            if postprocess:
                full_pred = postprocess_mask(full_pred)
            dice, iou = dice_iou_per_image(full_pred[None], full_mask[None])
            scores.append((dice[0], iou[0], hausdorff95(full_pred, full_mask)))
        result["dice_orig"], result["iou_orig"], result["hd95_orig"] = map(list, zip(*scores))
    result.attrs["probs"] = probs
    result.attrs["masks"] = masks
    return result


ERROR_ZONES = ("apices", "heart border", "bases / costophrenic angles", "rest of the outline")


def error_zones(pred: np.ndarray, truth: np.ndarray, band: int | None = None) -> dict[str, float]:
    """Where a predicted mask's errors lie, per unit of area: one value per zone of :data:`ERROR_ZONES`.

    Errors are pixels where prediction and truth disagree. The zones are disjoint
    parts of a band of ``band`` pixels (default: 4% of the image side) on either
    side of the true lung outline, cut by the true lungs' bounding box: apices
    (its top fifth), bases and costophrenic angles (its bottom fifth), the heart
    border (the inner half of the patient's left lung in between, below the
    middle) and the rest of the outline. Each value is the share of that zone's
    pixels that are wrong, so a large zone does not win by being large. Errors
    outside the band (stray islands) are in ``"far from the outline"``, as a
    share of the rest of the image.
    """
    pred, truth = pred.astype(bool), truth.astype(bool)
    if not truth.any():
        raise LungsegDataError("error_zones needs a true mask with lung in it.")
    band = band or max(2, round(0.04 * truth.shape[1]))
    distance_outside = ndimage.distance_transform_edt(~truth)
    distance_inside = ndimage.distance_transform_edt(truth)
    near = (distance_outside <= band) & (distance_inside <= band)
    errors = pred ^ truth
    ys, xs = np.nonzero(truth)
    top, bottom, left, right = ys.min(), ys.max(), xs.min(), xs.max()
    height, middle = bottom - top + 1, (left + right) / 2
    rows, cols = np.indices(truth.shape)
    apices = rows < top + height / 5
    bases = rows > bottom - height / 5
    heart = ~apices & ~bases & (rows > top + height / 2) & (cols > middle) & (cols < middle + (right - middle) / 2)
    rest = ~(apices | bases | heart)
    result = {}
    for name, zone in zip(ERROR_ZONES, (apices, heart, bases, rest)):
        area = near & zone
        result[name] = float(errors[area].mean()) if area.any() else 0.0
    result["far from the outline"] = float(errors[~near].mean()) if (~near).any() else 0.0
    return result


def _bca_interval(sample: np.ndarray, n_bootstrap: int, seed: int, paired_with: np.ndarray | None = None) -> tuple[float, float]:
    """A 95% BCa bootstrap interval of the mean (of ``sample``, or of ``sample - paired_with`` resampled in pairs)."""
    data = (sample,) if paired_with is None else (sample, paired_with)
    statistic = (lambda x, axis: np.mean(x, axis=axis)) if paired_with is None else (lambda x, y, axis: np.mean(x - y, axis=axis))
    spread = np.ptp(sample if paired_with is None else sample - paired_with)
    if len(sample) < 3 or spread == 0:  # no variation: the bootstrap has nothing to resample
        centre = float(statistic(*data, axis=0))
        return centre, centre
    result = stats.bootstrap(
        data, statistic, n_resamples=n_bootstrap, paired=paired_with is not None, vectorized=True,
        method="BCa", confidence_level=0.95, rng=np.random.default_rng(seed),
    )
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


def summarize_scores(values: Sequence[float], n_bootstrap: int = 2000, seed: int = SEED) -> dict[str, float]:
    """Mean, std, median, 5th and 95th percentiles and a 95% BCa bootstrap interval of the mean.

    The interval comes from ``scipy.stats.bootstrap`` (bias-corrected and
    accelerated, which copes with skewed scores such as Dice near 1). Undefined
    values (nan, e.g. the HD95 of an empty prediction) are left out of the
    statistics and counted in ``missing``: report it beside the mean.
    """
    values = np.asarray(values, dtype=float)
    missing = int(np.isnan(values).sum())
    values = values[~np.isnan(values)]
    if len(values) == 0:
        return dict(mean=np.nan, std=np.nan, median=np.nan, p5=np.nan, p95=np.nan, ci_low=np.nan, ci_high=np.nan, n=0, missing=missing)
    ci_low, ci_high = _bca_interval(values, n_bootstrap, seed)
    return dict(
        mean=values.mean(), std=values.std(ddof=1) if len(values) > 1 else 0.0, median=np.median(values),
        p5=np.percentile(values, 5), p95=np.percentile(values, 95),
        ci_low=ci_low, ci_high=ci_high, n=len(values), missing=missing,
    )


def paired_difference(
    candidate: Sequence[float], reference: Sequence[float], n_bootstrap: int = 2000, seed: int = SEED
) -> dict[str, float]:
    """Mean of ``candidate - reference`` over the same images, with a 95% BCa interval of that mean.

    Use it whenever two variants are scored on the same images (a threshold, a
    post-processing, two recipes): the images resampled together keep their
    pairing, so the interval shows the difference itself and is much narrower
    than comparing two separate intervals (whose overlap says little either
    way). Images where either score is undefined (nan) are left out and counted
    in ``missing``. ``wins`` is the share of images where the candidate scores higher.
    """
    candidate, reference = np.asarray(candidate, dtype=float), np.asarray(reference, dtype=float)
    if candidate.shape != reference.shape:
        raise ValueError(f"Paired scores need the same images: {candidate.shape} against {reference.shape}.")
    both = ~(np.isnan(candidate) | np.isnan(reference))
    candidate, reference = candidate[both], reference[both]
    if len(candidate) == 0:
        return dict(mean_difference=np.nan, ci_low=np.nan, ci_high=np.nan, wins=np.nan, n=0, missing=int((~both).sum()))
    ci_low, ci_high = _bca_interval(candidate, n_bootstrap, seed, paired_with=reference)
    return dict(
        mean_difference=float((candidate - reference).mean()), ci_low=ci_low, ci_high=ci_high,
        wins=float((candidate > reference).mean()), n=len(candidate), missing=int((~both).sum()),
    )


# --------------------------------------------------------------------------
# Robustness: acquisition shifts
# --------------------------------------------------------------------------

SEVERITIES = {1: "mild", 2: "moderate", 3: "strong"}
# Photometric and geometric shifts: Albumentations with fixed parameters, one per severity (images at 256 px).
_SHIFT_TRANSFORMS: dict[str, Callable[[int], A.BasicTransform]] = {
    "exposure": lambda s: A.RandomBrightnessContrast(brightness_limit=(0.1 * s, 0.1 * s), contrast_limit=(0, 0), p=1),
    "gamma": lambda s: A.RandomGamma(gamma_limit=(100 + 30 * s, 100 + 30 * s), p=1),
    "contrast": lambda s: A.RandomBrightnessContrast(brightness_limit=(0, 0), contrast_limit=(-0.2 * s, -0.2 * s), p=1),
    "noise": lambda s: A.GaussNoise(std_range=(0.03 * s, 0.03 * s), p=1),
    "blur": lambda s: A.GaussianBlur(sigma_limit=(float(s), float(s)), blur_limit=0, p=1),
    "jpeg": lambda s: A.ImageCompression(quality_range=(70 - 20 * s, 70 - 20 * s), p=1),
    "low_resolution": lambda s: A.Downscale(scale_range=(1 / (1 + s), 1 / (1 + s)), p=1,  # 1/2, 1/3, 1/4 of the side
                                            interpolation_pair={"downscale": cv2.INTER_AREA, "upscale": cv2.INTER_LINEAR}),
    "rotation": lambda s: A.Affine(rotate=(5 * s, 5 * s), border_mode=cv2.BORDER_CONSTANT, fill=0, fill_mask=0, p=1),
    "zoom_out": lambda s: A.Affine(scale=(1 - 0.1 * s, 1 - 0.1 * s), border_mode=cv2.BORDER_CONSTANT, fill=0, fill_mask=0, p=1),
    "zoom_in": lambda s: A.Affine(scale=(1 + 0.1 * s, 1 + 0.1 * s), border_mode=cv2.BORDER_CONSTANT, fill=0, fill_mask=0, p=1),
    "off_centre": lambda s: A.Affine(translate_percent={"x": (0.05 * s, 0.05 * s), "y": (0, 0)},
                                     border_mode=cv2.BORDER_CONSTANT, fill=0, fill_mask=0, p=1),
}
# Painted shifts: overlays of a portable AP film, and opacities inside the lung (the mask stays: lung is still lung).
_PAINTED_SHIFTS = ("text", "lines", "consolidation", "ground_glass", "effusion")
SHIFTS = (*_SHIFT_TRANSFORMS, *_PAINTED_SHIFTS)
GEOMETRIC_SHIFTS = ("rotation", "zoom_out", "zoom_in", "off_centre")


def _one_lung(mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The mask of one lung (a random side's largest region), as bool."""
    count, labels, stats, centroids = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    if count < 2:
        return np.zeros(mask.shape, bool)
    side_left = rng.random() < 0.5
    regions = [i for i in range(1, count) if (centroids[i, 0] < mask.shape[1] / 2) == side_left] or list(range(1, count))
    largest = max(regions, key=lambda i: stats[i, cv2.CC_STAT_AREA])
    return labels == largest


def _paint_opacity(image: np.ndarray, region: np.ndarray, strength: float) -> np.ndarray:
    """Whiten ``region`` towards 230 by ``strength`` (0..1), edges softened over a few pixels; never darker."""
    weight = cv2.GaussianBlur(region.astype(np.float32), (0, 0), 2.0) * strength
    painted = np.round(image.astype(np.float32) * (1 - weight) + 230 * weight)
    return np.maximum(image, np.clip(painted, 0, 255).astype(np.uint8))


def _opacity_region(kind: str, lung: np.ndarray, share: float, rng: np.random.Generator) -> np.ndarray:
    """The part of one lung that an opacity covers: ``share`` of its area (basal for an effusion)."""
    rows, cols = np.nonzero(lung)
    if kind == "effusion":  # from the base upwards, a level surface
        cut = np.quantile(rows, 1 - share)
        return lung & (np.arange(lung.shape[0])[:, None] >= cut)
    centre = np.array([rows.mean(), cols.mean()]) + rng.normal(0, 5, 2)
    distance = np.hypot(*(np.indices(lung.shape) - centre[:, None, None]))
    radius = np.quantile(distance[lung], share)  # a blob grown from inside the lung until it covers ``share``
    return lung & (distance <= radius)


def apply_shift(
    image: np.ndarray, mask: np.ndarray, kind: str, severity: int = 2, seed: int = SEED
) -> tuple[np.ndarray, np.ndarray]:
    """An X-ray and its mask under an acquisition shift of ``severity`` 1 (mild) to 3 (strong); repeatable by ``seed``.

    ``kind`` is one of :data:`SHIFTS`: exposure, gamma, contrast, noise, blur,
    JPEG, low resolution (down then up), rotation, zoom out (the patient smaller
    in the frame, padded) or in (cropped), off-centre framing, burned-in text and
    markers, thin tube/line overlays, and simulated opacities inside one lung:
    a consolidation over 1/6, 1/3 or 1/2 of it, a fainter ground-glass haze over
    1/3, 2/3 or all of it, and a basal effusion-like whitening of its lowest 1/6,
    1/3 or 1/2. Geometric shifts move
    the mask with the image; every other shift leaves the mask as it is.
    """
    if kind not in SHIFTS or severity not in SEVERITIES:
        raise ValueError(f"Unknown shift {kind!r} or severity {severity!r}: use one of {SHIFTS} and 1, 2 or 3.")
    rng = np.random.default_rng(seed)
    if kind in _SHIFT_TRANSFORMS:
        transform = A.Compose([_SHIFT_TRANSFORMS[kind](severity)])
        transform.set_random_seed(seed)
        out = transform(image=image, mask=mask)
        return out["image"], out["mask"]
    shifted = image.copy()
    height, width = image.shape
    if kind == "text":
        labels = ["R", "AP PORTABLE", "SUPINE", "ICU BED 4"][: 2 ** (severity - 1)]
        corners = [(0.04, 0.08), (0.55, 0.08), (0.04, 0.95), (0.55, 0.95)]
        for label, (x, y) in zip(labels, corners):
            cv2.putText(shifted, label, (int(x * width), int(y * height)), cv2.FONT_HERSHEY_SIMPLEX, width / 640, 255, max(1, width // 256), cv2.LINE_AA)
        return shifted, mask
    if kind == "lines":
        for _ in range(2 ** (severity - 1)):  # tubes and wires crossing the chest from the top
            points = np.stack([rng.uniform(0.2, 0.8, 4) * width, np.linspace(0, rng.uniform(0.5, 0.9), 4) * height], axis=1)
            cv2.polylines(shifted, [points.astype(np.int32)], False, 235, max(1, width // 128), cv2.LINE_AA)
        return shifted, mask
    lung = _one_lung(mask, rng)
    if not lung.any():
        return shifted, mask
    share = {1: 1 / 6, 2: 1 / 3, 3: 1 / 2}[severity]
    strength = {"consolidation": 0.8, "ground_glass": 0.35, "effusion": 0.85}[kind]
    if kind == "ground_glass":
        share = min(1.0, 2 * share)  # haze spreads wider but fainter
    return _paint_opacity(image, _opacity_region(kind, lung, share, rng), strength), mask


def shift_benchmark(
    model: nn.Module,
    images: np.ndarray,
    masks: np.ndarray,
    names: Sequence[str] | None = None,
    shifts: Sequence[str] = SHIFTS,
    severities: Sequence[int] = tuple(SEVERITIES),
    seed: int = SEED,
    preprocess: Callable[[np.ndarray], np.ndarray] | None = None,
) -> pd.DataFrame:
    """Per-image Dice of ``model`` on clean images and under every shift and severity (:func:`apply_shift`).

    One row per image, shift and severity: ``name``, ``shift``, ``severity``,
    ``dice``, ``clean_dice`` (the same image unshifted, for paired drops) and
    ``warned`` (whether :func:`mask_warnings` flags the predicted mask). The
    clean images are the rows with shift ``"none"`` and severity 0. Each image
    gets its own seed (``seed`` + its index), the same for every shift, so a
    run repeats exactly. ``preprocess``, if given, maps each 8-bit image, clean
    or shifted, just before prediction (e.g. contrast normalisation at prediction time).
    """
    names = list(names) if names is not None else [f"image {i}" for i in range(len(images))]
    fraction_range = model_lung_fraction_range(model)

    def scored(batch_images: np.ndarray, batch_masks: np.ndarray) -> tuple[np.ndarray, list[bool]]:
        if preprocess is not None:
            batch_images = np.stack([preprocess(image) for image in batch_images])
        predictions = (predict_arrays(model, batch_images) > 0.5).astype(np.uint8)
        warned = [bool(mask_warnings(p, image, fraction_range)) for p, image in zip(predictions, batch_images)]
        return dice_iou_per_image(predictions, batch_masks)[0], warned

    clean_dice, clean_warned = scored(images, masks)
    frames = [pd.DataFrame(dict(name=names, shift="none", severity=0, dice=clean_dice, clean_dice=clean_dice, warned=clean_warned))]
    for shift in shifts:
        for severity in severities:
            pairs = [apply_shift(image, mask, shift, severity, seed=seed + i) for i, (image, mask) in enumerate(zip(images, masks))]
            shifted_images, shifted_masks = (np.stack(parts) for parts in zip(*pairs))
            dice, warned = scored(shifted_images, shifted_masks)
            frames.append(pd.DataFrame(dict(name=names, shift=shift, severity=severity, dice=dice, clean_dice=clean_dice, warned=warned)))
    return pd.concat(frames, ignore_index=True)


def summarize_shifts(benchmark: pd.DataFrame, n_bootstrap: int = 2000) -> pd.DataFrame:
    """Per shift and severity: mean Dice, its paired drop from the clean images with a 95% BCa interval, and the warning rate."""
    rows = []
    for (shift, severity), group in benchmark[benchmark["shift"] != "none"].groupby(["shift", "severity"], sort=False):
        paired = paired_difference(group["dice"], group["clean_dice"], n_bootstrap=n_bootstrap)
        rows.append(dict(shift=shift, severity=severity, dice=group["dice"].mean(), drop=-paired["mean_difference"],
                         drop_low=-paired["ci_high"], drop_high=-paired["ci_low"], warned=group["warned"].mean(), n=paired["n"]))
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------


def _cli_train(args: argparse.Namespace) -> None:
    """Train on the train part of :func:`three_way_split` and score validation and test."""
    table = build_pairs_table(args.data_dir)
    run = RunConfig.for_mode(args.quick or None)
    split = quick_subset(three_way_split(table), run.max_images)
    config = TrainConfig(
        image_size=args.size or run.image_size, epochs=args.epochs or run.epochs, lr=args.lr,
        schedule=args.schedule, weights=None if args.weights == "none" else args.weights,
    )
    arrays = {k: load_arrays(v, config.image_size) for k, v in split.items()}
    result = train(arrays["train"], arrays["val"], args.out or unique_run_dir(), config, resume=args.resume)
    for part in ("val", "test"):
        scores = evaluate(result.model, split[part], config.image_size, original_resolution=False)
        writeup_style = writeup_batch_dice(scores.attrs["probs"], scores.attrs["masks"])
        hd95 = summarize_scores(scores["hd95"])
        print(f"{part}: per-image Dice {scores['dice'].mean():.4f}  IoU {scores['iou'].mean():.4f}  "
              f"HD95 {hd95['mean']:.2f}px ({hd95['missing']} empty predictions)  "
              f"write-up batch Dice {writeup_style:.4f}  (n={len(scores)})")
    print(f"best epoch {result.best_epoch} of {len(result.history)}, wall {result.wall_seconds / 60:.1f} min, "
          f"{result.history['train_images_per_s'].mean():.1f} train img/s on {result.device}")


def _cli_predict(args: argparse.Namespace) -> int:
    """Write a PNG mask (0/255) for each input into ``--out``; go on past bad files.

    Every file that cannot be done is named with its reason, and every mask that
    looks implausible (:func:`mask_warnings`) with a warning; a one-line summary
    ends the run. Returns the exit status: 0 when every file was done (warnings
    included), else 1.
    An existing mask is never overwritten without ``--force``.
    """
    model = load_checkpoint(args.checkpoint)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    done, failed, flagged = 0, 0, 0
    for image_path in args.images:
        target = out / f"{Path(image_path).stem}_mask.png"
        try:
            if target.exists() and not args.force:
                raise LungsegError(f"{target} exists; pass --force to overwrite it.")
            gray = decode_image(image_path)
            mask = predict(model, gray, threshold=args.threshold, postprocess=not args.raw, warn=False)
            if not cv2.imwrite(str(target), mask * 255):
                raise LungsegError(f"could not write {target}; check that the folder is writable.")
            reasons = mask_warnings(mask, gray, model_lung_fraction_range(model))
        except LungsegError as error:
            failed += 1
            reason = str(error).removeprefix(f"{image_path}: ")  # most messages start with the file name
            print(f"FAILED {image_path}: {reason}", file=sys.stderr)
            continue
        except Exception as error:  # a batch goes on; the reason is still named
            failed += 1
            print(f"FAILED {image_path}: unexpected {type(error).__name__}: {error}", file=sys.stderr)
            continue
        done += 1
        flagged += bool(reasons)
        print(f"{image_path} -> {target}  (lung fraction {mask.mean():.3f})")
        for reason in reasons:
            print(f"WARNING {image_path}: {reason}", file=sys.stderr)
    print(f"{done} done ({flagged} with warnings), {failed} failed, of {len(args.images)} files.")
    return 1 if failed else 0


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point: ``download``, ``train`` and ``predict``; returns the exit status."""
    parser = argparse.ArgumentParser(prog="lungseg_utils.py", description="Lung segmentation in chest X-rays.")
    commands = parser.add_subparsers(dest="command", required=True)
    download = commands.add_parser("download", help="download the public data sets into a folder")
    download.add_argument("--target", default=str(REPO_DIR / "data"))
    download.add_argument("--montgomery", action="store_true", help="also fetch the NLM Montgomery zip")
    trainer = commands.add_parser("train", help="train a U-Net/ResNet34 on the three-way split")
    trainer.add_argument("--data-dir", default=None)
    trainer.add_argument("--out", default=None, help="new run folder (default runs/run-<time>)")
    trainer.add_argument("--size", type=int, default=None)
    trainer.add_argument("--epochs", type=int, default=None)
    trainer.add_argument("--lr", type=float, default=TrainConfig.lr, help=f"peak learning rate (default {TrainConfig.lr})")
    trainer.add_argument("--schedule", default=TrainConfig.schedule, choices=["constant", "onecycle"])
    trainer.add_argument("--weights", default="none", help="none (default: from scratch, as chapter 03), imagenet or a weights file")
    trainer.add_argument("--quick", action="store_true")
    trainer.add_argument("--resume", action="store_true")
    predictor = commands.add_parser("predict", help="segment X-rays and write PNG masks")
    predictor.add_argument("images", nargs="+", help="X-ray files: PNG, JPEG, TIFF, BMP (8 or 16 bit) or DICOM")
    predictor.add_argument("--checkpoint", required=True, help="best.pt written by train (chapter 03)")
    predictor.add_argument("--out", required=True, help="folder for the masks, <name>_mask.png (0/255)")
    predictor.add_argument("--threshold", type=float, default=0.5, help="probability threshold (default 0.5)")
    predictor.add_argument("--raw", action="store_true", help="skip post-processing")
    predictor.add_argument("--force", action="store_true", help="overwrite existing mask files")
    args = parser.parse_args(argv)
    try:
        if args.command == "download":
            print(download_kaggle(args.target))
            if args.montgomery:
                print(download_montgomery(args.target))
        elif args.command == "train":
            _cli_train(args)
        else:
            return _cli_predict(args)
    except (LungsegError, FileExistsError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
