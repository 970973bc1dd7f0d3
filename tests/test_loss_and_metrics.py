"""The loss and the metrics: DiceBCE against smp's, Dice and IoU per image and pooled, the write-up's batch Dice,
HD95 against a brute-force reference, bootstrap intervals and paired differences, and the error zones."""
from __future__ import annotations

import cv2
import numpy as np
import pytest
import segmentation_models_pytorch as smp
import torch

import lungseg_utils as L
from conftest import lung_mask


# ---------------------------------------------------------------- loss
@pytest.mark.parametrize("smooth", [0.0, 1.0])
def test_dicebce_equals_smp_dice_plus_bce(smooth):
    """smp >= 0.5 writes Dice as (I + s) / (card / 2 + s): its smooth s is our 2 s."""
    torch.manual_seed(0)
    logits = torch.randn(4, 1, 32, 32) * 3
    targets = (torch.rand(4, 1, 32, 32) > 0.6).float()
    ours = L.DiceBCELoss(smooth=2 * smooth)(logits, targets)
    reference = smp.losses.DiceLoss("binary", from_logits=True, smooth=smooth)(logits, targets) + torch.nn.BCEWithLogitsLoss()(logits, targets)
    torch.testing.assert_close(ours, reference)
    empty = torch.zeros_like(targets)
    torch.testing.assert_close(
        L.DiceBCELoss(smooth=2 * smooth)(logits, empty),
        smp.losses.DiceLoss("binary", from_logits=True, smooth=smooth)(logits, empty) + torch.nn.BCEWithLogitsLoss()(logits, empty),
    )


