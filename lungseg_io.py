"""lungseg_io: where files come in and go out.

The chapters never import this module: :mod:`lungseg_utils` re-exports the
names in ``__all__`` and calls the others. It holds the edge plumbing that
keeps those helpers safe and their errors clear:

1. Writing files safely: ``write_atomically``; download and safe extraction: ``download_file``,
   ``safe_extract``, ``download_montgomery``, ``download_kaggle``.
2. Decoder guards and DICOM: ``check_image_size``, ``open_raster``, ``raster_pixels``, ``decode_dicom``.
3. Checkpoint files: ``read_checkpoint``, ``checked_config``, ``plain``.
4. ImageNet weights: ``hub_reachable``, ``cached_imagenet_state``, ``load_weights_file``.
5. The command line: ``main`` (``python lungseg_utils.py --help``).
"""
from __future__ import annotations

import argparse
import contextlib
import errno
import hashlib
import http.client
import io
import itertools
import os
import pickle
import re
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
from dataclasses import replace
from pathlib import Path
from typing import BinaryIO, Callable, Sequence

import cv2
import numpy as np
import pandas as pd
import segmentation_models_pytorch as smp
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = [
    "write_atomically", "display_name", "MONTGOMERY_URLS", "MONTGOMERY_IMAGES", "MAX_ARCHIVE_BYTES",
    "safe_extract", "download_file", "sha256_of", "download_montgomery", "download_kaggle",
    "check_image_size", "max_image_pixels", "read_checkpoint", "imagenet_weights_available", "main",
]


# The NLM Montgomery County set, tried in this order (both addresses appear in public scripts).
MONTGOMERY_URLS = (
    "https://data.lhncbc.nlm.nih.gov/public/Tuberculosis-Chest-X-ray-Datasets/"
    "Montgomery-County-CXR-Set/MontgomerySet/MontgomerySet.zip",
    "https://data.lhncbc.nlm.nih.gov/public/Tuberculosis-Chest-X-ray-Datasets/"
    "Montgomery-County-CXR-Set/MontgomerySet.zip",
)

# Size and SHA-256 of MontgomerySet.zip, where known: NLM publishes no checksum, so the archive is
# checked by its content (138 X-rays, each with a left and a right mask); `python lungseg_utils.py
# download --montgomery` prints both values of the file it fetched.
MONTGOMERY_ARCHIVE_SIZE: int | None = None

MONTGOMERY_ARCHIVE_SHA256: str | None = None

MONTGOMERY_IMAGES = 138

MAX_ARCHIVE_BYTES = 4 * 2**30  # refuse archives that would unpack to more than 4 GiB (zip bombs)


# --------------------------------------------------------------------------
# Writing files safely
# --------------------------------------------------------------------------


def describe_os_error(error: OSError) -> str:
    """What an ``OSError`` means for the user, and what to do."""
    if error.errno == errno.ENOSPC:
        return "the disk is full; free some space and run again"
    if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return "permission denied; choose a folder you can write to"
    return error.strerror or str(error)


