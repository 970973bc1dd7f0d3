"""lungseg_utils: what the lungseg chapters teach and call, in chapter order.

Each chapter introduces some of these helpers (and prints the source of those
whose code is the lesson); later chapters import them. The edge plumbing that
keeps them safe (downloads, decoder guards and DICOM, checkpoint files, the
hub, the command line) lives in :mod:`lungseg_io`, whose public names are
re-exported here, so ``python lungseg_utils.py --help`` is the command line.

Index, in chapter order:

1. Settings and errors: ``settings``, ``TrainConfig``, ``LungsegError``; seeding, device and precision.
2. Data and splits: ``ensure_data``, ``build_pairs_table``, ``lung_regions``, ``three_way_split``.
3. Decode and cache: ``decode_image`` (the one decoder), ``read_mask``, ``load_arrays``.
4. Augmentation and dataset: ``train_transforms``, ``SimulatedOpacity``, ``equalize_contrast``, ``LungDataset``.
5. Model: ``build_model``.
6. Loss and metrics: ``DiceBCELoss``, ``dice_iou_per_image``, ``hausdorff95``.
7. Training: ``run_epoch``, ``train``, ``save_checkpoint``, ``load_checkpoint``, ``load_chapter_model``.
8. Evaluation: ``evaluate``, ``error_zones``, ``summarize_scores``, ``paired_difference``.
9. Inference: ``predict_arrays``, ``predict``, ``mask_warnings``.
10. Figures and the upload app: ``overlay``, ``error_overlay``, ``SegmentationApp``.
11. Acquisition shifts: ``apply_shift``, ``shift_benchmark``.
12. When to distrust a mask: ``quality_signals``, ``fit_quality``, ``estimate_quality``, ``predict(..., with_quality=True)``.

Conventions used throughout:

* images are 8-bit grayscale ``uint8`` arrays of shape ``(H, W)``;
* masks are ``uint8`` arrays holding 0 (background) and 1 (lung);
* model inputs are ``float32`` tensors ``(B, 3, H, W)``: the grayscale image
  repeated on three channels and normalized with the ImageNet mean and std,
  because the ResNet encoder was designed (and, where weights can be had,
  pre-trained) for ImageNet's RGB statistics.
"""
from __future__ import annotations

import atexit
import contextlib
import hashlib
import itertools
import math
import os
import platform
import random
import shutil
import sys
import tempfile
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterable, NamedTuple, Sequence

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import albumentations as A  # noqa: E402
import cv2  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import segmentation_models_pytorch as smp  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from scipy import ndimage, stats  # noqa: E402
from sklearn.model_selection import train_test_split  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402

# lungseg_io (downloads, decoder guards, checkpoint files, the hub, the command line) builds on this
# module, so it is imported at the end of this file; the functions here call it as lungseg_io.<name>.

__all__ = [
    # 1. settings and errors
    "LungsegError", "LungsegDataError", "LungsegCheckpointError", "LungsegConfigError", "LungsegWarning",
    "Settings", "settings", "is_quick_mode", "TrainConfig", "SEED", "REPO_DIR",
    "setup_notebook", "seed_everything", "library_versions", "print_config", "cpu_model_name",
    "pick_device", "autocast_dtype", "cpu_has_native_bf16",
    # 2. data and splits
    "DATA_HELP", "find_data_dir", "ensure_data", "describe_data", "source_of", "tb_label_of", "image_size_of",
    "build_pairs_table", "labeled_only", "Regions", "lung_regions", "lung_areas", "anatomy_landmarks",
    "writeup_split", "three_way_split", "quick_subset", "assert_disjoint",
    # 3. decode and cache
    "IMAGE_SUFFIXES", "DICOM_SUFFIXES", "to_uint8_range", "to_gray_uint8", "decode_image", "read_mask", "read_pair",
    "resize_image", "resize_mask", "default_cache_dir", "cached_sample", "load_arrays",
    # 4. augmentation and dataset
    "IMAGENET_MEAN", "IMAGENET_STD", "SimulatedOpacity", "train_transforms", "fired_transforms", "equalize_contrast", "image_to_tensor",
    "LungDataset", "check_arrays", "seed_worker",
    # 5. model
    "ARCHITECTURES", "build_model", "count_parameters",
    # 6. loss and metrics
    "DiceBCELoss", "dice_iou_per_image", "dataset_dice", "writeup_batch_dice", "hausdorff95",
    # 7. training
    "TrainResult", "learning_rate_schedule", "run_epoch", "train", "start_distributed", "save_checkpoint", "load_checkpoint",
    "plot_history", "CHAPTER_RUN_DIR", "DRIVE_CHECKPOINT", "find_checkpoint", "describe_augmentation",
    "describe_model", "load_chapter_model", "temporary_run_dir", "unique_run_dir",
    # 8. evaluation
    "Evaluation", "evaluate", "ERROR_ZONES", "error_zones", "summarize_scores", "paired_difference",
    # 9. inference
    "predict_arrays", "postprocess_mask", "model_image_size", "DEFAULT_LUNG_FRACTION_RANGE", "lung_fraction_range",
    "inversion_margin", "looks_inverted", "mask_warnings", "model_lung_fraction_range", "predict_proba", "predict",
    # 10. figures and the upload app
    "tint", "overlay", "ERROR_COLOURS", "error_overlay", "error_legend", "overlay_png_bytes", "mask_png_bytes",
    "SegmentationApp",
    # 11. acquisition shifts
    "SEVERITIES", "SHIFTS", "GEOMETRIC_SHIFTS", "apply_shift", "shift_benchmark", "shifted_copies", "summarize_shifts",
    # 12. when to distrust a mask
    "QUALITY_SIGNALS", "REVIEW_BELOW", "QUALITY_FILE", "SHAPE_SIZE", "dice_of", "self_dice", "test_time_views", "view_back",
    "encoder_features", "QualityModel", "quality_references", "shape_coefficients", "shape_fit", "feature_distance", "quality_signals",
    "fit_quality_model", "estimate_quality", "quality_file_for", "quality_model_of", "MaskQuality", "Prediction",
    "require_quality_model", "quality_of", "quality_benchmark", "fit_quality", "rca_dice", "auroc_interval",
    "review_curve",
]

REPO_DIR = Path(__file__).resolve().parent
DATASET_FOLDER = "Lung Segmentation"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SEED = 42
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
DICOM_SUFFIXES = (".dcm", ".dicom")


# --------------------------------------------------------------------------
# 1. Settings and errors
# --------------------------------------------------------------------------


class LungsegError(Exception):
    """A problem the user can fix; the message names the file (or setting) and what to do."""


class LungsegDataError(LungsegError, ValueError):
    """Bad or missing input data: images, masks, data folders, archives."""


class LungsegCheckpointError(LungsegError, ValueError):
    """A checkpoint that is missing, damaged, unsafe or of another model."""


class LungsegConfigError(LungsegError, ValueError):
    """A setting that cannot work: an environment variable, a config value, a run folder."""


class LungsegWarning(UserWarning):
    """Something to check: a mask that looks implausible, a damaged cache entry that was replaced."""


TRUE_WORDS = {"1", "true", "yes", "on"}


@dataclass(frozen=True)
class Settings:
    """lungseg's environment variables, read by :func:`settings`."""

    quick: bool  # LUNGSEG_QUICK: run the chapters on a small subset (CI)
    data_dir: Path  # LUNGSEG_DATA_DIR, else data/ in the repository
    cache_dir: Path  # LUNGSEG_CACHE_DIR, else the user's cache folder
    checkpoint: Path | None  # LUNGSEG_CHECKPOINT: the model chapters 04-06 use
    max_megapixels: float  # LUNGSEG_MAX_MEGAPIXELS: the largest image accepted
    hub_offline: bool  # HF_HUB_OFFLINE: never try the Hugging Face hub
    kaggle_credentials: bool  # KAGGLE_USERNAME and KAGGLE_KEY, KAGGLE_API_TOKEN, a ~/.kaggle token, or Colab's secrets


def _flag(name: str) -> bool:
    """True when the environment variable ``name`` is one of 1, true, yes, on (any case)."""
    return os.environ.get(name, "").strip().lower() in TRUE_WORDS


