"""The quality estimate of chapter 07: its signals, its fit, predict(with_quality=True) and the command line's CSV."""
from __future__ import annotations

import shutil
import subprocess

import cv2
import numpy as np
import pandas as pd
import pytest
import torch

import lungseg_utils as L
from conftest import CLI, naming

SIZE = 64


class PoolingEncoder(torch.nn.Module):
    """Returns a list of feature maps, deepest last, as smp's encoders do."""

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [x, torch.nn.functional.avg_pool2d(x, 8)]


class ThresholdSegmenter(torch.nn.Module):
    """A stand-in segmenter that calls every dark pixel lung: on X-rays drawn with dark lungs its masks are exact.

    Like smp's U-Net it has an ``encoder`` whose last output is its deepest feature map.
    """

    def __init__(self):
        super().__init__()
        self.encoder = PoolingEncoder()
        self.lungseg_config = {"image_size": SIZE}
        self.unused = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.encoder(x)
        return -3 * x.mean(dim=1, keepdim=True)  # ImageNet-normalised: dark (< about 115) is lung, p about 0.9 inside


@pytest.fixture(scope="module")
def drawn(real_data_dir):
    """Manual masks of real X-rays at 64 px, and 'X-rays' drawn from them: dark lungs in a bright chest."""
    rows = L.three_way_split(L.build_pairs_table(real_data_dir))
    masks = {part: L.load_arrays(rows[part].head(24), SIZE)[1] for part in ("train", "val", "test")}
    rng = np.random.default_rng(0)
    images = {part: np.clip(200 - 140 * m + rng.normal(0, 6, m.shape), 0, 255).astype(np.uint8) for part, m in masks.items()}
    return images, masks


@pytest.fixture(scope="module")
def fitted(drawn):
    """A ThresholdSegmenter with a quality model fitted on the drawn validation X-rays, clean and shifted."""
    images, masks = drawn
    model = ThresholdSegmenter()
    names = [f"val {i}" for i in range(len(images["val"]))]
    quality, benchmark = L.fit_quality(model, (images["train"], masks["train"]), (images["val"], masks["val"]), names,
                                       severities=(2, 3))
    model.lungseg_quality = quality
    return model, quality, benchmark


def test_self_dice_is_one_for_a_certain_map_and_lower_for_an_unsure_one():
    certain = np.zeros((32, 32), np.float32)
    certain[8:24, 8:24] = 1
    unsure = np.where(certain > 0, 0.6, 0.4).astype(np.float32)
    assert L.self_dice(certain) == pytest.approx(1.0)
    assert L.self_dice(unsure) < 0.8