def display_name(path: str | os.PathLike) -> str:
    """A path as text that any terminal can print (bytes that are not UTF-8 shown as escapes)."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def write_atomically(path: str | os.PathLike, write: Callable[[BinaryIO], object]) -> Path:
    """Write ``path`` with ``write(file)`` through a temporary file beside it, renamed into place when complete.

    A failure (a full disk, no permission) removes the temporary file, leaves a
    previous ``path`` as it was, and raises :class:`LungsegError` naming the file
    and the cause. Returns ``path``.
    """
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(temporary, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        if os.path.getsize(temporary) == 0:
            raise L.LungsegError(f"Could not write {display_name(path)}: nothing was written.")
        os.replace(temporary, path)
    except BaseException as error:
        temporary.unlink(missing_ok=True)
        # a writer may wrap the OSError (torch.save raises a RuntimeError while handling it)
        cause = error if isinstance(error, OSError) else error.__context__
        if isinstance(cause, OSError):
            raise L.LungsegError(f"Could not write {display_name(path)}: {describe_os_error(cause)}.") from None
        raise
    return path


# --------------------------------------------------------------------------
# Download and safe extraction
# --------------------------------------------------------------------------


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
            raise L.LungsegDataError(
                f"Refusing to extract {archive}: member {name!r} would land outside "
                f"{target} or is a link. Download the archive again from its official source."
            )
    total = sum(member.file_size for member in members)
    if total > max_bytes:
        raise L.LungsegDataError(
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
        raise L.LungsegDataError(f"{archive}: not a readable zip archive ({error}). Download it again.") from error
    staging = Path(tempfile.mkdtemp(prefix=".extracting-", dir=target))
    try:
        with zf:
            members = zf.infolist()
            _check_archive_members(archive, members, staging.resolve(), max_bytes)
            try:
                zf.extractall(staging, members)
            except (zipfile.BadZipFile, EOFError, zlib.error) as error:
                raise L.LungsegDataError(f"{archive}: the archive is damaged ({error}). Download it again.") from error
        tops = sorted({Path(m.filename).parts[0] for m in members})
        clashes = [name for name in tops if (target / name).exists()]
        if clashes:
            raise L.LungsegDataError(
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
            with L.tqdm(total=total, unit="B", unit_scale=True, desc=destination.name) as bar:
                while chunk := response.read(1 << 20):
                    out.write(chunk)
                    bar.update(len(chunk))
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    if total is not None and partial.stat().st_size != total:
        received = partial.stat().st_size
        partial.unlink()
        raise L.LungsegDataError(f"Download of {url} was interrupted ({received:,d} of {total:,d} bytes). Run it again.")
    if not _file_matches(partial, expected_size, sha256):
        actual = partial.stat().st_size
        partial.unlink()
        raise L.LungsegDataError(
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
        raise L.LungsegDataError(
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
    ``ManualMask/leftMask`` and ``rightMask``; :func:`L.build_pairs_table` combines them.
    """
    target = Path(target) if target else L.settings().data_dir
    set_dir = target / "MontgomerySet"
    if L._has_images(set_dir):
        return set_dir
    if set_dir.exists():
        raise L.LungsegDataError(f"{set_dir} exists but holds no X-rays in CXR_png/. Move it away, then download again.")
    archive, failures = None, []
    for url in urls:
        try:
            archive = download_file(url, target / "MontgomerySet.zip", expected_size, sha256, timeout)
            break
        except (urllib.error.URLError, OSError, http.client.HTTPException, L.LungsegDataError) as error:
            failures.append(f"{url}: {error}")
    if archive is None:
        raise L.LungsegDataError("Could not download the Montgomery set:\n  " + "\n  ".join(failures))
    print(f"{archive.name}: {archive.stat().st_size:,d} bytes, SHA-256 {sha256_of(archive)}")
    try:
        safe_extract(archive, target)
        _check_montgomery_set(set_dir, expected_images)
    except L.LungsegDataError as error:
        archive.unlink(missing_ok=True)
        if set_dir.exists():  # written just now by safe_extract, and incomplete
            shutil.rmtree(set_dir)
        raise L.LungsegDataError(f"{error}\nThe archive was deleted; run the download again.") from error
    archive.unlink()
    return set_dir


def download_kaggle(target: str | os.PathLike | None = None) -> Path:
    """Download the Kaggle 'Chest X-Ray Masks and Labels' set with ``kagglehub``.

    Skipped when ``target`` already holds the data. kagglehub keeps its own cache;
    ``target/chest-xray-masks-and-labels`` is made a link to it (a copy where links
    are not allowed). Returns the folder that holds ``CXR_png/``.
    """
    target = Path(target) if target else L.settings().data_dir
    with contextlib.suppress(L.LungsegDataError):
        return L.find_data_dir(target)
    try:
        import kagglehub

        downloaded = Path(kagglehub.dataset_download(L.KAGGLE_DATASET))
    except Exception as error:  # no internet, no credentials, no kagglehub, ...
        raise L.LungsegDataError(f"Download from Kaggle failed ({type(error).__name__}: {error}).\n{L.DATA_HELP}") from error
    link = target / "chest-xray-masks-and-labels"
    try:
        target.mkdir(parents=True, exist_ok=True)
        if not link.exists():
            try:
                link.symlink_to(downloaded, target_is_directory=True)
            except OSError:
                shutil.copytree(downloaded, link)
    except OSError as error:
        raise L.LungsegDataError(
            f"Downloaded the Kaggle set to {downloaded} but could not place it in {link} ({error.strerror or error}). "
            f"Set LUNGSEG_DATA_DIR={downloaded} instead."
        ) from None
    return L.find_data_dir(link)


