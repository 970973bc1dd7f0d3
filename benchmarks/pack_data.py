"""Write a small copy of the data at the working size, in the Kaggle layout, to carry to a lent GPU.

    python benchmarks/pack_data.py                    # 256 px into data/packed-256px/
    python benchmarks/pack_data.py --size 512 --out data/packed-512px

The device tool carries at most 64 MiB; the shared 512 px copy of the PNGs does not fit, its
256 px arrays do (about 35 MiB as PNG). Each image and mask is written exactly as
``L.load_arrays`` gives it at that size, and the copy is read back and compared, so training and
scoring on it give the same arrays, and the same numbers, as the full copy (except chapter 04's
scores "at the original resolution", which are then at the packed size). The copy lands in the
ignored ``data/`` folder: it is derived from the data and must never be committed.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import lungseg_utils as L  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def mask_file_name(row: pd.Series) -> str:
    """The mask's name in the Kaggle layout: the original's when there is one mask file, else ``<stem>_mask.png``."""
    paths = list(row.mask_paths)
    return Path(paths[0]).name if len(paths) == 1 else f"{Path(row.image_path).stem}_mask.png"


def write_copy(table: pd.DataFrame, size: int, out: Path) -> None:
    """Write every X-ray (and its mask, if it has one) at ``size`` px under ``out/Lung Segmentation/``."""
    images_dir, masks_dir = out / "Lung Segmentation" / "CXR_png", out / "Lung Segmentation" / "masks"
    images_dir.mkdir(parents=True)
    masks_dir.mkdir(parents=True)
    labeled = table[table.mask_paths.map(len) > 0]
    unlabeled = table[table.mask_paths.map(len) == 0]
    images, masks = L.load_arrays(labeled, size)
    for (_, row), image, mask in zip(labeled.iterrows(), images, masks):
        write_png(images_dir / Path(row.image_path).name, image)
        write_png(masks_dir / mask_file_name(row), mask * 255)
    if len(unlabeled):
        for (_, row), image in zip(unlabeled.iterrows(), L.load_arrays(unlabeled, size)[0]):
            write_png(images_dir / Path(row.image_path).name, image)


def write_png(path: Path, array: np.ndarray) -> None:
    """An 8-bit PNG, encoded in memory and written atomically (no path ever reaches OpenCV)."""
    encoded = cv2.imencode(".png", array)[1].tobytes()
    L.write_atomically(path, lambda file: file.write(encoded))


def check_copy(table: pd.DataFrame, size: int, out: Path) -> None:
    """Read the copy back and insist on the same pairs and bit-identical arrays."""
    packed = L.build_pairs_table(out)
    if sorted(packed.name) != sorted(table.name):
        raise SystemExit(f"the copy in {out} pairs other X-rays than the original: remove it and report a bug")
    with tempfile.TemporaryDirectory() as cache:
        for labeled in (True, False):
            original = table[(table.mask_paths.map(len) > 0) == labeled].sort_values("name")
            copy = packed[(packed.mask_paths.map(len) > 0) == labeled].sort_values("name")
            for a, b in zip(L.load_arrays(original, size), L.load_arrays(copy, size, cache_dir=cache)):
                if (a is None) != (b is None) or (a is not None and not np.array_equal(a, b)):
                    raise SystemExit(f"the copy in {out} differs from the original at {size} px: remove it and report a bug")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256, help="side in pixels (default 256, the working size)")
    parser.add_argument("--out", type=Path, default=None, help="target folder (default data/packed-<size>px)")
    args = parser.parse_args()
    out = args.out or REPO / "data" / f"packed-{args.size}px"
    if out.exists():
        raise SystemExit(f"{out} already exists: use it as it is, or remove it first (nothing is overwritten)")
    table = L.build_pairs_table(L.find_data_dir())
    write_copy(table, args.size, out)
    check_copy(table, args.size, out)
    megabytes = sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) / 2**20
    print(f"{len(table)} X-rays ({(table.mask_paths.map(len) > 0).sum()} with masks) at {args.size} px in {out}: "
          f"{megabytes:.1f} MiB, identical arrays. Carry it and set LUNGSEG_DATA_DIR to it.")


if __name__ == "__main__":
    main()