def _user_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/lungseg``, ``%LOCALAPPDATA%/lungseg`` on Windows, else ``~/.cache/lungseg``."""
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]) / "lungseg"
    if os.name == "nt" and os.environ.get("LOCALAPPDATA"):
        return Path(os.environ["LOCALAPPDATA"]) / "lungseg"
    return Path.home() / ".cache" / "lungseg"


def _kaggle_credentials() -> bool:
    """True where kagglehub can log in to Kaggle (Colab counts: its secrets may hold the token)."""
    if (os.environ.get("KAGGLE_USERNAME") and os.environ.get("KAGGLE_KEY")) or os.environ.get("KAGGLE_API_TOKEN"):
        return True
    folder = Path(os.environ.get("KAGGLE_CONFIG_DIR") or Path.home() / ".kaggle").expanduser()
    return (folder / "kaggle.json").is_file() or (folder / "access_token").is_file() or "google.colab" in sys.modules


def settings() -> Settings:
    """Read lungseg's environment variables: the one place that does, with one rule for "true".

    A value that cannot work (e.g. ``LUNGSEG_MAX_MEGAPIXELS=lots``) raises
    :class:`LungsegConfigError` naming the variable.
    """
    megapixels = os.environ.get("LUNGSEG_MAX_MEGAPIXELS", "").strip() or "60"
    try:
        max_megapixels = float(megapixels)
    except ValueError:
        max_megapixels = math.nan
    if not max_megapixels > 0 or math.isinf(max_megapixels):
        raise LungsegConfigError(f"LUNGSEG_MAX_MEGAPIXELS={megapixels!r} is not a positive number; use e.g. 60.")
    path = lambda name: Path(os.environ[name]).expanduser() if os.environ.get(name, "").strip() else None  # noqa: E731
    return Settings(
        quick=_flag("LUNGSEG_QUICK"),
        data_dir=path("LUNGSEG_DATA_DIR") or REPO_DIR / "data",
        cache_dir=path("LUNGSEG_CACHE_DIR") or _user_cache_dir(),
        checkpoint=path("LUNGSEG_CHECKPOINT"),
        max_megapixels=max_megapixels,
        hub_offline=_flag("HF_HUB_OFFLINE"),
        kaggle_credentials=_kaggle_credentials(),
    )


def is_quick_mode() -> bool:
    """True when ``LUNGSEG_QUICK`` is set (CI runs the chapters this way)."""
    return settings().quick


if _flag("TQDM_DISABLE"):
    # Stored runs (make run) and CI: no bars. The notebook bars of tqdm.auto ignore TQDM_DISABLE and would
    # leave a "0%" text line and their widget state in the saved notebook; plain tqdm honours it.
    from tqdm import tqdm  # noqa: E402
else:
    from tqdm.auto import tqdm  # noqa: E402


@dataclass
class TrainConfig:
    """Everything that defines a training run (stored in every checkpoint).

    The defaults are chapter 03's recipe: trained from scratch (``weights=None``),
    Adam at 1e-3 with a one-cycle schedule, 20 epochs at 256 px, batch 8, early
    stopping after 5 epochs without a better validation loss, the augmentation
    of :func:`train_transforms` (framing, strong photometric changes, random
    CLAHE and simulated opacities), and contrast normalisation of every image
    (``equalize``: :func:`equalize_contrast`, in training and at prediction
    time). ``max_images`` is how many labelled X-rays the caller keeps
    (:func:`quick_subset`); :func:`train` trains on the arrays it is given.
    :meth:`quick` is the small run of quick mode; :meth:`fast` the fast lane for CPUs.
    """

    encoder: str = "resnet34"
    architecture: str = "unet"  # or "unetplusplus" (smp's UNet++: nested, denser skip connections)
    weights: str | None = None  # None (from scratch), "imagenet" or a weights file
    image_size: int = 256
    epochs: int = 20
    batch_size: int = 8
    lr: float = 1e-3
    schedule: str = "onecycle"  # or "constant"
    patience: int = 5
    seed: int = SEED
    max_images: int | None = None  # None: every labelled X-ray
    rotate_limit: float = 35
    photometric: bool = True  # mild brightness, contrast and gamma changes
    strong_photometric: bool = True  # wide exposure changes, noise, blur, low resolution, JPEG
    horizontal_flip: bool = False
    clahe: bool = True  # random CLAHE as augmentation
    opacity_p: float = 0.3  # how often SimulatedOpacity whitens part of a lung
    framing: bool = True  # wide scale and shift ranges
    equalize: bool = True  # CLAHE on every image, in training and at prediction time
    bce_weight: float = 1.0  # loss = bce_weight * BCE + dice_weight * Dice loss
    dice_weight: float = 1.0
    ema_decay: float = 0.0  # > 0: validate and keep an exponential moving average of the weights (this decay per step)
    skip_connections: bool = True
    device: str | None = None  # None: the best available (pick_device)
    mixed_precision: bool = True
    num_workers: int = 0

    @classmethod
    def quick(cls, **overrides) -> "TrainConfig":
        """Chapter 03's recipe on a small run: about 80 X-rays at 128 px for 2 epochs (quick mode, CI)."""
        return cls(**{"image_size": 128, "epochs": 2, "max_images": 80, **overrides})

    @classmethod
    def fast(cls, **overrides) -> "TrainConfig":
        """The fast lane: ResNet18 at 128 px for 12 epochs on every X-ray, minutes on a CPU (lab log: "A fast lane")."""
        return cls(**{"encoder": "resnet18", "image_size": 128, "epochs": 12, **overrides})

    @classmethod
    def for_mode(cls, **overrides) -> "TrainConfig":
        """:meth:`quick` in quick mode (:func:`is_quick_mode`), else the full recipe."""
        return cls.quick(**overrides) if is_quick_mode() else cls(**overrides)


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
    instead of benchmarking them (the fastest pick can differ between runs); a
    few CUDA kernels use atomic additions, so GPU runs can still differ in the
    last digits.
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
    Apple MPS: fp32 (its autocast covers fewer operations).
    """
    if device.type == "cuda":
        major, _ = torch.cuda.get_device_capability(device)
        return torch.bfloat16 if major >= 8 else torch.float16
    if device.type == "cpu" and cpu_has_native_bf16():
        return torch.bfloat16
    return None


def cpu_has_native_bf16(cpuinfo: str | os.PathLike = "/proc/cpuinfo") -> bool:
    """True when the CPU executes bf16 natively: x86 AVX512-BF16 or AMX-BF16 (read from /proc/cpuinfo).

    Elsewhere bf16 is emulated, and much slower than fp32. Where /proc/cpuinfo
    does not exist (macOS, Windows) this says False: fp32.
    """
    try:
        flags = set(Path(cpuinfo).read_text().split())
    except OSError:
        return False
    return bool(flags & {"avx512_bf16", "amx_bf16"})


# --------------------------------------------------------------------------
# 2. Data and splits
# --------------------------------------------------------------------------


KAGGLE_DATASET = "nikhilpandey360/chest-xray-masks-and-labels"
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
    root = Path(path).expanduser() if path is not None else settings().data_dir
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


def ensure_data(path: str | os.PathLike | None = None, **montgomery_options) -> Path:
    """Find the data (see :func:`find_data_dir`); if it is missing, download it and say what was fetched.

    ``path`` defaults to ``$LUNGSEG_DATA_DIR``, else ``data/`` in the repository.
    With Kaggle credentials (see :data:`DATA_HELP`) the Kaggle set, else (or if
    that fails) the NLM Montgomery set alone: 138 X-rays of one hospital, no
    credentials needed (``montgomery_options`` go to :func:`download_montgomery`).
    :func:`describe_data` says which data a chapter ran on.
    """
    target = Path(path).expanduser() if path is not None else settings().data_dir
    with contextlib.suppress(LungsegDataError):
        return find_data_dir(target)
    if settings().kaggle_credentials:
        print(f"No data in {target}: downloading the Kaggle set ...")
        try:
            return lungseg_io.download_kaggle(target)
        except LungsegDataError as kaggle_failure:
            reason = str(kaggle_failure).splitlines()[0]
        print(f"{reason}\nDownloading the NLM Montgomery set instead (138 X-rays, one hospital, no credentials) ...")
    else:
        reason = "no Kaggle credentials found"
        print(f"No data in {target} and no Kaggle credentials: downloading the NLM Montgomery set "
              "(138 X-rays, one hospital, no credentials needed) ...")
    try:
        set_dir = lungseg_io.download_montgomery(target, **montgomery_options)
    except LungsegError as failure:
        raise LungsegDataError(f"No data could be downloaded ({reason}; Montgomery: {failure}).\n{DATA_HELP}") from failure
    print(f"Fetched the NLM Montgomery set into {set_dir}.")
    return set_dir


def describe_data(table: pd.DataFrame) -> str:
    """One line saying which data a chapter runs on, from :func:`build_pairs_table`'s table."""
    labeled = table[table["labeled"]]
    per_source = labeled.groupby("source").size()
    sources = ", ".join(f"{count} {source}" for source, count in per_source.items())
    unlabeled = int((~table["labeled"]).sum())
    kind = "the NLM Montgomery set only (one hospital)" if set(per_source.index) == {"Montgomery"} else "Chest X-Ray Masks and Labels"
    return f"data: {kind}: {len(table)} X-rays, {len(labeled)} with lung masks ({sources}), {unlabeled} unlabeled"


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
    with lungseg_io.open_raster(path, str(path)) as im:
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


class Regions(NamedTuple):
    """The connected regions of a binary mask: region ``i`` has label ``i + 1`` (0 is background)."""

    labels: np.ndarray  # (H, W) int32
    areas: np.ndarray  # (n,) pixels
    centroids: np.ndarray  # (n, 2) as (x, y)


def lung_regions(mask: np.ndarray) -> Regions:
    """The 8-connected regions of a mask (OpenCV's ``connectedComponentsWithStats``)."""
    _, labels, region_stats, centroids = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    return Regions(labels, region_stats[1:, cv2.CC_STAT_AREA], centroids[1:])