def test_shape_fit_is_high_for_manual_masks_and_low_without_a_lung(fitted, drawn):
    _, quality, _ = fitted
    masks = drawn[1]["test"]
    whole = [L.shape_fit(m, quality) for m in masks]
    one_lung = [L.shape_fit(np.where(np.arange(SIZE) < SIZE // 2, 0, m), quality) for m in masks]
    assert np.median(whole) > 0.85
    assert np.median(one_lung) < np.median(whole) - 0.15


def test_views_map_back_onto_the_original_frame(drawn):
    image = drawn[0]["test"][0]
    mask = (image < 115).astype(np.float32)
    moved, blurred = L.test_time_views(image)
    back = L.view_back([(moved < 115).astype(np.float32), (blurred < 115).astype(np.float32)])
    assert L.dice_of(back[0] > 0.5, mask) > 0.9
    assert L.dice_of(back[1] > 0.5, mask) > 0.9
    assert L.dice_of(moved < 115, mask) < L.dice_of(back[0] > 0.5, mask)  # the view did move the lungs


def test_a_perfect_prediction_scores_high_and_a_missed_lung_low(fitted, drawn):
    model, quality, _ = fitted
    images, masks = drawn
    probs, signals = L.quality_signals(model, images["test"], quality)
    assert L.dice_iou_per_image(probs > 0.5, masks["test"])[0].mean() > 0.97  # the stand-in is (nearly) perfect here
    perfect = L.estimate_quality(signals, quality)
    missing = images["test"].copy()
    missing[:, :, : SIZE // 2] = 200  # the lung on the image's left whitened out: the model misses it
    _, missing_signals = L.quality_signals(model, missing, quality)
    missed = L.estimate_quality(missing_signals, quality)
    assert perfect.estimated_dice.median() > 0.9
    assert missed.estimated_dice.median() < perfect.estimated_dice.median() - 0.1
    assert missed.review.mean() > 0.8 and perfect.review.mean() < 0.2


def test_shifted_x_rays_score_lower_than_their_clean_copies_on_average(fitted, drawn):
    model, quality, _ = fitted
    images, masks = drawn
    bench = L.quality_benchmark(model, images["test"], masks["test"], [f"t{i}" for i in range(len(masks["test"]))], quality,
                                shifts=("effusion", "consolidation"), severities=(3,))
    bench = bench.join(L.estimate_quality(bench, quality))
    clean = bench[bench["shift"] == "none"].set_index("name").estimated_dice
    for shift in ("effusion", "consolidation"):
        shifted = bench[bench["shift"] == shift].set_index("name").estimated_dice
        assert (shifted - clean).mean() < -0.02, shift


def test_conformal_interval_holds_the_chosen_share_on_exchangeable_data():
    rng = np.random.default_rng(1)
    n = 4000
    signals = pd.DataFrame({name: rng.uniform(0.7, 1.0, n) for name in L.QUALITY_SIGNALS})
    signals["feature_distance"] = rng.uniform(0, 0.1, n)
    dice = 1.001 - np.exp(L._signal_matrix(signals) @ np.array([0.5, 0.3, 0.2, 4.0]) - 0.5 + rng.normal(0, 0.3, n))
    dice = np.clip(dice, 0, 1)
    groups = np.arange(n).astype(str)
    quality = L.QualityModel(np.zeros(4), np.zeros((1, 4)), np.zeros((1, 3)))
    fitted = L.fit_quality_model(quality, signals[:3000], dice[:3000], groups[:3000], coverage=0.9)
    estimate = L.estimate_quality(signals[3000:], fitted)
    covered = (dice[3000:] >= estimate.dice_low) & (dice[3000:] <= estimate.dice_high)
    assert 0.87 <= covered.mean() <= 0.93
    assert np.corrcoef(estimate.estimated_dice, dice[3000:])[0, 1] > 0.5


def test_estimate_needs_a_fitted_model():
    quality = L.QualityModel(np.zeros(4), np.zeros((1, 4)), np.zeros((1, 3)))
    with pytest.raises(L.LungsegConfigError, match="fit_quality_model"):
        L.estimate_quality(pd.DataFrame({name: [0.9] for name in L.QUALITY_SIGNALS}), quality)


def test_quality_model_round_trips_and_a_damaged_file_is_named(fitted, tmp_path):
    _, quality, _ = fitted
    path = tmp_path / "quality.npz"
    quality.save(path)
    again = L.QualityModel.load(path)
    assert again.margin == quality.margin and np.array_equal(again.shape_modes, quality.shape_modes)
    path.write_bytes(b"not an npz")
    with pytest.raises(L.LungsegCheckpointError, match=naming(path, "fit-quality")):
        L.QualityModel.load(path)


def test_predict_with_quality_gives_the_same_mask(fitted, drawn):
    model, _, _ = fitted
    image = cv2.resize(drawn[0]["test"][0], (200, 240))
    plain = L.predict(model, image, warn=False)
    result = L.predict(model, image, warn=False, with_quality=True)
    assert np.array_equal(result.mask, plain)
    assert 0 <= result.quality.dice_low <= result.quality.estimated_dice <= result.quality.dice_high <= 1
    assert set(result.quality.signals) == set(L.QUALITY_SIGNALS)


def test_predict_with_quality_without_a_quality_model_says_how_to_fit_one(tiny_checkpoint, drawn):
    model = L.load_checkpoint(tiny_checkpoint)
    with pytest.raises(L.LungsegCheckpointError, match=naming(tiny_checkpoint, "fit-quality")):
        L.predict(model, drawn[0]["test"][0], with_quality=True)


def test_auroc_interval_and_review_curve_on_known_rankings():
    bad = np.array([True] * 10 + [False] * 90)
    perfect = L.auroc_interval(bad, bad.astype(float) + np.linspace(0, 0.5, 100), [f"x{i}" for i in range(100)], n_bootstrap=200)
    assert perfect["auroc"] == 1.0 and perfect["low"] == pytest.approx(1.0)
    assert L.review_curve(bad, bad.astype(float), [0.05, 0.1, 0.2]).tolist() == [0.5, 1.0, 1.0]
    reversed_ranking = L.auroc_interval(bad, -bad.astype(float), [f"x{i}" for i in range(100)], n_bootstrap=200)
    assert reversed_ranking["auroc"] == 0.0


def test_rca_of_a_manual_mask_on_its_own_x_ray_is_near_one(drawn):
    images, masks = drawn
    assert L.rca_dice(images["test"][0], masks["test"][0], images["test"][:1], masks["test"][:1]) > 0.95
    empty = np.zeros_like(masks["test"][0])
    assert L.rca_dice(images["test"][0], empty, images["train"][:3], masks["train"][:3]) < 0.1


def test_cli_writes_estimates_and_a_csv_row_for_every_file(tiny_checkpoint, real_data_dir, real_xray, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    checkpoint = run / "best.pt"
    shutil.copy(tiny_checkpoint, checkpoint)
    model = L.load_checkpoint(checkpoint)
    rows = L.three_way_split(L.build_pairs_table(real_data_dir))
    quality, _ = L.fit_quality(model, L.load_arrays(rows["train"].head(12), SIZE), L.load_arrays(rows["val"].head(6), SIZE),
                               list(rows["val"].name.head(6)), severities=(2,))
    quality.save(L.quality_file_for(checkpoint))
    (tmp_path / "good.png").write_bytes(real_xray.read_bytes())
    (tmp_path / "broken.png").write_bytes(b"not an image")
    result = subprocess.run([*CLI, "predict", "good.png", "broken.png", "missing.png", "--checkpoint", str(checkpoint),
                             "--out", "out"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "estimated Dice" in result.stdout
    table = pd.read_csv(tmp_path / "out" / "predictions.csv")
    assert table.file.tolist() == ["good.png", "broken.png", "missing.png"]
    good = table.iloc[0]
    assert good["mask"] == "good_mask.png" and 0 <= good.estimated_dice <= 1 and good.dice_low <= good.dice_high
    assert table.error.iloc[1:].notna().all() and table.estimated_dice.iloc[1:].isna().all()
    again = subprocess.run([*CLI, "predict", "good.png", "--checkpoint", str(checkpoint), "--out", "out", "--force"],
                           cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and (tmp_path / "out" / "predictions-2.csv").is_file()  # the first table is kept


def test_cli_without_a_quality_model_still_writes_masks_and_the_csv(tiny_checkpoint, real_xray, tmp_path):
    (tmp_path / "good.png").write_bytes(real_xray.read_bytes())
    result = subprocess.run([*CLI, "predict", "good.png", "--checkpoint", str(tiny_checkpoint), "--out", "out"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "fit-quality" in result.stdout
    table = pd.read_csv(tmp_path / "out" / "predictions.csv")
    assert table["mask"].tolist() == ["good_mask.png"] and table.estimated_dice.isna().all()