def test_dicebce_is_low_for_a_good_prediction_and_differentiable():
    targets = torch.from_numpy(lung_mask() // 255).float()[None, None]
    good = (targets * 2 - 1) * 8
    bad = -good
    loss_fn = L.DiceBCELoss()
    assert loss_fn(good, targets) < 0.01 < 1.5 < loss_fn(bad, targets)
    logits = torch.zeros_like(targets, requires_grad=True)
    loss_fn(logits, targets).backward()
    assert logits.grad.abs().sum() > 0


# ---------------------------------------------------------------- metrics
def test_dice_iou_per_image_known_values():
    target = np.zeros((2, 10, 10), np.uint8)
    target[:, :, :5] = 1  # 50 pixels
    pred = np.zeros_like(target)
    pred[0, :, :5] = 1  # perfect
    pred[1, :, 2:7] = 1  # 30 overlap of 50 + 50
    dice, iou = L.dice_iou_per_image(pred, target)
    np.testing.assert_allclose(dice, [1.0, 0.6], atol=1e-6)
    np.testing.assert_allclose(iou, [1.0, 30 / 70], atol=1e-6)
    empty = np.zeros((1, 10, 10), np.uint8)
    assert L.dice_iou_per_image(empty, empty)[0][0] == 1.0


def test_dataset_dice_pools_pixels():
    target = np.zeros((2, 10, 10), np.uint8)
    target[0] = 1  # 100 px
    target[1, 0, :4] = 1  # 4 px
    pred = target.copy()
    pred[1] = 0  # miss the small one entirely
    assert L.dice_iou_per_image(pred, target)[0].mean() == pytest.approx(0.5)
    assert L.dataset_dice(pred, target) == pytest.approx(200 / 204)


def test_writeup_batch_dice_by_hand():
    probs = np.zeros((3, 4, 4))
    target = np.zeros((3, 4, 4))
    probs[0, :2] = 0.9
    target[0, :2] = 1  # perfect, 8 px
    probs[1, :1] = 0.9
    target[1, :2] = 1  # 4 of 8
    first = (2 * (8 + 4) + 1) / (12 + 16 + 1)
    third = 1.0  # empty both: (0 + 1) / (0 + 1)
    assert L.writeup_batch_dice(probs, target, batch_size=2) == pytest.approx((first + third) / 2)


# ---------------------------------------------------------------- HD95
def brute_force_hd95(a: np.ndarray, b: np.ndarray) -> float:
    """HD95 from all pairwise distances between the two boundaries (no distance transform).

    A boundary pixel is a mask pixel with a 4-neighbour outside the mask (or outside the image).
    """
    from scipy.spatial.distance import cdist

    def boundary(mask):
        mask = mask.astype(bool)
        padded = np.pad(mask, 1)
        inner = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
        return np.argwhere(mask & ~inner)

    distances = cdist(boundary(a), boundary(b))
    return max(np.percentile(distances.min(axis=1), 95), np.percentile(distances.min(axis=0), 95))


def shapes(size: int = 64) -> dict[str, np.ndarray]:
    square = np.zeros((size, size), np.uint8)
    square[20:40, 20:40] = 1
    disc = np.zeros_like(square)
    cv2.circle(disc, (30, 34), 14, 1, -1)
    ring = disc.copy()
    cv2.circle(ring, (30, 34), 6, 0, -1)
    return {"square": square, "shifted square": np.roll(square, 3, axis=1), "disc": disc, "ring": ring,
            "lungs": lung_mask(size) // 255, "shifted lungs": lung_mask(size, shift=5) // 255,
            "speck": (np.arange(size * size).reshape(size, size) == 5 * size + 50).astype(np.uint8) | square}


@pytest.mark.parametrize("pair", [("square", "shifted square"), ("square", "disc"), ("disc", "ring"),
                                  ("lungs", "shifted lungs"), ("lungs", "disc"), ("square", "speck")])
def test_hausdorff95_equals_brute_force(pair):
    a, b = (shapes()[name] for name in pair)
    assert L.hausdorff95(a, b) == pytest.approx(brute_force_hd95(a, b), abs=1e-9)
    assert L.hausdorff95(a, a) == 0


def test_hausdorff95_of_shifted_square_is_the_shift():
    a = shapes()["square"]
    assert L.hausdorff95(a, np.roll(a, 3, axis=1)) == pytest.approx(3.0)


def test_empty_prediction_is_counted_not_dropped():
    square = shapes()["square"]
    hd95 = [L.hausdorff95(square, square), L.hausdorff95(np.zeros_like(square), square)]
    assert np.isnan(hd95[1])
    summary = L.summarize_scores(hd95)
    assert summary["missing"] == 1 and summary["n"] == 1


# ---------------------------------------------------------------- intervals
def bootstrap_coverage(interval, n_trials: int = 300, n: int = 40) -> float:
    """Share of trials whose interval covers the true mean (1.0) of a skewed distribution (exponential)."""
    rng = np.random.default_rng(1)
    hits = 0
    for trial in range(n_trials):
        low, high = interval(rng.exponential(1.0, n), trial)
        hits += low <= 1.0 <= high
    return hits / n_trials


def test_bootstrap_interval_has_its_nominal_coverage():
    def ours(values, trial):
        summary = L.summarize_scores(values, n_bootstrap=1000, seed=trial)
        return summary["ci_low"], summary["ci_high"]

    def mean_plus_minus_std(values, trial):  # a wrong "interval" the check must reject
        return values.mean() - values.std(), values.mean() + values.std()

    def too_narrow(values, trial):  # half the width of a correct interval
        half = values.std(ddof=1) / np.sqrt(len(values))
        return values.mean() - half, values.mean() + half

    def accepted(coverage: float) -> bool:
        return 0.88 <= coverage <= 0.985

    assert accepted(bootstrap_coverage(ours))
    assert not accepted(bootstrap_coverage(mean_plus_minus_std))
    assert not accepted(bootstrap_coverage(too_narrow))


def test_summarize_scores_percentiles():
    values = np.arange(1, 101, dtype=float)
    summary = L.summarize_scores(values)
    assert summary["p5"] == pytest.approx(5.95) and summary["p95"] == pytest.approx(95.05)
    assert summary["median"] == 50.5 and summary["n"] == 100 and summary["missing"] == 0


def test_paired_difference_sees_a_small_consistent_gain_that_separate_intervals_hide():
    rng = np.random.default_rng(0)
    reference = rng.uniform(0.85, 0.99, 60)  # images differ a lot from each other ...
    candidate = reference + 0.004 + rng.normal(0, 0.002, 60)  # ... the candidate adds a little to each
    paired = L.paired_difference(candidate, reference)
    assert 0 < paired["ci_low"] < 0.004 < paired["ci_high"] < 0.006 and paired["wins"] > 0.9
    separate = L.summarize_scores(candidate), L.summarize_scores(reference)
    assert separate[0]["ci_low"] < separate[1]["ci_high"]  # the separate intervals overlap all the same
    assert L.paired_difference(reference, reference)["ci_low"] == 0.0  # no difference, no spread


def test_paired_difference_needs_the_same_images_and_counts_undefined_scores():
    with pytest.raises(L.LungsegDataError, match="same images"):
        L.paired_difference([0.9, 0.8], [0.9])
    result = L.paired_difference([1.0, np.nan, 3.0, 5.0], [0.0, 1.0, 1.0, 2.0])
    assert result["n"] == 3 and result["missing"] == 1 and result["mean_difference"] == pytest.approx(2.0)


def test_paired_interval_has_its_nominal_coverage():
    rng = np.random.default_rng(2)
    hits = 0
    for trial in range(200):
        reference = rng.uniform(0.8, 1.0, 40)
        candidate = reference + rng.exponential(0.01, 40) - 0.01  # true mean difference 0, skewed
        result = L.paired_difference(candidate, reference, n_bootstrap=1000, seed=trial)
        hits += result["ci_low"] <= 0 <= result["ci_high"]
    assert 0.88 <= hits / 200 <= 0.985


# ---------------------------------------------------------------- where the errors are
def test_error_zones_are_disjoint_rates_that_find_the_wrong_place():
    truth = np.zeros((200, 200), np.uint8)
    truth[40:160, 30:90] = 1  # patient's right lung (image left)
    truth[40:160, 110:170] = 1  # left lung
    assert all(v == 0 for v in L.error_zones(truth, truth).values())
    missed_heart_side = truth.copy()
    missed_heart_side[110:135, 110:118] = 0  # lower inner edge of the left lung, where the heart border is
    zones = L.error_zones(missed_heart_side, truth)
    assert max(L.ERROR_ZONES, key=zones.get) == "heart border" and zones["far from the outline"] == 0
    island = truth.copy()
    island[5:15, 95:105] = 1  # a stray island far from both lungs
    assert L.error_zones(island, truth)["far from the outline"] > 0
    # A large zone does not win by its size: the same number of wrong pixels in the small apex strip
    # gives a higher rate there than along the long rest of the outline.
    apex_error, side_error = truth.copy(), truth.copy()
    apex_error[40:44, 40:80] = 0
    side_error[70:110, 30:34] = 0
    assert L.error_zones(apex_error, truth)["apices"] > L.error_zones(side_error, truth)["rest of the outline"]