def lung_areas(mask: np.ndarray) -> dict[str, float]:
    """Connected components of a lung mask and the area of each lung in pixels.

    Radiological convention: the patient's right lung is on the image's left.
    Each component is assigned to a side by its centroid.
    """
    regions = lung_regions(mask)
    areas, on_image_left = regions.areas, regions.centroids[:, 0] < mask.shape[1] / 2
    return dict(
        components=len(areas),
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
    labels, areas, centroids = lung_regions(mask)
    if len(areas) < 2:
        raise LungsegDataError(f"anatomy_landmarks needs a mask with two lungs; this one has {len(areas)} region(s).")
    largest = np.argsort(areas)[::-1][:2]
    right, left = sorted(largest, key=lambda index: centroids[index, 0])  # patient's right lung = image left
    points: dict[str, tuple[float, float]] = {}
    for side, index, outward in (("right", right, -1), ("left", left, 1)):
        ys, xs = np.nonzero(labels == index + 1)
        top = ys.min()
        points[f"{side} apex"] = (float(xs[ys == top].mean()), float(top))
        corner = np.argmax(ys + outward * xs)  # lowest and outermost
        points[f"{side} costophrenic angle"] = (float(xs[corner]), float(ys[corner]))
        centre_x = int(round(centroids[index, 0]))
        column = ys[xs == centre_x]
        points[f"{side} hemidiaphragm"] = (float(centre_x), float(column.max() if len(column) else ys.max()))
    ys, xs = np.nonzero(labels == left + 1)
    heart_row = int(ys.min() + (ys.max() - ys.min()) * 2 / 3)
    points["heart border"] = (float(xs[ys == heart_row].min()), float(heart_row))
    low_row = int(ys.min() + (ys.max() - ys.min()) * 0.85)
    points["retrocardiac region"] = (float(xs[ys == low_row].min()) - 0.06 * mask.shape[1], float(low_row))
    return points


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
    try:
        rest, test = train_test_split(pairs, test_size=test_fraction, random_state=seed, stratify=strata)
        rest_strata = rest["source"] + "_" + rest["tb_label"].astype(str)
        train, val = train_test_split(
            rest, test_size=val_fraction / (1 - test_fraction), random_state=seed, stratify=rest_strata
        )
    except ValueError:
        groups = ", ".join(f"{group} {count}" for group, count in strata.value_counts().sort_index().items())
        raise LungsegDataError(
            f"{len(pairs)} X-rays with a mask are too few for a three-way split stratified by hospital and TB label "
            f"({groups or 'none'}): the validation part (10%) must hold every group, so each group needs about 10. "
            "Add X-rays with masks (in masks/ or ManualMask/)."
        ) from None
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
# 3. Decode and cache
# --------------------------------------------------------------------------


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
    name = lungseg_io.describe_source(source, name)
    lungseg_io.check_file(source, name)
    if lungseg_io.looks_like_dicom(source, name):
        return lungseg_io.decode_dicom(source, name, max_pixels)
    with lungseg_io.open_raster(source, name, max_pixels) as im:
        pixels = lungseg_io.raster_pixels(im, name)
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
        with lungseg_io.open_raster(path, str(path)) as im:
            raw = lungseg_io.raster_pixels(im, str(path), keep_channels=True)
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


def default_cache_dir() -> Path:
    """``$LUNGSEG_CACHE_DIR``, else the user's cache folder (``~/.cache/lungseg``); never the repository."""
    return settings().cache_dir


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
    fingerprint of its source files, so an edited or replaced file is decoded again;
    so is an entry that does not load or has the wrong shape (with a warning naming it).
    """
    folder = Path(cache_dir or default_cache_dir()) / f"{size}px"
    key = _fingerprint([image_path, *mask_paths], size)
    cache_file = folder / f"{Path(image_path).stem}_{key}.npy"
    expected = (2 if mask_paths else 1, size, size)
    if cache_file.is_file():
        try:
            stacked = np.load(cache_file)
            if stacked.shape == expected and stacked.dtype == np.uint8:
                return stacked[0], (stacked[1] if len(stacked) > 1 else None)
        except (OSError, ValueError, EOFError):
            pass
        warnings.warn(f"{lungseg_io.display_name(cache_file)}: damaged cache entry, decoded again and replaced.",
                      LungsegWarning, stacklevel=2)
    if mask_paths:
        image, mask = read_pair(image_path, mask_paths)
        stacked = np.stack([resize_image(image, size), resize_mask(mask, size)])
    else:
        stacked = resize_image(decode_image(image_path), size)[None]
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise LungsegError(f"Cannot create the cache folder {folder}: {lungseg_io.describe_os_error(error)} "
                           "(LUNGSEG_CACHE_DIR chooses another).") from None
    lungseg_io.write_atomically(cache_file, lambda file: np.save(file, stacked))
    return stacked[0], (stacked[1] if len(stacked) > 1 else None)


def load_arrays(
    rows: pd.DataFrame, size: int, cache_dir: str | os.PathLike | None = None, workers: int | None = None
) -> tuple[np.ndarray, np.ndarray | None]:
    """Stack the cached images ``(N, size, size)`` and masks (None if any row is unlabeled).

    Decoding runs on a thread pool (OpenCV releases the GIL); cached samples are read, not decoded.
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
# 4. Augmentation and dataset
# --------------------------------------------------------------------------


def _one_lung(mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The mask of one lung (a random side's largest region), as bool."""
    labels, areas, centroids = lung_regions(mask)
    if len(areas) == 0:
        return np.zeros(mask.shape, bool)
    side_left = rng.random() < 0.5
    on_side = [i for i in range(len(areas)) if (centroids[i, 0] < mask.shape[1] / 2) == side_left] or list(range(len(areas)))
    largest = max(on_side, key=lambda i: areas[i])
    return labels == largest + 1


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


def train_transforms(config: TrainConfig | None = None) -> A.Compose:
    """The training augmentation that ``config`` asks for (default: chapter 03's recipe, :class:`TrainConfig`).

    * rotations up to ``rotate_limit`` degrees, and ``framing``: scale 0.75-1.2
      and shifts of 10% (the patient smaller or larger and off-centre in the
      frame); ``framing=False`` keeps scale 0.9-1.1 and shifts of 5%;
    * ``strong_photometric``: wide exposure and gamma changes, noise, blur or low
      resolution, JPEG compression (other machines, exposures and file formats);
      else ``photometric``: mild brightness, contrast and gamma changes;
    * ``opacity_p``: how often :class:`SimulatedOpacity` whitens part of one lung
      while the mask stays lung (pneumonia, effusion);
    * ``clahe``: random local contrast equalisation (a processed look).

    No horizontal flip by default: the heart lies on the left, so a flipped chest
    is an anatomy (dextrocardia) that the model would almost never meet, and the
    two lungs differ in shape (chapter 02 measures it). ``horizontal_flip=True``
    adds the write-up's flip, to measure that choice.
    """
    config = config or TrainConfig()
    scale, shift = ((0.75, 1.2), 0.1) if config.framing else ((0.9, 1.1), 0.05)
    steps: list[A.BasicTransform] = [
        A.Affine(
            rotate=(-config.rotate_limit, config.rotate_limit),
            scale=scale,
            translate_percent=(-shift, shift),
            border_mode=cv2.BORDER_CONSTANT,
            fill=0,
            fill_mask=0,
            p=0.7,
        )
    ]
    if config.horizontal_flip:
        steps.append(A.HorizontalFlip(p=0.5))
    if config.opacity_p > 0:
        steps.append(SimulatedOpacity(p=config.opacity_p))
    if config.strong_photometric:
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
    elif config.photometric:
        steps += [
            A.RandomBrightnessContrast(brightness_limit=0.2, contrast_limit=0.2, p=0.5),
            A.RandomGamma(gamma_limit=(80, 120), p=0.3),
        ]
    if config.clahe:
        steps.append(A.CLAHE(clip_limit=(1, 4), p=0.3))
    return A.Compose(steps)


def fired_transforms(replay: dict) -> list[str]:
    """The names of the transforms that fired in one call of an ``A.ReplayCompose``, from its ``"replay"`` record.

    A ``OneOf`` that fired is named by the transform it chose.
    """
    names = []
    for step in replay.get("transforms", []):
        if step.get("applied"):
            names += fired_transforms(step) or [step["__class_fullname__"].rsplit(".", 1)[-1]]
    return names


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
    ``image_size`` when given), and masks hold only 0 and 1, with a lung in each.
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
    empty = np.flatnonzero(masks.reshape(len(masks), -1).max(axis=1) == 0) if len(masks) else []
    if len(empty):
        raise LungsegDataError(
            f"{len(empty)} of the {len(masks)} masks hold no lung (e.g. number {empty[0]}): a training set needs "
            "a lung in every mask. Remove those X-rays, or draw their masks."
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


# --------------------------------------------------------------------------
# 5. Model
# --------------------------------------------------------------------------


def _zero_skips(module: nn.Module, inputs, features: list[torch.Tensor]) -> list[torch.Tensor]:
    """Encoder forward hook that zeroes every skip feature, keeping only the bottleneck."""
    return [torch.zeros_like(f) for f in features[:-1]] + [features[-1]]


ARCHITECTURES = {"unet": smp.Unet, "unetplusplus": smp.UnetPlusPlus}


def build_model(
    encoder: str = "resnet34",
    weights: str | os.PathLike | None = "imagenet",
    skip_connections: bool = True,
    architecture: str = "unet",
) -> nn.Module:
    """A U-Net (or ``architecture="unetplusplus"``) with the given encoder, 3 input channels and one output (lung logits).

    ``weights``: ``"imagenet"`` (from the Hugging Face cache or the hub; where
    neither can be reached, random initialization with one warning), ``None``
    (random) or a path to a local ``.safetensors``/``.pth`` file.
    ``skip_connections=False`` zeroes the encoder's skip features (same
    parameters, no shortcut), for the ablation in chapter 02.
    """
    if architecture not in ARCHITECTURES:
        raise LungsegConfigError(f"Unknown architecture {architecture!r}: choose one of {', '.join(ARCHITECTURES)}.")
    model = ARCHITECTURES[architecture](encoder_name=encoder, encoder_weights=None, in_channels=3, classes=1)
    loaded = None
    if weights == "imagenet":
        loaded = lungseg_io.load_imagenet_encoder(model, encoder)
    elif weights is not None:
        lungseg_io.load_weights_file(model, Path(weights))
        loaded = str(weights)
    if not skip_connections:
        model.encoder.register_forward_hook(_zero_skips)
    model.lungseg_config = dict(encoder=encoder, architecture=architecture, skip_connections=skip_connections, weights=loaded)
    return model


def count_parameters(module: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


# --------------------------------------------------------------------------
# 6. Loss and metrics
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
# 7. Training
# --------------------------------------------------------------------------


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


def _make_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig, steps_per_epoch: int):
    """A one-cycle schedule over all epochs, or None for a constant learning rate."""
    if config.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=config.lr, epochs=config.epochs, steps_per_epoch=steps_per_epoch
        )
    if config.schedule != "constant":
        raise LungsegConfigError(f"Unknown schedule {config.schedule!r}: use 'constant' or 'onecycle'.")
    return None


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


def run_epoch(
    model: nn.Module,
    loader: DataLoader,
    *,
    loss_fn: nn.Module,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    scaler: torch.amp.GradScaler | None = None,
    desc: str = "",
) -> dict[str, float]:
    """One pass over ``loader``: training when an ``optimizer`` is given, else evaluation.

    Returns ``{"loss": mean loss}``, and in evaluation also ``"dice"``: the mean
    per-image Dice of the thresholded outputs. Training batches are not scored
    (the weights change under them, and copying them to the CPU costs time).
    ``amp_dtype`` runs the forward pass in mixed precision; ``scaler`` (a
    GradScaler) is needed only for fp16 on a GPU, bf16 needs none.
    """
    training = optimizer is not None
    model.train(training)
    loss_sum, dice_sum, count = 0.0, 0.0, 0
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
            else:
                dice_sum += float(dice_iou_per_image((logits > 0).cpu().numpy()[:, 0], masks.cpu().numpy()[:, 0])[0].sum())
            loss_sum += loss.item() * len(images)
            count += len(images)
            bar.set_postfix(loss=f"{loss_sum / count:.4f}")
    if torch.distributed.is_initialized():  # under torchrun: the sums of every process
        totals = torch.tensor([loss_sum, dice_sum, count], dtype=torch.float64, device=device if device.type == "cuda" else "cpu")
        torch.distributed.all_reduce(totals)
        loss_sum, dice_sum, count = totals.tolist()
    count = max(count, 1)
    return {"loss": loss_sum / count} if training else {"loss": loss_sum / count, "dice": dice_sum / count}


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
    check_arrays(*train_arrays, image_size=config.image_size)
    check_arrays(*val_arrays, image_size=config.image_size)
    rank, world = start_distributed(config)
    state = _open_run(run_dir, config, resume) if rank == 0 else None
    if world > 1:  # the other processes read the run rank 0 checked
        torch.distributed.barrier()
        state = lungseg_io.read_checkpoint(run_dir / "last.pt") if rank and resume and (run_dir / "last.pt").is_file() else state
    device = pick_device(config.device)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    amp_dtype = autocast_dtype(device) if config.mixed_precision else None
    seed_everything(config.seed)
    model = build_model(config.encoder, config.weights, config.skip_connections, config.architecture)
    model = model.to(device).to(memory_format=torch.channels_last)
    train_loader, val_loader = _data_loaders(train_arrays, val_arrays, config, device, rank, world)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    averaged = _moving_average(model, optimizer, config.ema_decay)
    scheduler = _make_scheduler(optimizer, config, len(train_loader))
    scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None
    loss_fn = DiceBCELoss(bce_weight=config.bce_weight, dice_weight=config.dice_weight)
    progress = _restore(state, run_dir, model, optimizer, scheduler, scaler, averaged, write=rank == 0)
    # under torchrun, DistributedDataParallel averages the gradients of all processes after each backward pass
    network = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None) if world > 1 else model
    say = print if rank == 0 else (lambda *args, **kwargs: None)
    say(f"Training on {device} ({amp_dtype or 'fp32'}){f' x {world} processes' if world > 1 else ''}, {len(train_arrays[0])} train / "
        f"{len(val_arrays[0])} val images at {config.image_size}px, weights: {model.lungseg_config['weights']}")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    while progress.epoch < config.epochs and progress.stale_epochs < config.patience:
        epoch = progress.epoch + 1
        seed_everything(config.seed + epoch + 1000 * rank)
        train_loader.dataset.transform.set_random_seed(config.seed + epoch + 1000 * rank)
        if world > 1:
            train_loader.sampler.set_epoch(epoch)
        epoch_start = time.perf_counter()
        train_loss = run_epoch(network, train_loader, loss_fn=loss_fn, device=device, amp_dtype=amp_dtype,
                               optimizer=optimizer, scheduler=scheduler, scaler=scaler, desc=f"epoch {epoch} train")["loss"]
        train_seconds = time.perf_counter() - epoch_start
        val = run_epoch(network if averaged is None else averaged.module, val_loader, loss_fn=loss_fn, device=device, amp_dtype=amp_dtype, desc=f"epoch {epoch} val")
        record = dict(epoch=epoch, train_loss=train_loss, val_loss=val["loss"], val_dice=val["dice"],
                      lr=optimizer.param_groups[0]["lr"], epoch_seconds=time.perf_counter() - epoch_start,
                      train_images_per_s=len(train_loader.dataset) / train_seconds)
        improved = progress.add(record)
        if rank == 0:  # one writer: the checkpoints and history are rank 0's
            _save_epoch(run_dir, model, config, progress, improved, optimizer, scheduler, scaler, train_arrays[1], averaged)
        say(f"epoch {epoch:2d}  train loss {train_loss:.4f}  val loss {val['loss']:.4f}  val Dice {val['dice']:.4f}  "
              f"{record['epoch_seconds']:.0f}s  {record['train_images_per_s']:.1f} img/s{'  *best*' if improved else ''}")
        if on_epoch_end is not None:
            on_epoch_end(record)
    wall = time.perf_counter() - started
    if progress.stale_epochs >= config.patience:
        say(f"Early stopping: no better validation loss for {config.patience} epochs.")
    history = pd.DataFrame(progress.history)
    import matplotlib.pyplot as plt

    if rank == 0:
        plt.close(plot_history(history, run_dir / "curves.png"))
    if world > 1:
        torch.distributed.barrier()  # best.pt is complete before any process reads it
    extra = {"peak_gpu_memory_gb": torch.cuda.max_memory_allocated() / 1e9} if device.type == "cuda" else {}
    best_model = load_checkpoint(run_dir / "best.pt", device)
    return TrainResult(best_model, history, run_dir, progress.best_epoch, progress.best_val_loss, wall, str(device), extra)


@dataclass
class _Progress:
    """Where a run stands after its last epoch: what ``last.pt`` keeps to resume it."""

    epoch: int = 0
    best_val_loss: float = math.inf
    best_epoch: int = 0
    stale_epochs: int = 0
    history: list[dict] = field(default_factory=list)

    def add(self, record: dict) -> bool:
        """Count an epoch's record; True when its validation loss is the best so far."""
        self.epoch = record["epoch"]
        self.history.append(record)
        improved = record["val_loss"] < self.best_val_loss
        if improved:
            self.best_val_loss, self.best_epoch, self.stale_epochs = record["val_loss"], self.epoch, 0
        else:
            self.stale_epochs += 1
        return improved


RESUME_MAY_DIFFER = ("device", "num_workers")
RESUME_KEYS = ("config", "model_state", "optimizer_state", "scheduler_state", "epoch", "best_val_loss", "best_epoch",
               "stale_epochs", "history")


RUN_FILES = ("best.pt", "last.pt", "history.csv", "curves.png")


def _open_run(run_dir: Path, config: TrainConfig, resume: bool) -> dict | None:
    """Check that ``run_dir`` may be written; with ``resume``, its ``last.pt`` (checked against ``config``).

    A folder whose run stopped before its first ``last.pt`` was complete starts
    anew: with ``resume=True``, or with a plain run when it holds the temporary
    file of the interrupted write (a ``best.pt`` alone may be a model of yours).
    """
    last_path = run_dir / "last.pt"
    if last_path.is_file() and not resume:
        raise LungsegConfigError(
            f"{run_dir} already holds a run. Pass resume=True to continue it, or use a new folder "
            "(this code never overwrites a run)."
        )
    if not last_path.is_file():
        if resume and not run_dir.is_dir():
            raise LungsegConfigError(f"Nothing to resume: {last_path} does not exist. Start a new run without resume.")
        found = sorted(path.name for path in run_dir.iterdir()) if run_dir.is_dir() else []
        foreign = [name for name in found if name not in RUN_FILES and not name.endswith(".tmp")]
        if foreign:
            raise LungsegConfigError(f"{run_dir} holds files that no run writes (e.g. {foreign[0]}): use a new folder.")
        stopped_while_writing = any(name.endswith(".tmp") for name in found)
        if "best.pt" in found and not resume and not stopped_while_writing:
            raise LungsegConfigError(
                f"{run_dir} holds a best.pt but no last.pt: a run that stopped during its first epoch, or a model of "
                "yours. Pass resume=True to start that run anew, or use a new folder."
            )
        if found and resume:
            print(f"Nothing to resume in {run_dir.name} (it stopped before its first last.pt): starting the run anew.")
        for leftover in run_dir.glob("*.tmp"):
            leftover.unlink()
        run_dir.mkdir(parents=True, exist_ok=True)
        return None
    state = lungseg_io.read_checkpoint(last_path)
    missing = [key for key in RESUME_KEYS if key not in state]
    if missing:
        raise LungsegCheckpointError(
            f"Cannot resume {last_path}: it lacks {', '.join(missing)}, so it is not a last.pt written by train(). "
            "Start a new run in a new folder."
        )
    stored, current = state["config"], lungseg_io.plain(asdict(config))
    unknown = [key for key in current if key not in stored]
    if unknown:
        raise LungsegCheckpointError(
            f"Cannot resume {last_path}: another version of lungseg wrote it (its config lacks {', '.join(unknown)}). "
            "Start a new run in a new folder."
        )
    differences = [
        f"{key} (stored {stored[key]!r}, now {value!r})"
        for key, value in current.items()
        if key not in RESUME_MAY_DIFFER and stored[key] != value
    ]
    if differences:
        raise LungsegConfigError(
            f"Cannot resume {last_path}: the config differs in {'; '.join(differences)}. Resume with the stored "
            "config, or start a new run in a new folder."
        )
    return state


def _data_loaders(
    train_arrays: tuple[np.ndarray, np.ndarray], val_arrays: tuple[np.ndarray, np.ndarray], config: TrainConfig,
    device: torch.device, rank: int = 0, world: int = 1,
) -> tuple[DataLoader, DataLoader]:
    """Shuffled, augmented training batches and plain validation batches.

    Under torchrun (``world`` processes) each process takes ``batch_size / world``
    images of every batch of ``batch_size`` (a DistributedSampler), so the global
    batch, the steps per epoch and the schedule are those of one process; the
    validation images are dealt out ``rank, rank + world, ...``.
    """
    from torch.utils.data import Subset
    from torch.utils.data.distributed import DistributedSampler

    train_set = LungDataset(*train_arrays, train_transforms(config), equalize=config.equalize)
    val_set = LungDataset(*val_arrays, equalize=config.equalize)
    drop_last = len(train_set) > config.batch_size
    sampler = None
    if world > 1:
        sampler = DistributedSampler(train_set, num_replicas=world, rank=rank, shuffle=True, seed=config.seed, drop_last=drop_last)
        val_set = Subset(val_set, range(rank, len(val_set), world))
    train_loader = DataLoader(
        train_set, batch_size=config.batch_size // world, shuffle=sampler is None, sampler=sampler, drop_last=drop_last,
        num_workers=config.num_workers, pin_memory=device.type == "cuda", worker_init_fn=seed_worker,
    )
    return train_loader, DataLoader(val_set, batch_size=config.batch_size, num_workers=config.num_workers)


def start_distributed(config: TrainConfig) -> tuple[int, int]:
    """``(rank, world size)``: ``(0, 1)`` for a plain run; under ``torchrun``, joins its process group.

    The backend is NCCL on GPUs and gloo on CPUs. ``config.batch_size`` stays the
    global batch, so it must divide by the number of processes.
    """
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world == 1:
        return 0, 1
    if config.batch_size % world:
        raise LungsegConfigError(
            f"batch_size {config.batch_size} does not divide among {world} processes: use a multiple of {world} "
            "(it is the global batch; each process takes batch_size / processes images)."
        )
    if not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() and pick_device(config.device).type == "cuda" else "gloo"
        torch.distributed.init_process_group(backend)
    return torch.distributed.get_rank(), world


def _write_history(run_dir: Path, history: list[dict]) -> None:
    """``history.csv``: one row per epoch, written atomically."""
    table = pd.DataFrame(history).to_csv(index=False).encode()
    lungseg_io.write_atomically(run_dir / "history.csv", lambda file: file.write(table))


def _moving_average(model: nn.Module, optimizer: torch.optim.Optimizer, decay: float) -> nn.Module | None:
    """With ``decay > 0``: an exponential moving average of ``model``'s weights and BatchNorm statistics, updated
    after every optimiser step (``avg = decay * avg + (1 - decay) * weights``); else None."""
    if not decay:
        return None
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    averaged = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
    optimizer.register_step_post_hook(lambda *_: averaged.update_parameters(model))
    return averaged


def _restore(
    state: dict | None, run_dir: Path, model: nn.Module, optimizer, scheduler, scaler, averaged: nn.Module | None = None,
    write: bool = True,
) -> _Progress:
    """Load a resumed run's weights and optimiser state; a new run starts from nothing (``write``: rank 0 rewrites the history)."""
    if state is None:
        return _Progress()
    model.load_state_dict(state["model_state"])
    if averaged is not None:
        averaged.load_state_dict(state["average_state"])
    optimizer.load_state_dict(state["optimizer_state"])
    if scheduler is not None:
        scheduler.load_state_dict(state["scheduler_state"])
    if scaler is not None and state.get("scaler_state"):
        scaler.load_state_dict(state["scaler_state"])
    progress = _Progress(state["epoch"], state["best_val_loss"], state["best_epoch"], state["stale_epochs"], list(state["history"]))
    if write:
        _write_history(run_dir, progress.history)  # last.pt is the reference
        print(f"Resuming {run_dir.name} after epoch {progress.epoch} (best so far: epoch {progress.best_epoch}).")
    return progress


def _save_epoch(
    run_dir: Path, model: nn.Module, config: TrainConfig, progress: _Progress, improved: bool,
    optimizer, scheduler, scaler, train_masks: np.ndarray, averaged: nn.Module | None = None,
) -> None:
    """After an epoch: ``best.pt`` if it improved (the moving average's weights, when kept), then ``last.pt`` and ``history.csv``."""
    if improved:
        save_checkpoint(run_dir / "best.pt", model if averaged is None else averaged.module, config, epoch=progress.epoch, val_loss=progress.best_val_loss,
                        weights_loaded=str(model.lungseg_config["weights"]), lung_fraction_range=lung_fraction_range(train_masks))
    save_checkpoint(
        run_dir / "last.pt", model, config, epoch=progress.epoch, optimizer_state=optimizer.state_dict(),
        scheduler_state=scheduler.state_dict() if scheduler is not None else {},
        scaler_state=scaler.state_dict() if scaler is not None else {},
        average_state=averaged.state_dict() if averaged is not None else {},
        best_val_loss=progress.best_val_loss, best_epoch=progress.best_epoch, stale_epochs=progress.stale_epochs,
        history=progress.history,
    )
    _write_history(run_dir, progress.history)


def save_checkpoint(path: Path, model: nn.Module, config: TrainConfig, **extra) -> None:
    """Write a checkpoint atomically (:func:`write_atomically`): weights, the run's config, library versions, extra state.

    Everything except the ``*_state`` dicts is stored as plain Python types, so
    that :func:`load_checkpoint` can read it with ``weights_only=True``.
    """
    payload = {
        "model_state": model.state_dict(),
        "config": lungseg_io.plain(asdict(config)),
        "versions": lungseg_io.plain(library_versions()),
        **{key: value if key.endswith("_state") else lungseg_io.plain(value) for key, value in extra.items()},
    }
    lungseg_io.write_atomically(path, lambda file: torch.save(payload, file))


def load_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild the model stored in a checkpoint of :func:`train` (``weights_only=True``, no code runs).

    The returned model carries ``lungseg_config`` (its TrainConfig as a dict) and
    ``lungseg_checkpoint`` (the file it came from). A missing, damaged or unsafe
    file, a config that cannot rebuild the model and weights of another
    architecture each raise :class:`LungsegCheckpointError` naming the file.
    """
    path = Path(path)
    payload = lungseg_io.read_checkpoint(path)
    config = lungseg_io.checked_config(path, payload)
    model = build_model(config["encoder"], weights=None, skip_connections=config.get("skip_connections", True),
                        architecture=config.get("architecture", "unet"))
    try:
        model.load_state_dict(payload["model_state"])
    except (RuntimeError, TypeError, AttributeError) as error:
        raise LungsegCheckpointError(
            f"{path}: weights do not fit a {config.get('architecture', 'unet')} with encoder {config['encoder']!r} "
            f"(checkpoint of another architecture?): {str(error).splitlines()[0]}"
        ) from None
    model.lungseg_config = {**config, "weights_loaded": payload.get("weights_loaded", "unknown"), "epoch": payload.get("epoch"),
                            "lung_fraction_range": payload.get("lung_fraction_range")}
    model.lungseg_checkpoint = path
    return model.to(device).eval()


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
        lungseg_io.write_atomically(path, lambda file: fig.savefig(file, format="png", dpi=100))
    return fig


CHAPTER_RUN_DIR = REPO_DIR / "runs" / "dicebce-256px"
FAST_RUN_DIR = REPO_DIR / "runs" / "fast-resnet18-128px"  # the fast lane (TrainConfig.fast), trained on a CPU
# Where a Colab learner may keep chapter 03's checkpoint from one runtime to the next (if they mount Google Drive).
DRIVE_CHECKPOINT = Path("/content/drive/MyDrive/lungseg/dicebce-256px/best.pt")


def find_checkpoint(path: str | os.PathLike | None = None) -> Path | None:
    """The trained model the later chapters use, or None when there is none.

    ``path`` if given, else ``$LUNGSEG_CHECKPOINT``, else ``runs/dicebce-256px/best.pt``
    (written by chapter 03), else the Google Drive copy on Colab (:data:`DRIVE_CHECKPOINT`).
    A ``path`` or ``$LUNGSEG_CHECKPOINT`` naming no file raises :class:`LungsegCheckpointError`.
    """
    named = Path(path).expanduser() if path else settings().checkpoint
    if named is not None:
        if not named.is_file():
            origin = "" if path else "LUNGSEG_CHECKPOINT="
            raise LungsegCheckpointError(
                f"Checkpoint not found: {origin}{named}. Give the path of a best.pt written by train(), "
                "or leave it unset to use chapter 03's (runs/dicebce-256px/best.pt)."
            )
        return named
    return next((candidate for candidate in (CHAPTER_RUN_DIR / "best.pt", DRIVE_CHECKPOINT) if candidate.is_file()), None)


QUICK_MODEL_BANNER = """
+------------------------------------------------------------------------------------------+
| NO TRAINED MODEL FOUND: training a QUICK model instead ({details}).
| Its scores are NOT the stored ones and its masks are rough; it only lets the code run.
| To get the real model: run chapter 03 (its first cell says how long its stored run took), or
| set LUNGSEG_CHECKPOINT to its best.pt, or on Colab keep it in Google Drive at
| MyDrive/lungseg/dicebce-256px/best.pt (mount Drive first).
+------------------------------------------------------------------------------------------+
"""


def describe_augmentation(config: dict) -> str:
    """The augmentation a stored config (a :class:`TrainConfig` as a dict) trained with, in words."""
    parts = [label for key, label in (("framing", "framing"), ("strong_photometric", "strong photometric"), ("clahe", "CLAHE"))
             if config.get(key)]
    if config.get("opacity_p"):
        parts.append(f"simulated opacities (p {config['opacity_p']})")
    return "augmentation: " + (" + ".join(parts) if parts else "rotation, scale, shift and mild photometric changes")


def describe_model(model: nn.Module, checkpoint: Path) -> str:
    """One line saying which checkpoint a model comes from and how it was trained."""
    c = model.lungseg_config
    initial = "random init" if c["weights_loaded"] in ("None", None) else c["weights_loaded"]
    return (f"checkpoint {checkpoint.parent.name}/{checkpoint.name}: {c['encoder']} U-Net, {c['image_size']}px, "
            f"Adam lr {c['lr']} ({c['schedule']}), best epoch {c['epoch']} of up to {c['epochs']}, "
            f"initial encoder weights: {initial}, {describe_augmentation(c)}"
            + (", every input equalised with CLAHE" if c.get("equalize") else ""))


def fallback_recipe(device: torch.device) -> tuple[TrainConfig, Path, str] | None:
    """What :func:`load_chapter_model` trains without a checkpoint, where, and its name.

    Chapter 03's recipe on a CUDA GPU, the fast lane (:meth:`TrainConfig.fast`)
    on a CPU, and None on a CPU in quick mode (CI), where the quick model is trained.
    """
    if device.type == "cuda":
        return TrainConfig(), CHAPTER_RUN_DIR, "chapter 03's recipe"
    return None if is_quick_mode() else (TrainConfig.fast(), FAST_RUN_DIR, "the fast lane (resnet18)")


def run_finished(run_dir: Path, config: TrainConfig) -> bool:
    """True when ``run_dir`` holds a run of ``config`` that trained all its epochs or stopped early."""
    last = run_dir / "last.pt"
    if not (last.is_file() and (run_dir / "best.pt").is_file()):
        return False
    state = lungseg_io.read_checkpoint(last)
    return state["epoch"] >= config.epochs or state["stale_epochs"] >= config.patience


def load_chapter_model(
    data_dir: str | os.PathLike | None = None, checkpoint: str | os.PathLike | None = None
) -> tuple[nn.Module, str]:
    """Chapter 03's model for the chapters that use it, never silently replaced by another.

    Loads the checkpoint of :func:`find_checkpoint`. Without one it trains, or
    loads once trained, the model of :func:`fallback_recipe`: chapter 03's recipe
    on a GPU, the fast lane on a CPU (a line says so), the quick-mode model behind
    a banner in quick mode. Returns the model and one line saying where it comes from.
    """
    found = find_checkpoint(checkpoint)
    if found is not None:
        model = load_checkpoint(found, pick_device())
        return model, describe_model(model, found)
    device = pick_device()
    recipe = fallback_recipe(device)
    if recipe is None:
        return _quick_model(data_dir, device)
    config, run_dir, name = recipe
    fast_lane = run_dir != CHAPTER_RUN_DIR
    note = " (the fast lane: run chapter 03 for the chapter's model)" if fast_lane else ""
    if run_finished(run_dir, config):
        model = load_checkpoint(run_dir / "best.pt", device)
        return model, describe_model(model, run_dir / "best.pt") + note
    print(f"No chapter 03 checkpoint: training {name} on this {'GPU' if device.type == 'cuda' else device.type.upper()} "
          f"now ({config.epochs} epochs at {config.image_size}px) into runs/{run_dir.name}/."
          + (" Its scores are a little below the stored ones, made by chapter 03's model." if fast_lane else ""))
    split = three_way_split(build_pairs_table(data_dir))
    result = train(load_arrays(split["train"], config.image_size), load_arrays(split["val"], config.image_size),
                   run_dir, config, resume=(run_dir / "last.pt").is_file())
    trained = " (the fast lane, trained just now by this chapter)" if fast_lane else " (trained just now by this chapter)"
    return result.model, describe_model(result.model, run_dir / "best.pt") + trained


def _quick_model(data_dir: str | os.PathLike | None, device: torch.device) -> tuple[nn.Module, str]:
    """The quick-mode model (a subset, 128 px, 2 epochs) behind a banner: for CI and for trying the code."""
    config = TrainConfig.quick()
    split = quick_subset(three_way_split(build_pairs_table(data_dir)), config.max_images)
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
# 8. Evaluation
# --------------------------------------------------------------------------


class Evaluation(NamedTuple):
    """What :func:`evaluate` returns: ``scores, probs, masks = evaluate(...)``."""

    scores: pd.DataFrame  # one row per image
    probs: np.ndarray  # (N, size, size) lung probabilities
    masks: np.ndarray  # (N, size, size) true masks, 0/1


def evaluate(
    model: nn.Module,
    rows: pd.DataFrame,
    size: int | None = None,
    original_resolution: bool = True,
    threshold: float = 0.5,
    postprocess: bool = False,
    tta_flip: bool = False,
    cache_dir: str | os.PathLike | None = None,
) -> Evaluation:
    """Per-image Dice, IoU and HD95 at the model's size and (optionally) at the original size.

    Returns an :class:`Evaluation`: ``scores`` has one row per image with the
    table's columns plus ``dice``, ``iou``, ``hd95`` (nan where nothing was
    predicted), ``empty_prediction`` and, at the original resolution,
    ``dice_orig``, ``iou_orig``, ``hd95_orig``; ``probs`` and ``masks`` are the
    model-size probabilities and true masks, in the same order.
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
    return Evaluation(result, probs, masks)


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
        raise LungsegDataError(f"Paired scores need the same images: {candidate.shape} against {reference.shape}.")
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
# 9. Inference
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
    size = getattr(model, "lungseg_config", {}).get("image_size")
    if np.ndim(images) != 3 or (size and tuple(np.shape(images)[1:]) != (size, size)):
        raise LungsegDataError(
            f"predict_arrays needs images of shape (N, {size or 'H'}, {size or 'W'}) at the model's size; got "
            f"{np.shape(images)}. Resize them with resize_image, or use predict, which takes any size."
        )
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
    labels, areas, _ = lung_regions(mask)
    if len(areas) > keep_components:
        keep = 1 + np.argsort(areas)[::-1][:keep_components]
        mask = np.isin(labels, keep).astype(np.uint8)
    if fill_holes:
        mask = ndimage.binary_fill_holes(mask).astype(np.uint8)
    return mask


