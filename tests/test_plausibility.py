"""Warnings for implausible masks: lung fraction, regions, a missing lung, an inverted image."""
from __future__ import annotations

import subprocess
import sys
import warnings

import cv2
import numpy as np
import pytest
import torch

import lungseg_utils as L
from conftest import REPO, StandInModel, lung_mask, tiny_config


def two_lungs(size: int = 256) -> np.ndarray:
    return lung_mask(size) // 255  # two ellipses, about 17% of the image


@pytest.fixture(scope="module")
def real_pairs(real_data_dir):
    """Twenty real X-rays of each hospital with their masks, at 256 px."""
    table = L.labeled_only(L.build_pairs_table(real_data_dir))
    rows = table.groupby("source").head(20)
    return L.load_arrays(rows, 256)


def test_manual_masks_on_real_xrays_draw_no_warning(real_pairs):
    images, masks = real_pairs
    assert [L.mask_warnings(m, im) for m, im in zip(masks, images)] == [[]] * len(images)


def test_inverted_real_xrays_are_flagged(real_pairs):
    images, masks = real_pairs
    assert not any(L.looks_inverted(im) for im in images)
    assert all(L.looks_inverted(255 - im) for im in images)
    assert any("looks inverted" in reason for reason in L.mask_warnings(masks[0], 255 - images[0]))


def test_each_kind_of_implausible_mask(real_pairs):
    image = real_pairs[0][0]
    assert L.mask_warnings(two_lungs(), image) == []
    tiny = np.zeros((256, 256), np.uint8)
    tiny[100:110, 60:70] = 1
    tiny[100:110, 180:190] = 1
    assert any("outside the 8.0%-44.0%" in r for r in L.mask_warnings(tiny, image))
    three = two_lungs()
    cv2.circle(three, (128, 230), 20, 1, -1)
    assert any("3 lung-sized regions" in r for r in L.mask_warnings(three, image))
    one_lung = two_lungs()
    one_lung[:, 128:] = 0
    reasons = L.mask_warnings(one_lung, image)
    assert any("no lung found on the image's right side (the patient's left lung)" in r for r in reasons)
    empty = L.mask_warnings(np.zeros((256, 256), np.uint8), image)
    assert len([r for r in empty if "no lung found" in r]) == 2


def test_training_range_is_stored_and_used(tmp_path, random_model):
    masks = np.stack([two_lungs(64)] * 2)
    images = (masks * 100 + 50).astype(np.uint8)
    model = L.train((images, masks), (images, masks), tmp_path / "run", tiny_config(epochs=1, batch_size=2)).model
    fraction = masks[0].mean()
    low, high = model.lungseg_config["lung_fraction_range"]
    assert low <= fraction <= high and high - low <= 0.02
    assert L.model_lung_fraction_range(random_model) == L.DEFAULT_LUNG_FRACTION_RANGE, "a model without a stored range"


def test_predict_warns_with_the_file_name(tmp_path):
    path = tmp_path / "odd.png"
    cv2.imwrite(str(path), np.full((128, 128), 90, np.uint8))
    all_lung = StandInModel(lambda x: torch.full_like(x[:, :1], 10.0))
    with pytest.warns(L.LungsegWarning) as record:
        L.predict(all_lung, path)
    messages = [str(w.message) for w in record]
    assert any(m.startswith("odd.png: lungs cover 100.0% of the image") for m in messages)
    assert any(m.startswith("odd.png: no lung found on the image's right side") for m in messages)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        L.predict(all_lung, path, warn=False)


def test_cli_prints_warnings_and_still_succeeds(tmp_path, real_xray, tiny_checkpoint):
    good = real_xray
    inverted = tmp_path / "inverted.png"
    cv2.imwrite(str(inverted), 255 - cv2.imread(str(good), cv2.IMREAD_GRAYSCALE))
    result = subprocess.run([sys.executable, str(REPO / "lungseg_utils.py"), "predict", str(inverted), "--checkpoint", str(tiny_checkpoint),
                             "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert any(line.startswith(f"WARNING {inverted}: ") and "looks inverted" in line for line in result.stderr.splitlines())
    assert result.stdout.strip().splitlines()[-1].startswith("1 done (1 with warnings), 0 failed, of 1 files; one row per file in")