# --------------------------------------------------------------------------
# Decoder guards and DICOM
# --------------------------------------------------------------------------


MIN_IMAGE_SIDE = 32


def max_image_pixels() -> int:
    """The largest image accepted: ``$LUNGSEG_MAX_MEGAPIXELS`` million pixels, at most Pillow's own limit (about 89)."""
    return min(int(L.settings().max_megapixels * 1e6), Image.MAX_IMAGE_PIXELS or sys.maxsize)


def check_image_size(width: int, height: int, name: str, max_pixels: int | None = None) -> None:
    """Refuse images over ``max_pixels`` (default :func:`max_image_pixels`, 60 megapixels) or under 32 px per side.

    A Montgomery original has 19.7 megapixels; the default leaves room for larger detectors.
    """
    max_pixels = max_pixels or max_image_pixels()
    if width * height > max_pixels:
        raise L.LungsegDataError(
            f"{name}: {width}x{height} px ({width * height / 1e6:.1f} megapixels) is over the limit of "
            f"{max_pixels / 1e6:g} megapixels. Downscale the image, or raise the limit with the environment "
            "variable LUNGSEG_MAX_MEGAPIXELS if it really is an X-ray that large."
        )
    if min(width, height) < MIN_IMAGE_SIDE:
        raise L.LungsegDataError(
            f"{name}: {width}x{height} px is too small: each side needs at least {MIN_IMAGE_SIDE} px "
            "(a chest X-ray has hundreds to thousands). Use the full-size image."
        )


def describe_source(source: str | os.PathLike | bytes, name: str | None) -> str:
    """The name used in messages: ``name``, else the path, else 'uploaded data'."""
    if name:
        return name
    return str(source) if isinstance(source, (str, os.PathLike)) else "uploaded data"