def model_image_size(model: nn.Module, default: int = 256) -> int:
    """The input size a model was trained at (from its checkpoint config), else ``default``."""
    return int(getattr(model, "lungseg_config", {}).get("image_size", default))


# Lung fraction (share of the image) of the data set's 704 manual masks at 256 px, rounded outwards:
# used for a model whose checkpoint does not record the range of its own training masks.
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
    """True when the lung fields are brighter than the mediastinum: a MONOCHROME1 film read as MONOCHROME2."""
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
    _, areas, centroids = lung_regions(mask)
    large = areas >= LARGE_REGION_SHARE * mask.size
    if large.sum() > 2:
        reasons.append(f"{int(large.sum())} lung-sized regions, where a chest has two lungs")
    xs = centroids[:, 0][large]
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
    lungseg_io.check_image_size(gray.shape[1], gray.shape[0], "array")
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
    with_quality: bool = False,
) -> np.ndarray | Prediction:
    """Binary lung mask (0/1 ``uint8``) at the image's original size.

    ``image`` is a path, a file's bytes or an array: any size up to the limit of
    :func:`check_image_size`, 8 or 16 bit, gray or RGB(A), or DICOM.
    ``postprocess`` keeps the two largest regions and fills holes. With ``warn``,
    each reason to distrust the mask (:func:`mask_warnings`) is issued as a :class:`LungsegWarning`.
    With ``with_quality``, returns a :class:`Prediction`: the same mask and its
    estimated Dice (:func:`estimate_quality`, from the model's quality model,
    chapter 07), which costs two more forward passes.
    """
    gray = _as_gray(image)
    if with_quality:
        quality = require_quality_model(model)
        size = size or model_image_size(model)
        probs, signals = quality_signals(model, resize_image(gray, size)[None], quality)
        probs = cv2.resize(probs[0], (gray.shape[1], gray.shape[0]), interpolation=cv2.INTER_LINEAR)
    else:
        probs = predict_proba(model, gray, size)
    mask = (probs > threshold).astype(np.uint8)
    if postprocess:
        mask = postprocess_mask(mask)
    if warn:
        label = Path(image).name if isinstance(image, (str, os.PathLike)) else "image"
        for reason in mask_warnings(mask, gray, model_lung_fraction_range(model)):
            warnings.warn(f"{label}: {reason}", LungsegWarning, stacklevel=2)
    return Prediction(mask, quality_of(signals, quality)[0]) if with_quality else mask


