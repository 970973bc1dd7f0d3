"""The acquisition-shift benchmark: every shift at every severity, repeatable, with the mask handled right."""
from __future__ import annotations

import cv2
import numpy as np
import pytest

import lungseg_utils as L
from conftest import StandInModel, naming


@pytest.fixture(scope="module")
def pair(real_data_dir):
    rows = L.labeled_only(L.build_pairs_table(real_data_dir)).iloc[[0]]
    images, masks = L.load_arrays(rows, 256)
    return images[0], masks[0]


@pytest.mark.parametrize("kind", L.SHIFTS)
def test_every_shift_is_repeatable_and_keeps_shapes(pair, kind):
    image, mask = pair
    differences = []
    for severity in L.SEVERITIES:
        shifted, shifted_mask = L.apply_shift(image, mask, kind, severity, seed=3)
        again, again_mask = L.apply_shift(image, mask, kind, severity, seed=3)
        assert shifted.dtype == np.uint8 and shifted.shape == image.shape and set(np.unique(shifted_mask)) <= {0, 1}
        np.testing.assert_array_equal(shifted, again)
        np.testing.assert_array_equal(shifted_mask, again_mask)
        if kind not in L.GEOMETRIC_SHIFTS:
            np.testing.assert_array_equal(shifted_mask, mask)  # the lung is still lung
        differences.append(np.abs(shifted.astype(int) - image).mean())
    assert differences[0] > 0 and differences[0] <= differences[1] <= differences[2], differences


def test_geometric_shifts_move_the_mask_with_the_image(pair):
    image, mask = pair
    _, smaller = L.apply_shift(image, mask, "zoom_out", 2)
    assert smaller.mean() / mask.mean() == pytest.approx(0.8**2, rel=0.05)
    _, moved = L.apply_shift(image, mask, "off_centre", 2)
    shift = np.nonzero(moved)[1].mean() - np.nonzero(mask)[1].mean()
    assert shift == pytest.approx(0.10 * 256, abs=2)


@pytest.mark.parametrize("kind, severity, share", [("consolidation", 1, 1 / 6), ("consolidation", 2, 1 / 3), ("effusion", 2, 1 / 3), ("effusion", 3, 1 / 2), ("ground_glass", 1, 1 / 3)])
def test_opacities_whiten_the_stated_share_of_one_lung_only(pair, kind, severity, share):
    image, mask = pair
    shifted, _ = L.apply_shift(image, mask, kind, severity, seed=5)
    changed = np.abs(shifted.astype(int) - image) > 8
    lungs = L.lung_areas(mask)
    one_lung = min(lungs["right_lung_area"], lungs["left_lung_area"]), max(lungs["right_lung_area"], lungs["left_lung_area"])
    regions = cv2.connectedComponents(mask.astype(np.uint8))[1]
    painted = set(np.unique(regions[changed & (mask > 0)])) - {0}
    assert len(painted) == 1, f"painted in {len(painted)} lungs"
    # The edge is softened by a Gaussian of sigma 2 px: no visible change lies more than 4 px outside the painted lung,
    # however long its border (a basal effusion's runs along the diaphragm) and whatever the image's size.
    soft_edge = cv2.dilate((regions == painted.pop()).astype(np.uint8), cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (9, 9)))
    assert not (changed & (soft_edge == 0)).any(), "painted outside the lung, beyond its soft edge"
    assert one_lung[0] * share * 0.7 <= changed.sum() <= one_lung[1] * share * 1.3
    assert (shifted.astype(int) >= image).all(), "an opacity only whitens"


def test_effusion_is_basal(pair):
    image, mask = pair
    shifted, _ = L.apply_shift(image, mask, "effusion", 2)
    rows = np.nonzero(np.abs(shifted.astype(int) - image) > 8)[0]
    assert rows.mean() > np.nonzero(mask)[0].mean()


def test_unknown_shift_is_refused(pair):
    with pytest.raises(L.LungsegConfigError, match=naming("'fog'")):
        L.apply_shift(*pair, "fog")


def test_shift_benchmark_pairs_every_shifted_image_with_its_clean_score():
    images, masks = [], []
    for offset in (0, 4):
        mask = np.zeros((64, 64), np.uint8)
        cv2.ellipse(mask, (20 + offset, 32), (9, 20), 0, 0, 360, 1, -1)
        cv2.ellipse(mask, (44 + offset, 32), (9, 20), 0, 0, 360, 1, -1)
        images.append(np.where(mask, 110, 220).astype(np.uint8))  # lung just darker than the model's threshold
        masks.append(mask)
    images, masks = np.stack(images), np.stack(masks)
    dark_is_lung = StandInModel(lambda x: -10 * x[:, :1])  # normalised grey below ImageNet's mean -> lung
    result = L.shift_benchmark(dark_is_lung, images, masks, ["a", "b"], shifts=("exposure", "zoom_in"), severities=(1, 3))
    assert len(result) == 2 * (1 + 2 * 2)
    clean = result[result["shift"] == "none"]
    assert (clean.severity == 0).all() and (clean.dice == clean.clean_dice).all() and (clean.dice > 0.99).all()
    assert result.equals(L.shift_benchmark(dark_is_lung, images, masks, ["a", "b"], shifts=("exposure", "zoom_in"), severities=(1, 3)))
    summary = L.summarize_shifts(result).set_index(["shift", "severity"])
    # a strong brightening lifts the dark lungs above the model's grey threshold: a large, measured drop
    strong = summary.loc[("exposure", 3)]
    assert strong["drop"] > 0.5 and strong["drop_low"] <= strong["drop"] <= strong["drop_high"]
    # zooming in moves image and mask together (and adds no black border): a grey-level model does not care
    assert summary.loc[("zoom_in", 3), "drop"] < 0.05
    # preprocessing runs on every image, clean or shifted, before the model sees it: inverted, no lung is dark
    inverted = L.shift_benchmark(dark_is_lung, images, masks, ["a", "b"], shifts=("zoom_in",), severities=(1,),
                                 preprocess=lambda image: 255 - image)
    assert (inverted.dice < 0.1).all() and inverted.warned.all()
