"""Inference: predict and predict_arrays on every kind of input, post-processing, the overlays and their legend,
evaluate against known scores, and a model trained on equalized images."""
from __future__ import annotations

import copy

import cv2
import numpy as np
import pytest
import torch

import lungseg_utils as L
from conftest import StandInModel, lung_mask, naming, tiny_arrays, tiny_config


def textured_image(size: int = 64) -> np.ndarray:
    """A smooth random 8-bit image spanning 0..255 (a random network's output varies over it)."""
    noise = (np.random.default_rng(0).random((size, size)) * 255).astype(np.uint8)
    return cv2.normalize(cv2.GaussianBlur(noise, (7, 7), 3), None, 0, 255, cv2.NORM_MINMAX)


# ---------------------------------------------------------------- predict
def test_predict_uses_the_imagenet_normalisation(random_model):
    """predict_proba must equal the model on (x / 255 - mean) / std; wrong normalisations differ by far more."""
    gray = textured_image()
    mean, std = torch.tensor(L.IMAGENET_MEAN).view(3, 1, 1), torch.tensor(L.IMAGENET_STD).view(3, 1, 1)
    pixels = torch.from_numpy(gray).float()[None].repeat(3, 1, 1)

    def model_on(tensor: torch.Tensor) -> np.ndarray:
        with torch.no_grad():
            return torch.sigmoid(random_model(tensor[None]))[0, 0].numpy()

    expected = model_on((pixels / 255 - mean) / std)
    actual = L.predict_proba(random_model, gray)
    tolerance = 0.02  # bf16 autocast on the CPU
    assert np.abs(actual - expected).max() < tolerance
    for wrong in ((pixels - mean) / std, pixels / 255, (pixels / 255 - 0.5) / 0.25):
        assert np.abs(model_on(wrong) - expected).max() > 3 * tolerance, "the check must be able to fail"


def test_predict_any_input_kind_gives_the_same_probabilities(random_model, real_xray):
    image_path = real_xray
    gray = L.decode_image(image_path)
    reference = L.predict_proba(random_model, gray)
    assert reference.shape == gray.shape and reference.std() > 0.01
    variants = {
        "path": image_path,
        "bytes": image_path.read_bytes(),
        "16-bit": gray.astype(np.uint16) * 257,
        "rgb": np.dstack([gray] * 3),
        "rgba": np.dstack([gray] * 3 + [np.full_like(gray, 255)]),
    }
    for name, image in variants.items():
        np.testing.assert_allclose(L.predict_proba(random_model, image), reference, atol=1e-6, err_msg=name)
    mask = L.predict(random_model, cv2.resize(gray, (300, 410)), warn=False)
    assert mask.shape == (410, 300) and mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 1}
    with pytest.raises(L.LungsegDataError, match=naming("array", "too small")):
        L.predict(random_model, np.zeros((20, 20), np.uint8))


def test_predict_arrays_moves_the_model_to_the_device(random_model):
    model, moved = copy.deepcopy(random_model), []  # a copy: the shared model stays as it is
    original = model.to
    model.to = lambda *args, **kwargs: moved.append(args) or original(*args, **kwargs)
    L.predict_arrays(model, textured_image()[None], device="cpu")
    assert moved and torch.device(moved[0][0]) == torch.device("cpu")


def test_equalized_model_sees_clahe_in_training_and_prediction(random_model, tmp_path):
    """equalize=True: the dataset and predict_arrays give the model the CLAHE image, and the checkpoint says so."""
    image, mask = textured_image(), np.zeros((64, 64), np.uint8)
    equalized = L.equalize_contrast(image)
    assert not np.array_equal(equalized, image)
    tensor, _ = L.LungDataset(image[None], mask[None], equalize=True)[0]
    assert torch.equal(tensor, L.image_to_tensor(equalized))
    plain = L.predict_arrays(random_model, equalized[None])
    equalizing = copy.deepcopy(random_model)  # a copy: the shared model stays as it is
    equalizing.lungseg_config["equalize"] = True
    assert np.array_equal(L.predict_arrays(equalizing, image[None]), plain)
    assert not np.array_equal(L.predict_arrays(random_model, image[None]), plain), "the check must be able to fail"
    result = L.train(tiny_arrays(4), tiny_arrays(4, seed=1), tmp_path / "run", tiny_config(epochs=1, equalize=True))
    assert result.model.lungseg_config["equalize"] is True
    assert "every input equalised with CLAHE" in L.describe_model(result.model, tmp_path / "run" / "best.pt")