# --------------------------------------------------------------------------
# 10. Figures and the upload app
# --------------------------------------------------------------------------


def tint(image: np.ndarray, regions: Sequence[tuple[np.ndarray, tuple[int, int, int]]], alpha: float) -> np.ndarray:
    """RGB picture of an X-ray with each ``(mask, colour)`` region blended in: ``(1 - alpha) * gray + alpha * colour``."""
    gray = to_gray_uint8(np.asarray(image))
    rgb = np.repeat(gray[:, :, None], 3, axis=2).astype(np.float32)
    for region, colour in regions:
        region = np.asarray(region).astype(bool)
        rgb[region] = (1 - alpha) * rgb[region] + alpha * np.array(colour, np.float32)
    return rgb.astype(np.uint8)


def overlay(image: np.ndarray, mask: np.ndarray, color: tuple[int, int, int] = (0, 200, 0), alpha: float = 0.4) -> np.ndarray:
    """RGB picture of an X-ray with ``mask`` tinted in ``color`` and its outline drawn."""
    out = tint(image, [(mask, color)], alpha)
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    cv2.drawContours(out, contours, -1, color, max(1, out.shape[0] // 256))
    return out


ERROR_COLOURS = {
    "true positive: lung found": (0, 180, 0),
    "false positive: marked, not lung": (230, 30, 30),
    "false negative: lung missed": (40, 90, 255),
}


def error_overlay(image: np.ndarray, pred: np.ndarray, truth: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """RGB picture: true positives green, false positives red, false negatives blue (:data:`ERROR_COLOURS`)."""
    pred, truth = pred.astype(bool), truth.astype(bool)
    regions = (pred & truth, pred & ~truth, ~pred & truth)
    return tint(image, list(zip(regions, ERROR_COLOURS.values())), alpha)


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
    """An ipywidgets interface: upload an X-ray, see the lung mask, its area, its estimated Dice, and download it.

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
            has_quality = quality_model_of(self.model) is not None
            result = predict(self.model, gray, postprocess=self.postprocess, warn=False, with_quality=has_quality)
        except LungsegError as error:
            self.message.value = f"<span style='color:#b00020'>Could not segment this file: {html.escape(str(error))}</span>"
            return None
        mask, quality = result if has_quality else (result, None)
        area = int(mask.sum())
        reasons = mask_warnings(mask, gray, model_lung_fraction_range(self.model))
        if quality is None:
            estimate = "<br>No estimated Dice: this checkpoint has no quality model (chapter 07 fits one)."
        else:
            estimate = (f"<br>Estimated Dice {quality.estimated_dice:.3f} "
                        f"({quality.dice_low:.3f} to {quality.dice_high:.3f}, {self.model.lungseg_quality.coverage:.0%} interval)"
                        + (" <span style='color:#b00020'><b>Review this mask</b></span>" if quality.review else ""))
        self.message.value = (f"<b>{html.escape(name)}</b>: {gray.shape[1]}x{gray.shape[0]} px, lung area "
                              f"{area:,d} px = {area / mask.size:.1%} of the image" + estimate
                              + "".join(f"<br><span style='color:#b36b00'>Check this mask: {html.escape(r)}</span>" for r in reasons))
        encoded = base64.b64encode(mask_png_bytes(mask)).decode()
        stem = html.escape(Path(name).stem)
        self.download.value = f"<a download='{stem}_mask.png' href='data:image/png;base64,{encoded}'>Download the mask (PNG)</a>"
        self.picture.value = overlay_png_bytes(gray, mask)
        return dict(name=name, gray=gray, mask=mask, lung_pixels=area, lung_fraction=area / mask.size, warnings=reasons,
                    quality=quality)


# --------------------------------------------------------------------------
# 11. Acquisition shifts
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
        raise LungsegConfigError(f"Unknown shift {kind!r} or severity {severity!r}: use one of {SHIFTS} and 1, 2 or 3.")
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
    for shift, severity, shifted_images, shifted_masks in shifted_copies(images, masks, shifts, severities, seed):
        dice, warned = scored(shifted_images, shifted_masks)
        frames.append(pd.DataFrame(dict(name=names, shift=shift, severity=severity, dice=dice, clean_dice=clean_dice, warned=warned)))
    return pd.concat(frames, ignore_index=True)


def shifted_copies(
    images: np.ndarray, masks: np.ndarray, shifts: Sequence[str], severities: Sequence[int], seed: int = SEED
) -> Iterable[tuple[str, int, np.ndarray, np.ndarray]]:
    """``(shift, severity, images, masks)`` for every shift and severity; image ``i`` gets seed ``seed + i`` (:func:`apply_shift`)."""
    for shift in shifts:
        for severity in severities:
            pairs = [apply_shift(image, mask, shift, severity, seed=seed + i) for i, (image, mask) in enumerate(zip(images, masks))]
            yield shift, severity, *(np.stack(parts) for parts in zip(*pairs))


def summarize_shifts(benchmark: pd.DataFrame, n_bootstrap: int = 2000) -> pd.DataFrame:
    """Per shift and severity: mean Dice, its paired drop from the clean images with a 95% BCa interval, and the warning rate."""
    rows = []
    for (shift, severity), group in benchmark[benchmark["shift"] != "none"].groupby(["shift", "severity"], sort=False):
        paired = paired_difference(group["dice"], group["clean_dice"], n_bootstrap=n_bootstrap)
        rows.append(dict(shift=shift, severity=severity, dice=group["dice"].mean(), drop=-paired["mean_difference"],
                         drop_low=-paired["ci_high"], drop_high=-paired["ci_low"], warned=group["warned"].mean(), n=paired["n"]))
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------
# 12. When to distrust a mask (chapter 07)
# --------------------------------------------------------------------------

QUALITY_SIGNALS = ("self_dice", "tta_dice", "shape_fit", "feature_distance")
REVIEW_BELOW = 0.9  # a mask whose estimated Dice is below this is flagged "review this mask"
SHAPE_SIZE = 64  # side of the masks the shape model sees
SHAPE_COMPONENTS = 12  # principal modes of lung shape kept
FEATURE_NEIGHBOURS = 5
QUALITY_FILE = "quality.npz"  # written beside a checkpoint by fit_quality_model


def dice_of(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two masks (or a probability map and a mask: the soft Dice); 1.0 when both are empty."""
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    total = a.sum() + b.sum()
    return float(2 * (a * b).sum() / total) if total > 0 else 1.0


def self_dice(probs: np.ndarray, threshold: float = 0.5) -> float:
    """Soft Dice of a probability map with its own mask: the Dice the model expects, if it were calibrated.

    :math:`\\hat D = 2\\sum_i p_i m_i / (\\sum_i p_i + \\sum_i m_i)` with :math:`m_i = [p_i > 0.5]`:
    1 when every pixel is certain, lower the more pixels sit near 0.5.
    """
    return dice_of(probs, probs > threshold)


def _view_matrix(size: int) -> np.ndarray:
    """The affine map of the test-time view: 8% smaller, moved 3% right and 2% down."""
    matrix = cv2.getRotationMatrix2D((size / 2, size / 2), 0, 0.92)
    matrix[:, 2] += (0.03 * size, 0.02 * size)
    return matrix


def test_time_views(image: np.ndarray) -> list[np.ndarray]:
    """Two slightly changed copies of an 8-bit image at model size: a smaller, shifted framing, and a blur.

    A mask the model is sure of barely moves under such changes; :func:`quality_signals`
    maps each view's prediction back with :func:`view_back` and compares.
    """
    size = image.shape[0]
    moved = cv2.warpAffine(image, _view_matrix(size), (size, size), flags=cv2.INTER_LINEAR, borderValue=0)
    blurred = cv2.GaussianBlur(image, (0, 0), sigmaX=1.5)
    return [moved, blurred]


def view_back(probs: list[np.ndarray]) -> list[np.ndarray]:
    """The predictions of :func:`test_time_views` mapped back into the original image's frame."""
    size = probs[0].shape[0]
    moved_back = cv2.warpAffine(probs[0], _view_matrix(size), (size, size), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP)
    return [moved_back, probs[1]]


@contextlib.contextmanager
def encoder_features(model: nn.Module):
    """Collect the encoder's deepest feature map, averaged over space, for every forward pass inside the block."""
    collected: list[np.ndarray] = []

    def hook(module, inputs, outputs):
        collected.append(outputs[-1].float().mean(dim=(2, 3)).cpu().numpy())

    handle = model.encoder.register_forward_hook(hook)
    try:
        yield collected
    finally:
        handle.remove()


def _unit_rows(features: np.ndarray) -> np.ndarray:
    return features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-8)


def _small_masks(masks: np.ndarray) -> np.ndarray:
    return np.stack([cv2.resize(m.astype(np.float32), (SHAPE_SIZE, SHAPE_SIZE), interpolation=cv2.INTER_AREA) for m in masks])


@dataclass
class QualityModel:
    """What :func:`estimate_quality` needs besides the segmentation model, fitted once per model.

    ``shape_mean``/``shape_modes``: a linear shape model (PCA) of the training masks
    at 64 px. ``train_features``: the unit-length encoder features of the training
    images. ``coef``/``intercept``: a linear regression of the signals onto
    :math:`\\log(1.001 - \\text{Dice})`, fitted on half of the validation X-rays;
    ``margin``: the split-conformal quantile of its absolute residuals on the other half.
    """

    shape_mean: np.ndarray
    shape_modes: np.ndarray
    train_features: np.ndarray
    coef: np.ndarray = field(default_factory=lambda: np.zeros(len(QUALITY_SIGNALS)))
    intercept: float = 0.0
    margin: float = float("nan")
    coverage: float = 0.9

    def save(self, path: str | os.PathLike) -> None:
        """Write it as a plain ``.npz`` (numbers only, read with ``allow_pickle=False``), atomically."""
        arrays = {key: np.asarray(value) for key, value in asdict(self).items()}
        lungseg_io.write_atomically(Path(path), lambda file: np.savez(file, **arrays))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "QualityModel":
        """Read a file of :meth:`save`; a damaged one raises :class:`LungsegCheckpointError` naming it."""
        try:
            with np.load(path, allow_pickle=False) as stored:
                values = {key: stored[key] for key in stored.files}
            return cls(**{key: value if value.ndim else value.item() for key, value in values.items()})
        except (OSError, ValueError, TypeError, KeyError) as error:
            raise LungsegCheckpointError(
                f"{path}: not a quality model written by fit_quality_model ({error}). Delete it and fit it again "
                "(chapter 07, or: python lungseg_utils.py fit-quality --checkpoint <best.pt>)."
            ) from None


def quality_references(model: nn.Module, train_images: np.ndarray, train_masks: np.ndarray) -> QualityModel:
    """Fit the shape model on the training masks and store the training images' encoder features."""
    from sklearn.decomposition import PCA

    shapes = _small_masks(train_masks).reshape(len(train_masks), -1)
    pca = PCA(n_components=min(SHAPE_COMPONENTS, len(shapes) - 1), random_state=SEED).fit(shapes)
    with encoder_features(model) as features:
        predict_arrays(model, train_images)
    return QualityModel(pca.mean_.astype(np.float32), pca.components_.astype(np.float32),
                        _unit_rows(np.concatenate(features)).astype(np.float32))


def shape_coefficients(masks: np.ndarray, quality: QualityModel) -> np.ndarray:
    """The coordinates ``(N, modes)`` of masks in the shape model: :math:`c_j = \\phi_j^\\top (m - \\mu)` at 64 px."""
    small = _small_masks(masks).reshape(len(masks), -1)
    return (small - quality.shape_mean) @ quality.shape_modes.T


def shape_fit(mask: np.ndarray, quality: QualityModel) -> float:
    """Dice of a mask with its nearest plausible lung shape (its projection on the shape model's modes).

    A pair of lungs like the training masks is rebuilt almost exactly (near 1); a
    mask with a lung missing, cut or spilling over the heart is not.
    """
    rebuilt = quality.shape_mean + shape_coefficients(mask[None], quality)[0] @ quality.shape_modes
    return dice_of(_small_masks(mask[None]).reshape(-1) > 0.5, rebuilt > 0.5)


def feature_distance(features: np.ndarray, quality: QualityModel) -> np.ndarray:
    """Mean cosine distance of each image's encoder features to its 5 nearest training images."""
    similarity = _unit_rows(features) @ quality.train_features.T
    nearest = -np.sort(-similarity, axis=1)[:, :FEATURE_NEIGHBOURS]
    return 1 - nearest.mean(axis=1)


def quality_signals(model: nn.Module, images: np.ndarray, quality: QualityModel) -> tuple[np.ndarray, pd.DataFrame]:
    """The probability maps of 8-bit images at model size, and one row of :data:`QUALITY_SIGNALS` per image.

    Three forward passes per image: the image as :func:`predict_arrays` sees it,
    and the two :func:`test_time_views`. The probabilities returned are those of
    the first pass, so a mask is the same as without the quality estimate.
    """
    with encoder_features(model) as features:
        probs = predict_arrays(model, images)
    views = np.stack([view for image in images for view in test_time_views(image)])  # both views of image 0, of image 1...
    view_probs = predict_arrays(model, views).reshape(len(images), 2, *images.shape[1:])
    rows = []
    for p, (moved, blurred) in zip(probs, view_probs):
        mask = p > 0.5
        back = view_back([moved, blurred])
        rows.append(dict(self_dice=self_dice(p), tta_dice=float(np.mean([dice_of(mask, b > 0.5) for b in back])),
                         shape_fit=shape_fit(mask, quality)))
    signals = pd.DataFrame(rows)
    signals["feature_distance"] = feature_distance(np.concatenate(features), quality)
    return probs, signals


def _signal_matrix(signals: pd.DataFrame) -> np.ndarray:
    """Signals on the scale the regression uses: log(1.001 - x) for the Dice-like ones."""
    columns = [np.log(1.001 - signals[name].clip(0, 1)) if name != "feature_distance" else signals[name] for name in QUALITY_SIGNALS]
    return np.stack(columns, axis=1).astype(np.float64)


def fit_quality_model(
    quality: QualityModel, signals: pd.DataFrame, dice: Sequence[float], groups: Sequence[str], coverage: float = 0.9, seed: int = SEED
) -> QualityModel:
    """Fit the Dice regression on half of the validation X-rays and its conformal margin on the other half.

    ``signals``/``dice``: one row per validation prediction (clean and shifted);
    ``groups``: the X-ray each row comes from, so that all views of one X-ray fall
    in the same half. The margin is the :math:`\\lceil (n+1)\\,\\text{coverage} \\rceil`-th
    smallest absolute residual of the calibration half (split conformal): for a new
    X-ray like these, the interval holds its Dice with probability at least ``coverage``.
    """
    from sklearn.linear_model import LinearRegression

    groups = np.asarray(groups)
    names = np.unique(groups)
    fit_names = np.random.default_rng(seed).permutation(names)[: len(names) // 2]
    in_fit = np.isin(groups, fit_names)
    features, target = _signal_matrix(signals), np.log(1.001 - np.clip(np.asarray(dice, np.float64), 0, 1))
    regression = LinearRegression().fit(features[in_fit], target[in_fit])
    residuals = np.sort(np.abs(target[~in_fit] - regression.predict(features[~in_fit])))
    rank = min(len(residuals), math.ceil((len(residuals) + 1) * coverage))
    return replace(quality, coef=regression.coef_, intercept=float(regression.intercept_),
                               margin=float(residuals[rank - 1]), coverage=coverage)


def estimate_quality(signals: pd.DataFrame, quality: QualityModel) -> pd.DataFrame:
    """Estimated Dice, its conformal interval and the review flag, one row per row of ``signals``."""
    if not np.isfinite(quality.margin):
        raise LungsegConfigError("This quality model has no fitted regression: call fit_quality_model first.")
    predicted = _signal_matrix(signals) @ quality.coef + quality.intercept
    estimate = np.clip(1.001 - np.exp(predicted), 0, 1)
    return pd.DataFrame(dict(
        estimated_dice=estimate,
        dice_low=np.clip(1.001 - np.exp(predicted + quality.margin), 0, 1),
        dice_high=np.clip(1.001 - np.exp(predicted - quality.margin), 0, 1),
        review=estimate < REVIEW_BELOW,
    ), index=signals.index)


def quality_file_for(checkpoint: str | os.PathLike) -> Path:
    """Where the quality model of a checkpoint lives: ``quality.npz`` in the checkpoint's folder."""
    return Path(checkpoint).with_name(QUALITY_FILE)


def quality_model_of(model: nn.Module) -> QualityModel | None:
    """The quality model saved beside the model's checkpoint (fit_quality_model), or None when there is none."""
    checkpoint = getattr(model, "lungseg_checkpoint", None)
    if getattr(model, "lungseg_quality", None) is None and checkpoint and quality_file_for(checkpoint).is_file():
        model.lungseg_quality = QualityModel.load(quality_file_for(checkpoint))
    return getattr(model, "lungseg_quality", None)


class MaskQuality(NamedTuple):
    """The quality estimate of one mask: estimated Dice, its conformal interval, the review flag and the signals."""

    estimated_dice: float
    dice_low: float
    dice_high: float
    review: bool
    signals: dict[str, float]


class Prediction(NamedTuple):
    """What ``predict(..., with_quality=True)`` returns: the mask and its :class:`MaskQuality`."""

    mask: np.ndarray
    quality: MaskQuality


def require_quality_model(model: nn.Module) -> QualityModel:
    """The model's quality model, or a :class:`LungsegCheckpointError` saying how to fit one."""
    quality = quality_model_of(model)
    if quality is None:
        where = getattr(model, "lungseg_checkpoint", None)
        raise LungsegCheckpointError(
            f"No quality model for {'checkpoint ' + str(where) if where else 'this model'}: fit one with chapter 07 or "
            f"`python lungseg_utils.py fit-quality --checkpoint <best.pt>` (it writes {QUALITY_FILE} beside the checkpoint)."
        )
    return quality


def quality_of(signals: pd.DataFrame, quality: QualityModel) -> list[MaskQuality]:
    """One :class:`MaskQuality` per row of ``signals``."""
    estimates = estimate_quality(signals, quality)
    return [MaskQuality(float(e.estimated_dice), float(e.dice_low), float(e.dice_high), bool(e.review),
                        {name: float(signals.loc[i, name]) for name in QUALITY_SIGNALS})
            for i, e in estimates.iterrows()]


def quality_benchmark(
    model: nn.Module,
    images: np.ndarray,
    masks: np.ndarray,
    names: Sequence[str],
    quality: QualityModel,
    shifts: Sequence[str] = SHIFTS,
    severities: Sequence[int] = tuple(SEVERITIES),
    seed: int = SEED,
) -> pd.DataFrame:
    """The quality signals and the true Dice of every prediction on clean X-rays and under the shifts.

    One row per image, shift and severity (shift ``"none"``, severity 0: clean),
    with the same shifted images as :func:`shift_benchmark` (image ``i`` gets seed
    ``seed + i``): ``name``, ``shift``, ``severity``, ``dice``, ``warned``
    (:func:`mask_warnings`), the :data:`QUALITY_SIGNALS` and ``seconds`` (the
    time of the three passes per image).
    """
    fraction_range = model_lung_fraction_range(model)
    frames = []
    conditions = itertools.chain([("none", 0, images, masks)], shifted_copies(images, masks, shifts, severities, seed))
    for shift, severity, shifted_images, shifted_masks in conditions:  # one condition in memory at a time
        started = time.perf_counter()
        probs, signals = quality_signals(model, shifted_images, quality)
        seconds = (time.perf_counter() - started) / len(images)
        predictions = (probs > 0.5).astype(np.uint8)
        signals.insert(0, "dice", dice_iou_per_image(predictions, shifted_masks)[0])
        signals.insert(0, "severity", severity)
        signals.insert(0, "shift", shift)
        signals.insert(0, "name", list(names))
        signals["warned"] = [bool(mask_warnings(p, image, fraction_range)) for p, image in zip(predictions, shifted_images)]
        signals["seconds"] = seconds
        frames.append(signals)
    return pd.concat(frames, ignore_index=True)


def fit_quality(
    model: nn.Module, train_arrays: tuple[np.ndarray, np.ndarray], val_arrays: tuple[np.ndarray, np.ndarray],
    val_names: Sequence[str], severities: Sequence[int] = tuple(SEVERITIES),
) -> tuple[QualityModel, pd.DataFrame]:
    """Fit a model's quality model: references from the training part, regression and margin on the validation part.

    The validation X-rays are used clean and under every shift at ``severities``.
    Returns the quality model and the validation benchmark it was fitted on.
    """
    quality = quality_references(model, *train_arrays)
    benchmark = quality_benchmark(model, *val_arrays, val_names, quality, severities=severities)
    return fit_quality_model(quality, benchmark, benchmark["dice"], benchmark["name"]), benchmark


def _registration_view(image: np.ndarray) -> np.ndarray:
    return cv2.resize(image.astype(np.float32), (SHAPE_SIZE, SHAPE_SIZE), interpolation=cv2.INTER_AREA)


def rca_dice(image: np.ndarray, mask: np.ndarray, atlas_images: np.ndarray, atlas_masks: np.ndarray) -> float:
    """Reverse classification accuracy (Valindria et al. 2017), single-atlas form: the best Dice the predicted mask reaches on references.

    The X-ray is registered to each reference X-ray (an affine map, OpenCV's ECC,
    at 64 px); its predicted mask is carried along and scored against that
    reference's manual mask. If the mask is good, some reference that looks alike
    gets a good mask from it, so the maximum over references tracks the true Dice.
    """
    query, moved_mask = _registration_view(image), _registration_view(mask)
    criteria = (cv2.TERM_CRITERIA_EPS | cv2.TERM_CRITERIA_COUNT, 50, 1e-4)
    best = 0.0
    for reference, reference_mask in zip(atlas_images, atlas_masks):
        warp = np.eye(2, 3, dtype=np.float32)
        with contextlib.suppress(cv2.error):  # no convergence: keep the identity map
            _, warp = cv2.findTransformECC(_registration_view(reference), query, warp, cv2.MOTION_AFFINE, criteria, None, 5)
        carried = cv2.warpAffine(moved_mask, warp, (SHAPE_SIZE, SHAPE_SIZE), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP)
        best = max(best, dice_of(carried > 0.5, _registration_view(reference_mask) > 0.5))
    return best


def auroc_interval(
    bad: Sequence[bool], score: Sequence[float], groups: Sequence[str], n_bootstrap: int = 1000, seed: int = SEED
) -> dict[str, float]:
    """Area under the ROC curve of ``score`` (higher: more likely bad) for telling ``bad`` rows, with a 95% interval.

    The interval is a percentile bootstrap that resamples whole X-rays (``groups``),
    because the shifted copies of one X-ray are not independent.
    """
    from sklearn.metrics import roc_auc_score

    bad, score, groups = np.asarray(bad, bool), np.asarray(score, float), np.asarray(groups)
    rows_of = [np.flatnonzero(groups == name) for name in np.unique(groups)]
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(n_bootstrap):
        rows = np.concatenate([rows_of[i] for i in rng.integers(0, len(rows_of), len(rows_of))])
        if 0 < bad[rows].sum() < len(rows):
            values.append(roc_auc_score(bad[rows], score[rows]))
    low, high = np.percentile(values, [2.5, 97.5]) if values else (np.nan, np.nan)
    auroc = roc_auc_score(bad, score) if 0 < bad.sum() < len(bad) else np.nan
    return dict(auroc=float(auroc), low=float(low), high=float(high), n_bad=int(bad.sum()), n=len(bad))


def review_curve(bad: Sequence[bool], score: Sequence[float], budgets: Sequence[float]) -> np.ndarray:
    """Share of the ``bad`` masks a reader sees who reviews the ``budget`` share of masks with the highest ``score``."""
    order = np.argsort(-np.asarray(score, float), kind="stable")
    caught = np.cumsum(np.asarray(bad, bool)[order])
    return np.array([caught[max(int(round(b * len(order))), 1) - 1] for b in budgets]) / max(caught[-1], 1)


# The edge plumbing (downloads, decoder guards and DICOM, checkpoint files, the hub, the command line)
# lives in lungseg_io, which builds on this module; its public names are re-exported here.
import lungseg_io  # noqa: E402
from lungseg_io import *  # noqa: E402,F401,F403

__all__ += lungseg_io.__all__

if __name__ == "__main__":
    sys.exit(lungseg_io.main())