def check_file(source: str | os.PathLike | bytes, name: str) -> None:
    """Clear messages for a missing path, a folder and an empty file or upload."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) == 0:
            raise L.LungsegDataError(f"{name}: the upload is empty (0 bytes). Choose the X-ray file again.")
        return
    path = Path(source)
    if not path.exists():
        raise L.LungsegDataError(f"{name}: not found. Check the file name and its folder.")
    if path.is_dir():
        raise L.LungsegDataError(f"{name}: is a folder, not an image file. Give the image files inside it.")
    if path.stat().st_size == 0:
        raise L.LungsegDataError(f"{name}: the file is empty (0 bytes). Copy or download it again.")
    try:
        open(path, "rb").close()
    except OSError as error:
        raise L.LungsegDataError(f"{name}: cannot be read: {describe_os_error(error)}.") from None


def looks_like_dicom(source: str | os.PathLike | bytes, name: str) -> bool:
    """True for a ``.dcm``/``.dicom`` name or the DICOM preamble (``DICM`` at byte 128)."""
    if name.lower().endswith(L.DICOM_SUFFIXES):
        return True
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source[128:132]) == b"DICM"
    with open(source, "rb") as f:
        f.seek(128)
        return f.read(4) == b"DICM"


def open_raster(source: str | os.PathLike | bytes, name: str, max_pixels: int | None = None) -> Image.Image:
    """Open a PNG/JPEG/TIFF/BMP lazily (header only) and check its size before anything is decoded.

    Pillow reads only the header here, and refuses by itself what is over twice
    its own limit; :func:`check_image_size` refuses the rest and names the file.
    """
    check_file(source, name)
    fileobj = io.BytesIO(source) if isinstance(source, (bytes, bytearray, memoryview)) else source
    try:
        im = Image.open(fileobj)
    except Image.DecompressionBombError as error:  # over Pillow's own limit: its message gives the pixel count
        pixels = re.search(r"\((\d+) pixels\)", str(error))
        size = f"{int(pixels.group(1)) / 1e6:.1f} megapixels" if pixels else "its size"
        raise L.LungsegDataError(
            f"{name}: {size} is over the limit of {max_image_pixels() / 1e6:g} megapixels. Downscale the image."
        ) from None
    except UnidentifiedImageError:
        raise L.LungsegDataError(
            f"{name}: cannot be read as an image: it is not PNG, JPEG, TIFF, BMP or DICOM, or it is corrupt. "
            "Replace it with a valid image file (for the data set, download it again)."
        ) from None
    except (OSError, SyntaxError, ValueError) as error:
        raise L.LungsegDataError(f"{name}: corrupt image header ({error}). Copy or download the file again.") from None
    try:
        check_image_size(*im.size, name, max_pixels)
    except L.LungsegDataError:
        im.close()
        raise
    return im


def raster_pixels(im: Image.Image, name: str, keep_channels: bool = False) -> np.ndarray:
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
        raise L.LungsegDataError(
            f"{name}: the image data is corrupt or truncated ({error}). Copy or download the file again."
        ) from None
    mode = im.mode
    if mode in ("1", "L", "I", "F") or mode.startswith("I;16"):
        return np.asarray(im)
    if mode == "LA":
        return np.asarray(im.getchannel("L"))
    try:
        if keep_channels:
            has_alpha = "A" in mode or "transparency" in im.info
            return np.asarray(im.convert("RGBA" if has_alpha else "RGB"))
        return np.asarray(im.convert("L"))
    except (ValueError, OSError):
        raise L.LungsegDataError(
            f"{name}: its colour mode {mode} cannot be converted to gray. Save the image as grayscale or RGB."
        ) from None


def decode_dicom(source: str | os.PathLike | bytes, name: str, max_pixels: int | None) -> np.ndarray:
    """Decode a DICOM image: modality LUT, VOI LUT or window, MONOCHROME1 inverted, 8-bit gray."""
    try:
        import pydicom
        from pydicom.pixels import apply_modality_lut, apply_voi_lut
    except ImportError:
        raise L.LungsegDataError(f"{name}: reading DICOM needs pydicom 3 (pip install 'pydicom>=3').") from None
    fileobj = io.BytesIO(source) if isinstance(source, (bytes, bytearray, memoryview)) else source
    try:
        dataset = pydicom.dcmread(fileobj)
        rows, columns = int(dataset.Rows), int(dataset.Columns)
    except Exception as error:
        raise L.LungsegDataError(f"{name}: not a readable DICOM image ({type(error).__name__}: {error}).") from None
    frames = int(getattr(dataset, "NumberOfFrames", 1) or 1)
    check_image_size(columns, rows * frames, name, max_pixels)
    try:
        pixels = dataset.pixel_array
    except Exception as error:
        raise L.LungsegDataError(
            f"{name}: the DICOM pixel data cannot be decoded ({type(error).__name__}: {error}). "
            "Compressed DICOM may need pylibjpeg or gdcm; or export the image as PNG."
        ) from None
    if frames > 1:
        pixels = pixels[0]
    if pixels.ndim == 3:  # colour DICOM (rare for X-rays)
        return cv2.cvtColor(L.to_uint8_range(pixels), cv2.COLOR_RGB2GRAY)
    try:
        values = np.asarray(apply_voi_lut(apply_modality_lut(pixels, dataset), dataset), dtype=np.float32)
    except Exception as error:  # e.g. a WindowWidth of 0, a RescaleSlope that is not a number
        raise L.LungsegDataError(
            f"{name}: its DICOM grey-level tags cannot be applied ({type(error).__name__}: {error}). "
            "Export the image as PNG from your viewer."
        ) from None
    gray = L.to_uint8_range(values)
    return 255 - gray if str(getattr(dataset, "PhotometricInterpretation", "")) == "MONOCHROME1" else gray


# --------------------------------------------------------------------------
# Checkpoint files
# --------------------------------------------------------------------------


def plain(value):
    """``value`` in plain Python types (str, int, float, bool, None, list, dict; tensors kept).

    ``torch.load(weights_only=True)`` refuses anything else, so a ``Path`` or a
    NumPy number in a config would make a checkpoint unreadable.
    """
    if isinstance(value, dict):
        return {str(key): plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(item) for item in value]
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


def read_checkpoint(path: str | os.PathLike) -> dict:
    """The dict stored in a checkpoint file, read with ``weights_only=True`` (no code can run).

    Every failure raises :class:`L.LungsegCheckpointError` naming the file and what to do.
    """
    path = Path(path)
    if not path.exists():
        raise L.LungsegCheckpointError(
            f"Checkpoint not found: {path}. Train a model first (chapter 03 or `python lungseg_utils.py train`) "
            "or give the path of its best.pt."
        )
    if path.is_dir():
        raise L.LungsegCheckpointError(f"{path}: is a folder; give the checkpoint file inside it (e.g. {path / 'best.pt'}).")
    if path.stat().st_size == 0:
        raise L.LungsegCheckpointError(f"{path}: the file is empty (0 bytes). Copy it again or train again.")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if "weights only load failed" in str(error).lower():
            raise L.LungsegCheckpointError(
                f"{path}: refused. Besides tensors it holds Python objects whose loading could run code, "
                "and lungseg loads only tensors and plain values. Use a checkpoint written by lungseg's train(), "
                "from a source you trust."
            ) from None
        raise L.LungsegCheckpointError(f"{path}: not a PyTorch checkpoint ({error}). Give the best.pt written by train().") from None
    except Exception as error:
        with open(path, "rb") as f:
            is_zip = f.read(2) == b"PK"
        reason = str(error).split(". ")[0].splitlines()[0][:200]
        if is_zip:
            raise L.LungsegCheckpointError(
                f"{path}: the checkpoint is damaged or truncated ({reason}). Copy it again, or train again."
            ) from None
        raise L.LungsegCheckpointError(
            f"{path}: not a PyTorch checkpoint ({type(error).__name__}: {reason}). Give the best.pt written by train()."
        ) from None
    if not isinstance(payload, dict):
        raise L.LungsegCheckpointError(f"{path}: holds a {type(payload).__name__}, not a lungseg checkpoint. Use a file written by train().")
    return payload


CHECKPOINT_CONFIG_KEYS = ("encoder", "image_size")
MAX_MODEL_SIZE = 4096  # pixels per side: a checkpoint asking for more is refused before any memory is allocated


def checked_config(path: Path, payload: dict) -> dict:
    """The config of a checkpoint, after checking that it can rebuild a model."""
    if "model_state" not in payload or "config" not in payload:
        raise L.LungsegCheckpointError(f"{path}: not a lungseg checkpoint (no 'model_state'/'config'). Use a file written by train().")
    config = payload["config"]
    if not isinstance(config, dict):
        raise L.LungsegCheckpointError(
            f"{path}: its config is a {type(config).__name__}, not a dict. Use a checkpoint written by lungseg's train()."
        )
    missing = [key for key in CHECKPOINT_CONFIG_KEYS if key not in config]
    if missing:
        raise L.LungsegCheckpointError(f"{path}: its config lacks {', '.join(missing)}. Use a checkpoint written by lungseg's train().")
    if config["encoder"] not in smp.encoders.get_encoder_names():
        raise L.LungsegCheckpointError(
            f"{path}: unknown encoder {config['encoder']!r} (segmentation-models-pytorch {smp.__version__} does not "
            "have it). Use a checkpoint of a known encoder such as resnet34, or update segmentation-models-pytorch."
        )
    size = config["image_size"]
    if not isinstance(size, int) or size <= 0 or size % 32:
        raise L.LungsegCheckpointError(f"{path}: image_size {size!r} is not a positive multiple of 32. Use a checkpoint written by train().")
    if size > MAX_MODEL_SIZE:
        raise L.LungsegCheckpointError(
            f"{path}: image_size {size} is larger than any X-ray needs (at most {MAX_MODEL_SIZE}). Use a checkpoint written by train()."
        )
    return config


# --------------------------------------------------------------------------
# ImageNet weights: the hub, its cache and local files
# --------------------------------------------------------------------------


def hub_reachable(host: str = "huggingface.co", timeout: float = 2.0) -> bool:
    """Fast check that ``host`` answers on port 443 (avoids long retry loops when offline).

    The name look-up runs in a daemon thread with the same timeout: a resolver
    that never answers blocks neither this call nor the end of the process.
    """
    if L.settings().hub_offline:
        return False
    addresses: list = []

    def look_up() -> None:
        with contextlib.suppress(OSError):
            addresses.extend(socket.getaddrinfo(host, 443, type=socket.SOCK_STREAM))

    lookup = threading.Thread(target=look_up, daemon=True)
    lookup.start()
    lookup.join(timeout)
    if not addresses:
        return False
    try:
        with socket.create_connection(addresses[0][4][:2], timeout=timeout):
            return True
    except OSError:
        return False


def cached_imagenet_state(encoder: str) -> dict[str, torch.Tensor] | None:
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
    return cached_imagenet_state(encoder) is not None or hub_reachable()


_warned_offline = False


def load_imagenet_encoder(model: smp.Unet, encoder: str) -> str | None:
    """Load ImageNet weights into ``model``'s encoder: from the Hugging Face cache, else the hub.

    Returns where they came from, or None (the encoder stays random) when
    neither can be reached; that case warns once per process.
    """
    global _warned_offline
    state = cached_imagenet_state(encoder)
    if state is not None:
        model.encoder.load_state_dict(state)
        return "imagenet (Hugging Face cache)"
    if hub_reachable():
        model.encoder.load_state_dict(smp.encoders.get_encoder(encoder, weights="imagenet").state_dict())
        return "imagenet (downloaded)"
    if not _warned_offline:
        warnings.warn(
            f"ImageNet weights for {encoder} are not in the Hugging Face cache and the hub cannot be "
            "reached: training from random initialization. To use them offline, pass "
            "weights='path/to/model.safetensors' or pre-fill the cache (see README).",
            stacklevel=3,
        )
        _warned_offline = True
    return None


def load_weights_file(model: smp.Unet, path: Path) -> None:
    """Load a local ``.safetensors``/``.pth`` file of encoder or whole-model weights (safely)."""
    if not path.is_file():
        raise L.LungsegDataError(f"Weights file not found: {path}. Give the path of a .safetensors or .pth file.")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
            state = state.get("model_state", state) if isinstance(state, dict) else state
    except Exception as error:  # the reason only: PyTorch's own message may advise weights_only=False
        raise L.LungsegDataError(
            f"{path}: not a readable weights file ({type(error).__name__}). Give a .safetensors file, "
            "or a .pth file that holds only tensors, from a source you trust."
        ) from None
    if not isinstance(state, dict):
        raise L.LungsegDataError(f"{path}: holds a {type(state).__name__}, not a dict of weights.")
    encoder_keys = set(model.encoder.state_dict())
    target = model.encoder if encoder_keys >= set(state) - {"fc.weight", "fc.bias"} else model
    state = {k: v for k, v in state.items() if not k.startswith("fc.")} if target is model.encoder else state
    try:
        target.load_state_dict(state)
    except RuntimeError as error:
        raise L.LungsegDataError(f"{path}: these weights do not fit this architecture ({error}).") from error


# --------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------


def _cli_train(args: argparse.Namespace) -> None:
    """Train on the train part of :func:`lungseg_utils.three_way_split` and score validation and test."""
    table = L.build_pairs_table(args.data_dir)
    base = L.TrainConfig.quick() if args.quick else L.TrainConfig.for_mode()
    config = replace(
        base, image_size=args.size or base.image_size, epochs=args.epochs or base.epochs, lr=args.lr,
        batch_size=args.batch_size or base.batch_size,
        schedule=args.schedule, weights=None if args.weights == "none" else args.weights,
    )
    if int(os.environ.get("WORLD_SIZE", 1)) > 1 and not args.out:
        raise L.LungsegConfigError("Under torchrun, name the run folder with --out: every process must write to the same one.")
    split = L.quick_subset(L.three_way_split(table), config.max_images)
    arrays = {k: L.load_arrays(v, config.image_size) for k, v in split.items()}
    result = L.train(arrays["train"], arrays["val"], args.out or L.unique_run_dir(), config, resume=args.resume)
    if L.torch.distributed.is_initialized() and L.torch.distributed.get_rank() > 0:
        return  # rank 0 scores the model and reports
    for part in ("val", "test"):
        scores, probs, masks = L.evaluate(result.model, split[part], config.image_size, original_resolution=False)
        writeup_style = L.writeup_batch_dice(probs, masks)
        hd95 = L.summarize_scores(scores["hd95"])
        print(f"{part}: per-image Dice {scores['dice'].mean():.4f}  IoU {scores['iou'].mean():.4f}  "
              f"HD95 {hd95['mean']:.2f}px ({hd95['missing']} empty predictions)  "
              f"write-up batch Dice {writeup_style:.4f}  (n={len(scores)})")
    print(f"best epoch {result.best_epoch} of {len(result.history)}, wall {result.wall_seconds / 60:.1f} min, "
          f"{result.history['train_images_per_s'].mean():.1f} train img/s on {result.device}")


def _free_name(folder: Path, stem: str, suffix: str) -> Path:
    """``folder/stem.suffix``, or ``stem-2``, ``stem-3``... when taken: an earlier run's file is never overwritten."""
    candidates = (folder / f"{stem}{'' if n == 1 else f'-{n}'}{suffix}" for n in itertools.count(1))
    return next(path for path in candidates if not path.exists())