# ---------------------------------------------------------------- post-processing and pictures
def test_postprocess_keeps_two_largest_and_fills_holes():
    mask = lung_mask(64) // 255
    mask[30:34, 20:22] = 0  # a hole in the left lung
    mask[2:4, 2:4] = 1  # a speck
    cleaned = L.postprocess_mask(mask)
    assert cleaned[2, 2] == 0 and cleaned[31, 21] == 1
    assert cv2.connectedComponents(cleaned)[0] - 1 == 2


def test_overlay_colours_at_known_pixels():
    image = np.full((64, 64), 100, np.uint8)
    mask = np.zeros((64, 64), np.uint8)
    mask[16:48, 16:48] = 1
    picture = L.overlay(image, mask, color=(0, 200, 0), alpha=0.4)
    assert picture.shape == (64, 64, 3) and picture.dtype == np.uint8
    assert tuple(picture[32, 32]) == (60, 140, 60), "inside: 60% gray + 40% green"
    assert tuple(picture[16, 32]) == (0, 200, 0), "outline in the pure colour"
    assert tuple(picture[2, 2]) == (100, 100, 100), "outside untouched"


def test_error_overlay_colours_at_known_pixels():
    image = np.full((64, 64), 100, np.uint8)
    truth = np.zeros((64, 64), np.uint8)
    truth[10:30, 10:30] = 1
    pred = np.roll(truth, 10, axis=1)  # columns 20..39
    errors = L.error_overlay(image, pred, truth, alpha=0.5)
    assert tuple(errors[20, 25]) == (50, 140, 50), "true positive: green"
    assert tuple(errors[20, 35]) == (165, 65, 65), "false positive: red"
    assert tuple(errors[20, 15]) == (70, 95, 177), "false negative: blue"
    assert tuple(errors[50, 50]) == (100, 100, 100), "true negative: untouched"


def test_error_legend_names_the_overlay_colours():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure = plt.figure()
    L.error_legend(figure)
    legend = figure.legends[0]
    labels = [text.get_text() for text in legend.get_texts()]
    colours = [tuple(np.round(np.array(h.get_facecolor()[:3]) * 255).astype(int)) for h in legend.legend_handles]
    plt.close(figure)
    assert labels == list(L.ERROR_COLOURS) and colours == [tuple(c) for c in L.ERROR_COLOURS.values()]


# ---------------------------------------------------------------- evaluate
def test_evaluate_matches_known_dice_iou_and_hd95(tmp_path):
    base = tmp_path / "Lung Segmentation"
    (base / "CXR_png").mkdir(parents=True)
    (base / "masks").mkdir()
    truth = np.zeros((64, 64), np.uint8)
    truth[20:40, 20:40] = 255
    predicted = {"MCUCXR_0001_0": truth, "MCUCXR_0002_0": np.roll(truth, 4, axis=1), "MCUCXR_0003_1": np.zeros_like(truth)}
    for name, bright in predicted.items():
        cv2.imwrite(str(base / "CXR_png" / f"{name}.png"), np.where(bright > 0, 220, 20).astype(np.uint8))
        cv2.imwrite(str(base / "masks" / f"{name}.png"), truth)
    bright_is_lung = StandInModel(lambda x: (x[:, :1] > 0).float() * 20 - 10)
    scores, probs, masks = L.evaluate(bright_is_lung, L.labeled_only(L.build_pairs_table(tmp_path)))
    assert probs.shape == masks.shape == (3, 64, 64) and (masks == (truth > 0)).all()
    np.testing.assert_allclose(scores.dice, [1.0, 2 * 320 / 800, 0.0], atol=1e-6)
    np.testing.assert_allclose(scores.iou, [1.0, 320 / 480, 0.0], atol=1e-6)
    np.testing.assert_allclose(scores.dice_orig, scores.dice, atol=1e-6)
    assert scores.hd95[0] == 0 and scores.hd95[1] == pytest.approx(4.0) and np.isnan(scores.hd95[2])
    assert scores.empty_prediction.tolist() == [False, False, True]
    assert L.summarize_scores(scores.hd95)["missing"] == 1
