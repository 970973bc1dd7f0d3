"""Shared fixtures: the real data (via LUNGSEG_DATA_DIR) and tiny synthetic data sets."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")


@pytest.fixture(scope="session")
def real_data_dir() -> Path:
    """The shared real data set; CI sets LUNGSEG_DATA_DIR, and its absence is a failure, not a skip."""
    path = os.environ.get("LUNGSEG_DATA_DIR") or REPO.parent / "shared/data/chest-xray-masks-and-labels"
    assert Path(path).is_dir(), f"Real data not found at {path}: set LUNGSEG_DATA_DIR (see README)."
    return Path(path)


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
