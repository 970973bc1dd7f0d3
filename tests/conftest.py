"""Shared fixtures: the real data (via LUNGSEG_DATA_DIR), tiny synthetic data sets, one tiny trained checkpoint
and one random model, and ``naming`` for matching error messages by what they name."""
from __future__ import annotations

import contextlib
import os
import random
import re
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
CLI = [sys.executable, str(REPO / "lungseg_utils.py")]  # the command line, as a user runs it
sys.path.insert(0, str(REPO))
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")


SHARED_COPY = REPO.parent / "shared/data/chest-xray-masks-and-labels"


def find_test_data(shared_copy: Path = SHARED_COPY, **montgomery_options) -> Path:
    """The folder holding the real X-rays (``CXR_png/``): from ``$LUNGSEG_DATA_DIR``, the shared copy, or data/.

    ``$LUNGSEG_DATA_DIR`` naming no data is an error (CI sets it). On a fresh machine
    with neither, :func:`lungseg_utils.ensure_data` fetches what it can into data/
    (without Kaggle credentials, the NLM Montgomery set) and says so.
    """
    import lungseg_utils as L

    if os.environ.get("LUNGSEG_DATA_DIR"):
        return L.find_data_dir()
    if shared_copy.is_dir():
        return L.find_data_dir(shared_copy)
    return L.ensure_data(**montgomery_options)


@pytest.fixture(scope="session")
def real_data_dir() -> Path:
    """Real X-rays with manual masks: the Kaggle set, or the Montgomery set alone on a fresh machine."""
    return find_test_data()


@pytest.fixture(scope="session")
def real_xray(real_data_dir) -> Path:
    """One real chest X-ray file that has a manual mask (the first by name)."""
    import lungseg_utils as L

    return Path(L.labeled_only(L.build_pairs_table(real_data_dir, read_sizes=False)).image_path[0])


@pytest.fixture(scope="session")
def kaggle_data_dir(real_data_dir) -> Path:
    """The Kaggle set (both hospitals, 704 masks); skips, saying why, where only the Montgomery set is there."""
    import lungseg_utils as L

    sources = set(L.build_pairs_table(real_data_dir, read_sizes=False).source)
    if sources != {"Montgomery", "Shenzhen"}:
        pytest.skip(f"needs the Kaggle set with both hospitals; {real_data_dir} holds {sorted(sources)} only")
    return real_data_dir


def naming(*names: str | Path) -> str:
    """A ``pytest.raises(match=...)`` pattern: the message names each of ``names``, in any order.

    Give the file (a Path stands for its name) or setting an error is about, and at most one key word
    that is the point of the test, never a whole sentence: the wording may change, what it names may not.
    """
    texts = [name.name if isinstance(name, Path) else str(name) for name in names]
    for i, text in enumerate(texts):
        for other in texts[:i] + texts[i + 1:]:
            if text in other:
                raise ValueError(f"{text!r} is part of {other!r}: matching both would check nothing more")
    return "(?s)" + "".join(f"(?=.*{re.escape(text)})" for text in texts)


@contextlib.contextmanager
def random_state_kept():
    """Run a block (e.g. a fixture that seeds everything) without changing Python's, NumPy's and torch's random state."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    cudnn = torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic
    try:
        with torch.random.fork_rng():
            yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = cudnn


def tiny_arrays(n: int, size: int = 64, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` synthetic X-rays and their 0/1 masks (two elliptic lungs, shifted a little), ``size`` px."""
    rng = np.random.default_rng(seed)
    masks = np.stack([lung_mask(size, shift=int(s)) // 255 for s in rng.integers(-4, 5, n)])
    images = (masks * 120 + rng.integers(0, 60, masks.shape)).astype(np.uint8)
    return images, masks


def tiny_config(**overrides):
    """A TrainConfig that trains a resnet18 U-Net on 64 px images on the CPU in about a second per epoch."""
    import lungseg_utils as L

    values = dict(encoder="resnet18", weights=None, image_size=64, epochs=3, batch_size=4, lr=1e-3, device="cpu")
    values.update(overrides)
    return L.TrainConfig(**values)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """The ``best.pt`` of a resnet18 U-Net trained by train() for one epoch on tiny arrays (64 px).

    Shared by the whole session: read it, or copy it before changing it.
    """
    import lungseg_utils as L

    run = tmp_path_factory.mktemp("tiny-checkpoint") / "run"
    with random_state_kept():
        L.train(tiny_arrays(8), tiny_arrays(4, seed=1), run, tiny_config(epochs=1))
    return run / "best.pt"


@pytest.fixture(scope="session")
def random_model():
    """A randomly initialized resnet18 U-Net for 64 px inputs, in eval mode.

    Shared by the whole session: a test that changes it (its config, its weights) works on a copy.
    """
    import lungseg_utils as L

    with random_state_kept():
        torch.manual_seed(0)
        model = L.build_model("resnet18", weights=None).eval()
    model.lungseg_config["image_size"] = 64
    return model


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path_factory, monkeypatch):
    """Every test writes its cache into a temporary folder, never into the repository."""
    monkeypatch.setenv("LUNGSEG_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "cache"))


def lung_mask(size: int = 64, shift: int = 0) -> np.ndarray:
    """A 0/255 mask with two elliptic 'lungs'."""
    mask = np.zeros((size, size), np.uint8)
    cv2.ellipse(mask, (size // 3 + shift, size // 2), (size // 8, size // 3), 0, 0, 360, 255, -1)
    cv2.ellipse(mask, (2 * size // 3 + shift, size // 2), (size // 8, size // 3), 0, 0, 360, 255, -1)
    return mask


def write_kaggle_layout(root: Path, n: int = 4, size: int = 64) -> Path:
    """A tiny data set in the Kaggle layout: both naming conventions, one unlabeled image."""
    base = root / "Lung Segmentation"
    (base / "CXR_png").mkdir(parents=True)
    (base / "masks").mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        for prefix, mask_suffix in (("MCUCXR", ""), ("CHNCXR", "_mask")):
            name = f"{prefix}_{i:04d}_{i % 2}"
            image = (rng.random((size, size)) * 80).astype(np.uint8) + lung_mask(size) // 2
            cv2.imwrite(str(base / "CXR_png" / f"{name}.png"), image)
            cv2.imwrite(str(base / "masks" / f"{name}{mask_suffix}.png"), lung_mask(size))
    cv2.imwrite(str(base / "CXR_png" / "CHNCXR_9999_1.png"), np.zeros((size, size), np.uint8))
    return base


def dicom_bytes(pixels: np.ndarray, photometric: str = "MONOCHROME2", **attributes) -> bytes:
    """A minimal uncompressed 16-bit DICOM file (digital X-ray) holding ``pixels``; extra attributes are set as given."""
    import io

    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # digital X-ray
    meta.MediaStorageSOPInstanceUID = generate_uid()
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    for key, value in attributes.items():
        setattr(ds, key, value)
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


def write_header_bomb(path: Path, side: int = 20000) -> Path:
    """A valid 1-bit PNG of ``side`` x ``side`` black pixels: tens of kB on disk, gigabytes once decoded to 8 bit."""
    from PIL import Image

    Image.new("1", (side, side)).save(path, optimize=True)
    return path


class StandInModel(torch.nn.Module):
    """A stand-in network whose logits are ``logits_of(input)``: its masks are known exactly (64 px model size)."""

    def __init__(self, logits_of):
        super().__init__()
        self.unused = torch.nn.Parameter(torch.zeros(1))  # predict_arrays reads the device from a parameter
        self.lungseg_config = {"image_size": 64}
        self.logits_of = logits_of

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits_of(x)