def _cli_predict(args: argparse.Namespace) -> int:
    """Write a PNG mask (0/255) for each input into ``--out``; go on past bad files.

    Every file that cannot be done is named with its reason, and every mask that
    looks implausible (:func:`L.mask_warnings`) with a warning. Where the
    checkpoint has a quality model (chapter 07), each mask's estimated Dice and
    "review" flag are printed too. ``predictions.csv`` in ``--out`` gets one row
    per file (mask, estimate, warnings or the reason it failed); a one-line
    summary ends the run. Returns the exit status: 0 when every file was done
    (warnings and flags included), else 1.
    An existing mask is never overwritten without ``--force``, and never a mask
    written earlier in the same run. Files are written atomically (:func:`write_atomically`).
    """
    model = L.load_checkpoint(args.checkpoint)
    quality = L.quality_model_of(model)
    if quality is None:
        print(f"No quality model beside {display_name(args.checkpoint)}: masks only, no estimated Dice "
              "(fit one with: python lungseg_utils.py fit-quality --checkpoint <best.pt>).")
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise L.LungsegError(f"Cannot create the output folder {display_name(out)}: {describe_os_error(error)}.") from None
    done, failed, flagged, to_review, written, rows = 0, 0, 0, 0, {}, []
    for image_path in args.images:
        shown = display_name(image_path)
        target = out / f"{Path(image_path).stem}_mask.png"
        row = dict(file=shown, mask="", estimated_dice="", dice_low="", dice_high="", review="", warnings="", error="")
        rows.append(row)
        try:
            if target in written:
                raise L.LungsegError(f"{display_name(written[target])} already wrote {display_name(target)} in this run; "
                                     "give the files distinct names, or predict them into separate --out folders.")
            if target.exists() and not args.force:
                raise L.LungsegError(f"{display_name(target)} exists; pass --force to overwrite it.")
            gray = L.decode_image(image_path, shown)
            result = L.predict(model, gray, threshold=args.threshold, postprocess=not args.raw, warn=False,
                               with_quality=quality is not None)
            mask = result.mask if quality is not None else result
            write_atomically(target, lambda file: file.write(L.mask_png_bytes(mask)))
            written[target] = image_path
            reasons = L.mask_warnings(mask, gray, L.model_lung_fraction_range(model))
        except L.LungsegError as error:
            failed += 1
            reason = str(error).removeprefix(f"{shown}: ")  # most messages start with the file name
            row["error"] = reason
            print(f"FAILED {shown}: {reason}", file=sys.stderr)
            continue
        except Exception as error:  # a batch goes on; the reason is still named
            failed += 1
            row["error"] = f"unexpected {type(error).__name__}: {error}"
            print(f"FAILED {shown}: {row['error']}", file=sys.stderr)
            continue
        done += 1
        flagged += bool(reasons)
        row.update(mask=target.name, warnings="; ".join(reasons))
        estimate = ""
        if quality is not None:
            q = result.quality
            to_review += q.review
            row.update(estimated_dice=round(q.estimated_dice, 4), dice_low=round(q.dice_low, 4),
                       dice_high=round(q.dice_high, 4), review=q.review)
            estimate = (f", estimated Dice {q.estimated_dice:.3f} [{q.dice_low:.3f}, {q.dice_high:.3f}]"
                        + ("  REVIEW THIS MASK" if q.review else ""))
        print(f"{shown} -> {display_name(target)}  (lung fraction {mask.mean():.3f}{estimate})")
        for reason in reasons:
            print(f"WARNING {shown}: {reason}", file=sys.stderr)
    table = _free_name(out, "predictions", ".csv")
    try:
        write_atomically(table, lambda file: file.write(pd.DataFrame(rows).to_csv(index=False).encode("utf-8", "backslashreplace")))
    except L.LungsegError as error:
        failed += 1
        print(f"FAILED {display_name(table)}: {error}", file=sys.stderr)
    review = f", {to_review} to review" if quality is not None else ""
    print(f"{done} done ({flagged} with warnings{review}), {failed} failed, of {len(args.images)} files; "
          f"one row per file in {display_name(table)}.")
    return 1 if failed else 0


def _cli_fit_quality(args: argparse.Namespace) -> None:
    """Fit the quality model of a checkpoint (:func:`L.fit_quality`) and write it beside the checkpoint."""
    model = L.load_checkpoint(args.checkpoint)
    size = L.model_image_size(model)
    split = L.three_way_split(L.build_pairs_table(args.data_dir))
    target = L.quality_file_for(args.checkpoint)
    if target.exists() and not args.force:
        raise L.LungsegError(f"{display_name(target)} exists; pass --force to fit it again and replace it.")
    started = time.perf_counter()
    quality, benchmark = L.fit_quality(model, L.load_arrays(split["train"], size), L.load_arrays(split["val"], size),
                                       list(split["val"]["name"]))
    quality.save(target)
    print(f"Fitted on {len(benchmark)} validation predictions ({benchmark['name'].nunique()} X-rays, clean and shifted) in "
          f"{(time.perf_counter() - started) / 60:.1f} min; {quality.coverage:.0%} interval margin {quality.margin:.3f}. "
          f"Wrote {display_name(target)}.")


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point: ``download``, ``train``, ``predict`` and ``fit-quality``; returns the exit status."""
    parser = argparse.ArgumentParser(prog="lungseg_utils.py", description="Lung segmentation in chest X-rays.")
    commands = parser.add_subparsers(dest="command", required=True)
    download = commands.add_parser("download", help="download the data: the Kaggle set, else the NLM Montgomery set")
    download.add_argument("--target", default=None, help="folder for the data (default $LUNGSEG_DATA_DIR, else data/)")
    download.add_argument("--montgomery", action="store_true", help="fetch only the NLM Montgomery set (no credentials)")
    trainer = commands.add_parser("train", help="train a U-Net/ResNet34 on the three-way split")
    trainer.add_argument("--data-dir", default=None)
    trainer.add_argument("--out", default=None, help="new run folder (default runs/run-<time>)")
    trainer.add_argument("--size", type=int, default=None)
    trainer.add_argument("--epochs", type=int, default=None)
    trainer.add_argument("--batch-size", type=int, default=None,
                         help=f"global batch (default {L.TrainConfig.batch_size}); under torchrun it is shared among the processes")
    trainer.add_argument("--lr", type=float, default=L.TrainConfig.lr, help=f"peak learning rate (default {L.TrainConfig.lr})")
    trainer.add_argument("--schedule", default=L.TrainConfig.schedule, choices=["constant", "onecycle"])
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
    fitter = commands.add_parser("fit-quality", help="fit a checkpoint's quality model (estimated Dice per mask)")
    fitter.add_argument("--checkpoint", required=True, help="best.pt written by train (chapter 03)")
    fitter.add_argument("--data-dir", default=None)
    fitter.add_argument("--force", action="store_true", help="replace an existing quality.npz")
    args = parser.parse_args(argv)
    try:
        if args.command == "download":
            target = Path(args.target) if args.target else L.settings().data_dir
            print(download_montgomery(target) if args.montgomery else L.ensure_data(target))
        elif args.command == "train":
            _cli_train(args)
        elif args.command == "fit-quality":
            _cli_fit_quality(args)
        else:
            return _cli_predict(args)
    except L.LungsegError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


# lungseg_utils re-exports this module's names at its end; importing it here, last, lets either module
# be imported first.
import lungseg_utils as L  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
